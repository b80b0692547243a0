//! Weights stored the way the kernels read them fastest.
//!
//! A linear layer's weight is `W[out_features, in_features]` (the Hugging Face and GGUF layout:
//! each output feature's weights are one contiguous row), and the kernels compute
//! `y = x · Wᵀ`, streaming one weight row per output feature. [`PackedMatrix`] keeps either
//!
//! * plain f32 rows (f32 checkpoints; every ggml type without a fused kernel),
//! * bf16 or f16 rows as the checkpoint stores them (two bytes per weight, widened to f32 in
//!   registers by the kernels: a 7B bf16 model holds ~15 GB, not the ~30 GB of f32), or
//! * the GGUF blocks themselves, unchanged, for the types with fused dequantize-dot kernels
//!   ([`PackedMatrix::KEPT_QUANTIZED`]): a Q4_1 layer stays at 5 bits per weight in memory and
//!   is decoded in registers while it is multiplied, so decode reads ~6× fewer bytes than f32.
//!
//! K-quant rows are stored exactly as in GGUF (`row_bytes(ty, in_features)` bytes each). Q8_0,
//! Q4_0 and Q4_1 are reordered at pack time (same bytes, see `SplitBlocks`): the f16 scales of
//! consecutive blocks become contiguous so that the kernels convert eight with one
//! instruction, which makes the 4-bit kernels bandwidth-bound instead of decode-bound.

use crate::quant::{dequantize_into, quantize_q8_0, row_bytes, GgmlType};
use crate::KernelError;

/// The element storage of a [`PackedMatrix`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Storage {
    /// Row-major f32, `out_features * in_features` values.
    F32(Vec<f32>),
    /// Row-major bf16, as stored by the checkpoint.
    Bf16(Vec<half::bf16>),
    /// Row-major f16, as stored by the checkpoint.
    F16(Vec<half::f16>),
    /// Q8_0/Q4_0/Q4_1 blocks with scales and quants split apart (see [`SplitBlocks`]).
    Split(SplitBlocks),
    /// Q8_0/Q4_0/Q4_1 blocks of sixteen rows interleaved (see [`Interleaved16`]).
    Interleaved(Interleaved16),
    /// Row-major ggml blocks (the k-quants), exactly as in the GGUF file.
    Blocks {
        /// The block type.
        ty: GgmlType,
        /// `out_features * row_stride` bytes.
        data: Vec<u8>,
        /// Bytes per weight row.
        row_stride: usize,
    },
}

/// Q8_0, Q4_0 and Q4_1 weights with each block's f16 scale (and min) moved out of the block:
/// `d[o * blocks + b]`, `m[o * blocks + b]` (Q4_1 only) and the quants `qs` (32 or 16 bytes per
/// block) back to back. Same bytes as GGUF, different order: the kernels load eight
/// consecutive scales with one instruction instead of extracting one per block.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SplitBlocks {
    /// Q8_0, Q4_0 or Q4_1.
    pub ty: GgmlType,
    /// Blocks per weight row.
    pub blocks: usize,
    /// f16 bits of each block's scale.
    pub d: Vec<u16>,
    /// f16 bits of each block's min (Q4_1), else empty.
    pub m: Vec<u16>,
    /// Quants, `quant_bytes(ty)` per block.
    pub qs: Vec<u8>,
}

impl SplitBlocks {
    /// Quant bytes per block.
    pub fn quant_bytes(ty: GgmlType) -> usize {
        if ty == GgmlType::Q8_0 {
            32
        } else {
            16
        }
    }

    /// Header bytes (scale, min) before the quants in a GGUF block.
    pub fn header_bytes(ty: GgmlType) -> usize {
        ty.type_size() - Self::quant_bytes(ty)
    }

