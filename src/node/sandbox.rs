//! A live sandbox as the daemon sees it: its agent, its lease while allocated, and the
//! results of recent execs by request id.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::watch;

use super::agent_client::AgentClient;
use super::auth::Owner;
use super::once::OnceMap;
use super::trajectory::Trajectory;
use crate::api::pools::RuntimeKind;
use crate::api::{SandboxInfo, SandboxState, WORKSPACE};
use crate::util::{MutexExt, now_ms};

/// Exec results remembered per sandbox for request-id retries (each at most 256 KiB).
const IDEMPOTENCY_ENTRIES: usize = 32;

pub struct Sandbox {
    pub id: String,
    pub pool: String,
    /// Which runtime made it (a successor daemon asks that one to adopt it).
    pub runtime: RuntimeKind,
    pub created_at_ms: u64,
    pub agent: AgentClient,
    lease: Mutex<Option<Lease>>,
    /// Last time a request touched it (ms since the epoch).
    last_used_ms: AtomicU64,
    pub paused: AtomicBool,
    /// Requests under way (`pause::InUse` guards): a sandbox in use is never auto-paused.
    pub(super) in_use: AtomicUsize,
    /// Set while an auto-pause decides, so a request arriving meanwhile waits for it and thaws.
    pub(super) pausing: AtomicBool,
    /// Serialises freezing and thawing.
    pub(super) pause_lock: tokio::sync::Mutex<()>,
    /// The snapshot it was forked from, if any.
    base: Mutex<Option<String>>,
    /// Exec results by request id, for retries.
    pub execs: OnceMap<String, CachedReply>,
    /// Why the sandbox died, once its runtime has said.
    death: watch::Sender<Option<String>>,
    /// What was done in it during the current lease.
    pub trajectory: Trajectory,
}

#[derive(Clone)]
pub struct Lease {
    pub owner: Owner,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub acquired_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    /// The acquire's `request_id`: a retry after a restart still gets this sandbox.
    pub request_id: Option<String>,
}

/// A finished exec's reply, as the agent sent it.
#[derive(Clone)]
pub struct CachedReply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Sandbox {
    pub fn new(id: String, pool: String, runtime: RuntimeKind, agent: AgentClient) -> Self {
        Self::with_creation_time(id, pool, runtime, agent, now_ms())
    }

    /// A sandbox made earlier (by a predecessor daemon, for an adopted one).
    pub fn with_creation_time(
        id: String,
        pool: String,
        runtime: RuntimeKind,
        agent: AgentClient,
        created_at_ms: u64,
    ) -> Self {
        let now = now_ms();
        Self {
            id,
            pool,
            runtime,
            created_at_ms,
            agent,
            lease: Mutex::new(None),
            last_used_ms: AtomicU64::new(now),
            paused: AtomicBool::new(false),
            in_use: AtomicUsize::new(0),
            pausing: AtomicBool::new(false),
            pause_lock: tokio::sync::Mutex::new(()),
            base: Mutex::new(None),
            execs: OnceMap::new(IDEMPOTENCY_ENTRIES),
            death: watch::Sender::new(None),
            trajectory: Trajectory::default(),
        }
    }

    /// Records why the sandbox died (its runtime's words), for requests caught in the death.
    pub fn set_death(&self, reason: String) {
        self.death.send_replace(Some(reason));
    }

    /// Why the sandbox died, waiting up to `grace` for its runtime to say; `None` if it has not
    /// died (as far as anyone knows by then).
    pub async fn death(&self, grace: Duration) -> Option<String> {
        let mut rx = self.death.subscribe();
        let found = tokio::time::timeout(grace, rx.wait_for(|d| d.is_some())).await;
        found.ok()?.ok()?.clone()
    }

    pub fn base(&self) -> Option<String> {
        self.base.lock_or_recover().clone()
    }

    pub fn set_base(&self, base: Option<String>) {
        *self.base.lock_or_recover() = base;
    }

    pub fn lease(&self) -> Option<Lease> {
        self.lease.lock_or_recover().clone()
    }

    pub fn set_lease(&self, lease: Option<Lease>) {
        if lease.is_some() {
            // A new holder starts with an empty history.
            self.trajectory.clear();
        }
        *self.lease.lock_or_recover() = lease;
        self.touch();
    }

    pub fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// Whether the lease has run out (lifetime or idleness) at `now`.
    pub fn expired(&self, now: u64) -> bool {
        let Some(lease) = self.lease() else {
            return false;
        };
        lease.expires_at_ms.is_some_and(|t| now >= t)
            || lease
                .idle_timeout_ms
                .is_some_and(|t| now.saturating_sub(self.last_used_ms()) >= t)
    }

    pub fn info(&self) -> SandboxInfo {
        let lease = self.lease();
        SandboxInfo {
            id: self.id.clone(),
            pool: self.pool.clone(),
            state: if lease.is_some() {
                SandboxState::Allocated
            } else {
                SandboxState::Idle
            },
            created_at_ms: self.created_at_ms,
            acquired_at_ms: lease.as_ref().map(|l| l.acquired_at_ms),
            expires_at_ms: lease.as_ref().and_then(|l| l.expires_at_ms),
            labels: lease.map(|l| l.labels).unwrap_or_default(),
            workspace: WORKSPACE.to_string(),
        }
    }
}
