//! Persistent sessions: a long-lived shell or Python interpreter in a sandbox, run one command
//! (or snippet) at a time, whose state carries over from one to the next.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::exec::{DEFAULT_MAX_OUTPUT, DEFAULT_TIMEOUT_MS, MAX_OUTPUT_LIMIT, MAX_TIMEOUT_MS};

/// Live sessions per sandbox, at most.
pub const MAX_SESSIONS: usize = 16;
/// Largest command or snippet, in bytes.
pub const MAX_CODE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// A `/bin/sh` whose working directory, variables, functions and background jobs persist.
    Shell,
    /// A `python3` interpreter whose globals persist.
    Python,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shell => "shell",
            Self::Python => "python",
        }
    }
}

/// `POST .../sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    pub kind: SessionKind,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl CreateSessionRequest {
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(format!("invalid environment variable {k:?}"));
            }
        }
        if self.cwd.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err("`cwd` may not contain NUL bytes".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    pub kind: SessionKind,
    /// The shell's or interpreter's pid inside the sandbox.
    pub pid: i32,
    pub created_at_ms: u64,
    /// Commands (or snippets) run so far.
    pub runs: u64,
    /// A command is running right now.
    pub busy: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

/// `POST .../sessions/{sid}/run`: one shell command line or one Python snippet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<usize>,
}

impl RunRequest {
    pub fn validate(&self) -> Result<(), String> {
        if self.code.len() > MAX_CODE_BYTES {
            return Err(format!("`code` is longer than {MAX_CODE_BYTES} bytes"));
        }
        if self.code.contains('\0') {
            return Err("`code` may not contain NUL bytes".into());
        }
        Ok(())
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
            .unwrap_or(DEFAULT_TIMEOUT_MS)
            .clamp(1, MAX_TIMEOUT_MS)
    }

    pub fn max_output(&self) -> usize {
        self.max_output_bytes
            .unwrap_or(DEFAULT_MAX_OUTPUT)
            .min(MAX_OUTPUT_LIMIT)
    }
}

/// A Python exception raised by a snippet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonError {
    /// The exception's class name (`ZeroDivisionError`, `KeyboardInterrupt`, ...).
    pub ename: String,
    pub evalue: String,
    /// The formatted traceback, one entry per line.
    pub traceback: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub stdout: String,
    pub stderr: String,
    /// Shell: the command's exit status (130 after an interrupt). Python: 0, or 1 when the
    /// snippet raised.
    pub exit_code: i32,
    /// The timeout interrupted the command (SIGINT; then SIGKILL if it would not stop).
    pub timed_out: bool,
    /// Some output went past `max_output_bytes` and was dropped.
    pub truncated: bool,
    pub duration_ms: f64,
    /// The session's process ended (`exit` in a shell, or a command that would not stop):
    /// the session is gone and later runs answer 404.
    #[serde(default)]
    pub session_ended: bool,
    /// Python: `repr` of the snippet's final expression, when it has one and it is not None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Python: the final expression's rich representations by MIME type (`text/plain`,
    /// `text/html`, `image/png` as base64, ...), when the object offers more than its repr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<BTreeMap<String, serde_json::Value>>,
    /// Python: the exception the snippet raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<PythonError>,
}

/// One line of a streamed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    Stdout { data: String },
    Stderr { data: String },
    Result(RunResult),
    Error { error: super::ApiError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded_and_checked() {
        let run: RunRequest = serde_json::from_str(r#"{"code":"true"}"#).expect("run");
        assert_eq!(run.timeout_ms(), DEFAULT_TIMEOUT_MS);
        assert_eq!(run.max_output(), DEFAULT_MAX_OUTPUT);
        let huge = RunRequest {
            code: String::new(),
            timeout_ms: Some(u64::MAX),
            max_output_bytes: Some(usize::MAX),
        };
        assert_eq!(huge.timeout_ms(), MAX_TIMEOUT_MS);
        assert_eq!(huge.max_output(), MAX_OUTPUT_LIMIT);
        assert!(
            RunRequest {
                code: "a\0b".into(),
                ..huge
            }
            .validate()
            .is_err()
        );
        serde_json::from_str::<CreateSessionRequest>(r#"{"kind":"ruby"}"#).expect_err("kind");
        serde_json::from_str::<CreateSessionRequest>(r#"{"kind":"shell","x":1}"#)
            .expect_err("unknown field");
        let bad_env: CreateSessionRequest =
            serde_json::from_str(r#"{"kind":"shell","env":{"A=B":"c"}}"#).expect("parses");
        assert!(bad_env.validate().is_err());
    }
}
