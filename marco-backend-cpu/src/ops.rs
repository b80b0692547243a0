//! Host implementations of the non-linear parts of a decoder layer (RMSNorm, rotary
//! embeddings, attention over a chain of KV segments, SwiGLU) on row-major f32 slices.
//!
//! At decode, the linear layers are a few milliseconds of streaming weights; what remains of a
//! step is a few hundred tiny operations (a 576-wide RMSNorm, one query against a few hundred
//! keys). Run as generic tensor ops, each of those allocates, iterates through strided views
//! and, for attention, copies the cached keys into a fresh contiguous buffer every layer;
//! together that cost as much as the weights. These functions do the same arithmetic in one
//! pass over the caller's buffers, reading the KV cache where it lies.
//!
//! Every function checks its buffer lengths first and returns [`KernelError`] on a mismatch;
//! none panics on bad input. Results do not depend on how rows are batched or how the cache is
//! cut into segments (each output element is computed by the same code in the same order), so a
//! forked or batched sequence gets bit-for-bit the outputs of the same sequence run alone.

use std::ops::Range;

use crate::{pool, KernelError};

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), KernelError> {
    if expected != actual {
        return Err(KernelError::LengthMismatch { what, expected, actual, unit: "elements" });
    }
    Ok(())
}

fn product(dims: &[usize]) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| KernelError::InvalidShape { reason: format!("size overflow: {dims:?}") })
}

/// Dot product with eight independent accumulators (so that it vectorizes without fast-math).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len().min(b.len()));
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            // Not `mul_add`: without FMA in the build's baseline it is a slow libm call.
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// [`dot`] of `a` with four rows of `b` (each `a.len()` long, `stride` apart) at once: the
/// same arithmetic per row as `dot` (so the same bits), but four independent accumulator
/// chains keep the FMA pipeline full where one chain would wait on each add's latency.
#[inline(always)]
fn dot4(a: &[f32], b: &[f32], stride: usize) -> [f32; 4] {
    let n = a.len();
    let n8 = n / 8 * 8;
    let rows: [&[f32]; 4] = std::array::from_fn(|r| &b[r * stride..r * stride + n]);
    let mut acc = [[0.0f32; 8]; 4];
    let mut k = 0;
    while k < n8 {
        let x = &a[k..k + 8];
        for (acc_r, row) in acc.iter_mut().zip(&rows) {
            let y = &row[k..k + 8];
            for i in 0..8 {
                acc_r[i] += x[i] * y[i];
            }
        }
        k += 8;
    }
    std::array::from_fn(|r| {
        let acc = &acc[r];
        let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in a[n8..].iter().zip(&rows[r][n8..]) {
            sum += x * y;
        }
        sum
    })
}

/// `out[r] = x[r] / rms(x[r]) * weight` for each row of width `weight.len()`, where
/// `rms(v) = sqrt(mean(v²) + eps)` (the mean accumulated in f64, as llama.cpp does).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    check_rows("rms_norm", x.len(), weight.len())?;
    check_len("rms_norm output", x.len(), out.len())?;
    for (row, out_row) in x.chunks_exact(weight.len()).zip(out.chunks_exact_mut(weight.len())) {
        rms_norm_row(row, weight, eps, out_row);
    }
    Ok(())
}

/// The residual connection and the next normalisation in one pass: `x[r] += delta[r]`, then
/// `out[r] = rms_norm(x[r])` as [`rms_norm`] computes it (the same bits as the add followed by
/// [`rms_norm`], with the row still in cache and no second pass over `x`).
pub fn add_rms_norm(
    x: &mut [f32],
    delta: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_rows("add_rms_norm", x.len(), weight.len())?;
    check_len("add_rms_norm residual", x.len(), delta.len())?;
    check_len("add_rms_norm output", x.len(), out.len())?;
    let width = weight.len();
    for ((row, delta_row), out_row) in
        x.chunks_exact_mut(width).zip(delta.chunks_exact(width)).zip(out.chunks_exact_mut(width))
    {
        for (v, &d) in row.iter_mut().zip(delta_row) {
            *v += d;
        }
        rms_norm_row(row, weight, eps, out_row);
    }
    Ok(())
}

/// `values` must be whole rows of `width`, and a row must have a width.
fn check_rows(what: &str, values: usize, width: usize) -> Result<(), KernelError> {
    if width == 0 || !values.is_multiple_of(width) {
        return Err(KernelError::InvalidShape {
            reason: format!("{what}: {values} values are not rows of width {width}"),
        });
    }
    Ok(())
}

/// One row of [`rms_norm`], compiled for the widest vectors the CPU has: the arithmetic is the
/// same (eight f64 partial sums in a fixed order, no fused operations), so are the bits.
fn rms_norm_row(row: &[f32], weight: &[f32], eps: f32, out_row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: `fma_available` checked AVX2 and FMA at run time, `isa()` AVX-512 F.
        unsafe {
            if matches!(crate::kernels::isa(), crate::Isa::Avx512 | crate::Isa::Avx512Vnni) {
                return rms_norm_row_avx512(row, weight, eps, out_row);
            }
            return rms_norm_row_avx2(row, weight, eps, out_row);
        }
    }
    rms_norm_row_body(row, weight, eps, out_row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn rms_norm_row_avx512(row: &[f32], weight: &[f32], eps: f32, out_row: &mut [f32]) {
    rms_norm_row_body(row, weight, eps, out_row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_row_avx2(row: &[f32], weight: &[f32], eps: f32, out_row: &mut [f32]) {
    rms_norm_row_body(row, weight, eps, out_row)
}

#[inline(always)]
fn rms_norm_row_body(row: &[f32], weight: &[f32], eps: f32, out_row: &mut [f32]) {
    // Eight f64 partial sums: one dependent chain of f64 adds per row would make this
    // latency-bound (~1 µs a row of 576).
    let mut partial = [0.0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += (v as f64) * (v as f64);
        }
    }
    let sum_sq = partial.iter().sum::<f64>() + tail;
    let inv_rms = (1.0 / (sum_sq / row.len() as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
        *o = v * inv_rms * w;
    }
}

/// Rotates `x` (`[rows, heads, head_dim]`, in place) by the rotary embedding in the Hugging
/// Face half-split layout and multiplies it by `scale`: with `h = head_dim / 2`,
/// `x'[i] = x[i]·cos[i] − x[i+h]·sin[i]` and `x'[i+h] = x[i+h]·cos[i+h] + x[i]·sin[i+h]`.
/// `cos` and `sin` hold one `head_dim` row per row of `x` (the angles of its position).
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
) -> Result<(), KernelError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || heads == 0 {
        return Err(KernelError::InvalidShape { reason: format!("rope: {heads} heads of width {head_dim}") });
    }
    let row_width = product(&[heads, head_dim])?;
    if !x.len().is_multiple_of(row_width) {
        return Err(KernelError::InvalidShape {
            reason: format!("rope: {} values are not rows of {heads} × {head_dim}", x.len()),
        });
    }
    let rows = x.len() / row_width;
    check_len("rope cos table", rows * head_dim, cos.len())?;
    check_len("rope sin table", rows * head_dim, sin.len())?;
    let half = head_dim / 2;
    for (r, row) in x.chunks_exact_mut(row_width).enumerate() {
        let (c, s) = (&cos[r * head_dim..(r + 1) * head_dim], &sin[r * head_dim..(r + 1) * head_dim]);
        for head in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = (a * c[i] - b * s[i]) * scale;
                hi[i] = (b * c[i + half] + a * s[i + half]) * scale;
            }
        }
    }
    Ok(())
}

