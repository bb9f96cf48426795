//! Continuous batching on the CPU backend: every request's output is exactly
//! what it is alone, whatever it is batched with and whenever it arrives; the
//! key/value page pool queues what does not fit and leaks nothing; a failing
//! request fails alone.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::watched::{Watched, Watcher};
use common::{golden_dir, robust_cases, Case};
use dllm::backend::{Backend, ForwardPass};
use dllm::cpu::CpuBackend;
use dllm::{
    CacheMode, DecodeOptions, Device, Engine, EngineOptions, Error, Event, Model, RequestHandle,
};

/// xorshift64*: the mixtures are random but the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

fn engine(model: &str, options: EngineOptions) -> Engine {
    Engine::with_options(
        Model::open(&golden_dir(model)).unwrap(),
        Device::Cpu,
        options,
    )
    .unwrap()
}

/// Decodes every robust case in random mixtures: a random number (1 to 16)
/// of requests in flight, a new one submitted whenever one of them moves on
/// (a completed block or its end), so requests join mid-way through others'
/// blocks, with every strategy and length of the golden set side by side
/// (for LLaDA2, block diffusion of both samplers, whose cache fills and
/// steps batch with the others' passes).
fn mixtures_decode_as_alone(model: &str, seed: u64) {
    let engine = engine(model, EngineOptions::default());
    let mut rng = Rng(seed);
    let mut cases: Vec<Case> = robust_cases(model);
    // Shuffle, so neighbours differ in strategy and length.
    for i in (1..cases.len()).rev() {
        cases.swap(i, rng.below(i + 1));
    }
    let mut pending = cases.iter();
    let mut in_flight: Vec<(&Case, RequestHandle)> = Vec::new();
    let (mut failures, mut done, mut most_in_flight) = (Vec::new(), 0, 0);
    let mut width = 1 + rng.below(16);
    loop {
        while in_flight.len() < width {
            let Some(case) = pending.next() else { break };
            in_flight.push((case, engine.submit(&case.prompt, &case.options).unwrap()));
        }
        if in_flight.is_empty() {
            break;
        }
        most_in_flight = most_in_flight.max(in_flight.len());
        let i = rng.below(in_flight.len());
        if let Event::Done(result) = in_flight[i].1.next_event() {
            let (case, _) = in_flight.swap_remove(i);
            let out = result.unwrap();
            if out.tokens != case.tokens || out.nfe != case.nfe {
                failures.push(format!("{}: nfe {} want {}", case.label, out.nfe, case.nfe));
            }
            done += 1;
            width = 1 + rng.below(16);
        }
    }
    assert_eq!(done, cases.len());
    assert!(
        failures.is_empty(),
        "{} of {done} differ from alone:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let stats = engine.stats();
    eprintln!(
        "{model}: {done} requests, up to {most_in_flight} in flight, {} forwards of {:.1} sequences on average",
        stats.forwards,
        stats.mean_batch()
    );
    assert!(
        stats.mean_batch() > 2.0,
        "requests hardly overlapped: {stats:?}"
    );
    // The worker publishes its counters just after the last result.
    eventually("every page back", || engine.stats().pages_in_use == 0);
}

#[test]
fn llada_golden_cases_decode_in_random_mixtures_as_alone() {
    mixtures_decode_as_alone("llada_tiny_s1", 0x1ada);
}

#[test]
fn dream_golden_cases_decode_in_random_mixtures_as_alone() {
    mixtures_decode_as_alone("dream_tiny_s1", 0xd7ea);
}

#[test]
fn llada2_golden_cases_of_both_samplers_decode_in_random_mixtures_as_alone() {
    mixtures_decode_as_alone("llada2_tiny_s1", 0x11ada2);
}

/// A slow request: one token a step over 64 steps, without a cache.
fn slow() -> DecodeOptions {
    DecodeOptions {
        gen_length: 64,
        block_length: 32,
        steps: 64,
        cache: CacheMode::None,
        threshold: None,
        ..DecodeOptions::default()
    }
}

const PROMPT: [u32; 6] = [3, 14, 15, 92, 65, 35];

/// Polls `done` for up to ten seconds.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// Events of a request, each with the time it arrived, on a thread of its own.
fn record(mut handle: RequestHandle) -> thread::JoinHandle<Vec<(Instant, Event)>> {
    thread::spawn(move || {
        let mut events = Vec::new();
        loop {
            let event = handle.next_event();
            let last = matches!(event, Event::Done(_));
            events.push((Instant::now(), event));
            if last {
                return events;
            }
        }
    })
}

#[test]
fn a_full_pool_queues_requests_in_order_and_leaks_no_page() {
    // Room for exactly two requests of 70 slots (5 pages of 16 each).
    let engine = engine(
        "llada_tiny_s1",
        EngineOptions {
            max_batch: 16,
            cache_slots: Some(10 * 16),
        },
    );
    let alone = engine.generate(&PROMPT, &slow()).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| record(engine.submit(&PROMPT, &slow()).unwrap()))
        .collect();
    eventually("two running and two waiting", || {
        let s = engine.stats();
        s.running == 2 && s.waiting == 2 && s.pages_in_use == 10
    });
    let events: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let done_at = |e: &[(Instant, Event)]| e.last().unwrap().0;
    let first_block_at = |e: &[(Instant, Event)]| e[0].0;
    for (i, request) in events.iter().enumerate() {
        let Event::Done(Ok(out)) = &request.last().unwrap().1 else {
            panic!("request {i}: {:?}", request.last().unwrap().1);
        };
        assert_eq!((&out.tokens, out.nfe), (&alone.tokens, alone.nfe));
    }
    // The two that waited ran only once one of the first two had finished.
    let first_done = done_at(&events[0]).min(done_at(&events[1]));
    for waited in &events[2..] {
        assert!(first_block_at(waited) > first_done);
    }
    eventually("every page back", || engine.stats().pages_in_use == 0);
}

