//! Connections: the accept loop and each connection's HTTP/1 driver, with the limits a server
//! facing arbitrary clients needs and `axum::serve` does not set — a time limit on every request
//! head (which also closes a connection that stays silent, new or between requests), and a
//! shutdown that ends within a deadline whatever the clients do.
//!
//! Shutdown: the listener closes at once; every connection is asked to finish its request and
//! close; streams still running at the deadline end with an error chunk
//! ([`ShutdownDeadline`]), and whatever is left a moment later is dropped.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The time limits of a connection and of shutdown.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A whole request head must arrive within this long — on a new connection, between two
    /// requests of a kept-alive one, or sent slowly; otherwise the connection is closed.
    pub header: Duration,
    /// A request body must arrive within this long of its head (408 otherwise).
    pub body: Duration,
    /// After the shutdown signal, requests in flight get this long to finish.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            shutdown: Duration::from_secs(30),
        }
    }
}

/// Set once the shutdown deadline has passed: running streams end with an error chunk.
#[derive(Clone)]
pub struct ShutdownDeadline(watch::Receiver<bool>);

impl ShutdownDeadline {
    /// Resolves when the deadline passes (never, while the server runs normally).
    pub async fn passed(&mut self) {
        // An error means the sender is gone: the server is past shutting down.
        let _ = self.0.wait_for(|&passed| passed).await;
    }
}

/// A deadline that has not passed, and its trigger.
pub fn deadline() -> (watch::Sender<bool>, ShutdownDeadline) {
    let (tx, rx) = watch::channel(false);
    (tx, ShutdownDeadline(rx))
}

/// Serves `app` on `listener` until `signal` resolves, then shuts down within `t.shutdown`
/// (`deadline` is set when it passes).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    t: Timeouts,
    signal: impl Future<Output = ()>,
    deadline: watch::Sender<bool>,
) {
    let (close_tx, close_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, app.clone(), t.header, close_rx.clone()));
                }
                // Out of descriptors (or a connection reset before it was taken): the
                // connections that time out free them; try again shortly rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    drop(app);
    let _ = close_tx.send(true);
    if drain(&mut conns, t.shutdown).await {
        return;
    }
    // The deadline: streams send their final error chunk, then the rest is dropped.
    let _ = deadline.send(true);
    if !drain(&mut conns, Duration::from_secs(1)).await {
        crate::status::note(&format!(
            "fastrm serve: shutdown deadline passed; dropping {} connections",
            conns.len()
        ));
        conns.abort_all();
    }
}

/// Waits up to `limit` for every connection to end; whether they all did.
async fn drain(conns: &mut tokio::task::JoinSet<()>, limit: Duration) -> bool {
    let all = async { while conns.join_next().await.is_some() {} };
    tokio::time::timeout(limit, all).await.is_ok()
}

async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    header_timeout: Duration,
    mut close: watch::Receiver<bool>,
) {
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close.wait_for(|&c| c) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}
