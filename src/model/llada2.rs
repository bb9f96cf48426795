//! LLaDA2's checkpoint (LLADA2.md §2) in the runtime's layout. The fused
//! query/key/value projection is split into its q, k and v rows; in an MoE
//! layer the shared expert takes the dense MLP's place, since every token
//! goes through it, and the router and routed experts come beside it.

use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::quant::{MatrixView, Quantization, FLOAT_DTYPES};

use super::{LayerTensors, RoutedExperts};

/// Layer `i`'s tensors in checkpoint terms: `V` a vector, `M` a matrix.
struct Layer<V, M> {
    attn_norm: V,
    qkv: M,
    qk_norm: Option<[V; 2]>,
    o: M,
    ffn_norm: V,
    /// Gate, up, down of the dense MLP or the shared expert.
    mlp: [M; 3],
    routed: Option<Routed<V, M>>,
}

struct Routed<V, M> {
    router: M,
    expert_bias: V,
    experts: Vec<[M; 3]>,
}

/// What `visit` does with each tensor: one walk over the layout serves both
/// listing the names and opening the tensors.
trait Visitor {
    type V;
    type M;
    fn vector(&mut self, name: String, len: usize) -> Result<Self::V>;
    fn matrix(&mut self, name: String, shape: [usize; 2]) -> Result<Self::M>;
}

fn visit<T: Visitor>(c: &ModelConfig, i: usize, get: &mut T) -> Result<Layer<T::V, T::M>> {
    let (d, hd) = (c.d_model, c.head_dim);
    let name = |leaf: &str| format!("model.layers.{i}.{leaf}");
    let mlp = |get: &mut T, prefix: &str, hidden: usize| -> Result<[T::M; 3]> {
        Ok([
            get.matrix(name(&format!("{prefix}.gate_proj.weight")), [hidden, d])?,
            get.matrix(name(&format!("{prefix}.up_proj.weight")), [hidden, d])?,
            get.matrix(name(&format!("{prefix}.down_proj.weight")), [d, hidden])?,
        ])
    };
    let moe = c.moe.as_ref().filter(|m| m.is_moe_layer(i));
    let (mlp_weights, experts) = match moe {
        Some(m) => (
            mlp(get, "mlp.shared_experts", m.shared_hidden())?,
            (0..m.experts)
                .map(|e| mlp(get, &format!("mlp.experts.{e}"), m.expert_hidden))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => (mlp(get, "mlp", c.ffn_hidden)?, Vec::new()),
    };
    let routed = match moe {
        Some(m) => Some(Routed {
            router: get.matrix(name("mlp.gate.weight"), [m.experts, d])?,
            expert_bias: get.vector(name("mlp.gate.expert_bias"), m.experts)?,
            experts,
        }),
        None => None,
    };
    let qk_norm = if c.qk_norm {
        Some([
            get.vector(name("attention.query_layernorm.weight"), hd)?,
            get.vector(name("attention.key_layernorm.weight"), hd)?,
        ])
    } else {
        None
    };
    Ok(Layer {
        attn_norm: get.vector(name("input_layernorm.weight"), d)?,
        qkv: get.matrix(
            name("attention.query_key_value.weight"),
            [(c.n_heads + 2 * c.n_kv_heads) * hd, d],
        )?,
        qk_norm,
        o: get.matrix(name("attention.dense.weight"), [d, c.n_heads * hd])?,
        ffn_norm: get.vector(name("post_attention_layernorm.weight"), d)?,
        mlp: mlp_weights,
        routed,
    })
}

/// Lists every tensor's name and shape.
struct Names(Vec<(String, Vec<usize>)>);

impl Visitor for Names {
    type V = ();
    type M = ();
    fn vector(&mut self, name: String, len: usize) -> Result<()> {
        self.0.push((name, vec![len]));
        Ok(())
    }
    fn matrix(&mut self, name: String, shape: [usize; 2]) -> Result<()> {
        self.0.push((name, shape.to_vec()));
        Ok(())
    }
}

/// Opens every tensor, shape- and dtype-checked.
struct Open<'a> {
    checkpoint: &'a Checkpoint,
    quantization: Option<Quantization>,
}

impl<'a> Visitor for Open<'a> {
    type V = TensorView<'a>;
    type M = MatrixView<'a>;
    fn vector(&mut self, name: String, len: usize) -> Result<TensorView<'a>> {
        self.checkpoint.tensor_typed(&name, &[len], &FLOAT_DTYPES)
    }
    fn matrix(&mut self, name: String, shape: [usize; 2]) -> Result<MatrixView<'a>> {
        MatrixView::open(self.checkpoint, &name, shape, self.quantization)
    }
}

/// Name and shape of every tensor of layer `i`.
pub(super) fn expected_layer(c: &ModelConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let mut names = Names(Vec::new());
    visit(c, i, &mut names).expect("listing names cannot fail");
    names.0
}

/// Layer `i`'s tensors, checked, with the fused QKV split into heads
/// `0..H` (q), `H..H+KV` (k) and the rest (v) (LLADA2.md §3.2).
pub(super) fn layer<'a>(
    checkpoint: &'a Checkpoint,
    c: &ModelConfig,
    i: usize,
    quantization: Option<Quantization>,
) -> Result<LayerTensors<'a>> {
    let raw = visit(
        c,
        i,
        &mut Open {
            checkpoint,
            quantization,
        },
    )?;
    let (q_rows, kv_rows) = (c.n_heads * c.head_dim, c.kv_dim());
    let [gate, up, down] = raw.mlp;
    Ok(LayerTensors {
        attn_norm: raw.attn_norm,
        q: raw.qkv.rows(0..q_rows),
        k: raw.qkv.rows(q_rows..q_rows + kv_rows),
        v: raw.qkv.rows(q_rows + kv_rows..q_rows + 2 * kv_rows),
        qkv_bias: None,
        qk_norm: raw.qk_norm,
        o: raw.o,
        ffn_norm: raw.ffn_norm,
        gate,
        up,
        down,
        routed: raw.routed.map(|r| RoutedExperts {
            router: r.router,
            expert_bias: r.expert_bias,
            experts: r.experts,
        }),
    })
}
