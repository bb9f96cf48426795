//! `dllm bench`: every cache strategy end to end on one model and prompt,
//! so the table shows what each saves in wall time, not only in NFE; with
//! `--batch`, each also with many such requests decoded together, so it
//! shows what batching adds to throughput.

use std::time::{Duration, Instant};

use clap::Args;
use dllm::convert::WeightFormat;
use dllm::kv_pool::PAGE_SIZE;
use dllm::{
    synthetic, CacheMode, DecodeOptions, Device, Engine, EngineOptions, Family, Generation,
};
use serde_json::json;

use super::resources::{human_bytes, peak_rss_bytes, read_bandwidth};
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
    /// needs 33 GB in bf16; per-layer figures are unchanged).
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
    /// Requests decoded together, one run per size (comma-separated): each
    /// request has its own random prompt of the same length.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: Vec<u32>,
    /// One JSON object per strategy and batch size instead of the table.
    #[arg(long)]
    json: bool,
}

/// What a run of `batch` concurrent requests measured.
struct BatchRun {
    batch: usize,
    /// The first request's result (all have the same shape).
    first: Generation,
    wall: Duration,
    non_eos_tokens: usize,
    mean_latency: Duration,
    /// Batched forwards and their mean wall time.
    forwards: usize,
    mean_forward_ms: f64,
    mean_batch: f64,
    /// Query tokens of a batched forward, on average.
    mean_query_tokens: f64,
}

impl BatchRun {
    fn aggregate_tokens_per_s(&self) -> f64 {
        self.non_eos_tokens as f64 / self.wall.as_secs_f64().max(1e-12)
    }
}

