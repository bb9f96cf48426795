//! Typed launchers for `kernels/*.cu`: one method per kernel, which checks the
//! extents of its buffers against the shape it is given and derives the launch
//! grid. The launch constants here mirror the ones in the .cu files.
//!
//! Buffers are passed as views with exact extents (`slice(..n * d)`), so every
//! size a kernel trusts is checked on the host first.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use super::ragged::RaggedDevice;
use super::{driver_error, no_kernels_error};
use crate::backend::TokenStats;
use crate::config::MoeConfig;
use crate::error::{Error, Result};

#[cfg(dllm_kernels)]
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
#[cfg(not(dllm_kernels))]
const FATBINS: &[(&str, &[u8])] = &[];

/// Whether this build embeds compiled kernels (nvcc was found by build.rs).
pub const KERNELS_BUILT: bool = cfg!(dllm_kernels);

/// Queries per attention block (kernels/attention.cu `BQ`).
pub const ATTENTION_QUERIES: usize = 16;
/// Keys per attention tile (kernels/attention.cu `BK`).
pub const ATTENTION_KEYS: usize = 64;
const ATTENTION_THREADS: u32 = 128;
/// A key split is worth its combine pass only past this many keys.
const MIN_SPLIT_KEYS: usize = 4 * ATTENTION_KEYS;
const CONFIDENCE_THREADS: u32 = 512;
const ROW_THREADS: u32 = 256;
/// The router's limits (kernels/moe_router.cu), which the expert sort
/// (kernels/moe_experts.cu) shares.
const ROUTER_MAX_EXPERTS: usize = 1024;
const ROUTER_MAX_GROUPS: usize = 32;
const ROUTER_MAX_TOP_K: usize = 32;
/// Heads (q plus k) of a row QK-norm can handle (kernels/kv_update.cu
/// `MAX_NORMED_HEADS`).
const KV_UPDATE_NORMED_HEADS: usize = 256;
/// Launch shapes of kernels/moe_experts.cu.
const MOE_SORT_THREADS: u32 = 256;
const MOE_GEMM_THREADS: u32 = 256;
const MOE_GEMM_COLS: usize = 64;

/// The head layout of attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Width of a query row (d_model).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of a key (or value) row of the cache.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of a row of the fused q|k|v projection.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
}

/// LLaDA2's QK-norm: RMSNorm weights shared by every q head and every k
/// head, `[head_dim]` each.
pub struct QkNorm<'a> {
    pub q: CudaView<'a, f32>,
    pub k: CudaView<'a, f32>,
    pub eps: f32,
}

/// What the confidence kernel writes per row (kernels/confidence.cu
/// `RowStats`): the row's sums relative to its top logit, which the host
/// turns into probabilities in f64. The kernel cannot: a confident row's top
/// probability is within 1e-9 of 1, where f32 holds nothing but 1.0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowStats {
    /// Argmax, lowest id on ties.
    pub token: u32,
    /// R: the sum of exp(l − top) over every entry but the argmax, summed
    /// directly (not as S − 1), so it keeps its relative precision however
    /// small; S = 1 + R.
    pub rest: f32,
    /// T: the sum of exp(l − top) (l − top) over the row.
    pub moment: f32,
    /// The second-best logit minus the top one (≤ 0).
    pub gap: f32,
}

// SAFETY: plain C struct of four 32-bit fields, laid out like the kernel's.
unsafe impl DeviceRepr for RowStats {}
// SAFETY: all-zero bits are a valid RowStats.
unsafe impl ValidAsZeroBits for RowStats {}

impl From<RowStats> for TokenStats {
    /// With S = 1 + R: p = 1 / S, Σ p ln p = T / S − ln S, and the margin
    /// p₁ − p₂ = (1 − exp(gap)) / S, each in f64 with `ln_1p` and `exp_m1` so
    /// that a confident row (R, gap → 0 or −∞) loses nothing to cancellation.
    fn from(s: RowStats) -> TokenStats {
        let (rest, moment, gap) = (s.rest as f64, s.moment as f64, s.gap as f64);
        let sum = 1.0 + rest;
        TokenStats {
            token: s.token,
            prob: 1.0 / sum,
            neg_entropy: moment / sum - rest.ln_1p(),
            margin: -gap.exp_m1() / sum,
        }
    }
}

