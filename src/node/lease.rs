//! Leases: acquire (warm sandboxes first, then new ones up to `max`), release (reset and
//! reuse, or destroy and refill) and reset. A lease begins and ends under its pool's lock, and
//! is recorded on disk when it begins, for a successor daemon.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::future::join_all;

use super::auth::Owner;
use super::manager::Manager;
use super::once::{self, Claim};
use super::pool::Pool;
use super::sandbox::{Lease, Sandbox};
use crate::api::{AcquireRequest, ApiError, ErrorCode, PoolSpec, ReusePolicy, SandboxInfo};
use crate::util::now_ms;

impl Manager {
    /// Hands out `count` sandboxes of a pool: warm ones first, then new ones up to `max`.
    /// With a `request_id`, a retry gets the sandboxes of the first attempt.
    pub async fn acquire(
        self: &Arc<Self>,
        owner: Owner,
        req: AcquireRequest,
    ) -> Result<Vec<SandboxInfo>, ApiError> {
        let Some(request_id) = req.request_id.clone() else {
            return self.acquire_now(owner, req).await;
        };
        let key = (owner, request_id);
        let ids = match self.acquisitions.claim(&key) {
            Claim::Done(ids) => ids,
            Claim::Wait(rx) => once::wait(rx).await?,
            Claim::Run(tx) => {
                // In a task of its own, so a client that disconnects cannot strand sandboxes.
                let this = self.clone();
                let run = tokio::spawn(async move {
                    let result = this.acquire_now(owner, req).await;
                    match &result {
                        Ok(infos) => {
                            let _ = tx.send(Some(infos.iter().map(|i| i.id.clone()).collect()));
                        }
                        Err(_) => this.acquisitions.forget(&key),
                    }
                    result
                });
                return run
                    .await
                    .map_err(|e| ApiError::internal(format!("acquire task failed: {e}")))?;
            }
        };
        ids.iter()
            .map(|id| self.sandbox(id, &owner).map(|sb| sb.info()))
            .collect()
    }

    async fn acquire_now(
        self: &Arc<Self>,
        owner: Owner,
        req: AcquireRequest,
    ) -> Result<Vec<SandboxInfo>, ApiError> {
        let count = req.validate().map_err(ApiError::bad_request)?;
        if self.is_draining() || self.is_cordoned() {
            let why = if self.is_draining() {
                "the node is shutting down"
            } else {
                "the node is cordoned: acquire from another node"
            };
            let mut err = ApiError::new(ErrorCode::Draining, why);
            err.alternatives = self.peers.alternatives(&req.pool);
            return Err(err);
        }
        let started = Instant::now();
        let pool = self.pool(&req.pool)?;
        let spec = pool.spec();
        let lease = new_lease(owner, &spec, &req);
        let (mut taken, missing) =
            pool.state()
                .lease(count, spec.max, &lease)
                .map_err(|exhausted| {
                    let mut err = ApiError::new(
                        ErrorCode::PoolExhausted,
                        format!(
                            "pool {:?} has {} idle and is at its limit of {} sandboxes",
                            pool.name, exhausted.idle, spec.max
                        ),
                    );
                    err.alternatives = self.peers.alternatives(&pool.name);
                    err
                })?;
        pool.note_acquire();
        pool.refill.notify_one();
        if missing > 0 {
            let (fresh, failure) = self
                .lease_new(&pool, missing, &lease, || {
                    let (this, pool) = (self.clone(), pool.clone());
                    async move { this.create(&pool).await }
                })
                .await;
            taken.extend(fresh);
            if let Some(e) = failure {
                for sb in taken {
                    self.release_sandbox(sb, ReusePolicy::Destroy);
                }
                return Err(e);
            }
        }
        for sb in &taken {
            self.records.save(sb);
        }
        let result = if missing > 0 { "miss" } else { "hit" };
        self.metrics
            .acquire_seconds
            .with_label_values(&[pool.name.as_str(), result])
            .observe(started.elapsed().as_secs_f64());
        Ok(taken.iter().map(|sb| sb.info()).collect())
    }

    /// Makes `count` sandboxes whose places the pool has reserved and leases them under `lease`:
    /// the ones made, and a failure if any creation failed (the caller destroys the others).
    /// Creations run on the manager's runtime: they do blocking work (clone, cgroups, mounts).
    pub(super) async fn lease_new<Fut>(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        count: usize,
        lease: &Lease,
        make: impl Fn() -> Fut,
    ) -> (Vec<Arc<Sandbox>>, Option<ApiError>)
    where
        Fut: Future<Output = Result<Arc<Sandbox>, ApiError>> + Send + 'static,
    {
        let created = join_all((0..count).map(|_| {
            let creation = self.tasks.spawn(make());
            async move {
                creation.await.unwrap_or_else(|e| {
                    Err(ApiError::internal(format!("sandbox creation failed: {e}")))
                })
            }
        }))
        .await;
        let mut failure = None;
        let mut fresh = Vec::new();
        for result in created {
            match result {
                Ok(sb) => fresh.push(sb),
                Err(e) => failure = Some(e),
            }
        }
        {
            let mut st = pool.state();
            st.finish_lease_starts(count, &fresh, lease);
            for sb in &fresh {
                self.register(sb);
            }
        }
        for sb in &fresh {
            self.watch(sb.clone());
        }
        (fresh, failure)
    }

