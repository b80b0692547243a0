//! Reading weights: Hugging Face safetensors directories and GGUF files, behind one trait.
//!
//! The network asks a [`WeightSource`] for tensors by their Hugging Face names and states the
//! shape the configuration implies; a source checks it and answers with host `f32` rows, or,
//! for linear layers, possibly with the raw ggml blocks so that a kernel can keep them
//! quantised ([`HostLinear`]).
//!
//! - [`HfWeights`]: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
//!   f32, f16 and bf16 are widened to f32. The files are memory-mapped and each header is
//!   parsed once. (burn-store's safetensors store applies a file to a burn `Module`; marco's
//!   network is not a `Module` — it is built once, checked against the config and partly
//!   packed into kernel layouts — so reading through the `safetensors` crate serves better.)
//! - [`GgufWeights`]: maps the Hugging Face names to llama.cpp's (`blk.N.attn_q.weight`, ...)
//!   and un-permutes the q/k rows that llama.cpp's converter interleaves for Llama models
//!   (`rope_type = norm`), so one rotary implementation (half-split) serves both formats.
//!
//! [`load`] puts it together: a `.gguf` file or a Hugging Face directory becomes a [`BurnLm`]
//! with its tokenizer.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::backend::{KernelBackend, LinearPath};
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::lm::BurnLm;
use crate::model::Transformer;
use crate::tokenizer::MarcoTokenizer;
use marco_backend_cpu::quant::{self, GgmlType};
use marco_formats::mapping::release_pages;

/// A linear layer's weight rows `[out, in]` on the host.
#[derive(Debug, Clone)]
pub enum HostLinear<'a> {
    /// Dense f32 rows.
    F32(Vec<f32>),
    /// ggml blocks (or f16/bf16 values), as stored in the file: borrowed from its memory map
    /// when they need no change, so that loading copies each weight once (into the kernel's
    /// layout), not twice.
    Ggml {
        /// The ggml type id.
        ggml_type: u32,
        /// The blocks of all rows.
        bytes: std::borrow::Cow<'a, [u8]>,
        /// Number of weights (`out * in`).
        elements: usize,
    },
}

impl HostLinear<'_> {
    /// The rows as dense f32 (dequantising ggml blocks).
    pub fn into_f32(self) -> Result<Vec<f32>> {
        match self {
            HostLinear::F32(rows) => Ok(rows),
            HostLinear::Ggml { ggml_type, bytes, elements } => {
                let ty = GgmlType::from_id(ggml_type).ok_or_else(|| ModelError::UnsupportedDtype {
                    path: "<linear weight>".into(),
                    tensor: String::new(),
                    dtype: format!("ggml type {ggml_type}"),
                })?;
                quant::dequantize(ty, &bytes, elements)
                    .map_err(|e| ModelError::corrupt("<linear weight>", format!("dequantising {}: {e}", ty.name())))
            }
        }
    }
}

/// Tensors by Hugging Face name, shape-checked.
pub trait WeightSource {
    /// The file or directory the weights come from (for messages).
    fn origin(&self) -> &Path;

    /// The tensor `name` as row-major f32; fails with [`ModelError::ShapeMismatch`] when its
    /// shape is not `expected` and [`ModelError::MissingTensor`] when it is absent.
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>>;

    /// The weight `name` of a linear layer, `[out, in]`; may keep a quantised form.
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<HostLinear<'_>> {
        Ok(HostLinear::F32(self.tensor(name, &[out_features, in_features])?))
    }

    /// Called once the loader holds its own copy of the linear weight `name`: a memory-mapped
    /// source gives the tensor's pages back (see [`marco_formats::mapping::release_pages`]).
    fn release(&self, name: &str) {
        let _ = name;
    }

    /// How the tensor `name` is stored (`None`: unknown, taken as f32), for the memory estimate
    /// made before anything is read.
    fn stored_type(&self, name: &str) -> Option<GgmlType> {
        let _ = name;
        None
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only private map; model files are not modified while loaded, and every
        // range read from it is checked against the header (which safetensors validated
        // against the map's length).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer
            | safetensors::SafeTensorError::HeaderTooSmall
            | safetensors::SafeTensorError::InvalidHeaderLength => {
                ModelError::Truncated { path: path.to_path_buf(), what: format!("safetensors data ({e})") }
            }
            other => ModelError::corrupt(path, format!("safetensors header: {other}")),
        })?;
        Ok(Shard { path: path.to_path_buf(), map, header_len, metadata })
    }
}

