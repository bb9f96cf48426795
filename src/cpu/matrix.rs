//! A weight matrix of the CPU backend and its one product,
//! `y[n, rows] = x[n, cols] · Wᵀ` with f32 accumulation.
//!
//! f32 weights are owned and multiplied whole. Every other encoding (bf16
//! and f16 as stored, int8 and 4-bit quantized) stays in the checkpoint's
//! bytes, memory-mapped, and is decoded into f32 a tile of rows at a time
//! inside the product, so no whole f32 copy ever exists.
//!
//! Both multiply with matrixmultiply, whose sum for one output is the same
//! whatever the other rows and columns computed with it: its k loop is cut
//! in blocks of a fixed size, and within a block each output accumulates
//! in index order with fused multiply-adds. So a tile's outputs are bit for
//! bit those of the whole matrix (a bf16 checkpoint computes exactly as its
//! f32 widening), and a row of `x` gives the same result in a batch of any
//! size (batched decoding is batch-invariant).

use std::cell::RefCell;

use rayon::prelude::*;

use super::ops;
use crate::checkpoint::SharedBytes;
use crate::quant::{Encoding, MatrixView};

/// Products with at most this many rows (decode steps) run their tiles in
/// parallel, one tile per thread; larger ones (prefill) run their tiles one
/// after the other, matrixmultiply spreading each over the threads by rows.
/// Each tile is one matrixmultiply call, which packs the whole input block
/// again: tiles of 4 MiB (cached in L3) keep that small beside the tile's
/// work, where 256 KiB tiles made a 32-row step three times slower
/// (README, "LLaDA-8B shapes").
const DECODE_ROWS: usize = 64;
const DECODE_TILE_BYTES: usize = 4 << 20;
const PREFILL_TILE_BYTES: usize = 8 << 20;

thread_local! {
    /// The decoded tile, reused from product to product.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

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

    /// An f32 matrix of `rows` rows of `cols` values.
    #[cfg(test)]
    pub fn from_f32(values: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        Matrix {
            rows,
            cols,
            storage: Storage::F32(values),
        }
    }

    /// The length of a row: the inputs of a product.
    pub fn cols(&self) -> usize {
        self.cols
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
            Storage::F32(values) => {
                out.copy_from_slice(&values[r * self.cols..(r + 1) * self.cols])
            }
            Storage::Stored {
                bytes,
                scales,
                encoding,
            } => encoding.decode_rows(bytes, scales, self.cols, r, out),
        }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`.
    pub fn linear(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols);
        let (bytes, scales, encoding) = match &self.storage {
            Storage::F32(values) => return ops::linear(x, values, n, self.cols, self.rows),
            Storage::Stored {
                bytes,
                scales,
                encoding,
            } => (bytes, scales, *encoding),
        };
        let (rows, cols) = (self.rows, self.cols);
        let mut y = vec![0.0f32; n * rows];
        let out = OutputColumns(y.as_mut_ptr());
        let tile_bytes = if n <= DECODE_ROWS {
            DECODE_TILE_BYTES
        } else {
            PREFILL_TILE_BYTES
        };
        let tile_rows = (tile_bytes / (cols * 4)).clamp(8, rows.max(8)) / 8 * 8;
        let product = |first: usize| {
            let tile_rows = tile_rows.min(rows - first);
            TILE.with_borrow_mut(|tile| {
                tile.resize(tile_rows * cols, 0.0);
                encoding.decode_rows(bytes, scales, cols, first, tile);
                // SAFETY: x is n × cols and the tile tile_rows × cols, both
                // row-major (the tile read transposed); the output is the
                // columns first..first + tile_rows of y (n × rows), which no
                // other tile writes.
                unsafe {
                    matrixmultiply::sgemm(
                        n,
                        cols,
                        tile_rows,
                        1.0,
                        x.as_ptr(),
                        cols as isize,
                        1,
                        tile.as_ptr(),
                        1,
                        cols as isize,
                        0.0,
                        out.at(first),
                        rows as isize,
                        1,
                    );
                }
            });
        };
        let firsts = (0..rows).step_by(tile_rows);
        if n <= DECODE_ROWS {
            firsts.collect::<Vec<_>>().into_par_iter().for_each(product);
        } else {
            firsts.for_each(product);
        }
        y
    }
}

/// The output of a product, whose column ranges tiles write in parallel.
#[derive(Clone, Copy)]
struct OutputColumns(*mut f32);

// SAFETY: each tile writes only its own columns (see `Matrix::linear`).
unsafe impl Send for OutputColumns {}
unsafe impl Sync for OutputColumns {}

impl OutputColumns {
    /// Column `first` of row 0. A method, so that closures capture the whole
    /// (Send) wrapper rather than its pointer field.
    fn at(self, first: usize) -> *mut f32 {
        self.0.wrapping_add(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, Dtype};
    use crate::quant::{quantize, scale_name, Quantization};

    const ROWS: usize = 37;
    const COLS: usize = 2048;

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
            (
                "f32".into(),
                float(Dtype::F32, bytemuck::cast_slice(&w).to_vec()),
                None,
            ),
            ("bf16".into(), float(Dtype::BF16, bf16), None),
            ("f16".into(), float(Dtype::F16, f16), None),
        ];
        for q in [Quantization::Int8, Quantization::Int4 { group: 32 }] {
            let quantized = quantize(&w, ROWS, COLS, q);
            let checkpoint = Checkpoint::from_tensors(vec![
                (
                    "w".into(),
                    quantized.dtype,
                    quantized.shape,
                    quantized.values,
                ),
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
                    alone
                        .iter()
                        .zip(&batch[r * ROWS..(r + 1) * ROWS])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: row {r} alone differs from row {r} of 16"
                );
            }
        }
    }

    #[test]
    fn products_equal_the_f32_product_of_the_decoded_matrix_bit_for_bit() {
        // Enough rows for several decode tiles and a prefill product.
        for n in [5, DECODE_ROWS + 3] {
            let x = values(n * COLS, 11);
            for (name, checkpoint, q) in checkpoints() {
                let view = MatrixView::open(&checkpoint, "w", [ROWS, COLS], q).unwrap();
                let w = view.to_f32();
                let got = Matrix::load(&view, false).linear(&x, n);
                let want = ops::linear(&x, &w, n, COLS, ROWS);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}, {n} rows"
                );
            }
        }
        for (name, checkpoint, q) in checkpoints() {
            let view = MatrixView::open(&checkpoint, "w", [ROWS, COLS], q).unwrap();
            let w = view.to_f32();
            let mut row = vec![0.0; COLS];
            Matrix::load(&view, false).row_into(3, &mut row);
            assert_eq!(row, w[3 * COLS..4 * COLS], "{name}");
        }
    }
}
