//! Bad input, one case per test: broken model directories, bad requests and
//! bad command lines. Each test checks that the failure is an error whose
//! message names the problem (a distinctive substring), and for the binary
//! that it exits non-zero without panicking.
//!
//! Broken model directories are built under `CARGO_TARGET_TMPDIR` from the
//! tiny golden models (tests/data/golden), one fresh directory per test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dllm::{DecodeOptions, Device, Engine, Model};
use serde_json::{Map, Value};

const LLADA: &str = "llada_tiny_s1";
const DREAM: &str = "dream_tiny_s1";
const LLADA2: &str = "llada2_tiny_s1";

// ---------------------------------------------------------------------------
// Fixtures

fn golden(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(model)
}

/// A fresh, empty directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bad_input")
        .join(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of a golden model's config.json and model.safetensors in a fresh directory.
fn copy_model(model: &str, test: &str) -> PathBuf {
    let dir = scratch(test);
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(golden(model).join(file), dir.join(file)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// One tensor of a safetensors file.
struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A minimal safetensors reader: the `__metadata__` entry and the tensors
/// in file order.
fn read_safetensors(path: &Path) -> (Option<Value>, Vec<Tensor>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut metadata = None;
    let mut tensors: Vec<(usize, Tensor)> = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            metadata = Some(info);
            continue;
        }
        let offsets: Vec<usize> = info["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        tensors.push((
            offsets[0],
            Tensor {
                name,
                dtype: info["dtype"].as_str().unwrap().to_string(),
                shape: info["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect(),
                data: data[offsets[0]..offsets[1]].to_vec(),
            },
        ));
    }
    tensors.sort_by_key(|(start, _)| *start);
    (metadata, tensors.into_iter().map(|(_, t)| t).collect())
}

/// A minimal safetensors writer: 8-byte little-endian header length, the
/// JSON header `{name: {dtype, shape, data_offsets}}`, then the data.
fn write_safetensors(path: &Path, metadata: Option<&Value>, tensors: &[Tensor]) {
    let mut header = Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m.clone());
    }
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = serde_json::to_string(&Value::Object(header))
        .unwrap()
        .into_bytes();
    // The format pads the header with spaces to an 8-byte boundary.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    std::fs::write(path, out).unwrap();
}

/// Rewrites `dir/model.safetensors` after `edit` changed its tensors.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let path = dir.join("model.safetensors");
    let (metadata, mut tensors) = read_safetensors(&path);
    let before: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    assert!(
        before.len() > 10,
        "the golden checkpoint should have been read: {before:?}"
    );
    edit(&mut tensors);
    write_safetensors(&path, metadata.as_ref(), &tensors);
}

fn tensor_mut<'a>(tensors: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("the golden checkpoint has no {name}"))
}

/// Dream's tokenizer.json (vendored gzipped in tests/data/chat) next to a
/// copy of the tiny Dream model.
fn dream_with_tokenizer(test: &str) -> PathBuf {
    let dir = copy_model(DREAM, test);
    let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chat/dream/tokenizer.compact.json.gz");
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// Running the binary and checking errors

fn dllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dllm"))
        .args(args)
        .output()
        .expect("running dllm")
}

/// `dllm generate --model DIR ARGS...`, small enough to be quick when it runs.
fn generate(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["generate", "--model", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    dllm(&all)
}

fn info(dir: &Path) -> Output {
    dllm(&["info", "--model", dir.to_str().unwrap()])
}

/// Exit status of a run error (`main` returns ExitCode::FAILURE).
const RUN_ERROR: i32 = 1;
/// Exit status of a clap usage error.
const USAGE_ERROR: i32 = 2;

/// Asserts that the run failed with `code`, did not panic, and printed
/// every one of `needles` on stderr. Returns stderr.
#[track_caller]
fn assert_fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "expected a failure, got success\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "dllm panicked:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status\nstderr: {stderr}"
    );
    assert!(
        stderr.starts_with("error"),
        "stderr should start with an error line:\n{stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr should contain {needle:?}:\n{stderr}"
        );
    }
    stderr
}

