//! The node's HTTP front: accepts connections (at most `max_connections` at once, over every
//! front thread), serves each request through [`routes`](super::routes) inside a span with its
//! latency recorded, and drains on shutdown: the listener stays open, new work is answered 503
//! `draining`, and the front closes once the work already running has finished.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::manager::Manager;
use super::routes;
use crate::api::{ApiError, ErrorCode};
use crate::http::{self, Body};

/// How long the work running at shutdown may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connections may take to close once the work is done.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What every front thread shares.
pub struct Shared {
    pub mgr: Arc<Manager>,
    /// One permit per open connection, node-wide.
    connections: Arc<Semaphore>,
    /// Requests (and the commands they started) in flight; shutdown waits for them.
    work: TaskTracker,
}

impl Shared {
    pub fn new(mgr: Arc<Manager>, max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            mgr,
            connections: Arc::new(Semaphore::new(max_connections.max(1))),
            work: TaskTracker::new(),
        })
    }
}

/// One front thread's loop: accepts connections until `stop` is cancelled, then drains (see the
/// module's comment). `thread` names the thread in the metrics.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: usize,
) {
    let front = Front {
        accepted: shared
            .mgr
            .metrics
            .http_connections_total
            .with_label_values(&[thread.to_string().as_str()]),
        mgr: shared.mgr.clone(),
        connections: shared.connections.clone(),
        work: shared.work.clone(),
        closing: CancellationToken::new(),
        open: TaskTracker::new(),
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => front.accepted(accepted).await,
            () = stop.cancelled() => break,
        }
    }
    front.mgr.begin_drain();
    front.work.close();
    let drained = tokio::time::sleep(DRAIN_TIMEOUT);
    tokio::pin!(drained);
    loop {
        tokio::select! {
            accepted = listener.accept() => front.accepted(accepted).await,
            () = front.work.wait() => break,
            () = &mut drained => {
                tracing::warn!(running = front.work.len(), "work still running after 30 s; stopping anyway");
                break;
            }
        }
    }
    drop(listener);
    front.closing.cancel();
    front.open.close();
    tokio::select! {
        () = front.open.wait() => {}
        () = tokio::time::sleep(CLOSE_TIMEOUT) => tracing::warn!("connections still open after the drain; closing them"),
    }
}

struct Front {
    /// This thread's count of accepted connections.
    accepted: prometheus::IntCounter,
    mgr: Arc<Manager>,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    /// Requests (and the commands they started) in flight; shutdown waits for them.
    work: TaskTracker,
    /// Cancelled when the open connections are to close (each after its request in flight).
    closing: CancellationToken,
    /// The open connections (upgraded ones, such as terminals, are no longer among them).
    open: TaskTracker,
}

impl Front {
    async fn accepted(&self, accepted: std::io::Result<(TcpStream, std::net::SocketAddr)>) {
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
        };
        self.accepted.inc();
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            // Full: a clear answer on this connection, then it closes.
            let busy = service_fn(|_req: Request<Incoming>| async {
                Ok::<_, std::convert::Infallible>(too_many_connections())
            });
            let conn = http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, busy);
            tokio::spawn(conn);
            return;
        };
        let mgr = self.mgr.clone();
        let work = self.work.clone();
        let service = service_fn(move |req| {
            let mgr = mgr.clone();
            let token = work.token();
            async move { Ok::<_, std::convert::Infallible>(handle(mgr, req, token).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, service)
            // The PTY's WebSocket takes its connection over.
            .with_upgrades();
        let closing = self.closing.clone();
        self.open.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = closing.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
}

fn too_many_connections() -> Response<Body> {
    let mut response = http::error(ApiError::new(
        ErrorCode::Overloaded,
        "the node has too many open connections; retry, or reuse a kept-alive connection",
    ));
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn handle(
    mgr: Arc<Manager>,
    req: Request<Incoming>,
    work: tokio_util::task::task_tracker::TaskTrackerToken,
) -> Response<Body> {
    let started = Instant::now();
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path());
    let (route, response) = routes::route(&mgr, req, work)
        .instrument(span.clone())
        .await;
    let status = response.status();
    mgr.metrics
        .http_seconds
        .with_label_values(&[route, status.as_str()])
        .observe(started.elapsed().as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "done"
        )
    });
    response
}
