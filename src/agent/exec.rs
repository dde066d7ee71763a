//! Running commands: spawn, capture or stream output with a cap, time out, kill the tree.
//!
//! The agent is PID 1 of its sandbox, so it reaps every process (orphans included) itself:
//! a single SIGCHLD loop calls `waitpid(-1)` and hands each status to whoever spawned the pid.
//! Commands are started by [`super::spawn`] (clone + execve; no restrictions to apply on the
//! way: the sandbox's are already on the agent and are inherited).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::oom::OomCounter;
use super::spawn::{self, Spawned};
use crate::api::{ApiError, ExecEvent, ExecRequest, ExecResult, WORKSPACE};
use crate::http::{BoxError, ndjson_line};
use crate::util::MutexExt;

/// Where a command's output goes.
pub enum Sink {
    /// Collected into the result.
    Capture,
    /// Sent as NDJSON lines as it comes.
    Stream(mpsc::Sender<Result<Bytes, BoxError>>),
    /// Like `Stream`, opened by a `{"type":"started","pid":N}` line, so that the caller can
    /// signal the command while it runs (see [`signal`]).
    StreamWithPid(mpsc::Sender<Result<Bytes, BoxError>>),
}

#[derive(Default)]
pub struct Children {
    waiting: Mutex<HashMap<i32, oneshot::Sender<i32>>>,
    /// Told after every pass of [`reap`](Self::reap).
    pub reaped: Notify,
    /// The sandbox's OOM-kill count, to tell the OOM killer's SIGKILL from others.
    oom: OomCounter,
}

impl Children {
    pub fn new(oom: OomCounter) -> Self {
        Self {
            oom,
            ..Self::default()
        }
    }

    /// Reaps every exited child, handing statuses to their waiters. Returns whether any process
    /// is left: as PID 1 of the sandbox the agent is every process's parent or reaper, so none
    /// left means the sandbox holds nothing else.
    pub fn reap(&self) -> bool {
        let mut waiting = self.waiting.lock_or_recover();
        let left = loop {
            let mut status = 0;
            // SAFETY: non-blocking waitpid for any child.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == 0 {
                break true;
            }
            if pid < 0 {
                break std::io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD);
            }
            if let Some(tx) = waiting.remove(&pid) {
                let _ = tx.send(status);
            }
        };
        drop(waiting);
        self.reaped.notify_waiters();
        left
    }

    /// Whether `pid` is a command this agent started and has not reaped yet.
    pub fn is_running(&self, pid: i32) -> bool {
        self.waiting.lock_or_recover().contains_key(&pid)
    }

    /// Spawns under the reaper's lock, so the exit cannot be reaped before it is awaited.
    pub(super) fn spawn(
        &self,
        start: impl FnOnce() -> std::io::Result<Spawned>,
    ) -> std::io::Result<(Spawned, oneshot::Receiver<i32>)> {
        let mut waiting = self.waiting.lock_or_recover();
        let child = start()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.pid, tx);
        Ok((child, rx))
    }

    /// Like [`spawn`](Self::spawn), for a start that hands back only the pid.
    pub(super) fn spawn_pid(
        &self,
        start: impl FnOnce() -> std::io::Result<i32>,
    ) -> std::io::Result<(i32, oneshot::Receiver<i32>)> {
        let mut waiting = self.waiting.lock_or_recover();
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(pid, tx);
        Ok((pid, rx))
    }
}

