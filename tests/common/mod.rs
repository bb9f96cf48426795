//! Shared helpers for the integration tests: the golden vectors copied from
//! ../shared/golden into tests/data/golden.

#![allow(dead_code)]

pub mod watched;

use std::path::{Path, PathBuf};

use dllm::backend::{Backend, ForwardPass, SINGLE_PAGE};
use dllm::{CacheMode, DecodeOptions, DreamAlg, Editing, Sampler};
use serde_json::Value;

pub fn golden_dir(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(model)
}

pub fn cases(model: &str) -> Value {
    let text = std::fs::read_to_string(golden_dir(model).join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The prompts of a cases.json, indexed by each case's `prompt`.
pub fn prompts(cases: &Value) -> Vec<Vec<u32>> {
    cases["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

/// A little-endian float32 `.npy` file: (shape, data).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let (shape, data) = read_npy_raw(path, "<f4");
    (
        shape,
        data.iter().copied().map(f32::from_le_bytes).collect(),
    )
}

/// A little-endian int32 `.npy` file: (shape, data).
pub fn read_npy_i32(path: &Path) -> (Vec<usize>, Vec<i32>) {
    let (shape, data) = read_npy_raw(path, "<i4");
    (
        shape,
        data.iter().copied().map(i32::from_le_bytes).collect(),
    )
}

/// The shape and 4-byte elements of a C-order `.npy` file of `descr`.
fn read_npy_raw(path: &Path, descr: &str) -> (Vec<usize>, Vec<[u8; 4]>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains(&format!("'descr': '{descr}'")), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<[u8; 4]> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| [b[0], b[1], b[2], b[3]])
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

/// The runtime's options for a golden case (see tests/data/golden/README.md).
pub fn options_for(case: &Value) -> DecodeOptions {
    let strategy = case["strategy"].as_str().unwrap();
    let args = &case["args"];
    let get = |k: &str| args.get(k).and_then(Value::as_f64);
    if strategy.starts_with("llada2") {
        return llada2_options(strategy, args);
    }
    let gen_length = get("gen_length").unwrap() as usize;
    let cache = match strategy {
        "baseline" | "baseline_threshold" | "baseline_factor" | "dream_baseline" => CacheMode::None,
        "prefix" | "prefix_threshold" | "streaming" | "dream_prefix" => CacheMode::Prefix,
        "dual" | "dual_threshold" | "dream_dual" => CacheMode::Dual,
        other => panic!("unknown golden strategy {other}"),
    };
    let streaming = strategy == "streaming";
    DecodeOptions {
        gen_length,
        block_length: get("block_length").map_or(gen_length, |b| b as usize),
        steps: get("steps").unwrap() as usize,
        cache,
        threshold: get("threshold"),
        factor: get("factor"),
        suffix_window: get("window_size").map(|w| w as usize),
        suffix_tail: 1,
        confidence_alpha: get("confidence_alpha").unwrap_or(0.0),
        early_exit: streaming,
        alg: args
            .get("alg")
            .and_then(Value::as_str)
            .map(|a| DreamAlg::parse(a).unwrap()),
        mask_id: None,
        eos_id: get("eos_id").map(|e| e as u32),
        sampler: dllm::Sampler::SemiAutoregressive,
    }
}

/// The options of an LLaDA2 golden case: 64 tokens, and the reference's
/// defaults for what the case does not set.
fn llada2_options(strategy: &str, args: &Value) -> DecodeOptions {
    let get = |k: &str| args.get(k).and_then(Value::as_f64);
    let eos_early_stop = args.get("eos_early_stop") == Some(&Value::Bool(true));
    let sampler = match strategy {
        "llada20" => Sampler::Llada20 { eos_early_stop },
        "llada21" => {
            let default = Editing::default();
            Sampler::Llada21(Editing {
                editing_threshold: get("editing_threshold").unwrap_or(default.editing_threshold),
                max_post_steps: get("max_post_steps")
                    .map_or(default.max_post_steps, |m| m as usize),
                num_to_transfer: get("num_to_transfer")
                    .map_or(default.num_to_transfer, |n| n as usize),
                eos_early_stop,
            })
        }
        other => panic!("unknown golden strategy {other}"),
    };
    DecodeOptions {
        gen_length: 64,
        block_length: get("block_length").unwrap() as usize,
        steps: get("steps").unwrap_or(32.0) as usize,
        threshold: get("threshold"),
        sampler,
        ..DecodeOptions::default()
    }
}

/// A robust golden case, ready to run.
pub struct Case {
    pub label: String,
    pub prompt: Vec<u32>,
    pub options: DecodeOptions,
    pub tokens: Vec<u32>,
    /// Forward passes, less the reference's idle ones.
    pub nfe: usize,
}

/// Every robust case of a golden model (Dream's vectors mark none unrobust).
pub fn robust_cases(model: &str) -> Vec<Case> {
    let golden = cases(model);
    let prompts = prompts(&golden);
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|case| case.get("robust").and_then(Value::as_bool).unwrap_or(true))
        // Q1: we implement LLaDA2.1 with true block attention, not the soft mask.
        .filter(|case| case["strategy"] != "llada21_softmask")
        .map(|case| Case {
            label: format!(
                "{} {} prompt {}",
                case["strategy"], case["args"], case["prompt"]
            ),
            prompt: prompts[case["prompt"].as_u64().unwrap() as usize].clone(),
            options: options_for(case),
            tokens: ids(&case["tokens"]),
            nfe: case["nfe"].as_u64().unwrap() as usize
                - case.get("nfe_idle").and_then(Value::as_u64).unwrap_or(0) as usize,
        })
        .collect()
}

/// Per row of `[rows, vocab]` logits: max |got − want| over the row, relative
/// to the row's largest |want|. Returns the worst row's (error, row).
pub fn logits_error(got: &[f32], want: &[f32], vocab: usize) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("logit {i} of {} is {}", got.len(), got[i]);
    }
    got.chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .map(|(g, w)| {
            let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = g
                .iter()
                .zip(w)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            diff / scale
        })
        .enumerate()
        .fold(
            (0.0, 0),
            |worst, (r, e)| if e > worst.0 { (e, r) } else { worst },
        )
}

/// Logits of a whole sequence under block attention, computed block by
/// block against the cache as generation runs them; `after` sees the
/// backend after each block's forward.
pub fn block_logits<B: Backend>(
    backend: &mut B,
    tokens: &[u32],
    block: usize,
    mut after: impl FnMut(&B),
) -> Vec<f32> {
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    backend.prepare(tokens.len()).unwrap();
    let mut logits = Vec::new();
    for start in (0..tokens.len()).step_by(block) {
        let end = start + block;
        logits.extend(
            backend
                .logits_of(&ForwardPass {
                    tokens: &tokens[start..end],
                    positions: &positions[start..end],
                    write_slot: start,
                    attend_len: end,
                    rows: 0..block,
                    pages: SINGLE_PAGE,
                })
                .unwrap(),
        );
        after(backend);
    }
    logits
}
