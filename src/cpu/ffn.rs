//! The feed-forward half of a layer: the SiLU-gated MLP, and LLaDA2's
//! mixture of experts around it (LLADA2.md §3.3).
//!
//! Every product is a [`Matrix::linear`], whose result for a row does not
//! depend on the other rows multiplied with it; routing is per row. So a
//! row's output is the same whichever rows share its forward, and which
//! experts they touch: batched decoding stays batch-invariant.

use crate::config::MoeConfig;

use super::matrix::Matrix;
use super::{ops, Rounding};

/// `(silu(h·gateᵀ) ⊙ (h·upᵀ))·downᵀ`: the dense MLP, a routed expert or the
/// shared expert.
pub struct Mlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl Mlp {
    /// The MLP of `h` (`[rows, d]`).
    pub fn forward(&self, h: &[f32], rounding: Rounding) -> Vec<f32> {
        let n = h.len() / self.gate.cols();
        let mut gate = self.gate.linear(h, n);
        let up = self.up.linear(h, n);
        ops::silu_gate(&mut gate, &up);
        rounding.round(&mut gate);
        self.down.linear(&gate, n)
    }
}

/// The router and routed experts of an MoE layer.
pub struct RoutedExperts {
    pub config: MoeConfig,
    /// `[experts, d]`.
    pub router: Matrix,
    /// `[experts]`: shifts the scores that select experts, not their weights.
    pub expert_bias: Vec<f32>,
    pub experts: Vec<Mlp>,
}

/// The experts each row was sent to, and with which weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// `[rows, experts_per_token]`, each row by descending biased score.
    pub experts: Vec<u32>,
    /// Routing weights, same layout.
    pub weights: Vec<f32>,
}

impl RoutedExperts {
    /// Which experts each of the `n` rows of `h` goes to.
    pub fn route(&self, h: &[f32], n: usize) -> Routing {
        let logits = self.router.linear(h, n);
        route(&logits, &self.expert_bias, &self.config)
    }

    /// The routed part of the layer's output: each touched expert runs once
    /// on the rows sent to it, and its output is added to those rows with
    /// their weights, in f32.
    pub fn forward(&self, h: &[f32], d: usize, routing: &Routing, rounding: Rounding) -> Vec<f32> {
        let k = self.config.experts_per_token;
        let mut out = vec![0.0f32; h.len()];
        for (expert, mlp) in self.experts.iter().enumerate() {
            let sent: Vec<(usize, f32)> = routing
                .experts
                .iter()
                .zip(&routing.weights)
                .enumerate()
                .filter(|(_, (&e, _))| e as usize == expert)
                .map(|(slot, (_, &w))| (slot / k, w))
                .collect();
            if sent.is_empty() {
                continue;
            }
            let rows: Vec<f32> = sent
                .iter()
                .flat_map(|&(row, _)| &h[row * d..(row + 1) * d])
                .copied()
                .collect();
            let y = mlp.forward(&rows, rounding);
            for (&(row, w), y) in sent.iter().zip(y.chunks_exact(d)) {
                out[row * d..(row + 1) * d]
                    .iter_mut()
                    .zip(y)
                    .for_each(|(o, v)| *o += w * v);
            }
        }
        out
    }
}

/// The experts and weights of each row of router `logits` (`[rows,
/// experts]`) (LLADA2.md §3.3, steps 1-5), all in f32.
pub fn route(logits: &[f32], expert_bias: &[f32], c: &MoeConfig) -> Routing {
    let mut routing = Routing::default();
    for row in logits.chunks_exact(c.experts) {
        let scores: Vec<f32> = row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let biased: Vec<f32> = scores.iter().zip(expert_bias).map(|(s, b)| s + b).collect();
        let chosen = top_k_of_top_groups(&biased, c);
        let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
        if chosen.len() > 1 {
            let sum = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        weights.iter_mut().for_each(|w| *w *= c.routed_scaling);
        routing.experts.extend(chosen.iter().map(|&e| e as u32));
        routing.weights.extend(weights);
    }
    routing
}

/// The reference's group-limited top-k: groups are scored by the sum of their
/// two best biased scores, the best `groups_per_token` groups stay in the
/// running, and the `experts_per_token` best experts among them are returned
/// by descending score. Ties go to the lower index.
fn top_k_of_top_groups(biased: &[f32], c: &MoeConfig) -> Vec<usize> {
    let size = c.experts_per_group();
    let group_scores: Vec<f32> = biased
        .chunks_exact(size)
        .map(|group| {
            let best = descending(group);
            group[best[0]] + group[best[1]]
        })
        .collect();
    let kept_groups = &descending(&group_scores)[..c.groups_per_token];
    let masked: Vec<f32> = biased
        .iter()
        .enumerate()
        .map(|(e, &b)| {
            if kept_groups.contains(&(e / size)) {
                b
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    descending(&masked)[..c.experts_per_token].to_vec()
}

/// Indices of `values` from the largest down, lower index first on ties.
fn descending(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MoeConfig {
        MoeConfig {
            first_dense_layers: 0,
            experts: 8,
            experts_per_token: 2,
            groups: 4,
            groups_per_token: 2,
            expert_hidden: 1,
            shared_experts: 1,
            routed_scaling: 2.5,
        }
    }

    #[test]
    fn groups_are_scored_by_their_two_best_experts() {
        // Groups {0,1} {2,3} {4,5} {6,7}: sums 1.0, 1.1, 0.95, 0.2. Expert 6
        // has the best single score, but its group loses; so does group
        // {4,5}, whose 0.9 would otherwise be second.
        let biased = [0.5, 0.5, 0.3, 0.8, 0.9, 0.05, 0.95, -0.75];
        assert_eq!(top_k_of_top_groups(&biased, &config()), vec![3, 0]);
    }

    #[test]
    fn weights_use_unbiased_scores_normalised_and_scaled() {
        let d = 2;
        // Router logits equal h's first two entries for experts 0 and 1 and
        // zero for the rest; the bias favours experts 2 and 3 for selection.
        let mut router = vec![0.0f32; 8 * d];
        router[0] = 1.0;
        router[d + 1] = 1.0;
        let mut expert_bias = vec![0.0f32; 8];
        expert_bias[2] = 1.0;
        expert_bias[3] = 0.9;
        let layer = RoutedExperts {
            config: config(),
            router: Matrix::from_f32(router, 8, d),
            expert_bias,
            experts: Vec::new(),
        };
        let routing = layer.route(&[3.0, -1.0], 1);
        assert_eq!(routing.experts, vec![2, 3]);
        // Both chosen experts score sigmoid(0) = 0.5: weights 0.5 x 2.5 each.
        assert_eq!(routing.weights, vec![1.25, 1.25]);
    }
}