    /// Splits GGUF blocks (`data` holds whole rows of `blocks` blocks each).
    pub(crate) fn from_ggml(ty: GgmlType, data: &[u8], blocks: usize) -> SplitBlocks {
        let n_blocks = data.len() / ty.type_size();
        let (header, quant) = (Self::header_bytes(ty), Self::quant_bytes(ty));
        let mut split = SplitBlocks {
            ty,
            blocks,
            d: crate::alloc::with_capacity(n_blocks),
            m: crate::alloc::with_capacity(if header == 4 { n_blocks } else { 0 }),
            qs: crate::alloc::with_capacity(n_blocks * quant),
        };
        for block in data.chunks_exact(ty.type_size()) {
            split.d.push(u16::from_le_bytes([block[0], block[1]]));
            if header == 4 {
                split.m.push(u16::from_le_bytes([block[2], block[3]]));
            }
            split.qs.extend_from_slice(&block[header..]);
        }
        split
    }

    /// Writes weight rows `rows` back in GGUF block layout into `out`.
    pub fn ggml_rows_into(&self, rows: std::ops::Range<usize>, out: &mut Vec<u8>) {
        let (header, quant) = (Self::header_bytes(self.ty), Self::quant_bytes(self.ty));
        out.clear();
        for b in rows.start * self.blocks..rows.end * self.blocks {
            out.extend_from_slice(&self.d[b].to_le_bytes());
            if header == 4 {
                out.extend_from_slice(&self.m[b].to_le_bytes());
            }
            out.extend_from_slice(&self.qs[b * quant..(b + 1) * quant]);
        }
    }
}

/// Q8_0, Q4_0 and Q4_1 weights with sixteen rows interleaved, for the AVX512-VNNI kernel:
/// one vector lane per output feature, so that a block of 8-bit activations meets sixteen
/// weight rows at once, four activation bytes broadcast to every lane, and no horizontal sums
/// or per-block shuffles are left. Same bytes as GGUF, different order.
///
/// For each group of sixteen rows (`g`), block by block (`b`), `group_block_bytes` bytes:
/// the sixteen f16 scales, the sixteen f16 mins (Q4_1 only), then the quants as 32-bit words:
/// word `s` of every row (`s` = 0..4 for the 4-bit types, 0..8 for Q8_0), row after row —
/// `[row 0 word 0, row 1 word 0, …, row 15 word 0, row 0 word 1, …]`. Q8_0 quants are stored
/// plus 128 (as unsigned bytes, which VNNI's `u8 × i8` product needs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Interleaved16 {
    /// Q8_0, Q4_0 or Q4_1.
    pub ty: GgmlType,
    /// Blocks per weight row.
    pub blocks: usize,
    /// The interleaved data, `out_features / 16 * blocks * group_block_bytes(ty)` bytes.
    pub data: Vec<u8>,
}

impl Interleaved16 {
    /// Rows per group.
    pub const ROWS: usize = 16;

    /// Bytes of one block of one group of sixteen rows.
    pub fn group_block_bytes(ty: GgmlType) -> usize {
        Self::ROWS * ty.type_size()
    }

    /// Bytes of scales (and mins) before the quants in a group's block.
    pub fn header_bytes(ty: GgmlType) -> usize {
        Self::ROWS * SplitBlocks::header_bytes(ty)
    }

