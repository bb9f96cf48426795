//! A projection's weights on the device and its product with a batch's
//! rows, `y[n, out] (+)= x[n, in] · Wᵀ` (bf16 x, f32 y): the one place that
//! decides how a matrix is multiplied.
//!
//! - bf16 weights: cuBLASLt.
//! - quantized weights, up to [`DEQUANT_ROWS`] rows (a decode step):
//!   `dequant_gemm`, which reads the int8 or 4-bit bytes themselves, where
//!   the weight reads are the cost.
//! - quantized weights and more rows (prefill): the matrix is dequantized
//!   into a bf16 scratch shared by every matrix, then cuBLASLt's tensor
//!   cores multiply; a matrix larger than the scratch (the head, which the
//!   scratch is not sized for) goes through `dequant_gemm` in runs of
//!   [`DEQUANT_ROWS`] rows instead.
//!
//! Both paths multiply by the same bf16-rounded weights
//! (kernels/quant.cuh), so a row's product does not depend on which one ran.
//! Either way the product is launches only, so a step stays capturable.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;

use super::kernels::extent;
use super::quantized::{QuantizedMatrix, DEQUANT_ROWS};
use super::Gpu;
use crate::error::Result;

pub enum DeviceMatrix {
    Bf16 {
        values: CudaSlice<bf16>,
        cols: usize,
    },
    Quantized(QuantizedMatrix),
}

impl DeviceMatrix {
    /// Values a row of the matrix holds: the product's `in`.
    pub fn cols(&self) -> usize {
        match self {
            DeviceMatrix::Bf16 { cols, .. } => *cols,
            DeviceMatrix::Quantized(w) => w.cols(),
        }
    }

    /// `y (+)= x · Wᵀ`; `accumulate` adds to what `y` holds (beta = 1).
    /// `scratch` holds the dequantized matrix of a prefill product (None
    /// when no matrix is quantized).
    pub fn product(
        &self,
        gpu: &mut Gpu,
        scratch: Option<&mut CudaSlice<bf16>>,
        y: &mut CudaViewMut<f32>,
        x: &CudaView<bf16>,
        accumulate: bool,
    ) -> Result<()> {
        let k = self.cols();
        let w = match self {
            DeviceMatrix::Bf16 { values, .. } => {
                return gpu.gemm.matmul(y, x, &values.as_view(), k, accumulate)
            }
            DeviceMatrix::Quantized(w) => w,
        };
        let (n, size) = (x.len() / k, w.rows() * w.cols());
        extent("product", "x", x.len(), n * k)?;
        extent("product", "y", y.len(), n * w.rows())?;
        if let Some(scratch) = scratch.filter(|s| n > DEQUANT_ROWS && s.len() >= size) {
            gpu.kernels
                .dequantize(&gpu.stream, w, &mut scratch.slice_mut(..size))?;
            return gpu.gemm.matmul(y, x, &scratch.slice(..size), k, accumulate);
        }
        for first in (0..n).step_by(DEQUANT_ROWS) {
            let rows = first..(first + DEQUANT_ROWS).min(n);
            gpu.kernels.dequant_gemm(
                &gpu.stream,
                &mut y.slice_mut(rows.start * w.rows()..rows.end * w.rows()),
                &x.slice(rows.start * k..rows.end * k),
                w,
                accumulate,
            )?;
        }
        Ok(())
    }
}
