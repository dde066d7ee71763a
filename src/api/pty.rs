//! The interactive terminal: `GET /v1/sandboxes/{id}/pty` upgrades to a WebSocket.
//!
//! Binary messages carry the terminal's bytes both ways (keystrokes in, output out; Ctrl-C is
//! the byte 0x03, as on any terminal). Text messages are JSON control messages: the client
//! sends [`PtyControl`] (resize, signal); the server ends with one [`PtyExit`] and a close.

use serde::{Deserialize, Serialize};

/// Largest terminal dimension accepted (columns or rows).
pub const MAX_DIMENSION: u16 = 1000;
/// Largest WebSocket message accepted from a client.
pub const MAX_MESSAGE: usize = 1 << 20;

/// The terminal's initial size: `?cols=&rows=` (default 80 x 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for PtySize {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

impl PtySize {
    /// Reads `cols` and `rows` from a query string; each must be 1 to [`MAX_DIMENSION`].
    pub fn from_query(query: Option<&str>) -> Result<Self, String> {
        let mut size = Self::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "cols" => &mut size.cols,
                "rows" => &mut size.rows,
                _ => continue,
            };
            *slot = value
                .parse()
                .ok()
                .filter(|v| (1..=MAX_DIMENSION).contains(v))
                .ok_or_else(|| format!("`{key}` must be 1 to {MAX_DIMENSION}, not {value:?}"))?;
        }
        Ok(size)
    }

    pub fn query(&self) -> String {
        format!("cols={}&rows={}", self.cols, self.rows)
    }
}

/// A client's control message (a WebSocket text message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyControl {
    /// The terminal's new size; the foreground program gets SIGWINCH.
    Resize { cols: u16, rows: u16 },
    /// A signal for the terminal's foreground process group: `INT`, `TERM`, `KILL`, `HUP`,
    /// `QUIT`, `TSTP`, `CONT`, `USR1`, `USR2`, `WINCH` (with or without `SIG`).
    Signal { signal: String },
}

/// The server's last message: how the terminal's shell ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "exit")]
pub struct PtyExit {
    /// The shell's exit status, or 128 + the signal that ended it.
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// The `Sec-WebSocket-Key` of a WebSocket upgrade request (version 13), or why it is not one.
pub fn websocket_key(headers: &hyper::HeaderMap) -> Result<&str, String> {
    let has = |name: hyper::header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(hyper::header::UPGRADE, "websocket") || !has(hyper::header::CONNECTION, "upgrade") {
        return Err(
            "this route is a WebSocket: send `Connection: Upgrade` and `Upgrade: websocket`".into(),
        );
    }
    if headers
        .get(hyper::header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("`Sec-WebSocket-Version: 13` is required".into());
    }
    headers
        .get(hyper::header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .ok_or_else(|| "a `Sec-WebSocket-Key` is required".into())
}

/// The signal number for a [`PtyControl::Signal`] name.
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "INT" => libc::SIGINT,
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "TSTP" => libc::SIGTSTP,
        "CONT" => libc::SIGCONT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_control_messages_parse_within_bounds() {
        assert_eq!(PtySize::from_query(None), Ok(PtySize::default()));
        assert_eq!(
            PtySize::from_query(Some("rows=50&cols=132&x=1")),
            Ok(PtySize {
                cols: 132,
                rows: 50
            })
        );
        for bad in ["cols=0", "rows=1001", "cols=abc", "rows="] {
            assert!(PtySize::from_query(Some(bad)).is_err(), "{bad}");
        }
        let resize: PtyControl =
            serde_json::from_str(r#"{"type":"resize","cols":100,"rows":30}"#).expect("resize");
        assert_eq!(
            resize,
            PtyControl::Resize {
                cols: 100,
                rows: 30
            }
        );
        assert_eq!(signal_number("SIGINT"), Some(libc::SIGINT));
        assert_eq!(signal_number("TERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("STOP"), None);
        let exit = serde_json::to_value(PtyExit {
            exit_code: 3,
            signal: None,
        })
        .expect("json");
        assert_eq!(exit, serde_json::json!({"type": "exit", "exit_code": 3}));
    }
}
