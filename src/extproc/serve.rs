//! Serving ext_proc: one single-threaded runtime per serving thread, each connection owned by
//! one thread for its whole life.
//!
//! Envoy opens one long-lived HTTP/2 connection per worker thread and multiplexes every
//! request's ext_proc stream over it, so all the work of a connection is a chain of small
//! steps (read a frame, handle it, write the reply). On a work-stealing runtime those steps
//! hop between threads and every hop is a futex wake-up: measured with
//! `scripts/bench_extproc.sh`, a 1 KB request cost epp ~61 µs of CPU on the default runtime
//! and ~46 µs with one thread. Here the listener's connections are dealt round-robin to
//! `threads` current-thread runtimes; a connection never leaves its thread. Shared state (the
//! datastore, the scheduler, the load counters) is the same `Arc`s as before.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::ExtProcService;
use crate::telemetry::health::{HealthService, HealthState};

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once per serving thread.
const CONCURRENT_HANDSHAKES: usize = 64;

/// HTTP/2 flow-control windows of ext_proc connections (bytes Envoy may send unread).
const CONNECTION_WINDOW: u32 = 16 << 20;
const STREAM_WINDOW: u32 = 4 << 20;

/// How the ext_proc server runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// Serving threads (each a current-thread runtime); at least 1.
    pub threads: usize,
    /// TLS for the gRPC connections; `None` serves plaintext.
    pub tls: Option<TlsAcceptor>,
    /// HTTP/2 keepalive ping interval.
    pub keepalive: Duration,
    /// Also serve gRPC health (`--health-checking`).
    pub health: Option<Arc<HealthState>>,
    /// How long streams may run after shutdown starts (`--drain-timeout`).
    pub drain_timeout: Duration,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("threads", &self.threads)
            .field("tls", &self.tls.is_some())
            .field("health", &self.health.is_some())
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

/// Errors of the ext_proc server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("starting serving thread {index}: {source}")]
    Thread {
        index: usize,
        source: std::io::Error,
    },
    #[error("serving thread {0} panicked")]
    Panicked(usize),
}

/// Serves `service` on `listener` until `shutdown` completes, then lets every thread finish
/// its streams (tonic's graceful shutdown) and joins them.
pub async fn serve(
    listener: TcpListener,
    service: ExtProcService,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let threads = options.threads.max(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut senders = Vec::with_capacity(threads);
    let mut handles = Vec::with_capacity(threads);
    for index in 0..threads {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        handles.push(spawn_thread(
            index,
            rx,
            &service,
            &options,
            stop_rx.clone(),
        )?);
    }
    tokio::pin!(shutdown);
    let mut next = 0usize;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Some(stream) = hand_over(stream, peer) {
                        // A closed receiver means that thread is gone; its error surfaces at join.
                        let _ = senders[next % threads].send(stream);
                        next = next.wrapping_add(1);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an ext_proc connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(senders);
    // Streams in flight finish (tonic's graceful shutdown), for at most the drain timeout.
    match tokio::time::timeout(options.drain_timeout, join_all(handles)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(timeout = ?options.drain_timeout, "drain timeout: exiting with streams in flight");
            Ok(())
        }
    }
}

/// A connection ready to move to another runtime: TCP_NODELAY set (tonic's own setting only
/// covers listeners it binds; without it each reply after the first waits for Envoy's
/// delayed ACK, ~40 ms on Linux) and detached from this runtime's reactor.
fn hand_over(stream: tokio::net::TcpStream, peer: SocketAddr) -> Option<std::net::TcpStream> {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "setting TCP_NODELAY");
    }
    match stream.into_std() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "detaching an ext_proc connection");
            None
        }
    }
}

fn spawn_thread(
    index: usize,
    connections: mpsc::UnboundedReceiver<std::net::TcpStream>,
    service: &ExtProcService,
    options: &ServeOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServeError> {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(options.keepalive))
        // Envoy may have many large bodies in flight on one connection: a 1 MiB connection
        // window (hyper's default) made it wait for window updates.
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .initial_stream_window_size(Some(STREAM_WINDOW));
    let router = match &options.health {
        Some(state) => builder
            .add_service(HealthService::server(state.clone()))
            .add_service(service.clone().into_server()),
        None => builder.add_service(service.clone().into_server()),
    };
    let tls = options.tls.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Thread { index, source })?;
    std::thread::Builder::new()
        .name(format!("epp-extproc-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                // Registered with this thread's reactor when the server takes it.
                let tcp = UnboundedReceiverStream::new(connections).map(|s| {
                    s.set_nonblocking(true)?;
                    tokio::net::TcpStream::from_std(s)
                });
                let stopped = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                let result = match tls {
                    None => router.serve_with_incoming_shutdown(tcp, stopped).await,
                    Some(acceptor) => {
                        let tls = handshakes(tcp, acceptor);
                        router.serve_with_incoming_shutdown(tls, stopped).await
                    }
                };
                if let Err(e) = result {
                    tracing::error!(thread = index, error = %e, "ext_proc serving thread");
                }
            });
        })
        .map_err(|source| ServeError::Thread { index, source })
}

/// TLS handshakes of the accepted connections, several at a time, each bounded by
/// [`HANDSHAKE_TIMEOUT`]; failures are logged and skipped.
fn handshakes(
    tcp: impl Stream<Item = std::io::Result<tokio::net::TcpStream>>,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    tcp.map(move |conn| {
        let acceptor = acceptor.clone();
        async move {
            let conn = conn?;
            let peer = conn.peer_addr().ok();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                Ok(Ok(tls)) => Ok(tls),
                Ok(Err(e)) => {
                    tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    Err(e)
                }
                Err(_) => {
                    tracing::debug!(?peer, "TLS handshake timed out");
                    Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
                }
            }
        }
    })
    .buffer_unordered(CONCURRENT_HANDSHAKES)
}

async fn join_all(handles: Vec<JoinHandle<()>>) -> Result<(), ServeError> {
    for (index, handle) in handles.into_iter().enumerate() {
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|_| ServeError::Panicked(index))?
            .map_err(|_| ServeError::Panicked(index))?;
    }
    Ok(())
}
