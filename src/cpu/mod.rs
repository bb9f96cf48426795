//! The float32 CPU backend: the readable reference every other backend is
//! checked against, and the default where there is no GPU.

pub mod ops;

use crate::backend::{Backend, ForwardPass};
use crate::checkpoint::TensorView;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::progress::Progress;

use ops::{AttentionShape, Rope};

struct Layer {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qkv_bias: Option<[Vec<f32>; 3]>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// Per-layer keys (rotated at their true positions) and values, `[slots, kv_dim]`.
struct KvCache {
    slots: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

pub struct CpuBackend {
    config: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    head: Vec<f32>,
    cache: KvCache,
}

impl CpuBackend {
    /// Converts the model's weights to float32, showing progress on a terminal.
    pub fn new(model: &Model) -> Result<CpuBackend> {
        let tensors = model.tensors()?;
        let config = model.config.clone();
        let f32_bytes = config.parameter_count().saturating_mul(4);
        let progress = Progress::bytes("converting weights to f32", f32_bytes);
        let load = |t: &TensorView| {
            let v = t.to_f32();
            progress.advance(v.len() as u64 * 4);
            v
        };
        let layers = tensors
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: load(&l.attn_norm),
                q: load(&l.q),
                k: load(&l.k),
                v: load(&l.v),
                qkv_bias: l
                    .qkv_bias
                    .as_ref()
                    .map(|b| [load(&b[0]), load(&b[1]), load(&b[2])]),
                o: load(&l.o),
                ffn_norm: load(&l.ffn_norm),
                gate: load(&l.gate),
                up: load(&l.up),
                down: load(&l.down),
            })
            .collect();
        let backend = CpuBackend {
            embed: load(&tensors.embed),
            layers,
            final_norm: load(&tensors.final_norm),
            head: load(&tensors.head),
            cache: KvCache {
                slots: 0,
                keys: Vec::new(),
                values: Vec::new(),
            },
            config,
        };
        progress.finish();
        Ok(backend)
    }

    /// Runs the layers over `pass`, updating the cache, and returns the final
    /// hidden states of the requested rows.
    fn hidden_states(&mut self, pass: &ForwardPass) -> Result<Vec<f32>> {
        pass.validate(self.cache.slots)?;
        let c = &self.config;
        let (n, d, kv_dim, f) = (pass.tokens.len(), c.d_model, c.kv_dim(), c.ffn_hidden);
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
        let rope = Rope::new(pass.positions, c.head_dim, c.rope_theta);
        let shape = AttentionShape {
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let written = pass.write_slot * kv_dim..(pass.write_slot + n) * kv_dim;
        for (layer, (keys, values)) in self
            .layers
            .iter()
            .zip(self.cache.keys.iter_mut().zip(self.cache.values.iter_mut()))
        {
            let h = ops::rms_norm(&x, &layer.attn_norm, c.rms_eps);
            let mut q = ops::linear(&h, &layer.q, n, d, d);
            let mut k = ops::linear(&h, &layer.k, n, d, kv_dim);
            let mut v = ops::linear(&h, &layer.v, n, d, kv_dim);
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                ops::add_bias(&mut q, bq);
                ops::add_bias(&mut k, bk);
                ops::add_bias(&mut v, bv);
            }
            rope.apply(&mut q, c.n_heads);
            rope.apply(&mut k, c.n_kv_heads);
            keys[written.clone()].copy_from_slice(&k);
            values[written.clone()].copy_from_slice(&v);
            let attn = ops::attention(&q, keys, values, pass.attend_len, &shape);
            ops::add_in_place(&mut x, &ops::linear(&attn, &layer.o, n, d, d));

            let h = ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let mut gate = ops::linear(&h, &layer.gate, n, d, f);
            let up = ops::linear(&h, &layer.up, n, d, f);
            ops::silu_gate(&mut gate, &up);
            ops::add_in_place(&mut x, &ops::linear(&gate, &layer.down, n, f, d));
        }
        Ok(x[pass.rows.start * d..pass.rows.end * d].to_vec())
    }
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        format!("cpu ({} threads, f32)", rayon::current_num_threads())
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
        let normed = ops::rms_norm(&hidden, &self.final_norm, c.rms_eps);
        Ok(ops::linear(
            &normed,
            &self.head,
            pass.rows.len(),
            c.d_model,
            c.vocab_size,
        ))
    }
}