/// The weights of a Hugging Face checkpoint directory.
pub struct HfWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for HfWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfWeights").field("dir", &self.dir).field("shards", &self.shards.len()).finish()
    }
}

impl HfWeights {
    /// Opens `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    /// A shard named in the index but absent is a [`ModelError::Io`] naming that shard.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::corrupt(&index_path, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::corrupt(&index_path, "no weight_map object"))?;
            let mut file_slots: HashMap<String, usize> = HashMap::new();
            let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            files.sort_unstable();
            files.dedup();
            for file in files {
                if file.contains('/') || file.contains('\\') || file.contains("..") {
                    return Err(ModelError::corrupt(&index_path, format!("shard name {file:?} leaves the directory")));
                }
                file_slots.insert(file.to_string(), shards.len());
                shards.push(Shard::open(&dir.join(file))?);
            }
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| ModelError::corrupt(&index_path, format!("weight_map[{tensor}] is not a string")))?;
                if let Some(&slot) = file_slots.get(file) {
                    index.insert(tensor.clone(), slot);
                }
            }
        } else if single.exists() {
            let shard = Shard::open(&single)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        }
        Ok(HfWeights { dir: dir.to_path_buf(), shards, index })
    }
}

fn widen(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let pairs = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    match dtype {
        Dtype::F32 => Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Dtype::F16 => Ok(pairs().map(|b| half::f16::from_bits(b).to_f32()).collect()),
        Dtype::BF16 => Ok(pairs().map(|b| half::bf16::from_bits(b).to_f32()).collect()),
        other => Err(ModelError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

impl HfWeights {
    /// The dtype and stored bytes (borrowed from the map) of `name`, shape-checked.
    pub(crate) fn stored(&self, name: &str, expected: &[usize]) -> Result<(Dtype, &[u8])> {
        let (_, dtype, bytes, _) = self.raw(name, expected)?;
        Ok((dtype, bytes))
    }

    /// The shard, dtype, bytes and byte range (in the shard's map) of `name`, shape-checked.
    fn raw(&self, name: &str, expected: &[usize]) -> Result<(&Shard, Dtype, &[u8], std::ops::Range<usize>)> {
        let missing = || ModelError::MissingTensor { path: self.dir.clone(), tensor: name.to_string() };
        let shard = self.index.get(name).and_then(|&slot| self.shards.get(slot)).ok_or_else(missing)?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor { path: shard.path.clone(), tensor: name.to_string() })?;
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: shard.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let base = 8 + shard.header_len;
        let range = base + start..base + end;
        let bytes = shard.map.get(range.clone()).ok_or_else(|| ModelError::Truncated {
            path: shard.path.clone(),
            what: format!("data of tensor {name}"),
        })?;
        Ok((shard, info.dtype, bytes, range))
    }
}

impl HfWeights {
    /// A key for the checkpoint's content: SHA-256 over `config.json`, every shard's size and
    /// safetensors header (names, dtypes, shapes, offsets), and the first and last 4 KiB of
    /// every tensor's data. Reading a few KiB per tensor keeps the key cheap for a 15 GB
    /// checkpoint (hashing every byte would cost the load it is meant to save), while a
    /// re-download with other weights, a re-sharded or re-typed copy all change it.
    pub fn content_key(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"marco checkpoint key 1\0");
        let config = self.dir.join("config.json");
        hash.update(std::fs::read(&config).map_err(|e| ModelError::io(&config, e))?);
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        order.sort_by(|&a, &b| self.shards[a].path.cmp(&self.shards[b].path));
        for index in order {
            let shard = &self.shards[index];
            hash.update((shard.map.len() as u64).to_le_bytes());
            let header_end = (8 + shard.header_len).min(shard.map.len());
            hash.update(&shard.map[..header_end]);
            let mut tensors: Vec<_> = shard.metadata.tensors().into_iter().collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, info) in tensors {
                let (start, end) = info.data_offsets;
                let range = header_end + start..(header_end + end).min(shard.map.len());
                let bytes = shard.map.get(range.clone()).unwrap_or(&[]);
                const SAMPLE: usize = 4096;
                hash.update(&bytes[..bytes.len().min(SAMPLE)]);
                hash.update(&bytes[bytes.len().saturating_sub(SAMPLE)..]);
                release_pages(&shard.map, range);
            }
        }
        Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl WeightSource for HfWeights {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (shard, dtype, bytes, range) = self.raw(name, expected)?;
        let values = widen(&shard.path, name, dtype, bytes);
        release_pages(&shard.map, range);
        values
    }

    /// f16 and bf16 weights stay 16-bit (the kernels widen them in registers).
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<HostLinear<'_>> {
        let (_, dtype, bytes, _) = self.raw(name, &[out_features, in_features])?;
        let ggml_type = match dtype {
            Dtype::BF16 => GgmlType::BF16,
            Dtype::F16 => GgmlType::F16,
            _ => return self.tensor(name, &[out_features, in_features]).map(HostLinear::F32),
        };
        Ok(HostLinear::Ggml {
            ggml_type: ggml_type.id(),
            bytes: std::borrow::Cow::Borrowed(bytes),
            elements: out_features * in_features,
        })
    }

    fn release(&self, name: &str) {
        let shard = self.index.get(name).and_then(|&slot| self.shards.get(slot));
        if let Some((shard, info)) = shard.and_then(|shard| Some((shard, shard.metadata.info(name)?))) {
            let base = 8 + shard.header_len;
            release_pages(&shard.map, base + info.data_offsets.0..base + info.data_offsets.1);
        }
    }

    fn stored_type(&self, name: &str) -> Option<GgmlType> {
        let shard = self.index.get(name).and_then(|&slot| self.shards.get(slot))?;
        match shard.metadata.info(name)?.dtype {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }
}

/// The weights of a GGUF file, under Hugging Face names.
#[derive(Debug)]
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    /// Whether q/k rows are interleaved for llama.cpp's `norm` rope and must be un-permuted.
    unpermute_qk: bool,
    num_heads: usize,
    num_kv_heads: usize,
}

