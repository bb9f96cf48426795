//! The device buffers of a forward: the key/value cache, sized by the cache
//! layout, and the activations, sized by a bound on the rows of a batch.
//!
//! A pass never has more tokens than its sequence has slots, so one sequence
//! alone needs at most `min(slots, max_seq_len)` rows: `allocate_cache`
//! sizes the activations for that (rounded up, like every size here, to
//! whole head chunks), and a request alone allocates nothing during its
//! steps. A batch's rows are the sum of its passes' tokens, which
//! only the caller knows; when a batch needs more (rows, split-attention
//! scratch or page-table entries) than the activations hold, they are
//! reallocated before its layers run, and never during a graph capture: a
//! geometry is captured only on its second sight, after its first sight
//! already grew the buffers it needs.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::driver_error;
use super::gemm::Gemm;
use super::kernels::{AttentionScratch, RowStats};
use super::moe;
use super::ragged::RaggedDevice;
use crate::config::ModelConfig;
use crate::error::Result;

/// Rows of logits computed at a time: bounds the logits buffer (78 MB for
/// Dream's vocabulary) while a sampler's block of rows still takes one pass.
pub const HEAD_ROWS: usize = 128;

/// Per layer, `[slots, kv]` keys (already rotated at their true positions)
/// and values: the pool every sequence's pages live in.
pub struct Cache {
    pub slots: usize,
    pub keys: Vec<CudaSlice<bf16>>,
    pub values: Vec<CudaSlice<bf16>>,
}

impl Cache {
    pub fn new(stream: &Arc<CudaStream>, c: &ModelConfig, slots: usize) -> Result<Cache> {
        let layer = || {
            (0..c.n_layers)
                .map(|_| {
                    stream
                        .alloc_zeros::<bf16>(slots * c.kv_dim())
                        .map_err(driver_error("the key/value cache"))
                })
                .collect::<Result<Vec<_>>>()
        };
        Ok(Cache {
            slots,
            keys: layer()?,
            values: layer()?,
        })
    }

    pub fn bytes(c: &ModelConfig, slots: usize) -> usize {
        2 * c.n_layers * slots * c.kv_dim() * 2
    }
}

/// What the activations hold at most in one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Query rows: the sum of the passes' tokens.
    pub tokens: usize,
    /// Split-attention scratch rows ([`AttentionScratch`]).
    pub scratch_rows: usize,
    /// Page-table entries attention reads.
    pub pages: usize,
}

impl Capacity {
    pub fn covers(&self, need: &Capacity) -> bool {
        self.tokens >= need.tokens
            && self.scratch_rows >= need.scratch_rows
            && self.pages >= need.pages
    }

    /// The larger of each bound; rows are rounded up to whole head chunks,
    /// so that a batch growing a token at a time does not reallocate each step.
    pub fn max(&self, other: &Capacity) -> Capacity {
        Capacity {
            tokens: self.tokens.max(other.tokens).next_multiple_of(HEAD_ROWS),
            scratch_rows: self.scratch_rows.max(other.scratch_rows),
            pages: self.pages.max(other.pages),
        }
    }
}

/// Every buffer a batch's forward uses besides the cache and the weights.
pub struct Activations {
    pub capacity: Capacity,
    pub tokens: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    /// The physical cache slot each row writes.
    pub slots: CudaSlice<u32>,
    /// Residual stream, `[tokens, d]`.
    pub x: CudaSlice<f32>,
    /// RMSNorm output, the input of the next GEMM, `[tokens, d]`.
    pub normed: CudaSlice<bf16>,
    /// Fused q|k|v projection, `[tokens, d + 2 kv]`.
    pub qkv: CudaSlice<f32>,
    /// Attention output, `[tokens, d]`.
    pub attn: CudaSlice<bf16>,
    /// Fused gate|up projection, `[tokens, 2 f]` (f the widest of the dense
    /// MLP and the shared expert: [`mlp_width`]).
    pub gate_up: CudaSlice<f32>,
    /// SwiGLU output, `[tokens, f]`.
    pub hidden: CudaSlice<bf16>,
    /// `[HEAD_ROWS, vocab]`.
    pub logits: CudaSlice<f32>,
    /// One per row of the batch.
    pub stats: CudaSlice<RowStats>,
    pub scratch: AttentionScratch,
    pub ragged: RaggedDevice,
    /// The routed experts' buffers (MoE models only).
    pub moe: Option<moe::Buffers>,
}

/// The widest MLP of the model's layers: the dense one, or an MoE layer's
/// shared expert.
pub fn mlp_width(c: &ModelConfig) -> usize {
    c.moe
        .as_ref()
        .map_or(c.ffn_hidden, |m| c.ffn_hidden.max(m.shared_hidden()))
}

