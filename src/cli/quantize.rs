//! `dllm quantize`: a model directory written again with its projections
//! and head quantized (int8 per output channel, or 4-bit in groups), which
//! loads like any other model directory.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use dllm::convert::{self, WeightFormat};
use dllm::quant::Quantization;
use dllm::Model;

#[derive(Args)]
pub struct QuantizeArgs {
    /// The model directory to quantize.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the quantized model directory.
    #[arg(long)]
    out: PathBuf,
    /// 8 (one scale per output channel) or 4 (one scale per group).
    #[arg(long)]
    bits: u64,
    /// Inputs per scale for 4 bits: 32, 64 or 128 [default: 32].
    #[arg(long)]
    group_size: Option<usize>,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let group = match (args.bits, args.group_size) {
        (4, None) => Some(32),
        (_, group) => group,
    };
    let q = Quantization::new(args.bits, group).map_err(|e| anyhow::anyhow!(e))?;
    if args.out.exists() && args.out.canonicalize()? == args.model.canonicalize()? {
        bail!("--out is the model directory itself: write the quantized model elsewhere");
    }
    let model =
        Model::open(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    convert::write(&model, WeightFormat::Quantized(q), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let written =
        Model::open(&args.out).with_context(|| format!("reading back {}", args.out.display()))?;
    println!(
        "{}: {} ({} bytes of weights, from {})",
        args.out.display(),
        q.name(),
        written.checkpoint.total_bytes(),
        model.checkpoint.total_bytes()
    );
    Ok(())
}
