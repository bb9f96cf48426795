//! Block diffusion, as LLaDA2.0 and LLaDA2.1 decode (LLADA2.md §4-6).
//!
//! The canvas is the prompt followed by masks up to a whole number of blocks,
//! cut into blocks at absolute offsets. Attention is bidirectional inside a
//! block and causal across blocks, so a block's keys and values depend only
//! on it and the blocks before it: once a block is final they are exact, and
//! they are computed once and kept in the backend's cache. Each denoising
//! step forwards the current block alone against that cache. The reference
//! re-encodes the whole window every step instead; the numbers are the same
//! up to rounding order, and its NFE (one per decision) is ours.
//!
//! Filling the cache costs forwards that decide nothing: each of the
//! prompt's complete blocks once, and a finished block whose last forward
//! saw tokens that changed afterwards. They are counted apart from NFE
//! ([`Generation::cache_fills`]).

use std::time::{Duration, Instant};

use crate::backend::{PassShapes, TokenStats};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};

use super::sequence::{PassPlan, Progress};
use super::{check_prompt, special_ids, transfer_schedule, DecodeOptions, ForwardTime, Generation};

/// How tokens are committed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampler {
    /// LLaDA's and Dream's samplers with the Fast-dLLM and Streaming-dLLM
    /// accelerations (DESIGN §2-3).
    #[default]
    SemiAutoregressive,
    /// LLaDA2.0 (LLADA2.md §5): per block, `steps` steps with the quota
    /// schedule of the block length; a step commits every masked position
    /// above the threshold when they meet the step's quota, else the quota's
    /// most confident. `steps` counts per block here, as in the reference.
    Llada20 { eos_early_stop: bool },
    /// LLaDA2.1 (LLADA2.md §6): threshold commits of masked positions
    /// (at least `num_to_transfer`) plus edits of the block's earlier
    /// commits, until a forward changes nothing.
    Llada21(Editing),
}

/// LLaDA2.1's token-to-token editing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Editing {
    /// A committed token is replaced by a different argmax above this
    /// probability (strictly). 1 turns editing off; 0 edits at every change.
    pub editing_threshold: f64,
    /// At most this many forwards of a block after its last mask is gone.
    pub max_post_steps: usize,
    /// The least number of masks a step commits (the most confident).
    pub num_to_transfer: usize,
    pub eos_early_stop: bool,
}

impl Default for Editing {
    /// The reference's defaults.
    fn default() -> Self {
        Editing {
            editing_threshold: 0.9,
            max_post_steps: 16,
            num_to_transfer: 1,
            eos_early_stop: false,
        }
    }
}

/// A request checked against the model.
#[derive(Debug)]
struct Plan {
    sampler: Sampler,
    prompt_len: usize,
    gen_length: usize,
    block_length: usize,
    /// Commit masked positions strictly more probable than this (infinite
    /// without a threshold: the quota or `num_to_transfer` alone).
    threshold: f64,
    /// LLaDA2.0's quota for each step of a block.
    quota: Vec<usize>,
    mask_id: u32,
    eos_id: u32,
}

