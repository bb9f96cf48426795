//! LLaDA2's mixture of experts on the device (LLADA2.md §3.3): the router
//! and the routed experts of an MoE layer, their buffers, and the layer's
//! feed-forward half after the shared expert:
//!
//! ```text
//! logits  = h · Wrouterᵀ                       cuBLASLt, f32 [n, experts]
//! choices = route(logits, expert_bias)         moe_router.cu: [n, top_k] experts and weights
//! sorted  = the choices grouped by expert      moe_sort (moe_experts.cu)
//! gu      = h[rows of each expert] · Wgate|upᵀ moe_gemm: each expert over its rows
//! y       = (silu(g) u) · Wdownᵀ               silu_gate.cu, moe_gemm
//! x      += shared + Σ weight · y              moe_combine, experts in ascending order
//! ```
//!
//! The routing never leaves the device: every launch's grid is set by the
//! row count alone, so an MoE step is captured into a CUDA graph like any
//! other. Why a hand-written grouped GEMM rather than one cuBLASLt product
//! per touched expert: those need each expert's row count on the host (a
//! synchronisation per layer, and no graphs), and a plan per count.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::{driver_error, Gpu};
use crate::config::MoeConfig;
use crate::error::Result;

/// An MoE layer's router and routed experts, bf16 matrices.
pub struct Experts {
    /// `[experts, d]`.
    pub router: CudaSlice<bf16>,
    /// `[experts]`, f32: added to the scores for selection only.
    pub expert_bias: CudaSlice<f32>,
    /// Each expert's gate rows then up rows, `[experts, 2 eh, d]`.
    pub gate_up: CudaSlice<bf16>,
    /// `[experts, d, eh]`.
    pub down: CudaSlice<bf16>,
}

/// What the MoE layers of a batch of `rows` rows write besides the residual.
/// An entry is one (row, choice) pair: `rows · top_k` of them.
pub struct Buffers {
    /// Router GEMM output, `[rows, experts]`.
    logits: CudaSlice<f32>,
    /// Each row's experts and routing weights, `[rows, top_k]`.
    choices: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    /// Expert e's entries are `offsets[e]..offsets[e + 1]`, `[experts + 1]`.
    offsets: CudaSlice<u32>,
    /// The token row of each entry, `[entries]`.
    sorted_rows: CudaSlice<u32>,
    /// The entry of each (row, choice), `[rows, top_k]`.
    positions: CudaSlice<u32>,
    /// Per entry: gate|up `[entries, 2 eh]`, SwiGLU `[entries, eh]` and the
    /// expert's output `[entries, d]`.
    gate_up: CudaSlice<f32>,
    hidden: CudaSlice<bf16>,
    out: CudaSlice<f32>,
    /// The shared expert's output, `[rows, d]`.
    pub shared: CudaSlice<f32>,
}

impl Buffers {
    pub fn new(stream: &Arc<CudaStream>, moe: &MoeConfig, d: usize, rows: usize) -> Result<Self> {
        let (e, k, eh) = (moe.experts, moe.experts_per_token, moe.expert_hidden);
        let entries = rows * k;
        Ok(Buffers {
            logits: zeros(stream, rows * e)?,
            choices: zeros(stream, entries)?,
            weights: zeros(stream, entries)?,
            offsets: zeros(stream, e + 1)?,
            sorted_rows: zeros(stream, entries)?,
            positions: zeros(stream, entries)?,
            gate_up: zeros(stream, entries * 2 * eh)?,
            hidden: zeros(stream, entries * eh)?,
            out: zeros(stream, entries * d)?,
            shared: zeros(stream, rows * d)?,
        })
    }

    /// Device bytes `new` allocates.
    pub fn bytes(moe: &MoeConfig, d: usize, rows: usize) -> usize {
        let (e, k, eh) = (moe.experts, moe.experts_per_token, moe.expert_hidden);
        let entries = rows * k;
        let words = rows * e + 4 * entries + e + 1 + entries * (2 * eh + d) + rows * d;
        words * 4 + entries * eh * 2
    }
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    stream
        .alloc_zeros(len)
        .map_err(driver_error("the MoE activations"))
}

/// The routed experts of `h` (`[n, d]`, the FFN norm's output) added to the
/// residual `x` with the shared expert's output, already in `b.shared`.
/// Only launches: a graph can capture it.
pub fn forward(
    gpu: &mut Gpu,
    experts: &Experts,
    moe: &MoeConfig,
    b: &mut Buffers,
    h: &CudaView<bf16>,
    x: &mut CudaViewMut<f32>,
    d: usize,
) -> Result<()> {
    let n = h.len() / d;
    let (e, k, eh) = (moe.experts, moe.experts_per_token, moe.expert_hidden);
    let entries = n * k;
    let (stream, kernels) = (&gpu.stream, &gpu.kernels);
    gpu.gemm.matmul(
        &mut b.logits.slice_mut(..n * e),
        h,
        &experts.router.as_view(),
        d,
        false,
    )?;
    kernels.moe_router(
        stream,
        &b.logits.slice(..n * e),
        &experts.expert_bias.as_view(),
        &mut b.choices.slice_mut(..entries),
        &mut b.weights.slice_mut(..entries),
        moe,
    )?;
    kernels.moe_sort(
        stream,
        &b.choices.slice(..entries),
        &mut b.offsets.as_view_mut(),
        &mut b.sorted_rows.slice_mut(..entries),
        &mut b.positions.slice_mut(..entries),
        moe,
    )?;
    kernels.moe_gemm(
        stream,
        h,
        Some(&b.sorted_rows.slice(..entries)),
        &experts.gate_up.as_view(),
        &b.offsets.as_view(),
        &mut b.gate_up.slice_mut(..entries * 2 * eh),
        d,
    )?;
    kernels.silu_gate(
        stream,
        &b.gate_up.slice(..entries * 2 * eh),
        &mut b.hidden.slice_mut(..entries * eh),
        eh,
    )?;
    kernels.moe_gemm(
        stream,
        &b.hidden.slice(..entries * eh),
        None,
        &experts.down.as_view(),
        &b.offsets.as_view(),
        &mut b.out.slice_mut(..entries * d),
        eh,
    )?;
    kernels.moe_combine(
        stream,
        &b.out.slice(..entries * d),
        &b.positions.slice(..entries),
        &b.choices.slice(..entries),
        &b.weights.slice(..entries),
        &b.shared.slice(..n * d),
        x,
        k,
    )
}
