//! Dense weights: f32, or the 16-bit floats (bf16, f16) a checkpoint stores, kept at two bytes
//! per weight in memory and widened to f32 in registers as they are multiplied.
//!
//! Widening is exact (every bf16 and f16 value is an f32 value), and the kernels of every
//! element type share one accumulation order, so a 16-bit matrix gives bit for bit what the
//! f32 kernel gives for the same weights widened first: only the memory traffic changes (half
//! of f32's, which is what decode of a large model waits on). The activations stay f32.

use half::{bf16, f16};

/// Which element a dense matrix stores (the SIMD kernels pick their widening load by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DenseKind {
    F32,
    Bf16,
    F16,
}

/// An element of a dense weight matrix.
pub(crate) trait Dense: Copy + Send + Sync + 'static {
    /// Resolved at compile time in every kernel (a `match` on it costs nothing).
    const KIND: DenseKind;

    /// The value as f32 (exact).
    fn widen(self) -> f32;
}

impl Dense for f32 {
    const KIND: DenseKind = DenseKind::F32;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Dense for bf16 {
    const KIND: DenseKind = DenseKind::Bf16;

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Dense for f16 {
    const KIND: DenseKind = DenseKind::F16;

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// A dense matrix's values, whatever their element type.
#[derive(Clone, Copy)]
pub(crate) enum DenseRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl DenseRef<'_> {
    /// Rows `rows` (of `n_in` values each) widened to f32 into `out` (resized to fit).
    pub fn widen_rows_into(self, rows: std::ops::Range<usize>, n_in: usize, out: &mut Vec<f32>) {
        let span = rows.start * n_in..rows.end * n_in;
        out.clear();
        match self {
            DenseRef::F32(w) => out.extend_from_slice(&w[span]),
            DenseRef::Bf16(w) => out.extend(w[span].iter().map(|v| v.widen())),
            DenseRef::F16(w) => out.extend(w[span].iter().map(|v| v.widen())),
        }
    }
}
