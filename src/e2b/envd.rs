//! A sandbox's side of the front: envd on port 49983 (its Connect services, `/files`,
//! `/health`) and the code interpreter's port 49999 (`/execute` and contexts, on the agent's
//! persistent sessions). Requests must carry the sandbox's envd access token, as with envd
//! (the code interpreter's context calls excepted, as in E2B).

use std::sync::Arc;

use super::ReqBody;
use hyper::{Method, Request, Response, StatusCode};

use super::connect::{Code, RpcError};
use super::state::{self, E2bSandbox};
use super::{CODE_INTERPRETER_PORT, ENVD_PORT, Front};
use crate::http::{self, Body};
use crate::node::sandbox::Sandbox;

/// A sandbox addressed by a request, with the manager's view of it.
pub struct Addressed {
    pub e2b: Arc<E2bSandbox>,
    pub sandbox: Arc<Sandbox>,
}

/// What E2B's proxy answers for a sandbox that does not exist (the SDK reads "was not found"
/// as "not running").
fn not_found(e2b_id: &str) -> Response<Body> {
    http::json(
        StatusCode::BAD_GATEWAY,
        &serde_json::json!({
            "sandboxId": e2b_id,
            "message": "The sandbox was not found",
            "code": 502
        }),
    )
}

/// Serves one request for sandbox `e2b_id` on `port`.
pub async fn route(
    front: &Arc<Front>,
    e2b_id: &str,
    port: u16,
    req: Request<ReqBody>,
) -> (&'static str, Response<Body>) {
    let found = state::arl_id(e2b_id).and_then(|arl_id| {
        let e2b = front.registry.get(&arl_id)?;
        let sandbox = front.mgr.sandbox(&arl_id, &e2b.owner).ok()?;
        Some(Addressed { e2b, sandbox })
    });
    let Some(addressed) = found else {
        return ("/e2b/envd:unknown", not_found(e2b_id));
    };
    let token = req
        .headers()
        .get("x-access-token")
        .and_then(|v| v.to_str().ok());
    let token_ok = token == Some(addressed.e2b.access_token.as_str());
    let path = req.uri().path().to_string();
    // The code interpreter's context calls carry no token (see `interpreter`); a wrong one
    // is refused everywhere.
    let open = (port == ENVD_PORT && path == "/health")
        || (port == CODE_INTERPRETER_PORT && token.is_none());
    if !open && !token_ok {
        let err = RpcError::new(Code::Unauthenticated, "invalid or missing access token");
        return ("/e2b/envd:unauthenticated", err.response());
    }
    if port != ENVD_PORT && port != CODE_INTERPRETER_PORT {
        let err = RpcError::unimplemented(format!(
            "port {port} (only envd, {ENVD_PORT}, and the code interpreter, \
             {CODE_INTERPRETER_PORT}, are served; forwarding other ports is not)"
        ));
        return ("/e2b/port", err.response());
    }
    // Counted in use for the request (a streamed command holds its own guard): an
    // auto-paused sandbox is thawed first, and none is paused under a request.
    let _in_use = match front.mgr.enter(&addressed.sandbox).await {
        Ok(guard) => guard,
        Err(e) => return ("/e2b/envd:unavailable", RpcError::from(e).response()),
    };
    if port == CODE_INTERPRETER_PORT {
        return super::interpreter::route(front, &addressed, req, token_ok).await;
    }
    addressed.sandbox.touch();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => ("/e2b/envd/health", http::no_content()),
        (&Method::GET, "/files") => (
            "/e2b/envd/files:download",
            super::files::download(&addressed, req).await,
        ),
        (&Method::POST, "/files") => (
            "/e2b/envd/files:upload",
            super::files::upload(&addressed, req).await,
        ),
        (&Method::POST, rpc) if rpc.starts_with("/process.Process/") => {
            super::process::route(front, &addressed, req).await
        }
        (&Method::POST, rpc) if rpc.starts_with("/filesystem.Filesystem/") => {
            super::filesystem::route(&addressed, req).await
        }
        _ => (
            "/e2b/envd:unimplemented",
            RpcError::unimplemented(format!("{method} {path}")).response(),
        ),
    }
}
