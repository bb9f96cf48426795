//! Kernel benchmarks at LLaDA-8B's shapes (criterion), timed with CUDA events
//! around back-to-back launches, so neither launch nor host latency counts:
//! - attention: a DualCache step, a block of 32 or 64 queries over a cache of
//!   512/1024/2048 prefix slots plus the block; throughput in flop
//!   (criterion's "elements"), 4 · queries · slots · d_model each;
//! - confidence: 32 rows of 126464 logits; bytes read;
//! - kv_update: a block (32) and a full forward (1024); bytes moved;
//! - dequant_gemm: LLaDA-8B's o (4096 inputs) and down (12288) projections,
//!   int8 and 4-bit in groups of 128, at 1, 8, 32 and 64 rows; weight bytes
//!   read (values and scales), so its GB/s compares with the floor directly.
//!
//! Compare with the floors of DESIGN §4 measured on the same card (about
//! 3.0 TB/s on an H100). Without a GPU, or in a build without kernels, this
//! prints why it is skipped and exits 0.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use dllm::cuda::cudarc::driver::sys::CUevent_flags;
use dllm::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use dllm::cuda::{
    inv_freq, AttentionScratch, Gpu, Heads, QuantizedMatrix, RaggedAttention, RaggedDevice,
    RowStats, SequenceShape,
};
use dllm::quant::Quantization;
use half::bf16;

const LLADA: Heads = Heads {
    heads: 32,
    kv_heads: 32,
    head_dim: 128,
};
const VOCAB: usize = 126_464;

fn main() {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("kernel benchmarks skipped: {e}");
            return;
        }
    };
    println!("# {}", gpu.name().unwrap_or_default());
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    attention(&mut c, &gpu);
    confidence(&mut c, &gpu);
    kv_update(&mut c, &gpu);
    dequant_gemm(&mut c, &gpu);
    c.final_summary();
}

/// Device time of `iters` back-to-back runs of `launch`.
fn device_time(gpu: &Gpu, iters: u64, mut launch: impl FnMut()) -> Duration {
    let event = || {
        gpu.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap()
    };
    let (start, end) = (event(), event());
    start.record(&gpu.stream).unwrap();
    for _ in 0..iters {
        launch();
    }
    end.record(&gpu.stream).unwrap();
    Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
}

/// Deterministic, non-zero data: timing zeros can flatter a kernel.
fn pattern(len: usize, scale: f32) -> impl Iterator<Item = f32> {
    (0..len).map(move |i| (i as f32 * 0.618_034).sin() * scale)
}

fn device<T: DeviceRepr>(gpu: &Gpu, host: Vec<T>) -> CudaSlice<T> {
    gpu.stream.clone_htod(&host).unwrap()
}

fn attention(c: &mut Criterion, gpu: &Gpu) {
    let mut group = c.benchmark_group("attention (elements = flop)");
    let max_slots = 2048 + 64;
    let cache = |scale| {
        device(
            gpu,
            pattern(max_slots * LLADA.kv_dim(), scale)
                .map(bf16::from_f32)
                .collect(),
        )
    };
    let (keys, values) = (cache(1.0), cache(0.5));
    let rows = AttentionScratch::per_sequence(gpu.kernels.sms);
    let mut scratch = AttentionScratch::new(&gpu.stream, rows, LLADA.head_dim).unwrap();
    let mut ragged = RaggedDevice::new(&gpu.stream, 64, 1).unwrap();
    for block in [32, 64] {
        let qkv = device(gpu, pattern(block * LLADA.qkv_dim(), 1.0).collect());
        let mut out = gpu
            .stream
            .alloc_zeros::<bf16>(block * LLADA.q_dim())
            .unwrap();
        for prefix in [512, 1024, 2048] {
            let slots = prefix + block;
            group.throughput(Throughput::Elements(
                (4 * block * slots * LLADA.q_dim()) as u64,
            ));
            let id = BenchmarkId::new(format!("block {block}"), format!("prefix {prefix}"));
            // One sequence in one page, as a request alone has it.
            let sequence = SequenceShape {
                queries: block,
                attend_len: slots,
                pages: &[0],
            };
            let plan =
                RaggedAttention::new(&[sequence], max_slots, LLADA.heads, gpu.kernels.sms).unwrap();
            ragged.upload(&gpu.stream, &plan).unwrap();
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    device_time(gpu, iters, || {
                        gpu.kernels
                            .attention(
                                &gpu.stream,
                                &qkv.as_view(),
                                &keys.as_view(),
                                &values.as_view(),
                                &mut out.as_view_mut(),
                                &mut scratch,
                                &ragged,
                                LLADA,
                            )
                            .unwrap()
                    })
                })
            });
        }
    }
    group.finish();
}

