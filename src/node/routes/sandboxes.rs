//! `/v1/sandboxes`: acquire, list, read, release, and a held sandbox's reset, pause and resume.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode};

use super::ReqBody;
use crate::api::{AcquireRequest, ApiError, SandboxList};
use crate::http::{self, Body, MAX_JSON_BODY};
use crate::node::auth::Owner;
use crate::node::manager::Manager;
use crate::node::sandbox::Sandbox;

pub async fn acquire(
    mgr: &Arc<Manager>,
    owner: Owner,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    let acquire: AcquireRequest = http::read_json(req, MAX_JSON_BODY).await?;
    let sandboxes = mgr.acquire(owner, acquire).await?;
    Ok(http::json(StatusCode::CREATED, &SandboxList { sandboxes }))
}

pub fn list(mgr: &Manager, owner: &Owner) -> Response<Body> {
    let sandboxes = mgr.list(owner);
    http::json(StatusCode::OK, &SandboxList { sandboxes })
}

pub fn info(sb: &Sandbox) -> Response<Body> {
    http::json(StatusCode::OK, &sb.info())
}

pub fn release(mgr: &Arc<Manager>, id: &str, owner: &Owner) -> Result<Response<Body>, ApiError> {
    mgr.release(id, owner).map(|()| http::no_content())
}

pub async fn reset(mgr: &Arc<Manager>, sb: Arc<Sandbox>) -> Result<Response<Body>, ApiError> {
    mgr.reset_agent(&sb).await?;
    sb.execs.clear();
    sb.touch();
    Ok(info(&sb))
}

pub async fn set_paused(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    paused: bool,
) -> Result<Response<Body>, ApiError> {
    mgr.set_paused(&sb, paused).await?;
    Ok(info(&sb))
}
