//! ggml tensor types and their scalar reference codecs.
//!
//! GGUF files store each tensor as a sequence of fixed-size *blocks*; a block of type `T` holds
//! [`GgmlType::block_size`] elements in [`GgmlType::type_size`] bytes. The layouts here follow
//! ggml's `ggml-common.h` block structs and the reference `dequantize_row_*` routines of
//! `ggml-quants.c` bit for bit (all multi-byte fields are little-endian, `f16` scales are IEEE
//! binary16 and widen exactly). These scalar routines are the *reference*: the fast kernels in
//! this crate are tested against them, and the model loader uses them to dequantize at
//! load time when a tensor is not kept quantized.
//!
//! Decoding covers every type listed. Encoding covers what a converter writes: [`quantize_q8_0`]
//! and [`quantize_q4_0`] mirror ggml's reference `quantize_row_q8_0_ref` and
//! `quantize_row_q4_0_ref` bit for bit (what `llama-quantize` produces without an importance
//! matrix), and [`encode_f16`] / [`encode_bf16`] round to nearest even as numpy and torch do.
//! [`quantize_into`] picks the encoder for a type and writes into a caller's buffer, so a
//! converter can encode a large tensor in row chunks on several threads.

use half::{bf16, f16};

use crate::FormatError;

/// Elements per block of the k-quant super-block formats.
pub const QK_K: usize = 256;
/// Elements per block of the legacy 32-element formats.
pub const QK: usize = 32;

/// A ggml tensor element type, with its on-disk ggml type id as discriminant.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// 4-bit, 32 per block: `f16 d; u8 qs[16]`, value `(q - 8) * d`.
    Q4_0 = 2,
    /// 4-bit with offset, 32 per block: `f16 d; f16 m; u8 qs[16]`, value `q * d + m`.
    Q4_1 = 3,
    /// 5-bit, 32 per block: `f16 d; u8 qh[4]; u8 qs[16]`, value `(q - 16) * d`.
    Q5_0 = 6,
    /// 5-bit with offset, 32 per block: `f16 d; f16 m; u8 qh[4]; u8 qs[16]`, value `q * d + m`.
    Q5_1 = 7,
    /// 8-bit, 32 per block: `f16 d; i8 qs[32]`, value `q * d`.
    Q8_0 = 8,
    /// 8-bit with block sum, 32 per block: `f16 d; f16 s; i8 qs[32]`, value `q * d`.
    Q8_1 = 9,
    /// 2-bit k-quant, 256 per block (84 bytes).
    Q2_K = 10,
    /// 3-bit k-quant, 256 per block (110 bytes).
    Q3_K = 11,
    /// 4-bit k-quant, 256 per block (144 bytes).
    Q4_K = 12,
    /// 5-bit k-quant, 256 per block (176 bytes).
    Q5_K = 13,
    /// 6-bit k-quant, 256 per block (210 bytes).
    Q6_K = 14,
    /// 8-bit k-quant (intermediate format), 256 per block: `f32 d; i8 qs[256]; i16 bsums[16]`.
    Q8_K = 15,
    /// bfloat16.
    BF16 = 30,
}

impl GgmlType {
    /// Every type this crate knows, in id order.
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::BF16,
    ];

    /// The type with ggml type id `id`, or `None` for ids this crate does not know
    /// (including the i-quants and the removed ids 4 and 5).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|ty| ty.id() == id)
    }

    /// The ggml type id (the value stored in GGUF tensor infos).
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Q8_1 => QK,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + QK / 2,
            GgmlType::Q4_1 => 2 * 2 + QK / 2,
            GgmlType::Q5_0 => 2 + 4 + QK / 2,
            GgmlType::Q5_1 => 2 * 2 + 4 + QK / 2,
            GgmlType::Q8_0 => 2 + QK,
            GgmlType::Q8_1 => 2 * 2 + QK,
            GgmlType::Q2_K => QK_K / 16 + QK_K / 4 + 2 * 2,
            GgmlType::Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            GgmlType::Q4_K => 2 * 2 + 12 + QK_K / 2,
            GgmlType::Q5_K => 2 * 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            GgmlType::Q8_K => 4 + QK_K + QK_K / 16 * 2,
        }
    }

    /// The ggml name of the type (`"Q4_K"`, `"F32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Whether the type stores blocks (as opposed to plain scalars).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of bytes that `n_elements` elements of type `ty` occupy.
