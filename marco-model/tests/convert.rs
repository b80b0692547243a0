//! "Convert once": Hugging Face checkpoints (the `tiny-qwen2` and `tiny-llama` oracles in
//! `tests/data`) written as GGUF by `marco_model::convert` read back with the right tensors,
//! types and metadata, load through `loader::load` and compute what the Hugging Face directory
//! computes, within each format's rounding; broken inputs are typed errors that leave no file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use burn_ndarray::NdArray;
use marco_core::{LanguageModel, Tokenizer};
use marco_formats::GgmlType;
use marco_model::convert::{convert_hf_dir, convert_hf_dir_with, ConvertTarget};
use marco_model::gguf::{GgufFile, GgufValue, GgufWriter};
use marco_model::loader::{GgufWeights, HfWeights, WeightSource};
use marco_model::tokenizer::MarcoTokenizer;
use marco_model::{BurnLm, LinearPath, ModelConfig, ModelError, RopeFreqRounding, Transformer};

type Cpu = NdArray;

/// `tests/data` of this crate (or of the working directory when run from elsewhere).
fn data(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let root = if built.exists() { built } else { PathBuf::from("tests/data") };
    root.join(name)
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("marco-convert-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn partial_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", path.display()))
}

/// A writable copy of a checkpoint directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The input sequences of the oracle's cases.
fn oracle_inputs(name: &str) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(data(name).join("oracle.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect()
}

/// The GGUF tensor names in the order the converter writes them, with their row-major shapes.
fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, ff) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.intermediate_size);
    let mut out = vec![("token_embd.weight".to_string(), vec![config.vocab_size, h])];
    for l in 0..config.num_layers {
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("blk.{l}.{name}"), shape));
        add("attn_norm.weight", vec![h]);
        for (short, rows) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
            add(&format!("{short}.weight"), vec![rows, h]);
            if config.qkv_bias {
                add(&format!("{short}.bias"), vec![rows]);
            }
        }
        add("attn_output.weight", vec![h, q]);
        add("ffn_norm.weight", vec![h]);
        add("ffn_gate.weight", vec![ff, h]);
        add("ffn_up.weight", vec![ff, h]);
        add("ffn_down.weight", vec![h, ff]);
    }
    out.push(("output_norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        out.push(("output.weight".to_string(), vec![config.vocab_size, h]));
    }
    out
}

/// The Hugging Face name of a GGUF tensor name (for comparing weights).
fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (short, suffix) = rest.rsplit_once('.').unwrap();
    let module = match short {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("unexpected tensor {other}"),
    };
    format!("model.layers.{layer}.{module}.{suffix}")
}

