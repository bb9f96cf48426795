//! `dllm eval` through the binary: bad input (clear message, non-zero exit,
//! no panic) and the shape of the table and JSON on a stand-in model.
//!
//! The stand-in is the tiny LLaDA golden model (random weights, so its
//! accuracy means nothing and is never asserted) with a character-level
//! tokenizer.json written here, in a fresh directory under
//! `CARGO_TARGET_TMPDIR` per test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Map, Value};

/// Every strategy of the table, in order.
const STRATEGIES: [&str; 14] = [
    "baseline",
    "prefix",
    "dual",
    "threshold-0.9",
    "dual+threshold-0.9",
    "dual+threshold-0.7",
    "dual+threshold-0.5",
    "dual+factor-1.0",
    "streaming-w8",
    "streaming-w16",
    "streaming-w32",
    "streaming-w32+alpha-0.3",
    "early-exit",
    "dual+pruned-w16",
];

/// Ids of the golden model's special tokens (its config.json).
const MASK_ID: u32 = 500;
const EOS_ID: u32 = 501;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden/llada_tiny_s1")
}

/// A fresh, empty directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("eval")
        .join(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One token per printable ASCII character (ids 0..94), the mask and EOS
/// as special tokens at the golden model's ids: a BPE model without merges,
/// as tools/export.py writes for tiny-arith.
fn char_tokenizer() -> Value {
    let mut vocab = Map::new();
    for (id, c) in (32u8..127).enumerate() {
        vocab.insert((c as char).to_string(), json!(id));
    }
    let mut added = Vec::new();
    for (token, id) in [("<|mask|>", MASK_ID), ("<|eos|>", EOS_ID)] {
        vocab.insert(token.into(), json!(id));
        added.push(json!({
            "id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        }));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": [],
        },
    })
}

/// The stand-in model: the golden weights and config, plus a tokenizer
/// when `tokenizer` is set. No eval.jsonl.
fn stand_in(test: &str, tokenizer: bool) -> PathBuf {
    let dir = scratch(test);
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join(file), dir.join(file)).unwrap();
    }
    if tokenizer {
        let text = serde_json::to_string_pretty(&char_tokenizer()).unwrap();
        std::fs::write(dir.join("tokenizer.json"), text).unwrap();
    }
    dir
}

/// A set in tiny-arith's format: (task, prompt, answer) per line.
fn set_lines(rows: &[(&str, &str, &str)]) -> String {
    rows.iter()
        .map(|(task, prompt, answer)| {
            json!({"task": task, "prompt": prompt, "answer": answer}).to_string() + "\n"
        })
        .collect()
}

fn write_set(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const ROWS: [(&str, &str, &str); 6] = [
    ("add", "add 4821+937=", "00000005758"),
    ("add", "add 12+30=", "00000000042"),
    ("add", "add 7+8=", "00000000015"),
    ("rev", "rev abcdefgh=", "hgfedcba"),
    ("rev", "rev 12345678=", "87654321"),
    ("copy", "copy qwertyui=", "qwertyui"),
];

fn dllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dllm"))
        .args(args)
        .output()
        .expect("run dllm")
}

