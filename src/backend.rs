//! The interface between the decode loop and the hardware.
//!
//! Every strategy in DESIGN §2-3 reduces to one primitive: run the model on
//! some query tokens at explicit positions, write their keys/values into a
//! run of cache slots, attend over a prefix of the cache, and report the
//! output distribution of some query rows. A full forward writes every slot;
//! a prefix-cache step writes the block and everything after it; a DualCache
//! step writes only the block's slots and attends over the whole cache. A
//! pruned suffix is just a cache whose slots hold non-contiguous positions.

use std::ops::Range;

use crate::error::Result;

/// One forward pass of the model against the backend's key/value cache.
#[derive(Debug, Clone)]
pub struct ForwardPass<'a> {
    /// Query token ids.
    pub tokens: &'a [u32],
    /// True sequence position of each query token (RoPE angle).
    pub positions: &'a [u32],
    /// The queries' keys/values overwrite cache slots
    /// `write_slot .. write_slot + tokens.len()`.
    pub write_slot: usize,
    /// The queries attend over cache slots `0 .. attend_len`, which include the
    /// slots just written.
    pub attend_len: usize,
    /// Query rows whose output distribution is wanted.
    pub rows: Range<usize>,
}

impl ForwardPass<'_> {
    /// Checks the invariants every backend relies on.
    pub fn validate(&self, cache_slots: usize) -> Result<()> {
        let n = self.tokens.len();
        let ok = n > 0
            && self.positions.len() == n
            && self.write_slot + n <= self.attend_len
            && self.attend_len <= cache_slots
            && self.rows.start <= self.rows.end
            && self.rows.end <= n;
        if ok {
            Ok(())
        } else {
            Err(crate::Error::invalid(format!(
                "malformed forward pass: {n} tokens, {} positions, write slot {}, attend {} of {cache_slots} slots, rows {:?}",
                self.positions.len(),
                self.write_slot,
                self.attend_len,
                self.rows
            )))
        }
    }
}

/// The shapes of a request's forward passes, known from its plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassShapes {
    /// Every distinct query-token count, ascending.
    pub tokens: Vec<usize>,
    /// The most rows any pass reports.
    pub max_rows: usize,
}

/// What a sampler needs to know about one output distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenStats {
    /// Argmax token (lowest id on ties).
    pub token: u32,
    /// Softmax probability of `token`.
    pub prob: f64,
    /// Sum of p * ln(p + 1e-10): Dream's `entropy` confidence.
    pub neg_entropy: f64,
    /// Top-1 minus top-2 probability: Dream's `topk_margin` confidence.
    pub margin: f64,
}

impl TokenStats {
    /// Statistics of one row of logits, computed in f64 as the references do
    /// their softmax (LLaDA in float64; Dream's float32 orders the same
    /// except in near-ties).
    pub fn from_logits(logits: &[f32]) -> TokenStats {
        let mut best = 0usize;
        let mut second = f32::NEG_INFINITY;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                second = logits[best];
                best = i;
            } else if i != best && l > second {
                second = l;
            }
        }
        let max = logits[best] as f64;
        let mut sum = 0.0f64;
        for &l in logits {
            sum += (l as f64 - max).exp();
        }
        let mut neg_entropy = 0.0f64;
        for &l in logits {
            let p = (l as f64 - max).exp() / sum;
            neg_entropy += p * (p + 1e-10).ln();
        }
        let prob = 1.0 / sum;
        TokenStats {
            token: best as u32,
            prob,
            neg_entropy,
            margin: prob - (second as f64 - max).exp() / sum,
        }
    }
}

/// A device that runs the model. Implementations own the weights in their
/// storage format and a key/value cache sized by [`Backend::prepare`].
pub trait Backend {
    /// Human-readable device name for reports.
    fn device_name(&self) -> String;

    /// Sizes the key/value cache for up to `slots` positions. Called once per
    /// request; contents after it are unspecified.
    fn prepare(&mut self, slots: usize) -> Result<()>;

    /// Announces the passes a request will run, after [`Backend::prepare`]
    /// and before its first forward, so that a backend can make its
    /// per-shape preparations (cuBLASLt plans) outside the timed steps.
    fn expect(&mut self, _shapes: &PassShapes) -> Result<()> {
        Ok(())
    }

    /// Raw logits of `pass.rows`, row-major `[rows, vocab]`.
    fn logits(&mut self, pass: &ForwardPass) -> Result<Vec<f32>>;

    /// Output statistics of `pass.rows`: what the samplers read. A GPU backend
    /// computes them on the device so only a few bytes per row come back.
    fn token_stats(&mut self, pass: &ForwardPass) -> Result<Vec<TokenStats>> {
        let logits = self.logits(pass)?;
        let vocab = logits.len() / pass.rows.len().max(1);
        Ok(logits
            .chunks_exact(vocab)
            .map(TokenStats::from_logits)
            .collect())
    }
}
