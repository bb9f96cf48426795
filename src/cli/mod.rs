//! Command-line front end: argument definitions and dispatch.

mod batch;
mod bench;
mod bench_llada2;
mod eval;
mod generate;
mod info;
mod quantize;
mod request;
mod resources;
mod serve;
mod text;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dllm::convert::{convert, WeightFormat};
use dllm::quant::Quantization;
use dllm::Model;

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
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Print a model's architecture, parameter count, dtypes and memory needs.
    Info {
        #[command(flatten)]
        model: ModelArg,
    },
    /// Write a model's weights quantized (int8 or 4-bit) as a new model directory.
    Quantize(quantize::QuantizeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Info { model } => info::run(&model),
        Command::Quantize(args) => quantize::run(args),
    }
}

/// The model directory, defaulting to the small model shipped in the
/// repository, and the format its weights are computed in.
#[derive(clap::Args)]
struct ModelArg {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Convert the weights at load: int8 (one scale per output channel),
    /// int4 (one scale per --group-size inputs), bf16 or f32 [default: as
    /// stored].
    #[arg(long, value_enum)]
    weights: Option<WeightsArg>,
    /// Inputs per 4-bit scale with --weights int4: 32, 64 or 128.
    #[arg(long, default_value_t = 32)]
    group_size: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsArg {
    F32,
    Bf16,
    Int8,
    Int4,
}

impl ModelArg {
    fn resolve(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-arith"))
        })
    }

    /// The format `--weights` asks for, if any.
    fn format(&self) -> anyhow::Result<Option<WeightFormat>> {
        let bits = match self.weights {
            None => return Ok(None),
            Some(WeightsArg::F32) => return Ok(Some(WeightFormat::F32)),
            Some(WeightsArg::Bf16) => return Ok(Some(WeightFormat::BF16)),
            Some(WeightsArg::Int8) => return Ok(Some(WeightFormat::Quantized(Quantization::Int8))),
            Some(WeightsArg::Int4) => 4,
        };
        let q = Quantization::new(bits, Some(self.group_size)).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(WeightFormat::Quantized(q)))
    }

    /// Opens the model directory, converting its weights as `--weights` says.
    fn open(&self) -> anyhow::Result<Model> {
        let dir = self.resolve();
        let format = self.format()?;
        let model = Model::open(&dir).with_context(|| format!("loading {}", dir.display()))?;
        match format {
            Some(format) => convert(model, format)
                .with_context(|| format!("converting {} to {}", dir.display(), format.name())),
            None => Ok(model),
        }
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
