//! A step replayed from its CUDA graph computes exactly what the step's
//! launches compute one by one (on the emulated device where there is no GPU).

mod common;

use std::sync::{Arc, Mutex};

use common::watched::{Tap, Watched};
use dllm::backend::TokenStats;
use dllm::cuda::{CudaBackend, Driver, Gpu};
use dllm::{CacheMode, DecodeOptions, Model};

#[test]
fn replayed_steps_equal_eager_steps() {
    let model = Model::open("models/tiny-arith".as_ref()).unwrap();
    let gpu = Gpu::open(Driver::for_tests().unwrap()).unwrap();
    // Every step's statistics, in order.
    let recorded: Arc<Mutex<Vec<TokenStats>>> = Arc::default();
    let tap: Tap = {
        let recorded = recorded.clone();
        Box::new(move |_, stats| recorded.lock().unwrap().extend(stats.iter().flatten()))
    };
    let mut backend = Watched {
        backend: CudaBackend::on(gpu, &model).unwrap(),
        watcher: tap,
    };
    let prompt = model
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("add 0000004821+0000000937=")
        .unwrap();
    // Fixed schedules: every block's later steps repeat one geometry.
    let strategies = [
        (CacheMode::Prefix, None),
        (CacheMode::Dual, None),
        (CacheMode::Dual, Some(8)),
    ];
    let mut run = |graphs: bool| {
        backend.backend.set_graphs(graphs);
        recorded.lock().unwrap().clear();
        let before = backend.backend.graph_replays();
        let mut tokens = Vec::new();
        for (cache, suffix_window) in strategies {
            let options = DecodeOptions {
                gen_length: 64,
                block_length: 32,
                steps: 16,
                cache,
                threshold: None,
                suffix_window,
                ..DecodeOptions::default()
            };
            let out =
                dllm::decode::generate(&mut backend, &model.config, &prompt, &options, &mut |_| {})
                    .unwrap();
            tokens.push(out.tokens);
        }
        (
            tokens,
            recorded.lock().unwrap().clone(),
            backend.backend.graph_replays() - before,
        )
    };
    let (eager_tokens, eager_stats, eager_replays) = run(false);
    let (graph_tokens, graph_stats, replays) = run(true);
    assert_eq!(eager_replays, 0);
    // 3 strategies x 2 blocks x 8 steps: a block's full step and its first
    // cached step run eagerly, the second is captured and replayed, the
    // other five replay; more where a geometry recurs across blocks (a
    // DualCache request's cached steps write other slots of the same cache,
    // which is data, not geometry) or requests (the last block, whose suffix
    // is empty, looks alike in every strategy).
    assert!(replays >= 3 * 2 * 6, "{replays} steps replayed");
    assert_eq!(graph_tokens, eager_tokens);
    assert_eq!(graph_stats.len(), eager_stats.len());
    for (i, (g, e)) in graph_stats.iter().zip(&eager_stats).enumerate() {
        // Bit for bit: the same launches on the same buffers.
        assert_eq!(
            (
                g.token,
                g.prob.to_bits(),
                g.neg_entropy.to_bits(),
                g.margin.to_bits()
            ),
            (
                e.token,
                e.prob.to_bits(),
                e.neg_entropy.to_bits(),
                e.margin.to_bits()
            ),
            "row {i}"
        );
    }
}
