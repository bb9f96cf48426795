//! Batch invariance on the CUDA backend (on the emulated device where there
//! is no GPU): requests decoded together by an [`Engine`] give exactly the
//! tokens and NFE each gives alone.
//!
//! Bit for bit, because a row's arithmetic does not depend on the batch:
//! embedding, norms, RoPE, SiLU and the confidence kernel are per row;
//! attention is per sequence, split as the sequence alone would be; and the
//! emulated cuBLASLt sums each output in an order fixed by the weights'
//! shape. On a GPU, cuBLASLt may choose another algorithm for another row
//! count (docs/cuda.md, "A batch"), so this holds there only where the
//! chosen algorithms keep a row's summation order.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::watched::{Tap, Watched};
use dllm::backend::{Backend, CacheLayout, ForwardPass};
use dllm::cuda::{CudaBackend, Driver, Gpu};
use dllm::{CacheMode, DecodeOptions, Engine, EngineOptions, Event, Model};

/// What the engine's batches looked like.
#[derive(Debug, Default)]
struct Seen {
    most_passes: usize,
    /// Some sequence's pages are not consecutive in the pool.
    scattered_pages: bool,
}

fn tiny_arith() -> Model {
    Model::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-arith")).unwrap()
}

fn cuda(model: &Model) -> dllm::Result<CudaBackend> {
    CudaBackend::on(Gpu::open(Driver::for_tests()?)?, model)
}

/// 64 tokens in blocks of 32 (32 in one block for the short request).
fn options(gen_length: usize, steps: usize, cache: CacheMode) -> DecodeOptions {
    DecodeOptions {
        gen_length,
        block_length: 32,
        steps,
        cache,
        threshold: None,
        ..DecodeOptions::default()
    }
}

/// Five requests of different prompts, lengths and strategies. The first two
/// start together; the third and fourth arrive when the short first one is
/// done, while the second is mid-decode, and the third takes the first one's
/// pages and more, so its pages are not consecutive (its attention reads
/// across the gap: it has no cache, so every step attends over all its
/// slots); the fifth arrives once the second has completed its first block,
/// and may wait for pages.
#[test]
fn requests_decoded_together_are_decoded_as_alone() {
    let model = tiny_arith();
    let tokenizer = model.tokenizer.clone().unwrap();
    let prompt = |text: &str| tokenizer.encode(text).unwrap();
    let requests = [
        (
            prompt("rev 83920175="),
            DecodeOptions {
                threshold: Some(0.9),
                ..options(32, 32, CacheMode::Dual)
            },
        ),
        (
            prompt("add 0000004821+0000000937="),
            options(64, 32, CacheMode::Prefix),
        ),
        (
            prompt("sort 5093817264="),
            DecodeOptions {
                threshold: Some(0.9),
                ..options(64, 64, CacheMode::None)
            },
        ),
        (
            prompt("copy 4417093="),
            DecodeOptions {
                threshold: Some(0.9),
                suffix_window: Some(8),
                early_exit: true,
                ..options(64, 64, CacheMode::Prefix)
            },
        ),
        (
            prompt("add 2584346065+0000000002="),
            options(64, 16, CacheMode::Dual),
        ),
    ];

    let mut alone_backend = cuda(&model).unwrap();
    let alone: Vec<_> = requests
        .iter()
        .map(|(ids, o)| {
            dllm::decode::generate(&mut alone_backend, &model.config, ids, o, &mut |_| {}).unwrap()
        })
        .collect();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let factory = {
        let seen = seen.clone();
        Box::new(move |model: &Model| -> dllm::Result<Box<dyn Backend>> {
            let tap: Tap = Box::new(move |passes, _| {
                let mut seen = seen.lock().unwrap();
                seen.most_passes = seen.most_passes.max(passes.len());
                seen.scattered_pages |= passes
                    .iter()
                    .any(|p| p.pages.windows(2).any(|w| w[1] != w[0] + 1));
            });
            Ok(Box::new(Watched {
                backend: cuda(model)?,
                watcher: tap,
            }))
        })
    };
    // 20 pages of 16 slots: room for three or four of these requests.
    let engine = Engine::with_backend(
        tiny_arith(),
        factory,
        EngineOptions {
            max_batch: 8,
            cache_slots: Some(20 * 16),
        },
    )
    .unwrap();
    let submit = |i: usize| engine.submit(&requests[i].0, &requests[i].1).unwrap();
    let (first, mut second) = (submit(0), submit(1));
    let first = first.wait();
    let (third, fourth) = (submit(2), submit(3));
    let fifth = match second.next_event() {
        Event::Block { .. } => submit(4),
        Event::Done(result) => panic!("the second request ended before a block: {result:?}"),
        Event::Step { .. } => unreachable!("only a request that watches steps hears them"),
    };
    let results = [
        first,
        second.wait(),
        third.wait(),
        fourth.wait(),
        fifth.wait(),
    ];

    let seen = seen.lock().unwrap();
    assert!(seen.most_passes >= 3, "{seen:?}");
    assert!(seen.scattered_pages, "{seen:?}");
    for (i, (batched, alone)) in results.into_iter().zip(&alone).enumerate() {
        let batched = batched.unwrap();
        assert_eq!(batched.tokens, alone.tokens, "request {i}: tokens");
        assert_eq!(batched.nfe, alone.nfe, "request {i}: NFE");
    }
}

/// One batched forward of three full passes (210 rows, more than the
/// activations hold for one sequence alone, so they grow), each over pages
/// dealt in turn from the top of the pool, so none is consecutive: every
/// pass's logits are, bit for bit, what the pass gives alone, including a
/// pass that asks for no rows.
#[test]
fn a_batch_grows_the_activations_and_each_pass_gets_its_own_logits() {
    let model = tiny_arith();
    let mut cuda = cuda(&model).unwrap();
    let page_size = 16;
    cuda.allocate_cache(CacheLayout {
        pages: 24,
        page_size,
    })
    .unwrap();
    // One sequence's most rows, rounded up to a whole head chunk.
    let alone = cuda.batch_capacity();
    assert!((model.config.max_seq_len..210).contains(&alone), "{alone}");

    let mask = model.config.mask_id.unwrap();
    let (lens, rows): ([usize; 3], _) = ([80, 70, 60], [0..80, 33..40, 7..7]);
    let mut inputs = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        // A prompt of varied ids, then masks.
        let tokens: Vec<u32> = (0..len as u32)
            .map(|p| {
                if p < 30 {
                    (p * 7 + i as u32) % mask
                } else {
                    mask
                }
            })
            .collect();
        let positions: Vec<u32> = (0..len as u32).collect();
        let pages: Vec<u32> = (0..len.div_ceil(page_size))
            .map(|j| (23 - i - 3 * j) as u32)
            .collect();
        inputs.push((tokens, positions, pages));
    }
    let passes: Vec<ForwardPass> = inputs
        .iter()
        .zip(&rows)
        .map(|((tokens, positions, pages), rows)| ForwardPass {
            tokens,
            positions,
            write_slot: 0,
            attend_len: tokens.len(),
            rows: rows.clone(),
            pages,
        })
        .collect();

    let together = cuda.logits(&passes).unwrap();
    assert!(cuda.batch_capacity() >= 210, "{}", cuda.batch_capacity());
    let vocab = model.config.vocab_size;
    for (i, (pass, got)) in passes.iter().zip(&together).enumerate() {
        assert_eq!(got.len(), pass.rows.len() * vocab, "pass {i}");
        let alone = cuda.logits_of(pass).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(got) == bits(&alone), "pass {i}: batched logits differ");
    }
}
