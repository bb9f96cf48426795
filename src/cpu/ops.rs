//! The float32 building blocks of the CPU reference forward pass. Each is
//! written to be checked by eye against DESIGN §1; the only concessions to
//! speed are the GEMM (matrixmultiply, multi-threaded) and rayon over rows.

use half::bf16;
use rayon::prelude::*;

/// `y[n, out] = x[n, inp] · w[out, inp]ᵀ` (PyTorch `Linear` without bias).
pub fn linear(x: &[f32], w: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), n * inp);
    debug_assert_eq!(w.len(), out * inp);
    let mut y = vec![0.0f32; n * out];
    // SAFETY: the slices hold exactly n×inp, out×inp and n×out elements, and
    // the strides below describe those row-major layouts (w read transposed).
    unsafe {
        matrixmultiply::sgemm(
            n,
            inp,
            out,
            1.0,
            x.as_ptr(),
            inp as isize,
            1,
            w.as_ptr(),
            1,
            inp as isize,
            0.0,
            y.as_mut_ptr(),
            out as isize,
            1,
        );
    }
    y
}

pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

pub fn add_in_place(x: &mut [f32], delta: &[f32]) {
    x.iter_mut().zip(delta).for_each(|(a, b)| *a += b);
}

/// RMSNorm in float32: `x * rsqrt(mean(x²) + eps) * weight`. The mean of
/// squares is summed in f64 and rounded once to f32, so it does not depend on
/// the order of summation: a sequential f32 sum of 4096 squares can drift by
/// 1e-5, which rescales the whole row, and when the output is then rounded to
/// bf16 (`Rounding::Device`) a row of bf16 inputs (an embedding) flips
/// together every value whose mantissa sat at a rounding boundary.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_exact_mut(d)
        .zip(x.par_chunks_exact(d))
        .for_each(|(o, row)| {
            let sum_sq: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
            let mean_sq = (sum_sq / d as f64) as f32;
            let scale = 1.0 / (mean_sq + eps).sqrt();
            for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
                *o = w * (v * scale);
            }
        });
    out
}

/// Rounds every value to the nearest bf16, ties to even (the device's
/// `__float2bfloat16`), keeping it as f32.
pub fn round_bf16(values: &mut [f32]) {
    values
        .par_iter_mut()
        .for_each(|v| *v = bf16::from_f32(*v).to_f32());
}

/// `silu(gate) * up`, in place into `gate`.
pub fn silu_gate(gate: &mut [f32], up: &[f32]) {
    gate.par_iter_mut().zip(up).for_each(|(g, u)| {
        *g = *g / (1.0 + (-*g).exp()) * u;
    });
}

/// RoPE angles for the rotate-half convention: `cos`/`sin` tables of shape
/// `[positions, rotary_dim / 2]`, computed in float32 like the references.
/// The first `rotary_dim` dims of each head rotate; the rest of the head
/// (LLaDA2's partial rotary embedding) passes through.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
    head_dim: usize,
}

/// RoPE frequencies `theta^(-2j / head_dim)` in f32, as the references
/// compute them; every backend rotates by these.
pub fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

impl Rope {
    pub fn new(positions: &[u32], head_dim: usize, rotary_dim: usize, theta: f32) -> Rope {
        let half = rotary_dim / 2;
        let inv_freq = inv_freq(rotary_dim, theta);
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope {
            cos,
            sin,
            half,
            head_dim,
        }
    }

    /// Rotates every head of every row of `x` (`[rows, heads * head_dim]`).
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        let hd = self.head_dim;
        x.par_chunks_exact_mut(heads * hd)
            .enumerate()
            .for_each(|(row, vals)| {
                let cos = &self.cos[row * self.half..(row + 1) * self.half];
                let sin = &self.sin[row * self.half..(row + 1) * self.half];
                for head in vals.chunks_exact_mut(hd) {
                    let (a, b) = head[..2 * self.half].split_at_mut(self.half);
                    for j in 0..self.half {
                        let (x1, x2) = (a[j], b[j]);
                        a[j] = x1 * cos[j] - x2 * sin[j];
                        b[j] = x2 * cos[j] + x1 * sin[j];
                    }
                }
            });
    }
}