///
/// Errors if `n_elements` is not a whole number of blocks, or if the byte count overflows.
pub fn row_bytes(ty: GgmlType, n_elements: usize) -> Result<usize, FormatError> {
    let block_size = ty.block_size();
    if !n_elements.is_multiple_of(block_size) {
        return Err(FormatError::NotBlockMultiple { ty: ty.name(), n_elements, block_size });
    }
    (n_elements / block_size)
        .checked_mul(ty.type_size())
        .ok_or_else(|| FormatError::InvalidShape { reason: format!("{n_elements} elements of {ty} overflow usize") })
}

/// Dequantizes `n_elements` elements of type `ty` stored in `data` to f32.
///
/// `data` must hold exactly [`row_bytes`]`(ty, n_elements)` bytes.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, FormatError> {
    let mut out = vec![0.0f32; n_elements];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Dequantizes `data` (blocks of type `ty`) into `out`; the element count is `out.len()`.
///
/// `data` must hold exactly [`row_bytes`]`(ty, out.len())` bytes.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let expected = row_bytes(ty, out.len())?;
    if data.len() != expected {
        return Err(FormatError::LengthMismatch {
            what: "quantized data",
            expected,
            actual: data.len(),
            unit: "bytes",
        });
    }
    let block_size = ty.block_size();
    let type_size = ty.type_size();
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => decode_f32,
        GgmlType::F16 => decode_f16,
        GgmlType::BF16 => decode_bf16,
        GgmlType::Q4_0 => decode_q4_0,
        GgmlType::Q4_1 => decode_q4_1,
        GgmlType::Q5_0 => decode_q5_0,
        GgmlType::Q5_1 => decode_q5_1,
        GgmlType::Q8_0 => decode_q8_0,
        GgmlType::Q8_1 => decode_q8_1,
        GgmlType::Q2_K => decode_q2_k,
        GgmlType::Q3_K => decode_q3_k,
        GgmlType::Q4_K => decode_q4_k,
        GgmlType::Q5_K => decode_q5_k,
        GgmlType::Q6_K => decode_q6_k,
        GgmlType::Q8_K => decode_q8_k,
    };
    for (block, dst) in data.chunks_exact(type_size).zip(out.chunks_exact_mut(block_size)) {
        decode(block, dst);
    }
    Ok(())
}

/// Reads a little-endian f16 at `offset` and widens it (exactly) to f32; `bytes` must hold
/// `offset + 2` bytes (the kernels call it on blocks whose length is checked at pack time).
#[inline]
pub fn read_f16(bytes: &[u8], offset: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[offset], bytes[offset + 1]])).to_f32()
}

fn decode_f32(block: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
}

fn decode_f16(block: &[u8], out: &mut [f32]) {
    out[0] = read_f16(block, 0);
}

fn decode_bf16(block: &[u8], out: &mut [f32]) {
    out[0] = bf16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
}

fn decode_q4_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    let qs = &block[2..18];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn decode_q4_1(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    let m = read_f16(block, 2);
    let qs = &block[4..20];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = (q & 0x0F) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5th bits of a Q5_0/Q5_1 block: bit `j` belongs to element `j`.
fn q5_high_bits(block: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([block[offset], block[offset + 1], block[offset + 2], block[offset + 3]])
}

fn decode_q5_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    let qh = q5_high_bits(block, 2);
    let qs = &block[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let hi0 = ((qh >> j) & 1) << 4;
        let hi1 = ((qh >> (j + 16)) & 1) << 4;
        out[j] = (((q & 0x0F) as u32 | hi0) as i32 - 16) as f32 * d;
        out[j + 16] = (((q >> 4) as u32 | hi1) as i32 - 16) as f32 * d;
    }
}

