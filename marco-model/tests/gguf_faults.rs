//! Fault tests of the GGUF reader: small files built with [`GgufWriter`] and then broken on
//! purpose must give the documented typed errors (naming the file and the tensor), never a
//! panic; plus a positive test on the real default model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use marco_backend_cpu::quant::GgmlType;
use marco_model::gguf::{GgufFile, GgufValue, GgufWriter};
use marco_model::ModelError;

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("marco-gguf-faults-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small valid file: two metadata entries and three tensors (F32, F16, Q8_0).
fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("llama".into()));
    w.metadata("llama.block_count", GgufValue::U32(1));
    w.metadata(
        "tokenizer.ggml.tokens",
        GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("b".into())]),
    );
    let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    w.tensor_f32("first.weight", &[2, 3], &values);
    let halves: Vec<u8> =
        [1.0f32, -2.0, 0.25, 8.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    w.tensor("second.weight", &[4], GgmlType::F16, halves);
    // One Q8_0 block: scale 0.5, quants -16..16.
    let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    w.tensor("third.weight", &[32], GgmlType::Q8_0, q8);
    w
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Byte position of the tensor-info record of `name` (at its name-length field).
fn tensor_record(bytes: &[u8], name: &str) -> usize {
    let needle: Vec<u8> = (name.len() as u64).to_le_bytes().iter().chain(name.as_bytes()).copied().collect();
    bytes.windows(needle.len()).position(|w| w == needle.as_slice()).expect("tensor record present")
}

/// Position of the type field of a 1- or 2-dimensional tensor's record.
fn type_field(bytes: &[u8], name: &str, n_dims: usize) -> usize {
    tensor_record(bytes, name) + 8 + name.len() + 4 + 8 * n_dims
}

/// Opens a GGUF file, with the error as the model loader reports it.
fn open_gguf(path: impl AsRef<std::path::Path>) -> Result<GgufFile, ModelError> {
    GgufFile::open(path.as_ref()).map_err(ModelError::from)
}

fn assert_names(err: &ModelError, parts: &[&str]) {
    let message = err.to_string();
    for part in parts {
        assert!(message.contains(part), "error message {message:?} does not mention {part:?}");
    }
}

#[test]
fn valid_file_round_trips() {
    let dir = scratch("valid");
    let path = write(&dir, "ok.gguf", &sample_writer().to_bytes());
    let file = open_gguf(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count"), Some(1));
    assert_eq!(file.get_str_array("tokenizer.ggml.tokens"), Some(vec!["a", "b"]));
    assert_eq!(file.tensors().len(), 3);
    let first = file.tensor_info("first.weight").unwrap();
    assert_eq!(first.dims, vec![3, 2]);
    assert_eq!(first.shape(), vec![2, 3]);
    assert_eq!(first.n_elements(), 6);
    assert!(first.offset.is_multiple_of(32));
    let (shape, values) = file.tensor_f32("first.weight").unwrap();
    assert_eq!(shape, vec![2, 3]);
    assert_eq!(values, vec![-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]);
    assert_eq!(file.tensor_f32("second.weight").unwrap().1, vec![1.0, -2.0, 0.25, 8.0]);
    let expected: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
    assert_eq!(file.tensor_f32("third.weight").unwrap().1, expected);
    let err = ModelError::from(file.tensor_info("absent.weight").unwrap_err());
    assert!(matches!(err, ModelError::MissingTensor { ref tensor, .. } if tensor == "absent.weight"));
    assert_names(&err, &["ok.gguf", "absent.weight"]);
}

#[test]
fn missing_file_is_an_io_error() {
    let err = open_gguf("/nonexistent/dir/model.gguf").unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert_names(&err, &["/nonexistent/dir/model.gguf"]);
}

#[test]
fn truncated_files_are_rejected_at_every_length() {
    let dir = scratch("truncated");
    let bytes = sample_writer().to_bytes();
    // Every proper prefix of a valid file must fail cleanly: header, metadata, tensor table
    // or data cut short.
    for len in 0..bytes.len() {
        let path = write(&dir, "cut.gguf", &bytes[..len]);
        let err = open_gguf(&path).expect_err(&format!("prefix of {len} bytes accepted"));
        assert!(
            matches!(err, ModelError::Truncated { .. } | ModelError::Corrupt { .. }),
            "prefix of {len} bytes: unexpected error {err:?}"
        );
        assert_names(&err, &["cut.gguf"]);
    }
    // Cut inside the last tensor's data: the error names that tensor.
    let path = write(&dir, "short-data.gguf", &bytes[..bytes.len() - 1]);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Truncated { .. }), "{err:?}");
    assert_names(&err, &["short-data.gguf", "third.weight"]);
}