impl Activations {
    pub fn new(
        stream: &Arc<CudaStream>,
        c: &ModelConfig,
        capacity: Capacity,
    ) -> Result<Activations> {
        let (d, kv, f) = (c.d_model, c.kv_dim(), mlp_width(c));
        let rows = capacity.tokens;
        let what = "the activations";
        Ok(Activations {
            capacity,
            tokens: stream.alloc_zeros(rows).map_err(driver_error(what))?,
            positions: stream.alloc_zeros(rows).map_err(driver_error(what))?,
            slots: stream.alloc_zeros(rows).map_err(driver_error(what))?,
            x: stream.alloc_zeros(rows * d).map_err(driver_error(what))?,
            normed: stream.alloc_zeros(rows * d).map_err(driver_error(what))?,
            qkv: stream
                .alloc_zeros(rows * (d + 2 * kv))
                .map_err(driver_error(what))?,
            attn: stream.alloc_zeros(rows * d).map_err(driver_error(what))?,
            gate_up: stream
                .alloc_zeros(rows * 2 * f)
                .map_err(driver_error(what))?,
            hidden: stream.alloc_zeros(rows * f).map_err(driver_error(what))?,
            logits: stream
                .alloc_zeros(HEAD_ROWS.min(rows) * c.vocab_size)
                .map_err(driver_error(what))?,
            stats: stream.alloc_zeros(rows).map_err(driver_error(what))?,
            scratch: AttentionScratch::new(stream, capacity.scratch_rows, c.head_dim)?,
            ragged: RaggedDevice::new(stream, rows, capacity.pages)?,
            moe: c
                .moe
                .as_ref()
                .map(|m| moe::Buffers::new(stream, m, d, rows))
                .transpose()?,
        })
    }

    /// Device bytes `new` allocates for `capacity`.
    pub fn bytes(c: &ModelConfig, capacity: &Capacity) -> usize {
        let (d, kv, f) = (c.d_model, c.kv_dim(), mlp_width(c));
        let per_row_f32 = d + (d + 2 * kv) + 2 * f;
        let per_row_bf16 = d + d + f;
        let rows = capacity.tokens;
        rows * (3 * 4 + per_row_f32 * 4 + per_row_bf16 * 2 + size_of::<RowStats>())
            + HEAD_ROWS.min(rows) * c.vocab_size * 4
            + AttentionScratch::bytes(capacity.scratch_rows, c.head_dim)
            + RaggedDevice::bytes(rows, capacity.pages)
            + Gemm::workspace_bytes()
            + c.moe
                .as_ref()
                .map_or(0, |m| moe::Buffers::bytes(m, d, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llada_8b() -> ModelConfig {
        crate::synthetic::preset("llada-8b").unwrap()
    }

    fn rows(tokens: usize) -> Capacity {
        Capacity {
            tokens,
            scratch_rows: AttentionScratch::per_sequence(132),
            pages: 256,
        }
    }

    #[test]
    fn llada_8b_cache_is_half_a_mebibyte_per_slot() {
        // 32 layers x (k + v) x 4096 values x 2 bytes.
        assert_eq!(Cache::bytes(&llada_8b(), 4096), 4096 * 512 * 1024);
        // Activations for 4096 rows: 200 KiB a row (0.78 GiB, half of it the
        // f32 gate|up rows) plus ~0.1 GiB of logits, scratch and workspace.
        let gib = Activations::bytes(&llada_8b(), &rows(4096)) as f64 / (1u64 << 30) as f64;
        assert!((0.85..0.9).contains(&gib), "{gib} GiB");
    }

    #[test]
    fn activations_grow_with_rows_and_bound_the_head() {
        let c = llada_8b();
        let bytes = |tokens| Activations::bytes(&c, &rows(tokens));
        assert!(bytes(1024) > bytes(64));
        // The logits buffer holds at most HEAD_ROWS rows whatever the batch:
        // past it, a row costs the same.
        assert_eq!(bytes(5000) - bytes(4999), bytes(4000) - bytes(3999));
    }

    #[test]
    fn capacity_grows_to_cover_both_and_rounds_rows_to_head_chunks() {
        let have = Capacity {
            tokens: 128,
            scratch_rows: 500,
            pages: 10,
        };
        let need = Capacity {
            tokens: 130,
            scratch_rows: 20,
            pages: 12,
        };
        assert!(!have.covers(&need));
        let grown = have.max(&need);
        assert!(grown.covers(&need) && grown.covers(&have));
        assert_eq!(
            grown,
            Capacity {
                tokens: 256,
                scratch_rows: 500,
                pages: 12
            }
        );
    }
}
