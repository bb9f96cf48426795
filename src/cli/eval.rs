//! `dllm eval`: exact-match accuracy, NFE and speed of every strategy on a
//! held-out set, so a table shows what each acceleration costs in answers,
//! not only what it saves in time.
//!
//! The set is JSON lines `{"task": ..., "prompt": ..., "answer": ...}`
//! (`task` optional): each prompt is encoded with the model's tokenizer (no
//! chat template), `gen_length` tokens are generated after it, and the
//! decoded text (special tokens such as the EOS padding skipped) must equal
//! the answer exactly.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use dllm::{CacheMode, DecodeOptions, Engine};
use serde_json::{json, Map, Value};

use super::{DeviceArg, ModelArg};

/// `--check` fails below this baseline exact-match accuracy.
const MIN_BASELINE_ACCURACY: f64 = 0.95;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Held-out set, JSON lines {"task", "prompt", "answer"} [default: <model dir>/eval.jsonl].
    #[arg(long)]
    set: Option<PathBuf>,
    /// Evaluate N examples, taken round-robin across tasks in file order (so
    /// every task is represented; without a "task" field: the first N).
    #[arg(long, value_parser = parse_limit)]
    limit: Option<usize>,
    /// Only the strategies whose names contain one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Tokens generated per example (answer plus EOS padding).
    #[arg(long, default_value_t = 64)]
    gen_length: usize,
    /// Tokens per semi-autoregressive block.
    #[arg(long, default_value_t = 32)]
    block_length: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// One JSON object per strategy instead of the table.
    #[arg(long)]
    json: bool,
    /// Exit non-zero unless the baseline's accuracy is at least 95% and no
    /// strategy left a mask token in an output.
    #[arg(long)]
    check: bool,
}

fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("the limit must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a positive whole number, got {s:?}")),
    }
}

/// The strategies of the table, as options over a common base (steps =
/// gen_length, so the fixed schedule commits one token a step). Parallel
/// decoding runs once without a cache (threshold 0.9), then the threshold and
/// factor rules run with DualCache; the streaming ones with
/// the prefix cache, threshold 0.9, a suffix window, one tail position and
/// early exit; `dual+pruned-w16` is DualCache with the same pruning.
fn strategies(base: &DecodeOptions) -> Vec<(&'static str, DecodeOptions)> {
    let with = |cache, threshold| DecodeOptions {
        cache,
        threshold,
        ..base.clone()
    };
    let pruned = |cache, window, alpha| DecodeOptions {
        suffix_window: Some(window),
        suffix_tail: 1,
        confidence_alpha: alpha,
        early_exit: true,
        ..with(cache, Some(0.9))
    };
    vec![
        ("baseline", with(CacheMode::None, None)),
        ("prefix", with(CacheMode::Prefix, None)),
        ("dual", with(CacheMode::Dual, None)),
        ("threshold-0.9", with(CacheMode::None, Some(0.9))),
        ("dual+threshold-0.9", with(CacheMode::Dual, Some(0.9))),
        ("dual+threshold-0.7", with(CacheMode::Dual, Some(0.7))),
        ("dual+threshold-0.5", with(CacheMode::Dual, Some(0.5))),
        (
            "dual+factor-1.0",
            DecodeOptions {
                factor: Some(1.0),
                ..with(CacheMode::Dual, None)
            },
        ),
        ("streaming-w8", pruned(CacheMode::Prefix, 8, 0.0)),
        ("streaming-w16", pruned(CacheMode::Prefix, 16, 0.0)),
        ("streaming-w32", pruned(CacheMode::Prefix, 32, 0.0)),
        (
            "streaming-w32+alpha-0.3",
            pruned(CacheMode::Prefix, 32, 0.3),
        ),
        (
            "early-exit",
            DecodeOptions {
                early_exit: true,
                ..with(CacheMode::None, None)
            },
        ),
        ("dual+pruned-w16", pruned(CacheMode::Dual, 16, 0.0)),
    ]
}

/// One example of the held-out set.
struct Example {
    /// 1-based line number in the set file.
    line: usize,
    task: Option<String>,
    prompt: String,
    answer: String,
}