/// How attention splits the key range of a pass across blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSplit {
    pub splits: usize,
    /// Keys per split, a multiple of the tile; the last split may be shorter.
    pub chunk: usize,
}

impl AttentionSplit {
    /// Aims at two blocks per multiprocessor: a cached step (a 32-token block,
    /// 32 heads) makes only 64 blocks of queries, so the keys are split until
    /// the grid fills the GPU, but never below `MIN_SPLIT_KEYS` per split. A
    /// full forward has blocks enough and keeps one split. No split is empty.
    pub fn new(queries: usize, heads: usize, attend_len: usize, sms: usize) -> AttentionSplit {
        let blocks = queries.div_ceil(ATTENTION_QUERIES) * heads;
        let wanted = (2 * sms).div_ceil(blocks.max(1));
        let most = attend_len.div_ceil(MIN_SPLIT_KEYS);
        let splits = wanted.min(most).max(1);
        let chunk = attend_len.div_ceil(splits).div_ceil(ATTENTION_KEYS) * ATTENTION_KEYS;
        AttentionSplit {
            splits: attend_len.div_ceil(chunk).max(1),
            chunk,
        }
    }
}

/// Scratch for split attention: per (split, query, head) of each split
/// sequence, the unnormalised output row and its running (max, sum).
pub struct AttentionScratch {
    rows: usize,
    out: CudaSlice<f32>,
    max_sum: CudaSlice<f32>,
}

impl AttentionScratch {
    /// Rows (split × query × head) one sequence's splits can take. Splits
    /// only happen when there are fewer than 2·sms query blocks, and then
    /// splits · blocks < 2·sms + blocks < 4·sms, each block `ATTENTION_QUERIES`
    /// query rows of one head.
    pub fn per_sequence(sms: usize) -> usize {
        4 * sms * ATTENTION_QUERIES
    }

