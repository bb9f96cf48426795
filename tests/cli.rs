//! The command line as outside scripts call it: the exact flag names of
//! `dllm generate`, checked by reproducing golden cases through the binary.

mod common;

use std::process::Command;

use common::{cases, golden_dir, ids, prompts};
use serde_json::Value;

/// `dllm generate ... --json` for a golden case, flags spelled as documented.
fn generate_case(model: &str, case: &Value, prompt: &[u32]) -> Value {
    let args = &case["args"];
    let arg = |k: &str| args.get(k).map(|v| v.to_string());
    let strategy = case["strategy"].as_str().unwrap();
    let cache = match strategy {
        s if s.contains("prefix") || s == "streaming" => "prefix",
        s if s.contains("dual") => "dual",
        _ => "none",
    };
    let gen_length = arg("gen_length").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dllm"));
    cmd.arg("generate")
        .arg("--model")
        .arg(golden_dir(model))
        .arg("--prompt-ids")
        .arg(
            prompt
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .args(["--gen-length", &gen_length])
        .args(["--block-length", &arg("block_length").unwrap_or(gen_length)])
        .args(["--steps", &arg("steps").unwrap()])
        .args(["--cache", cache])
        .args(["--threshold", &arg("threshold").unwrap_or("none".into())])
        .arg("--json");
    if let Some(factor) = arg("factor") {
        cmd.args(["--factor", &factor]);
    }
    if let Some(window) = arg("window_size") {
        cmd.args([
            "--suffix-window",
            &window,
            "--suffix-tail",
            "1",
            "--early-exit",
        ]);
        cmd.args(["--confidence-alpha", &arg("confidence_alpha").unwrap()]);
        cmd.args(["--eos-id", &arg("eos_id").unwrap(), "--mask-id", "500"]);
    }
    if let Some(alg) = args.get("alg").and_then(Value::as_str) {
        cmd.args(["--alg", alg]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{strategy} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One robust case of each strategy (and each Dream alg) through the binary.
fn check_model(model: &str) {
    let golden = cases(model);
    let prompts = prompts(&golden);
    let mut seen = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let key = format!(
            "{}{}",
            case["strategy"],
            case["args"].get("alg").unwrap_or(&Value::Null)
        );
        if seen.contains(&key) || !case.get("robust").and_then(Value::as_bool).unwrap_or(true) {
            continue;
        }
        seen.push(key);
        let prompt = &prompts[case["prompt"].as_u64().unwrap() as usize];
        let json = generate_case(model, case, prompt);
        let want_nfe = case["nfe"].as_u64().unwrap()
            - case.get("nfe_idle").and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(
            ids(&json["tokens"]),
            ids(&case["tokens"]),
            "{} {}",
            case["strategy"],
            case["args"]
        );
        assert_eq!(
            json["nfe"].as_u64().unwrap(),
            want_nfe,
            "{} {}",
            case["strategy"],
            case["args"]
        );
        let timings = &json["timings"];
        for key in ["load_s", "prompt_s", "decode_s", "total_s", "tokens_per_s"] {
            assert!(timings[key].as_f64().unwrap() >= 0.0, "{key}");
        }
    }
    assert!(seen.len() >= 3, "{seen:?}");
}

#[test]
fn llada_strategies_through_the_command_line() {
    check_model("llada_tiny_s1");
}

#[test]
fn dream_algorithms_through_the_command_line() {
    check_model("dream_tiny_s1");
}
