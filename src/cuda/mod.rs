//! The CUDA backend: bf16 weights and key/value cache, f32 arithmetic, one
//! stream; the cache allocated by [`Backend::allocate_cache`], a pool of pages
//! that many sequences share.
//!
//! A batch of forward passes ([`ForwardPass`], one per sequence) runs as one
//! forward over its n rows, the passes' tokens concatenated:
//!
//! ```text
//! x = embed[tokens]                                   embed.cu        f32 [n, d]
//! per layer:
//!   qkv  = rms_norm(x) · Wqkvᵀ                        rms_norm.cu + cuBLASLt
//!   bias, QK-norm, RoPE(q), RoPE(k)                   kv_update.cu
//!          → cache[slot of each row]
//!   attn = softmax(q Kᵀ/√hd) V, each sequence over    attention.cu    bf16 [n, d]
//!          its own pages, one launch for the batch
//!   x   += attn · Woᵀ                                 cuBLASLt, beta = 1
//!   gu   = rms_norm(x) · Wgate|upᵀ                    rms_norm.cu + cuBLASLt
//!   x   += (silu(g) * u) · Wdownᵀ                     silu_gate.cu + cuBLASLt, beta = 1
//!   (an MoE layer: the shared expert's output apart, then the routed
//!    experts and the sum into x, in moe.rs)
//! rows: logits = rms_norm(x[rows]) · Wheadᵀ           every pass's rows together, in chunks of HEAD_ROWS
//!       stats  = confidence(logits)                   confidence.cu: 16 bytes a row
//! ```
//!
//! The kernels are compiled by build.rs into fatbins embedded in the binary
//! and loaded through the driver API; the libraries (libcuda, libcublasLt)
//! are opened at run time, so a binary built here runs, CPU-only, on machines
//! without CUDA. docs/cuda.md has the design notes.

mod batch;
mod buffers;
mod driver;
mod gemm;
mod graphs;
pub mod kernels;
mod linear;
mod moe;
mod quantized;
mod ragged;
mod weights;

use std::ops::Range;
use std::sync::Arc;

pub use cudarc;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError};
use half::bf16;

use crate::backend::{Backend, CacheLayout, ForwardPass, PassShapes, TokenStats};
use crate::config::ModelConfig;
pub use crate::cpu::ops::inv_freq;
use crate::error::{Error, Result};
use crate::model::Model;
use batch::Batch;
use buffers::{Activations, Cache, Capacity, HEAD_ROWS};
pub use driver::Driver;
pub use gemm::Gemm;
use graphs::{Graphs, Launch, Step};
pub use kernels::{
    AttentionScratch, AttentionSplit, Heads, Kernels, QkNorm, RowStats, KERNELS_BUILT,
};
pub use linear::DeviceMatrix;
pub use quantized::{QuantizedMatrix, DEQUANT_ROWS};
pub use ragged::{QueryTile, RaggedAttention, RaggedDevice, SequenceDesc, SequenceShape};
use weights::{Layer, Weights};

/// The oldest driver API that loads kernels built by nvcc 13.0.
const MIN_DRIVER: i32 = 13000;
const GIB: f64 = (1u64 << 30) as f64;
const CUBLAS_13: &str = "install CUDA 13's cuBLAS (the CUDA toolkit, or `pip install \
                         nvidia-cublas` and put its nvidia/cu13/lib first on LD_LIBRARY_PATH)";

/// A device ready to run kernels: context, the one stream, the loaded
/// kernels and cuBLASLt. Tests and benchmarks use it directly.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    pub gemm: Gemm,
}

impl Gpu {
    /// Opens GPU 0 of the driver `DLLM_CUDA` selects (the hardware's unless
    /// it says `emulated`).
    pub fn new() -> Result<Gpu> {
        Gpu::open(Driver::from_env()?)
    }

