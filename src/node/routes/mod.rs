//! The node's HTTP API, one module per resource.
//!
//! [`route`] reads a request top to bottom: the path names a resource (unknown: 404), the method
//! must be one the resource declares (else 405 with `Allow`), `/v1` requests are authenticated,
//! and while the node drains, new work is refused with a retryable 503 `draining`.

mod body;
mod exec;
mod files;
mod health;
mod pools;
mod pty;
mod sandboxes;
mod sessions;
mod snapshots;
mod trajectory;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::auth::Owner;
use super::manager::Manager;
use super::pause::InUse;
use super::sandbox::Sandbox;
use crate::api::files::MAX_BATCH_BYTES;
use crate::api::sessions::MAX_CODE_BYTES;
use crate::api::{ApiError, ErrorCode};
use crate::http::{self, Body, MAX_JSON_BODY};
pub use body::ReqBody;

/// What a request is about, decoded from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Pools,
    Pool(&'a str),
    Sandboxes,
    Sandbox(&'a str),
    Exec(&'a str),
    Files(&'a str),
    Reset(&'a str),
    Pause(&'a str),
    Resume(&'a str),
    Sessions(&'a str),
    Session(&'a str, &'a str),
    SessionRun(&'a str, &'a str),
    Trajectory(&'a str),
    Pty(&'a str),
    SandboxSnapshots(&'a str),
    SandboxFork(&'a str),
    Snapshots,
    Snapshot(&'a str),
    SnapshotFork(&'a str),
}

impl<'a> Route<'a> {
    /// The resource a path names, if any.
    pub fn parse(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match segments.as_slice() {
            ["healthz"] => Self::Healthz,
            ["readyz"] => Self::Readyz,
            ["metrics"] => Self::Metrics,
            ["v1", "pools"] => Self::Pools,
            ["v1", "pools", name] => Self::Pool(name),
            ["v1", "sandboxes"] => Self::Sandboxes,
            ["v1", "sandboxes", id] => Self::Sandbox(id),
            ["v1", "sandboxes", id, "exec"] => Self::Exec(id),
            ["v1", "sandboxes", id, "files"] => Self::Files(id),
            ["v1", "sandboxes", id, "reset"] => Self::Reset(id),
            ["v1", "sandboxes", id, "pause"] => Self::Pause(id),
            ["v1", "sandboxes", id, "resume"] => Self::Resume(id),
            ["v1", "sandboxes", id, "sessions"] => Self::Sessions(id),
            ["v1", "sandboxes", id, "sessions", sid] => Self::Session(id, sid),
            ["v1", "sandboxes", id, "sessions", sid, "run"] => Self::SessionRun(id, sid),
            ["v1", "sandboxes", id, "trajectory"] => Self::Trajectory(id),
            ["v1", "sandboxes", id, "pty"] => Self::Pty(id),
            ["v1", "sandboxes", id, "snapshots"] => Self::SandboxSnapshots(id),
            ["v1", "sandboxes", id, "fork"] => Self::SandboxFork(id),
            ["v1", "snapshots"] => Self::Snapshots,
            ["v1", "snapshots", id] => Self::Snapshot(id),
            ["v1", "snapshots", id, "fork"] => Self::SnapshotFork(id),
            _ => return None,
        })
    }

    /// The path template: the `route` label of the request metrics (never an id or a name).
    pub fn template(&self) -> &'static str {
        match self {
            Self::Healthz => "/healthz",
            Self::Readyz => "/readyz",
            Self::Metrics => "/metrics",
            Self::Pools => "/v1/pools",
            Self::Pool(_) => "/v1/pools/{name}",
            Self::Sandboxes => "/v1/sandboxes",
            Self::Sandbox(_) => "/v1/sandboxes/{id}",
            Self::Exec(_) => "/v1/sandboxes/{id}/exec",
            Self::Files(_) => "/v1/sandboxes/{id}/files",
            Self::Reset(_) => "/v1/sandboxes/{id}/reset",
            Self::Pause(_) => "/v1/sandboxes/{id}/pause",
            Self::Resume(_) => "/v1/sandboxes/{id}/resume",
            Self::Sessions(_) => "/v1/sandboxes/{id}/sessions",
            Self::Session(..) => "/v1/sandboxes/{id}/sessions/{sid}",
            Self::SessionRun(..) => "/v1/sandboxes/{id}/sessions/{sid}/run",
            Self::Trajectory(_) => "/v1/sandboxes/{id}/trajectory",
            Self::Pty(_) => "/v1/sandboxes/{id}/pty",
            Self::SandboxSnapshots(_) => "/v1/sandboxes/{id}/snapshots",
            Self::SandboxFork(_) => "/v1/sandboxes/{id}/fork",
            Self::Snapshots => "/v1/snapshots",
            Self::Snapshot(_) => "/v1/snapshots/{id}",
            Self::SnapshotFork(_) => "/v1/snapshots/{id}/fork",
        }
    }

    /// The methods the resource declares (also in `docs/openapi.yaml`).
    pub fn methods(&self) -> &'static [Method] {
        match self {
            Self::Healthz
            | Self::Readyz
            | Self::Metrics
            | Self::Pools
            | Self::Trajectory(_)
            | Self::Snapshots
            | Self::Pty(_) => &[Method::GET],
            Self::Snapshot(_) => &[Method::GET, Method::DELETE],
            Self::SandboxSnapshots(_) | Self::SandboxFork(_) | Self::SnapshotFork(_) => {
                &[Method::POST]
            }
            Self::Pool(_) => &[Method::GET, Method::PUT, Method::DELETE],
            Self::Sandboxes | Self::Sessions(_) => &[Method::GET, Method::POST],
            Self::Sandbox(_) | Self::Session(..) => &[Method::GET, Method::DELETE],
            Self::Exec(_)
            | Self::Reset(_)
            | Self::Pause(_)
            | Self::Resume(_)
            | Self::SessionRun(..) => &[Method::POST],
            Self::Files(_) => &[Method::GET, Method::PUT, Method::POST, Method::DELETE],
        }
    }

    /// Whether this request starts new work, which a draining node refuses. Reads, releases
    /// and pool deletions stay open so that clients can wind down.
    fn is_new_work(&self, method: &Method) -> bool {
        !matches!(
            (self, method),
            (_, &Method::GET | &Method::HEAD | &Method::DELETE)
        )
    }
}

/// The route's metrics label and the response.
pub type Routed = (&'static str, Response<Body>);

/// Serves one request. `work` is held while new work runs, so a draining node can wait for it.
///
/// Every answer leaves a kept-alive connection usable: the body is read before the route runs
/// (or drained, when the head alone decides the answer), else the answer says
/// `Connection: close` (see [`body`]).
pub async fn route(mgr: &Arc<Manager>, req: Request<Incoming>, work: TaskTrackerToken) -> Routed {
    let (parts, incoming) = req.into_parts();
    let path = parts.uri.path().to_string();
    let method = parts.method.clone();
    let Some(route) = Route::parse(&path) else {
        let err = ApiError::not_found(format!("no route {method} {path}"));
        let response = body::early(incoming, &parts.headers, http::error(err)).await;
        return ("other", response);
    };
    let label = route.template();
    if !route.methods().contains(&method) {
        let response = method_not_allowed(&route, &method);
        return (label, body::early(incoming, &parts.headers, response).await);
    }
    let owner = match admit(mgr, &route, &method, &parts.headers) {
        Ok(owner) => owner,
        Err(e) => {
            let response = body::early(incoming, &parts.headers, http::error(e)).await;
            return (label, response);
        }
    };
    // A file upload streams; its answer closes the connection unless it was read to its end.
    let (body, streamed) = match body_limit(&route, &method) {
        None => {
            let streamed = body::Streamed::new(incoming);
            let ended = streamed.ended();
            (Either::Right(streamed), Some(ended))
        }
        Some(limit) => match body::read(incoming, limit).await {
            Ok(full) => (Either::Left(full), None),
            Err(e) => return (label, body::closing(http::error(e))),
        },
    };
    let req = Request::from_parts(parts, body);
    let result = match (route, owner) {
        (Route::Healthz, _) => Ok(health::healthz()),
        (Route::Readyz, _) => Ok(health::readyz(mgr)),
        (Route::Metrics, _) => Ok(health::metrics(mgr)),
        (v1, Some(owner)) => self::v1(mgr, owner, v1, req, work).await,
        (_, None) => Err(ApiError::internal("a /v1 route was not authenticated")),
    };
    let response = result.unwrap_or_else(http::error);
    match streamed {
        Some(ended) if !ended.load(std::sync::atomic::Ordering::Acquire) => {
            tracing::debug!(
                status = response.status().as_u16(),
                "answered before the upload's end; the connection closes"
            );
            (label, body::closing(response))
        }
        _ => (label, response),
    }
}

/// Whether the head lets the request in: a `/v1` request must be authenticated (its owner is
/// returned), and new work is refused while the node drains. Health routes are open (`None`).
fn admit(
    mgr: &Manager,
    route: &Route<'_>,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Option<Owner>, ApiError> {
    if matches!(route, Route::Healthz | Route::Readyz | Route::Metrics) {
        return Ok(None);
    }
    let owner = authenticate(mgr, headers)?;
    if route.is_new_work(method) && mgr.is_draining() {
        return Err(ApiError::new(
            ErrorCode::Draining,
            "the node is shutting down and takes no new work; retry on another node",
        ));
    }
    Ok(Some(owner))
}

/// The most a route reads of a request's body before it runs; `None`: the body streams through
/// (a file upload).
fn body_limit(route: &Route<'_>, method: &Method) -> Option<usize> {
    Some(match (route, method) {
        (Route::Files(_), &Method::PUT) => return None,
        (Route::Files(_), &Method::POST) => MAX_BATCH_BYTES,
        (Route::Exec(_), _) => exec::MAX_EXEC_BODY,
        (Route::SessionRun(..), _) => MAX_CODE_BYTES + MAX_JSON_BODY,
        _ => MAX_JSON_BODY,
    })
}

fn authenticate(mgr: &Manager, headers: &HeaderMap) -> Result<Owner, ApiError> {
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    mgr.auth.check(header)
}

fn method_not_allowed(route: &Route<'_>, method: &Method) -> Response<Body> {
    let allowed: Vec<&str> = route.methods().iter().map(Method::as_str).collect();
    let allow = allowed.join(", ");
    let mut response = http::error(ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} does not take {method}; it takes {allow}",
            route.template()
        ),
    ));
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

async fn v1(
    mgr: &Arc<Manager>,
    owner: Owner,
    route: Route<'_>,
    req: Request<ReqBody>,
    work: TaskTrackerToken,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Pools => Ok(pools::list(mgr)),
        Route::Pool(name) => pools::handle(mgr, name, req).await,
        Route::Sandboxes if req.method() == Method::POST => {
            sandboxes::acquire(mgr, owner, req).await
        }
        Route::Sandboxes => Ok(sandboxes::list(mgr, &owner)),
        // Before the lookup: releasing a sandbox that already died is not an error.
        Route::Sandbox(id) if req.method() == Method::DELETE => sandboxes::release(mgr, id, &owner),
        Route::Sandbox(id) => lookup(mgr, id, &owner).map(|sb| sandboxes::info(&sb)),
        Route::Exec(id) => {
            let (sb, in_use) = usable(mgr, id, &owner).await?;
            let result = exec::exec(mgr, sb.clone(), owner, req, (work, in_use)).await;
            explain_death(&sb, result).await
        }
        Route::Files(id) => {
            // An upload to a sandbox that cannot take it is drained before the answer.
            let (sb, _in_use) = match usable(mgr, id, &owner).await {
                Ok(found) => found,
                Err(e) => return Ok(body::early_routed(req, http::error(e)).await),
            };
            explain_death(&sb.clone(), files::files(sb, req).await).await
        }
        Route::Reset(id) => {
            let (sb, _in_use) = usable(mgr, id, &owner).await?;
            explain_death(&sb.clone(), sandboxes::reset(mgr, sb).await).await
        }
        Route::Sessions(id) => {
            let (sb, _in_use) = usable(mgr, id, &owner).await?;
            explain_death(&sb.clone(), sessions::collection(sb, req).await).await
        }
        Route::Session(id, sid) => {
            let (sb, _in_use) = usable(mgr, id, &owner).await?;
            explain_death(&sb.clone(), sessions::one(sb, sid, req).await).await
        }
        Route::SessionRun(id, sid) => {
            let (sb, in_use) = usable(mgr, id, &owner).await?;
            let result = sessions::run(mgr, sb.clone(), sid, req, (work, in_use)).await;
            explain_death(&sb, result).await
        }
        Route::Trajectory(id) => lookup(mgr, id, &owner).map(|sb| trajectory::export(&sb)),
        Route::Pty(id) => {
            let (sb, in_use) = usable(mgr, id, &owner).await?;
            explain_death(&sb.clone(), pty::open(sb, req, in_use).await).await
        }
        Route::SandboxSnapshots(id) => snapshots::take(mgr, lookup(mgr, id, &owner)?, owner).await,
        Route::SandboxFork(id) => {
            snapshots::fork_sandbox(mgr, lookup(mgr, id, &owner)?, owner, req).await
        }
        Route::Snapshots => snapshots::list(mgr, &owner),
        Route::Snapshot(id) if req.method() == Method::DELETE => snapshots::delete(mgr, id, &owner),
        Route::Snapshot(id) => snapshots::info(mgr, id, &owner),
        Route::SnapshotFork(id) => snapshots::fork_snapshot(mgr, id, owner, req).await,
        Route::Pause(id) => sandboxes::set_paused(mgr, lookup(mgr, id, &owner)?, true).await,
        Route::Resume(id) => sandboxes::set_paused(mgr, lookup(mgr, id, &owner)?, false).await,
        Route::Healthz | Route::Readyz | Route::Metrics => {
            Err(ApiError::internal("health routes are not under /v1"))
        }
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

fn lookup(mgr: &Manager, id: &str, owner: &Owner) -> Result<Arc<Sandbox>, ApiError> {
    mgr.sandbox(id, owner)
}

/// A sandbox whose agent may be called, counted in use until the guard drops: a paused one
/// is resumed first.
pub(super) async fn usable(
    mgr: &Manager,
    id: &str,
    owner: &Owner,
) -> Result<(Arc<Sandbox>, InUse), ApiError> {
    let sb = lookup(mgr, id, owner)?;
    let in_use = mgr.enter(&sb).await?;
    Ok((sb, in_use))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources_and_templates_hide_ids() {
        assert_eq!(
            Route::parse("/v1/sandboxes/abc/exec"),
            Some(Route::Exec("abc"))
        );
        assert_eq!(Route::parse("/v1/pools/"), Some(Route::Pools));
        assert_eq!(Route::parse("/v1/sandboxes/a/b/c"), None);
        assert_eq!(Route::parse("/nope"), None);
        assert_eq!(
            Route::Exec("abc").template(),
            "/v1/sandboxes/{id}/exec",
            "no id in a metric label"
        );
    }

    #[test]
    fn every_resource_declares_its_methods() {
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/pools",
            "/v1/pools/p",
            "/v1/sandboxes",
            "/v1/sandboxes/s",
            "/v1/sandboxes/s/exec",
            "/v1/sandboxes/s/files",
            "/v1/sandboxes/s/reset",
            "/v1/sandboxes/s/pause",
            "/v1/sandboxes/s/resume",
            "/v1/sandboxes/s/sessions",
            "/v1/sandboxes/s/sessions/shell-1",
            "/v1/sandboxes/s/sessions/shell-1/run",
            "/v1/sandboxes/s/trajectory",
            "/v1/sandboxes/s/pty",
            "/v1/sandboxes/s/snapshots",
            "/v1/sandboxes/s/fork",
            "/v1/snapshots",
            "/v1/snapshots/x",
            "/v1/snapshots/x/fork",
        ] {
            let route = Route::parse(path).expect(path);
            assert!(!route.methods().is_empty(), "{path}");
        }
        assert!(!Route::Exec("s").methods().contains(&Method::GET));
        let response = method_not_allowed(&Route::Sandbox("s"), &Method::PUT);
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()[ALLOW], "GET, DELETE");
    }

    #[test]
    fn draining_refuses_new_work_only() {
        assert!(Route::Exec("s").is_new_work(&Method::POST));
        assert!(Route::Sandboxes.is_new_work(&Method::POST));
        assert!(Route::Pool("p").is_new_work(&Method::PUT));
        assert!(!Route::Sandbox("s").is_new_work(&Method::DELETE));
        assert!(!Route::Sandboxes.is_new_work(&Method::GET));
        assert!(!Route::Pool("p").is_new_work(&Method::DELETE));
    }
}
