//! Will the model fit? An estimate of what a load will hold, made before anything is read.
//!
//! A 7B checkpoint in bf16 is 15 GB; widened to f32 it would be 30 GB, and a machine that
//! runs out of memory half-way kills the process with no message. So [`crate::load_with`]
//! first adds up what the model will hold, as it will hold it — each linear weight in its
//! in-memory format (f32, 16-bit, or ggml blocks, after any quantisation at load), the
//! embedding table, the rotary tables, and the KV cache of one sequence at the configured
//! context — and compares the sum with the memory the system says is available (Linux:
//! `MemAvailable`, capped by a cgroup v2 `memory.max`) or with
//! [`LoadOptions::memory_limit`], whichever is less. Too much is a
//! [`ModelError::InsufficientMemory`] naming the numbers and the ways out. Elsewhere, or with
//! `MARCO_MEMORY_CHECK=off`, no check is made.

use crate::backend::LinearPath;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::{LoadOptions, QuantizeAtLoad, WeightSource};
use marco_backend_cpu::quant::{row_bytes, GgmlType};
use marco_backend_cpu::PackedMatrix;

/// The environment variable that turns the check off (`off`, `0` or `false`).
pub const MEMORY_CHECK_ENV: &str = "MARCO_MEMORY_CHECK";

/// What a model will hold in memory once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weights as held (linear layers, embedding table, norms, biases, rotary tables).
    pub weights: u64,
    /// The KV cache of one sequence at `context` tokens.
    pub kv: u64,
    /// The context the KV figure is for.
    pub context: usize,
    /// Work buffers of a forward pass (activations, logits), a small allowance.
    pub working: u64,
}

impl MemoryEstimate {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.working
    }
}

/// Bytes as GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The memory available to this process, where the platform says (Linux: `MemAvailable`, or
/// less when a cgroup v2 limit leaves less).
pub fn available_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let available_kib: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemAvailable:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())?;
        let mut available = available_kib.saturating_mul(1024);
        let read = |name: &str| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok().and_then(|s| s.trim().parse::<u64>().ok())
        };
        if let (Some(limit), Some(current)) = (read("memory.max"), read("memory.current")) {
            available = available.min(limit.saturating_sub(current));
        }
        Some(available)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Bytes a linear weight stored as `stored` (`None`: f32) occupies once loaded along `path`,
/// quantised at load as `quantize` asks.
fn linear_bytes(
    stored: Option<GgmlType>,
    out: usize,
    inp: usize,
    path: LinearPath,
    quantize: Option<QuantizeAtLoad>,
) -> u64 {
    let n = (out as u64).saturating_mul(inp as u64);
    if path == LinearPath::Burn {
        return 4 * n;
    }
    let stored = stored.unwrap_or(GgmlType::F32);
    let dense = matches!(stored, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    let target = match quantize {
        Some(format) if dense && inp.is_multiple_of(marco_backend_cpu::quant::QK) => format.ggml_type(),
        _ => stored,
    };
    match target {
        GgmlType::F16 | GgmlType::BF16 => 2 * n,
        ty if PackedMatrix::KEPT_QUANTIZED.contains(&ty) => {
            row_bytes(ty, inp).map_or(4 * n, |row| (row as u64).saturating_mul(out as u64))
        }
        _ => 4 * n,
    }
}

/// What loading `config` from `source` with `options` will hold (`kv_elem` bytes per cached
/// value; `embeds_from_linear_weight` as the backend says).
pub(crate) fn estimate(
    config: &ModelConfig,
    source: &dyn WeightSource,
    options: &LoadOptions,
    kv_elem: usize,
    embeds_from_linear_weight: bool,
) -> MemoryEstimate {
    let c = config;
    let h = c.hidden_size;
    let path = options.linear_path;
    let layer = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
    let linear = |name: &str, out: usize, inp: usize| {
        linear_bytes(source.stored_type(&format!("{name}.weight")), out, inp, path, options.quantize)
    };
    let mut weights = 0u64;
    for i in 0..c.num_layers {
        let attn = |p: &str| layer(i, &format!("self_attn.{p}"));
        let mlp = |p: &str| layer(i, &format!("mlp.{p}"));
        weights += linear(&attn("q_proj"), c.q_dim(), h)
            + 2 * linear(&attn("k_proj"), c.kv_dim(), h)
            + linear(&attn("o_proj"), h, c.q_dim())
            + 2 * linear(&mlp("gate_proj"), c.intermediate_size, h)
            + linear(&mlp("down_proj"), h, c.intermediate_size);
        // Norms and biases stay f32.
        let bias = if c.qkv_bias { c.q_dim() + 2 * c.kv_dim() } else { 0 };
        weights += 4 * (2 * h + bias) as u64;
    }
    weights += 4 * h as u64;
    let embed = "model.embed_tokens";
    let kernel_table = embeds_from_linear_weight && path != LinearPath::Burn;
    weights += if kernel_table { linear(embed, c.vocab_size, h) } else { 4 * (c.vocab_size as u64) * h as u64 };
    let shared_head = c.tie_word_embeddings && kernel_table;
    if !shared_head {
        let head = if c.tie_word_embeddings { embed } else { "lm_head" };
        weights += linear(head, c.vocab_size, h);
    }
    let context = c.max_position_embeddings;
    // Rotary cos and sin tables, f32.
    weights += 2 * 4 * (context as u64) * c.head_dim as u64;
    let kv = (context as u64) * (2 * c.num_layers * c.kv_dim() * kv_elem) as u64;
    // Activations of a step and the logits rows: small next to the weights; a fixed allowance
    // plus a share of the largest matrix's output keeps the estimate on the safe side.
    let working = (64u64 << 20) + 16 * 4 * (c.vocab_size.max(c.intermediate_size) as u64);
    MemoryEstimate { weights, kv, context, working }
}

/// Whether the user turned the check off.
fn check_disabled() -> bool {
    std::env::var(MEMORY_CHECK_ENV)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "off" | "0" | "false" | "no"))
        .unwrap_or(false)
}

