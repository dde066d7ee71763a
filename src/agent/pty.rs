//! `GET /pty`: an interactive terminal over a WebSocket (see [`crate::api::pty`]).
//!
//! The agent opens a PTY, starts the sandbox's shell (`/bin/bash` where there is one, else
//! `/bin/sh`) on its secondary end as the leader of a new session with the terminal as its
//! controlling one, answers `101 Switching Protocols` and then relays: binary messages to the
//! terminal, the terminal's output as binary messages, resizes and signals from text messages.
//! When the shell ends, its remaining output, a `{"type":"exit"}` message and a close follow.
//! A client that goes away hangs the terminal up (its whole process tree is killed).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::Agent;
use super::exec;
use super::spawn;
use crate::api::pty::{MAX_MESSAGE, PtyControl, PtyExit, PtySize, signal_number, websocket_key};
use crate::api::{ApiError, ErrorCode, WORKSPACE};
use crate::http::{self, Body};

/// Keystrokes waiting for the terminal to take them, at most; past this the client is not
/// read from until the terminal catches up.
const MAX_PENDING_INPUT: usize = 1 << 20;
/// Terminals open at once in one sandbox (the agent serves one sandbox).
const MAX_TERMINALS: usize = 8;
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// One open terminal, counted until dropped.
struct Counted;

impl Counted {
    fn claim() -> Option<Self> {
        OPEN.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_TERMINALS).then_some(n + 1)
        })
        .ok()
        .map(|_| Self)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::AcqRel);
    }
}

pub async fn route(agent: &Arc<Agent>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let key = websocket_key(req.headers()).map_err(ApiError::bad_request)?;
    let accept = derive_accept_key(key.as_bytes());
    let size = PtySize::from_query(req.uri().query()).map_err(ApiError::bad_request)?;
    let counted = Counted::claim().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            format!("a sandbox has at most {MAX_TERMINALS} terminals open; close one first"),
        )
    })?;
    let (master, secondary) =
        open_pty(size).map_err(|e| ApiError::internal(format!("opening a terminal: {e}")))?;
    let shell = if std::path::Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let argv = vec![shell.to_string()];
    let mut env: Vec<(&str, &str)> = agent
        .base_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, _)| *k != "TERM")
        .collect();
    env.push(("TERM", "xterm-256color"));
    let (pid, exit) = agent
        .children
        .spawn_pid(|| spawn::spawn_on_tty(&argv, &env, WORKSPACE, &secondary))
        .map_err(|e| ApiError::internal(format!("starting {shell}: {e}")))?;
    // The shell holds the secondary end now: once it (and what it started) is gone, reading
    // the terminal says so.
    drop(secondary);
    let master = match set_nonblocking(master).and_then(|fd| {
        // SAFETY: the descriptor is owned by the AsyncFd from here on and closed by it only.
        unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
    }) {
        Ok(m) => m,
        Err(e) => {
            exec::kill_tree(pid);
            return Err(ApiError::internal(format!("the terminal: {e}")));
        }
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let _counted = counted;
        match upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_MESSAGE))
                    .max_frame_size(Some(MAX_MESSAGE));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                relay(ws, master, pid, exit).await;
            }
            Err(_) => exec::kill_tree(pid),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, accept)
        .body(http::empty())
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// A new PTY of the given size: its primary and secondary ends, both close-on-exec.
fn open_pty(size: PtySize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt(3) returns a new descriptor we own (or -1).
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: PTY calls on our descriptor; ptsname_r writes at most `name.len()` bytes.
    let path = unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0
            || libc::unlockpt(master.as_raw_fd()) != 0
            || libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        std::ffi::CStr::from_ptr(name.as_ptr()).to_owned()
    };
    // SAFETY: open(2) of the secondary end named by the kernel.
    let secondary = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if secondary < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let secondary = unsafe { OwnedFd::from_raw_fd(secondary) };
    resize(&master, size.cols, size.rows)?;
    Ok((master, secondary))
}

fn resize(master: &OwnedFd, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from our stack.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: fcntl(2) flag changes on our descriptor.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: read(2) into our buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: write(2) from our buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// Sends a signal to the terminal's foreground process group (the shell's when it has none).
fn signal_foreground(master: &OwnedFd, shell: i32, sig: i32) {
    // SAFETY: tcgetpgrp(3) on our terminal; kill(2) on a group of the sandbox.
    unsafe {
        let group = libc::tcgetpgrp(master.as_raw_fd());
        libc::kill(-(if group > 0 { group } else { shell }), sig);
    }
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn relay(mut ws: Ws, master: AsyncFd<OwnedFd>, pid: i32, mut exit: oneshot::Receiver<i32>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    // The terminal's output is readable until every holder of its secondary end is gone.
    let mut output_open = true;
    let status = loop {
        tokio::select! {
            ready = master.readable(), if output_open => {
                let Ok(mut guard) = ready else { output_open = false; continue };
                match guard.try_io(|fd| read_fd(fd.get_ref(), &mut buf)) {
                    Ok(Ok(0)) | Ok(Err(_)) => output_open = false,
                    Ok(Ok(n)) => {
                        if ws.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            exec::kill_tree(pid);
                            return;
                        }
                    }
                    Err(_would_block) => {}
                }
            }
            ready = master.writable(), if !pending.is_empty() => {
                let Ok(mut guard) = ready else { pending.clear(); continue };
                match guard.try_io(|fd| write_fd(fd.get_ref(), &pending)) {
                    Ok(Ok(n)) => { pending.drain(..n); }
                    Ok(Err(_)) => pending.clear(),
                    Err(_would_block) => {}
                }
            }
            message = ws.next(), if pending.len() < MAX_PENDING_INPUT => match message {
                Some(Ok(Message::Binary(data))) => pending.extend_from_slice(&data),
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<PtyControl>(text.as_str()) {
                        Ok(PtyControl::Resize { cols, rows }) => {
                            let _ = resize(master.get_ref(), cols.clamp(1, crate::api::pty::MAX_DIMENSION), rows.clamp(1, crate::api::pty::MAX_DIMENSION));
                        }
                        Ok(PtyControl::Signal { signal }) => {
                            if let Some(sig) = signal_number(&signal) {
                                signal_foreground(master.get_ref(), pid, sig);
                            }
                        }
                        Err(_) => {}
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    // The client hung up: so does the terminal.
                    exec::kill_tree(pid);
                    return;
                }
                Some(Ok(_)) => {}
            },
            status = &mut exit => break status.unwrap_or(libc::SIGKILL),
        }
    };
    // The shell is gone: pass on what it wrote last (processes it left behind may keep the
    // terminal open; what is there now is sent, nothing is waited for).
    while output_open {
        match read_fd(master.get_ref(), &mut buf) {
            Ok(n) if n > 0 => {
                if ws.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
            _ => output_open = false,
        }
    }
    let (exit_code, signal) = exec::decode_status(status);
    let end = PtyExit { exit_code, signal };
    let text = serde_json::to_string(&end).unwrap_or_default();
    let _ = ws.send(Message::text(text)).await;
    let _ = ws.close(None).await;
}
