//! Converting a Hugging Face checkpoint directory to one GGUF file that marco and llama.cpp
//! both load ("convert once"), streaming, tensor by tensor.
//!
//! Design:
//! - **What llama.cpp's `convert_hf_to_gguf.py` writes**, so llama.cpp loads the file as a
//!   normal model: the same architecture names (`qwen2`, `llama` for Llama and Mistral), the
//!   same metadata keys and value types (llama.cpp checks types: counts are `u32`, floats
//!   `f32`, token types an `i32` array, merges a *string* array even when empty), the same
//!   tensor names, and the same layout of q/k rows: for Llama-family models llama.cpp's
//!   `norm` rope rotates adjacent pairs, so the converter interleaves each head's two halves
//!   (stored row `2i + j` of a head is Hugging Face row `j * head_dim / 2 + i`), which
//!   [`crate::loader::GgufWeights`] undoes on load. Qwen2 uses `neox` rope: no permutation.
//! - **Tensor types** as the converter picks them: 1-D tensors (norms, biases) stay F32;
//!   matrices (the embedding and output head included) take the target type when their rows
//!   are whole blocks, else F16. Q4_0 is applied to every matrix, like `llama-quantize
//!   --pure` (plain `llama-quantize` would keep the output head in Q6_K); the quantizers are
//!   bit-exact with ggml's reference ones ([`marco_formats::quant`]).
//! - **Everything is checked before the output exists**: the config, the tokenizer, every
//!   shard's header (a truncated shard fails here), and every tensor's presence, shape and
//!   dtype, since the GGUF header must declare all tensors (with sizes) before any data.
//! - **Streaming**: tensors are converted one at a time into a [`GgufStreamWriter`]; after
//!   each, its source pages are given back to the kernel (`MADV_DONTNEED` on the read-only
//!   map), so the resident set stays near one tensor's output rather than the whole
//!   checkpoint. Within a tensor, rows are widened to f32 and encoded in chunks, on all cores.
//!   The writer fills `<out>.partial` and renames it on success; on any error the partial
//!   file is deleted and an existing `<out>` is left as it was.
//! - **Tokenizer**: `tokenizer.json`'s vocabulary (ids kept, gaps up to the model's
//!   `vocab_size` padded with `[PAD{id}]` as llama.cpp does), its merges, and token types
//!   (added special tokens and `<|...|>` ones are control tokens, other added ones
//!   user-defined); special ids, `add_bos_token` and the chat template from
//!   `tokenizer_config.json` / `config.json` as llama.cpp's `SpecialVocab` reads them. Only
//!   byte-level BPE is written (`tokenizer.ggml.model = "gpt2"`, the only GGUF vocabulary
//!   marco reads), with the pre-tokenizer name derived from the tokenizer's own structure
//!   ([`gguf_pre_tokenizer_name`]); an unknown one is an error, since a guess would tokenize
//!   differently without saying so. A word-level vocabulary (the random-weight test
//!   checkpoints) is written as BPE without merges under the `default` pre-tokenizer: ids
//!   and token texts survive, text encoding does not (a warning says so).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::{bf16, f16};
use safetensors::tensor::Dtype;
use serde_json::Value as Json;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::loader::{HfWeights, WeightSource};
use marco_formats::gguf::{GgufStreamWriter, GgufTensorDesc, GgufValue};
use marco_formats::quant::{self, GgmlType};
use marco_formats::tokenizer::gguf_pre_tokenizer_name;

/// The type a conversion stores its matrices in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConvertTarget {
    /// IEEE binary32 (lossless from any source dtype; four bytes a weight).
    F32,
    /// IEEE binary16, rounded to nearest even (lossless from an f16 checkpoint).
    F16,
    /// bfloat16 (lossless from a bf16 checkpoint).
    Bf16,
    /// ggml's Q8_0: blocks of 32 weights with one f16 scale (8.5 bits a weight).
    Q8_0,
    /// ggml's Q4_0: blocks of 32 weights with one f16 scale (4.5 bits a weight).
    Q4_0,
}

