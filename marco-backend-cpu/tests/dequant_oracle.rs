//! Checks the scalar dequantizers against gguf-py (ggml's own numpy codecs), an independent
//! implementation: random blocks of every supported type, and real tensors of the default model.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::io::{Read, Seek, SeekFrom};

use marco_backend_cpu::{dequantize, row_bytes, GgmlType};
use serde_json::Value;

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn type_by_name(name: &str) -> GgmlType {
    GgmlType::ALL.into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("unknown type {name}"))
}

#[test]
fn random_blocks_match_gguf_py() {
    let oracle: Value = serde_json::from_str(include_str!("data/dequant_oracle.json")).unwrap();
    let cases = oracle["cases"].as_array().unwrap();
    assert!(cases.len() >= 13);
    for case in cases {
        let ty = type_by_name(case["type"].as_str().unwrap());
        assert_eq!(GgmlType::from_id(case["id"].as_u64().unwrap() as u32), Some(ty));
        let n = case["n_elements"].as_u64().unwrap() as usize;
        let data = hex_to_bytes(case["hex"].as_str().unwrap());
        assert_eq!(row_bytes(ty, n).unwrap(), data.len(), "{ty}");
        let got = dequantize(ty, &data, n).unwrap();
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{ty} element {i}: got {g}, gguf-py {w}");
        }
    }
}

/// The default model, if the environment names it (`MARCO_TEST_GGUF`); tests skip otherwise.
fn default_model() -> Option<std::fs::File> {
    match std::env::var_os("MARCO_TEST_GGUF") {
        Some(path) => Some(std::fs::File::open(path).expect("MARCO_TEST_GGUF names an unreadable file")),
        None => {
            eprintln!("skipping: set MARCO_TEST_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run this test");
            None
        }
    }
}

#[test]
fn real_model_tensors_match_gguf_py() {
    let Some(mut file) = default_model() else { return };
    let oracle: Value = serde_json::from_str(include_str!("data/smollm2_q4_1_oracle.json")).unwrap();
    for tensor in oracle["tensors"].as_array().unwrap() {
        let name = tensor["name"].as_str().unwrap();
        let ty = type_by_name(tensor["type"].as_str().unwrap());
        let n = tensor["n_elements"].as_u64().unwrap() as usize;
        let mut data = vec![0u8; tensor["n_bytes"].as_u64().unwrap() as usize];
        file.seek(SeekFrom::Start(tensor["data_offset"].as_u64().unwrap())).unwrap();
        file.read_exact(&mut data).unwrap();
        let values = dequantize(ty, &data, n).unwrap();
        for (i, w) in tensor["first"].as_array().unwrap().iter().enumerate() {
            assert_eq!(values[i], w.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let sum_sq: f64 = values.iter().map(|&v| v as f64 * v as f64).sum();
        let min = values.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        assert!(close(sum, tensor["sum"].as_f64().unwrap()), "{name}: sum {sum}");
        assert!(close(sum_sq, tensor["sum_sq"].as_f64().unwrap()), "{name}: sum_sq {sum_sq}");
        assert_eq!(min, tensor["min"].as_f64().unwrap(), "{name}: min");
        assert_eq!(max, tensor["max"].as_f64().unwrap(), "{name}: max");
        // Sanity of the weights themselves: finite, and not degenerate.
        assert!(values.iter().all(|v| v.is_finite()), "{name}: non-finite value");
        let mean_sq = sum_sq / n as f64;
        assert!(mean_sq > 1e-6 && mean_sq < 10.0, "{name}: mean square {mean_sq}");
    }
}
