//! The request bodies of `/v1/completions` and `/v1/chat/completions`,
//! checked and turned into a [`Job`] for the engine.
//!
//! A body is read in passes over its JSON object, each taking the fields it
//! knows: the endpoint's own, then those both endpoints share, then the
//! decoding flags of `dllm generate` ([`DecodingArgs`]), so the server and
//! the command line resolve defaults alike. A field none knows is refused,
//! as OpenAI refuses unknown arguments: a misspelt option must not silently
//! fall back to its default.

use std::collections::BTreeSet;

use dllm::chat::Message;
use dllm::{DecodeOptions, Engine};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::cli::request::DecodingArgs;

/// What both endpoints share besides the prompt.
#[derive(Deserialize)]
struct Common {
    /// Any name is accepted: the server serves one model.
    #[serde(rename = "model")]
    _model: Option<String>,
    /// OpenAI's end-user id, for the client's own records.
    #[serde(rename = "user")]
    _user: Option<String>,
    /// Choices per request: only one.
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    /// The usage always comes with the last chunk.
    #[serde(rename = "stream_options")]
    _stream_options: Option<Map<String, Value>>,
    stop: Option<Stop>,
    #[serde(default)]
    return_token_ids: bool,
    /// Extension: also stream the block being decoded after every step.
    #[serde(default)]
    stream_steps: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionFields {
    /// A string, or a list of token ids: checked by [`prompt_ids`].
    prompt: Option<Value>,
    #[serde(default)]
    echo: bool,
}

#[derive(Deserialize)]
struct ChatFields {
    messages: Option<Vec<Message>>,
}

/// A checked request, ready to submit.
pub struct Job {
    pub prompt: Vec<u32>,
    pub options: DecodeOptions,
    pub stream: bool,
    pub stream_steps: bool,
    pub stop: Vec<String>,
    /// Completions with `echo`: the prompt's text comes before the output.
    pub echo: bool,
    pub return_token_ids: bool,
}

/// A `/v1/completions` body.
pub fn completion_job(engine: &Engine, body: &[u8]) -> Result<Job, ApiError> {
    let (fields, common, decoding) = read_body::<CompletionFields>(body)?;
    let prompt = fields
        .prompt
        .ok_or_else(|| ApiError::invalid("prompt", "prompt is required"))?;
    let prompt = prompt_ids(engine, &prompt)?;
    job(engine, prompt, common, &decoding, fields.echo)
}

/// A `/v1/chat/completions` body.
pub fn chat_job(engine: &Engine, body: &[u8]) -> Result<Job, ApiError> {
    let (fields, common, decoding) = read_body::<ChatFields>(body)?;
    let messages = fields.messages.unwrap_or_default();
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must be a non-empty list",
        ));
    }
    let prompt = engine
        .encode_chat(&messages)
        .map_err(|e| ApiError::from_engine(e, "messages"))?;
    job(engine, prompt, common, &decoding, false)
}

fn job(
    engine: &Engine,
    prompt: Vec<u32>,
    common: Common,
    decoding: &DecodingArgs,
    echo: bool,
) -> Result<Job, ApiError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "only one choice per request (n = 1)",
        ));
    }
    let stop = match common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(list)) => list,
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "a stop sequence is empty"));
    }
    if common.stream_steps && !common.stream {
        return Err(ApiError::invalid(
            "stream_steps",
            "stream_steps needs stream: true",
        ));
    }
    // A default length cut to fit the model is the model's limit; the note
    // saying so is for a terminal.
    let (options, _) = decoding
        .options(&engine.model().config, prompt.len())
        .map_err(|e| ApiError::from_engine(e, "prompt"))?;
    Ok(Job {
        prompt,
        options,
        stream: common.stream,
        stream_steps: common.stream_steps,
        stop,
        echo,
        return_token_ids: common.return_token_ids,
    })
}

/// The prompt's ids: a string encoded by the model's tokenizer, or a list of
/// token ids as given (the engine checks them against the vocabulary).
fn prompt_ids(engine: &Engine, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let expected = "prompt must be a string or a list of token ids (one prompt per request)";
    match prompt {
        Value::String(text) => engine
            .encode_prompt(text, false)
            .map_err(|e| ApiError::from_engine(e, "prompt")),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| ApiError::invalid("prompt", expected))
            })
            .collect(),
        _ => Err(ApiError::invalid("prompt", expected)),
    }
}

/// The endpoint's own fields, the shared ones and the decoding flags of a
/// JSON object body.
fn read_body<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Common, DecodingArgs), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::malformed("the body must be a JSON object"));
    };
    let endpoint = take::<T>(&mut fields)?;
    let common = take::<Common>(&mut fields)?;
    let decoding = take::<DecodingArgs>(&mut fields)?;
    if let Some(field) = fields.keys().next() {
        return Err(ApiError::invalid(
            field.as_str(),
            format!("unknown field {field:?}"),
        ));
    }
    Ok((endpoint, common, decoding))
}

/// Reads a `T` from `fields`, leaving there only the fields `T` does not
/// have. A value of the wrong type is an error naming its field.
fn take<T: DeserializeOwned>(fields: &mut Map<String, Value>) -> Result<T, ApiError> {
    let mut unknown = BTreeSet::new();
    let mut track = serde_path_to_error::Track::new();
    let value = Value::Object(fields.clone());
    let read = serde_ignored::deserialize(
        serde_path_to_error::Deserializer::new(value, &mut track),
        |path| {
            if let serde_ignored::Path::Map {
                parent: serde_ignored::Path::Root,
                key,
            } = path
            {
                unknown.insert(key.clone());
            }
        },
    );
    match read {
        Ok(read) => {
            fields.retain(|key, _| unknown.contains(key));
            Ok(read)
        }
        Err(e) => {
            let field = track.path().to_string();
            Err(ApiError::invalid(field.clone(), format!("{field}: {e}")))
        }
    }
}
