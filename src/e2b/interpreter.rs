//! The code interpreter's port (49999), as `e2b-code-interpreter` speaks to it: `/execute`
//! streams a snippet's stdout, stderr, result and error as NDJSON lines; `/contexts` creates,
//! lists, restarts and removes the interpreters that snippets run in.
//!
//! A context is a persistent session of the sandbox's agent (a Python interpreter, or a shell
//! for `bash`), so variables persist from one execution to the next, as in a Jupyter kernel.
//! Each language has a default context, started at its first execution; executions in one
//! context wait their turn. A client that goes away interrupts its execution (the agent's
//! session sends SIGINT), which is how the SDK's `timeout` ends a long one.
//!
//! Auth as in E2B: `/execute` carries the envd access token (checked by the caller); the
//! context calls carry none, so they are served to whoever can address the sandbox, and
//! refused only when they carry a wrong token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::ReqBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Front;
use super::envd::Addressed;
use super::state::{Context, E2bSandbox};
use crate::api::exec::{MAX_OUTPUT_LIMIT, MAX_TIMEOUT_MS};
use crate::api::sessions::{
    CreateSessionRequest, MAX_CODE_BYTES, RunEvent, RunRequest, RunResult, SessionInfo, SessionKind,
};
use crate::api::{ApiError, ErrorBody, NDJSON, WORKSPACE};
use crate::http::{self, Body, BoxError, ChannelBody, MAX_JSON_BODY};
use crate::node::agent_client::{AGENT_TIMEOUT, agent_request};
use crate::node::sandbox::Sandbox;
use crate::node::trajectory::{Outcome, Step, preview};
use crate::util::{MutexExt, now_ms, random_id};

/// Longest NDJSON line read from the agent (a result with a MIME bundle).
const MAX_LINE: usize = 64 << 20;
/// Contexts per sandbox, at most (the agent's own session cap is the harder bound).
const MAX_CONTEXTS: usize = 16;

/// Where the SDK's `Result` fields come from in a MIME bundle.
const RESULT_FIELDS: [(&str, &str); 10] = [
    ("text/plain", "text"),
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
];

/// An error of the interpreter's port, answered as `{"code", "message"}` with its status (the
/// SDK raises `NotFoundException` on 404, `SandboxException("<status> …")` otherwise).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InterpreterError {
    status: StatusCode,
    message: String,
}

impl InterpreterError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn response(&self) -> Response<Body> {
        http::json(
            self.status,
            &json!({"code": self.status.as_u16(), "message": self.message}),
        )
    }
}

impl From<ApiError> for InterpreterError {
    fn from(e: ApiError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
        Self::new(status, e.message)
    }
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct NewContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

/// A context as the SDK reads it.
#[derive(Debug, Serialize)]
struct ContextView<'a> {
    id: &'a str,
    language: &'a str,
    cwd: &'a str,
}

fn view(ctx: &Context) -> ContextView<'_> {
    ContextView {
        id: &ctx.id,
        language: ctx.language,
        cwd: &ctx.cwd,
    }
}

/// The session kind serving a language, and the language's name in contexts.
fn language(name: Option<&str>) -> Result<(SessionKind, &'static str), InterpreterError> {
    match name.map(str::to_ascii_lowercase).as_deref() {
        None | Some("" | "python" | "python3") => Ok((SessionKind::Python, "python")),
        Some("bash" | "sh" | "shell") => Ok((SessionKind::Shell, "bash")),
        Some(other) => Err(InterpreterError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("language {other:?} is not supported by this ARL node (python and bash are)"),
        )),
    }
}

