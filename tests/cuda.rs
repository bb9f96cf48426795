//! The CUDA backend against the CPU reference (DESIGN §5), on the device
//! `Driver::for_tests` picks: the one `DLLM_CUDA` names when it is set, else
//! the GPU where a driver is installed, else the host emulation of the device
//! (docs/cuda.md), which runs these same kernels and this same executor on
//! the CPU. So every test here runs on every machine, CI included: none is
//! ignored for want of a GPU, and none measures hardware timing or memory.
//!
//! Kernels: each runs on fresh random inputs (the seed is printed) with its
//! output poisoned with NaN beforehand, and is compared with the float32
//! reference of `dllm::cpu::ops` by ‖got − want‖ / ‖want‖. Bounds, set from
//! the arithmetic and never widened to pass:
//! - a value the kernel stores as bf16 is the f32 result rounded to nearest,
//!   off by at most 2⁻⁹ relative: BF16 = 4e-3;
//! - f32 results that differ from the reference only in summation order or
//!   the last bit of exp/sin/cos: F32 = 1e-4.
//!
//! The shapes cover every edge the kernels have (partial tiles and query
//! blocks, GQA, split attention and its combine, each head dim, batches of
//! sequences of different lengths over cache pages that are not adjacent,
//! split and unsplit in one launch, the vectorised and scalar confidence
//! paths) and stay small enough for the
//! emulation: the whole file takes two to three minutes on two cores.
//!
//! End to end, only well-conditioned models are compared (the golden tiny
//! models' random weights turn bf16 rounding into 6-17% logit noise, so no
//! bound on them could tell a bug from rounding): the trained tiny-arith,
//! whose answers must be the CPU backend's, and a real-width random model,
//! against `CpuBackend` with `Rounding::Device`, which rounds to bf16 where the
//! device does, so what is left is arithmetic order.

mod common;

use std::cell::Cell;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use common::{golden_dir, logits_error};
use dllm::backend::{Backend, CacheLayout, ForwardPass, PassShapes, TokenStats, SINGLE_PAGE};
use dllm::convert::{convert, WeightFormat};
use dllm::cpu::ops::{self, AttentionShape, Rope};
use dllm::cpu::{CpuBackend, Rounding};
use dllm::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use dllm::cuda::{
    inv_freq, AttentionScratch, CudaBackend, DeviceMatrix, Driver, Gpu, Heads, QkNorm,
    QuantizedMatrix, RaggedAttention, RaggedDevice, RowStats, SequenceShape,
};
use dllm::quant::{self, Quantization};
use dllm::{synthetic, CacheMode, DecodeOptions, Model, ModelConfig};
use half::bf16;

const BF16: f32 = 4e-3;
const F32: f32 = 1e-4;

/// SplitMix64, seeded from the clock so every run draws new inputs.
struct Rng(Cell<u64>);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("random seed {seed}");
        Rng(Cell::new(seed))
    }

    fn next(&self) -> u64 {
        let s = self.0.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.0.set(s);
        let z = (s ^ (s >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in [-scale, scale).
    fn values(&self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Values already representable in bf16, as the kernels' inputs are.
    fn bf16_values(&self, len: usize, scale: f32) -> Vec<f32> {
        round_bf16(&self.values(len, scale))
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    to_f32(&to_bf16(v))
}

/// ‖got − want‖ / ‖want‖, after checking that every output was written.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("output {i} of {} is {} (not written?)", got.len(), got[i]);
    }
    let diff: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f32 = want.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

/// The device of this process, chosen once: a process keeps the first driver
/// it activates.
fn gpu() -> Gpu {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    let driver = *DRIVER.get_or_init(|| Driver::for_tests().unwrap());
    Gpu::open(driver)
        .unwrap_or_else(|e| panic!("opening the {driver:?} device (a build with kernels): {e}"))
}

fn upload<T: DeviceRepr>(gpu: &Gpu, host: &[T]) -> CudaSlice<T> {
    gpu.stream.clone_htod(host).unwrap()
}

fn download<T: DeviceRepr>(gpu: &Gpu, device: &CudaSlice<T>) -> Vec<T> {
    gpu.stream.clone_dtoh(device).unwrap()
}

fn poisoned_f32(gpu: &Gpu, len: usize) -> CudaSlice<f32> {
    upload(gpu, &vec![f32::NAN; len])
}

fn poisoned_bf16(gpu: &Gpu, len: usize) -> CudaSlice<bf16> {
    upload(gpu, &vec![bf16::NAN; len])
}

#[test]
fn embed_gathers_exact_rows() {
    let (gpu, rng) = (gpu(), Rng::new());
    let (vocab, d, n) = (1000, 3584, 77);
    let table = rng.bf16_values(vocab * d, 1.0);
    let tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let mut x = poisoned_f32(&gpu, n * d);
    let table_dev = upload(&gpu, &to_bf16(&table));
    gpu.kernels
        .embed(
            &gpu.stream,
            &table_dev.as_view(),
            &upload(&gpu, &tokens).as_view(),
            &mut x.as_view_mut(),
            d,
        )
        .unwrap();
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| table[t as usize * d..][..d].to_vec())
        .collect();
    assert_eq!(download(&gpu, &x), want);
}

#[test]
fn rms_norm_matches_the_reference() {
    let (gpu, rng) = (gpu(), Rng::new());
    for (n, d) in [(37, 4096), (5, 3584), (3, 128)] {
        let x = rng.values(n * d, 3.0);
        let weight = rng.values(d, 2.0);
        let mut out = poisoned_bf16(&gpu, n * d);
        let (x_dev, w_dev) = (upload(&gpu, &x), upload(&gpu, &weight));
        gpu.kernels
            .rms_norm(
                &gpu.stream,
                &x_dev.as_view(),
                &w_dev.as_view(),
                &mut out.as_view_mut(),
                1e-5,
            )
            .unwrap();
        let err = rel_err(
            &to_f32(&download(&gpu, &out)),
            &ops::rms_norm(&x, &weight, 1e-5),
        );
        assert!(err < BF16, "[{n}, {d}]: relative error {err}");
    }
}

#[test]
fn silu_gate_matches_the_reference() {
    let (gpu, rng) = (gpu(), Rng::new());
    let (n, f) = (45, 18944);
    let gate_up = rng.values(n * 2 * f, 4.0);
    let mut h = poisoned_bf16(&gpu, n * f);
    gpu.kernels
        .silu_gate(
            &gpu.stream,
            &upload(&gpu, &gate_up).as_view(),
            &mut h.as_view_mut(),
            f,
        )
        .unwrap();
    let (mut gate, mut up) = (Vec::new(), Vec::new());
    for row in gate_up.chunks_exact(2 * f) {
        gate.extend_from_slice(&row[..f]);
        up.extend_from_slice(&row[f..]);
    }
    ops::silu_gate(&mut gate, &up);
    let err = rel_err(&to_f32(&download(&gpu, &h)), &gate);
    assert!(err < BF16, "relative error {err}");
}

/// Page tables for sequences of `lens` slots in one pool of `page_size`-slot
/// pages, dealt in turn and from the top down, so that no sequence's pages
/// are consecutive, with `spare` pages nobody owns at the bottom. Returns
/// the pool's page count and the tables.
fn interleaved_pages(lens: &[usize], page_size: usize, spare: usize) -> (usize, Vec<Vec<u32>>) {
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); lens.len()];
    let need = |i: usize| lens[i].div_ceil(page_size);
    let total = spare + (0..lens.len()).map(need).sum::<usize>();
    let mut next = total;
    while (0..lens.len()).any(|i| tables[i].len() < need(i)) {
        for (i, table) in tables.iter_mut().enumerate() {
            if table.len() < need(i) {
                next -= 1;
                table.push(next as u32);
            }
        }
    }
    (total, tables)
}

