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

use crate::backend::{Backend, ForwardPass, PassShapes, TokenStats};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};

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
            Sampler::SemiAutoregressive => unreachable!("dispatched by decode::generate"),
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

/// The backend's cache and the forwards that keep it: slots below
/// `exact_until` hold the keys and values of final tokens.
struct BlockCache<'a> {
    backend: &'a mut dyn Backend,
    /// Slot `i` holds position `i`.
    positions: Vec<u32>,
    block_length: usize,
    exact_until: usize,
    fills: ForwardTime,
    steps: ForwardTime,
    started: Instant,
    /// Until the end of the first step: the prompt's fills and that step.
    prompt_time: Option<Duration>,
}

impl BlockCache<'_> {
    /// Makes the keys and values of every block before `start` exact,
    /// forwarding the stale blocks one by one, each against those before it.
    fn fill_until(&mut self, x: &[u32], start: usize) -> Result<()> {
        let b = self.block_length;
        while self.exact_until < start {
            let (bs, be) = (self.exact_until, self.exact_until + b);
            let began = Instant::now();
            self.backend
                .logits(&block_pass(x, &self.positions, bs, be, 0))?;
            self.fills.add(began.elapsed());
            self.exact_until = be;
        }
        Ok(())
    }

    /// One denoising step: the block `bs..be` against the blocks before it.
    fn step(&mut self, x: &[u32], bs: usize, be: usize) -> Result<Vec<TokenStats>> {
        let began = Instant::now();
        let stats = self
            .backend
            .token_stats(&block_pass(x, &self.positions, bs, be, be - bs))?;
        self.steps.add(began.elapsed());
        self.prompt_time
            .get_or_insert_with(|| self.started.elapsed());
        Ok(stats)
    }
}

/// The pass of block `bs..be`, attending to every slot up to its end,
/// reporting its first `rows` rows.
fn block_pass<'a>(
    x: &'a [u32],
    positions: &'a [u32],
    bs: usize,
    be: usize,
    rows: usize,
) -> ForwardPass<'a> {
    ForwardPass {
        tokens: &x[bs..be],
        positions: &positions[bs..be],
        write_slot: bs,
        attend_len: be,
        rows: 0..rows,
    }
}

/// How a block ended.
enum BlockEnd {
    Continue,
    /// Stop decoding after this block.
    Stop,
}

/// Decodes `prompt` by block diffusion with `options.sampler`.
pub(super) fn generate(
    backend: &mut dyn Backend,
    config: &ModelConfig,
    prompt: &[u32],
    options: &DecodeOptions,
    on_block: &mut dyn FnMut(&[u32]),
) -> Result<Generation> {
    let plan = Plan::new(options, config, prompt.len())?;
    check_prompt(prompt, config)?;
    let b = plan.block_length;
    let len = canvas_len(prompt.len(), plan.gen_length, b);
    let mut x = prompt.to_vec();
    x.resize(len, plan.mask_id);
    backend.prepare(len)?;
    backend.expect(&PassShapes {
        tokens: vec![b],
        max_rows: b,
    })?;
    let mut cache = BlockCache {
        backend,
        positions: (0..len as u32).collect(),
        block_length: b,
        exact_until: 0,
        fills: ForwardTime::default(),
        steps: ForwardTime::default(),
        started: Instant::now(),
        prompt_time: None,
    };
    let mut emitted = 0;
    for block in prompt.len() / b..len / b {
        let (bs, be) = (block * b, block * b + b);
        cache.fill_until(&x, bs)?;
        let (end, last_forward) = match plan.sampler {
            Sampler::Llada20 { eos_early_stop } => {
                llada20_block(&plan, &mut cache, &mut x, bs, eos_early_stop)?
            }
            Sampler::Llada21(editing) => llada21_block(&plan, &mut cache, &mut x, bs, editing)?,
            Sampler::SemiAutoregressive => unreachable!("dispatched by decode::generate"),
        };
        // The block's keys and values are exact already when its last
        // forward saw its final tokens.
        if last_forward.as_deref() == Some(&x[bs..be]) {
            cache.exact_until = be;
        }
        let answer = plan.answer(&x);
        let done = answer.len().min(be.saturating_sub(plan.prompt_len));
        if done > emitted {
            on_block(&answer[emitted..done]);
            emitted = done;
        }
        if let BlockEnd::Stop = end {
            break;
        }
    }
    let total = cache.started.elapsed();
    let prompt_time = cache.prompt_time.unwrap_or_default();
    let tokens = plan.answer(&x).to_vec();
    Ok(Generation {
        non_eos_tokens: tokens.iter().filter(|&&t| t != plan.eos_id).count(),
        tokens,
        nfe: cache.steps.count,
        prompt_time,
        decode_time: total - prompt_time,
        full_forwards: ForwardTime::default(),
        cached_forwards: cache.steps,
        cache_fills: cache.fills,
    })
}

