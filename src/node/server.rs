//! The node's HTTP API: routing, authentication, proxying to agents, metrics per route.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::Instrument;

use super::auth::Owner;
use super::manager::Manager;
use super::once::{self, Claim};
use super::sandbox::{CachedReply, Sandbox};
use crate::api::files::MAX_BATCH_BYTES;
use crate::api::{
    AcquireRequest, ApiError, ErrorCode, ExecOutcome, ExecRequest, NDJSON, OUTCOME_HEADER,
    PoolList, PoolSpec, SandboxList,
};
use crate::http::{self, Body, MAX_JSON_BODY};

/// Largest exec result kept for replay to a retry with the same request id.
const MAX_REPLAY_BYTES: usize = 256 << 10;
/// Largest exec request (it may carry stdin).
const MAX_EXEC_BODY: usize = 16 << 20;
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
        (method, ["sandboxes", id, tail @ ..]) => {
            let sb = match mgr.sandbox(id, &owner) {
                Ok(sb) => sb,
                Err(e) => return ("/v1/sandboxes/{id}", Err(e)),
            };
            sandbox_route(mgr, &owner, sb, method, tail, req).await
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

async fn sandbox_route(
    mgr: &Arc<Manager>,
    owner: &Owner,
    sb: Arc<Sandbox>,
    method: Method,
    tail: &[&str],
    req: Request<Incoming>,
) -> Routed {
    let touches_agent = !matches!(
        (&method, tail),
        (&Method::GET | &Method::DELETE, []) | (&Method::POST, ["pause" | "resume"])
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
        (Method::DELETE, []) => (
            "/v1/sandboxes/{id}",
            mgr.release(&sb.id, owner).map(|()| http::no_content()),
        ),
        (Method::POST, ["exec"]) => ("/v1/sandboxes/{id}/exec", exec(mgr, sb, req).await),
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

fn agent_request(method: Method, uri: &str, body: Body) -> Result<Request<Body>, ApiError> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| ApiError::bad_request(format!("bad request line: {e}")))
}

fn reply(reply: CachedReply) -> Response<Body> {
    Response::builder()
        .status(reply.status)
        .header(CONTENT_TYPE, "application/json")
        .body(http::full(reply.body))
        .unwrap_or_else(|_| http::error(ApiError::internal("response")))
}

/// Hands an agent's streaming response to the client as it comes.
fn passthrough(response: Response<Incoming>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as http::BoxError).boxed(),
    )
}

async fn exec(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let streaming = http::wants_ndjson(&req);
    let mut exec_req: ExecRequest = http::read_json(req, MAX_EXEC_BODY).await?;
    exec_req.argv().map_err(ApiError::bad_request)?;
    // Late binding: the pool's and the lease's env apply under the request's own.
    let mut env = mgr.env_for(&sb);
    env.extend(std::mem::take(&mut exec_req.env));
    exec_req.env = env;
    let request_id = exec_req.request_id.take();
    let limit = exec_req.max_output() * 12 + (1 << 20);
    let body = serde_json::to_vec(&exec_req).map_err(|e| ApiError::internal(e.to_string()))?;
    sb.touch();

    if streaming {
        let mut agent_req = agent_request(Method::POST, "/exec", http::full(body))?;
        agent_req
            .headers_mut()
            .insert(ACCEPT, hyper::header::HeaderValue::from_static(NDJSON));
        return Ok(passthrough(sb.agent.stream(agent_req).await?));
    }

    // A retry of a request id already seen gets the first result and runs nothing.
    let publish = match request_id.as_ref().map(|id| sb.execs.claim(id)) {
        Some(Claim::Done(cached)) => return Ok(reply(cached)),
        Some(Claim::Wait(rx)) => return once::wait(rx).await.map(reply),
        Some(Claim::Run(tx)) => Some(tx),
        None => None,
    };
    let started = Instant::now();
    // The agent call runs in a task of its own: a client that disconnects does not cancel the
    // command half-way, and its result still reaches a retry with the same request id.
    let run = {
        let mgr = mgr.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            let result = match agent_request(Method::POST, "/exec", http::full(body)) {
                Ok(r) => sb.agent.call_budgeted(r, limit, &mgr.reply_budget).await,
                Err(e) => Err(e),
            };
            let outcome = match &result {
                Ok((r, _)) => r
                    .headers
                    .get(OUTCOME_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(ExecOutcome::parse)
                    .unwrap_or(ExecOutcome::Error),
                Err(_) => ExecOutcome::Error,
            };
            let pool = sb.pool.as_str();
            mgr.metrics
                .execs_total
                .with_label_values(&[pool, outcome.as_str()])
                .inc();
            mgr.metrics
                .exec_seconds
                .with_label_values(&[pool])
                .observe(started.elapsed().as_secs_f64());
            sb.touch();
            match (result, publish, request_id) {
                (Ok((r, permit)), Some(tx), _) if r.status.is_success() => {
                    let cached = CachedReply {
                        status: r.status,
                        body: r.body,
                    };
                    let _ = tx.send(Some(replayable(&cached)));
                    Ok((cached, permit))
                }
                (Ok((r, permit)), _, id) => {
                    // Refused before anything ran (a bad cwd, say): a corrected retry runs.
                    if let Some(id) = id {
                        sb.execs.forget(&id);
                    }
                    Ok((
                        CachedReply {
                            status: r.status,
                            body: r.body,
                        },
                        permit,
                    ))
                }
                (Err(e), _, Some(id)) => {
                    // The agent never answered: let a retry run it.
                    sb.execs.forget(&id);
                    Err(e)
                }
                (Err(e), _, None) => Err(e),
            }
        })
    };
    let (cached, _permit) = join(run).await?;
    Ok(reply(cached))
}

/// What a retry gets: the reply itself, or a note that it was too large to keep.
fn replayable(cached: &CachedReply) -> CachedReply {
    if cached.body.len() <= MAX_REPLAY_BYTES {
        return cached.clone();
    }
    let err = ApiError::new(
        ErrorCode::Conflict,
        "this request id already ran; its result was too large to keep for a replay",
    );
    CachedReply {
        status: StatusCode::CONFLICT,
        body: Bytes::from(serde_json::to_vec(&err.into_body()).unwrap_or_default()),
    }
}

async fn join<T>(task: tokio::task::JoinHandle<Result<T, ApiError>>) -> Result<T, ApiError> {
    task.await
        .map_err(|e| ApiError::internal(format!("exec task failed: {e}")))?
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
            Ok(passthrough(sb.agent.stream(agent_req).await?))
        }
        _ => Ok(passthrough(
            sb.agent
                .stream(agent_request(method, &uri, http::empty())?)
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
