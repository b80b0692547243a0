//! Converts a Hugging Face checkpoint directory to one GGUF file that marco and llama.cpp both
//! load: convert once, then load the file anywhere.
//!
//! ```text
//! cargo run --release --example convert -- --model path/to/hf-dir --to q8_0 --out model.q8_0.gguf
//! cargo run --release --example convert -- --model path/to/hf-dir --to f16 --out model.f16.gguf --quiet
//! ```
//!
//! - `--to`: `f32`, `f16`, `bf16`, `q8_0` (default) or `q4_0`, the type of the matrices;
//!   norms and biases stay f32 (as llama.cpp's converter keeps them).
//! - The file is written to `<out>.partial` and renamed when complete, so an interrupted run
//!   never leaves a file that looks finished.
//!
//! Prints one line per tensor (unless `--quiet`) and then the report: tensors, size, seconds.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use marco::model::convert::{convert_hf_dir_with, ConvertTarget};

#[derive(Parser, Debug)]
#[command(about = "Convert a Hugging Face checkpoint directory to a GGUF file (for marco and llama.cpp)")]
struct Args {
    /// The Hugging Face directory (`config.json`, `tokenizer.json`, safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The type of the matrices: f32, f16, bf16, q8_0 or q4_0.
    #[arg(long, default_value = "q8_0", value_parser = parse_target)]
    to: ConvertTarget,
    /// The GGUF file to write (replaced if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Print only the final report.
    #[arg(long)]
    quiet: bool,
}

fn parse_target(s: &str) -> std::result::Result<ConvertTarget, String> {
    s.parse().map_err(|e: marco::model::ModelError| e.to_string())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let quiet = args.quiet;
    let mut stderr = std::io::stderr();
    let report = convert_hf_dir_with(&args.model, &args.out, args.to, |progress| {
        if !quiet {
            // Progress goes to stderr so that stdout carries only the report.
            let _ = writeln!(
                stderr,
                "[{:>4}/{}] {:<32} {:<5} {:>12} bytes",
                progress.index + 1,
                progress.total,
                progress.name,
                progress.ggml_type.name(),
                progress.bytes
            );
        }
    })
    .with_context(|| format!("converting {} to {}", args.model.display(), args.out.display()))?;
    println!(
        "wrote {}: {} tensors, {} bytes ({:.1} MiB), {} in {:.2} s",
        report.output.display(),
        report.tensors,
        report.bytes_written,
        report.bytes_written as f64 / (1024.0 * 1024.0),
        args.to,
        report.seconds
    );
    Ok(())
}
