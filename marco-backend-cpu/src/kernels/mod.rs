//! `y[rows, out] = x[rows, in] · Wᵀ` for a [`PackedMatrix`] `W[out, in]`.
//!
//! Two regimes:
//!
//! * **Small batch** (decode; `rows <=` [`SMALL_BATCH_MAX`], [`SMALL_BATCH_MAX_F32`] for f32
//!   weights): memory-bound, so the kernels stream
//!   each weight row exactly once and reuse it for every activation row (in groups of four so
//!   the accumulators stay in registers). Quantized weights take llama.cpp's route by default:
//!   each activation row is quantized once to 8-bit blocks of 32 ([`QuantizedActs`]) and the
//!   weight blocks are multiplied with integer dot products (`vpmaddubsw`/`vpmaddwd`), with
//!   the per-block scales and offsets applied in f32. [`ActivationMode::F32`] instead decodes
//!   the weights to f32 in registers and keeps the activations exact (slower, more precise).
//! * **Large batch** (prefill) of f32 weights, or of quantized weights with f32 activations:
//!   compute-bound, so blocks of weight rows are dequantized to f32 and multiplied with the
//!   `gemm` crate's blocked GEMM.
//!
//! **Batch invariance.** With 8-bit activations, quantized weights take the integer kernels for
//! every batch size, prefill included: an activation row is quantized on its own and its
//! outputs are summed block by block in the same order whatever rows share the call, so a
//! row's result is bit-for-bit the same alone, in a batch of any size, or inside a prompt's
//! prefill. A search that batches its leaves (and a sequence prefilled at once or fed token by
//! token) then sees exactly the logits of each sequence run alone. A GEMM over f32 activations
//! would not: 8-bit activations differ from f32 ones by ~1/254 per block, which moved the
//! default model's logits by up to 0.75 between a prefilled and a stepped sequence. It costs
//! nothing where it matters most: on AVX512-VNNI the integer kernels prefill the default model
//! 3.4× faster than the GEMM did (AVX-512 without VNNI: 1.1×; AVX2: 0.68×). f32 weights keep
//! the GEMM for large batches (a different summation order: results within ~1e-6 relative).
//!
//! The SIMD code is chosen at run time ([`isa`]): on x86-64, AVX-512 (F/BW/VL, with VNNI's
//! `vpdpbusd` where present) for the split Q8_0/Q4_0/Q4_1 and f32 small-batch kernels (two
//! quant blocks per register, up to eight activation rows per pass over a weight row), AVX2 +
//! FMA + F16C for the rest and on older CPUs; on aarch64, NEON (with `sdot` where the CPU has
//! FEAT_DotProd) for the same kernels as AVX2; otherwise a portable scalar path (written so that
//! the compiler vectorizes it with the baseline ISA). The activations are quantized with SIMD
//! too, bit-identical to the portable quantizer. Work is split by output
//! features across the persistent pool of [`crate::pool`]; [`matmul_many`] runs several
//! products that share an input as one pool job, and [`matmul_swiglu`] a gated MLP's gate and
//! up products with the SwiGLU applied to each task's share. A batch whose activations are
//! quantized on several threads does that in the products' own job (one handoff, not two).

/// Runs a kernel over the activation rows in groups of four (the last group holds the 1–3 rows
/// left) and writes each group's values to output column `o`:
/// `four_row_groups!(rows, out, o, |r0| [one, two, three, four])`, where the `R`-th expression
/// computes the `[f32; R]` of rows `r0..r0 + R`. Must be used in an `unsafe` block whose caller
/// owns column `o` of `out` (see [`write_rows`]).
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
macro_rules! four_row_groups {
    ($rows:expr, $out:expr, $o:expr, |$r0:ident| [$one:expr, $two:expr, $three:expr, $four:expr $(,)?]) => {{
        let mut $r0 = 0;
        while $r0 < $rows {
            row_group!($rows, $out, $o, $r0, [$one, $two, $three, $four]);
            $r0 += 4;
        }
    }};
}

/// One group of [`four_row_groups!`]: rows `r0..min(r0 + 4, rows)`, for a caller that orders
/// its loops itself (output tiles outside row groups).
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
macro_rules! row_group {
    ($rows:expr, $out:expr, $o:expr, $r0:expr, [$one:expr, $two:expr, $three:expr, $four:expr $(,)?]) => {
        match $rows - $r0 {
            1 => $crate::kernels::write_rows($out, $r0, $o, &$one),
            2 => $crate::kernels::write_rows($out, $r0, $o, &$two),
            3 => $crate::kernels::write_rows($out, $r0, $o, &$three),
            _ => $crate::kernels::write_rows($out, $r0, $o, &$four),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod dense;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::packed::{Interleaved16, PackedMatrix, SplitBlocks, Storage};
use crate::quant::{GgmlType, QK};
use crate::{pool, KernelError};
use dense::{Dense, DenseRef};

/// Largest row count handled by the small-batch kernels for quantized weights with f32
/// activations ([`ActivationMode::F32`]); larger batches use GEMM. Measured crossover (one
/// thread, `[576→1536]`): Q8_0 between 16 and 32 rows, Q4_1 at ~32 rows (the GEMM path pays for
/// dequantizing the weight on every call). With 8-bit activations (the default) quantized
/// weights never take the GEMM path, whatever the batch.
pub const SMALL_BATCH_MAX: usize = 16;

/// Largest row count handled by the small-batch kernels for f32 weights (crossover with the
/// AVX-512 GEMM measured between 8 and 16 rows).
pub const SMALL_BATCH_MAX_F32: usize = 8;

/// How quantized weights are multiplied in the small-batch kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationMode {
    /// Quantize activations to 8-bit blocks of 32 and use integer dot products (llama.cpp's
    /// scheme; fastest). Adds a relative error of about `1/254` per activation block.
    #[default]
    Q8,
    /// Keep activations in f32 and decode weights to f32 in registers (exact up to f32 rounding).
    F32,
}

/// Options of [`matmul_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulOptions {
    /// Activation handling for quantized weights (ignored for f32 weights).
    pub activations: ActivationMode,
    /// Batches with more rows than this use the GEMM path (quantized weights with
    /// [`ActivationMode::F32`]; with [`ActivationMode::Q8`] they never do).
    pub small_batch_max: usize,
    /// Batches with more rows than this use the GEMM path (f32 weights).
    pub small_batch_max_f32: usize,
    /// Split the work across the kernel thread pool.
    pub parallel: bool,
}

impl Default for MatmulOptions {
    fn default() -> Self {
        MatmulOptions {
            activations: ActivationMode::Q8,
            small_batch_max: SMALL_BATCH_MAX,
            small_batch_max_f32: SMALL_BATCH_MAX_F32,
            parallel: true,
        }
    }
}

/// The instruction set the kernels dispatch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isa {
    /// Portable Rust (auto-vectorized for the build's baseline target).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL) on top of [`Isa::Avx2`]: the split Q8_0/Q4_0/Q4_1 and f32
    /// small-batch kernels use 512-bit vectors (two quant blocks per register).
    Avx512,
    /// [`Isa::Avx512`] plus AVX512-VNNI: `vpdpbusd` does the u8 × i8 dot products in one step.
    Avx512Vnni,
    /// aarch64 NEON (the aarch64 baseline): 8-bit dot products with `smull` + `sadalp`.
    Neon,
    /// [`Isa::Neon`] plus FEAT_DotProd: `sdot` does sixteen i8 × i8 products into four i32 lanes.
    NeonDotprod,
}

/// The instruction set detected at run time (cached after the first call). The environment
/// variable `MARCO_KERNELS` caps it: `scalar` forces the portable path, `avx2` the AVX2 kernels,
/// `avx512` the AVX-512 kernels without VNNI, `neon` the NEON kernels without `sdot` (each only
/// where the CPU supports it).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("MARCO_KERNELS").unwrap_or_default();
        capped_isa(&cap, detect_isa())
    })
}