    pub fn new(stream: &Arc<CudaStream>, rows: usize, head_dim: usize) -> Result<AttentionScratch> {
        // The driver refuses empty allocations; a batch without splits
        // reads none of it.
        let rows = rows.max(1);
        Ok(AttentionScratch {
            rows,
            out: stream
                .alloc_zeros(rows * head_dim)
                .map_err(driver_error("attention scratch"))?,
            max_sum: stream
                .alloc_zeros(rows * 2)
                .map_err(driver_error("attention scratch"))?,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(rows: usize, head_dim: usize) -> usize {
        rows * (head_dim + 2) * 4
    }
}

/// The loaded kernels of one device.
pub struct Kernels {
    embed: CudaFunction,
    rms_norm: CudaFunction,
    kv_update: CudaFunction,
    attention_hd32: CudaFunction,
    attention_hd64: CudaFunction,
    attention_hd128: CudaFunction,
    attention_combine: CudaFunction,
    silu_gate: CudaFunction,
    confidence: CudaFunction,
    moe_router: CudaFunction,
    // Launched from quantized.rs, beside the matrices they read.
    pub(super) dequant_gemm_int8: CudaFunction,
    pub(super) dequant_gemm_int4: CudaFunction,
    pub(super) dequantize_int8: CudaFunction,
    pub(super) dequantize_int4: CudaFunction,
    moe_sort: CudaFunction,
    moe_gemm: CudaFunction,
    moe_combine: CudaFunction,
    /// Multiprocessor count, for sizing grids.
    pub sms: usize,
}

impl Kernels {
    /// Loads the embedded fatbins into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let module = |stem: &str| load_module(ctx, stem);
        let function = |module: &Arc<CudaModule>, name: &str| {
            module
                .load_function(name)
                .map_err(|e| Error::Device(format!("kernel {name}: {e}")))
        };
        let attention = module("attention")?;
        let (dequant_gemm, dequantize) = (module("dequant_gemm")?, module("dequantize")?);
        let experts = module("moe_experts")?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_error("multiprocessor count"))?;
        Ok(Kernels {
            embed: function(&module("embed")?, "embed")?,
            rms_norm: function(&module("rms_norm")?, "rms_norm")?,
            kv_update: function(&module("kv_update")?, "kv_update")?,
            attention_hd32: function(&attention, "attention_hd32")?,
            attention_hd64: function(&attention, "attention_hd64")?,
            attention_hd128: function(&attention, "attention_hd128")?,
            attention_combine: function(&attention, "attention_combine")?,
            silu_gate: function(&module("silu_gate")?, "silu_gate")?,
            confidence: function(&module("confidence")?, "confidence")?,
            moe_router: function(&module("moe_router")?, "moe_router")?,
            dequant_gemm_int8: function(&dequant_gemm, "dequant_gemm_int8")?,
            dequant_gemm_int4: function(&dequant_gemm, "dequant_gemm_int4")?,
            dequantize_int8: function(&dequantize, "dequantize_int8")?,
            dequantize_int4: function(&dequantize, "dequantize_int4")?,
            moe_sort: function(&experts, "moe_sort")?,
            moe_gemm: function(&experts, "moe_gemm")?,
            moe_combine: function(&experts, "moe_combine")?,
            sms: sms as usize,
        })
    }

    /// `x[i] = table[tokens[i]]` (bf16 rows to f32). Token ids must be below
    /// the table's row count: the caller checks them on the host.
    pub fn embed(
        &self,
        stream: &CudaStream,
        table: &CudaView<bf16>,
        tokens: &CudaView<u32>,
        x: &mut CudaViewMut<f32>,
        d: usize,
    ) -> Result<()> {
        let n = tokens.len();
        extent("embed", "x", x.len(), n * d)?;
        let d = int(d)?;
        let mut args = stream.launch_builder(&self.embed);
        args.arg(table).arg(tokens).arg(x).arg(&d);
        launch(args, "embed", grid(n, 1, 1, ROW_THREADS)?)
    }

    /// `out = weight * x / rms(x)` per row of `x` (f32 to bf16).
    pub fn rms_norm(
        &self,
        stream: &CudaStream,
        x: &CudaView<f32>,
        weight: &CudaView<f32>,
        out: &mut CudaViewMut<bf16>,
        eps: f32,
    ) -> Result<()> {
        let d = weight.len();
        let rows = x.len() / d.max(1);
        extent("rms_norm", "x", x.len(), rows * d)?;
        extent("rms_norm", "out", out.len(), rows * d)?;
        let d = int(d)?;
        let mut args = stream.launch_builder(&self.rms_norm);
        args.arg(x).arg(weight).arg(out).arg(&d).arg(&eps);
        launch(args, "rms_norm", grid(rows, 1, 1, ROW_THREADS)?)
    }

    /// Adds the bias, applies QK-norm, rotates q in place and k by RoPE at
    /// `positions`, and writes row i's k and v into physical cache slot
    /// `slots[i]`. RoPE turns the first `2 * inv_freq.len()` dims of each
    /// head. Slots must lie in the cache: the caller derives them from
    /// checked page tables (src/cuda/batch.rs).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_update(
        &self,
        stream: &CudaStream,
        qkv: &mut CudaViewMut<f32>,
        bias: Option<&CudaView<f32>>,
        qk_norm: Option<&QkNorm>,
        positions: &CudaView<u32>,
        slots: &CudaView<u32>,
        inv_freq: &CudaView<f32>,
        k_cache: &mut CudaViewMut<bf16>,
        v_cache: &mut CudaViewMut<bf16>,
        heads: Heads,
    ) -> Result<()> {
        let n = positions.len();
        extent("kv_update", "qkv", qkv.len(), n * heads.qkv_dim())?;
        extent("kv_update", "slots", slots.len(), n)?;
        let rotary_dim = 2 * inv_freq.len();
        if rotary_dim == 0 || rotary_dim > heads.head_dim {
            return Err(Error::Device(format!(
                "kv_update: {} RoPE frequencies for heads of {}",
                inv_freq.len(),
                heads.head_dim
            )));
        }
        if let Some(bias) = bias {
            extent("kv_update", "bias", bias.len(), heads.qkv_dim())?;
        }
        if let Some(norm) = qk_norm {
            extent("kv_update", "q_norm", norm.q.len(), heads.head_dim)?;
            extent("kv_update", "k_norm", norm.k.len(), heads.head_dim)?;
            check_qk_norm(heads)?;
        }
        cache_extents("kv_update", k_cache.len(), v_cache.len(), heads)?;
        let null: u64 = 0;
        let (h, kvh, hd, rd) = (
            int(heads.heads)?,
            int(heads.kv_heads)?,
            int(heads.head_dim)?,
            int(rotary_dim)?,
        );
        let eps = qk_norm.map_or(0.0, |norm| norm.eps);
        let mut args = stream.launch_builder(&self.kv_update);
        args.arg(qkv);
        match bias {
            Some(bias) => args.arg(bias),
            None => args.arg(&null),
        };
        match qk_norm {
            Some(norm) => args.arg(&norm.q).arg(&norm.k),
            None => args.arg(&null).arg(&null),
        };
        args.arg(positions)
            .arg(inv_freq)
            .arg(slots)
            .arg(k_cache)
            .arg(v_cache);
        args.arg(&h).arg(&kvh).arg(&hd).arg(&rd).arg(&eps);
        launch(args, "kv_update", grid(n, 1, 1, ROW_THREADS)?)
    }