/// The physical slot of a sequence's slot `slot`, computed here independently
/// of the library.
fn physical(pages: &[u32], slot: usize, page_size: usize) -> usize {
    pages[slot / page_size] as usize * page_size + slot % page_size
}

/// LLaDA2-mini's experts (256 in 8 groups, top 8) and the golden tiny
/// model's (8 in 4 groups, top 2).
fn moe_configs() -> [dllm::MoeConfig; 2] {
    let mini = synthetic::preset("llada2-mini").unwrap().moe.unwrap();
    let tiny = dllm::MoeConfig {
        experts: 8,
        experts_per_token: 2,
        groups: 4,
        groups_per_token: 2,
        ..mini.clone()
    };
    [mini, tiny]
}

#[test]
fn moe_router_chooses_the_experts_of_the_cpu_reference() {
    let (gpu, rng) = (gpu(), Rng::new());
    let [mini, tiny] = moe_configs();
    let one = dllm::MoeConfig {
        experts_per_token: 1,
        ..tiny.clone()
    };
    for moe in [mini, tiny, one] {
        let (n, k) = (50, moe.experts_per_token);
        // Logits at the router's scale (1.5/sqrt(d) weights on unit inputs).
        let logits = rng.values(n * moe.experts, 2.5);
        let bias = rng.values(moe.experts, 0.2);
        let (mut experts, mut weights) = (
            upload(&gpu, &vec![u32::MAX; n * k]),
            upload(&gpu, &vec![f32::NAN; n * k]),
        );
        gpu.kernels
            .moe_router(
                &gpu.stream,
                &upload(&gpu, &logits).as_view(),
                &upload(&gpu, &bias).as_view(),
                &mut experts.as_view_mut(),
                &mut weights.as_view_mut(),
                &moe,
            )
            .unwrap();
        let want = dllm::cpu::route(&logits, &bias, &moe);
        // The kernel's arithmetic is the reference's, in the same order, so
        // the choices are the same, in the same order. (The emulated device's
        // expf is the host's; a GPU's may differ in the last bit, which can
        // only flip a choice between two scores that close: a near-tie.)
        assert_eq!(download(&gpu, &experts), want.experts, "{moe:?}");
        let err = rel_err(&download(&gpu, &weights), &want.weights);
        assert!(err < F32, "{moe:?}: weights relative error {err}");
    }
}

/// `n` rows' choices of `k` distinct experts among `experts`, drawn so that
/// some experts get many rows (more than a 16-row tile) and some none.
fn random_choices(rng: &Rng, n: usize, k: usize, experts: usize) -> Vec<u32> {
    let mut choices = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut row: Vec<u32> = Vec::with_capacity(k);
        while row.len() < k {
            // Half the draws among the first few experts: popular ones.
            let e = if rng.below(2) == 0 {
                rng.below(k + 2)
            } else {
                rng.below(experts - 1)
            } as u32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        choices.extend(row);
    }
    choices
}

/// The host's grouping of `choices` by expert: each expert's entries (row,
/// choice) in row order, flattened, and where each expert's entries start.
fn sort_by_expert(choices: &[u32], experts: usize) -> (Vec<u32>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut offsets = vec![0];
    for e in 0..experts as u32 {
        entries.extend(
            (0..choices.len())
                .filter(|&s| choices[s] == e)
                .map(|s| s as u32),
        );
        offsets.push(entries.len());
    }
    (entries, offsets)
}

#[test]
fn moe_sort_groups_each_experts_rows_in_order() {
    let (gpu, rng) = (gpu(), Rng::new());
    let [mini, tiny] = moe_configs();
    // 300 rows of 8 choices: the choices span several of the kernel's chunks.
    for (moe, n) in [(mini, 300), (tiny, 37)] {
        let (e, k) = (moe.experts, moe.experts_per_token);
        let choices = random_choices(&rng, n, k, e);
        let (mut offsets, mut sorted_rows, mut positions) = (
            upload(&gpu, &vec![u32::MAX; e + 1]),
            upload(&gpu, &vec![u32::MAX; n * k]),
            upload(&gpu, &vec![u32::MAX; n * k]),
        );
        gpu.kernels
            .moe_sort(
                &gpu.stream,
                &upload(&gpu, &choices).as_view(),
                &mut offsets.as_view_mut(),
                &mut sorted_rows.as_view_mut(),
                &mut positions.as_view_mut(),
                &moe,
            )
            .unwrap();
        let (entries, want_offsets) = sort_by_expert(&choices, e);
        let want_offsets: Vec<u32> = want_offsets.iter().map(|&o| o as u32).collect();
        assert_eq!(download(&gpu, &offsets), want_offsets, "{moe:?}");
        let want_rows: Vec<u32> = entries.iter().map(|&s| s / k as u32).collect();
        assert_eq!(download(&gpu, &sorted_rows), want_rows, "{moe:?}");
        let mut want_positions = vec![0u32; n * k];
        for (at, &s) in entries.iter().enumerate() {
            want_positions[s as usize] = at as u32;
        }
        assert_eq!(download(&gpu, &positions), want_positions, "{moe:?}");
    }
}

#[test]
fn moe_gemm_multiplies_each_experts_rows_by_its_weights() {
    let (gpu, rng) = (gpu(), Rng::new());
    // k and m off the kernel's 32 and 64 tiles; 61 rows of 3 choices among
    // 6 experts put more than 16 rows on the popular ones.
    let (experts, k, m, n, top_k) = (6, 72, 100, 61, 3);
    let choices = random_choices(&rng, n, top_k, experts);
    let (entries, offsets) = sort_by_expert(&choices, experts);
    let rows: Vec<u32> = entries.iter().map(|&s| s / top_k as u32).collect();
    let a = rng.bf16_values(n * k, 1.0);
    let w = rng.bf16_values(experts * m * k, 0.2);
    // Expert e's product of input rows `a_row(i)`, in f64.
    let reference = |a: &[f32], a_row: &dyn Fn(usize) -> usize| -> Vec<f32> {
        let mut y = Vec::with_capacity(entries.len() * m);
        for e in 0..experts {
            for i in offsets[e]..offsets[e + 1] {
                let x = &a[a_row(i) * k..][..k];
                y.extend((0..m).map(|c| {
                    let wc = &w[(e * m + c) * k..][..k];
                    x.iter()
                        .zip(wc)
                        .map(|(&x, &w)| x as f64 * w as f64)
                        .sum::<f64>() as f32
                }));
            }
        }
        y
    };
    let offsets_dev = upload(&gpu, &offsets.iter().map(|&o| o as u32).collect::<Vec<_>>());
    let w_dev = upload(&gpu, &to_bf16(&w));
    // Gathered through the row list (gate|up), then already in entry order
    // (down): the same rows' products either way.
    let gathered: Vec<f32> = rows
        .iter()
        .flat_map(|&r| a[r as usize * k..][..k].to_vec())
        .collect();
    for (input, a_rows, want) in [
        (
            &a,
            Some(upload(&gpu, &rows)),
            reference(&a, &|i| rows[i] as usize),
        ),
        (&gathered, None, reference(&gathered, &|i| i)),
    ] {
        let mut y = poisoned_f32(&gpu, entries.len() * m);
        gpu.kernels
            .moe_gemm(
                &gpu.stream,
                &upload(&gpu, &to_bf16(input)).as_view(),
                a_rows.as_ref().map(|r| r.as_view()).as_ref(),
                &w_dev.as_view(),
                &offsets_dev.as_view(),
                &mut y.as_view_mut(),
                k,
            )
            .unwrap();
        let err = rel_err(&download(&gpu, &y), &want);
        assert!(
            err < F32,
            "gathered {}: relative error {err}",
            a_rows.is_some()
        );
    }
}