/// `gate[i] = silu(gate[i]) · up[i]` in place (`silu(g) = g / (1 + e^{−g})`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) -> Result<(), KernelError> {
    check_len("swiglu up", gate.len(), up.len())?;
    let len = gate.len();
    if len < PARALLEL_SWIGLU_MIN {
        swiglu_serial(gate, up);
        return Ok(());
    }
    // A batch of rows (e.g. eight sequences × 1536): elementwise, so split among the threads.
    const TASKS: usize = 4;
    let per = len.div_ceil(TASKS);
    let out = SendPtr(gate.as_mut_ptr());
    pool::run(TASKS, &|t| {
        let (start, end) = ((t * per).min(len), ((t + 1) * per).min(len));
        // SAFETY: task `t` alone touches elements `start..end` of `gate`, which outlives the job.
        let part = unsafe { std::slice::from_raw_parts_mut(out.get().add(start), end - start) };
        swiglu_serial(part, &up[start..end]);
    });
    Ok(())
}

/// Elements below which [`swiglu`] runs on the calling thread only.
const PARALLEL_SWIGLU_MIN: usize = 1 << 13;

/// [`swiglu`] on the calling thread only (for a kernel task that already owns a share of the
/// work); the same bits. `up` must be at least as long as `gate`.
pub(crate) fn swiglu_serial(gate: &mut [f32], up: &[f32]) {
    if fma_available() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `fma_available` checked AVX2 and FMA at run time.
        unsafe {
            swiglu_fma(gate, up)
        }
    } else {
        swiglu_body(gate, up)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_body(gate, up)
}

#[inline(always)]
fn swiglu_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_f32(-*g)) * u;
    }
}

/// `e^x` in f32 within 2 ulp for `x` in `[-87, 88]` (results are clamped to that range:
/// `e^-87 ≈ 1.6e-38` stands for anything smaller, `e^88` for anything larger). Cephes' range
/// reduction and polynomial, written without branches so that loops over it vectorize (libm's
/// `expf` is a call per element).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer (to nearest, ties to even) held in the low
    // mantissa bits: `k` as a float and as an integer without a float-to-int conversion, whose
    // saturating Rust semantics (`as i32`) compile to scalar code and stop the vectorization.
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUNDER;
    let k = shifted - ROUNDER;
    let k_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^k by building the exponent field directly (k is in [-126, 127] after the clamp; for a
    // NaN `x` the field is garbage and `e_r` NaN, so the result is NaN).
    e_r * f32::from_bits((k_int.wrapping_add(127) as u32) << 23)
}

/// `ln Σ e^{x_i}` of a row (max-shifted; terms in f32, summed in f64 so that a 150k-entry
/// vocabulary does not drift). NaN when any entry is NaN or infinite, so it doubles as a
/// finiteness check; `-inf` for an empty row.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    if fma_available() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `fma_available` checked AVX2 and FMA at run time, `isa()` AVX-512 F.
        unsafe {
            if matches!(crate::kernels::isa(), crate::Isa::Avx512 | crate::Isa::Avx512Vnni) {
                return log_sum_exp_avx512(row);
            }
            return log_sum_exp_fma(row);
        }
    }
    log_sum_exp_body(row)
}

/// Per row of `values` (rows of `width`): [`log_sum_exp`] and the `k` largest entries with
/// their column indices (descending, as [`crate::top_k`]). Rows are split across the kernel
/// threads, so a batched decode step reduces its rows' logits in parallel.
pub fn row_stats(values: &[f32], width: usize, k: usize) -> Result<Vec<RowStats>, KernelError> {
    if width == 0 || !values.len().is_multiple_of(width) {
        return Err(KernelError::InvalidShape {
            reason: format!("row_stats: {} values are not rows of width {width}", values.len()),
        });
    }
    let rows = values.len() / width;
    let slots: Vec<std::sync::Mutex<Option<RowStats>>> = (0..rows).map(|_| std::sync::Mutex::new(None)).collect();
    let task = |r: usize| {
        let row = &values[r * width..(r + 1) * width];
        let stats = RowStats { log_sum_exp: log_sum_exp(row), top: crate::top_k(row, k) };
        if let Ok(mut slot) = slots[r].lock() {
            *slot = Some(stats);
        }
    };
    if rows > 1 {
        pool::run(rows, &task);
    } else {
        (0..rows).for_each(task);
    }
    slots
        .into_iter()
        .map(|slot| slot.into_inner().ok().flatten())
        .collect::<Option<Vec<RowStats>>>()
        .ok_or_else(|| KernelError::InvalidShape { reason: "row_stats: a row was not reduced".into() })
}

/// What [`row_stats`] computes for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    /// `ln Σ e^x` (NaN when the row has a non-finite entry).
    pub log_sum_exp: f64,
    /// The `k` largest entries, `(column, value)`, descending.
    pub top: Vec<(usize, f32)>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp_fma(row: &[f32]) -> f64 {
    log_sum_exp_body(row)
}

/// [`log_sum_exp_body`] compiled with AVX-512 F: its sixteen f32 partial sums fill one
/// register (each lane adds the same terms in the same order as on the other paths, so the
/// result has the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn log_sum_exp_avx512(row: &[f32]) -> f64 {
    log_sum_exp_body(row)
}

