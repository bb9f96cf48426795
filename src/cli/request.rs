//! One request as the command line describes it, shared by `dllm generate`
//! and `dllm batch` (and, for the decoding flags, `dllm serve`): the prompt
//! and the decoding flags, the default generation length fitted to the
//! model, and the JSON that reports it.

use std::time::Duration;

use clap::{Args, ValueEnum};
use dllm::{CacheMode, DecodeOptions, DreamAlg, Editing, Engine, Generation, ModelConfig, Sampler};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

/// Tokens generated when `--gen-length` is not given and the model has room.
const DEFAULT_GEN_LENGTH: usize = 256;
/// The LLaDA2 samplers' threshold and LLaDA2.0's steps per block when not
/// given: the reference's defaults.
const LLADA2_THRESHOLD: f64 = 0.95;
const LLADA2_STEPS: usize = 32;

#[derive(Args)]
pub struct RequestArgs {
    /// Prompt text (needs the model's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Wrap the prompt as a user turn of the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    decoding: DecodingArgs,
}

/// The decoding flags, which `dllm serve` also reads from a request's JSON
/// body under the same names in snake_case (the generation length is
/// OpenAI's `max_tokens` there), so the two resolve defaults alike.
#[derive(Args, Deserialize)]
pub struct DecodingArgs {
    /// Tokens to generate [default: 256, or as many whole blocks as the
    /// model's maximum sequence length leaves after the prompt].
    #[arg(long)]
    #[serde(rename = "max_tokens")]
    gen_length: Option<usize>,
    /// Tokens per semi-autoregressive block [default: 32].
    #[arg(long)]
    block_length: Option<usize>,
    /// Total denoising steps [default: gen-length].
    #[arg(long)]
    steps: Option<usize>,
    /// Key/value cache used after each block's first step [default: dual].
    #[arg(long, value_enum)]
    cache: Option<CacheArg>,
    /// Commit every token at least this confident ("none": the fixed
    /// schedule) [default: 0.9, or none with --factor or a non-threshold --alg].
    #[arg(long, value_parser = parse_threshold)]
    #[serde(default, deserialize_with = "threshold_or_null")]
    threshold: Option<Threshold>,
    /// Factor rule for parallel decoding (instead of a threshold).
    #[arg(long)]
    factor: Option<f64>,
    /// Suffix pruning: masked positions kept after the block.
    #[arg(long)]
    suffix_window: Option<usize>,
    /// Suffix pruning: positions kept at the end of the sequence [default: 1].
    #[arg(long, requires = "suffix_window")]
    suffix_tail: Option<usize>,
    /// Dynamic threshold: tau * (1 - alpha * (1 - masked ratio)) [default: 0].
    #[arg(long)]
    confidence_alpha: Option<f64>,
    /// Stop once a completed block holds EOS.
    #[arg(long)]
    #[serde(default)]
    early_exit: bool,
    /// Dream's confidence algorithm.
    #[arg(long, value_enum)]
    alg: Option<AlgArg>,
    /// Mask token id [default: from config.json].
    #[arg(long)]
    mask_id: Option<u32>,
    /// EOS token id [default: from config.json].
    #[arg(long)]
    eos_id: Option<u32>,
    /// Block diffusion with a LLaDA2 sampler (llada2_moe models): LLaDA2.0's
    /// threshold with a per-step quota (--steps per block [default: 32]), or
    /// LLaDA2.1's threshold plus editing. --threshold defaults to 0.95.
    #[arg(long, value_enum)]
    sampler: Option<SamplerArg>,
    /// LLaDA2.1: replace a committed token by a different prediction more
    /// probable than this (1 turns editing off) [default: 0.9].
    #[arg(long)]
    editing_threshold: Option<f64>,
    /// LLaDA2.1: most forwards of a block once its masks are gone [default: 16].
    #[arg(long)]
    max_post_steps: Option<usize>,
    /// LLaDA2.1: least masks committed a step [default: 1].
    #[arg(long)]
    num_to_transfer: Option<usize>,
    /// LLaDA2 samplers: stop as soon as EOS is decoded with no mask before it.
    #[arg(long, requires = "sampler")]
    #[serde(default)]
    eos_early_stop: bool,
}

#[derive(Clone, Copy, PartialEq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SamplerArg {
    Llada20,
    Llada21,
}

