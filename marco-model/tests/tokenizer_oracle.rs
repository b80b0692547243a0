//! Tokenizers against independent oracles: llama.cpp's tokenisation of SmolLM2 (the GGUF
//! tokenizer must reproduce every case token for token), the same vocabulary loaded through
//! the Hugging Face directory path, the synthetic `tiny-llama` tokenizer, and SmolLM2's own
//! chat template producing exactly the text that llama.cpp was given.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use marco_core::{ChatMessage, Tokenizer};
use marco_model::gguf::GgufFile;
use marco_model::tokenizer::{ChatTemplate, MarcoTokenizer, StreamingDecoder};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Oracle {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    text: String,
    token_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn oracle() -> Oracle {
    let path = data_dir().join("llamacpp/smollm2-135m-instruct-q4_1.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The default model's tokenizer, built once from its GGUF metadata.
fn smollm2() -> &'static MarcoTokenizer {
    static TOKENIZER: OnceLock<MarcoTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = marco_model::fetch::default_model_path().expect("the default model can be fetched");
        MarcoTokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
    })
}

fn check_against_llamacpp(tokenizer: &MarcoTokenizer) {
    let oracle = oracle();
    assert_eq!(oracle.cases.len(), 10);
    for case in &oracle.cases {
        let ids = tokenizer.encode(&case.text, true).unwrap();
        assert_eq!(ids, case.token_ids, "case {}: tokenisation differs from llama.cpp", case.name);
        let text = tokenizer.decode(&case.greedy_ids, true).unwrap();
        assert_eq!(text, case.greedy_text, "case {}: detokenisation differs from llama.cpp", case.name);
        // The prompt round-trips when special tokens are kept.
        assert_eq!(tokenizer.decode(&case.token_ids, false).unwrap(), case.text, "case {}", case.name);
    }
}

#[test]
fn gguf_tokenizer_matches_llamacpp_on_every_case() {
    let tokenizer = smollm2();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_token(), Some(1));
    assert!(!tokenizer.adds_bos());
    assert_eq!(tokenizer.eos_tokens(), &[2]);
    // <|im_end|> (the EOS) and <|endoftext|> both end a generation.
    assert!(tokenizer.is_stop(2) && tokenizer.is_stop(0));
    assert!(!tokenizer.is_stop(1));
    check_against_llamacpp(tokenizer);
}

#[test]
fn special_tokens_are_text_without_parse_special() {
    let tokenizer = smollm2();
    let text = "<|im_start|>user\nhi<|im_end|>";
    let parsed = tokenizer.encode(text, true).unwrap();
    assert_eq!(parsed.first(), Some(&1));
    assert_eq!(parsed.last(), Some(&2));
    let plain = tokenizer.encode(text, false).unwrap();
    assert!(!plain.iter().any(|&id| id < 17), "no control token from plain text: {plain:?}");
    assert!(plain.len() > parsed.len());
    assert_eq!(tokenizer.decode(&plain, true).unwrap(), text);
    // skip_special drops control tokens, keeps everything else.
    assert_eq!(tokenizer.decode(&parsed, true).unwrap(), "user\nhi");
    assert_eq!(tokenizer.decode(&parsed, false).unwrap(), text);
    // Out-of-range ids are an error, not silently dropped.
    assert!(matches!(
        tokenizer.decode(&[5, 49152], false),
        Err(marco_core::Error::TokenOutOfRange { token: 49152, vocab_size: 49152 })
    ));
    assert_eq!(tokenizer.encode("", true).unwrap(), Vec::<u32>::new());
}