#[test]
fn moe_combine_adds_the_weighted_experts_and_the_shared_expert() {
    let (gpu, rng) = (gpu(), Rng::new());
    let (experts, n, top_k, d) = (16, 29, 4, 300);
    let choices = random_choices(&rng, n, top_k, experts);
    let (entries, _) = sort_by_expert(&choices, experts);
    let mut positions = vec![0u32; n * top_k];
    for (at, &s) in entries.iter().enumerate() {
        positions[s as usize] = at as u32;
    }
    let y = rng.values(n * top_k * d, 2.0);
    let weights = rng.values(n * top_k, 1.0);
    let (shared, x) = (rng.values(n * d, 1.0), rng.values(n * d, 3.0));
    // x is updated in place, so not poisoned: an element left unwritten
    // keeps its old value, off by the whole sum.
    let mut x_dev = upload(&gpu, &x);
    gpu.kernels
        .moe_combine(
            &gpu.stream,
            &upload(&gpu, &y).as_view(),
            &upload(&gpu, &positions).as_view(),
            &upload(&gpu, &choices).as_view(),
            &upload(&gpu, &weights).as_view(),
            &upload(&gpu, &shared).as_view(),
            &mut x_dev.as_view_mut(),
            top_k,
        )
        .unwrap();
    // The CPU reference's order: experts ascending into zeros, then the
    // shared expert, then the residual.
    let mut want = x.clone();
    for row in 0..n {
        let mut order: Vec<usize> = (0..top_k).collect();
        order.sort_by_key(|&j| choices[row * top_k + j]);
        for c in 0..d {
            let routed = order.iter().fold(0.0f32, |acc, &j| {
                let slot = row * top_k + j;
                acc + weights[slot] * y[positions[slot] as usize * d + c]
            });
            want[row * d + c] += shared[row * d + c] + routed;
        }
    }
    let err = rel_err(&download(&gpu, &x_dev), &want);
    assert!(err < F32, "relative error {err}");
}

#[test]
fn kv_update_normalises_heads_and_rotates_their_leading_dims() {
    let (gpu, rng) = (gpu(), Rng::new());
    // LLaDA2-mini (64 of 128 dims rotate) and the golden tiny model (16 of 32).
    for (heads, rotary_dim) in [
        (
            Heads {
                heads: 16,
                kv_heads: 4,
                head_dim: 128,
            },
            64,
        ),
        (
            Heads {
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
            },
            16,
        ),
    ] {
        let (n, slots, theta, eps) = (40, 96, 600000f32, 1e-6f32);
        let (q_dim, kv_dim, width) = (heads.q_dim(), heads.kv_dim(), heads.qkv_dim());
        let write_slot = rng.below(slots - n + 1);
        let positions: Vec<u32> = (0..n).map(|_| rng.below(4096) as u32).collect();
        let qkv = rng.values(n * width, 2.0);
        // Weights near 4, as LLaDA2's trained q/k norms are.
        let q_norm: Vec<f32> = rng
            .values(heads.head_dim, 0.5)
            .iter()
            .map(|w| w + 4.0)
            .collect();
        let k_norm: Vec<f32> = rng
            .values(heads.head_dim, 0.5)
            .iter()
            .map(|w| w + 4.0)
            .collect();

        let mut qkv_dev = upload(&gpu, &qkv);
        let (q_norm_dev, k_norm_dev) = (upload(&gpu, &q_norm), upload(&gpu, &k_norm));
        let poison = to_bf16(&vec![f32::NAN; slots * kv_dim]);
        let (mut k_dev, mut v_dev) = (upload(&gpu, &poison), upload(&gpu, &poison));
        let row_slots: Vec<u32> = (write_slot..write_slot + n).map(|s| s as u32).collect();
        let norm = QkNorm {
            q: q_norm_dev.as_view(),
            k: k_norm_dev.as_view(),
            eps,
        };
        gpu.kernels
            .kv_update(
                &gpu.stream,
                &mut qkv_dev.as_view_mut(),
                None,
                Some(&norm),
                &upload(&gpu, &positions).as_view(),
                &upload(&gpu, &row_slots).as_view(),
                &upload(&gpu, &inv_freq(rotary_dim, theta)).as_view(),
                &mut k_dev.as_view_mut(),
                &mut v_dev.as_view_mut(),
                heads,
            )
            .unwrap();

        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for row in qkv.chunks_exact(width) {
            q.extend_from_slice(&row[..q_dim]);
            k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
            v.extend_from_slice(&row[q_dim + kv_dim..]);
        }
        let mut q = ops::rms_norm(&q, &q_norm, eps);
        let mut k = ops::rms_norm(&k, &k_norm, eps);
        let rope = Rope::new(&positions, heads.head_dim, rotary_dim, theta);
        rope.apply(&mut q, heads.heads);
        rope.apply(&mut k, heads.kv_heads);

        let got_q: Vec<f32> = download(&gpu, &qkv_dev)
            .chunks_exact(width)
            .flat_map(|r| r[..q_dim].to_vec())
            .collect();
        let err = rel_err(&got_q, &q);
        assert!(err < F32, "{heads:?}: q relative error {err}");
        let written = write_slot * kv_dim..(write_slot + n) * kv_dim;
        for (name, got, want) in [
            ("k", download(&gpu, &k_dev), &k),
            ("v", download(&gpu, &v_dev), &v),
        ] {
            let err = rel_err(&to_f32(&got[written.clone()]), want);
            assert!(err < BF16, "{heads:?}: {name} relative error {err}");
        }
    }
}

#[test]
fn kv_update_rotates_and_writes_only_its_slots() {
    let (gpu, rng) = (gpu(), Rng::new());
    // Dream's GQA with biases, and LLaDA's MHA at head_dim 64 without.
    for (heads, with_bias) in [
        (
            Heads {
                heads: 28,
                kv_heads: 4,
                head_dim: 128,
            },
            true,
        ),
        (
            Heads {
                heads: 16,
                kv_heads: 16,
                head_dim: 64,
            },
            false,
        ),
    ] {
        let (q_dim, kv_dim, width) = (heads.q_dim(), heads.kv_dim(), heads.qkv_dim());
        // A batch of two sequences' passes, (tokens, first slot written):
        // they start and end mid-page and cross pages that are not adjacent.
        let page_size = 16;
        let passes = [(25, 7 + rng.below(9)), (15, 30 + rng.below(9))];
        let lens: Vec<usize> = passes.iter().map(|(n, w)| n + w).collect();
        let (pages, tables) = interleaved_pages(&lens, page_size, 2);
        let slots = pages * page_size;
        let written: Vec<usize> = passes
            .iter()
            .zip(&tables)
            .flat_map(|(&(n, w), table)| (w..w + n).map(|s| physical(table, s, page_size)))
            .collect();
        let n = written.len();
        let theta = 1e6f32;
        // Non-contiguous true positions, as a pruned suffix has.
        let positions: Vec<u32> = (0..n).map(|_| rng.below(4096) as u32).collect();
        let qkv = rng.values(n * width, 2.0);
        let bias = rng.values(width, 0.5);
        let k_before = to_bf16(&rng.values(slots * kv_dim, 1.0));
        let v_before = to_bf16(&rng.values(slots * kv_dim, 1.0));

        let mut qkv_dev = upload(&gpu, &qkv);
        let bias_dev = upload(&gpu, &bias);
        let (mut k_dev, mut v_dev) = (upload(&gpu, &k_before), upload(&gpu, &v_before));
        let bias_view = bias_dev.as_view();
        let slots_dev = upload(&gpu, &written.iter().map(|&s| s as u32).collect::<Vec<_>>());
        gpu.kernels
            .kv_update(
                &gpu.stream,
                &mut qkv_dev.as_view_mut(),
                with_bias.then_some(&bias_view),
                None,
                &upload(&gpu, &positions).as_view(),
                &slots_dev.as_view(),
                &upload(&gpu, &inv_freq(heads.head_dim, theta)).as_view(),
                &mut k_dev.as_view_mut(),
                &mut v_dev.as_view_mut(),
                heads,
            )
            .unwrap();

        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for row in qkv.chunks_exact(width) {
            let biased: Vec<f32> = row
                .iter()
                .zip(&bias)
                .map(|(x, b)| if with_bias { x + b } else { *x })
                .collect();
            q.extend_from_slice(&biased[..q_dim]);
            k.extend_from_slice(&biased[q_dim..q_dim + kv_dim]);
            v.extend_from_slice(&biased[q_dim + kv_dim..]);
        }
        let rope = Rope::new(&positions, heads.head_dim, heads.head_dim, theta);
        rope.apply(&mut q, heads.heads);
        rope.apply(&mut k, heads.kv_heads);

        let got_qkv = download(&gpu, &qkv_dev);
        let got_q: Vec<f32> = got_qkv
            .chunks_exact(width)
            .flat_map(|r| r[..q_dim].to_vec())
            .collect();
        let err = rel_err(&got_q, &q);
        assert!(err < F32, "{heads:?}: q relative error {err}");

        for (name, got, before, want) in [
            ("k", download(&gpu, &k_dev), &k_before, &k),
            ("v", download(&gpu, &v_dev), &v_before, &v),
        ] {
            let rows: Vec<f32> = written
                .iter()
                .flat_map(|&s| to_f32(&got[s * kv_dim..(s + 1) * kv_dim]))
                .collect();
            let err = rel_err(&rows, want);
            assert!(err < BF16, "{heads:?}: {name} relative error {err}");
            // A step overwrites its rows' slots and nothing else: not the
            // rest of their pages, not the other sequences' pages.
            for slot in (0..slots).filter(|s| !written.contains(s)) {
                let at = slot * kv_dim..(slot + 1) * kv_dim;
                assert_eq!(got[at.clone()], before[at], "{name}: slot {slot} changed");
            }
        }
    }
}