/// Reads a JSON-lines set; blank lines are skipped.
fn load_set(path: &Path, is_default: bool) -> anyhow::Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let hint = if is_default {
            " (the default set is <model dir>/eval.jsonl; pass --set FILE)"
        } else {
            ""
        };
        anyhow!("cannot read eval set {}: {e}{hint}", path.display())
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut examples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {line}", path.display());
        let value: Value = serde_json::from_str(raw).map_err(|e| {
            // serde_json's own position counts within the line: keep the column.
            let message = e.to_string();
            let position = format!(" at line {} column {}", e.line(), e.column());
            let message = message.strip_suffix(&position).unwrap_or(&message);
            anyhow!("{}, column {}: malformed JSON: {message}", at(), e.column())
        })?;
        let Value::Object(fields) = value else {
            bail!(
                "{}: expected a JSON object {{\"prompt\": ..., \"answer\": ...}}, got {}",
                at(),
                kind(&value)
            );
        };
        let text_field = |name: &str| -> anyhow::Result<Option<String>> {
            match fields.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => bail!("{}: \"{name}\" must be a string, got {}", at(), kind(other)),
            }
        };
        let required = |name: &str| -> anyhow::Result<String> {
            text_field(name)?.ok_or_else(|| anyhow!("{}: missing \"{name}\"", at()))
        };
        let prompt = required("prompt")?;
        let answer = required("answer")?;
        if prompt.is_empty() {
            bail!("{}: \"prompt\" is empty", at());
        }
        examples.push(Example {
            line,
            task: text_field("task")?,
            prompt,
            answer,
        });
    }
    if examples.is_empty() {
        bail!(
            "eval set {} holds no examples (expected JSON lines {{\"prompt\": ..., \"answer\": ...}})",
            path.display()
        );
    }
    Ok(examples)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first `limit` examples taken round-robin across tasks (tasks in order
/// of first appearance, examples in file order within each).
fn select(examples: Vec<Example>, limit: Option<usize>) -> Vec<Example> {
    let Some(limit) = limit else {
        return examples;
    };
    if limit >= examples.len() {
        return examples;
    }
    let mut groups: Vec<(Option<String>, std::collections::VecDeque<Example>)> = Vec::new();
    for example in examples {
        match groups.iter_mut().find(|(task, _)| *task == example.task) {
            Some((_, group)) => group.push_back(example),
            None => groups.push((example.task.clone(), [example].into())),
        }
    }
    let mut chosen = Vec::with_capacity(limit);
    while chosen.len() < limit {
        for (_, group) in groups.iter_mut() {
            if chosen.len() < limit {
                chosen.extend(group.pop_front());
            }
        }
    }
    chosen
}

/// A path as the user would type it: relative to the working directory when
/// it lies below it.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// One strategy's totals over the set.
struct Outcome {
    examples: usize,
    correct: usize,
    nfe: usize,
    non_eos_tokens: usize,
    time: Duration,
    masks_left: usize,
    /// (task, correct, examples) in order of first appearance.
    per_task: Vec<(String, usize, usize)>,
}

impl Outcome {
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples as f64
    }

    fn mean_nfe(&self) -> f64 {
        self.nfe as f64 / self.examples as f64
    }

    /// Non-EOS tokens over request wall time, as `Generation::tokens_per_second`.
    fn tokens_per_second(&self) -> f64 {
        self.non_eos_tokens as f64 / self.time.as_secs_f64().max(1e-12)
    }
}

fn evaluate(
    engine: &Engine,
    name: &'static str,
    options: &DecodeOptions,
    examples: &[Example],
    prompts: &[Vec<u32>],
    mask_id: Option<u32>,
) -> anyhow::Result<Outcome> {
    let progress = std::io::stderr().is_terminal();
    let mut outcome = Outcome {
        examples: examples.len(),
        correct: 0,
        nfe: 0,
        non_eos_tokens: 0,
        time: Duration::ZERO,
        masks_left: 0,
        per_task: Vec::new(),
    };
    for (i, (example, prompt)) in examples.iter().zip(prompts).enumerate() {
        if progress {
            eprint!("\r{name}: {}/{}", i + 1, examples.len());
            let _ = std::io::stderr().flush();
        }
        let out = engine.generate(prompt, options).with_context(|| {
            format!(
                "strategy {name}, example on line {} ({:?})",
                example.line, example.prompt
            )
        })?;
        let text = engine.decode_text(&out.tokens)?;
        let ok = text == example.answer;
        outcome.correct += usize::from(ok);
        outcome.nfe += out.nfe;
        outcome.non_eos_tokens += out.non_eos_tokens;
        outcome.time += out.total_time();
        if mask_id.is_some_and(|m| out.tokens.contains(&m)) {
            outcome.masks_left += 1;
        }
        let task = example.task.as_deref().unwrap_or("");
        match outcome.per_task.iter_mut().find(|(t, _, _)| t == task) {
            Some(entry) => {
                entry.1 += usize::from(ok);
                entry.2 += 1;
            }
            None => outcome
                .per_task
                .push((task.to_string(), usize::from(ok), 1)),
        }
    }
    if progress {
        eprint!("\r\x1b[K");
        let _ = std::io::stderr().flush();
    }
    Ok(outcome)
}

