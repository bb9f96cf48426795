//! Properties of the strategies beyond the golden vectors: DualCache with
//! suffix pruning (DESIGN §3.8), early exit, and the bf16 checkpoints.

mod common;

use common::golden_dir;
use common::watched::{Watched, Watcher};
use dllm::{CacheMode, DecodeOptions, Device, Engine, Model};

fn engine(name: &str) -> Engine {
    Engine::new(Model::open(&golden_dir(name)).unwrap(), Device::Cpu).unwrap()
}

const PROMPT: [u32; 9] = [102, 290, 205, 474, 395, 189, 471, 17, 3];

fn options(cache: CacheMode, threshold: Option<f64>, window: Option<usize>) -> DecodeOptions {
    DecodeOptions {
        gen_length: 64,
        block_length: 16,
        steps: 64,
        cache,
        threshold,
        suffix_window: window,
        ..DecodeOptions::default()
    }
}

#[test]
fn dual_cache_with_a_window_covering_the_suffix_is_dual_cache() {
    for model in ["llada_tiny_s1", "dream_tiny_s1"] {
        let engine = engine(model);
        for threshold in [None, Some(0.9), Some(0.5)] {
            let dual = engine
                .generate(&PROMPT, &options(CacheMode::Dual, threshold, None))
                .unwrap();
            // 48 = the whole suffix of the first block; longer windows too.
            for window in [48, 64, 1000] {
                let pruned = engine
                    .generate(&PROMPT, &options(CacheMode::Dual, threshold, Some(window)))
                    .unwrap();
                assert_eq!(
                    pruned.tokens, dual.tokens,
                    "{model} {threshold:?} window {window}"
                );
                assert_eq!(
                    pruned.nfe, dual.nfe,
                    "{model} {threshold:?} window {window}"
                );
            }
        }
    }
}

#[test]
fn a_short_window_changes_what_the_model_sees_but_completes_every_block() {
    let engine = engine("llada_tiny_s1");
    let dual = engine
        .generate(&PROMPT, &options(CacheMode::Dual, Some(0.9), None))
        .unwrap();
    let pruned = engine
        .generate(&PROMPT, &options(CacheMode::Dual, Some(0.9), Some(4)))
        .unwrap();
    assert!(
        !pruned.tokens.contains(&500),
        "masks left: {:?}",
        pruned.tokens
    );
    assert_ne!(
        pruned.tokens, dual.tokens,
        "a 4-token window should change some prediction"
    );
}

#[test]
fn early_exit_at_eos_in_the_first_block_fills_the_rest_and_stops() {
    let engine = engine("llada_tiny_s1");
    let plain = engine
        .generate(&PROMPT, &options(CacheMode::Prefix, Some(0.9), None))
        .unwrap();
    // Declare a token the first block produces to be EOS.
    let eos = plain.tokens[3];
    let mut opts = options(CacheMode::Prefix, Some(0.9), None);
    opts.eos_id = Some(eos);
    opts.early_exit = true;
    let out = engine.generate(&PROMPT, &opts).unwrap();
    assert_eq!(out.tokens[..16], plain.tokens[..16]);
    assert!(out.tokens[16..].iter().all(|&t| t == eos));
    assert!(
        out.nfe < plain.nfe,
        "{} forwards, {} without early exit",
        out.nfe,
        plain.nfe
    );
    assert_eq!(
        out.non_eos_tokens,
        plain.tokens[..16].iter().filter(|&&t| t != eos).count()
    );
}

#[test]
fn bf16_checkpoints_load_as_the_f32_weights_rounded() {
    for model in ["llada_tiny_s1", "dream_tiny_s1"] {
        let f32_model = Model::open(&golden_dir(model)).unwrap();
        let bf16_model = Model::open(&golden_dir(model).join("bf16")).unwrap();
        assert_eq!(
            bf16_model.checkpoint.dtypes(),
            vec![dllm::checkpoint::Dtype::BF16]
        );
        let names = dllm::model::expected_tensors(&f32_model.config);
        for (name, _) in &names {
            let want = f32_model.checkpoint.tensor(name).unwrap().to_bf16();
            let got = bf16_model.checkpoint.tensor(name).unwrap().to_bf16();
            assert!(
                want == got,
                "{model}: {name} is not the f32 tensor rounded to bf16"
            );
        }
        // And it decodes: every mask is filled.
        let engine = Engine::new(bf16_model, Device::Cpu).unwrap();
        let out = engine
            .generate(&PROMPT, &options(CacheMode::Dual, Some(0.9), None))
            .unwrap();
        assert!(!out.tokens.contains(&500));
    }
}

/// Runs the CPU backend and records every pass against what was announced.
/// Checks that every pass has a shape announced before the request's first
/// forward, and counts them.
#[derive(Default)]
struct Announced {
    shapes: dllm::backend::PassShapes,
    passes: usize,
}

impl Watcher for Announced {
    fn expected(&mut self, shapes: &dllm::backend::PassShapes) {
        self.shapes = shapes.clone();
    }

    fn before(&mut self, passes: &[dllm::backend::ForwardPass]) {
        for pass in passes {
            assert!(
                self.shapes.tokens.contains(&pass.tokens.len()),
                "a pass of {} tokens, announced {:?}",
                pass.tokens.len(),
                self.shapes.tokens
            );
            assert!(pass.rows.len() <= self.shapes.max_rows, "{:?}", pass.rows);
            self.passes += 1;
        }
    }
}

#[test]
fn every_pass_shape_is_announced_before_the_first_step() {
    let model = Model::open(&golden_dir("dream_tiny_s1")).unwrap();
    let mut backend = Watched {
        backend: dllm::cpu::CpuBackend::new(&model).unwrap(),
        watcher: Announced::default(),
    };
    for cache in [CacheMode::None, CacheMode::Prefix, CacheMode::Dual] {
        for window in [None, Some(4), Some(20)] {
            let options = options(cache, Some(0.9), window);
            dllm::decode::generate(&mut backend, &model.config, &PROMPT, &options, &mut |_| {})
                .unwrap();
        }
    }
    assert!(
        backend.watcher.passes > 30,
        "{} passes",
        backend.watcher.passes
    );
}
