//! One request's answer: the engine's events turned into OpenAI's response,
//! whole or as server-sent events.
//!
//! Streaming sends one chunk per completed block (the text it adds, after
//! stop sequences), then a chunk with `finish_reason` and `usage`, then
//! `data: [DONE]`. With the `stream_steps` extension a chunk after every
//! step also carries the block being decoded, masks included, under the
//! choice's `step` key; its `text` stays empty, so a client that only
//! concatenates texts reads the same output.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dllm::{Event, Generation};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::api::Job;
use super::decoding::Decoding;
use super::error::ApiError;
use super::metrics::Outcome;
use super::routes::Server;
use super::stop::StopFilter;
use crate::cli::text::{text_of, IncrementalText};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }

    /// The request field the prompt comes from.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Endpoint::Completions => "prompt",
            Endpoint::Chat => "messages",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The choice of a whole response.
    fn choice(self, text: String, finish_reason: &str) -> Value {
        let mut choice = match self {
            Endpoint::Completions => json!({ "text": text }),
            Endpoint::Chat => json!({ "message": { "role": "assistant", "content": text } }),
        };
        choice["index"] = 0.into();
        choice["logprobs"] = Value::Null;
        choice["finish_reason"] = finish_reason.into();
        choice
    }

    /// The choice of a stream chunk adding `text`; chat's first chunk also
    /// names the role.
    fn delta(self, text: &str, first: bool) -> Value {
        let mut choice = match self {
            Endpoint::Completions => json!({ "text": text }),
            Endpoint::Chat if first => json!({ "delta": { "role": "assistant", "content": text } }),
            Endpoint::Chat if text.is_empty() => json!({ "delta": {} }),
            Endpoint::Chat => json!({ "delta": { "content": text } }),
        };
        choice["index"] = 0.into();
        choice["logprobs"] = Value::Null;
        choice["finish_reason"] = Value::Null;
        choice
    }
}

/// A request in flight and the answer taking shape. Dropped before the
/// engine is done, it counts as cancelled (and [`Decoding`] cancels it).
pub struct Reply {
    server: Arc<Server>,
    endpoint: Endpoint,
    decoding: Decoding,
    id: String,
    created: u64,
    started: Instant,
    prompt_tokens: usize,
    mask_id: Option<u32>,
    eos_id: Option<u32>,
    return_token_ids: bool,
    /// The echoed prompt, sent before the output.
    echo: Option<String>,
    text: IncrementalText,
    /// Generated ids sent so far in blocks.
    streamed: usize,
    stop: StopFilter,
    finished: bool,
}

impl Reply {
    pub fn new(
        server: Arc<Server>,
        endpoint: Endpoint,
        job: Job,
        decoding: Decoding,
    ) -> Result<Reply, ApiError> {
        let model = server.engine().model();
        let config = &model.config;
        let echo = match job.echo {
            true => Some(
                text_of(model.tokenizer.as_deref(), &job.prompt, true)
                    .map_err(|e| ApiError::from_engine(e, "prompt"))?,
            ),
            false => None,
        };
        Ok(Reply {
            id: format!("{}-{}", endpoint.id_prefix(), server.next_request_id()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            started: Instant::now(),
            prompt_tokens: job.prompt.len(),
            mask_id: job.options.mask_id.or(config.mask_id),
            eos_id: job.options.eos_id.or(config.eos_id),
            return_token_ids: job.return_token_ids,
            echo,
            text: IncrementalText::new(model.tokenizer.clone()),
            streamed: 0,
            stop: StopFilter::new(job.stop),
            finished: false,
            decoding,
            endpoint,
            server,
        })
    }

    /// The whole response, once the engine is done.
    pub async fn complete(mut self) -> Response {
        let generation = loop {
            match self.decoding.next().await {
                Some(Event::Done(result)) => break result,
                Some(Event::Block { .. } | Event::Step { .. }) => continue,
                None => break Err(dllm::Error::Internal("the engine stopped".into())),
            }
        };
        let answer = generation
            .map_err(|e| ApiError::from_engine(e, self.endpoint.prompt_field()))
            .and_then(|generation| {
                let mut text = self.echo.take().unwrap_or_default();
                text += &self.output(&generation.tokens)?;
                text += &self.stop.finish();
                Ok((text, generation))
            });
        match answer {
            Ok((text, generation)) => {
                let finish_reason = self.finish(&generation);
                let mut choice = self.endpoint.choice(text, finish_reason);
                if self.return_token_ids {
                    choice["token_ids"] = json!(generation.tokens);
                }
                let mut body = self.envelope(false, choice);
                body["usage"] = self.usage(&generation);
                Json(body).into_response()
            }
            Err(error) => {
                self.fail(&error);
                error.into_response()
            }
        }
    }

    /// The response as server-sent events.
    pub fn stream(mut self) -> Response {
        let opening = match (self.endpoint, self.echo.take()) {
            (Endpoint::Chat, _) => Some(self.chunk(self.endpoint.delta("", true))),
            (Endpoint::Completions, Some(echo)) => {
                Some(self.chunk(self.endpoint.delta(&echo, false)))
            }
            (Endpoint::Completions, None) => None,
        };
        let events = stream::unfold(Some(self), |reply| async move {
            let mut reply = reply?;
            let event = reply.decoding.next().await;
            let frames = reply.frames_of(event);
            Some((frames, (!reply.finished).then_some(reply)))
        });
        let body = stream::iter(opening)
            .chain(events)
            .map(|frames| Ok::<Bytes, Infallible>(Bytes::from(frames)));
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(body),
        )
            .into_response()
    }

