//! `dllm bench` on an llada2_moe model: both LLaDA2 samplers end to end, and
//! what the routed experts cost. A block forward reads the weights of every
//! expert that any of its tokens is sent to; the table gives the fraction of
//! experts that is, per MoE layer, beside the floor (all tokens agreeing:
//! `experts_per_token` of them) and the bytes those weights take in bf16, as
//! a GPU reads them. On CUDA the routing stays on the device, so only the
//! times are measured there and the expert columns read `-`.

use std::time::Instant;

use dllm::backend::{CacheLayout, PassShapes, TokenStats};
use dllm::cpu::{CpuBackend, Routing};
use dllm::cuda::CudaBackend;
use dllm::{
    Backend, DecodeOptions, Device, Editing, ForwardPass, Model, ModelConfig, MoeConfig, Sampler,
};
use serde_json::json;

/// The request shape of one bench run.
pub struct Run<'a> {
    pub model_name: &'a str,
    pub gen_length: usize,
    pub block_length: usize,
    pub json: bool,
}

/// Experts touched by the forwards of a generation.
#[derive(Default)]
struct ExpertUsage {
    /// Forwards of a whole block (denoising steps and cache fills).
    forwards: usize,
    /// Distinct experts summed over forwards and MoE layers.
    touched: usize,
    /// The fewest and most any one layer of one forward touched.
    least: Option<usize>,
    most: usize,
}

/// The routing of a backend's last forward, where the backend reports it.
trait Routed: Backend {
    fn routing(&self) -> Option<&[Routing]>;
}

impl Routed for CpuBackend {
    fn routing(&self) -> Option<&[Routing]> {
        Some(self.last_routing())
    }
}

/// The CUDA backend keeps the routing on the device.
impl Routed for CudaBackend {
    fn routing(&self) -> Option<&[Routing]> {
        None
    }
}

/// A backend, recording the routing of every forward where it can.
struct ExpertProbe<B> {
    backend: B,
    experts: usize,
    usage: ExpertUsage,
}

impl<B: Routed> ExpertProbe<B> {
    fn record(&mut self) {
        let Some(routing) = self.backend.routing() else {
            return;
        };
        let u = &mut self.usage;
        u.forwards += 1;
        for layer in routing {
            let mut seen = vec![false; self.experts];
            layer.experts.iter().for_each(|&e| seen[e as usize] = true);
            let touched = seen.iter().filter(|&&s| s).count();
            u.touched += touched;
            u.least = Some(u.least.map_or(touched, |l| l.min(touched)));
            u.most = u.most.max(touched);
        }
    }
}

/// Passes everything through to the backend (the device's own token
/// statistics included) and records the routing of every forward.
impl<B: Routed> Backend for ExpertProbe<B> {
    fn device_name(&self) -> String {
        self.backend.device_name()
    }

    fn cache_slot_bytes(&self) -> usize {
        self.backend.cache_slot_bytes()
    }