impl Plan {
    fn new(o: &DecodeOptions, config: &ModelConfig, prompt_len: usize) -> Result<Plan> {
        let invalid = |m: String| Err(Error::invalid(m));
        if config.family != Family::Llada2 {
            return invalid(format!(
                "the LLaDA2 samplers decode llada2_moe models; this is a {} model",
                config.family.name()
            ));
        }
        if prompt_len == 0 {
            return invalid("the prompt is empty".into());
        }
        if o.gen_length == 0 || o.block_length == 0 {
            return invalid("gen_length and block_length must be positive".into());
        }
        let foreign = [
            ("factor", o.factor.is_some()),
            ("suffix_window", o.suffix_window.is_some()),
            ("confidence_alpha", o.confidence_alpha != 0.0),
            ("early_exit (use eos_early_stop)", o.early_exit),
            ("alg", o.alg.is_some()),
        ];
        if let Some((name, _)) = foreign.iter().find(|(_, set)| *set) {
            return invalid(format!(
                "{name} belongs to the semi-autoregressive samplers, not to LLaDA2's"
            ));
        }
        let canvas = canvas_len(prompt_len, o.gen_length, o.block_length);
        if canvas > config.max_seq_len {
            return invalid(format!(
                "prompt ({prompt_len} tokens) plus gen_length ({}) fill {canvas} positions in whole blocks of {}, more than the model's maximum sequence length {}",
                o.gen_length, o.block_length, config.max_seq_len
            ));
        }
        let threshold = match o.threshold {
            Some(t) if !t.is_finite() => {
                return invalid(format!("threshold must be a number, got {t}"))
            }
            Some(t) => t,
            None => f64::INFINITY,
        };
        let quota = match o.sampler {
            Sampler::Llada20 { .. } => {
                if o.steps == 0 {
                    return invalid("steps must be positive".into());
                }
                // The reference's `min(steps, gen_length // minimal_topk)`, minimal_topk 1.
                transfer_schedule(o.block_length, o.steps.min(o.gen_length))
            }
            Sampler::Llada21(e) => {
                if e.num_to_transfer == 0 {
                    return invalid("num_to_transfer must be at least 1".into());
                }
                if !e.editing_threshold.is_finite() {
                    return invalid(format!(
                        "editing_threshold must be a number, got {}",
                        e.editing_threshold
                    ));
                }
                Vec::new()
            }
            Sampler::SemiAutoregressive => unreachable!("decoded by SemiAutoregressive"),
        };
        let (mask_id, eos_id) = special_ids(o, config)?;
        Ok(Plan {
            sampler: o.sampler,
            prompt_len,
            gen_length: o.gen_length,
            block_length: o.block_length,
            threshold,
            quota,
            mask_id,
            eos_id,
        })
    }

    /// The generated tokens of `x` the reference returns: `gen_length` of
    /// them after the prompt, cut after the first EOS. (Q3: when the
    /// LLaDA2.0 early stop finds its EOS past `gen_length`, the reference
    /// returns up to it; we keep to `gen_length`.)
    fn answer<'a>(&self, x: &'a [u32]) -> &'a [u32] {
        let generated = &x[self.prompt_len..self.prompt_len + self.gen_length];
        match generated.iter().position(|&t| t == self.eos_id) {
            Some(e) => &generated[..=e],
            None => generated,
        }
    }
}

/// Prompt and masks rounded up to whole blocks.
fn canvas_len(prompt_len: usize, gen_length: usize, block_length: usize) -> usize {
    (prompt_len + gen_length).div_ceil(block_length) * block_length
}

/// Where a step leaves the sampler's block loop.
enum Flow {
    /// Another step if the loop's condition holds.
    Continue,
    EndBlock,
    /// End the block and stop decoding.
    Stop,
}

/// The pass a sequence waits on.
#[derive(Debug)]
enum Pending {
    /// Makes the keys and values of the block at `exact_until` exact.
    Fill,
    /// A denoising step of the current block, which held `seen` when asked.
    Step { seen: Vec<u32> },
}

/// A request decoding by block diffusion, one forward at a time.
///
/// The current block's steps run against a cache whose slots below
/// `exact_until` hold the keys and values of final tokens; before a block's
/// first step, the stale blocks before it are forwarded one by one, each
/// against those before it (the cache fills). Each step's answer is one
/// transition of the sampler's per-block loop.
#[derive(Debug)]
pub(super) struct BlockDiffusion {
    plan: Plan,
    /// The canvas: prompt, then masks where nothing is committed yet.
    x: Vec<u32>,
    /// The current block's start. Slot `i` of the cache holds position `i`.
    bs: usize,
    exact_until: usize,
    /// LLaDA2.0: the current block's step, indexing the quota.
    step: usize,
    /// LLaDA2.1: the current block's forwards once its masks were gone.
    post_steps: usize,
    /// The tokens the current block's last step saw.
    last_forward: Option<Vec<u32>>,
    /// Answer tokens already handed out in [`Progress::blocks`].
    emitted: usize,
    pending: Option<Pending>,
    finished: bool,
    fills: ForwardTime,
    steps: ForwardTime,
    started: Option<Instant>,
    /// Until the end of the first step: the prompt's fills and that step.
    prompt_time: Option<Duration>,
}