#[track_caller]
fn assert_succeeds(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "expected success, got {:?}\nstderr: {stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that `text` contains at least one of `alternatives`: the current
/// wording or the clearer one proposed for it.
#[track_caller]
fn assert_contains_any(text: &str, alternatives: &[&str]) {
    assert!(
        alternatives.iter().any(|a| text.contains(a)),
        "expected one of {alternatives:?} in:\n{text}"
    );
}

/// The full message of a library error, sources included ("a: b: c").
fn message(e: &dllm::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[track_caller]
fn open_err(dir: &Path) -> dllm::Error {
    match Model::open(dir) {
        Ok(_) => panic!("{} opened, expected an error", dir.display()),
        Err(e) => e,
    }
}

fn engine(model: &str) -> Engine {
    let model = Model::open(&golden(model)).expect("golden model opens");
    Engine::new(model, Device::Cpu).expect("cpu engine")
}

#[track_caller]
fn generate_err(engine: &Engine, prompt: &[u32], options: &DecodeOptions) -> dllm::Error {
    match engine.generate(prompt, options) {
        Ok(g) => panic!(
            "generation succeeded with {} tokens, expected an error",
            g.tokens.len()
        ),
        Err(e) => e,
    }
}

/// Options small enough for the tiny models.
fn small_options() -> DecodeOptions {
    DecodeOptions {
        gen_length: 8,
        block_length: 4,
        steps: 8,
        ..DecodeOptions::default()
    }
}

const SMALL: [&str; 4] = ["--gen-length", "8", "--block-length", "4"];

fn small(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = SMALL.to_vec();
    v.extend_from_slice(extra);
    v
}

// ---------------------------------------------------------------------------
// Controls: the fixtures themselves are good, so each failure below is the
// one defect the test introduces.

#[test]
fn control_copied_and_rewritten_models_load_and_generate() {
    for model in [LLADA, DREAM] {
        let dir = copy_model(model, &format!("control_{model}"));
        // Round-trip through the test's own reader and writer, unchanged.
        edit_tensors(&dir, |_| {});
        edit_config(&dir, |_| {});
        let stdout = assert_succeeds(&info(&dir));
        assert!(stdout.contains("architecture"), "{stdout}");
        let stdout = assert_succeeds(&generate(
            &dir,
            &small(&["--prompt-ids", "1,2,3", "--json"]),
        ));
        let json: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(json["tokens"].as_array().unwrap().len(), 8, "{stdout}");
    }
}

// ---------------------------------------------------------------------------
// 1-2, 5-6, 12: broken safetensors files (through the binary)

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_model(LLADA, "truncated_safetensors");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    // Cut in the middle of the tensor data (the header is about 4 KB).
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);
    let stderr = assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &["invalid safetensors file", path.to_str().unwrap()],
    );
    assert_contains_any(&stderr, &["file not fully covered", "truncated"]);
    // `info` opens the model the same way.
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["invalid safetensors file", path.to_str().unwrap()],
    );
}

#[test]
fn header_length_past_end_of_file_is_reported() {
    let dir = copy_model(LLADA, "header_past_eof");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // One byte more than the file holds after the length prefix (and below
    // the safetensors crate's 100 MB header limit).
    let n = bytes.len() as u64 - 7;
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let stderr = assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &["invalid safetensors file", path.to_str().unwrap()],
    );
    assert_contains_any(&stderr, &["invalid header length", "past the end"]);
}

#[test]
fn huge_header_length_is_reported() {
    let dir = copy_model(LLADA, "header_huge");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let stderr = assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["invalid safetensors file", path.to_str().unwrap()],
    );
    assert_contains_any(&stderr, &["header too large", "past the end"]);
}

