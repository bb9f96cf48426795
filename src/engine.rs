//! The embedding API: a loaded model bound to a device.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::backend::{Backend, CacheLayout};
use crate::chat::Message;
use crate::cpu::CpuBackend;
use crate::decode::{DecodeOptions, Generation, Sequence};
use crate::error::{Error, Result};
use crate::kv_pool::{PagePool, PAGE_SIZE};
use crate::model::Model;
pub use crate::scheduler::{BatchStats, Event};
use crate::scheduler::{Request, Scheduler};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// How much an engine runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Requests decoded together at most; more wait in arrival order.
    pub max_batch: usize,
    /// Key/value cache slots shared by all requests (a request takes one per
    /// prompt and generated position). `None`: enough for `max_batch`
    /// requests of the model's maximum length, within the device's budget
    /// ([`Backend::cache_budget`]).
    pub cache_slots: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            cache_slots: None,
        }
    }
}

/// Builds a backend for a model, on the engine's worker thread (a CUDA
/// context belongs to the thread that made it).
pub type BackendFactory = Box<dyn FnOnce(&Model) -> Result<Box<dyn Backend>> + Send>;

/// A model loaded onto a device, decoding many requests at once.
///
/// One worker thread owns the device and steps a [`Scheduler`]; any thread
/// can [`Engine::submit`] to it. Dropping the engine lets the requests in
/// flight finish, then stops the worker.
pub struct Engine {
    model: Arc<Model>,
    device_name: String,
    cache: CacheLayout,
    submissions: Option<Sender<Request>>,
    stats: Arc<Mutex<BatchStats>>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// An engine with the default [`EngineOptions`].
    pub fn new(model: Model, device: Device) -> Result<Engine> {
        Engine::with_options(model, device, EngineOptions::default())
    }

    pub fn with_options(model: Model, device: Device, options: EngineOptions) -> Result<Engine> {
        let factory: BackendFactory = match device {
            Device::Cpu => Box::new(|model| Ok(Box::new(CpuBackend::new(model)?))),
            Device::Cuda => Box::new(|model| Ok(Box::new(crate::cuda::CudaBackend::new(model)?))),
        };
        Engine::with_backend(model, factory, options)
    }

    /// An engine on a backend of the caller's making.
    pub fn with_backend(
        model: Model,
        factory: BackendFactory,
        options: EngineOptions,
    ) -> Result<Engine> {
        if options.max_batch == 0 {
            return Err(Error::invalid("max_batch must be at least 1"));
        }
        let model = Arc::new(model);
        let (submissions, requests) = mpsc::channel::<Request>();
        let (ready, started) = mpsc::channel::<Result<(String, CacheLayout)>>();
        let stats = Arc::new(Mutex::new(BatchStats::default()));
        let worker = {
            let (model, stats) = (model.clone(), stats.clone());
            std::thread::Builder::new()
                .name("dllm-engine".into())
                .spawn(move || {
                    let scheduler = match start(&model, factory, options) {
                        Ok(scheduler) => scheduler,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let layout = CacheLayout {
                        pages: scheduler.stats().pages,
                        page_size: PAGE_SIZE,
                    };
                    let _ = ready.send(Ok((scheduler.device_name(), layout)));
                    serve(scheduler, &requests, &stats);
                })
                .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?
        };
        let (device_name, cache) = started
            .recv()
            .map_err(|_| Error::Internal("the engine thread stopped while starting".into()))??;
        Ok(Engine {
            model,
            device_name,
            cache,
            submissions: Some(submissions),
            stats,
            worker: Some(worker),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn device_name(&self) -> String {
        self.device_name.clone()
    }

    /// The shared key/value cache: pages of [`PAGE_SIZE`] slots.
    pub fn cache_layout(&self) -> CacheLayout {
        self.cache
    }

    /// Counters of the batched forwards so far, and the current batch and queue.
    pub fn stats(&self) -> BatchStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request; it joins the running batch at the next step. Bad
    /// options or prompts are refused here; a request too long for the whole
    /// cache is refused through its handle.
    pub fn submit(&self, prompt: &[u32], options: &DecodeOptions) -> Result<RequestHandle> {
        self.enqueue(prompt, options, false)
    }

    /// Like [`Engine::submit`], and the handle also reports the current
    /// block after every step ([`Event::Step`]), to watch diffusion happen.
    pub fn submit_watching_steps(
        &self,
        prompt: &[u32],
        options: &DecodeOptions,
    ) -> Result<RequestHandle> {
        self.enqueue(prompt, options, true)
    }

    fn enqueue(
        &self,
        prompt: &[u32],
        options: &DecodeOptions,
        watch_steps: bool,
    ) -> Result<RequestHandle> {
        let sequence = Sequence::new(&self.model.config, prompt, options)?;
        let (events, receiver) = mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let request = Request {
            sequence,
            events,
            cancelled: cancelled.clone(),
            watch_steps,
        };
        self.submissions
            .as_ref()
            .and_then(|s| s.send(request).ok())
            .ok_or_else(|| Error::Internal("the engine has stopped".into()))?;
        Ok(RequestHandle {
            events: receiver,
            cancelled,
            done: false,
        })
    }

    /// Decodes one request, blocking until it is done.
    pub fn generate(&self, prompt: &[u32], options: &DecodeOptions) -> Result<Generation> {
        self.submit(prompt, options)?.wait()
    }

    /// Like [`Engine::generate`], handing each block's tokens to `on_block`
    /// as soon as the block is complete.
    pub fn generate_streaming(
        &self,
        prompt: &[u32],
        options: &DecodeOptions,
        on_block: &mut dyn FnMut(&[u32]),
    ) -> Result<Generation> {
        let mut handle = self.submit(prompt, options)?;
        loop {
            match handle.next_event() {
                Event::Block { tokens, .. } => on_block(&tokens),
                Event::Step { .. } => {}
                Event::Done(result) => return result,
            }
        }
    }

    /// Token ids of `text`, wrapped as a single user turn of the model's chat
    /// template when `chat` is set.
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        if !chat {
            return self.tokenizer()?.encode(text);
        }
        self.encode_chat(&[Message {
            role: "user".into(),
            content: text.into(),
        }])
    }

    /// Token ids of a conversation rendered through the model's chat
    /// template, ready for the assistant's turn.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let tokenizer = self.tokenizer()?;
        let template = self.model.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no tokenizer_config.json with a chat_template",
                self.model.dir.display()
            ))
        })?;
        tokenizer.encode(&template.render(messages, true)?)
    }

    /// Text of generated ids, special tokens (EOS padding, end of turn) dropped.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer()?.decode(ids, true)
    }

    fn tokenizer(&self) -> Result<&crate::tokenizer::TextTokenizer> {
        self.model.tokenizer.as_deref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer.json: pass token ids instead of text",
                self.model.dir.display()
            ))
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the queue tells the worker to finish what it has and stop.
        self.submissions = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Builds the backend and its cache on the worker thread.
