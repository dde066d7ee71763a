//! `process.Process`: Start (foreground and background alike: the stream starts with the
//! pid and carries the output as it comes), Connect to a running process, List, SendSignal.
//! Commands run through the sandbox's agent as streamed execs, with the lease's environment
//! under the request's, as every exec of the node does. Stdin streaming and PTYs are refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ReqBody;
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, HeaderValue};
use hyper::{Method, Request, Response};
use serde::Deserialize;

use super::Front;
use super::connect::{self, Code, RpcError};
use super::envd::Addressed;
use super::state::{E2bSandbox, Process};
use crate::api::exec::MAX_OUTPUT_LIMIT;
use crate::api::exec::MAX_TIMEOUT_MS;
use crate::api::{
    ApiError, ErrorBody, ExecOutcome, ExecRequest, ExecResult, NDJSON, REPORT_PID_HEADER,
    SignalRequest,
};
use crate::http::{self, Body, ChannelBody, MAX_JSON_BODY};
use crate::node::agent_client::{AGENT_TIMEOUT, agent_request};
use crate::node::pause::InUse;
use crate::node::sandbox::Sandbox;
use crate::util::MutexExt;

/// Longest NDJSON line read from the agent (it sends chunks of at most 32 KiB).
const MAX_LINE: usize = 1 << 20;
/// Keepalive interval when the client names none (envd's default).
const DEFAULT_KEEPALIVE_S: u64 = 90;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<serde_json::Value>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct Selector {
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SelectorRequest {
    #[serde(default)]
    process: Selector,
    #[serde(default)]
    signal: Option<serde_json::Value>,
}

/// One line of the agent's streamed exec.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AgentLine {
    Started { pid: u32 },
    Stdout { data: String },
    Stderr { data: String },
    Result(ExecResult),
    Error { error: ApiError },
}

pub async fn route(
    front: &Arc<Front>,
    addressed: &Addressed,
    req: Request<ReqBody>,
) -> (&'static str, Response<Body>) {
    let method = req
        .uri()
        .path()
        .trim_start_matches("/process.Process/")
        .to_string();
    match method.as_str() {
        "Start" => ("/e2b/process/Start", start(front, addressed, req).await),
        "Connect" => ("/e2b/process/Connect", follow(addressed, req).await),
        "List" => ("/e2b/process/List", list(&addressed.e2b)),
        "SendSignal" => (
            "/e2b/process/SendSignal",
            signal(addressed, req)
                .await
                .unwrap_or_else(|e| e.response()),
        ),
        other => (
            "/e2b/process:unimplemented",
            RpcError::unimplemented(format!(
                "process.Process/{other} (stdin streaming, PTYs and process updates)"
            ))
            .response(),
        ),
    }
}

fn keepalive_interval<B>(req: &Request<B>) -> Duration {
    let seconds = req
        .headers()
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_KEEPALIVE_S);
    Duration::from_secs(seconds.clamp(1, 3600))
}

/// `Connect-Timeout-Ms` bounds the process's life, as with envd; none means no limit of
/// the client's (the node's longest exec timeout applies).
fn timeout_ms<B>(req: &Request<B>) -> u64 {
    req.headers()
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(MAX_TIMEOUT_MS)
        .min(MAX_TIMEOUT_MS)
}

async fn start(front: &Arc<Front>, addressed: &Addressed, req: Request<ReqBody>) -> Response<Body> {
    match start_inner(front, addressed, req).await {
        Ok(response) => response,
        Err(e) => connect::stream_error(&e),
    }
}

async fn start_inner(
    front: &Arc<Front>,
    addressed: &Addressed,
    req: Request<ReqBody>,
) -> Result<Response<Body>, RpcError> {
    if front.mgr.is_draining() {
        return Err(RpcError::new(
            Code::Unavailable,
            "the node is shutting down",
        ));
    }
    let keepalive = keepalive_interval(&req);
    let timeout_ms = timeout_ms(&req);
    let body = http::read_body(req.into_body(), MAX_JSON_BODY).await?;
    let start: StartRequest = connect::stream_request(&body)?;
    if start.pty.is_some() {
        return Err(RpcError::unimplemented("a PTY"));
    }
    if start.stdin == Some(true) {
        return Err(RpcError::unimplemented("writing to a process's stdin"));
    }
    let sb = &addressed.sandbox;
    // Late binding: the pool's and the lease's env apply under the request's own.
    let mut env = sb.lease().map(|l| l.env).unwrap_or_default();
    env.extend(start.process.envs.clone());
    let mut argv = vec![start.process.cmd.clone()];
    argv.extend(start.process.args.iter().cloned());
    let exec = ExecRequest {
        cmd: Some(argv),
        env,
        cwd: start.process.cwd.clone(),
        timeout_ms: Some(timeout_ms),
        max_output_bytes: Some(MAX_OUTPUT_LIMIT),
        ..ExecRequest::default()
    };
    exec.validate().map_err(RpcError::invalid)?;
    let body =
        serde_json::to_vec(&exec).map_err(|e| RpcError::new(Code::Internal, e.to_string()))?;
    let mut agent_req = agent_request(Method::POST, "/exec", http::full(body))?;
    agent_req
        .headers_mut()
        .insert(ACCEPT, HeaderValue::from_static(NDJSON));
    agent_req
        .headers_mut()
        .insert(REPORT_PID_HEADER, HeaderValue::from_static("1"));
    sb.touch();
    let started = Instant::now();
    let response = sb.agent.stream(agent_req, AGENT_TIMEOUT).await?;
    if !response.status().is_success() {
        return Err(agent_error(response).await);
    }
    // Held to the command's end, even if its starter goes: no auto-pause under it.
    let in_use = front.mgr.enter(sb).await?;
    let (tx, body) = ChannelBody::channel(16);
    let process = Arc::new(Process {
        pid: 0,
        cmd: start.process.cmd,
        args: start.process.args,
        envs: start.process.envs,
        cwd: start.process.cwd,
        tag: start.tag,
        followers: std::sync::Mutex::new(vec![tx]),
    });
    tokio::spawn(relay(
        front.clone(),
        addressed.e2b.clone(),
        sb.clone(),
        process,
        response.into_body(),
        keepalive,
        (started, in_use),
    ));
    Ok(connect::stream_response(body))
}

