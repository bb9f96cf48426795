//! The CUDA backend: bf16 weights and key/value cache, f32 arithmetic, one
//! stream, every buffer allocated by [`Backend::prepare`].
//!
//! A forward pass ([`ForwardPass`]) runs, for its n tokens:
//!
//! ```text
//! x = embed[tokens]                                   embed.cu        f32 [n, d]
//! per layer:
//!   qkv  = rms_norm(x) · Wqkvᵀ                        rms_norm.cu + cuBLASLt
//!   bias, QK-norm, RoPE(q), RoPE(k) → cache[write_slot..]   kv_update.cu
//!   attn = softmax(q Kᵀ/√hd) V over cache[..attend]   attention.cu    bf16 [n, d]
//!   x   += attn · Woᵀ                                 cuBLASLt, beta = 1
//!   gu   = rms_norm(x) · Wgate|upᵀ                    rms_norm.cu + cuBLASLt
//!   x   += (silu(g) * u) · Wdownᵀ                     silu_gate.cu + cuBLASLt, beta = 1
//! rows: logits = rms_norm(x[rows]) · Wheadᵀ           in chunks of HEAD_ROWS
//!       stats  = confidence(logits)                   confidence.cu: 16 bytes a row
//! ```
//!
//! The kernels are compiled by build.rs into fatbins embedded in the binary
//! and loaded through the driver API; the libraries (libcuda, libcublasLt)
//! are opened at run time, so a binary built here runs, CPU-only, on machines
//! without CUDA. docs/cuda.md has the design notes.

mod buffers;
mod driver;
mod gemm;
mod graphs;
pub mod kernels;
mod weights;

use std::ops::Range;
use std::sync::Arc;

pub use cudarc;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaStream, DriverError};