/// `detected` capped by a `MARCO_KERNELS` value (`scalar`, `avx2`, `avx512`, `neon`; anything
/// else leaves it as is). A cap never raises the level above what the CPU has.
fn capped_isa(cap: &str, detected: Isa) -> Isa {
    match (cap.trim().to_ascii_lowercase().as_str(), detected) {
        ("scalar", _) => Isa::Scalar,
        ("avx2", Isa::Avx512 | Isa::Avx512Vnni) => Isa::Avx2,
        ("avx512", Isa::Avx512Vnni) => Isa::Avx512,
        ("neon", Isa::NeonDotprod) => Isa::Neon,
        _ => detected,
    }
}

/// Whether Q8_0/Q4_0/Q4_1 weights are packed as [`Interleaved16`] (sixteen rows interleaved)
/// for the AVX512-VNNI kernel that reads them; elsewhere they stay [`SplitBlocks`].
pub(crate) fn interleaved_kernel_available() -> bool {
    isa() == Isa::Avx512Vnni
}

/// The best instruction set of this CPU.
fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                if is_x86_feature_detected!("avx512vnni") {
                    return Isa::Avx512Vnni;
                }
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            Isa::NeonDotprod
        } else {
            Isa::Neon
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        Isa::Scalar
    }
}

/// Activation rows quantized to 8-bit blocks of 32 (one f32 scale per block).
#[derive(Debug, Clone)]
pub(crate) struct QuantizedActs {
    /// Blocks per row.
    pub blocks: usize,
    /// `rows * blocks * 32` quantized values.
    pub qs: AlignedI8,
    /// Scale of each block (`rows * blocks`, then [`SCALE_PAD`] zeros).
    pub d: Vec<f32>,
    /// `d * sum(q)` of each block (`rows * blocks`, then [`SCALE_PAD`] zeros).
    pub dsum: Vec<f32>,
    /// `d * sum(q)` of each half (16 values) of each block.
    pub dsum16: Vec<[f32; 2]>,
}

impl QuantizedActs {
    /// [`QuantizedActs::quantize`] with the SIMD code of `isa` (bit-identical results). A
    /// batch of [`PARALLEL_QUANTIZE_MIN`] values or more is split among the pool threads
    /// (blocks are independent, so the split does not change a bit).
    pub fn quantize_with(isa: Isa, x: &[f32], rows: usize, cols: usize) -> QuantizedActs {
        if x.len() < PARALLEL_QUANTIZE_MIN || pool::num_threads() == 1 {
            let mut acts = Self::zeroed(rows, cols);
            quantize_part(isa, &x[..x.len() / QK * QK], acts.all_mut());
            return acts;
        }
        quantize_and_run(isa, x, rows, cols, 0, &|_, _| {})
    }

    /// Every block, borrowed for writing.
    fn all_mut(&mut self) -> ActsMut<'_> {
        let blocks = self.qs.len() / QK;
        ActsMut {
            qs: &mut self.qs[..blocks * QK],
            d: &mut self.d[..blocks],
            dsum: &mut self.dsum[..blocks],
            dsum16: &mut self.dsum16[..blocks],
        }
    }

    fn zeroed(rows: usize, cols: usize) -> QuantizedActs {
        let blocks = cols / QK;
        QuantizedActs {
            blocks,
            qs: AlignedI8::zeroed(rows * cols),
            d: vec![0.0; rows * blocks + SCALE_PAD],
            dsum: vec![0.0; rows * blocks + SCALE_PAD],
            dsum16: vec![[0.0; 2]; rows * blocks],
        }
    }

    /// Quantizes `rows` rows of `cols` (a multiple of 32) values: per block `d = max|x| / 127`,
    /// `q = round(x / d)` (ties away from zero), as ggml's `quantize_row_q8_0` but with an f32 scale.
    /// The portable reference of [`QuantizedActs::quantize_with`] (the tests compare them).
    #[cfg(test)]
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> QuantizedActs {
        let mut acts = Self::zeroed(rows, cols);
        quantize_blocks(&x[..x.len() / QK * QK], acts.all_mut());
        acts
    }
}

/// Quantizes the blocks of `x` into `part` (one entry per block) with the SIMD code of `isa`.
fn quantize_part(isa: Isa, x: &[f32], part: ActsMut<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX2, FMA and F16C at run time (AVX-512 implies them);
        // `part` has one entry per block of `x`.
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::quantize_acts(x, part) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline; `part` has one entry per block of `x`.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::quantize_acts(x, part) },
        _ => quantize_blocks(x, part),
    }
}

/// The buffers of a [`QuantizedActs`] as raw pointers, for the tasks of one pool job that
/// quantize disjoint block ranges of it before other tasks of the job read it.
#[derive(Clone, Copy)]
struct RawActs {
    qs: *mut i8,
    d: *mut f32,
    dsum: *mut f32,
    dsum16: *mut [f32; 2],
}

// SAFETY: each task writes its own block range, and readers wait for every writer (see
// `quantize_and_run`).
unsafe impl Send for RawActs {}
unsafe impl Sync for RawActs {}

impl RawActs {
    fn new(acts: &mut QuantizedActs) -> RawActs {
        RawActs {
            qs: acts.qs.as_mut_ptr(),
            d: acts.d.as_mut_ptr(),
            dsum: acts.dsum.as_mut_ptr(),
            dsum16: acts.dsum16.as_mut_ptr(),
        }
    }

    /// Blocks `blocks` as an [`ActsMut`].
    ///
    /// # Safety
    /// The blocks exist, and nothing else reads or writes them while the result lives.
    unsafe fn part<'a>(self, blocks: Range<usize>) -> ActsMut<'a> {
        let n = blocks.len();
        // SAFETY: the caller's contract.
        unsafe {
            ActsMut {
                qs: std::slice::from_raw_parts_mut(self.qs.add(blocks.start * QK), n * QK),
                d: std::slice::from_raw_parts_mut(self.d.add(blocks.start), n),
                dsum: std::slice::from_raw_parts_mut(self.dsum.add(blocks.start), n),
                dsum16: std::slice::from_raw_parts_mut(self.dsum16.add(blocks.start), n),
            }
        }
    }
}

/// Consecutive blocks of a [`QuantizedActs`], borrowed for writing.
pub(crate) struct ActsMut<'a> {
    pub qs: &'a mut [i8],
    pub d: &'a mut [f32],
    pub dsum: &'a mut [f32],
    pub dsum16: &'a mut [[f32; 2]],
}

/// Values per [`QuantizedActs::quantize_with`] call from which the pool threads share the work
/// (eight rows of the default model's width and up: one row is ~0.1 µs, less than a handoff).
const PARALLEL_QUANTIZE_MIN: usize = 4096;

/// The portable definition of the activation quantization, for the blocks of `x` into `out`.
fn quantize_blocks(x: &[f32], out: ActsMut<'_>) {
    let ActsMut { qs, d: d_out, dsum: dsum_out, dsum16: dsum16_out } = out;
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sums = [0i32; 2];
        for (j, (q, &v)) in qb.iter_mut().zip(xb).enumerate() {
            let rounded = (v * inv).round().clamp(-127.0, 127.0) as i8;
            *q = rounded;
            sums[j / 16] += rounded as i32;
        }
        d_out[b] = d;
        dsum16_out[b] = [d * sums[0] as f32, d * sums[1] as f32];
        dsum_out[b] = d * (sums[0] + sums[1]) as f32;
    }
}

/// Zeros after the activation scales and sums, so that an eight-lane load from any block
/// stays in bounds.
pub(crate) const SCALE_PAD: usize = 8;

/// A zeroed `[i8]` buffer that starts on a 64-byte boundary, so that the activation rows of
/// the common widths (multiples of 64) are whole cache lines: a 64-byte vector load of two
/// quant blocks then never straddles two lines.
#[derive(Debug, Clone)]
pub(crate) struct AlignedI8 {
    lines: Vec<CacheLine>,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([i8; 64]);

impl AlignedI8 {
    pub(crate) fn zeroed(len: usize) -> AlignedI8 {
        AlignedI8 { lines: vec![CacheLine([0; 64]); len.div_ceil(64)], len }
    }
}

impl std::ops::Deref for AlignedI8 {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        // SAFETY: `lines` holds at least `len` initialized `i8`s, contiguous (`CacheLine` is a
        // `repr(C)` array of 64 bytes with no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }
}

impl std::ops::DerefMut for AlignedI8 {
    fn deref_mut(&mut self) -> &mut [i8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i8, self.len) }
    }
}