fn decode_q5_1(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    let m = read_f16(block, 2);
    let qh = q5_high_bits(block, 4);
    let qs = &block[8..24];
    for (j, &q) in qs.iter().enumerate() {
        let hi0 = ((qh >> j) & 1) << 4;
        let hi1 = ((qh >> (j + 16)) & 1) << 4;
        out[j] = ((q & 0x0F) as u32 | hi0) as f32 * d + m;
        out[j + 16] = ((q >> 4) as u32 | hi1) as f32 * d + m;
    }
}

fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

fn decode_q8_1(block: &[u8], out: &mut [f32]) {
    let d = read_f16(block, 0);
    for (o, &q) in out.iter_mut().zip(&block[4..36]) {
        *o = q as i8 as f32 * d;
    }
}

fn decode_q8_k(block: &[u8], out: &mut [f32]) {
    let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    for (o, &q) in out.iter_mut().zip(&block[4..4 + QK_K]) {
        *o = q as i8 as f32 * d;
    }
}

fn decode_q2_k(block: &[u8], out: &mut [f32]) {
    // Layout: u8 scales[16] (low nibble scale, high nibble min), u8 qs[64], f16 d, f16 dmin.
    let scales = &block[0..16];
    let d = read_f16(block, 80);
    let dmin = read_f16(block, 82);
    let mut y = 0;
    let mut is = 0;
    for half_block in 0..2 {
        let q = &block[16 + 32 * half_block..16 + 32 * half_block + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for &qb in &q[16 * part..16 * part + 16] {
                    out[y] = dl * ((qb >> shift) & 3) as f32 - ml;
                    y += 1;
                }
            }
        }
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block, unpacked from its 12 scale bytes.
fn q3_k_scales(packed: &[u8]) -> [i32; 16] {
    let mut scales = [0i32; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        let low = if j < 8 { packed[j] & 0x0F } else { packed[j - 8] >> 4 };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = (low | (high << 4)) as i32 - 32;
    }
    scales
}

fn decode_q3_k(block: &[u8], out: &mut [f32]) {
    // Layout: u8 hmask[32], u8 qs[64], u8 scales[12], f16 d.
    let hmask = &block[0..32];
    let scales = q3_k_scales(&block[96..108]);
    let d = read_f16(block, 108);
    let mut y = 0;
    let mut is = 0;
    for half_block in 0..2 {
        let q = &block[32 + 32 * half_block..32 + 32 * half_block + 32];
        for (j, shift) in [0u32, 2, 4, 6].into_iter().enumerate() {
            let mask = 1u8 << (4 * half_block + j);
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 16 * part..16 * part + 16 {
                    let low = ((q[l] >> shift) & 3) as i32;
                    let sub = if hmask[l] & mask != 0 { 0 } else { 4 };
                    out[y] = dl * (low - sub) as f32;
                    y += 1;
                }
            }
        }
    }
}

/// Scale and min (both 6-bit) of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
#[inline]
pub fn k4_scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        ((packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
    }
}

fn decode_q4_k(block: &[u8], out: &mut [f32]) {
    // Layout: f16 d, f16 dmin, u8 scales[12], u8 qs[128].
    let d = read_f16(block, 0);
    let dmin = read_f16(block, 2);
    let scales = &block[4..16];
    for chunk in 0..4 {
        let q = &block[16 + 32 * chunk..16 + 32 * chunk + 32];
        let (sc0, m0) = k4_scale_min(2 * chunk, scales);
        let (sc1, m1) = k4_scale_min(2 * chunk + 1, scales);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let base = 64 * chunk;
        for (l, &qb) in q.iter().enumerate() {
            out[base + l] = d0 * (qb & 0x0F) as f32 - min0;
            out[base + 32 + l] = d1 * (qb >> 4) as f32 - min1;
        }
    }
}

fn decode_q5_k(block: &[u8], out: &mut [f32]) {
    // Layout: f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128].
    let d = read_f16(block, 0);
    let dmin = read_f16(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..48];
    for chunk in 0..4 {
        let ql = &block[48 + 32 * chunk..48 + 32 * chunk + 32];
        let (sc0, m0) = k4_scale_min(2 * chunk, scales);
        let (sc1, m1) = k4_scale_min(2 * chunk + 1, scales);
        let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let bit0 = 1u8 << (2 * chunk);
        let bit1 = 1u8 << (2 * chunk + 1);
        let base = 64 * chunk;
        for l in 0..32 {
            let hi0 = if qh[l] & bit0 != 0 { 16 } else { 0 };
            let hi1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
            out[base + l] = d0 * ((ql[l] & 0x0F) + hi0) as f32 - min0;
            out[base + 32 + l] = d1 * ((ql[l] >> 4) + hi1) as f32 - min1;
        }
    }
}

