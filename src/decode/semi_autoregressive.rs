//! The semi-autoregressive samplers of LLaDA and Dream, with the Fast-dLLM
//! and Streaming-dLLM accelerations, as a [`super::Sequence`] state: each
//! pass is a step of the current block, and its answer commits tokens as the
//! plan's rule says. Everything a strategy changes is data in the [`Plan`].

use std::ops::Range;
use std::time::{Duration, Instant};

use super::layout;
use super::rule::{BlockRule, Candidate};
use super::sequence::{PassPlan, Progress};
use super::{check_prompt, DecodeOptions, ForwardTime, Generation, Plan};
use crate::backend::{PassShapes, TokenStats};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The pass issued and not yet answered.
#[derive(Debug)]
struct Pending {
    queries: Range<usize>,
    masked: Vec<usize>,
    rows: Range<usize>,
}

#[derive(Debug)]
pub(super) struct SemiAutoregressive {
    plan: Plan,
    prompt_len: usize,
    /// Prompt and generation; masks where nothing is committed yet.
    x: Vec<u32>,
    block: usize,
    /// Positions the current block's passes see (cache slot i holds kept[i]).
    kept: Vec<u32>,
    rule: BlockRule,
    step: usize,
    pending: Option<Pending>,
    finished: bool,
    nfe: usize,
    started: Option<Instant>,
    first_forward: Option<Duration>,
    full_forwards: ForwardTime,
    cached_forwards: ForwardTime,
}

impl SemiAutoregressive {
    pub(super) fn new(
        config: &ModelConfig,
        prompt: &[u32],
        options: &DecodeOptions,
    ) -> Result<SemiAutoregressive> {
        let plan = Plan::new(options, config, prompt.len())?;
        check_prompt(prompt, config)?;
        let mut x = prompt.to_vec();
        x.resize(prompt.len() + plan.gen_length, plan.mask_id);
        let mut sequence = SemiAutoregressive {
            rule: BlockRule::new(plan.rule, 0, plan.steps_per_block),
            plan,
            prompt_len: prompt.len(),
            x,
            block: 0,
            kept: Vec::new(),
            step: 0,
            pending: None,
            finished: false,
            nfe: 0,
            started: None,
            first_forward: None,
            full_forwards: ForwardTime::default(),
            cached_forwards: ForwardTime::default(),
        };
        sequence.enter_block(0);
        Ok(sequence)
    }

    pub(super) fn slots(&self) -> usize {
        self.x.len()
    }

    pub(super) fn pass_shapes(&self) -> PassShapes {
        self.plan.pass_shapes(self.prompt_len)
    }

    pub(super) fn is_finished(&self) -> bool {
        self.finished
    }

    pub(super) fn next_pass(&mut self) -> Result<PassPlan> {
        assert!(!self.finished, "a finished sequence runs no pass");
        self.started.get_or_insert_with(Instant::now);
        let (bs, be) = self.block_span();
        let masked: Vec<usize> = (bs..be)
            .filter(|&p| self.x[p] == self.plan.mask_id)
            .collect();
        // Past the schedule every rule commits at least one token a step, so
        // this many steps means committed tokens are the mask itself.
        if self.step >= self.plan.steps_per_block + self.plan.block_length {
            return Err(Error::invalid(format!(
                "decoding made no progress in block {}: the model keeps predicting the mask id {} at masked positions (is the mask id right?)",
                self.block, self.plan.mask_id
            )));
        }
        let queries = self.plan.queries(self.step, bs, self.kept.len());
        // Output row of position p; Dream predicts p from the output at p - 1.
        let rows =
            self.row_of(&queries, masked[0])..self.row_of(&queries, masked[masked.len() - 1]) + 1;
        let positions = self.kept[queries.clone()].to_vec();
        let tokens = positions.iter().map(|&p| self.x[p as usize]).collect();
        let pass = PassPlan {
            tokens,
            positions,
            write_slot: queries.start,
            attend_len: self.kept.len(),
            rows: rows.clone(),
        };
        self.pending = Some(Pending {
            queries,
            masked,
            rows,
        });
        Ok(pass)
    }

