//! `dllm bench`: every cache strategy end to end on one model and prompt,
//! so the table shows what each saves in wall time, not only in NFE.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use dllm::{synthetic, CacheMode, DecodeOptions, Engine, Family, Model};
use serde_json::json;

use super::{bench_llada2, DeviceArg, ModelArg};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Random weights at a preset's shapes instead of a model directory
    /// (small: d_model 1024, 8 layers; llada-8b; dream-7b; llada2-mini).
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
    /// Keep only the synthetic preset's first N layers (the real LLaDA2-mini
    /// needs 64 GB as f32 on the CPU; per-layer figures are unchanged).
    #[arg(long, requires = "synthetic")]
    layers: Option<usize>,
    /// Prompt length in tokens (a seeded random prompt).
    #[arg(long, default_value_t = 1024)]
    prompt_length: usize,
    #[arg(long, default_value_t = 64)]
    gen_length: usize,
    #[arg(long, default_value_t = 32)]
    block_length: usize,
    /// Total steps for the fixed-schedule strategies [default: gen-length].
    #[arg(long)]
    steps: Option<usize>,
    /// Suffix window of the pruned strategies.
    #[arg(long, default_value_t = 32)]
    suffix_window: usize,
    /// Only the strategies whose names contain one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// One JSON object per strategy instead of the table.
    #[arg(long)]
    json: bool,
}

/// The strategies of the README's table, as options over a common base.
fn strategies(base: &DecodeOptions, window: usize) -> Vec<(&'static str, DecodeOptions)> {
    let with = |cache, threshold, pruned: bool, alpha: f64| DecodeOptions {
        cache,
        threshold,
        suffix_window: pruned.then_some(window),
        confidence_alpha: alpha,
        early_exit: pruned,
        ..base.clone()
    };
    vec![
        ("baseline", with(CacheMode::None, None, false, 0.0)),
        ("prefix", with(CacheMode::Prefix, None, false, 0.0)),
        ("dual", with(CacheMode::Dual, None, false, 0.0)),
        (
            "threshold-0.9",
            with(CacheMode::None, Some(0.9), false, 0.0),
        ),
        (
            "dual+threshold-0.9",
            with(CacheMode::Dual, Some(0.9), false, 0.0),
        ),
        ("streaming", with(CacheMode::Prefix, Some(0.9), true, 0.3)),
        ("dual+pruned", with(CacheMode::Dual, Some(0.9), true, 0.3)),
    ]
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let load_start = Instant::now();
    let model = match &args.synthetic {
        Some(name) => {
            let mut config = synthetic::preset(name)?;
            if let Some(layers) = args.layers {
                anyhow::ensure!(
                    (1..=config.n_layers).contains(&layers),
                    "--layers {layers}: the preset has {} layers",
                    config.n_layers
                );
                config.n_layers = layers;
            }
            synthetic::model(config, 1)
        }
        None => {
            let dir = args.model.resolve();
            Model::open(&dir).with_context(|| format!("loading {}", dir.display()))?
        }
    };
    let prompt = synthetic::random_prompt(args.prompt_length, &model.config, 2);
    if model.config.family == Family::Llada2 {
        let run = bench_llada2::Run {
            model_name: args.synthetic.as_deref().unwrap_or("from directory"),
            gen_length: args.gen_length,
            block_length: args.block_length,
            json: args.json,
        };
        anyhow::ensure!(
            matches!(args.device, DeviceArg::Cpu),
            "the CUDA backend does not run llada2_moe models yet: bench with --device cpu"
        );
        return run.bench(&model, &prompt, load_start.elapsed().as_secs_f64());
    }
    let mut engine = Engine::new(model, args.device.into())?;
    let load_s = load_start.elapsed().as_secs_f64();
    let base = DecodeOptions {
        gen_length: args.gen_length,
        block_length: args.block_length,
        steps: args.steps.unwrap_or(args.gen_length),
        ..DecodeOptions::default()
    };
    if !args.json {
        println!(
            "# {} | model {} | prompt {} tokens, gen {}, block {}, steps {} | load {load_s:.2} s",
            engine.device_name(),
            args.synthetic.as_deref().unwrap_or("from directory"),
            args.prompt_length,
            base.gen_length,
            base.block_length,
            base.steps
        );
        println!(
            "{:<20} {:>5} {:>9} {:>9} {:>12} {:>12} {:>9} {:>8}",
            "strategy",
            "NFE",
            "prompt s",
            "total s",
            "full fwd ms",
            "cached ms",
            "tok/s",
            "speedup"
        );
    }
    // What the DESIGN §4 floors of a forward are computed from.
    let config = &engine.model().config;
    let model = json!({
        "parameters": config.parameter_count(),
        "embedding_parameters": config.vocab_size * config.d_model,
        "layers": config.n_layers,
        "q_dim": config.n_heads * config.head_dim,
        "kv_dim": config.kv_dim(),
    });
    let mut baseline_s = None;
    for (name, options) in strategies(&base, args.suffix_window) {
        if let Some(only) = &args.only {
            if !only.iter().any(|o| name.contains(o.as_str())) {
                continue;
            }
        }
        let out = engine.generate(&prompt, &options)?;
        let total = out.total_time().as_secs_f64();
        let (full_ms, cached_ms) = (out.full_forwards.mean_ms(), out.cached_forwards.mean_ms());
        let speedup = baseline_s.get_or_insert(total).to_owned() / total;
        if args.json {
            println!(
                "{}",
                json!({
                    "strategy": name, "nfe": out.nfe, "device": engine.device_name(),
                    "prompt_tokens": args.prompt_length, "gen_length": base.gen_length,
                    "prompt_s": out.prompt_time.as_secs_f64(), "decode_s": out.decode_time.as_secs_f64(),
                    "total_s": total,
                    "full_forwards": out.full_forwards.count, "full_forward_ms": full_ms,
                    "cached_forwards": out.cached_forwards.count, "cached_forward_ms": cached_ms,
                    "tokens_per_s": out.tokens_per_second(), "speedup": speedup,
                    "model": model,
                })
            );
        } else {
            println!(
                "{name:<20} {:>5} {:>9.3} {total:>9.3} {full_ms:>12.1} {cached_ms:>12.1} {:>9.2} {speedup:>7.2}x",
                out.nfe,
                out.prompt_time.as_secs_f64(),
                out.tokens_per_second(),
            );
        }
    }
    Ok(())
}
