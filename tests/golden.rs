//! The CPU backend against the PyTorch references (tests/data/golden): forward
//! logits to float32 rounding and every robust case's tokens and NFE exactly.

mod common;

use std::ops::Range;
use std::path::Path;

use common::{cases, golden_dir, ids, read_npy, robust_cases};
use dllm::backend::SINGLE_PAGE;
use dllm::{Backend, Device, Engine, ForwardPass, Model};

fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn full_logits(backend: &mut dyn Backend, tokens: &[u32], positions: &[u32]) -> Vec<f32> {
    backend.prepare(tokens.len()).unwrap();
    let rows: Range<usize> = 0..tokens.len();
    backend
        .logits_of(&ForwardPass {
            tokens,
            positions,
            write_slot: 0,
            attend_len: tokens.len(),
            rows,
            pages: SINGLE_PAGE,
        })
        .unwrap()
}

fn check_forward_logits(model_name: &str, dir: &Path) {
    let model = Model::open(dir).unwrap();
    let mut backend = dllm::cpu::CpuBackend::new(&model).unwrap();
    let golden = cases(model_name);
    for forward in golden["forward"].as_array().unwrap() {
        let tokens = ids(&forward["input_ids"]);
        let positions: Vec<u32> = (0..tokens.len() as u32).collect();
        let got = full_logits(&mut backend, &tokens, &positions);
        let (_, want) = read_npy(&golden_dir(model_name).join(forward["logits"].as_str().unwrap()));
        let err = relative_error(&got, &want);
        assert!(
            err < 1e-4,
            "{model_name} {:?}: relative error {err}",
            forward["logits"]
        );

        if let Some(pruned) = forward.get("pruned_input_ids") {
            let tokens = ids(pruned);
            let positions = ids(&forward["pruned_position_ids"]);
            let got = full_logits(&mut backend, &tokens, &positions);
            let file = forward["pruned_logits"].as_str().unwrap();
            let (_, want) = read_npy(&golden_dir(model_name).join(file));
            let err = relative_error(&got, &want);
            assert!(err < 1e-4, "{model_name} {file}: relative error {err}");
        }
    }
}

#[test]
fn llada_forward_logits_match_the_reference() {
    check_forward_logits("llada_tiny_s1", &golden_dir("llada_tiny_s1"));
}

#[test]
fn dream_forward_logits_match_the_reference() {
    check_forward_logits("dream_tiny_s1", &golden_dir("dream_tiny_s1"));
}

#[test]
fn sharded_checkpoint_gives_the_same_logits() {
    check_forward_logits(
        "llada_tiny_s1",
        &golden_dir("llada_tiny_s1").join("sharded"),
    );
}

/// Runs every robust case one at a time; returns the number run and the
/// failures.
fn run_cases(model_name: &str, dir: &Path) -> (usize, Vec<String>) {
    let engine = Engine::new(Model::open(dir).unwrap(), Device::Cpu).unwrap();
    let cases = robust_cases(model_name);
    let mut failures = Vec::new();
    for case in &cases {
        let out = engine.generate(&case.prompt, &case.options).unwrap();
        if out.tokens != case.tokens || out.nfe != case.nfe {
            failures.push(format!(
                "{}: nfe {} want {}, tokens {}",
                case.label,
                out.nfe,
                case.nfe,
                if out.tokens == case.tokens {
                    "equal"
                } else {
                    "differ"
                }
            ));
        }
    }
    (cases.len(), failures)
}

#[test]
fn llada_cases_reproduce_tokens_and_nfe() {
    let (run, failures) = run_cases("llada_tiny_s1", &golden_dir("llada_tiny_s1"));
    assert_eq!(run, 153);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn dream_cases_reproduce_tokens_and_nfe() {
    let (run, failures) = run_cases("dream_tiny_s1", &golden_dir("dream_tiny_s1"));
    assert_eq!(run, 72);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
