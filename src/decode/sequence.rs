//! One request in flight: its plan, its tokens, and where it stands.
//!
//! A [`Sequence`] is the decode loop turned inside out so that a scheduler can
//! step many of them together: [`Sequence::next_pass`] says which forward the
//! request needs now, and [`Sequence::advance`] takes that forward's output,
//! commits tokens and moves on. The semi-autoregressive samplers and LLaDA2's
//! block diffusion are two such state machines behind the one interface, so
//! requests of either kind batch together.

use std::ops::Range;
use std::time::Duration;

use super::block_diffusion::BlockDiffusion;
use super::semi_autoregressive::SemiAutoregressive;
use super::{DecodeOptions, Generation, Sampler};
use crate::backend::{ForwardPass, PassShapes, TokenStats};
use crate::config::ModelConfig;
use crate::error::Result;

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

#[derive(Debug)]
pub struct Sequence(State);

#[derive(Debug)]
enum State {
    SemiAutoregressive(SemiAutoregressive),
    BlockDiffusion(BlockDiffusion),
}

/// Calls the same method on whichever state the sequence is in.
macro_rules! dispatch {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            State::SemiAutoregressive($s) => $call,
            State::BlockDiffusion($s) => $call,
        }
    };
}

impl Sequence {
    /// Checks `options` and `prompt` against the model; nothing runs yet.
    pub fn new(config: &ModelConfig, prompt: &[u32], options: &DecodeOptions) -> Result<Sequence> {
        Ok(Sequence(match options.sampler {
            Sampler::SemiAutoregressive => {
                State::SemiAutoregressive(SemiAutoregressive::new(config, prompt, options)?)
            }
            Sampler::Llada20 { .. } | Sampler::Llada21(_) => {
                State::BlockDiffusion(BlockDiffusion::new(config, prompt, options)?)
            }
        }))
    }

    /// Cache slots the sequence needs: one per position.
    pub fn slots(&self) -> usize {
        dispatch!(&self.0, s => s.slots())
    }

    /// The shapes of every pass this request can run.
    pub fn pass_shapes(&self) -> PassShapes {
        dispatch!(&self.0, s => s.pass_shapes())
    }

    pub fn is_finished(&self) -> bool {
        dispatch!(&self.0, s => s.is_finished())
    }

    /// The block being decoded: its index and tokens, masks where nothing
    /// is committed yet.
    pub fn current_block(&self) -> (usize, &[u32]) {
        dispatch!(&self.0, s => s.current_block())
    }

    /// The forward the current step needs. Fails when decoding stalls.
    pub fn next_pass(&mut self) -> Result<PassPlan> {
        dispatch!(&mut self.0, s => s.next_pass())
    }

    /// Takes the statistics of the pending pass's rows, which took `elapsed`,
    /// and commits tokens. Fails when decoding stalls.
    pub fn advance(&mut self, stats: &[TokenStats], elapsed: Duration) -> Result<Progress> {
        match &mut self.0 {
            State::SemiAutoregressive(s) => Ok(s.advance(stats, elapsed)),
            State::BlockDiffusion(s) => s.advance(stats, elapsed),
        }
    }

    /// The result; call once [`Sequence::is_finished`].
    pub fn into_generation(self) -> Generation {
        dispatch!(self.0, s => s.into_generation())
    }
}
