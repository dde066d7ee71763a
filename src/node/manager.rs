//! The sandbox manager's shared state: pools, live sandboxes, the graveyard of recent deaths,
//! and what every part of the lease core uses (lookups, teardown, shutdown). Its jobs live in
//! their own modules: `lease.rs` (acquire, release, reset), `refill.rs` (keeping pools warm),
//! `housekeeping.rs` (death watch, expiry, health checks) and `adopt.rs` (taking back what a
//! predecessor daemon left). Acquire and release never touch anything slower than a mutex and
//! a small file: creation and destruction run in background tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::auth::{Auth, Owner};
use super::metrics::Metrics;
use super::once::OnceMap;
use super::pool::Pool;
use super::records::Records;
use super::sandbox::Sandbox;
use crate::api::{ApiError, ErrorCode, PoolSpec, PoolView, SandboxInfo};
use crate::runtime::Runtime;
use crate::util::{MutexExt, RwLockExt};

/// Ids of recently dead sandboxes remembered, so callers get "died" rather than "unknown".
const GRAVEYARD: usize = 4096;
/// Acquire request ids remembered for retries.
const ACQUISITIONS_REMEMBERED: usize = 4096;
/// Agent replies buffered at once, node-wide: 1 GiB.
const REPLY_BUDGET_KIB: usize = 1 << 20;
/// How long shutdown waits for creations, resets and destructions under way.
const BACKGROUND_WAIT: Duration = Duration::from_secs(60);

/// An allocated sandbox that went away without being released.
struct Grave {
    id: String,
    reason: String,
    owner: Owner,
}

/// What a shutdown does with the sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Destroy every sandbox: nothing outlives the daemon.
    Stop,
    /// Leave every sandbox running, recorded, for the next daemon on this state directory.
    HandOver,
}

pub struct Manager {
    pub(super) runtime: Arc<dyn Runtime>,
    pub(super) pools: RwLock<HashMap<String, Arc<Pool>>>,
    pub(super) sandboxes: RwLock<HashMap<String, Arc<Sandbox>>>,
    graveyard: Mutex<VecDeque<Grave>>,
    pub(super) create_permits: Arc<Semaphore>,
    /// Sandbox ids handed out by request id, for retried acquires.
    pub(super) acquisitions: OnceMap<(Owner, String), Vec<String>>,
    /// KiB of agent replies the daemon may buffer at once (exec results in flight).
    pub reply_budget: Arc<Semaphore>,
    /// Creations, resets and destructions in flight, awaited on shutdown.
    pub(super) background: TaskTracker,
    /// The multi-threaded runtime for the manager's blocking sandbox work (creation, teardown)
    /// and its long-lived tasks (refills, watchers, housekeeping), whichever thread asks for
    /// them: the HTTP front's thread only serves requests (see `node::serve_front`).
    pub(super) tasks: tokio::runtime::Handle,
    /// Each sandbox's pool and lease on disk, for a successor daemon.
    pub(super) records: Records,
    /// The node's snapshots (absent in unit tests of the lease core).
    pub(super) snapshots: std::sync::OnceLock<super::snapshots::Snapshots>,
    pub metrics: Metrics,
    pub auth: Auth,
    /// Cancelled when the node starts shutting down: refills stop, new work is refused.
    pub shutdown: CancellationToken,
    /// The node is cordoned (cluster mode): refills stop and acquires are refused, but
    /// leases run on and the node comes back when it is uncordoned.
    cordoned: AtomicBool,
    /// Other nodes' idle capacity per pool (cluster mode), for refusals and the pool listing.
    pub peers: super::peers::Peers,
}

