//! `dllm generate`: one request, printed block by block or as JSON.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use dllm::{CacheMode, DecodeOptions, DreamAlg, Engine, Model};
use serde_json::json;

use super::{DeviceArg, ModelArg};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt text (needs the model's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Wrap the prompt as a user turn of the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 256)]
    gen_length: usize,
    /// Tokens per semi-autoregressive block.
    #[arg(long, default_value_t = 32)]
    block_length: usize,
    /// Total denoising steps [default: gen-length].
    #[arg(long)]
    steps: Option<usize>,
    /// Key/value cache used after each block's first step.
    #[arg(long, value_enum, default_value_t = CacheArg::Dual)]
    cache: CacheArg,
    /// Commit every token at least this confident ("none": the fixed
    /// schedule) [default: 0.9, or none with --factor or a non-threshold --alg].
    #[arg(long, value_parser = parse_threshold)]
    threshold: Option<Threshold>,
    /// Factor rule for parallel decoding (instead of a threshold).
    #[arg(long)]
    factor: Option<f64>,
    /// Suffix pruning: masked positions kept after the block.
    #[arg(long)]
    suffix_window: Option<usize>,
    /// Suffix pruning: positions kept at the end of the sequence.
    #[arg(long, requires = "suffix_window")]
    suffix_tail: Option<usize>,
    /// Dynamic threshold: tau * (1 - alpha * (1 - masked ratio)).
    #[arg(long, default_value_t = 0.0)]
    confidence_alpha: f64,
    /// Stop once a completed block holds EOS.
    #[arg(long)]
    early_exit: bool,
    /// Dream's confidence algorithm.
    #[arg(long, value_enum)]
    alg: Option<AlgArg>,
    /// Mask token id [default: from config.json].
    #[arg(long)]
    mask_id: Option<u32>,
    /// EOS token id [default: from config.json].
    #[arg(long)]
    eos_id: Option<u32>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Print one JSON object with tokens, NFE and timings.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CacheArg {
    None,
    Prefix,
    Dual,
}

/// Dream's own spelling of its algorithms, which scripts pass verbatim.
#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
enum AlgArg {
    MaskgitPlus,
    Entropy,
    TopkMargin,
    ConfidenceThreshold,
}

#[derive(Clone, Copy)]
enum Threshold {
    Off,
    At(f64),
}

fn parse_threshold(s: &str) -> Result<Threshold, String> {
    if s == "none" {
        return Ok(Threshold::Off);
    }
    s.parse::<f64>()
        .map(Threshold::At)
        .map_err(|_| format!("expected a number or \"none\", got {s:?}"))
}

impl GenerateArgs {
    fn options(&self) -> DecodeOptions {
        let alg = self.alg.map(|a| match a {
            AlgArg::MaskgitPlus => DreamAlg::MaskgitPlus,
            AlgArg::Entropy => DreamAlg::Entropy,
            AlgArg::TopkMargin => DreamAlg::TopkMargin,
            AlgArg::ConfidenceThreshold => DreamAlg::ConfidenceThreshold,
        });
        let wants_no_threshold =
            self.factor.is_some() || matches!(alg, Some(a) if a != DreamAlg::ConfidenceThreshold);
        let threshold = match self.threshold {
            Some(Threshold::At(t)) => Some(t),
            Some(Threshold::Off) => None,
            None if wants_no_threshold => None,
            None => DecodeOptions::default().threshold,
        };
        DecodeOptions {
            gen_length: self.gen_length,
            block_length: self.block_length,
            steps: self.steps.unwrap_or(self.gen_length),
            cache: match self.cache {
                CacheArg::None => CacheMode::None,
                CacheArg::Prefix => CacheMode::Prefix,
                CacheArg::Dual => CacheMode::Dual,
            },
            threshold,
            factor: self.factor,
            suffix_window: self.suffix_window,
            suffix_tail: self.suffix_tail.unwrap_or(1),
            confidence_alpha: self.confidence_alpha,
            early_exit: self.early_exit,
            alg,
            mask_id: self.mask_id,
            eos_id: self.eos_id,
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let options = args.options();
    let started = Instant::now();
    let dir = args.model.resolve();
    let model = Model::open(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let mut engine = Engine::new(model, args.device.into())?;
    let load_time = started.elapsed();
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => engine.encode_prompt(text, args.chat)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => unreachable!("clap requires --prompt or --prompt-ids"),
    };
    let tokenizer = engine.model().tokenizer.clone();
    let generation = if args.json {
        engine.generate(&prompt, &options)?
    } else {
        // Print each block as it completes. With a tokenizer, decode all the
        // tokens so far and print what is new, so that a character split
        // across blocks decodes whole; without one, print the ids.
        let mut so_far: Vec<u32> = Vec::new();
        let mut printed = String::new();
        let mut failure = None;
        let generation = engine.generate_streaming(&prompt, &options, &mut |block| {
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
        if let Some(e) = failure {
            return Err(e.into());
        }
        generation
    };

    if args.json {
        let mut out = json!({
            "tokens": generation.tokens,
            "nfe": generation.nfe,
            "device": engine.device_name(),
            "prompt_tokens": prompt.len(),
            "non_eos_tokens": generation.non_eos_tokens,
            "timings": {
                "load_s": load_time.as_secs_f64(),
                "prompt_s": generation.prompt_time.as_secs_f64(),
                "decode_s": generation.decode_time.as_secs_f64(),
                "total_s": generation.total_time().as_secs_f64(),
                "tokens_per_s": generation.tokens_per_second(),
                "full_forwards": generation.full_forwards.count,
                "full_forward_ms": generation.full_forwards.mean_ms(),
                "cached_forwards": generation.cached_forwards.count,
                "cached_forward_ms": generation.cached_forwards.mean_ms(),
            },
        });
        if let Some(tokenizer) = &tokenizer {
            out["text"] = tokenizer.decode(&generation.tokens, true)?.into();
        }
        println!("{out}");
    }
    Ok(())
}
