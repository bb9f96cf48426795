//! `dllm serve`: the engine behind an OpenAI-compatible HTTP API.
//!
//! Concurrent HTTP requests become concurrent engine requests, which the
//! engine's worker decodes as one batch. The modules, in the order a request
//! meets them: [`routes`] (the router, the API key, the body limit, the
//! queue bound), [`api`] (the request bodies, checked and turned into a
//! [`api::Job`]), [`decoding`] (an engine request seen from async code;
//! dropping it cancels the request), [`completion`] (events turned into the
//! OpenAI response or its server-sent chunks), [`stop`] (stop sequences),
//! [`error`] (OpenAI-style error bodies) and [`metrics`] (Prometheus text).

mod api;
mod completion;
mod decoding;
mod error;
mod metrics;
mod routes;
mod stop;

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dllm::{Engine, EngineOptions, Model};

use super::{DeviceArg, ModelArg};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Address to listen on; only this machine can connect to the default.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the line on stdout says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Require "Authorization: Bearer KEY" on every /v1 request.
    #[arg(long)]
    api_key: Option<String>,
    /// Requests decoded together at most.
    #[arg(long, default_value_t = EngineOptions::default().max_batch)]
    max_batch: usize,
    /// Requests waiting for a place in the batch at most; beyond that the
    /// server answers 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Seconds that requests in flight get to finish after SIGINT or SIGTERM.
    #[arg(long, default_value_t = 30)]
    grace_period: u64,
    /// The model's name in the API [default: the model directory's name].
    #[arg(long)]
    served_model_name: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let dir = args.model.resolve();
    let model = Model::open(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let engine_options = EngineOptions {
        max_batch: args.max_batch,
        ..EngineOptions::default()
    };
    let engine = Engine::with_options(model, args.device.into(), engine_options)?;
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let limits = routes::Limits {
        in_flight: args.max_batch + args.max_queue,
        body_bytes: args.max_body_bytes,
    };
    let state = Arc::new(routes::Server::new(
        engine,
        model_name,
        args.api_key.clone(),
        limits,
    ));

    // Every request in flight holds a blocking thread that waits on its
    // engine handle; the queue bound keeps their number bounded.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(limits.in_flight.max(1))
        .build()?;
    let outcome = runtime.block_on(serve(state, &args));
    // Requests still running after the grace period were cancelled when
    // their connections were dropped; their threads end at the engine's
    // next step.
    runtime.shutdown_timeout(Duration::from_secs(5));
    outcome
}

async fn serve(state: Arc<routes::Server>, args: &ServeArgs) -> anyhow::Result<()> {
    let address = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let address = listener.local_addr()?;
    tracing::info!(
        "serving {} on {} at http://{address}",
        state.model_name(),
        state.device_name()
    );
    // The one line on stdout, for scripts that start the server on port 0.
    println!("listening on http://{address}");
    std::io::stdout().flush()?;

    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, routes::router(state)).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("stopping: no new connections; requests in flight are finishing");
        let _ = stopping.send(());
    });
    let grace = Duration::from_secs(args.grace_period);
    tokio::select! {
        served = server => served.context("serving")?,
        () = async {
            if stopped.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!("grace period of {grace:?} over: cancelling the requests still in flight"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