#[derive(Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CacheArg {
    None,
    Prefix,
    Dual,
}

/// Dream's own spelling of its algorithms, which scripts pass verbatim.
#[derive(Clone, Copy, ValueEnum, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
enum AlgArg {
    MaskgitPlus,
    Entropy,
    TopkMargin,
    ConfidenceThreshold,
}

#[derive(Clone, Copy)]
enum Threshold {
    Off,
    At(f64),
}

fn parse_threshold(s: &str) -> Result<Threshold, String> {
    if s == "none" {
        return Ok(Threshold::Off);
    }
    s.parse::<f64>()
        .map(Threshold::At)
        .map_err(|_| format!("expected a number or \"none\", got {s:?}"))
}

/// JSON's spelling of `--threshold`: a number, or null for the fixed
/// schedule (an absent field keeps the default).
fn threshold_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Threshold>, D::Error> {
    Ok(Some(
        Option::<f64>::deserialize(d)?.map_or(Threshold::Off, Threshold::At),
    ))
}

impl RequestArgs {
    /// The prompt's token ids: the text encoded by the model's tokenizer
    /// (and chat template), or the ids as given.
    pub fn prompt(&self, engine: &Engine) -> dllm::Result<Vec<u32>> {
        match (&self.prompt, &self.prompt_ids) {
            (Some(text), _) => engine.encode_prompt(text, self.chat),
            (None, Some(ids)) => Ok(ids.clone()),
            (None, None) => unreachable!("clap requires --prompt or --prompt-ids"),
        }
    }

    /// The decoding options for a prompt of `prompt_len` tokens on a model
    /// of `config`; a shortened default generation length is said on stderr.
    pub fn options(&self, config: &ModelConfig, prompt_len: usize) -> dllm::Result<DecodeOptions> {
        let (options, note) = self.decoding.options(config, prompt_len)?;
        if let Some(note) = note {
            eprintln!("note: {note}");
        }
        Ok(options)
    }
}

impl DecodingArgs {
    /// The decoding options for a prompt of `prompt_len` tokens on a model
    /// of `config`, and a note when the default generation length was cut
    /// to fit the model.
    pub fn options(
        &self,
        config: &ModelConfig,
        prompt_len: usize,
    ) -> dllm::Result<(DecodeOptions, Option<String>)> {
        let alg = self.alg.map(|a| match a {
            AlgArg::MaskgitPlus => DreamAlg::MaskgitPlus,
            AlgArg::Entropy => DreamAlg::Entropy,
            AlgArg::TopkMargin => DreamAlg::TopkMargin,
            AlgArg::ConfidenceThreshold => DreamAlg::ConfidenceThreshold,
        });
        let wants_no_threshold =
            self.factor.is_some() || matches!(alg, Some(a) if a != DreamAlg::ConfidenceThreshold);
        let defaults = DecodeOptions::default();
        let sampler = self.sampler()?;
        let block_diffusion = sampler != Sampler::SemiAutoregressive;
        let threshold = match self.threshold {
            Some(Threshold::At(t)) => Some(t),
            Some(Threshold::Off) => None,
            None if block_diffusion => Some(LLADA2_THRESHOLD),
            None if wants_no_threshold => None,
            None => defaults.threshold,
        };
        let block_length = self.block_length.unwrap_or(defaults.block_length);
        let (gen_length, note) = self.gen_length(config.max_seq_len, prompt_len, block_length);
        let options = DecodeOptions {
            gen_length,
            block_length,
            steps: self.steps.unwrap_or(if block_diffusion {
                LLADA2_STEPS
            } else {
                gen_length
            }),
            cache: match self.cache {
                None => defaults.cache,
                Some(CacheArg::None) => CacheMode::None,
                Some(CacheArg::Prefix) => CacheMode::Prefix,
                Some(CacheArg::Dual) => CacheMode::Dual,
            },
            threshold,
            factor: self.factor,
            suffix_window: self.suffix_window,
            suffix_tail: self.suffix_tail.unwrap_or(defaults.suffix_tail),
            confidence_alpha: self.confidence_alpha.unwrap_or(defaults.confidence_alpha),
            early_exit: self.early_exit,
            alg,
            mask_id: self.mask_id,
            eos_id: self.eos_id,
            sampler,
        };
        Ok((options, note))
    }

