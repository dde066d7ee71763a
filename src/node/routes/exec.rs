//! Exec through the daemon, in both modes:
//!
//! * JSON: the agent's whole reply, buffered within the node-wide reply budget;
//! * NDJSON (`Accept: application/x-ndjson`): the agent's stream relayed chunk by chunk.
//!
//! Either way a `request_id` makes the exec happen at most once per sandbox: the first attempt
//! runs in a task of its own (so a client that disconnects does not cancel it) and publishes
//! its result; a retry waits for it or gets it back — as JSON or replayed as NDJSON events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::ACCEPT;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;

use tokio_util::task::task_tracker::TaskTrackerToken;

use super::ReqBody;
use crate::api::{
    ApiError, ErrorCode, ExecEvent, ExecOutcome, ExecRequest, ExecResult, NDJSON, OUTCOME_HEADER,
};
use crate::http::{self, Body, ChannelBody};
use crate::node::agent_client::{AGENT_TIMEOUT, agent_request, passthrough, reply};
use crate::node::auth::Owner;
use crate::node::manager::Manager;
use crate::node::once::{self, Claim};
use crate::node::pause::InUse;
use crate::node::sandbox::{CachedReply, Sandbox};
use crate::node::trajectory::{self, Outcome, Step};
use crate::util::now_ms;

/// Largest exec request (it may carry stdin).
pub(super) const MAX_EXEC_BODY: usize = 16 << 20;
/// Largest exec result kept for replay to a retry with the same request id.
const MAX_REPLAY_BYTES: usize = 256 << 10;
/// Longest NDJSON line the relay parses (the agent sends chunks of at most 32 KiB).
const MAX_LINE: usize = 1 << 20;

type Publish = Option<(String, watch::Sender<Option<CachedReply>>)>;

/// Held until a command's end, even if its client goes: a draining node waits for the first,
/// and the second keeps the sandbox from being auto-paused under the running command.
pub type Held = (TaskTrackerToken, InUse);

