//! `dllm generate`: one request, printed block by block or as JSON.

use std::io::Write;
use std::time::Instant;

use clap::Args;
use dllm::Engine;

use super::request::{self, RequestArgs};
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

    // Print each block as it completes. With a tokenizer, decode all the
    // tokens so far and print what is new, so that a character split across
    // blocks decodes whole; without one, print the ids.
    let tokenizer = engine.model().tokenizer.clone();
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut failure = None;
    engine.generate_streaming(&prompt, &options, &mut |block| {
        so_far.extend_from_slice(block);
        let text = match &tokenizer {
            Some(tokenizer) => tokenizer.decode(&so_far, true),
            None => Ok(so_far.iter().map(|t| format!("{t} ")).collect()),
        };
        match text {
            Ok(text) => {
                print!("{}", text.strip_prefix(printed.as_str()).unwrap_or(&text));
                let _ = std::io::stdout().flush();
                printed = text;
            }
            Err(e) => failure = failure.take().or(Some(e)),
        }
    })?;
    println!();
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
