//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.
//!
//! [`ModelConfig`] is the one description the network is built from; two front ends fill it:
//! [`ModelConfig::from_hf_json`] (both the transformers-4 form, with a top-level `rope_theta`
//! and `torch_dtype`, and the transformers-5 form, with `rope_parameters.rope_theta` and
//! `dtype`) and [`ModelConfig::from_gguf`] (the `llama.*` / `qwen2.*` metadata keys).
//! Features marco does not implement (rope scaling, sliding windows) are rejected rather than
//! silently ignored, since ignoring them would produce a model that runs but computes the
//! wrong function.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The architectures marco implements: the Llama family as these checkpoints use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama (and SmolLM2): no attention biases; in GGUF, q/k rows are permuted for
    /// interleaved rotary embeddings.
    Llama,
    /// Qwen2 (and Marco-o1): biases on q, k and v.
    Qwen2,
    /// Mistral without a sliding window: the Llama network.
    Mistral,
}

impl Architecture {
    /// Parses an architecture name as `config.json` (`LlamaForCausalLM`, `llama`) or GGUF
    /// (`general.architecture`) spells it.
    pub fn parse(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let stem = lower.strip_suffix("forcausallm").unwrap_or(&lower);
        match stem {
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "mistral" => Some(Architecture::Mistral),
            _ => None,
        }
    }

    /// Whether q, k and v projections carry a bias by default.
    pub fn default_qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2)
    }

    /// The GGUF metadata prefix of the architecture (`llama`, `qwen2`).
    pub fn gguf_prefix(self) -> &'static str {
        match self {
            Architecture::Llama | Architecture::Mistral => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// The precision of the rotary embedding's inverse frequencies.
///
/// transformers keeps `inv_freq` as a buffer in the checkpoint's dtype, so a bf16 checkpoint
/// rotates by bf16-rounded frequencies even when it computes in f32 (the `tiny-qwen2` oracle
/// shows it: with f32 frequencies its logits drift by ~1e-3 after a few positions, with
/// bf16-rounded ones they agree to ~1e-5). marco reproduces this for Hugging Face checkpoints;
/// llama.cpp computes them in f32, so GGUF models use [`RopeFreqRounding::None`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeFreqRounding {
    /// f32 frequencies.
    #[default]
    None,
    /// Frequencies rounded to bfloat16.
    Bf16,
    /// Frequencies rounded to float16.
    F16,
}

impl RopeFreqRounding {
    /// From a `config.json` dtype name (`bfloat16`, `float16`, `float32`, ...).
    pub fn from_dtype_name(name: Option<&str>) -> Self {
        match name {
            Some("bfloat16") | Some("bf16") => RopeFreqRounding::Bf16,
            Some("float16") | Some("f16") | Some("half") => RopeFreqRounding::F16,
            _ => RopeFreqRounding::None,
        }
    }

    /// Rounds one frequency.
    pub fn round(self, frequency: f32) -> f32 {
        match self {
            RopeFreqRounding::None => frequency,
            RopeFreqRounding::Bf16 => half::bf16::from_f32(frequency).to_f32(),
            RopeFreqRounding::F16 => half::f16::from_f32(frequency).to_f32(),
        }
    }
}

