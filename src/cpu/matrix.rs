//! A weight matrix of the CPU backend and its one product,
//! `y[n, rows] = x[n, cols] · Wᵀ` with f32 accumulation.
//!
//! f32 weights are owned and multiplied by matrixmultiply, the reference
//! path the golden vectors were checked on. Every other encoding (bf16 and
//! f16 as stored, int8 and 4-bit quantized) stays in the checkpoint's bytes,
//! memory-mapped, and is decoded into f32 a tile of rows at a time inside
//! the product, so no whole f32 copy ever exists: a tile is sized to stay in
//! a core's L2 cache while every input row is multiplied by it.

use rayon::prelude::*;

use super::dot;
use super::ops;
use crate::checkpoint::SharedBytes;
use crate::quant::{Encoding, MatrixView};

/// Bytes of f32 a decoded tile may take: a quarter of a 1 MiB L2, so the
/// tile stays cached while the input rows stream past it.
const TILE_BYTES: usize = 256 << 10;

pub struct Matrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

enum Storage {
    F32(Vec<f32>),
    Stored {
        bytes: SharedBytes,
        /// [`Encoding::row_scales`] a row, row after row.
        scales: Vec<f32>,
        encoding: Encoding,
    },
}

impl Matrix {
    /// The matrix of `view`, as stored unless it is f32; with
    /// `round_to_bf16`, as the bf16 a GPU would hold (a bf16 matrix stays as
    /// stored, since rounding leaves it as it is).
    pub fn load(view: &MatrixView, round_to_bf16: bool) -> Matrix {
        let storage = match view.encoding {
            Encoding::BF16 => Storage::Stored {
                bytes: view.values.shared(),
                scales: Vec::new(),
                encoding: view.encoding,
            },
            _ if round_to_bf16 => {
                let mut values = view.to_f32();
                ops::round_bf16(&mut values);
                Storage::F32(values)
            }
            Encoding::F32 => Storage::F32(view.to_f32()),
            encoding => Storage::Stored {
                bytes: view.values.shared(),
                scales: view.scales_f32(),
                encoding,
            },
        };
        Matrix {
            rows: view.rows,
            cols: view.cols,
            storage,
        }
    }

    /// Bytes this matrix occupies (mapped or owned), scales included.
    pub fn bytes(&self) -> u64 {
        match &self.storage {
            Storage::F32(values) => values.len() as u64 * 4,
            Storage::Stored { bytes, scales, .. } => bytes.len() as u64 + scales.len() as u64 * 4,
        }
    }