#[test]
fn bad_magic_is_corrupt() {
    let dir = scratch("magic");
    let mut bytes = sample_writer().to_bytes();
    bytes[0] ^= 0x20;
    let path = write(&dir, "magic.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &["magic.gguf", "not a GGUF file"]);
}

#[test]
fn bad_versions_are_corrupt() {
    let dir = scratch("version");
    for version in [0u32, 1, 4, 0x0300_0000] {
        let mut bytes = sample_writer().to_bytes();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let path = write(&dir, "version.gguf", &bytes);
        let err = open_gguf(&path).unwrap_err();
        assert!(matches!(err, ModelError::Corrupt { .. }), "version {version}: {err:?}");
        assert_names(&err, &["version.gguf", "version"]);
    }
    // Version 2 has the same layout as version 3 for little-endian files.
    let mut bytes = sample_writer().to_bytes();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let path = write(&dir, "v2.gguf", &bytes);
    assert_eq!(open_gguf(&path).unwrap().version(), 2);
}

#[test]
fn wrong_tensor_counts_are_rejected() {
    let dir = scratch("count");
    // One more tensor than present: the reader runs into the data section.
    let mut bytes = sample_writer().to_bytes();
    bytes[8..16].copy_from_slice(&4u64.to_le_bytes());
    let path = write(&dir, "plus-one.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. } | ModelError::Truncated { .. }), "{err:?}");
    assert_names(&err, &["plus-one.gguf"]);
    // A count no file could hold is refused before anything is allocated.
    for count in [u64::MAX, 1 << 40] {
        bytes[8..16].copy_from_slice(&count.to_le_bytes());
        let path = write(&dir, "huge-count.gguf", &bytes);
        let err = open_gguf(&path).unwrap_err();
        assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
        assert_names(&err, &["huge-count.gguf", "tensor count", &count.to_string()]);
    }
    // Same for the metadata count and an array length.
    let mut bytes = sample_writer().to_bytes();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let path = write(&dir, "huge-kv.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert_names(&err, &["huge-kv.gguf", "metadata count"]);
    let mut bytes = sample_writer().to_bytes();
    let key = b"tokenizer.ggml.tokens";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 4;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let path = write(&dir, "huge-array.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &["huge-array.gguf", "tokenizer.ggml.tokens"]);
}

#[test]
fn unknown_dtype_is_unsupported() {
    let dir = scratch("dtype");
    for bad_id in [4u32, 5, 16, 29, 99, u32::MAX] {
        let mut bytes = sample_writer().to_bytes();
        let at = type_field(&bytes, "second.weight", 1);
        assert_eq!(bytes[at..at + 4], 1u32.to_le_bytes(), "the test located the F16 type field");
        bytes[at..at + 4].copy_from_slice(&bad_id.to_le_bytes());
        let path = write(&dir, "dtype.gguf", &bytes);
        let err = open_gguf(&path).unwrap_err();
        match &err {
            ModelError::UnsupportedDtype { tensor, dtype, .. } => {
                assert_eq!(tensor, "second.weight");
                assert!(dtype.contains(&bad_id.to_string()), "{dtype}");
            }
            other => panic!("type id {bad_id}: expected UnsupportedDtype, got {other:?}"),
        }
        assert_names(&err, &["dtype.gguf", "second.weight"]);
    }
}

#[test]
fn tensor_data_past_the_end_is_truncated() {
    let dir = scratch("past-end");
    let mut bytes = sample_writer().to_bytes();
    let at = type_field(&bytes, "first.weight", 2) + 4;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let path = write(&dir, "past-end.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Truncated { .. }), "{err:?}");
    assert_names(&err, &["past-end.gguf", "first.weight"]);
    // An offset so large that offset + size overflows.
    bytes[at..at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    let path = write(&dir, "overflow.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Truncated { .. }), "{err:?}");
    assert_names(&err, &["overflow.gguf", "first.weight"]);
    // Dimensions whose product overflows.
    let mut bytes = sample_writer().to_bytes();
    let dims_at = tensor_record(&bytes, "first.weight") + 8 + "first.weight".len() + 4;
    bytes[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes[dims_at + 8..dims_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let path = write(&dir, "dims.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &["dims.gguf", "first.weight"]);
}

#[test]
fn misaligned_and_overlapping_offsets_are_corrupt() {
    let dir = scratch("offsets");
    let mut bytes = sample_writer().to_bytes();
    let at = type_field(&bytes, "second.weight", 1) + 4;
    let original = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_eq!(original, 32, "second tensor follows the 24-byte first one at the next 32-byte boundary");
    bytes[at..at + 8].copy_from_slice(&(original + 4).to_le_bytes());
    let path = write(&dir, "misaligned.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &["misaligned.gguf", "second.weight", "alignment"]);

    // Point the third tensor (Q8_0, 34 bytes) at the first one's data.
    let mut bytes = sample_writer().to_bytes();
    let at = type_field(&bytes, "third.weight", 1) + 4;
    bytes[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    let path = write(&dir, "overlap.gguf", &bytes);
    let err = open_gguf(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &["overlap.gguf", "first.weight", "third.weight", "overlap"]);
}

#[test]
fn other_corruptions_are_typed_errors() {
    let dir = scratch("other");
    // A row length that is not a whole number of Q8_0 blocks.
    let mut w = GgufWriter::new();
    w.tensor("odd.weight", &[16], GgmlType::Q8_0, vec![0; 34]);
    let path = write(&dir, "blocks.gguf", &w.to_bytes());
    let err = open_gguf(&path).unwrap_err();
    assert_names(&err, &["blocks.gguf", "odd.weight", "block size"]);
    // A non-power-of-two alignment.
    let mut w = sample_writer();
    w.metadata("general.alignment", GgufValue::U32(24));
    let path = write(&dir, "alignment.gguf", &w.to_bytes());
    let err = open_gguf(&path).unwrap_err();
    assert_names(&err, &["alignment.gguf", "general.alignment"]);
    // Duplicate tensor names.
    let mut w = GgufWriter::new();
    w.tensor_f32("twice", &[1], &[1.0]).tensor_f32("twice", &[1], &[2.0]);
    let path = write(&dir, "twice.gguf", &w.to_bytes());
    let err = open_gguf(&path).unwrap_err();
    assert_names(&err, &["twice.gguf", "twice", "appears twice"]);
    // Invalid UTF-8 in a key and an unknown value type.
    let mut bytes = sample_writer().to_bytes();
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at] = 0xff;
    let path = write(&dir, "utf8.gguf", &bytes);
    assert_names(&open_gguf(&path).unwrap_err(), &["utf8.gguf", "UTF-8"]);
    let mut bytes = sample_writer().to_bytes();
    let type_at = at + key.len();
    bytes[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let path = write(&dir, "value-type.gguf", &bytes);
    assert_names(&open_gguf(&path).unwrap_err(), &["value-type.gguf", "llama.block_count", "77"]);
    // A tensor with zero or too many dimensions.
    for n_dims in [0u32, 5, u32::MAX] {
        let mut bytes = sample_writer().to_bytes();
        let at = tensor_record(&bytes, "second.weight") + 8 + "second.weight".len();
        bytes[at..at + 4].copy_from_slice(&n_dims.to_le_bytes());
        let path = write(&dir, "ndims.gguf", &bytes);
        assert_names(&open_gguf(&path).unwrap_err(), &["ndims.gguf", "second.weight"]);
    }
}

#[test]
fn random_corruption_never_panics() {
    // Flip bytes all over a valid file; every outcome must be Ok or a typed error.
    let dir = scratch("fuzz");
    let clean = sample_writer().to_bytes();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..400 {
        let mut bytes = clean.clone();
        for _ in 0..1 + round % 4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % bytes.len() as u64) as usize;
            bytes[at] = (state >> 32) as u8;
        }
        let path = write(&dir, "fuzz.gguf", &bytes);
        if let Ok(file) = open_gguf(&path) {
            for info in file.tensors() {
                let _ = file.tensor_f32(&info.name);
            }
        }
    }
}

/// The real default model (obtained through `marco_model::fetch`), against values read from
/// the file by an independent Python script (struct-based GGUF parsing and dequantisation).
#[test]
fn real_default_model_metadata_and_tensors() {
    let path = marco_model::fetch::default_model_path().expect("the default model can be fetched");
    let file = open_gguf(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count"), Some(30));
    assert_eq!(file.get_u64("llama.embedding_length"), Some(576));
    assert_eq!(file.get_u64("llama.feed_forward_length"), Some(1536));
    assert_eq!(file.get_u64("llama.attention.head_count"), Some(9));
    assert_eq!(file.get_u64("llama.attention.head_count_kv"), Some(3));
    assert_eq!(file.get_u64("llama.context_length"), Some(8192));
    assert_eq!(file.get_f32("llama.rope.freq_base"), Some(100000.0));
    assert_eq!(file.get_f32("llama.attention.layer_norm_rms_epsilon"), Some(1e-5));
    assert_eq!(file.get_bool("tokenizer.ggml.add_bos_token"), Some(false));
    assert_eq!(file.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(file.get_str("tokenizer.ggml.pre"), Some("smollm"));
    let tokens = file.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(&tokens[..3], &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    assert_eq!(file.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert_eq!(file.get_u64("tokenizer.ggml.eos_token_id"), Some(2));
    assert!(file.get_str("tokenizer.chat_template").unwrap().contains("<|im_start|>"));
    assert_eq!(file.tensors().len(), 272);

    let embd = file.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.shape(), vec![49152, 576]);
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(file.tensor_bytes(embd).unwrap().len(), 49152 * 18 * 34);
    let q = file.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ggml_type, q.shape()), (GgmlType::Q4_1, vec![576, 576]));

    let close = |actual: &[f32], expected: &[f64]| {
        for (a, e) in actual.iter().zip(expected) {
            assert!((f64::from(*a) - e).abs() < 1e-6, "{actual:?} vs {expected:?}");
        }
    };
    let sum = |values: &[f32]| values.iter().map(|&v| f64::from(v)).sum::<f64>();
    let (shape, norm) = file.tensor_f32("output_norm.weight").unwrap();
    assert_eq!(shape, vec![576]);
    close(&norm[..4], &[1.7578125, 1.8203125, 1.78125, 1.6015625]);
    assert!((sum(&norm) - 1038.33203125).abs() < 1e-3);
    let (_, embd) = file.tensor_f32("token_embd.weight").unwrap();
    let row1 = &embd[576..2 * 576];
    close(&row1[..4], &[-0.0238037109375, -0.015869140625, -0.0396728515625, 0.015869140625]);
    assert!((sum(row1) - 0.35922718048095703).abs() < 1e-4);
    let last = &embd[49151 * 576..];
    close(&last[..4], &[0.011505126953125, 0.0057525634765625, 0.0977935791015625, -0.0977935791015625]);
    assert!((sum(last) + 0.4662208557128906).abs() < 1e-4);
    let (_, q) = file.tensor_f32("blk.0.attn_q.weight").unwrap();
    close(&q[..4], &[-0.0963134765625, 0.1573486328125, -0.0963134765625, -0.73046875]);
    assert!((sum(&q[..576]) - 1.00726318359375).abs() < 1e-4);
}
