//! `/v1/sandboxes/{id}/sessions`: persistent shell and Python sessions, served by the
//! sandbox's agent (`src/agent/session*.rs`). The daemon checks requests, adds the lease's
//! environment to a new session, relays runs (JSON, or NDJSON chunk by chunk) and records each
//! action in the sandbox's trajectory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::ACCEPT;
use hyper::{Method, Request, Response};

use super::ReqBody;
use super::exec::Held;
use crate::api::sessions::{CreateSessionRequest, MAX_CODE_BYTES, RunRequest};
use crate::api::{ApiError, NDJSON};
use crate::http::{self, Body, ChannelBody, MAX_JSON_BODY};
use crate::node::agent_client::{AGENT_TIMEOUT, agent_request, passthrough, reply};
use crate::node::manager::Manager;
use crate::node::sandbox::{CachedReply, Sandbox};
use crate::node::trajectory::{Outcome, Step, preview};
use crate::util::now_ms;

/// Beyond a run's own timeout: the agent's interrupt and kill graces, and a margin.
const RUN_MARGIN: Duration = Duration::from_secs(10);
/// Longest NDJSON line the relay reads for the trajectory (a result with a MIME bundle).
const MAX_LINE: usize = 64 << 20;

/// A session id as the agent makes them (`shell-3`): anything else names no session.
pub fn valid_session_id(sid: &str) -> bool {
    !sid.is_empty()
        && sid.len() <= 64
        && sid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn no_session(sid: &str) -> ApiError {
    ApiError::not_found(format!("no session {sid:?} in this sandbox"))
}

/// `GET` (list) and `POST` (create) on `.../sessions`.
pub async fn collection(
    sb: Arc<Sandbox>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    sb.touch();
    if req.method() == Method::GET {
        return forward(&sb, Method::GET, "/sessions", http::empty()).await;
    }
    let started = (now_ms(), Instant::now());
    let mut create: CreateSessionRequest = http::read_json(req, MAX_JSON_BODY).await?;
    create.validate().map_err(ApiError::bad_request)?;
    // Late binding, as for exec: the pool's and the lease's env under the request's own.
    let mut env = sb.lease().map(|l| l.env).unwrap_or_default();
    env.extend(std::mem::take(&mut create.env));
    create.env = env;
    let body = serde_json::to_vec(&create).map_err(|e| ApiError::internal(e.to_string()))?;
    let request = agent_request(Method::POST, "/sessions", http::full(body))?;
    let result = sb.agent.call(request, 1 << 20).await;
    let mut step = Step {
        action: "session_open".into(),
        at_ms: started.0,
        status: match &result {
            Ok(r) => r.status.as_u16(),
            Err(e) => e.status(),
        },
        duration_ms: started.1.elapsed().as_secs_f64() * 1000.0,
        input: Some(create.kind.as_str().to_string()),
        ..Step::default()
    };
    if let Ok(r) = &result
        && r.status.is_success()
    {
        step.session = serde_json::from_slice::<crate::api::sessions::SessionInfo>(&r.body)
            .ok()
            .map(|info| info.id);
    }
    sb.trajectory.record(step);
    let r = result?;
    Ok(reply(CachedReply {
        status: r.status,
        body: r.body,
    }))
}

/// `GET` and `DELETE` on `.../sessions/{sid}`.
pub async fn one(
    sb: Arc<Sandbox>,
    sid: &str,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    if !valid_session_id(sid) {
        return Err(no_session(sid));
    }
    sb.touch();
    let path = format!("/sessions/{sid}");
    if req.method() == Method::GET {
        return forward(&sb, Method::GET, &path, http::empty()).await;
    }
    let started = (now_ms(), Instant::now());
    let response = forward(&sb, Method::DELETE, &path, http::empty()).await;
    let mut step = step("session_close", started, &response);
    step.session = Some(sid.to_string());
    sb.trajectory.record(step);
    response
}

/// `POST .../sessions/{sid}/run`.
pub async fn run(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    sid: &str,
    req: Request<ReqBody>,
    work: Held,
) -> Result<Response<Body>, ApiError> {
    if !valid_session_id(sid) {
        return Err(no_session(sid));
    }
    let streaming = http::wants_ndjson(&req);
    let run: RunRequest = http::read_json(req, MAX_CODE_BYTES + MAX_JSON_BODY).await?;
    run.validate().map_err(ApiError::bad_request)?;
    sb.touch();
    let started = (now_ms(), Instant::now());
    let deadline = Duration::from_millis(run.timeout_ms()) + RUN_MARGIN;
    // Both streams at their cap, JSON-escaped, and a result with a MIME bundle.
    let limit = run.max_output() * 12 + (64 << 20);
    let body = serde_json::to_vec(&run).map_err(|e| ApiError::internal(e.to_string()))?;
    let path = format!("/sessions/{sid}/run");
    let mut agent_req = agent_request(Method::POST, &path, http::full(body))?;
    let mut step = Step {
        action: "session_run".into(),
        at_ms: started.0,
        session: Some(sid.to_string()),
        input: Some(preview(&run.code)),
        ..Step::default()
    };
    if streaming {
        agent_req
            .headers_mut()
            .insert(ACCEPT, hyper::header::HeaderValue::from_static(NDJSON));
        let response = sb.agent.stream(agent_req, AGENT_TIMEOUT).await?;
        if !response.status().is_success() {
            step.status = response.status().as_u16();
            step.duration_ms = started.1.elapsed().as_secs_f64() * 1000.0;
            sb.trajectory.record(step);
            return Ok(passthrough(response));
        }
        let (parts, agent_body) = response.into_parts();
        let (tx, body) = ChannelBody::channel(16);
        tokio::spawn(relay(sb, agent_body, tx, step, work));
        return Ok(Response::from_parts(parts, body));
    }
    let (r, _permit) = sb
        .agent
        .call_budgeted(agent_req, limit, &mgr.reply_budget, deadline)
        .await?;
    step.status = r.status.as_u16();
    step.duration_ms = started.1.elapsed().as_secs_f64() * 1000.0;
    if r.status.is_success()
        && let Ok(outcome) = serde_json::from_slice::<Outcome<'_>>(&r.body)
    {
        outcome.fill(&mut step);
    }
    sb.trajectory.record(step);
    drop(work);
    Ok(reply(CachedReply {
        status: r.status,
        body: r.body,
    }))
}

/// Relays a streamed run as it comes, reading its result line for the trajectory. A client
/// that goes away drops the agent's stream: the agent interrupts the command.
async fn relay(
    sb: Arc<Sandbox>,
    mut agent_body: Incoming,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, http::BoxError>>,
    mut step: Step,
    // Held until the run's end: a draining node waits, and no auto-pause comes under it.
    _work: Held,
) {
    let started = Instant::now();
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    step.status = 200;
    loop {
        let frame = tokio::select! {
            frame = agent_body.frame() => frame,
            // A silent command's client is missed by `send`: dropping the agent's stream
            // tells the agent, which interrupts the command.
            () = tx.closed() => break,
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for chunk in data.split_inclusive(|&b| b == b'\n') {
            let complete = chunk.ends_with(b"\n");
            if !skipping {
                line.extend_from_slice(chunk);
            }
            if complete {
                if !skipping && line.starts_with(br#"{"type":"result""#) {
                    take_result(&line, &mut step);
                }
                line.clear();
                skipping = false;
            } else if line.len() > MAX_LINE {
                line.clear();
                skipping = true;
            }
        }
        if tx.send(Ok(data)).await.is_err() {
            break;
        }
    }
    if step.duration_ms == 0.0 {
        step.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    }
    sb.trajectory.record(step);
}

fn take_result(line: &[u8], step: &mut Step) {
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(flatten, borrow)]
        outcome: Outcome<'a>,
    }
    if let Ok(parsed) = serde_json::from_slice::<Line<'_>>(line) {
        parsed.outcome.fill(step);
    }
}

async fn forward(
    sb: &Sandbox,
    method: Method,
    path: &str,
    body: Body,
) -> Result<Response<Body>, ApiError> {
    let r = sb
        .agent
        .call(agent_request(method, path, body)?, 1 << 20)
        .await?;
    if r.status == hyper::StatusCode::NO_CONTENT {
        return Ok(http::no_content());
    }
    Ok(reply(CachedReply {
        status: r.status,
        body: r.body,
    }))
}

fn step(
    action: &str,
    started: (u64, Instant),
    response: &Result<Response<Body>, ApiError>,
) -> Step {
    Step {
        action: action.into(),
        at_ms: started.0,
        status: match response {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status(),
        },
        duration_ms: started.1.elapsed().as_secs_f64() * 1000.0,
        ..Step::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_the_agents_shape() {
        assert!(valid_session_id("shell-1"));
        assert!(valid_session_id("python-12"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("../x"));
        assert!(!valid_session_id("Shell-1"));
        assert!(!valid_session_id(&"a".repeat(65)));
    }
}
