//! Transfer rules: which masked tokens of the block a step commits
//! (DESIGN §2, §3.1, §3.5 and Dream's samplers).

/// A masked position of the current block and the model's guess for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub position: usize,
    pub token: u32,
    pub confidence: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// LLaDA's fixed schedule: step i commits the k_i most confident.
    Schedule,
    /// Fast-dLLM parallel decoding: every token at or above the threshold and
    /// always the most confident one. After a block's first step the
    /// threshold relaxes with the masked ratio r: tau * (1 - alpha * (1 - r))
    /// (Streaming-dLLM; alpha 0 keeps it fixed).
    Threshold { tau: f64, alpha: f64 },
    /// Fast-dLLM's factor rule, with the Streaming-dLLM reference's quirk that
    /// a failure at the last sorted candidate still commits it.
    Factor(f64),
    /// Dream's linear-in-time count from `linspace(1, eps, steps + 1)`.
    Timestep { eps: f32 },
    /// Dream's `confidence_threshold` without a cache: the schedule's quota
    /// plus the tokens the last step rejected, of which the first and those at
    /// or above the threshold are committed.
    CarryThreshold(f64),
}

/// A rule applied to one block, with the per-block state some rules keep.
#[derive(Debug)]
pub struct BlockRule {
    rule: Rule,
    schedule: Vec<usize>,
    carry: usize,
}

impl BlockRule {
    pub fn new(rule: Rule, block_masks: usize, steps_per_block: usize) -> BlockRule {
        BlockRule {
            rule,
            schedule: transfer_schedule(block_masks, steps_per_block),
            carry: 0,
        }
    }

    /// Sorts `candidates` by confidence (ties: lower position first) and
    /// returns how many of the most confident to commit at `step` of the
    /// block. `masked_ratio` is r of DESIGN §3.5.
    pub fn select(
        &mut self,
        step: usize,
        candidates: &mut [Candidate],
        masked_ratio: f64,
    ) -> usize {
        candidates.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        let n = candidates.len();
        let steps = self.schedule.len();
        let above = |tau: f64| {
            candidates
                .iter()
                .take_while(|c| c.confidence >= tau)
                .count()
        };
        let count = match self.rule {
            Rule::Schedule => self.schedule.get(step).copied().unwrap_or(n),
            Rule::Threshold { tau, alpha } => {
                let tau = if step == 0 {
                    tau
                } else {
                    tau * (1.0 - alpha * (1.0 - masked_ratio))
                };
                above(tau).max(1)
            }
            Rule::Factor(factor) => factor_count(candidates, factor),
            Rule::Timestep { eps } => {
                if step + 1 < steps {
                    let ts = linspace_f32(1.0, eps, steps + 1);
                    let (t, s) = (ts[step], ts[step + 1]);
                    (n as f32 * (1.0 - s / t)) as usize
                } else {
                    n
                }
            }
            Rule::CarryThreshold(tau) => {
                let quota = self.schedule.get(step).copied().unwrap_or(0) + self.carry;
                let quota = quota.min(n);
                let committed = if quota == 0 {
                    0
                } else {
                    1 + candidates[1..quota]
                        .iter()
                        .filter(|c| c.confidence >= tau)
                        .count()
                };
                self.carry = quota - committed;
                committed
            }
        };
        count.min(n)
    }
}

/// LLaDA's `get_num_transfer_tokens`: `masks` spread over `steps`, the first
/// `masks % steps` steps taking one more.
pub fn transfer_schedule(masks: usize, steps: usize) -> Vec<usize> {
    let (base, extra) = (masks / steps, masks % steps);
    (0..steps).map(|i| base + usize::from(i < extra)).collect()
}

/// How many the factor rule commits of `sorted` (descending) candidates:
/// the leading run with c_j >= 1 - factor / (j + 1) (j from 1; the first is
/// always taken), except that stopping only at the last one takes all.
fn factor_count(sorted: &[Candidate], factor: f64) -> usize {
    let n = sorted.len();
    let passing = 1 + sorted
        .iter()
        .enumerate()
        .skip(1)
        .take_while(|(i, c)| c.confidence >= 1.0 - factor / (*i as f64 + 2.0))
        .count();
    if passing + 1 >= n {
        n
    } else {
        passing
    }
}