impl ConvertTarget {
    /// Every target, in the order of [`name`](Self::name)'s list.
    pub const ALL: [ConvertTarget; 5] =
        [ConvertTarget::F32, ConvertTarget::F16, ConvertTarget::Bf16, ConvertTarget::Q8_0, ConvertTarget::Q4_0];

    /// The ggml type of the matrices (when their rows are whole blocks of it).
    pub fn ggml_type(self) -> GgmlType {
        match self {
            ConvertTarget::F32 => GgmlType::F32,
            ConvertTarget::F16 => GgmlType::F16,
            ConvertTarget::Bf16 => GgmlType::BF16,
            ConvertTarget::Q8_0 => GgmlType::Q8_0,
            ConvertTarget::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` for the target (`LlamaFileType`: `ALL_F32` = 0,
    /// `MOSTLY_F16` = 1, `MOSTLY_Q4_0` = 2, `MOSTLY_Q8_0` = 7, `MOSTLY_BF16` = 32).
    pub fn file_type(self) -> u32 {
        match self {
            ConvertTarget::F32 => 0,
            ConvertTarget::F16 => 1,
            ConvertTarget::Q4_0 => 2,
            ConvertTarget::Q8_0 => 7,
            ConvertTarget::Bf16 => 32,
        }
    }

    /// The name [`FromStr`](std::str::FromStr) accepts: `f32`, `f16`, `bf16`, `q8_0`, `q4_0`.
    pub fn name(self) -> &'static str {
        match self {
            ConvertTarget::F32 => "f32",
            ConvertTarget::F16 => "f16",
            ConvertTarget::Bf16 => "bf16",
            ConvertTarget::Q8_0 => "q8_0",
            ConvertTarget::Q4_0 => "q4_0",
        }
    }
}

impl std::fmt::Display for ConvertTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ConvertTarget {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        ConvertTarget::ALL.into_iter().find(|t| t.name() == lower).ok_or_else(|| ModelError::InvalidConfig {
            path: "--to".into(),
            reason: format!("unknown target `{s}` (supported: f32, f16, bf16, q8_0, q4_0)"),
        })
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// Tensors in the file.
    pub tensors: usize,
    /// Length of the file in bytes.
    pub bytes_written: u64,
    /// Wall-clock time of the whole conversion.
    pub seconds: f64,
    /// The file written.
    pub output: PathBuf,
}

/// One converted tensor, as reported to the progress callback of [`convert_hf_dir_with`].
#[derive(Debug, Clone, Copy)]
pub struct TensorProgress<'a> {
    /// Position of the tensor in the file (0-based).
    pub index: usize,
    /// Tensors in the file.
    pub total: usize,
    /// The tensor's GGUF name.
    pub name: &'a str,
    /// The type it was stored in.
    pub ggml_type: GgmlType,
    /// Bytes of its stored data.
    pub bytes: u64,
}

/// Converts the Hugging Face checkpoint in `dir` (`config.json`, `tokenizer.json`,
/// safetensors single or sharded) to a GGUF file at `out`, with matrices in `target`.
///
/// Errors (nothing is left at `out`, nor at `<out>.partial`, and an existing `out` is kept):
/// the configuration's ([`ModelError::InvalidConfig`], [`ModelError::UnknownArchitecture`]),
/// the tokenizer's ([`ModelError::Tokenizer`] for a vocabulary or pre-tokenizer that cannot
/// be written, [`ModelError::VocabMismatch`]), the weights' ([`ModelError::Truncated`] for a
/// cut shard, [`ModelError::Corrupt`], [`ModelError::MissingTensor`],
/// [`ModelError::ShapeMismatch`], [`ModelError::UnsupportedDtype`]) and [`ModelError::Io`].
pub fn convert_hf_dir(dir: &Path, out: &Path, target: ConvertTarget) -> Result<ConvertReport> {
    convert_hf_dir_with(dir, out, target, |_| {})
}

/// [`convert_hf_dir`], calling `progress` after each tensor is written.
pub fn convert_hf_dir_with(
    dir: &Path,
    out: &Path,
    target: ConvertTarget,
    mut progress: impl FnMut(TensorProgress<'_>),
) -> Result<ConvertReport> {
    let started = Instant::now();
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_hf_file(&config_path)?;
    let raw_config = read_json(&config_path)?;
    let checkpoint = HfWeights::open(dir)?;
    let plan = plan_tensors(&checkpoint, &config, target)?;
    let mut metadata = model_metadata(dir, &config, &raw_config, target);
    metadata.extend(tokenizer_metadata(dir, &config, &raw_config)?);

    let descs: Vec<GgufTensorDesc> = plan.iter().map(|t| t.desc.clone()).collect();
    let mut writer = GgufStreamWriter::create(out, &metadata, descs)?;
    let total = plan.len();
    for (index, tensor) in plan.iter().enumerate() {
        let data = encode_tensor(tensor)?;
        writer.write_tensor(&tensor.desc.name, &data)?;
        let bytes = data.len() as u64;
        drop(data);
        // The source's pages were read once; keep them out of this process's resident set.
        checkpoint.release(&tensor.source.name);
        progress(TensorProgress { index, total, name: &tensor.desc.name, ggml_type: tensor.desc.ggml_type, bytes });
    }
    let bytes_written = writer.finish()?;
    Ok(ConvertReport { tensors: total, bytes_written, seconds: started.elapsed().as_secs_f64(), output: out.into() })
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::corrupt(path, format!("invalid JSON: {e}")))
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).map(Some).map_err(|e| ModelError::corrupt(path, format!("invalid JSON: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Safetensors

/// A tensor's stored bytes (borrowed from the checkpoint's map), with its dtype and shape.
struct SourceTensor<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

/// The tensor `name` of `checkpoint`, checked to have shape `expected` and a float dtype.
fn source_tensor<'a>(checkpoint: &'a HfWeights, name: &str, expected: &[usize]) -> Result<SourceTensor<'a>> {
    let (dtype, bytes) = checkpoint.stored(name, expected)?;
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(ModelError::UnsupportedDtype {
            path: checkpoint.origin().to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("{dtype:?}"),
        });
    }
    Ok(SourceTensor { name: name.to_string(), dtype, shape: expected.to_vec(), bytes })
}

// ---------------------------------------------------------------------------------------------
// The tensor plan

/// One tensor of the output: what it is called and stored as, where it comes from, and
/// whether its rows are interleaved for llama.cpp's rope.
struct PlannedTensor<'a> {
    desc: GgufTensorDesc,
    source: SourceTensor<'a>,
    /// For q/k of Llama-family models: the head count whose rows are interleaved.
    permute_heads: Option<usize>,
}

/// Every output tensor in llama.cpp's order, each source checked for presence, shape and
/// dtype.
fn plan_tensors<'a>(
    checkpoint: &'a HfWeights,
    config: &ModelConfig,
    target: ConvertTarget,
) -> Result<Vec<PlannedTensor<'a>>> {
    let (hidden, q_dim, kv_dim) = (config.hidden_size, config.q_dim(), config.kv_dim());
    let permute = matches!(config.architecture, Architecture::Llama | Architecture::Mistral);
    let (q_heads, kv_heads) = if permute { (Some(config.num_heads), Some(config.num_kv_heads)) } else { (None, None) };
    // (Hugging Face name, GGUF name, shape, permuted heads)
    let mut entries: Vec<(String, String, Vec<usize>, Option<usize>)> = Vec::new();
    let mut add = |hf: String, gguf: String, shape: &[usize], heads: Option<usize>| {
        entries.push((hf, gguf, shape.to_vec(), heads));
    };
    add("model.embed_tokens.weight".into(), "token_embd.weight".into(), &[config.vocab_size, hidden], None);
    for layer in 0..config.num_layers {
        let hf = |module: &str| format!("model.layers.{layer}.{module}");
        let gguf = |short: &str| format!("blk.{layer}.{short}");
        add(hf("input_layernorm.weight"), gguf("attn_norm.weight"), &[hidden], None);
        for (proj, short, rows, heads) in [
            ("q_proj", "attn_q", q_dim, q_heads),
            ("k_proj", "attn_k", kv_dim, kv_heads),
            ("v_proj", "attn_v", kv_dim, None),
        ] {
            add(hf(&format!("self_attn.{proj}.weight")), gguf(&format!("{short}.weight")), &[rows, hidden], heads);
            if config.qkv_bias {
                add(hf(&format!("self_attn.{proj}.bias")), gguf(&format!("{short}.bias")), &[rows], heads);
            }
        }
        add(hf("self_attn.o_proj.weight"), gguf("attn_output.weight"), &[hidden, q_dim], None);
        add(hf("post_attention_layernorm.weight"), gguf("ffn_norm.weight"), &[hidden], None);
        let inter = config.intermediate_size;
        add(hf("mlp.gate_proj.weight"), gguf("ffn_gate.weight"), &[inter, hidden], None);
        add(hf("mlp.up_proj.weight"), gguf("ffn_up.weight"), &[inter, hidden], None);
        add(hf("mlp.down_proj.weight"), gguf("ffn_down.weight"), &[hidden, inter], None);
    }
    add("model.norm.weight".into(), "output_norm.weight".into(), &[hidden], None);
    if !config.tie_word_embeddings {
        add("lm_head.weight".into(), "output.weight".into(), &[config.vocab_size, hidden], None);
    }

    let mut plan = Vec::with_capacity(entries.len());
    for (hf_name, gguf_name, shape, permute_heads) in entries {
        let source = source_tensor(checkpoint, &hf_name, &shape)?;
        if let Some(heads) = permute_heads {
            let rows = shape[0];
            if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
                return Err(ModelError::InvalidConfig {
                    path: checkpoint.origin().join("config.json"),
                    reason: format!("{hf_name}: {rows} rows do not split into {heads} heads of even width"),
                });
            }
        }
        plan.push(PlannedTensor {
            desc: GgufTensorDesc::from_shape(gguf_name, &shape, storage_type(&shape, target)),
            source,
            permute_heads,
        });
    }
    Ok(plan)
}

/// The type a tensor of `shape` is stored in: F32 for vectors; for matrices the target's,
/// or F16 when a row is not a whole number of its blocks (what llama.cpp's converter falls
/// back to).
fn storage_type(shape: &[usize], target: ConvertTarget) -> GgmlType {
    let ty = target.ggml_type();
    match shape {
        [_, row] if row.is_multiple_of(ty.block_size()) => ty,
        [_, _] => GgmlType::F16,
        _ => GgmlType::F32,
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Elements widened to f32 at a time per chunk (a few MiB of scratch per thread).
const CHUNK_ELEMENTS: usize = 1 << 20;

/// The stored bytes of `tensor`: rows read in output order (through the q/k interleaving),
/// widened to f32 and encoded, in row chunks on all cores.
fn encode_tensor(tensor: &PlannedTensor<'_>) -> Result<Vec<u8>> {
    let shape = &tensor.source.shape;
    // Matrices go row by row; a vector is a column of one-element rows (so a bias can be
    // interleaved like the rows of its matrix).
    let (rows, row_len) = match shape.as_slice() {
        [rows, row_len] => (*rows, *row_len),
        _ => (shape.iter().product(), 1),
    };
    let ty = tensor.desc.ggml_type;
    let out_row = quant::row_bytes(ty, row_len)?;
    let mut out = vec![0u8; rows * out_row];
    let rows_per_chunk = (CHUNK_ELEMENTS / row_len.max(1)).max(1);
    let source = tensor.source.bytes;
    let dtype = tensor.source.dtype;
    let in_row = row_len * if dtype == Dtype::F32 { 4 } else { 2 };
    let heads = tensor.permute_heads;

    let encode_chunk = |chunk_index: usize, out_chunk: &mut [u8]| -> Result<()> {
        let first = chunk_index * rows_per_chunk;
        let count = out_chunk.len() / out_row;
        let mut values = vec![0.0f32; count * row_len];
        for (r, dst) in values.chunks_exact_mut(row_len).enumerate() {
            let src = source_row(first + r, rows, heads);
            widen(dtype, &source[src * in_row..(src + 1) * in_row], dst);
        }
        Ok(quant::quantize_into(ty, &values, out_chunk)?)
    };

    let chunk_bytes = rows_per_chunk * out_row;
    let chunks = out.len().div_ceil(chunk_bytes.max(1));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunks);
    if threads <= 1 {
        for (index, chunk) in out.chunks_mut(chunk_bytes.max(1)).enumerate() {
            encode_chunk(index, chunk)?;
        }
        return Ok(out);
    }
    let per_thread = chunks.div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = out
            .chunks_mut(per_thread * chunk_bytes)
            .enumerate()
            .map(|(t, part)| {
                let encode_chunk = &encode_chunk;
                scope.spawn(move || -> Result<()> {
                    for (index, chunk) in part.chunks_mut(chunk_bytes).enumerate() {
                        encode_chunk(t * per_thread + index, chunk)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(result) => result?,
                // Encoding does not panic on any input; if it did, report it where it began.
                Err(payload) => std::panic::resume_unwind(payload),
            }
        }
        Ok::<(), ModelError>(())
    })?;
    Ok(out)
}

/// The Hugging Face row stored at row `row` of a tensor with `rows` rows: itself, or for
/// llama.cpp's interleaved q/k (`heads` given) row `j * head_dim / 2 + i` of the same head,
/// where `row = 2i + j` within the head (the inverse of `unpermute_rows` in the loader).
fn source_row(row: usize, rows: usize, heads: Option<usize>) -> usize {
    match heads {
        Some(heads) => {
            let head_dim = rows / heads;
            let (head, within) = (row / head_dim, row % head_dim);
            head * head_dim + (within % 2) * (head_dim / 2) + within / 2
        }
        None => row,
    }
}

/// Widens little-endian `bytes` of `dtype` (F32, F16 or BF16, checked at planning) into `out`.
fn widen(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

/// `general.*` and `<arch>.*`, as llama.cpp's converter writes them for this architecture.
fn model_metadata(
    dir: &Path,
    config: &ModelConfig,
    raw_config: &Json,
    target: ConvertTarget,
) -> Vec<(String, GgufValue)> {
    let arch = config.architecture.gguf_prefix();
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    // `validate` bounded every size by 2^24, so they fit u32.
    let u32_of = |v: usize| GgufValue::U32(v as u32);
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::String(arch.into())),
        ("general.type".into(), GgufValue::String("model".into())),
        ("general.name".into(), GgufValue::String(name)),
        (format!("{arch}.block_count"), u32_of(config.num_layers)),
        (format!("{arch}.context_length"), u32_of(config.max_position_embeddings)),
        (format!("{arch}.embedding_length"), u32_of(config.hidden_size)),
        (format!("{arch}.feed_forward_length"), u32_of(config.intermediate_size)),
        (format!("{arch}.attention.head_count"), u32_of(config.num_heads)),
        (format!("{arch}.attention.head_count_kv"), u32_of(config.num_kv_heads)),
        (format!("{arch}.rope.freq_base"), GgufValue::F32(config.rope_theta)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), GgufValue::F32(config.rms_norm_eps)),
    ];
    // Written when config.json names a head width (as llama.cpp does), or when it differs from
    // hidden / heads (readers would otherwise derive the wrong one).
    if raw_config.get("head_dim").is_some_and(|v| !v.is_null())
        || config.head_dim * config.num_heads != config.hidden_size
    {
        m.push((format!("{arch}.attention.key_length"), u32_of(config.head_dim)));
        m.push((format!("{arch}.attention.value_length"), u32_of(config.head_dim)));
    }
    m.push(("general.file_type".into(), GgufValue::U32(target.file_type())));
    if arch == "llama" {
        m.push(("llama.vocab_size".into(), u32_of(config.vocab_size)));
        m.push(("llama.rope.dimension_count".into(), u32_of(config.head_dim)));
    }
    m.push(("general.quantization_version".into(), GgufValue::U32(2)));
    m
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Whether an added token that is not marked special should still be a control token
/// (llama.cpp's `does_token_look_special`).
fn looks_special(text: &str) -> bool {
    matches!(text, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (text.starts_with("<|") && text.ends_with("|>"))
        || (text.starts_with("<｜") && text.ends_with("｜>"))
        || (text.starts_with("<unused") && text.ends_with('>'))
}

/// A special token's text in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_text(value: &Json) -> Option<&str> {
    match value {
        Json::String(s) => Some(s),
        Json::Object(map) => map.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// `tokenizer.*`: the vocabulary, merges, token types, special ids, `add_bos_token` and the
/// chat template.
fn tokenizer_metadata(dir: &Path, config: &ModelConfig, raw_config: &Json) -> Result<Vec<(String, GgufValue)>> {
    let path = dir.join("tokenizer.json");
    let json = read_json(&path)?;
    let tokenizer_error = |reason: String| ModelError::Tokenizer(format!("{}: {reason}", path.display()));
    let model = json.get("model").ok_or_else(|| tokenizer_error("no model object".into()))?;
    let model_type = model.get("type").and_then(Json::as_str).unwrap_or_default();
    let pre = match model_type {
        "BPE" => {
            if model.get("byte_fallback").and_then(Json::as_bool).unwrap_or(false) {
                return Err(tokenizer_error(
                    "a byte-fallback (SentencePiece-style) BPE vocabulary cannot be written as GGUF byte-level BPE"
                        .into(),
                ));
            }
            let pre_tokenizer = json.get("pre_tokenizer").unwrap_or(&Json::Null);
            gguf_pre_tokenizer_name(pre_tokenizer).ok_or_else(|| {
                tokenizer_error(format!(
                    "pre-tokenizer {pre_tokenizer} is not one llama.cpp and marco both know \
                     (GPT-2 byte level, SmolLM2, Qwen2, Llama 3)"
                ))
            })?
        }
        "WordLevel" => {
            tracing::warn!(
                "{}: a word-level vocabulary is written as byte-level BPE without merges: token ids and texts are \
                 kept, but the GGUF tokenizer will not split text as this one does",
                path.display()
            );
            "default"
        }
        other => return Err(tokenizer_error(format!("tokenizer model {other:?} is not supported (BPE is)"))),
    };

    let vocab_size = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_NORMAL; vocab_size];
    let mut place = |id: u64, text: String, kind: i32| -> Result<()> {
        let slot = usize::try_from(id).ok().filter(|&i| i < vocab_size).ok_or_else(|| ModelError::VocabMismatch {
            path: path.clone(),
            tokenizer: usize::try_from(id).unwrap_or(usize::MAX).saturating_add(1),
            model: vocab_size,
        })?;
        tokens[slot] = Some(text);
        types[slot] = kind;
        Ok(())
    };
    let vocab = model.get("vocab").and_then(Json::as_object).ok_or_else(|| tokenizer_error("no model.vocab".into()))?;
    for (text, id) in vocab {
        let id = id.as_u64().ok_or_else(|| tokenizer_error(format!("vocab[{text:?}] is not an id")))?;
        place(id, text.clone(), TOKEN_NORMAL)?;
    }
    let added = json.get("added_tokens").and_then(Json::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut added_ids: HashMap<&str, u64> = HashMap::new();
    for token in added {
        let (Some(id), Some(content)) =
            (token.get("id").and_then(Json::as_u64), token.get("content").and_then(Json::as_str))
        else {
            return Err(tokenizer_error(format!("added token {token} has no id or content")));
        };
        added_ids.entry(content).or_insert(id);
        let special = token.get("special").and_then(Json::as_bool).unwrap_or(false);
        if special || looks_special(content) {
            place(id, content.to_string(), TOKEN_CONTROL)?;
        } else {
            // llama.cpp expects user-defined tokens pre-normalized: SentencePiece's word marker
            // becomes a space.
            place(id, content.replace('\u{2581}', " "), TOKEN_USER_DEFINED)?;
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(vocab_size);
    for (id, text) in tokens.iter().enumerate() {
        if let Some(text) = text {
            // llama.cpp maps texts to ids one to one and aborts on a repeat.
            if let Some(first) = seen.insert(text, id) {
                return Err(tokenizer_error(format!("token {text:?} appears at ids {first} and {id}")));
            }
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, text)| {
            text.unwrap_or_else(|| {
                types[id] = TOKEN_UNUSED;
                format!("[PAD{id}]")
            })
        })
        .collect();

    // Merges: "a b" strings, or [a, b] pairs (a space inside a part becomes U+0120, as
    // llama.cpp's converter writes it).
    let mut merges = Vec::new();
    for (i, merge) in
        model.get("merges").and_then(Json::as_array).map(Vec::as_slice).unwrap_or_default().iter().enumerate()
    {
        let text = match merge {
            Json::String(s) => s.clone(),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => {
                    let escape = |s: &str| s.replace(' ', "\u{0120}");
                    format!("{} {}", escape(a), escape(b))
                }
                _ => return Err(tokenizer_error(format!("merges[{i}] = {merge} is not a pair of strings"))),
            },
            _ => return Err(tokenizer_error(format!("merges[{i}] = {merge} is neither a string nor a pair"))),
        };
        merges.push(text);
    }

    let mut m: Vec<(String, GgufValue)> = vec![
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), GgufValue::string_array(tokens)),
        ("tokenizer.ggml.token_type".into(), GgufValue::i32_array(types)),
        ("tokenizer.ggml.merges".into(), GgufValue::string_array(merges)),
    ];

    // Special ids as llama.cpp's SpecialVocab finds them: `<kind>_token` of
    // tokenizer_config.json (looked up among the added tokens), else `<kind>_token_id` of
    // config.json.
    let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
    let from_tokenizer_config = |kind: &str| {
        let text = tokenizer_config.as_ref()?.get(format!("{kind}_token"))?;
        added_ids.get(token_text(text)?).copied()
    };
    for (kind, key) in [
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("unk", "tokenizer.ggml.unknown_token_id"),
        ("sep", "tokenizer.ggml.seperator_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
        ("mask", "tokenizer.ggml.mask_token_id"),
    ] {
        let id = from_tokenizer_config(kind).or_else(|| raw_config.get(format!("{kind}_token_id"))?.as_u64());
        match id.and_then(|id| u32::try_from(id).ok()) {
            Some(id) if (id as usize) < vocab_size => m.push((key.into(), GgufValue::U32(id))),
            Some(id) => tracing::warn!("{kind} token id {id} is outside the vocabulary of {vocab_size}; not written"),
            None => {}
        }
    }
    if let Some(add_bos) = add_bos_token(&json, tokenizer_config.as_ref()) {
        m.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add_bos)));
    }
    if let Some(template) = chat_template(dir, tokenizer_config.as_ref())? {
        m.push(("tokenizer.chat_template".into(), GgufValue::String(template)));
    }
    Ok(m)
}

/// Whether the tokenizer prepends BOS: from its post-processor (a `TemplateProcessing` that
/// starts with the BOS token: yes; a plain `ByteLevel`: no), else `add_bos_token` of
/// `tokenizer_config.json`; `None` when neither says.
fn add_bos_token(tokenizer: &Json, tokenizer_config: Option<&Json>) -> Option<bool> {
    let bos_text = tokenizer_config.and_then(|c| token_text(c.get("bos_token")?));
    let processor = tokenizer.get("post_processor").filter(|p| !p.is_null());
    let processors = match processor {
        Some(p) => match p.get("processors").and_then(Json::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![p],
        },
        None => Vec::new(),
    };
    let mut from_processor = None;
    for processor in processors {
        match processor.get("type").and_then(Json::as_str) {
            Some("ByteLevel") => from_processor = from_processor.or(Some(false)),
            Some("TemplateProcessing") => {
                let single = processor.get("single").and_then(Json::as_array);
                let first =
                    single.filter(|s| s.len() > 1).and_then(|s| s.first()?.get("SpecialToken")?.get("id")?.as_str());
                if let Some(first) = first {
                    from_processor = Some(bos_text.is_none_or(|bos| bos == first));
                }
            }
            _ => {}
        }
    }
    from_processor.or_else(|| tokenizer_config?.get("add_bos_token")?.as_bool())
}

/// The chat template, found where marco's own Hugging Face loader finds it:
/// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string, or the
/// `default` of a list of named templates, else the first).
fn chat_template(dir: &Path, tokenizer_config: Option<&Json>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok(Some(source)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ModelError::io(&jinja, e)),
    }
    Ok(match tokenizer_config.and_then(|c| c.get("chat_template")) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(named)) => {
            let template_of = |want: Option<&str>| {
                named.iter().find_map(|entry| {
                    let name = entry.get("name").and_then(Json::as_str);
                    let template = entry.get("template").and_then(Json::as_str)?;
                    (want.is_none() || name == want).then(|| template.to_string())
                })
            };
            template_of(Some("default")).or_else(|| template_of(None))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_rows_invert_the_loaders_unpermute() {
        // The loader's rule: stored row 2i + j of a head holds Hugging Face row j * half + i.
        let (heads, head_dim) = (3, 8);
        let rows = heads * head_dim;
        let stored: Vec<usize> = (0..rows).map(|r| source_row(r, rows, Some(heads))).collect();
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                for j in 0..2 {
                    assert_eq!(stored[h * head_dim + 2 * i + j], h * head_dim + j * head_dim / 2 + i);
                }
            }
        }
        let mut sorted = stored.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..rows).collect::<Vec<_>>(), "a permutation");
        assert_eq!((0..rows).map(|r| source_row(r, rows, None)).collect::<Vec<_>>(), sorted);
    }

    #[test]
    fn targets_parse_and_pick_storage_types() {
        for target in ConvertTarget::ALL {
            assert_eq!(target.name().parse::<ConvertTarget>().unwrap(), target);
            assert_eq!(target.to_string().to_uppercase().parse::<ConvertTarget>().unwrap(), target);
        }
        assert!(matches!("q4_k".parse::<ConvertTarget>(), Err(ModelError::InvalidConfig { .. })));
        assert_eq!(storage_type(&[8, 64], ConvertTarget::Q4_0), GgmlType::Q4_0);
        assert_eq!(storage_type(&[8, 48], ConvertTarget::Q8_0), GgmlType::F16);
        assert_eq!(storage_type(&[8, 48], ConvertTarget::Bf16), GgmlType::BF16);
        assert_eq!(storage_type(&[64], ConvertTarget::Q8_0), GgmlType::F32);
    }

    #[test]
    fn special_looking_tokens() {
        assert!(looks_special("<|im_end|>") && looks_special("<pad>") && looks_special("<unused12>"));
        assert!(!looks_special("<t5>") && !looks_special("hello"));
    }

    #[test]
    fn add_bos_follows_the_post_processor_then_the_config() {
        let json = |s: &str| serde_json::from_str::<Json>(s).unwrap();
        let template = json(
            r#"{"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},
               {"Sequence":{"id":"A","type_id":0}}]}}"#,
        );
        let config = json(r#"{"bos_token":"<s>","add_bos_token":false}"#);
        assert_eq!(add_bos_token(&template, Some(&config)), Some(true));
        let byte_level = json(r#"{"post_processor":{"type":"ByteLevel"}}"#);
        assert_eq!(add_bos_token(&byte_level, Some(&json(r#"{"add_bos_token":true}"#))), Some(false));
        let none = json(r#"{"post_processor":null}"#);
        assert_eq!(add_bos_token(&none, Some(&json(r#"{"add_bos_token":true}"#))), Some(true));
        assert_eq!(add_bos_token(&none, None), None);
    }
}
