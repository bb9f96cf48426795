//! `dllm batch`: a file of requests run by one process, so that the model is
//! loaded onto the device once for all of them (a benchmark of many cases
//! spends its time on the requests, not on reloading a checkpoint).
//!
//! The file is JSON lines, one request a line:
//!
//! ```text
//! {"id": "prefix-p900", "args": ["--prompt-ids", "1,2,3", "--gen-length", "256", "--cache", "prefix"]}
//! {"id": "warm", "args": [...], "warmup": true}
//! ```
//!
//! `args` are the request flags of `dllm generate` (everything but
//! `--model`, `--device` and `--json`, which the batch gives once). Every
//! line is parsed before the model is loaded, so a typo fails in a moment.
//! Requests run in file order; each prints the JSON object of
//! `dllm generate --json` with its `id` (and `"warmup": true` for a warm-up,
//! which runs like the others and is reported apart, never in a table). The
//! first failing request prints `{"id": ..., "error": ...}` and ends the run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail};
use clap::{Args, Parser};
use dllm::Engine;
use serde::Deserialize;
use serde_json::json;

use super::request::{self, RequestArgs};
use super::{DeviceArg, ModelArg};

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Requests, JSON lines {"id": NAME, "args": [generate flags], "warmup": BOOL}.
    #[arg(long)]
    requests: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

/// One line of the requests file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    args: Vec<String>,
    #[serde(default)]
    warmup: bool,
}

/// A line's flags, parsed as `dllm generate` parses its own.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct Flags {
    #[command(flatten)]
    request: RequestArgs,
}

struct Request {
    id: String,
    warmup: bool,
    flags: RequestArgs,
}

fn read_requests(path: &Path) -> anyhow::Result<Vec<Request>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read requests file {}: {e}", path.display()))?;
    let mut requests = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {}", path.display(), i + 1);
        let line: Line = serde_json::from_str(raw).map_err(|e| anyhow!("{}: {e}", at()))?;
        let flags = Flags::try_parse_from(&line.args).map_err(|e| {
            // clap's message is its first line; the rest is usage help.
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            anyhow!("{} (id {:?}): {first}", at(), line.id)
        })?;
        if requests.iter().any(|r: &Request| r.id == line.id) {
            bail!("{}: id {:?} is used twice", at(), line.id);
        }
        requests.push(Request {
            id: line.id,
            warmup: line.warmup,
            flags: flags.request,
        });
    }
    if requests.is_empty() {
        bail!("requests file {} holds no request", path.display());
    }
    Ok(requests)
}

pub fn run(args: BatchArgs) -> anyhow::Result<()> {
    let requests = read_requests(&args.requests)?;
    let started = Instant::now();
    let model = args.model.open()?;
    let engine = Engine::new(model, args.device.into())?;
    let load_time = started.elapsed();

    let mut stdout = std::io::stdout().lock();
    for r in &requests {
        let outcome = (|| {
            let prompt = r.flags.prompt(&engine)?;
            let options = r.flags.options(&engine.model().config, prompt.len())?;
            let call = Instant::now();
            let generation = engine.generate(&prompt, &options)?;
            request::report(
                &engine,
                prompt.len(),
                &generation,
                load_time,
                call.elapsed(),
            )
        })();
        let (mut line, failure) = match outcome {
            Ok(report) => (report, None),
            Err(e) => (json!({ "error": e.to_string() }), Some(e)),
        };
        line["id"] = r.id.clone().into();
        if r.warmup {
            line["warmup"] = true.into();
        }
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
        if let Some(e) = failure {
            return Err(anyhow::Error::from(e).context(format!("request {:?}", r.id)));
        }
    }
    Ok(())
}