    /// LLaDA2's router: from the router GEMM's `logits` (`[n, experts]`)
    /// and the selection bias, each token's `experts` and their `weights`
    /// (`[n, experts_per_token]`, by descending biased score).
    pub fn moe_router(
        &self,
        stream: &CudaStream,
        logits: &CudaView<f32>,
        expert_bias: &CudaView<f32>,
        experts: &mut CudaViewMut<u32>,
        weights: &mut CudaViewMut<f32>,
        moe: &MoeConfig,
    ) -> Result<()> {
        check_router(moe)?;
        let (e, k) = (moe.experts, moe.experts_per_token);
        let n = logits.len() / e;
        extent("moe_router", "logits", logits.len(), n * e)?;
        extent("moe_router", "expert_bias", expert_bias.len(), e)?;
        extent("moe_router", "experts", experts.len(), n * k)?;
        extent("moe_router", "weights", weights.len(), n * k)?;
        let (e, g, gk, k) = (
            int(e)?,
            int(moe.groups)?,
            int(moe.groups_per_token)?,
            int(k)?,
        );
        let mut args = stream.launch_builder(&self.moe_router);
        args.arg(logits).arg(expert_bias).arg(experts).arg(weights);
        args.arg(&e)
            .arg(&g)
            .arg(&gk)
            .arg(&k)
            .arg(&moe.routed_scaling);
        launch(args, "moe_router", grid(n, 1, 1, 32)?)
    }

    /// Sorts the router's choices (`experts`, `[n, top_k]`) by expert:
    /// `offsets[e]..offsets[e + 1]` are expert e's entries, `sorted_rows[i]`
    /// the token row of entry i, and `positions[row * top_k + j]` the entry
    /// of the row's j-th choice. Within an expert, rows keep their order.
    pub fn moe_sort(
        &self,
        stream: &CudaStream,
        experts: &CudaView<u32>,
        offsets: &mut CudaViewMut<u32>,
        sorted_rows: &mut CudaViewMut<u32>,
        positions: &mut CudaViewMut<u32>,
        moe: &MoeConfig,
    ) -> Result<()> {
        check_router(moe)?;
        let slots = experts.len();
        extent("moe_sort", "offsets", offsets.len(), moe.experts + 1)?;
        extent("moe_sort", "sorted_rows", sorted_rows.len(), slots)?;
        extent("moe_sort", "positions", positions.len(), slots)?;
        let (s, k, e) = (int(slots)?, int(moe.experts_per_token)?, int(moe.experts)?);
        let mut args = stream.launch_builder(&self.moe_sort);
        args.arg(experts).arg(&s).arg(&k).arg(&e);
        args.arg(offsets).arg(sorted_rows).arg(positions);
        launch(args, "moe_sort", grid(1, 1, 1, MOE_SORT_THREADS)?)
    }