    /// Interleaves GGUF blocks (`data` holds whole rows of `blocks` blocks each; the row count
    /// is a multiple of sixteen).
    pub(crate) fn from_ggml(ty: GgmlType, data: &[u8], blocks: usize) -> Interleaved16 {
        let (header, quant, size) = (SplitBlocks::header_bytes(ty), SplitBlocks::quant_bytes(ty), ty.type_size());
        let rows = data.len() / (blocks * size);
        let group_block = Self::group_block_bytes(ty);
        let flip = if ty == GgmlType::Q8_0 { 0x80 } else { 0 };
        let mut out = crate::alloc::filled(data.len(), 0u8);
        let group_bytes = blocks * group_block;
        // One group of sixteen rows after another, the groups shared among the cores: a 7B
        // model's matrices are gigabytes, and load time is this loop's.
        let interleave = |g: usize, dst_group: &mut [u8]| {
            for i in 0..Self::ROWS.min(rows - g * Self::ROWS) {
                let o = g * Self::ROWS + i;
                for b in 0..blocks {
                    let block = &data[(o * blocks + b) * size..][..size];
                    let dst = &mut dst_group[b * group_block..][..group_block];
                    dst[2 * i..2 * i + 2].copy_from_slice(&block[..2]);
                    if header == 4 {
                        dst[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&block[2..4]);
                    }
                    let quants = &mut dst[Self::ROWS * header..];
                    for s in 0..quant / 4 {
                        for k in 0..4 {
                            quants[(s * Self::ROWS + i) * 4 + k] = block[header + 4 * s + k] ^ flip;
                        }
                    }
                }
            }
        };
        let groups = rows.div_ceil(Self::ROWS);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(groups).max(1);
        if threads == 1 || data.len() < (1 << 20) {
            for (g, dst_group) in out.chunks_mut(group_bytes.max(1)).enumerate() {
                interleave(g, dst_group);
            }
        } else {
            let per_thread = groups.div_ceil(threads);
            std::thread::scope(|scope| {
                for (t, part) in out.chunks_mut(per_thread * group_bytes).enumerate() {
                    let interleave = &interleave;
                    scope.spawn(move || {
                        for (j, dst_group) in part.chunks_mut(group_bytes).enumerate() {
                            interleave(t * per_thread + j, dst_group);
                        }
                    });
                }
            });
        }
        Interleaved16 { ty, blocks, data: out }
    }

    /// Writes weight rows `rows` back in GGUF block layout into `out`.
    pub fn ggml_rows_into(&self, rows: std::ops::Range<usize>, out: &mut Vec<u8>) {
        let (header, quant) = (SplitBlocks::header_bytes(self.ty), SplitBlocks::quant_bytes(self.ty));
        let group_block = Self::group_block_bytes(self.ty);
        let flip = if self.ty == GgmlType::Q8_0 { 0x80 } else { 0 };
        out.clear();
        for o in rows {
            let (g, i) = (o / Self::ROWS, o % Self::ROWS);
            for b in 0..self.blocks {
                let src = &self.data[(g * self.blocks + b) * group_block..][..group_block];
                out.extend_from_slice(&src[2 * i..2 * i + 2]);
                if header == 4 {
                    out.extend_from_slice(&src[32 + 2 * i..32 + 2 * i + 2]);
                }
                let quants = &src[Self::ROWS * header..];
                for s in 0..quant / 4 {
                    out.extend(quants[(s * Self::ROWS + i) * 4..][..4].iter().map(|&q| q ^ flip));
                }
            }
        }
    }
}

/// A linear layer's weight `W[out_features, in_features]`, ready for [`crate::matmul`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    out_features: usize,
    in_features: usize,
    storage: Storage,
}

impl PackedMatrix {
    /// The ggml types kept quantized in memory (they have fused kernels); other types are
    /// dequantized to f32 when packed.
    pub const KEPT_QUANTIZED: [GgmlType; 5] =
        [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q6_K];

