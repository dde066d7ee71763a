//! `arl shell SANDBOX`: an interactive terminal in a sandbox you hold, over the node's
//! `GET /v1/sandboxes/{id}/pty` WebSocket. The local terminal is put in raw mode (restored on
//! exit), its size is sent at the start and on every SIGWINCH, and the command exits with the
//! remote shell's status.

use std::io::{Read, Write};

use futures_util::{SinkExt, StreamExt};
use hyper::header::{AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{CliError, ClientArgs};
use crate::api::ErrorBody;
use crate::api::pty::{PtyControl, PtyExit, PtySize};

/// The local terminal in raw mode for as long as this lives.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on stdin, when stdin is a terminal.
    fn enable() -> Option<Self> {
        // SAFETY: termios calls on fd 0 with structs on our stack.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// The local terminal's size (stdout's, else stdin's), or 80 x 24.
fn local_size() -> PtySize {
    for fd in [1, 0] {
        // SAFETY: TIOCGWINSZ writes a winsize to our stack.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return PtySize {
                cols: ws.ws_col.min(crate::api::pty::MAX_DIMENSION),
                rows: ws.ws_row.clamp(1, crate::api::pty::MAX_DIMENSION),
            };
        }
    }
    PtySize::default()
}

pub async fn shell(args: &ClientArgs, sandbox: &str) -> Result<i32, CliError> {
    let (endpoint, authority) = args.first_endpoint()?;
    let size = local_size();
    let url = format!(
        "ws://{authority}/v1/sandboxes/{sandbox}/pty?{}",
        size.query()
    );
    let mut request = url
        .into_client_request()
        .map_err(|e| CliError::Usage(format!("bad sandbox id {sandbox:?}: {e}")))?;
    if let Some(token) = &args.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| CliError::Usage("the token is not a valid header value".into()))?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|source| CliError::Connect {
            endpoint: endpoint.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let (ws, _) = match tokio_tungstenite::client_async(request, stream).await {
        Ok(pair) => pair,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let message = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
                .map_or_else(|| status.to_string(), |b| b.error.message);
            return Err(CliError::Api { status, message });
        }
        Err(e) => return Err(CliError::Http(e.to_string())),
    };
    let (mut tx, mut rx) = ws.split();

    // Keystrokes from a thread of their own: a blocking read of stdin must not hold the
    // runtime up at exit.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| CliError::Usage(format!("SIGWINCH: {e}")))?;
    let raw = RawMode::enable();
    let mut stdin_open = true;
    let mut exit = None;
    loop {
        tokio::select! {
            key = keys.recv(), if stdin_open => match key {
                Some(bytes) => {
                    if tx.send(Message::binary(bytes)).await.is_err() {
                        break;
                    }
                }
                // End of input: the remote shell sees it as Ctrl-D on an empty line.
                None => {
                    stdin_open = false;
                    let _ = tx.send(Message::binary(vec![4u8])).await;
                }
            },
            _ = winch.recv() => {
                let PtySize { cols, rows } = local_size();
                let resize = serde_json::to_string(&PtyControl::Resize { cols, rows })
                    .unwrap_or_default();
                if tx.send(Message::text(resize)).await.is_err() {
                    break;
                }
            }
            message = rx.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&bytes);
                    let _ = out.flush();
                }
                Some(Ok(Message::Text(text))) => {
                    if let Ok(end) = serde_json::from_str::<PtyExit>(text.as_str()) {
                        exit = Some(end.exit_code);
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    drop(raw);
    exit.ok_or_else(|| CliError::Http("the terminal closed without an exit status".into()))
}