/// Where a task writes its outputs: `out[r * n_out + o]` for its own `o` range only.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    ptr: *mut f32,
    n_out: usize,
}

// SAFETY: tasks write disjoint output columns (their own `o` ranges) of a buffer that outlives
// the fork-join call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `value` at `(row, col)`.
    ///
    /// # Safety
    /// `row * n_out + col` must be in bounds, and no other thread may write that element.
    #[inline(always)]
    pub unsafe fn write(self, row: usize, col: usize, value: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.ptr.add(row * self.n_out + col) = value }
    }
}

/// Raw views of the quantized activations, for unchecked access in the inner loops.
#[derive(Clone, Copy)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) struct Acts {
    pub qs: *const i8,
    pub d: *const f32,
    pub dsum: *const f32,
    pub dsum16: *const [f32; 2],
    pub blocks: usize,
}

impl Acts {
    pub(crate) fn new(acts: &QuantizedActs) -> Acts {
        Acts {
            qs: acts.qs.as_ptr(),
            d: acts.d.as_ptr(),
            dsum: acts.dsum.as_ptr(),
            dsum16: acts.dsum16.as_ptr(),
            blocks: acts.blocks,
        }
    }

    /// Block `b` of row `r` (32 quantized values).
    #[inline(always)]
    pub(crate) unsafe fn block(self, r: usize, b: usize) -> *const u8 {
        // SAFETY: the caller keeps `r` and `b` in range.
        unsafe { self.qs.add((r * self.blocks + b) * QK) as *const u8 }
    }

    #[inline(always)]
    pub(crate) unsafe fn scale(self, r: usize, b: usize) -> f32 {
        // SAFETY: the caller keeps `r` and `b` in range.
        unsafe { *self.d.add(r * self.blocks + b) }
    }

    #[inline(always)]
    pub(crate) unsafe fn scaled_sum(self, r: usize, b: usize) -> f32 {
        // SAFETY: the caller keeps `r` and `b` in range.
        unsafe { *self.dsum.add(r * self.blocks + b) }
    }

    #[inline(always)]
    pub(crate) unsafe fn scaled_sum16(self, r: usize, b: usize) -> [f32; 2] {
        // SAFETY: the caller keeps `r` and `b` in range.
        unsafe { *self.dsum16.add(r * self.blocks + b) }
    }
}

/// Writes `values[r]` to `out[r0 + r, o]`.
///
/// # Safety
/// The caller owns column `o`, and rows `r0..r0 + R` exist.
#[inline(always)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) unsafe fn write_rows<const R: usize>(out: OutPtr, r0: usize, o: usize, values: &[f32; R]) {
    for (r, &v) in values.iter().enumerate() {
        // SAFETY: the caller owns column `o` and rows `r0..r0 + R` exist.
        unsafe { out.write(r0 + r, o, v) };
    }
}

/// `out[rows, out_features] = x[rows, in_features] · Wᵀ` with default options.
///
/// `x` is row-major with `rows * w.in_features()` values and `out` row-major with
/// `rows * w.out_features()` values; mismatched lengths are errors.
pub fn matmul(x: &[f32], rows: usize, w: &PackedMatrix, out: &mut [f32]) -> Result<(), KernelError> {
    matmul_with(x, rows, w, out, MatmulOptions::default())
}

/// [`matmul`] with explicit [`MatmulOptions`].
pub fn matmul_with(
    x: &[f32],
    rows: usize,
    w: &PackedMatrix,
    out: &mut [f32],
    options: MatmulOptions,
) -> Result<(), KernelError> {
    matmul_many(x, rows, &[w], &mut [out], options)
}

/// Several products sharing one input: `outs[i][rows, out_i] = x[rows, in] · W_iᵀ` (e.g. a
/// layer's q/k/v projections, or its gate and up projections). Every weight must have the same
/// `in_features`, and `outs[i]` must hold `rows * weights[i].out_features()` values.
///
/// Equivalent to one [`matmul_with`] per weight (bit for bit: each output element is computed
/// by the same kernel in the same order), but cheaper for small batches: the activations are
/// quantized once for all weights, and the output ranges of all products are the tasks of one
/// job of the thread pool (one dispatch instead of one per weight).
pub fn matmul_many(
    x: &[f32],
    rows: usize,
    weights: &[&PackedMatrix],
    outs: &mut [&mut [f32]],
    options: MatmulOptions,
) -> Result<(), KernelError> {
    if weights.len() != outs.len() {
        return Err(KernelError::InvalidShape {
            reason: format!("{} weights but {} output buffers", weights.len(), outs.len()),
        });
    }
    let Some(first) = weights.first() else {
        return Ok(());
    };
    let n_in = first.in_features();
    if let Some(other) = weights.iter().find(|w| w.in_features() != n_in) {
        return Err(KernelError::InvalidShape {
            reason: format!("weights of one product share in_features: {} vs {}", n_in, other.in_features()),
        });
    }
    check_elements("matmul input", rows, n_in, x.len())?;
    for (w, out) in weights.iter().zip(outs.iter()) {
        check_elements("matmul output", rows, w.out_features(), out.len())?;
    }
    if rows == 0 {
        return Ok(());
    }
    let isa = isa();
    let plans: Vec<Plan<'_>> = weights.iter().map(|w| Plan::new(w, rows, options)).collect();
    let out_ptrs: Vec<OutPtr> = weights
        .iter()
        .zip(outs.iter_mut())
        .map(|(w, out)| OutPtr { ptr: out.as_mut_ptr(), n_out: w.out_features() })
        .collect();
    // The tasks of every product, split exactly as a lone product would be.
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    for (i, (w, plan)) in weights.iter().zip(&plans).enumerate() {
        let (align, min_len) = plan.task_granularity();
        tasks.extend(split_outputs(w.out_features(), align, min_len, options.parallel).into_iter().map(|r| (i, r)));
    }
    // One quantization of the activations serves every product that uses them.
    let needs_acts = plans.iter().any(Plan::needs_quantized_acts);
    run_product_tasks(isa, x, rows, n_in, needs_acts, tasks.len(), &|t, acts| {
        let (i, range) = tasks[t].clone();
        plans[i].run(isa, x, rows, n_in, acts, range, out_ptrs[i]);
    });
    Ok(())
}