/// Submits one request per prompt at once and waits for all of them.
fn run_batch(
    engine: &Engine,
    prompts: &[Vec<u32>],
    options: &DecodeOptions,
) -> anyhow::Result<BatchRun> {
    let before = engine.stats();
    let start = Instant::now();
    let handles = prompts
        .iter()
        .map(|p| engine.submit(p, options))
        .collect::<dllm::Result<Vec<_>>>()?;
    let mut outs = Vec::with_capacity(handles.len());
    let mut latency = Duration::ZERO;
    for handle in handles {
        outs.push(handle.wait()?);
        latency += start.elapsed();
    }
    let wall = start.elapsed();
    let after = engine.stats();
    let forwards = after.forwards - before.forwards;
    let forward_time = after.forward_time - before.forward_time;
    Ok(BatchRun {
        batch: prompts.len(),
        non_eos_tokens: outs.iter().map(|o| o.non_eos_tokens).sum(),
        mean_latency: latency / prompts.len() as u32,
        wall,
        forwards,
        mean_forward_ms: forward_time.as_secs_f64() * 1e3 / forwards.max(1) as f64,
        mean_batch: (after.sequences - before.sequences) as f64 / forwards.max(1) as f64,
        mean_query_tokens: (after.tokens - before.tokens) as f64 / forwards.max(1) as f64,
        first: outs.swap_remove(0),
    })
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
    let device: Device = args.device.into();
    // Measured before the weights take the memory, on the host: the floor
    // of a CPU forward (a GPU's is measured by scripts/gpu-run.sh).
    let bandwidth = (device == Device::Cpu).then(read_bandwidth);
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
            let format = args.model.format()?.unwrap_or(WeightFormat::BF16);
            synthetic::model_in(config, 1, format)
        }
        None => args.model.open()?,
    };
    if model.config.family == Family::Llada2 {
        let run = bench_llada2::Run {
            model_name: args.synthetic.as_deref().unwrap_or("from directory"),
            gen_length: args.gen_length,
            block_length: args.block_length,
            json: args.json,
        };
        let prompt = synthetic::random_prompt(args.prompt_length, &model.config, 2);
        return run.bench(&model, device, &prompt, load_start.elapsed().as_secs_f64());
    }
    let weights_bytes = model.checkpoint.total_bytes();
    let streamed_bytes = model.tensors()?.streamed_bytes();
    // What the weights take in GPU memory: smaller than bf16 when quantized.
    let device_weight_bytes = (device == Device::Cuda)
        .then(|| dllm::cuda::CudaBackend::weight_bytes(&model))
        .transpose()?;
    let floor_ms = bandwidth.map(|b| streamed_bytes as f64 / b * 1e3);
    let most = args.batch.iter().copied().max().unwrap_or(1) as usize;
    let prompts: Vec<Vec<u32>> = (0..most as u64)
        .map(|seed| synthetic::random_prompt(args.prompt_length, &model.config, 2 + seed))
        .collect();
    // A cache for the largest batch exactly: the default would size it for
    // requests of the model's maximum length.
    let slots_per_request = (args.prompt_length + args.gen_length).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let engine = Engine::with_options(
        model,
        device,
        EngineOptions {
            max_batch: most,
            cache_slots: Some(most * slots_per_request),
        },
    )?;
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
            "# weights {} ({} read by every forward){}{}",
            human_bytes(weights_bytes),
            human_bytes(streamed_bytes),
            device_weight_bytes.map_or(String::new(), |b| format!(
                ", {} on the device",
                human_bytes(b as u64)
            )),
            match (bandwidth, floor_ms) {
                (Some(b), Some(f)) => format!(
                    " | memory read {:.1} GB/s measured now: floor {f:.1} ms a forward",
                    b / 1e9
                ),
                _ => String::new(),
            }
        );
        println!(
            "{:<20} {:>5} {:>5} {:>9} {:>9} {:>12} {:>12} {:>9} {:>9} {:>8} {:>10} {:>12} {:>8}",
            "strategy",
            "batch",
            "NFE",
            "prompt s",
            "total s",
            "full fwd ms",
            "cached ms",
            "floor ms",
            "tok/s",
            "speedup",
            "agg tok/s",
            "batch fwd ms",
            "GFLOP/s"
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
    // Two FLOPs per weight per query token in the layers' GEMMs: what a
    // batched forward's rate is measured against.
    let layer_parameters =
        (config.parameter_count() - 2 * (config.vocab_size * config.d_model) as u64) as f64;
    let mut baseline_s = None;
    for (name, options) in strategies(&base, args.suffix_window) {
        if let Some(only) = &args.only {
            if !only.iter().any(|o| name.contains(o.as_str())) {
                continue;
            }
        }
        for &batch in &args.batch {
            let run = run_batch(&engine, &prompts[..batch as usize], &options)?;
            let out = &run.first;
            let total = out.total_time().as_secs_f64();
            let (full_ms, cached_ms) = (out.full_forwards.mean_ms(), out.cached_forwards.mean_ms());
            let speedup = baseline_s.get_or_insert(total).to_owned() / total;
            let gflops = 2.0 * layer_parameters * run.mean_query_tokens / run.mean_forward_ms / 1e6;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "strategy": name, "batch": run.batch, "nfe": out.nfe,
                        "device": engine.device_name(),
                        "prompt_tokens": args.prompt_length, "gen_length": base.gen_length,
                        "prompt_s": out.prompt_time.as_secs_f64(), "decode_s": out.decode_time.as_secs_f64(),
                        "total_s": total,
                        "full_forwards": out.full_forwards.count, "full_forward_ms": full_ms,
                        "cached_forwards": out.cached_forwards.count, "cached_forward_ms": cached_ms,
                        "tokens_per_s": out.tokens_per_second(), "speedup": speedup,
                        "aggregate_tokens_per_s": run.aggregate_tokens_per_s(),
                        "wall_s": run.wall.as_secs_f64(),
                        "mean_latency_s": run.mean_latency.as_secs_f64(),
                        "batched_forwards": run.forwards, "mean_forward_ms": run.mean_forward_ms,
                        "mean_batch": run.mean_batch, "layer_gflops": gflops,
                        "model": model, "weights_bytes": weights_bytes,
                        "streamed_bytes": streamed_bytes,
                        "device_weight_bytes": device_weight_bytes,
                        "read_bandwidth_bytes_per_s": bandwidth, "floor_ms": floor_ms,
                        "peak_rss_bytes": peak_rss_bytes(),
                    })
                );
            } else {
                println!(
                    "{name:<20} {batch:>5} {:>5} {:>9.3} {total:>9.3} {full_ms:>12.1} {cached_ms:>12.1} {:>9} {:>9.2} {speedup:>7.2}x {:>10.2} {:>12.1} {gflops:>8.1}",
                    out.nfe,
                    out.prompt_time.as_secs_f64(),
                    floor_ms.map_or("-".into(), |f| format!("{f:.1}")),
                    out.tokens_per_second(),
                    run.aggregate_tokens_per_s(),
                    run.mean_forward_ms,
                );
            }
        }
    }
    if !args.json {
        if let Some(peak) = peak_rss_bytes() {
            println!("# peak RSS {}", human_bytes(peak));
        }
    }
    Ok(())
}
