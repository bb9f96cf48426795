//! Weight-only quantization: how a checkpoint's matrices may be stored, how
//! one row of any of them becomes f32, and how f32 rows become int8 or 4-bit.
//!
//! A quantized checkpoint is an ordinary model directory whose config.json
//! carries `"quantization_config": {"quant_method": "dllm-weight-only",
//! "bits": 8 | 4, "group_size": G}` (`group_size` for 4 bits only). Every
//! projection and the output head `NAME` is then stored as two tensors:
//!
//! - int8, one scale per output channel: `NAME` of dtype I8 and shape
//!   `[out, in]`, and `NAME_scale` of dtype F32 and shape `[out]`;
//!   `w[o, i] = q[o, i] * scale[o]`.
//! - 4-bit, one scale per group of G consecutive inputs: `NAME` of dtype U8
//!   and shape `[out, in / 2]`, the value of input `2j` in the low nibble of
//!   byte `j` and of `2j + 1` in the high nibble, each stored as `q + 8` with
//!   `q` in -7..=7; and `NAME_scale` of dtype F32, shape `[out, in / G]`;
//!   `w[o, i] = q[o, i] * scale[o, i / G]`.
//!
//! Scales are symmetric (the largest magnitude of a channel or group maps to
//! 127 or 7) and kept in f32: they are a few percent of the bytes at most.
//! The embedding is only gathered, never multiplied, so it keeps its dtype,
//! like the norm weights and biases.

use std::ops::Range;

use half::{bf16, f16};
use serde_json::{json, Value};

use crate::checkpoint::{Checkpoint, Dtype, TensorView};
use crate::error::{Error, Result};

/// The `quant_method` of the checkpoints `dllm quantize` writes.
pub const QUANT_METHOD: &str = "dllm-weight-only";

/// The 4-bit group sizes supported.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// A weight-only quantized format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// int8, one f32 scale per output channel.
    Int8,
    /// 4-bit, one f32 scale per `group` consecutive inputs of a row.
    Int4 { group: usize },
}

impl Quantization {
    /// `bits` 8 or 4; `group` is required for 4 bits and refused for 8.
    pub fn new(bits: u64, group: Option<usize>) -> Result<Quantization, String> {
        match (bits, group) {
            (8, None) => Ok(Quantization::Int8),
            (8, Some(g)) => Err(format!(
                "group size {g} given for 8 bits, which has one scale per output channel"
            )),
            (4, Some(g)) if GROUP_SIZES.contains(&g) => Ok(Quantization::Int4 { group: g }),
            (4, Some(g)) => Err(format!(
                "group size {g} is not supported: expected one of {GROUP_SIZES:?}"
            )),
            (4, None) => Err("4 bits need a group size (32, 64 or 128)".into()),
            (b, _) => Err(format!("{b} bits are not supported: expected 8 or 4")),
        }
    }

    /// The `quantization_config` of config.json, if any, or why it cannot be read.
    pub fn from_config(config: &Value) -> Result<Option<Quantization>, String> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(Value::as_str);
        if method != Some(QUANT_METHOD) {
            let method = method.map_or("missing".to_string(), |m| format!("{m:?}"));
            return Err(format!(
                "quantization_config: unknown quant_method {method}; supported is {QUANT_METHOD:?} (written by dllm quantize)"
            ));
        }
        let bits = q
            .get("bits")
            .and_then(Value::as_u64)
            .ok_or("quantization_config: missing integer field \"bits\"")?;
        let group = match q.get("group_size") {
            None | Some(Value::Null) => None,
            Some(g) => Some(g.as_u64().ok_or_else(|| {
                format!("quantization_config: group_size must be a positive integer, got {g}")
            })? as usize),
        };
        Quantization::new(bits, group)
            .map(Some)
            .map_err(|e| format!("quantization_config: {e}"))
    }

    pub fn to_config(self) -> Value {
        match self {
            Quantization::Int8 => json!({"quant_method": QUANT_METHOD, "bits": 8}),
            Quantization::Int4 { group } => {
                json!({"quant_method": QUANT_METHOD, "bits": 4, "group_size": group})
            }
        }
    }

    pub fn name(self) -> String {
        match self {
            Quantization::Int8 => "int8 per output channel".into(),
            Quantization::Int4 { group } => format!("4-bit, groups of {group}"),
        }
    }

    /// How a row stored this way is laid out.
    pub fn encoding(self) -> Encoding {
        match self {
            Quantization::Int8 => Encoding::Int8,
            Quantization::Int4 { group } => Encoding::Int4 { group },
        }
    }

    /// Why a matrix with rows of `cols` inputs cannot be stored this way.
    pub fn check_row(self, name: &str, cols: usize) -> Result<()> {
        match self {
            Quantization::Int4 { group } if cols % group != 0 => Err(Error::Tensor {
                name: name.to_string(),
                message: format!("group size {group} does not divide its rows of {cols} inputs"),
            }),
            _ => Ok(()),
        }
    }
}