fn eval(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["eval", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    dllm(&args)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit status 1, no panic, and every `needle` in stderr.
fn assert_fails(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {err}\nstdout: {}",
        stdout(out)
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
}

fn assert_succeeds(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstderr: {}\nstdout: {}",
        out.status,
        stderr(out),
        stdout(out)
    );
}

/// JSON lines of `--json`, one object per strategy.
fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

// ---------------------------------------------------------------------------
// Bad input

#[test]
fn missing_set_file_is_an_error() {
    let dir = stand_in("missing_set", true);
    let missing = dir.join("nowhere.jsonl");
    let out = eval(&dir, &["--set", missing.to_str().unwrap()]);
    assert_fails(&out, &["cannot read eval set", "nowhere.jsonl"]);
}

#[test]
fn missing_default_set_says_how_to_pass_one() {
    let dir = stand_in("missing_default_set", true);
    let out = eval(&dir, &[]);
    assert_fails(&out, &["cannot read eval set", "eval.jsonl", "--set FILE"]);
}

#[test]
fn malformed_line_names_its_line_number() {
    let dir = stand_in("malformed_line", true);
    // Blank lines count: the broken line is line 3 of the file.
    let text = set_lines(&ROWS[..1]) + "\n" + "{\"prompt\": \"add 1+2=\", \"answer\": \n";
    let set = write_set(&dir, "set.jsonl", &text);
    let out = eval(&dir, &["--set", set.to_str().unwrap()]);
    assert_fails(
        &out,
        &["set.jsonl: line 3, column 33: malformed JSON: EOF while parsing"],
    );
}

#[test]
fn line_that_is_not_an_object_is_an_error() {
    let dir = stand_in("not_an_object", true);
    let text = set_lines(&ROWS[..2]) + "[\"add 1+2=\", \"00000000003\"]\n";
    let set = write_set(&dir, "set.jsonl", &text);
    let out = eval(&dir, &["--set", set.to_str().unwrap()]);
    assert_fails(&out, &["line 3", "expected a JSON object", "an array"]);
}

#[test]
fn line_without_prompt_is_an_error() {
    let dir = stand_in("missing_prompt", true);
    let text = set_lines(&ROWS[..1]) + "{\"task\": \"add\", \"answer\": \"00000000003\"}\n";
    let set = write_set(&dir, "set.jsonl", &text);
    let out = eval(&dir, &["--set", set.to_str().unwrap()]);
    assert_fails(&out, &["line 2", "missing \"prompt\""]);
}

#[test]
fn line_without_answer_is_an_error() {
    let dir = stand_in("missing_answer", true);
    let text = "{\"task\": \"add\", \"prompt\": \"add 1+2=\"}\n".to_string() + &set_lines(&ROWS);
    let set = write_set(&dir, "set.jsonl", &text);
    let out = eval(&dir, &["--set", set.to_str().unwrap()]);
    assert_fails(&out, &["line 1", "missing \"answer\""]);
}

#[test]
fn non_string_fields_are_errors() {
    let dir = stand_in("non_string_fields", true);
    let set = write_set(
        &dir,
        "a.jsonl",
        "{\"prompt\": \"add 1+2=\", \"answer\": 3}\n",
    );
    let out = eval(&dir, &["--set", set.to_str().unwrap()]);
    assert_fails(
        &out,
        &["line 1", "\"answer\" must be a string, got a number"],
    );
    let set = write_set(&dir, "p.jsonl", "{\"prompt\": \"\", \"answer\": \"3\"}\n");
    let out = eval(&dir, &["--set", set.to_str().unwrap()]);
    assert_fails(&out, &["line 1", "\"prompt\" is empty"]);
}

#[test]
fn empty_set_is_an_error() {
    let dir = stand_in("empty_set", true);
    for (name, text) in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")] {
        let set = write_set(&dir, name, text);
        let out = eval(&dir, &["--set", set.to_str().unwrap()]);
        assert_fails(&out, &[name, "holds no examples"]);
    }
}

#[test]
fn model_without_tokenizer_is_an_error() {
    let dir = stand_in("no_tokenizer", false);
    write_set(&dir, "eval.jsonl", &set_lines(&ROWS));
    let out = eval(&dir, &[]);
    assert_fails(
        &out,
        &["has no tokenizer.json", "encodes the set's prompts as text"],
    );
}

