//! Persistent sessions: a long-lived `/bin/sh` or `python3` per session, fed one framed
//! command at a time (see [`super::session_frame`]), its state kept between commands.
//!
//! A session is its own process group. On timeout the group gets SIGINT (the shell's trap
//! returns from the command, Python raises `KeyboardInterrupt`); a command still running after
//! [`INTERRUPT_GRACE`] has the session's other processes killed; one still running after
//! [`KILL_GRACE`] more ends the session.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot, watch};

use super::exec::{self, Children, Output, Stream};
use super::session_frame::{self as frame, FramedStream};
use super::spawn;
use crate::api::sessions::{
    CreateSessionRequest, MAX_SESSIONS, PythonError, RunRequest, RunResult, SessionInfo,
    SessionKind,
};
use crate::api::{ApiError, ErrorCode, WORKSPACE};
use crate::http::BoxError;
use crate::util::{MutexExt, now_ms};

/// How long an interrupted command may take to stop before the session's other processes are
/// killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How long after that before the session itself is ended.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// The live sessions of one sandbox.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Arc<Session>>>,
    created: AtomicU64,
}

pub struct Session {
    pub id: String,
    pub kind: SessionKind,
    pub pid: i32,
    created_at_ms: u64,
    runs: AtomicU64,
    io: Arc<tokio::sync::Mutex<SessionIo>>,
    /// Bumped to interrupt the run under way (as its timeout would).
    interrupts: watch::Sender<u64>,
}

/// The session's pipes, held by the one run under way.
struct SessionIo {
    stdin: pipe::Sender,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    exit: oneshot::Receiver<i32>,
    /// Output that came after the last run's markers (background jobs), for the next run.
    carried: (Vec<u8>, Vec<u8>),
}

impl Session {
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id.clone(),
            kind: self.kind,
            pid: self.pid,
            created_at_ms: self.created_at_ms,
            runs: self.runs.load(Ordering::Relaxed),
            busy: self.io.try_lock().is_err(),
        }
    }
}

fn gone(id: &str) -> ApiError {
    ApiError::not_found(format!("no session {id:?} in this sandbox"))
}

