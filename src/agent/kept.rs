//! Exec results kept by request id, in the agent. The agent outlives the node daemon (a
//! restart or an upgrade hands sandboxes over to the next daemon), so a command whose answer
//! was lost with the daemon is not run again when the client retries with the same
//! `request_id`: the retry waits for the first run, or gets its result back.
//!
//! A command with a request id runs detached from the connection that started it: the
//! daemon going away mid-command does not stop it.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use tokio::sync::{mpsc, watch};

use crate::api::{ApiError, ErrorCode, ExecEvent, ExecResult, OUTCOME_HEADER};
use crate::http::{self, Body, BoxError, ChannelBody};
use crate::node::once::OnceMap;

/// Results kept per sandbox.
pub const KEPT_RESULTS: usize = 32;
/// Largest result kept (stdout and stderr together); a larger one is remembered as ran.
const MAX_KEPT_BYTES: usize = 256 << 10;

/// What a retry gets.
#[derive(Clone)]
pub enum Kept {
    Result(Arc<ExecResult>),
    /// It ran, but its result was too large to keep.
    TooLarge,
}

pub type KeptMap = OnceMap<String, Kept>;
pub type Publish = watch::Sender<Option<Kept>>;

impl Kept {
    pub fn of(result: &ExecResult) -> Self {
        if result.stdout.len() + result.stderr.len() > MAX_KEPT_BYTES {
            Kept::TooLarge
        } else {
            Kept::Result(Arc::new(result.clone()))
        }
    }

    /// The kept result, as JSON or replayed as NDJSON events.
    pub fn answer(&self, streaming: bool) -> Response<Body> {
        let result = match self {
            Kept::TooLarge => {
                return http::error(ApiError::new(
                    ErrorCode::Conflict,
                    "this request id already ran; its result was too large to keep for a replay",
                ));
            }
            Kept::Result(result) => result,
        };
        if !streaming {
            let mut response = http::json(StatusCode::OK, &**result);
            response.headers_mut().insert(
                OUTCOME_HEADER,
                hyper::header::HeaderValue::from_static(result.outcome().as_str()),
            );
            return response;
        }
        http::ndjson_replay(result)
    }
}

/// Relays a streamed exec's events to the client while rebuilding its result, and keeps
/// reading after the client went away, so the command runs to its end and its result is kept.
/// Returns the client's body.
pub fn tee(
    mut events: mpsc::Receiver<Result<Bytes, BoxError>>,
    publish: Publish,
    kept: Arc<KeptMap>,
    id: String,
) -> Body {
    let (tx, body) = ChannelBody::channel(16);
    tokio::spawn(async move {
        let mut client = Some(tx);
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let mut too_large = false;
        let mut result = None;
        while let Some(line) = events.recv().await {
            if let Ok(bytes) = &line {
                // Each message is one whole NDJSON line.
                match serde_json::from_slice::<ExecEvent>(bytes) {
                    Ok(ExecEvent::Stdout { data }) => stdout.push_str(&data),
                    Ok(ExecEvent::Stderr { data }) => stderr.push_str(&data),
                    Ok(ExecEvent::Result(r)) => result = Some(r),
                    Ok(ExecEvent::Error { .. }) | Err(_) => {}
                }
                if stdout.len() + stderr.len() > MAX_KEPT_BYTES {
                    too_large = true;
                    stdout.clear();
                    stderr.clear();
                }
            }
            if let Some(c) = &client
                && c.send(line).await.is_err()
            {
                client = None;
            }
        }
        match result {
            Some(_) if too_large => {
                let _ = publish.send(Some(Kept::TooLarge));
            }
            Some(r) => {
                let _ = publish.send(Some(Kept::Result(Arc::new(ExecResult {
                    stdout,
                    stderr,
                    ..r
                }))));
            }
            // No result (the command could not start): a corrected retry may run.
            None => kept.forget(&id),
        }
    });
    body
}
