//! Exec requests, results and streamed events.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Default per-stream output cap.
pub const DEFAULT_MAX_OUTPUT: usize = 1 << 20;
/// Largest per-stream output cap a caller may ask for.
pub const MAX_OUTPUT_LIMIT: usize = 64 << 20;
/// Default timeout of one exec.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Longest timeout of one exec.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv, run without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A shell string, run as `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<usize>,
    /// Idempotency key: a retry with the same id returns the first result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ExecRequest {
    /// The argv to run, or why the request names none.
    pub fn argv(&self) -> Result<Vec<String>, String> {
        match (&self.cmd, &self.shell) {
            (Some(_), Some(_)) => Err("give either `cmd` or `shell`, not both".into()),
            (Some(cmd), None) if cmd.is_empty() => Err("`cmd` is empty".into()),
            (Some(cmd), None) => Ok(cmd.clone()),
            (None, Some(shell)) => Ok(vec!["/bin/sh".into(), "-c".into(), shell.clone()]),
            (None, None) => Err("one of `cmd` or `shell` is required".into()),
        }
    }

    /// Checks everything that can be checked without the sandbox; returns the argv and the
    /// stdin bytes. The daemon calls it before forwarding, the agent before spawning.
    pub fn validate(&self) -> Result<(Vec<String>, Option<Vec<u8>>), String> {
        use base64::Engine;
        let argv = self.argv()?;
        if argv.iter().any(|a| a.contains('\0')) {
            return Err("arguments may not contain NUL bytes".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(format!("invalid environment variable {k:?}"));
            }
        }
        if self.cwd.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err("`cwd` may not contain NUL bytes".into());
        }
        let stdin = match (&self.stdin, &self.stdin_b64) {
            (Some(_), Some(_)) => return Err("give either `stdin` or `stdin_b64`".into()),
            (Some(s), None) => Some(s.clone().into_bytes()),
            (None, Some(b)) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("invalid stdin_b64: {e}"))?,
            ),
            (None, None) => None,
        };
        Ok((argv, stdin))
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    /// The exit status; `128 + signal` when a signal ended the process.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Some output went past `max_output_bytes` and was dropped.
    pub truncated: bool,
    /// The kernel's OOM killer ended the command (the sandbox's memory cgroup counted an OOM
    /// kill while it ran, and it died of SIGKILL).
    #[serde(default)]
    pub oom_killed: bool,
    pub duration_ms: f64,
}

impl ExecResult {
    pub fn outcome(&self) -> ExecOutcome {
        if self.timed_out {
            ExecOutcome::Timeout
        } else if self.exit_code == 0 {
            ExecOutcome::Ok
        } else {
            ExecOutcome::Nonzero
        }
    }
}

/// The bounded label set of the exec counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    Ok,
    Nonzero,
    Timeout,
    Error,
}

impl ExecOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Nonzero => "nonzero",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "ok" => Self::Ok,
            "nonzero" => Self::Nonzero,
            "timeout" => Self::Timeout,
            _ => Self::Error,
        }
    }
}

/// One line of a streamed exec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Stdout { data: String },
    Stderr { data: String },
    Result(ExecResult),
    Error { error: super::ApiError },
}

/// The agent's `POST /signal`: a signal for a running command, by the pid its streamed exec
/// reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub pid: i32,
    pub signal: i32,
}