impl Sessions {
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self
            .live
            .lock_or_recover()
            .values()
            .map(|s| s.info())
            .collect();
        all.sort_by_key(|s| (s.created_at_ms, s.id.clone()));
        all
    }

    pub fn get(&self, id: &str) -> Result<Arc<Session>, ApiError> {
        self.live
            .lock_or_recover()
            .get(id)
            .cloned()
            .ok_or_else(|| gone(id))
    }

    /// Ends a session: its whole process tree is killed (background jobs too).
    pub fn close(&self, id: &str) -> Result<(), ApiError> {
        let session = self
            .live
            .lock_or_recover()
            .remove(id)
            .ok_or_else(|| gone(id))?;
        exec::kill_tree(session.pid);
        Ok(())
    }

    /// Forgets every session (their processes are being killed by a reset).
    pub fn clear(&self) {
        self.live.lock_or_recover().clear();
    }

    fn forget(&self, session: &Session) {
        let mut live = self.live.lock_or_recover();
        if live
            .get(&session.id)
            .is_some_and(|s| std::ptr::eq(s.as_ref(), session))
        {
            live.remove(&session.id);
        }
    }

    /// Starts a session's process (at most [`MAX_SESSIONS`] per sandbox).
    pub async fn create(
        &self,
        children: &Children,
        base_env: &[(String, String)],
        req: CreateSessionRequest,
    ) -> Result<SessionInfo, ApiError> {
        req.validate().map_err(ApiError::bad_request)?;
        if self.live.lock_or_recover().len() >= MAX_SESSIONS {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("a sandbox holds at most {MAX_SESSIONS} sessions; close one first"),
            ));
        }
        let cwd = match &req.cwd {
            Some(c) if c.starts_with('/') => c.clone(),
            Some(c) => format!("{WORKSPACE}/{c}"),
            None => WORKSPACE.to_string(),
        };
        if !Path::new(&cwd).is_dir() {
            return Err(ApiError::bad_request(format!(
                "cwd {cwd:?} is not a directory"
            )));
        }
        let mut env: Vec<(&str, &str)> = Vec::with_capacity(base_env.len() + req.env.len());
        for (k, v) in base_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            match env.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = v,
                None => env.push((k, v)),
            }
        }
        let argv: Vec<String> = match req.kind {
            SessionKind::Shell => vec!["/bin/sh".into()],
            SessionKind::Python => vec!["python3".into(), "-c".into(), frame::PYTHON_HELPER.into()],
        };
        let (child, exit) = children
            .spawn(|| spawn::spawn(&argv, &env, &cwd, true))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    ApiError::bad_request(format!("{} is not installed in this sandbox", argv[0]))
                }
                _ => ApiError::internal(format!("starting {}: {e}", argv[0])),
            })?;
        let pid = child.pid;
        let pipes = (|| -> std::io::Result<_> {
            let stdin = child
                .stdin
                .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
            Ok((
                pipe::Sender::from_owned_fd(stdin)?,
                pipe::Receiver::from_owned_fd(child.stdout)?,
                pipe::Receiver::from_owned_fd(child.stderr)?,
            ))
        })();
        let (mut stdin, stdout, stderr) = match pipes {
            Ok(p) => p,
            Err(e) => {
                exec::kill_tree(pid);
                return Err(ApiError::internal(format!("session pipes: {e}")));
            }
        };
        if req.kind == SessionKind::Shell
            && let Err(e) = stdin.write_all(frame::SHELL_INIT.as_bytes()).await
        {
            exec::kill_tree(pid);
            return Err(ApiError::internal(format!("starting the shell: {e}")));
        }
        let n = self.created.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id: format!("{}-{n}", req.kind.as_str()),
            kind: req.kind,
            pid,
            created_at_ms: now_ms(),
            runs: AtomicU64::new(0),
            interrupts: watch::Sender::new(0),
            io: Arc::new(tokio::sync::Mutex::new(SessionIo {
                stdin,
                stdout,
                stderr,
                exit,
                carried: (Vec::new(), Vec::new()),
            })),
        });
        let mut live = self.live.lock_or_recover();
        if live.len() >= MAX_SESSIONS {
            exec::kill_tree(pid);
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("a sandbox holds at most {MAX_SESSIONS} sessions; close one first"),
            ));
        }
        live.insert(session.id.clone(), session.clone());
        Ok(session.info())
    }

    /// Interrupts the session's run under way, if any, as its timeout would (SIGINT, then the
    /// kill graces); a run that starts later is not touched.
    pub fn interrupt(&self, id: &str) -> Result<(), ApiError> {
        self.get(id)?
            .interrupts
            .send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Claims a session for one run: 409 while another run holds it.
    pub fn claim(&self, id: &str) -> Result<Claimed, ApiError> {
        let session = self.get(id)?;
        let io = session.io.clone().try_lock_owned().map_err(|_| {
            ApiError::new(
                ErrorCode::Conflict,
                format!("session {id:?} is running a command; one at a time"),
            )
        })?;
        Ok(Claimed { session, io })
    }
}

/// A session held for one run.
pub struct Claimed {
    session: Arc<Session>,
    io: OwnedMutexGuard<SessionIo>,
}

/// Where in the timeout's escalation a run is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Interrupted,
    Killed,
    Ending,
}

