//! One request in flight: its plan, its tokens, and where it stands.
//!
//! A [`Sequence`] is the decode loop turned inside out so that a scheduler can
//! step many of them together: [`Sequence::next_pass`] says which forward the
//! request needs now, and [`Sequence::advance`] takes that forward's output,
//! commits tokens as the plan's rule says, and moves on through the blocks.
//! Everything a strategy changes is data in the [`Plan`].

use std::ops::Range;
use std::time::{Duration, Instant};

use super::layout;
use super::rule::{BlockRule, Candidate};
use super::{DecodeOptions, ForwardTime, Generation, Plan};
use crate::backend::{ForwardPass, PassShapes, TokenStats};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The forward a sequence needs next, in its own slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub write_slot: usize,
    pub attend_len: usize,
    pub rows: Range<usize>,
}

impl PassPlan {
    /// The pass, for a sequence whose slots live in `pages`.
    pub fn as_forward<'a>(&'a self, pages: &'a [u32]) -> ForwardPass<'a> {
        ForwardPass {
            tokens: &self.tokens,
            positions: &self.positions,
            write_slot: self.write_slot,
            attend_len: self.attend_len,
            rows: self.rows.clone(),
            pages,
        }
    }
}

/// What a step changed, for whoever is waiting on the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Blocks completed by this step: index and tokens.
    pub blocks: Vec<(usize, Vec<u32>)>,
    /// Whether the request is done ([`Sequence::into_generation`]).
    pub finished: bool,
}

/// The pass issued and not yet answered.
#[derive(Debug)]
struct Pending {
    queries: Range<usize>,
    masked: Vec<usize>,
    rows: Range<usize>,
}

#[derive(Debug)]
pub struct Sequence {
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

impl Sequence {
    /// Checks `options` and `prompt` against the model; nothing runs yet.
    pub fn new(config: &ModelConfig, prompt: &[u32], options: &DecodeOptions) -> Result<Sequence> {
        let plan = Plan::new(options, config, prompt.len())?;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(Error::invalid(format!(
                "prompt token id {bad} is outside the vocabulary of {} entries",
                config.vocab_size
            )));
        }
        let mut x = prompt.to_vec();
        x.resize(prompt.len() + plan.gen_length, plan.mask_id);
        let mut sequence = Sequence {
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

    /// Cache slots the sequence needs: one per position.
    pub fn slots(&self) -> usize {
        self.x.len()
    }

    /// The shapes of every pass this request can run.
    pub fn pass_shapes(&self) -> PassShapes {
        self.plan.pass_shapes(self.prompt_len)
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The block being decoded: its index and tokens, masks where nothing
    /// is committed yet.
    pub fn current_block(&self) -> (usize, &[u32]) {
        let (bs, be) = self.block_span();
        (self.block, &self.x[bs..be])
    }

    /// The forward the current step needs. Fails when decoding stalls.
    pub fn next_pass(&mut self) -> Result<PassPlan> {
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
    pub fn advance(&mut self, stats: &[TokenStats], elapsed: Duration) -> Progress {
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

    /// The result; call once [`Sequence::is_finished`].
    pub fn into_generation(self) -> Generation {
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
            prompt_time,
            decode_time: total.saturating_sub(prompt_time),
        }
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
