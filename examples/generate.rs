//! Generates text with a model, token by token, and shows what the model saw at each step:
//! a debugging tool for models, tokenizers and backends (the checks use it).
//!
//! ```text
//! cargo run --release --example generate -- --prompt "What is 2+2?"
//! cargo run --release --example generate -- --model path/to/hf-dir --prompt-ids 1,2,3 --greedy --json
//! cargo run --release --example generate -- --raw --prompt "<|im_start|>user\nHi<|im_end|>\n" --top-logprobs 5
//! cargo run --release --example generate -- --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 7
//! cargo run --release --example generate -- --prompt-ids 1,2 --force-ids 5,6,7 --json
//! cargo run --release --features cuda --example generate -- --prompt "Hi"
//! ```
//!
//! - `--model`: a `.gguf` file or a Hugging Face directory; default: the default model,
//!   fetched and verified on first use.
//! - `--raw`: the prompt is tokenised as given (special tokens such as `<|im_start|>` are
//!   parsed as special; a BOS token only if the model asks for one); otherwise the model's own
//!   chat template wraps it as a user message.
//! - `--force-ids`: teacher forcing — these ids are fed one by one instead of the chosen ones,
//!   and the distribution at each step is reported.
//! - `--json`: one JSON object `{"prompt_ids": [...], "steps": [{"token": id, "top": [[id,
//!   logprob], ...]}, ...], "text": "..."}`, `top` sorted by log-prob, descending.
//!
//! The backend is chosen by cargo feature (`--features cuda`); `run` is generic over it.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use marco::core::{ChatMessage, LanguageModel, SamplingParams, StepRequest, TokenId};
use marco::model::tokenizer::StreamingDecoder;
use marco::model::{KernelBackend, LoadOptions};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Generate text token by token and report the model's top log-probabilities")]
struct Args {
    /// A `.gguf` file or a Hugging Face directory (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize the model's dense (f32/f16/bf16) linear weights at load: `q8_0` or `q4_0`
    /// (converted once and cached as a GGUF file under $MARCO_HOME).
    #[arg(long, value_parser = common::parse_quantize)]
    quantize: Option<marco::model::loader::QuantizeAtLoad>,
    /// Cap the model's context at this many tokens (less KV memory for a large model).
    #[arg(long, value_name = "TOKENS")]
    max_context: Option<usize>,
    /// Which linear-layer path to run: `kernel` (the default; 8-bit activations on the CPU, as
    /// llama.cpp), `kernel-exact` (f32 activations) or `burn` (plain burn matmul).
    #[arg(long, value_enum, default_value_t = common::PathArg::Kernel)]
    linear_path: common::PathArg,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<TokenId>>,
    /// Use the prompt text as given instead of wrapping it in the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate (ignored with --force-ids).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p"])]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How many top log-probabilities to report per step.
    #[arg(long, default_value_t = 5)]
    top_logprobs: usize,
    /// Teacher forcing: feed these ids (comma-separated) instead of the chosen ones.
    #[arg(long, value_delimiter = ',')]
    force_ids: Option<Vec<TokenId>>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    common::run_main(run::<common::Backend>)
}

fn run<B: KernelBackend>(args: Args) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Err(reason) = marco::model::backend::probe_cuda() {
        bail!("the CUDA backend cannot run here: {reason}");
    }
    let sampling = match args.temperature {
        Some(temperature) if !args.greedy => {
            SamplingParams { temperature, top_k: 0, top_p: args.top_p, seed: args.seed }
        }
        _ => SamplingParams { seed: args.seed, ..SamplingParams::greedy() },
    };
    sampling.validate().context("invalid sampling options")?;

    let path = common::model_path(args.model.as_deref())?;
    let device = B::Device::default();
    let load_start = Instant::now();
    let mut model = marco::model::load_with::<B>(
        &path,
        &device,
        LoadOptions {
            quantize: args.quantize,
            linear_path: args.linear_path.into(),
            max_context: args.max_context,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("cannot load the model {}", path.display()))?;
    let load_time = load_start.elapsed();

    let prompt_ids: Vec<TokenId> = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tokenizer = model.tokenizer();
            let text = if args.raw {
                text.clone()
            } else {
                tokenizer.apply_chat_template(&[ChatMessage::user(text.clone())], true)?
            };
            tokenizer.encode(&text, true)?
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }

    let prefill_start = Instant::now();
    let seq = model.new_sequence(&prompt_ids)?;
    let prefill_time = prefill_start.elapsed();

    let forced = args.force_ids.clone();
    let steps = forced.as_ref().map_or(args.max_tokens, Vec::len);
    let mut outputs = Vec::with_capacity(steps);
    let mut stream = StreamingDecoder::new(true);
    let decode_start = Instant::now();
    for i in 0..steps {
        if model.seq_len(seq)? >= model.max_context() {
            break;
        }
        let request = StepRequest {
            force: forced.as_ref().and_then(|ids| ids.get(i).copied()),
            top_logprobs: args.top_logprobs,
            ..StepRequest::new(seq, sampling)
        };
        let out = model.step(&[request])?.remove(0);
        let stop = forced.is_none() && model.tokenizer().is_stop(out.token);
        if !args.json {
            if let Some(piece) = stream.step(model.tokenizer(), out.token)? {
                print!("{piece}");
                std::io::stdout().flush().ok();
            }
        }
        outputs.push(out);
        if stop {
            break;
        }
    }
    let decode_time = decode_start.elapsed();
    let generated: Vec<TokenId> = outputs.iter().map(|o| o.token).collect();
    let text = model.tokenizer().decode(&generated, true)?;

    if args.json {
        let steps: Vec<serde_json::Value> = outputs
            .iter()
            .map(|o| {
                let top: Vec<serde_json::Value> = o.top.iter().map(|t| json!([t.token, t.logprob])).collect();
                json!({ "token": o.token, "logprob": o.logprob, "top": top })
            })
            .collect();
        println!("{}", json!({ "prompt_ids": prompt_ids, "steps": steps, "text": text }));
    } else {
        if let Some(rest) = stream.finish(model.tokenizer())? {
            print!("{rest}");
        }
        println!();
        let secs = decode_time.as_secs_f64();
        eprintln!(
            "[{}: load {:.2}s · prefill {} tokens in {:.3}s · {} tokens in {:.3}s ({:.1} tok/s)]",
            common::backend_name(),
            load_time.as_secs_f64(),
            prompt_ids.len(),
            prefill_time.as_secs_f64(),
            outputs.len(),
            secs,
            if secs > 0.0 { outputs.len() as f64 / secs } else { 0.0 },
        );
        if args.top_logprobs > 0 && forced.is_some() {
            for (i, o) in outputs.iter().enumerate() {
                let top: Vec<String> = o.top.iter().map(|t| format!("{}:{:.3}", t.token, t.logprob)).collect();
                eprintln!("step {i}: token {} ({:.3}) top {}", o.token, o.logprob, top.join(" "));
            }
        }
    }
    Ok(())
}