pub async fn exec(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    owner: Owner,
    req: Request<ReqBody>,
    work: Held,
) -> Result<Response<Body>, ApiError> {
    let streaming = http::wants_ndjson(&req);
    let mut exec_req: ExecRequest = http::read_json(req, MAX_EXEC_BODY).await?;
    exec_req.validate().map_err(ApiError::bad_request)?;
    // Late binding: the pool's and the lease's env apply under the request's own.
    let mut env = sb.lease().map(|l| l.env).unwrap_or_default();
    env.extend(std::mem::take(&mut exec_req.env));
    exec_req.env = env;
    // The agent keeps the result by request id too: it outlives a restart of the daemon.
    let request_id = exec_req.request_id.clone();
    // The agent enforces the command's timeout; this only guards against a stuck agent.
    let deadline = Duration::from_millis(exec_req.timeout_ms()) + Duration::from_secs(5);
    let limit = exec_req.max_output() * 12 + (1 << 20);
    let body = serde_json::to_vec(&exec_req).map_err(|e| ApiError::internal(e.to_string()))?;
    let step = trajectory_step(&exec_req);
    sb.touch();

    // A retry of a request id already seen gets the first result and runs nothing.
    let publish: Publish = match request_id.map(|id| (sb.execs.claim(&id), id)) {
        Some((Claim::Done(cached), _)) => return Ok(answer(cached, streaming)),
        Some((Claim::Wait(rx), _)) => return once::wait(rx).await.map(|c| answer(c, streaming)),
        Some((Claim::Run(tx), id)) => Some((id, tx)),
        None => None,
    };
    let started = Instant::now();
    if streaming {
        return stream(mgr, sb, &owner, body, publish, (started, step), work).await;
    }
    let run = {
        let mgr = mgr.clone();
        let sb = sb.clone();
        tokio::spawn(async move {
            // Held until the command's end, even if the client goes: a draining node waits.
            let _work = work;
            let result = match agent_request(Method::POST, "/exec", http::full(body)) {
                Ok(r) => {
                    sb.agent
                        .call_budgeted(r, limit, &mgr.reply_budget, deadline)
                        .await
                }
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
            record(&mgr, &sb, outcome, started);
            record_step(
                &sb,
                step,
                started,
                result.as_ref().ok().map(|(r, _)| (r.status, &r.body[..])),
            );
            let result = result.map(|(r, permit)| {
                (
                    CachedReply {
                        status: r.status,
                        body: r.body,
                    },
                    permit,
                )
            });
            match &result {
                Ok((cached, _)) => finish(&sb, publish, Some(cached)),
                Err(_) => finish(&sb, publish, None),
            }
            result
        })
    };
    let (cached, _permit) = run
        .await
        .map_err(|e| ApiError::internal(format!("exec task failed: {e}")))?
        .map_err(|e| explain(mgr, &sb, &owner, e))?;
    Ok(reply(cached))
}

/// Says why an agent stopped answering when the manager knows: a sandbox released while the
/// command ran (by its holder from another connection, or at the end of its lease) answers
/// `released`, which a retry cannot fix; one that died says how.
fn explain(mgr: &Manager, sb: &Sandbox, owner: &Owner, err: ApiError) -> ApiError {
    if err.code != ErrorCode::SandboxUnavailable {
        return err;
    }
    match mgr.sandbox(&sb.id, owner) {
        Err(e) if e.code == ErrorCode::NotFound => ApiError::new(
            ErrorCode::Released,
            format!(
                "sandbox {} was released while the command ran; the command was stopped",
                sb.id
            ),
        ),
        Err(died) => died,
        Ok(_) => err,
    }
}

fn record(mgr: &Manager, sb: &Sandbox, outcome: ExecOutcome, started: Instant) {
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
}

/// Publishes a finished exec for retries, or forgets its id when nothing ran (no reply, or a
/// request the agent refused up front) so that a corrected retry runs.
fn finish(sb: &Sandbox, publish: Publish, result: Option<&CachedReply>) {
    let Some((id, tx)) = publish else { return };
    match result {
        Some(cached) if cached.status.is_success() => {
            let _ = tx.send(Some(replayable(cached)));
        }
        _ => sb.execs.forget(&id),
    }
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

/// A kept result for a retry, in the mode the retry asked for.
fn answer(cached: CachedReply, streaming: bool) -> Response<Body> {
    let result = match serde_json::from_slice::<ExecResult>(&cached.body) {
        Ok(result) if streaming && cached.status.is_success() => result,
        _ => return reply(cached),
    };
    http::ndjson_replay(&result)
}

/// Starts a streaming exec and relays its events.
async fn stream(
    mgr: &Arc<Manager>,
    sb: Arc<Sandbox>,
    owner: &Owner,
    body: Vec<u8>,
    publish: Publish,
    (started, step): (Instant, Step),
    work: Held,
) -> Result<Response<Body>, ApiError> {
    let mut agent_req = agent_request(Method::POST, "/exec", http::full(body))?;
    agent_req
        .headers_mut()
        .insert(ACCEPT, hyper::header::HeaderValue::from_static(NDJSON));
    let response = match sb.agent.stream(agent_req, AGENT_TIMEOUT).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            finish(&sb, publish, None);
            record_step(&sb, step, started, Some((r.status(), b"")));
            return Ok(passthrough(r));
        }
        Err(e) => {
            finish(&sb, publish, None);
            record_step(&sb, step, started, None);
            return Err(explain(mgr, &sb, owner, e));
        }
    };
    let (parts, agent_body) = response.into_parts();
    let (tx, body) = ChannelBody::channel(16);
    tokio::spawn(relay(
        mgr.clone(),
        sb,
        agent_body,
        tx,
        publish,
        (started, step),
        work,
    ));
    Ok(Response::from_parts(parts, body))
}

