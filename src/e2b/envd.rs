//! A sandbox's side of the front: envd on port 49983 (its Connect services, `/files`,
//! `/health`) and the code interpreter's port 49999 (refused until persistent Python
//! sessions exist). Requests must carry the sandbox's envd access token, as with envd.

use std::sync::Arc;

use hyper::body::Incoming;
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
    req: Request<Incoming>,
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
    let path = req.uri().path().to_string();
    let open = port == ENVD_PORT && path == "/health";
    if !open && token != Some(addressed.e2b.access_token.as_str()) {
        let err = RpcError::new(Code::Unauthenticated, "invalid or missing access token");
        return ("/e2b/envd:unauthenticated", err.response());
    }
    if port == CODE_INTERPRETER_PORT {
        let body = serde_json::json!({
            "code": 501,
            "message": format!("{path} is not supported by this ARL node: persistent Python sessions (the code interpreter) do not exist yet"),
        });
        return (
            "/e2b/code-interpreter",
            http::json(StatusCode::NOT_IMPLEMENTED, &body),
        );
    }
    if port != ENVD_PORT {
        let err = RpcError::unimplemented(format!(
            "port {port} (only envd, {ENVD_PORT}, is served; forwarding other ports)"
        ));
        return ("/e2b/port", err.response());
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