/// Runs one exec to completion.
pub async fn run(
    children: &Children,
    base_env: &[(String, String)],
    req: ExecRequest,
    sink: Sink,
) -> Result<ExecResult, ApiError> {
    let (argv, stdin) = req.validate().map_err(ApiError::bad_request)?;
    let stdin = stdin.map(Bytes::from);
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

    // The exec's environment: the agent's base, then the request's (later keys win).
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

    let started = Instant::now();
    let oom_kills_before = children.oom.count();
    let (child, exit_rx) = match children.spawn(|| spawn::spawn(&argv, &env, &cwd, stdin.is_some()))
    {
        Ok(spawned) => spawned,
        Err(e) => return Ok(spawn_failure(&argv[0], &e, started)),
    };
    let pid = child.pid;
    let (stdin_fd, stdout_fd, stderr_fd) = (child.stdin, child.stdout, child.stderr);
    let pipes = (|| -> std::io::Result<_> {
        Ok((
            stdin_fd.map(pipe::Sender::from_owned_fd).transpose()?,
            pipe::Receiver::from_owned_fd(stdout_fd)?,
            pipe::Receiver::from_owned_fd(stderr_fd)?,
        ))
    })();
    let (stdin_pipe, stdout, stderr) = match pipes {
        Ok(p) => p,
        Err(e) => {
            kill_tree(pid);
            return Err(ApiError::internal(format!("output pipes: {e}")));
        }
    };
    if let (Some(mut tx), Some(data)) = (stdin_pipe, stdin) {
        tokio::spawn(async move {
            // A command that never reads its stdin just makes this write fail: fine.
            let _ = tx.write_all(&data).await;
        });
    }

    let cap = req.max_output();
    let (exited_tx, exited_rx) = watch::channel(false);
    let stream_tx = match &sink {
        Sink::Stream(tx) => Some(tx.clone()),
        Sink::StreamWithPid(tx) => {
            let started = serde_json::json!({"type": "started", "pid": pid});
            let _ = tx.send(Ok(ndjson_line(&started))).await;
            Some(tx.clone())
        }
        Sink::Capture => None,
    };
    let out = tokio::spawn(pump(
        pid,
        stdout,
        Stream::Stdout,
        cap,
        stream_tx.clone(),
        exited_rx.clone(),
    ));
    let err = tokio::spawn(pump(pid, stderr, Stream::Stderr, cap, stream_tx, exited_rx));

    let timeout = Duration::from_millis(req.timeout_ms());
    let mut timed_out = false;
    tokio::pin!(exit_rx);
    let status = tokio::select! {
        status = &mut exit_rx => status.ok(),
        _ = tokio::time::sleep(timeout) => {
            timed_out = true;
            kill_tree(pid);
            (&mut exit_rx).await.ok()
        }
    };
    let _ = exited_tx.send(true);
    let (stdout, out_truncated) = out.await.unwrap_or_default();
    let (stderr, err_truncated) = err.await.unwrap_or_default();
    let status = status.unwrap_or(libc::SIGKILL);
    let (exit_code, signal) = decode_status(status);
    // SIGKILL, or a shell's report of its child's (128 + 9), while the kernel counted an OOM
    // kill in the sandbox. Concurrent commands of one sandbox share the count.
    let oom_killed = exit_code == 128 + libc::SIGKILL
        && !timed_out
        && matches!(
            (oom_kills_before, children.oom.count()),
            (Some(before), Some(after)) if after > before
        );
    Ok(ExecResult {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        exit_code,
        signal,
        timed_out,
        truncated: out_truncated || err_truncated,
        oom_killed,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// A program that cannot be started is a result (as a shell reports it), not an API error.
fn spawn_failure(program: &str, e: &std::io::Error, started: Instant) -> ExecResult {
    let (code, what) = match e.kind() {
        std::io::ErrorKind::NotFound => (127, "command not found"),
        std::io::ErrorKind::PermissionDenied => (126, "permission denied"),
        _ => (126, "cannot execute"),
    };
    ExecResult {
        stderr: format!("arl: {program}: {what} ({e})\n"),
        exit_code: code,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        ..ExecResult::default()
    }
}

pub(super) fn decode_status(status: i32) -> (i32, Option<i32>) {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (libc::WEXITSTATUS(status), None)
    }
}

#[derive(Clone, Copy)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

/// Reads one output pipe until EOF, or until the command has exited and the pipe is empty
/// (a background process may keep it open). Returns (captured, truncated). When a streaming
/// client goes away nobody will see the rest, so the command is killed.
async fn pump(
    pid: i32,
    mut pipe: pipe::Receiver,
    which: Stream,
    cap: usize,
    stream: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
    mut exited: watch::Receiver<bool>,
) -> (Vec<u8>, bool) {
    let mut buf = read_buffer();
    let mut out = Output::new(which, cap, stream);
    loop {
        tokio::select! {
            biased;
            read = read_into(&mut pipe, &mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if !out.push(&buf[..n]).await { kill_tree(pid); return out.finish(true).await },
            },
            changed = exited.changed() => {
                if changed.is_err() || *exited.borrow() {
                    loop {
                        // Ask the kernel, not the reactor's readiness cache: output written
                        // just before the exit may not have been seen by the reactor yet.
                        match read_now(&pipe, &mut buf) {
                            Ok(0) => break,
                            Ok(n) => if !out.push(&buf[..n]).await { kill_tree(pid); return out.finish(true).await },
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                // Keep draining (and discarding) for background writers, so
                                // they do not die of SIGPIPE; the task ends at their EOF.
                                tokio::spawn(async move {
                                    let mut sink = vec![0u8; 16 * 1024];
                                    while matches!(pipe.read(&mut sink).await, Ok(n) if n > 0) {}
                                });
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    break;
                }
            }
        }
    }
    out.finish(false).await
}

/// The first read of an output pipe takes at most this much: most commands print little.
const FIRST_READ: usize = 4 * 1024;
/// Reads grow (doubling while each fills the buffer) up to this much.
const MAX_READ: usize = 64 * 1024;

/// An output pipe's read buffer. Reads land in its spare capacity, so it is never zeroed (two
/// zeroed 32 KiB buffers per command were a measurable share of an exec's CPU).
pub(super) fn read_buffer() -> Vec<u8> {
    Vec::with_capacity(FIRST_READ)
}

/// Empties `buf` for the next read, first doubling its capacity if the last read filled it.
fn make_room(buf: &mut Vec<u8>) {
    if buf.len() == buf.capacity() && buf.capacity() < MAX_READ {
        let more = buf.capacity().min(MAX_READ - buf.capacity());
        buf.reserve_exact(more);
    }
    buf.clear();
}

/// One read through the reactor into `buf` (which then holds exactly what was read).
/// Cancel-safe, like `read_buf`: when another branch of a `select!` wins, nothing was read.
pub(super) async fn read_into(
    pipe: &mut pipe::Receiver,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    make_room(buf);
    pipe.read_buf(buf).await
}

/// One non-blocking read(2) on the pipe into `buf`, bypassing the reactor.
pub(super) fn read_now(pipe: &pipe::Receiver, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    make_room(buf);
    // SAFETY: read(2) into the vector's spare capacity from a descriptor the receiver owns
    // (non-blocking); the kernel initialised the `n` bytes it reports, and only those count.
    let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.capacity()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above; n <= capacity.
    unsafe { buf.set_len(n as usize) };
    Ok(n as usize)
}

pub(super) struct Output {
    captured: Vec<u8>,
    seen: usize,
    cap: usize,
    truncated: bool,
    pending_utf8: Vec<u8>,
    which: Stream,
    stream: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
}

impl Output {
    /// Collects (or, given a channel, streams) one output stream of a command, keeping at
    /// most `cap` bytes.
    pub(super) fn new(
        which: Stream,
        cap: usize,
        stream: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
    ) -> Self {
        Self {
            captured: Vec::new(),
            seen: 0,
            cap,
            truncated: false,
            pending_utf8: Vec::new(),
            which,
            stream,
        }
    }

    /// Takes a chunk; false when the streaming client is gone.
    pub(super) async fn push(&mut self, chunk: &[u8]) -> bool {
        let room = self.cap.saturating_sub(self.seen);
        let kept = &chunk[..chunk.len().min(room)];
        if kept.len() < chunk.len() {
            self.truncated = true;
        }
        self.seen += kept.len();
        if kept.is_empty() {
            return true;
        }
        match &self.stream {
            None => {
                self.captured.extend_from_slice(kept);
                true
            }
            Some(_) => {
                self.pending_utf8.extend_from_slice(kept);
                let text = take_utf8(&mut self.pending_utf8);
                self.send(text).await
            }
        }
    }

    async fn send(&self, text: String) -> bool {
        let Some(tx) = &self.stream else { return true };
        if text.is_empty() {
            return true;
        }
        let event = match self.which {
            Stream::Stdout => ExecEvent::Stdout { data: text },
            Stream::Stderr => ExecEvent::Stderr { data: text },
        };
        tx.send(Ok(ndjson_line(&event))).await.is_ok()
    }

    pub(super) async fn finish(mut self, gone: bool) -> (Vec<u8>, bool) {
        if !gone && !self.pending_utf8.is_empty() {
            let rest =
                String::from_utf8_lossy(&std::mem::take(&mut self.pending_utf8)).into_owned();
            let _ = self.send(rest).await;
        }
        (self.captured, self.truncated)
    }
}

/// Removes the longest valid UTF-8 prefix of `buf`, keeping an incomplete trailing character
/// for the next chunk; invalid bytes become U+FFFD.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    let keep_from = match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    let rest = buf.split_off(keep_from);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    text
}

/// Signals a running command: SIGKILL stops its whole tree (as a timeout does), any other
/// signal goes to its process group. False when `pid` is not a running command of this agent
/// (nothing else, the agent least of all, may be signalled this way).
pub fn signal(children: &Children, pid: i32, signal: i32) -> bool {
    if pid <= 1 || !children.is_running(pid) {
        return false;
    }
    if signal == libc::SIGKILL {
        kill_tree(pid);
    } else {
        // SAFETY: kill(2) on the process group of a command the agent started.
        unsafe { libc::kill(-pid, signal) };
    }
    true
}

/// Stops then kills a process and all its descendants (and its process group).
pub fn kill_tree(root: i32) {
    for signal in [libc::SIGSTOP, libc::SIGKILL] {
        for pid in tree(root) {
            // SAFETY: kill(2) on pids of our own sandbox.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// `root`, its descendants and its process group, from one scan of /proc.
pub(super) fn tree(root: i32) -> HashSet<i32> {
    let procs: Vec<(i32, i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
            let ppid = fields.nth(1)?.parse().ok()?;
            let pgrp = fields.next()?.parse().ok()?;
            Some((pid, ppid, pgrp))
        })
        .collect();
    let mut set = HashSet::from([root]);
    loop {
        let before = set.len();
        for &(pid, ppid, pgrp) in &procs {
            if pid != 1 && (set.contains(&ppid) || pgrp == root) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// Kills every process of the sandbox but the agent (`kill(-1)` from PID 1 spares itself).
pub fn kill_all_but_self() {
    // SAFETY: kill(2) with pid -1 from the namespace's init.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}