fn decode_q6_k(block: &[u8], out: &mut [f32]) {
    // Layout: u8 ql[128], u8 qh[64], i8 scales[16], f16 d.
    let d = read_f16(block, 208);
    for half_block in 0..2 {
        let ql = &block[64 * half_block..64 * half_block + 64];
        let qh = &block[128 + 32 * half_block..128 + 32 * half_block + 32];
        let sc = &block[192 + 8 * half_block..192 + 8 * half_block + 8];
        let base = 128 * half_block;
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[base + l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[base + 32 + l] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[base + 64 + l] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[base + 96 + l] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Quantizes `values` to Q8_0 blocks exactly as ggml's reference quantizer does.
///
/// Each block of 32 gets `d = max|x| / 127` (stored as f16) and `q = round(x / d)` with ties
/// away from zero. Errors if `values.len()` is not a multiple of 32.
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; row_bytes(GgmlType::Q8_0, values.len())?];
    encode_q8_0(values, &mut out);
    Ok(out)
}

/// Quantizes `values` to Q4_0 blocks exactly as ggml's reference `quantize_row_q4_0_ref` does.
///
/// Each block of 32 takes the value of largest magnitude *with its sign* (`max`; the first one
/// on ties), `d = max / -8` (stored as f16) and `q = min(15, trunc(x / d + 8.5))`, so `max`
/// itself lands on `q = 0` (value `-8 d = max`) and the other end of the range is clipped at
/// 15. Byte `j` of a block holds element `j` in its low nibble and element `j + 16` in its
/// high one. Errors if `values.len()` is not a multiple of 32.
pub fn quantize_q4_0(values: &[f32]) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; row_bytes(GgmlType::Q4_0, values.len())?];
    encode_q4_0(values, &mut out);
    Ok(out)
}

/// `values` as little-endian IEEE binary16, rounded to nearest even (overflow becomes ±inf).
pub fn encode_f16(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    encode_f16_into(values, &mut out);
    out
}

/// `values` as little-endian bfloat16, rounded to nearest even (NaN stays NaN).
pub fn encode_bf16(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    encode_bf16_into(values, &mut out);
    out
}

/// Encodes `values` as type `ty` into `out`, which must hold exactly
/// [`row_bytes`]`(ty, values.len())` bytes.
///
/// Supported types: F32, F16, BF16, Q8_0 and Q4_0 (the others are
/// [`FormatError::UnsupportedEncoding`]). Blocks are independent, so encoding a tensor in
/// chunks of whole blocks (whole rows, say) gives the same bytes as encoding it at once.
pub fn quantize_into(ty: GgmlType, values: &[f32], out: &mut [u8]) -> Result<(), FormatError> {
    let encode: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => encode_f32_into,
        GgmlType::F16 => encode_f16_into,
        GgmlType::BF16 => encode_bf16_into,
        GgmlType::Q8_0 => encode_q8_0,
        GgmlType::Q4_0 => encode_q4_0,
        other => return Err(FormatError::UnsupportedEncoding { ty: other.name() }),
    };
    let expected = row_bytes(ty, values.len())?;
    if out.len() != expected {
        return Err(FormatError::LengthMismatch { what: "encoded data", expected, actual: out.len(), unit: "bytes" });
    }
    encode(values, out);
    Ok(())
}

/// Whether [`quantize_into`] can encode type `ty`.
pub fn can_encode(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0)
}

// The encoders below take buffers whose lengths the public functions checked.

fn encode_f32_into(values: &[f32], out: &mut [u8]) {
    for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

fn encode_f16_into(values: &[f32], out: &mut [u8]) {
    for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
    }
}

fn encode_bf16_into(values: &[f32], out: &mut [u8]) {
    for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
    }
}

