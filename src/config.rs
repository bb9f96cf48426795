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
    /// LLaDA2.0 / LLaDA2.1 (`model_type: "llada2_moe"`): mixture of experts,
    /// decoded by block diffusion (../shared/LLADA2.md, docs/llada2.md).
    Llada2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llada => "llada",
            Family::Dream => "Dream",
            Family::Llada2 => "llada2_moe",
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
    /// LLaDA2's partial rotary embedding: RoPE rotates only this many
    /// leading dims of each q/k head. `None`: the whole head.
    pub partial_rotary_dim: Option<usize>,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub max_seq_len: usize,
    /// Dream has biases on q/k/v; LLaDA has none.
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (LLaDA2).
    pub qk_norm: bool,
    /// Routed experts of the layers past the first dense ones (LLaDA2).
    pub moe: Option<MoeConfig>,
    pub mask_id: Option<u32>,
    pub eos_id: Option<u32>,
}

/// The mixture-of-experts feed-forward of LLaDA2 (LLADA2.md §3.3): a
/// sigmoid router with a selection bias, group-limited top-k, and a shared
/// expert beside the routed ones.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Layers `0..first_dense_layers` keep the dense MLP.
    pub first_dense_layers: usize,
    pub experts: usize,
    pub experts_per_token: usize,
    /// Experts are split into this many contiguous groups...
    pub groups: usize,
    /// ...of which each token may use this many.
    pub groups_per_token: usize,
    /// Width of one routed expert's MLP.
    pub expert_hidden: usize,
    /// The shared expert is this many experts wide.
    pub shared_experts: usize,
    /// Multiplies the normalised routing weights.
    pub routed_scaling: f32,
}