/// `torch.linspace(start, end, n)` in float32, bit for bit: the CPU kernel
/// counts from the start for the first half and back from the end for the
/// rest.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(confidences: &[f64]) -> Vec<Candidate> {
        confidences
            .iter()
            .enumerate()
            .map(|(i, &confidence)| Candidate {
                position: 10 + i,
                token: i as u32,
                confidence,
            })
            .collect()
    }

    fn select(rule: Rule, step: usize, confidences: &[f64], ratio: f64) -> Vec<usize> {
        let mut c = candidates(confidences);
        let k = BlockRule::new(rule, c.len(), 4).select(step, &mut c, ratio);
        c[..k].iter().map(|c| c.position).collect()
    }

    #[test]
    fn schedule_spreads_the_remainder_over_the_first_steps() {
        assert_eq!(transfer_schedule(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(transfer_schedule(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(transfer_schedule(8, 4), vec![2, 2, 2, 2]);
    }

    #[test]
    fn schedule_takes_the_most_confident_lower_position_first_on_ties() {
        let mut c = candidates(&[0.2, 0.9, 0.5, 0.9, 0.1, 0.3, 0.4, 0.6]);
        let mut rule = BlockRule::new(Rule::Schedule, 8, 4);
        assert_eq!(rule.select(0, &mut c, 1.0), 2);
        assert_eq!([c[0].position, c[1].position], [11, 13]);
    }

    #[test]
    fn one_mask_left_is_committed_by_every_rule() {
        for rule in [
            Rule::Schedule,
            Rule::Threshold {
                tau: 0.99,
                alpha: 0.0,
            },
            Rule::Factor(0.1),
            Rule::Timestep { eps: 1e-3 },
            Rule::CarryThreshold(0.99),
        ] {
            let mut c = candidates(&[0.05]);
            assert_eq!(
                BlockRule::new(rule, 1, 1).select(0, &mut c, 1.0),
                1,
                "{rule:?}"
            );
        }
    }

    #[test]
    fn threshold_commits_the_top_one_when_all_are_below() {
        let rule = Rule::Threshold {
            tau: 0.9,
            alpha: 0.0,
        };
        assert_eq!(select(rule, 0, &[0.3, 0.5, 0.4], 1.0), vec![11]);
        assert_eq!(select(rule, 1, &[0.95, 0.5, 0.91], 1.0), vec![10, 12]);
    }

    #[test]
    fn dynamic_threshold_relaxes_after_the_first_step_only() {
        let rule = Rule::Threshold {
            tau: 0.9,
            alpha: 0.5,
        };
        // r = 0.5: tau' = 0.9 * (1 - 0.5 * 0.5) = 0.675.
        assert_eq!(select(rule, 1, &[0.7, 0.6, 0.95], 0.5), vec![12, 10]);
        assert_eq!(select(rule, 0, &[0.7, 0.6, 0.95], 0.5), vec![12]);
    }

    #[test]
    fn factor_rule_and_its_last_element_quirk() {
        // Thresholds for j = 2, 3, 4 with factor 1: 1 - 1/3, 1 - 1/4, 1 - 1/5.
        // Stops at the third: two committed. Fails only at the last: all four.
        assert_eq!(
            select(Rule::Factor(1.0), 0, &[0.9, 0.7, 0.5, 0.1], 1.0).len(),
            2
        );
        assert_eq!(
            select(Rule::Factor(1.0), 0, &[0.9, 0.8, 0.78, 0.1], 1.0).len(),
            4
        );
        assert_eq!(
            select(Rule::Factor(1.0), 0, &[0.9, 0.1, 0.1, 0.1], 1.0).len(),
            1
        );
        assert_eq!(
            select(Rule::Factor(1.0), 0, &[0.9, 0.95, 0.8, 0.85], 1.0).len(),
            4
        );
    }

    #[test]
    fn linspace_matches_torch_float32() {
        // torch.linspace(1, 1e-3, 5).tolist() in float32.
        let want = [1.0f32, 0.75025, 0.5005, 0.25075, 0.001];
        for (got, want) in linspace_f32(1.0, 1e-3, 5).iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn timestep_count_truncates_and_the_last_step_takes_all() {
        let mut c = candidates(&[0.5; 8]);
        let mut rule = BlockRule::new(Rule::Timestep { eps: 1e-3 }, 8, 4);
        // t = 1, s = 0.75025: 8 * 0.24975 = 1.998 -> 1.
        assert_eq!(rule.select(0, &mut c, 1.0), 1);
        assert_eq!(rule.select(3, &mut c, 1.0), 8);
    }

    #[test]
    fn carry_threshold_carries_rejected_tokens_to_the_next_step() {
        let mut rule = BlockRule::new(Rule::CarryThreshold(0.9), 4, 2);
        let mut c = candidates(&[0.5, 0.4, 0.3, 0.2]);
        assert_eq!(rule.select(0, &mut c, 1.0), 1);
        let mut c = candidates(&[0.95, 0.4, 0.3]);
        // quota 2 + 1 carried = 3: the first, and none of the rest.
        assert_eq!(rule.select(1, &mut c, 1.0), 1);
        let mut c = candidates(&[0.95, 0.91]);
        // past the last step: only the 2 carried.
        assert_eq!(rule.select(2, &mut c, 1.0), 2);
    }
}
