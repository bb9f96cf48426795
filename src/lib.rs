//! # dllm: a fast runtime for diffusion language models
//!
//! Runs LLaDA (LLaDA-8B-Instruct, LLaDA-1.5) and Dream (Dream-v0-Instruct-7B)
//! checkpoints with every Fast-dLLM and Streaming-dLLM acceleration: prefix
//! and dual key/value caches, confidence-aware parallel decoding, suffix
//! pruning, a dynamic threshold and early exit at EOS. A float32 CPU backend
//! is the reference; a CUDA backend runs the same decode loop in bf16.
//!
//! Load a model once and generate many times, each request with its own
//! decoding configuration:
//!
//! ```
//! use dllm::{CacheMode, DecodeOptions, Device, Engine, Model};
//!
//! # fn main() -> dllm::Result<()> {
//! let model = Model::open("models/tiny-arith".as_ref())?;
//! let mut engine = Engine::new(model, Device::Cpu)?;
//! let prompt = engine.encode_prompt("add 0000004821+0000000937=", false)?;
//!
//! // The default is the fast setting: DualCache with threshold 0.9.
//! let options = DecodeOptions { gen_length: 64, steps: 64, ..DecodeOptions::default() };
//! let fast = engine.generate(&prompt, &options)?;
//! println!("{} ({} forward passes)", engine.decode_text(&fast.tokens)?, fast.nfe);
//!
//! // Streaming-dLLM: prefix cache, a pruned suffix, dynamic threshold, early exit.
//! let streaming = DecodeOptions {
//!     cache: CacheMode::Prefix,
//!     suffix_window: Some(32),
//!     confidence_alpha: 0.3,
//!     early_exit: true,
//!     ..options
//! };
//! let out = engine.generate(&prompt, &streaming)?;
//! println!("{:.1} tokens/s", out.tokens_per_second());
//! # Ok(())
//! # }
//! ```
//!
//! Layout: [`config`] and [`checkpoint`] read a model directory, [`model`]
//! maps both families onto one set of tensors, [`backend`] is the one forward
//! primitive every device implements ([`cpu`] is the reference), and
//! [`decode`] is the single decode loop that every strategy runs through.

pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod decode;
mod engine;
pub mod error;
pub mod model;
mod progress;
pub mod synthetic;
pub mod tokenizer;

pub use backend::{Backend, ForwardPass, TokenStats};
pub use config::{Family, ModelConfig, MoeConfig};
pub use decode::{CacheMode, DecodeOptions, DreamAlg, Editing, ForwardTime, Generation, Sampler};
pub use engine::{Device, Engine};
pub use error::{Error, Result};
pub use model::Model;