impl BlockDiffusion {
    pub(super) fn new(
        config: &ModelConfig,
        prompt: &[u32],
        options: &DecodeOptions,
    ) -> Result<BlockDiffusion> {
        let plan = Plan::new(options, config, prompt.len())?;
        check_prompt(prompt, config)?;
        let b = plan.block_length;
        let len = canvas_len(prompt.len(), plan.gen_length, b);
        let mut x = prompt.to_vec();
        x.resize(len, plan.mask_id);
        // Every block has masks when decoding reaches it, so it runs at
        // least one step.
        Ok(BlockDiffusion {
            // The block holding the prompt's end, or the first after it.
            bs: prompt.len() / b * b,
            plan,
            x,
            exact_until: 0,
            step: 0,
            post_steps: 0,
            last_forward: None,
            emitted: 0,
            pending: None,
            finished: false,
            fills: ForwardTime::default(),
            steps: ForwardTime::default(),
            started: None,
            prompt_time: None,
        })
    }

    pub(super) fn slots(&self) -> usize {
        self.x.len()
    }

    /// Every pass forwards one whole block.
    pub(super) fn pass_shapes(&self) -> PassShapes {
        PassShapes {
            tokens: vec![self.plan.block_length],
            max_rows: self.plan.block_length,
        }
    }

    pub(super) fn is_finished(&self) -> bool {
        self.finished
    }

    /// A cache fill while a block before the current one is stale, else a
    /// denoising step of the current block against the blocks before it.
    pub(super) fn next_pass(&mut self) -> Result<PassPlan> {
        assert!(!self.finished, "a finished sequence runs no pass");
        self.started.get_or_insert_with(Instant::now);
        let b = self.plan.block_length;
        let (start, rows, pending) = if self.exact_until < self.bs {
            // A fill decides nothing: it asks for no rows.
            (self.exact_until, 0, Pending::Fill)
        } else {
            let seen = self.x[self.bs..self.bs + b].to_vec();
            (self.bs, b, Pending::Step { seen })
        };
        self.pending = Some(pending);
        Ok(PassPlan {
            tokens: self.x[start..start + b].to_vec(),
            positions: (start as u32..(start + b) as u32).collect(),
            write_slot: start,
            attend_len: start + b,
            rows: 0..rows,
        })
    }

    /// Takes the answer to the pending pass, which took `elapsed`: a fill
    /// moves the exact prefix on; a step commits and edits tokens as the
    /// sampler says and ends the block when its loop would.
    pub(super) fn advance(&mut self, stats: &[TokenStats], elapsed: Duration) -> Result<Progress> {
        let b = self.plan.block_length;
        let seen = match self.pending.take().expect("advance answers next_pass") {
            Pending::Fill => {
                self.fills.add(elapsed);
                self.exact_until += b;
                return Ok(Progress::default());
            }
            Pending::Step { seen } => seen,
        };
        assert_eq!(stats.len(), b, "one statistic per block row");
        self.steps.add(elapsed);
        let started = self.started.expect("next_pass started the clock");
        self.prompt_time.get_or_insert_with(|| started.elapsed());
        let flow = match self.plan.sampler {
            Sampler::Llada20 { eos_early_stop } => self.llada20_step(&seen, stats, eos_early_stop),
            Sampler::Llada21(editing) => self.llada21_step(&seen, stats, editing)?,
            Sampler::SemiAutoregressive => unreachable!("decoded by SemiAutoregressive"),
        };
        self.last_forward = Some(seen);
        Ok(match flow {
            Flow::Continue if self.wants_step() => Progress::default(),
            Flow::Continue | Flow::EndBlock => self.end_block(false),
            Flow::Stop => self.end_block(true),
        })
    }

