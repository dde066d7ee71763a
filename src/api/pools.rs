//! Pool specifications and status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    Process,
    /// Containers from images in containerd's store (namespace `arl`).
    Containerd,
    /// Pods on this node of a Kubernetes cluster (`arl node --kubernetes`).
    Kubernetes,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Containerd => "containerd",
            Self::Kubernetes => "kubernetes",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReusePolicy {
    /// Destroy a released sandbox and warm a fresh one.
    #[default]
    Destroy,
    /// Kill its processes, wipe its workspace and put it back in the pool.
    Reset,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// A private network namespace with loopback only.
    #[default]
    None,
    /// The host's network namespace.
    Host,
}

/// The longest idle time before an auto-pause: a year.
pub const MAX_AUTO_PAUSE_SECONDS: u64 = 365 * 24 * 3600;

/// What a pool's sandboxes look like and how many to keep warm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSpec {
    pub runtime: RuntimeKind,
    pub min_idle: usize,
    pub max: usize,
    pub reuse: ReusePolicy,
    pub memory_mb: u64,
    pub pids: u64,
    /// CPU quota in thousandths of a core.
    pub cpu_millis: u64,
    /// Size of the private writable layer (tmpfs).
    pub disk_mb: u64,
    pub network: NetworkMode,
    /// A root filesystem directory to overlay instead of the host's system directories.
    pub rootfs: Option<String>,
    /// The container image of a `containerd` pool, e.g. `docker.io/library/python:3.12`.
    pub image: Option<String>,
    /// Mount the image's root filesystem read-only (`containerd` pools; `/workspace` and
    /// `/tmp` stay writable).
    pub read_only_root: bool,
    /// The pod template of a `kubernetes` pool (metadata and spec, as in a Deployment; its
    /// first container runs the agent), instead of `image`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<serde_json::Value>,
    pub env: BTreeMap<String, String>,
    pub idle_timeout_seconds: Option<u64>,
    pub max_lifetime_seconds: Option<u64>,
    /// Freeze a leased sandbox (no CPU, memory kept) once no request has touched it for this
    /// long; the next request thaws it first.
    pub auto_pause_after_seconds: Option<u64>,
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Process,
            min_idle: 2,
            max: 64,
            reuse: ReusePolicy::Destroy,
            memory_mb: 512,
            pids: 256,
            cpu_millis: 1000,
            disk_mb: 1024,
            network: NetworkMode::None,
            rootfs: None,
            image: None,
            read_only_root: false,
            template: None,
            env: BTreeMap::new(),
            idle_timeout_seconds: None,
            max_lifetime_seconds: None,
            auto_pause_after_seconds: None,
        }
    }
}

impl PoolSpec {
    /// Checks bounds; the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.max == 0 {
            return Err("`max` must be at least 1".into());
        }
        if self.min_idle > self.max {
            return Err(format!(
                "`min_idle` ({}) exceeds `max` ({})",
                self.min_idle, self.max
            ));
        }
        if self.max > 16_384 {
            return Err("`max` is at most 16384 sandboxes per node".into());
        }
        if self.memory_mb < 16 {
            return Err("`memory_mb` must be at least 16".into());
        }
        if !(8..=1_000_000).contains(&self.pids) {
            return Err("`pids` must be between 8 and 1000000".into());
        }
        if self.cpu_millis < 10 {
            return Err("`cpu_millis` must be at least 10".into());
        }
        if self.disk_mb < 1 {
            return Err("`disk_mb` must be at least 1".into());
        }
        if let Some(after) = self.auto_pause_after_seconds
            && !(1..=MAX_AUTO_PAUSE_SECONDS).contains(&after)
        {
            return Err(format!(
                "`auto_pause_after_seconds` must be between 1 and {MAX_AUTO_PAUSE_SECONDS}"
            ));
        }
        // What only one runtime understands (`image`, `rootfs`, `read_only_root`) is checked by
        // that runtime: `Runtime::validate`.
        for (key, value) in &self.env {
            super::sandboxes::validate_env(key, value)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub idle: usize,
    pub allocated: usize,
    /// Allocated sandboxes that are paused (frozen), by their holder or for idleness.
    #[serde(default)]
    pub paused: usize,
    pub starting: usize,
    pub total: usize,
    pub ready: bool,
    pub last_error: Option<String>,
    /// Cluster mode: idle sandboxes of this pool on this node and on the other nodes that
    /// take acquires, as their shards last reported (at most a few seconds old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_idle: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    pub spec: PoolSpec,
    pub status: PoolStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
}

/// Pool names become metric labels and paths: keep them short and plain.
pub fn validate_pool_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "pool name {name:?} must be 1-63 characters of a-z, 0-9 and '-'"
        ))
    }
}