impl<'a> GgufWeights<'a> {
    /// Wraps `file`, whose configuration is `config`.
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        GgufWeights {
            file,
            unpermute_qk: matches!(config.architecture, Architecture::Llama | Architecture::Mistral),
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
        }
    }

    /// The llama.cpp name of a Hugging Face tensor name, and the head count whose rows are
    /// interleaved (for q/k of Llama models).
    fn map_name(&self, name: &str) -> Option<(String, Option<usize>)> {
        match name {
            "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
            "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
            "lm_head.weight" => return Some(("output.weight".into(), None)),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let (short, heads) = match module {
            "input_layernorm" => ("attn_norm", None),
            "post_attention_layernorm" => ("ffn_norm", None),
            "self_attn.q_proj" => ("attn_q", Some(self.num_heads)),
            "self_attn.k_proj" => ("attn_k", Some(self.num_kv_heads)),
            "self_attn.v_proj" => ("attn_v", None),
            "self_attn.o_proj" => ("attn_output", None),
            "mlp.gate_proj" => ("ffn_gate", None),
            "mlp.up_proj" => ("ffn_up", None),
            "mlp.down_proj" => ("ffn_down", None),
            _ => return None,
        };
        let heads = if self.unpermute_qk { heads } else { None };
        Some((format!("blk.{layer}.{short}.{suffix}"), heads))
    }

    fn lookup(&self, name: &str, expected: &[usize]) -> Result<(String, Option<usize>)> {
        let (gguf_name, heads) = self.map_name(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: name.to_string(),
        })?;
        let info = self.file.tensor_info(&gguf_name)?;
        let shape = info.shape();
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.file.path().to_path_buf(),
                tensor: gguf_name,
                expected: expected.to_vec(),
                actual: shape,
            });
        }
        Ok((gguf_name, heads))
    }
}