/// Attention of a batch of sequences, (queries, attend_len) each, every one
/// over its own pages of a pool of `page_size`-slot pages (one page each
/// when `page_size` is `None`), against the reference per sequence. The
/// pool's slots that no sequence attends over (the tails of last pages, a
/// spare page) hold NaN, so that any read of them shows.
fn check_attention(
    gpu: &Gpu,
    rng: &Rng,
    heads: Heads,
    sequences: &[(usize, usize)],
    page_size: Option<usize>,
) {
    let (q_dim, kv_dim, width) = (heads.q_dim(), heads.kv_dim(), heads.qkv_dim());
    let lens: Vec<usize> = sequences.iter().map(|&(_, len)| len).collect();
    let page_size = page_size.unwrap_or_else(|| lens.iter().copied().max().unwrap());
    let (pages, tables) = interleaved_pages(&lens, page_size, 1);
    let n: usize = sequences.iter().map(|&(queries, _)| queries).sum();
    let qkv = rng.values(n * width, 1.5);
    let mut pool = [
        vec![f32::NAN; pages * page_size * kv_dim],
        vec![f32::NAN; pages * page_size * kv_dim],
    ];
    // Each sequence's keys and values in slot order, for the reference.
    let mut contiguous = Vec::new();
    for (&len, table) in lens.iter().zip(&tables) {
        let [k, v] = [
            rng.bf16_values(len * kv_dim, 1.5),
            rng.bf16_values(len * kv_dim, 1.5),
        ];
        for slot in 0..len {
            let at = physical(table, slot, page_size) * kv_dim;
            pool[0][at..at + kv_dim].copy_from_slice(&k[slot * kv_dim..][..kv_dim]);
            pool[1][at..at + kv_dim].copy_from_slice(&v[slot * kv_dim..][..kv_dim]);
        }
        contiguous.push((k, v));
    }
    let shapes: Vec<SequenceShape> = sequences
        .iter()
        .zip(&tables)
        .map(|(&(queries, attend_len), pages)| SequenceShape {
            queries,
            attend_len,
            pages,
        })
        .collect();
    let plan = RaggedAttention::new(&shapes, page_size, heads.heads, gpu.kernels.sms).unwrap();
    let mut ragged = RaggedDevice::new(&gpu.stream, n, plan.page_table.len()).unwrap();
    ragged.upload(&gpu.stream, &plan).unwrap();
    let mut scratch =
        AttentionScratch::new(&gpu.stream, plan.scratch_rows, heads.head_dim).unwrap();
    let mut out = poisoned_bf16(gpu, n * q_dim);
    let (k_dev, v_dev) = (
        upload(gpu, &to_bf16(&pool[0])),
        upload(gpu, &to_bf16(&pool[1])),
    );
    gpu.kernels
        .attention(
            &gpu.stream,
            &upload(gpu, &qkv).as_view(),
            &k_dev.as_view(),
            &v_dev.as_view(),
            &mut out.as_view_mut(),
            &mut scratch,
            &ragged,
            heads,
        )
        .unwrap();
    let got = to_f32(&download(gpu, &out));
    let shape = AttentionShape {
        heads: heads.heads,
        kv_heads: heads.kv_heads,
        head_dim: heads.head_dim,
    };
    let mut row = 0;
    for (&(queries, attend_len), (k, v)) in sequences.iter().zip(&contiguous) {
        let q: Vec<f32> = qkv[row * width..(row + queries) * width]
            .chunks_exact(width)
            .flat_map(|r| r[..q_dim].to_vec())
            .collect();
        let want = ops::attention(&q, k, v, attend_len, &shape);
        let err = rel_err(&got[row * q_dim..(row + queries) * q_dim], &want);
        assert!(
            err < BF16,
            "{heads:?}, {queries} queries over {attend_len} slots in a batch of {sequences:?}, \
             pages of {page_size}: relative error {err}"
        );
        row += queries;
    }
}

#[test]
fn attention_matches_the_reference() {
    let (gpu, rng) = (gpu(), Rng::new());
    let llada = Heads {
        heads: 32,
        kv_heads: 32,
        head_dim: 128,
    };
    let dream = Heads {
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
    };
    let small = Heads {
        heads: 16,
        kv_heads: 4,
        head_dim: 64,
    };
    // The golden test models' heads: half the lanes own no output column.
    let tiny = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    for heads in [llada, dream, small, tiny] {
        // One batch, in pages of 16 that are never adjacent: a cached step
        // (split keys), a partial last tile and query block, one query over
        // one slot, and a full forward. Split and unsplit sequences share the
        // launch.
        let batch = [(32, 2048), (45, 301), (1, 1), (300, 300)];
        check_attention(&gpu, &rng, heads, &batch, Some(16));
        // A sequence alone in one page, as `prepare` lays out the cache.
        check_attention(&gpu, &rng, heads, &[(45, 301)], None);
    }
}

/// The confidence kernel over `logits` (`[rows, vocab]`), its output poisoned
/// beforehand, finished on the host as the backend does.
fn confidence(gpu: &Gpu, logits: &[f32], vocab: usize) -> Vec<TokenStats> {
    let rows = logits.len() / vocab;
    let poison = RowStats {
        token: u32::MAX,
        rest: f32::NAN,
        moment: f32::NAN,
        gap: f32::NAN,
    };
    let mut stats = upload(gpu, &vec![poison; rows]);
    gpu.kernels
        .confidence(
            &gpu.stream,
            &upload(gpu, logits).as_view(),
            &mut stats.as_view_mut(),
            vocab,
        )
        .unwrap();
    download(gpu, &stats)
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            assert!(
                s.token != u32::MAX && s.rest.is_finite() && s.moment.is_finite(),
                "row {r} not written: {s:?}"
            );
            TokenStats::from(s)
        })
        .collect()
}

