//! Command-line front end: argument definitions and dispatch.

mod batch;
mod bench;
mod bench_llada2;
mod eval;
mod generate;
mod info;
mod request;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "dllm",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DLLM_COMMIT"), ")"),
    about = "A fast runtime for diffusion language models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model.
    Generate(generate::GenerateArgs),
    /// Run a file of generate requests in one process (the model loaded once).
    Batch(batch::BatchArgs),
    /// Time every cache strategy end to end on one model and prompt.
    Bench(bench::BenchArgs),
    /// Exact-match accuracy, NFE and speed of every strategy on a held-out set.
    Eval(eval::EvalArgs),
    /// Print a model's architecture, parameter count, dtypes and memory needs.
    Info {
        #[command(flatten)]
        model: ModelArg,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Info { model } => info::run(&model.resolve()),
    }
}

/// The model directory, defaulting to the small model shipped in the repository.
#[derive(clap::Args)]
struct ModelArg {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
}

impl ModelArg {
    fn resolve(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-arith"))
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

impl From<DeviceArg> for dllm::Device {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => dllm::Device::Cpu,
            DeviceArg::Cuda => dllm::Device::Cuda,
        }
    }
}
