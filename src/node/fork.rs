//! Snapshot and fork: a snapshot copies a held sandbox's writable state (the sandbox frozen
//! meanwhile, then left as it was); a fork makes new sandboxes of the snapshot's pool whose
//! files start as the snapshot's (copy-on-write where the runtime can), with the env of the
//! sandbox it was taken from, leased to the caller at once. Processes are never carried over.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::agent_client::AgentClient;
use super::auth::Owner;
use super::lease;
use super::manager::{Manager, snapshot};
use super::pool::Pool;
use super::sandbox::{Lease, Sandbox};
use super::snapshots::{self, Meta, Snapshot, Snapshots};
use crate::api::{
    ApiError, ErrorCode, ForkRequest, PoolSpec, ReusePolicy, SandboxInfo, SnapshotInfo,
};
use crate::util::{now_ms, random_id};

/// How long a fork's agent may take to answer its first ping.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Manager {
    pub fn set_snapshots(&self, store: Snapshots) {
        let _ = self.snapshots.set(store);
    }

    pub(super) fn snapshots(&self) -> Result<&Snapshots, ApiError> {
        self.snapshots
            .get()
            .ok_or_else(|| ApiError::new(ErrorCode::NotSupported, "this node keeps no snapshots"))
    }

    /// Snapshots the writable state of a held sandbox.
    pub async fn take_snapshot(
        &self,
        sb: &Sandbox,
        owner: Owner,
        ephemeral: bool,
    ) -> Result<Arc<Snapshot>, ApiError> {
        let store = self.snapshots()?;
        let _one_at_a_time = store.taking.lock().await;
        let (id, dir, left) = store.reserve()?;
        std::fs::create_dir(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        let started = Instant::now();
        let copied = async {
            // Frozen for the copy, so nothing changes under it; then left as it was.
            let _lock = sb.pause_lock.lock().await;
            let was_paused = sb.paused.load(SeqCst);
            if !was_paused {
                self.runtime.set_paused(&sb.id, true).await?;
            }
            let frozen = Instant::now();
            let copied = self
                .runtime
                .snapshot(&sb.id, &dir.join("layers"), left)
                .await;
            let copy_done = Instant::now();
            if !was_paused && let Err(e) = self.runtime.set_paused(&sb.id, false).await {
                tracing::warn!(sandbox = %sb.id, error = %e, "thaw after a snapshot failed");
            }
            tracing::debug!(
                freeze_ms = ms(frozen - started),
                copy_ms = ms(copy_done - frozen),
                thaw_ms = ms(copy_done.elapsed()),
                bytes = copied.as_ref().ok(),
                "snapshot copied"
            );
            copied
        }
        .instrument(tracing::debug_span!("snapshot", sandbox = %sb.id, snapshot = %id))
        .await;
        let bytes = match copied {
            Ok(bytes) => bytes,
            Err(e) => {
                store.discard(&dir);
                return Err(e.into());
            }
        };
        self.metrics
            .snapshot_seconds
            .with_label_values(&[sb.pool.as_str()])
            .observe(started.elapsed().as_secs_f64());
        let meta = Meta {
            id,
            pool: sb.pool.clone(),
            sandbox: sb.id.clone(),
            owner: snapshots::encode_owner(&owner),
            parent: sb.base(),
            bytes,
            created_at_ms: now_ms(),
            env: sb.lease().map(|l| l.env).unwrap_or_default(),
            ephemeral,
        };
        let added = store.add(meta, owner, dir.clone());
        if added.is_err() {
            store.discard(&dir);
        }
        added
    }

    /// Forks `req.count` new sandboxes from a snapshot, leased to `owner`.
    pub async fn fork(
        self: &Arc<Self>,
        owner: Owner,
        snap: &Snapshot,
        req: ForkRequest,
    ) -> Result<Vec<SandboxInfo>, ApiError> {
        let count = req.validate().map_err(ApiError::bad_request)?;
        if self.is_draining() {
            return Err(ApiError::new(
                ErrorCode::Draining,
                "the node is shutting down",
            ));
        }
        let store = self.snapshots()?;
        let _pending = store.pend(snap)?;
        let pool = self.pool(&snap.meta.pool).map_err(|_| {
            ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "the pool {:?} of snapshot {} is gone",
                    snap.meta.pool, snap.meta.id
                ),
            )
        })?;
        let spec = pool.spec();
        let base: Vec<PathBuf> = store
            .chain(&snap.meta.id)
            .iter()
            .map(|s| s.layers())
            .collect();
        let lease = fork_lease(owner, &spec, snap, &req);
        pool.state().reserve_forks(count, spec.max).map_err(|e| {
            ApiError::new(
                ErrorCode::PoolExhausted,
                format!(
                    "pool {:?} has room for {} more sandboxes, not {count}",
                    pool.name, e.idle
                ),
            )
        })?;
        let started = Instant::now();
        let (fresh, failure) = self
            .lease_new(&pool, count, &lease, || {
                let (this, pool, base) = (self.clone(), pool.clone(), base.clone());
                let from = snap.meta.id.clone();
                async move { this.create_fork(&pool, &base, from).await }
            })
            .await;
        if let Some(e) = failure {
            for sb in fresh {
                self.release_sandbox(sb, ReusePolicy::Destroy);
            }
            return Err(e);
        }
        for sb in &fresh {
            self.records.save(sb);
        }
        self.metrics
            .fork_seconds
            .with_label_values(&[pool.name.as_str()])
            .observe(started.elapsed().as_secs_f64());
        Ok(fresh.iter().map(|sb| sb.info()).collect())
    }

    /// Makes one fork and waits until its agent answers.
    async fn create_fork(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        base: &[PathBuf],
        from: String,
    ) -> Result<Arc<Sandbox>, ApiError> {
        let spec = pool.spec();
        let permit = self
            .create_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::new(ErrorCode::Draining, "the node is shutting down"))?;
        let id = random_id("sb-");
        let result = async {
            let created = self.runtime.fork(&id, &spec, base).await?;
            let sb = Arc::new(Sandbox::new(
                id.clone(),
                pool.name.clone(),
                spec.runtime,
                AgentClient::new(created.agent),
            ));
            sb.set_base(Some(from));
            match tokio::time::timeout(READY_TIMEOUT, sb.agent.ping()).await {
                Ok(Ok(())) => Ok(sb),
                Ok(Err(e)) => Err(ApiError::unavailable(format!(
                    "the fork's agent did not start: {}",
                    e.message
                ))),
                Err(_) => Err(ApiError::unavailable(
                    "the fork's agent did not answer within 30 s",
                )),
            }
        }
        .await;
        drop(permit);
        if let Err(e) = &result {
            tracing::warn!(pool = %pool.name, error = %e.message, "fork failed");
            let _ = self.runtime.destroy(&id).await;
        }
        result
    }

    /// Whether a live sandbox stands on the snapshot (forked from it or from one stacked on it).
    fn snapshot_forks(&self, id: &str) -> usize {
        let Ok(store) = self.snapshots() else {
            return 0;
        };
        snapshot(&self.sandboxes)
            .iter()
            .filter_map(|sb| sb.base())
            .filter(|base| store.chain(base).iter().any(|s| s.meta.id == id))
            .count()
    }

    pub fn snapshot_info(&self, snap: &Snapshot) -> SnapshotInfo {
        snap.info(self.snapshot_forks(&snap.meta.id))
    }

    /// Deletes a snapshot of `owner`'s, unless something stands on it.
    pub fn delete_snapshot(&self, id: &str, owner: &Owner) -> Result<(), ApiError> {
        let store = self.snapshots()?;
        store.owned(id, owner)?;
        if store.remove_if_unused(id, &|s| self.snapshot_forks(s) > 0) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "snapshot {id} is in use (forks of it are live, or snapshots are stacked on it); release or delete those first"
                ),
            ))
        }
    }

    /// Removes the snapshots nobody wants any more (taken on the way to a fork, or of a deleted
    /// pool) once nothing stands on them.
    pub(super) fn collect_snapshots(&self) {
        if let Ok(store) = self.snapshots() {
            let n = store.collect(&|s| self.snapshot_forks(s) > 0);
            if n > 0 {
                tracing::debug!(snapshots = n, "unused snapshots removed");
            }
        }
    }
}

/// A fork's lease: the snapshot's env under the request's, the pool's time limits unless the
/// request sets its own.
fn fork_lease(owner: Owner, spec: &PoolSpec, snap: &Snapshot, req: &ForkRequest) -> Lease {
    let now = now_ms();
    let (expires_at_ms, idle_timeout_ms) =
        lease::deadlines(now, spec, req.ttl_seconds, req.idle_timeout_seconds);
    Lease {
        owner,
        env: snap
            .meta
            .env
            .clone()
            .into_iter()
            .chain(req.env.clone())
            .collect(),
        labels: req.labels.clone(),
        acquired_at_ms: now,
        expires_at_ms,
        idle_timeout_ms,
        request_id: None,
    }
}

/// Milliseconds, for the logs.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