/// Serves one request on the interpreter's port; `token_ok` says whether it carried the
/// sandbox's access token.
pub async fn route(
    front: &Front,
    addressed: &Addressed,
    req: Request<ReqBody>,
    token_ok: bool,
) -> (&'static str, Response<Body>) {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let (label, result) = match (&method, segments.as_slice()) {
        (&Method::POST, ["execute"]) if !token_ok => (
            "/e2b/interpreter/execute",
            Err(InterpreterError::new(
                StatusCode::UNAUTHORIZED,
                "invalid or missing access token",
            )),
        ),
        (&Method::POST, ["execute"]) => (
            "/e2b/interpreter/execute",
            execute(front, addressed, req).await,
        ),
        (&Method::GET, ["health"]) => ("/e2b/interpreter/health", Ok(http::no_content())),
        (&Method::GET, ["contexts"]) => ("/e2b/interpreter/contexts", Ok(list(&addressed.e2b))),
        (&Method::POST, ["contexts"]) => (
            "/e2b/interpreter/contexts",
            create(&addressed.e2b, req).await,
        ),
        (&Method::DELETE, ["contexts", id]) => {
            ("/e2b/interpreter/context", remove(addressed, id).await)
        }
        (&Method::POST, ["contexts", id, "restart"]) => (
            "/e2b/interpreter/context:restart",
            restart(addressed, id).await,
        ),
        _ => (
            "/e2b/interpreter:unimplemented",
            Err(InterpreterError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!("{method} {path} is not supported by this ARL node's code interpreter"),
            )),
        ),
    };
    (label, result.unwrap_or_else(|e| e.response()))
}

fn list(e2b: &E2bSandbox) -> Response<Body> {
    let contexts = e2b.contexts.lock_or_recover();
    let views: Vec<ContextView<'_>> = contexts.values().map(|c| view(c)).collect();
    http::json(StatusCode::OK, &views)
}

/// A new context; its interpreter starts at its first execution.
async fn create(
    e2b: &E2bSandbox,
    req: Request<ReqBody>,
) -> Result<Response<Body>, InterpreterError> {
    let body = http::read_body(req.into_body(), MAX_JSON_BODY).await?;
    let new: NewContext = if body.is_empty() {
        NewContext::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| InterpreterError::new(StatusCode::BAD_REQUEST, e.to_string()))?
    };
    let (_, language) = language(new.language.as_deref())?;
    let cwd = new.cwd.unwrap_or_else(|| WORKSPACE.to_string());
    if cwd.contains('\0') {
        return Err(InterpreterError::new(
            StatusCode::BAD_REQUEST,
            "`cwd` may not contain NUL bytes",
        ));
    }
    let ctx = insert(e2b, random_id(""), language, cwd)?;
    Ok(http::json(StatusCode::OK, &view(&ctx)))
}

fn insert(
    e2b: &E2bSandbox,
    id: String,
    language: &'static str,
    cwd: String,
) -> Result<Arc<Context>, InterpreterError> {
    let mut contexts = e2b.contexts.lock_or_recover();
    if let Some(existing) = contexts.get(&id) {
        return Ok(existing.clone());
    }
    if contexts.len() >= MAX_CONTEXTS {
        return Err(InterpreterError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("a sandbox has at most {MAX_CONTEXTS} contexts: remove one first"),
        ));
    }
    let ctx = Arc::new(Context {
        id: id.clone(),
        language,
        cwd,
        session: Default::default(),
        executions: Default::default(),
        turn: Default::default(),
    });
    contexts.insert(id, ctx.clone());
    Ok(ctx)
}

fn context(e2b: &E2bSandbox, id: &str) -> Result<Arc<Context>, InterpreterError> {
    e2b.contexts
        .lock_or_recover()
        .get(id)
        .cloned()
        .ok_or_else(|| {
            InterpreterError::new(StatusCode::NOT_FOUND, format!("context {id:?} not found"))
        })
}

async fn remove(addressed: &Addressed, id: &str) -> Result<Response<Body>, InterpreterError> {
    let ctx = context(&addressed.e2b, id)?;
    addressed.e2b.contexts.lock_or_recover().remove(id);
    end_session(&addressed.sandbox, &ctx).await;
    Ok(http::no_content())
}

