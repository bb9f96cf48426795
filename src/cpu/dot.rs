//! Many dot products of f32 rows at once: the arithmetic inside the CPU
//! matrix kernel for weights kept as stored (`super::matrix`).
//!
//! Every pair of rows is summed the same way whatever the block it falls
//! in: one 8-lane accumulator, the rows' values multiplied and added eight
//! at a time in index order, the lanes reduced in a fixed tree, then the
//! last `len % 8` products added one by one. So a product does not depend
//! on how many other rows are computed beside it, and batched decoding is
//! exactly batch-invariant. Blocks of 2 × 4 pairs keep eight independent
//! accumulators in flight and load each row once for several pairs.
//!
//! With AVX2 and FMA (detected at run time) the lanes are `__m256` and each
//! step is one fused multiply-add; elsewhere a portable version with the
//! same order multiplies and adds separately, so the two differ in the last
//! bits, never within one process.

const LANES: usize = 8;

/// `out[i * stride + j] = x_i · w_j` for every row `x_i` of `x` and `w_j`
/// of `w`, all `len` long.
pub fn dots(x: &[f32], w: &[f32], len: usize, out: &mut [f32], stride: usize) {
    let (nx, nw) = (x.len() / len, w.len() / len);
    assert!(nx * len == x.len() && nw * len == w.len() && nw <= stride);
    assert!(out.len() >= (nx.max(1) - 1) * stride + nw);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features are present, and the asserts above bound
        // every row and output index the kernel touches.
        unsafe { avx2::dots(x, w, len, out, stride) };
        return;
    }
    portable::dots(x, w, len, out, stride);
}

/// Walks the pairs in blocks of 2 × 4, then the leftover rows, calling
/// `block(rows, cols, i, j)` for the block at x row `i` and w row `j`.
fn for_each_block(nx: usize, nw: usize, mut block: impl FnMut(usize, usize, usize, usize)) {
    let mut i = 0;
    while i < nx {
        let rows = if i + 2 <= nx { 2 } else { 1 };
        let mut j = 0;
        while j < nw {
            let cols = if j + 4 <= nw { 4 } else { 1 };
            block(rows, cols, i, j);
            j += cols;
        }
        i += rows;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2 and FMA; `x` and `w` hold whole rows of `len`, and
    /// `out` every `i * stride + j` of them.
    pub unsafe fn dots(x: &[f32], w: &[f32], len: usize, out: &mut [f32], stride: usize) {
        let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        super::for_each_block(x.len() / len, w.len() / len, |rows, cols, i, j| {
            let (x, w, out) = (xp.add(i * len), wp.add(j * len), op.add(i * stride + j));
            match (rows, cols) {
                (2, 4) => block::<2, 4>(x, w, out, len, stride),
                (1, 4) => block::<1, 4>(x, w, out, len, stride),
                (2, _) => block::<2, 1>(x, w, out, len, stride),
                _ => block::<1, 1>(x, w, out, len, stride),
            }
        });
    }

    /// The R × C pairs of rows starting at `x` and `w` (rows `len` apart),
    /// into `out` (rows `stride` apart).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        len: usize,
        stride: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = len / LANES * LANES;
        let mut k = 0;
        while k < full {
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(c * len + k));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(r * len + k));
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *wv, *a);
                }
            }
            k += LANES;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                let mut sum = reduce(*a);
                for t in full..len {
                    sum = (*x.add(r * len + t)).mul_add(*w.add(c * len + t), sum);
                }
                *out.add(r * stride + c) = sum;
            }
        }
    }

    /// Lanes l and l + 4 first, then l and l + 2, then the last two: the
    /// portable version's order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn reduce(v: __m256) -> f32 {
        let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        let one = _mm_add_ss(two, _mm_shuffle_ps(two, two, 1));
        _mm_cvtss_f32(one)
    }
}

mod portable {
    use super::LANES;

    pub fn dots(x: &[f32], w: &[f32], len: usize, out: &mut [f32], stride: usize) {
        // Each pair is summed on its own, so no blocking changes a sum.
        for (i, x) in x.chunks_exact(len).enumerate() {
            for (j, w) in w.chunks_exact(len).enumerate() {
                out[i * stride + j] = dot(x, w);
            }
        }
    }

    fn dot(x: &[f32], w: &[f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        let full = x.len() / LANES * LANES;
        for (xs, ws) in x[..full]
            .chunks_exact(LANES)
            .zip(w[..full].chunks_exact(LANES))
        {
            for l in 0..LANES {
                acc[l] += xs[l] * ws[l];
            }
        }
        let four: [f32; 4] = std::array::from_fn(|l| acc[l] + acc[l + 4]);
        let two = [four[0] + four[2], four[1] + four[3]];
        let mut sum = two[0] + two[1];
        for (a, b) in x[full..].iter().zip(&w[full..]) {
            sum += a * b;
        }
        sum
    }

    #[cfg(test)]
    pub(super) use dots as portable_dots;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, len: usize, seed: u32) -> Vec<f32> {
        (0..n * len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn every_block_shape_gives_the_f64_dot_within_rounding() {
        for len in [1, 7, 8, 37, 128] {
            let (x, w) = (rows(5, len, 1), rows(7, len, 2));
            let mut out = vec![0.0; 5 * 9];
            dots(&x, &w, len, &mut out, 9);
            let mut portable = vec![0.0; 5 * 9];
            portable::portable_dots(&x, &w, len, &mut portable, 9);
            for i in 0..5 {
                for j in 0..7 {
                    let want: f64 = (0..len)
                        .map(|k| x[i * len + k] as f64 * w[j * len + k] as f64)
                        .sum();
                    for got in [out[i * 9 + j], portable[i * 9 + j]] {
                        assert!((got as f64 - want).abs() < 1e-5, "len {len} [{i},{j}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}