    pub(super) fn into_generation(self) -> Generation {
        let total = self.started.map_or(Duration::ZERO, |s| s.elapsed());
        let prompt_time = self.prompt_time.unwrap_or_default();
        let tokens = self.plan.answer(&self.x).to_vec();
        Generation {
            non_eos_tokens: tokens.iter().filter(|&&t| t != self.plan.eos_id).count(),
            tokens,
            nfe: self.steps.count,
            prompt_time,
            decode_time: total.saturating_sub(prompt_time),
            full_forwards: ForwardTime::default(),
            cached_forwards: self.steps,
            cache_fills: self.fills,
        }
    }

    /// Whether the sampler's block loop runs another step: LLaDA2.0 while
    /// the quota lasts and masks remain; LLaDA2.1 while masks remain, then
    /// for at most `max_post_steps` forwards.
    fn wants_step(&mut self) -> bool {
        let masks_left =
            self.x[self.bs..self.bs + self.plan.block_length].contains(&self.plan.mask_id);
        match self.plan.sampler {
            Sampler::Llada20 { .. } => masks_left && self.step < self.plan.quota.len(),
            Sampler::Llada21(editing) => {
                if !masks_left {
                    self.post_steps += 1;
                }
                self.post_steps <= editing.max_post_steps
            }
            Sampler::SemiAutoregressive => unreachable!("decoded by SemiAutoregressive"),
        }
    }

