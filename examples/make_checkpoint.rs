//! Writes a Hugging Face checkpoint directory of a given shape with seeded random weights:
//! what the full-size benchmarks load, convert and time, without downloading 15 GB.
//!
//! ```text
//! cargo run --release --example make_checkpoint -- --shape qwen2-7b --out /tmp/qwen2-7b
//! cargo run --release --example make_checkpoint -- --shape smollm2-135m --dtype f32 --out /tmp/s
//! ```
//!
//! Laid out as Marco-o1's own checkpoint is: `config.json` (transformers' form),
//! `model-0000N-of-0000M.safetensors` shards of about `--shard-gb` each with
//! `model.safetensors.index.json`, and a `tokenizer.json`. The tokenizer is a byte-level BPE
//! over the 256 bytes plus the chat-template specials (no merges) and placeholders for the
//! rest of the vocabulary: the benchmarks feed token ids, and every id decodes. Values: norms near 1,
//! matrices uniform in ±1/√fan-in, so activations keep a sane scale; speed does not depend on
//! them. Each tensor is generated and written in turn (memory stays at one tensor).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Write a random-weight Hugging Face checkpoint of a model's shape")]
struct Args {
    /// The model shape.
    #[arg(long, value_enum, default_value_t = common::RandomShape::Qwen27b)]
    shape: common::RandomShape,
    /// Element type of the weights: `bf16` (as Marco-o1 ships), `f16` or `f32`.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// The directory to create (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Approximate shard size in GB.
    #[arg(long, default_value_t = 4.0)]
    shard_gb: f64,
    /// Seed of the values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One tensor to write: its name, shape, and how its values are drawn.
struct Spec {
    name: String,
    shape: Vec<usize>,
}

fn specs(c: &marco::model::ModelConfig) -> Vec<Spec> {
    let h = c.hidden_size;
    let mut all = vec![Spec { name: "model.embed_tokens.weight".into(), shape: vec![c.vocab_size, h] }];
    for i in 0..c.num_layers {
        let p = |rest: &str, shape: Vec<usize>| Spec { name: format!("model.layers.{i}.{rest}"), shape };
        all.push(p("input_layernorm.weight", vec![h]));
        all.push(p("self_attn.q_proj.weight", vec![c.q_dim(), h]));
        all.push(p("self_attn.k_proj.weight", vec![c.kv_dim(), h]));
        all.push(p("self_attn.v_proj.weight", vec![c.kv_dim(), h]));
        if c.qkv_bias {
            all.push(p("self_attn.q_proj.bias", vec![c.q_dim()]));
            all.push(p("self_attn.k_proj.bias", vec![c.kv_dim()]));
            all.push(p("self_attn.v_proj.bias", vec![c.kv_dim()]));
        }
        all.push(p("self_attn.o_proj.weight", vec![h, c.q_dim()]));
        all.push(p("post_attention_layernorm.weight", vec![h]));
        all.push(p("mlp.gate_proj.weight", vec![c.intermediate_size, h]));
        all.push(p("mlp.up_proj.weight", vec![c.intermediate_size, h]));
        all.push(p("mlp.down_proj.weight", vec![h, c.intermediate_size]));
    }
    all.push(Spec { name: "model.norm.weight".into(), shape: vec![h] });
    if !c.tie_word_embeddings {
        all.push(Spec { name: "lm_head.weight".into(), shape: vec![c.vocab_size, h] });
    }
    all
}

/// The tensor's values, encoded as `dtype` (little-endian), drawn from `seed` and its name.
fn values(spec: &Spec, dtype: &str, seed: u64) -> Vec<u8> {
    let count: usize = spec.shape.iter().product();
    let (offset, scale) = match spec.shape.as_slice() {
        [_] if spec.name.ends_with("norm.weight") => (1.0f32, 0.1f32),
        [_] => (0.0, 0.02),
        [_, fan_in] => (0.0, 1.0 / (*fan_in as f32).sqrt()),
        _ => (0.0, 0.0),
    };
    let width = if dtype == "f32" { 4 } else { 2 };
    let mut out = vec![0u8; count * width];
    let name_seed =
        spec.name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    // Chunks on all cores, each from its own stream: the bytes do not depend on the threads.
    const CHUNK: usize = 1 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(CHUNK * width).enumerate().collect();
    let per = chunks.len().div_ceil(threads).max(1);
    let mut groups: Vec<Vec<(usize, &mut [u8])>> = Vec::new();
    let mut current = Vec::new();
    for chunk in chunks {
        current.push(chunk);
        if current.len() == per {
            groups.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    std::thread::scope(|scope| {
        for group in groups {
            scope.spawn(move || {
                for (index, bytes) in group {
                    let mut state = marco::core::sampling::splitmix64(
                        name_seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    for value in bytes.chunks_exact_mut(width) {
                        state = marco::core::sampling::splitmix64(state);
                        let v = offset + scale * ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
                        match dtype {
                            "f32" => value.copy_from_slice(&v.to_le_bytes()),
                            "f16" => value.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                            _ => value.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                        }
                    }
                }
            });
        }
    });
    out
}

fn config_json(c: &marco::model::ModelConfig, dtype: &str) -> serde_json::Value {
    let (architecture, model_type) = match c.architecture {
        marco::model::Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        marco::model::Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let torch_dtype = match dtype {
        "f32" => "float32",
        "f16" => "float16",
        _ => "bfloat16",
    };
    json!({
        "architectures": [architecture],
        "model_type": model_type,
        "torch_dtype": torch_dtype,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 256,
        "eos_token_id": 258,
        "use_sliding_window": false,
    })
}

/// A byte-level BPE over the 256 bytes (GPT-2's byte-to-character map) with no merges, the
/// specials of the ChatML template, and placeholder tokens up to `vocab_size` (so that every id
/// a random model picks decodes to text).
fn tokenizer_json(vocab_size: usize) -> serde_json::Value {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut vocab = BTreeMap::new();
    let mut by_byte: Vec<(u32, u32)> = printable.iter().copied().zip(chars.iter().copied()).collect();
    by_byte.sort_unstable();
    for (byte, ch) in by_byte {
        vocab.insert(char::from_u32(ch).map(String::from).unwrap_or_default(), byte);
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for id in 256 + specials.len()..vocab_size {
        vocab.insert(format!("<x{id}>"), id as u32);
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
}

/// Writes one safetensors shard, tensor by tensor.
fn write_shard(path: &Path, tensors: &[&Spec], dtype: &str, seed: u64) -> Result<()> {
    let width = if dtype == "f32" { 4 } else { 2 };
    let st_dtype = match dtype {
        "f32" => "F32",
        "f16" => "F16",
        _ => "BF16",
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for spec in tensors {
        let bytes = spec.shape.iter().product::<usize>() * width;
        header.insert(
            spec.name.clone(),
            json!({"dtype": st_dtype, "shape": spec.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = serde_json::to_string(&header)?;
    // The data starts 8-byte aligned, as the safetensors writer pads it.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut file =
        BufWriter::with_capacity(8 << 20, File::create(path).with_context(|| format!("creating {}", path.display()))?);
    file.write_all(&(text.len() as u64).to_le_bytes())?;
    file.write_all(text.as_bytes())?;
    for spec in tensors {
        file.write_all(&values(spec, dtype, seed))?;
    }
    file.flush()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !matches!(args.dtype.as_str(), "bf16" | "f16" | "f32") {
        bail!("--dtype must be bf16, f16 or f32, not {:?}", args.dtype);
    }
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("{} exists and is not empty", args.out.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let config = args.shape.config();
    let started = Instant::now();
    let all = specs(&config);
    let width = if args.dtype == "f32" { 4 } else { 2 };
    let shard_bytes = (args.shard_gb.max(0.01) * 1e9) as usize;
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut filled = 0usize;
    for spec in &all {
        let bytes = spec.shape.iter().product::<usize>() * width;
        if filled > 0 && filled + bytes > shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        if let Some(shard) = shards.last_mut() {
            shard.push(spec);
        }
        filled += bytes;
    }
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        write_shard(&args.out.join(&name), shard, &args.dtype, args.seed)?;
        for spec in shard {
            weight_map.insert(spec.name.clone(), json!(name));
            total += spec.shape.iter().product::<usize>() * width;
        }
        eprintln!("wrote {name} ({} tensors)", shard.len());
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(args.out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    std::fs::write(args.out.join("config.json"), serde_json::to_string_pretty(&config_json(&config, &args.dtype))?)?;
    std::fs::write(args.out.join("tokenizer.json"), serde_json::to_string(&tokenizer_json(config.vocab_size))?)?;
    let chat = json!({
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    });
    std::fs::write(args.out.join("tokenizer_config.json"), serde_json::to_string_pretty(&chat)?)?;
    println!(
        "{}: {} tensors, {:.2} GB in {} shards, {:.1} s",
        args.out.display(),
        all.len(),
        total as f64 / 1e9,
        shards.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
