//! Continuous batching: many requests decoded together, each exactly as it
//! would be alone.
//!
//! Each request is a [`Sequence`] (its plan, its tokens, where it stands).
//! Every [`Scheduler::step`] admits waiting requests in arrival order while
//! the batch and the key/value page pool have room, asks every running
//! sequence for its next pass, runs all of them as one batched forward, and
//! hands each sequence its rows. Sequences at different places (prompt
//! lengths, blocks, full or cached steps, strategies) batch together because
//! each pass carries its own tokens, positions, slots and pages.
//!
//! A request that fails (a stalled decode, a panic in its own processing)
//! fails alone. When a batched forward fails, each pass is rerun alone to
//! find the culprit: a pass writes its sequence's slots before reading them,
//! so rerunning it computes the same thing.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, TokenStats};
use crate::decode::{Generation, PassPlan, Sequence};
use crate::error::{Error, Result};
use crate::kv_pool::PagePool;

/// What a request's submitter hears, in order: its blocks as they complete,
/// then its result. A request submitted to watch its steps also hears, after
/// every step that completed no block, the current block as it stands (masks
/// where nothing is committed yet).
#[derive(Debug)]
pub enum Event {
    Step { index: usize, tokens: Vec<u32> },
    Block { index: usize, tokens: Vec<u32> },
    Done(Result<Generation>),
}

/// A request between submission and its last event.
pub struct Request {
    pub sequence: Sequence,
    pub events: Sender<Event>,
    pub cancelled: Arc<AtomicBool>,
    /// Whether the submitter wants [`Event::Step`]s.
    pub watch_steps: bool,
}

impl Request {
    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Sends the final event. A submitter that stopped listening has
    /// nothing left to tell.
    fn finish(self, result: Result<Generation>) {
        let _ = self.events.send(Event::Done(result));
    }
}

struct Running {
    request: Request,
    pages: Vec<u32>,
}

/// Counters of the batched forwards, for reports and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStats {
    /// Batched forwards run.
    pub forwards: usize,
    /// Their total wall time.
    pub forward_time: Duration,
    /// Sequences summed over forwards: `/ forwards` is the mean batch size.
    pub sequences: usize,
    /// Query tokens summed over forwards.
    pub tokens: usize,
    pub running: usize,
    pub waiting: usize,
    pub pages_in_use: usize,
    pub pages: usize,
}

impl BatchStats {
    pub fn mean_forward_ms(&self) -> f64 {
        self.forward_time.as_secs_f64() * 1e3 / self.forwards.max(1) as f64
    }

    pub fn mean_batch(&self) -> f64 {
        self.sequences as f64 / self.forwards.max(1) as f64
    }
}

pub struct Scheduler {
    backend: Box<dyn Backend>,
    pool: PagePool,
    max_batch: usize,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    stats: BatchStats,
}

impl Scheduler {
    /// Takes `backend` with its cache allocated to `pool`'s layout.
    pub fn new(backend: Box<dyn Backend>, pool: PagePool, max_batch: usize) -> Scheduler {
        let pages = pool.layout().pages;
        Scheduler {
            backend,
            pool,
            max_batch,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: BatchStats {
                pages,
                ..BatchStats::default()
            },
        }
    }

    pub fn device_name(&self) -> String {
        self.backend.device_name()
    }