/// Masked positions of the block starting at `bs`, as offsets into it.
fn masked(x: &[u32], bs: usize, b: usize, mask_id: u32) -> Vec<usize> {
    (0..b).filter(|&i| x[bs + i] == mask_id).collect()
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

/// One block of LLaDA2.0 (LLADA2.md §5.3-4). Returns how the block ended
/// and the tokens its last forward saw.
fn llada20_block(
    plan: &Plan,
    cache: &mut BlockCache,
    x: &mut [u32],
    bs: usize,
    eos_early_stop: bool,
) -> Result<(BlockEnd, Option<Vec<u32>>)> {
    let b = plan.block_length;
    let be = bs + b;
    let mut last_forward = None;
    for &quota in &plan.quota {
        let active = masked(x, bs, b, plan.mask_id);
        if active.is_empty() {
            break;
        }
        let stats = cache.step(x, bs, be)?;
        last_forward = Some(x[bs..be].to_vec());
        let commit = threshold_or_floor(&active, &stats, plan.threshold, quota);
        for &i in &commit {
            x[bs + i] = stats[i].token;
        }
        // Q3: the step-level stop of `eos_early_stop`. The reference
        // returns the prompt with it; we return the generated tokens only.
        if eos_early_stop && commit.iter().any(|&i| stats[i].token == plan.eos_id) {
            let first_eos = x[..be].iter().position(|&t| t == plan.eos_id);
            if let Some(e) = first_eos {
                let settled = x[plan.prompt_len.min(e)..e]
                    .iter()
                    .all(|&t| t != plan.mask_id);
                if settled {
                    return Ok((BlockEnd::Stop, last_forward));
                }
            }
        }
    }
    // Q7: LLaDA2.0 always stops after a block whose generated part holds EOS.
    let generated = &x[plan.prompt_len.min(be)..be];
    let end = if generated.contains(&plan.eos_id) {
        BlockEnd::Stop
    } else {
        BlockEnd::Continue
    };
    Ok((end, last_forward))
}

/// One block of LLaDA2.1 (LLADA2.md §6): mask-to-token commits and
/// token-to-token edits until a forward changes nothing, or the mask-free
/// forwards run out. Returns how the block ended and the tokens its last
/// forward saw.
fn llada21_block(
    plan: &Plan,
    cache: &mut BlockCache,
    x: &mut [u32],
    bs: usize,
    editing: Editing,
) -> Result<(BlockEnd, Option<Vec<u32>>)> {
    let b = plan.block_length;
    let be = bs + b;
    // The prompt's tail in this block is never edited.
    let first_editable = plan.prompt_len.saturating_sub(bs).min(b);
    let mut post_steps = 0;
    let mut last_forward = None;
    loop {
        let active = masked(x, bs, b, plan.mask_id);
        if active.is_empty() {
            post_steps += 1;
            if post_steps > editing.max_post_steps {
                break;
            }
        }
        let old = x[bs..be].to_vec();
        let stats = cache.step(x, bs, be)?;
        let commit = if active.is_empty() {
            Vec::new()
        } else {
            threshold_or_floor(&active, &stats, plan.threshold, editing.num_to_transfer)
        };
        let edits: Vec<usize> = (first_editable..b)
            .filter(|&i| {
                old[i] != plan.mask_id
                    && stats[i].prob > editing.editing_threshold
                    && stats[i].token != old[i]
            })
            .collect();
        for &i in commit.iter().chain(&edits) {
            x[bs + i] = stats[i].token;
        }
        if !active.is_empty() && x[bs..be] == old[..] {
            // Q4: only the mask id won where tokens were due. The same
            // forward would follow forever.
            return Err(Error::invalid(format!(
                "decoding made no progress in block {}: the model keeps predicting the mask id {} at masked positions (is the mask id right?)",
                bs / b,
                plan.mask_id
            )));
        }
        last_forward = Some(old);
        if active.is_empty() && edits.is_empty() {
            break;
        }
    }
    let generated = &x[plan.prompt_len.min(be)..be];
    let end = if editing.eos_early_stop
        && !generated.contains(&plan.mask_id)
        && generated.contains(&plan.eos_id)
    {
        BlockEnd::Stop
    } else {
        BlockEnd::Continue
    };
    Ok((end, last_forward))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    /// A model that predicts `token` with probability 0.99 everywhere.
    struct Predicts(u32);

    impl Backend for Predicts {
        fn device_name(&self) -> String {
            "constant".into()
        }

        fn prepare(&mut self, _slots: usize) -> Result<()> {
            Ok(())
        }

        fn logits(&mut self, _pass: &ForwardPass) -> Result<Vec<f32>> {
            Ok(Vec::new())
        }

        fn token_stats(&mut self, pass: &ForwardPass) -> Result<Vec<TokenStats>> {
            let row = TokenStats {
                token: self.0,
                prob: 0.99,
                neg_entropy: 0.0,
                margin: 0.0,
            };
            Ok(vec![row; pass.rows.len()])
        }
    }

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
        generate(
            &mut Predicts(predicted),
            &config,
            &[1, 2, 3],
            &options,
            &mut |_| {},
        )
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