    /// The server-sent events an engine event becomes.
    fn frames_of(&mut self, event: Option<Event>) -> String {
        match event {
            Some(Event::Step { index, tokens }) => {
                let tokenizer = self.server.engine().model().tokenizer.clone();
                let mut choice = self.endpoint.delta("", false);
                choice["step"] = json!({
                    "block": index,
                    "text": text_of(tokenizer.as_deref(), &tokens, false).unwrap_or_default(),
                    "masked": tokens.iter().filter(|&&t| Some(t) == self.mask_id).count(),
                    "token_ids": tokens,
                });
                self.chunk(choice)
            }
            Some(Event::Block { tokens, .. }) => match self.output(&tokens) {
                Ok(text) => {
                    self.streamed += tokens.len();
                    let mut choice = self.endpoint.delta(&text, false);
                    if self.return_token_ids {
                        choice["token_ids"] = json!(tokens);
                    }
                    self.chunk(choice)
                }
                Err(error) => self.failed_stream(&error),
            },
            // The last chunk carries what no block did (the EOS that early
            // exit fills in), so the chunks add up to the whole response.
            Some(Event::Done(Ok(generation))) => {
                let tail = &generation.tokens[self.streamed.min(generation.tokens.len())..];
                let rest = match self.output(tail) {
                    Ok(text) => text + &self.stop.finish(),
                    Err(error) => return self.failed_stream(&error),
                };
                let mut choice = self.endpoint.delta(&rest, false);
                choice["finish_reason"] = self.finish(&generation).into();
                if self.return_token_ids {
                    choice["token_ids"] = json!(tail);
                }
                let mut last = self.envelope(true, choice);
                last["usage"] = self.usage(&generation);
                frame(&last) + "data: [DONE]\n\n"
            }
            Some(Event::Done(Err(error))) => {
                self.failed_stream(&ApiError::from_engine(error, self.endpoint.prompt_field()))
            }
            None => self.failed_stream(&ApiError::from_engine(
                dllm::Error::Internal("the engine stopped".into()),
                self.endpoint.prompt_field(),
            )),
        }
    }

    /// The text `tokens` add to the output, as far as the stop sequences
    /// let it out yet.
    fn output(&mut self, tokens: &[u32]) -> Result<String, ApiError> {
        let piece = self
            .text
            .push(tokens)
            .map_err(|e| ApiError::from_engine(e, self.endpoint.prompt_field()))?;
        Ok(self.stop.feed(&piece))
    }

    fn chunk(&self, choice: Value) -> String {
        frame(&self.envelope(true, choice))
    }

    fn envelope(&self, chunk: bool, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.endpoint.object(chunk),
            "created": self.created,
            "model": self.server.model_name(),
            "choices": [choice],
        })
    }

    fn usage(&self, generation: &Generation) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": generation.non_eos_tokens,
            "total_tokens": self.prompt_tokens + generation.non_eos_tokens,
            "nfe": generation.nfe,
        })
    }

    /// Records a finished generation; returns its `finish_reason`: "stop"
    /// at a stop sequence or EOS, "length" when the output filled
    /// `max_tokens`.
    fn finish(&mut self, generation: &Generation) -> &'static str {
        self.finished = true;
        let finish_reason = match self.stop.stopped()
            || self
                .eos_id
                .is_some_and(|eos| generation.tokens.contains(&eos))
        {
            true => "stop",
            false => "length",
        };
        self.server.metrics().count_generation(
            Outcome::Done,
            self.prompt_tokens,
            generation.non_eos_tokens,
            generation.nfe,
        );
        tracing::info!(
            id = self.id,
            endpoint = self.endpoint.path(),
            prompt_tokens = self.prompt_tokens,
            generated_tokens = generation.non_eos_tokens,
            nfe = generation.nfe,
            ms = milliseconds(self.started),
            finish_reason,
            "done"
        );
        finish_reason
    }

    fn fail(&mut self, error: &ApiError) {
        self.finished = true;
        self.server
            .metrics()
            .count_generation(Outcome::Failed, self.prompt_tokens, 0, 0);
        tracing::warn!(id = self.id, endpoint = self.endpoint.path(), body = %error.body(), "failed");
    }

    /// A stream that fails after its first bytes can no longer change its
    /// status: the error object is its last event.
    fn failed_stream(&mut self, error: &ApiError) -> String {
        self.fail(error);
        frame(&error.body()) + "data: [DONE]\n\n"
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.finished {
            self.server
                .metrics()
                .count_generation(Outcome::Cancelled, self.prompt_tokens, 0, 0);
            tracing::info!(
                id = self.id,
                endpoint = self.endpoint.path(),
                prompt_tokens = self.prompt_tokens,
                ms = milliseconds(self.started),
                "cancelled: the client went away"
            );
        }
    }
}

/// Milliseconds since `start`, to a tenth, for the log.
fn milliseconds(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

/// One server-sent event.
fn frame(data: &Value) -> String {
    format!("data: {data}\n\n")
}
