//! The sandbox manager: keeps pools warm, hands sandboxes out and takes them back, replaces
//! dead ones and expires leases. Acquire and release never touch anything slower than a
//! mutex: creation and destruction run in background tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::agent_client::AgentClient;
use super::auth::{Auth, Owner};
use super::metrics::Metrics;
use super::once::{self, Claim, OnceMap};
use super::pool::Pool;
use super::sandbox::{Lease, Sandbox};
use crate::api::{
    AcquireRequest, ApiError, ErrorCode, PoolSpec, PoolView, ReusePolicy, SandboxInfo,
};
use crate::runtime::Runtime;
use crate::util::{MutexExt, RwLockExt, now_ms, random_id};

/// Ids of recently dead sandboxes remembered, so callers get "died" rather than "unknown".
const GRAVEYARD: usize = 4096;
/// Acquire request ids remembered for retries.
const ACQUISITIONS_REMEMBERED: usize = 4096;
/// Agent replies buffered at once, node-wide: 1 GiB.
const REPLY_BUDGET_KIB: usize = 1 << 20;
/// Refills wait for this long without an acquire before they start (unless the pool is low).
const BURST_QUIET_MS: u64 = 25;
/// How long a new sandbox may take to answer its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// An allocated sandbox that went away without being released.
struct Grave {
    id: String,
    reason: String,
    owner: Owner,
}

pub struct Manager {
    runtime: Arc<dyn Runtime>,
    pools: RwLock<HashMap<String, Arc<Pool>>>,
    sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
    graveyard: Mutex<VecDeque<Grave>>,
    create_permits: Arc<Semaphore>,
    /// Sandbox ids handed out by request id, for retried acquires.
    acquisitions: OnceMap<(Owner, String), Vec<String>>,
    /// KiB of agent replies the daemon may buffer at once (exec results in flight).
    pub reply_budget: Arc<Semaphore>,
    /// Creations and destructions in flight, awaited on shutdown.
    background: TaskTracker,
    /// The multi-threaded runtime for the manager's blocking sandbox work (creation, teardown)
    /// and its long-lived tasks (refills, watchers, housekeeping), whichever thread asks for
    /// them: the HTTP front's thread only serves requests (see `node::serve_front`).
    tasks: tokio::runtime::Handle,
    pub metrics: Metrics,
    pub auth: Auth,
    /// Cancelled when the node starts shutting down: refills stop, new work is refused.
    pub shutdown: CancellationToken,
}

