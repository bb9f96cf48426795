//! The float32 CPU backend: the readable reference every other backend is
//! checked against, and the default where there is no GPU. With
//! [`Rounding::Device`] it also rounds to bf16 where the CUDA backend does, so
//! that the two differ only by arithmetic order (tests/cuda.rs).

mod ffn;
pub mod ops;

pub use ffn::{route, Routing};

use crate::backend::{Backend, ForwardPass};
use crate::checkpoint::TensorView;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::progress::Progress;

use ffn::{Mlp, RoutedExperts};
use ops::{AttentionShape, Rope};

struct Layer {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qkv_bias: Option<[Vec<f32>; 3]>,
    qk_norm: Option<[Vec<f32>; 2]>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// The dense MLP, or an MoE layer's shared expert.
    mlp: Mlp,
    routed: Option<RoutedExperts>,
}

/// Per-layer keys (rotated at their true positions) and values, `[slots, kv_dim]`.
struct KvCache {
    slots: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// Where the CPU backend rounds its values to bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Float32 throughout (weights widened from their checkpoint dtype): the
    /// reference of DESIGN §5.
    F32,
    /// bf16 exactly where the CUDA backend stores bf16 (docs/cuda.md, "A
    /// forward pass"): the matrices (embedding table, projections, head;
    /// exact for a bf16 checkpoint), every RMSNorm output (they are GEMM
    /// inputs, the final norm before the head included), keys and values as
    /// they enter the cache, the attention output and the SiLU-gate output.
    /// GEMM outputs, q after RoPE, the residual stream, logits, and the norm
    /// weights and biases stay f32, as on the device. Rounding is to nearest,
    /// ties to even, like the device's `__float2bfloat16`. What is left
    /// between this and the CUDA backend is summation order and the last bits
    /// of exp, sin and cos.
    Device,
}

impl Rounding {
    /// Rounds `values` in place where this mode stores bf16.
    fn round(self, values: &mut [f32]) {
        match self {
            Rounding::F32 => {}
            Rounding::Device => ops::round_bf16(values),
        }
    }
}

pub struct CpuBackend {
    config: ModelConfig,
    rounding: Rounding,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    head: Vec<f32>,
    cache: KvCache,
    /// The last forward's routing, one entry per MoE layer.
    routing: Vec<Routing>,
}

impl CpuBackend {
    /// Converts the model's weights to float32, showing progress on a terminal.
    pub fn new(model: &Model) -> Result<CpuBackend> {
        CpuBackend::with_rounding(model, Rounding::F32)
    }