#[test]
fn confidence_matches_token_stats_from_logits() {
    let (gpu, rng) = (gpu(), Rng::new());
    // LLaDA's vocabulary (16-byte loads) and an odd one (the scalar path).
    for vocab in [126_464, 1001] {
        let rows = 32;
        let mut logits = rng.values(rows * vocab, 4.0);
        for (r, row) in logits.chunks_exact_mut(vocab).enumerate() {
            // Spread the top probability from flat to peaked across rows ...
            row[rng.below(vocab)] += r as f32 * 0.6;
            // ... and give two rows an exact tie for the top (lowest id wins).
            if r % 16 == 3 {
                let (a, b) = (rng.below(vocab / 2), vocab / 2 + rng.below(vocab / 2));
                let top = row.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
                row[a] = top;
                row[b] = top;
            }
        }
        let stats = confidence(&gpu, &logits, vocab);
        for (r, (got, row)) in stats
            .into_iter()
            .zip(logits.chunks_exact(vocab))
            .enumerate()
        {
            let want = TokenStats::from_logits(row);
            assert_eq!(got.token, want.token, "vocab {vocab} row {r}");
            // f32 sums of 10^5 terms: 1e-5 relative; the dropped 1e-10 in the
            // entropy: at most vocab * 1e-10 absolute.
            assert!(
                (got.prob - want.prob).abs() <= 1e-5 * want.prob,
                "row {r}: {got:?} vs {want:?}"
            );
            assert!(
                (got.margin - want.margin).abs() <= 1e-5,
                "row {r}: {got:?} vs {want:?}"
            );
            assert!(
                (got.neg_entropy - want.neg_entropy).abs() <= 1e-4,
                "row {r}: {got:?} vs {want:?}"
            );
        }
    }
}

/// Rows whose top logit stands 28 above the rest have p within 1e-9 of 1,
/// which f32 holds only as 1.0. Here they differ only in that distance, by
/// steps of 1e-3, in an order unrelated to their position: the f64 reference
/// ranks them by it, and so must the kernel's statistics, or a threshold or
/// top-k choice among confident tokens would follow position instead.
#[test]
fn confident_rows_rank_as_the_f64_reference_ranks_them() {
    let (gpu, rng) = (gpu(), Rng::new());
    let rows = 24;
    for vocab in [4096, 1001] {
        let base = rng.values(vocab, 2.0);
        let top_id = rng.below(vocab);
        let highest = base.iter().cloned().fold(f32::MIN, f32::max);
        let mut logits = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let mut row = base.clone();
            // 7 is prime to 24: a permutation of the steps, far from sorted.
            row[top_id] = highest + 28.0 + 1e-3 * ((r * 7) % rows) as f32;
            logits.extend(row);
        }
        let want: Vec<TokenStats> = logits
            .chunks_exact(vocab)
            .map(TokenStats::from_logits)
            .collect();
        assert!(want.iter().all(|w| 1.0 - w.prob < 1e-9 && w.prob < 1.0));
        let got = confidence(&gpu, &logits, vocab);
        // Most confident first, ties by position (as the decode rules break them).
        let ranking = |stats: &[TokenStats], score: fn(&TokenStats) -> f64| {
            let mut order: Vec<usize> = (0..rows).collect();
            order.sort_by(|&a, &b| score(&stats[b]).total_cmp(&score(&stats[a])));
            order
        };
        for (name, score) in [
            ("prob", (|s: &TokenStats| s.prob) as fn(&TokenStats) -> f64),
            ("margin", |s: &TokenStats| s.margin),
        ] {
            assert_eq!(
                ranking(&got, score),
                ranking(&want, score),
                "vocab {vocab}: rows ranked by {name}:\n{:?}\nvs the reference\n{:?}",
                got.iter().map(score).collect::<Vec<_>>(),
                want.iter().map(score).collect::<Vec<_>>()
            );
        }
        assert!(got.iter().all(|g| g.token == top_id as u32));
    }
}

#[test]
fn gemm_matches_the_reference_and_accumulates() {
    let (mut gpu, rng) = (gpu(), Rng::new());
    for (n, k, m) in [(67, 4096, 1000), (1, 352, 128), (300, 128, 512)] {
        let x = rng.bf16_values(n * k, 1.0);
        let w = rng.bf16_values(m * k, 0.05);
        let (x_dev, w_dev) = (upload(&gpu, &to_bf16(&x)), upload(&gpu, &to_bf16(&w)));
        let product = ops::linear(&x, &w, n, k, m);

        let mut y = poisoned_f32(&gpu, n * m);
        gpu.gemm
            .matmul(
                &mut y.as_view_mut(),
                &x_dev.as_view(),
                &w_dev.as_view(),
                k,
                false,
            )
            .unwrap();
        let err = rel_err(&download(&gpu, &y), &product);
        assert!(err < F32, "[{n}, {k}] x [{m}, {k}]^T: relative error {err}");

        let residual = rng.values(n * m, 1.0);
        let mut y = upload(&gpu, &residual);
        gpu.gemm
            .matmul(
                &mut y.as_view_mut(),
                &x_dev.as_view(),
                &w_dev.as_view(),
                k,
                true,
            )
            .unwrap();
        let want: Vec<f32> = residual.iter().zip(&product).map(|(a, b)| a + b).collect();
        let err = rel_err(&download(&gpu, &y), &want);
        assert!(
            err < F32,
            "accumulating [{n}, {k}] x [{m}, {k}]^T: relative error {err}"
        );
    }
}

/// The four stored formats the quantized kernels take.
const QUANTIZATIONS: [Quantization; 4] = [
    Quantization::Int8,
    Quantization::Int4 { group: 32 },
    Quantization::Int4 { group: 64 },
    Quantization::Int4 { group: 128 },
];

/// `w` (`[rows, cols]`) quantized as `q` and uploaded as stored, with the
/// weights the kernels multiply by: each dequantized value rounded to bf16,
/// as the prefill path's cuBLASLt reads it (kernels/quant.cuh).
fn quantized(
    gpu: &Gpu,
    w: &[f32],
    [rows, cols]: [usize; 2],
    q: Quantization,
) -> (QuantizedMatrix, Vec<f32>) {
    let stored = quant::quantize(w, rows, cols, q);
    let mut weights = vec![0.0f32; rows * cols];
    q.encoding()
        .decode_rows(&stored.values, &stored.scales, cols, 0, &mut weights);
    let matrix = QuantizedMatrix::new(
        "w",
        q.encoding(),
        [rows, cols],
        upload(gpu, &stored.values),
        upload(gpu, &stored.scales),
    )
    .unwrap();
    (matrix, round_bf16(&weights))
}

/// Every format, each row count a decode step may bring (1 to the kernel's
/// 64), odd output counts (a block's columns cut short) and inputs that end
/// in a partial chunk of 256. Both sides multiply the same bf16 values in
/// f32 and differ only in summation order, hence F32; a wrong scale group,
/// nibble order or sign is off by far more.
#[test]
fn dequant_gemm_matches_the_reference_and_accumulates() {
    let (gpu, rng) = (gpu(), Rng::new());
    for q in QUANTIZATIONS {
        for (m, k, n) in [(1, 384, 257), (7, 256, 33), (32, 640, 99), (64, 1152, 65)] {
            let what = format!("{q:?}: [{m}, {k}] x [{n}, {k}]^T");
            let x = rng.bf16_values(m * k, 1.0);
            let (w, weights) = quantized(&gpu, &rng.values(n * k, 0.05), [n, k], q);
            let x_dev = upload(&gpu, &to_bf16(&x));
            let product = ops::linear(&x, &weights, m, k, n);

            let mut y = poisoned_f32(&gpu, m * n);
            gpu.kernels
                .dequant_gemm(
                    &gpu.stream,
                    &mut y.as_view_mut(),
                    &x_dev.as_view(),
                    &w,
                    false,
                )
                .unwrap();
            let err = rel_err(&download(&gpu, &y), &product);
            assert!(err < F32, "{what}: relative error {err}");

            let residual = rng.values(m * n, 1.0);
            let mut y = upload(&gpu, &residual);
            gpu.kernels
                .dequant_gemm(
                    &gpu.stream,
                    &mut y.as_view_mut(),
                    &x_dev.as_view(),
                    &w,
                    true,
                )
                .unwrap();
            let want: Vec<f32> = residual.iter().zip(&product).map(|(a, b)| a + b).collect();
            let err = rel_err(&download(&gpu, &y), &want);
            assert!(err < F32, "accumulating {what}: relative error {err}");
        }
    }
}