#[inline(always)]
fn log_sum_exp_body(row: &[f32]) -> f64 {
    if row.is_empty() {
        return f64::NEG_INFINITY;
    }
    // The maximum in sixteen independent lanes (then combined), so that the pass vectorizes;
    // one running maximum would be a chain of dependent operations. A compare and select
    // (`maxps`) rather than `f32::max`, whose NaN rule keeps the loop scalar: the maximum of
    // the finite values is exact in any order, and non-finite entries are caught below.
    let mut max_lanes = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (max, &x) in max_lanes.iter_mut().zip(chunk) {
            *max = if x > *max { x } else { *max };
        }
    }
    let mut max = max_lanes.iter().fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    for &x in rest {
        max = if x > max { x } else { max };
    }
    // `+inf` makes the maximum infinite, as does a row of only NaN and `-inf`.
    if !max.is_finite() {
        return f64::NAN;
    }
    // f32 lanes (twice the vector width of f64) over blocks of 256 values, each block's lanes
    // added into f64: a block's f32 rounding stays below 256 · 2^-24 of its sum. Each term
    // carries `0 · x`, which is 0 for finite x and NaN for NaN or `-inf` (a NaN's exponential
    // is NaN too), so any non-finite entry makes the sum NaN; adding 0 to a term changes nothing.
    let mut sum = 0.0f64;
    let blocks = row.chunks_exact(256);
    let tail = blocks.remainder();
    for block in blocks {
        let mut partial = [0.0f32; 16];
        for chunk in block.chunks_exact(16) {
            for (acc, &x) in partial.iter_mut().zip(chunk) {
                *acc += exp_f32(x - max) + 0.0 * x;
            }
        }
        sum += partial.iter().map(|&p| p as f64).sum::<f64>();
    }
    for &x in tail {
        sum += (exp_f32(x - max) + 0.0 * x) as f64;
    }
    max as f64 + sum.ln()
}

/// One run of consecutive cached positions of one layer: keys and values in a buffer laid out
/// `[kv_heads, capacity, head_dim]`, of which the first `len` positions are used.
#[derive(Debug, Clone, Copy)]
pub struct KvRun<'a> {
    /// Keys (after the rotary embedding).
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Positions the buffer has room for.
    pub capacity: usize,
    /// Positions in use (`<= capacity`).
    pub len: usize,
}

/// The shape of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`; grouped-query attention).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// Work (query rows × keys × heads) below which attention runs on the calling thread only.
/// One decode row of nine heads over ~30 keys already gains from the second thread (batch-1
/// decode +2 % against 2048, alternating runs): a handoff costs about a microsecond.
const PARALLEL_ATTENTION_MIN: usize = 1 << 8;

/// Causal grouped-query attention of `n` new query rows against a sequence's cached keys and
/// values, given as consecutive `runs` in position order whose lengths add up to `past + n`
/// (the new rows' own keys are the last `n` positions). Query row `j` attends to positions
/// `0..=past + j`; query head `h` reads key/value head `h / (heads / kv_heads)`.
///
/// `q` is `[n, heads, head_dim]` (already rotated and scaled by `1/sqrt(head_dim)`), `out` is
/// `[n, heads * head_dim]`. Scores, softmax and the weighted sum of values are computed in f32,
/// key by key in position order, so the result does not depend on how the positions are cut
/// into runs.
pub fn attention(
    q: &[f32],
    n: usize,
    shape: AttentionShape,
    runs: &[KvRun<'_>],
    past: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    attention_batch(q, n, shape, &[AttentionSeq { rows: 0..n, runs, past }], out)
}

/// One sequence of [`attention_batch`]: its query rows and its cache.
#[derive(Debug, Clone)]
pub struct AttentionSeq<'a> {
    /// The sequence's rows of `q` and `out` (its new tokens).
    pub rows: Range<usize>,
    /// Its cached keys and values in position order, the new rows' own last.
    pub runs: &'a [KvRun<'a>],
    /// Positions cached before the new rows.
    pub past: usize,
}