/// Everything the network's shape and arithmetic depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Rows of the embedding table (and of the output head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f32,
    /// Precision of the rotary frequencies (see [`RopeFreqRounding`]).
    pub rope_freq_rounding: RopeFreqRounding,
    /// The longest sequence the model supports (its context window).
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v projections carry a bias.
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Bytes of KV cache one token occupies, in f32, over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Checks that the values are usable (non-zero, divisible head counts, finite floats).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |reason: String| Err(ModelError::InvalidConfig { path: path.to_path_buf(), reason });
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return invalid(format!("{name} must be > 0"));
            }
            if value > (1 << 24) {
                return invalid(format!("{name} = {value} is implausibly large"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return invalid(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return invalid(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return invalid(format!("rms_norm_eps = {} is not a finite non-negative number", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return invalid(format!("rope_theta = {} is not a finite positive number", self.rope_theta));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of a Hugging Face `config.json`; `path` names it in errors.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::corrupt(path, e.to_string()))?;
        raw.into_config(path)
    }

    /// Reads the hyper-parameters from GGUF metadata (`general.architecture`, then the
    /// `<arch>.*` keys llama.cpp writes).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path().to_path_buf();
        let arch_name = file.architecture()?;
        let architecture = Architecture::parse(arch_name).ok_or_else(|| ModelError::UnknownArchitecture {
            path: path.clone(),
            architecture: arch_name.to_string(),
        })?;
        let key = |name: &str| format!("{}.{name}", architecture.gguf_prefix());
        let missing = |name: &str| ModelError::InvalidConfig {
            path: path.clone(),
            reason: format!("metadata key {} is missing or not a number", key(name)),
        };
        let optional_usize = |name: &str| -> Result<Option<usize>> {
            match file.get_u64(&key(name)) {
                None => Ok(None),
                Some(value) => usize::try_from(value).map(Some).map_err(|_| ModelError::InvalidConfig {
                    path: path.clone(),
                    reason: format!("{} = {value} does not fit in usize", key(name)),
                }),
            }
        };
        let required_usize = |name: &str| -> Result<usize> { optional_usize(name)?.ok_or_else(|| missing(name)) };
        let hidden_size = required_usize("embedding_length")?;
        let num_heads = required_usize("attention.head_count")?;
        let num_kv_heads = optional_usize("attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim =
            optional_usize("attention.key_length")?.unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let rope_theta = file.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0);
        let rms_norm_eps = file
            .get_f32(&key("attention.layer_norm_rms_epsilon"))
            .ok_or_else(|| missing("attention.layer_norm_rms_epsilon"))?;
        let embedding = file.tensor_info("token_embd.weight")?;
        // ggml lists the fastest-varying dimension first: [hidden, vocab].
        let vocab_size = match embedding.dims.as_slice() {
            [_, vocab] => usize::try_from(*vocab).unwrap_or(0),
            _ => 0,
        };
        let tie_word_embeddings = !file.tensors().iter().any(|t| t.name == "output.weight");
        let qkv_bias = file.tensors().iter().any(|t| t.name == "blk.0.attn_q.bias");
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: required_usize("feed_forward_length")?,
            num_layers: required_usize("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_freq_rounding: RopeFreqRounding::None,
            max_position_embeddings: required_usize("context_length")?,
            tie_word_embeddings,
            qkv_bias,
        };
        config.validate(&path)?;
        Ok(config)
    }
}

/// The fields of a Hugging Face `config.json` that marco reads (transformers 4 and 5).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f32,
    /// transformers 4.
    #[serde(default)]
    rope_theta: Option<f32>,
    /// transformers 5.
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    /// transformers 4 spelling of rope variants (must be absent or default).
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    /// transformers 4 (`torch_dtype`) or 5 (`dtype`): weights carry their own dtype, this one
    /// sets the precision of the rotary frequencies.
    #[serde(default, alias = "torch_dtype")]
    dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_theta: Option<f32>,
    #[serde(default)]
    rope_type: Option<String>,
}

fn default_rms_eps() -> f32 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

impl HfConfig {
    fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let invalid = |reason: String| ModelError::InvalidConfig { path: path.to_path_buf(), reason };
        let name = self.architectures.first().cloned().or_else(|| self.model_type.clone()).unwrap_or_default();
        let architecture = Architecture::parse(&name)
            .or_else(|| self.model_type.as_deref().and_then(Architecture::parse))
            .ok_or_else(|| ModelError::UnknownArchitecture { path: path.to_path_buf(), architecture: name.clone() })?;
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" && act != "swish" {
                return Err(invalid(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        if self.use_sliding_window {
            return Err(invalid("use_sliding_window = true is not supported".into()));
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(invalid(format!("rope_scaling {scaling} is not supported")));
            }
        }
        if let Some(rope_type) = self.rope_parameters.as_ref().and_then(|p| p.rope_type.as_deref()) {
            if rope_type != "default" {
                return Err(invalid(format!("rope_type {rope_type:?} is not supported")));
            }
        }
        let rope_theta =
            self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0);
        // A zero head count is refused by `validate`; 0 here only carries the error there.
        let head_dim = self.head_dim.unwrap_or(self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0));
        let config = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_freq_rounding: RopeFreqRounding::from_dtype_name(self.dtype.as_deref()),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias.unwrap_or(architecture.default_qkv_bias()),
        };
        config.validate(path)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = r#"{"architectures":["Qwen2ForCausalLM"],"dtype":"bfloat16","hidden_size":64,
        "intermediate_size":160,"max_position_embeddings":512,"model_type":"qwen2","num_attention_heads":4,
        "num_hidden_layers":3,"num_key_value_heads":2,"rms_norm_eps":1e-06,
        "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"tie_word_embeddings":false,
        "use_sliding_window":false,"vocab_size":1024}"#;

    const V4: &str = r#"{"architectures":["Qwen2ForCausalLM"],"torch_dtype":"bfloat16","hidden_size":3584,
        "intermediate_size":18944,"max_position_embeddings":32768,"model_type":"qwen2","num_attention_heads":28,
        "num_hidden_layers":28,"num_key_value_heads":4,"rms_norm_eps":1e-06,"rope_theta":1000000.0,
        "rope_scaling":null,"sliding_window":131072,"tie_word_embeddings":false,"use_sliding_window":false,
        "vocab_size":152064}"#;

    #[test]
    fn reads_transformers_5_form() {
        let c = ModelConfig::from_hf_json(V5, Path::new("config.json")).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
        assert!(c.qkv_bias && !c.tie_word_embeddings);
        assert_eq!(c.rope_freq_rounding, RopeFreqRounding::Bf16);
    }

    #[test]
    fn reads_transformers_4_form() {
        let c = ModelConfig::from_hf_json(V4, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!((c.hidden_size, c.head_dim, c.num_kv_heads), (3584, 128, 4));
        assert_eq!(c.rope_freq_rounding, RopeFreqRounding::Bf16);
    }

    #[test]
    fn unknown_architecture_is_a_typed_error() {
        let text = V5.replace("Qwen2ForCausalLM", "GPT2LMHeadModel").replace("\"qwen2\"", "\"gpt2\"");
        match ModelConfig::from_hf_json(&text, Path::new("x/config.json")) {
            Err(ModelError::UnknownArchitecture { architecture, .. }) => assert_eq!(architecture, "GPT2LMHeadModel"),
            other => panic!("expected UnknownArchitecture, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        let text = V5.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(matches!(ModelConfig::from_hf_json(&text, Path::new("c")), Err(ModelError::InvalidConfig { .. })));
        let text = V5.replace("\"num_attention_heads\":4", "\"num_attention_heads\":0");
        assert!(matches!(ModelConfig::from_hf_json(&text, Path::new("c")), Err(ModelError::InvalidConfig { .. })));
        assert!(matches!(ModelConfig::from_hf_json("{", Path::new("c")), Err(ModelError::Corrupt { .. })));
        let text = V5.replace("\"rope_type\":\"default\"", "\"rope_type\":\"llama3\"");
        assert!(matches!(ModelConfig::from_hf_json(&text, Path::new("c")), Err(ModelError::InvalidConfig { .. })));
    }
}