fn encode_q8_0(values: &[f32], out: &mut [u8]) {
    for (x, block) in values.chunks_exact(QK).zip(out.chunks_exact_mut(GgmlType::Q8_0.type_size())) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, &v) in block[2..].iter_mut().zip(x) {
            *q = (v * inv).round() as i8 as u8;
        }
    }
}

fn encode_q4_0(values: &[f32], out: &mut [u8]) {
    for (x, block) in values.chunks_exact(QK).zip(out.chunks_exact_mut(GgmlType::Q4_0.type_size())) {
        // The signed value of largest magnitude; a strict `<` keeps the first on ties, as ggml.
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        // C's `(int8_t)(x + 8.5f)` truncates toward zero; `as i8` does too (and saturates
        // where C would be undefined).
        let nibble = |v: f32| (((v * inv + 8.5) as i8).min(15)) as u8;
        for j in 0..QK / 2 {
            block[2 + j] = nibble(x[j]) | (nibble(x[j + QK / 2]) << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_sizes_match_ggml() {
        let expected = [
            (GgmlType::F32, 1, 4),
            (GgmlType::F16, 1, 2),
            (GgmlType::BF16, 1, 2),
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q8_1, 32, 36),
            (GgmlType::Q2_K, 256, 84),
            (GgmlType::Q3_K, 256, 110),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
            (GgmlType::Q8_K, 256, 292),
        ];
        for (ty, block, size) in expected {
            assert_eq!((ty.block_size(), ty.type_size()), (block, size), "{ty}");
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(16), None);
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    }

    #[test]
    fn row_bytes_rejects_partial_blocks() {
        assert_eq!(row_bytes(GgmlType::Q4_K, 512).ok(), Some(288));
        assert!(matches!(row_bytes(GgmlType::Q4_K, 500), Err(FormatError::NotBlockMultiple { .. })));
        assert!(matches!(row_bytes(GgmlType::Q8_0, usize::MAX - 31), Err(FormatError::InvalidShape { .. })));
    }

    #[test]
    fn dequantize_rejects_length_mismatch() {
        let err = dequantize(GgmlType::Q8_0, &[0u8; 33], 32);
        assert!(matches!(err, Err(FormatError::LengthMismatch { expected: 34, actual: 33, .. })));
        let err = dequantize(GgmlType::Q8_0, &[0u8; 34], 31);
        assert!(matches!(err, Err(FormatError::NotBlockMultiple { .. })));
    }

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_0_hand_block() {
        // d = 0.5; byte j holds element j in the low nibble and element j + 16 in the high one.
        let mut block = vec![0u8; 18];
        block[0..2].copy_from_slice(&f16_bytes(0.5));
        for j in 0..16 {
            block[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let out = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(out[j + 16], (15.0 - j as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_hand_block() {
        let mut block = vec![0u8; 20];
        block[0..2].copy_from_slice(&f16_bytes(0.25));
        block[2..4].copy_from_slice(&f16_bytes(-1.0));
        block[4] = 0xF3;
        let out = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
        assert_eq!(out[0], 3.0 * 0.25 - 1.0);
        assert_eq!(out[16], 15.0 * 0.25 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q5_0_high_bits() {
        let mut block = vec![0u8; 22];
        block[0..2].copy_from_slice(&f16_bytes(1.0));
        // Element 3's and element 16 + 5's fifth bits set.
        let qh: u32 = (1 << 3) | (1 << 21);
        block[2..6].copy_from_slice(&qh.to_le_bytes());
        block[6 + 3] = 0x01;
        block[6 + 5] = 0x20;
        let out = dequantize(GgmlType::Q5_0, &block, 32).unwrap();
        assert_eq!(out[3], (16 + 1 - 16) as f32);
        assert_eq!(out[21], (16 + 2 - 16) as f32);
        assert_eq!(out[0], -16.0);
    }

    #[test]
    fn q8_0_roundtrip_is_within_half_step() {
        let values: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let packed = quantize_q8_0(&values).unwrap();
        let back = dequantize(GgmlType::Q8_0, &packed, values.len()).unwrap();
        for (block_in, block_out) in values.chunks(32).zip(back.chunks(32)) {
            let amax = block_in.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0;
            for (a, b) in block_in.iter().zip(block_out) {
                // Half a step, plus the f16 rounding of the scale (at most 127 steps · 2^-11).
                assert!((a - b).abs() <= 0.5 * step + 127.0 * step / 2048.0, "{a} vs {b}");
            }
        }
    }

    /// Values spread over several magnitudes, signs and blocks (deterministic).
    fn sample_values(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                unit * [0.01f32, 1.0, 30.0][i / 32 % 3]
            })
            .collect()
    }

    #[test]
    fn q4_0_roundtrip_is_within_one_step() {
        let values = sample_values(32 * 12);
        let packed = quantize_q4_0(&values).unwrap();
        assert_eq!(packed.len(), 12 * 18);
        let back = dequantize(GgmlType::Q4_0, &packed, values.len()).unwrap();
        for (block_in, block_out) in values.chunks(32).zip(back.chunks(32)) {
            let max = block_in.iter().fold(0.0f32, |m, &v| if m.abs() < v.abs() { v } else { m });
            let step = max.abs() / 8.0;
            // The f16 scale is off by at most 2^-11 relative, times |q - 8| <= 8 steps.
            let scale_error = 8.0 * step / 2048.0;
            for (&a, &b) in block_in.iter().zip(block_out) {
                // Only values beyond 7.5 steps on the side opposite `max` are clipped (to 7
                // steps): at most one step off; everything else is rounded: half a step.
                let clipped = a * max < 0.0 && a.abs() > 7.5 * step;
                let bound = if clipped { step } else { 0.5 * step };
                assert!((a - b).abs() <= bound + scale_error, "{a} vs {b} (step {step})");
            }
            // The extreme value itself is exact up to the f16 scale.
            let at_max = block_in.iter().position(|&v| v == max).unwrap();
            assert!((block_out[at_max] - max).abs() <= scale_error);
        }
    }

    #[test]
    fn q4_0_hand_block_matches_ggml_reference() {
        // First half: -8 ..= 7 with max = -8 (first of the two largest magnitudes, so d = 1.0).
        // Second half probes the rounding (trunc(x + 8.5)), the clip at 15 and the tie rule:
        // 8.0 has the same magnitude as -8 but comes later, so it does not become `max`.
        let mut x: Vec<f32> = (0..16).map(|j| j as f32 - 8.0).collect();
        x.extend([0.49, 0.5, -0.5, -0.51, 7.6, 8.0, 3.25, -3.25, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0]);
        let high = [8u8, 9, 8, 7, 15, 15, 11, 5, 8, 9, 10, 11, 12, 13, 14, 7];
        let mut expected = vec![0x00, 0x3C]; // f16 1.0
        expected.extend((0..16).map(|j| j as u8 | (high[j] << 4)));
        assert_eq!(quantize_q4_0(&x).unwrap(), expected);

        // A positive extreme gives a negative scale: d = 4 / -8 = -0.5, and 4 maps to q = 0.
        let mut y = vec![0.0f32; 32];
        y[3] = 4.0;
        y[20] = -1.0;
        let packed = quantize_q4_0(&y).unwrap();
        assert_eq!(&packed[0..2], &f16_bytes(-0.5));
        assert_eq!(packed[2 + 3] & 0x0F, 0);
        assert_eq!(packed[2 + 4] >> 4, 10); // -1 / -0.5 + 8.5 = 10.5 -> 10
        let back = dequantize(GgmlType::Q4_0, &packed, 32).unwrap();
        assert_eq!((back[3], back[20], back[0]), (4.0, -1.0, 0.0));

        // An all-zero block: d = 0 / -8 = -0.0 (sign bit set, as in ggml), every nibble 8.
        let zeros = quantize_q4_0(&[0.0; 32]).unwrap();
        assert_eq!(&zeros[0..2], &[0x00, 0x80]);
        assert!(zeros[2..].iter().all(|&b| b == 0x88));
    }

    #[test]
    fn encoders_reject_partial_blocks_and_wrong_buffers() {
        assert!(matches!(quantize_q4_0(&[1.0; 33]), Err(FormatError::NotBlockMultiple { n_elements: 33, .. })));
        assert!(matches!(quantize_q8_0(&[1.0; 31]), Err(FormatError::NotBlockMultiple { .. })));
        let mut out = vec![0u8; 17];
        assert!(matches!(
            quantize_into(GgmlType::Q4_0, &[0.0; 32], &mut out),
            Err(FormatError::LengthMismatch { expected: 18, actual: 17, .. })
        ));
        assert!(matches!(
            quantize_into(GgmlType::Q4_K, &[0.0; 256], &mut [0u8; 144]),
            Err(FormatError::UnsupportedEncoding { ty: "Q4_K" })
        ));
        assert!(can_encode(GgmlType::Q4_0) && !can_encode(GgmlType::Q6_K));
    }

    #[test]
    fn quantize_into_matches_the_whole_tensor_encoders_chunk_by_chunk() {
        let values = sample_values(32 * 6);
        for (ty, whole) in [
            (GgmlType::Q8_0, quantize_q8_0(&values).unwrap()),
            (GgmlType::Q4_0, quantize_q4_0(&values).unwrap()),
            (GgmlType::F16, encode_f16(&values)),
            (GgmlType::BF16, encode_bf16(&values)),
        ] {
            let mut chunked = vec![0u8; whole.len()];
            let per_chunk = row_bytes(ty, 64).unwrap();
            for (x, out) in values.chunks(64).zip(chunked.chunks_mut(per_chunk)) {
                quantize_into(ty, x, out).unwrap();
            }
            assert_eq!(chunked, whole, "{ty}");
        }
        let mut f32_bytes = vec![0u8; 4 * values.len()];
        quantize_into(GgmlType::F32, &values, &mut f32_bytes).unwrap();
        assert_eq!(dequantize(GgmlType::F32, &f32_bytes, values.len()).unwrap(), values);
    }

    #[test]
    fn half_encoders_round_to_nearest_even() {
        // 1 + 2^-11 is halfway between two f16 values: ties go to the even one (1.0);
        // 1 + 3 * 2^-11 goes up to 1 + 2^-9.
        let f16s = encode_f16(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), -2.5, 65520.0]);
        let back = dequantize(GgmlType::F16, &f16s, 4).unwrap();
        assert_eq!(back[..3], [1.0, 1.0 + 2f32.powi(-9), -2.5]);
        assert!(back[3].is_infinite());
        // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie (to 1.0), 1 + 3 * 2^-8 rounds up.
        let bf16s = encode_bf16(&[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -3.0e38, f32::NAN]);
        let back = dequantize(GgmlType::BF16, &bf16s, 4).unwrap();
        assert_eq!(back[..2], [1.0, 1.0 + 2f32.powi(-6)]);
        assert!((back[2] / -3.0e38 - 1.0).abs() < 1.0 / 256.0);
        assert!(back[3].is_nan());
    }

    #[test]
    fn q4_k_scale_unpacking() {
        // Sub-block 5: scale = low nibble of byte 9 | top bits of byte 1; min = high nibble of
        // byte 9 | top bits of byte 5.
        let mut packed = [0u8; 12];
        packed[9] = 0xA7;
        packed[1] = 0b1100_0000;
        packed[5] = 0b0100_0000;
        assert_eq!(k4_scale_min(5, &packed), (0x7 | (3 << 4), 0xA | (1 << 4)));
        packed[2] = 0x3F | 0x40;
        packed[6] = 0x15;
        assert_eq!(k4_scale_min(2, &packed), (0x3F, 0x15));
    }

    #[test]
    fn q6_k_single_value() {
        let mut block = vec![0u8; 210];
        block[208..210].copy_from_slice(&f16_bytes(0.5));
        // All quants 0 -> -32; scale for sub-block 0 (elements 0..16) = 2, others 0.
        block[192] = 2;
        // Element 0: ql low nibble 0x5, qh bits 0..2 = 0b10 -> q = 0x25 - 32 = 5.
        block[0] = 0x05;
        block[128] = 0b10;
        let out = dequantize(GgmlType::Q6_K, &block, 256).unwrap();
        assert_eq!(out[0], 0.5 * 2.0 * 5.0);
        assert_eq!(out[1], 0.5 * 2.0 * -32.0);
        assert_eq!(out[16], 0.0);
    }
}