/// An agent's error reply in Connect's terms.
async fn agent_error(response: Response<Incoming>) -> RpcError {
    let status = response.status();
    match http::read_body(response.into_body(), MAX_JSON_BODY).await {
        Ok(bytes) => match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => body.error.into(),
            Err(_) => RpcError::new(Code::Internal, format!("the agent answered {status}")),
        },
        Err(e) => e.into(),
    }
}

fn start_frame(pid: u32) -> Bytes {
    connect::frame(&serde_json::json!({"event": {"start": {"pid": pid}}}))
}

fn data_frame(stream: &str, text: &str) -> Bytes {
    let data = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
    connect::frame(&serde_json::json!({"event": {"data": {stream: data}}}))
}

/// The end event, as envd reports Go's `ProcessState`.
fn end_frame(result: &ExecResult) -> Bytes {
    let end = match result.signal {
        Some(signal) => serde_json::json!({
            "exitCode": -1,
            "exited": false,
            "status": format!("signal: {}", signal_name(signal)),
        }),
        None => serde_json::json!({
            "exitCode": result.exit_code,
            "exited": true,
            "status": format!("exit status {}", result.exit_code),
        }),
    };
    connect::frame(&serde_json::json!({"event": {"end": end}}))
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        other => format!("signal {other}"),
    }
}

/// Reads the agent's stream to its end and relays it as process events to every follower.
/// The process lives on when its followers go (a background command outlives its starter's
/// stream); it ends with its command, its timeout, a `SendSignal`, or its sandbox.
async fn relay(
    front: Arc<Front>,
    e2b: Arc<E2bSandbox>,
    sb: Arc<Sandbox>,
    mut process: Arc<Process>,
    mut agent: Incoming,
    keepalive: Duration,
    // The guard is dropped, and the sandbox may pause again, when the command is over.
    (started, _in_use): (Instant, InUse),
) {
    let mut lines = http::Lines::new(MAX_LINE);
    let mut registered = false;
    let mut outcome = ExecOutcome::Error;
    let mut ended: Option<Bytes> = None;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    'read: loop {
        let frame = tokio::select! {
            frame = agent.frame() => frame,
            _ = ticker.tick() => {
                process.broadcast(connect::frame(&serde_json::json!({"event": {"keepalive": {}}}))).await;
                continue;
            }
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if lines.push(&data).is_err() {
            break;
        }
        while let Some(line) = lines.next_line() {
            let Ok(event) = serde_json::from_slice::<AgentLine>(&line) else {
                break 'read;
            };
            match event {
                AgentLine::Started { pid } => {
                    if let Some(p) = Arc::get_mut(&mut process) {
                        p.pid = pid;
                    }
                    e2b.processes.lock_or_recover().insert(pid, process.clone());
                    registered = true;
                    process.broadcast(start_frame(pid)).await;
                }
                AgentLine::Stdout { data } | AgentLine::Stderr { data } if !registered => {
                    // Never before the start event (the SDK requires it first).
                    let _ = data;
                }
                AgentLine::Stdout { data } => process.broadcast(data_frame("stdout", &data)).await,
                AgentLine::Stderr { data } => process.broadcast(data_frame("stderr", &data)).await,
                AgentLine::Result(result) => {
                    if !registered {
                        // The command could not be started at all: still a process to the SDK.
                        process.broadcast(start_frame(0)).await;
                        if !result.stderr.is_empty() {
                            process
                                .broadcast(data_frame("stderr", &result.stderr))
                                .await;
                        }
                    }
                    outcome = result.outcome();
                    if result.timed_out {
                        let err = RpcError::new(
                            Code::DeadlineExceeded,
                            "the command ran past its timeout and was killed",
                        );
                        ended = Some(err.end_frame());
                    } else {
                        process.broadcast(end_frame(&result)).await;
                        ended = Some(connect::end_ok());
                    }
                    break 'read;
                }
                AgentLine::Error { error } => {
                    ended = Some(RpcError::from(error).end_frame());
                    break 'read;
                }
            }
        }
    }
    if registered {
        e2b.processes.lock_or_recover().remove(&process.pid);
    }
    let end = ended.unwrap_or_else(|| {
        RpcError::new(
            Code::Unavailable,
            "the sandbox's agent stopped answering while the command ran",
        )
        .end_frame()
    });
    process.broadcast(end).await;
    process.followers.lock_or_recover().clear();
    let pool = sb.pool.as_str();
    front
        .mgr
        .metrics
        .execs_total
        .with_label_values(&[pool, outcome.as_str()])
        .inc();
    front
        .mgr
        .metrics
        .exec_seconds
        .with_label_values(&[pool])
        .observe(started.elapsed().as_secs_f64());
    sb.touch();
}

