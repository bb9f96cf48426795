//! Decoding, steered by a plan.
//!
//! A request's [`DecodeOptions`] are checked once against the model and
//! turned into a plan: which positions each block sees, which forward each
//! step runs (full, prefix-cached or DualCache), how confidences are scored
//! and which [`Rule`] commits tokens. A [`Sequence`] steps the plan one
//! forward at a time, knowing nothing about strategy names; LLaDA2's block
//! diffusion (`block_diffusion`) is the other state a sequence can be in.

mod block_diffusion;
mod layout;
mod rule;
mod semi_autoregressive;
mod sequence;

use std::ops::Range;
use std::time::{Duration, Instant};

pub use block_diffusion::{Editing, Sampler};
pub use rule::{transfer_schedule, Candidate, Rule};
pub use sequence::{PassPlan, Progress, Sequence};

use crate::backend::{Backend, PassShapes, TokenStats, SINGLE_PAGE};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};

/// Which key/value cache the steps after a block's first use (DESIGN §3.2-3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Every step is a full forward.
    None,
    /// Later steps forward the block and everything after it against the prefix.
    Prefix,
    /// Later steps forward only the block, updating its cache rows in place.
    Dual,
}

/// Dream's confidence algorithms (`alg` of its sampler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DreamAlg {
    MaskgitPlus,
    Entropy,
    TopkMargin,
    ConfidenceThreshold,
}

impl DreamAlg {
    pub fn name(self) -> &'static str {
        match self {
            DreamAlg::MaskgitPlus => "maskgit_plus",
            DreamAlg::Entropy => "entropy",
            DreamAlg::TopkMargin => "topk_margin",
            DreamAlg::ConfidenceThreshold => "confidence_threshold",
        }
    }

    pub const ALL: [DreamAlg; 4] = [
        DreamAlg::MaskgitPlus,
        DreamAlg::Entropy,
        DreamAlg::TopkMargin,
        DreamAlg::ConfidenceThreshold,
    ];

    /// The algorithm named as Dream's sampler spells it.
    pub fn parse(name: &str) -> Result<DreamAlg> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                Error::invalid(format!(
                    "unknown alg {name:?}: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// One request's decoding configuration. `Default` is the fast setting:
/// 256 tokens in blocks of 32, DualCache, threshold 0.9.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    pub gen_length: usize,
    pub block_length: usize,
    /// Total steps; each block gets `steps / (gen_length / block_length)`.
    pub steps: usize,
    pub cache: CacheMode,
    /// Confidence-aware parallel decoding (DESIGN §3.1).
    pub threshold: Option<f64>,
    /// Factor rule (DESIGN §3.1); excludes `threshold`.
    pub factor: Option<f64>,
    /// Suffix pruning: positions kept after the block (DESIGN §3.4).
    pub suffix_window: Option<usize>,
    /// Positions kept at the end of the sequence when pruning.
    pub suffix_tail: usize,
    /// Dynamic threshold strength (DESIGN §3.5); 0 keeps the threshold fixed.
    pub confidence_alpha: f64,
    /// Stop at the first completed block holding EOS (DESIGN §3.6).
    pub early_exit: bool,
    /// Dream's confidence algorithm; defaults to `confidence_threshold` with
    /// a threshold and `entropy` without.
    pub alg: Option<DreamAlg>,
    pub mask_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// The semi-autoregressive samplers above, or LLaDA2's block diffusion,
    /// which reads only the lengths, `steps`, `threshold` and the ids.
    pub sampler: Sampler,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            gen_length: 256,
            block_length: 32,
            steps: 256,
            cache: CacheMode::Dual,
            threshold: Some(0.9),
            factor: None,
            suffix_window: None,
            suffix_tail: 1,
            confidence_alpha: 0.0,
            early_exit: false,
            alg: None,
            mask_id: None,
            eos_id: None,
            sampler: Sampler::SemiAutoregressive,
        }
    }
}

/// Dream's `eps`: the end of its time grid.
const DREAM_EPS: f32 = 1e-3;

/// What a confidence is read from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Score {
    Probability,
    NegEntropy,
    Margin,
}

impl Score {
    fn of(self, stats: &TokenStats) -> f64 {
        match self {
            Score::Probability => stats.prob,
            Score::NegEntropy => stats.neg_entropy,
            Score::Margin => stats.margin,
        }
    }
}

/// A request's options resolved against the model.
#[derive(Debug, Clone)]
struct Plan {
    gen_length: usize,
    block_length: usize,
    steps_per_block: usize,
    cache: CacheMode,
    rule: Rule,
    score: Score,
    window: Option<usize>,
    tail: usize,
    early_exit: bool,
    mask_id: u32,
    eos_id: u32,
    /// Dream reads position i's prediction from output i - 1.
    shifted_logits: bool,
    /// Dream's cached sampler commits just the block's first position at the
    /// block's first step.
    first_step_commits_first_position: bool,
}