/// Fails with [`ModelError::InsufficientMemory`] when `estimate` exceeds `available` (where
/// known), naming the numbers and the ways out.
pub(crate) fn check(
    origin: &std::path::Path,
    config: &ModelConfig,
    source: &dyn WeightSource,
    options: &LoadOptions,
    kv_elem: usize,
    embeds_from_linear_weight: bool,
) -> Result<()> {
    if !options.memory_check || check_disabled() {
        return Ok(());
    }
    let available = match (available_memory(), options.memory_limit) {
        (Some(system), Some(limit)) => system.min(limit),
        (system, limit) => match system.or(limit) {
            Some(available) => available,
            None => return Ok(()),
        },
    };
    let needed = estimate(config, source, options, kv_elem, embeds_from_linear_weight);
    if needed.total() <= available {
        return Ok(());
    }
    let mut ways = Vec::new();
    for format in [QuantizeAtLoad::Q8_0, QuantizeAtLoad::Q4_0] {
        if options.quantize.is_some_and(|q| q.bits_per_weight() <= format.bits_per_weight()) {
            continue;
        }
        let quantized = LoadOptions { quantize: Some(format), ..*options };
        let smaller = estimate(config, source, &quantized, kv_elem, embeds_from_linear_weight);
        if smaller.weights < needed.weights {
            ways.push(format!("--quantize {} (weights ~{})", format.name(), gib(smaller.weights)));
        }
    }
    let per_4k = needed.kv / needed.context.max(1) as u64 * 4096;
    if needed.context > 4096 {
        ways.push(format!("a shorter context, e.g. --max-context 4096 (KV ~{})", gib(per_4k)));
    }
    ways.push(format!("{MEMORY_CHECK_ENV}=off to load anyway"));
    Err(ModelError::InsufficientMemory {
        path: origin.to_path_buf(),
        needed: needed.total(),
        available,
        detail: format!(
            "weights {} + KV {} for {} tokens + working {}",
            gib(needed.weights),
            gib(needed.kv),
            needed.context,
            gib(needed.working)
        ),
        ways: ways.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_sizes_follow_the_format_held() {
        let (out, inp) = (64usize, 128usize);
        let n = (out * inp) as u64;
        let k = LinearPath::Kernel;
        assert_eq!(linear_bytes(None, out, inp, k, None), 4 * n);
        assert_eq!(linear_bytes(Some(GgmlType::BF16), out, inp, k, None), 2 * n);
        assert_eq!(linear_bytes(Some(GgmlType::BF16), out, inp, LinearPath::Burn, None), 4 * n);
        assert_eq!(linear_bytes(Some(GgmlType::BF16), out, inp, k, Some(QuantizeAtLoad::Q8_0)), n / 32 * 34);
        assert_eq!(linear_bytes(Some(GgmlType::F32), out, inp, k, Some(QuantizeAtLoad::Q4_0)), n / 32 * 18);
        // Already quantised weights are kept as they are, whatever the option.
        assert_eq!(linear_bytes(Some(GgmlType::Q4_1), out, inp, k, Some(QuantizeAtLoad::Q8_0)), n / 32 * 20);
        // A type without a fused kernel is widened.
        assert_eq!(linear_bytes(Some(GgmlType::Q5_0), out, inp, k, None), 4 * n);
        // Rows that are not whole blocks are not quantised.
        assert_eq!(linear_bytes(Some(GgmlType::BF16), 2, 33, k, Some(QuantizeAtLoad::Q8_0)), 2 * 66);
    }

    #[test]
    fn gib_reads_well() {
        assert_eq!(gib(3 << 29), "1.50 GiB");
    }
}