/// Runs one command in a claimed session; its output is streamed to `sink` when given.
pub async fn run(
    sessions: &Sessions,
    claimed: Claimed,
    req: RunRequest,
    sink: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
) -> Result<RunResult, ApiError> {
    req.validate().map_err(ApiError::bad_request)?;
    let Claimed { session, mut io } = claimed;
    session.runs.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let marker = frame::new_marker();
    let framed = match session.kind {
        SessionKind::Shell => frame::shell_frame(&req.code, &marker),
        SessionKind::Python => frame::python_frame(&req.code, &marker),
    };
    let cap = req.max_output();
    // A streaming client that goes away, or an interrupt, stops the command early.
    let client = sink.clone();
    let mut interrupts = session.interrupts.subscribe();
    let (carried_out, carried_err) = std::mem::take(&mut io.carried);
    let mut out = FramedStream::new(Output::new(Stream::Stdout, cap, sink.clone()), carried_out);
    let mut err = FramedStream::new(Output::new(Stream::Stderr, cap, sink), carried_err);
    let marker = marker.into_bytes();

    let io = &mut *io;
    let mut write = std::pin::pin!(io.stdin.write_all(&framed));
    let mut writing = true;
    let mut phase = Phase::Running;
    let mut timed_out = false;
    let mut next_step = tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms());
    let mut exit_status: Option<i32> = None;
    let mut buf = exec::read_buffer();
    let mut buf2 = exec::read_buffer();
    let mut broken = None;
    let mut stop_early = false;
    while !(out.done() && err.done()) {
        if phase == Phase::Running && !stop_early && (out.client_gone || err.client_gone) {
            // Nobody will see the rest: stop the command now, keep the session in step.
            stop_early = true;
            next_step = tokio::time::Instant::now();
        }
        let early = phase == Phase::Running && !stop_early;
        tokio::select! {
            // A silent command's client is missed by the output pump: watch it too.
            () = closed(client.as_ref()), if early => {
                stop_early = true;
                next_step = tokio::time::Instant::now();
            }
            changed = interrupts.changed(), if early => {
                if changed.is_ok() {
                    stop_early = true;
                    next_step = tokio::time::Instant::now();
                }
            }
            written = &mut write, if writing => {
                writing = false;
                if written.is_err() {
                    // The process is gone; its exit says the rest.
                }
            }
            read = exec::read_into(&mut io.stdout, &mut buf), if !out.done() => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if let Err(e) = out.feed(&buf[..n], &marker).await { broken = Some(e); break },
            },
            read = exec::read_into(&mut io.stderr, &mut buf2), if !err.done() => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if let Err(e) = err.feed(&buf2[..n], &marker).await { broken = Some(e); break },
            },
            status = &mut io.exit => {
                exit_status = Some(status.unwrap_or(libc::SIGKILL));
                break;
            }
            _ = tokio::time::sleep_until(next_step) => {
                timed_out = true;
                next_step = tokio::time::Instant::now() + escalate(&session, &mut phase);
            }
        }
    }
    let mut ended = broken.is_some() || !(out.done() && err.done());
    if ended {
        // The process exited (or its pipes broke) before finishing the frame: take what it
        // wrote last, and make sure it is gone.
        for (pipe, stream) in [(&io.stdout, &mut out), (&io.stderr, &mut err)] {
            while let Ok(n) = exec::read_now(pipe, &mut buf) {
                if n == 0 || stream.feed(&buf[..n], &marker).await.is_err() {
                    break;
                }
            }
        }
        if exit_status.is_none() {
            // Not reaped yet, so the pid is still the session's.
            exec::kill_tree(session.pid);
            exit_status = tokio::time::timeout(KILL_GRACE, &mut io.exit)
                .await
                .ok()
                .and_then(Result::ok);
        }
        sessions.forget(&session);
        ended = true;
    }
    let (stdout, out_truncated, trailer, out_rest) = out.finish().await;
    let (stderr, err_truncated, _, err_rest) = err.finish().await;
    io.carried = (out_rest, err_rest);
    let mut result = RunResult {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        timed_out,
        truncated: out_truncated || err_truncated,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        session_ended: ended,
        ..RunResult::default()
    };
    if ended {
        result.exit_code = exit_status.map_or(128 + libc::SIGKILL, |s| exec::decode_status(s).0);
        return Ok(result);
    }
    match session.kind {
        SessionKind::Shell => {
            result.exit_code = std::str::from_utf8(&trailer)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(-1);
        }
        SessionKind::Python => {
            let parsed: PythonTrailer = serde_json::from_slice(&trailer).map_err(|e| {
                ApiError::internal(format!("the Python session's result line: {e}"))
            })?;
            result.exit_code = i32::from(parsed.error.is_some());
            result.value = parsed.value;
            result.data = parsed.data;
            result.error = parsed.error;
        }
    }
    Ok(result)
}

/// Resolves when the streaming client is gone; never without one.
async fn closed(client: Option<&mpsc::Sender<Result<Bytes, BoxError>>>) {
    match client {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// What the Python helper writes after its marker.
#[derive(serde::Deserialize)]
struct PythonTrailer {
    value: Option<String>,
    data: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    error: Option<PythonError>,
}

/// One step of a timeout: SIGINT to the session's group, then SIGKILL to everything the
/// session started, then the session itself. Returns how long to wait for the next step.
fn escalate(session: &Session, phase: &mut Phase) -> Duration {
    let pid = session.pid;
    match *phase {
        Phase::Running => {
            // SAFETY: kill(2) on the session's own process group.
            unsafe { libc::kill(-pid, libc::SIGINT) };
            *phase = Phase::Interrupted;
            INTERRUPT_GRACE
        }
        Phase::Interrupted => {
            for p in exec::tree(pid) {
                if p != pid {
                    // SAFETY: kill(2) on processes the session started.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            *phase = Phase::Killed;
            KILL_GRACE
        }
        Phase::Killed | Phase::Ending => {
            exec::kill_tree(pid);
            *phase = Phase::Ending;
            KILL_GRACE
        }
    }
}
