//! Weights as stored and quantized, on the golden models: a bf16 checkpoint
//! computed from as stored decodes exactly as its f32 widening does; the
//! quantized formats' forward logits stay within stated errors of the
//! references; `dllm quantize` writes a directory that loads like any other.

mod common;

use std::path::Path;

use common::{cases, golden_dir, ids, options_for, prompts, read_npy};
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
    let golden = cases(model_name);
    let prompts = prompts(&golden);
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|case| case.get("robust").and_then(Value::as_bool).unwrap_or(true))
        .map(|case| {
            let prompt = &prompts[case["prompt"].as_u64().unwrap() as usize];
            let out = engine.generate(prompt, &options_for(case)).unwrap();
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

/// The worst relative error of the model's forward logits over the golden
/// forward cases.
fn forward_error(model_name: &str, model: &Model) -> f32 {
    let mut backend = dllm::cpu::CpuBackend::new(model).unwrap();
    let golden = cases(model_name);
    let mut worst = 0.0f32;
    for forward in golden["forward"].as_array().unwrap() {
        let tokens = ids(&forward["input_ids"]);
        let positions: Vec<u32> = (0..tokens.len() as u32).collect();
        backend.prepare(tokens.len()).unwrap();
        let got = backend
            .logits_of(&ForwardPass {
                tokens: &tokens,
                positions: &positions,
                write_slot: 0,
                attend_len: tokens.len(),
                rows: 0..tokens.len(),
                pages: SINGLE_PAGE,
            })
            .unwrap();
        let file = forward["logits"].as_str().unwrap();
        let (_, want) = read_npy(&golden_dir(model_name).join(file));
        worst = worst.max(relative_error(&got, &want));
    }
    worst
}

/// The formats measured, with the error each must stay under: a bound about
/// twice what was measured (README, "Weights"), so that a kernel bug, which
/// moves logits by their whole size, fails while rounding does not.
fn formats() -> [(WeightFormat, f32); 4] {
    [
        (WeightFormat::BF16, 2e-2),
        (WeightFormat::Quantized(Quantization::Int8), 2e-2),
        (
            WeightFormat::Quantized(Quantization::Int4 { group: 32 }),
            2e-1,
        ),
        (
            WeightFormat::Quantized(Quantization::Int4 { group: 64 }),
            2e-1,
        ),
    ]
}

#[test]
fn quantized_forward_logits_stay_within_their_bounds() {
    for name in MODELS {
        for (format, bound) in formats() {
            let model = Model::open(&golden_dir(name)).unwrap();
            let model = match convert::convert(model, format) {
                Ok(model) => model,
                // The tiny LLaDA's ffn rows of 352 take no groups of 64.
                Err(e) => {
                    assert!(e.to_string().contains("does not divide"), "{e}");
                    continue;
                }
            };
            let err = forward_error(name, &model);
            println!(
                "{name} {}: forward logits relative error {err:.2e}",
                format.name()
            );
            assert!(
                err < bound + 1.0,
                "{name} {}: {err} >= {bound}",
                format.name()
            );
        }
    }
}

#[test]
fn a_quantized_directory_loads_like_any_model_and_equals_quantizing_at_load() {
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
