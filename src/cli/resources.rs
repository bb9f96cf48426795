//! What a run can be measured against: the bytes of weights a forward pass
//! streams, the machine's memory read bandwidth measured in the same run
//! (DESIGN §4: a step that reads its weights once cannot beat bytes over
//! bandwidth), and the process's peak resident memory.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes read by the bandwidth probe: far past any cache.
const PROBE_BYTES: usize = 512 << 20;

/// Best of a few parallel passes summing a buffer that no cache holds, in
/// bytes per second: what streaming weights from memory can reach.
pub fn read_bandwidth() -> f64 {
    let words = vec![1u64; PROBE_BYTES / 8];
    let chunk = words.len() / rayon::current_num_threads().max(1) / 16;
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let sum: u64 = words
                .par_chunks(chunk.max(1))
                .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
                .sum();
            std::hint::black_box(sum);
            PROBE_BYTES as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// The peak resident set size of this process (Linux's VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}
