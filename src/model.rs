//! A model directory: config, memory-mapped weights, tokenizer and chat
//! template, with each family's tensor names mapped onto one layout.

mod llada2;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chat::ChatTemplate;
use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::quant::{MatrixView, Quantization, FLOAT_DTYPES};
use crate::tokenizer::TextTokenizer;

/// A loaded model directory. Weights stay memory-mapped; backends compute
/// from them as stored or convert them into their own storage.
pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// How the projections and the head are stored when quantized
    /// (config.json's `quantization_config`); None for floats.
    pub quantization: Option<Quantization>,
    pub checkpoint: Checkpoint,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub chat_template: Option<ChatTemplate>,
}

/// The tensors of one transformer layer, in the runtime's naming.
pub struct LayerTensors<'a> {
    pub attn_norm: TensorView<'a>,
    pub q: MatrixView<'a>,
    pub k: MatrixView<'a>,
    pub v: MatrixView<'a>,
    /// q/k/v biases (Dream only).
    pub qkv_bias: Option<[TensorView<'a>; 3]>,
    /// Per-head RMSNorm weights of q and k, `[head_dim]` each (LLaDA2).
    pub qk_norm: Option<[TensorView<'a>; 2]>,
    pub o: MatrixView<'a>,
    pub ffn_norm: TensorView<'a>,
    /// The MLP every token goes through: the dense one, or in an MoE layer
    /// the shared expert. `gate` is the SiLU-gated projection.
    pub gate: MatrixView<'a>,
    pub up: MatrixView<'a>,
    pub down: MatrixView<'a>,
    /// The routed experts of an MoE layer (LLaDA2).
    pub routed: Option<RoutedExperts<'a>>,
}

/// The router and experts of one MoE layer.
pub struct RoutedExperts<'a> {
    /// `[experts, d_model]`.
    pub router: MatrixView<'a>,
    /// `[experts]`, added to the router's scores for selection only.
    pub expert_bias: TensorView<'a>,
    /// Gate, up and down projection of each expert.
    pub experts: Vec<[MatrixView<'a>; 3]>,
}

pub struct ModelTensors<'a> {
    /// Only gathered, never multiplied: a float matrix even when quantized.
    pub embed: MatrixView<'a>,
    pub layers: Vec<LayerTensors<'a>>,
    pub final_norm: TensorView<'a>,
    pub head: MatrixView<'a>,
}

impl ModelTensors<'_> {
    /// Bytes of the matrices a forward pass reads whole: every projection,
    /// an MoE layer's router, and the head (the embedding is only gathered,
    /// a routed expert read only when a token is sent to it).
    pub fn streamed_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .flat_map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .chain(l.routed.as_ref().map(|r| &r.router))
            })
            .map(MatrixView::stored_bytes)
            .sum();
        layers + self.head.stored_bytes()
    }
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
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let quantization = quantization_of(&config_path)?;
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
            quantization,
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
        let vector = |name: &str, shape: &[usize]| ck.tensor_typed(name, shape, &FLOAT_DTYPES);
        let matrix = |name: &str, shape: &[usize], quantization| {
            MatrixView::open(ck, name, [shape[0], shape[1]], quantization)
        };
        let layers = (0..c.n_layers)
            .map(|i| {
                if c.family == Family::Llada2 {
                    return llada2::layer(ck, c, i, self.quantization);
                }
                let t = |part: Part| vector(&layout.name(i, part), &layout.shape(part));
                let m = |part: Part| {
                    matrix(
                        &layout.name(i, part),
                        &layout.shape(part),
                        self.quantization,
                    )
                };
                Ok(LayerTensors {
                    attn_norm: t(Part::AttnNorm)?,
                    q: m(Part::Q)?,
                    k: m(Part::K)?,
                    v: m(Part::V)?,
                    qkv_bias: if c.qkv_bias {
                        Some([t(Part::QBias)?, t(Part::KBias)?, t(Part::VBias)?])
                    } else {
                        None
                    },
                    qk_norm: None,
                    o: m(Part::O)?,
                    ffn_norm: t(Part::FfnNorm)?,
                    gate: m(Part::Gate)?,
                    up: m(Part::Up)?,
                    down: m(Part::Down)?,
                    routed: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let [(embed, embed_shape), (final_norm, norm_shape), (head, head_shape)] = layout.globals();
        Ok(ModelTensors {
            embed: matrix(embed, &embed_shape, None)?,
            layers,
            final_norm: vector(final_norm, &norm_shape)?,
            head: matrix(head, &head_shape, self.quantization)?,
        })
    }
}

/// Reads config.json's `quantization_config`.
fn quantization_of(config_path: &Path) -> Result<Option<Quantization>> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: config_path.to_path_buf(),
        source,
    })?;
    Quantization::from_config(&json).map_err(|message| Error::Config {
        path: config_path.to_path_buf(),
        message,
    })
}

/// Whether the tensor `name` of a `config` checkpoint is multiplied by
/// whole (a projection or the head), which is what quantization applies to.
pub fn is_quantizable(config: &ModelConfig, name: &str, shape: &[usize]) -> bool {
    let [(embed, _), ..] = Layout(config).globals();
    shape.len() == 2 && name != embed
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
