//! Errors as OpenAI's API reports them: an HTTP status and
//! `{"error": {"message", "type", "param", "code"}}`, where `param` names the
//! request field at fault, so a client can tell which value to fix.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// OpenAI's `type`: what kind of failure.
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    /// Seconds a client should wait before trying again.
    retry_after: Option<u32>,
}

/// How the engine's messages name the request fields, and the names the API
/// gives them (the generation length is OpenAI's `max_tokens`).
/// The prompt is left out: a message about the prompt and an option (a
/// prompt too long for `max_tokens`) is about the option, and one about the
/// prompt alone falls back to the prompt's field.
const ENGINE_FIELDS: &[(&str, &str)] = &[
    ("gen_length", "max_tokens"),
    ("block_length", "block_length"),
    ("steps", "steps"),
    ("threshold", "threshold"),
    ("factor", "factor"),
    ("suffix_window", "suffix_window"),
    ("suffix_tail", "suffix_tail"),
    ("confidence_alpha", "confidence_alpha"),
    ("alg", "alg"),
    ("mask id", "mask_id"),
    ("mask_token_id", "mask_id"),
    ("eos id", "eos_id"),
    ("eos_token_id", "eos_id"),
    ("early_exit", "early_exit"),
    ("editing_threshold", "editing_threshold"),
    ("max_post_steps", "max_post_steps"),
    ("num_to_transfer", "num_to_transfer"),
    ("LLaDA2 samplers", "sampler"),
];

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A bad request about the field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// A body that is not JSON at all.
    pub fn malformed(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            code: Some("body_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key: send \"Authorization: Bearer KEY\"",
            )
        }
    }

    pub fn queue_full(in_flight: usize) -> ApiError {
        ApiError {
            code: Some("queue_full"),
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_overloaded",
                format!("the server has {in_flight} requests in flight, its limit: retry later"),
            )
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no endpoint {path}"),
        )
    }

    /// An engine error. Bad requests name the field the engine's message is
    /// about (the first option it mentions, else `prompt_field`: the request
    /// field holding the prompt).
    pub fn from_engine(error: dllm::Error, prompt_field: &str) -> ApiError {
        match error {
            dllm::Error::InvalidRequest(message) => {
                let param = field_named_in(&message).unwrap_or(prompt_field);
                ApiError::invalid(param, message.replace("gen_length", "max_tokens"))
            }
            dllm::Error::Tokenizer(_) | dllm::Error::ChatTemplate(_) => {
                ApiError::invalid(prompt_field, error.to_string())
            }
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                other.to_string(),
            ),
        }
    }

    /// The JSON body, also sent as an event when a stream fails midway.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// The API name of the field that `message` mentions first, as a whole word.
fn field_named_in(message: &str) -> Option<&'static str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    ENGINE_FIELDS
        .iter()
        .filter_map(|&(engine_name, api_name)| {
            message
                .match_indices(engine_name)
                .find(|&(at, _)| {
                    let before = message[..at].chars().next_back();
                    let after = message[at + engine_name.len()..].chars().next();
                    !before.is_some_and(is_word) && !after.is_some_and(is_word)
                })
                .map(|(at, _)| (at, api_name))
        })
        .min_by_key(|&(at, _)| at)
        .map(|(_, api_name)| api_name)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::warn!(status = self.status.as_u16(), param = ?self.param, "{}", self.message);
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::field_named_in;

    #[test]
    fn engine_messages_name_their_field() {
        let cases = [
            ("gen_length 10 is not a multiple of block_length 32", "max_tokens"),
            ("steps 3 is not a positive multiple of the number of blocks 2 (gen_length / block_length)", "steps"),
            ("prompt (80 tokens) plus gen_length (64) is 144, longer than the model's maximum sequence length 90", "max_tokens"),
            ("alg confidence_threshold needs a threshold", "alg"),
            ("a threshold goes with alg confidence_threshold, not entropy", "threshold"),
            ("mask id 900 is outside the vocabulary of 128 entries", "mask_id"),
        ];
        for (message, field) in cases {
            assert_eq!(field_named_in(message), Some(field), "{message}");
        }
        assert_eq!(field_named_in("the prompt is empty"), None);
    }
}