use crate::backend::{Backend, CacheLayout, ForwardPass, PassShapes, TokenStats};
use crate::config::ModelConfig;
pub use crate::cpu::ops::inv_freq;
use crate::error::{Error, Result};
use crate::model::Model;
use buffers::{Buffers, Footprint, HEAD_ROWS};
pub use driver::Driver;
pub use gemm::Gemm;
use graphs::{Graphs, Launch, Step};
pub use kernels::{
    AttentionScratch, AttentionSplit, Heads, Kernels, QkNorm, RowStats, KERNELS_BUILT,
};
use weights::Weights;

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
    /// The cache asked for by the last allocate_cache(); the buffers may
    /// hold more slots.
    layout: CacheLayout,
    buffers: Option<Buffers>,
    /// Before the buffers: graphs launch on them.
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
        if config.family == crate::config::Family::Llada2 {
            return Err(Error::Device(
                "the CUDA backend does not run llada2_moe models yet (routed experts, QK-norm, partial RoPE): use --device cpu".into(),
            ));
        }
        if ![32, 64, 128].contains(&config.head_dim) {
            return Err(Error::Device(format!(
                "head_dim {} has no attention kernel (32, 64 and 128 are built)",
                config.head_dim
            )));
        }
        let name = gpu.name()?;
        let need = Weights::bytes(&config);
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
            buffers: None,
            graphs: Graphs::new(),
        })
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

    /// Checks `pass` and copies its tokens and positions to the device.
    fn upload(&mut self, pass: &ForwardPass) -> Result<()> {
        // Before allocate_cache() there are no pages, so no pass validates.
        pass.validate(&self.layout)?;
        let vocab = self.config.vocab_size;
        if let Some(&bad) = pass.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab} entries"
            )));
        }
        let b = self
            .buffers
            .as_mut()
            .expect("pages > 0, so allocate_cache() allocated the buffers");
        let n = pass.tokens.len();
        let stream = &self.gpu.stream;
        stream
            .memcpy_htod(pass.tokens, &mut b.tokens.slice_mut(..n))
            .map_err(driver_error("copying the pass to the GPU"))?;
        stream
            .memcpy_htod(pass.positions, &mut b.positions.slice_mut(..n))
            .map_err(driver_error("copying the pass to the GPU"))
    }

    /// Runs the layers over the uploaded tokens of `step`, leaving the final
    /// residual stream in `x` and the step's keys and values in the cache.
    /// Only launches: a graph can capture it.
    fn layers(&mut self, step: &Step) -> Result<()> {
        let heads = self.heads();
        let Self {
            config: c,
            gpu,
            weights,
            buffers,
            ..
        } = self;
        let b = buffers.as_mut().expect("upload() checked the buffers");
        let (n, d, f) = (step.tokens, c.d_model, c.ffn_hidden);
        let (qkv_dim, eps) = (heads.qkv_dim(), c.rms_eps);
        let (stream, k) = (&gpu.stream, &gpu.kernels);
        let base = step.base_slot * heads.kv_heads * heads.head_dim;

        k.embed(
            stream,
            &weights.embed.as_view(),
            &b.tokens.slice(..n),
            &mut b.x.slice_mut(..n * d),
            d,
        )?;
        for (l, layer) in weights.layers.iter().enumerate() {
            k.rms_norm(
                stream,
                &b.x.slice(..n * d),
                &layer.attn_norm.as_view(),
                &mut b.normed.slice_mut(..n * d),
                eps,
            )?;
            gpu.gemm.matmul(
                &mut b.qkv.slice_mut(..n * qkv_dim),
                &b.normed.slice(..n * d),
                &layer.qkv.as_view(),
                d,
                false,
            )?;
            let bias = layer.qkv_bias.as_ref().map(|bias| bias.as_view());
            k.kv_update(
                stream,
                &mut b.qkv.slice_mut(..n * qkv_dim),
                bias.as_ref(),
                None,
                &b.positions.slice(..n),
                &weights.inv_freq.as_view(),
                &mut b.keys[l].slice_mut(base..),
                &mut b.values[l].slice_mut(base..),
                step.write_slot,
                heads,
            )?;
            k.attention(
                stream,
                &b.qkv.slice(..n * qkv_dim),
                &b.keys[l].slice(base..),
                &b.values[l].slice(base..),
                &mut b.attn.slice_mut(..n * d),
                &mut b.scratch,
                step.attend_len,
                heads,
            )?;
            gpu.gemm.matmul(
                &mut b.x.slice_mut(..n * d),
                &b.attn.slice(..n * d),
                &layer.o.as_view(),
                d,
                true,
            )?;

            k.rms_norm(
                stream,
                &b.x.slice(..n * d),
                &layer.ffn_norm.as_view(),
                &mut b.normed.slice_mut(..n * d),
                eps,
            )?;
            gpu.gemm.matmul(
                &mut b.gate_up.slice_mut(..n * 2 * f),
                &b.normed.slice(..n * d),
                &layer.gate_up.as_view(),
                d,
                false,
            )?;
            k.silu_gate(
                stream,
                &b.gate_up.slice(..n * 2 * f),
                &mut b.hidden.slice_mut(..n * f),
                f,
            )?;
            gpu.gemm.matmul(
                &mut b.x.slice_mut(..n * d),
                &b.hidden.slice(..n * f),
                &layer.down.as_view(),
                f,
                true,
            )?;
        }
        Ok(())
    }

    /// Logits of rows `rows` (at most HEAD_ROWS) of the last forward pass into
    /// the logits buffer.
    fn head(&mut self, rows: Range<usize>) -> Result<()> {
        let (d, vocab, eps) = (
            self.config.d_model,
            self.config.vocab_size,
            self.config.rms_eps,
        );
        let r = rows.len();
        let b = self.buffers.as_mut().expect("upload() checked the buffers");
        self.gpu.kernels.rms_norm(
            &self.gpu.stream,
            &b.x.slice(rows.start * d..rows.end * d),
            &self.weights.final_norm.as_view(),
            &mut b.normed.slice_mut(..r * d),
            eps,
        )?;
        self.gpu.gemm.matmul(
            &mut b.logits.slice_mut(..r * vocab),
            &b.normed.slice(..r * d),
            &self.weights.head.as_view(),
            d,
            false,
        )
    }

    fn row_chunks(rows: &Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
        rows.clone()
            .step_by(HEAD_ROWS)
            .map(move |start| start..(start + HEAD_ROWS).min(rows.end))
    }
}

impl Backend for CudaBackend {
    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn cache_slot_bytes(&self) -> usize {
        2 * self.config.n_layers * self.config.kv_dim() * std::mem::size_of::<half::bf16>()
    }

