//! Weight-only quantized matrices on the device, kept as the checkpoint
//! stores them (src/quant.rs): int8 or packed 4-bit values and their f32
//! scales, about 1 or 0.5 bytes a weight where bf16 takes 2. Two kernels read
//! them: `dequant_gemm` (kernels/dequant_gemm.cu) multiplies the few rows of
//! a decode step directly, `dequantize` (kernels/dequantize.cu) writes the
//! bf16 matrix for cuBLASLt when there are more rows (src/cuda/linear.rs
//! chooses).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, PushKernelArg};
use half::bf16;

use super::kernels::{extent, grid, int, launch, Kernels};
use crate::error::{Error, Result};
use crate::quant::{Encoding, GROUP_SIZES};

/// Rows of x one `dequant_gemm` launch takes (kernels/dequant_gemm.cu
/// `MAX_ROWS`): a lane keeps a partial sum for each in registers.
pub const DEQUANT_ROWS: usize = 64;
/// kernels/dequant_gemm.cu `THREADS` and `CHUNK`.
const DEQUANT_GEMM_THREADS: usize = 128;
const DEQUANT_GEMM_CHUNK: usize = 256;
/// kernels/dequantize.cu `THREADS`.
const DEQUANTIZE_THREADS: usize = 256;
/// Both kernels read the weights, and x, in 16-byte vectors.
const VECTOR_BYTES: usize = 16;

/// A `[rows, cols]` int8 or 4-bit matrix on the device, row after row, and
/// its scales ([`Encoding::row_scales`] a row).
pub struct QuantizedMatrix {
    rows: usize,
    cols: usize,
    encoding: Encoding,
    values: CudaSlice<u8>,
    scales: CudaSlice<f32>,
}

impl QuantizedMatrix {
    /// Why the kernels cannot take the matrix `name` with rows of `cols`
    /// inputs stored as `encoding`: they read whole 16-byte segments, and a
    /// segment must lie in one scale group.
    pub fn check(name: &str, encoding: Encoding, cols: usize) -> Result<()> {
        let why = match encoding {
            Encoding::Int8 if cols == 0 || cols % VECTOR_BYTES != 0 => format!(
                "int8 rows of {cols} inputs: the CUDA kernels read rows in 16-byte segments, \
                 so they need a multiple of 16 inputs"
            ),
            Encoding::Int4 { group } if !GROUP_SIZES.contains(&group) => {
                format!("4-bit groups of {group}: the CUDA kernels take groups of {GROUP_SIZES:?}")
            }
            Encoding::Int4 { group } if cols == 0 || cols % group != 0 => {
                format!("4-bit groups of {group} do not divide its rows of {cols} inputs")
            }
            Encoding::Int8 | Encoding::Int4 { .. } => return Ok(()),
            other => format!("{other:?} is not a quantized encoding"),
        };
        Err(Error::Tensor {
            name: name.to_string(),
            message: why,
        })
    }