/// A quantized matrix's product with any number of rows: up to 64 through
/// dequant_gemm; more through the dequantized scratch and cuBLASLt, or,
/// without a scratch large enough (a quantized head), through dequant_gemm
/// 64 rows at a time.
#[test]
fn quantized_products_take_any_row_count() {
    let (mut gpu, rng) = (gpu(), Rng::new());
    let (k, n) = (256, 97);
    let q = Quantization::Int4 { group: 64 };
    let (w, weights) = quantized(&gpu, &rng.values(n * k, 0.05), [n, k], q);
    let w = DeviceMatrix::Quantized(w);
    let mut scratch = poisoned_bf16(&gpu, n * k);
    for m in [64, 65, 150] {
        let x = rng.bf16_values(m * k, 1.0);
        let x_dev = upload(&gpu, &to_bf16(&x));
        let product = ops::linear(&x, &weights, m, k, n);
        for with_scratch in [true, false] {
            let mut y = poisoned_f32(&gpu, m * n);
            let scratch = with_scratch.then_some(&mut scratch);
            w.product(
                &mut gpu,
                scratch,
                &mut y.as_view_mut(),
                &x_dev.as_view(),
                false,
            )
            .unwrap();
            let err = rel_err(&download(&gpu, &y), &product);
            assert!(
                err < F32,
                "{m} rows, scratch {with_scratch}: relative error {err}"
            );
        }
    }
}

/// The prefill path's matrix for cuBLASLt: bit for bit the rounded weights.
#[test]
fn dequantize_writes_the_rounded_weights() {
    let (gpu, rng) = (gpu(), Rng::new());
    for q in QUANTIZATIONS {
        let (rows, cols) = (67, 384);
        let (w, weights) = quantized(&gpu, &rng.values(rows * cols, 0.05), [rows, cols], q);
        let mut out = poisoned_bf16(&gpu, rows * cols);
        gpu.kernels
            .dequantize(&gpu.stream, &w, &mut out.as_view_mut())
            .unwrap();
        let got = to_f32(&download(&gpu, &out));
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != weights[i].to_bits()) {
            panic!("{q:?}: weight {i} is {}, want {}", got[i], weights[i]);
        }
    }
}

/// What the kernels cannot take is refused on the host with the reason.
#[test]
fn dequant_gemm_refuses_what_it_cannot_take() {
    let (gpu, rng) = (gpu(), Rng::new());
    let (w, _) = quantized(
        &gpu,
        &rng.values(16 * 64, 1.0),
        [16, 64],
        Quantization::Int8,
    );
    let x = upload(&gpu, &vec![bf16::ZERO; 65 * 64 + 8]);
    let mut y = poisoned_f32(&gpu, 65 * 16);
    let mut run = |rows: usize, offset: usize| {
        gpu.kernels
            .dequant_gemm(
                &gpu.stream,
                &mut y.slice_mut(..rows * 16),
                &x.slice(offset..offset + rows * 64),
                &w,
                false,
            )
            .unwrap_err()
            .to_string()
    };
    let err = run(65, 0);
    assert!(err.contains("65 rows of x, more than the 64"), "{err}");
    let err = run(1, 4);
    assert!(err.contains("not on a 16-byte boundary"), "{err}");
    let err = QuantizedMatrix::new(
        "blk.0.down",
        Quantization::Int8.encoding(),
        [2, 72],
        upload(&gpu, &[0u8; 144]),
        upload(&gpu, &[1.0f32; 2]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("blk.0.down") && err.contains("multiple of 16 inputs"),
        "{err}"
    );
}

/// A `CudaBackend` on the test device.
fn cuda_backend(model: &Model) -> CudaBackend {
    CudaBackend::on(gpu(), model).unwrap()
}

// ---------------------------------------------------------------------------
// A real-width model: LLaDA-8B's attention width with Dream's GQA and biases.

/// d_model 4096 as 32 heads of 128 over 8 key/value heads, 2 layers, random
/// bf16 weights of variance 1/fan_in (activations keep unit scale, logits are
/// about N(0, 1)). The FFN and vocabulary are small: they add nothing the
/// kernels have not already seen, only emulation time.
fn real_width_model() -> Model {
    let config = ModelConfig {
        d_model: 4096,
        n_layers: 2,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        ffn_hidden: 1024,
        vocab_size: 512,
        mask_id: Some(510),
        eos_id: Some(511),
        ..synthetic::preset("dream-7b").unwrap()
    };
    synthetic::model(config, 0x5EED_4096)
}

/// The real-width model's logits through the CUDA backend stay within this
/// fraction of each row's largest logit of the rounding reference's. Both
/// round to bf16 at the same points, so they start apart only by f32
/// summation order and the last bit of exp and sin/cos (~1e-7 relative). But
/// a value within that much of a bf16 rounding boundary rounds one bf16 step
/// (2⁻⁸) differently on the two, and a relative difference δ ahead of a
/// rounding point flips a fraction δ/2⁻⁸ of its values: δ becomes √(δ·2⁻⁸)
/// behind it (measured in one layer: 4e-5 in the residual, 3e-4 after the
/// FFN norm, 1e-3 after the SiLU gate). So the difference grows at each
/// rounding point until it reaches the bf16 noise of the model itself, the
/// distance between the float32 reference and the rounding one: 7.4e-3 to
/// 9.6e-3 of a row's scale on these passes. Two computations that each carry
/// that noise independently are at most √2 times as far apart: 1.4e-2,
/// hence 1.5e-2. Measured here under emulation (whose GEMMs sum in the CPU
/// reference's order): at most 5.5e-3 (the 672-token forward); a GPU, whose
/// GEMMs sum in another order, reaches the saturated noise sooner.
const REAL_WIDTH_LOGITS: f32 = 1.5e-2;

/// Both backends run one pass; the CUDA logits of its rows must match the
/// rounding reference's, and the argmax too wherever the reference's top two
/// logits are further apart than the error can move them (most rows: the
/// logits are about N(0, 1), their top two 0.3 apart on average).
fn check_pass(cuda: &mut CudaBackend, reference: &mut CpuBackend, pass: &ForwardPass, what: &str) {
    let vocab = 512;
    let want = reference.logits_of(pass).unwrap();
    let got = cuda.logits_of(pass).unwrap();
    let (err, row) = logits_error(&got, &want, vocab);
    eprintln!("{what}: logits within {err:.2e} of their scale (worst row {row})");
    assert!(
        err < REAL_WIDTH_LOGITS,
        "{what}: row {row} off by {err} of its scale"
    );
    let mut clear = 0;
    for (r, (g, w)) in got
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .enumerate()
    {
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * REAL_WIDTH_LOGITS * scale {
            clear += 1;
            let argmax = |v: &[f32]| TokenStats::from_logits(v).token;
            assert_eq!(argmax(g), argmax(w), "{what}: argmax of row {r}");
        }
    }
    let rows = pass.rows.len();
    assert!(
        2 * clear >= rows,
        "{what}: only {clear} of {rows} rows have a clear argmax"
    );
}

/// Three requests on one backend: a short one, a long one that grows the
/// cache (a prompt of 608 and a 32-token block, 32 positions after it), and a
/// short one again that reuses the grown buffers. The long request runs the
/// full forward, then the write patterns of the cached steps: DualCache (the
/// block alone: 32 × 4096 × 4096 GEMMs accumulating into the residual), the
/// prefix cache (the block and what follows), and a pruned suffix (the block
/// and the last position only, at non-contiguous positions). Its cached steps
/// attend over 672 slots with 32 heads, split three ways and combined.
#[test]
fn a_real_width_model_matches_the_rounding_reference() {
    let model = real_width_model();
    let (mut cuda, mut reference) = (
        cuda_backend(&model),
        CpuBackend::with_rounding(&model, Rounding::Device).unwrap(),
    );
    let mask = model.config.mask_id.unwrap();

    for (request, len) in [("short", 96), ("long", 672), ("short again", 64)] {
        cuda.prepare(len).unwrap();
        reference.prepare(len).unwrap();
        let prompt_len = len - 64;
        let mut tokens = synthetic::random_prompt(prompt_len, &model.config, len as u64);
        tokens.resize(len, mask);
        let positions: Vec<u32> = (0..len as u32).collect();
        check_pass(
            &mut cuda,
            &mut reference,
            &ForwardPass {
                tokens: &tokens,
                positions: &positions,
                write_slot: 0,
                attend_len: len,
                rows: 0..len,
                pages: SINGLE_PAGE,
            },
            &format!("{request}: full forward over {len}"),
        );
        // The block is the 32 positions after the prompt; commit some of it.
        let block = prompt_len..prompt_len + 32;
        for p in block.clone().step_by(3) {
            tokens[p] = (p * 37 % 500) as u32;
        }
        check_pass(
            &mut cuda,
            &mut reference,
            &ForwardPass {
                tokens: &tokens[block.clone()],
                positions: &positions[block.clone()],
                write_slot: block.start,
                attend_len: len,
                rows: 0..32,
                pages: SINGLE_PAGE,
            },
            &format!("{request}: DualCache step"),
        );
        if request != "long" {
            continue;
        }
        for p in block.clone().step_by(5) {
            tokens[p] = (p * 11 % 500) as u32;
        }
        check_pass(
            &mut cuda,
            &mut reference,
            &ForwardPass {
                tokens: &tokens[block.start..],
                positions: &positions[block.start..],
                write_slot: block.start,
                attend_len: len,
                rows: 0..64,
                pages: SINGLE_PAGE,
            },
            "long: prefix-cache step",
        );
        // Kept: the prefix, the block and the last position, in slots
        // 0 .. block.end + 1.
        let kept: Vec<u32> = (block.clone()).chain([len - 1]).map(|p| p as u32).collect();
        let kept_tokens: Vec<u32> = kept.iter().map(|&p| tokens[p as usize]).collect();
        check_pass(
            &mut cuda,
            &mut reference,
            &ForwardPass {
                tokens: &kept_tokens,
                positions: &kept,
                write_slot: block.start,
                attend_len: block.end + 1,
                rows: 0..33,
                pages: SINGLE_PAGE,
            },
            "long: pruned-suffix step",
        );
    }
}

// ---------------------------------------------------------------------------
// tiny-arith: the trained model of models/, decoded as `dllm eval` does.

fn tiny_arith() -> Model {
    Model::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-arith")).unwrap()
}

/// `dllm eval`'s defaults: 64 tokens in blocks of 32, one step per token.
fn eval_options(cache: CacheMode, threshold: Option<f64>) -> DecodeOptions {
    DecodeOptions {
        gen_length: 64,
        block_length: 32,
        steps: 64,
        cache,
        threshold,
        ..DecodeOptions::default()
    }
}

/// The first `per_task` examples of each task of tiny-arith's eval.jsonl, as
/// (prompt, answer).
fn eval_examples(per_task: usize) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-arith/eval.jsonl");
    let mut taken: Vec<(String, usize)> = Vec::new();
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let task = v["task"].as_str().unwrap().to_string();
        let count = match taken.iter_mut().find(|(t, _)| *t == task) {
            Some((_, n)) => n,
            None => {
                taken.push((task, 0));
                &mut taken.last_mut().unwrap().1
            }
        };
        if *count < per_task {
            *count += 1;
            let field = |k: &str| v[k].as_str().unwrap().to_string();
            out.push((field("prompt"), field("answer")));
        }
    }
    out
}