/// How the values of one matrix row are laid out in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    F32,
    BF16,
    F16,
    Int8,
    Int4 { group: usize },
}

impl Encoding {
    /// Bytes of one row of `cols` values (scales not included).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Encoding::F32 => cols * 4,
            Encoding::BF16 | Encoding::F16 => cols * 2,
            Encoding::Int8 => cols,
            Encoding::Int4 { .. } => cols / 2,
        }
    }

    /// Scales per row.
    pub fn row_scales(self, cols: usize) -> usize {
        match self {
            Encoding::F32 | Encoding::BF16 | Encoding::F16 => 0,
            Encoding::Int8 => 1,
            Encoding::Int4 { group } => cols / group,
        }
    }

    /// Decodes one row: `bytes` holds [`Self::row_bytes`] bytes, `scales`
    /// [`Self::row_scales`] values, `out` the row's values. Written as plain
    /// loops over fixed-width chunks, which the compiler vectorizes.
    pub fn decode_row(self, bytes: &[u8], scales: &[f32], out: &mut [f32]) {
        match self {
            Encoding::F32 => out
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            // bf16 is the high half of an f32: widening is a shift.
            Encoding::BF16 => out
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
                }),
            Encoding::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
                // half converts slices with F16C where the CPU has it.
                Ok(values) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(values, out),
                Err(_) => out
                    .iter_mut()
                    .zip(bytes.chunks_exact(2))
                    .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            },
            Encoding::Int8 => {
                let scale = scales[0];
                out.iter_mut()
                    .zip(bytes)
                    .for_each(|(o, &q)| *o = q as i8 as f32 * scale);
            }
            Encoding::Int4 { group } => {
                for ((out, bytes), &scale) in out
                    .chunks_exact_mut(group)
                    .zip(bytes.chunks_exact(group / 2))
                    .zip(scales)
                {
                    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
                        pair[0] = ((b & 15) as i32 - 8) as f32 * scale;
                        pair[1] = ((b >> 4) as i32 - 8) as f32 * scale;
                    }
                }
            }
        }
    }

    /// Decodes the rows `first..` of a matrix with rows of `cols` values
    /// stored in `bytes` (all its rows) and `scales` (all its scales), as
    /// many as fill `out`.
    pub fn decode_rows(
        self,
        bytes: &[u8],
        scales: &[f32],
        cols: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let (row_bytes, row_scales) = (self.row_bytes(cols), self.row_scales(cols));
        for (i, row) in out.chunks_exact_mut(cols).enumerate() {
            let r = first + i;
            self.decode_row(
                &bytes[r * row_bytes..(r + 1) * row_bytes],
                &scales[r * row_scales..(r + 1) * row_scales],
                row,
            );
        }
    }
}

/// A `[rows, cols]` matrix of a checkpoint (a projection or the head) as
/// stored: floats, or quantized values and their scales.
pub struct MatrixView<'a> {
    pub name: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub encoding: Encoding,
    pub values: TensorView<'a>,
    /// The scales, row by row ([`Encoding::row_scales`] each); None for floats.
    pub scales: Option<TensorView<'a>>,
}

