//! Snapshots of a sandbox's writable state, and forks from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sandboxes::{MAX_ACQUIRE_COUNT, validate_env};

/// A snapshot: the files of a sandbox at one moment (never its processes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// The pool of the sandbox it was taken from; forks join this pool.
    pub pool: String,
    /// The sandbox it was taken from.
    pub sandbox: String,
    /// The snapshot that sandbox was forked from, if any (this one is stacked on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// File data it holds (not counting its parent's).
    pub bytes: u64,
    pub created_at_ms: u64,
    /// Live sandboxes forked from it (or from snapshots stacked on it).
    #[serde(default)]
    pub forks: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
}

/// `POST /v1/snapshots/{id}/fork` and `POST /v1/sandboxes/{id}/fork`: new sandboxes that start
/// with the snapshot's (or the live sandbox's) files and env, in its pool.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Added over the parent's env.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
}

impl ForkRequest {
    /// The number of forks, once the request is checked.
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