#[test]
fn empty_safetensors_file_is_reported() {
    let dir = copy_model(LLADA, "empty_safetensors");
    let path = dir.join("model.safetensors");
    std::fs::write(&path, b"").unwrap();
    let stderr = assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["invalid safetensors file", path.to_str().unwrap()],
    );
    assert_contains_any(&stderr, &["header too small", "too short"]);
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_model(LLADA, "missing_tensor");
    assert_missing_tensor_is_named(&dir, "model.transformer.blocks.2.ff_proj.weight");
}

/// Removes the tensor `name` from `dir`'s checkpoint and checks that
/// generating names it as missing.
fn assert_missing_tensor_is_named(dir: &Path, name: &str) {
    edit_tensors(dir, |tensors| {
        let before = tensors.len();
        tensors.retain(|t| t.name != name);
        assert_eq!(tensors.len(), before - 1);
    });
    assert_fails(
        &generate(dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &[&format!("tensor {name}: missing from the checkpoint")],
    );
}

#[test]
fn missing_dream_bias_is_named() {
    // Dream's q/k/v biases are required by its config family.
    let dir = copy_model(DREAM, "missing_dream_bias");
    let name = "model.layers.1.self_attn.k_proj.bias";
    edit_tensors(&dir, |tensors| tensors.retain(|t| t.name != name));
    let e = open_err(&dir);
    assert!(matches!(e, dllm::Error::Tensor { .. }), "{e:?}");
    assert_eq!(
        message(&e),
        format!("tensor {name}: missing from the checkpoint")
    );
}

#[test]
fn tensor_of_wrong_shape_is_named() {
    let dir = copy_model(LLADA, "wrong_shape");
    let name = "model.transformer.blocks.0.q_proj.weight";
    // Same bytes, another shape: only the shape check can catch it.
    edit_tensors(&dir, |tensors| {
        tensor_mut(tensors, name).shape = vec![64, 256]
    });
    assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &[&format!(
            "tensor {name}: has shape [64, 256], expected [128, 128]"
        )],
    );
}

#[test]
fn dream_kv_projection_of_wrong_shape_is_named() {
    // Dream's tiny model has 2 key/value heads of 32: k_proj is [64, 128].
    let dir = copy_model(DREAM, "dream_wrong_kv_shape");
    let name = "model.layers.3.self_attn.k_proj.weight";
    edit_tensors(&dir, |tensors| {
        let t = tensor_mut(tensors, name);
        assert_eq!(t.shape, [64, 128]);
        t.shape = vec![128, 128];
        t.data = vec![0; 128 * 128 * 4];
    });
    let e = open_err(&dir);
    assert_eq!(
        message(&e),
        format!("tensor {name}: has shape [128, 128], expected [64, 128]")
    );
}

#[test]
fn config_that_disagrees_with_the_checkpoint_is_named() {
    // The config promises a bigger vocabulary than the embedding holds.
    let dir = copy_model(LLADA, "config_vocab_mismatch");
    edit_config(&dir, |c| {
        c.insert("embedding_size".into(), 1024.into());
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["tensor model.transformer.wte.weight: has shape [512, 128], expected [1024, 128]"],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = copy_model(LLADA, "dtype_i64");
    let name = "model.transformer.blocks.0.attn_norm.weight";
    edit_tensors(&dir, |tensors| {
        let t = tensor_mut(tensors, name);
        assert_eq!(t.shape, [128]);
        t.dtype = "I64".into();
        t.data = vec![0; 128 * 8];
    });
    assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &[&format!(
            "tensor {name}: has dtype I64; only F32, BF16 and F16 are supported"
        )],
    );
}

#[test]
fn missing_safetensors_is_reported() {
    let dir = copy_model(LLADA, "no_safetensors");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &[
            "model.safetensors",
            "no model.safetensors nor model.safetensors.index.json",
        ],
    );
}

#[test]
fn missing_shard_is_reported() {
    let sharded = golden(LLADA).join("sharded");
    let dir = scratch("missing_shard");
    for file in [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
    ] {
        std::fs::copy(sharded.join(file), dir.join(file)).unwrap();
    }
    let missing = dir.join("model-00002-of-00002.safetensors");
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &[
            &format!("cannot read {}", missing.display()),
            "No such file",
        ],
    );
}