/// Undoes llama.cpp's q/k interleaving: within each head, stored row `2i + j` is the
/// Hugging Face row `j * head_dim / 2 + i`. `rows` holds `heads * head_dim` rows of
/// `row_len` items each.
fn unpermute_rows<T: Copy>(rows: &[T], heads: usize, row_len: usize) -> Vec<T> {
    let total_rows = rows.len() / row_len.max(1);
    let head_dim = total_rows / heads.max(1);
    let half = head_dim / 2;
    let mut out = rows.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * head_dim + 2 * i + j;
                let to = h * head_dim + j * half + i;
                out[to * row_len..(to + 1) * row_len].copy_from_slice(&rows[from * row_len..(from + 1) * row_len]);
            }
        }
    }
    out
}

impl WeightSource for GgufWeights<'_> {
    fn origin(&self) -> &Path {
        self.file.path()
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (gguf_name, heads) = self.lookup(name, expected)?;
        let (_, values) = self.file.tensor_f32(&gguf_name)?;
        self.file.release(self.file.tensor_info(&gguf_name)?);
        Ok(match heads {
            Some(heads) => {
                let row_len = if expected.len() == 2 { expected[1] } else { 1 };
                unpermute_rows(&values, heads, row_len)
            }
            None => values,
        })
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<HostLinear<'_>> {
        let (gguf_name, heads) = self.lookup(name, &[out_features, in_features])?;
        let info = self.file.tensor_info(&gguf_name)?;
        // f16/bf16 stay 16-bit, like quantised blocks: only f32 is handed out as values.
        if info.ggml_type == GgmlType::F32 {
            return Ok(HostLinear::F32(self.tensor(name, &[out_features, in_features])?));
        }
        let bytes = self.file.tensor_bytes(info)?;
        let row_bytes = bytes.len() / out_features.max(1);
        let bytes = match heads {
            Some(heads) => std::borrow::Cow::Owned(unpermute_rows(bytes, heads, row_bytes)),
            None => std::borrow::Cow::Borrowed(bytes),
        };
        Ok(HostLinear::Ggml { ggml_type: info.ggml_type.id(), bytes, elements: out_features * in_features })
    }

    fn release(&self, name: &str) {
        if let Some(info) = self.map_name(name).and_then(|(gguf_name, _)| self.file.tensor_info(&gguf_name).ok()) {
            self.file.release(info);
        }
    }

    fn stored_type(&self, name: &str) -> Option<GgmlType> {
        let (gguf_name, _) = self.map_name(name)?;
        Some(self.file.tensor_info(&gguf_name).ok()?.ggml_type)
    }
}

/// Seeded random weights of any shape: for benchmarks of model shapes whose checkpoint is not
/// at hand (a 7B shape on a GPU machine without the download, say). Norm weights are near 1
/// and matrices uniform in ±1/√fan-in, so activations keep a sane scale through the layers.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
    origin: PathBuf,
}

impl RandomWeights {
    /// Random weights drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        RandomWeights { seed, origin: PathBuf::from(format!("<random weights, seed {seed}>")) }
    }
}

impl WeightSource for RandomWeights {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let count: usize = expected.iter().product();
        let seed = self.seed
            ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let (offset, scale) = match expected {
            [_] if name.ends_with("norm.weight") => (1.0, 0.1),
            [_] => (0.0, 0.02),
            [_, fan_in, ..] => (0.0, 1.0 / (*fan_in as f32).sqrt()),
            [] => return Ok(Vec::new()),
        };
        // Fixed-size chunks, each from its own stream: the values do not depend on the number
        // of threads, and a 7B-shaped model (7.6 G values) fills in seconds, not minutes.
        const CHUNK: usize = 1 << 20;
        let mut values = vec![0.0f32; count];
        crate::backend::for_each_chunk_parallel(&mut values, CHUNK, |index, chunk| {
            let mut state = marco_core::sampling::splitmix64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for value in chunk {
                state = marco_core::sampling::splitmix64(state);
                *value = offset + scale * ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
            }
        });
        Ok(values)
    }
}