impl Manager {
    pub fn new(runtime: Arc<dyn Runtime>, auth: Auth, create_concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            pools: RwLock::new(HashMap::new()),
            sandboxes: RwLock::new(HashMap::new()),
            graveyard: Mutex::new(VecDeque::new()),
            create_permits: Arc::new(Semaphore::new(create_concurrency.max(1))),
            reply_budget: Arc::new(Semaphore::new(REPLY_BUDGET_KIB)),
            acquisitions: OnceMap::new(ACQUISITIONS_REMEMBERED),
            background: TaskTracker::new(),
            tasks: tokio::runtime::Handle::current(),
            metrics: Metrics::new(),
            auth,
            shutdown: CancellationToken::new(),
        })
    }

    /// True once the node has started shutting down.
    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Stops refills and refuses new work; running work goes on.
    pub fn begin_drain(&self) {
        self.shutdown.cancel();
        for pool in snapshot(&self.pools) {
            pool.refill.notify_one();
        }
    }

    /// Why the node cannot serve new work right now, if it cannot: it is draining, or every
    /// pool has no idle sandbox and its last creation failed.
    pub fn unready_reason(&self) -> Option<String> {
        if self.is_draining() {
            return Some("the node is shutting down".into());
        }
        let pools = snapshot(&self.pools);
        let mut failing = Vec::new();
        for pool in &pools {
            let st = pool.state();
            if st.failures_in_row == 0 || !st.idle.is_empty() {
                return None;
            }
            let error = st.last_error.as_deref().unwrap_or("unknown error");
            failing.push(format!("pool {:?}: {error}", pool.name));
        }
        if failing.is_empty() {
            return None;
        }
        failing.sort();
        Some(format!(
            "no pool can create sandboxes: {}",
            failing.join("; ")
        ))
    }

    pub fn runtime_kind(&self) -> &'static str {
        self.runtime.kind()
    }

    fn pool(&self, name: &str) -> Result<Arc<Pool>, ApiError> {
        self.pools
            .read_or_recover()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no pool named {name:?}")))
    }

    pub fn pool_views(&self) -> Vec<PoolView> {
        let pools = snapshot(&self.pools);
        let mut views: Vec<PoolView> = pools
            .iter()
            .map(|p| PoolView {
                name: p.name.clone(),
                spec: p.spec(),
                status: p.status(),
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn pool_view(&self, name: &str) -> Result<PoolView, ApiError> {
        let pool = self.pool(name)?;
        Ok(PoolView {
            name: pool.name.clone(),
            spec: pool.spec(),
            status: pool.status(),
        })
    }

    /// Creates a pool, or updates its spec (new sandboxes use the new spec).
    pub fn put_pool(self: &Arc<Self>, name: &str, spec: PoolSpec) -> Result<(), ApiError> {
        crate::api::pools::validate_pool_name(name).map_err(ApiError::bad_request)?;
        spec.validate().map_err(ApiError::bad_request)?;
        self.runtime
            .validate(&spec)
            .map_err(ApiError::bad_request)?;
        let mut pools = self.pools.write_or_recover();
        if let Some(pool) = pools.get(name) {
            pool.set_spec(spec);
            return Ok(());
        }
        if pools.len() >= 64 {
            return Err(ApiError::bad_request("at most 64 pools per node"));
        }
        let pool = Arc::new(Pool::new(name.to_string(), spec));
        pools.insert(name.to_string(), pool.clone());
        let this = self.clone();
        let span = tracing::info_span!("refill", pool = %name);
        self.tasks.spawn(this.refill_loop(pool).instrument(span));
        Ok(())
    }

    /// Deletes a pool: idle sandboxes go now, allocated ones when released.
    pub fn delete_pool(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let pool = self
            .pools
            .write_or_recover()
            .remove(name)
            .ok_or_else(|| ApiError::not_found(format!("no pool named {name:?}")))?;
        let idle: Vec<Arc<Sandbox>> = {
            let mut st = pool.state();
            st.deleted = true;
            st.idle.drain(..).collect()
        };
        pool.refill.notify_one();
        for sb in idle {
            self.forget(&sb.id);
            self.spawn_destroy(sb.id.clone());
        }
        Ok(())
    }

    async fn refill_loop(self: Arc<Self>, pool: Arc<Pool>) {
        loop {
            let spec = pool.spec();
            // Creating sandboxes costs CPU that a burst of acquires needs: wait until the
            // burst is over, unless the pool is running low.
            loop {
                let since = now_ms().saturating_sub(pool.last_acquire_ms());
                let idle = pool.state().idle.len();
                if since >= BURST_QUIET_MS || idle <= spec.min_idle / 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(BURST_QUIET_MS - since)).await;
            }
            let wanted = {
                let mut st = pool.state();
                if st.deleted {
                    return;
                }
                let have = st.idle.len() + st.starting;
                let room = spec.max.saturating_sub(st.total());
                let n = spec.min_idle.saturating_sub(have).min(room);
                st.starting += n;
                n
            };
            if self.is_draining() {
                pool.state().starting -= wanted;
                return;
            }
            for _ in 0..wanted {
                let this = self.clone();
                let pool = pool.clone();
                self.spawn_tracked(async move {
                    match this.create(&pool).await {
                        Ok(sb) => {
                            let unwanted = {
                                let mut st = pool.state();
                                st.starting -= 1;
                                if st.deleted {
                                    Some(sb)
                                } else {
                                    st.idle.push_back(sb);
                                    None
                                }
                            };
                            if let Some(sb) = unwanted {
                                this.forget(&sb.id);
                                let _ = this.runtime.destroy(&sb.id).await;
                            }
                        }
                        Err(_) => pool.state().starting -= 1,
                    }
                    pool.refill.notify_one();
                });
            }
            if let Some(delay) = pool.backoff() {
                tokio::time::sleep(delay).await;
            }
            pool.refill.notified().await;
        }
    }

    /// Creates one sandbox for `pool` and waits until its agent answers.
    async fn create(self: &Arc<Self>, pool: &Arc<Pool>) -> Result<Arc<Sandbox>, ApiError> {
        let spec = pool.spec();
        let permit = self
            .create_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::new(ErrorCode::Draining, "the node is shutting down"))?;
        let started = Instant::now();
        let id = random_id("sb-");
        let result = async {
            let created = self
                .runtime
                .create(&id, &spec)
                .await
                .map_err(|e| e.to_string())?;
            let sb = Arc::new(Sandbox::new(
                id.clone(),
                pool.name.clone(),
                AgentClient::new(created.agent),
            ));
            match tokio::time::timeout(READY_TIMEOUT, sb.agent.ping()).await {
                Ok(Ok(())) => Ok(sb),
                Ok(Err(e)) => Err(format!("agent did not start: {}", e.message)),
                Err(_) => Err("agent did not answer within 30 s".to_string()),
            }
        }
        .await;
        drop(permit);
        match result {
            Ok(sb) => {
                self.metrics
                    .create_seconds
                    .with_label_values(&[pool.name.as_str(), spec.runtime.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                {
                    let mut st = pool.state();
                    st.failures_in_row = 0;
                    st.last_error = None;
                }
                self.sandboxes
                    .write_or_recover()
                    .insert(sb.id.clone(), sb.clone());
                self.watch(sb.clone());
                Ok(sb)
            }
            Err(message) => {
                tracing::warn!(pool = %pool.name, error = %message, "sandbox create failed");
                self.metrics
                    .sandbox_failures_total
                    .with_label_values(&[pool.name.as_str(), "create"])
                    .inc();
                {
                    let mut st = pool.state();
                    st.failures_in_row = st.failures_in_row.saturating_add(1);
                    st.last_error = Some(message.clone());
                }
                let _ = self.runtime.destroy(&id).await;
                Err(ApiError::unavailable(format!(
                    "creating a sandbox failed: {message}"
                )))
            }
        }
    }

    /// Replaces the sandbox when its agent dies on its own.
    fn watch(self: &Arc<Self>, sb: Arc<Sandbox>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let reason = this.runtime.exited(&sb.id).await;
            if this.forget(&sb.id).is_some() {
                tracing::warn!(sandbox = %sb.id, pool = %sb.pool, reason = reason.label(), "{reason}");
                this.metrics
                    .sandbox_failures_total
                    .with_label_values(&[sb.pool.as_str(), reason.label()])
                    .inc();
                sb.set_death(reason.to_string());
                this.bury(&sb, &reason.to_string());
                this.unaccount(&sb);
                this.spawn_destroy(sb.id.clone());
            }
        });
    }

    /// Removes a sandbox from the live map; whoever gets `Some` owns its teardown.
    fn forget(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.write_or_recover().remove(id)
    }

    /// Remembers why an allocated sandbox went away, for its holder's next request.
    fn bury(&self, sb: &Sandbox, reason: &str) {
        let Some(lease) = sb.lease() else { return };
        let mut graveyard = self.graveyard.lock_or_recover();
        graveyard.push_back(Grave {
            id: sb.id.clone(),
            reason: reason.to_string(),
            owner: lease.owner,
        });
        while graveyard.len() > GRAVEYARD {
            graveyard.pop_front();
        }
    }

    /// Drops a forgotten sandbox from its pool's counts and wakes the refill.
    fn unaccount(&self, sb: &Sandbox) {
        let Ok(pool) = self.pool(&sb.pool) else {
            return;
        };
        {
            let mut st = pool.state();
            if sb.lease().is_some() {
                st.allocated = st.allocated.saturating_sub(1);
            } else {
                st.idle.retain(|s| s.id != sb.id);
            }
        }
        pool.refill.notify_one();
    }

    /// Runs sandbox work that shutdown must wait for, on the manager's runtime.
    fn spawn_tracked(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.background.spawn_on(work, &self.tasks);
    }

    fn spawn_destroy(self: &Arc<Self>, id: String) {
        let this = self.clone();
        self.spawn_tracked(async move {
            if let Err(e) = this.runtime.destroy(&id).await {
                tracing::error!(sandbox = %id, error = %e, "destroy failed");
            }
        });
    }

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
        if self.is_draining() {
            return Err(ApiError::new(
                ErrorCode::Draining,
                "the node is shutting down",
            ));
        }
        let started = Instant::now();
        let pool = self.pool(&req.pool)?;
        let spec = pool.spec();
        let now = now_ms();
        let lease = Lease {
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
            expires_at_ms: req
                .ttl_seconds
                .or(spec.max_lifetime_seconds)
                .map(|s| now + s * 1000),
            idle_timeout_ms: req
                .idle_timeout_seconds
                .or(spec.idle_timeout_seconds)
                .map(|s| s * 1000),
        };
        let (mut taken, missing) = {
            let mut st = pool.state();
            let warm = count.min(st.idle.len());
            let missing = count - warm;
            // Warm ones only change state; each missing one adds to the pool's total.
            if spec.max.saturating_sub(st.total()) < missing {
                let mut err = ApiError::new(
                    ErrorCode::PoolExhausted,
                    format!(
                        "pool {:?} has {} idle and is at its limit of {} sandboxes",
                        pool.name,
                        st.idle.len(),
                        spec.max
                    ),
                );
                err.alternatives = Vec::new();
                return Err(err);
            }
            let taken: Vec<Arc<Sandbox>> = st.idle.drain(..warm).collect();
            st.allocated += taken.len();
            st.starting += missing;
            (taken, missing)
        };
        pool.note_acquire();
        for sb in &taken {
            sb.set_lease(Some(lease.clone()));
        }
        pool.refill.notify_one();
        if missing > 0 {
            // On the manager's runtime: creation does blocking work (clone, cgroups, mounts).
            let created = join_all((0..missing).map(|_| {
                let this = self.clone();
                let pool = pool.clone();
                let creation = self.tasks.spawn(async move { this.create(&pool).await });
                async move {
                    creation.await.unwrap_or_else(|e| {
                        Err(ApiError::internal(format!("sandbox creation failed: {e}")))
                    })
                }
            }))
            .await;
            let mut failure = None;
            {
                let mut st = pool.state();
                st.starting -= missing;
                for result in created {
                    match result {
                        Ok(sb) => {
                            sb.set_lease(Some(lease.clone()));
                            st.allocated += 1;
                            taken.push(sb);
                        }
                        Err(e) => failure = Some(e),
                    }
                }
            }
            if let Some(e) = failure {
                for sb in taken {
                    self.release_sandbox(sb, ReusePolicy::Destroy);
                }
                return Err(e);
            }
        }
        let result = if missing > 0 { "miss" } else { "hit" };
        self.metrics
            .acquire_seconds
            .with_label_values(&[pool.name.as_str(), result])
            .observe(started.elapsed().as_secs_f64());
        Ok(taken.iter().map(|sb| sb.info()).collect())
    }

    /// Looks up an allocated sandbox on behalf of `owner`.
    pub fn sandbox(&self, id: &str, owner: &Owner) -> Result<Arc<Sandbox>, ApiError> {
        let found = self.sandboxes.read_or_recover().get(id).cloned();
        let Some(sb) = found else {
            let graveyard = self.graveyard.lock_or_recover();
            if let Some(grave) = graveyard
                .iter()
                .rev()
                .find(|g| g.id == id && g.owner == *owner)
            {
                return Err(ApiError::unavailable(format!(
                    "sandbox {id}: {}",
                    grave.reason
                )));
            }
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        };
        match sb.lease() {
            None => Err(ApiError::not_found(format!("no sandbox {id:?}"))),
            Some(lease) if lease.owner != *owner => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("sandbox {id} belongs to another token"),
            )),
            Some(_) => Ok(sb),
        }
    }

    pub fn list(&self, owner: &Owner) -> Vec<SandboxInfo> {
        let mut out: Vec<SandboxInfo> = self
            .sandboxes
            .read_or_recover()
            .values()
            .filter(|sb| sb.lease().is_some_and(|l| l.owner == *owner))
            .map(|sb| sb.info())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
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

    fn release_sandbox(self: &Arc<Self>, sb: Arc<Sandbox>, reuse: ReusePolicy) {
        if self.forget(&sb.id).is_none() {
            return;
        }
        let pool = self.pool(&sb.pool).ok();
        let keep = reuse == ReusePolicy::Reset
            && pool.as_ref().is_some_and(|p| !p.state().deleted)
            && !sb.paused.load(Ordering::Relaxed)
            && !self.is_draining();
        if let Some(pool) = &pool {
            let mut st = pool.state();
            st.allocated = st.allocated.saturating_sub(1);
            if keep {
                st.starting += 1;
            }
        }
        if !keep {
            self.spawn_destroy(sb.id.clone());
            if let Some(pool) = pool {
                pool.refill.notify_one();
            }
            return;
        }
        let this = self.clone();
        // A reset is one call to the agent, no blocking work: it stays on the caller's runtime
        // (the HTTP front's, for a release) and uses a kept-alive connection.
        self.background.spawn(async move {
            let Some(pool) = pool else { return };
            let reset = this.reset_agent(&sb).await;
            let mut st = pool.state();
            st.starting -= 1;
            if reset.is_ok() && !st.deleted {
                sb.set_lease(None);
                sb.execs.clear();
                this.sandboxes
                    .write_or_recover()
                    .insert(sb.id.clone(), sb.clone());
                st.idle.push_back(sb);
            } else {
                drop(st);
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

    pub async fn set_paused(&self, sb: &Sandbox, paused: bool) -> Result<(), ApiError> {
        self.runtime.set_paused(&sb.id, paused).await?;
        sb.paused.store(paused, Ordering::Relaxed);
        Ok(())
    }

    /// Expires leases every second and pings idle sandboxes every ten.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut round = 0u64;
        loop {
            tick.tick().await;
            round += 1;
            let now = now_ms();
            let all = snapshot(&self.sandboxes);
            for sb in &all {
                if sb.expired(now) {
                    tracing::info!(sandbox = %sb.id, "lease expired");
                    self.bury(sb, "its lease expired (ttl or idle timeout)");
                    self.release_sandbox(sb.clone(), ReusePolicy::Destroy);
                }
            }
            if round.is_multiple_of(10) {
                for sb in all.into_iter().filter(|sb| sb.lease().is_none()) {
                    let this = self.clone();
                    self.tasks.spawn(async move {
                        let ok = matches!(
                            tokio::time::timeout(Duration::from_secs(5), sb.agent.ping()).await,
                            Ok(Ok(()))
                        );
                        if !ok && this.forget(&sb.id).is_some() {
                            tracing::warn!(sandbox = %sb.id, "idle sandbox failed its health check");
                            this.metrics
                                .sandbox_failures_total
                                .with_label_values(&[sb.pool.as_str(), "unhealthy"])
                                .inc();
                            this.unaccount(&sb);
                            this.spawn_destroy(sb.id.clone());
                        }
                    });
                }
            }
        }
    }

    /// Updates the per-state gauges (called when metrics are scraped).
    pub fn update_gauges(&self) {
        for view in self.pool_views() {
            for (state, n) in [
                ("idle", view.status.idle),
                ("allocated", view.status.allocated),
                ("starting", view.status.starting),
            ] {
                self.metrics
                    .sandboxes
                    .with_label_values(&[view.name.as_str(), state])
                    .set(n as i64);
            }
        }
    }

    /// Stops refills and destroys every sandbox (graceful shutdown).
    pub async fn shutdown(self: &Arc<Self>) {
        self.shutdown.cancel();
        let pools = snapshot(&self.pools);
        for pool in &pools {
            pool.state().deleted = true;
            pool.refill.notify_one();
        }
        // Let creations and destructions under way finish, so none outlives us.
        self.background.close();
        if tokio::time::timeout(Duration::from_secs(60), self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background sandbox work still running after 60 s");
        }
        let ids: Vec<String> = self
            .sandboxes
            .write_or_recover()
            .drain()
            .map(|(id, _)| id)
            .collect();
        let n = ids.len();
        join_all(ids.iter().map(|id| self.runtime.destroy(id))).await;
        // A sweep for what a failed teardown left (a creation cut short by a containerd
        // outage, a destroy that errored), so that nothing outlives the daemon.
        match self.runtime.reclaim().await {
            Ok(0) => {}
            Ok(left) => tracing::warn!(sandboxes = left, "removed remains of failed teardowns"),
            Err(e) => tracing::warn!(error = %e, "final sweep failed"),
        }
        tracing::info!(sandboxes = n, "all sandboxes destroyed");
    }
}

/// The values of a shared map, copied out so no lock is held while they are used.
fn snapshot<T>(map: &RwLock<HashMap<String, Arc<T>>>) -> Vec<Arc<T>> {
    map.read_or_recover().values().cloned().collect()
}