/// Logits after each of `inputs`, from a fresh sequence of `lm`.
fn logits_after(lm: &mut BurnLm<Cpu>, inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    inputs
        .iter()
        .map(|ids| {
            let seq = lm.new_sequence(ids).unwrap();
            let logits = lm.pending_logits(seq).unwrap();
            lm.release(seq).unwrap();
            logits
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

/// How far `loader::load` of a converted file may move the logits of these random-weight
/// models (logits within about ±40) from the Hugging Face directory's, per target. Measured:
/// F32 0 (tiny-llama) and 1.4e-3 (tiny-qwen2, whose directory rounds the rotary frequencies to
/// bf16 and the GGUF file does not); F16 1e-2; BF16 8e-2; Q8_0 0.28; Q4_0 3.6 (random weights
/// have no structure to spare: a 4-bit grid moves every logit). These bounds only catch gross
/// faults; the exact comparison with simulated rounding is what pins every weight's place.
fn end_to_end_bound(target: ConvertTarget) -> f32 {
    match target {
        ConvertTarget::F32 => 5e-3,
        ConvertTarget::F16 => 3e-2,
        ConvertTarget::Bf16 => 0.25,
        ConvertTarget::Q8_0 => 0.75,
        _ => 8.0,
    }
}

/// The checkpoint's weights with every matrix rounded through `target` (quantized and
/// dequantized in Hugging Face row order): what a correct conversion stores, as f32.
struct RoundTrip<'a> {
    inner: &'a HfWeights,
    target: ConvertTarget,
}

impl WeightSource for RoundTrip<'_> {
    fn origin(&self) -> &Path {
        self.inner.origin()
    }

    fn tensor(&self, name: &str, expected: &[usize]) -> marco_model::Result<Vec<f32>> {
        let values = self.inner.tensor(name, expected)?;
        if expected.len() != 2 {
            return Ok(values);
        }
        let ty = self.target.ggml_type();
        let mut bytes = vec![0u8; marco_formats::quant::row_bytes(ty, values.len()).unwrap()];
        marco_formats::quant::quantize_into(ty, &values, &mut bytes).unwrap();
        Ok(marco_formats::quant::dequantize(ty, &bytes, values.len()).unwrap())
    }
}

/// Logits after each of `inputs` of the network `config` built from `weights`, on burn's
/// plain matmul (every linear weight dense f32, so equal weights give equal logits).
fn transformer_logits(config: &ModelConfig, weights: &dyn WeightSource, inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let model = Transformer::<Cpu>::load(config.clone(), weights, LinearPath::Burn, &Default::default()).unwrap();
    let vocab = config.vocab_size;
    logits_after(&mut BurnLm::new(model, Box::new(IdsOnly(vocab))), inputs)
}

/// A tokenizer for feeding ids directly.
struct IdsOnly(usize);

impl Tokenizer for IdsOnly {
    fn encode(&self, _: &str, _: bool) -> marco_core::Result<Vec<u32>> {
        Err(marco_core::Error::Tokenizer("ids only".into()))
    }
    fn decode(&self, tokens: &[u32], _: bool) -> marco_core::Result<String> {
        Ok(format!("{tokens:?}"))
    }
    fn vocab_size(&self) -> usize {
        self.0
    }
    fn stop_tokens(&self) -> &[u32] {
        &[]
    }
    fn apply_chat_template(&self, _: &[marco_core::ChatMessage], _: bool) -> marco_core::Result<String> {
        Err(marco_core::Error::Tokenizer("ids only".into()))
    }
}

/// Converts `name` to every target and checks the file, its weights and its logits.
fn converts_to_every_target(name: &str) {
    let dir = data(name);
    let out_dir = scratch(&format!("targets-{name}"));
    let hf_config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let hf_weights = HfWeights::open(&dir).unwrap();
    let inputs = oracle_inputs(name);
    let mut hf_lm = marco_model::load::<Cpu>(&dir, &Default::default()).unwrap();
    let reference = logits_after(&mut hf_lm, &inputs);
    let expected = expected_tensors(&hf_config);

    for target in ConvertTarget::ALL {
        let out = out_dir.join(format!("{name}.{target}.gguf"));
        let mut seen = Vec::new();
        let report = convert_hf_dir_with(&dir, &out, target, |p| seen.push((p.index, p.name.to_string()))).unwrap();
        assert_eq!(report.tensors, expected.len());
        assert_eq!(report.output, out);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), report.bytes_written);
        assert!(!partial_of(&out).exists());
        assert_eq!(seen.len(), expected.len(), "one progress call per tensor");

        // (a) The file: tensors in llama.cpp's order, shapes and types as planned.
        let file = GgufFile::open(&out).unwrap();
        let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, expected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), "{name} {target}");
        for (info, (_, shape)) in file.tensors().iter().zip(&expected) {
            assert_eq!(&info.shape(), shape, "{}", info.name);
            let want = if shape.len() == 1 { GgmlType::F32 } else { target.ggml_type() };
            assert_eq!(info.ggml_type, want, "{name} {target} {}", info.name);
        }
        let arch = hf_config.architecture.gguf_prefix();
        assert_eq!(file.architecture().unwrap(), arch);
        assert_eq!(file.get_u64("general.file_type"), Some(u64::from(target.file_type())));
        assert_eq!(file.get_u64("general.quantization_version"), Some(2));
        assert_eq!(file.get_str("general.name"), Some(name));
        assert_eq!(file.get(&format!("{arch}.block_count")), Some(&GgufValue::U32(hf_config.num_layers as u32)));
        assert_eq!(file.get(&format!("{arch}.rope.freq_base")), Some(&GgufValue::F32(hf_config.rope_theta)));
        assert_eq!(
            file.get(&format!("{arch}.attention.layer_norm_rms_epsilon")),
            Some(&GgufValue::F32(hf_config.rms_norm_eps))
        );
        if arch == "llama" {
            assert_eq!(file.get_u64("llama.rope.dimension_count"), Some(hf_config.head_dim as u64));
        }
        assert!(
            matches!(file.get("tokenizer.ggml.token_type"), Some(GgufValue::Array(t)) if matches!(t[0], GgufValue::I32(_)))
        );
        // An empty merges list is still typed as strings (llama.cpp checks).
        assert!(matches!(file.get("tokenizer.ggml.merges"), Some(GgufValue::EmptyArray { item_type: 8 })));

        // marco's own GGUF readers get the same model back.
        let config = ModelConfig::from_gguf(&file).unwrap();
        assert_eq!(ModelConfig { rope_freq_rounding: hf_config.rope_freq_rounding, ..config.clone() }, hf_config);
        assert_eq!(config.rope_freq_rounding, RopeFreqRounding::None);
        let tokenizer = MarcoTokenizer::from_gguf(&file).unwrap();
        assert_eq!(tokenizer.vocab_size(), hf_config.vocab_size);
        assert_eq!(tokenizer.id_to_token(5).as_deref(), Some("<t5>"));
        assert_eq!(tokenizer.bos_token(), Some(1));
        assert_eq!(tokenizer.eos_tokens(), &[2]);

        // Weights, through the loader's GGUF reader (which undoes the q/k interleaving): equal
        // to the checkpoint's where the target represents them exactly.
        let gguf_weights = GgufWeights::new(&file, &config);
        for (gguf_name, shape) in &expected {
            let hf = hf_weights.tensor(&hf_name(gguf_name), shape).unwrap();
            let ours = gguf_weights.tensor(&hf_name(gguf_name), shape).unwrap();
            let worst = hf.iter().zip(&ours).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let scale = hf.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let bound = match (shape.len(), target) {
                (1, _) | (_, ConvertTarget::F32) => 0.0,
                (_, ConvertTarget::Bf16) if name == "tiny-qwen2" => 0.0, // a bf16 checkpoint
                (_, ConvertTarget::F16 | ConvertTarget::Bf16) => scale / 256.0,
                (_, ConvertTarget::Q8_0) => scale / 127.0,
                // One step at a clipped end, plus the f16 rounding of the scale.
                _ => scale / 8.0 * 1.01,
            };
            assert!(worst <= bound, "{name} {target} {gguf_name}: max |diff| {worst} > {bound}");
        }

        // (b) The model. Exactly: the file's weights (through the loader's GGUF reader) and the
        // checkpoint's rounded through the same format in Hugging Face order, each run with the
        // directory's config on burn's plain matmul, give the same logits: every weight is in
        // its place, and rounding rows commutes with permuting them.
        let converted = transformer_logits(&hf_config, &gguf_weights, &inputs);
        let simulated = transformer_logits(&hf_config, &RoundTrip { inner: &hf_weights, target }, &inputs);
        let exact = max_abs_diff(&converted, &simulated);
        assert!(exact <= 1e-5, "{name} {target}: converted vs simulated rounding: max |logit diff| {exact}");

        // End to end: `loader::load` of the file (its own config and tokenizer) against the
        // directory, within the format's rounding.
        let mut lm = marco_model::load::<Cpu>(&out, &Default::default()).unwrap();
        let diff = max_abs_diff(&logits_after(&mut lm, &inputs), &reference);
        eprintln!("{name} {target}: max |logit diff| vs simulated {exact:.1e}, vs the directory {diff:.2e}");
        assert!(diff < end_to_end_bound(target), "{name} {target}: max |logit diff| {diff}");
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn tiny_qwen2_converts_to_every_target() {
    converts_to_every_target("tiny-qwen2");
}