    /// The matrix `name` from its values and scales, already on the device;
    /// their extents and the shape are checked.
    pub fn new(
        name: &str,
        encoding: Encoding,
        [rows, cols]: [usize; 2],
        values: CudaSlice<u8>,
        scales: CudaSlice<f32>,
    ) -> Result<QuantizedMatrix> {
        Self::check(name, encoding, cols)?;
        let (want_values, want_scales) = (
            rows * encoding.row_bytes(cols),
            rows * encoding.row_scales(cols),
        );
        if values.len() != want_values || scales.len() != want_scales {
            return Err(Error::Tensor {
                name: name.to_string(),
                message: format!(
                    "{} bytes and {} scales for [{rows}, {cols}] as {encoding:?}, which needs {want_values} and {want_scales}",
                    values.len(),
                    scales.len()
                ),
            });
        }
        Ok(QuantizedMatrix {
            rows,
            cols,
            encoding,
            values,
            scales,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Values a 16-byte segment holds: 16 (int8) or 32 (4-bit).
    fn segment_values(&self) -> usize {
        VECTOR_BYTES * VECTOR_BYTES / self.encoding.row_bytes(VECTOR_BYTES)
    }

    /// The scale group, in inputs; int8's one scale a row is a group of the
    /// whole row.
    fn group(&self) -> usize {
        match self.encoding {
            Encoding::Int4 { group } => group,
            _ => self.cols,
        }
    }
}

impl Kernels {
    /// `y (+)= x · wᵀ` for `x` `[m, cols]` with m at most [`DEQUANT_ROWS`]
    /// and `y` `[m, rows]`; `accumulate` adds to what `y` holds.
    pub fn dequant_gemm(
        &self,
        stream: &Arc<CudaStream>,
        y: &mut CudaViewMut<f32>,
        x: &CudaView<bf16>,
        w: &QuantizedMatrix,
        accumulate: bool,
    ) -> Result<()> {
        let m = x.len() / w.cols;
        extent("dequant_gemm", "x", x.len(), m * w.cols)?;
        extent("dequant_gemm", "y", y.len(), m * w.rows)?;
        if m > DEQUANT_ROWS {
            return Err(Error::Device(format!(
                "dequant_gemm: {m} rows of x, more than the {DEQUANT_ROWS} the kernel holds"
            )));
        }
        aligned("dequant_gemm", "x", x.device_ptr(stream).0)?;
        if m == 0 {
            return Ok(());
        }
        let lanes = DEQUANT_GEMM_CHUNK / w.segment_values();
        let columns = DEQUANT_GEMM_THREADS / lanes;
        let mut config = grid(w.rows.div_ceil(columns), 1, 1, DEQUANT_GEMM_THREADS as u32)?;
        // x[:m, chunk] in bf16: 32 KiB at most, under the 48 KiB a launch
        // may take without opting in.
        config.shared_mem_bytes = (m * DEQUANT_GEMM_CHUNK * 2) as u32;
        let (m, n, k, group) = (int(m)?, int(w.rows)?, int(w.cols)?, int(w.group())?);
        let accumulate = i32::from(accumulate);
        let function = match w.encoding {
            Encoding::Int8 => &self.dequant_gemm_int8,
            _ => &self.dequant_gemm_int4,
        };
        let mut args = stream.launch_builder(function);
        args.arg(x).arg(&w.values).arg(&w.scales).arg(y);
        args.arg(&m).arg(&n).arg(&k);
        if w.encoding != Encoding::Int8 {
            args.arg(&group);
        }
        args.arg(&accumulate);
        launch(args, "dequant_gemm", config)
    }

    /// `out` = `w` in bf16, `[rows, cols]`.
    pub fn dequantize(
        &self,
        stream: &Arc<CudaStream>,
        w: &QuantizedMatrix,
        out: &mut CudaViewMut<bf16>,
    ) -> Result<()> {
        extent("dequantize", "out", out.len(), w.rows * w.cols)?;
        aligned("dequantize", "out", out.device_ptr(stream).0)?;
        let segments = w.values.len() / VECTOR_BYTES;
        let config = grid(
            segments.div_ceil(DEQUANTIZE_THREADS),
            1,
            1,
            DEQUANTIZE_THREADS as u32,
        )?;
        let (segments, k, group) = (segments as i64, int(w.cols)?, int(w.group())?);
        let function = match w.encoding {
            Encoding::Int8 => &self.dequantize_int8,
            _ => &self.dequantize_int4,
        };
        let mut args = stream.launch_builder(function);
        args.arg(&w.values).arg(&w.scales).arg(out);
        args.arg(&segments).arg(&k);
        if w.encoding != Encoding::Int8 {
            args.arg(&group);
        }
        launch(args, "dequantize", config)
    }
}

/// The kernels read and write these buffers in 16-byte vectors: a view that
/// starts inside a row of 16-byte multiples is refused, not misread.
fn aligned(kernel: &str, buffer: &str, address: u64) -> Result<()> {
    if address % VECTOR_BYTES as u64 == 0 {
        Ok(())
    } else {
        Err(Error::Device(format!(
            "{kernel}: {buffer} starts at {address:#x}, not on a 16-byte boundary"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_the_kernels_cannot_take_are_named() {
        assert!(QuantizedMatrix::check("w", Encoding::Int8, 4096).is_ok());
        assert!(QuantizedMatrix::check("w", Encoding::Int4 { group: 128 }, 11008).is_ok());
        let err = QuantizedMatrix::check("layers.0.down", Encoding::Int8, 72)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layers.0.down") && err.contains("multiple of 16 inputs"),
            "{err}"
        );
        let err = QuantizedMatrix::check("w", Encoding::Int4 { group: 64 }, 96)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not divide its rows of 96"), "{err}");
        assert!(QuantizedMatrix::check("w", Encoding::Int4 { group: 16 }, 96).is_err());
        assert!(QuantizedMatrix::check("w", Encoding::BF16, 96).is_err());
        assert!(aligned("k", "x", 0x1000).is_ok());
        assert!(aligned("k", "x", 0x1008).is_err());
    }
}