/// Shapes of one attention call.
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Bidirectional attention of `q` (`[n, heads * head_dim]`) over the first
/// `keys` rows of the cache (`[slots, kv_heads * head_dim]`), no mask. Per
/// head it is two GEMMs around a row softmax, so it runs at matrix speed;
/// heads run in parallel.
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    keys: usize,
    shape: &AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = *shape;
    let d = heads * hd;
    let n = q.len() / d;
    let kv_dim = kv_heads * hd;
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kv = (h / group) * hd;
            let mut scores = vec![0.0f32; n * keys];
            // SAFETY: every pointer/stride pair below addresses inside its
            // slice: q rows of stride d from column h*hd, cache rows of stride
            // kv_dim from column kv, `keys <= slots` (ForwardPass::validate).
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    hd,
                    keys,
                    scale,
                    q[h * hd..].as_ptr(),
                    d as isize,
                    1,
                    k_cache[kv..].as_ptr(),
                    1,
                    kv_dim as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    keys as isize,
                    1,
                );
            }
            for row in scores.chunks_exact_mut(keys) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0.0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                row.iter_mut().for_each(|s| *s /= sum);
            }
            let mut out = vec![0.0f32; n * hd];
            // SAFETY: as above; `out` is [n, hd] row-major.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    keys,
                    hd,
                    1.0,
                    scores.as_ptr(),
                    keys as isize,
                    1,
                    v_cache[kv..].as_ptr(),
                    kv_dim as isize,
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    hd as isize,
                    1,
                );
            }
            out
        })
        .collect();
    let mut out = vec![0.0f32; n * d];
    for (h, head) in per_head.iter().enumerate() {
        for (row, values) in head.chunks_exact(hd).enumerate() {
            out[row * d + h * hd..][..hd].copy_from_slice(values);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive_product() {
        let (n, inp, out) = (3, 5, 4);
        let x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.11).cos()).collect();
        let y = linear(&x, &w, n, inp, out);
        for r in 0..n {
            for c in 0..out {
                let want: f32 = (0..inp).map(|i| x[r * inp + i] * w[c * inp + i]).sum();
                assert!((y[r * out + c] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn bf16_rounding_is_to_nearest_ties_to_even() {
        // bf16 keeps 8 significant bits: next to 1 the step is 2⁻⁷.
        let step = 2f32.powi(-7);
        let mut v = [
            1.0 + step / 2.0,     // a tie: down to the even 1.0
            1.0 + 1.5 * step,     // a tie: up to the even 1 + 2 step
            1.0 + 0.51 * step,    // above the tie: up
            -(1.0 + 0.49 * step), // below the tie: toward 1 in magnitude
            f32::NAN,
        ];
        round_bf16(&mut v);
        assert_eq!(v[..4], [1.0, 1.0 + 2.0 * step, 1.0 + step, -1.0]);
        assert!(v[4].is_nan());
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let original = x.clone();
        Rope::new(&[0, 9], 8, 8, 10000.0).apply(&mut x, 1);
        assert_eq!(&x[..8], &original[..8]);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x[8..]) - norm(&original[8..])).abs() < 1e-3);
        assert_ne!(&x[8..], &original[8..]);
    }

    #[test]
    fn partial_rope_rotates_the_leading_dims_only() {
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        Rope::new(&[3], 8, 4, 10000.0).apply(&mut x, 1);
        assert_eq!(&x[4..], &[5.0, 6.0, 7.0, 8.0]);
        // The rotated pairs are (0, 2) and (1, 3), by angles 3 and 3/100.
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((x[0] - (c - 3.0 * s)).abs() < 1e-6 && (x[2] - (3.0 * c + s)).abs() < 1e-6);
    }

    #[test]
    fn attention_matches_a_direct_softmax_with_grouped_heads() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
        };
        let (n, keys) = (2, 5);
        let q: Vec<f32> = (0..n * 12).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..keys * 6).map(|i| (i as f32 * 0.3).cos()).collect();
        let v: Vec<f32> = (0..keys * 6).map(|i| i as f32 * 0.1 - 1.0).collect();
        let got = attention(&q, &k, &v, keys, &shape);
        for i in 0..n {
            for h in 0..4 {
                let g = h / 2;
                let qh = &q[i * 12 + h * 3..][..3];
                let s: Vec<f32> = (0..keys)
                    .map(|j| {
                        (0..3).map(|c| qh[c] * k[j * 6 + g * 3 + c]).sum::<f32>() / 3f32.sqrt()
                    })
                    .collect();
                let z: f32 = s.iter().map(|x| x.exp()).sum();
                for c in 0..3 {
                    let want: f32 = (0..keys)
                        .map(|j| s[j].exp() / z * v[j * 6 + g * 3 + c])
                        .sum();
                    assert!((got[i * 12 + h * 3 + c] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        let q = [1.0, 2.0, -3.0, 0.5];
        let out = attention(&q, &[0.3, 0.4], &[7.0, -1.0], 1, &shape);
        assert_eq!(out, vec![7.0, -1.0, 7.0, -1.0]);
    }
}
