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
//! let engine = Engine::new(model, Device::Cpu)?;
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
//! An engine decodes many requests at once (continuous batching): any thread
//! can [`Engine::submit`] a request, which joins the running batch at the next
//! step, and read its blocks as they complete from the [`RequestHandle`]. Each
//! request's tokens are exactly what they would be alone.
//!
//! ```
//! use dllm::{DecodeOptions, Device, Engine, EngineOptions, Event, Model};
//!
//! # fn main() -> dllm::Result<()> {
//! let model = Model::open("models/tiny-arith".as_ref())?;
//! let engine = Engine::with_options(
//!     model,
//!     Device::Cpu,
//!     EngineOptions { max_batch: 8, ..EngineOptions::default() },
//! )?;
//! let options = DecodeOptions { gen_length: 64, steps: 64, ..DecodeOptions::default() };
//! std::thread::scope(|s| {
//!     for question in ["add 0000004821+0000000937=", "rev ovtagohtzwhzb1n3="] {
//!         let engine = &engine;
//!         let options = &options;
//!         s.spawn(move || -> dllm::Result<()> {
//!             let prompt = engine.encode_prompt(question, false)?;
//!             let mut request = engine.submit(&prompt, options)?;
//!             loop {
//!                 match request.next_event() {
//!                     Event::Block { index, tokens } => {
//!                         println!("{question} block {index}: {}", engine.decode_text(&tokens)?)
//!                     }
//!                     Event::Done(result) => {
//!                         println!("{question} done in {} forward passes", result?.nfe);
//!                         return Ok(());
//!                     }
//!                     // Only requests submitted with `submit_watching_steps` see these.
//!                     Event::Step { .. } => {}
//!                 }
//!             }
//!         });
//!     }
//! });
//! // A request can be cancelled at any step; dropping its handle does too.
//! let prompt = engine.encode_prompt("copy j04nj6xh7hema8yp=", false)?;
//! let request = engine.submit(&prompt, &options)?;
//! request.cancel();
//! match request.wait() {
//!     Err(dllm::Error::Cancelled) => println!("cancelled"),
//!     other => println!("done before the engine saw the cancel: {:?}", other.map(|g| g.nfe)),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Layout: [`config`] and [`checkpoint`] read a model directory, [`model`]
//! maps both families onto one set of tensors, [`backend`] is the one forward
//! primitive every device implements ([`cpu`] is the reference), [`decode`]
//! is the single decode loop that every strategy runs through, one
//! [`decode::Sequence`] per request, and the engine's scheduler steps many
//! sequences as one batch over a paged key/value cache ([`kv_pool`]).

pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod cuda;
pub mod decode;
mod engine;
pub mod error;
pub mod kv_pool;
pub mod model;
mod progress;
pub mod quant;
mod scheduler;
pub mod synthetic;
pub mod tokenizer;

pub use backend::{Backend, ForwardPass, TokenStats};
pub use config::{Family, ModelConfig, MoeConfig};
pub use decode::{CacheMode, DecodeOptions, DreamAlg, Editing, ForwardTime, Generation, Sampler};
pub use engine::{BackendFactory, BatchStats, Device, Engine, EngineOptions, Event, RequestHandle};
pub use error::{Error, Result};
pub use model::Model;