fn cache_name(cache: CacheMode) -> &'static str {
    match cache {
        CacheMode::None => "none",
        CacheMode::Prefix => "prefix",
        CacheMode::Dual => "dual",
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let dir = args.model.resolve();
    let (set_path, is_default) = match &args.set {
        Some(path) => (path.clone(), false),
        None => (dir.join("eval.jsonl"), true),
    };
    let base = DecodeOptions {
        gen_length: args.gen_length,
        block_length: args.block_length,
        steps: args.gen_length,
        ..DecodeOptions::default()
    };
    let all = strategies(&base);
    let names: Vec<&str> = all.iter().map(|(name, _)| *name).collect();
    let chosen: Vec<(&'static str, DecodeOptions)> = all
        .into_iter()
        .filter(|(name, _)| match &args.only {
            Some(only) => only.iter().any(|o| name.contains(o.trim())),
            None => true,
        })
        .collect();
    if chosen.is_empty() {
        bail!(
            "no strategy matches --only {}; the strategies are {}",
            args.only.as_deref().unwrap_or_default().join(","),
            names.join(", ")
        );
    }
    if args.check && !chosen.iter().any(|(name, _)| *name == "baseline") {
        bail!("--check judges the baseline's accuracy: include baseline in --only");
    }

    // Cheap checks first (the directory, the tokenizer, the set), then the
    // weights onto the device.
    let model = args.model.open()?;
    if model.tokenizer.is_none() {
        bail!(
            "{} has no tokenizer.json: eval encodes the set's prompts as text",
            dir.display()
        );
    }
    let examples = select(load_set(&set_path, is_default)?, args.limit);
    let mask_id = model.config.mask_id;
    let engine = Engine::new(model, args.device.into())?;
    let prompts = examples
        .iter()
        .map(|e| {
            engine
                .encode_prompt(&e.prompt, false)
                .with_context(|| format!("{}: line {}", set_path.display(), e.line))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    // One untimed request first, so the first strategy does not pay for
    // warming up the allocator and the thread pool.
    engine
        .generate(&prompts[0], &chosen[0].1)
        .with_context(|| {
            format!(
                "strategy {}, example on line {}",
                chosen[0].0, examples[0].line
            )
        })?;

    let device = engine.device_name();
    if !args.json {
        println!(
            "Model `{}`, set `{}`, {} examples, gen length {}, block length {}, steps {}, device {device}.",
            shown(&dir),
            shown(&set_path),
            examples.len(),
            base.gen_length,
            base.block_length,
            base.steps,
        );
        println!();
        println!(
            "| strategy | exact match | accuracy | mean NFE | tokens/s | speedup | masks left |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
    }
    let mut baseline: Option<Outcome> = None;
    let mut masked: Vec<(&str, usize)> = Vec::new();
    for (name, options) in &chosen {
        let outcome = evaluate(&engine, name, options, &examples, &prompts, mask_id)?;
        let seconds = outcome.time.as_secs_f64().max(1e-12);
        let speedup = match &baseline {
            _ if *name == "baseline" => Some(1.0),
            Some(b) => Some(b.time.as_secs_f64() / seconds),
            None => None,
        };
        if args.json {
            let per_task: Map<String, Value> = outcome
                .per_task
                .iter()
                .map(|(task, correct, n)| {
                    let accuracy = *correct as f64 / *n as f64;
                    let entry = json!({"correct": correct, "examples": n, "accuracy": accuracy});
                    (task.clone(), entry)
                })
                .collect();
            println!(
                "{}",
                json!({
                    "strategy": name, "examples": outcome.examples, "correct": outcome.correct,
                    "accuracy": outcome.accuracy(), "per_task": per_task,
                    "mean_nfe": outcome.mean_nfe(), "non_eos_tokens": outcome.non_eos_tokens,
                    "total_s": outcome.time.as_secs_f64(), "tokens_per_s": outcome.tokens_per_second(),
                    "speedup": speedup, "masks_left": outcome.masks_left,
                    "cache": cache_name(options.cache), "threshold": options.threshold,
                    "factor": options.factor, "suffix_window": options.suffix_window,
                    "confidence_alpha": options.confidence_alpha, "early_exit": options.early_exit,
                    "gen_length": options.gen_length, "block_length": options.block_length,
                    "steps": options.steps, "device": device,
                    "model": shown(&dir), "set": shown(&set_path),
                })
            );
        } else {
            println!(
                "| {name} | {}/{} | {:.1}% | {:.1} | {:.1} | {} | {} |",
                outcome.correct,
                outcome.examples,
                outcome.accuracy() * 100.0,
                outcome.mean_nfe(),
                outcome.tokens_per_second(),
                speedup.map_or_else(|| "-".to_string(), |s| format!("{s:.2}x")),
                outcome.masks_left,
            );
        }
        let _ = std::io::stdout().flush();
        if outcome.masks_left > 0 {
            masked.push((name, outcome.masks_left));
        }
        if *name == "baseline" {
            baseline = Some(outcome);
        }
    }

    if args.check {
        let mut failures = Vec::new();
        if let Some(b) = &baseline {
            if b.accuracy() < MIN_BASELINE_ACCURACY {
                failures.push(format!(
                    "baseline accuracy {}/{} = {:.1}% is below {:.0}%",
                    b.correct,
                    b.examples,
                    b.accuracy() * 100.0,
                    MIN_BASELINE_ACCURACY * 100.0
                ));
            }
        }
        for (name, n) in &masked {
            failures.push(format!("{name} left the mask id in {n} output(s)"));
        }
        if !failures.is_empty() {
            bail!("check failed: {}", failures.join("; "));
        }
        if !args.json {
            eprintln!(
                "check passed: baseline accuracy at least {:.0}%, no mask left",
                MIN_BASELINE_ACCURACY * 100.0
            );
        }
    }
    Ok(())
}