impl Plan {
    /// The kept slots a step queries: all of them at a block's first step or
    /// without a cache; afterwards the block (DualCache) or the block and
    /// what follows it (prefix cache). The block starts at slot `bs`.
    fn queries(&self, step: usize, bs: usize, kept: usize) -> Range<usize> {
        match (step, self.cache) {
            (0, _) | (_, CacheMode::None) => 0..kept,
            (_, CacheMode::Prefix) => bs..kept,
            (_, CacheMode::Dual) => bs..bs + self.block_length,
        }
    }

    /// The query counts of a block's first and later steps, for every block,
    /// and the most rows a step reports (a block's, which Dream's shifted
    /// logits can move by one row but not widen).
    fn pass_shapes(&self, prompt_len: usize) -> PassShapes {
        let len = prompt_len + self.gen_length;
        let mut tokens: Vec<usize> = (0..self.gen_length / self.block_length)
            .flat_map(|block| {
                let bs = prompt_len + block * self.block_length;
                let kept =
                    layout::kept_positions(bs + self.block_length, len, self.window, self.tail);
                [0, 1].map(|step| self.queries(step, bs, kept.len()).len())
            })
            .collect();
        tokens.sort_unstable();
        tokens.dedup();
        PassShapes {
            tokens,
            max_rows: self.block_length,
        }
    }

    fn new(options: &DecodeOptions, config: &ModelConfig, prompt_len: usize) -> Result<Plan> {
        let o = options;
        let invalid = |m: String| Err(Error::invalid(m));
        if prompt_len == 0 {
            return invalid("the prompt is empty".into());
        }
        if o.gen_length == 0 || o.block_length == 0 {
            return invalid("gen_length and block_length must be positive".into());
        }
        if o.gen_length % o.block_length != 0 {
            return invalid(format!(
                "gen_length {} is not a multiple of block_length {}",
                o.gen_length, o.block_length
            ));
        }
        let blocks = o.gen_length / o.block_length;
        if o.steps == 0 || o.steps % blocks != 0 {
            return invalid(format!(
                "steps {} is not a positive multiple of the number of blocks {blocks} (gen_length / block_length)",
                o.steps
            ));
        }
        let total = prompt_len + o.gen_length;
        if total > config.max_seq_len {
            return invalid(format!(
                "prompt ({prompt_len} tokens) plus gen_length ({}) is {total}, longer than the model's maximum sequence length {}",
                o.gen_length, config.max_seq_len
            ));
        }
        if o.threshold.is_some() && o.factor.is_some() {
            return invalid(
                "threshold and factor are two different transfer rules: give one".into(),
            );
        }
        for (name, value) in [("threshold", o.threshold), ("factor", o.factor)] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0) {
                    return invalid(format!("{name} must be a positive number, got {v}"));
                }
            }
        }
        if !(0.0..=1.0).contains(&o.confidence_alpha) {
            return invalid(format!(
                "confidence_alpha must be in [0, 1], got {}",
                o.confidence_alpha
            ));
        }
        if o.confidence_alpha > 0.0 && o.threshold.is_none() {
            return invalid("confidence_alpha relaxes the threshold: it needs a threshold".into());
        }
        if o.suffix_window.is_none() && o.suffix_tail != 1 {
            return invalid("suffix_tail only applies with a suffix window".into());
        }
        if config.family == Family::Llada2 {
            return invalid(
                "llada2_moe models decode by block diffusion: choose the LLaDA2.0 or LLaDA2.1 sampler (--sampler llada20|llada21)".into(),
            );
        }
        let (mask_id, eos_id) = special_ids(o, config)?;
        let steps_per_block = o.steps / blocks;
        let dream = config.family == Family::Dream;
        let (rule, score) = transfer_rule(o, config.family)?;
        Ok(Plan {
            gen_length: o.gen_length,
            block_length: o.block_length,
            steps_per_block,
            cache: o.cache,
            rule,
            score,
            window: o.suffix_window,
            tail: o.suffix_tail,
            early_exit: o.early_exit,
            mask_id,
            eos_id,
            shifted_logits: dream,
            first_step_commits_first_position: dream && o.cache != CacheMode::None,
        })
    }
}

/// The mask and EOS ids of a request: its own, else the model's.
fn special_ids(o: &DecodeOptions, config: &ModelConfig) -> Result<(u32, u32)> {
    let mask_id = o
        .mask_id
        .or(config.mask_id)
        .ok_or_else(|| Error::invalid("the model config has no mask_token_id: pass a mask id"))?;
    let eos_id = o
        .eos_id
        .or(config.eos_id)
        .ok_or_else(|| Error::invalid("the model config has no eos_token_id: pass an eos id"))?;
    for (name, id) in [("mask", mask_id), ("eos", eos_id)] {
        if id as usize >= config.vocab_size {
            return Err(Error::invalid(format!(
                "{name} id {id} is outside the vocabulary of {} entries",
                config.vocab_size
            )));
        }
    }
    if mask_id == eos_id {
        return Err(Error::invalid(format!(
            "mask id and eos id are both {mask_id}: they must differ"
        )));
    }
    Ok((mask_id, eos_id))
}

