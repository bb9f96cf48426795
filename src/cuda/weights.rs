//! The model's weights on the device. Float matrices are bf16 (what cuBLASLt
//! reads); quantized ones stay as the checkpoint stores them, int8 or 4-bit
//! with their f32 scales (src/cuda/quantized.rs), with one bf16 scratch for
//! dequantizing a layer's matrix for a prefill product (src/cuda/linear.rs).
//! The embedding (only gathered) is bf16 either way, and the few vectors
//! (norm weights, Dream's biases, RoPE frequencies) are f32, so that they
//! are exactly the CPU reference's values.
//!
//! Projections that read the same input are concatenated along their output
//! rows, so each layer runs three input GEMMs fewer: q|k|v is one
//! `[d + 2 kv, d]` matrix and gate|up one `[2 f, d]` matrix (quantized rows
//! concatenate with their scales, which are per row). An MoE layer's routed
//! experts are stacked into one gate|up and one down matrix, expert after
//! expert, which the grouped GEMM (kernels/moe_experts.cu) indexes; they are
//! bf16 whatever the checkpoint stores (dequantized on the host).

use crate::cpu::ops::inv_freq;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::driver_error;
use super::linear::DeviceMatrix;
use super::moe::Experts;
use super::quantized::QuantizedMatrix;
use crate::checkpoint::TensorView;
use crate::error::{Error, Result};
use crate::model::{LayerTensors, Model, ModelTensors, RoutedExperts};
use crate::progress::Progress;
use crate::quant::{Encoding, MatrixView};

pub struct Layer {
    pub attn_norm: CudaSlice<f32>,
    pub qkv: DeviceMatrix,
    /// bq|bk|bv, matching the columns of `qkv`'s output (Dream only).
    pub qkv_bias: Option<CudaSlice<f32>>,
    /// q and k RMSNorm weights, `[head_dim]` each (LLaDA2 only).
    pub qk_norm: Option<[CudaSlice<f32>; 2]>,
    pub o: DeviceMatrix,
    pub ffn_norm: CudaSlice<f32>,
    /// The dense MLP, or an MoE layer's shared expert.
    pub gate_up: DeviceMatrix,
    pub down: DeviceMatrix,
    /// An MoE layer's router and routed experts.
    pub routed: Option<Experts>,
}

pub struct Weights {
    pub embed: CudaSlice<bf16>,
    pub layers: Vec<Layer>,
    pub final_norm: CudaSlice<f32>,
    pub head: DeviceMatrix,
    /// RoPE inverse frequencies, `[head_dim / 2]`.
    pub inv_freq: CudaSlice<f32>,
    /// Room for the largest layer matrix in bf16 when the matrices are
    /// quantized, else None.
    pub scratch: Option<CudaSlice<bf16>>,
}

/// A layer's matrices as the device fuses them: q|k|v, o, gate|up, down.
fn fused<'a, 'b>(l: &'b LayerTensors<'a>) -> [Vec<&'b MatrixView<'a>>; 4] {
    [
        vec![&l.q, &l.k, &l.v],
        vec![&l.o],
        vec![&l.gate, &l.up],
        vec![&l.down],
    ]
}

fn values(parts: &[&MatrixView]) -> usize {
    parts.iter().map(|p| p.rows * p.cols).sum()
}

/// Device bytes of a fused matrix: bf16, or the quantized bytes and scales
/// as stored.
fn matrix_bytes(parts: &[&MatrixView]) -> usize {
    if parts[0].scales.is_some() {
        parts.iter().map(|p| p.stored_bytes() as usize).sum()
    } else {
        values(parts) * 2
    }
}

/// Values of the dequantization scratch: the largest fused layer matrix when
/// they are quantized. A quantized head is not counted: it would double the
/// scratch of a large vocabulary, and linear.rs multiplies what does not fit
/// through `dequant_gemm`.
fn scratch_values(tensors: &ModelTensors) -> usize {
    tensors
        .layers
        .iter()
        .flat_map(fused)
        .filter(|parts| parts[0].scales.is_some())
        .map(|parts| values(&parts))
        .max()
        .unwrap_or(0)
}

fn elements(t: &TensorView) -> usize {
    t.shape.iter().product()
}

impl Weights {
    /// Device bytes of the model's weights, the dequantization scratch
    /// included: what `upload` allocates.
    pub fn bytes(model: &Model) -> Result<usize> {
        let t = model.tensors()?;
        let matrices: usize = t
            .layers
            .iter()
            .flat_map(fused)
            .chain([vec![&t.head]])
            .map(|parts| matrix_bytes(&parts))
            .sum();
        let routed = t.layers.iter().flat_map(|l| &l.routed);
        let experts: usize = routed
            .clone()
            .map(|r| {
                let matrices = r.experts.iter().flatten().chain([&r.router]);
                values(&matrices.collect::<Vec<_>>()) * 2
            })
            .sum();
        let vectors: usize = t
            .layers
            .iter()
            .flat_map(|l| {
                [&l.attn_norm, &l.ffn_norm]
                    .into_iter()
                    .chain(l.qkv_bias.iter().flatten())
                    .chain(l.qk_norm.iter().flatten())
            })
            .chain(routed.map(|r| &r.expert_bias))
            .chain([&t.final_norm])
            .map(elements)
            .sum::<usize>()
            + model.config.rotary_dim() / 2;
        Ok(values(&[&t.embed]) * 2 + matrices + experts + vectors * 4 + scratch_values(&t) * 2)
    }

