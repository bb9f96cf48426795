//! Model hyper-parameters read from a Hugging Face `config.json`.
//!
//! Both families are reduced to one [`ModelConfig`]: the runtime's model code
//! only ever sees this struct, never the family-specific JSON keys.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Which checkpoint layout and sampler conventions a model follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaDA-8B-Instruct / LLaDA-1.5 (`model_type: "llada"`).
    Llada,
    /// Dream-v0-Instruct-7B (`model_type: "Dream"`, Qwen2 layout, shifted logits).
    Dream,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llada => "llada",
            Family::Dream => "Dream",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub max_seq_len: usize,
    /// Dream has biases on q/k/v; LLaDA has none.
    pub qkv_bias: bool,
    pub mask_id: Option<u32>,
    pub eos_id: Option<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json).map_err(|e| match e {
            ConfigError::Unknown(t) => Error::UnknownArchitecture(t),
            ConfigError::Invalid(message) => Error::Config {
                path: path.to_path_buf(),
                message,
            },
        })
    }

    fn from_json(json: &Value) -> Result<Self, ConfigError> {
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError::Invalid("missing string field \"model_type\"".into()))?;
        let fields = Fields(json);
        let config = match model_type {
            "llada" => {
                if let Some(block) = json.get("block_type").and_then(Value::as_str) {
                    if block != "llama" {
                        return Err(ConfigError::Invalid(format!(
                            "block_type {block:?} is not supported (only \"llama\")"
                        )));
                    }
                }
                if fields.flag("weight_tying") {
                    return Err(ConfigError::Invalid(
                        "weight_tying true is not supported".into(),
                    ));
                }
                if fields.flag("include_bias") || fields.flag("include_qkv_bias") {
                    return Err(ConfigError::Invalid(
                        "biases are not supported for llada".into(),
                    ));
                }
                let d_model = fields.usize("d_model")?;
                let n_heads = fields.usize("n_heads")?;
                ModelConfig {
                    family: Family::Llada,
                    d_model,
                    n_layers: fields.usize("n_layers")?,
                    n_heads,
                    n_kv_heads: fields.opt_usize("n_kv_heads")?.unwrap_or(n_heads),
                    head_dim: head_dim(d_model, n_heads)?,
                    ffn_hidden: fields.usize("mlp_hidden_size")?,
                    // The embedding matrix may be padded past the tokenizer's vocabulary.
                    vocab_size: match fields.opt_usize("embedding_size")? {
                        Some(n) => n,
                        None => fields.usize("vocab_size")?,
                    },
                    rope_theta: fields.opt_f32("rope_theta")?.unwrap_or(10000.0),
                    rms_eps: fields.opt_f32("rms_norm_eps")?.unwrap_or(1e-5),
                    max_seq_len: fields.usize("max_sequence_length")?,
                    qkv_bias: false,
                    mask_id: fields.opt_u32("mask_token_id")?,
                    eos_id: fields.opt_u32("eos_token_id")?,
                }
            }
            "Dream" => {
                if fields.flag("tie_word_embeddings") {
                    return Err(ConfigError::Invalid(
                        "tie_word_embeddings true is not supported".into(),
                    ));
                }
                let d_model = fields.usize("hidden_size")?;
                let n_heads = fields.usize("num_attention_heads")?;
                ModelConfig {
                    family: Family::Dream,
                    d_model,
                    n_layers: fields.usize("num_hidden_layers")?,
                    n_heads,
                    n_kv_heads: fields.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
                    head_dim: head_dim(d_model, n_heads)?,
                    ffn_hidden: fields.usize("intermediate_size")?,
                    vocab_size: fields.usize("vocab_size")?,
                    rope_theta: fields.opt_f32("rope_theta")?.unwrap_or(10000.0),
                    rms_eps: fields.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
                    max_seq_len: fields.usize("max_position_embeddings")?,
                    qkv_bias: true,
                    mask_id: fields.opt_u32("mask_token_id")?,
                    eos_id: fields.opt_u32("eos_token_id")?,
                }
            }
            other => return Err(ConfigError::Unknown(other.to_string())),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} attention heads cannot be shared by {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        for (name, v) in [
            ("n_layers", self.n_layers),
            ("vocab_size", self.vocab_size),
            ("ffn hidden size", self.ffn_hidden),
            ("max sequence length", self.max_seq_len),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !(self.rms_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// Parameter count of the weights this runtime loads.
    pub fn parameter_count(&self) -> u64 {
        let d = self.d_model as u64;
        let kv = (self.n_kv_heads * self.head_dim) as u64;
        let f = self.ffn_hidden as u64;
        let attn = d * d * 2 + d * kv * 2 + if self.qkv_bias { d + 2 * kv } else { 0 };
        let layer = attn + 3 * d * f + 2 * d;
        self.n_layers as u64 * layer + 2 * self.vocab_size as u64 * d + d
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn head_dim(d_model: usize, n_heads: usize) -> Result<usize, ConfigError> {
    if n_heads == 0 || d_model % n_heads != 0 {
        return Err(ConfigError::Invalid(format!(
            "d_model {d_model} is not divisible by {n_heads} heads"
        )));
    }
    Ok(d_model / n_heads)
}

enum ConfigError {
    Unknown(String),
    Invalid(String),
}

/// Typed access to config fields with messages that name the field.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "field {key:?} must be a non-negative integer, got {v}"
                ))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| ConfigError::Invalid(format!("missing field {key:?}")))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.opt_usize(key)? {
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| ConfigError::Invalid(format!("field {key:?} is out of range"))),
            None => Ok(None),
        }
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>, ConfigError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
                ConfigError::Invalid(format!("field {key:?} must be a number, got {v}"))
            }),
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.0.get(key).and_then(Value::as_bool).unwrap_or(false)
    }
}