/// [`attention`] for several sequences in one call (a batched decode step): `q` and `out` hold
/// `rows` rows, and each sequence owns the disjoint range [`AttentionSeq::rows`] of them
/// (ranges in ascending order). All (sequence, head) pairs run as one job of the thread pool, so
/// a batch of short sequences keeps every thread busy. Each sequence's result is bit-for-bit
/// what [`attention`] computes for it alone.
pub fn attention_batch(
    q: &[f32],
    rows: usize,
    shape: AttentionShape,
    seqs: &[AttentionSeq<'_>],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let AttentionShape { heads, kv_heads, head_dim } = shape;
    if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(KernelError::InvalidShape {
            reason: format!("attention: {heads} query heads, {kv_heads} kv heads, width {head_dim}"),
        });
    }
    let row_width = product(&[heads, head_dim])?;
    check_len("attention queries", product(&[rows, row_width])?, q.len())?;
    check_len("attention output", product(&[rows, row_width])?, out.len())?;
    let mut keys_of = Vec::with_capacity(seqs.len());
    let mut next_free_row = 0;
    let mut work = 0usize;
    for seq in seqs {
        // Disjoint ascending ranges: the tasks below write their rows through a shared pointer.
        if seq.rows.start < next_free_row || seq.rows.end < seq.rows.start || seq.rows.end > rows {
            return Err(KernelError::InvalidShape {
                reason: format!("attention: sequence rows {:?} overlap or exceed {rows} rows", seq.rows),
            });
        }
        next_free_row = seq.rows.end;
        let mut keys = 0usize;
        for run in seq.runs {
            if run.len > run.capacity {
                return Err(KernelError::InvalidShape {
                    reason: format!("attention: a run uses {} of {} positions", run.len, run.capacity),
                });
            }
            let size = product(&[kv_heads, run.capacity, head_dim])?;
            check_len("attention keys", size, run.k.len())?;
            check_len("attention values", size, run.v.len())?;
            keys += run.len;
        }
        let n = seq.rows.len();
        check_len("attention positions (past + new)", seq.past + n, keys)?;
        keys_of.push(keys);
        work = work.saturating_add(n.saturating_mul(keys).saturating_mul(heads));
    }

    let job = HeadJob { q, shape, seqs, keys_of: &keys_of, out: SendPtr(out.as_mut_ptr()) };
    let fma = fma_available();
    #[cfg(target_arch = "x86_64")]
    let avx512 = fma && matches!(crate::kernels::isa(), crate::Isa::Avx512 | crate::Isa::Avx512Vnni);
    // Heads `first..first + count` of one kv head. The AVX-512 kernels (widths 64 and 128) run
    // several in one pass over the keys and values (three at 64, two at 128: as many as the
    // registers hold); the others run one head after another.
    let attend_group = |seq: usize, first: usize, count: usize, scores: &mut Vec<f32>| {
        let end = first + count;
        #[cfg(target_arch = "x86_64")]
        if avx512 && matches!(head_dim, 64 | 128) {
            let mut head = first;
            while head < end {
                let g = (end - head).min(if head_dim == 64 { 3 } else { 2 });
                // SAFETY: `avx512` means `isa()` found AVX-512 F, BW and VL and
                // `fma_available` AVX2 and FMA; the lengths were checked above; heads
                // `head..head + g` share a kv head, as a task's heads are one kv head's.
                unsafe {
                    match (head_dim, g) {
                        (64, 1) => attend_heads_avx512::<4, 1>(&job, seq, head, scores),
                        (64, 2) => attend_heads_avx512::<4, 2>(&job, seq, head, scores),
                        (64, _) => attend_heads_avx512::<4, 3>(&job, seq, head, scores),
                        (_, 1) => attend_heads_avx512::<8, 1>(&job, seq, head, scores),
                        _ => attend_heads_avx512::<8, 2>(&job, seq, head, scores),
                    }
                }
                head += g;
            }
            return;
        }
        for head in first..end {
            if fma {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `fma_available` checked AVX2 and FMA at run time; the lengths were
                // checked above.
                unsafe {
                    if head_dim.is_multiple_of(8) {
                        attend_head_avx2(&job, seq, head, scores)
                    } else {
                        attend_head_fma(&job, seq, head, scores)
                    }
                }
            } else {
                attend_head(&job, seq, head, scores)
            }
        }
    };
    // With enough sequences to keep the threads busy, a task is a (sequence, kv head) pair and
    // runs the query heads that share those keys and values together (`attend_group`), so that
    // they are read once (often from memory: the weights streamed since the last step have
    // evicted them) instead of once per head. Each head's arithmetic is unchanged. Fewer
    // sequences keep one task per query head, which balances the threads better.
    let group = heads / kv_heads;
    let grouped = seqs.len() * kv_heads >= GROUPED_ATTENTION_MIN_TASKS_PER_THREAD * pool::num_threads();
    let (tasks, per_task) = if grouped { (seqs.len() * kv_heads, group) } else { (seqs.len() * heads, 1) };
    let task = |t: usize| {
        let (seq, first) = (t * per_task / heads, t * per_task % heads);
        // One scores buffer per thread, reused by every task (a decode step runs thousands).
        SCORES.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scores) => attend_group(seq, first, per_task, &mut scores),
            Err(_) => attend_group(seq, first, per_task, &mut Vec::new()),
        });
    };
    if work >= PARALLEL_ATTENTION_MIN {
        pool::run(tasks, &task);
    } else {
        (0..tasks).for_each(task);
    }
    Ok(())
}

thread_local! {
    /// Attention scores of the task running on this thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tasks per pool thread from which [`attention_batch`] runs a (sequence, kv head) pair per task
/// rather than a (sequence, query head) pair.
const GROUPED_ATTENTION_MIN_TASKS_PER_THREAD: usize = 4;

/// Whether the FMA build of the attention inner loops can run (x86-64 with AVX2 and FMA, and
/// the kernels not forced to the portable path).
fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !matches!(crate::kernels::isa(), crate::Isa::Scalar)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Everything the attention tasks read (lengths already checked by [`attention_batch`]).
struct HeadJob<'a> {
    q: &'a [f32],
    shape: AttentionShape,
    seqs: &'a [AttentionSeq<'a>],
    /// Cached positions (past + new) of each sequence.
    keys_of: &'a [usize],
    out: SendPtr,
}

/// [`attend_head`] compiled with AVX2 and FMA enabled (the same code, vectorized 8-wide).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_fma(job: &HeadJob<'_>, seq: usize, h: usize, scores: &mut Vec<f32>) {
    attend_head(job, seq, h, scores)
}

/// Turns scores into unnormalised softmax weights `e^(s - max)` in place and returns
/// `1 / Σ weights`. The exponentials vectorize; the sum runs in sixteen lanes by position
/// (`i mod 16`, then the lanes in order), so it is one fixed order for a given length and
/// not one long chain of dependent adds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn softmax_weights(scores: &mut [f32], max: f32) -> f32 {
    scores.iter_mut().for_each(|s| *s = exp_f32(*s - max));
    let mut lanes = [0.0f32; 16];
    let chunks = scores.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &s) in lanes.iter_mut().zip(chunk) {
            *lane += s;
        }
    }
    for (lane, &s) in lanes.iter_mut().zip(tail) {
        *lane += s;
    }
    1.0 / lanes.iter().fold(0.0, |t, &s| t + s)
}

/// How many keys ahead of the ones it scores [`attend_heads_avx512`] prefetches keys. The
/// keys and values of a decode step usually come from memory (the weights streamed since the
/// last step have evicted them), and a sequence's own run is too short for the hardware
/// prefetcher to ramp up: `attention_timing … 30 96` (cold) measured 8 keys ahead best.
#[cfg(target_arch = "x86_64")]
const ATTENTION_PREFETCH_KEYS: usize = 8;

