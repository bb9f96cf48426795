//! A backend wrapped so that a test sees what the decode loop asks of it:
//! every call goes to the wrapped backend, with a [`Watcher`]'s hooks
//! around the forwards. One wrapper for every test that watches, checks or
//! sabotages a decode from outside.

use dllm::backend::{Backend, CacheLayout, ForwardPass, PassShapes, TokenStats};

pub trait Watcher {
    /// The pass shapes announced before a request's first forward.
    fn expected(&mut self, _shapes: &PassShapes) {}
    /// A batch about to run (a hook may panic to fail it).
    fn before(&mut self, _passes: &[ForwardPass]) {}
    /// A batch's token statistics, as the decode loop receives them.
    fn after(&mut self, _passes: &[ForwardPass], _stats: &[Vec<TokenStats>]) {}
}

/// A closure that sees each batch and its statistics.
pub type Tap = Box<dyn FnMut(&[ForwardPass], &[Vec<TokenStats>])>;

impl Watcher for Tap {
    fn after(&mut self, passes: &[ForwardPass], stats: &[Vec<TokenStats>]) {
        self(passes, stats)
    }
}

pub struct Watched<B, W> {
    pub backend: B,
    pub watcher: W,
}

impl<B: Backend, W: Watcher> Backend for Watched<B, W> {
    fn device_name(&self) -> String {
        self.backend.device_name()
    }

    fn cache_slot_bytes(&self) -> usize {
        self.backend.cache_slot_bytes()
    }

    fn cache_budget(&self) -> dllm::Result<usize> {
        self.backend.cache_budget()
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> dllm::Result<()> {
        self.backend.allocate_cache(layout)
    }

    fn prepare(&mut self, slots: usize) -> dllm::Result<()> {
        self.backend.prepare(slots)
    }

    fn expect(&mut self, shapes: &PassShapes) -> dllm::Result<()> {
        self.watcher.expected(shapes);
        self.backend.expect(shapes)
    }

    fn logits(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<f32>>> {
        self.watcher.before(passes);
        self.backend.logits(passes)
    }

    fn token_stats(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<TokenStats>>> {
        self.watcher.before(passes);
        let stats = self.backend.token_stats(passes)?;
        self.watcher.after(passes, &stats);
        Ok(stats)
    }
}