    /// Packs f32 weights given row-major as `[out_features, in_features]`.
    pub fn from_f32(values: Vec<f32>, out_features: usize, in_features: usize) -> Result<Self, KernelError> {
        check_shape(out_features, in_features)?;
        let expected = element_count(out_features, in_features)?;
        if values.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "f32 weight",
                expected,
                actual: values.len(),
                unit: "elements",
            });
        }
        Ok(PackedMatrix { out_features, in_features, storage: Storage::F32(values) })
    }

    /// Quantizes f32 weights (row-major `[out_features, in_features]`) to Q8_0, as ggml's
    /// reference quantizer does; `in_features` must be a multiple of 32. Packed as a GGUF Q8_0
    /// tensor is by [`PackedMatrix::from_ggml`] (split, or interleaved on AVX512-VNNI machines),
    /// so it runs in the same kernels.
    pub fn quantize_q8_0(values: &[f32], out_features: usize, in_features: usize) -> Result<Self, KernelError> {
        check_shape(out_features, in_features)?;
        let expected = element_count(out_features, in_features)?;
        if values.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "f32 weight",
                expected,
                actual: values.len(),
                unit: "elements",
            });
        }
        // Checked first: quantizing the whole buffer at once gives each row's blocks only when
        // a row is a whole number of blocks.
        row_bytes(GgmlType::Q8_0, in_features)?;
        let data = quantize_q8_0(values)?;
        Self::from_ggml(GgmlType::Q8_0, &data, out_features, in_features)
    }

    /// Packs a GGUF tensor of type `ty` whose raw data is `data` and whose logical shape is
    /// `[out_features, in_features]` (GGUF lists it as `ne = [in_features, out_features]`).
    ///
    /// Types in [`Self::KEPT_QUANTIZED`] are kept as blocks, F16 and BF16 as 16-bit values; all
    /// others are dequantized to f32.
    pub fn from_ggml(ty: GgmlType, data: &[u8], out_features: usize, in_features: usize) -> Result<Self, KernelError> {
        Self::from_ggml_for(ty, data, out_features, in_features, crate::ActivationMode::Q8)
    }

    /// [`PackedMatrix::from_ggml`] in the layout fastest for products with `activations`:
    /// Q8_0/Q4_0/Q4_1 rows are interleaved sixteen at a time for the 8-bit kernel on
    /// AVX512-VNNI machines ([`crate::ActivationMode::Q8`]), and kept in row order for f32
    /// activations, whose kernel reads rows.
    pub fn from_ggml_for(
        ty: GgmlType,
        data: &[u8],
        out_features: usize,
        in_features: usize,
        activations: crate::ActivationMode,
    ) -> Result<Self, KernelError> {
        check_shape(out_features, in_features)?;
        let row_stride = row_bytes(ty, in_features)?;
        let expected = row_stride
            .checked_mul(out_features)
            .ok_or_else(|| KernelError::InvalidShape { reason: format!("{out_features} rows overflow usize") })?;
        if data.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "GGUF tensor data",
                expected,
                actual: data.len(),
                unit: "bytes",
            });
        }
        if matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
            let blocks = row_stride / ty.type_size();
            if activations == crate::ActivationMode::Q8
                && crate::kernels::interleaved_kernel_available()
                && out_features.is_multiple_of(Interleaved16::ROWS)
            {
                return Ok(PackedMatrix {
                    out_features,
                    in_features,
                    storage: Storage::Interleaved(Interleaved16::from_ggml(ty, data, blocks)),
                });
            }
            return Ok(PackedMatrix {
                out_features,
                in_features,
                storage: Storage::Split(SplitBlocks::from_ggml(ty, data, blocks)),
            });
        }
        if matches!(ty, GgmlType::BF16 | GgmlType::F16) {
            let bits = data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
            let storage = if ty == GgmlType::BF16 {
                let mut values = crate::alloc::with_capacity(data.len() / 2);
                values.extend(bits.map(half::bf16::from_bits));
                Storage::Bf16(values)
            } else {
                let mut values = crate::alloc::with_capacity(data.len() / 2);
                values.extend(bits.map(half::f16::from_bits));
                Storage::F16(values)
            };
            return Ok(PackedMatrix { out_features, in_features, storage });
        }
        if Self::KEPT_QUANTIZED.contains(&ty) {
            return Ok(PackedMatrix {
                out_features,
                in_features,
                storage: Storage::Blocks { ty, data: crate::alloc::copied(data), row_stride },
            });
        }
        let mut values = vec![0.0f32; element_count(out_features, in_features)?];
        dequantize_into(ty, data, &mut values)?;
        Ok(PackedMatrix { out_features, in_features, storage: Storage::F32(values) })
    }

    /// Number of output features (rows of `W`).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Number of input features (columns of `W`).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The storage type: [`GgmlType::F32`], [`GgmlType::BF16`], [`GgmlType::F16`] or one of
    /// [`Self::KEPT_QUANTIZED`].
    pub fn ggml_type(&self) -> GgmlType {
        match &self.storage {
            Storage::F32(_) => GgmlType::F32,
            Storage::Bf16(_) => GgmlType::BF16,
            Storage::F16(_) => GgmlType::F16,
            Storage::Split(split) => split.ty,
            Storage::Interleaved(w) => w.ty,
            Storage::Blocks { ty, .. } => *ty,
        }
    }

    /// Bytes of weight data a full product streams from memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(values) => values.len() * 4,
            Storage::Bf16(values) => values.len() * 2,
            Storage::F16(values) => values.len() * 2,
            Storage::Split(split) => split.qs.len() + 2 * (split.d.len() + split.m.len()),
            Storage::Interleaved(w) => w.data.len(),
            Storage::Blocks { data, .. } => data.len(),
        }
    }

    /// Writes row `row` of `W` (dequantized) into `out` (length `in_features`): an embedding
    /// lookup when the matrix is an embedding table.
    pub fn row_into(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.out_features {
            return Err(KernelError::InvalidShape {
                reason: format!("row {row} out of range for {} rows", self.out_features),
            });
        }
        if out.len() != self.in_features {
            return Err(KernelError::LengthMismatch {
                what: "row output",
                expected: self.in_features,
                actual: out.len(),
                unit: "elements",
            });
        }
        match &self.storage {
            Storage::F32(values) => {
                out.copy_from_slice(&values[row * self.in_features..(row + 1) * self.in_features]);
                Ok(())
            }
            Storage::Bf16(values) => {
                let span = &values[row * self.in_features..(row + 1) * self.in_features];
                out.iter_mut().zip(span).for_each(|(o, v)| *o = v.to_f32());
                Ok(())
            }
            Storage::F16(values) => {
                let span = &values[row * self.in_features..(row + 1) * self.in_features];
                out.iter_mut().zip(span).for_each(|(o, v)| *o = v.to_f32());
                Ok(())
            }
            Storage::Split(split) => {
                let mut bytes = Vec::new();
                split.ggml_rows_into(row..row + 1, &mut bytes);
                dequantize_into(split.ty, &bytes, out).map_err(KernelError::from)
            }
            Storage::Interleaved(w) => {
                let mut bytes = Vec::new();
                w.ggml_rows_into(row..row + 1, &mut bytes);
                dequantize_into(w.ty, &bytes, out).map_err(KernelError::from)
            }
            Storage::Blocks { ty, data, row_stride } => {
                dequantize_into(*ty, &data[row * row_stride..(row + 1) * row_stride], out).map_err(KernelError::from)
            }
        }
    }

    /// The whole matrix dequantized to row-major f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(values) => values.clone(),
            Storage::Bf16(values) => values.iter().map(|v| v.to_f32()).collect(),
            Storage::F16(values) => values.iter().map(|v| v.to_f32()).collect(),
            Storage::Split(split) => {
                let mut bytes = Vec::new();
                split.ggml_rows_into(0..self.out_features, &mut bytes);
                let mut out = vec![0.0f32; self.out_features * self.in_features];
                // The lengths were validated at construction, so this cannot fail.
                let _ = dequantize_into(split.ty, &bytes, &mut out);
                out
            }
            Storage::Interleaved(w) => {
                let mut bytes = Vec::new();
                w.ggml_rows_into(0..self.out_features, &mut bytes);
                let mut out = vec![0.0f32; self.out_features * self.in_features];
                // The lengths were validated at construction, so this cannot fail.
                let _ = dequantize_into(w.ty, &bytes, &mut out);
                out
            }
            Storage::Blocks { ty, data, .. } => {
                let mut out = vec![0.0f32; self.out_features * self.in_features];
                // The lengths were validated at construction, so this cannot fail.
                let _ = dequantize_into(*ty, data, &mut out);
                out
            }
        }
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }
}

fn check_shape(out_features: usize, in_features: usize) -> Result<(), KernelError> {
    if out_features == 0 || in_features == 0 {
        return Err(KernelError::InvalidShape {
            reason: format!("weight shape [{out_features}, {in_features}] has a zero dimension"),
        });
    }
    Ok(())
}

fn element_count(out_features: usize, in_features: usize) -> Result<usize, KernelError> {
    out_features.checked_mul(in_features).ok_or_else(|| KernelError::InvalidShape {
        reason: format!("weight shape [{out_features}, {in_features}] overflows usize"),
    })
}
