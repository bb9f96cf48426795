//! A step replayed from its CUDA graph computes exactly what the step's
//! launches compute one by one (on the emulated device where there is no GPU).

use dllm::backend::{Backend, CacheLayout, ForwardPass, PassShapes, TokenStats};
use dllm::cuda::{CudaBackend, Driver, Gpu};
use dllm::{CacheMode, DecodeOptions, Model};

/// Passes every call to the CUDA backend and keeps each step's statistics.
struct Recorded {
    cuda: CudaBackend,
    stats: Vec<TokenStats>,
}

impl Backend for Recorded {
    fn device_name(&self) -> String {
        self.cuda.device_name()
    }

    fn cache_slot_bytes(&self) -> usize {
        self.cuda.cache_slot_bytes()
    }

    fn cache_budget(&self) -> dllm::Result<usize> {
        self.cuda.cache_budget()
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> dllm::Result<()> {
        self.cuda.allocate_cache(layout)
    }

    fn expect(&mut self, shapes: &PassShapes) -> dllm::Result<()> {
        self.cuda.expect(shapes)
    }

    fn logits(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<f32>>> {
        self.cuda.logits(passes)
    }

    fn token_stats(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<TokenStats>>> {
        let stats = self.cuda.token_stats(passes)?;
        self.stats.extend(stats.iter().flatten().copied());
        Ok(stats)
    }
}

#[test]
fn replayed_steps_equal_eager_steps() {
    let model = Model::open("models/tiny-arith".as_ref()).unwrap();
    let gpu = Gpu::open(Driver::for_tests().unwrap()).unwrap();
    let mut backend = Recorded {
        cuda: CudaBackend::on(gpu, &model).unwrap(),
        stats: Vec::new(),
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
        backend.cuda.set_graphs(graphs);
        backend.stats.clear();
        let before = backend.cuda.graph_replays();
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
            backend.stats.clone(),
            backend.cuda.graph_replays() - before,
        )
    };
    let (eager_tokens, eager_stats, eager_replays) = run(false);
    let (graph_tokens, graph_stats, replays) = run(true);
    assert_eq!(eager_replays, 0);
    // 3 strategies x 2 blocks x 8 steps: a block's full step and its first
    // cached step run eagerly, the second is captured and replayed, the
    // other five replay; more where a geometry recurs across requests (the
    // last block, whose suffix is empty, looks alike in every strategy).
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