#[test]
fn tiny_llama_converts_to_every_target() {
    converts_to_every_target("tiny-llama");
}

/// Copies the GGUF file `from` to `to`, replacing the data of each tensor for which
/// `edit(name, data, rows)` returns some.
fn rewrite_tensor(from: &Path, to: &Path, edit: impl Fn(&str, &[u8], usize) -> Option<Vec<u8>>) {
    let file = GgufFile::open(from).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        w.metadata(key.clone(), value.clone());
    }
    for info in file.tensors() {
        let bytes = file.tensor_bytes(info).unwrap();
        let rows = info.shape()[0];
        let data = edit(&info.name, bytes, rows).unwrap_or_else(|| bytes.to_vec());
        w.tensor(info.name.clone(), &info.dims, info.ggml_type, data);
    }
    w.write(to).unwrap();
}

#[test]
fn a_wrong_layout_is_caught() {
    // The exact comparison must fail on the mistakes a converter can make: q rows written in
    // Hugging Face order (no interleaving) for Llama, or two same-shaped tensors swapped; in
    // the coarsest format too.
    let out_dir = scratch("negative");
    for (name, target) in [("tiny-llama", ConvertTarget::Q4_0), ("tiny-qwen2", ConvertTarget::Q4_0)] {
        let dir = data(name);
        let hf_config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let hf_weights = HfWeights::open(&dir).unwrap();
        let inputs = oracle_inputs(name);
        let simulated = transformer_logits(&hf_config, &RoundTrip { inner: &hf_weights, target }, &inputs);
        let logits_of = |path: &Path| {
            let file = GgufFile::open(path).unwrap();
            transformer_logits(&hf_config, &GgufWeights::new(&file, &hf_config), &inputs)
        };
        let good = out_dir.join(format!("{name}.gguf"));
        convert_hf_dir(&dir, &good, target).unwrap();
        let good_diff = max_abs_diff(&logits_of(&good), &simulated);
        assert!(good_diff <= 1e-5, "{name}: {good_diff}");

        let bad = out_dir.join(format!("{name}.bad.gguf"));
        if name == "tiny-llama" {
            // Undo the interleaving of layer 1's q rows (stored row 2i + j <- row j * half + i).
            let head_dim = hf_config.head_dim;
            rewrite_tensor(&good, &bad, |tensor, bytes, rows| {
                (tensor == "blk.1.attn_q.weight").then(|| {
                    let row = bytes.len() / rows;
                    let mut out = bytes.to_vec();
                    for r in 0..rows {
                        let (head, within) = (r / head_dim, r % head_dim);
                        let hf = head * head_dim + (within % 2) * (head_dim / 2) + within / 2;
                        out[hf * row..(hf + 1) * row].copy_from_slice(&bytes[r * row..(r + 1) * row]);
                    }
                    out
                })
            });
        } else {
            let file = GgufFile::open(&good).unwrap();
            let up = file.tensor_bytes(file.tensor_info("blk.0.ffn_up.weight").unwrap()).unwrap().to_vec();
            let gate = file.tensor_bytes(file.tensor_info("blk.0.ffn_gate.weight").unwrap()).unwrap().to_vec();
            rewrite_tensor(&good, &bad, |tensor, _, _| match tensor {
                "blk.0.ffn_gate.weight" => Some(up.clone()),
                "blk.0.ffn_up.weight" => Some(gate.clone()),
                _ => None,
            });
        }
        let bad_diff = max_abs_diff(&logits_of(&bad), &simulated);
        eprintln!("{name} {target}: correct layout {good_diff:.1e}, wrong layout {bad_diff:.2e}");
        assert!(bad_diff > 0.1, "{name}: a wrong layout moved logits by only {bad_diff}");
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn a_truncated_shard_is_a_typed_error_and_leaves_no_file() {
    let dir = scratch("truncated");
    let model = dir.join("tiny-qwen2");
    copy_dir(&data("tiny-qwen2"), &model);
    let shard = model.join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len - 100).unwrap();

    // A file from an earlier run stays as it was.
    let out = dir.join("out.gguf");
    std::fs::write(&out, b"an earlier file").unwrap();
    let err = convert_hf_dir(&model, &out, ConvertTarget::Q8_0).unwrap_err();
    assert!(matches!(&err, ModelError::Truncated { path, .. } if path == &shard), "{err:?}");
    assert_eq!(std::fs::read(&out).unwrap(), b"an earlier file");
    assert!(!partial_of(&out).exists());

    // Cut inside the header: also Truncated, and nothing written.
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(40).unwrap();
    let fresh = dir.join("fresh.gguf");
    let err = convert_hf_dir(&model, &fresh, ConvertTarget::F16).unwrap_err();
    assert!(matches!(err, ModelError::Truncated { .. }), "{err:?}");
    assert!(!fresh.exists() && !partial_of(&fresh).exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_checkpoints_are_typed_errors_and_leave_no_file() {
    let dir = scratch("bad");
    let out = dir.join("out.gguf");
    let check = |model: &Path, what: &str, matches: fn(&ModelError) -> bool| {
        let err = convert_hf_dir(model, &out, ConvertTarget::Q4_0).unwrap_err();
        assert!(matches(&err), "{what}: {err:?}");
        assert!(!out.exists() && !partial_of(&out).exists(), "{what}");
    };

    // No directory at all.
    check(&dir.join("absent"), "absent", |e| matches!(e, ModelError::Io { .. }));

    // A tensor missing from the index's shards.
    let model = dir.join("missing");
    copy_dir(&data("tiny-qwen2"), &model);
    let index_path = model.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove("model.layers.2.mlp.down_proj.weight");
    std::fs::write(&index_path, index.to_string()).unwrap();
    check(
        &model,
        "missing tensor",
        |e| matches!(e, ModelError::MissingTensor { tensor, .. } if tensor == "model.layers.2.mlp.down_proj.weight"),
    );

    // A shape the config does not imply.
    let model = dir.join("shape");
    copy_dir(&data("tiny-llama"), &model);
    let config_path = model.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("\"intermediate_size\": 192", "\"intermediate_size\": 160");
    std::fs::write(&config_path, text).unwrap();
    check(&model, "shape", |e| matches!(e, ModelError::ShapeMismatch { .. }));

    // A tokenizer with more tokens than the embedding has rows.
    let model = dir.join("vocab");
    copy_dir(&data("tiny-llama"), &model);
    let tokenizer_path = model.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer_path).unwrap()).unwrap();
    tokenizer["added_tokens"] = serde_json::json!([{"id": 1500, "content": "<|extra|>", "special": true}]);
    std::fs::write(&tokenizer_path, tokenizer.to_string()).unwrap();
    check(&model, "vocab", |e| matches!(e, ModelError::VocabMismatch { tokenizer: 1501, model: 1024, .. }));

    // A BPE tokenizer whose pre-tokenizer llama.cpp would not reproduce.
    let model = dir.join("pre");
    copy_dir(&data("tiny-llama"), &model);
    std::fs::write(
        model.join("tokenizer.json"),
        bpe_tokenizer_json(
            &serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first"}),
        ),
    )
    .unwrap();
    check(&model, "pre-tokenizer", |e| matches!(e, ModelError::Tokenizer(m) if m.contains("Metaspace")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GPT-2's byte-to-character table (bytes that are printable stand for themselves).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// A small byte-level BPE `tokenizer.json`: three special tokens (ids 0-2), the 256 byte
/// tokens, the results of a few merges, and one added token that is not special.
fn bpe_tokenizer_json(pre_tokenizer: &serde_json::Value) -> String {
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for (id, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), id.into());
    }
    for c in byte_chars() {
        let id = vocab.len();
        vocab.insert(c.to_string(), id.into());
    }
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
        ("o", "n"),
        ("Ġ", "s"),
        ("a", "t"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("l", "d"),
        ("Ġwor", "ld"),
        ("1", "2"),
    ];
    for (a, b) in merges {
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), id.into());
    }
    let merges: Vec<serde_json::Value> = merges.iter().map(|(a, b)| serde_json::json!([a, b])).collect();
    let added = |id: usize, content: &str, special: bool| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": !special, "special": special})
    };
    let mut added_tokens: Vec<serde_json::Value> =
        specials.iter().enumerate().map(|(id, s)| added(id, s, true)).collect();
    added_tokens.push(added(300, "<custom>", false));
    vocab.insert("<custom>".into(), 300.into());
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    })
    .to_string()
}