    /// One step of LLaDA2.0 (LLADA2.md §5.3-4) over the block that held
    /// `seen`.
    fn llada20_step(&mut self, seen: &[u32], stats: &[TokenStats], eos_early_stop: bool) -> Flow {
        let plan = &self.plan;
        let active = masked_offsets(seen, plan.mask_id);
        let commit = threshold_or_floor(&active, stats, plan.threshold, plan.quota[self.step]);
        self.step += 1;
        for &i in &commit {
            self.x[self.bs + i] = stats[i].token;
        }
        // Q3: the step-level stop of `eos_early_stop`, once everything before
        // the first EOS is settled. The reference returns the prompt with
        // it; we return the generated tokens only.
        if eos_early_stop && commit.iter().any(|&i| stats[i].token == plan.eos_id) {
            let be = self.bs + plan.block_length;
            if let Some(e) = self.x[..be].iter().position(|&t| t == plan.eos_id) {
                let settled = self.x[plan.prompt_len.min(e)..e]
                    .iter()
                    .all(|&t| t != plan.mask_id);
                if settled {
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    }

    /// One step of LLaDA2.1 (LLADA2.md §6) over the block that held `seen`:
    /// mask-to-token commits and token-to-token edits. The block ends when a
    /// forward without masks changes nothing.
    fn llada21_step(
        &mut self,
        seen: &[u32],
        stats: &[TokenStats],
        editing: Editing,
    ) -> Result<Flow> {
        let plan = &self.plan;
        let b = plan.block_length;
        let active = masked_offsets(seen, plan.mask_id);
        // The prompt's tail in this block is never edited.
        let first_editable = plan.prompt_len.saturating_sub(self.bs).min(b);
        let commit = if active.is_empty() {
            Vec::new()
        } else {
            threshold_or_floor(&active, stats, plan.threshold, editing.num_to_transfer)
        };
        let edits: Vec<usize> = (first_editable..b)
            .filter(|&i| {
                seen[i] != plan.mask_id
                    && stats[i].prob > editing.editing_threshold
                    && stats[i].token != seen[i]
            })
            .collect();
        for &i in commit.iter().chain(&edits) {
            self.x[self.bs + i] = stats[i].token;
        }
        if !active.is_empty() && self.x[self.bs..self.bs + b] == seen[..] {
            // Q4: only the mask id won where tokens were due. The same
            // forward would follow forever.
            return Err(Error::invalid(format!(
                "decoding made no progress in block {}: the model keeps predicting the mask id {} at masked positions (is the mask id right?)",
                self.bs / b,
                plan.mask_id
            )));
        }
        Ok(if active.is_empty() && edits.is_empty() {
            Flow::EndBlock
        } else {
            Flow::Continue
        })
    }

    /// The current block's index among the blocks that hold generated
    /// tokens, and its generated part (the prompt's share of a block it
    /// ends in left out).
    pub(super) fn current_block(&self) -> (usize, &[u32]) {
        let (b, prompt_len) = (self.plan.block_length, self.plan.prompt_len);
        let be = self.bs + b;
        (
            self.answer_block_index(),
            &self.x[prompt_len.max(self.bs).min(be)..be],
        )
    }

    fn answer_block_index(&self) -> usize {
        let b = self.plan.block_length;
        (self.bs - self.plan.prompt_len / b * b) / b
    }

    /// Ends the current block: keeps its keys and values when its last step
    /// saw its final tokens, hands out the answer tokens it completes, and
    /// moves to the next block unless the sampler stops here or it was the
    /// last. `stop`: the sampler stopped decoding within the block.
    fn end_block(&mut self, stop: bool) -> Progress {
        let plan = &self.plan;
        let (bs, b) = (self.bs, plan.block_length);
        let be = bs + b;
        if self.last_forward.as_deref() == Some(&self.x[bs..be]) {
            self.exact_until = be;
        }
        let mut progress = Progress::default();
        let answer = plan.answer(&self.x);
        let done = answer.len().min(be.saturating_sub(plan.prompt_len));
        if done > self.emitted {
            progress.blocks.push((
                self.answer_block_index(),
                answer[self.emitted..done].to_vec(),
            ));
            self.emitted = done;
        }
        let generated = &self.x[plan.prompt_len.min(be)..be];
        let stop = stop
            || match plan.sampler {
                // Q7: LLaDA2.0 always stops after a block whose generated part
                // holds EOS.
                Sampler::Llada20 { .. } => generated.contains(&plan.eos_id),
                Sampler::Llada21(e) => {
                    e.eos_early_stop
                        && !generated.contains(&plan.mask_id)
                        && generated.contains(&plan.eos_id)
                }
                Sampler::SemiAutoregressive => unreachable!("decoded by SemiAutoregressive"),
            };
        if stop || be == self.x.len() {
            self.finished = true;
            progress.finished = true;
            return progress;
        }
        self.bs = be;
        self.step = 0;
        self.post_steps = 0;
        self.last_forward = None;
        progress
    }
}

/// The masked offsets of a block's tokens.
fn masked_offsets(block: &[u32], mask_id: u32) -> Vec<usize> {
    (0..block.len()).filter(|&i| block[i] == mask_id).collect()
}

/// The masked offsets (`active`) a step commits: every one whose
/// probability is strictly above `threshold` when there are at least
/// `floor` of them, else the `floor` most confident (fewer if fewer are
/// masked; ties to the lower position).
fn threshold_or_floor(
    active: &[usize],
    stats: &[TokenStats],
    threshold: f64,
    floor: usize,
) -> Vec<usize> {
    let above: Vec<usize> = active
        .iter()
        .copied()
        .filter(|&i| stats[i].prob > threshold)
        .collect();
    if above.len() >= floor {
        return above;
    }
    let mut ranked = active.to_vec();
    ranked.sort_by(|&a, &b| stats[b].prob.total_cmp(&stats[a].prob));
    ranked.truncate(floor);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    /// Decodes as if the model predicted `predicted` with probability 0.99
    /// everywhere: the state machine alone, without a backend.
    fn run(predicted: u32, sampler: Sampler) -> Result<Generation> {
        let config = synthetic::preset("llada2-mini").unwrap();
        let options = DecodeOptions {
            gen_length: 16,
            block_length: 8,
            steps: 4,
            threshold: Some(0.9),
            sampler,
            ..DecodeOptions::default()
        };
        let mut sequence = BlockDiffusion::new(&config, &[1, 2, 3], &options)?;
        while !sequence.is_finished() {
            let pass = sequence.next_pass()?;
            let row = TokenStats {
                token: predicted,
                prob: 0.99,
                neg_entropy: 0.0,
                margin: 0.0,
            };
            sequence.advance(&vec![row; pass.rows.len()], Duration::ZERO)?;
        }
        Ok(sequence.into_generation())
    }

    #[test]
    fn the_prompts_complete_blocks_are_filled_before_the_first_step() {
        let config = synthetic::preset("llada2-mini").unwrap();
        let options = DecodeOptions {
            gen_length: 16,
            block_length: 8,
            sampler: Sampler::Llada21(Editing::default()),
            ..DecodeOptions::default()
        };
        let prompt: Vec<u32> = (1..=19).collect();
        let mut sequence = BlockDiffusion::new(&config, &prompt, &options).unwrap();
        // Two fills ask for no rows, then the block holding the prompt's end.
        for (start, rows) in [(0, 0..0), (8, 0..0), (16, 0..8)] {
            let pass = sequence.next_pass().unwrap();
            assert_eq!((pass.write_slot, pass.attend_len), (start, start + 8));
            assert_eq!(pass.rows, rows);
            if rows.is_empty() {
                sequence.advance(&[], Duration::ZERO).unwrap();
            }
        }
    }

    #[test]
    fn a_model_predicting_its_mask_stops_llada21_with_an_error() {
        let mask = synthetic::preset("llada2-mini").unwrap().mask_id.unwrap();
        let err = run(mask, Sampler::Llada21(Editing::default())).unwrap_err();
        assert!(
            err.to_string().contains("made no progress in block 0"),
            "{err}"
        );
        // LLaDA2.0 ends each block after its steps, masks left, as the
        // reference: 3 + 16 positions fill 3 blocks of 8, 4 steps each.
        let out = run(
            mask,
            Sampler::Llada20 {
                eos_early_stop: false,
            },
        )
        .unwrap();
        assert_eq!((out.tokens, out.nfe), (vec![mask; 16], 12));
    }

    #[test]
    fn tokens_end_at_the_first_eos() {
        let eos = synthetic::preset("llada2-mini").unwrap().eos_id.unwrap();
        // Every mask of the first block is committed as EOS at its first step;
        // LLaDA2.0 stops after that block.
        let out = run(
            eos,
            Sampler::Llada20 {
                eos_early_stop: false,
            },
        )
        .unwrap();
        assert_eq!((out.tokens, out.nfe), (vec![eos], 1));
    }

    fn stats(probs: &[f64]) -> Vec<TokenStats> {
        probs
            .iter()
            .enumerate()
            .map(|(i, &prob)| TokenStats {
                token: 100 + i as u32,
                prob,
                neg_entropy: 0.0,
                margin: 0.0,
            })
            .collect()
    }

    #[test]
    fn canvas_rounds_prompt_and_generation_up_to_whole_blocks() {
        assert_eq!(canvas_len(13, 64, 16), 80);
        assert_eq!(canvas_len(32, 64, 32), 96);
        assert_eq!(canvas_len(45, 64, 32), 128);
    }

    #[test]
    fn threshold_commits_all_above_when_they_meet_the_floor() {
        let s = stats(&[0.96, 0.5, 0.97, 0.95, 0.2]);
        // Strictly above 0.95: offsets 0 and 2, which meet a floor of 2.
        assert_eq!(
            threshold_or_floor(&[0, 1, 2, 3, 4], &s, 0.95, 2),
            vec![0, 2]
        );
        // A floor of 3 is not met: the three most confident instead.
        assert_eq!(
            threshold_or_floor(&[0, 1, 2, 3, 4], &s, 0.95, 3),
            vec![2, 0, 3]
        );
        // Only masked offsets count, and a floor of 0 takes those above.
        assert_eq!(
            threshold_or_floor(&[1, 4], &s, 0.95, 0),
            Vec::<usize>::new()
        );
        assert_eq!(threshold_or_floor(&[1, 4], &s, 0.95, 5), vec![1, 4]);
    }
}
