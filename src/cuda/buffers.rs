//! Every device buffer a forward pass uses, sized once by `prepare(slots)`:
//! a pass never has more tokens than the cache has slots, so `slots` rows
//! bound every activation. Nothing is allocated during a step.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::driver_error;
use super::gemm::Gemm;
use super::kernels::{AttentionScratch, RowStats};
use crate::config::ModelConfig;
use crate::error::Result;

/// Rows of logits computed at a time: bounds the logits buffer (78 MB for
/// Dream's vocabulary) while a sampler's block of rows still takes one pass.
pub const HEAD_ROWS: usize = 128;

pub struct Buffers {
    pub slots: usize,
    pub tokens: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    /// Residual stream, `[slots, d]`.
    pub x: CudaSlice<f32>,
    /// RMSNorm output, the input of the next GEMM, `[slots, d]`.
    pub normed: CudaSlice<bf16>,
    /// Fused q|k|v projection, `[slots, d + 2 kv]`.
    pub qkv: CudaSlice<f32>,
    /// Attention output, `[slots, d]`.
    pub attn: CudaSlice<bf16>,
    /// Fused gate|up projection, `[slots, 2 f]`.
    pub gate_up: CudaSlice<f32>,
    /// SwiGLU output, `[slots, f]`.
    pub hidden: CudaSlice<bf16>,
    pub logits: CudaSlice<f32>,
    pub stats: CudaSlice<RowStats>,
    pub scratch: AttentionScratch,
    /// Per layer, `[slots, kv]`: keys already rotated at their true positions.
    pub keys: Vec<CudaSlice<bf16>>,
    pub values: Vec<CudaSlice<bf16>>,
}

/// Device bytes that `prepare(slots)` allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub cache: usize,
    pub activations: usize,
}

impl Footprint {
    pub fn new(c: &ModelConfig, slots: usize, sms: usize) -> Footprint {
        let (d, kv, f) = (c.d_model, c.kv_dim(), c.ffn_hidden);
        let per_row_f32 = d + (d + 2 * kv) + 2 * f;
        let per_row_bf16 = d + d + f;
        let head_rows = HEAD_ROWS.min(slots);
        Footprint {
            cache: 2 * c.n_layers * slots * kv * 2,
            activations: slots * (2 * 4 + per_row_f32 * 4 + per_row_bf16 * 2)
                + head_rows * (c.vocab_size * 4 + size_of::<RowStats>())
                + AttentionScratch::bytes(sms, c.head_dim)
                + Gemm::workspace_bytes(),
        }
    }

    pub fn total(&self) -> usize {
        self.cache + self.activations
    }
}

impl Buffers {
    pub fn new(
        stream: &Arc<CudaStream>,
        c: &ModelConfig,
        slots: usize,
        sms: usize,
    ) -> Result<Buffers> {
        let (d, kv, f) = (c.d_model, c.kv_dim(), c.ffn_hidden);
        let head_rows = HEAD_ROWS.min(slots);
        let what = "the activations";
        let cache = || {
            (0..c.n_layers)
                .map(|_| {
                    stream
                        .alloc_zeros::<bf16>(slots * kv)
                        .map_err(driver_error("the key/value cache"))
                })
                .collect::<Result<Vec<_>>>()
        };
        Ok(Buffers {
            slots,
            tokens: stream.alloc_zeros(slots).map_err(driver_error(what))?,
            positions: stream.alloc_zeros(slots).map_err(driver_error(what))?,
            x: stream.alloc_zeros(slots * d).map_err(driver_error(what))?,
            normed: stream.alloc_zeros(slots * d).map_err(driver_error(what))?,
            qkv: stream
                .alloc_zeros(slots * (d + 2 * kv))
                .map_err(driver_error(what))?,
            attn: stream.alloc_zeros(slots * d).map_err(driver_error(what))?,
            gate_up: stream
                .alloc_zeros(slots * 2 * f)
                .map_err(driver_error(what))?,
            hidden: stream.alloc_zeros(slots * f).map_err(driver_error(what))?,
            logits: stream
                .alloc_zeros(head_rows * c.vocab_size)
                .map_err(driver_error(what))?,
            stats: stream.alloc_zeros(head_rows).map_err(driver_error(what))?,
            scratch: AttentionScratch::new(stream, sms, c.head_dim)?,
            keys: cache()?,
            values: cache()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llada_8b() -> ModelConfig {
        crate::synthetic::preset("llada-8b").unwrap()
    }

    #[test]
    fn llada_8b_cache_is_half_a_mebibyte_per_slot() {
        // 32 layers x (k + v) x 4096 values x 2 bytes.
        let f = Footprint::new(&llada_8b(), 4096, 132);
        assert_eq!(f.cache, 4096 * 512 * 1024);
        // Activations at 4096 slots: 200 KiB a row (0.78 GiB, half of it the
        // f32 gate|up rows) plus ~0.1 GiB of logits, scratch and workspace.
        let gib = f.activations as f64 / (1u64 << 30) as f64;
        assert!((0.85..0.9).contains(&gib), "{gib} GiB");
    }

    #[test]
    fn footprint_grows_with_slots_and_bounds_the_head() {
        let c = llada_8b();
        let (small, large) = (Footprint::new(&c, 64, 132), Footprint::new(&c, 1024, 132));
        assert!(large.cache == 16 * small.cache && large.activations > small.activations);
        // The logits buffer holds at most HEAD_ROWS rows whatever the slot count.
        let logits = |slots| {
            Footprint::new(&c, slots, 132).activations
                - Footprint::new(&c, slots - 1, 132).activations
        };
        assert_eq!(logits(5000), logits(4000));
    }
}