    pub fn upload(stream: &Arc<CudaStream>, model: &Model) -> Result<Weights> {
        let tensors = model.tensors()?;
        let up = Upload {
            stream,
            progress: Progress::bytes("uploading weights to the GPU", Self::bytes(model)? as u64),
        };
        let layers = tensors
            .layers
            .iter()
            .map(|l| {
                let [qkv, o, gate_up, down] = fused(l);
                Ok(Layer {
                    attn_norm: up.vector(&[&l.attn_norm])?,
                    qkv: up.matrix(&qkv)?,
                    qkv_bias: l
                        .qkv_bias
                        .as_ref()
                        .map(|[q, k, v]| up.vector(&[q, k, v]))
                        .transpose()?,
                    qk_norm: l
                        .qk_norm
                        .as_ref()
                        .map(|[q, k]| Ok::<_, Error>([up.vector(&[q])?, up.vector(&[k])?]))
                        .transpose()?,
                    o: up.matrix(&o)?,
                    ffn_norm: up.vector(&[&l.ffn_norm])?,
                    gate_up: up.matrix(&gate_up)?,
                    down: up.matrix(&down)?,
                    routed: l.routed.as_ref().map(|r| up.experts(r)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let scratch = match scratch_values(&tensors) {
            0 => None,
            len => Some(
                stream
                    .alloc_zeros::<bf16>(len)
                    .map_err(driver_error("the dequantization scratch"))?,
            ),
        };
        let weights = Weights {
            embed: up.bf16(&[&tensors.embed])?,
            layers,
            final_norm: up.vector(&[&tensors.final_norm])?,
            head: up.matrix(&[&tensors.head])?,
            inv_freq: stream
                .clone_htod(&inv_freq(
                    model.config.rotary_dim(),
                    model.config.rope_theta,
                ))
                .map_err(driver_error("the RoPE frequencies"))?,
            scratch,
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
    /// The row-wise concatenation of `parts`: quantized as stored when they
    /// are quantized, else bf16.
    fn matrix(&self, parts: &[&MatrixView]) -> Result<DeviceMatrix> {
        let first = parts[0];
        if first.scales.is_none() {
            return Ok(DeviceMatrix::Bf16 {
                values: self.bf16(parts)?,
                cols: first.cols,
            });
        }
        if let Some(odd) = parts
            .iter()
            .find(|p| p.encoding != first.encoding || p.cols != first.cols)
        {
            return Err(Error::Tensor {
                name: odd.name.to_string(),
                message: format!(
                    "stored as {:?} with rows of {}, but fused with {} ({:?}, rows of {})",
                    odd.encoding, odd.cols, first.name, first.encoding, first.cols
                ),
            });
        }
        QuantizedMatrix::check(first.name, first.encoding, first.cols)?;
        let rows = parts.iter().map(|p| p.rows).sum();
        let bytes: usize = parts.iter().map(|p| p.values.bytes.len()).sum();
        let mut values = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(driver_error("the weights"))?;
        let mut at = 0;
        for part in parts {
            let host = part.values.bytes;
            self.stream
                .memcpy_htod(host, &mut values.slice_mut(at..at + host.len()))
                .map_err(driver_error("the weights"))?;
            at += host.len();
        }
        let scales: Vec<f32> = parts.iter().flat_map(|p| p.scales_f32()).collect();
        let scales = self
            .stream
            .clone_htod(&scales)
            .map_err(driver_error("the weights"))?;
        self.progress.advance(matrix_bytes(parts) as u64);
        QuantizedMatrix::new(
            first.name,
            first.encoding,
            [rows, first.cols],
            values,
            scales,
        )
        .map(DeviceMatrix::Quantized)
    }

    /// The row-wise concatenation of `parts`, as bf16. A bf16 matrix goes to
    /// the device straight from the memory map; others are rounded on the
    /// host first.
    fn bf16(&self, parts: &[&MatrixView]) -> Result<CudaSlice<bf16>> {
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

    /// The router and the experts stacked, in bf16: gate and up of each
    /// expert in turn, then every down.
    fn experts(&self, routed: &RoutedExperts) -> Result<Experts> {
        let gate_up: Vec<&MatrixView> =
            routed.experts.iter().flat_map(|[g, u, _]| [g, u]).collect();
        let down: Vec<&MatrixView> = routed.experts.iter().map(|[_, _, down]| down).collect();
        Ok(Experts {
            router: self.bf16(&[&routed.router])?,
            expert_bias: self.vector(&[&routed.expert_bias])?,
            gate_up: self.bf16(&gate_up)?,
            down: self.bf16(&down)?,
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
        self.progress.advance(host.len() as u64 * 4);
        Ok(slice)
    }
}