/// Every prompt id is a row of the embedding.
fn check_prompt(prompt: &[u32], config: &ModelConfig) -> Result<()> {
    match prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        Some(bad) => Err(Error::invalid(format!(
            "prompt token id {bad} is outside the vocabulary of {} entries",
            config.vocab_size
        ))),
        None => Ok(()),
    }
}

/// The transfer rule and confidence score `options` ask for on `family`.
fn transfer_rule(o: &DecodeOptions, family: Family) -> Result<(Rule, Score)> {
    let fixed_or_factor = match o.factor {
        Some(f) => Rule::Factor(f),
        None => Rule::Schedule,
    };
    let threshold = |tau| Rule::Threshold {
        tau,
        alpha: o.confidence_alpha,
    };
    if family == Family::Llada {
        if o.alg.is_some() {
            return Err(Error::invalid(
                "--alg selects one of Dream's samplers; this is a LLaDA model",
            ));
        }
        let rule = o.threshold.map_or(fixed_or_factor, threshold);
        return Ok((rule, Score::Probability));
    }
    let alg = o.alg.unwrap_or(match o.threshold {
        Some(_) => DreamAlg::ConfidenceThreshold,
        None => DreamAlg::Entropy,
    });
    let score = match alg {
        DreamAlg::MaskgitPlus | DreamAlg::ConfidenceThreshold => Score::Probability,
        DreamAlg::Entropy => Score::NegEntropy,
        DreamAlg::TopkMargin => Score::Margin,
    };
    let rule = match (alg, o.threshold) {
        (DreamAlg::ConfidenceThreshold, None) => {
            return Err(Error::invalid("alg confidence_threshold needs a threshold"))
        }
        // Without a cache Dream's own sampler carries rejected tokens over.
        (DreamAlg::ConfidenceThreshold, Some(tau)) if o.cache == CacheMode::None => {
            Rule::CarryThreshold(tau)
        }
        (DreamAlg::ConfidenceThreshold, Some(tau)) => threshold(tau),
        (_, Some(_)) => {
            return Err(Error::invalid(format!(
                "a threshold goes with alg confidence_threshold, not {}",
                alg.name()
            )))
        }
        // Dream's samplers count by its time grid; a factor replaces that.
        (_, None) if o.factor.is_some() => fixed_or_factor,
        (_, None) => Rule::Timestep { eps: DREAM_EPS },
    };
    Ok((rule, score))
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The `gen_length` generated ids; with LLaDA2's samplers, as their
    /// reference returns them: cut after the first EOS.
    pub tokens: Vec<u32>,
    /// Forward passes run.
    pub nfe: usize,
    /// Wall time of the first forward pass, which encodes the prompt.
    pub prompt_time: Duration,
    /// Wall time of everything after it.
    pub decode_time: Duration,
    /// Generated tokens other than EOS (DESIGN §4 counts only these).
    pub non_eos_tokens: usize,
    /// Forward passes over every kept position (each block's first step, and
    /// every step without a cache).
    pub full_forwards: ForwardTime,
    /// Cached steps: prefix-cache or DualCache forwards, and every block
    /// diffusion step.
    pub cached_forwards: ForwardTime,
    /// Block diffusion: forwards that only make completed blocks' keys and
    /// values exact, deciding nothing (not counted in `nfe`).
    pub cache_fills: ForwardTime,
}

/// Count and total wall time of one kind of forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardTime {
    pub count: usize,
    pub total: Duration,
}

impl ForwardTime {
    fn add(&mut self, time: Duration) {
        self.count += 1;
        self.total += time;
    }

    /// Mean milliseconds per forward (0 when none ran).
    pub fn mean_ms(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total.as_secs_f64() * 1e3 / self.count as f64
        }
    }
}

impl Generation {
    pub fn total_time(&self) -> Duration {
        self.prompt_time + self.decode_time
    }

    /// Non-EOS tokens per second of the whole request (DESIGN §4).
    pub fn tokens_per_second(&self) -> f64 {
        self.non_eos_tokens as f64 / self.total_time().as_secs_f64().max(1e-12)
    }
}

/// Decodes `gen_length` tokens after `prompt`, alone on `backend` (whose
/// cache it replaces). `on_block` receives each block's tokens as it
/// completes. [`crate::Engine`] runs many requests at once.
pub fn generate(
    backend: &mut dyn Backend,
    config: &ModelConfig,
    prompt: &[u32],
    options: &DecodeOptions,
    on_block: &mut dyn FnMut(&[u32]),
) -> Result<Generation> {
    let mut sequence = Sequence::new(config, prompt, options)?;
    backend.prepare(sequence.slots())?;
    backend.expect(&sequence.pass_shapes())?;
    while !sequence.is_finished() {
        let pass = sequence.next_pass()?;
        let start = Instant::now();
        let stats = backend.token_stats(&[pass.as_forward(SINGLE_PAGE)])?;
        let progress = sequence.advance(&stats[0], start.elapsed())?;
        for (_, tokens) in &progress.blocks {
            on_block(tokens);
        }
    }
    Ok(sequence.into_generation())
}
