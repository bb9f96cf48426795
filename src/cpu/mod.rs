//! The float32 CPU backend: the readable reference every other backend is
//! checked against, and the default where there is no GPU. With
//! [`Rounding::Device`] it also rounds to bf16 where the CUDA backend does, so
//! that the two differ only by arithmetic order (tests/cuda.rs). Weights
//! other than f32 are computed from as stored (`matrix`): bf16 and f16
//! stay memory-mapped, quantized ones too.

mod ffn;
pub mod matrix;
pub mod ops;

pub use ffn::{route, Routing};

use crate::backend::{Backend, CacheLayout, ForwardPass};
use crate::checkpoint::TensorView;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::progress::Progress;
use crate::quant::MatrixView;

use ffn::{Mlp, RoutedExperts};
use matrix::Matrix;
use ops::{AttentionShape, Rope};

struct Layer {
    attn_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    qkv_bias: Option<[Vec<f32>; 3]>,
    qk_norm: Option<[Vec<f32>; 2]>,
    o: Matrix,
    ffn_norm: Vec<f32>,
    /// The dense MLP, or an MoE layer's shared expert.
    mlp: Mlp,
    routed: Option<RoutedExperts>,
}

/// Per-layer keys (rotated at their true positions) and values,
/// `[pages * page_size, kv_dim]`: physical slot `i` is row `i`.
struct KvCache {
    layout: CacheLayout,
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
    embed: Matrix,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    head: Matrix,
    cache: KvCache,
    /// The last forward's routing, one entry per MoE layer.
    routing: Vec<Routing>,
}

impl CpuBackend {
    /// Takes the model's weights (f32 ones copied, others as stored),
    /// showing progress on a terminal.
    pub fn new(model: &Model) -> Result<CpuBackend> {
        CpuBackend::with_rounding(model, Rounding::F32)
    }