#[test]
fn cancelling_mid_block_frees_the_pages_and_the_others_go_on() {
    let engine = engine("llada_tiny_s1", EngineOptions::default());
    let alone = engine.generate(&PROMPT, &slow()).unwrap();
    let mut cancelled = engine.submit(&PROMPT, &slow()).unwrap();
    let other = engine.submit(&PROMPT, &slow()).unwrap();
    let dropped = engine.submit(&PROMPT, &slow()).unwrap();
    // A few steps into the first block (32 steps of one token).
    let start = engine.stats().forwards;
    eventually("a few steps", || engine.stats().forwards >= start + 3);
    cancelled.cancel();
    drop(dropped);
    assert!(matches!(
        cancelled.next_event(),
        Event::Done(Err(Error::Cancelled))
    ));
    let out = other.wait().unwrap();
    assert_eq!((&out.tokens, out.nfe), (&alone.tokens, alone.nfe));
    eventually("every page back", || {
        let s = engine.stats();
        s.pages_in_use == 0 && s.running == 0
    });
}

#[test]
fn a_request_longer_than_the_whole_cache_is_refused_while_the_others_go_on() {
    let engine = engine(
        "llada_tiny_s1",
        EngineOptions {
            max_batch: 4,
            cache_slots: Some(5 * 16),
        },
    );
    let fits = engine.submit(&PROMPT, &slow()).unwrap();
    let too_long = DecodeOptions {
        gen_length: 96,
        steps: 96,
        ..slow()
    };
    let err = engine
        .submit(&PROMPT, &too_long)
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(
        err.to_string().contains("more than the whole cache holds"),
        "{err}"
    );
    assert_eq!(fits.wait().unwrap().tokens.len(), 64);
}

/// The CPU backend, except that a pass holding the poison token panics.
/// Panics on any batch holding a pass with the token [`POISON`].
struct Poisoned;

const POISON: u32 = 77;

impl Watcher for Poisoned {
    fn before(&mut self, passes: &[ForwardPass]) {
        if passes.iter().any(|p| p.tokens.contains(&POISON)) {
            panic!("poisoned pass");
        }
    }
}

#[test]
fn a_panic_in_one_requests_forward_fails_that_request_only() {
    let model = Model::open(&golden_dir("llada_tiny_s1")).unwrap();
    let engine = Engine::with_backend(
        model,
        Box::new(|model: &Model| {
            Ok(Box::new(Watched {
                backend: CpuBackend::new(model)?,
                watcher: Poisoned,
            }) as Box<dyn Backend>)
        }),
        EngineOptions::default(),
    )
    .unwrap();
    let alone = engine.generate(&PROMPT, &slow()).unwrap();
    let healthy: Vec<_> = (0..3)
        .map(|_| engine.submit(&PROMPT, &slow()).unwrap())
        .collect();
    let bad = engine.submit(&[1, POISON, 2], &slow()).unwrap();
    let err = bad.wait().unwrap_err();
    assert!(
        matches!(&err, Error::Internal(m) if m.contains("poisoned pass")),
        "{err}"
    );
    for handle in healthy {
        let out = handle.wait().unwrap();
        assert_eq!((&out.tokens, out.nfe), (&alone.tokens, alone.nfe));
    }
    // The engine still serves.
    assert_eq!(
        engine.generate(&PROMPT, &slow()).unwrap().tokens,
        alone.tokens
    );
    eventually("every page back", || engine.stats().pages_in_use == 0);
}
