//! The node's HTTP API: routing, authentication, proxying to agents, metrics per route.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::Instrument;

use super::agent_client::AGENT_TIMEOUT;
use super::auth::Owner;
use super::manager::Manager;
use super::sandbox::{CachedReply, Sandbox};
use crate::api::files::MAX_BATCH_BYTES;
use crate::api::{AcquireRequest, ApiError, ErrorCode, PoolList, PoolSpec, SandboxList};
use crate::http::{self, Body, MAX_JSON_BODY};

/// How long a streamed file upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long in-flight requests may run on after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    mgr: Arc<Manager>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mgr = mgr.clone();
        let service = service_fn(move |req| {
            let mgr = mgr.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(mgr, req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), service);
        tokio::spawn(graceful.watch(conn));
    }
    drop(listener);
    mgr.draining.store(true, Ordering::Relaxed);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("in-flight requests still running after 30 s; stopping anyway"),
    }
}

async fn handle(mgr: Arc<Manager>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", %method, %path);
    let (route, result) = route(&mgr, req).instrument(span.clone()).await;
    let response = result.unwrap_or_else(http::error);
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

type Routed = (&'static str, Result<Response<Body>, ApiError>);

async fn route(mgr: &Arc<Manager>, req: Request<Incoming>) -> Routed {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => (
            "/healthz",
            Ok(http::json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            )),
        ),
        (Method::GET, ["readyz"]) => ("/readyz", Ok(readyz(mgr))),
        (Method::GET, ["metrics"]) => ("/metrics", Ok(metrics(mgr))),
        (_, ["v1", rest @ ..]) => {
            let owner = match mgr.auth.check(
                req.headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
            ) {
                Ok(owner) => owner,
                Err(e) => return ("/v1/*", Err(e)),
            };
            v1(mgr, owner, method, rest, req).await
        }
        _ => (
            "other",
            Err(ApiError::not_found(format!("no route {method} {path}"))),
        ),
    }
}

async fn v1(
    mgr: &Arc<Manager>,
    owner: Owner,
    method: Method,
    rest: &[&str],
    req: Request<Incoming>,
) -> Routed {
    match (method, rest) {
        (Method::GET, ["pools"]) => (
            "/v1/pools",
            Ok(http::json(
                StatusCode::OK,
                &PoolList {
                    pools: mgr.pool_views(),
                },
            )),
        ),
        (Method::GET, ["pools", name]) => (
            "/v1/pools/{name}",
            mgr.pool_view(name).map(|v| http::json(StatusCode::OK, &v)),
        ),
        (Method::PUT, ["pools", name]) => ("/v1/pools/{name}", put_pool(mgr, name, req).await),
        (Method::DELETE, ["pools", name]) => (
            "/v1/pools/{name}",
            mgr.delete_pool(name).map(|()| http::no_content()),
        ),
        (Method::POST, ["sandboxes"]) => ("/v1/sandboxes", acquire(mgr, owner, req).await),
        (Method::GET, ["sandboxes"]) => (
            "/v1/sandboxes",
            Ok(http::json(
                StatusCode::OK,
                &SandboxList {
                    sandboxes: mgr.list(&owner),
                },
            )),
        ),
        // Before the lookup: releasing a sandbox that already died is not an error.
        (Method::DELETE, ["sandboxes", id]) => (
            "/v1/sandboxes/{id}",
            mgr.release(id, &owner).map(|()| http::no_content()),
        ),
        (method, ["sandboxes", id, tail @ ..]) => {
            let sb = match mgr.sandbox(id, &owner) {
                Ok(sb) => sb,
                Err(e) => return ("/v1/sandboxes/{id}", Err(e)),
            };
            let (route, result) = sandbox_route(mgr, sb.clone(), method, tail, req).await;
            (route, explain_death(&sb, result).await)
        }
        (method, _) => (
            "other",
            Err(ApiError::not_found(format!(
                "no route {method} /v1/{}",
                rest.join("/")
            ))),
        ),
    }
}

/// How long a request whose agent vanished waits for the death watch to learn why.
const DEATH_GRACE: Duration = Duration::from_millis(500);

/// A request caught in its sandbox's death says why the sandbox died ("the sandbox was
/// OOM-killed"), not how the connection to its agent broke.
async fn explain_death(
    sb: &Sandbox,
    result: Result<Response<Body>, ApiError>,
) -> Result<Response<Body>, ApiError> {
    match result {
        Err(e) if e.code == ErrorCode::SandboxUnavailable => match sb.death(DEATH_GRACE).await {
            Some(reason) => Err(ApiError::unavailable(format!(
                "sandbox {}: {reason}",
                sb.id
            ))),
            None => Err(e),
        },
        other => other,
    }
}

