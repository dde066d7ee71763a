//! The operator's own endpoint, for the kubelet's probes and Prometheus: `/healthz` (the pass
//! loop is turning), `/readyz` (the watches are synced) and `/metrics` (leadership, passes,
//! writes). It never touches the API server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tracing::warn;

use crate::http::{self, Body};
use crate::util::now_ms;

/// The pass loop wakes at least once per resync; missing this many in a row means it is stuck.
const STUCK_AFTER_RESYNCS: u64 = 3;

/// What the probes and the metrics read, written by the pass loop and the election.
pub struct Health {
    registry: Registry,
    /// Milliseconds since the epoch of the pass loop's last turn.
    last_turn_ms: AtomicU64,
    stuck_after_ms: u64,
    watches_ready: AtomicBool,
    pub leader: IntGauge,
    pub passes: IntCounter,
    pub writes: IntCounterVec,
    pub pass_seconds: Histogram,
}

impl Health {
    pub fn new(resync: Duration) -> Arc<Self> {
        let registry = Registry::new();
        let health = Self {
            last_turn_ms: AtomicU64::new(now_ms()),
            stuck_after_ms: u64::try_from(resync.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_mul(STUCK_AFTER_RESYNCS),
            watches_ready: AtomicBool::new(false),
            leader: IntGauge::new(
                "arl_operator_leader",
                "1 while this replica holds the Lease and plans.",
            )
            .expect("static gauge definition"),
            passes: IntCounter::new(
                "arl_operator_passes_total",
                "Planning passes run while leading.",
            )
            .expect("static counter definition"),
            writes: IntCounterVec::new(
                Opts::new(
                    "arl_operator_writes_total",
                    "API writes made by passes, by result (ok, failed).",
                ),
                &["result"],
            )
            .expect("static counter definition"),
            pass_seconds: Histogram::with_opts(
                HistogramOpts::new("arl_operator_pass_seconds", "Time of one planning pass.")
                    .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
            )
            .expect("static histogram definition"),
            registry,
        };
        for collector in [
            Box::new(health.leader.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(health.passes.clone()),
            Box::new(health.writes.clone()),
            Box::new(health.pass_seconds.clone()),
        ] {
            health
                .registry
                .register(collector)
                .expect("distinct metric names");
        }
        Arc::new(health)
    }

    /// The pass loop turned (an event, a resync or a retry).
    pub fn turned(&self) {
        self.last_turn_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_watches_ready(&self) {
        self.watches_ready.store(true, Ordering::Relaxed);
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Answers one probe or scrape.
    pub fn answer(&self, method: &Method, path: &str, now_ms: u64) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            let mut reply = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            reply
                .headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
            return reply;
        }
        match path {
            "/healthz" => {
                let idle = now_ms.saturating_sub(self.last_turn_ms.load(Ordering::Relaxed));
                if idle > self.stuck_after_ms {
                    plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the pass loop has not turned for {idle} ms\n"),
                    )
                } else {
                    plain(StatusCode::OK, "ok\n")
                }
            }
            "/readyz" if self.watches_ready.load(Ordering::Relaxed) => {
                plain(StatusCode::OK, "ready\n")
            }
            "/readyz" => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the watches have not synced yet\n",
            ),
            "/metrics" => {
                let mut reply = Response::new(http::full(self.render()));
                reply.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                reply
            }
            _ => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut reply = Response::new(http::full(text.into()));
    *reply.status_mut() = status;
    reply
}

/// Binds the health endpoint (before the watches start, so probes see the process at once).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves probes and scrapes until the process ends. Requests carry no body worth reading;
/// each connection gets a header timeout so a silent client cannot hold it.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "health endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reply = health.answer(req.method(), req.uri().path(), now_ms());
                async move { Ok::<_, Infallible>(reply) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn text(reply: Response<Body>) -> (StatusCode, String) {
        let status = reply.status();
        let bytes = reply
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn probes_follow_the_watches_and_the_pass_loop() {
        let health = Health::new(Duration::from_secs(60));
        let now = now_ms();
        let (status, body) = text(health.answer(&Method::GET, "/readyz", now)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        health.set_watches_ready();
        assert_eq!(
            text(health.answer(&Method::GET, "/readyz", now)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            text(health.answer(&Method::GET, "/healthz", now)).await.0,
            StatusCode::OK
        );
        // Three resyncs without a turn: the loop is stuck and the kubelet should restart us.
        let later = now + 181_000;
        let (status, body) = text(health.answer(&Method::GET, "/healthz", later)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("has not turned"), "{body}");
        health.turned();
        assert_eq!(
            text(health.answer(&Method::GET, "/healthz", now_ms()))
                .await
                .0,
            StatusCode::OK
        );
        let reply = health.answer(&Method::POST, "/healthz", now);
        assert_eq!(reply.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            reply.headers().get(ALLOW).and_then(|v| v.to_str().ok()),
            Some("GET, HEAD")
        );
        assert_eq!(
            text(health.answer(&Method::GET, "/nope", now)).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn metrics_are_served_over_real_http() {
        let health = Health::new(Duration::from_secs(60));
        health.leader.set(1);
        health.passes.inc();
        health.writes.with_label_values(&["ok"]).inc_by(3);
        let listener = bind(([127, 0, 0, 1], 0).into()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, health));
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/metrics")
            .header("host", "operator")
            .body(http::empty())
            .expect("request");
        let reply = sender.send_request(req).await.expect("send");
        assert_eq!(reply.status(), StatusCode::OK);
        let body = reply.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("arl_operator_leader 1"), "{body}");
        assert!(body.contains("arl_operator_passes_total 1"), "{body}");
        assert!(
            body.contains("arl_operator_writes_total{result=\"ok\"} 3"),
            "{body}"
        );
    }
}
