//! `GET /v1/sandboxes/{id}/pty`: the interactive terminal (see [`crate::api::pty`]).
//!
//! The daemon checks the upgrade request, asks the sandbox's agent for a terminal with the same
//! WebSocket key, hands the agent's `101` to the client and then splices the two upgraded
//! connections byte for byte: the WebSocket protocol is spoken by the client and the agent
//! only. The trajectory records the terminal's opening.

use std::sync::Arc;
use std::time::Instant;

use hyper::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::ReqBody;
use crate::api::ApiError;
use crate::api::pty::{PtySize, websocket_key};
use crate::http::{self, Body};
use crate::node::agent_client::passthrough;
use crate::node::pause::InUse;
use crate::node::sandbox::Sandbox;
use crate::node::trajectory::Step;
use crate::util::now_ms;

pub async fn open(
    sb: Arc<Sandbox>,
    mut req: Request<ReqBody>,
    in_use: InUse,
) -> Result<Response<Body>, ApiError> {
    let key = websocket_key(req.headers())
        .map_err(ApiError::bad_request)?
        .to_string();
    let size = PtySize::from_query(req.uri().query()).map_err(ApiError::bad_request)?;
    sb.touch();
    let started = (now_ms(), Instant::now());
    let agent_req = Request::builder()
        .method(Method::GET)
        .uri(format!("/pty?{}", size.query()))
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_VERSION, "13")
        .header(SEC_WEBSOCKET_KEY, key)
        .body(http::empty())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut agent_resp = sb.agent.upgrade(agent_req).await?;
    sb.trajectory.record(Step {
        action: "pty_open".into(),
        at_ms: started.0,
        status: agent_resp.status().as_u16(),
        duration_ms: started.1.elapsed().as_secs_f64() * 1000.0,
        input: Some(size.query()),
        ..Step::default()
    });
    if agent_resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(passthrough(agent_resp));
    }
    let agent_side = hyper::upgrade::on(&mut agent_resp);
    let client_side = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        // An open terminal keeps the sandbox from being auto-paused under its user.
        let _in_use = in_use;
        let (Ok(agent), Ok(client)) = tokio::join!(agent_side, client_side) else {
            // Either side failed to switch: dropping the other ends the terminal.
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(agent))
            .await;
    });
    let mut response = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in agent_resp.headers() {
        response = response.header(name, value);
    }
    response
        .body(http::empty())
        .map_err(|e| ApiError::internal(e.to_string()))
}