async fn sandbox_route(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    method: Method,
    tail: &[&str],
    req: Request<Incoming>,
) -> Routed {
    let touches_agent = !matches!(
        (&method, tail),
        (&Method::GET, []) | (&Method::POST, ["pause" | "resume"])
    );
    if touches_agent && sb.paused.load(Ordering::Relaxed) {
        return (
            "/v1/sandboxes/{id}",
            Err(ApiError::new(
                ErrorCode::Conflict,
                "the sandbox is paused; resume it first",
            )),
        );
    }
    match (method, tail) {
        (Method::GET, []) => (
            "/v1/sandboxes/{id}",
            Ok(http::json(StatusCode::OK, &sb.info())),
        ),
        (Method::POST, ["exec"]) => (
            "/v1/sandboxes/{id}/exec",
            super::exec::exec(mgr, sb, req).await,
        ),
        (Method::PUT | Method::GET | Method::DELETE | Method::POST, ["files"]) => {
            ("/v1/sandboxes/{id}/files", files(sb, req).await)
        }
        (Method::POST, ["reset"]) => ("/v1/sandboxes/{id}/reset", reset(mgr, sb).await),
        (Method::POST, ["pause"]) => (
            "/v1/sandboxes/{id}/pause",
            mgr.set_paused(&sb, true)
                .await
                .map(|()| http::json(StatusCode::OK, &sb.info())),
        ),
        (Method::POST, ["resume"]) => (
            "/v1/sandboxes/{id}/resume",
            mgr.set_paused(&sb, false)
                .await
                .map(|()| http::json(StatusCode::OK, &sb.info())),
        ),
        (method, _) => (
            "other",
            Err(ApiError::not_found(format!(
                "no route {method} /v1/sandboxes/{{id}}/{}",
                tail.join("/")
            ))),
        ),
    }
}

fn readyz(mgr: &Manager) -> Response<Body> {
    if mgr.draining.load(Ordering::Relaxed) {
        http::error(ApiError::new(
            ErrorCode::Draining,
            "the node is shutting down",
        ))
    } else {
        http::json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    }
}

fn metrics(mgr: &Manager) -> Response<Body> {
    mgr.update_gauges();
    Response::builder()
        .header(CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(http::full(mgr.metrics.render()))
        .unwrap_or_else(|_| http::error(ApiError::internal("metrics")))
}

async fn put_pool(
    mgr: &Arc<Manager>,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let spec: PoolSpec = http::read_json(req, MAX_JSON_BODY).await?;
    mgr.put_pool(name, spec)?;
    Ok(http::json(StatusCode::OK, &mgr.pool_view(name)?))
}

async fn acquire(
    mgr: &Arc<Manager>,
    owner: Owner,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let acquire: AcquireRequest = http::read_json(req, MAX_JSON_BODY).await?;
    let sandboxes = mgr.acquire(owner, acquire).await?;
    Ok(http::json(StatusCode::CREATED, &SandboxList { sandboxes }))
}

pub(super) fn agent_request(
    method: Method,
    uri: &str,
    body: Body,
) -> Result<Request<Body>, ApiError> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| ApiError::bad_request(format!("bad request line: {e}")))
}

pub(super) fn reply(reply: CachedReply) -> Response<Body> {
    Response::builder()
        .status(reply.status)
        .header(CONTENT_TYPE, "application/json")
        .body(http::full(reply.body))
        .unwrap_or_else(|_| http::error(ApiError::internal("response")))
}

/// Hands an agent's streaming response to the client as it comes.
pub(super) fn passthrough(response: Response<Incoming>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as http::BoxError).boxed(),
    )
}

async fn files(sb: Arc<Sandbox>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let uri = match req.uri().query() {
        Some(q) => format!("/files?{q}"),
        None => "/files".to_string(),
    };
    sb.touch();
    let method = req.method().clone();
    match method {
        Method::POST => {
            let body = http::read_body(req.into_body(), MAX_BATCH_BYTES).await?;
            let r = sb
                .agent
                .call(
                    agent_request(Method::POST, &uri, http::full(body))?,
                    1 << 20,
                )
                .await?;
            Ok(reply(CachedReply {
                status: r.status,
                body: r.body,
            }))
        }
        Method::PUT => {
            let length = req.headers().get(CONTENT_LENGTH).cloned();
            let body = req
                .into_body()
                .map_err(|e| Box::new(e) as http::BoxError)
                .boxed();
            let mut agent_req = agent_request(Method::PUT, &uri, body)?;
            if let Some(length) = length {
                agent_req.headers_mut().insert(CONTENT_LENGTH, length);
            }
            // Its answer comes after the whole upload: allow for a large, slow one.
            Ok(passthrough(
                sb.agent.stream(agent_req, UPLOAD_TIMEOUT).await?,
            ))
        }
        _ => Ok(passthrough(
            sb.agent
                .stream(agent_request(method, &uri, http::empty())?, AGENT_TIMEOUT)
                .await?,
        )),
    }
}

async fn reset(mgr: &Arc<Manager>, sb: Arc<Sandbox>) -> Result<Response<Body>, ApiError> {
    mgr.reset_agent(&sb).await?;
    sb.execs.clear();
    sb.touch();
    Ok(http::json(StatusCode::OK, &sb.info()))
}