    /// The grouped GEMM of the routed experts: `y[i] = a[r(i)] · w[e]ᵀ` for
    /// each entry i of expert e (`offsets`, from [`Kernels::moe_sort`]), with
    /// `r(i) = a_rows[i]`, or i when `a_rows` is None. `w` is `[experts, m,
    /// k]`, `a` `[rows, k]`, `y` `[entries, m]`; every `a_rows` value must be
    /// below `rows` (moe_sort's are).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gemm(
        &self,
        stream: &CudaStream,
        a: &CudaView<bf16>,
        a_rows: Option<&CudaView<u32>>,
        w: &CudaView<bf16>,
        offsets: &CudaView<u32>,
        y: &mut CudaViewMut<f32>,
        k: usize,
    ) -> Result<()> {
        let experts = offsets.len().saturating_sub(1);
        let m = w.len() / (experts * k).max(1);
        extent("moe_gemm", "w", w.len(), experts * m * k)?;
        let entries = y.len() / m.max(1);
        extent("moe_gemm", "y", y.len(), entries * m)?;
        let rows = a.len() / k.max(1);
        extent("moe_gemm", "a", a.len(), rows * k)?;
        match a_rows {
            Some(a_rows) => extent("moe_gemm", "a_rows", a_rows.len(), entries)?,
            None => extent("moe_gemm", "a", rows, entries)?,
        }
        let null: u64 = 0;
        let (ki, mi) = (int(k)?, int(m)?);
        let mut args = stream.launch_builder(&self.moe_gemm);
        args.arg(a);
        match a_rows {
            Some(a_rows) => args.arg(a_rows),
            None => args.arg(&null),
        };
        args.arg(w).arg(offsets).arg(y).arg(&ki).arg(&mi);
        let tiles = m.div_ceil(MOE_GEMM_COLS);
        launch(args, "moe_gemm", grid(experts, tiles, 1, MOE_GEMM_THREADS)?)
    }

    /// `x[row] += shared[row] + Σ_j weights[row, j] · y[positions[row, j]]`,
    /// the row's choices summed by ascending expert. `y` is `[entries, d]`,
    /// the others `[n, top_k]` or `[n, d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
        &self,
        stream: &CudaStream,
        y: &CudaView<f32>,
        positions: &CudaView<u32>,
        experts: &CudaView<u32>,
        weights: &CudaView<f32>,
        shared: &CudaView<f32>,
        x: &mut CudaViewMut<f32>,
        top_k: usize,
    ) -> Result<()> {
        let n = positions.len() / top_k.max(1);
        let d = x.len() / n.max(1);
        for (buffer, len, want) in [
            ("positions", positions.len(), n * top_k),
            ("experts", experts.len(), n * top_k),
            ("weights", weights.len(), n * top_k),
            ("shared", shared.len(), n * d),
            ("x", x.len(), n * d),
            ("y", y.len(), n * top_k * d),
        ] {
            extent("moe_combine", buffer, len, want)?;
        }
        let (di, ki) = (int(d)?, int(top_k)?);
        let mut args = stream.launch_builder(&self.moe_combine);
        args.arg(y).arg(positions).arg(experts).arg(weights);
        args.arg(shared).arg(x).arg(&di).arg(&ki);
        launch(
            args,
            "moe_combine",
            grid(n, d.div_ceil(ROW_THREADS as usize), 1, ROW_THREADS)?,
        )
    }

    /// Attention of the q rows of `qkv` (`[n, qkv_dim]`), each sequence of
    /// the batch `ragged` describes (uploaded) over its own cache pages, into
    /// `out` (`[n, q_dim]` bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        stream: &CudaStream,
        qkv: &CudaView<f32>,
        k_cache: &CudaView<bf16>,
        v_cache: &CudaView<bf16>,
        out: &mut CudaViewMut<bf16>,
        scratch: &mut AttentionScratch,
        ragged: &RaggedDevice,
        heads: Heads,
    ) -> Result<()> {
        let plan = &ragged.plan;
        let n = plan.queries;
        extent("attention", "out", out.len(), n * heads.q_dim())?;
        extent("attention", "qkv", qkv.len(), n * heads.qkv_dim())?;
        let slots = cache_extents("attention", k_cache.len(), v_cache.len(), heads)?;
        if let Some(&page) = plan
            .page_table
            .iter()
            .find(|&&p| (p as usize + 1) * plan.page_size > slots)
        {
            return Err(Error::Device(format!(
                "attention: page {page} of {} slots is outside a cache of {slots} slots",
                plan.page_size
            )));
        }
        if scratch.rows < plan.scratch_rows {
            return Err(Error::Device(format!(
                "attention: the split sequences need {} scratch rows, the scratch has {}",
                plan.scratch_rows, scratch.rows
            )));
        }
        if heads.kv_heads == 0 || heads.heads % heads.kv_heads != 0 {
            return Err(Error::Device(format!(
                "attention: {heads:?} is not a GQA layout"
            )));
        }
        let kernel = match heads.head_dim {
            32 => &self.attention_hd32,
            64 => &self.attention_hd64,
            128 => &self.attention_hd128,
            other => {
                return Err(Error::Device(format!(
                    "attention: head_dim {other} has no kernel (32, 64 and 128 are built)"
                )))
            }
        };
        let tiles = plan.tiles.len();
        let (sequences, query_tiles) = (
            ragged.sequences.slice(..plan.sequences.len()),
            ragged.tiles.slice(..tiles),
        );
        let page_table = ragged.page_table.slice(..plan.page_table.len());
        let (page_size, h, kvh) = (
            int(plan.page_size)?,
            int(heads.heads)?,
            int(heads.kv_heads)?,
        );
        let mut args = stream.launch_builder(kernel);
        args.arg(qkv).arg(k_cache).arg(v_cache).arg(&mut *out);
        args.arg(&mut scratch.out).arg(&mut scratch.max_sum);
        args.arg(&sequences).arg(&query_tiles).arg(&page_table);
        args.arg(&page_size).arg(&h).arg(&kvh);
        let blocks = grid(tiles, heads.heads, plan.max_splits, ATTENTION_THREADS)?;
        launch(args, "attention", blocks)?;
        if plan.max_splits == 1 {
            return Ok(());
        }
        let mut args = stream.launch_builder(&self.attention_combine);
        args.arg(&scratch.out).arg(&scratch.max_sum).arg(out);
        args.arg(&sequences).arg(&query_tiles).arg(&h);
        launch(
            args,
            "attention_combine",
            grid(tiles, heads.heads, 1, heads.head_dim as u32)?,
        )
    }

    /// `h = silu(g) * u` for rows `[g | u]` of `gate_up` (`[n, 2f]` f32).
    pub fn silu_gate(
        &self,
        stream: &CudaStream,
        gate_up: &CudaView<f32>,
        h: &mut CudaViewMut<bf16>,
        f: usize,
    ) -> Result<()> {
        let n = h.len() / f.max(1);
        extent("silu_gate", "h", h.len(), n * f)?;
        extent("silu_gate", "gate_up", gate_up.len(), n * 2 * f)?;
        let fi = int(f)?;
        let mut args = stream.launch_builder(&self.silu_gate);
        args.arg(gate_up).arg(h).arg(&fi);
        launch(
            args,
            "silu_gate",
            grid(n, f.div_ceil(ROW_THREADS as usize), 1, ROW_THREADS)?,
        )
    }

    /// Argmax, probability, negative entropy and margin of each row of
    /// `logits` (`[rows, vocab]` f32), `rows = stats.len()`.
    pub fn confidence(
        &self,
        stream: &CudaStream,
        logits: &CudaView<f32>,
        stats: &mut CudaViewMut<RowStats>,
        vocab: usize,
    ) -> Result<()> {
        let rows = stats.len();
        extent("confidence", "logits", logits.len(), rows * vocab)?;
        let v = int(vocab)?;
        let mut args = stream.launch_builder(&self.confidence);
        args.arg(logits).arg(stats).arg(&v);
        launch(args, "confidence", grid(rows, 1, 1, CONFIDENCE_THREADS)?)
    }
}