fn start(model: &Model, factory: BackendFactory, options: EngineOptions) -> Result<Scheduler> {
    let mut backend = factory(model)?;
    let config = &model.config;
    let slots = match options.cache_slots {
        Some(slots) => slots,
        None => {
            let wanted = options.max_batch * config.max_seq_len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            wanted.min(backend.cache_budget()? / backend.cache_slot_bytes().max(1))
        }
    };
    let pages = slots / PAGE_SIZE;
    if pages == 0 {
        return Err(Error::invalid(format!(
            "a key/value cache of {slots} slots holds no page of {PAGE_SIZE} slots"
        )));
    }
    let layout = CacheLayout {
        pages,
        page_size: PAGE_SIZE,
    };
    backend.allocate_cache(layout)?;
    Ok(Scheduler::new(
        backend,
        PagePool::new(layout),
        options.max_batch,
    ))
}

/// The worker: steps the scheduler while there is work, sleeps on the queue
/// when there is none, and stops once the queue is closed and drained.
fn serve(mut scheduler: Scheduler, requests: &Receiver<Request>, stats: &Mutex<BatchStats>) {
    loop {
        if scheduler.is_idle() {
            match requests.recv() {
                Ok(request) => scheduler.submit(request),
                Err(_) => return,
            }
        }
        while let Ok(request) = requests.try_recv() {
            scheduler.submit(request);
        }
        scheduler.step();
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = scheduler.stats();
    }
}

/// A submitted request: its events, and a way to cancel it. Dropping the
/// handle before the request is done cancels it.
pub struct RequestHandle {
    events: Receiver<Event>,
    cancelled: Arc<AtomicBool>,
    done: bool,
}

impl RequestHandle {
    /// The next event, blocking until there is one. After [`Event::Done`]
    /// there are no more.
    pub fn next_event(&mut self) -> Event {
        assert!(!self.done, "the request already reported Done");
        let event = self
            .events
            .recv()
            .unwrap_or_else(|_| Event::Done(Err(Error::Internal("the engine stopped".into()))));
        self.done = matches!(event, Event::Done(_));
        event
    }

    /// Skips the blocks and returns the result.
    pub fn wait(mut self) -> Result<Generation> {
        loop {
            if let Event::Done(result) = self.next_event() {
                return result;
            }
        }
    }

    /// Asks the engine to stop the request at its next step and free its
    /// cache; the handle then reports [`Error::Cancelled`].
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// A flag another thread can raise to cancel this request.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}