/// The dtypes a float matrix, norm weight or bias may have.
pub const FLOAT_DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::BF16, Dtype::F16];

impl<'a> MatrixView<'a> {
    /// The matrix `name` of `shape` `[rows, cols]`, stored as `quantization`
    /// says (floats when None), with every tensor's dtype and shape checked.
    pub fn open(
        checkpoint: &'a Checkpoint,
        name: &str,
        shape: [usize; 2],
        quantization: Option<Quantization>,
    ) -> Result<MatrixView<'a>> {
        let [rows, cols] = shape;
        let Some(q) = quantization else {
            let values = checkpoint.tensor_typed(name, &shape, &FLOAT_DTYPES)?;
            let encoding = match values.dtype {
                Dtype::F32 => Encoding::F32,
                Dtype::BF16 => Encoding::BF16,
                _ => Encoding::F16,
            };
            return Ok(MatrixView {
                name: values.name,
                rows,
                cols,
                encoding,
                values,
                scales: None,
            });
        };
        q.check_row(name, cols)?;
        let encoding = q.encoding();
        let (dtype, stored_cols) = match q {
            Quantization::Int8 => (Dtype::I8, cols),
            Quantization::Int4 { .. } => (Dtype::U8, cols / 2),
        };
        let values = checkpoint.tensor_typed(name, &[rows, stored_cols], &[dtype])?;
        let scale_shape = match q {
            Quantization::Int8 => vec![rows],
            Quantization::Int4 { group } => vec![rows, cols / group],
        };
        let scales = checkpoint.tensor_typed(&scale_name(name), &scale_shape, &[Dtype::F32])?;
        Ok(MatrixView {
            name: values.name,
            rows,
            cols,
            encoding,
            values,
            scales: Some(scales),
        })
    }

    /// Rows `rows` of the matrix with their scales: a fused projection's
    /// parts are runs of rows, and every encoding scales row by row.
    pub fn rows(&self, rows: Range<usize>) -> MatrixView<'a> {
        MatrixView {
            name: self.name,
            rows: rows.len(),
            cols: self.cols,
            encoding: self.encoding,
            values: self.values.rows(rows.clone()),
            scales: self.scales.as_ref().map(|s| s.rows(rows)),
        }
    }

    /// Bytes stored for this matrix, scales included.
    pub fn stored_bytes(&self) -> u64 {
        let scales = self.scales.as_ref().map_or(0, |s| s.bytes.len());
        (self.values.bytes.len() + scales) as u64
    }

    /// The scales as f32, row after row (empty for floats).
    pub fn scales_f32(&self) -> Vec<f32> {
        self.scales.as_ref().map_or(Vec::new(), |s| s.to_f32())
    }

    /// The whole matrix in f32, dequantized.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        let scales = self.scales_f32();
        self.encoding
            .decode_rows(self.values.bytes, &scales, self.cols, 0, &mut out);
        out
    }

    /// The matrix rounded to bf16, as a GPU backend stores it.
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self.encoding {
            Encoding::F32 | Encoding::BF16 | Encoding::F16 => self.values.to_bf16(),
            Encoding::Int8 | Encoding::Int4 { .. } => {
                self.to_f32().into_iter().map(bf16::from_f32).collect()
            }
        }
    }
}

/// The name of the scale tensor of the quantized matrix `name`.
pub fn scale_name(name: &str) -> String {
    format!("{name}_scale")
}

/// A matrix quantized: its values' dtype, shape and bytes, and its scales.
pub struct Quantized {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<u8>,
    pub scales: Vec<f32>,
    pub scale_shape: Vec<usize>,
}