/// Loads the fatbin compiled from `kernels/{stem}.cu` into `ctx`.
pub fn load_module(ctx: &Arc<CudaContext>, stem: &str) -> Result<Arc<CudaModule>> {
    let (_, image) = FATBINS.iter().find(|(s, _)| *s == stem).ok_or_else(|| {
        if FATBINS.is_empty() {
            no_kernels_error()
        } else {
            Error::Device(format!("kernels/{stem}.cu is missing from this build"))
        }
    })?;
    ctx.load_module(Ptx::from_binary(image.to_vec()))
        .map_err(|e| {
            Error::Device(format!(
                "cannot load kernels/{stem}.cu on this GPU ({e}): the kernels are built for \
                 sm_90a (H100/H200), and for sm_80 only with DLLM_CUDA_SM80=1 at build time; \
                 the driver must support CUDA 13.0"
            ))
        })
}

/// Whether kv_update can QK-norm a row of `heads`.
pub fn check_qk_norm(heads: Heads) -> Result<()> {
    if heads.heads + heads.kv_heads > KV_UPDATE_NORMED_HEADS {
        return Err(Error::Device(format!(
            "kv_update: QK-norm of {} heads, more than the {KV_UPDATE_NORMED_HEADS} the kernel holds",
            heads.heads + heads.kv_heads
        )));
    }
    Ok(())
}