    /// Takes the statistics of the pending pass's rows, which took `elapsed`,
    /// and commits tokens.
    pub(super) fn advance(&mut self, stats: &[TokenStats], elapsed: Duration) -> Progress {
        let Pending {
            queries,
            masked,
            rows,
        } = self.pending.take().expect("advance answers next_pass");
        assert_eq!(stats.len(), rows.len(), "one statistic per row asked");
        let kind = if queries.start == 0 {
            &mut self.full_forwards
        } else {
            &mut self.cached_forwards
        };
        kind.add(elapsed);
        self.nfe += 1;
        let started = self.started.expect("next_pass started the clock");
        self.first_forward.get_or_insert_with(|| started.elapsed());

        let mut candidates: Vec<Candidate> = masked
            .iter()
            .map(|&p| {
                let s = &stats[self.row_of(&queries, p) - rows.start];
                Candidate {
                    position: p,
                    token: s.token,
                    confidence: self.plan.score.of(s),
                }
            })
            .collect();
        let (bs, _) = self.block_span();
        let commit = if self.step == 0 && self.plan.first_step_commits_first_position {
            candidates.retain(|c| c.position == bs);
            candidates.len()
        } else {
            let seen = &self.kept[bs..];
            let masked_seen = seen
                .iter()
                .filter(|&&p| self.x[p as usize] == self.plan.mask_id)
                .count();
            let ratio = masked_seen as f64 / seen.len() as f64;
            self.rule.select(self.step, &mut candidates, ratio)
        };
        for c in &candidates[..commit] {
            self.x[c.position] = c.token;
        }
        self.step += 1;
        self.settle()
    }

    pub(super) fn into_generation(self) -> Generation {
        let started = self.started.unwrap_or_else(Instant::now);
        let total = started.elapsed();
        let prompt_time = self.first_forward.unwrap_or_default();
        let tokens = self.x[self.prompt_len..].to_vec();
        Generation {
            non_eos_tokens: tokens.iter().filter(|&&t| t != self.plan.eos_id).count(),
            tokens,
            nfe: self.nfe,
            full_forwards: self.full_forwards,
            cached_forwards: self.cached_forwards,
            cache_fills: ForwardTime::default(),
            prompt_time,
            decode_time: total.saturating_sub(prompt_time),
        }
    }

    pub(super) fn current_block(&self) -> (usize, &[u32]) {
        let (bs, be) = self.block_span();
        (self.block, &self.x[bs..be])
    }

    fn block_span(&self) -> (usize, usize) {
        let bs = self.prompt_len + self.block * self.plan.block_length;
        (bs, bs + self.plan.block_length)
    }

    fn row_of(&self, queries: &Range<usize>, p: usize) -> usize {
        let q = p - queries.start;
        if self.plan.shifted_logits {
            q.saturating_sub(1)
        } else {
            q
        }
    }

    fn enter_block(&mut self, block: usize) {
        self.block = block;
        let (bs, be) = self.block_span();
        self.kept = layout::kept_positions(be, self.x.len(), self.plan.window, self.plan.tail);
        let masks = self.x[bs..be]
            .iter()
            .filter(|&&t| t == self.plan.mask_id)
            .count();
        self.rule = BlockRule::new(self.plan.rule, masks, self.plan.steps_per_block);
        self.step = 0;
    }

    /// Completes every block that has no masks left, stopping early at EOS
    /// when the plan says so.
    fn settle(&mut self) -> Progress {
        let mut progress = Progress::default();
        loop {
            let (bs, be) = self.block_span();
            if self.x[bs..be].contains(&self.plan.mask_id) {
                return progress;
            }
            progress.blocks.push((self.block, self.x[bs..be].to_vec()));
            let last = be == self.x.len();
            if self.plan.early_exit && self.x[bs..be].contains(&self.plan.eos_id) {
                self.x[be..].fill(self.plan.eos_id);
            } else if !last {
                self.enter_block(self.block + 1);
                continue;
            }
            self.finished = true;
            progress.finished = true;
            return progress;
        }
    }
}