/// tiny-arith's logits through the CUDA backend stay within this much
/// (absolute; its logits reach 19) of the rounding reference's. Measured
/// under emulation: at most 0.058 over every step of the decodes below, 0.045
/// over full forwards of all 200 eval prompts (median 0.014 a pass). The
/// emulation sums GEMMs in the CPU's order, so its first rounding flips come
/// after the first attention, with δ ~4e-5 behind them; a GPU sums GEMMs in
/// another order, so flips start one rounding point earlier, at the keys and
/// values, with δ ~1e-6 ahead and √(δ·2⁻⁸) ≈ 6e-5 behind: about as far
/// apart, one rounding point sooner (see REAL_WIDTH_LOGITS). 0.15 leaves 2.6
/// times the measured worst for that, and is still a third of the model's own
/// bf16 noise, the float32 reference's distance from the rounding one (up to
/// 0.44 on the same prompts).
const TINY_ARITH_LOGITS: f64 = 0.15;

/// A backend that runs every pass on the CUDA backend and on the rounding
/// reference and answers with the CUDA backend's statistics, so the decode is
/// the CUDA backend's own, while every row of every step is checked against
/// the reference on the very same inputs. With logits within ε of the
/// reference's, ln p of every token moves by at most 2ε, so with
/// g = e^{2ε} − 1: p by at most g·p, the margin p₁ − p₂ by at most
/// g·(p₁ + p₂), Σ p ln p by at most g·ln(vocab) + 2ε(1 + g) (plus the
/// reference's 1e-10 term, vocab · 1e-10). The argmax can change only where
/// the reference's top two logits lie within 2ε, that is where its margin
/// p₁(1 − e^{−gap}) is below 1 − e^{−2ε}.
struct Lockstep {
    cuda: CudaBackend,
    reference: CpuBackend,
    vocab: usize,
    rows_checked: usize,
    failures: Vec<String>,
}

impl Lockstep {
    fn new(model: &Model) -> Lockstep {
        Lockstep {
            cuda: cuda_backend(model),
            reference: CpuBackend::with_rounding(model, Rounding::Device).unwrap(),
            vocab: model.config.vocab_size,
            rows_checked: 0,
            failures: Vec::new(),
        }
    }

    fn check(&mut self, pass: &ForwardPass, got: &TokenStats, want: &TokenStats, row: usize) {
        self.rows_checked += 1;
        let eps = TINY_ARITH_LOGITS;
        let grow = (2.0 * eps).exp_m1();
        let second = want.prob - want.margin;
        let vocab = self.vocab as f64;
        let entropy = grow * vocab.ln() + 2.0 * eps * (1.0 + grow) + vocab * 1e-10;
        let within = |a: f64, b: f64, bound: f64| (a - b).abs() <= bound;
        let ok = if got.token == want.token {
            within(got.prob, want.prob, grow * want.prob)
                && within(got.margin, want.margin, grow * (want.prob + second))
                && within(got.neg_entropy, want.neg_entropy, entropy)
        } else {
            want.margin <= -(-2.0 * eps).exp_m1()
        };
        if !ok {
            self.failures.push(format!(
                "pass writing slots from {} ({} tokens) row {row}: cuda {got:?}, reference {want:?}",
                pass.write_slot,
                pass.tokens.len()
            ));
        }
    }
}

impl Backend for Lockstep {
    fn device_name(&self) -> String {
        format!(
            "{} in lockstep with {}",
            self.cuda.device_name(),
            self.reference.device_name()
        )
    }