    /// Half the device memory free once the weights are loaded.
    fn cache_budget(&self) -> Result<usize> {
        Ok(self.gpu.free_memory()? / 2)
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> Result<()> {
        let slots = layout.slots();
        if self.buffers.as_ref().is_some_and(|b| b.slots >= slots) {
            self.layout = layout;
            return Ok(());
        }
        // Free the old buffers first: their memory counts as available. The
        // graphs launch on them, so they go too.
        self.graphs.clear();
        self.buffers = None;
        self.layout = CacheLayout::default();
        self.gpu
            .stream
            .synchronize()
            .map_err(driver_error("freeing buffers"))?;
        let need = Footprint::new(&self.config, slots, self.gpu.kernels.sms);
        let free = self.gpu.free_memory()?;
        if need.total() > free {
            return Err(out_of_memory(
                format!(
                    "{slots} cache slots need {:.2} GiB (key/value cache {:.2} GiB, activations {:.2} GiB)",
                    need.total() as f64 / GIB,
                    need.cache as f64 / GIB,
                    need.activations as f64 / GIB
                ),
                free,
                &self.name,
            ));
        }
        self.buffers = Some(Buffers::new(
            &self.gpu.stream,
            &self.config,
            slots,
            self.gpu.kernels.sms,
        )?);
        self.layout = layout;
        Ok(())
    }

    fn expect(&mut self, shapes: &PassShapes) -> Result<()> {
        let c = &self.config;
        let (d, f, qkv) = (c.d_model, c.ffn_hidden, self.heads().qkv_dim());
        for &n in &shapes.tokens {
            for (k, m) in [(d, qkv), (d, d), (d, 2 * f), (f, d)] {
                self.gpu.gemm.plan(n, k, m)?;
            }
        }
        for rows in 1..=shapes.max_rows.min(HEAD_ROWS) {
            self.gpu.gemm.plan(rows, d, c.vocab_size)?;
        }
        Ok(())
    }

    fn logits(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<f32>>> {
        ForwardPass::validate_batch(passes, &self.layout)?;
        passes.iter().map(|pass| self.pass_logits(pass)).collect()
    }

    /// The layers run as a graph when their geometry repeats (graphs.rs);
    /// the head follows for the rows asked.
    fn token_stats(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<TokenStats>>> {
        ForwardPass::validate_batch(passes, &self.layout)?;
        passes.iter().map(|pass| self.pass_stats(pass)).collect()
    }
}

impl CudaBackend {
    fn pass_logits(&mut self, pass: &ForwardPass) -> Result<Vec<f32>> {
        self.upload(pass)?;
        self.layers(&self.step_of(pass)?)?;
        let vocab = self.config.vocab_size;
        let mut out = vec![0.0f32; pass.rows.len() * vocab];
        for rows in Self::row_chunks(&pass.rows) {
            self.head(rows.clone())?;
            let b = self.buffers.as_ref().expect("upload() checked the buffers");
            let at = (rows.start - pass.rows.start) * vocab;
            self.gpu
                .stream
                .memcpy_dtoh(
                    &b.logits.slice(..rows.len() * vocab),
                    &mut out[at..at + rows.len() * vocab],
                )
                .map_err(driver_error("copying logits to the host"))?;
        }
        Ok(out)
    }

    fn pass_stats(&mut self, pass: &ForwardPass) -> Result<Vec<TokenStats>> {
        self.upload(pass)?;
        let step = self.step_of(pass)?;
        self.step(&step)?;
        let mut out = Vec::with_capacity(pass.rows.len());
        for rows in Self::row_chunks(&pass.rows) {
            self.stats(rows.clone())?;
            out.extend(self.download_stats(rows.len())?);
        }
        Ok(out)
    }

    /// The geometry of `pass`, whose slots must lie on consecutive pages.
    fn step_of(&self, pass: &ForwardPass) -> Result<Step> {
        let page_size = self.layout.page_size;
        let pages = &pass.pages[..pass.attend_len.div_ceil(page_size)];
        if !pages.windows(2).all(|w| w[1] == w[0] + 1) {
            return Err(Error::Device(
                "the CUDA backend needs each sequence's cache pages to be consecutive".into(),
            ));
        }
        Ok(Step {
            tokens: pass.tokens.len(),
            base_slot: pages[0] as usize * page_size,
            write_slot: pass.write_slot,
            attend_len: pass.attend_len,
        })
    }
}

impl CudaBackend {
    /// The layers of `step`, replayed, captured or launched one by one.
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
                self.graphs.insert(*step, graph)
            }
        }
    }

    /// Head logits and confidence statistics of `rows` (at most HEAD_ROWS)
    /// into the stats buffer.
    fn stats(&mut self, rows: Range<usize>) -> Result<()> {
        self.head(rows.clone())?;
        let (r, vocab) = (rows.len(), self.config.vocab_size);
        let b = self.buffers.as_mut().expect("upload() checked the buffers");
        self.gpu.kernels.confidence(
            &self.gpu.stream,
            &b.logits.slice(..r * vocab),
            &mut b.stats.slice_mut(..r),
            vocab,
        )
    }

    /// The statistics of the first `r` rows of the stats buffer.
    fn download_stats(&mut self, r: usize) -> Result<Vec<TokenStats>> {
        let b = self.buffers.as_ref().expect("upload() checked the buffers");
        let mut host = vec![RowStats::default(); r];
        self.gpu
            .stream
            .memcpy_dtoh(&b.stats.slice(..r), &mut host)
            .map_err(driver_error("copying token statistics to the host"))?;
        Ok(host.into_iter().map(TokenStats::from).collect())
    }
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
        let chunks: Vec<_> = CudaBackend::row_chunks(&(5..300)).collect();
        assert_eq!(chunks, vec![5..133, 133..261, 261..300]);
        assert_eq!(CudaBackend::row_chunks(&(7..7)).count(), 0);
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