    /// Like [`CpuBackend::new`], rounding to bf16 where `rounding` says.
    pub fn with_rounding(model: &Model, rounding: Rounding) -> Result<CpuBackend> {
        let tensors = model.tensors()?;
        let config = model.config.clone();
        let f32_bytes = config.parameter_count().saturating_mul(4);
        let progress = Progress::bytes("converting weights to f32", f32_bytes);
        let load = |t: &TensorView| {
            let v = t.to_f32();
            progress.advance(v.len() as u64 * 4);
            v
        };
        let matrix = |t: &TensorView| {
            let mut v = load(t);
            rounding.round(&mut v);
            v
        };
        let mlp = |[gate, up, down]: [&TensorView; 3]| Mlp {
            hidden: gate.shape[0],
            gate: matrix(gate),
            up: matrix(up),
            down: matrix(down),
        };
        let layers = tensors
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: load(&l.attn_norm),
                q: matrix(&l.q),
                k: matrix(&l.k),
                v: matrix(&l.v),
                qkv_bias: l
                    .qkv_bias
                    .as_ref()
                    .map(|b| [load(&b[0]), load(&b[1]), load(&b[2])]),
                qk_norm: l.qk_norm.as_ref().map(|[q, k]| [load(q), load(k)]),
                o: matrix(&l.o),
                ffn_norm: load(&l.ffn_norm),
                mlp: mlp([&l.gate, &l.up, &l.down]),
                routed: l.routed.as_ref().map(|r| RoutedExperts {
                    config: config
                        .moe
                        .clone()
                        .expect("routed experts come from an MoE config"),
                    router: load(&r.router),
                    expert_bias: load(&r.expert_bias),
                    experts: r.experts.iter().map(|[g, u, d]| mlp([g, u, d])).collect(),
                }),
            })
            .collect();
        let backend = CpuBackend {
            embed: matrix(&tensors.embed),
            layers,
            final_norm: load(&tensors.final_norm),
            head: matrix(&tensors.head),
            cache: KvCache {
                slots: 0,
                keys: Vec::new(),
                values: Vec::new(),
            },
            routing: Vec::new(),
            config,
            rounding,
        };
        progress.finish();
        Ok(backend)
    }

    /// The experts every MoE layer sent each query row of the last forward
    /// to, one entry per MoE layer (empty for a model without experts).
    pub fn last_routing(&self) -> &[Routing] {
        &self.routing
    }

    /// Runs the layers over `pass`, updating the cache, and returns the final
    /// hidden states of the requested rows.
    fn hidden_states(&mut self, pass: &ForwardPass) -> Result<Vec<f32>> {
        pass.validate(self.cache.slots)?;
        let c = &self.config;
        let (n, d, kv_dim) = (pass.tokens.len(), c.d_model, c.kv_dim());
        let mut x = Vec::with_capacity(n * d);
        for &t in pass.tokens {
            let t = t as usize;
            if t >= c.vocab_size {
                return Err(Error::invalid(format!(
                    "token id {t} is outside the vocabulary of {} entries",
                    c.vocab_size
                )));
            }
            x.extend_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        let rope = Rope::new(pass.positions, c.head_dim, c.rotary_dim(), c.rope_theta);
        let shape = AttentionShape {
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let written = pass.write_slot * kv_dim..(pass.write_slot + n) * kv_dim;
        let rounding = self.rounding;
        self.routing.clear();
        for (layer, (keys, values)) in self
            .layers
            .iter()
            .zip(self.cache.keys.iter_mut().zip(self.cache.values.iter_mut()))
        {
            let mut h = ops::rms_norm(&x, &layer.attn_norm, c.rms_eps);
            rounding.round(&mut h);
            let mut q = ops::linear(&h, &layer.q, n, d, d);
            let mut k = ops::linear(&h, &layer.k, n, d, kv_dim);
            let mut v = ops::linear(&h, &layer.v, n, d, kv_dim);
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                ops::add_bias(&mut q, bq);
                ops::add_bias(&mut k, bk);
                ops::add_bias(&mut v, bv);
            }
            if let Some([q_norm, k_norm]) = &layer.qk_norm {
                q = ops::rms_norm(&q, q_norm, c.rms_eps);
                k = ops::rms_norm(&k, k_norm, c.rms_eps);
            }
            rope.apply(&mut q, c.n_heads);
            rope.apply(&mut k, c.n_kv_heads);
            keys[written.clone()].copy_from_slice(&k);
            values[written.clone()].copy_from_slice(&v);
            rounding.round(&mut keys[written.clone()]);
            rounding.round(&mut values[written.clone()]);
            let mut attn = ops::attention(&q, keys, values, pass.attend_len, &shape);
            rounding.round(&mut attn);
            ops::add_in_place(&mut x, &ops::linear(&attn, &layer.o, n, d, d));

            let mut h = ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            rounding.round(&mut h);
            let mut ffn = layer.mlp.forward(&h, d, rounding);
            if let Some(routed) = &layer.routed {
                // Routed plus shared expert, then the residual: the reference's order.
                let routing = routed.route(&h, d);
                ops::add_in_place(&mut ffn, &routed.forward(&h, d, &routing, rounding));
                self.routing.push(routing);
            }
            ops::add_in_place(&mut x, &ffn);
        }
        Ok(x[pass.rows.start * d..pass.rows.end * d].to_vec())
    }
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        let precision = match self.rounding {
            Rounding::F32 => "f32",
            Rounding::Device => "f32, bf16 where the CUDA backend stores it",
        };
        format!(
            "cpu ({} threads, {precision})",
            rayon::current_num_threads()
        )
    }

    fn prepare(&mut self, slots: usize) -> Result<()> {
        let size = slots * self.config.kv_dim();
        let layers = self.config.n_layers;
        self.cache = KvCache {
            slots,
            keys: vec![vec![0.0; size]; layers],
            values: vec![vec![0.0; size]; layers],
        };
        Ok(())
    }

    fn logits(&mut self, pass: &ForwardPass) -> Result<Vec<f32>> {
        let hidden = self.hidden_states(pass)?;
        let c = &self.config;
        let mut normed = ops::rms_norm(&hidden, &self.final_norm, c.rms_eps);
        self.rounding.round(&mut normed);
        Ok(ops::linear(
            &normed,
            &self.head,
            pass.rows.len(),
            c.d_model,
            c.vocab_size,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;
    use half::bf16;

    #[test]
    fn device_rounding_caches_bf16_and_moves_logits_by_rounding_only() {
        // Dream's layout (GQA, biases) at tiny sizes.
        let config = ModelConfig {
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_hidden: 96,
            vocab_size: 80,
            mask_id: Some(79),
            eos_id: Some(78),
            ..synthetic::preset("dream-7b").unwrap()
        };
        let model = synthetic::model(config, 3);
        let tokens: Vec<u32> = (0..12).map(|i| i * 5 % 78).collect();
        let positions: Vec<u32> = (0..12).collect();
        let pass = ForwardPass {
            tokens: &tokens,
            positions: &positions,
            write_slot: 0,
            attend_len: 12,
            rows: 0..12,
        };
        let mut exact = CpuBackend::new(&model).unwrap();
        let mut rounded = CpuBackend::with_rounding(&model, Rounding::Device).unwrap();
        exact.prepare(12).unwrap();
        rounded.prepare(12).unwrap();
        let want = exact.logits(&pass).unwrap();
        let got = rounded.logits(&pass).unwrap();

        let all_bf16 = |b: &CpuBackend| {
            let cache = &b.cache;
            cache
                .keys
                .iter()
                .chain(&cache.values)
                .flatten()
                .all(|&v| bf16::from_f32(v).to_f32() == v)
        };
        assert!(all_bf16(&rounded));
        assert!(!all_bf16(&exact));
        // Four roundings a layer to 2⁻⁹ relative each: the logits move, by
        // well under a percent of their norm.
        let diff: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
        let norm: f32 = want.iter().map(|b| b * b).sum();
        let rel = (diff / norm).sqrt();
        assert!(rel > 0.0 && rel < 1e-2, "relative change {rel}");
    }
}
