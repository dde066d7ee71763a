//! Snapshots and forks: `POST /v1/sandboxes/{id}/snapshots` (take one),
//! `POST /v1/sandboxes/{id}/fork` (fork a live sandbox), `GET /v1/snapshots`,
//! `GET|DELETE /v1/snapshots/{id}` and `POST /v1/snapshots/{id}/fork`.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode};

use super::ReqBody;
use crate::api::{ApiError, ForkRequest, SandboxList, SnapshotList};
use crate::http::{self, Body, MAX_JSON_BODY};
use crate::node::auth::Owner;
use crate::node::manager::Manager;
use crate::node::sandbox::Sandbox;
use crate::node::snapshots::Pending;

/// A fork's options; an empty body forks one with the defaults.
async fn fork_request(req: Request<ReqBody>) -> Result<ForkRequest, ApiError> {
    let bytes = http::read_body(req.into_body(), MAX_JSON_BODY).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ForkRequest::default());
    }
    let fork: ForkRequest = http::parse_json(&bytes)?;
    fork.validate().map_err(ApiError::bad_request)?;
    Ok(fork)
}

pub async fn take(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    owner: Owner,
) -> Result<Response<Body>, ApiError> {
    let snap = mgr.take_snapshot(&sb, owner, false).await?;
    Ok(http::json(StatusCode::CREATED, &mgr.snapshot_info(&snap)))
}

/// Forks a live sandbox: a snapshot on the way (removed once its forks are gone), then forks.
pub async fn fork_sandbox(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    owner: Owner,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let fork = fork_request(req).await?;
    let started = std::time::Instant::now();
    let snap = mgr.take_snapshot(&sb, owner, true).await?;
    let taken = std::time::Instant::now();
    let held = Pending::take_over(&snap);
    let result = mgr.fork(owner, &snap, fork).await;
    drop(held);
    tracing::debug!(
        sandbox = %sb.id,
        snapshot_ms = (taken - started).as_secs_f64() * 1e3,
        fork_ms = taken.elapsed().as_secs_f64() * 1e3,
        "forked a live sandbox"
    );
    if result.is_err() {
        mgr.collect_snapshots();
    }
    Ok(http::json(
        StatusCode::CREATED,
        &SandboxList { sandboxes: result? },
    ))
}

pub async fn fork_snapshot(
    mgr: &Arc<Manager>,
    id: &str,
    owner: Owner,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let fork = fork_request(req).await?;
    let snap = mgr.snapshots()?.owned(id, &owner)?;
    let sandboxes = mgr.fork(owner, &snap, fork).await?;
    Ok(http::json(StatusCode::CREATED, &SandboxList { sandboxes }))
}

pub fn list(mgr: &Manager, owner: &Owner) -> Result<Response<Body>, ApiError> {
    let snapshots = mgr
        .snapshots()?
        .list(owner)
        .iter()
        .map(|s| mgr.snapshot_info(s))
        .collect();
    Ok(http::json(StatusCode::OK, &SnapshotList { snapshots }))
}

pub fn info(mgr: &Manager, id: &str, owner: &Owner) -> Result<Response<Body>, ApiError> {
    let snap = mgr.snapshots()?.owned(id, owner)?;
    Ok(http::json(StatusCode::OK, &mgr.snapshot_info(&snap)))
}

pub fn delete(mgr: &Manager, id: &str, owner: &Owner) -> Result<Response<Body>, ApiError> {
    mgr.delete_snapshot(id, owner).map(|()| http::no_content())
}
