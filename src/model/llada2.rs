//! LLaDA2's checkpoint (LLADA2.md §2) in the runtime's layout. The fused
//! query/key/value projection is split into its q, k and v rows; in an MoE
//! layer the shared expert takes the dense MLP's place, since every token
//! goes through it, and the router and routed experts come beside it.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::Result;

use super::{LayerTensors, RoutedExperts};

/// Layer `i`'s tensors in checkpoint terms, each obtained by `get(name, shape)`.
struct Layer<T> {
    attn_norm: T,
    qkv: T,
    qk_norm: Option<[T; 2]>,
    o: T,
    ffn_norm: T,
    /// Gate, up, down of the dense MLP or the shared expert.
    mlp: [T; 3],
    routed: Option<Routed<T>>,
}

struct Routed<T> {
    router: T,
    expert_bias: T,
    experts: Vec<[T; 3]>,
}

fn visit<T>(
    c: &ModelConfig,
    i: usize,
    get: &mut dyn FnMut(String, Vec<usize>) -> Result<T>,
) -> Result<Layer<T>> {
    let (d, hd) = (c.d_model, c.head_dim);
    let name = |leaf: &str| format!("model.layers.{i}.{leaf}");
    let mut mlp = |prefix: &str, hidden: usize| -> Result<[T; 3]> {
        Ok([
            get(name(&format!("{prefix}.gate_proj.weight")), vec![hidden, d])?,
            get(name(&format!("{prefix}.up_proj.weight")), vec![hidden, d])?,
            get(name(&format!("{prefix}.down_proj.weight")), vec![d, hidden])?,
        ])
    };
    let moe = c.moe.as_ref().filter(|m| m.is_moe_layer(i));
    let (mlp_weights, experts) = match moe {
        Some(m) => (
            mlp("mlp.shared_experts", m.shared_hidden())?,
            (0..m.experts)
                .map(|e| mlp(&format!("mlp.experts.{e}"), m.expert_hidden))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => (mlp("mlp", c.ffn_hidden)?, Vec::new()),
    };
    let routed = match moe {
        Some(m) => Some(Routed {
            router: get(name("mlp.gate.weight"), vec![m.experts, d])?,
            expert_bias: get(name("mlp.gate.expert_bias"), vec![m.experts])?,
            experts,
        }),
        None => None,
    };
    let qk_norm = if c.qk_norm {
        Some([
            get(name("attention.query_layernorm.weight"), vec![hd])?,
            get(name("attention.key_layernorm.weight"), vec![hd])?,
        ])
    } else {
        None
    };
    Ok(Layer {
        attn_norm: get(name("input_layernorm.weight"), vec![d])?,
        qkv: get(
            name("attention.query_key_value.weight"),
            vec![(c.n_heads + 2 * c.n_kv_heads) * hd, d],
        )?,
        qk_norm,
        o: get(name("attention.dense.weight"), vec![d, c.n_heads * hd])?,
        ffn_norm: get(name("post_attention_layernorm.weight"), vec![d])?,
        mlp: mlp_weights,
        routed,
    })
}

/// Name and shape of every tensor of layer `i`.
pub(super) fn expected_layer(c: &ModelConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let mut all = Vec::new();
    visit(c, i, &mut |name, shape| {
        all.push((name, shape));
        Ok(())
    })
    .expect("listing names cannot fail");
    all
}

/// Layer `i`'s tensors, shape-checked, with the fused QKV split into heads
/// `0..H` (q), `H..H+KV` (k) and the rest (v) (LLADA2.md §3.2).
pub(super) fn layer<'a>(ck: &'a Checkpoint, c: &ModelConfig, i: usize) -> Result<LayerTensors<'a>> {
    let raw = visit(c, i, &mut |name, shape| ck.tensor_shaped(&name, &shape))?;
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