/// [`attend_head`] with AVX-512 for `head_dim = 16 · C` (64 and 128), for the `G` query heads
/// `first..first + G`, which share one kv head, in one pass over its keys and values: each
/// key and value is loaded once for all `G` heads, and the heads' independent FMA chains
/// interleave. Per head: the query in `C` registers, four keys' scores per pass with one
/// shared transpose-and-add reduction (each key summed by the same tree whatever its slot, and
/// a short last group padded with zero keys, so the scores depend neither on how positions are
/// cut into runs nor on `G`), and the weighted sum of values in `C` registers. The values of
/// the keys being scored are prefetched for the weighted sum that follows.
///
/// # Safety
/// The CPU must support AVX-512 F and VL, AVX2 and FMA; `job` passed the checks of
/// [`attention_batch`], `head_dim == 16 * C`, and heads `first..first + G` share a kv head.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
// Each loop index selects the same slot of several register arrays (`q[g][c]`, `acc[g][i]`);
// constant-bound index loops keep them in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn attend_heads_avx512<const C: usize, const G: usize>(
    job: &HeadJob<'_>,
    seq: usize,
    first: usize,
    scores: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;

    /// Lanes 0..4: the sums of the sixteen lanes of `acc[0]`, …, `acc[3]`.
    #[inline(always)]
    fn reduce4(acc: &[__m512; 4]) -> __m128 {
        // SAFETY (all intrinsics here): AVX-512 F is enabled by the enclosing function.
        unsafe {
            let t01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
            let t23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
            let (a, b) = (_mm512_castps_pd(t01), _mm512_castps_pd(t23));
            let u =
                _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
            let v = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b01_00_11_10>(u, u));
            let w = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
            _mm512_castps512_ps128(w)
        }
    }

    let AttentionShape { heads, kv_heads, head_dim } = job.shape;
    let AttentionSeq { rows, runs, past } = &job.seqs[seq];
    let row_width = heads * head_dim;
    let kv_head = first / (heads / kv_heads);
    let keys_total = job.keys_of[seq];
    scores.clear();
    scores.resize(G * keys_total, 0.0);
    for (j, row) in rows.clone().enumerate() {
        let visible = past + j + 1;
        let q: [[__m512; C]; G] = std::array::from_fn(|g| {
            let qp = job.q[row * row_width + (first + g) * head_dim..][..head_dim].as_ptr();
            // SAFETY: `qp` points at `head_dim = 16 C` values of head `first + g`'s query.
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(qp.add(16 * c)) })
        });
        let mut max4 = [_mm_set1_ps(f32::NEG_INFINITY); G];
        let mut position = 0;
        for run in runs.iter() {
            let used = run.len.min(visible.saturating_sub(position));
            let keys = run.k[kv_head * run.capacity * head_dim..][..used * head_dim].as_ptr();
            let values = run.v[kv_head * run.capacity * head_dim..][..used * head_dim].as_ptr();
            let mut p = 0;
            while p < used {
                let n = (used - p).min(4);
                let mut acc = [[_mm512_setzero_ps(); 4]; G];
                // Only for the first query row: later rows (a prefill) find the keys and values
                // in cache. A prefetch never faults: past the run's end it is only wasted.
                if j == 0 {
                    for line in (0..4 * head_dim).step_by(16) {
                        _mm_prefetch::<_MM_HINT_T0>(
                            keys.wrapping_add((p + ATTENTION_PREFETCH_KEYS) * head_dim + line).cast(),
                        );
                        _mm_prefetch::<_MM_HINT_T0>(values.wrapping_add(p * head_dim + line).cast());
                    }
                }
                // A constant trip count with a test inside (not `0..n`) keeps the accumulators
                // in registers.
                for c in 0..C {
                    for i in 0..4 {
                        if i < n {
                            // SAFETY: key `p + i < used`, values `16c..16c + 16` of it.
                            let kv = unsafe { _mm512_loadu_ps(keys.add((p + i) * head_dim + 16 * c)) };
                            for g in 0..G {
                                acc[g][i] = _mm512_fmadd_ps(q[g][c], kv, acc[g][i]);
                            }
                        }
                    }
                }
                // The first `n` lanes are real keys; the padding lanes count as -inf for the max
                // and are not stored.
                let real = (1u8 << n) - 1;
                for g in 0..G {
                    let sums = _mm_mask_mov_ps(_mm_set1_ps(f32::NEG_INFINITY), real, reduce4(&acc[g]));
                    let at = &mut scores[g * keys_total + position + p..][..n];
                    // SAFETY: the mask writes the first `n` floats, which `at` holds.
                    unsafe { _mm_mask_storeu_ps(at.as_mut_ptr(), real, sums) };
                    // `maxps` returns its second operand when the first is NaN: NaN scores are
                    // ignored, as by `f32::max`.
                    max4[g] = _mm_max_ps(sums, max4[g]);
                }
                p += n;
            }
            position += run.len;
        }
        let mut inv_total = [0.0f32; G];
        for g in 0..G {
            let mut lanes = [0.0f32; 4];
            // SAFETY: `lanes` holds four floats.
            unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), max4[g]) };
            let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            inv_total[g] = softmax_weights(&mut scores[g * keys_total..][..visible], max);
        }
        let mut acc = [[_mm512_setzero_ps(); C]; G];
        let mut position = 0;
        for run in runs.iter() {
            let used = run.len.min(visible.saturating_sub(position));
            let values = run.v[kv_head * run.capacity * head_dim..][..used * head_dim].as_ptr();
            for p in 0..used {
                let w: [__m512; G] = std::array::from_fn(|g| _mm512_set1_ps(scores[g * keys_total + position + p]));
                for c in 0..C {
                    // SAFETY: `16c + 16 <= head_dim` and `p < used`.
                    let v = unsafe { _mm512_loadu_ps(values.add(p * head_dim + 16 * c)) };
                    for g in 0..G {
                        acc[g][c] = _mm512_fmadd_ps(w[g], v, acc[g][c]);
                    }
                }
            }
            position += run.len;
        }
        for g in 0..G {
            // SAFETY: the output row block of head `first + g` is `head_dim` values inside `out`,
            // written by this (sequence, kv head) task only.
            let out = unsafe { job.out.get().add(row * row_width + (first + g) * head_dim) };
            for c in 0..C {
                // SAFETY: as for `out` above.
                unsafe { _mm512_storeu_ps(out.add(16 * c), _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_total[g]))) };
            }
        }
    }
}