#[test]
fn zero_limit_is_a_usage_error() {
    let dir = stand_in("zero_limit", true);
    write_set(&dir, "eval.jsonl", &set_lines(&ROWS));
    let out = eval(&dir, &["--limit", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 1"), "{}", stderr(&out));
}

#[test]
fn only_matching_nothing_lists_the_strategies() {
    let dir = stand_in("only_nothing", true);
    write_set(&dir, "eval.jsonl", &set_lines(&ROWS));
    let out = eval(&dir, &["--only", "nonesuch"]);
    assert_fails(
        &out,
        &["no strategy matches --only nonesuch", "dual+pruned-w16"],
    );
}

#[test]
fn check_needs_the_baseline() {
    let dir = stand_in("check_without_baseline", true);
    write_set(&dir, "eval.jsonl", &set_lines(&ROWS));
    let out = eval(&dir, &["--only", "dual", "--check"]);
    assert_fails(&out, &["--check", "include baseline"]);
}

#[test]
fn impossible_lengths_are_an_error() {
    let dir = stand_in("impossible_lengths", true);
    write_set(&dir, "eval.jsonl", &set_lines(&ROWS));
    let out = eval(&dir, &["--gen-length", "48", "--block-length", "32"]);
    assert_fails(&out, &["not a multiple of block_length"]);
}

// ---------------------------------------------------------------------------
// Output shape on the stand-in

#[test]
fn table_has_a_header_and_one_row_per_strategy() {
    let dir = stand_in("table", true);
    write_set(&dir, "eval.jsonl", &set_lines(&ROWS));
    let out = eval(
        &dir,
        &["--limit", "2", "--gen-length", "32", "--block-length", "16"],
    );
    assert_succeeds(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4 + STRATEGIES.len(), "{text}");
    let header = lines[0];
    for needle in [
        "Model `",
        "set `",
        "eval.jsonl`",
        "2 examples",
        "gen length 32",
        "block length 16",
        "device cpu",
    ] {
        assert!(header.contains(needle), "{needle:?} not in {header}");
    }
    assert_eq!(lines[1], "");
    assert_eq!(
        lines[2],
        "| strategy | exact match | accuracy | mean NFE | tokens/s | speedup | masks left |"
    );
    assert_eq!(lines[3], "|---|---:|---:|---:|---:|---:|---:|");
    for (row, name) in lines[4..].iter().zip(STRATEGIES) {
        let cells: Vec<&str> = row
            .strip_prefix("| ")
            .and_then(|r| r.strip_suffix(" |"))
            .unwrap_or_else(|| panic!("not a table row: {row}"))
            .split(" | ")
            .collect();
        assert_eq!(cells.len(), 7, "{row}");
        assert_eq!(cells[0], name);
        let (correct, n) = cells[1].split_once('/').unwrap();
        assert!(correct.parse::<usize>().unwrap() <= 2, "{row}");
        assert_eq!(n, "2", "{row}");
        let accuracy: f64 = cells[2].strip_suffix('%').unwrap().parse().unwrap();
        assert!((0.0..=100.0).contains(&accuracy), "{row}");
        let nfe: f64 = cells[3].parse().unwrap();
        assert!((1.0..=32.0).contains(&nfe), "{row}");
        let tokens_per_s: f64 = cells[4].parse().unwrap();
        assert!(tokens_per_s >= 0.0, "{row}");
        let speedup: f64 = cells[5].strip_suffix('x').unwrap().parse().unwrap();
        assert!(speedup > 0.0, "{row}");
        assert_eq!(cells[6], "0", "a mask was left: {row}");
    }
    // The baseline is the fixed schedule: one token a step, gen_length steps.
    assert!(lines[4].starts_with("| baseline | ") && lines[4].contains(" | 32.0 | "));
    assert!(lines[4].contains(" | 1.00x | "), "{}", lines[4]);
}

#[test]
fn json_has_one_object_per_selected_strategy() {
    let dir = stand_in("json", true);
    let set = write_set(&dir, "held_out.jsonl", &set_lines(&ROWS));
    let out = eval(
        &dir,
        &[
            "--set",
            set.to_str().unwrap(),
            "--limit",
            "4",
            "--only",
            "baseline,streaming-w8,dual+threshold-0.9",
            "--json",
        ],
    );
    assert_succeeds(&out);
    let objects = json_lines(&out);
    let names: Vec<&str> = objects
        .iter()
        .map(|o| o["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["baseline", "dual+threshold-0.9", "streaming-w8"]);
    for o in &objects {
        assert_eq!(o["examples"], 4, "{o}");
        assert_eq!(o["masks_left"], 0, "{o}");
        assert_eq!(o["gen_length"], 64, "{o}");
        assert_eq!(o["block_length"], 32, "{o}");
        assert!(
            o["set"].as_str().unwrap().ends_with("held_out.jsonl"),
            "{o}"
        );
        let correct = o["correct"].as_u64().unwrap();
        let accuracy = o["accuracy"].as_f64().unwrap();
        assert!((accuracy - correct as f64 / 4.0).abs() < 1e-12, "{o}");
        for key in ["mean_nfe", "tokens_per_s", "total_s", "speedup"] {
            assert!(o[key].as_f64().unwrap() > 0.0, "{key}: {o}");
        }
        // --limit takes examples round-robin across tasks: add, rev, copy, add.
        let per_task = o["per_task"].as_object().unwrap();
        let examples = |task: &str| per_task[task]["examples"].as_u64().unwrap();
        assert_eq!(
            (examples("add"), examples("rev"), examples("copy")),
            (2, 1, 1),
            "{o}"
        );
    }
    let baseline = &objects[0];
    assert_eq!(baseline["speedup"], 1.0);
    assert_eq!(baseline["mean_nfe"], 64.0);
    assert_eq!(baseline["cache"], "none");
    assert!(baseline["threshold"].is_null());
    let streaming = &objects[2];
    assert_eq!(streaming["cache"], "prefix");
    assert_eq!(streaming["suffix_window"], 8);
    assert_eq!(streaming["threshold"], 0.9);
    assert_eq!(streaming["early_exit"], true);
}

/// The baseline's own outputs (through `dllm generate`) as answers: exact
/// match then scores 100% and `--check` passes; with one answer changed it
/// scores 75% and `--check` fails with the accuracy in its message.
#[test]
fn check_scores_exact_match_against_the_baseline() {
    let dir = stand_in("check", true);
    let prompts = [
        "add 4821+937=",
        "rev abcdefgh=",
        "copy qwertyui=",
        "sort zyx=",
    ];
    let mut rows = Vec::new();
    for prompt in prompts {
        let out = dllm(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--gen-length",
            "64",
            "--block-length",
            "32",
            "--cache",
            "none",
            "--threshold",
            "none",
            "--json",
        ]);
        assert_succeeds(&out);
        let value: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        rows.push(json!({"prompt": prompt, "answer": value["text"]}).to_string());
    }
    let good = write_set(&dir, "good.jsonl", &(rows.join("\n") + "\n"));
    let out = eval(
        &dir,
        &[
            "--set",
            good.to_str().unwrap(),
            "--only",
            "baseline",
            "--check",
        ],
    );
    assert_succeeds(&out);
    assert!(
        stdout(&out).contains("| baseline | 4/4 | 100.0% | 64.0 | "),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("check passed"), "{}", stderr(&out));

    rows[1] = json!({"prompt": prompts[1], "answer": "not what the model says"}).to_string();
    let bad = write_set(&dir, "bad.jsonl", &(rows.join("\n") + "\n"));
    let out = eval(
        &dir,
        &[
            "--set",
            bad.to_str().unwrap(),
            "--only",
            "baseline",
            "--check",
        ],
    );
    assert_fails(
        &out,
        &["check failed", "baseline accuracy 3/4 = 75.0% is below 95%"],
    );
    assert!(
        stdout(&out).contains("| baseline | 3/4 | 75.0% | "),
        "{}",
        stdout(&out)
    );
}