    /// Row `r` in f32, into `out` (`cols` long): an embedding lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.storage {
            Storage::F32(values) => out.copy_from_slice(&values[r * self.cols..(r + 1) * self.cols]),
            Storage::Stored {
                bytes,
                scales,
                encoding,
            } => decode_rows(bytes, scales, *encoding, self.cols, r, out),
        }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`. For stored encodings each output is
    /// one [`dot::dots`] sum, the same whatever `n` is (batch-invariant).
    pub fn linear(&self, x: &[f32], n: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * self.cols);
        let (bytes, scales, encoding) = match &self.storage {
            Storage::F32(values) => return ops::linear(x, values, n, self.cols, self.rows),
            Storage::Stored {
                bytes,
                scales,
                encoding,
            } => (bytes, scales, *encoding),
        };
        let cols = self.cols;
        let tile_rows = (TILE_BYTES / (cols * 4)).clamp(4, 64) / 4 * 4;
        // Each tile's outputs, `[n, rows of the tile]`, then laid side by side.
        let tiles: Vec<Vec<f32>> = (0..self.rows)
            .step_by(tile_rows)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map_init(Vec::new, |tile: &mut Vec<f32>, first| {
                let rows = tile_rows.min(self.rows - first);
                tile.resize(rows * cols, 0.0);
                decode_rows(bytes, scales, encoding, cols, first, tile);
                let mut out = vec![0.0f32; n * rows];
                dot::dots(x, tile, cols, &mut out, rows);
                out
            })
            .collect();
        let mut y = vec![0.0f32; n * self.rows];
        for (t, tile) in tiles.iter().enumerate() {
            let first = t * tile_rows;
            let rows = tile.len() / n;
            for (y_row, tile_row) in y.chunks_exact_mut(self.rows).zip(tile.chunks_exact(rows)) {
                y_row[first..first + rows].copy_from_slice(tile_row);
            }
        }
        y
    }
}

/// Decodes the rows `first..` of a stored matrix that fill `out`.
fn decode_rows(
    bytes: &[u8],
    scales: &[f32],
    encoding: Encoding,
    cols: usize,
    first: usize,
    out: &mut [f32],
) {
    let (row_bytes, row_scales) = (encoding.row_bytes(cols), encoding.row_scales(cols));
    for (i, row) in out.chunks_exact_mut(cols).enumerate() {
        let r = first + i;
        encoding.decode_row(
            &bytes[r * row_bytes..(r + 1) * row_bytes],
            &scales[r * row_scales..(r + 1) * row_scales],
            row,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, Dtype};
    use crate::quant::{quantize, scale_name, Quantization};

    const ROWS: usize = 37;
    const COLS: usize = 256;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761);
                (h >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The same random matrix stored as each encoding the backend multiplies.
    fn checkpoints() -> Vec<(String, Checkpoint, Option<Quantization>)> {
        let w = values(ROWS * COLS, 7);
        let float = |dtype: Dtype, bytes: Vec<u8>| {
            Checkpoint::from_tensors(vec![("w".into(), dtype, vec![ROWS, COLS], bytes)])
        };
        let bf16: Vec<u8> = w
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = w
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let mut all = vec![
            ("f32".into(), float(Dtype::F32, bytemuck::cast_slice(&w).to_vec()), None),
            ("bf16".into(), float(Dtype::BF16, bf16), None),
            ("f16".into(), float(Dtype::F16, f16), None),
        ];
        for q in [Quantization::Int8, Quantization::Int4 { group: 32 }] {
            let quantized = quantize(&w, ROWS, COLS, q);
            let checkpoint = Checkpoint::from_tensors(vec![
                ("w".into(), quantized.dtype, quantized.shape, quantized.values),
                (
                    scale_name("w"),
                    Dtype::F32,
                    quantized.scale_shape,
                    bytemuck::cast_slice(&quantized.scales).to_vec(),
                ),
            ]);
            all.push((q.name(), checkpoint, Some(q)));
        }
        all
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let x = values(16 * COLS, 3);
        for (name, checkpoint, q) in checkpoints() {
            let view = MatrixView::open(&checkpoint, "w", [ROWS, COLS], q).unwrap();
            let matrix = Matrix::load(&view, false);
            let batch = matrix.linear(&x, 16);
            for r in 0..16 {
                let alone = matrix.linear(&x[r * COLS..(r + 1) * COLS], 1);
                assert!(
                    alone.iter().zip(&batch[r * ROWS..(r + 1) * ROWS]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: row {r} alone differs from row {r} of 16"
                );
            }
        }
    }

    #[test]
    fn products_equal_the_dequantized_matrix_in_f64() {
        let n = 5;
        let x = values(n * COLS, 11);
        for (name, checkpoint, q) in checkpoints() {
            let view = MatrixView::open(&checkpoint, "w", [ROWS, COLS], q).unwrap();
            let w = view.to_f32();
            let y = Matrix::load(&view, false).linear(&x, n);
            for i in 0..n {
                for o in 0..ROWS {
                    let want: f64 = (0..COLS)
                        .map(|k| x[i * COLS + k] as f64 * w[o * COLS + k] as f64)
                        .sum();
                    let got = y[i * ROWS + o] as f64;
                    assert!((got - want).abs() < 1e-5, "{name} [{i},{o}]: {got} vs {want}");
                }
            }
            let mut row = vec![0.0; COLS];
            Matrix::load(&view, false).row_into(3, &mut row);
            assert_eq!(row, w[3 * COLS..4 * COLS], "{name}");
        }
    }
}
