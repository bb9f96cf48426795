//! The CUDA backend against the CPU reference (DESIGN §5). Needs a GPU: every
//! test here is `#[ignore]`d, so a machine without one reports them ignored,
//! never passed. Run them with `scripts/gpu-check.sh` (or
//! `cargo test --test cuda -- --include-ignored`).
//!
//! Each kernel runs on fresh random inputs (the seed is printed) with its
//! output poisoned with NaN beforehand, and is compared with the float32
//! reference of `dllm::cpu::ops` by ‖got − want‖ / ‖want‖. Bounds, set from
//! the arithmetic and never widened to pass:
//! - a value the kernel stores as bf16 is the f32 result rounded to nearest,
//!   off by at most 2⁻⁹ relative: BF16 = 4e-3;
//! - f32 results that differ from the reference only in summation order or
//!   the last bit of exp/sin/cos: F32 = 1e-4.

mod common;

use std::cell::Cell;
use std::ops::Range;

use common::{cases, golden_dir, ids, options_for, prompts};
use dllm::backend::{Backend, ForwardPass, TokenStats};
use dllm::cpu::ops::{self, AttentionShape, Rope};
use dllm::cpu::CpuBackend;
use dllm::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use dllm::cuda::{inv_freq, AttentionScratch, CudaBackend, Gpu, Heads, RowStats};
use dllm::Model;
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

fn gpu() -> Gpu {
    Gpu::new().expect("a CUDA GPU and a build with kernels")
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
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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
        let (n, slots, theta) = (40, 300, 1e6f32);
        let (q_dim, kv_dim, width) = (heads.q_dim(), heads.kv_dim(), heads.qkv_dim());
        let write_slot = rng.below(slots - n + 1);
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
        gpu.kernels
            .kv_update(
                &gpu.stream,
                &mut qkv_dev.as_view_mut(),
                with_bias.then_some(&bias_view),
                &upload(&gpu, &positions).as_view(),
                &upload(&gpu, &inv_freq(heads.head_dim, theta)).as_view(),
                &mut k_dev.as_view_mut(),
                &mut v_dev.as_view_mut(),
                write_slot,
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
        let rope = Rope::new(&positions, heads.head_dim, theta);
        rope.apply(&mut q, heads.heads);
        rope.apply(&mut k, heads.kv_heads);

        let got_qkv = download(&gpu, &qkv_dev);
        let got_q: Vec<f32> = got_qkv
            .chunks_exact(width)
            .flat_map(|r| r[..q_dim].to_vec())
            .collect();
        let err = rel_err(&got_q, &q);
        assert!(err < F32, "{heads:?}: q relative error {err}");

        let written = write_slot * kv_dim..(write_slot + n) * kv_dim;
        for (name, got, before, want) in [
            ("k", download(&gpu, &k_dev), &k_before, &k),
            ("v", download(&gpu, &v_dev), &v_before, &v),
        ] {
            let err = rel_err(&to_f32(&got[written.clone()]), want);
            assert!(err < BF16, "{heads:?}: {name} relative error {err}");
            // A DualCache step overwrites its block's slots and nothing else.
            assert_eq!(
                got[..written.start],
                before[..written.start],
                "{name} before the slots"
            );
            assert_eq!(
                got[written.end..],
                before[written.end..],
                "{name} after the slots"
            );
        }
    }
}

