//! `dllm generate`: one request, printed block by block or as JSON.

use std::io::Write;
use std::time::Instant;

use clap::Args;
use dllm::Engine;

use super::request::{self, RequestArgs};
use super::text::IncrementalText;
use super::{DeviceArg, ModelArg};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    request: RequestArgs,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Print one JSON object with tokens, NFE and timings.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = args.model.open()?;
    let engine = Engine::new(model, args.device.into())?;
    let load_time = started.elapsed();
    let prompt = args.request.prompt(&engine)?;
    let options = args.request.options(&engine.model().config, prompt.len())?;

    if args.json {
        let call = Instant::now();
        let generation = engine.generate(&prompt, &options)?;
        let call = call.elapsed();
        let report = request::report(&engine, prompt.len(), &generation, load_time, call)?;
        println!("{report}");
        return Ok(());
    }

    // Print each block as it completes.
    let mut text = IncrementalText::new(engine.model().tokenizer.clone());
    let mut failure = None;
    engine.generate_streaming(&prompt, &options, &mut |block| match text.push(block) {
        Ok(new) => {
            print!("{new}");
            let _ = std::io::stdout().flush();
        }
        Err(e) => failure = failure.take().or(Some(e)),
    })?;
    println!();
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
