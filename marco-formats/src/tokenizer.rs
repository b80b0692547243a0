//! Tokenizers and chat templates for real checkpoints: [`MarcoTokenizer`] implements
//! [`marco_core::Tokenizer`] on top of the Hugging Face `tokenizers` crate.
//!
//! Two sources:
//! - a Hugging Face directory ([`MarcoTokenizer::from_hf_dir`]): `tokenizer.json` as is, the
//!   chat template from `chat_template.jinja` or `tokenizer_config.json`, BOS/EOS from
//!   `tokenizer_config.json`, `generation_config.json` and `config.json`;
//! - GGUF metadata ([`MarcoTokenizer::from_gguf`]): for `tokenizer.ggml.model = "gpt2"` the
//!   vocabulary and merges become a byte-level BPE model, and `tokenizer.ggml.pre` selects the
//!   pre-tokenizer that llama.cpp applies before BPE. For SmolLM2 (`pre = "smollm"`) llama.cpp
//!   first isolates every single digit (`\p{N}`) and then applies the GPT-2 split regex; the
//!   same pipeline in `tokenizers` is `Sequence[Digits(individual_digits), ByteLevel(regex)]`,
//!   which is also what SmolLM2's own `tokenizer.json` says. `tests/tokenizer_oracle.rs` checks
//!   it token for token against llama.cpp. Control tokens (`token_type` 3) become *special*
//!   added tokens (parsed only with `parse_special`, dropped by `skip_special`); user-defined
//!   ones (4) are always matched, as in llama.cpp. SentencePiece GGUF vocabularies
//!   (`tokenizer.ggml.model = "llama"`) are refused with a clear error.
//!
//! `encode(text, parse_special = false)` runs a second copy of the tokenizer in which special
//! tokens are plain text (`set_encode_special_tokens`), so user text can never inject control
//! tokens. A BOS token is prepended only when the model asks for one and the text does not
//! already begin with it (chat templates often write `{{ bos_token }}` themselves).
//!
//! Chat templates are the model's own Jinja source rendered by [`ChatTemplate`] (minijinja,
//! configured like transformers: `trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`, a Python-style `tojson`).
//!
//! Byte-level BPE can split one UTF-8 character over several tokens, so decoding a single new
//! token in isolation may give half a character. [`StreamingDecoder`] emits text for a stream
//! of ids only once it is complete, for any [`Tokenizer`].

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use marco_core::{ChatMessage, TokenId, Tokenizer};
use serde_json::Value as Json;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{FormatError, Result};
use crate::gguf::GgufFile;

/// GGUF `token_type` of a control token (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined token.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Texts of tokens that end a turn in common chat formats; those present in a vocabulary
/// as special tokens are stop tokens in addition to the declared EOS.
const END_OF_TURN_TOKENS: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>"];

/// The split regex of Qwen2's `tokenizer.json`.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split regex of Llama 3's `tokenizer.json`.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with its special tokens and chat template, for Hugging Face and GGUF models.
#[derive(Clone)]
pub struct MarcoTokenizer {
    /// Parses special-token strings in the input as special tokens.
    special: tokenizers::Tokenizer,
    /// Treats special-token strings in the input as plain text.
    plain: tokenizers::Tokenizer,
    /// Whether `special` has a post-processor that may add tokens (Hugging Face directories).
    post_processes: bool,
    vocab_size: usize,
    bos: Option<TokenId>,
    add_bos: bool,
    bos_text: Option<String>,
    eos: Vec<TokenId>,
    stop: Vec<TokenId>,
    chat_template: Option<ChatTemplate>,
    source: PathBuf,
}