/// Whether the router kernel (and the expert sort) can hold `moe`'s
/// experts, groups and top-k.
pub fn check_router(moe: &MoeConfig) -> Result<()> {
    let (e, g, k) = (moe.experts, moe.groups, moe.experts_per_token);
    if e > ROUTER_MAX_EXPERTS || g > ROUTER_MAX_GROUPS || k > ROUTER_MAX_TOP_K {
        return Err(Error::Device(format!(
            "moe_router: {e} experts in {g} groups, top {k}: the kernel holds at most {ROUTER_MAX_EXPERTS} in {ROUTER_MAX_GROUPS}, top {ROUTER_MAX_TOP_K}"
        )));
    }
    Ok(())
}

/// The slots of a key cache and a value cache of `k` and `v` values, which
/// must be whole and equal.
fn cache_extents(kernel: &str, k: usize, v: usize, heads: Heads) -> Result<usize> {
    let slots = k / heads.kv_dim().max(1);
    if k != v || k != slots * heads.kv_dim() {
        return Err(Error::Device(format!(
            "{kernel}: caches of {k} and {v} values are not both whole slots of {}",
            heads.kv_dim()
        )));
    }
    Ok(slots)
}

pub(super) fn extent(kernel: &str, buffer: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        Ok(())
    } else {
        Err(Error::Device(format!(
            "{kernel}: {buffer} has {len} elements, the shape needs {want}"
        )))
    }
}

/// Kernel arguments are 32-bit.
pub(super) fn int(v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Device(format!("size {v} exceeds the kernels' 32-bit indices")))
}