    /// Opens GPU 0 of `driver`. Every missing piece (kernels in this build,
    /// driver, cuBLASLt, a GPU) is reported as an [`Error::Device`] that says
    /// what to do.
    pub fn open(driver: Driver) -> Result<Gpu> {
        if !KERNELS_BUILT {
            return Err(no_kernels_error());
        }
        driver.activate()?;
        // SAFETY: these only try to dlopen the libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no CUDA driver: libcuda.so was not found (install the NVIDIA driver, 580 or newer)".into(),
            ));
        }
        let mut version = 0;
        // SAFETY: the driver library is present; cuDriverGetVersion only writes the int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver_error("cuDriverGetVersion"))?;
        if version < MIN_DRIVER {
            return Err(Error::Device(format!(
                "the CUDA driver supports CUDA {}.{}; the kernels need 13.0 or newer (driver 580+)",
                version / 1000,
                version % 1000 / 10
            )));
        }
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::Device(format!(
                "libcublasLt.so.13 was not found: {CUBLAS_13}"
            )));
        }
        // cudarc opens the first of several names (libcublasLt.so first),
        // which may be another CUDA's library: the bindings are CUDA 13's.
        // SAFETY: the library is present; the call only returns a number.
        cublas_is_cuda_13(unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() })?;
        let ctx = CudaContext::new(0).map_err(driver_error("opening GPU 0"))?;
        // One stream orders everything; per-buffer events would only add work
        // (and nodes to a captured graph).
        // SAFETY: no buffer exists yet, and all work goes to one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(driver_error("creating a stream"))?;
        let kernels = Kernels::load(&ctx)?;
        let gemm = Gemm::new(&stream)?;
        Ok(Gpu {
            ctx,
            stream,
            kernels,
            gemm,
        })
    }

    /// Free device memory in bytes.
    pub fn free_memory(&self) -> Result<usize> {
        Ok(self
            .ctx
            .mem_get_info()
            .map_err(driver_error("cuMemGetInfo"))?
            .0)
    }

    pub fn name(&self) -> Result<String> {
        let name = self.ctx.name().map_err(driver_error("device name"))?;
        let (major, minor) = self
            .ctx
            .compute_capability()
            .map_err(driver_error("compute capability"))?;
        let total = self
            .ctx
            .total_mem()
            .map_err(driver_error("device memory"))?;
        Ok(format!(
            "{name} (sm_{major}{minor}, {:.0} GiB, bf16)",
            total as f64 / GIB
        ))
    }
}

/// Fields drop in order: buffers and weights before the device they live on.
pub struct CudaBackend {
    config: ModelConfig,
    name: String,
    /// The cache asked for by the last allocate_cache(); the cache buffers
    /// may be larger.
    layout: CacheLayout,
    cache: Option<Cache>,
    activations: Option<Activations>,
    graphs: Graphs,
    weights: Weights,
    gpu: Gpu,
}

impl CudaBackend {
    /// Uploads the model's weights to GPU 0 of the driver `DLLM_CUDA` selects
    /// (a progress bar on a terminal).
    pub fn new(model: &Model) -> Result<CudaBackend> {
        CudaBackend::on(Gpu::new()?, model)
    }

    /// Uploads the model's weights to `gpu`.
    pub fn on(gpu: Gpu, model: &Model) -> Result<CudaBackend> {
        let config = model.config.clone();
        if ![32, 64, 128].contains(&config.head_dim) {
            return Err(Error::Device(format!(
                "head_dim {} has no attention kernel (32, 64 and 128 are built)",
                config.head_dim
            )));
        }
        // What the kernels hold, checked before the weights go up.
        if let Some(moe) = &config.moe {
            kernels::check_router(moe)?;
        }
        if config.qk_norm {
            kernels::check_qk_norm(Heads {
                heads: config.n_heads,
                kv_heads: config.n_kv_heads,
                head_dim: config.head_dim,
            })?;
        }
        let name = gpu.name()?;
        let need = Weights::bytes(model)?;
        let free = gpu.free_memory()?;
        if need > free {
            return Err(out_of_memory(
                format!("the weights need {:.2} GiB", need as f64 / GIB),
                free,
                &name,
            ));
        }
        let weights = Weights::upload(&gpu.stream, model)?;
        Ok(CudaBackend {
            config,
            gpu,
            name,
            weights,
            layout: CacheLayout::default(),
            cache: None,
            activations: None,
            graphs: Graphs::new(),
        })
    }