/// Options of [`load_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Which implementation runs the linear layers.
    pub linear_path: LinearPath,
    /// Quantize dense (f32/f16/bf16) linear weights at load time; weights a GGUF file already
    /// stores quantised are kept as they are.
    pub quantize: Option<QuantizeAtLoad>,
    /// Cap the context below the model's own (`max_position_embeddings`): a shorter context
    /// needs less KV memory. `None` keeps the model's.
    pub max_context: Option<usize>,
    /// Check before loading that the model fits in the available memory (see
    /// [`crate::memory`]); on by default.
    pub memory_check: bool,
    /// The memory the model may hold, in bytes, when less than what the system reports
    /// available (to leave room for other work). `None`: what the system reports.
    pub memory_limit: Option<u64>,
    /// Convert once: quantisation at load of a Hugging Face directory writes its result to
    /// a GGUF file in marco's cache (`$MARCO_HOME/converted/`, keyed by the checkpoint's
    /// content and the format) and loads from it, so the next load maps the file instead of
    /// quantising again. On by default; off, the weights are quantised in memory each time.
    pub cache_conversions: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            linear_path: LinearPath::default(),
            quantize: None,
            max_context: None,
            memory_check: true,
            memory_limit: None,
            cache_conversions: true,
        }
    }
}

/// A format dense linear weights can be quantised to at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantizeAtLoad {
    /// ggml's Q8_0: blocks of 32 weights with one f16 scale (8.5 bits per weight, ~3.8× less
    /// memory traffic than f32 at decode; relative error ≤ 1/254 per block).
    Q8_0,
    /// ggml's Q4_0: blocks of 32 weights with one f16 scale (4.5 bits per weight: a 7B model in
    /// ~4 GB; coarser than Q8_0).
    Q4_0,
}

impl QuantizeAtLoad {
    /// The ggml type of the quantised weights.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            QuantizeAtLoad::Q8_0 => GgmlType::Q8_0,
            QuantizeAtLoad::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// The name the command line takes (`q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            QuantizeAtLoad::Q8_0 => "q8_0",
            QuantizeAtLoad::Q4_0 => "q4_0",
        }
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        let ty = self.ggml_type();
        ty.type_size() as f64 * 8.0 / ty.block_size() as f64
    }

    /// Quantizes row-major f32 values (whole blocks of 32).
    fn quantize(self, values: &[f32]) -> std::result::Result<Vec<u8>, marco_formats::FormatError> {
        match self {
            QuantizeAtLoad::Q8_0 => quant::quantize_q8_0(values),
            QuantizeAtLoad::Q4_0 => quant::quantize_q4_0(values),
        }
    }
}

impl std::str::FromStr for QuantizeAtLoad {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantizeAtLoad::Q8_0),
            "q4_0" => Ok(QuantizeAtLoad::Q4_0),
            other => Err(ModelError::InvalidConfig {
                path: "--quantize".into(),
                reason: format!("unknown format `{other}` (supported: q8_0, q4_0)"),
            }),
        }
    }
}

/// A [`WeightSource`] that hands out dense linear weights quantised to `format` (the rest —
/// embeddings, norms, already-quantised weights — passes through unchanged).
struct QuantizingSource<'a> {
    inner: &'a dyn WeightSource,
    format: QuantizeAtLoad,
}

impl WeightSource for QuantizingSource<'_> {
    fn origin(&self) -> &Path {
        self.inner.origin()
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        self.inner.tensor(name, expected)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<HostLinear<'_>> {
        let host = self.inner.linear(name, out_features, in_features)?;
        // Rows must be whole blocks; other widths, and weights already quantised, stay as they are.
        let dense = match &host {
            HostLinear::F32(_) => true,
            HostLinear::Ggml { ggml_type, .. } => {
                matches!(GgmlType::from_id(*ggml_type), Some(GgmlType::F16 | GgmlType::BF16))
            }
        };
        if !dense || !in_features.is_multiple_of(quant::QK) {
            return Ok(host);
        }
        let rows = host.into_f32()?;
        let bytes = self.format.quantize(&rows).map_err(|e| ModelError::InvalidConfig {
            path: self.origin().to_path_buf(),
            reason: format!("{name}: {e}"),
        })?;
        Ok(HostLinear::Ggml {
            ggml_type: self.format.ggml_type().id(),
            bytes: std::borrow::Cow::Owned(bytes),
            elements: rows.len(),
        })
    }

    fn release(&self, name: &str) {
        self.inner.release(name);
    }

    fn stored_type(&self, name: &str) -> Option<GgmlType> {
        self.inner.stored_type(name)
    }
}