/// A fresh interpreter for the context: its state is gone, its id stays.
async fn restart(addressed: &Addressed, id: &str) -> Result<Response<Body>, InterpreterError> {
    let ctx = context(&addressed.e2b, id)?;
    let _turn = ctx.turn.lock().await;
    end_session(&addressed.sandbox, &ctx).await;
    Ok(http::no_content())
}

async fn end_session(sb: &Sandbox, ctx: &Context) {
    let Some(sid) = ctx.session.lock_or_recover().take() else {
        return;
    };
    let ended = match agent_request(Method::DELETE, &format!("/sessions/{sid}"), http::empty()) {
        Ok(req) => sb.agent.call(req, 1 << 16).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = ended {
        tracing::warn!(session = %sid, error = %e, "ending a context's session failed");
    }
}

/// The context's live session, started if it has none.
async fn session_of(sb: &Sandbox, ctx: &Context) -> Result<String, InterpreterError> {
    if let Some(sid) = ctx.session.lock_or_recover().clone() {
        return Ok(sid);
    }
    let (kind, _) = language(Some(ctx.language))?;
    // Late binding, as for every command: the pool's and the lease's environment.
    let create = CreateSessionRequest {
        kind,
        env: sb.lease().map(|l| l.env).unwrap_or_default(),
        cwd: Some(ctx.cwd.clone()),
    };
    let body = serde_json::to_vec(&create)
        .map_err(|e| InterpreterError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let reply = sb
        .agent
        .call(
            agent_request(Method::POST, "/sessions", http::full(body))?,
            1 << 20,
        )
        .await?;
    if !reply.status.is_success() {
        return Err(agent_refusal(reply.status, &reply.body));
    }
    let info: SessionInfo = serde_json::from_slice(&reply.body)
        .map_err(|e| InterpreterError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    *ctx.session.lock_or_recover() = Some(info.id.clone());
    Ok(info.id)
}

/// An agent's error reply, kept whole.
fn agent_refusal(status: StatusCode, body: &[u8]) -> InterpreterError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.error.into(),
        Err(_) => InterpreterError::new(status, format!("the sandbox's agent answered {status}")),
    }
}

/// Runs a snippet to its end without streaming (the environment's set-up and restoring).
async fn run_quietly(sb: &Sandbox, sid: &str, code: String) -> Result<RunResult, InterpreterError> {
    let run = RunRequest {
        code,
        timeout_ms: Some(10_000),
        max_output_bytes: Some(1 << 16),
    };
    let body = serde_json::to_vec(&run)
        .map_err(|e| InterpreterError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let req = agent_request(
        Method::POST,
        &format!("/sessions/{sid}/run"),
        http::full(body),
    )?;
    let reply = sb.agent.call(req, 1 << 20).await?;
    if !reply.status.is_success() {
        return Err(agent_refusal(reply.status, &reply.body));
    }
    serde_json::from_slice(&reply.body)
        .map_err(|e| InterpreterError::new(StatusCode::BAD_GATEWAY, e.to_string()))
}

/// Code that sets `vars` for the executions that follow, and code that puts back what was
/// there before (E2B's `envs` of one `run_code` last for that execution only).
fn env_code(kind: SessionKind, vars: &BTreeMap<String, String>) -> (String, String) {
    match kind {
        SessionKind::Python => {
            // A JSON object of strings is a Python dict literal.
            let new = serde_json::to_string(vars).unwrap_or_else(|_| "{}".into());
            (
                format!(
                    "import os as __arl_os\n__arl_env_saved = {{k: __arl_os.environ.get(k) for k in {new}}}\n__arl_os.environ.update({new})\n"
                ),
                "for __arl_k, __arl_v in __arl_env_saved.items():\n    \
                 __arl_os.environ.pop(__arl_k, None) if __arl_v is None else __arl_os.environ.__setitem__(__arl_k, __arl_v)\n\
                 del __arl_env_saved, __arl_os\n"
                    .to_string(),
            )
        }
        SessionKind::Shell => {
            let mut set = String::from("__arl_env_saved=$(export -p); ");
            let mut unset = String::from("unset");
            for (k, v) in vars {
                let quoted = v.replace('\'', r"'\''");
                set.push_str(&format!("export {k}='{quoted}'; "));
                unset.push(' ');
                unset.push_str(k);
            }
            (
                set,
                format!("{unset}; eval \"$__arl_env_saved\"; unset __arl_env_saved"),
            )
        }
    }
}

fn valid_env(vars: &BTreeMap<String, String>) -> Result<(), InterpreterError> {
    for (k, v) in vars {
        let name_ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok || v.contains('\0') {
            return Err(InterpreterError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid environment variable {k:?}"),
            ));
        }
    }
    Ok(())
}

async fn execute(
    front: &Front,
    addressed: &Addressed,
    req: Request<ReqBody>,
) -> Result<Response<Body>, InterpreterError> {
    let body = http::read_body(req.into_body(), MAX_CODE_BYTES + MAX_JSON_BODY).await?;
    let ask: ExecuteRequest = serde_json::from_slice(&body)
        .map_err(|e| InterpreterError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if ask.context_id.is_some() && ask.language.is_some() {
        return Err(InterpreterError::new(
            StatusCode::BAD_REQUEST,
            "give a context or a language, not both",
        ));
    }
    let run = RunRequest {
        code: ask.code,
        // The client's own timeout ends an execution by going away; this only bounds it.
        timeout_ms: Some(MAX_TIMEOUT_MS),
        max_output_bytes: Some(MAX_OUTPUT_LIMIT),
    };
    run.validate()
        .map_err(|e| InterpreterError::new(StatusCode::BAD_REQUEST, e))?;
    let env = ask.env_vars.unwrap_or_default();
    valid_env(&env)?;
    let e2b = &addressed.e2b;
    let ctx = match &ask.context_id {
        Some(id) => context(e2b, id)?,
        None => {
            let (_, name) = language(ask.language.as_deref())?;
            insert(e2b, name.to_string(), name, WORKSPACE.to_string())?
        }
    };
    let (kind, _) = language(Some(ctx.language))?;
    let turn = ctx.turn.clone().lock_owned().await;
    let sb = addressed.sandbox.clone();
    let sid = session_of(&sb, &ctx).await?;
    let restore = if env.is_empty() {
        None
    } else {
        let (set, restore) = env_code(kind, &env);
        run_quietly(&sb, &sid, set).await?;
        Some(restore)
    };
    let mut agent_req = agent_request(
        Method::POST,
        &format!("/sessions/{sid}/run"),
        http::full(serde_json::to_vec(&run).map_err(|e| {
            InterpreterError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })?),
    )?;
    agent_req
        .headers_mut()
        .insert(ACCEPT, HeaderValue::from_static(NDJSON));
    let step = Step {
        action: "session_run".into(),
        at_ms: now_ms(),
        session: Some(sid.clone()),
        input: Some(preview(&run.code)),
        ..Step::default()
    };
    let started = async {
        let response = sb.agent.stream(agent_req, AGENT_TIMEOUT).await?;
        if !response.status().is_success() {
            let status = response.status();
            let body = http::read_body(response.into_body(), MAX_JSON_BODY).await?;
            return Err(agent_refusal(status, &body));
        }
        Ok(response)
    };
    let response = match started.await {
        Ok(response) => response,
        Err(e) => {
            // Nothing ran: the environment set for it goes back at once.
            if let Some(code) = restore
                && let Err(undo) = run_quietly(&sb, &sid, code).await
            {
                tracing::warn!(error = %undo, "restoring a context's environment failed");
            }
            return Err(e);
        }
    };
    // Held to the execution's end, even if the client goes: no auto-pause under it.
    let in_use = front.mgr.enter(&sb).await?;
    let (tx, body) = ChannelBody::channel(16);
    let execution = Execution {
        sb,
        ctx,
        sid,
        tx,
        step,
        started: Instant::now(),
        restore,
    };
    tokio::spawn(async move {
        execution.relay(response.into_body()).await;
        drop((turn, in_use));
    });
    Ok(Response::builder()
        .header(CONTENT_TYPE, NDJSON)
        .body(body)
        .unwrap_or_else(|_| {
            InterpreterError::new(StatusCode::INTERNAL_SERVER_ERROR, "response").response()
        }))
}

/// An execution under way: the agent's events become the code interpreter's lines.
struct Execution {
    sb: Arc<Sandbox>,
    ctx: Arc<Context>,
    sid: String,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
    step: Step,
    started: Instant,
    restore: Option<String>,
}

impl Execution {
    async fn relay(mut self, mut agent: Incoming) {
        let mut lines = http::Lines::new(MAX_LINE);
        let mut finished = false;
        let mut client_gone = false;
        'read: loop {
            let frame = tokio::select! {
                frame = agent.frame() => frame,
                // The client went away (its timeout): the run is interrupted, and read to its
                // end so that the next execution finds the interpreter free.
                () = self.tx.closed(), if !client_gone => {
                    client_gone = true;
                    self.interrupt().await;
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
                let event = serde_json::from_slice::<RunEvent>(&line);
                if let Ok(RunEvent::Result(_)) = &event
                    && let Ok(outcome) = serde_json::from_slice::<Outcome<'_>>(&line)
                {
                    outcome.fill(&mut self.step);
                }
                let Ok(event) = event else { break 'read };
                if self.event(event).await {
                    finished = true;
                    break 'read;
                }
            }
        }
        drop(agent);
        if !finished {
            self.step.status = 502;
            self.send(error_line(
                "SandboxError",
                "the sandbox's agent stopped answering during the execution",
            ))
            .await;
            self.send(json!({"type": "unexpected_end_of_execution"}))
                .await;
        }
        if self.step.duration_ms == 0.0 {
            self.step.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        }
        self.sb.trajectory.record(std::mem::take(&mut self.step));
        if let Some(code) = self.restore.take()
            && self.ctx.session.lock_or_recover().as_deref() == Some(self.sid.as_str())
            && let Err(e) = run_quietly(&self.sb, &self.sid, code).await
        {
            tracing::warn!(error = %e, "restoring a context's environment failed");
        }
        self.sb.touch();
    }

    async fn interrupt(&self) {
        let path = format!("/sessions/{}/interrupt", self.sid);
        let sent = match agent_request(Method::POST, &path, http::empty()) {
            Ok(req) => self.sb.agent.call(req, 1 << 16).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::warn!(session = %self.sid, error = %e, "interrupting an abandoned execution failed");
        }
    }

    /// Relays one event; true once the execution is over.
    async fn event(&mut self, event: RunEvent) -> bool {
        match event {
            RunEvent::Stdout { data } => self.send(output_line("stdout", data)).await,
            RunEvent::Stderr { data } => self.send(output_line("stderr", data)).await,
            RunEvent::Result(result) => {
                self.step.status = 200;
                self.finish(result).await;
                return true;
            }
            RunEvent::Error { error } => {
                self.step.status = error.status();
                self.send(error_line("SandboxError", &error.message)).await;
                self.send(json!({"type": "end_of_execution"})).await;
                return true;
            }
        }
        false
    }

    async fn finish(&mut self, result: RunResult) {
        if let Some(line) = result_line(&result) {
            self.send(line).await;
        }
        if let Some(error) = &result.error {
            let line = json!({
                "type": "error",
                "name": error.ename,
                "value": error.evalue,
                "traceback": error.traceback.join("\n"),
            });
            self.send(line).await;
        } else if result.timed_out {
            self.send(error_line(
                "TimeoutError",
                "the execution ran past its timeout",
            ))
            .await;
        } else if self.ctx.language == "bash" && result.exit_code != 0 {
            self.send(error_line("ExitCode", &result.exit_code.to_string()))
                .await;
        }
        if result.session_ended {
            // The interpreter is gone (`exit()`, or it would not stop): the next execution
            // starts a fresh one.
            let mut session = self.ctx.session.lock_or_recover();
            if session.as_deref() == Some(self.sid.as_str()) {
                *session = None;
            }
        }
        let count = self.ctx.executions.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(json!({"type": "number_of_executions", "execution_count": count}))
            .await;
        self.send(json!({"type": "end_of_execution"})).await;
    }

    async fn send(&self, line: Value) {
        let _ = self.tx.send(Ok(http::ndjson_line(&line))).await;
    }
}

fn output_line(stream: &str, text: String) -> Value {
    json!({"type": stream, "text": text, "timestamp": timestamp()})
}

fn error_line(name: &str, value: &str) -> Value {
    json!({"type": "error", "name": name, "value": value, "traceback": ""})
}

/// The snippet's value as the SDK's `Result`: known MIME types in their fields, the rest in
/// `extra`. None when the snippet has no value.
fn result_line(result: &RunResult) -> Option<Value> {
    if result.value.is_none() && result.data.is_none() {
        return None;
    }
    let mut line = serde_json::Map::new();
    line.insert("type".into(), json!("result"));
    line.insert("is_main_result".into(), json!(true));
    if let Some(value) = &result.value {
        line.insert("text".into(), json!(value));
    }
    let mut extra = serde_json::Map::new();
    for (mime, value) in result.data.iter().flatten() {
        match RESULT_FIELDS.iter().find(|(m, _)| m == mime) {
            Some((_, field)) => {
                line.insert((*field).into(), value.clone());
            }
            None => {
                extra.insert(mime.clone(), value.clone());
            }
        }
    }
    if !extra.is_empty() {
        line.insert("extra".into(), Value::Object(extra));
    }
    Some(Value::Object(line))
}

/// Now, as Jupyter writes it (RFC 3339, UTC).
fn timestamp() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_map_to_session_kinds_and_the_rest_is_refused() {
        assert_eq!(language(None).ok(), Some((SessionKind::Python, "python")));
        assert_eq!(
            language(Some("Python")).ok(),
            Some((SessionKind::Python, "python"))
        );
        assert_eq!(
            language(Some("bash")).ok(),
            Some((SessionKind::Shell, "bash"))
        );
        let refused = language(Some("javascript")).err().map(|e| e.status);
        assert_eq!(refused, Some(StatusCode::NOT_IMPLEMENTED));
    }

    #[test]
    fn a_mime_bundle_fills_the_sdks_result_fields() {
        let mut data = BTreeMap::new();
        data.insert("text/plain".to_string(), json!("Frame"));
        data.insert("text/html".to_string(), json!("<table/>"));
        data.insert("application/vnd.custom".to_string(), json!({"a": 1}));
        let result = RunResult {
            value: Some("Frame".into()),
            data: Some(data),
            ..RunResult::default()
        };
        let line = result_line(&result).expect("a result");
        assert_eq!(line["type"], "result");
        assert_eq!(line["text"], "Frame");
        assert_eq!(line["html"], "<table/>");
        assert_eq!(line["extra"]["application/vnd.custom"]["a"], 1);
        assert_eq!(line["is_main_result"], true);
        assert_eq!(
            result_line(&RunResult::default()),
            None,
            "no value, no result"
        );
    }

    #[test]
    fn environment_code_quotes_values_for_the_shell() {
        let mut vars = BTreeMap::new();
        vars.insert("A".to_string(), "it's".to_string());
        let (set, restore) = env_code(SessionKind::Shell, &vars);
        assert!(set.contains(r"export A='it'\''s';"), "{set}");
        assert!(restore.starts_with("unset A;"), "{restore}");
        assert!(valid_env(&vars).is_ok());
        vars.insert("1X".to_string(), String::new());
        assert!(valid_env(&vars).is_err());
    }
}