    /// `--sampler` with its own flags; LLaDA2.1's editing flags without it
    /// are an error, not ignored.
    fn sampler(&self) -> dllm::Result<Sampler> {
        // Named both ways: the command line's flag and the server's field.
        let editing_flags = [
            (
                "editing_threshold (--editing-threshold)",
                self.editing_threshold.is_some(),
            ),
            (
                "max_post_steps (--max-post-steps)",
                self.max_post_steps.is_some(),
            ),
            (
                "num_to_transfer (--num-to-transfer)",
                self.num_to_transfer.is_some(),
            ),
        ];
        if self.sampler != Some(SamplerArg::Llada21) {
            if let Some((flag, _)) = editing_flags.iter().find(|(_, given)| *given) {
                return Err(dllm::Error::InvalidRequest(format!(
                    "{flag} belongs to the LLaDA2.1 sampler: choose sampler llada21"
                )));
            }
        }
        let defaults = Editing::default();
        Ok(match self.sampler {
            None => Sampler::SemiAutoregressive,
            Some(SamplerArg::Llada20) => Sampler::Llada20 {
                eos_early_stop: self.eos_early_stop,
            },
            Some(SamplerArg::Llada21) => Sampler::Llada21(Editing {
                editing_threshold: self.editing_threshold.unwrap_or(defaults.editing_threshold),
                max_post_steps: self.max_post_steps.unwrap_or(defaults.max_post_steps),
                num_to_transfer: self.num_to_transfer.unwrap_or(defaults.num_to_transfer),
                eos_early_stop: self.eos_early_stop,
            }),
        })
    }

    /// `--gen-length` as given; without it the default, cut to the whole
    /// blocks that fit after the prompt when the model's maximum sequence
    /// length leaves less room (with a note saying so). When not even one
    /// block fits, the default stays and the request's own error explains.
    fn gen_length(
        &self,
        max_seq_len: usize,
        prompt_len: usize,
        block_length: usize,
    ) -> (usize, Option<String>) {
        if let Some(n) = self.gen_length {
            return (n, None);
        }
        let block = block_length.max(1);
        let fitted = max_seq_len.saturating_sub(prompt_len) / block * block;
        if fitted >= DEFAULT_GEN_LENGTH || fitted == 0 {
            return (DEFAULT_GEN_LENGTH, None);
        }
        let note = format!(
            "--gen-length {fitted} instead of the default {DEFAULT_GEN_LENGTH}: the model's \
             maximum sequence length is {max_seq_len} and the prompt takes {prompt_len} tokens \
             (whole blocks of {block})"
        );
        (fitted, Some(note))
    }
}

/// What a request reports with `--json`. `load` is the process's model load;
/// `call` is the wall time of the whole engine call, so that the device
/// preparation before the first forward (allocation, per-shape plans) is
/// reported as `prepare_s` beside the timed forwards.
pub fn report(
    engine: &Engine,
    prompt_len: usize,
    generation: &Generation,
    load: Duration,
    call: Duration,
) -> dllm::Result<Value> {
    let total = generation.total_time();
    let mut out = json!({
        "tokens": generation.tokens,
        "nfe": generation.nfe,
        "device": engine.device_name(),
        "commit": env!("DLLM_COMMIT"),
        "cpu_threads": rayon::current_num_threads(),
        "prompt_tokens": prompt_len,
        "non_eos_tokens": generation.non_eos_tokens,
        "timings": {
            "load_s": load.as_secs_f64(),
            "prepare_s": call.saturating_sub(total).as_secs_f64(),
            "prompt_s": generation.prompt_time.as_secs_f64(),
            "decode_s": generation.decode_time.as_secs_f64(),
            "total_s": total.as_secs_f64(),
            "request_s": call.as_secs_f64(),
            "tokens_per_s": generation.tokens_per_second(),
            "full_forwards": generation.full_forwards.count,
            "full_forward_ms": generation.full_forwards.mean_ms(),
            "cached_forwards": generation.cached_forwards.count,
            "cached_forward_ms": generation.cached_forwards.mean_ms(),
        },
    });
    if let Some(tokenizer) = &engine.model().tokenizer {
        out["text"] = tokenizer.decode(&generation.tokens, true)?.into();
    }
    Ok(out)
}