    fn cache_slot_bytes(&self) -> usize {
        self.cuda.cache_slot_bytes()
    }

    fn cache_budget(&self) -> dllm::Result<usize> {
        self.cuda.cache_budget()
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> dllm::Result<()> {
        self.reference.allocate_cache(layout)?;
        self.cuda.allocate_cache(layout)
    }

    fn expect(&mut self, shapes: &PassShapes) -> dllm::Result<()> {
        self.reference.expect(shapes)?;
        self.cuda.expect(shapes)
    }

    fn logits(&mut self, _: &[ForwardPass]) -> dllm::Result<Vec<Vec<f32>>> {
        unreachable!("the decode loop asks for token statistics only")
    }

    fn token_stats(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<TokenStats>>> {
        let got = self.cuda.token_stats(passes)?;
        let want = self.reference.token_stats(passes)?;
        for (pass, (got, want)) in passes.iter().zip(got.iter().zip(&want)) {
            for (row, (g, w)) in got.iter().zip(want).enumerate() {
                self.check(pass, g, w, row);
            }
        }
        Ok(got)
    }
}

/// Decodes each example with `model` and `options` on the CPU backend and through the
/// CUDA backend (in lockstep with the rounding reference); the texts must be
/// the same, and every step's statistics within the lockstep's bounds.
/// Returns how many answers were right.
fn decode_as_the_cpu_backend_does(
    model: &Model,
    examples: &[(String, String)],
    name: &str,
    options: &DecodeOptions,
) -> usize {
    let tokenizer = model.tokenizer.clone().unwrap();
    let mut cpu = CpuBackend::new(model).unwrap();
    let mut both = Lockstep::new(model);
    let mut correct = 0;
    for (prompt, answer) in examples {
        let ids = tokenizer.encode(prompt).unwrap();
        let text = |backend: &mut dyn Backend| {
            let out =
                dllm::decode::generate(backend, &model.config, &ids, options, &mut |_| {}).unwrap();
            tokenizer.decode(&out.tokens, true).unwrap()
        };
        let want = text(&mut cpu);
        let got = text(&mut both);
        assert_eq!(got, want, "{name}: {prompt:?} through CUDA");
        correct += usize::from(want == *answer);
    }
    assert!(
        both.failures.is_empty(),
        "{name}: {} of {} rows outside the bounds:\n{}",
        both.failures.len(),
        both.rows_checked,
        both.failures[..both.failures.len().min(20)].join("\n")
    );
    eprintln!("{name}: {} rows checked", both.rows_checked);
    correct
}

/// `dllm eval`'s parallel strategies, without a cache and with DualCache, on
/// two examples of each task: the same answers, so the same accuracy, as on
/// the CPU backend.
#[test]
fn tiny_arith_eval_accuracy_through_cuda_is_the_cpu_backends() {
    let (model, examples) = (tiny_arith(), eval_examples(2));
    for (name, options) in [
        ("threshold-0.9", eval_options(CacheMode::None, Some(0.9))),
        (
            "dual+threshold-0.9",
            eval_options(CacheMode::Dual, Some(0.9)),
        ),
    ] {
        let correct = decode_as_the_cpu_backend_does(&model, &examples, name, &options);
        eprintln!("{name}: {correct}/{} exact", examples.len());
        // The model is 96% exact on its set: a decode that got most of these
        // wrong on both backends would compare little.
        assert!(
            correct * 10 >= examples.len() * 8,
            "{name}: {correct}/{}",
            examples.len()
        );
    }
}

/// One token a step, without a cache and with the prefix cache, on one
/// example of each task. 64 forwards a request: the emulated device takes
/// about 17 s a request without a cache.
#[test]
fn tiny_arith_baseline_decodes_as_on_the_cpu_backend() {
    let options = eval_options(CacheMode::None, None);
    decode_as_the_cpu_backend_does(&tiny_arith(), &eval_examples(1), "baseline", &options);
}

#[test]
fn tiny_arith_prefix_cache_decodes_as_on_the_cpu_backend() {
    let options = eval_options(CacheMode::Prefix, None);
    decode_as_the_cpu_backend_does(&tiny_arith(), &eval_examples(1), "prefix", &options);
}

/// Streaming-dLLM: the prefix cache with a pruned suffix (non-contiguous
/// positions in the cache), threshold and early exit, on every task.
#[test]
fn tiny_arith_streaming_decodes_as_on_the_cpu_backend() {
    let options = DecodeOptions {
        suffix_window: Some(16),
        suffix_tail: 1,
        early_exit: true,
        ..eval_options(CacheMode::Prefix, Some(0.9))
    };
    decode_as_the_cpu_backend_does(&tiny_arith(), &eval_examples(1), "streaming-w16", &options);
}

/// tiny-arith quantized at load, as `--weights int8` and `--weights int4`
/// do. The CUDA backend keeps the quantized bytes (fewer device bytes than
/// bf16), multiplies a decode step's rows with dequant_gemm and a first
/// forward's (prompt and masked block, more than 64 rows) through the
/// dequantized scratch and cuBLASLt, and must decode as the CPU backend does
/// with the same weights, every step within the lockstep's bounds of the
/// rounding reference (which rounds the dequantized weights to bf16 as both
/// device paths do).
#[test]
fn tiny_arith_quantized_decodes_as_on_the_cpu_backend() {
    let bf16_bytes = CudaBackend::weight_bytes(&tiny_arith()).unwrap();
    for q in [Quantization::Int8, Quantization::Int4 { group: 32 }] {
        let model = convert(tiny_arith(), WeightFormat::Quantized(q)).unwrap();
        let bytes = CudaBackend::weight_bytes(&model).unwrap();
        assert!(
            bytes < bf16_bytes,
            "{q:?}: {bytes} device bytes, bf16 {bf16_bytes}"
        );
        let options = eval_options(CacheMode::Dual, Some(0.9));
        decode_as_the_cpu_backend_does(&model, &eval_examples(1), &q.name(), &options);
    }
}

/// int8 rows the kernels cannot read in 16-byte segments (here the down
/// projection's 72 inputs, LLaDA's `ff_out`) are refused at upload, naming the matrix; the CPU
/// backend runs the same model.
#[test]
fn a_quantized_shape_the_kernels_cannot_take_is_a_clear_error() {
    let config = ModelConfig {
        d_model: 64,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 32,
        ffn_hidden: 72,
        vocab_size: 64,
        mask_id: Some(62),
        eos_id: Some(63),
        ..synthetic::preset("llada-8b").unwrap()
    };
    let model = synthetic::model_in(config, 7, WeightFormat::Quantized(Quantization::Int8));
    assert!(CpuBackend::new(&model).is_ok());
    let err = CudaBackend::on(gpu(), &model).err().unwrap().to_string();
    assert!(
        err.contains("blocks.0.ff_out.weight") && err.contains("multiple of 16 inputs"),
        "{err}"
    );
}

#[test]
fn a_cache_larger_than_the_gpu_is_a_clear_error() {
    let model = Model::open(&golden_dir("llada_tiny_s1").join("bf16")).unwrap();
    let mut gpu = cuda_backend(&model);
    let err = gpu.prepare(1 << 36).unwrap_err().to_string();
    assert!(
        err.contains("out of device memory") && err.contains("GiB is free"),
        "{err}"
    );
    // The backend still works after refusing.
    gpu.prepare(8).unwrap();
    let rows: Range<usize> = 0..2;
    let pass = ForwardPass {
        tokens: &[1, 2],
        positions: &[0, 1],
        write_slot: 0,
        attend_len: 2,
        rows,
        pages: SINGLE_PAGE,
    };
    assert_eq!(gpu.token_stats_of(&pass).unwrap().len(), 2);
}