impl std::fmt::Debug for MarcoTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarcoTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("eos", &self.eos)
            .field("stop", &self.stop)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl MarcoTokenizer {
    /// Loads the tokenizer of `path`: a Hugging Face model directory (or its `tokenizer.json`,
    /// read with the files beside it), or a `.gguf` file.
    pub fn load(path: impl AsRef<Path>) -> Result<MarcoTokenizer> {
        let path = path.as_ref();
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else if path.file_name().is_some_and(|n| n == "tokenizer.json") {
            Self::from_hf_dir(path.parent().unwrap_or_else(|| Path::new(".")))
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }

    /// Loads the tokenizer of a Hugging Face model directory (`tokenizer.json` required;
    /// `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json` and
    /// `config.json` read when present).
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<MarcoTokenizer> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tokenizer_path).map_err(|e| FormatError::io(&tokenizer_path, e))?;
        let special: tokenizers::Tokenizer = serde_json::from_slice(&bytes)
            .map_err(|e| FormatError::corrupt(&tokenizer_path, format!("not a tokenizers JSON file: {e}")))?;

        let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json_if_present(&dir.join("generation_config.json"))?;
        let model_config = read_json_if_present(&dir.join("config.json"))?;
        let token_text = |key: &str| tokenizer_config.as_ref().and_then(|c| added_token_text(c.get(key)?));

        let bos_text = token_text("bos_token");
        let eos_text = token_text("eos_token");
        let bos = bos_text
            .as_deref()
            .and_then(|t| special.token_to_id(t))
            .or_else(|| generation_config.as_ref().and_then(|c| json_ids(c.get("bos_token_id")).first().copied()))
            .or_else(|| model_config.as_ref().and_then(|c| json_ids(c.get("bos_token_id")).first().copied()));
        let add_bos =
            tokenizer_config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(Json::as_bool).unwrap_or(false);

        let mut eos: Vec<TokenId> = Vec::new();
        if let Some(id) = eos_text.as_deref().and_then(|t| special.token_to_id(t)) {
            eos.push(id);
        }
        for config in [&generation_config, &model_config].into_iter().flatten() {
            eos.extend(json_ids(config.get("eos_token_id")));
        }
        dedup_in_order(&mut eos);

        let template_source = chat_template_source(dir, tokenizer_config.as_ref())?;
        let bos_text = bos_text.or_else(|| bos.and_then(|id| special.id_to_token(id)));
        let eos_text = eos_text.or_else(|| eos.first().and_then(|&id| special.id_to_token(id)));
        let chat_template = template_source
            .map(|source| ChatTemplate::new(source, bos_text.as_deref(), eos_text.as_deref()))
            .transpose()?;
        let post_processes = special.get_post_processor().is_some();
        Self::assemble(special, post_processes, bos, add_bos, bos_text, eos, chat_template, tokenizer_path)
    }

    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(file: &GgufFile) -> Result<MarcoTokenizer> {
        let path = file.path();
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| FormatError::corrupt(path, "metadata key tokenizer.ggml.model is missing"))?;
        match model {
            "gpt2" => {}
            "llama" => {
                return Err(FormatError::Tokenizer(format!(
                    "{}: SentencePiece GGUF vocabularies (tokenizer.ggml.model = \"llama\") are not supported; \
                     load the model's Hugging Face directory (tokenizer.json) instead",
                    path.display()
                )))
            }
            other => {
                return Err(FormatError::Tokenizer(format!(
                    "{}: tokenizer.ggml.model = {other:?} is not supported (only \"gpt2\" byte-level BPE is)",
                    path.display()
                )))
            }
        }
        let tokens = file
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| FormatError::corrupt(path, "tokenizer.ggml.tokens is missing or not a string array"))?;
        let merges = file
            .get_str_array("tokenizer.ggml.merges")
            .ok_or_else(|| FormatError::corrupt(path, "tokenizer.ggml.merges is missing or not a string array"))?;
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => file
                .get_i64_array("tokenizer.ggml.token_type")
                .filter(|types| types.len() == tokens.len())
                .ok_or_else(|| {
                    FormatError::corrupt(
                        path,
                        "tokenizer.ggml.token_type is not an integer array as long as the vocabulary",
                    )
                })?,
        };
        let vocab_size = tokens.len();
        let id_of = |i: usize| TokenId::try_from(i).map_err(|_| FormatError::corrupt(path, "vocabulary too large"));

        let mut vocab: HashMap<String, TokenId> = HashMap::with_capacity(vocab_size);
        for (i, token) in tokens.iter().enumerate() {
            // A repeated string keeps its first id, as llama.cpp's text-to-token map does.
            vocab.entry((*token).to_string()).or_insert(id_of(i)?);
        }
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (i, merge) in merges.iter().enumerate() {
            let (left, right) =
                merge.split_once(' ').filter(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains(' ')).ok_or_else(
                    || FormatError::corrupt(path, format!("tokenizer.ggml.merges[{i}] = {merge:?} is not a pair")),
                )?;
            merge_pairs.push((left.to_string(), right.to_string()));
        }
        let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let (pre_tokenizer, ignore_merges) = gguf_pre_tokenizer(path, pre)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merge_pairs)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| {
                FormatError::corrupt(path, format!("the BPE vocabulary and merges do not fit together: {e}"))
            })?;
        let mut special = tokenizers::Tokenizer::new(bpe);
        special.with_pre_tokenizer(Some(pre_tokenizer));
        special.with_decoder(Some(ByteLevel::new(false, true, true)));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(&text, &ty)| AddedToken::from(text, ty == TOKEN_TYPE_CONTROL).normalized(false))
            .collect();
        special.add_special_tokens(&added.iter().filter(|t| t.special).cloned().collect::<Vec<_>>());
        special.add_tokens(&added.iter().filter(|t| !t.special).cloned().collect::<Vec<_>>());

        let id_key = |key: &str| -> Result<Option<TokenId>> {
            match file.get_u64(key) {
                None => Ok(None),
                Some(id) if (id as usize) < vocab_size => Ok(Some(id as TokenId)),
                Some(id) => {
                    Err(FormatError::corrupt(path, format!("{key} = {id} is outside the vocabulary of {vocab_size}")))
                }
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let add_bos = file.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let mut eos = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eos.extend(id_key(key)?);
        }
        dedup_in_order(&mut eos);
        let text_of = |id: TokenId| tokens.get(id as usize).map(|t| (*t).to_string());
        let bos_text = bos.and_then(text_of);
        let eos_text = eos.first().and_then(|&id| text_of(id));
        let chat_template = file
            .get_str("tokenizer.chat_template")
            .map(|source| ChatTemplate::new(source, bos_text.as_deref(), eos_text.as_deref()))
            .transpose()?;
        Self::assemble(special, false, bos, add_bos, bos_text, eos, chat_template, path.to_path_buf())
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        special: tokenizers::Tokenizer,
        post_processes: bool,
        bos: Option<TokenId>,
        add_bos: bool,
        bos_text: Option<String>,
        eos: Vec<TokenId>,
        chat_template: Option<ChatTemplate>,
        source: PathBuf,
    ) -> Result<MarcoTokenizer> {
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        let vocab = special.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let specials: BTreeSet<TokenId> = special
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let mut stop = eos.clone();
        for text in END_OF_TURN_TOKENS {
            if let Some(&id) = vocab.get(*text) {
                if specials.contains(&id) {
                    stop.push(id);
                }
            }
        }
        dedup_in_order(&mut stop);
        for &id in eos.iter().chain(&bos) {
            if id as usize >= vocab_size {
                return Err(FormatError::corrupt(
                    &source,
                    format!("special token id {id} is outside the vocabulary of {vocab_size}"),
                ));
            }
        }
        Ok(MarcoTokenizer {
            special,
            plain,
            post_processes,
            vocab_size,
            bos,
            add_bos,
            bos_text,
            eos,
            stop,
            chat_template,
            source,
        })
    }

    /// The file the tokenizer was read from (`tokenizer.json` or the `.gguf`).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The BOS token, if the model has one.
    pub fn bos_token(&self) -> Option<TokenId> {
        self.bos
    }

    /// Whether [`encode`](Tokenizer::encode) prepends the BOS token.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The declared end-of-sequence tokens (a subset of [`stop_tokens`](Tokenizer::stop_tokens)).
    pub fn eos_tokens(&self) -> &[TokenId] {
        &self.eos
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template (e.g. with one from a separate file).
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// The id of a token given by its exact text (`<|im_end|>`), if it exists.
    pub fn token_to_id(&self, text: &str) -> Option<TokenId> {
        self.special.token_to_id(text)
    }

    /// The stored text of a token (byte-level form, e.g. `Ġthe`), if the id exists.
    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.special.id_to_token(id)
    }

    /// The underlying `tokenizers` tokenizer (special tokens parsed).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.special
    }

    fn encode_impl(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>> {
        let tokenizer = if parse_special { &self.special } else { &self.plain };
        let encoding =
            tokenizer.encode_fast(text, true).map_err(|e| FormatError::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos {
            let text_has_bos =
                parse_special && self.bos_text.as_deref().is_some_and(|b| !b.is_empty() && text.starts_with(b));
            if self.post_processes && text_has_bos && ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                // The post-processor added a BOS before the one the text (a chat template) wrote.
                ids.remove(0);
            }
            if self.add_bos && ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }
}

impl Tokenizer for MarcoTokenizer {
    fn encode(&self, text: &str, parse_special: bool) -> marco_core::Result<Vec<TokenId>> {
        Ok(self.encode_impl(text, parse_special)?)
    }

    fn decode(&self, tokens: &[TokenId], skip_special: bool) -> marco_core::Result<String> {
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(marco_core::Error::TokenOutOfRange { token, vocab_size: self.vocab_size });
        }
        self.special
            .decode(tokens, skip_special)
            .map_err(|e| marco_core::Error::Tokenizer(format!("decoding failed: {e}")))
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn stop_tokens(&self) -> &[TokenId] {
        &self.stop
    }

    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> marco_core::Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| marco_core::Error::Tokenizer(format!("{} has no chat template", self.source.display())))?;
        Ok(template.render(messages, add_generation_prompt)?)
    }
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = pre`, and whether BPE skips the
/// merges for words that are whole tokens (`ignore_merges`, Llama 3).
fn gguf_pre_tokenizer(path: &Path, pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level_regex = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| FormatError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    Ok(match pre {
        // llama.cpp: regexes `\p{N}` then GPT-2's; each piece is isolated.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level_regex(),
            ])),
            false,
        ),
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => (byte_level_regex(), false),
        "qwen2" | "stablelm2" => (split_then_bytes(QWEN2_PATTERN)?, false),
        "llama3" | "llama-v3" | "llama-bpe" => (split_then_bytes(LLAMA3_PATTERN)?, true),
        other => {
            return Err(FormatError::Tokenizer(format!(
                "{}: pre-tokenizer tokenizer.ggml.pre = {other:?} is not supported \
                 (supported: smollm, starcoder, gpt-2, qwen2, llama-bpe and their aliases)",
                path.display()
            )))
        }
    })
}

/// The `tokenizer.ggml.pre` name under which llama.cpp (and [`MarcoTokenizer::from_gguf`])
/// reproduces the pre-tokenizer of a `tokenizer.json` (its `pre_tokenizer` value), for the
/// byte-level BPE pipelines this module knows: `gpt-2` (GPT-2's regex alone), `smollm` (single
/// digits, then GPT-2's regex), `qwen2` and `llama-bpe` (their split regex, then bytes).
/// `None` for anything else (SentencePiece's `Metaspace`, a prefix space, another regex, ...),
/// since a wrong guess would make llama.cpp split text differently without any error.
///
/// llama.cpp's converter identifies a pre-tokenizer by hashing the tokens of a probe text;
/// comparing the structure instead needs no tokenizer run and refuses what it does not know.
pub fn gguf_pre_tokenizer_name(pre_tokenizer: &Json) -> Option<&'static str> {
    let kind = |v: &Json| v.get("type").and_then(Json::as_str).map(str::to_string);
    let flag = |v: &Json, key: &str, default: bool| v.get(key).and_then(Json::as_bool).unwrap_or(default);
    // ByteLevel without a prefix space, splitting with GPT-2's regex (`use_regex`) or not.
    let byte_level = |v: &Json, use_regex: bool| {
        kind(v).as_deref() == Some("ByteLevel")
            && !flag(v, "add_prefix_space", true)
            && flag(v, "use_regex", true) == use_regex
    };
    match kind(pre_tokenizer).as_deref() {
        Some("ByteLevel") if byte_level(pre_tokenizer, true) => Some("gpt-2"),
        Some("Sequence") => match pre_tokenizer.get("pretokenizers").and_then(Json::as_array)?.as_slice() {
            [digits, bytes] if kind(digits).as_deref() == Some("Digits") => {
                (flag(digits, "individual_digits", false) && byte_level(bytes, true)).then_some("smollm")
            }
            [split, bytes] if kind(split).as_deref() == Some("Split") => {
                let pattern = split.get("pattern").and_then(|p| p.get("Regex")).and_then(Json::as_str)?;
                let isolated = split.get("behavior").and_then(Json::as_str) == Some("Isolated");
                if !isolated || flag(split, "invert", false) || !byte_level(bytes, false) {
                    return None;
                }
                match pattern {
                    QWEN2_PATTERN => Some("qwen2"),
                    LLAMA3_PATTERN => Some("llama-bpe"),
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FormatError::corrupt(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FormatError::io(path, e)),
    }
}

/// A special token's text in `tokenizer_config.json`: a string or an `AddedToken` object.
fn added_token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// Token ids given as one integer or a list of integers.
fn json_ids(value: Option<&Json>) -> Vec<TokenId> {
    let as_id = |v: &Json| v.as_u64().and_then(|id| TokenId::try_from(id).ok());
    match value {
        Some(Json::Array(items)) => items.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// The chat template of an HF directory: `chat_template.jinja`, else `tokenizer_config.json`'s
/// `chat_template` (a string, or a list of `{name, template}` where `default` is preferred).
fn chat_template_source(dir: &Path, tokenizer_config: Option<&Json>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok(Some(source)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FormatError::io(&jinja, e)),
    }
    let Some(value) = tokenizer_config.and_then(|c| c.get("chat_template")) else { return Ok(None) };
    match value {
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(named) => {
            let template_of = |want: Option<&str>| {
                named.iter().find_map(|entry| {
                    let name = entry.get("name").and_then(Json::as_str);
                    let template = entry.get("template").and_then(Json::as_str)?;
                    (want.is_none() || name == want).then(|| template.to_string())
                })
            };
            Ok(template_of(Some("default")).or_else(|| template_of(None)))
        }
        Json::Null => Ok(None),
        _ => Err(FormatError::corrupt(
            dir.join("tokenizer_config.json"),
            "chat_template is neither a string nor a list of named templates",
        )),
    }
}

fn dedup_in_order(ids: &mut Vec<TokenId>) {
    let mut seen = BTreeSet::new();
    ids.retain(|id| seen.insert(*id));
}

/// A model's Jinja chat template, ready to render.
#[derive(Clone)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

/// Name of the template inside the environment.
const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts the template sees as
    /// `bos_token` and `eos_token` (empty when absent).
    pub fn new(source: impl Into<String>, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<ChatTemplate> {
        let source = source.into();
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; keep_trailing_newline is off
        // in both engines.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| FormatError::ChatTemplate(format!("the template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| FormatError::ChatTemplate(format!("template missing: {e}")))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
                tools => minijinja::Value::from(()),
                documents => minijinja::Value::from(()),
            })
            .map_err(|e| FormatError::ChatTemplate(render_error(&e)))
    }
}

fn render_error(error: &minijinja::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    message
}

fn raise_exception(message: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("the template raised: {message}")))
}

/// `tojson` as transformers defines it: Python `json.dumps` spacing (`", "`, `": "`), no
/// ASCII or HTML escaping, optional `indent`.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let to_error = |e: serde_json::Error| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string());
    let json = serde_json::to_value(&value).map_err(to_error)?;
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&spaces),
            );
            serde::Serialize::serialize(&json, &mut ser).map_err(to_error)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter);
            serde::Serialize::serialize(&json, &mut ser).map_err(to_error)?;
        }
    }
    String::from_utf8(out).map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))
}

/// serde_json formatting with Python's default `json.dumps` separators.
struct PythonJsonFormatter;

impl serde_json::ser::Formatter for PythonJsonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date
/// (Llama 3.x). Supports `%d %m %Y %y %b %B %a %A %H %M %S %j %%`.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_utc(secs, &format)
}

/// Formats the UTC time `secs` after the epoch with a subset of C's `strftime`.
fn format_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = (secs / 86_400) as i64;
    let (hour, minute, second) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's description.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = cumulative[(month - 1) as usize] + day + i64::from(is_leap && month > 2);
    let weekday = DAYS[(days + 3).rem_euclid(7) as usize]; // 1970-01-01 was a Thursday.
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Turns a stream of token ids into text pieces that never split a UTF-8 character.
///
/// Decoding each new token alone is wrong twice over: byte-level BPE may spread one
/// character over several tokens (each alone decodes to `U+FFFD`), and some decoders change
/// a token's text depending on its neighbours. The decoder therefore keeps a short window of
/// recent ids, decodes the window, and emits only what extends the previously emitted text,
/// holding back while the window's text ends in an incomplete character.
#[derive(Debug, Clone, Default)]
pub struct StreamingDecoder {
    skip_special: bool,
    /// Recent ids: the first `prefix_tokens` were already emitted (kept as context).
    window: Vec<TokenId>,
    prefix_tokens: usize,
    /// The text of `window[..prefix_tokens]`.
    prefix: String,
}

/// Tokens held back at most while waiting for the rest of a character; a model that emits
/// an invalid byte sequence then gets `U+FFFD`, as a full decode would give.
const MAX_PENDING_TOKENS: usize = 8;

impl StreamingDecoder {
    /// A decoder for a new stream; special tokens are dropped when `skip_special`.
    pub fn new(skip_special: bool) -> Self {
        StreamingDecoder { skip_special, ..Self::default() }
    }

    /// Adds `token`; returns the new text if it completes some, else `None`.
    pub fn step(&mut self, tokenizer: &dyn Tokenizer, token: TokenId) -> marco_core::Result<Option<String>> {
        self.window.push(token);
        let text = tokenizer.decode(&self.window, self.skip_special)?;
        let pending = self.window.len() - self.prefix_tokens;
        if text.ends_with('\u{FFFD}') && pending < MAX_PENDING_TOKENS {
            return Ok(None);
        }
        let new_text = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // The neighbours changed the emitted text; emit only what is new by length.
            None => text.get(self.prefix.len()..).unwrap_or_default().to_string(),
        };
        // Keep the just-emitted tokens as context for the next step.
        self.window.drain(..self.prefix_tokens);
        self.prefix_tokens = self.window.len();
        self.prefix = tokenizer.decode(&self.window, self.skip_special)?;
        Ok((!new_text.is_empty()).then_some(new_text))
    }

    /// Text still held back (an incomplete character at the end of the stream), decoded lossily.
    pub fn finish(&mut self, tokenizer: &dyn Tokenizer) -> marco_core::Result<Option<String>> {
        let text = tokenizer.decode(&self.window, self.skip_special)?;
        let rest = text.get(self.prefix.len()..).unwrap_or_default().to_string();
        self.window.clear();
        self.prefix_tokens = 0;
        self.prefix.clear();
        Ok((!rest.is_empty()).then_some(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizers_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<MarcoTokenizer>();
        shareable::<ChatTemplate>();
        shareable::<StreamingDecoder>();
        fn sendable<T: Send + Sync>() {}
        sendable::<GgufFile>();
    }

    #[test]
    fn pre_tokenizer_names_follow_the_structure() {
        let name = |text: &str| gguf_pre_tokenizer_name(&serde_json::from_str(text).unwrap());
        let bytes = |regex: bool| {
            format!(r#"{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":{regex}}}"#)
        };
        let split = |pattern: &str| {
            format!(
                r#"{{"type":"Sequence","pretokenizers":[{{"type":"Split","pattern":{{"Regex":{}}},"behavior":"Isolated","invert":false}},{}]}}"#,
                serde_json::to_string(pattern).unwrap(),
                bytes(false)
            )
        };
        assert_eq!(name(&bytes(true)), Some("gpt-2"));
        assert_eq!(name(&bytes(false)), None);
        assert_eq!(
            name(&format!(
                r#"{{"type":"Sequence","pretokenizers":[{{"type":"Digits","individual_digits":true}},{}]}}"#,
                bytes(true)
            )),
            Some("smollm")
        );
        assert_eq!(name(&split(QWEN2_PATTERN)), Some("qwen2"));
        assert_eq!(name(&split(LLAMA3_PATTERN)), Some("llama-bpe"));
        assert_eq!(name(&split("\\s+")), None);
        assert_eq!(name(r#"{"type":"ByteLevel","add_prefix_space":true,"use_regex":true}"#), None);
        assert_eq!(name(r#"{"type":"Metaspace","replacement":"▁","prepend_scheme":"first"}"#), None);
        assert_eq!(name(r#"{"type":"WhitespaceSplit"}"#), None);
        assert_eq!(name("null"), None);
        // Each name is one `from_gguf` accepts.
        for pre in ["gpt-2", "smollm", "qwen2", "llama-bpe"] {
            assert!(gguf_pre_tokenizer(Path::new("x"), pre).is_ok(), "{pre}");
        }
    }

    #[test]
    fn utc_formatting_matches_known_dates() {
        // 2024-02-29T13:05:09Z, a Thursday (checked with `date -u -d @1709211909`).
        assert_eq!(format_utc(1_709_211_909, "%d %b %Y %H:%M:%S %A %j"), "29 Feb 2024 13:05:09 Thursday 060");
        assert_eq!(format_utc(0, "%Y-%m-%d %a %%"), "1970-01-01 Thu %");
        // 2026-12-31T23:59:59Z.
        assert_eq!(format_utc(1_798_761_599, "%d %B %y %j"), "31 December 26 365");
    }

    #[test]
    fn template_errors_are_typed() {
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, FormatError::ChatTemplate(_)), "{err:?}");
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        let err = raising.render(&[], false).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn templates_get_python_string_methods_and_tojson() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m | tojson }}\n{% endfor %}{{ bos_token }}",
            Some("<s>"),
            None,
        )
        .unwrap();
        let out = t.render(&[ChatMessage::user("  hi <b>é</b>  ")], false).unwrap();
        assert_eq!(out, "HI <B>É</B>|{\"content\": \"  hi <b>é</b>  \", \"role\": \"user\"}\n<s>");
    }
}