/// Forwards the agent's NDJSON as it comes, reading the events on the way: the final one
/// gives the metrics; with a request id, all of them rebuild the result for retries, and the
/// relay reads on to the end even after the client went away.
async fn relay(
    mgr: Arc<Manager>,
    sb: Arc<Sandbox>,
    mut agent_body: Incoming,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, http::BoxError>>,
    publish: Publish,
    (started, mut step): (Instant, Step),
    // Held until the command's end.
    _work: Held,
) {
    let mut client = Some(tx);
    let mut events = Rebuild::default();
    let mut line: Vec<u8> = Vec::new();
    while let Some(frame) = agent_body.frame().await {
        let Ok(frame) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        line.extend_from_slice(&data);
        while let Some(pos) = line.iter().position(|&b| b == b'\n') {
            events.take(&line[..pos], publish.is_some());
            line.drain(..=pos);
        }
        if line.len() > MAX_LINE {
            events.broken = true;
            line.clear();
        }
        if let Some(c) = &client
            && c.send(Ok(data)).await.is_err()
        {
            client = None;
            if publish.is_none() {
                // Nobody will see the rest: dropping the agent's stream stops the command.
                record(&mgr, &sb, ExecOutcome::Error, started);
                step.status = 200;
                step.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                step.error = Some("the client went away; the command was stopped".into());
                sb.trajectory.record(step);
                return;
            }
        }
    }
    let outcome = events
        .result
        .as_ref()
        .map(ExecResult::outcome)
        .unwrap_or(ExecOutcome::Error);
    record(&mgr, &sb, outcome, started);
    step.status = 200;
    step.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Some(result) = &events.result {
        step.exit_code = Some(result.exit_code);
        step.timed_out = Some(result.timed_out);
        step.duration_ms = result.duration_ms;
    }
    step.stdout = trajectory::preview_opt(&events.stdout_preview);
    step.stderr = trajectory::preview_opt(&events.stderr_preview);
    sb.trajectory.record(step);
    let cached = events.into_result().map(|result| CachedReply {
        status: StatusCode::OK,
        body: Bytes::from(serde_json::to_vec(&result).unwrap_or_default()),
    });
    finish(&sb, publish, cached.as_ref());
}

/// The result of a streamed exec, rebuilt from its events.
#[derive(Default)]
struct Rebuild {
    stdout: String,
    stderr: String,
    /// The output's beginning, for the trajectory.
    stdout_preview: String,
    stderr_preview: String,
    result: Option<ExecResult>,
    broken: bool,
}

impl Rebuild {
    fn take(&mut self, line: &[u8], keep_output: bool) {
        // Output lines only matter when the result is kept for retries, or while the
        // trajectory's previews are not full.
        let previews_full = self.stdout_preview.len() > trajectory::PREVIEW_BYTES
            && self.stderr_preview.len() > trajectory::PREVIEW_BYTES;
        if !keep_output && previews_full && !line.starts_with(br#"{"type":"result""#) {
            return;
        }
        let add_preview = |preview: &mut String, data: &str| {
            if preview.len() <= trajectory::PREVIEW_BYTES {
                preview.push_str(data);
            }
        };
        match serde_json::from_slice::<ExecEvent>(line) {
            Ok(ExecEvent::Stdout { data }) => {
                add_preview(&mut self.stdout_preview, &data);
                if keep_output {
                    self.stdout.push_str(&data);
                }
            }
            Ok(ExecEvent::Stderr { data }) => {
                add_preview(&mut self.stderr_preview, &data);
                if keep_output {
                    self.stderr.push_str(&data);
                }
            }
            Ok(ExecEvent::Result(result)) => self.result = Some(result),
            Ok(ExecEvent::Error { .. }) | Err(_) => self.broken = true,
        }
    }

    fn into_result(self) -> Option<ExecResult> {
        let result = self.result.filter(|_| !self.broken)?;
        Some(ExecResult {
            stdout: self.stdout,
            stderr: self.stderr,
            ..result
        })
    }
}

/// The trajectory's step for an exec, before it runs: what and when.
fn trajectory_step(req: &ExecRequest) -> Step {
    let input = match (&req.shell, &req.cmd) {
        (Some(shell), _) => trajectory::preview(shell),
        (None, Some(cmd)) => trajectory::preview(&cmd.join(" ")),
        (None, None) => String::new(),
    };
    Step {
        action: "exec".into(),
        at_ms: now_ms(),
        input: Some(input),
        ..Step::default()
    }
}

/// Completes an exec's step from the agent's reply (status and result JSON) and records it.
fn record_step(sb: &Sandbox, mut step: Step, started: Instant, reply: Option<(StatusCode, &[u8])>) {
    step.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    match reply {
        Some((status, body)) => {
            step.status = status.as_u16();
            if status.is_success()
                && let Ok(outcome) = serde_json::from_slice::<Outcome<'_>>(body)
            {
                outcome.fill(&mut step);
            }
        }
        None => step.status = 503,
    }
    sb.trajectory.record(step);
}
