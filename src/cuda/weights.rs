//! The model's weights on the device. Matrices are bf16 (what the GEMMs read)
//! and the few vectors (norm weights, Dream's biases, RoPE frequencies) are
//! f32, so that they are exactly the CPU reference's values.
//!
//! Projections that read the same input are concatenated along their output
//! rows, so each layer runs three input GEMMs fewer: q|k|v is one
//! `[d + 2 kv, d]` matrix and gate|up one `[2 f, d]` matrix. An MoE layer's
//! routed experts are stacked into one gate|up and one down matrix, expert
//! after expert, which the grouped GEMM (kernels/moe_experts.cu) indexes.

use crate::cpu::ops::inv_freq;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::driver_error;
use super::moe::Experts;
use crate::checkpoint::TensorView;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{Model, RoutedExperts};
use crate::progress::Progress;
use crate::quant::{Encoding, MatrixView};

pub struct Layer {
    pub attn_norm: CudaSlice<f32>,
    pub qkv: CudaSlice<bf16>,
    /// bq|bk|bv, matching the columns of `qkv`'s output (Dream only).
    pub qkv_bias: Option<CudaSlice<f32>>,
    /// q and k RMSNorm weights, `[head_dim]` each (LLaDA2 only).
    pub qk_norm: Option<[CudaSlice<f32>; 2]>,
    pub o: CudaSlice<bf16>,
    pub ffn_norm: CudaSlice<f32>,
    /// The dense MLP, or an MoE layer's shared expert.
    pub gate_up: CudaSlice<bf16>,
    pub down: CudaSlice<bf16>,
    /// An MoE layer's router and routed experts.
    pub routed: Option<Experts>,
}

pub struct Weights {
    pub embed: CudaSlice<bf16>,
    pub layers: Vec<Layer>,
    pub final_norm: CudaSlice<f32>,
    pub head: CudaSlice<bf16>,
    /// RoPE inverse frequencies, `[head_dim / 2]`.
    pub inv_freq: CudaSlice<f32>,
}

impl Weights {
    /// Device bytes of the weights: parameters are two bytes each (vectors,
    /// stored in f32, are too few to count).
    pub fn bytes(config: &ModelConfig) -> usize {
        config.parameter_count() as usize * 2
    }

    pub fn upload(stream: &Arc<CudaStream>, model: &Model) -> Result<Weights> {
        let tensors = model.tensors()?;
        let up = Upload {
            stream,
            progress: Progress::bytes(
                "uploading weights to the GPU",
                Self::bytes(&model.config) as u64,
            ),
        };
        let layers = tensors
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: up.vector(&[&l.attn_norm])?,
                    qkv: up.matrix(&[&l.q, &l.k, &l.v])?,
                    qkv_bias: l
                        .qkv_bias
                        .as_ref()
                        .map(|[q, k, v]| up.vector(&[q, k, v]))
                        .transpose()?,
                    qk_norm: l
                        .qk_norm
                        .as_ref()
                        .map(|[q, k]| {
                            Ok::<_, crate::error::Error>([up.vector(&[q])?, up.vector(&[k])?])
                        })
                        .transpose()?,
                    o: up.matrix(&[&l.o])?,
                    ffn_norm: up.vector(&[&l.ffn_norm])?,
                    gate_up: up.matrix(&[&l.gate, &l.up])?,
                    down: up.matrix(&[&l.down])?,
                    routed: l.routed.as_ref().map(|r| up.experts(r)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = Weights {
            embed: up.matrix(&[&tensors.embed])?,
            layers,
            final_norm: up.vector(&[&tensors.final_norm])?,
            head: up.matrix(&[&tensors.head])?,
            inv_freq: stream
                .clone_htod(&inv_freq(
                    model.config.rotary_dim(),
                    model.config.rope_theta,
                ))
                .map_err(driver_error("the RoPE frequencies"))?,
        };
        up.progress.finish();
        Ok(weights)
    }
}

struct Upload<'a> {
    stream: &'a Arc<CudaStream>,
    progress: Progress,
}

impl Upload<'_> {
    /// The row-wise concatenation of `parts`, as bf16. A bf16 matrix goes to
    /// the device straight from the memory map; others are rounded on the
    /// host first (quantized ones dequantized: the GEMMs read bf16).
    fn matrix(&self, parts: &[&MatrixView]) -> Result<CudaSlice<bf16>> {
        let total = parts.iter().map(|p| p.rows * p.cols).sum();
        let mut device = self
            .stream
            .alloc_zeros::<bf16>(total)
            .map_err(driver_error("the weights"))?;
        let mut at = 0;
        for part in parts {
            let rounded;
            let host: &[bf16] = match bytemuck::try_cast_slice(part.values.bytes) {
                Ok(mapped) if part.encoding == Encoding::BF16 => mapped,
                _ => {
                    rounded = part.to_bf16();
                    &rounded
                }
            };
            self.stream
                .memcpy_htod(host, &mut device.slice_mut(at..at + host.len()))
                .map_err(driver_error("the weights"))?;
            self.progress.advance(host.len() as u64 * 2);
            at += host.len();
        }
        Ok(device)
    }

    /// The router (bf16 like every matrix) and the experts stacked: gate
    /// and up of each expert in turn, then every down.
    fn experts(&self, routed: &RoutedExperts) -> Result<Experts> {
        let gate_up: Vec<&MatrixView> =
            routed.experts.iter().flat_map(|[g, u, _]| [g, u]).collect();
        let down: Vec<&MatrixView> = routed.experts.iter().map(|[_, _, down]| down).collect();
        Ok(Experts {
            router: self.matrix(&[&routed.router])?,
            expert_bias: self.vector(&[&routed.expert_bias])?,
            gate_up: self.matrix(&gate_up)?,
            down: self.matrix(&down)?,
        })
    }

    /// The concatenation of `parts`, as f32 (norm weights and biases: a few
    /// thousand values).
    fn vector(&self, parts: &[&TensorView]) -> Result<CudaSlice<f32>> {
        let host: Vec<f32> = parts.iter().flat_map(|p| p.to_f32()).collect();
        let slice = self
            .stream
            .clone_htod(&host)
            .map_err(driver_error("the weights"))?;
        self.progress.advance(host.len() as u64 * 2);
        Ok(slice)
    }
}