    /// Releases an allocated sandbox: reset and reuse, or destroy and refill.
    pub fn release(self: &Arc<Self>, id: &str, owner: &Owner) -> Result<(), ApiError> {
        let sb = match self.sandbox(id, owner) {
            Ok(sb) => sb,
            // Already gone (it died, or its lease expired): releasing it is done.
            Err(e) if e.code == ErrorCode::SandboxUnavailable => return Ok(()),
            Err(e) => return Err(e),
        };
        let reuse = self
            .pool(&sb.pool)
            .map(|p| p.spec().reuse)
            .unwrap_or(ReusePolicy::Destroy);
        self.release_sandbox(sb, reuse);
        Ok(())
    }

    /// Ends a sandbox's lease. Whoever forgets it first (a release, an expiry, its death)
    /// decides its fate; later callers do nothing.
    pub(super) fn release_sandbox(self: &Arc<Self>, sb: Arc<Sandbox>, reuse: ReusePolicy) {
        if self.forget(&sb.id).is_none() {
            return;
        }
        let pool = self.pool(&sb.pool).ok();
        let keep = {
            let Some(pool) = &pool else {
                self.spawn_destroy(sb.id.clone());
                return;
            };
            let mut st = pool.state();
            let keep = reuse == ReusePolicy::Reset
                && !st.is_deleted()
                && !sb.paused.load(Ordering::Relaxed)
                // A fork stands on its snapshot (the parent's files, even outside what a reset
                // wipes): never handed to another lease.
                && sb.base().is_none()
                && !self.is_draining();
            st.end_lease(keep);
            keep
        };
        let Some(pool) = pool else { return };
        if !keep {
            self.spawn_destroy(sb.id.clone());
            pool.refill.notify_one();
            return;
        }
        // Unrecorded while it is reset: a daemon dying now leaves it to be destroyed, never
        // handed out half-reset nor back to the owner who released it.
        self.records.remove(&sb.id);
        let this = self.clone();
        // A reset is one call to the agent, no blocking work: it stays on the caller's runtime
        // (the HTTP front's, for a release) and uses a kept-alive connection.
        self.background.spawn(async move {
            let reset = this.reset_agent(&sb).await;
            if reset.is_ok() {
                sb.set_lease(None);
                sb.execs.clear();
                // Recorded idle before it shows idle, so whoever sees it idle finds its record
                // (a pool deleted meanwhile destroys it, and its record goes first).
                this.records.save(&sb);
                this.add_idle(&pool, Some(sb.clone()), false);
            } else {
                this.add_idle(&pool, None, false);
                this.spawn_destroy(sb.id.clone());
            }
            pool.refill.notify_one();
        });
    }

    /// Asks the agent to reset its sandbox. Called on the HTTP front (a release, or the reset
    /// route), so on a kept-alive connection.
    pub async fn reset_agent(&self, sb: &Sandbox) -> Result<(), ApiError> {
        let req = hyper::Request::post("/reset")
            .body(crate::http::empty())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let reply = sb.agent.call(req, 4096).await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(ApiError::unavailable(format!(
                "reset answered {}",
                reply.status
            )))
        }
    }
}

/// A lease's expiry and idle timeout, in ms, for a lease starting at `now`: the request's
/// limits (in seconds) where it sets them, else the pool's.
pub(super) fn deadlines(
    now: u64,
    spec: &PoolSpec,
    ttl_seconds: Option<u64>,
    idle_timeout_seconds: Option<u64>,
) -> (Option<u64>, Option<u64>) {
    (
        ttl_seconds
            .or(spec.max_lifetime_seconds)
            .map(|s| now.saturating_add(s.saturating_mul(1000))),
        idle_timeout_seconds
            .or(spec.idle_timeout_seconds)
            .map(|s| s.saturating_mul(1000)),
    )
}

/// A lease for `owner` on the pool's terms under the request's.
fn new_lease(owner: Owner, spec: &PoolSpec, req: &AcquireRequest) -> Lease {
    let now = now_ms();
    let (expires_at_ms, idle_timeout_ms) =
        deadlines(now, spec, req.ttl_seconds, req.idle_timeout_seconds);
    Lease {
        owner,
        // The pool's env under the acquirer's, fixed for the lease's lifetime.
        env: spec
            .env
            .clone()
            .into_iter()
            .chain(req.env.clone())
            .collect(),
        labels: req.labels.clone(),
        acquired_at_ms: now,
        expires_at_ms,
        idle_timeout_ms,
        request_id: req.request_id.clone(),
    }
}
