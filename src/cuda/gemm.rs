//! The model's matrix products through cuBLASLt:
//! `y[n, m] (+)= x[n, k] · w[m, k]ᵀ` with bf16 x and w, f32 accumulation and
//! an f32 y. Accumulating into y (beta = 1) is how the o and down projections
//! add the residual, so the residual stream never takes a separate pass.
//!
//! cuBLAS is column-major. Read column-major, the row-major w is a k×m matrix
//! and x a k×n one, so y (an m×n column-major matrix) = wᵀ·x: a "TN" product,
//! the layout Hopper's bf16 kernels prefer.
//!
//! The descriptors and the heuristic's algorithm are made once per shape and
//! kept: a step's products cost only the cublasLtMatmul calls.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use super::driver_error;
use crate::error::{Error, Result};

/// NVIDIA's recommended cuBLASLt workspace on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;
/// `CUBLAS_OP_T` (cublasOperation_t), which cudarc's cuBLASLt bindings lack.
const TRANSPOSE: i32 = 1;

/// A cuBLASLt handle, its workspace and the plans of the shapes seen so far.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    desc: sys::cublasLtMatmulDesc_t,
    preference: sys::cublasLtMatmulPreference_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<(usize, usize, usize), Plan>,
    stream: Arc<CudaStream>,
}

struct Plan {
    w: Layout,
    x: Layout,
    y: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(dtype: sys::cudaDataType, rows: usize, cols: usize) -> Result<Layout> {
        lt::create_matrix_layout(dtype, rows as u64, cols as u64, rows as i64)
            .map(Layout)
            .map_err(blas_error("matrix layout"))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout and destroyed only here.
        // A failure to free a descriptor leaves nothing to recover.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

impl Gemm {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Gemm> {
        // The workspace first: it is the one allocation here that can fail for
        // want of memory, and nothing needs freeing yet if it does.
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(driver_error("cuBLASLt workspace"))?;
        let handle = lt::create_handle().map_err(blas_error("cublasLtCreate"))?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(blas_error("matmul descriptor"))?;
        let preference = lt::create_matmul_pref().map_err(blas_error("matmul preference"))?;
        let gemm = Gemm {
            handle,
            desc,
            preference,
            workspace,
            plans: HashMap::new(),
            stream: stream.clone(),
        };
        // SAFETY: the attributes are written from values of the documented types.
        unsafe {
            lt::set_matmul_desc_attribute(
                gemm.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&TRANSPOSE as *const i32).cast(),
                size_of::<i32>(),
            )
            .map_err(blas_error("transpose attribute"))?;
            lt::set_matmul_pref_attribute(
                gemm.preference,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&WORKSPACE_BYTES as *const usize).cast(),
                size_of::<usize>(),
            )
            .map_err(blas_error("workspace preference"))?;
        }
        Ok(gemm)
    }

    pub fn workspace_bytes() -> usize {
        WORKSPACE_BYTES
    }

    /// The plan of `[n, k] · [m, k]ᵀ`, made on first use. The backend makes
    /// the plans of a request's shapes before its first step
    /// ([`crate::backend::Backend::expect`]), so the heuristic never runs
    /// inside a timed step.
    pub fn plan(&mut self, n: usize, k: usize, m: usize) -> Result<()> {
        if let std::collections::hash_map::Entry::Vacant(e) = self.plans.entry((n, k, m)) {
            e.insert(Plan::new(self.handle, self.desc, self.preference, n, k, m)?);
        }
        Ok(())
    }

    /// `y (+)= x · wᵀ` with `x` `[n, k]`, `w` `[m, k]` and `y` `[n, m]`, all
    /// row-major; `accumulate` adds to what `y` holds instead of overwriting it.
    pub fn matmul(
        &mut self,
        y: &mut CudaViewMut<f32>,
        x: &CudaView<bf16>,
        w: &CudaView<bf16>,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (n, m) = (x.len() / k.max(1), w.len() / k.max(1));
        if x.len() != n * k || w.len() != m * k || y.len() != n * m {
            return Err(Error::Device(format!(
                "gemm: x has {} elements, w {}, y {}: not [n, {k}], [m, {k}], [n, m]",
                x.len(),
                w.len(),
                y.len()
            )));
        }
        if n == 0 || m == 0 {
            return Ok(());
        }
        self.plan(n, k, m)?;
        let plan = &self.plans[&(n, k, m)];
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let stream = &self.stream;
        let (w_ptr, _w) = w.device_ptr(stream);
        let (x_ptr, _x) = x.device_ptr(stream);
        let (y_ptr, _y) = y.device_ptr_mut(stream);
        let (ws_ptr, _ws) = self.workspace.device_ptr_mut(stream);
        // SAFETY: the layouts describe exactly the extents checked above, the
        // algorithm was chosen for them, and every pointer lives on `stream`.
        unsafe {
            lt::matmul(
                self.handle,
                self.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w_ptr as *const c_void,
                plan.w.0,
                x_ptr as *const c_void,
                plan.x.0,
                y_ptr as *const c_void,
                plan.y.0,
                y_ptr as *mut c_void,
                plan.y.0,
                &plan.algo,
                ws_ptr as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_error("matmul"))
    }
}

impl Plan {
    fn new(
        handle: sys::cublasLtHandle_t,
        desc: sys::cublasLtMatmulDesc_t,
        preference: sys::cublasLtMatmulPreference_t,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<Plan> {
        let w = Layout::new(sys::cudaDataType_t::CUDA_R_16BF, k, m)?;
        let x = Layout::new(sys::cudaDataType_t::CUDA_R_16BF, k, n)?;
        let y = Layout::new(sys::cudaDataType_t::CUDA_R_32F, m, n)?;
        // SAFETY: all descriptors are live; C and D share y's layout.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(handle, desc, w.0, x.0, y.0, y.0, preference) }
                .map_err(|e| {
                    Error::Device(format!(
                        "cuBLASLt has no bf16 algorithm for [{n}, {k}] x [{m}, {k}]^T: {e}"
                    ))
                })?;
        Ok(Plan {
            w,
            x,
            y,
            algo: heuristic.algo,
        })
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in Gemm::new and destroyed only here. Failures to
        // free descriptors at teardown leave nothing to recover.
        unsafe {
            let _ = lt::destroy_matmul_pref(self.preference);
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn blas_error(what: &'static str) -> impl FnOnce(lt::CublasError) -> Error {
    move |e| Error::Device(format!("cuBLASLt {what}: {e}"))
}
