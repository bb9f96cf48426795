//! CUDA graphs of the layers of the steps that repeat. A step's layer
//! launches (nine or ten per layer: 300 for LLaDA-8B) depend only on its
//! geometry — token count and the slots it writes and attends over — and on
//! device buffers that `prepare` fixes; its token ids are uploaded before the
//! launches. The steps of a block after its first share one geometry, so the
//! second such step is captured into a graph and every later one replays it
//! with a single launch. A geometry seen once (a block's first, full step)
//! runs eagerly: capturing it would cost more than it saves. The head (three
//! launches for the rows still masked, which shrink step by step) stays out
//! of the graph.

use std::collections::{HashMap, HashSet};

use cudarc::driver::CudaGraph;

use super::driver_error;
use crate::error::Result;

/// Graphs kept at once. A request's blocks each have their own geometries,
/// so old ones are dropped wholesale rather than tracked.
const MAX_GRAPHS: usize = 16;

/// Everything a step's layer launches depend on besides device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Step {
    pub tokens: usize,
    /// First physical cache slot of the pass's sequence.
    pub base_slot: usize,
    pub write_slot: usize,
    pub attend_len: usize,
}

/// How to run a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// Its graph exists: replay it.
    Replay,
    /// Seen before without a graph: capture one, then replay it.
    Capture,
    /// First sight, or graphs are off: launch each kernel.
    Eager,
}

pub struct Graphs {
    enabled: bool,
    seen: HashSet<Step>,
    graphs: HashMap<Step, CudaGraph>,
    replays: usize,
}

impl Graphs {
    pub fn new() -> Graphs {
        Graphs {
            enabled: true,
            seen: HashSet::new(),
            graphs: HashMap::new(),
            replays: 0,
        }
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        self.clear();
    }

    /// Forgets every graph: the buffers they launch on are being replaced.
    pub fn clear(&mut self) {
        self.seen.clear();
        self.graphs.clear();
    }

    /// Graph launches so far (a replay of a step, including the one that
    /// follows its capture).
    pub fn replays(&self) -> usize {
        self.replays
    }

    pub fn launch_of(&mut self, step: &Step) -> Launch {
        if !self.enabled {
            Launch::Eager
        } else if self.graphs.contains_key(step) {
            Launch::Replay
        } else if self.seen.contains(step) {
            Launch::Capture
        } else {
            if self.seen.len() >= MAX_GRAPHS {
                self.clear();
            }
            self.seen.insert(*step);
            Launch::Eager
        }
    }

    pub fn replay(&mut self, step: &Step) -> Result<()> {
        let graph = &self.graphs[step];
        graph
            .launch()
            .map_err(driver_error("launching a step's graph"))?;
        self.replays += 1;
        Ok(())
    }

    /// Keeps the graph captured for `step` and replays it: capturing only
    /// recorded the launches.
    pub fn insert(&mut self, step: Step, graph: CudaGraph) -> Result<()> {
        if self.graphs.len() >= MAX_GRAPHS {
            self.graphs.clear();
        }
        self.graphs.insert(step, graph);
        self.replay(&step)
    }
}