#[test]
fn smollm2_chat_template_renders_the_oracle_prompt() {
    let oracle = oracle();
    let case = oracle.cases.iter().find(|c| c.name == "chat-math").unwrap();
    let system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    let user = "Janet has 3 apples and buys 5 more. How many apples does she have now?";
    let messages = [ChatMessage::system(system), ChatMessage::user(user)];

    // The template shipped in the GGUF, through the Tokenizer trait.
    let tokenizer = smollm2();
    assert_eq!(tokenizer.apply_chat_template(&messages, true).unwrap(), case.text);
    // Without a system message the template inserts the same default one.
    assert_eq!(tokenizer.apply_chat_template(&messages[1..], true).unwrap(), case.text);
    let without_prompt = tokenizer.apply_chat_template(&messages, false).unwrap();
    assert_eq!(format!("{without_prompt}<|im_start|>assistant\n"), case.text);
    // And the rendered text tokenises to llama.cpp's ids.
    let ids = tokenizer.encode(&tokenizer.apply_chat_template(&messages, true).unwrap(), true).unwrap();
    assert_eq!(ids, case.token_ids);

    // The copy in tests/data is that same template.
    let source = std::fs::read_to_string(data_dir().join("smollm2-chat-template.jinja")).unwrap();
    assert_eq!(tokenizer.chat_template().unwrap().source(), source);
    let template = ChatTemplate::new(source, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
    assert_eq!(template.render(&messages, true).unwrap(), case.text);
}

#[test]
fn streaming_decode_never_splits_a_character() {
    let tokenizer = smollm2();
    let mut held_back = 0;
    for case in &oracle().cases {
        for (ids, skip) in [(&case.greedy_ids, true), (&case.token_ids, false)] {
            let mut stream = StreamingDecoder::new(skip);
            let mut text = String::new();
            for &id in ids {
                match stream.step(tokenizer, id).unwrap() {
                    Some(piece) => {
                        assert!(!piece.contains('\u{FFFD}'), "case {}: piece {piece:?}", case.name);
                        text.push_str(&piece);
                    }
                    None => held_back += 1,
                }
            }
            if let Some(rest) = stream.finish(tokenizer).unwrap() {
                text.push_str(&rest);
            }
            assert_eq!(text, tokenizer.decode(ids, skip).unwrap(), "case {}", case.name);
        }
    }
    // The unicode and Chinese cases split characters over tokens: some steps had to wait.
    assert!(held_back > 0);
}

/// The same SmolLM2 vocabulary saved as a Hugging Face directory (tokenizer.json written by
/// `tokenizers`, plus the config files in their various forms) must tokenise identically.
#[test]
fn hf_directory_path_matches_llamacpp() {
    let gguf = smollm2();
    let dir = std::env::temp_dir().join(format!("marco-hf-smollm2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    gguf.inner().save(dir.join("tokenizer.json"), false).unwrap();
    let template = gguf.chat_template().unwrap().source().to_string();
    let tokenizer_config = serde_json::json!({
        "add_bos_token": false,
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": [{"name": "tool_use", "template": "{{ 'tools!' }}"}, {"name": "default", "template": template}],
    });
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
    let tokenizer = MarcoTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.eos_tokens(), &[2, 0]);
    assert_eq!(tokenizer.bos_token(), Some(1));
    check_against_llamacpp(&tokenizer);
    let case = oracle().cases.into_iter().find(|c| c.name == "chat-capital").unwrap();
    let messages = [ChatMessage::user("What is the capital of France?")];
    assert_eq!(tokenizer.apply_chat_template(&messages, true).unwrap(), case.text);

    // A chat_template.jinja file takes precedence, and add_bos_token prepends BOS once.
    std::fs::write(dir.join("chat_template.jinja"), "{{ bos_token }}{{ messages[0]['content'] }}").unwrap();
    let config = serde_json::json!({"add_bos_token": true, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = MarcoTokenizer::from_hf_dir(&dir).unwrap();
    let text = tokenizer.apply_chat_template(&[ChatMessage::user("Hi")], false).unwrap();
    assert_eq!(text, "<|im_start|>Hi");
    let with_bos = tokenizer.encode(&text, true).unwrap();
    assert_eq!(with_bos[0], 1);
    assert_ne!(with_bos[1], 1, "BOS is not doubled: {with_bos:?}");
    assert_eq!(tokenizer.encode("Hi", true).unwrap()[0], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiny_llama_hf_directory() {
    let dir = data_dir().join("tiny-llama");
    let tokenizer = MarcoTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tokenizer.vocab_size(), 1024);
    assert_eq!(tokenizer.bos_token(), Some(1));
    assert!(!tokenizer.adds_bos());
    assert_eq!(tokenizer.eos_tokens(), &[2]);
    assert_eq!(tokenizer.stop_tokens(), &[2]);
    assert_eq!(tokenizer.encode("<t5> <t17>  <t1023>", true).unwrap(), vec![5, 17, 1023]);
    assert_eq!(tokenizer.decode(&[5, 17, 1023], false).unwrap(), "<t5> <t17> <t1023>");
    assert!(tokenizer.decode(&[1024], false).is_err());
    // No template anywhere in the directory: a clear error.
    let err = tokenizer.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");

    // The same directory with a plain-string template and special tokens in tokenizer_config.json.
    let copy = std::env::temp_dir().join(format!("marco-tiny-llama-{}", std::process::id()));
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["tokenizer.json", "config.json", "generation_config.json"] {
        std::fs::copy(dir.join(file), copy.join(file)).unwrap();
    }
    let config = serde_json::json!({
        "bos_token": "<t1>",
        "eos_token": "<t3>",
        "add_bos_token": true,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {{ eos_token }} {% endfor %}\n{% if add_generation_prompt %}<t9>{% endif %}",
    });
    std::fs::write(copy.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = MarcoTokenizer::load(&copy).unwrap();
    // EOS from tokenizer_config.json first, then generation_config.json's.
    assert_eq!(tokenizer.eos_tokens(), &[3, 2]);
    assert!(tokenizer.adds_bos());
    let text =
        tokenizer.apply_chat_template(&[ChatMessage::user("<t7>"), ChatMessage::assistant("<t8>")], true).unwrap();
    // trim_blocks removes the newline after the `endfor` block, as in transformers.
    assert_eq!(text, "<t1><t7> <t3> <t8> <t3> <t9>");
    assert_eq!(tokenizer.encode("<t7>", false).unwrap(), vec![1, 7]);
    let _ = std::fs::remove_dir_all(&copy);
}

#[test]
fn bad_hf_directories_are_typed_errors() {
    let err = MarcoTokenizer::from_hf_dir("/nonexistent/model").unwrap_err();
    assert!(matches!(err, marco_formats::FormatError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/model/tokenizer.json"), "{err}");
    let dir = std::env::temp_dir().join(format!("marco-hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let err = MarcoTokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(matches!(err, marco_formats::FormatError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gguf_tokenizer_metadata_faults() {
    use marco_model::gguf::{GgufValue, GgufWriter};
    let dir = std::env::temp_dir().join(format!("marco-gguf-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let strings = |items: &[&str]| GgufValue::Array(items.iter().map(|s| GgufValue::String(s.to_string())).collect());
    let build = |model: &str, pre: &str, merges: &[&str]| {
        let mut w = GgufWriter::new();
        w.metadata("tokenizer.ggml.model", GgufValue::String(model.into()))
            .metadata("tokenizer.ggml.pre", GgufValue::String(pre.into()))
            .metadata("tokenizer.ggml.tokens", strings(&["a", "b", "ab"]))
            .metadata("tokenizer.ggml.merges", strings(merges));
        let path = dir.join(format!("{model}-{pre}.gguf"));
        w.write(&path).unwrap();
        MarcoTokenizer::from_gguf(&GgufFile::open(&path).unwrap())
    };
    let ok = build("gpt2", "smollm", &["a b"]).unwrap();
    assert_eq!(ok.encode("abab", true).unwrap(), vec![2, 2]);
    let err = build("llama", "default", &[]).unwrap_err();
    assert!(err.to_string().contains("SentencePiece"), "{err}");
    let err = build("gpt2", "some-future-pre", &["a b"]).unwrap_err();
    assert!(err.to_string().contains("some-future-pre"), "{err}");
    let err = build("gpt2", "smollm", &["ab"]).unwrap_err();
    assert!(err.to_string().contains("merges[0]"), "{err}");

    // SmolLM2's vocabulary has no token with more than one digit, so the llama.cpp oracle
    // cannot tell digit isolation apart; a vocabulary that merges digits can. llama.cpp's
    // "smollm" pre-tokenizer isolates each digit (`\p{N}` first), GPT-2's does not.
    let digits = |pre: &str| {
        let mut w = GgufWriter::new();
        w.metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
            .metadata("tokenizer.ggml.pre", GgufValue::String(pre.into()))
            .metadata("tokenizer.ggml.tokens", strings(&["1", "2", "12", "\u{120}", "\u{120}1"]))
            .metadata("tokenizer.ggml.merges", strings(&["1 2", "\u{120} 1"]));
        let path = dir.join(format!("digits-{pre}.gguf"));
        w.write(&path).unwrap();
        MarcoTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap().encode(" 12", true).unwrap()
    };
    assert_eq!(digits("smollm"), vec![3, 0, 1]);
    assert_eq!(digits("gpt-2"), vec![3, 2]);
    let _ = std::fs::remove_dir_all(&dir);
}