impl Manager {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        auth: Auth,
        create_concurrency: usize,
        records: Records,
    ) -> Arc<Self> {
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
            records,
            snapshots: std::sync::OnceLock::new(),
            metrics: Metrics::new(),
            auth,
            shutdown: CancellationToken::new(),
            cordoned: AtomicBool::new(false),
            peers: Default::default(),
        })
    }

    pub fn runtime_kind(&self) -> &'static str {
        self.runtime.kind()
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

    /// True while the node is cordoned.
    pub fn is_cordoned(&self) -> bool {
        self.cordoned.load(Ordering::Relaxed)
    }

    /// Marks the node cordoned (refills stop, acquires are refused) or not (refills resume).
    /// Returns whether that changed anything.
    pub fn set_cordoned(&self, cordoned: bool) -> bool {
        if self.cordoned.swap(cordoned, Ordering::Relaxed) == cordoned {
            return false;
        }
        for pool in snapshot(&self.pools) {
            pool.refill.notify_one();
        }
        true
    }

    /// Why the node cannot serve new work right now, if it cannot: it is draining or
    /// cordoned, or every pool has no idle sandbox and its last creation failed.
    pub fn unready_reason(&self) -> Option<String> {
        if self.is_draining() {
            return Some("the node is shutting down".into());
        }
        if self.is_cordoned() {
            return Some("the node is cordoned: it takes no new sandbox leases".into());
        }
        let pools = snapshot(&self.pools);
        let mut failing = Vec::new();
        for pool in &pools {
            let st = pool.state();
            if st.failures_in_row() == 0 || st.idle() > 0 {
                return None;
            }
            let error = st.last_error().unwrap_or("unknown error");
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

    pub(super) fn pool(&self, name: &str) -> Result<Arc<Pool>, ApiError> {
        self.pools
            .read_or_recover()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no pool named {name:?}")))
    }

    pub fn pool_views(&self) -> Vec<PoolView> {
        let pools = snapshot(&self.pools);
        let paused = self.paused_counts();
        let mut views: Vec<PoolView> = pools
            .iter()
            .map(|p| {
                let mut status = p.status();
                status.paused = paused.get(&p.name).copied().unwrap_or(0);
                status.cluster_idle = self.peers.idle(&p.name).map(|n| n + status.idle);
                PoolView {
                    name: p.name.clone(),
                    spec: p.spec(),
                    status,
                }
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn pool_view(&self, name: &str) -> Result<PoolView, ApiError> {
        let pool = self.pool(name)?;
        let mut status = pool.status();
        status.paused = self.paused_counts().get(name).copied().unwrap_or(0);
        status.cluster_idle = self.peers.idle(name).map(|n| n + status.idle);
        Ok(PoolView {
            name: pool.name.clone(),
            spec: pool.spec(),
            status,
        })
    }

    /// Creates a pool, or updates its spec (new sandboxes use the new spec).
    pub fn put_pool(self: &Arc<Self>, name: &str, spec: PoolSpec) -> Result<(), ApiError> {
        let new = self.insert_pool(name, spec.clone())?;
        self.records.put_pool(name, &spec);
        if let Some(pool) = new {
            self.start_refill(pool);
        }
        Ok(())
    }

    /// Creates a pool without warming it yet (start-up adopts first), or updates its spec.
    /// Returns the new pool.
    pub(super) fn insert_pool(
        &self,
        name: &str,
        spec: PoolSpec,
    ) -> Result<Option<Arc<Pool>>, ApiError> {
        crate::api::pools::validate_pool_name(name).map_err(ApiError::bad_request)?;
        spec.validate().map_err(ApiError::bad_request)?;
        self.runtime
            .validate(&spec)
            .map_err(ApiError::bad_request)?;
        let mut pools = self.pools.write_or_recover();
        if let Some(pool) = pools.get(name) {
            pool.set_spec(spec);
            return Ok(None);
        }
        if pools.len() >= 64 {
            return Err(ApiError::bad_request("at most 64 pools per node"));
        }
        let pool = Arc::new(Pool::new(name.to_string(), spec));
        pools.insert(name.to_string(), pool.clone());
        Ok(Some(pool))
    }

    pub(super) fn start_refill(self: &Arc<Self>, pool: Arc<Pool>) {
        let span = tracing::info_span!("refill", pool = %pool.name);
        self.tasks
            .spawn(self.clone().refill_loop(pool).instrument(span));
    }

    /// Deletes a pool: idle sandboxes go now, allocated ones when released.
    pub fn delete_pool(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let pool = self
            .pools
            .write_or_recover()
            .remove(name)
            .ok_or_else(|| ApiError::not_found(format!("no pool named {name:?}")))?;
        self.records.remove_pool(name);
        if let Some(store) = self.snapshots.get() {
            store.doom_pool(name);
        }
        let idle = pool.state().delete();
        pool.refill.notify_one();
        for sb in idle {
            self.forget(&sb.id);
            self.spawn_destroy(sb.id.clone());
        }
        Ok(())
    }

    /// Makes a sandbox reachable by id. Called under its pool's lock, once the pool counts it,
    /// so that whoever later forgets it finds it counted.
    pub(super) fn register(&self, sb: &Arc<Sandbox>) {
        self.sandboxes
            .write_or_recover()
            .insert(sb.id.clone(), sb.clone());
    }

    /// Removes a sandbox from the live map; whoever gets `Some` owns its teardown.
    pub(super) fn forget(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.write_or_recover().remove(id)
    }

    /// Forgets a sandbox that went away and remembers why, in one step as lookups see it: a
    /// request finds the sandbox or its grave, never neither (which would read as "released").
    /// `first` runs once it is forgotten and before the grave shows, so that whatever it records
    /// (metrics, the cause) is there by the time anyone is told.
    pub(super) fn forget_and_bury(&self, sb: &Sandbox, reason: &str, first: impl FnOnce()) -> bool {
        let mut sandboxes = self.sandboxes.write_or_recover();
        if sandboxes.remove(&sb.id).is_none() {
            return false;
        }
        first();
        self.bury(sb, reason);
        true
    }

    /// Remembers why an allocated sandbox went away, for its holder's next request.
    pub(super) fn bury(&self, sb: &Sandbox, reason: &str) {
        let Some(lease) = sb.lease() else { return };
        self.bury_id(&sb.id, lease.owner, reason);
    }

    pub(super) fn bury_id(&self, id: &str, owner: Owner, reason: &str) {
        let mut graveyard = self.graveyard.lock_or_recover();
        graveyard.push_back(Grave {
            id: id.to_string(),
            reason: reason.to_string(),
            owner,
        });
        while graveyard.len() > GRAVEYARD {
            graveyard.pop_front();
        }
    }

    /// Drops a forgotten sandbox from its pool's counts and wakes the refill.
    pub(super) fn unaccount(&self, sb: &Sandbox) {
        let Ok(pool) = self.pool(&sb.pool) else {
            return;
        };
        pool.state().lose(sb);
        pool.refill.notify_one();
    }

    /// Runs sandbox work that shutdown must wait for, on the manager's runtime.
    pub(super) fn spawn_tracked(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.background.spawn_on(work, &self.tasks);
    }

    /// Destroys a forgotten sandbox in the background; its record goes first, so a crash in
    /// between leaves an unrecorded sandbox, which the next start destroys.
    pub(super) fn spawn_destroy(self: &Arc<Self>, id: String) {
        self.records.remove(&id);
        let this = self.clone();
        self.spawn_tracked(async move {
            if let Err(e) = this.runtime.destroy(&id).await {
                tracing::error!(sandbox = %id, error = %e, "destroy failed");
            }
        });
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
            return Err(unknown(id));
        };
        match sb.lease() {
            None => Err(unknown(id)),
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

    /// Every leased sandbox, whoever holds it (for the cluster's mirror of them).
    pub fn leased(&self) -> Vec<SandboxInfo> {
        self.sandboxes
            .read_or_recover()
            .values()
            .filter(|sb| sb.lease().is_some())
            .map(|sb| sb.info())
            .collect()
    }

    /// Whether the sandbox is still in the live map (not released, not dead).
    pub(super) fn is_live(&self, id: &str) -> bool {
        self.sandboxes.read_or_recover().contains_key(id)
    }

    /// Updates the per-state gauges (called when metrics are scraped).
    pub fn update_gauges(&self) {
        for view in self.pool_views() {
            for (state, n) in [
                ("idle", view.status.idle),
                ("allocated", view.status.allocated),
                ("starting", view.status.starting),
                ("paused", view.status.paused),
            ] {
                self.metrics
                    .sandboxes
                    .with_label_values(&[view.name.as_str(), state])
                    .set(n as i64);
            }
        }
    }

    /// Graceful shutdown: stops refills, lets the creations, resets and destructions under
    /// way finish, then destroys every sandbox (`Stop`) or leaves them all running and
    /// recorded for the next daemon (`HandOver`).
    pub async fn shutdown(self: &Arc<Self>, mode: ShutdownMode) {
        self.shutdown.cancel();
        let pools = snapshot(&self.pools);
        for pool in &pools {
            if mode == ShutdownMode::Stop {
                pool.state().delete();
            }
            // A refill loop ends when it sees the node draining.
            pool.refill.notify_one();
        }
        self.background.close();
        if tokio::time::timeout(BACKGROUND_WAIT, self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background sandbox work still running after 60 s");
        }
        if mode == ShutdownMode::HandOver {
            let n = self.sandboxes.read_or_recover().len();
            tracing::info!(sandboxes = n, "handing over: sandboxes left running");
            return;
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
        self.records.clear();
        if let Some(store) = self.snapshots.get() {
            store.clear();
        }
        tracing::info!(sandboxes = n, "all sandboxes destroyed");
    }
}

/// The answer for an id the node does not know: it may have been released, or lived on
/// another node or before a restart that could not keep it; the message claims neither.
fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("no sandbox {id:?} on this node"))
}

/// The values of a shared map, copied out so no lock is held while they are used.
pub(super) fn snapshot<T>(map: &RwLock<HashMap<String, Arc<T>>>) -> Vec<Arc<T>> {
    map.read_or_recover().values().cloned().collect()
}
