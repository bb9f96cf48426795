//! A model directory: config, memory-mapped weights, tokenizer and chat
//! template, with the two families' tensor names mapped onto one layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chat::ChatTemplate;
use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// A loaded model directory. Weights stay memory-mapped; backends convert
/// them into their own storage.
pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub chat_template: Option<ChatTemplate>,
}

/// The tensors of one transformer layer, in the runtime's naming.
pub struct LayerTensors<'a> {
    pub attn_norm: TensorView<'a>,
    pub q: TensorView<'a>,
    pub k: TensorView<'a>,
    pub v: TensorView<'a>,
    /// q/k/v biases (Dream only).
    pub qkv_bias: Option<[TensorView<'a>; 3]>,
    pub o: TensorView<'a>,
    pub ffn_norm: TensorView<'a>,
    /// The SiLU-gated projection.
    pub gate: TensorView<'a>,
    pub up: TensorView<'a>,
    pub down: TensorView<'a>,
}

pub struct ModelTensors<'a> {
    pub embed: TensorView<'a>,
    pub layers: Vec<LayerTensors<'a>>,
    pub final_norm: TensorView<'a>,
    pub head: TensorView<'a>,
}

impl Model {
    /// Loads `config.json`, opens the safetensors and checks that every tensor
    /// the config implies is present with the right shape; then loads
    /// `tokenizer.json` and the chat template when they are there.
    pub fn open(dir: &Path) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() {
            Some(Arc::new(TextTokenizer::load(&tokenizer_path)?))
        } else {
            None
        };
        let template_path = dir.join("tokenizer_config.json");
        let chat_template = if template_path.exists() {
            match ChatTemplate::from_tokenizer_config(&template_path) {
                Ok(template) => Some(template),
                // Base checkpoints ship a tokenizer_config.json without a template.
                Err(Error::ChatTemplate(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let model = Model {
            dir: dir.to_path_buf(),
            config,
            checkpoint,
            tokenizer,
            chat_template,
        };
        model.tensors()?;
        Ok(model)
    }

    /// Every weight, shape-checked against the config.
    pub fn tensors(&self) -> Result<ModelTensors<'_>> {
        let c = &self.config;
        let (d, kv, f, v) = (c.d_model, c.kv_dim(), c.ffn_hidden, c.vocab_size);
        let ck = &self.checkpoint;
        let names = Names(c.family);
        let layers = (0..c.n_layers)
            .map(|i| {
                let t = |part: Part, shape: &[usize]| ck.tensor_shaped(&names.layer(i, part), shape);
                Ok(LayerTensors {
                    attn_norm: t(Part::AttnNorm, &[d])?,
                    q: t(Part::Q, &[d, d])?,
                    k: t(Part::K, &[kv, d])?,
                    v: t(Part::V, &[kv, d])?,
                    qkv_bias: if c.qkv_bias {
                        Some([t(Part::QBias, &[d])?, t(Part::KBias, &[kv])?, t(Part::VBias, &[kv])?])
                    } else {
                        None
                    },
                    o: t(Part::O, &[d, d])?,
                    ffn_norm: t(Part::FfnNorm, &[d])?,
                    gate: t(Part::Gate, &[f, d])?,
                    up: t(Part::Up, &[f, d])?,
                    down: t(Part::Down, &[d, f])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (embed, final_norm, head) = names.globals();
        Ok(ModelTensors {
            embed: ck.tensor_shaped(embed, &[v, d])?,
            layers,
            final_norm: ck.tensor_shaped(final_norm, &[d])?,
            head: ck.tensor_shaped(head, &[v, d])?,
        })
    }
}

#[derive(Clone, Copy)]
enum Part {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// Checkpoint tensor names of a family (DESIGN §1).
struct Names(Family);

impl Names {
    fn layer(&self, i: usize, part: Part) -> String {
        match self.0 {
            Family::Llada => {
                let leaf = match part {
                    Part::AttnNorm => "attn_norm",
                    Part::Q => "q_proj",
                    Part::K => "k_proj",
                    Part::V => "v_proj",
                    Part::O => "attn_out",
                    Part::FfnNorm => "ff_norm",
                    Part::Gate => "ff_proj",
                    Part::Up => "up_proj",
                    Part::Down => "ff_out",
                    Part::QBias | Part::KBias | Part::VBias => unreachable!("LLaDA has no biases"),
                };
                format!("model.transformer.blocks.{i}.{leaf}.weight")
            }
            Family::Dream => {
                let leaf = match part {
                    Part::AttnNorm => "input_layernorm.weight",
                    Part::Q => "self_attn.q_proj.weight",
                    Part::K => "self_attn.k_proj.weight",
                    Part::V => "self_attn.v_proj.weight",
                    Part::QBias => "self_attn.q_proj.bias",
                    Part::KBias => "self_attn.k_proj.bias",
                    Part::VBias => "self_attn.v_proj.bias",
                    Part::O => "self_attn.o_proj.weight",
                    Part::FfnNorm => "post_attention_layernorm.weight",
                    Part::Gate => "mlp.gate_proj.weight",
                    Part::Up => "mlp.up_proj.weight",
                    Part::Down => "mlp.down_proj.weight",
                };
                format!("model.layers.{i}.{leaf}")
            }
        }
    }

    fn globals(&self) -> (&'static str, &'static str, &'static str) {
        match self.0 {
            Family::Llada => (
                "model.transformer.wte.weight",
                "model.transformer.ln_f.weight",
                "model.transformer.ff_out.weight",
            ),
            Family::Dream => ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"),
        }
    }
}