/// The split regex of Qwen2's `tokenizer.json`.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[test]
fn a_bpe_tokenizer_survives_conversion() {
    let dir = scratch("bpe");
    let gpt2 =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let qwen2 = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    for (pre, pre_tokenizer) in [("gpt-2", gpt2), ("qwen2", qwen2)] {
        let model = dir.join(pre);
        copy_dir(&data("tiny-qwen2"), &model);
        std::fs::write(model.join("tokenizer.json"), bpe_tokenizer_json(&pre_tokenizer)).unwrap();
        let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                        {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let tokenizer_config = serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "add_bos_token": false, "chat_template": template});
        std::fs::write(model.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
        let out = dir.join(format!("{pre}.gguf"));
        convert_hf_dir(&model, &out, ConvertTarget::Q8_0).unwrap();

        let file = GgufFile::open(&out).unwrap();
        assert_eq!(file.get_str("tokenizer.ggml.pre"), Some(pre));
        let merges = file.get_str_array("tokenizer.ggml.merges").unwrap();
        assert_eq!((merges.len(), merges[2]), (15, "Ġt he"));
        let types = file.get_i64_array("tokenizer.ggml.token_type").unwrap();
        let tokens = file.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len(), 1024);
        assert_eq!((&types[..3], types[3], types[300]), (&[3, 3, 3][..], 1, 4));
        assert_eq!((tokens[400], types[400]), ("[PAD400]", 5));
        // bos from config.json, eos and padding from tokenizer_config.json's added tokens.
        assert_eq!(file.get_u64("tokenizer.ggml.bos_token_id"), Some(1));
        assert_eq!(file.get_u64("tokenizer.ggml.eos_token_id"), Some(2));
        assert_eq!(file.get_u64("tokenizer.ggml.padding_token_id"), Some(0));
        assert_eq!(file.get_bool("tokenizer.ggml.add_bos_token"), Some(false));

        let hf = MarcoTokenizer::from_hf_dir(&model).unwrap();
        let gguf = MarcoTokenizer::from_gguf(&file).unwrap();
        for text in ["the world", " the world 12 in", "hello <custom> there", "<|im_start|>user\nthe<|im_end|>"] {
            for special in [false, true] {
                let ids = hf.encode(text, special).unwrap();
                assert_eq!(gguf.encode(text, special).unwrap(), ids, "{pre} {text:?} special={special}");
                assert_eq!(gguf.decode(&ids, false).unwrap(), hf.decode(&ids, false).unwrap());
            }
        }
        assert!(gguf.encode(" the world", false).unwrap().len() == 2, "merges applied");
        let messages = [marco_core::ChatMessage::user("hi")];
        assert_eq!(
            gguf.apply_chat_template(&messages, true).unwrap(),
            hf.apply_chat_template(&messages, true).unwrap()
        );
        assert!(gguf.stop_tokens().contains(&2));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