// ---------------------------------------------------------------------------
// 3-4, 12: bad config.json (through the binary)

#[test]
fn malformed_config_json_is_reported() {
    let dir = copy_model(LLADA, "malformed_config");
    let path = dir.join("config.json");
    std::fs::write(&path, "{\"model_type\": \"llada\", \"d_model\": 128,\n").unwrap();
    assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        // The serde_json cause is printed after the crate's message.
        &[
            &format!("malformed JSON in {}", path.display()),
            "EOF while parsing",
        ],
    );
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let dir = copy_model(LLADA, "unknown_model_type");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &[
            "unknown model_type \"gpt2\"",
            "supported are \"llada\"",
            "\"Dream\"",
        ],
    );
}

#[test]
fn config_missing_a_required_field_names_it() {
    let dir = copy_model(LLADA, "config_missing_d_model");
    edit_config(&dir, |c| {
        c.remove("d_model").unwrap();
    });
    let config = dir.join("config.json");
    assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &[
            &format!("invalid model config {}", config.display()),
            "missing field \"d_model\"",
        ],
    );
}

#[test]
fn dream_config_missing_a_required_field_names_it() {
    let dir = copy_model(DREAM, "config_missing_max_positions");
    edit_config(&dir, |c| {
        c.remove("max_position_embeddings").unwrap();
    });
    let e = open_err(&dir);
    assert!(matches!(e, dllm::Error::Config { .. }), "{e:?}");
    assert!(
        message(&e).contains("missing field \"max_position_embeddings\""),
        "{e}"
    );
}