fn confidence(c: &mut Criterion, gpu: &Gpu) {
    let rows = 32;
    let logits = device(gpu, pattern(rows * VOCAB, 6.0).collect());
    let mut stats = gpu.stream.alloc_zeros::<RowStats>(rows).unwrap();
    let mut group = c.benchmark_group("confidence");
    group.throughput(Throughput::BytesDecimal((rows * VOCAB * 4) as u64));
    group.bench_function(format!("{rows} x {VOCAB}"), |b| {
        b.iter_custom(|iters| {
            device_time(gpu, iters, || {
                gpu.kernels
                    .confidence(
                        &gpu.stream,
                        &logits.as_view(),
                        &mut stats.as_view_mut(),
                        VOCAB,
                    )
                    .unwrap()
            })
        })
    });
    group.finish();
}

fn kv_update(c: &mut Criterion, gpu: &Gpu) {
    let slots = 2048;
    let cache = || device(gpu, vec![bf16::ZERO; slots * LLADA.kv_dim()]);
    let (mut keys, mut values) = (cache(), cache());
    let inv_freq = device(gpu, inv_freq(LLADA.head_dim, 500_000.0));
    let mut group = c.benchmark_group("kv_update");
    for n in [32, 1024] {
        let mut qkv = device(gpu, pattern(n * LLADA.qkv_dim(), 1.0).collect());
        let positions = device(gpu, (0..n as u32).map(|p| p * 2).collect());
        let written = device(gpu, (0..n as u32).collect());
        // Read q|k|v, write q back and k, v as bf16.
        let bytes = n * (LLADA.qkv_dim() * 4 + LLADA.q_dim() * 4 + 2 * LLADA.kv_dim() * 2);
        group.throughput(Throughput::BytesDecimal(bytes as u64));
        group.bench_function(format!("{n} tokens"), |b| {
            b.iter_custom(|iters| {
                device_time(gpu, iters, || {
                    gpu.kernels
                        .kv_update(
                            &gpu.stream,
                            &mut qkv.as_view_mut(),
                            None,
                            None,
                            &positions.as_view(),
                            &written.as_view(),
                            &inv_freq.as_view(),
                            &mut keys.as_view_mut(),
                            &mut values.as_view_mut(),
                            LLADA,
                        )
                        .unwrap()
                })
            })
        });
    }
    group.finish();
}

fn dequant_gemm(c: &mut Criterion, gpu: &Gpu) {
    let mut group = c.benchmark_group("dequant_gemm (bytes = weights read)");
    let out = LLADA.q_dim();
    for (name, k) in [("o", LLADA.q_dim()), ("down", 12288)] {
        for q in [Quantization::Int8, Quantization::Int4 { group: 128 }] {
            let encoding = q.encoding();
            let (values, scales) = (out * encoding.row_bytes(k), out * encoding.row_scales(k));
            let w = QuantizedMatrix::new(
                name,
                encoding,
                [out, k],
                device(gpu, (0..values).map(|i| (i * 37 % 251) as u8).collect()),
                device(gpu, pattern(scales, 0.01).collect()),
            )
            .unwrap();
            group.throughput(Throughput::BytesDecimal((values + scales * 4) as u64));
            for rows in [1, 8, 32, 64] {
                let x = device(gpu, pattern(rows * k, 1.0).map(bf16::from_f32).collect());
                let mut y = gpu.stream.alloc_zeros::<f32>(rows * out).unwrap();
                let id = BenchmarkId::new(format!("{name} [{out}, {k}] {q:?}"), rows);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        device_time(gpu, iters, || {
                            gpu.kernels
                                .dequant_gemm(
                                    &gpu.stream,
                                    &mut y.as_view_mut(),
                                    &x.as_view(),
                                    &w,
                                    false,
                                )
                                .unwrap()
                        })
                    })
                });
            }
        }
    }
    group.finish();
}