/// [`attend_head`] with AVX2 intrinsics for `head_dim` a multiple of 8: four keys' scores at
/// a time (four independent FMA chains), and the weighted sum of values in eight registers
/// (64 dimensions) per pass over the keys.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `job` passed the checks of [`attention_batch`] and
/// `head_dim` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(job: &HeadJob<'_>, seq: usize, h: usize, scores: &mut Vec<f32>) {
    use std::arch::x86_64::*;

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY (all intrinsics here): AVX is implied by the enclosing target features.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
        }
    }

    let AttentionShape { heads, kv_heads, head_dim } = job.shape;
    let AttentionSeq { rows, runs, past } = &job.seqs[seq];
    let row_width = heads * head_dim;
    let kv_head = h / (heads / kv_heads);
    let chunks = head_dim / 8;
    scores.clear();
    scores.resize(job.keys_of[seq], 0.0);
    for (j, row) in rows.clone().enumerate() {
        let visible = past + j + 1;
        let q = job.q[row * row_width + h * head_dim..(row * row_width + (h + 1) * head_dim)].as_ptr();
        let mut max = f32::NEG_INFINITY;
        let mut position = 0;
        for run in runs.iter() {
            let used = run.len.min(visible.saturating_sub(position));
            let keys = run.k[kv_head * run.capacity * head_dim..][..used * head_dim].as_ptr();
            let mut p = 0;
            while p + 4 <= used {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in 0..chunks {
                    // SAFETY: `c * 8 + 8 <= head_dim`, and keys `p..p + 4` are inside `used`.
                    let qv = unsafe { _mm256_loadu_ps(q.add(c * 8)) };
                    for (i, a) in acc.iter_mut().enumerate() {
                        let kv = unsafe { _mm256_loadu_ps(keys.add((p + i) * head_dim + c * 8)) };
                        *a = _mm256_fmadd_ps(qv, kv, *a);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    let s = hsum(*a);
                    scores[position + p + i] = s;
                    max = max.max(s);
                }
                p += 4;
            }
            while p < used {
                let mut a = _mm256_setzero_ps();
                for c in 0..chunks {
                    // SAFETY: as above, for key `p`.
                    let (qv, kv) =
                        unsafe { (_mm256_loadu_ps(q.add(c * 8)), _mm256_loadu_ps(keys.add(p * head_dim + c * 8))) };
                    a = _mm256_fmadd_ps(qv, kv, a);
                }
                let s = hsum(a);
                scores[position + p] = s;
                max = max.max(s);
                p += 1;
            }
            position += run.len;
        }
        let inv_total = softmax_weights(&mut scores[..visible], max);
        // SAFETY: the output row block of head `h` is `head_dim` values inside `out`, written by
        // this (sequence, head) task only.
        let out = unsafe { job.out.get().add(row * row_width + h * head_dim) };
        let mut c0 = 0;
        while c0 < chunks {
            let width = (chunks - c0).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut position = 0;
            for run in runs.iter() {
                let used = run.len.min(visible.saturating_sub(position));
                let values = run.v[kv_head * run.capacity * head_dim..][..used * head_dim].as_ptr();
                for p in 0..used {
                    let w = _mm256_set1_ps(scores[position + p]);
                    for (c, a) in acc.iter_mut().enumerate().take(width) {
                        // SAFETY: `(c0 + c) * 8 + 8 <= head_dim` and `p < used`.
                        let v = unsafe { _mm256_loadu_ps(values.add(p * head_dim + (c0 + c) * 8)) };
                        *a = _mm256_fmadd_ps(w, v, *a);
                    }
                }
                position += run.len;
            }
            for (c, a) in acc.iter().enumerate().take(width) {
                // SAFETY: as for `out` above.
                unsafe { _mm256_storeu_ps(out.add((c0 + c) * 8), _mm256_mul_ps(*a, _mm256_set1_ps(inv_total))) };
            }
            c0 += width;
        }
    }
}