    /// Device bytes `model`'s weights take on the CUDA backend: bf16
    /// matrices, or quantized ones as stored with a bf16 scratch for the
    /// largest layer matrix. Needs no device.
    pub fn weight_bytes(model: &Model) -> Result<usize> {
        Weights::bytes(model)
    }

    fn heads(&self) -> Heads {
        Heads {
            heads: self.config.n_heads,
            kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Whether repeated steps are replayed as CUDA graphs (the default).
    /// Either way a step computes the same values.
    pub fn set_graphs(&mut self, enabled: bool) {
        self.graphs.set_enabled(enabled);
    }

    /// Graph launches so far: how many steps ran as a replay.
    pub fn graph_replays(&self) -> usize {
        self.graphs.replays()
    }

    /// Rows the activations hold now: a batch with more tokens reallocates
    /// them first.
    pub fn batch_capacity(&self) -> usize {
        self.activations.as_ref().map_or(0, |a| a.capacity.tokens)
    }

    /// What the activations hold after `allocate_cache(layout)`: the rows of
    /// one sequence alone (it has at most `max_seq_len` slots, and a pass no
    /// more tokens than slots), one split sequence's scratch, and every page.
    fn initial_capacity(&self, layout: &CacheLayout) -> Capacity {
        Capacity {
            tokens: layout.slots().min(self.config.max_seq_len),
            scratch_rows: AttentionScratch::per_sequence(self.gpu.kernels.sms),
            pages: layout.pages,
        }
    }

    /// Makes the activations hold `need`, reallocating them (and dropping
    /// the graphs launched on them) when they do not.
    fn reserve(&mut self, need: &Capacity) -> Result<()> {
        let have = self.activations.as_ref().map(|a| a.capacity);
        if have.is_some_and(|have| have.covers(need)) {
            return Ok(());
        }
        let capacity = have.unwrap_or_default().max(need);
        self.graphs.clear();
        self.activations = None;
        self.gpu
            .stream
            .synchronize()
            .map_err(driver_error("freeing the activations"))?;
        let bytes = Activations::bytes(&self.config, &capacity);
        let free = self.gpu.free_memory()?;
        if bytes > free {
            return Err(out_of_memory(
                format!(
                    "a batch of {} tokens needs {:.2} GiB of activations",
                    need.tokens,
                    bytes as f64 / GIB
                ),
                free,
                &self.name,
            ));
        }
        self.activations = Some(Activations::new(&self.gpu.stream, &self.config, capacity)?);
        Ok(())
    }

    /// Checks `passes`, lays them out as one batch, copies what its launches
    /// read to the device and runs the layers, leaving each row's final
    /// residual stream in `x`.
    fn forward(&mut self, passes: &[ForwardPass]) -> Result<Batch> {
        // Before allocate_cache() there are no pages, so no pass validates.
        ForwardPass::validate_batch(passes, &self.layout)?;
        let c = &self.config;
        let batch = Batch::new(
            passes,
            &self.layout,
            c.vocab_size,
            c.n_heads,
            self.gpu.kernels.sms,
        )?;
        self.reserve(&batch.need())?;
        self.upload(&batch)?;
        self.step(&batch.step)?;
        Ok(batch)
    }

    /// Copies the batch's rows (tokens, positions, slots) and attention
    /// descriptors to the device.
    fn upload(&mut self, batch: &Batch) -> Result<()> {
        let a = self.activations.as_mut().expect("reserve() allocated them");
        let n = batch.tokens.len();
        let stream = &self.gpu.stream;
        let copy = |e| driver_error("copying the batch to the GPU")(e);
        for (host, device) in [
            (&batch.tokens, &mut a.tokens),
            (&batch.positions, &mut a.positions),
            (&batch.slots, &mut a.slots),
        ] {
            stream
                .memcpy_htod(host, &mut device.slice_mut(..n))
                .map_err(copy)?;
        }
        a.ragged.upload(stream, &batch.attention)
    }

    /// Runs the layers over the uploaded rows of a batch of geometry `step`,
    /// leaving the final residual stream in `x` and the batch's keys and
    /// values in the cache. Only launches: a graph can capture it.
    fn layers(&mut self, step: &Step) -> Result<()> {
        let heads = self.heads();
        let Self {
            config: c,
            gpu,
            weights,
            cache,
            activations,
            ..
        } = self;
        let cache = cache.as_mut().expect("validate_batch() saw a cache");
        let a = activations.as_mut().expect("reserve() allocated them");
        let (n, d) = (step.tokens(), c.d_model);
        let (qkv_dim, eps) = (heads.qkv_dim(), c.rms_eps);
        gpu.kernels.embed(
            &gpu.stream,
            &weights.embed.as_view(),
            &a.tokens.slice(..n),
            &mut a.x.slice_mut(..n * d),
            d,
        )?;
        for (l, layer) in weights.layers.iter().enumerate() {
            gpu.kernels.rms_norm(
                &gpu.stream,
                &a.x.slice(..n * d),
                &layer.attn_norm.as_view(),
                &mut a.normed.slice_mut(..n * d),
                eps,
            )?;
            layer.qkv.product(
                gpu,
                weights.scratch.as_mut(),
                &mut a.qkv.slice_mut(..n * qkv_dim),
                &a.normed.slice(..n * d),
                false,
            )?;
            let bias = layer.qkv_bias.as_ref().map(|bias| bias.as_view());
            let qk_norm = layer.qk_norm.as_ref().map(|[q, k]| QkNorm {
                q: q.as_view(),
                k: k.as_view(),
                eps,
            });
            gpu.kernels.kv_update(
                &gpu.stream,
                &mut a.qkv.slice_mut(..n * qkv_dim),
                bias.as_ref(),
                qk_norm.as_ref(),
                &a.positions.slice(..n),
                &a.slots.slice(..n),
                &weights.inv_freq.as_view(),
                &mut cache.keys[l].as_view_mut(),
                &mut cache.values[l].as_view_mut(),
                heads,
            )?;
            gpu.kernels.attention(
                &gpu.stream,
                &a.qkv.slice(..n * qkv_dim),
                &cache.keys[l].as_view(),
                &cache.values[l].as_view(),
                &mut a.attn.slice_mut(..n * d),
                &mut a.scratch,
                &a.ragged,
                heads,
            )?;
            layer.o.product(
                gpu,
                weights.scratch.as_mut(),
                &mut a.x.slice_mut(..n * d),
                &a.attn.slice(..n * d),
                true,
            )?;

            gpu.kernels.rms_norm(
                &gpu.stream,
                &a.x.slice(..n * d),
                &layer.ffn_norm.as_view(),
                &mut a.normed.slice_mut(..n * d),
                eps,
            )?;
            let h = a.normed.slice(..n * d);
            // An MoE layer's shared expert writes apart: the routed experts'
            // sum is added to it before the residual, as on the CPU.
            let mut routed = layer.routed.as_ref().map(|experts| {
                let b = a.moe.as_mut().expect("an MoE config allocates them");
                (experts, b)
            });
            let (mut out, accumulate) = match &mut routed {
                None => (a.x.slice_mut(..n * d), true),
                Some((_, b)) => (b.shared.slice_mut(..n * d), false),
            };
            mlp(
                gpu,
                weights.scratch.as_mut(),
                layer,
                &h,
                (&mut a.gate_up, &mut a.hidden),
                &mut out,
                accumulate,
            )?;
            if let Some((experts, b)) = routed {
                let moe = c
                    .moe
                    .as_ref()
                    .expect("routed experts come from an MoE config");
                moe::forward(gpu, experts, moe, b, &h, &mut a.x.slice_mut(..n * d), d)?;
            }
        }
        Ok(())
    }

    /// Final-norms the wanted rows of every pass into the first rows of
    /// `normed`, one after another, so that the head's GEMMs take the whole
    /// batch's rows together (its weights are read once per chunk, not once
    /// per sequence).
    fn gather_wanted(&mut self, batch: &Batch) -> Result<()> {
        let (d, eps) = (self.config.d_model, self.config.rms_eps);
        let a = self.activations.as_mut().expect("reserve() allocated them");
        let mut at = 0;
        for rows in batch.wanted.iter().filter(|r| !r.is_empty()) {
            self.gpu.kernels.rms_norm(
                &self.gpu.stream,
                &a.x.slice(rows.start * d..rows.end * d),
                &self.weights.final_norm.as_view(),
                &mut a.normed.slice_mut(at * d..(at + rows.len()) * d),
                eps,
            )?;
            at += rows.len();
        }
        Ok(())
    }

    /// Logits of gathered rows `rows` (at most HEAD_ROWS) into the logits
    /// buffer.
    fn head(&mut self, rows: Range<usize>) -> Result<()> {
        let (d, vocab) = (self.config.d_model, self.config.vocab_size);
        let a = self.activations.as_mut().expect("reserve() allocated them");
        self.weights.head.product(
            &mut self.gpu,
            self.weights.scratch.as_mut(),
            &mut a.logits.slice_mut(..rows.len() * vocab),
            &a.normed.slice(rows.start * d..rows.end * d),
            false,
        )
    }

    fn row_chunks(rows: usize) -> impl Iterator<Item = Range<usize>> {
        (0..rows)
            .step_by(HEAD_ROWS)
            .map(move |start| start..(start + HEAD_ROWS).min(rows))
    }
}

impl Backend for CudaBackend {
    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn cache_slot_bytes(&self) -> usize {
        Cache::bytes(&self.config, 1)
    }

    /// Half the device memory free once the weights are loaded.
    fn cache_budget(&self) -> Result<usize> {
        Ok(self.gpu.free_memory()? / 2)
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> Result<()> {
        // Attention's launches take the page size as an argument; the page
        // tables are data, so graphs survive any other change of layout on
        // the same buffers.
        if layout.page_size != self.layout.page_size {
            self.graphs.clear();
        }
        let slots = layout.slots();
        let initial = self.initial_capacity(&layout);
        if self
            .cache
            .as_ref()
            .is_some_and(|cache| cache.slots >= slots)
        {
            self.layout = layout;
            return self.reserve(&initial);
        }
        // Free the old buffers first: their memory counts as available. The
        // graphs launch on them, so they go too.
        self.graphs.clear();
        self.activations = None;
        self.cache = None;
        self.layout = CacheLayout::default();
        self.gpu
            .stream
            .synchronize()
            .map_err(driver_error("freeing buffers"))?;
        let (cache, activations) = (
            Cache::bytes(&self.config, slots),
            Activations::bytes(&self.config, &initial),
        );
        let free = self.gpu.free_memory()?;
        if cache + activations > free {
            return Err(out_of_memory(
                format!(
                    "{slots} cache slots need {:.2} GiB (key/value cache {:.2} GiB, activations {:.2} GiB)",
                    (cache + activations) as f64 / GIB,
                    cache as f64 / GIB,
                    activations as f64 / GIB
                ),
                free,
                &self.name,
            ));
        }
        self.cache = Some(Cache::new(&self.gpu.stream, &self.config, slots)?);
        self.reserve(&initial)?;
        self.layout = layout;
        Ok(())
    }

    fn expect(&mut self, shapes: &PassShapes) -> Result<()> {
        let c = &self.config;
        let (d, f, qkv) = (c.d_model, c.ffn_hidden, self.heads().qkv_dim());
        let mut products = vec![(d, qkv), (d, d), (d, 2 * f), (f, d)];
        if let Some(moe) = &c.moe {
            let shared = moe.shared_hidden();
            products.extend([(d, moe.experts), (d, 2 * shared), (shared, d)]);
        }
        for &n in &shapes.tokens {
            for &(k, m) in &products {
                self.gpu.gemm.plan(n, k, m)?;
            }
        }
        for rows in 1..=shapes.max_rows.min(HEAD_ROWS) {
            self.gpu.gemm.plan(rows, d, c.vocab_size)?;
        }
        Ok(())
    }

    fn logits(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<f32>>> {
        let batch = self.forward(passes)?;
        self.gather_wanted(&batch)?;
        let vocab = self.config.vocab_size;
        let mut out = vec![0.0f32; batch.wanted_rows() * vocab];
        for rows in Self::row_chunks(batch.wanted_rows()) {
            self.head(rows.clone())?;
            let a = self.activations.as_ref().expect("reserve() allocated them");
            self.gpu
                .stream
                .memcpy_dtoh(
                    &a.logits.slice(..rows.len() * vocab),
                    &mut out[rows.start * vocab..rows.end * vocab],
                )
                .map_err(driver_error("copying logits to the host"))?;
        }
        Ok(batch.per_pass(out, vocab))
    }

    /// The layers run as a graph when the batch's geometry repeats
    /// (graphs.rs); the head and the confidence kernel follow for the rows
    /// asked, and only their statistics come back.
    fn token_stats(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<TokenStats>>> {
        let batch = self.forward(passes)?;
        self.gather_wanted(&batch)?;
        let (r, vocab) = (batch.wanted_rows(), self.config.vocab_size);
        for rows in Self::row_chunks(r) {
            self.head(rows.clone())?;
            let a = self.activations.as_mut().expect("reserve() allocated them");
            self.gpu.kernels.confidence(
                &self.gpu.stream,
                &a.logits.slice(..rows.len() * vocab),
                &mut a.stats.slice_mut(rows),
                vocab,
            )?;
        }
        let a = self.activations.as_ref().expect("reserve() allocated them");
        let mut host = vec![RowStats::default(); r];
        self.gpu
            .stream
            .memcpy_dtoh(&a.stats.slice(..r), &mut host)
            .map_err(driver_error("copying token statistics to the host"))?;
        let stats = host.into_iter().map(TokenStats::from).collect();
        Ok(batch.per_pass(stats, 1))
    }
}

impl CudaBackend {
    /// The layers of a batch of geometry `step`, replayed, captured or
    /// launched one by one.
    fn step(&mut self, step: &Step) -> Result<()> {
        match self.graphs.launch_of(step) {
            Launch::Replay => self.graphs.replay(step),
            Launch::Eager => self.layers(step),
            Launch::Capture => {
                let stream = self.gpu.stream.clone();
                stream
                    // Thread-local: other threads' calls are unaffected.
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(driver_error("capturing a step"))?;
                let recorded = self.layers(step);
                // End the capture whatever happened, so the stream is usable.
                let graph = stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(driver_error("capturing a step"));
                recorded?;
                let graph = graph?
                    .ok_or_else(|| Error::Device("capturing a step recorded no launches".into()))?;
                self.graphs.insert(step.clone(), graph)
            }
        }
    }
}

/// `out (+)= (silu(h·Wgateᵀ) ⊙ h·Wupᵀ)·Wdownᵀ` of `layer`'s dense MLP (or
/// shared expert) over the rows of `h`, through the `gate_up` and `hidden`
/// buffers; `accumulate` adds to `out` (the residual) instead of writing it.
fn mlp(
    gpu: &mut Gpu,
    mut scratch: Option<&mut CudaSlice<bf16>>,
    layer: &Layer,
    h: &CudaView<bf16>,
    (gate_up, hidden): (&mut CudaSlice<f32>, &mut CudaSlice<bf16>),
    out: &mut CudaViewMut<f32>,
    accumulate: bool,
) -> Result<()> {
    let d = layer.ffn_norm.len();
    let (n, f) = (h.len() / d, layer.down.cols());
    layer.gate_up.product(
        gpu,
        scratch.as_deref_mut(),
        &mut gate_up.slice_mut(..n * 2 * f),
        h,
        false,
    )?;
    gpu.kernels.silu_gate(
        &gpu.stream,
        &gate_up.slice(..n * 2 * f),
        &mut hidden.slice_mut(..n * f),
        f,
    )?;
    layer
        .down
        .product(gpu, scratch, out, &hidden.slice(..n * f), accumulate)
}

/// An [`Error::Device`] for a failed driver call; out-of-memory gets its own wording.
pub(crate) fn driver_error(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::Device(format!("out of device memory while allocating {what}"))
        } else {
            Error::Device(format!("{what}: {e}"))
        }
    }
}

/// `version` as cublasLtGetVersion encodes it (major * 10000 + minor * 100 + patch).
fn cublas_is_cuda_13(version: usize) -> Result<()> {
    if version / 10000 == 13 {
        return Ok(());
    }
    Err(Error::Device(format!(
        "the cuBLASLt found is version {}.{}, not CUDA 13's: {CUBLAS_13}",
        version / 10000,
        version % 10000 / 100
    )))
}

fn out_of_memory(need: String, free: usize, device: &str) -> Error {
    Error::Device(format!(
        "out of device memory: {need}, but {:.2} GiB is free on {device}",
        free as f64 / GIB
    ))
}

pub(crate) fn no_kernels_error() -> Error {
    Error::Device(
        "this dllm was built without CUDA kernels (build.rs found no nvcc): run \
         scripts/install-nvcc.sh, then rebuild"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_rows_are_taken_in_bounded_chunks() {
        let chunks: Vec<_> = CudaBackend::row_chunks(295).collect();
        assert_eq!(chunks, vec![0..128, 128..256, 256..295]);
        assert_eq!(CudaBackend::row_chunks(0).count(), 0);
    }

    #[test]
    fn only_cuda_13_cublas_is_accepted() {
        assert!(cublas_is_cuda_13(130_001).is_ok());
        assert!(cublas_is_cuda_13(131_000).is_ok());
        let err = cublas_is_cuda_13(120_903).unwrap_err().to_string();
        assert!(err.contains("version 12.9, not CUDA 13's"), "{err}");
    }

    #[test]
    fn errors_say_what_to_do() {
        let oom = driver_error("the key/value cache")(DriverError(
            cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        ));
        assert_eq!(
            oom.to_string(),
            "device: out of device memory while allocating the key/value cache"
        );
        let msg =
            out_of_memory("4096 cache slots need 2.88 GiB".into(), 1 << 30, "H100").to_string();
        assert!(
            msg.contains("4096 cache slots need 2.88 GiB, but 1.00 GiB is free on H100"),
            "{msg}"
        );
        assert!(no_kernels_error()
            .to_string()
            .contains("scripts/install-nvcc.sh"));
    }

    #[test]
    fn without_kernels_or_gpu_the_backend_reports_a_device_error() {
        // Here (CI, no GPU) this must be an error, never a panic; on a GPU
        // machine with kernels it opens the device.
        match Gpu::new() {
            Ok(gpu) => assert!(gpu.kernels.sms > 0),
            Err(Error::Device(msg)) => assert!(!msg.is_empty()),
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
}
