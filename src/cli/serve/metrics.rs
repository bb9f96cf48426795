//! `/metrics`: the server's counters and the engine's batch statistics in
//! the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dllm::BatchStats;

/// How a generation ended.
#[derive(Clone, Copy)]
pub enum Outcome {
    Done,
    /// The client went away first.
    Cancelled,
    Failed,
}

#[derive(Default)]
pub struct Metrics {
    /// Responses by endpoint and status code.
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    /// Generations by [`Outcome`], in its order.
    generations: [AtomicU64; 3],
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    nfe: AtomicU64,
}

impl Metrics {
    pub fn count_response(&self, endpoint: &str, status: u16) {
        let mut responses = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        *responses.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn count_generation(
        &self,
        outcome: Outcome,
        prompt_tokens: usize,
        generated_tokens: usize,
        nfe: usize,
    ) {
        self.generations[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated_tokens as u64, Ordering::Relaxed);
        self.nfe.fetch_add(nfe as u64, Ordering::Relaxed);
    }

    /// The exposition text; `in_flight` counts the requests holding a place.
    pub fn render(&self, engine: &BatchStats, in_flight: usize) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };

        let responses: Vec<(String, f64)> = self
            .responses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((endpoint, code), n)| {
                (
                    format!("{{endpoint=\"{endpoint}\",code=\"{code}\"}}"),
                    *n as f64,
                )
            })
            .collect();
        metric(
            "dllm_requests_total",
            "counter",
            "HTTP responses by endpoint and status code.",
            &responses,
        );
        let outcomes: Vec<(String, f64)> = ["done", "cancelled", "failed"]
            .iter()
            .zip(&self.generations)
            .map(|(name, n)| {
                (
                    format!("{{outcome=\"{name}\"}}"),
                    n.load(Ordering::Relaxed) as f64,
                )
            })
            .collect();
        metric(
            "dllm_generations_total",
            "counter",
            "Generations by how they ended (cancelled: the client went away).",
            &outcomes,
        );
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64;
        #[rustfmt::skip]
        let single: [(&str, &str, &str, f64); 11] = [
            ("dllm_prompt_tokens_total", "counter", "Prompt tokens of generations.", count(&self.prompt_tokens)),
            ("dllm_generated_tokens_total", "counter", "Generated tokens other than EOS.", count(&self.generated_tokens)),
            ("dllm_nfe_total", "counter", "Forward passes of finished generations, counted per request.", count(&self.nfe)),
            ("dllm_batch_forwards_total", "counter", "Batched forwards the engine ran.", engine.forwards as f64),
            ("dllm_batch_forward_seconds_total", "counter", "Wall time of the batched forwards.", engine.forward_time.as_secs_f64()),
            ("dllm_batch_sequences_total", "counter", "Sequences summed over batched forwards (over the forwards: the mean batch size).", engine.sequences as f64),
            ("dllm_batch_running", "gauge", "Requests in the running batch.", engine.running as f64),
            ("dllm_queue_waiting", "gauge", "Requests waiting for a place in the batch.", engine.waiting as f64),
            ("dllm_requests_in_flight", "gauge", "Requests accepted and not yet let go by the engine.", in_flight as f64),
            ("dllm_cache_pages_in_use", "gauge", "Key/value cache pages held by requests.", engine.pages_in_use as f64),
            ("dllm_cache_pages", "gauge", "Key/value cache pages in all.", engine.pages as f64),
        ];
        for (name, kind, help, value) in single {
            metric(name, kind, help, &[(String::new(), value)]);
        }
        out
    }
}