    /// Like [`CpuBackend::new`], rounding to bf16 where `rounding` says.
    pub fn with_rounding(model: &Model, rounding: Rounding) -> Result<CpuBackend> {
        let tensors = model.tensors()?;
        let config = model.config.clone();
        let progress = Progress::bytes("loading weights", model.checkpoint.total_bytes());
        let load = |t: &TensorView| {
            progress.advance(t.bytes.len() as u64);
            t.to_f32()
        };
        let matrix = |m: &MatrixView| {
            progress.advance(m.stored_bytes());
            Matrix::load(m, rounding == Rounding::Device)
        };
        let mlp = |[gate, up, down]: [&MatrixView; 3]| Mlp {
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
                    // Not rounded to bf16 under device rounding: a rounded
                    // score can flip which experts a token goes to.
                    router: {
                        progress.advance(r.router.stored_bytes());
                        Matrix::load(&r.router, false)
                    },
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
                layout: CacheLayout::default(),
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

    /// Runs the layers over the passes' tokens together, updating each
    /// sequence's cache slots, and returns the final hidden states of every
    /// pass's requested rows, concatenated.
    ///
    /// Every row goes through the same arithmetic whatever else is in the
    /// batch: the GEMMs sum each output in an order fixed by the shapes of the
    /// weights alone (matrixmultiply blocks only the inner dimension by a
    /// constant), norms and RoPE are per row, and attention is per sequence.
    fn hidden_states(&mut self, passes: &[ForwardPass]) -> Result<Vec<f32>> {
        ForwardPass::validate_batch(passes, &self.cache.layout)?;
        let c = &self.config;
        let (d, kv_dim) = (c.d_model, c.kv_dim());
        let tokens: Vec<u32> = passes.iter().flat_map(|p| p.tokens).copied().collect();
        let positions: Vec<u32> = passes.iter().flat_map(|p| p.positions).copied().collect();
        let n = tokens.len();
        let mut x = Vec::with_capacity(n * d);
        for &t in &tokens {
            let t = t as usize;
            if t >= c.vocab_size {
                return Err(Error::invalid(format!(
                    "token id {t} is outside the vocabulary of {} entries",
                    c.vocab_size
                )));
            }
            let start = x.len();
            x.resize(start + d, 0.0);
            self.embed.row_into(t, &mut x[start..]);
        }
        // Each pass's query rows within the batch.
        let mut spans = Vec::with_capacity(passes.len());
        let mut row = 0;
        for pass in passes {
            spans.push(row..row + pass.tokens.len());
            row += pass.tokens.len();
        }
        let rope = Rope::new(&positions, c.head_dim, c.rotary_dim(), c.rope_theta);
        let shape = AttentionShape {
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let page_size = self.cache.layout.page_size;
        let rounding = self.rounding;
        self.routing.clear();
        for (layer, (keys, values)) in self
            .layers
            .iter()
            .zip(self.cache.keys.iter_mut().zip(self.cache.values.iter_mut()))
        {
            let mut h = ops::rms_norm(&x, &layer.attn_norm, c.rms_eps);
            rounding.round(&mut h);
            let mut q = layer.q.linear(&h, n);
            let mut k = layer.k.linear(&h, n);
            let mut v = layer.v.linear(&h, n);
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
            let mut attn = Vec::with_capacity(n * d);
            for (pass, span) in passes.iter().zip(&spans) {
                for (i, r) in span.clone().enumerate() {
                    let slot = pass.physical_slot(pass.write_slot + i, page_size) * kv_dim;
                    for (cache, new) in [(&mut *keys, &k), (&mut *values, &v)] {
                        let dst = &mut cache[slot..slot + kv_dim];
                        dst.copy_from_slice(&new[r * kv_dim..(r + 1) * kv_dim]);
                        rounding.round(dst);
                    }
                }
                let (pass_keys, pass_values) = (
                    sequence_slots(keys, pass, page_size, kv_dim),
                    sequence_slots(values, pass, page_size, kv_dim),
                );
                attn.extend(ops::attention(
                    &q[span.start * d..span.end * d],
                    &pass_keys,
                    &pass_values,
                    pass.attend_len,
                    &shape,
                ));
            }
            rounding.round(&mut attn);
            ops::add_in_place(&mut x, &layer.o.linear(&attn, n));

            let mut h = ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            rounding.round(&mut h);
            let mut ffn = layer.mlp.forward(&h, rounding);
            if let Some(routed) = &layer.routed {
                // Routed plus shared expert, then the residual: the reference's order.
                let routing = routed.route(&h, n);
                ops::add_in_place(&mut ffn, &routed.forward(&h, d, &routing, rounding));
                self.routing.push(routing);
            }
            ops::add_in_place(&mut x, &ffn);
        }
        let mut wanted = Vec::new();
        for (pass, span) in passes.iter().zip(&spans) {
            let rows = span.start + pass.rows.start..span.start + pass.rows.end;
            wanted.extend_from_slice(&x[rows.start * d..rows.end * d]);
        }
        Ok(wanted)
    }
}

/// The rows of `cache` holding slots `0..pass.attend_len` of the pass's
/// sequence, in slot order: borrowed where its pages are consecutive, else
/// gathered.
fn sequence_slots<'c>(
    cache: &'c [f32],
    pass: &ForwardPass,
    page_size: usize,
    kv_dim: usize,
) -> std::borrow::Cow<'c, [f32]> {
    let used = pass.attend_len.div_ceil(page_size);
    let pages = &pass.pages[..used];
    let first = pages[0] as usize * page_size;
    if pages.windows(2).all(|w| w[1] == w[0] + 1) {
        return std::borrow::Cow::Borrowed(
            &cache[first * kv_dim..(first + pass.attend_len) * kv_dim],
        );
    }
    let mut gathered = Vec::with_capacity(pass.attend_len * kv_dim);
    for slot in 0..pass.attend_len {
        let at = pass.physical_slot(slot, page_size) * kv_dim;
        gathered.extend_from_slice(&cache[at..at + kv_dim]);
    }
    std::borrow::Cow::Owned(gathered)
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

    fn cache_slot_bytes(&self) -> usize {
        2 * self.config.n_layers * self.config.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Half the memory available now.
    fn cache_budget(&self) -> Result<usize> {
        Ok(available_memory().unwrap_or(8 << 30) / 2)
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> Result<()> {
        let size = layout.slots() * self.config.kv_dim();
        let layers = self.config.n_layers;
        // Drop the old cache before allocating the new one.
        self.cache = KvCache {
            layout: CacheLayout::default(),
            keys: Vec::new(),
            values: Vec::new(),
        };
        let zeroed = || -> Result<Vec<Vec<f32>>> {
            (0..layers)
                .map(|_| {
                    zeroed_f32(size).ok_or_else(|| {
                        Error::Device(format!(
                            "cannot allocate a key/value cache of {} slots ({:.2} GiB)",
                            layout.slots(),
                            (2 * layers * size * 4) as f64 / (1u64 << 30) as f64
                        ))
                    })
                })
                .collect()
        };
        let (keys, values) = (zeroed()?, zeroed()?);
        self.cache = KvCache {
            layout,
            keys,
            values,
        };
        Ok(())
    }

    fn logits(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<f32>>> {
        let hidden = self.hidden_states(passes)?;
        let c = &self.config;
        let mut normed = ops::rms_norm(&hidden, &self.final_norm, c.rms_eps);
        self.rounding.round(&mut normed);
        let rows = hidden.len() / c.d_model;
        let logits = self.head.linear(&normed, rows);
        let mut rest = logits.as_slice();
        Ok(passes
            .iter()
            .map(|pass| {
                let (mine, next) = rest.split_at(pass.rows.len() * c.vocab_size);
                rest = next;
                mine.to_vec()
            })
            .collect())
    }
}

/// `len` zeros, or `None` when the allocator refuses. Zeroed allocations of
/// this size come straight from the kernel as untouched pages, so a cache
/// sized for many sequences is resident only as far as sequences use it.
fn zeroed_f32(len: usize) -> Option<Vec<f32>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).ok()?;
    // SAFETY: the layout has a non-zero size; a non-null result is `len`
    // zeroed f32s (all-zero bits are 0.0) allocated by the global allocator
    // with exactly the layout Vec<f32> uses for capacity `len`, so the Vec
    // owns and later frees it correctly.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<f32>();
        (!ptr.is_null()).then(|| Vec::from_raw_parts(ptr, len, len))
    }
}

/// `MemAvailable` of /proc/meminfo, where there is one.
fn available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
            pages: crate::backend::SINGLE_PAGE,
        };
        let mut exact = CpuBackend::new(&model).unwrap();
        let mut rounded = CpuBackend::with_rounding(&model, Rounding::Device).unwrap();
        exact.prepare(12).unwrap();
        rounded.prepare(12).unwrap();
        let want = exact.logits_of(&pass).unwrap();
        let got = rounded.logits_of(&pass).unwrap();

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