/// Query head `h` of every new row of sequence `seq`: scores, softmax and the weighted sum of
/// values.
#[inline(always)]
fn attend_head(job: &HeadJob<'_>, seq: usize, h: usize, scores: &mut Vec<f32>) {
    let AttentionShape { heads, kv_heads, head_dim } = job.shape;
    let AttentionSeq { rows, runs, past } = &job.seqs[seq];
    let row_width = heads * head_dim;
    let kv_head = h / (heads / kv_heads);
    scores.clear();
    scores.resize(job.keys_of[seq], 0.0);
    let mut acc = vec![0.0f32; head_dim];
    for (j, row) in rows.clone().enumerate() {
        let visible = past + j + 1;
        let query = &job.q[row * row_width + h * head_dim..row * row_width + (h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        let mut position = 0;
        for run in runs.iter() {
            let base = kv_head * run.capacity * head_dim;
            let used = run.len.min(visible.saturating_sub(position));
            let mut p = 0;
            while p + 4 <= used {
                let block = dot4(query, &run.k[base + p * head_dim..base + (p + 4) * head_dim], head_dim);
                for (i, &s) in block.iter().enumerate() {
                    scores[position + p + i] = s;
                    max = max.max(s);
                }
                p += 4;
            }
            for p in p..used {
                let key = &run.k[base + p * head_dim..base + (p + 1) * head_dim];
                let s = dot(query, key);
                scores[position + p] = s;
                max = max.max(s);
            }
            position += run.len;
        }
        // Two passes: the exponentials vectorize, the (ordered) sum is cheap.
        scores[..visible].iter_mut().for_each(|s| *s = exp_f32(*s - max));
        let total: f32 = scores[..visible].iter().fold(0.0, |t, &s| t + s);
        acc.iter_mut().for_each(|a| *a = 0.0);
        let mut position = 0;
        for run in runs.iter() {
            let base = kv_head * run.capacity * head_dim;
            for p in 0..run.len.min(visible.saturating_sub(position)) {
                let weight = scores[position + p];
                let value = &run.v[base + p * head_dim..base + (p + 1) * head_dim];
                for (a, &v) in acc.iter_mut().zip(value) {
                    *a += weight * v;
                }
            }
            position += run.len;
        }
        let inv_total = 1.0 / total;
        for (d, &a) in acc.iter().enumerate() {
            // SAFETY: `row < rows` so the index is inside `out` (checked by `attention_batch`);
            // the sequences' row ranges are disjoint, so element (row, h, d) is written by this
            // (sequence, head) task only.
            unsafe { *job.out.get().add(row * row_width + h * head_dim + d) = a * inv_total };
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the attention and SwiGLU tasks write disjoint elements of a buffer that outlives the
// pool job.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain reference: one contiguous key/value buffer per kv head, f64 arithmetic.
    fn reference(q: &[f32], n: usize, shape: AttentionShape, k: &[f32], v: &[f32], past: usize) -> Vec<f32> {
        let AttentionShape { heads, kv_heads, head_dim } = shape;
        let keys = past + n;
        let mut out = vec![0.0f32; n * heads * head_dim];
        for j in 0..n {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qv = &q[(j * heads + h) * head_dim..(j * heads + h + 1) * head_dim];
                let scores: Vec<f64> = (0..=past + j)
                    .map(|p| {
                        let kv = &k[(g * keys + p) * head_dim..(g * keys + p + 1) * head_dim];
                        qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let value: f64 =
                        weights.iter().enumerate().map(|(p, w)| w * v[(g * keys + p) * head_dim + d] as f64).sum();
                    out[(j * heads + h) * head_dim + d] = (value / total) as f32;
                }
            }
        }
        out
    }

    fn noise(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Cuts `[kv_heads, keys, dim]` into runs of the given lengths, each with spare capacity.
    fn runs_of(
        full: &[f32],
        kv_heads: usize,
        keys: usize,
        dim: usize,
        cuts: &[usize],
        spare: usize,
    ) -> Vec<(Vec<f32>, usize, usize)> {
        let mut out = Vec::new();
        let mut start = 0;
        for &len in cuts {
            let capacity = len + spare;
            let mut buffer = vec![f32::NAN; kv_heads * capacity * dim];
            for g in 0..kv_heads {
                for p in 0..len {
                    let src = &full[(g * keys + start + p) * dim..(g * keys + start + p + 1) * dim];
                    buffer[(g * capacity + p) * dim..(g * capacity + p + 1) * dim].copy_from_slice(src);
                }
            }
            out.push((buffer, capacity, len));
            start += len;
        }
        out
    }

    #[test]
    fn attention_matches_reference_and_ignores_segmentation() {
        // Width 12: the portable loops; width 72: the AVX2 path with a partial register group;
        // widths 64 and 128: the AVX-512 path (where the CPU has it).
        for dim in [12usize, 72, 64, 128] {
            let shape = AttentionShape { heads: 6, kv_heads: 2, head_dim: dim };
            for (past, n) in [(0usize, 1usize), (0, 5), (7, 1), (9, 4), (300, 1), (40, 30)] {
                let keys = past + n;
                let q = noise(1 + past as u64, n * 6 * dim);
                let k = noise(2 + n as u64, 2 * keys * dim);
                let v = noise(3, 2 * keys * dim);
                let expected = reference(&q, n, shape, &k, &v, past);
                let mut first: Option<Vec<f32>> = None;
                let cut_sets: Vec<Vec<usize>> = vec![vec![keys], vec![1, keys - 1], vec![keys / 2, keys - keys / 2]];
                for cuts in cut_sets.iter().filter(|c| c.iter().all(|&l| l > 0)) {
                    let owned = runs_of(&k, 2, keys, dim, cuts, 3);
                    let owned_v = runs_of(&v, 2, keys, dim, cuts, 3);
                    let runs: Vec<KvRun<'_>> = owned
                        .iter()
                        .zip(&owned_v)
                        .map(|((kb, capacity, len), (vb, _, _))| KvRun { k: kb, v: vb, capacity: *capacity, len: *len })
                        .collect();
                    let mut out = vec![0.0f32; n * 6 * dim];
                    attention(&q, n, shape, &runs, past, &mut out).unwrap();
                    for (a, b) in out.iter().zip(&expected) {
                        assert!((a - b).abs() < 1e-5, "past {past} n {n} cuts {cuts:?}: {a} vs {b}");
                    }
                    match &first {
                        None => first = Some(out),
                        Some(f) => assert_eq!(f, &out, "segmentation changed the result bits"),
                    }
                }
            }
        }
    }

    #[test]
    fn batched_attention_equals_each_sequence_alone() {
        // Groups of 2, 3 and 4 query heads per kv head, at the AVX-512 widths (64 and 128) and a
        // narrow width for the other kernels: a task of the batch runs a group's heads, where
        // `attention` alone runs one head per task.
        for (heads, kv_heads, head_dim) in [(4, 2, 8), (6, 2, 64), (9, 3, 64), (8, 2, 64), (8, 2, 128), (6, 2, 128)] {
            batched_attention_equals_each_sequence_alone_with(AttentionShape { heads, kv_heads, head_dim });
        }
    }

    fn batched_attention_equals_each_sequence_alone_with(shape: AttentionShape) {
        let (width, kv_width) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
        // (past, new rows) per sequence; enough work in total to take the parallel path, and
        // enough sequences × kv heads for the tasks of one kv head's query heads whatever the
        // thread count, which `attention` alone (one task per head) never uses.
        let base = [(40usize, 1usize), (3, 2), (700, 1), (0, 6)];
        let needed = GROUPED_ATTENTION_MIN_TASKS_PER_THREAD * pool::num_threads();
        let specs: Vec<(usize, usize)> =
            base.iter().copied().cycle().take(base.len().max(needed.div_ceil(shape.kv_heads))).collect();
        assert!(specs.len() * shape.kv_heads >= needed);
        let total_rows: usize = specs.iter().map(|s| s.1).sum();
        let q = noise(11, total_rows * width);
        let caches: Vec<(Vec<f32>, Vec<f32>, usize)> = specs
            .iter()
            .enumerate()
            .map(|(i, &(past, n))| {
                (noise(20 + i as u64, (past + n) * kv_width), noise(30 + i as u64, (past + n) * kv_width), past + n)
            })
            .collect();
        let runs: Vec<[KvRun<'_>; 1]> =
            caches.iter().map(|(k, v, keys)| [KvRun { k, v, capacity: *keys, len: *keys }]).collect();
        let mut seqs = Vec::new();
        let mut row = 0;
        for (i, &(past, n)) in specs.iter().enumerate() {
            seqs.push(AttentionSeq { rows: row..row + n, runs: &runs[i], past });
            row += n;
        }
        let mut batched = vec![0.0f32; total_rows * width];
        attention_batch(&q, total_rows, shape, &seqs, &mut batched).unwrap();
        for seq in &seqs {
            let n = seq.rows.len();
            let mut alone = vec![0.0f32; n * width];
            let q_rows = &q[seq.rows.start * width..seq.rows.end * width];
            attention(q_rows, n, shape, seq.runs, seq.past, &mut alone).unwrap();
            assert_eq!(&batched[seq.rows.start * width..seq.rows.end * width], &alone[..], "{shape:?}");
        }
        // Overlapping row ranges are refused (the tasks would write the same rows).
        let overlapping = [seqs[0].clone(), AttentionSeq { rows: 0..2, ..seqs[1].clone() }];
        assert!(attention_batch(&q, total_rows, shape, &overlapping, &mut batched).is_err());
    }

    #[test]
    fn exp_and_log_sum_exp_are_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - exact).abs() / exact);
            x += 0.0137;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);

        let row = noise(5, 49_157).iter().map(|v| v * 20.0).collect::<Vec<f32>>();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&row) - exact).abs() < 1e-6, "{} vs {exact}", log_sum_exp(&row));
        let mut bad = row.clone();
        bad[1234] = f32::NAN;
        assert!(log_sum_exp(&bad).is_nan());
        bad[1234] = f32::INFINITY;
        assert!(log_sum_exp(&bad).is_nan());
        bad[1234] = f32::NEG_INFINITY;
        assert!(log_sum_exp(&bad).is_nan());
        // The same in the last, partial block (49_157 = 192 · 256 + 5) and in its last lane.
        for at in [49_153, 49_156] {
            for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut bad = row.clone();
                bad[at] = poison;
                assert!(log_sum_exp(&bad).is_nan(), "{poison} at {at}");
            }
        }
        assert!(log_sum_exp(&[f32::NAN; 40]).is_nan());
        assert!(log_sum_exp(&[f32::NEG_INFINITY; 40]).is_nan());
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        // Every build of the body gives the same bits.
        #[cfg(target_arch = "x86_64")]
        {
            let portable = log_sum_exp_body(&row);
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: AVX2 and FMA checked just above.
                assert_eq!(unsafe { log_sum_exp_fma(&row) }.to_bits(), portable.to_bits());
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: AVX-512 F, AVX2 (implied) and FMA checked just above.
                assert_eq!(unsafe { log_sum_exp_avx512(&row) }.to_bits(), portable.to_bits());
            }
        }
    }

    #[test]
    fn row_stats_equal_the_per_row_reductions() {
        let values = noise(77, 5 * 1000);
        let stats = row_stats(&values, 1000, 7).unwrap();
        assert_eq!(stats.len(), 5);
        for (r, s) in stats.iter().enumerate() {
            let row = &values[r * 1000..(r + 1) * 1000];
            assert_eq!(s.log_sum_exp.to_bits(), log_sum_exp(row).to_bits());
            assert_eq!(s.top, crate::top_k(row, 7));
        }
        assert!(row_stats(&values[..999], 1000, 3).is_err());
        assert!(row_stats(&values, 0, 3).is_err());
    }

    #[test]
    fn dot4_gives_the_bits_of_dot() {
        for n in [1usize, 7, 8, 64, 67] {
            let a = noise(40 + n as u64, n);
            let b = noise(50 + n as u64, 4 * (n + 3));
            let four = dot4(&a, &b, n + 3);
            for (r, &v) in four.iter().enumerate() {
                assert_eq!(v.to_bits(), dot(&a, &b[r * (n + 3)..r * (n + 3) + n]).to_bits(), "n {n} row {r}");
            }
        }
    }

    #[test]
    fn attention_rejects_bad_lengths() {
        let shape = AttentionShape { heads: 2, kv_heads: 1, head_dim: 4 };
        let k = vec![0.0f32; 4 * 4];
        let run = KvRun { k: &k, v: &k, capacity: 4, len: 3 };
        let q = vec![0.0f32; 8];
        let mut out = vec![0.0f32; 8];
        // 3 cached positions but past + n = 5.
        assert!(attention(&q, 1, shape, &[run], 4, &mut out).is_err());
        assert!(attention(&q, 1, AttentionShape { heads: 3, ..shape }, &[run], 2, &mut out).is_err());
        let bad_run = KvRun { len: 5, ..run };
        assert!(attention(&q, 1, shape, &[bad_run], 4, &mut out).is_err());
        assert!(attention(&q, 1, shape, &[run], 2, &mut out).is_ok());
    }

    #[test]
    fn rms_norm_rope_swiglu_match_formulas() {
        let x = noise(7, 2 * 8);
        let w = noise(8, 8);
        let mut out = vec![0.0f32; 16];
        rms_norm(&x, &w, 1e-5, &mut out).unwrap();
        for r in 0..2 {
            let row = &x[r * 8..(r + 1) * 8];
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 8.0 + 1e-5).sqrt();
            for i in 0..8 {
                assert!((out[r * 8 + i] - row[i] / rms * w[i]).abs() < 1e-5);
            }
        }
        assert!(rms_norm(&x[..15], &w, 1e-5, &mut out[..15]).is_err());

        // The fused residual add: the same bits as the add followed by `rms_norm`, on rows wide
        // enough for the vector paths (and a remainder); bad shapes are refused before writing.
        let (width, rows) = (576 + 5, 3);
        let (x, delta, w) = (noise(11, rows * width), noise(12, rows * width), noise(13, width));
        let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        let mut want = vec![0.0f32; rows * width];
        rms_norm(&sum, &w, 1e-6, &mut want).unwrap();
        let (mut fused, mut got) = (x.clone(), vec![0.0f32; rows * width]);
        add_rms_norm(&mut fused, &delta, &w, 1e-6, &mut got).unwrap();
        assert_eq!(fused, sum);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // The vector builds of a row's norm against the portable one: the same bits.
        let mut portable = vec![0.0f32; rows * width];
        for (row, out) in sum.chunks_exact(width).zip(portable.chunks_exact_mut(width)) {
            rms_norm_row_body(row, &w, 1e-6, out);
        }
        assert_eq!(
            portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut untouched = x.clone();
        assert!(add_rms_norm(&mut untouched, &delta[..width], &w, 1e-6, &mut got).is_err());
        assert!(
            add_rms_norm(&mut untouched[..width + 1], &delta[..width + 1], &w, 1e-6, &mut got[..width + 1]).is_err()
        );
        assert_eq!(untouched, x);

        // One row, two heads of width 4; angle table for one position.
        let mut q = noise(9, 8);
        let original = q.clone();
        let cos = [0.5f32, 0.25, 0.5, 0.25];
        let sin = [0.75f32, -0.5, 0.75, -0.5];
        rope(&mut q, 2, 4, &cos, &sin, 2.0).unwrap();
        for h in 0..2 {
            let o = &original[h * 4..h * 4 + 4];
            for i in 0..2 {
                let lo = (o[i] * cos[i] - o[i + 2] * sin[i]) * 2.0;
                let hi = (o[i + 2] * cos[i + 2] + o[i] * sin[i + 2]) * 2.0;
                assert!((q[h * 4 + i] - lo).abs() < 1e-6 && (q[h * 4 + i + 2] - hi).abs() < 1e-6);
            }
        }
        assert!(rope(&mut q, 2, 4, &cos[..2], &sin, 1.0).is_err());

        let mut gate = vec![-2.0f32, 0.0, 3.0];
        swiglu(&mut gate, &[1.0, 5.0, 2.0]).unwrap();
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert_eq!(gate, vec![silu(-2.0), 0.0, silu(3.0) * 2.0]);
        assert!(swiglu(&mut gate, &[1.0]).is_err());
    }
}
