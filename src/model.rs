//! A model directory: config, memory-mapped weights, tokenizer and chat
//! template, with each family's tensor names mapped onto one layout.

mod llada2;

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
    /// Per-head RMSNorm weights of q and k, `[head_dim]` each (LLaDA2).
    pub qk_norm: Option<[TensorView<'a>; 2]>,
    pub o: TensorView<'a>,
    pub ffn_norm: TensorView<'a>,
    /// The MLP every token goes through: the dense one, or in an MoE layer
    /// the shared expert. `gate` is the SiLU-gated projection.
    pub gate: TensorView<'a>,
    pub up: TensorView<'a>,
    pub down: TensorView<'a>,
    /// The routed experts of an MoE layer (LLaDA2).
    pub routed: Option<RoutedExperts<'a>>,
}

/// The router and experts of one MoE layer.
pub struct RoutedExperts<'a> {
    /// `[experts, d_model]`.
    pub router: TensorView<'a>,
    /// `[experts]`, added to the router's scores for selection only.
    pub expert_bias: TensorView<'a>,
    /// Gate, up and down projection of each expert.
    pub experts: Vec<[TensorView<'a>; 3]>,
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
            let why = if dir.exists() {
                "is not a directory (pass the folder holding config.json)"
            } else {
                "model directory not found"
            };
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, why),
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
        let layout = Layout(c);
        let ck = &self.checkpoint;
        let layers = (0..c.n_layers)
            .map(|i| {
                if c.family == Family::Llada2 {
                    return llada2::layer(ck, c, i);
                }
                let t = |part: Part| ck.tensor_shaped(&layout.name(i, part), &layout.shape(part));
                Ok(LayerTensors {
                    attn_norm: t(Part::AttnNorm)?,
                    q: t(Part::Q)?,
                    k: t(Part::K)?,
                    v: t(Part::V)?,
                    qkv_bias: if c.qkv_bias {
                        Some([t(Part::QBias)?, t(Part::KBias)?, t(Part::VBias)?])
                    } else {
                        None
                    },
                    qk_norm: None,
                    o: t(Part::O)?,
                    ffn_norm: t(Part::FfnNorm)?,
                    gate: t(Part::Gate)?,
                    up: t(Part::Up)?,
                    down: t(Part::Down)?,
                    routed: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let [embed, final_norm, head] = layout
            .globals()
            .map(|(name, shape)| ck.tensor_shaped(name, &shape));
        Ok(ModelTensors {
            embed: embed?,
            layers,
            final_norm: final_norm?,
            head: head?,
        })
    }
}

/// Name and shape of every tensor a checkpoint of `config` holds.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let layout = Layout(config);
    let mut all: Vec<(String, Vec<usize>)> = layout
        .globals()
        .into_iter()
        .map(|(name, shape)| (name.to_string(), shape))
        .collect();
    if config.family == Family::Llada2 {
        all.extend((0..config.n_layers).flat_map(|i| llada2::expected_layer(config, i)));
        return all;
    }
    for i in 0..config.n_layers {
        for part in Part::ALL {
            if config.qkv_bias || !part.is_bias() {
                all.push((layout.name(i, part), layout.shape(part)));
            }
        }
    }
    all
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

impl Part {
    const ALL: [Part; 12] = [
        Part::AttnNorm,
        Part::Q,
        Part::K,
        Part::V,
        Part::QBias,
        Part::KBias,
        Part::VBias,
        Part::O,
        Part::FfnNorm,
        Part::Gate,
        Part::Up,
        Part::Down,
    ];

    fn is_bias(self) -> bool {
        matches!(self, Part::QBias | Part::KBias | Part::VBias)
    }
}

/// Checkpoint tensor names and shapes of a family (DESIGN §1).
struct Layout<'a>(&'a ModelConfig);

impl Layout<'_> {
    fn shape(&self, part: Part) -> Vec<usize> {
        let c = self.0;
        let (d, kv, f) = (c.d_model, c.kv_dim(), c.ffn_hidden);
        match part {
            Part::AttnNorm | Part::FfnNorm | Part::QBias => vec![d],
            Part::KBias | Part::VBias => vec![kv],
            Part::Q | Part::O => vec![d, d],
            Part::K | Part::V => vec![kv, d],
            Part::Gate | Part::Up => vec![f, d],
            Part::Down => vec![d, f],
        }
    }

    fn name(&self, i: usize, part: Part) -> String {
        match self.0.family {
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
            Family::Llada2 => unreachable!("model::llada2 names LLaDA2's layers"),
        }
    }

    /// Embedding, final norm and output head.
    fn globals(&self) -> [(&'static str, Vec<usize>); 3] {
        let (v, d) = (self.0.vocab_size, self.0.d_model);
        let [embed, norm, head] = match self.0.family {
            Family::Llada => [
                "model.transformer.wte.weight",
                "model.transformer.ln_f.weight",
                "model.transformer.ff_out.weight",
            ],
            Family::Dream => [
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
            ],
            Family::Llada2 => [
                "model.word_embeddings.weight",
                "model.norm.weight",
                "lm_head.weight",
            ],
        };
        [(embed, vec![v, d]), (norm, vec![d]), (head, vec![v, d])]
    }
}