#[test]
fn config_field_of_wrong_type_names_it() {
    let dir = copy_model(LLADA, "config_string_n_layers");
    edit_config(&dir, |c| {
        c.insert("n_layers".into(), "4".into());
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["field \"n_layers\" must be a non-negative integer, got \"4\""],
    );
}

#[test]
fn missing_model_directory_is_reported() {
    let dir = scratch("missing_model_dir").join("no-such-model");
    assert_fails(
        &generate(&dir, &small(&["--prompt-ids", "1,2"])),
        RUN_ERROR,
        &[
            &format!("cannot read {}", dir.display()),
            "model directory not found",
        ],
    );
    let e = open_err(&dir);
    assert!(message(&e).contains("model directory not found"), "{e}");
}

// ---------------------------------------------------------------------------
// 7-11, 12: bad requests

#[test]
fn prompt_ids_outside_the_vocabulary_are_rejected() {
    assert_fails(
        &generate(&golden(LLADA), &small(&["--prompt-ids", "1,2,600"])),
        RUN_ERROR,
        &["prompt token id 600 is outside the vocabulary of 512 entries"],
    );
    // The first id just past the end is caught too, through the library.
    let engine = engine(DREAM);
    let e = generate_err(&engine, &[1, 512, 2], &small_options());
    assert!(matches!(e, dllm::Error::InvalidRequest(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "invalid request: prompt token id 512 is outside the vocabulary of 512 entries"
    );
}

#[test]
fn gen_length_not_a_multiple_of_block_length_is_rejected() {
    assert_fails(
        &generate(
            &golden(LLADA),
            &[
                "--prompt-ids",
                "1,2",
                "--gen-length",
                "10",
                "--block-length",
                "4",
            ],
        ),
        RUN_ERROR,
        &["gen_length 10 is not a multiple of block_length 4"],
    );
}

#[test]
fn steps_not_divisible_by_the_blocks_is_rejected() {
    assert_fails(
        &generate(
            &golden(LLADA),
            &[
                "--prompt-ids",
                "1,2",
                "--gen-length",
                "16",
                "--block-length",
                "4",
                "--steps",
                "6",
            ],
        ),
        RUN_ERROR,
        &["steps 6 is not a positive multiple of the number of blocks 4"],
    );
    let engine = engine(DREAM);
    let options = DecodeOptions {
        steps: 0,
        ..small_options()
    };
    let e = generate_err(&engine, &[1, 2], &options);
    assert!(
        e.to_string()
            .contains("steps 0 is not a positive multiple of the number of blocks 2"),
        "{e}"
    );
}

#[test]
fn zero_lengths_are_rejected() {
    for (gen, block) in [("0", "4"), ("8", "0")] {
        assert_fails(
            &generate(
                &golden(LLADA),
                &[
                    "--prompt-ids",
                    "1,2",
                    "--gen-length",
                    gen,
                    "--block-length",
                    block,
                ],
            ),
            RUN_ERROR,
            &["gen_length and block_length must be positive"],
        );
    }
}

#[test]
fn sequence_longer_than_the_model_maximum_is_rejected() {
    let dir = copy_model(LLADA, "short_max_sequence");
    edit_config(&dir, |c| {
        c.insert("max_sequence_length".into(), 16.into());
    });
    assert_fails(
        &generate(&dir, &["--prompt-ids", "1,2,3", "--gen-length", "16", "--block-length", "8"]),
        RUN_ERROR,
        &["prompt (3 tokens) plus gen_length (16) is 19, longer than the model's maximum sequence length 16"],
    );
    // Exactly at the limit is fine.
    assert_succeeds(&generate(
        &dir,
        &[
            "--prompt-ids",
            "1,2",
            "--gen-length",
            "14",
            "--block-length",
            "7",
        ],
    ));

    // The golden Dream model's own limit (4096), with a long prompt.
    let engine = engine(DREAM);
    let prompt = vec![7u32; 4090];
    let e = generate_err(&engine, &prompt, &small_options());
    assert!(
        e.to_string()
            .contains("prompt (4090 tokens) plus gen_length (8) is 4098, longer than the model's maximum sequence length 4096"),
        "{e}"
    );
}

#[test]
fn empty_prompt_ids_are_rejected() {
    // The command line cannot even express an empty id list.
    assert_fails(
        &generate(&golden(LLADA), &small(&["--prompt-ids", ""])),
        USAGE_ERROR,
        &[
            "invalid value '' for '--prompt-ids",
            "cannot parse integer from empty string",
        ],
    );
    // Through the library the decode plan rejects it.
    for model in [LLADA, DREAM] {
        let engine = engine(model);
        let e = generate_err(&engine, &[], &small_options());
        assert!(matches!(e, dllm::Error::InvalidRequest(_)), "{e:?}");
        assert_eq!(e.to_string(), "invalid request: the prompt is empty");
    }
}

#[test]
fn empty_prompt_text_without_tokenizer_is_rejected() {
    // With no tokenizer.json, any text prompt fails before it is encoded.
    assert_fails(
        &generate(&golden(LLADA), &small(&["--prompt", ""])),
        RUN_ERROR,
        &["has no tokenizer.json: pass token ids instead of text"],
    );
}

#[test]
fn empty_prompt_text_with_tokenizer_is_rejected() {
    let dir = dream_with_tokenizer("empty_prompt_text");
    assert_fails(
        &generate(&dir, &small(&["--prompt", ""])),
        RUN_ERROR,
        &["the prompt is empty"],
    );
    // The tokenizer is loaded and used: real text encodes to Qwen ids, far
    // outside the tiny model's 512 entries, and that is reported too.
    assert_fails(
        &generate(&dir, &small(&["--prompt", "Hello world"])),
        RUN_ERROR,
        &[
            "prompt token id",
            "is outside the vocabulary of 512 entries",
        ],
    );
}

#[test]
fn chat_without_a_template_is_rejected() {
    let dir = dream_with_tokenizer("chat_without_template");
    assert_fails(
        &generate(&dir, &small(&["--prompt", "hi", "--chat"])),
        RUN_ERROR,
        &[
            "chat template",
            "has no tokenizer_config.json with a chat_template",
        ],
    );
}

#[test]
fn prompt_text_without_tokenizer_is_rejected() {
    let stderr = assert_fails(
        &generate(&golden(LLADA), &small(&["--prompt", "add 4821+937="])),
        RUN_ERROR,
        &[
            "tokenizer:",
            "has no tokenizer.json: pass token ids instead of text",
        ],
    );
    assert!(
        stderr.contains(golden(LLADA).to_str().unwrap()),
        "the message names the model: {stderr}"
    );
    let engine = engine(LLADA);
    let e = engine
        .encode_prompt("add", false)
        .expect_err("no tokenizer");
    assert!(matches!(e, dllm::Error::Tokenizer(_)), "{e:?}");
}

#[test]
fn threshold_with_factor_is_rejected() {
    assert_fails(
        &generate(
            &golden(LLADA),
            &small(&[
                "--prompt-ids",
                "1,2",
                "--threshold",
                "0.9",
                "--factor",
                "1.0",
            ]),
        ),
        RUN_ERROR,
        &["threshold and factor are two different transfer rules: give one"],
    );
    let engine = engine(DREAM);
    let options = DecodeOptions {
        threshold: Some(0.9),
        factor: Some(1.0),
        ..small_options()
    };
    let e = generate_err(&engine, &[1, 2], &options);
    assert!(
        e.to_string()
            .contains("threshold and factor are two different transfer rules"),
        "{e}"
    );
}

#[test]
fn special_ids_outside_the_vocabulary_are_rejected() {
    assert_fails(
        &generate(
            &golden(LLADA),
            &small(&["--prompt-ids", "1,2", "--mask-id", "9999"]),
        ),
        RUN_ERROR,
        &["mask id 9999 is outside the vocabulary of 512 entries"],
    );
    assert_fails(
        &generate(
            &golden(DREAM),
            &small(&["--prompt-ids", "1,2", "--eos-id", "512"]),
        ),
        RUN_ERROR,
        &["eos id 512 is outside the vocabulary of 512 entries"],
    );
}

#[test]
fn non_positive_threshold_is_rejected() {
    assert_fails(
        &generate(
            &golden(LLADA),
            &small(&["--prompt-ids", "1,2", "--threshold", "0"]),
        ),
        RUN_ERROR,
        &["threshold must be a positive number, got 0"],
    );
    assert_fails(
        &generate(
            &golden(LLADA),
            &small(&["--prompt-ids", "1,2", "--threshold", "high"]),
        ),
        USAGE_ERROR,
        &["expected a number or \"none\", got \"high\""],
    );
}

/// A mask id the model itself predicts (here a wrong `--mask-id`) would leave
/// committed positions masked forever: the loop must stop with a message.
#[test]
fn mask_id_predicted_by_the_model_does_not_hang() {
    let dir = golden(LLADA);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dllm"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "1,2",
        ])
        .args([
            "--gen-length",
            "16",
            "--block-length",
            "8",
            "--mask-id",
            "264",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("dllm generate with --mask-id 264 still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !status.success() && stderr.contains("mask id 264"),
        "{status:?}\n{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Quantized checkpoints (written by `dllm quantize`)

/// `dllm quantize --model <golden model> --out <fresh directory> ARGS...`.
fn quantize(model: &str, test: &str, args: &[&str]) -> (Output, PathBuf) {
    let (source, dir) = (golden(model), scratch(test));
    let mut all = vec!["quantize", "--model", source.to_str().unwrap()];
    all.extend(["--out", dir.to_str().unwrap()]);
    all.extend_from_slice(args);
    (dllm(&all), dir)
}

/// A golden model quantized to `bits` (4 bits in groups of 32) into a fresh directory.
fn quantized_model(model: &str, bits: &str, test: &str) -> PathBuf {
    let (out, dir) = quantize(model, test, &["--bits", bits]);
    assert_succeeds(&out);
    dir
}

/// `dllm generate` on the tiny LLaDA quantized at load to 4 bits in groups of `group`.
fn generate_int4(group: &'static str) -> Output {
    let args = [
        "--prompt-ids",
        "1,2",
        "--weights",
        "int4",
        "--group-size",
        group,
    ];
    generate(&golden(LLADA), &small(&args))
}

#[test]
fn control_quantized_models_load_and_generate() {
    for (model, bits) in [(LLADA, "8"), (DREAM, "4")] {
        let dir = quantized_model(model, bits, &format!("control_quantized_{model}_{bits}"));
        assert_succeeds(&generate(&dir, &small(&["--prompt-ids", "1,2"])));
        assert!(assert_succeeds(&info(&dir)).contains("quantized"));
    }
}

#[test]
fn missing_scale_tensor_is_named() {
    let dir = quantized_model(LLADA, "8", "missing_scale");
    assert_missing_tensor_is_named(&dir, "model.transformer.blocks.1.up_proj.weight_scale");
}

#[test]
fn group_size_that_does_not_divide_the_rows_is_rejected() {
    // The tiny LLaDA's down projection has rows of 352 inputs: 11 × 32.
    let want = "tensor model.transformer.blocks.0.ff_out.weight: group size 64 does not divide its rows of 352 inputs";
    let (out, _) = quantize(
        LLADA,
        "group_size_quantize",
        &["--bits", "4", "--group-size", "64"],
    );
    assert_fails(&out, RUN_ERROR, &[want]);
    assert_fails(&generate_int4("64"), RUN_ERROR, &[want]);
    // A checkpoint whose config claims other groups than its scales hold:
    // the first matrix's scales have the wrong shape.
    let dir = quantized_model(LLADA, "4", "group_size_config");
    edit_config(&dir, |c| {
        c["quantization_config"]["group_size"] = 64.into();
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["tensor model.transformer.blocks.0.q_proj.weight_scale: has shape [128, 4], expected [128, 2]"],
    );
}

#[test]
fn unsupported_group_size_and_bits_are_rejected() {
    assert_fails(
        &generate_int4("48"),
        RUN_ERROR,
        &["group size 48 is not supported: expected one of [32, 64, 128]"],
    );
    let (out, _) = quantize(LLADA, "quantize_3_bits", &["--bits", "3"]);
    assert_fails(
        &out,
        RUN_ERROR,
        &["3 bits are not supported: expected 8 or 4"],
    );
}

#[test]
fn unknown_quantization_format_is_named() {
    let dir = quantized_model(LLADA, "8", "unknown_quant_method");
    edit_config(&dir, |c| {
        c["quantization_config"]["quant_method"] = "gptq".into();
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["unknown quant_method \"gptq\"; supported is \"dllm-weight-only\""],
    );
}

#[test]
fn quantized_values_of_the_wrong_dtype_are_named() {
    let dir = quantized_model(LLADA, "8", "quantized_wrong_dtype");
    let name = "model.transformer.blocks.0.k_proj.weight";
    edit_tensors(&dir, |tensors| {
        tensor_mut(tensors, name).dtype = "U8".into()
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &[&format!("tensor {name}: has dtype u8, expected i8")],
    );
}

// ---------------------------------------------------------------------------
// LLaDA2 (llada2_moe): mixture-of-experts configs and the samplers' flags

/// Flags of a small LLaDA2 request.
const LLADA2_SMALL: [&str; 8] = [
    "--prompt-ids",
    "1,2,3",
    "--gen-length",
    "8",
    "--block-length",
    "4",
    "--sampler",
    "llada21",
];

#[test]
fn control_llada2_copy_loads_and_generates() {
    let dir = copy_model(LLADA2, "control_llada2");
    edit_tensors(&dir, |_| {});
    edit_config(&dir, |_| {});
    let stdout = assert_succeeds(&info(&dir));
    assert!(stdout.contains("experts"), "{stdout}");
    let mut args = LLADA2_SMALL.to_vec();
    args.push("--json");
    let json: Value = serde_json::from_str(assert_succeeds(&generate(&dir, &args)).trim()).unwrap();
    assert!(!json["tokens"].as_array().unwrap().is_empty(), "{json}");
}

#[test]
fn group_count_that_does_not_divide_the_experts_is_rejected() {
    let dir = copy_model(LLADA2, "llada2_groups");
    edit_config(&dir, |c| {
        c.insert("n_group".into(), 3.into());
    });
    assert_fails(
        &generate(&dir, &LLADA2_SMALL),
        RUN_ERROR,
        &["n_group 3 does not divide num_experts 8"],
    );
}

#[test]
fn top_k_beyond_the_experts_of_the_chosen_groups_is_rejected() {
    // 2 groups of 2 experts are chosen: 4 experts, not 5.
    let dir = copy_model(LLADA2, "llada2_top_k");
    edit_config(&dir, |c| {
        c.insert("num_experts_per_tok".into(), 5.into());
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["num_experts_per_tok 5 is larger than the 4 experts in the topk_group 2 chosen groups of 2"],
    );
}

#[test]
fn missing_expert_tensor_is_named() {
    let dir = copy_model(LLADA2, "llada2_missing_expert");
    let name = "model.layers.2.mlp.experts.5.up_proj.weight";
    edit_tensors(&dir, |tensors| {
        let before = tensors.len();
        tensors.retain(|t| t.name != name);
        assert_eq!(tensors.len(), before - 1);
    });
    assert_fails(
        &generate(&dir, &LLADA2_SMALL),
        RUN_ERROR,
        &[&format!("tensor {name}: missing from the checkpoint")],
    );
}

#[test]
fn partial_rotary_factor_leaving_odd_rotated_dims_is_rejected() {
    // 32 x 0.46875 = 15 dims: RoPE rotates pairs.
    let dir = copy_model(LLADA2, "llada2_odd_rotary");
    edit_config(&dir, |c| {
        c.insert("partial_rotary_factor".into(), 0.46875.into());
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &[
            "partial_rotary_factor 0.46875 rotates 15 of 32 dims",
            "must be even",
        ],
    );
}

#[test]
fn router_the_reference_does_not_implement_is_rejected() {
    let dir = copy_model(LLADA2, "llada2_softmax_router");
    edit_config(&dir, |c| {
        c.insert("score_function".into(), "softmax".into());
    });
    assert_fails(
        &info(&dir),
        RUN_ERROR,
        &["score_function \"softmax\" is not supported"],
    );
}

#[test]
fn llada2_without_a_sampler_is_told_to_choose_one() {
    assert_fails(
        &generate(&golden(LLADA2), &LLADA2_SMALL[..6]),
        RUN_ERROR,
        &["--sampler llada20|llada21"],
    );
}

#[test]
fn llada2_sampler_on_another_family_is_rejected() {
    assert_fails(
        &generate(&golden(LLADA), &LLADA2_SMALL),
        RUN_ERROR,
        &["the LLaDA2 samplers decode llada2_moe models; this is a llada model"],
    );
}

#[test]
fn editing_flags_without_the_llada21_sampler_are_rejected() {
    let mut args = LLADA2_SMALL[..6].to_vec();
    args.extend(["--sampler", "llada20", "--editing-threshold", "0.5"]);
    assert_fails(
        &generate(&golden(LLADA2), &args),
        RUN_ERROR,
        &["editing_threshold (--editing-threshold) belongs to the LLaDA2.1 sampler"],
    );
    assert_fails(
        &generate(
            &golden(LLADA),
            &small(&["--prompt-ids", "1,2", "--eos-early-stop"]),
        ),
        USAGE_ERROR,
        &["--sampler"],
    );
}

#[test]
fn zero_num_to_transfer_is_rejected() {
    let mut args = LLADA2_SMALL.to_vec();
    args.extend(["--num-to-transfer", "0"]);
    assert_fails(
        &generate(&golden(LLADA2), &args),
        RUN_ERROR,
        &["num_to_transfer must be at least 1"],
    );
}

#[test]
fn llada2_flags_of_the_semi_autoregressive_samplers_are_rejected() {
    let mut args = LLADA2_SMALL.to_vec();
    args.extend(["--suffix-window", "4"]);
    assert_fails(
        &generate(&golden(LLADA2), &args),
        RUN_ERROR,
        &["suffix_window belongs to the semi-autoregressive samplers"],
    );
}
