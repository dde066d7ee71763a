//! The agent's session routes:
//!
//! | route | what |
//! |---|---|
//! | `POST /sessions` | start a shell or Python session (201) |
//! | `GET /sessions` | the live sessions |
//! | `GET /sessions/{sid}` | one session |
//! | `DELETE /sessions/{sid}` | end it (its whole process tree) |
//! | `POST /sessions/{sid}/run` | one command: JSON result, or NDJSON events |
//! | `POST /sessions/{sid}/interrupt` | stop the run under way, as its timeout would |
//!
//! A run goes on in a task of its own: a client that goes away interrupts the command, and
//! the session reads on to the end of its frame, so it stays in step for the next one.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};

use super::Agent;
use super::session;
use crate::api::sessions::{
    CreateSessionRequest, MAX_CODE_BYTES, RunEvent, RunRequest, SessionList,
};
use crate::api::{ApiError, NDJSON};
use crate::http::{self, Body, ChannelBody, MAX_JSON_BODY, ndjson_line};

pub async fn route(agent: &Arc<Agent>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::POST, ["sessions"]) => {
            let body: CreateSessionRequest = http::read_json(req, MAX_JSON_BODY).await?;
            let info = agent
                .sessions
                .create(&agent.children, &agent.base_env, body)
                .await?;
            Ok(http::json(StatusCode::CREATED, &info))
        }
        (Method::GET, ["sessions"]) => Ok(http::json(
            StatusCode::OK,
            &SessionList {
                sessions: agent.sessions.list(),
            },
        )),
        (Method::GET, ["sessions", sid]) => {
            Ok(http::json(StatusCode::OK, &agent.sessions.get(sid)?.info()))
        }
        (Method::DELETE, ["sessions", sid]) => {
            agent.sessions.close(sid)?;
            Ok(http::no_content())
        }
        (Method::POST, ["sessions", sid, "interrupt"]) => {
            agent.sessions.interrupt(sid)?;
            Ok(http::no_content())
        }
        (Method::POST, ["sessions", sid, "run"]) => {
            let sid = sid.to_string();
            run(agent, &sid, req).await
        }
        (method, _) => Err(ApiError::not_found(format!(
            "no agent route {method} {path}"
        ))),
    }
}

async fn run(
    agent: &Arc<Agent>,
    sid: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let streaming = http::wants_ndjson(&req);
    let body: RunRequest = http::read_json(req, MAX_CODE_BYTES + MAX_JSON_BODY).await?;
    body.validate().map_err(ApiError::bad_request)?;
    let claimed = agent.sessions.claim(sid)?;
    if !streaming {
        let agent = agent.clone();
        let task =
            tokio::spawn(async move { session::run(&agent.sessions, claimed, body, None).await });
        let result = task
            .await
            .map_err(|e| ApiError::internal(format!("session task failed: {e}")))??;
        return Ok(http::json(StatusCode::OK, &result));
    }
    let (tx, response_body) = ChannelBody::channel(16);
    let agent = agent.clone();
    tokio::spawn(async move {
        let event = match session::run(&agent.sessions, claimed, body, Some(tx.clone())).await {
            Ok(result) => RunEvent::Result(result),
            Err(error) => RunEvent::Error { error },
        };
        let _ = tx.send(Ok(ndjson_line(&event))).await;
    });
    Ok(Response::builder()
        .header(CONTENT_TYPE, NDJSON)
        .body(response_body)
        .unwrap_or_else(|_| http::error(ApiError::internal("response"))))
}
