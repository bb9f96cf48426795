//! Weights as stored and quantized, on the golden models: a bf16 checkpoint
//! computed from as stored decodes exactly as its f32 widening does; the
//! quantized formats' forward logits stay within stated errors of the
//! references; `dllm quantize` writes a directory that loads like any other.

mod common;

use std::path::Path;

use common::{cases, golden_dir, ids, options_for, prompts, read_npy, robust_cases};
use dllm::backend::SINGLE_PAGE;
use dllm::convert::{self, WeightFormat};
use dllm::quant::Quantization;
use dllm::{Backend, Device, Engine, ForwardPass, Model};
use serde_json::Value;

const MODELS: [&str; 2] = ["llada_tiny_s1", "dream_tiny_s1"];

/// Tokens and NFE of every robust case of a golden model's cases.json (the
/// others hold near-ties that a change in the last bits may flip).
fn decode_all(model_name: &str, model: Model) -> Vec<(Vec<u32>, usize)> {
    let engine = Engine::new(model, Device::Cpu).unwrap();
    robust_cases(model_name)
        .iter()
        .map(|case| {
            let out = engine.generate(&case.prompt, &case.options).unwrap();
            (out.tokens, out.nfe)
        })
        .collect()
}

#[test]
fn bf16_as_stored_decodes_every_case_like_its_f32_widening() {
    for name in MODELS {
        let dir = golden_dir(name).join("bf16");
        let stored = decode_all(name, Model::open(&dir).unwrap());
        let widened = convert::convert(Model::open(&dir).unwrap(), WeightFormat::F32).unwrap();
        let want = decode_all(name, widened);
        let differ = stored.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{name}: {differ} of {} cases differ", want.len());
    }
}

/// The norm of the difference over the norm of the reference.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm).sqrt() as f32
}

/// The logits of every position of `tokens`, in one full forward.
fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut backend = dllm::cpu::CpuBackend::new(model).unwrap();
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    backend.prepare(tokens.len()).unwrap();
    backend
        .logits_of(&ForwardPass {
            tokens,
            positions: &positions,
            write_slot: 0,
            attend_len: tokens.len(),
            rows: 0..tokens.len(),
            pages: SINGLE_PAGE,
        })
        .unwrap()
}

/// The worst relative error of the model's forward logits over the golden
/// forward cases (the references' f32 logits).
fn golden_forward_error(model_name: &str, model: &Model) -> f32 {
    let golden = cases(model_name);
    let mut worst = 0.0f32;
    for forward in golden["forward"].as_array().unwrap() {
        let got = logits(model, &ids(&forward["input_ids"]));
        let file = forward["logits"].as_str().unwrap();
        let (_, want) = read_npy(&golden_dir(model_name).join(file));
        worst = worst.max(relative_error(&got, &want));
    }
    worst
}

const INT8: WeightFormat = WeightFormat::Quantized(Quantization::Int8);
const INT4_32: WeightFormat = WeightFormat::Quantized(Quantization::Int4 { group: 32 });
const INT4_128: WeightFormat = WeightFormat::Quantized(Quantization::Int4 { group: 128 });

/// `model_dir`'s model with its weights in `format`.
fn converted(model_dir: &Path, format: WeightFormat) -> Model {
    convert::convert(Model::open(model_dir).unwrap(), format).unwrap()
}

#[test]
fn golden_forward_logits_of_each_format_are_measured() {
    // The tiny golden models are random: they amplify a change of their
    // weights some 30-fold (bf16 rounding alone, 2⁻⁹ relative, moves their
    // logits by 5-7%), so 4-bit weights leave logits as far from the
    // reference as their own size. Bounds: about twice what was measured
    // (README, "Weights"); the trained model below bounds 4 bits too.
    for (name, bounds) in [
        ("llada_tiny_s1", [0.15, 0.5]),
        ("dream_tiny_s1", [0.1, 0.3]),
    ] {
        for (format, bound) in [
            (WeightFormat::BF16, Some(bounds[0])),
            (INT8, Some(bounds[1])),
            (INT4_32, None),
        ] {
            let err = golden_forward_error(name, &converted(&golden_dir(name), format));
            println!("{name} {}: relative error {err:.2e}", format.name());
            if let Some(bound) = bound {
                assert!(err < bound, "{name} {}: {err} >= {bound}", format.name());
            }
        }
    }
}

#[test]
fn trained_model_logits_move_little_when_quantized() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-arith");
    let stored = Model::open(&dir).unwrap();
    let tokenizer = stored.tokenizer.clone().unwrap();
    let mut tokens = tokenizer.encode("add 0000004821+0000000937=").unwrap();
    tokens.extend([stored.config.mask_id.unwrap(); 32]);
    let want = logits(&stored, &tokens);
    // Bounds about twice what was measured (README, "Weights").
    for (format, bound) in [(INT8, 7e-3), (INT4_32, 0.1), (INT4_128, 0.13)] {
        let err = relative_error(&logits(&converted(&dir, format), &tokens), &want);
        println!(
            "tiny-arith {}: relative error to bf16 {err:.2e}",
            format.name()
        );
        assert!(
            err < bound,
            "tiny-arith {}: {err} >= {bound}",
            format.name()
        );
    }
}

#[test]
fn a_quantized_directoryloads_like_any_model_and_equals_quantizing_at_load() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("weights/llada_int4");
    let format = WeightFormat::Quantized(Quantization::Int4 { group: 32 });
    let source = Model::open(&golden_dir("llada_tiny_s1")).unwrap();
    convert::write(&source, format, &out).unwrap();
    let written = Model::open(&out).unwrap();
    assert_eq!(written.quantization, Some(Quantization::Int4 { group: 32 }));
    let in_memory = convert::convert(source, format).unwrap();

    let golden = cases("llada_tiny_s1");
    let case: &Value = &golden["cases"][0];
    let prompt = &prompts(&golden)[case["prompt"].as_u64().unwrap() as usize];
    let mut outs = [written, in_memory].map(|model| {
        let engine = Engine::new(model, Device::Cpu).unwrap();
        engine.generate(prompt, &options_for(case)).unwrap().tokens
    });
    let [a, b] = std::mem::take(&mut outs);
    assert_eq!(a, b);
}