/// Attention of `n` queries over `attend_len` of `slots` cache slots, whose
/// unused slots hold NaN so that any read past `attend_len` shows.
fn check_attention(gpu: &Gpu, rng: &Rng, heads: Heads, n: usize, attend_len: usize) {
    let slots = attend_len + 70;
    let (q_dim, kv_dim, width) = (heads.q_dim(), heads.kv_dim(), heads.qkv_dim());
    let qkv = rng.values(n * width, 1.5);
    let fill = |len| {
        let mut cache = rng.bf16_values(slots * kv_dim, 1.5);
        cache[len * kv_dim..].fill(f32::NAN);
        cache
    };
    let (k_cache, v_cache) = (fill(attend_len), fill(attend_len));
    let mut out = poisoned_bf16(gpu, n * q_dim);
    let mut scratch = AttentionScratch::new(&gpu.stream, gpu.kernels.sms, heads.head_dim).unwrap();
    let (k_dev, v_dev) = (
        upload(gpu, &to_bf16(&k_cache)),
        upload(gpu, &to_bf16(&v_cache)),
    );
    gpu.kernels
        .attention(
            &gpu.stream,
            &upload(gpu, &qkv).as_view(),
            &k_dev.as_view(),
            &v_dev.as_view(),
            &mut out.as_view_mut(),
            &mut scratch,
            attend_len,
            heads,
        )
        .unwrap();
    let q: Vec<f32> = qkv
        .chunks_exact(width)
        .flat_map(|r| r[..q_dim].to_vec())
        .collect();
    let shape = AttentionShape {
        heads: heads.heads,
        kv_heads: heads.kv_heads,
        head_dim: heads.head_dim,
    };
    let want = ops::attention(&q, &k_cache, &v_cache, attend_len, &shape);
    let err = rel_err(&to_f32(&download(gpu, &out)), &want);
    assert!(
        err < BF16,
        "{heads:?}, {n} queries over {attend_len} slots: relative error {err}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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
        // (queries, slots): a cached step (split keys), a partial last tile and
        // query block, one query over one slot, and a full forward.
        for (n, attend_len) in [(32, 2048), (45, 301), (1, 1), (300, 300)] {
            check_attention(&gpu, &rng, heads, n, attend_len);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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
        let mut stats = upload(
            &gpu,
            &vec![
                RowStats {
                    token: u32::MAX,
                    prob: f32::NAN,
                    neg_entropy: f32::NAN,
                    margin: f32::NAN
                };
                rows
            ],
        );
        gpu.kernels
            .confidence(
                &gpu.stream,
                &upload(&gpu, &logits).as_view(),
                &mut stats.as_view_mut(),
                vocab,
            )
            .unwrap();
        for (r, (got, row)) in download(&gpu, &stats)
            .into_iter()
            .zip(logits.chunks_exact(vocab))
            .enumerate()
        {
            let want = TokenStats::from_logits(row);
            let got = TokenStats::from(got);
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

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
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

/// End to end, activations are rounded to bf16 before every GEMM and the
/// cache is bf16: logits stay within 2% of their largest magnitude.
const LOGITS: f32 = 2e-2;

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
fn forward_logits_agree_with_the_cpu_backend() {
    for name in ["llada_tiny_s1", "dream_tiny_s1"] {
        let model = Model::open(&golden_dir(name).join("bf16")).unwrap();
        let (mut cpu, mut gpu) = (
            CpuBackend::new(&model).unwrap(),
            CudaBackend::new(&model).unwrap(),
        );
        let vocab = model.config.vocab_size;
        let golden = cases(name);
        for forward in golden["forward"].as_array().unwrap() {
            let full = ids(&forward["input_ids"]);
            let mut inputs = vec![(full.clone(), (0..full.len() as u32).collect::<Vec<_>>())];
            if let Some(pruned) = forward.get("pruned_input_ids") {
                inputs.push((ids(pruned), ids(&forward["pruned_position_ids"])));
            }
            for (tokens, positions) in inputs {
                let pass = ForwardPass {
                    tokens: &tokens,
                    positions: &positions,
                    write_slot: 0,
                    attend_len: tokens.len(),
                    rows: 0..tokens.len(),
                };
                cpu.prepare(tokens.len()).unwrap();
                gpu.prepare(tokens.len()).unwrap();
                let want = cpu.logits(&pass).unwrap();
                let got = gpu.logits(&pass).unwrap();
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                    / scale;
                assert!(err < LOGITS, "{name}: logits off by {err} of their scale");
                // Where the reference's top two logits are further apart than
                // the error can move them, the argmax must agree.
                for (r, (g, w)) in got
                    .chunks_exact(vocab)
                    .zip(want.chunks_exact(vocab))
                    .enumerate()
                {
                    let mut sorted = w.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    if sorted[0] - sorted[1] > 2.0 * LOGITS * scale {
                        let argmax = |v: &[f32]| TokenStats::from_logits(v).token;
                        assert_eq!(argmax(g), argmax(w), "{name} row {r}");
                    }
                }
            }
        }
    }
}

/// Probabilities move by at most this much under the bf16 rounding above, so
/// a margin (a difference of two) by at most twice as much, and a decision
/// whose top-1/top-2 margin exceeds that cannot flip.
const PROB: f64 = 2e-2;

/// A backend that runs every pass on both devices and returns the CPU's
/// answer, so decoding follows the reference exactly (no divergence after a
/// near-tie) while every step's GPU statistics are checked against it.
struct Lockstep {
    cpu: CpuBackend,
    gpu: CudaBackend,
    rows_checked: usize,
    failures: Vec<String>,
}

impl Backend for Lockstep {
    fn device_name(&self) -> String {
        format!(
            "{} in lockstep with {}",
            self.gpu.device_name(),
            self.cpu.device_name()
        )
    }

    fn prepare(&mut self, slots: usize) -> dllm::Result<()> {
        self.cpu.prepare(slots)?;
        self.gpu.prepare(slots)
    }

    fn logits(&mut self, pass: &ForwardPass) -> dllm::Result<Vec<f32>> {
        self.gpu.logits(pass)?;
        self.cpu.logits(pass)
    }

    fn token_stats(&mut self, pass: &ForwardPass) -> dllm::Result<Vec<TokenStats>> {
        let got = self.gpu.token_stats(pass)?;
        let want = self.cpu.token_stats(pass)?;
        for (row, (g, w)) in got.iter().zip(&want).enumerate() {
            self.rows_checked += 1;
            let token_ok = g.token == w.token || w.margin <= 2.0 * PROB;
            let within = |a: f64, b: f64, bound: f64| (a - b).abs() <= bound;
            // The entropy weighs each probability's move by |ln p|, at most
            // ln(vocab) on average: that much more room.
            let ok = token_ok
                && within(g.prob, w.prob, PROB)
                && within(g.margin, w.margin, 2.0 * PROB)
                && within(g.neg_entropy, w.neg_entropy, PROB * 512f64.ln());
            if !ok {
                self.failures.push(format!(
                    "pass at slot {} row {row}: gpu {g:?}, cpu {w:?}",
                    pass.write_slot
                ));
            }
        }
        Ok(want)
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
fn every_golden_strategy_decodes_in_lockstep_with_the_cpu_backend() {
    for name in ["llada_tiny_s1", "dream_tiny_s1"] {
        let model = Model::open(&golden_dir(name).join("bf16")).unwrap();
        assert_eq!(
            model.config.vocab_size, 512,
            "PROB's entropy room assumes the golden vocabulary"
        );
        let mut both = Lockstep {
            cpu: CpuBackend::new(&model).unwrap(),
            gpu: CudaBackend::new(&model).unwrap(),
            rows_checked: 0,
            failures: Vec::new(),
        };
        let golden = cases(name);
        let prompts = prompts(&golden);
        for case in golden["cases"].as_array().unwrap() {
            let prompt = &prompts[case["prompt"].as_u64().unwrap() as usize];
            dllm::decode::generate(
                &mut both,
                &model.config,
                prompt,
                &options_for(case),
                &mut |_| {},
            )
            .unwrap();
        }
        assert!(
            both.rows_checked > 1000,
            "{name}: only {} rows checked",
            both.rows_checked
        );
        assert!(
            both.failures.is_empty(),
            "{name}: {} of {} rows disagree:\n{}",
            both.failures.len(),
            both.rows_checked,
            both.failures[..both.failures.len().min(20)].join("\n")
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh"]
fn a_cache_larger_than_the_gpu_is_a_clear_error() {
    let model = Model::open(&golden_dir("llada_tiny_s1").join("bf16")).unwrap();
    let mut gpu = CudaBackend::new(&model).unwrap();
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
    };
    assert_eq!(gpu.token_stats(&pass).unwrap().len(), 2);
}