fn select(e2b: &E2bSandbox, selector: &Selector) -> Result<Arc<Process>, RpcError> {
    let found = match (selector.pid, &selector.tag) {
        (Some(pid), _) => e2b.process(pid),
        (None, Some(tag)) => e2b.process_by_tag(tag),
        (None, None) => return Err(RpcError::invalid("name a process by `pid` or `tag`")),
    };
    found.ok_or_else(|| RpcError::new(Code::NotFound, "no such running process"))
}

/// `Connect`: follows a running process from now on (its start event first).
async fn follow(addressed: &Addressed, req: Request<ReqBody>) -> Response<Body> {
    let followed = async {
        let body = http::read_body(req.into_body(), MAX_JSON_BODY).await?;
        let request: SelectorRequest = connect::stream_request(&body)?;
        let process = select(&addressed.e2b, &request.process)?;
        let (tx, body) = ChannelBody::channel(16);
        tx.send(Ok(start_frame(process.pid)))
            .await
            .map_err(|_| RpcError::new(Code::Internal, "stream closed"))?;
        process.followers.lock_or_recover().push(tx);
        Ok::<_, RpcError>(body)
    };
    match followed.await {
        Ok(body) => connect::stream_response(body),
        Err(e) => connect::stream_error(&e),
    }
}

fn list(e2b: &E2bSandbox) -> Response<Body> {
    let processes: Vec<serde_json::Value> = e2b
        .processes()
        .iter()
        .map(|p| {
            let mut info = serde_json::json!({
                "pid": p.pid,
                "config": {"cmd": p.cmd, "args": p.args, "envs": p.envs},
            });
            if let Some(cwd) = &p.cwd {
                info["config"]["cwd"] = cwd.clone().into();
            }
            if let Some(tag) = &p.tag {
                info["tag"] = tag.clone().into();
            }
            info
        })
        .collect();
    connect::unary_ok(&serde_json::json!({"processes": processes}))
}

fn signal_number(value: Option<&serde_json::Value>) -> Result<i32, RpcError> {
    match value {
        Some(serde_json::Value::String(name)) => match name.as_str() {
            "SIGNAL_SIGKILL" => Ok(libc::SIGKILL),
            "SIGNAL_SIGTERM" => Ok(libc::SIGTERM),
            other => Err(RpcError::invalid(format!("unknown signal {other}"))),
        },
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(9) => Ok(libc::SIGKILL),
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(15) => Ok(libc::SIGTERM),
        _ => Err(RpcError::invalid(
            "`signal` must be SIGNAL_SIGKILL or SIGNAL_SIGTERM",
        )),
    }
}

async fn signal(addressed: &Addressed, req: Request<ReqBody>) -> Result<Response<Body>, RpcError> {
    let body = http::read_body(req.into_body(), MAX_JSON_BODY).await?;
    let request: SelectorRequest = connect::unary_request(&body)?;
    let signal = signal_number(request.signal.as_ref())?;
    let process = select(&addressed.e2b, &request.process)?;
    let pid = i32::try_from(process.pid).map_err(|_| RpcError::invalid("pid out of range"))?;
    let body = serde_json::to_vec(&SignalRequest { pid, signal })
        .map_err(|e| RpcError::new(Code::Internal, e.to_string()))?;
    let request = agent_request(Method::POST, "/signal", http::full(body))?;
    let reply = addressed.sandbox.agent.call(request, 1 << 16).await?;
    if reply.status.is_success() {
        return Ok(connect::unary_ok(&serde_json::json!({})));
    }
    Err(match serde_json::from_slice::<ErrorBody>(&reply.body) {
        Ok(body) => body.error.into(),
        Err(_) => RpcError::new(
            Code::Internal,
            format!("the agent answered {}", reply.status),
        ),
    })
}
