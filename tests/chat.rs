//! Chat templates and the tokenizer against Python ground truth:
//! `tests/data/chat/chat_golden.json` holds jinja2/transformers renderings for
//! LLaDA (Llama-3 style) and Dream (Qwen style), and Dream's token ids of its
//! renderings (`add_special_tokens=False`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dllm::chat::{ChatTemplate, Message};
use dllm::tokenizer::TextTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    llada: Vec<Case>,
    dream: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    messages: Vec<Message>,
    rendered: String,
    /// Present for Dream only (LLaDA's tokenizer.json is not vendored).
    input_ids: Option<Vec<u32>>,
}

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chat")
        .join(rel)
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(data("chat_golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Dream's tokenizer.json is vendored gzipped (1.8 MB instead of 11 MB);
/// unpack it once per test run into cargo's scratch directory.
fn dream_tokenizer() -> &'static TextTokenizer {
    static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gz = std::fs::File::open(data("dream/tokenizer.compact.json.gz")).unwrap();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dream-tokenizer.json");
        let mut out = std::fs::File::create(&path).unwrap();
        std::io::copy(&mut flate2::read::GzDecoder::new(gz), &mut out).unwrap();
        TextTokenizer::load(&path).unwrap()
    })
}

/// Writes `json` as a tokenizer_config.json in its own scratch directory.
fn scratch_config(name: &str, json: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn llada_renders_like_transformers() {
    let template =
        ChatTemplate::from_tokenizer_config(&data("llada/tokenizer_config.json")).unwrap();
    for case in golden().llada {
        assert_eq!(
            template.render(&case.messages, true).unwrap(),
            case.rendered
        );
    }
}

#[test]
fn dream_renders_like_transformers() {
    let template =
        ChatTemplate::from_tokenizer_config(&data("dream/tokenizer_config.json")).unwrap();
    for case in golden().dream {
        assert_eq!(
            template.render(&case.messages, true).unwrap(),
            case.rendered
        );
        // Without the generation prompt Dream's template stops after the
        // last turn instead of opening the assistant's reply.
        let without = template.render(&case.messages, false).unwrap();
        assert_eq!(
            Some(without.as_str()),
            case.rendered.strip_suffix("<|im_start|>assistant\n")
        );
    }
}

#[test]
fn dream_token_ids_match_transformers() {
    let tokenizer = dream_tokenizer();
    for case in golden().dream {
        let ids = case.input_ids.expect("Dream cases carry input_ids");
        assert_eq!(tokenizer.encode(&case.rendered).unwrap(), ids);
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), case.rendered);
    }
}

#[test]
fn dream_special_tokens() {
    let tokenizer = dream_tokenizer();
    // 151643 byte-level BPE tokens plus Dream's 24 added tokens.
    assert_eq!(tokenizer.vocab_size(), 151_667);
    assert_eq!(tokenizer.token_id("<|mask|>"), Some(151_666));
    assert_eq!(tokenizer.token_id("<|endoftext|>"), Some(151_643));
    assert_eq!(tokenizer.token_id("no such token"), None);
    let ids = tokenizer.encode("<|im_start|>Hi<|mask|>").unwrap();
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "Hi");
}

#[test]
fn special_tokens_may_be_added_token_objects() {
    let path = scratch_config(
        "chat-added-token-objects",
        r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            "bos_token": {"content": "<s>", "lstrip": false, "special": true},
            "eos_token": "</s>"}"#,
    );
    let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
    let messages = [Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(template.render(&messages, true).unwrap(), "<s>hi</s>");
}

#[test]
fn raise_exception_fails_the_render() {
    let path = scratch_config(
        "chat-raise-exception",
        r#"{"chat_template": "{{ raise_exception('roles must alternate') }}"}"#,
    );
    let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
    match template.render(&[], true) {
        Err(dllm::Error::ChatTemplate(message)) => {
            assert!(message.contains("roles must alternate"), "{message}")
        }
        other => panic!("expected a chat template error, got {other:?}"),
    }
}

#[test]
fn missing_chat_template_is_a_clear_error() {
    let path = scratch_config(
        "chat-no-template",
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    );
    match ChatTemplate::from_tokenizer_config(&path) {
        Err(dllm::Error::ChatTemplate(message)) => {
            assert!(message.contains("chat_template"), "{message}")
        }
        other => panic!("expected a chat template error, got {other:?}"),
    }
}