    fn cache_budget(&self) -> dllm::Result<usize> {
        self.backend.cache_budget()
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> dllm::Result<()> {
        self.backend.allocate_cache(layout)
    }

    fn prepare(&mut self, slots: usize) -> dllm::Result<()> {
        self.backend.prepare(slots)
    }

    fn expect(&mut self, shapes: &PassShapes) -> dllm::Result<()> {
        self.backend.expect(shapes)
    }

    fn logits(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<f32>>> {
        let logits = self.backend.logits(passes)?;
        self.record();
        Ok(logits)
    }

    fn token_stats(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<TokenStats>>> {
        let stats = self.backend.token_stats(passes)?;
        self.record();
        Ok(stats)
    }
}

impl Run<'_> {
    /// Each sampler at the model card's settings: LLaDA2.0 at threshold
    /// 0.95 with 32 steps a block, LLaDA2.1 in its quality mode (0.7, 0.5).
    fn samplers(&self) -> Vec<(&'static str, DecodeOptions)> {
        let base = DecodeOptions {
            gen_length: self.gen_length,
            block_length: self.block_length,
            steps: 32,
            threshold: Some(0.95),
            ..DecodeOptions::default()
        };
        vec![
            (
                "llada20",
                DecodeOptions {
                    sampler: Sampler::Llada20 {
                        eos_early_stop: false,
                    },
                    ..base.clone()
                },
            ),
            (
                "llada21-q",
                DecodeOptions {
                    threshold: Some(0.7),
                    sampler: Sampler::Llada21(Editing {
                        editing_threshold: 0.5,
                        ..Editing::default()
                    }),
                    ..base
                },
            ),
        ]
    }

    pub fn bench(
        &self,
        model: &Model,
        device: Device,
        prompt: &[u32],
        load_s: f64,
    ) -> anyhow::Result<()> {
        match device {
            Device::Cpu => self.run(model, CpuBackend::new(model)?, prompt, load_s),
            Device::Cuda => self.run(model, CudaBackend::new(model)?, prompt, load_s),
        }
    }

    fn run<B: Routed>(
        &self,
        model: &Model,
        backend: B,
        prompt: &[u32],
        load_s: f64,
    ) -> anyhow::Result<()> {
        let config = &model.config;
        let moe = config
            .moe
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("an llada2_moe model without experts"))?;
        let moe_layers = (0..config.n_layers)
            .filter(|&l| moe.is_moe_layer(l))
            .count();
        let mut probe = ExpertProbe {
            backend,
            experts: moe.experts,
            usage: ExpertUsage::default(),
        };
        if !self.json {
            println!(
                "# {} | model {} ({} layers, {moe_layers} MoE) | prompt {} tokens, gen {}, block {} | load {load_s:.2} s",
                probe.device_name(),
                self.model_name,
                config.n_layers,
                prompt.len(),
                self.gen_length,
                self.block_length
            );
            println!(
                "{:<10} {:>5} {:>6} {:>9} {:>10} {:>10} {:>9} {:>12} {:>11} {:>12}",
                "sampler",
                "NFE",
                "fills",
                "total s",
                "step ms",
                "fill ms",
                "experts",
                "range",
                "floor",
                "MiB/forward"
            );
        }
        for (name, options) in self.samplers() {
            probe.usage = ExpertUsage::default();
            let started = Instant::now();
            let out = dllm::decode::generate(&mut probe, config, prompt, &options, &mut |_| {})?;
            let total = started.elapsed().as_secs_f64();
            let u = &probe.usage;
            let per_layer = u.touched as f64 / (u.forwards * moe_layers).max(1) as f64;
            let fraction = per_layer / moe.experts as f64;
            let floor = moe.experts_per_token as f64 / moe.experts as f64;
            let expert_bytes = moe.expert_parameters(config.d_model) as f64 * 2.0;
            let read_mib = per_layer * moe_layers as f64 * expert_bytes / (1 << 20) as f64;
            let floor_mib = floor_read_mib(config, moe, moe_layers);
            let range = format!("{}..{}", u.least.unwrap_or(0), u.most);
            let measured = u.forwards > 0;
            if self.json {
                println!(
                    "{}",
                    json!({
                        "sampler": name, "device": probe.device_name(), "model": self.model_name,
                        "layers": config.n_layers, "moe_layers": moe_layers,
                        "prompt_tokens": prompt.len(), "gen_length": self.gen_length,
                        "block_length": self.block_length,
                        "nfe": out.nfe, "cache_fills": out.cache_fills.count, "total_s": total,
                        "step_ms": out.cached_forwards.mean_ms(), "fill_ms": out.cache_fills.mean_ms(),
                        "forwards": u.forwards,
                        "experts_touched_per_layer": measured.then_some(per_layer),
                        "experts_touched_fraction": measured.then_some(fraction),
                        "experts_touched_min": u.least, "experts_touched_max": measured.then_some(u.most),
                        "floor_fraction": floor,
                        "expert_mib_read_per_forward_bf16": measured.then_some(read_mib),
                        "floor_expert_mib_per_forward_bf16": floor_mib,
                    })
                );
            } else {
                let experts = if measured {
                    format!(
                        "{:>8.1}% {range:>12} {:>10.1}% {read_mib:>7.0}/{floor_mib:.0}",
                        fraction * 100.0,
                        floor * 100.0
                    )
                } else {
                    format!(
                        "{:>9} {:>12} {:>10.1}% {:>7}/{floor_mib:.0}",
                        "-",
                        "-",
                        floor * 100.0,
                        "-"
                    )
                };
                println!(
                    "{name:<10} {:>5} {:>6} {total:>9.2} {:>10.1} {:>10.1} {experts}",
                    out.nfe,
                    out.cache_fills.count,
                    out.cached_forwards.mean_ms(),
                    out.cache_fills.mean_ms(),
                );
            }
        }
        if !self.json {
            println!(
                "# experts: mean fraction of a MoE layer's {} experts one block forward touches (range: fewest..most in one layer); floor: {} of them, every token agreeing. MiB/forward: routed expert weights read per block forward in bf16, measured/floor.",
                moe.experts, moe.experts_per_token
            );
        }
        Ok(())
    }
}

/// The routed expert weights a forward reads at the least, in bf16 MiB.
fn floor_read_mib(config: &ModelConfig, moe: &MoeConfig, moe_layers: usize) -> f64 {
    let per_layer = moe.experts_per_token as f64 * moe.expert_parameters(config.d_model) as f64;
    per_layer * moe_layers as f64 * 2.0 / (1 << 20) as f64
}