impl MoeConfig {
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_dense_layers
    }

    pub fn shared_hidden(&self) -> usize {
        self.expert_hidden * self.shared_experts
    }

    pub fn experts_per_group(&self) -> usize {
        self.experts / self.groups
    }

    /// Parameters of one routed expert (gate, up and down).
    pub fn expert_parameters(&self, d_model: usize) -> u64 {
        3 * (d_model * self.expert_hidden) as u64
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let (e, g) = (self.experts, self.groups);
        if e == 0 || self.experts_per_token == 0 || self.expert_hidden == 0 {
            return bad(
                "num_experts, num_experts_per_tok and moe_intermediate_size must be positive"
                    .into(),
            );
        }
        if g == 0 || e % g != 0 {
            return bad(format!(
                "n_group {g} does not divide num_experts {e}: the router splits the experts into equal groups"
            ));
        }
        // A group is scored by the sum of its two best experts.
        if e / g < 2 {
            return bad(format!(
                "n_group {g} leaves {} expert per group; the router scores a group by its top two",
                e / g
            ));
        }
        if self.groups_per_token == 0 || self.groups_per_token > g {
            return bad(format!(
                "topk_group {} must be between 1 and n_group {g}",
                self.groups_per_token
            ));
        }
        let reachable = self.groups_per_token * (e / g);
        if self.experts_per_token > reachable {
            return bad(format!(
                "num_experts_per_tok {} is larger than the {reachable} experts in the topk_group {} chosen groups of {}",
                self.experts_per_token,
                self.groups_per_token,
                e / g
            ));
        }
        if self.shared_experts == 0 {
            return bad(
                "num_shared_experts 0 is not supported (every released LLaDA2 model has one)"
                    .into(),
            );
        }
        if !(self.routed_scaling.is_finite() && self.routed_scaling > 0.0) {
            return bad(format!(
                "routed_scaling_factor must be a positive number, got {}",
                self.routed_scaling
            ));
        }
        Ok(())
    }
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
                    partial_rotary_dim: None,
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
                    qk_norm: false,
                    moe: None,
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
                    partial_rotary_dim: None,
                    ffn_hidden: fields.usize("intermediate_size")?,
                    vocab_size: fields.usize("vocab_size")?,
                    rope_theta: fields.opt_f32("rope_theta")?.unwrap_or(10000.0),
                    rms_eps: fields.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
                    max_seq_len: fields.usize("max_position_embeddings")?,
                    qkv_bias: true,
                    qk_norm: false,
                    moe: None,
                    mask_id: fields.opt_u32("mask_token_id")?,
                    eos_id: fields.opt_u32("eos_token_id")?,
                }
            }
            "llada2_moe" => llada2(&fields)?,
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
        let rotary = self.rotary_dim();
        if rotary == 0 || rotary % 2 != 0 || rotary > self.head_dim {
            return bad(format!(
                "{rotary} rotated dims of a head of {}: RoPE needs an even, positive number no larger than head_dim",
                self.head_dim
            ));
        }
        match &self.moe {
            Some(moe) => moe.validate(),
            None => Ok(()),
        }
    }

    /// Parameter count of the weights this runtime loads.
    pub fn parameter_count(&self) -> u64 {
        self.count_parameters(|moe| moe.experts)
    }

    /// Parameters one token's forward uses: every weight but the routed
    /// experts it is not sent to. The embedding and head count whole, as
    /// model cards count them. Equal to [`Self::parameter_count`] without
    /// experts.
    pub fn active_parameter_count(&self) -> u64 {
        self.count_parameters(|moe| moe.experts_per_token)
    }

    /// The parameter count with `routed(moe)` routed experts per MoE layer.
    fn count_parameters(&self, routed: impl Fn(&MoeConfig) -> usize) -> u64 {
        let d = self.d_model as u64;
        let kv = (self.n_kv_heads * self.head_dim) as u64;
        let f = self.ffn_hidden as u64;
        let attn = d * d * 2
            + d * kv * 2
            + if self.qkv_bias { d + 2 * kv } else { 0 }
            + if self.qk_norm {
                2 * self.head_dim as u64
            } else {
                0
            };
        let ffn = |layer: usize| match &self.moe {
            Some(moe) if moe.is_moe_layer(layer) => {
                let e = moe.experts as u64;
                let router = e * d + e;
                let shared = 3 * d * moe.shared_hidden() as u64;
                router + shared + routed(moe) as u64 * moe.expert_parameters(self.d_model)
            }
            _ => 3 * d * f,
        };
        let layers: u64 = (0..self.n_layers).map(|l| attn + ffn(l) + 2 * d).sum();
        layers + 2 * self.vocab_size as u64 * d + d
    }

    /// Leading dims of each q/k head that RoPE rotates.
    pub fn rotary_dim(&self) -> usize {
        self.partial_rotary_dim.unwrap_or(self.head_dim)
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// LLaDA2's `config.json` (LLADA2.md §1). Fields the reference code never
/// reads are checked to hold the values it hard-codes, so that a config
/// which asks for something else is refused instead of silently ignored.
fn llada2(fields: &Fields) -> Result<ModelConfig, ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
    for (key, want) in [
        ("score_function", "sigmoid"),
        ("router_dtype", "fp32"),
        ("hidden_act", "silu"),
    ] {
        if let Some(got) = fields.opt_str(key)? {
            if got != want {
                return bad(format!(
                    "{key} {got:?} is not supported (the reference implements only {want:?})"
                ));
            }
        }
    }
    for (key, want) in [
        ("moe_router_enable_expert_bias", true),
        ("norm_topk_prob", true),
        ("use_qkv_bias", false),
        ("use_bias", false),
        ("tie_word_embeddings", false),
    ] {
        if let Some(got) = fields.opt_bool(key)? {
            if got != want {
                return bad(format!(
                    "{key} {got} is not supported (the reference implements only {want})"
                ));
            }
        }
    }
    if fields.opt_bool("use_sliding_window")? == Some(true) {
        return bad("use_sliding_window true is not supported".into());
    }
    let d_model = fields.usize("hidden_size")?;
    let n_heads = fields.usize("num_attention_heads")?;
    let head_dim = match fields.opt_usize("head_dim")? {
        Some(hd) => hd,
        None => head_dim(d_model, n_heads)?,
    };
    if head_dim * n_heads != d_model {
        return bad(format!(
            "{n_heads} heads of {head_dim} do not span hidden_size {d_model} (the runtime needs them equal)"
        ));
    }
    let factor = fields.f32("partial_rotary_factor")?;
    if !(factor > 0.0 && factor <= 1.0) {
        return bad(format!(
            "partial_rotary_factor must be in (0, 1], got {factor}"
        ));
    }
    // The reference truncates: int(head_dim * partial_rotary_factor).
    let rotary_dim = (head_dim as f64 * factor as f64) as usize;
    if rotary_dim % 2 != 0 {
        return bad(format!(
            "partial_rotary_factor {factor} rotates {rotary_dim} of {head_dim} dims: RoPE rotates pairs, so it must be even"
        ));
    }
    if let Some(stated) = fields.opt_usize("rotary_dim")? {
        if stated != rotary_dim {
            return bad(format!(
                "rotary_dim {stated} disagrees with head_dim {head_dim} x partial_rotary_factor {factor} = {rotary_dim}"
            ));
        }
    }
    let vocab_size = fields.usize("vocab_size")?;
    // Only a vocabulary of the released size holds the reference's ids.
    let reference_id = |id: u32| ((id as usize) < vocab_size).then_some(id);
    let moe = MoeConfig {
        first_dense_layers: fields.usize("first_k_dense_replace")?,
        experts: fields.usize("num_experts")?,
        experts_per_token: fields.usize("num_experts_per_tok")?,
        groups: fields.usize("n_group")?,
        groups_per_token: fields.usize("topk_group")?,
        expert_hidden: fields.usize("moe_intermediate_size")?,
        shared_experts: fields.usize("num_shared_experts")?,
        routed_scaling: fields.f32("routed_scaling_factor")?,
    };
    Ok(ModelConfig {
        family: Family::Llada2,
        d_model,
        n_layers: fields.usize("num_hidden_layers")?,
        n_heads,
        n_kv_heads: fields.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim,
        partial_rotary_dim: Some(rotary_dim),
        ffn_hidden: fields.usize("intermediate_size")?,
        vocab_size,
        rope_theta: fields.opt_f32("rope_theta")?.unwrap_or(10000.0),
        rms_eps: fields.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
        max_seq_len: fields.usize("max_position_embeddings")?,
        qkv_bias: false,
        qk_norm: fields.opt_bool("use_qk_norm")?.unwrap_or(true),
        moe: Some(moe),
        mask_id: fields
            .opt_u32("mask_token_id")?
            .or(reference_id(LLADA2_MASK_ID)),
        eos_id: fields
            .opt_u32("eos_token_id")?
            .or(reference_id(LLADA2_EOS_ID)),
    })
}

/// The ids the reference's `generate` defaults to (LLADA2.md §5): the
/// released checkpoints' config.json does not name the mask token.
const LLADA2_MASK_ID: u32 = 156895;
const LLADA2_EOS_ID: u32 = 156892;

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

    fn f32(&self, key: &str) -> Result<f32, ConfigError> {
        self.opt_f32(key)?
            .ok_or_else(|| ConfigError::Invalid(format!("missing field {key:?}")))
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                ConfigError::Invalid(format!("field {key:?} must be a string, got {v}"))
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                ConfigError::Invalid(format!("field {key:?} must be true or false, got {v}"))
            }),
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.0.get(key).and_then(Value::as_bool).unwrap_or(false)
    }
}
