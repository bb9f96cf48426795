//! CUDA graphs of the layers of the batches that repeat. A batch's layer
//! launches (nine or ten per layer: 300 for LLaDA-8B) depend only on its
//! geometry — each sequence's token count and attended length, in batch
//! order — and on device buffers that `allocate_cache` and the activations'
//! growth fix. Everything else a step varies is data uploaded before the
//! launches: token ids, positions, the cache slot each row writes (so the
//! write slot and the pages are not part of the geometry), and attention's
//! descriptors and page tables. The steps of a block after its first share
//! one geometry, so the second such step is captured into a graph and every
//! later one replays it with a single launch; a DualCache request's blocks
//! even share one graph. A geometry seen once (a block's first, full step)
//! runs eagerly: capturing it would cost more than it saves. The head
//! (launches for the rows still masked, which shrink step by step) stays out
//! of the graph.

use std::collections::{HashMap, HashSet};

use cudarc::driver::CudaGraph;

use super::driver_error;
use crate::error::Result;

/// Graphs kept at once. A request's blocks each have their own geometries,
/// so old ones are dropped wholesale rather than tracked.
const MAX_GRAPHS: usize = 16;

/// Everything a batch's layer launches depend on besides device buffers and
/// the data uploaded before them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Step {
    /// Per sequence, in batch order: (query tokens, attended slots). These
    /// fix the GEMMs' rows and attention's grid, splits and scratch layout.
    pub sequences: Vec<(usize, usize)>,
}

impl Step {
    /// Rows of the batch.
    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(|&(tokens, _)| tokens).sum()
    }
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

    /// Forgets every graph: the buffers they launch on, or the cache layout
    /// their launches assume, are being replaced.
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
            self.seen.insert(step.clone());
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
        self.graphs.insert(step.clone(), graph);
        self.replay(&step)
    }
}
