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

fn dllm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dllm"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const ADD_PROMPT: &str = "add 0000004821+0000000937=";

#[test]
fn generate_fits_the_default_length_to_the_model_and_says_so() {
    // The small default model was trained on sequences of 90 tokens: the
    // default 256 would not fit after this 26-token prompt.
    let out = dllm(&["generate", "--prompt", ADD_PROMPT]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "00000005758");
    assert!(
        text(&out.stderr).contains(
            "note: --gen-length 64 instead of the default 256: the model's maximum sequence length is 90"
        ),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_explicit_length_too_long_for_the_model_is_an_error() {
    let out = dllm(&["generate", "--prompt", ADD_PROMPT, "--gen-length", "96"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty());
    assert_eq!(
        text(&out.stderr).trim(),
        "error: invalid request: prompt (26 tokens) plus gen_length (96) is 122, longer than the model's maximum sequence length 90"
    );
}

/// A requests file for `dllm batch` in a fresh temporary directory.
fn requests_file(name: &str, lines: &[Value]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dllm-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("requests.jsonl");
    let body: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&path, body.join("\n") + "\n").unwrap();
    path
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    text(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn batch_runs_each_request_as_generate_does_with_one_load() {
    let flags: [&[&str]; 2] = [
        &["--prompt", ADD_PROMPT, "--gen-length", "64"],
        &[
            "--prompt",
            "rev abcdef=",
            "--gen-length",
            "64",
            "--cache",
            "prefix",
            "--threshold",
            "none",
            "--steps",
            "32",
        ],
    ];
    let as_json = |args: &[&str]| serde_json::Value::from(args.to_vec());
    let path = requests_file(
        "batch",
        &[
            serde_json::json!({"id": "warm", "args": as_json(flags[1]), "warmup": true}),
            serde_json::json!({"id": "add", "args": as_json(flags[0])}),
            serde_json::json!({"id": "rev", "args": as_json(flags[1])}),
        ],
    );
    let out = dllm(&["batch", "--requests", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = json_lines(&out.stdout);
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["warm", "add", "rev"]);
    assert_eq!(lines[0]["warmup"], true);
    assert!(lines[1].get("warmup").is_none());
    assert_eq!(lines[1]["text"], "00000005758");
    assert_eq!(lines[1]["commit"], lines[2]["commit"]);
    // One load for the process: every line reports the same one.
    assert_eq!(lines[1]["timings"]["load_s"], lines[2]["timings"]["load_s"]);
    for (line, args) in lines[1..].iter().zip(flags) {
        let mut generate = vec!["generate", "--json"];
        generate.extend_from_slice(args);
        let single = dllm(&generate);
        assert!(single.status.success(), "{}", text(&single.stderr));
        let single: Value = serde_json::from_slice(&single.stdout).unwrap();
        assert_eq!(line["tokens"], single["tokens"], "{}", line["id"]);
        assert_eq!(line["nfe"], single["nfe"], "{}", line["id"]);
        let t = &line["timings"];
        let (request, total) = (
            t["request_s"].as_f64().unwrap(),
            t["total_s"].as_f64().unwrap(),
        );
        assert!(request >= total, "{t}");
        assert!((t["prepare_s"].as_f64().unwrap() - (request - total)).abs() < 1e-6);
    }
}

#[test]
fn batch_rejects_a_bad_line_before_loading_the_model() {
    let path = requests_file(
        "bad-flag",
        &[
            serde_json::json!({"id": "ok", "args": ["--prompt-ids", "1,2"]}),
            serde_json::json!({"id": "typo", "args": ["--prompt-ids", "1", "--gen-lenth", "32"]}),
        ],
    );
    // A model directory that does not exist: the file is judged first.
    let out = dllm(&[
        "batch",
        "--model",
        "no-such-model",
        "--requests",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("line 2 (id \"typo\"): unexpected argument '--gen-lenth' found"),
        "{stderr}"
    );
    let path = requests_file(
        "bad-key",
        &[serde_json::json!({"id": "x", "args": [], "warm_up": true})],
    );
    let out = dllm(&["batch", "--requests", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown field `warm_up`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn batch_stops_at_the_first_failing_request() {
    let path = requests_file(
        "failing",
        &[
            serde_json::json!({"id": "first", "args": ["--prompt", ADD_PROMPT, "--gen-length", "64"]}),
            serde_json::json!({"id": "too-long", "args": ["--prompt", ADD_PROMPT, "--gen-length", "96"]}),
            serde_json::json!({"id": "never", "args": ["--prompt", ADD_PROMPT, "--gen-length", "64"]}),
        ],
    );
    let out = dllm(&["batch", "--requests", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "00000005758");
    assert_eq!(lines[1]["id"], "too-long");
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("longer than the model's maximum sequence length 90"));
    assert!(text(&out.stderr).starts_with("error: request \"too-long\": invalid request"));
}