/// `source`, quantising dense linear weights when `options` asks for it.
fn with_quantization<'a>(source: &'a dyn WeightSource, options: &LoadOptions) -> Box<dyn WeightSource + 'a> {
    match options.quantize {
        Some(format) => Box::new(QuantizingSource { inner: source, format }),
        None => Box::new(Passthrough(source)),
    }
}

/// A [`WeightSource`] forwarding to another.
struct Passthrough<'a>(&'a dyn WeightSource);

impl WeightSource for Passthrough<'_> {
    fn origin(&self) -> &Path {
        self.0.origin()
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        self.0.tensor(name, expected)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<HostLinear<'_>> {
        self.0.linear(name, out_features, in_features)
    }

    fn release(&self, name: &str) {
        self.0.release(name);
    }

    fn stored_type(&self, name: &str) -> Option<GgmlType> {
        self.0.stored_type(name)
    }
}

/// Loads a model for `B` from `path`: a `.gguf` file (weights, configuration and tokenizer
/// from its metadata) or a Hugging Face directory (`config.json`, safetensors, `tokenizer.json`).
pub fn load<B: KernelBackend>(path: &Path, device: &B::Device) -> Result<BurnLm<B>> {
    load_with(path, device, LoadOptions::default())
}

/// [`load`] with [`LoadOptions`].
///
/// Before reading any weight it estimates what the model will hold and, where that exceeds
/// the memory available, fails with [`ModelError::InsufficientMemory`] (see [`crate::memory`]).
pub fn load_with<B: KernelBackend>(path: &Path, device: &B::Device, options: LoadOptions) -> Result<BurnLm<B>> {
    let metadata = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    let (model, tokenizer) = if metadata.is_dir() {
        let config = with_context(ModelConfig::from_hf_file(&path.join("config.json"))?, path, &options)?;
        let tokenizer = MarcoTokenizer::from_hf_dir(path)?;
        check_vocab(&path.join("tokenizer.json"), &tokenizer, &config)?;
        let weights = HfWeights::open(path)?;
        // Checked before any conversion: a model that cannot fit is refused before minutes
        // of converting (the converted file holds what quantising in memory would).
        check_memory::<B>(path, &config, with_quantization(&weights, &options).as_ref(), &options)?;
        if let Some(converted) = converted_weights(path, &weights, &options)? {
            // Configuration and tokenizer still come from the directory; only the weights
            // come from the converted file.
            drop(weights);
            let file = GgufFile::open(&converted)?;
            let source = GgufWeights::new(&file, &config);
            (Transformer::load(config, &source, options.linear_path, device)?, tokenizer)
        } else {
            let source = with_quantization(&weights, &options);
            (Transformer::load(config, source.as_ref(), options.linear_path, device)?, tokenizer)
        }
    } else {
        let file = GgufFile::open(path)?;
        let config = with_context(ModelConfig::from_gguf(&file)?, path, &options)?;
        let tokenizer = MarcoTokenizer::from_gguf(&file)?;
        check_vocab(path, &tokenizer, &config)?;
        let weights = GgufWeights::new(&file, &config);
        let source = with_quantization(&weights, &options);
        check_memory::<B>(path, &config, source.as_ref(), &options)?;
        (Transformer::load(config, source.as_ref(), options.linear_path, device)?, tokenizer)
    };
    Ok(BurnLm::new(model, Box::new(tokenizer)))
}