    /// Queues `request`; it joins the batch at a coming step. A request the
    /// pool can never hold is refused here, so it cannot block the queue.
    pub fn submit(&mut self, request: Request) {
        let slots = request.sequence.slots();
        if !self.pool.can_ever_hold(slots) {
            let layout = self.pool.layout();
            request.finish(Err(Error::invalid(format!(
                "the request needs {slots} key/value cache slots (prompt plus gen_length), more than the whole cache holds ({} pages of {} slots): raise the cache size or shorten the request",
                layout.pages, layout.page_size
            ))));
            return;
        }
        self.waiting.push_back(request);
        self.stats.waiting = self.waiting.len();
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Admits, runs one batched forward, and retires finished requests.
    pub fn step(&mut self) {
        self.drop_cancelled();
        self.admit();
        if !self.running.is_empty() {
            self.forward();
        }
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.pages_in_use = self.pool.pages_in_use();
    }

    fn drop_cancelled(&mut self) {
        for request in extract(&mut self.waiting, Request::is_cancelled) {
            request.finish(Err(Error::Cancelled));
        }
        for running in extract(&mut self.running, |r| r.request.is_cancelled()) {
            self.pool.release(running.pages);
            running.request.finish(Err(Error::Cancelled));
        }
    }

    /// Moves waiting requests into the batch in arrival order while there is
    /// room; the first that does not fit waits, and so do those behind it.
    fn admit(&mut self) {
        while self.running.len() < self.max_batch {
            let Some(request) = self.waiting.front() else {
                break;
            };
            let Some(pages) = self.pool.allocate(request.sequence.slots()) else {
                break;
            };
            let request = self.waiting.pop_front().expect("front exists");
            let shapes = request.sequence.pass_shapes();
            match self.backend.expect(&shapes) {
                Ok(()) => self.running.push(Running { request, pages }),
                Err(e) => {
                    self.pool.release(pages);
                    request.finish(Err(e));
                }
            }
        }
    }

    fn forward(&mut self) {
        // Each sequence's next pass; a sequence that cannot say fails alone.
        let mut plans: Vec<(usize, PassPlan)> = Vec::with_capacity(self.running.len());
        let mut failed: Vec<(usize, Error)> = Vec::new();
        for (i, running) in self.running.iter_mut().enumerate() {
            match guarded(|| running.request.sequence.next_pass()) {
                Ok(plan) => plans.push((i, plan)),
                Err(e) => failed.push((i, e)),
            }
        }
        let start = Instant::now();
        let results = self.run_batch(&plans);
        let elapsed = start.elapsed();
        self.stats.forwards += 1;
        self.stats.forward_time += elapsed;
        self.stats.sequences += plans.len();
        self.stats.tokens += plans.iter().map(|(_, p)| p.tokens.len()).sum::<usize>();

        let mut finished = Vec::new();
        for ((i, _), result) in plans.iter().zip(results) {
            let running = &mut self.running[*i];
            let progress = result
                .and_then(|stats| guarded(|| running.request.sequence.advance(&stats, elapsed)));
            match progress {
                Ok(progress) => {
                    let request = &running.request;
                    if request.watch_steps && progress.blocks.is_empty() {
                        let (index, tokens) = request.sequence.current_block();
                        let tokens = tokens.to_vec();
                        let _ = request.events.send(Event::Step { index, tokens });
                    }
                    for (index, tokens) in progress.blocks {
                        let _ = request.events.send(Event::Block { index, tokens });
                    }
                    if progress.finished {
                        finished.push((*i, None));
                    }
                }
                Err(e) => failed.push((*i, e)),
            }
        }
        finished.extend(failed.into_iter().map(|(i, e)| (i, Some(e))));
        // Remove from the back so the indices stay valid.
        finished.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, error) in finished {
            let Running { request, pages } = self.running.swap_remove(i);
            self.pool.release(pages);
            let result = match error {
                None => Ok(request.sequence.into_generation()),
                Some(e) => Err(e),
            };
            let _ = request.events.send(Event::Done(result));
        }
    }

    /// Statistics of every planned pass: the batch at once, or, if that
    /// fails, each pass alone so that only the failing ones fail.
    fn run_batch(&mut self, plans: &[(usize, PassPlan)]) -> Vec<Result<Vec<TokenStats>>> {
        let passes: Vec<_> = plans
            .iter()
            .map(|(i, plan)| plan.as_forward(&self.running[*i].pages))
            .collect();
        let backend = &mut self.backend;
        match guarded(|| backend.token_stats(&passes)) {
            Ok(stats) => stats.into_iter().map(Ok).collect(),
            Err(e) if passes.len() == 1 => vec![Err(e)],
            Err(_) => passes
                .iter()
                .map(|pass| {
                    guarded(|| backend.token_stats(std::slice::from_ref(pass)))
                        .map(|mut stats| stats.remove(0))
                })
                .collect(),
        }
    }
}

/// Runs `f`, turning a panic into an error, so one request's failure cannot
/// take the engine down.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Internal(message))
    })
}

/// Removes and returns the items of `items` that match, keeping the others
/// in order.
fn extract<T, C>(items: &mut C, matches: impl Fn(&T) -> bool) -> Vec<T>
where
    C: Default + Extend<T> + IntoIterator<Item = T>,
{
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(items).into_iter().partition(|t| matches(t));
    items.extend(keep);
    out
}