pub(super) fn grid(x: usize, y: usize, z: usize, threads: u32) -> Result<LaunchConfig> {
    let dim = |v: usize, max: u32| {
        u32::try_from(v)
            .ok()
            .filter(|&v| v <= max)
            .ok_or_else(|| Error::Device(format!("grid dimension {v} exceeds {max}")))
    };
    Ok(LaunchConfig {
        grid_dim: (dim(x, i32::MAX as u32)?, dim(y, 65535)?, dim(z, 65535)?),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Launches `args` with `config`; a failure is an [`Error::Device`] naming
/// `kernel`.
pub fn launch(
    mut args: cudarc::driver::LaunchArgs<'_>,
    kernel: &str,
    config: LaunchConfig,
) -> Result<()> {
    if config.grid_dim.0 == 0 {
        return Ok(());
    }
    // SAFETY: every launcher above pushes the arguments in the order and with
    // the types of its kernel's signature, and has checked each buffer's
    // extent against the shape the kernel indexes with.
    unsafe { args.launch(config) }
        .map(|_| ())
        .map_err(driver_error(kernel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_fills_the_gpu_on_a_cached_step() {
        // LLaDA-8B, block of 32 against 2048 cache slots, on 132 SMs.
        let split = AttentionSplit::new(32, 32, 2048, 132);
        assert_eq!(
            split,
            AttentionSplit {
                splits: 5,
                chunk: 448
            }
        );
        // A full forward has enough query blocks for one split.
        assert_eq!(AttentionSplit::new(1024, 32, 1024, 132).splits, 1);
        // Short caches are never split below MIN_SPLIT_KEYS.
        assert_eq!(AttentionSplit::new(32, 32, 300, 132).splits, 2);
        assert_eq!(
            AttentionSplit::new(8, 4, 40, 132),
            AttentionSplit {
                splits: 1,
                chunk: 64
            }
        );
    }

    #[test]
    fn attention_splits_are_never_empty_and_fit_the_scratch() {
        for sms in [1, 16, 132] {
            for heads in [1, 4, 28, 32] {
                for n in (1..300).step_by(7) {
                    for attend_len in (n..5000).step_by(97) {
                        let s = AttentionSplit::new(n, heads, attend_len, sms);
                        assert_eq!(s.chunk % ATTENTION_KEYS, 0);
                        assert!(
                            (s.splits - 1) * s.chunk < attend_len,
                            "{s:?} for {attend_len}"
                        );
                        assert!(s.splits * s.chunk >= attend_len);
                        if s.splits > 1 {
                            assert!(
                                s.splits * n * heads <= AttentionScratch::per_sequence(sms),
                                "{s:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn launch_shapes_are_checked_on_the_host() {
        assert!(extent("k", "x", 10, 10).is_ok());
        let err = extent("embed", "x", 9, 10).unwrap_err().to_string();
        assert!(
            err.contains("embed: x has 9 elements, the shape needs 10"),
            "{err}"
        );
        assert!(int(1 << 31).is_err());
        assert!(grid(1, 70_000, 1, 32).is_err());
        assert_eq!(grid(5, 2, 3, 128).unwrap().grid_dim, (5, 2, 3));
    }

    #[test]
    fn row_stats_match_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<RowStats>(), 16);
        // Logits [2, 0, 0]: R = 2e⁻², T = −4e⁻², gap −2.
        let e = (-2.0f64).exp();
        let stats = TokenStats::from(RowStats {
            token: 7,
            rest: (2.0 * e) as f32,
            moment: (-4.0 * e) as f32,
            gap: -2.0,
        });
        let want = TokenStats::from_logits(&[2.0, 0.0, 0.0]);
        assert_eq!(stats.token, 7);
        for (got, want) in [
            (stats.prob, want.prob),
            (stats.neg_entropy, want.neg_entropy),
            (stats.margin, want.margin),
        ] {
            // R and T rounded to f32: 6e-8 relative; the reference's 1e-10.
            assert!((got - want).abs() < 1e-7, "{stats:?} vs {want:?}");
        }
        // A confident row keeps what f32 would round away: p = 1 − 1e-12.
        let confident = TokenStats::from(RowStats {
            token: 0,
            rest: 1e-12,
            moment: -3e-11,
            gap: -30.0,
        });
        assert!(confident.prob < 1.0 && 1.0 - confident.prob > 0.9e-12);
        assert!(confident.margin < confident.prob);
    }
}
