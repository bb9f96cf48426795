//! The interface between the decode loop and the hardware.
//!
//! Every strategy in DESIGN §2-3 reduces to one primitive: run the model on
//! some query tokens at explicit positions, write their keys/values into a
//! run of cache slots, attend over a prefix of the cache, and report the
//! output distribution of some query rows. A full forward writes every slot;
//! a prefix-cache step writes the block and everything after it; a DualCache
//! step writes only the block's slots and attends over the whole cache. A
//! pruned suffix is just a cache whose slots hold non-contiguous positions.
//!
//! Many sequences share one cache, a pool of fixed-size pages ([`CacheLayout`]):
//! a pass names the pages that hold its sequence's slots, and a backend runs
//! the passes of many sequences as one batch ([`Backend::logits`]). A
//! sequence's outputs do not depend on the other sequences in its batch.

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
    /// The cache pages holding the sequence's slots, in slot order: slot `s`
    /// is slot `s % page_size` of page `pages[s / page_size]`.
    pub pages: &'a [u32],
}

/// The page table of a sequence alone in a [`CacheLayout::single`] cache.
pub const SINGLE_PAGE: &[u32] = &[0];

impl ForwardPass<'_> {
    /// Checks the invariants every backend relies on.
    pub fn validate(&self, layout: &CacheLayout) -> Result<()> {
        let n = self.tokens.len();
        let ok = n > 0
            && self.positions.len() == n
            && self.write_slot + n <= self.attend_len
            && self.attend_len <= self.pages.len() * layout.page_size
            && self.pages.iter().all(|&p| (p as usize) < layout.pages)
            && self.rows.start <= self.rows.end
            && self.rows.end <= n;
        if ok {
            Ok(())
        } else {
            Err(crate::Error::invalid(format!(
                "malformed forward pass: {n} tokens, {} positions, write slot {}, attend {} slots of pages {:?} in a cache of {} pages of {} slots, rows {:?}",
                self.positions.len(),
                self.write_slot,
                self.attend_len,
                self.pages,
                layout.pages,
                layout.page_size,
                self.rows
            )))
        }
    }

    /// Physical cache slot of the sequence's slot `slot`.
    pub fn physical_slot(&self, slot: usize, page_size: usize) -> usize {
        self.pages[slot / page_size] as usize * page_size + slot % page_size
    }

    /// Checks every pass, and that no two write the same pages: the passes of
    /// one batch belong to different sequences.
    pub fn validate_batch(passes: &[ForwardPass], layout: &CacheLayout) -> Result<()> {
        if passes.is_empty() {
            return Err(crate::Error::invalid(
                "a forward batch needs at least one pass",
            ));
        }
        let mut owner = vec![usize::MAX; layout.pages];
        for (i, pass) in passes.iter().enumerate() {
            pass.validate(layout)?;
            for &page in pass.pages {
                let page = &mut owner[page as usize];
                if *page != usize::MAX && *page != i {
                    return Err(crate::Error::invalid(format!(
                        "passes {} and {i} of a batch share cache pages",
                        *page
                    )));
                }
                *page = i;
            }
        }
        Ok(())
    }
}

/// The shape of a backend's key/value cache: `pages` pages of `page_size`
/// slots each, shared by all sequences. A slot holds one position's key and
/// value in every layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheLayout {
    pub pages: usize,
    pub page_size: usize,
}

impl CacheLayout {
    /// A cache for one sequence of `slots` slots: one page ([`SINGLE_PAGE`]).
    pub fn single(slots: usize) -> CacheLayout {
        CacheLayout {
            pages: 1,
            page_size: slots,
        }
    }

    pub fn slots(&self) -> usize {
        self.pages * self.page_size
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
/// storage format and a key/value cache shaped by [`Backend::allocate_cache`].
pub trait Backend {
    /// Human-readable device name for reports.
    fn device_name(&self) -> String;

    /// Bytes one cache slot takes: a key and a value in every layer.
    fn cache_slot_bytes(&self) -> usize;

    /// Bytes the key/value cache may take when nobody says: what the device
    /// can spare once the weights are loaded.
    fn cache_budget(&self) -> Result<usize>;

    /// Allocates the key/value cache (replacing any earlier one); contents
    /// after it are unspecified.
    fn allocate_cache(&mut self, layout: CacheLayout) -> Result<()>;

    /// A cache for one sequence of up to `slots` positions, addressed by
    /// [`SINGLE_PAGE`].
    fn prepare(&mut self, slots: usize) -> Result<()> {
        self.allocate_cache(CacheLayout::single(slots))
    }

    /// Announces the passes a request will run, before its first forward, so
    /// that a backend can make its per-shape preparations (cuBLASLt plans)
    /// outside the timed steps.
    fn expect(&mut self, _shapes: &PassShapes) -> Result<()> {
        Ok(())
    }

    /// Runs the passes of a batch (one per sequence) together and returns,
    /// for each, the raw logits of its rows, row-major `[rows, vocab]`.
    fn logits(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<f32>>>;

    /// The logits of one sequence's pass.
    fn logits_of(&mut self, pass: &ForwardPass) -> Result<Vec<f32>> {
        Ok(self.logits(std::slice::from_ref(pass))?.remove(0))
    }

    /// The token statistics of one sequence's pass.
    fn token_stats_of(&mut self, pass: &ForwardPass) -> Result<Vec<TokenStats>> {
        Ok(self.token_stats(std::slice::from_ref(pass))?.remove(0))
    }

    /// Output statistics of each pass's rows: what the samplers read. A GPU
    /// backend computes them on the device so only a few bytes per row come
    /// back.
    fn token_stats(&mut self, passes: &[ForwardPass]) -> Result<Vec<Vec<TokenStats>>> {
        Ok(self
            .logits(passes)?
            .iter()
            .zip(passes)
            .map(|(logits, pass)| {
                let vocab = logits.len() / pass.rows.len().max(1);
                logits
                    .chunks_exact(vocab.max(1))
                    .map(TokenStats::from_logits)
                    .collect()
            })
            .collect())
    }
}
