//! Acquire requests and sandbox views.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most sandboxes one acquire may ask for.
pub const MAX_ACQUIRE_COUNT: usize = 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Applied to every exec in the sandbox (late binding onto a warm sandbox).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl AcquireRequest {
    pub fn validate(&self) -> Result<usize, String> {
        let count = self.count.unwrap_or(1);
        if count == 0 || count > MAX_ACQUIRE_COUNT {
            return Err(format!("`count` must be between 1 and {MAX_ACQUIRE_COUNT}"));
        }
        for (key, value) in &self.env {
            validate_env(key, value)?;
        }
        if self.labels.len() > 64 {
            return Err("at most 64 labels".into());
        }
        Ok(count)
    }
}

/// An environment variable a process can be given: a non-empty name without `=` or NUL, a
/// value without NUL.
pub fn validate_env(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.contains('=') || key.contains('\0') {
        Err(format!("invalid environment variable name {key:?}"))
    } else if value.contains('\0') {
        Err(format!("environment variable {key} holds a NUL byte"))
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Idle,
    Allocated,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub pool: String,
    pub state: SandboxState,
    pub created_at_ms: u64,
    pub acquired_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub workspace: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxInfo>,
}