/// `out[rows, n] = silu(x · Gᵀ) ⊙ (x · Uᵀ)`: a gated MLP's gate and up projections and its
/// SwiGLU in one pass. Each task computes one range of output features of both products and
/// applies the SwiGLU to that range while it is in cache, so no separate elementwise pass (nor
/// a pool job for it) runs. The products are exactly those of [`matmul_with`] and the SwiGLU
/// that of [`crate::ops::swiglu`] (the same bits). `gate` and `up` must have the same shape.
pub fn matmul_swiglu(
    x: &[f32],
    rows: usize,
    gate: &PackedMatrix,
    up: &PackedMatrix,
    out: &mut [f32],
    options: MatmulOptions,
) -> Result<(), KernelError> {
    let (n_out, n_in) = (gate.out_features(), gate.in_features());
    if (up.out_features(), up.in_features()) != (n_out, n_in) {
        return Err(KernelError::InvalidShape {
            reason: format!(
                "gate [{n_out}, {n_in}] and up [{}, {}] projections differ in shape",
                up.out_features(),
                up.in_features()
            ),
        });
    }
    check_elements("matmul input", rows, n_in, x.len())?;
    check_elements("matmul output", rows, n_out, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    let isa = isa();
    let plans = [Plan::new(gate, rows, options), Plan::new(up, rows, options)];
    let (align, min_len) = plans[0].task_granularity();
    let ranges = split_outputs(n_out, align, min_len, options.parallel);
    let mut up_out = vec![0.0f32; rows * n_out];
    let gate_ptr = OutPtr { ptr: out.as_mut_ptr(), n_out };
    let up_ptr = OutPtr { ptr: up_out.as_mut_ptr(), n_out };
    let needs_acts = plans.iter().any(Plan::needs_quantized_acts);
    run_product_tasks(isa, x, rows, n_in, needs_acts, ranges.len(), &|t, acts| {
        let range = ranges[t].clone();
        plans[0].run(isa, x, rows, n_in, acts, range.clone(), gate_ptr);
        plans[1].run(isa, x, rows, n_in, acts, range.clone(), up_ptr);
        for r in 0..rows {
            let at = r * n_out + range.start;
            // SAFETY: columns `range` of every row are this task's own, in both buffers, which
            // outlive the job; the products above have written them.
            let (gated, ups) = unsafe {
                (
                    std::slice::from_raw_parts_mut(gate_ptr.ptr.add(at), range.len()),
                    std::slice::from_raw_parts(up_ptr.ptr.add(at), range.len()),
                )
            };
            crate::ops::swiglu_serial(gated, ups);
        }
    });
    Ok(())
}

/// Runs `n_tasks` product tasks, `run_task(t, acts)`, with the activations quantized first when
/// `needs_acts` (once, shared by all tasks). A batch large enough to quantize on several
/// threads does it inside the tasks' pool job ([`quantize_and_run`]).
fn run_product_tasks(
    isa: Isa,
    x: &[f32],
    rows: usize,
    n_in: usize,
    needs_acts: bool,
    n_tasks: usize,
    run_task: &(dyn Fn(usize, Option<&QuantizedActs>) + Sync),
) {
    if needs_acts && n_tasks > 1 && x.len() >= PARALLEL_QUANTIZE_MIN && pool::num_threads() > 1 {
        quantize_and_run(isa, x, rows, n_in, n_tasks, run_task);
        return;
    }
    // One task (or a batch too small to share): quantize first, on this thread if small.
    let acts = needs_acts.then(|| QuantizedActs::quantize_with(isa, x, rows, n_in));
    match n_tasks {
        0 => {}
        1 => run_task(0, acts.as_ref()),
        n => pool::run(n, &|t| run_task(t, acts.as_ref())),
    }
}

/// Quantizes the activations on the pool's threads (one share of the blocks each; blocks are
/// independent, so the bits are those of one thread) and runs `n_tasks` product tasks in the
/// same pool job (one handoff to the workers instead of two): each product task waits until
/// every quantization task is done. Tasks are claimed in order, so by the time a thread waits,
/// every quantization task has been claimed by a thread that is running it. Returns the
/// activations.
fn quantize_and_run(
    isa: Isa,
    x: &[f32],
    rows: usize,
    n_in: usize,
    n_tasks: usize,
    run_task: &(dyn Fn(usize, Option<&QuantizedActs>) + Sync),
) -> QuantizedActs {
    let mut acts = QuantizedActs::zeroed(rows, n_in);
    let raw = RawActs::new(&mut acts);
    let blocks = x.len() / QK;
    let per = blocks.div_ceil(pool::num_threads()).max(1);
    let quantize_tasks = blocks.div_ceil(per);
    let quantized = AtomicUsize::new(0);
    // Read only after every quantization task has finished writing (the `Acquire` below).
    let acts_ptr: *const QuantizedActs = &acts;
    let acts_ptr = ActsPtr(acts_ptr);
    pool::run(quantize_tasks + n_tasks, &|t| {
        if t < quantize_tasks {
            let part = t * per..((t + 1) * per).min(blocks);
            // SAFETY: task `t` alone writes blocks `part`, which exist; no product task reads
            // them before `quantized` counts this task.
            let acts_part = unsafe { raw.part(part.clone()) };
            quantize_part(isa, &x[part.start * QK..part.end * QK], acts_part);
            quantized.fetch_add(1, Ordering::Release);
            return;
        }
        while quantized.load(Ordering::Acquire) < quantize_tasks {
            std::hint::spin_loop();
        }
        // SAFETY: every writer has finished (the load above), `acts` outlives the job, and
        // nothing writes it any more.
        let acts = unsafe { &*acts_ptr.get() };
        run_task(t - quantize_tasks, Some(acts));
    });
    acts
}

/// A shared pointer to the activations of [`quantize_and_run`].
#[derive(Clone, Copy)]
struct ActsPtr(*const QuantizedActs);

// SAFETY: dereferenced only after the writers are done (see `quantize_and_run`).
unsafe impl Send for ActsPtr {}
unsafe impl Sync for ActsPtr {}

impl ActsPtr {
    fn get(self) -> *const QuantizedActs {
        self.0
    }
}

/// Checks that a `[rows, width]` buffer holds `len` elements.
fn check_elements(what: &'static str, rows: usize, width: usize, len: usize) -> Result<(), KernelError> {
    let expected =
        rows.checked_mul(width).ok_or_else(|| KernelError::InvalidShape { reason: "rows overflow".into() })?;
    if len != expected {
        return Err(KernelError::LengthMismatch { what, expected, actual: len, unit: "elements" });
    }
    Ok(())
}

/// How one product of a [`matmul_many`] call is computed.
enum Plan<'a> {
    /// Large batch: dequantized tiles and `gemm`.
    Gemm(&'a PackedMatrix),
    /// Small batch, dense weights (f32, bf16 or f16).
    Dense(DenseRef<'a>),
    /// Small batch, split Q8_0/Q4_0/Q4_1 weights, 8-bit activations.
    SplitQ8(&'a SplitBlocks),
    /// Small batch, split weights decoded to f32.
    SplitF32(&'a SplitBlocks),
    /// Small batch, interleaved weights, 8-bit activations.
    InterleavedQ8(&'a Interleaved16),
    /// Small batch, interleaved weights decoded to f32.
    InterleavedF32(&'a Interleaved16),
    /// Small batch, k-quant blocks, 8-bit activations.
    BlocksQ8(BlockRows<'a>),
    /// Small batch, k-quant blocks decoded to f32.
    BlocksF32(BlockRows<'a>),
}

impl<'a> Plan<'a> {
    fn new(w: &'a PackedMatrix, rows: usize, options: MatmulOptions) -> Plan<'a> {
        let n_in = w.in_features();
        let q8 = options.activations == ActivationMode::Q8;
        let gemm = match w.storage() {
            Storage::F32(_) | Storage::Bf16(_) | Storage::F16(_) => rows > options.small_batch_max_f32,
            // Never for 8-bit activations: the GEMM path multiplies f32 activations, so a row's
            // result would change with the number of rows beside it (see the module doc).
            _ => !q8 && rows > options.small_batch_max,
        };
        if gemm {
            return Plan::Gemm(w);
        }
        match w.storage() {
            Storage::F32(values) => Plan::Dense(DenseRef::F32(values)),
            Storage::Bf16(values) => Plan::Dense(DenseRef::Bf16(values)),
            Storage::F16(values) => Plan::Dense(DenseRef::F16(values)),
            Storage::Split(split) if q8 => Plan::SplitQ8(split),
            Storage::Split(split) => Plan::SplitF32(split),
            Storage::Interleaved(w) if q8 => Plan::InterleavedQ8(w),
            Storage::Interleaved(w) => Plan::InterleavedF32(w),
            Storage::Blocks { ty, data, row_stride } => {
                let blocks = BlockRows { ty: *ty, data, row_stride: *row_stride, n_in };
                if q8 {
                    Plan::BlocksQ8(blocks)
                } else {
                    Plan::BlocksF32(blocks)
                }
            }
        }
    }

    fn needs_quantized_acts(&self) -> bool {
        matches!(self, Plan::SplitQ8(_) | Plan::BlocksQ8(_) | Plan::InterleavedQ8(_))
    }

    /// `(align, min_len)` of [`split_outputs`] for this product.
    fn task_granularity(&self) -> (usize, usize) {
        match self {
            Plan::Gemm(_) => (GEMM_TILE, GEMM_TILE),
            Plan::InterleavedQ8(_) | Plan::InterleavedF32(_) => (Interleaved16::ROWS, 64),
            _ => (8, 64),
        }
    }

    /// Computes the output columns `range` (this task's own).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        isa: Isa,
        x: &[f32],
        rows: usize,
        n_in: usize,
        acts: Option<&QuantizedActs>,
        range: Range<usize>,
        out: OutPtr,
    ) {
        // Reordered blocks with f32 activations: file-layout tiles through the f32 decode kernel.
        let decode_tiles = |ty: GgmlType, blocks: usize, rows_into: &dyn Fn(Range<usize>, &mut Vec<u8>)| {
            via_ggml_tiles(ty, blocks, rows_into, n_in, range.clone(), out, &|blocks, local, out| {
                float_decode_rows(isa, blocks, x, rows, local, out)
            })
        };
        match (self, acts) {
            (Plan::Gemm(w), _) => gemm_path(x, rows, w, range, out),
            (Plan::Dense(DenseRef::F32(w)), _) => dense_rows(isa, w, n_in, x, rows, range, out),
            (Plan::Dense(DenseRef::Bf16(w)), _) => dense_rows(isa, w, n_in, x, rows, range, out),
            (Plan::Dense(DenseRef::F16(w)), _) => dense_rows(isa, w, n_in, x, rows, range, out),
            (Plan::SplitQ8(split), Some(acts)) => split_rows(isa, split, acts, rows, range, out),
            (Plan::SplitF32(w), _) => decode_tiles(w.ty, w.blocks, &|r, b| w.ggml_rows_into(r, b)),
            (Plan::InterleavedQ8(w), Some(acts)) => interleaved_rows(isa, w, acts, rows, range, out),
            (Plan::InterleavedF32(w), _) => decode_tiles(w.ty, w.blocks, &|r, b| w.ggml_rows_into(r, b)),
            (Plan::BlocksQ8(blocks), Some(acts)) => quantized_rows(isa, blocks, acts, rows, range, out),
            (Plan::BlocksF32(blocks), _) => float_decode_rows(isa, blocks, x, rows, range, out),
            // `matmul_many` quantizes the activations whenever a plan needs them.
            (Plan::SplitQ8(_) | Plan::BlocksQ8(_) | Plan::InterleavedQ8(_), None) => {}
        }
    }
}

/// A block-quantized weight as the kernels see it.
pub(crate) struct BlockRows<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub row_stride: usize,
    pub n_in: usize,
}

impl BlockRows<'_> {
    #[inline(always)]
    pub fn row(&self, o: usize) -> &[u8] {
        &self.data[o * self.row_stride..(o + 1) * self.row_stride]
    }
}

/// Output ranges for the tasks: [`TASKS_PER_THREAD`] per thread (claimed dynamically: a
/// thread that starts late leaves its share to the others), boundaries aligned to `align`
/// features, at least `min_len` features each.
fn split_outputs(n_out: usize, align: usize, min_len: usize, parallel: bool) -> Vec<Range<usize>> {
    let threads = if parallel { pool::num_threads() } else { 1 };
    let tasks = if threads == 1 { 1 } else { (TASKS_PER_THREAD * threads).min(n_out / min_len.max(1)).max(1) };
    let per = n_out.div_ceil(tasks).div_ceil(align) * align;
    (0..tasks).map(|t| (t * per).min(n_out)..((t + 1) * per).min(n_out)).filter(|r| !r.is_empty()).collect()
}

/// Tasks per pool thread in a product. One contiguous share per thread streams the weights
/// fastest: against four per thread, measured on the 2-core EPYC (alternating runs,
/// `decode_bench --runs 5`), decode went 297 → 345 tok/s on the default Q4_1 model and
/// 102 → 112 on its F32 copy, batched decode of 8 sequences 933 → 1076 tok/s; prefill did not
/// change. A late thread still costs at most its own share.
const TASKS_PER_THREAD: usize = 1;

/// Runs `f` on GGUF-layout copies of the rows `outs` of a reordered matrix (`ty`, `blocks` per
/// row; `rows_into` writes rows back in file layout), `GEMM_TILE` rows at a time, for the paths
/// that read blocks in file layout (portable kernels, f32 decode).
fn via_ggml_tiles(
    ty: GgmlType,
    blocks: usize,
    rows_into: &dyn Fn(Range<usize>, &mut Vec<u8>),
    n_in: usize,
    outs: Range<usize>,
    out: OutPtr,
    f: &dyn Fn(&BlockRows<'_>, Range<usize>, OutPtr),
) {
    let row_stride = blocks * ty.type_size();
    let mut bytes = Vec::new();
    let mut start = outs.start;
    while start < outs.end {
        let end = (start + GEMM_TILE).min(outs.end);
        rows_into(start..end, &mut bytes);
        let blocks = BlockRows { ty, data: &bytes, row_stride, n_in };
        // SAFETY: column `start` is inside this task's range, so the shifted pointer stays in
        // bounds for every column `start + local` with `local < end - start`.
        let shifted = OutPtr { ptr: unsafe { out.ptr.add(start) }, n_out: out.n_out };
        f(&blocks, 0..end - start, shifted);
        start = end;
    }
}

/// Outputs `outs` (whole groups of sixteen) of an interleaved matrix: the AVX512-VNNI kernel
/// where it runs (the only place such matrices are packed), else the portable reference.
fn interleaved_rows(isa: Isa, w: &Interleaved16, acts: &QuantizedActs, rows: usize, outs: Range<usize>, out: OutPtr) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C at run time.
        Isa::Avx512Vnni => unsafe { avx512::interleaved_rows(w, acts, rows, outs, out) },
        _ => scalar::interleaved_rows(w, acts, rows, outs, out),
    }
}

fn split_rows(isa: Isa, w: &SplitBlocks, acts: &QuantizedActs, rows: usize, outs: Range<usize>, out: OutPtr) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C at run time.
        Isa::Avx512Vnni => unsafe { avx512::vnni::split_rows(w, acts, rows, outs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX-512 F/BW/VL, AVX2, FMA and F16C at run time.
        Isa::Avx512 => unsafe { avx512::plain::split_rows(w, acts, rows, outs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX2, FMA and F16C at run time.
        Isa::Avx2 => unsafe { x86::split_rows(w, acts, rows, outs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline.
        Isa::Neon => unsafe { neon::split_rows::<false>(w, acts, rows, outs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above, and `isa()` found FEAT_DotProd for `sdot`.
        Isa::NeonDotprod => unsafe { neon::split_rows::<true>(w, acts, rows, outs, out) },
        _ => via_ggml_tiles(
            w.ty,
            w.blocks,
            &|r, b| w.ggml_rows_into(r, b),
            acts.blocks * QK,
            outs,
            out,
            &|blocks, local, out| scalar::quantized_rows(blocks, acts, rows, local, out),
        ),
    }
}

fn dense_rows<W: Dense>(isa: Isa, w: &[W], n_in: usize, x: &[f32], rows: usize, outs: Range<usize>, out: OutPtr) {
    match isa {
        // One or two rows are bound by memory, where the 512-bit loads (which straddle cache
        // lines unless the weights happen to be 64-byte aligned) measured slower than AVX2.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX-512 F/BW/VL, AVX2, FMA and F16C at run time.
        Isa::Avx512 | Isa::Avx512Vnni if rows > 2 => unsafe { avx512::dense_rows(w, n_in, x, rows, outs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX2, FMA and F16C at run time (the AVX-512 levels imply them).
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::dense_rows(w, n_in, x, rows, outs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::dense_rows(w, n_in, x, rows, outs, out) },
        _ => scalar::dense_rows(w, n_in, x, rows, outs, out),
    }
}

fn quantized_rows(isa: Isa, w: &BlockRows<'_>, acts: &QuantizedActs, rows: usize, outs: Range<usize>, out: OutPtr) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX2, FMA and F16C at run time (the AVX-512 levels imply them).
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::quantized_rows(w, acts, rows, outs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline.
        Isa::Neon => unsafe { neon::quantized_rows::<false>(w, acts, rows, outs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above, and `isa()` found FEAT_DotProd for `sdot`.
        Isa::NeonDotprod => unsafe { neon::quantized_rows::<true>(w, acts, rows, outs, out) },
        _ => scalar::quantized_rows(w, acts, rows, outs, out),
    }
}

fn float_decode_rows(isa: Isa, w: &BlockRows<'_>, x: &[f32], rows: usize, outs: Range<usize>, out: OutPtr) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` verified AVX2, FMA and F16C at run time (the AVX-512 levels imply them).
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { x86::float_decode_rows(w, x, rows, outs, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::float_decode_rows(w, x, rows, outs, out) },
        _ => scalar::float_decode_rows(w, x, rows, outs, out),
    }
}

/// Output features per dequantized tile of the GEMM path.
const GEMM_TILE: usize = 64;

/// Large-batch path: dequantize `GEMM_TILE` weight rows at a time to f32 and multiply with `gemm`.
fn gemm_path(x: &[f32], rows: usize, w: &PackedMatrix, outs: Range<usize>, out: OutPtr) {
    let n_in = w.in_features();
    let mut tile = Vec::new();
    let mut tile_bytes = Vec::new();
    let mut start = outs.start;
    while start < outs.end {
        // f32 weights need no staging: one call for the whole range lets gemm block it freely.
        let end = match w.storage() {
            Storage::F32(_) => outs.end,
            Storage::Bf16(_)
            | Storage::F16(_)
            | Storage::Split(_)
            | Storage::Interleaved(_)
            | Storage::Blocks { .. } => (start + GEMM_TILE).min(outs.end),
        };
        let weights: &[f32] = match w.storage() {
            Storage::F32(values) => &values[start * n_in..end * n_in],
            Storage::Bf16(values) => {
                DenseRef::Bf16(values).widen_rows_into(start..end, n_in, &mut tile);
                &tile
            }
            Storage::F16(values) => {
                DenseRef::F16(values).widen_rows_into(start..end, n_in, &mut tile);
                &tile
            }
            Storage::Split(split) => {
                split.ggml_rows_into(start..end, &mut tile_bytes);
                tile.resize((end - start) * n_in, 0.0);
                // Lengths were validated when the matrix was packed.
                let _ = crate::quant::dequantize_into(split.ty, &tile_bytes, &mut tile);
                &tile
            }
            Storage::Interleaved(w) => {
                w.ggml_rows_into(start..end, &mut tile_bytes);
                tile.resize((end - start) * n_in, 0.0);
                // Lengths were validated when the matrix was packed.
                let _ = crate::quant::dequantize_into(w.ty, &tile_bytes, &mut tile);
                &tile
            }
            Storage::Blocks { ty, data, row_stride } => {
                tile.resize((end - start) * n_in, 0.0);
                // Lengths were validated when the matrix was packed.
                let _ = crate::quant::dequantize_into(*ty, &data[start * row_stride..end * row_stride], &mut tile);
                &tile
            }
        };
        // SAFETY: dst columns `start..end` of `out` belong to this task; `x` is `[rows, n_in]`
        // row-major (row stride n_in, column stride 1); `weights` is `[end - start, n_in]`
        // row-major, read as the `[n_in, end - start]` matrix Wᵀ (row stride 1, column stride n_in).
        unsafe {
            gemm::gemm(
                rows,
                end - start,
                n_in,
                out.ptr.add(start),
                1,
                out.n_out as isize,
                false,
                x.as_ptr(),
                1,
                n_in as isize,
                weights.as_ptr(),
                n_in as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift64 generator (deterministic test data).
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// Every instruction set level this CPU can run, the portable one first.
    fn supported_isas() -> Vec<Isa> {
        #[cfg(target_arch = "aarch64")]
        let all = [Isa::Scalar, Isa::Neon, Isa::NeonDotprod];
        #[cfg(not(target_arch = "aarch64"))]
        let all = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];
        let best = all.iter().position(|&i| i == detect_isa()).unwrap_or(0);
        all[..=best].to_vec()
    }

    fn assert_same_acts(a: &QuantizedActs, b: &QuantizedActs, what: &str) {
        assert_eq!(a.blocks, b.blocks, "{what}");
        assert_eq!(a.qs[..], b.qs[..], "{what}: quants");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.d), bits(&b.d), "{what}: scales");
        assert_eq!(bits(&a.dsum), bits(&b.dsum), "{what}: sums");
        let flat = |v: &[[f32; 2]]| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(flat(&a.dsum16), flat(&b.dsum16), "{what}: half sums");
    }

    #[test]
    fn marco_kernels_caps_the_detected_level() {
        use Isa::*;
        for detected in [Scalar, Avx2, Avx512, Avx512Vnni, Neon, NeonDotprod] {
            assert_eq!(capped_isa("", detected), detected);
            assert_eq!(capped_isa("auto", detected), detected);
            assert_eq!(capped_isa("scalar", detected), Scalar);
            assert_eq!(capped_isa(" Scalar ", detected), Scalar);
        }
        assert_eq!(capped_isa("avx2", Avx512Vnni), Avx2);
        assert_eq!(capped_isa("AVX2", Avx512), Avx2);
        assert_eq!(capped_isa("avx2", Avx2), Avx2);
        assert_eq!(capped_isa("avx2", Scalar), Scalar);
        assert_eq!(capped_isa("avx512", Avx512Vnni), Avx512);
        assert_eq!(capped_isa("avx512", Avx512), Avx512);
        assert_eq!(capped_isa("avx512", Avx2), Avx2);
        assert_eq!(capped_isa("neon", NeonDotprod), Neon);
        assert_eq!(capped_isa("neon", Neon), Neon);
        assert_eq!(capped_isa("scalar", NeonDotprod), Scalar);
        assert_eq!(capped_isa("avx2", NeonDotprod), NeonDotprod);
    }

    #[test]
    fn simd_quantize_is_bit_identical() {
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        for _ in 0..400 {
            let scale = [1e-3f32, 0.5, 1.0, 37.0, 1e4][(next() % 5) as usize];
            blocks.push(std::array::from_fn(|_| ((next() % 20_001) as f32 / 10_000.0 - 1.0) * scale));
        }
        // Exact ties: with max |x| = 127 the scale is 1 and the inverse 1, so k + 0.5 is a tie
        // (and with max 63.5 the inverse is 2, so k/2 + 0.25 is one).
        for amax in [127.0f32, 63.5, 254.0] {
            for _ in 0..20 {
                let step = 127.0 / amax;
                blocks.push(std::array::from_fn(|j| {
                    if j == 7 {
                        if next().is_multiple_of(2) {
                            amax
                        } else {
                            -amax
                        }
                    } else {
                        let k = (next() % 254) as f32 - 127.0;
                        (k + if next().is_multiple_of(2) { 0.5 } else { -0.5 }) / step
                    }
                }));
            }
        }
        // Zeros, signed zeros, subnormal and tiny scales (inverse overflows), infinities, NaN.
        blocks.push([0.0; 32]);
        blocks.push(std::array::from_fn(|j| if j % 2 == 0 { -0.0 } else { 0.0 }));
        blocks.push(std::array::from_fn(|j| j as f32 * 1e-44));
        blocks.push(std::array::from_fn(|j| (j as f32 - 16.0) * 1e-39));
        blocks.push(std::array::from_fn(|j| if j == 3 { f32::INFINITY } else { j as f32 }));
        blocks.push(std::array::from_fn(|j| if j == 30 { f32::NEG_INFINITY } else { -(j as f32) }));
        blocks.push(std::array::from_fn(|j| if j % 5 == 0 { f32::NAN } else { j as f32 - 9.5 }));
        blocks.push([f32::NAN; 32]);
        blocks.push(std::array::from_fn(|j| if j == 0 { f32::MAX } else { f32::MIN_POSITIVE * j as f32 }));
        let x: Vec<f32> = blocks.iter().flatten().copied().collect();
        for isa in supported_isas() {
            for (rows, cols) in [(blocks.len(), QK), (blocks.len() / 4, 4 * QK)] {
                let n = rows * cols;
                let want = QuantizedActs::quantize(&x[..n], rows, cols);
                assert_same_acts(&QuantizedActs::quantize_with(isa, &x[..n], rows, cols), &want, &format!("{isa:?}"));
            }
            // Large enough to be split among the pool threads, with an odd block count per row.
            let (rows, cols) = (9, 19 * QK);
            assert!(rows * cols >= PARALLEL_QUANTIZE_MIN);
            let big: Vec<f32> = (0..rows * cols).map(|i| x[i % x.len()] * (1.0 + (i % 7) as f32)).collect();
            let want = QuantizedActs::quantize(&big, rows, cols);
            assert_same_acts(&QuantizedActs::quantize_with(isa, &big, rows, cols), &want, &format!("{isa:?} split"));
        }
    }

    /// Every SIMD level computes the same integer sums as the portable path; only the f32
    /// summation order differs. Shapes cover partial groups of eight blocks, odd block counts
    /// (a lone block in the AVX-512 pair loop), and every row remainder of the 4- and 8-row passes.
    #[test]
    fn simd_matches_portable_integer_path() {
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
        for ty in PackedMatrix::KEPT_QUANTIZED {
            let block_counts: &[usize] =
                if ty.block_size() == 32 { &[1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15, 16, 18, 19, 48] } else { &[1, 2] };
            for &blocks in block_counts {
                let (n_out, n_in) = (13, blocks * ty.block_size());
                let size = crate::quant::row_bytes(ty, n_in).unwrap_or(0) * n_out;
                let mut data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
                // Sane f16 scales: overwrite every block's scale fields with 0.01-ish values.
                let fields: &[usize] = match ty {
                    GgmlType::Q6_K => &[208],
                    GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
                    _ => &[0],
                };
                for block in data.chunks_exact_mut(ty.type_size()) {
                    for &f in fields {
                        let scale = 0.005 + (next() % 100) as f32 * 1e-4;
                        block[f..f + 2].copy_from_slice(&half::f16::from_f32(scale).to_bits().to_le_bytes());
                    }
                }
                let w = PackedMatrix::from_ggml(ty, &data, n_out, n_in).unwrap();
                for rows in [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16, 17] {
                    let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                    let acts = QuantizedActs::quantize(&x, rows, n_in);
                    let mut portable = vec![0.0f32; rows * n_out];
                    let portable_out = OutPtr { ptr: portable.as_mut_ptr(), n_out };
                    match w.storage() {
                        Storage::Blocks { data, row_stride, .. } => {
                            let blocks = BlockRows { ty, data, row_stride: *row_stride, n_in };
                            scalar::quantized_rows(&blocks, &acts, rows, 0..n_out, portable_out);
                        }
                        Storage::Split(split) => split_rows(Isa::Scalar, split, &acts, rows, 0..n_out, portable_out),
                        // 13 rows: never interleaved (that takes whole groups of sixteen).
                        Storage::F32(_) | Storage::Bf16(_) | Storage::F16(_) | Storage::Interleaved(_) => {
                            panic!("{ty} not kept quantized and split")
                        }
                    }
                    for isa in supported_isas().into_iter().skip(1) {
                        let mut simd = vec![f32::NAN; rows * n_out];
                        let simd_out = OutPtr { ptr: simd.as_mut_ptr(), n_out };
                        match w.storage() {
                            Storage::Blocks { data, row_stride, .. } => {
                                let blocks = BlockRows { ty, data, row_stride: *row_stride, n_in };
                                quantized_rows(isa, &blocks, &acts, rows, 0..n_out, simd_out);
                            }
                            Storage::Split(split) => split_rows(isa, split, &acts, rows, 0..n_out, simd_out),
                            Storage::F32(_) | Storage::Bf16(_) | Storage::F16(_) | Storage::Interleaved(_) => {
                                panic!("{ty} not kept quantized and split")
                            }
                        }
                        for (a, b) in simd.iter().zip(&portable) {
                            // Q6_K and Q4_1 subtract large offset terms, so allow for f32 cancellation.
                            assert!(
                                (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                                "{ty} {isa:?} blocks {blocks} rows {rows}: simd {a} portable {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The interleaved layout gives back the GGUF rows it was built from, its AVX512-VNNI
    /// kernel equals its portable definition bit for bit (every row count of the 8-row passes,
    /// partial and odd block counts, several groups), and both agree with the split layout's
    /// portable path up to f32 summation order.
    #[test]
    fn interleaved_layout_and_kernel() {
        let mut next = xorshift(0xD1B5_4A32_D192_ED03);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            for blocks in [1usize, 2, 3, 7, 18, 48] {
                let (n_out, n_in) = (48, blocks * QK);
                let size = crate::quant::row_bytes(ty, n_in).unwrap_or(0) * n_out;
                let mut data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
                let fields: &[usize] = if ty == GgmlType::Q4_1 { &[0, 2] } else { &[0] };
                for block in data.chunks_exact_mut(ty.type_size()) {
                    for &f in fields {
                        let scale = 0.005 + (next() % 100) as f32 * 1e-4;
                        block[f..f + 2].copy_from_slice(&half::f16::from_f32(scale).to_bits().to_le_bytes());
                    }
                }
                let interleaved = Interleaved16::from_ggml(ty, &data, blocks);
                let mut back = Vec::new();
                interleaved.ggml_rows_into(0..n_out, &mut back);
                assert_eq!(back, data, "{ty} blocks {blocks}: layout round trip");
                let row_bytes = data.len() / n_out;
                interleaved.ggml_rows_into(17..18, &mut back);
                assert_eq!(back, data[17 * row_bytes..18 * row_bytes], "{ty}: one row back");
                let split = SplitBlocks::from_ggml(ty, &data, blocks);
                for rows in [1, 2, 3, 5, 8, 9, 16] {
                    let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                    let acts = QuantizedActs::quantize(&x, rows, n_in);
                    let run = |isa: Isa, outs: Range<usize>| {
                        let mut out = vec![f32::NAN; rows * n_out];
                        interleaved_rows(isa, &interleaved, &acts, rows, outs, OutPtr { ptr: out.as_mut_ptr(), n_out });
                        out
                    };
                    let portable = run(Isa::Scalar, 0..n_out);
                    let mut reference = vec![0.0f32; rows * n_out];
                    split_rows(
                        Isa::Scalar,
                        &split,
                        &acts,
                        rows,
                        0..n_out,
                        OutPtr { ptr: reference.as_mut_ptr(), n_out },
                    );
                    for (a, b) in portable.iter().zip(&reference) {
                        assert!(
                            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                            "{ty} blocks {blocks} rows {rows}: {a} vs {b}"
                        );
                    }
                    if supported_isas().contains(&Isa::Avx512Vnni) {
                        let simd = run(Isa::Avx512Vnni, 0..n_out);
                        assert_eq!(simd, portable, "{ty} blocks {blocks} rows {rows}: VNNI vs portable");
                        // A task's range: only its own groups are written.
                        let part = run(Isa::Avx512Vnni, 16..32);
                        for r in 0..rows {
                            for o in 0..n_out {
                                let v = part[r * n_out + o];
                                assert_eq!(v.is_nan(), !(16..32).contains(&o), "row {r} output {o}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantizing_inside_the_product_job_changes_no_bit() {
        // Decode-sized batches (8 and 9 rows of 576 and 1536 values: past
        // `PARALLEL_QUANTIZE_MIN`), weights of every kind the interleaved and split kernels take.
        let mut next = xorshift(0x5EED_F00D_1234_5678);
        for (ty, n_out, n_in) in [(GgmlType::Q4_1, 576, 576), (GgmlType::Q8_0, 200, 1536), (GgmlType::Q4_0, 64, 576)] {
            let size = crate::quant::row_bytes(ty, n_in).unwrap_or(0) * n_out;
            let mut data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
            let fields: &[usize] = if ty == GgmlType::Q4_1 { &[0, 2] } else { &[0] };
            for block in data.chunks_exact_mut(ty.type_size()) {
                for &f in fields {
                    block[f..f + 2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                }
            }
            let w = PackedMatrix::from_ggml(ty, &data, n_out, n_in).unwrap();
            for rows in [8usize, 9] {
                let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                assert!(x.len() >= PARALLEL_QUANTIZE_MIN);
                let options = MatmulOptions::default();
                let plans = [Plan::new(&w, rows, options)];
                let (align, min_len) = plans[0].task_granularity();
                let tasks: Vec<(usize, Range<usize>)> =
                    split_outputs(n_out, align, min_len, true).into_iter().map(|r| (0, r)).collect();
                let isa = isa();
                // The activations quantized first, by the portable quantizer on this thread
                // (bit-identical to the SIMD ones, `simd_quantize_is_bit_identical`), then the
                // products.
                let mut want = vec![f32::NAN; rows * n_out];
                let acts = QuantizedActs::quantize(&x, rows, n_in);
                let out = OutPtr { ptr: want.as_mut_ptr(), n_out };
                for (_, range) in &tasks {
                    plans[0].run(isa, &x, rows, n_in, Some(&acts), range.clone(), out);
                }
                // One job: quantization tasks, then the product tasks.
                let mut got = vec![f32::NAN; rows * n_out];
                let out = OutPtr { ptr: got.as_mut_ptr(), n_out };
                quantize_and_run(isa, &x, rows, n_in, tasks.len(), &|t, acts| {
                    plans[0].run(isa, &x, rows, n_in, acts, tasks[t].1.clone(), out)
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                assert_eq!(bits(&got), bits(&want), "{ty} rows {rows}");
                assert!(got.iter().all(|v| v.is_finite()));
            }
        }
    }

    /// Batch invariance: with 8-bit activations, a row's outputs are the same bits whether it is
    /// multiplied alone, in a decode-sized batch or in a prefill-sized one (past
    /// [`SMALL_BATCH_MAX`], where f32 activations switch to GEMM), for every weight layout the
    /// 8-bit kernels read (split, interleaved where this CPU builds it, k-quant blocks) and every
    /// instruction set level this CPU runs.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let mut next = xorshift(0x0BA7_C41D_1234_5678);
        // (type, offsets of its f16 scale fields in a block, output features): 40 outputs keep
        // the split layout, 48 take the interleaved one on AVX512-VNNI machines.
        let cases: [(GgmlType, &[usize], usize); 7] = [
            (GgmlType::Q8_0, &[0], 40),
            (GgmlType::Q8_0, &[0], 48),
            (GgmlType::Q4_0, &[0], 48),
            (GgmlType::Q4_1, &[0, 2], 40),
            (GgmlType::Q4_1, &[0, 2], 48),
            (GgmlType::Q4_K, &[0, 2], 40),
            (GgmlType::Q6_K, &[208], 40),
        ];
        for (ty, fields, n_out) in cases {
            let n_in = 512;
            let size = crate::quant::row_bytes(ty, n_in).unwrap_or(0) * n_out;
            let mut data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
            for block in data.chunks_exact_mut(ty.type_size()) {
                for &f in fields {
                    let scale = 0.002 + (next() % 100) as f32 * 1e-4;
                    block[f..f + 2].copy_from_slice(&half::f16::from_f32(scale).to_bits().to_le_bytes());
                }
            }
            let w = PackedMatrix::from_ggml(ty, &data, n_out, n_in).unwrap();
            let rows = SMALL_BATCH_MAX + 21;
            let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let options = MatmulOptions::default();
            for isa in supported_isas() {
                let product = |first: usize, count: usize| {
                    let x = &x[first * n_in..(first + count) * n_in];
                    let acts = QuantizedActs::quantize_with(isa, x, count, n_in);
                    let plan = Plan::new(&w, count, options);
                    assert!(plan.needs_quantized_acts(), "{ty} {count} rows: not the 8-bit kernels");
                    let mut out = vec![f32::NAN; count * n_out];
                    plan.run(isa, x, count, n_in, Some(&acts), 0..n_out, OutPtr { ptr: out.as_mut_ptr(), n_out });
                    out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                };
                let all = product(0, rows);
                for r in 0..rows {
                    assert_eq!(product(r, 1), all[r * n_out..(r + 1) * n_out], "{ty} {isa:?}: row {r} alone");
                }
                let (first, count) = (5, 9);
                assert_eq!(
                    product(first, count),
                    all[first * n_out..(first + count) * n_out],
                    "{ty} {isa:?}: rows {first}..{}",
                    first + count
                );
            }
        }
    }

    #[test]
    fn simd_dense_rows_match_portable() {
        let mut next = xorshift(0x51_7CC1_B727_220A);
        for n_in in [1usize, 7, 15, 16, 17, 33, 64, 100, 576] {
            let n_out = 11;
            let w: Vec<f32> = (0..n_out * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            for rows in 1..=9 {
                let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                let mut portable = vec![0.0f32; rows * n_out];
                scalar::dense_rows(&w, n_in, &x, rows, 0..n_out, OutPtr { ptr: portable.as_mut_ptr(), n_out });
                for isa in supported_isas().into_iter().skip(1) {
                    let mut simd = vec![f32::NAN; rows * n_out];
                    dense_rows(isa, &w, n_in, &x, rows, 0..n_out, OutPtr { ptr: simd.as_mut_ptr(), n_out });
                    for (a, b) in simd.iter().zip(&portable) {
                        assert!((a - b).abs() <= 1e-5 * n_in as f32, "{isa:?} n_in {n_in} rows {rows}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// 16-bit weights give, on every instruction set, the bits the f32 kernel gives for the same
    /// weights widened first (the widening is exact and the summation order shared), including
    /// f16 subnormals, infinities and bf16 values whose low bits matter.
    #[test]
    fn sixteen_bit_weights_give_the_bits_of_their_f32_widening() {
        let mut next = xorshift(0x16B1_7000_0000_0001);
        for n_in in [1usize, 8, 15, 16, 17, 31, 33, 100, 576] {
            let n_out = 9;
            let raw: Vec<u16> = (0..n_out * n_in).map(|_| next() as u16).collect();
            // Keep f16 finite except for a few exact infinities-free values: NaN weights are not
            // the point here, and NaN payloads need not survive a product.
            let halves: Vec<half::f16> = raw
                .iter()
                .map(|&b| half::f16::from_bits(b))
                .map(|v| if v.is_finite() { v } else { half::f16::ONE })
                .collect();
            let brains: Vec<half::bf16> = raw
                .iter()
                .map(|&b| half::bf16::from_bits(b & 0xBFFF)) // exponents small enough for finite sums
                .collect();
            for rows in [1usize, 2, 3, 4, 5, 8, 9] {
                let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                for isa in supported_isas() {
                    let run = |w: DenseRef<'_>| {
                        let mut out = vec![f32::NAN; rows * n_out];
                        let ptr = OutPtr { ptr: out.as_mut_ptr(), n_out };
                        match w {
                            DenseRef::F32(w) => dense_rows(isa, w, n_in, &x, rows, 0..n_out, ptr),
                            DenseRef::Bf16(w) => dense_rows(isa, w, n_in, &x, rows, 0..n_out, ptr),
                            DenseRef::F16(w) => dense_rows(isa, w, n_in, &x, rows, 0..n_out, ptr),
                        }
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    let wide_h: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
                    let wide_b: Vec<f32> = brains.iter().map(|v| v.to_f32()).collect();
                    assert_eq!(run(DenseRef::F16(&halves)), run(DenseRef::F32(&wide_h)), "f16 {isa:?} {n_in} {rows}");
                    assert_eq!(run(DenseRef::Bf16(&brains)), run(DenseRef::F32(&wide_b)), "bf16 {isa:?} {n_in} {rows}");
                }
            }
        }
    }
}
