//! An engine request seen from async code.
//!
//! The engine's [`RequestHandle`] blocks, so a blocking thread waits on it
//! and forwards its events into a channel that the request's task awaits.
//! Dropping a [`Decoding`] (the client went away, the handler was dropped)
//! cancels the request at once: the engine frees its cache pages at its next
//! step, and the thread ends when the engine reports the cancellation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dllm::{Engine, Event, RequestHandle};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::api::Job;

pub struct Decoding {
    events: mpsc::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl Decoding {
    /// Submits `job`. `place` is its place among the requests in flight,
    /// given back when the engine is done with the request.
    pub fn start(
        engine: &Engine,
        job: &Job,
        place: OwnedSemaphorePermit,
    ) -> dllm::Result<Decoding> {
        let handle = if job.stream_steps {
            engine.submit_watching_steps(&job.prompt, &job.options)?
        } else {
            engine.submit(&job.prompt, &job.options)?
        };
        let cancel = handle.cancel_flag();
        let (sender, events) = mpsc::unbounded_channel();
        tokio::task::spawn_blocking(move || forward(handle, &sender, place));
        Ok(Decoding { events, cancel })
    }

    /// The next event; after [`Event::Done`] there are none.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for Decoding {
    fn drop(&mut self) {
        // After Done this changes nothing.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Forwards `handle`'s events until the last. When no one listens any more
/// the request is cancelled, and its place is given back only once the
/// engine has let it go.
fn forward(
    mut handle: RequestHandle,
    sender: &mpsc::UnboundedSender<Event>,
    place: OwnedSemaphorePermit,
) {
    loop {
        let event = handle.next_event();
        if let Event::Done(_) = event {
            let _ = sender.send(event);
            break;
        }
        if sender.send(event).is_err() {
            handle.cancel();
            let _ = handle.wait();
            break;
        }
    }
    drop(place);
}