/// The converted file for a quantisation at load of the directory `dir` (converting now when
/// the cache has none), or `None` when nothing is to be converted or the cache is off or
/// unusable (then the caller quantises in memory: a cache that cannot be written never
/// fails a load).
fn converted_weights(dir: &Path, weights: &HfWeights, options: &LoadOptions) -> Result<Option<PathBuf>> {
    let Some(format) = options.quantize.filter(|_| options.cache_conversions) else {
        return Ok(None);
    };
    let Ok(cache) = crate::fetch::cache_dir().map(|home| home.join("converted")) else {
        return Ok(None);
    };
    let target = match format {
        QuantizeAtLoad::Q8_0 => crate::convert::ConvertTarget::Q8_0,
        QuantizeAtLoad::Q4_0 => crate::convert::ConvertTarget::Q4_0,
    };
    let file = cache.join(format!("{}-{}.gguf", weights.content_key()?, format.name()));
    if file.is_file() && GgufFile::open(&file).is_ok() {
        return Ok(Some(file));
    }
    if std::fs::create_dir_all(&cache).is_err() {
        return Ok(None);
    }
    // A name of this process's own, renamed into place when complete: loads converting the
    // same checkpoint at once never see (or clobber) each other's partial files.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = file.with_extension(format!("gguf.{}-{unique}.tmp", std::process::id()));
    match crate::convert::convert_hf_dir(dir, &staging, target) {
        Ok(_) => {
            if std::fs::rename(&staging, &file).is_err() {
                let _ = std::fs::remove_file(&staging);
                return Ok(None);
            }
            Ok(Some(file))
        }
        // A checkpoint the converter cannot write (a tokenizer GGUF cannot describe, say)
        // still loads, quantised in memory; faults of the checkpoint itself surface there.
        Err(ModelError::Io { .. }) | Err(ModelError::Tokenizer(_)) => {
            let _ = std::fs::remove_file(&staging);
            Ok(None)
        }
        Err(other) => Err(other),
    }
}

/// `config` with its context capped by [`LoadOptions::max_context`].
fn with_context(mut config: ModelConfig, path: &Path, options: &LoadOptions) -> Result<ModelConfig> {
    match options.max_context {
        Some(0) => Err(ModelError::InvalidConfig { path: path.to_path_buf(), reason: "a context of 0 tokens".into() }),
        Some(limit) => {
            config.max_position_embeddings = config.max_position_embeddings.min(limit);
            Ok(config)
        }
        None => Ok(config),
    }
}

/// The memory check, for backends that hold their weights in host memory.
fn check_memory<B: KernelBackend>(
    path: &Path,
    config: &ModelConfig,
    source: &dyn WeightSource,
    options: &LoadOptions,
) -> Result<()> {
    if !B::weights_in_host_memory() {
        return Ok(());
    }
    let kv_elem = std::mem::size_of::<B::FloatElem>();
    crate::memory::check(path, config, source, options, kv_elem, B::embeds_from_linear_weight())
}

/// Loads the default model (SmolLM2-135M-Instruct Q4_1), fetching it on first use
/// (see [`crate::fetch::default_model_path`]).
pub fn load_default<B: KernelBackend>(device: &B::Device) -> Result<BurnLm<B>> {
    load(&crate::fetch::default_model_path()?, device)
}

/// A tokenizer may have fewer tokens than the embedding table (checkpoints pad it), never more.
fn check_vocab(path: &Path, tokenizer: &MarcoTokenizer, config: &ModelConfig) -> Result<()> {
    let tokens = marco_core::Tokenizer::vocab_size(tokenizer);
    if tokens > config.vocab_size {
        return Err(ModelError::VocabMismatch {
            path: path.to_path_buf(),
            tokenizer: tokens,
            model: config.vocab_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unpermute_rows;

    #[test]
    fn unpermute_inverts_llama_cpp_interleaving() {
        // llama.cpp's permute: HF row (j, i) of a head goes to stored row 2i + j.
        let heads = 2;
        let head_dim = 4;
        let hf: Vec<u32> = (0..(heads * head_dim) as u32).collect();
        let mut stored = hf.clone();
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..head_dim / 2 {
                    stored[h * head_dim + 2 * i + j] = hf[h * head_dim + j * head_dim / 2 + i];
                }
            }
        }
        assert_ne!(stored, hf);
        assert_eq!(unpermute_rows(&stored, heads, 1), hf);
    }
}