/// Quantizes the `[rows, cols]` f32 matrix `w`. Rows are independent, so
/// they are quantized in parallel.
pub fn quantize(w: &[f32], rows: usize, cols: usize, q: Quantization) -> Quantized {
    use rayon::prelude::*;
    let encoding = q.encoding();
    let (row_bytes, row_scales) = (encoding.row_bytes(cols), encoding.row_scales(cols));
    let mut values = vec![0u8; rows * row_bytes];
    let mut scales = vec![0.0f32; rows * row_scales];
    values
        .par_chunks_exact_mut(row_bytes)
        .zip(scales.par_chunks_exact_mut(row_scales))
        .zip(w.par_chunks_exact(cols))
        .for_each(|((bytes, scales), row)| match q {
            Quantization::Int8 => {
                scales[0] = symmetric_scale(row, 127);
                for (b, &v) in bytes.iter_mut().zip(row) {
                    *b = quantize_value(v, scales[0], 127) as i8 as u8;
                }
            }
            Quantization::Int4 { group } => {
                for ((bytes, row), scale) in bytes
                    .chunks_exact_mut(group / 2)
                    .zip(row.chunks_exact(group))
                    .zip(scales.iter_mut())
                {
                    *scale = symmetric_scale(row, 7);
                    for (b, pair) in bytes.iter_mut().zip(row.chunks_exact(2)) {
                        let lo = (quantize_value(pair[0], *scale, 7) + 8) as u8;
                        let hi = (quantize_value(pair[1], *scale, 7) + 8) as u8;
                        *b = lo | hi << 4;
                    }
                }
            }
        });
    let (dtype, shape, scale_shape) = match q {
        Quantization::Int8 => (Dtype::I8, vec![rows, cols], vec![rows]),
        Quantization::Int4 { group } => (Dtype::U8, vec![rows, cols / 2], vec![rows, cols / group]),
    };
    Quantized {
        dtype,
        shape,
        values,
        scales,
        scale_shape,
    }
}

/// The scale that maps the largest magnitude of `values` to `top`; one for
/// an all-zero run, so that dequantizing stays exact and finite.
fn symmetric_scale(values: &[f32], top: i32) -> f32 {
    let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max > 0.0 {
        max / top as f32
    } else {
        1.0
    }
}

fn quantize_value(v: f32, scale: f32, top: i32) -> i32 {
    ((v / scale).round() as i32).clamp(-top, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
            .collect()
    }

    #[test]
    fn quantized_rows_decode_within_half_a_step() {
        let (rows, cols) = (3, 128);
        let w = values(rows * cols);
        for q in [
            Quantization::Int8,
            Quantization::Int4 { group: 32 },
            Quantization::Int4 { group: 128 },
        ] {
            let quantized = quantize(&w, rows, cols, q);
            let encoding = q.encoding();
            let (rb, rs) = (encoding.row_bytes(cols), encoding.row_scales(cols));
            for r in 0..rows {
                let mut row = vec![0.0; cols];
                let scales = &quantized.scales[r * rs..(r + 1) * rs];
                encoding.decode_row(&quantized.values[r * rb..(r + 1) * rb], scales, &mut row);
                for (i, (got, want)) in row.iter().zip(&w[r * cols..]).enumerate() {
                    let step = scales[i * rs / cols];
                    assert!((got - want).abs() <= step / 2.0 + 1e-6, "{q:?} [{r},{i}]");
                }
            }
        }
    }

    #[test]
    fn config_names_the_unsupported_part() {
        let parse = |v: Value| Quantization::from_config(&json!({ "quantization_config": v }));
        assert_eq!(
            parse(Quantization::Int8.to_config()),
            Ok(Some(Quantization::Int8))
        );
        let int4 = Quantization::Int4 { group: 64 };
        assert_eq!(parse(int4.to_config()), Ok(Some(int4)));
        assert_eq!(Quantization::from_config(&json!({})), Ok(None));
        let err = parse(json!({"quant_method": "gptq", "bits": 4})).unwrap_err();
        assert!(err.contains("unknown quant_method \"gptq\""), "{err}");
        let err =
            parse(json!({"quant_method": QUANT_METHOD, "bits": 4, "group_size": 48})).unwrap_err();
        assert!(err.contains("group size 48 is not supported"), "{err}");
        let err = parse(json!({"quant_method": QUANT_METHOD, "bits": 3})).unwrap_err();
        assert!(err.contains("3 bits"), "{err}");
    }
}
