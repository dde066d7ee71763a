//! `Sandbox` objects bound to this node → sandboxes held for them, and back into their status.
//!
//! One watch (field selector `status.nodeName=<node>`, a selectable field of the CRD) follows
//! the Sandboxes the operator bound here. For each one the daemon puts its finalizer on the
//! object, acquires a sandbox of `poolRef` in-process (the same lease path as the node API,
//! with the object's env, labels and timeouts, and a request id derived from the object's uid
//! so that a retry, even after a restart, gets the same sandbox), then writes `Ready` with the
//! sandbox id. A Sandbox that shows a `sandboxId` this node still holds for it (a successor
//! daemon on the same state directory) is adopted, not acquired again.
//!
//! Deleting the object releases the sandbox before the finalizer goes. When the lease ends on
//! its own (idle timeout, max lifetime) or the sandbox dies, a periodic check (in memory, no
//! API call) writes `Released` or `Failed`. Writes happen only on these transitions: SDK
//! acquires and execs never cause one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::Instrument;

use crate::api::{AcquireRequest, ApiError, ErrorCode};
use crate::crd::{Sandbox, SandboxPhase};
use crate::node::auth::Owner;
use crate::node::manager::Manager;
use crate::util::MutexExt;

/// The daemon's finalizer on the Sandboxes it serves: deletion waits for the release.
pub const SANDBOX_FINALIZER: &str = "arl.infra.io/node-release";
/// Lease label naming the Sandbox object a sandbox was acquired for.
pub const OBJECT_LABEL: &str = "arl.infra.io/sandbox";
/// Lease label holding that object's uid (what adoption checks).
pub const UID_LABEL: &str = "arl.infra.io/sandbox-uid";

#[derive(Debug, Error)]
pub enum ObjectError {
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Node(#[from] ApiError),
    #[error("gave up after {0} attempts")]
    Exhausted(u32),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// Retry and check timing (shorter in tests).
#[derive(Debug, Clone)]
pub struct ObjectOptions {
    /// First pause between attempts; doubled each time up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Attempts at an acquire or a write before giving up.
    pub attempts: u32,
    /// How often held sandboxes are checked for an ended lease (in memory).
    pub check_interval: Duration,
}

impl Default for ObjectOptions {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            attempts: 10,
            check_interval: Duration::from_secs(2),
        }
    }
}

impl ObjectOptions {
    fn backoff(&self, attempt: u32) -> Duration {
        self.retry_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.retry_max)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Held {
    Acquiring,
    Ready(String),
}

#[derive(Debug, Clone)]
struct Served {
    uid: String,
    held: Held,
    keep_alive: bool,
}

/// A sandbox a Task may run in: its id and the owner its lease is under.
#[derive(Debug, Clone)]
pub struct ReadySandbox {
    pub id: String,
    pub owner: Owner,
    pub keep_alive: bool,
}

pub struct SandboxSync {
    pub(super) mgr: Arc<Manager>,
    api: Api<Sandbox>,
    node: String,
    pub(super) options: ObjectOptions,
    /// By object name.
    served: Mutex<HashMap<String, Served>>,
    /// Objects whose finalizer is being removed.
    finalizing: Mutex<HashSet<String>>,
    /// Bumped whenever a sandbox becomes ready (Tasks waiting for it look again).
    pub ready: tokio::sync::watch::Sender<u64>,
    /// Acquires made for objects (for tests and logs).
    pub acquires: AtomicU64,
    /// Status writes so far.
    pub writes: AtomicU64,
}

/// The owner a Sandbox object's lease is under: nobody in particular when the node API is
/// open (so the object's sandbox is reachable through it at `nodeEndpoint`), else a digest of
/// the object's uid that no bearer token has (only the daemon's Tasks reach it).
pub fn object_owner(mgr: &Manager, uid: &str) -> Owner {
    if !mgr.auth.enabled() {
        return None;
    }
    Some(Sha256::digest(format!("arl.infra.io/Sandbox/{uid}").as_bytes()).into())
}

fn has_finalizer(obj: &Sandbox) -> bool {
    obj.finalizers().iter().any(|f| f == SANDBOX_FINALIZER)
}

/// Errors that waiting can cure: no idle sandbox yet, a cordoned node, a pool the shard has
/// not made yet.
fn retryable(e: &ApiError) -> bool {
    e.retryable || matches!(e.code, ErrorCode::PoolExhausted | ErrorCode::NotFound)
}

/// The phase and message of a Sandbox whose sandbox the node no longer holds: its lease ran
/// out (the manager remembers "its lease expired") or it was released through the node API →
/// `Released`; it died → `Failed`.
fn ended(e: ApiError) -> (SandboxPhase, String) {
    if e.code == ErrorCode::NotFound {
        let message = "the sandbox was released through the node API".to_string();
        return (SandboxPhase::Released, message);
    }
    if e.message.contains("lease expired") {
        return (SandboxPhase::Released, e.message);
    }
    (SandboxPhase::Failed, e.message)
}

pub(super) fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl SandboxSync {
    pub fn new(
        mgr: Arc<Manager>,
        api: Api<Sandbox>,
        node: String,
        options: ObjectOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            mgr,
            api,
            node,
            options,
            served: Mutex::new(HashMap::new()),
            finalizing: Mutex::new(HashSet::new()),
            ready: tokio::sync::watch::Sender::new(0),
            acquires: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// The ready sandbox held for the object `name`, if this node holds one.
    pub fn ready_sandbox(&self, name: &str) -> Option<ReadySandbox> {
        let served = self.served.lock_or_recover();
        let s = served.get(name)?;
        match &s.held {
            Held::Ready(id) => Some(ReadySandbox {
                id: id.clone(),
                owner: object_owner(&self.mgr, &s.uid),
                keep_alive: s.keep_alive,
            }),
            Held::Acquiring => None,
        }
    }

    /// Whether the object `name` is served here (ready or being acquired).
    pub fn serves(&self, name: &str) -> bool {
        self.served.lock_or_recover().contains_key(name)
    }

    /// Watches the Sandboxes bound to this node until the node shuts down.
    pub async fn run(self: Arc<Self>) {
        let checker = tokio::spawn(self.clone().check_loop());
        let config = watcher::Config::default().fields(&format!("status.nodeName={}", self.node));
        let mut stream = watcher(self.api.clone(), config).default_backoff().boxed();
        let mut listed: Option<Vec<String>> = None;
        loop {
            let event = tokio::select! {
                // Shutdown first: a ready event must not be served after it.
                biased;
                () = self.mgr.shutdown.cancelled() => break,
                event = stream.next() => event,
            };
            let Some(event) = event else { break };
            match event {
                Ok(Event::Init) => listed = Some(Vec::new()),
                Ok(Event::InitApply(obj)) => {
                    if let Some(names) = listed.as_mut() {
                        names.push(obj.name_any());
                    }
                    self.apply(obj);
                }
                Ok(Event::InitDone) => {
                    let names = listed.take().unwrap_or_default();
                    let gone: Vec<String> = self
                        .served
                        .lock_or_recover()
                        .keys()
                        .filter(|n| !names.contains(n))
                        .cloned()
                        .collect();
                    for name in gone {
                        self.gone(&name);
                    }
                }
                Ok(Event::Apply(obj)) => self.apply(obj),
                Ok(Event::Delete(obj)) => self.gone(&obj.name_any()),
                Err(e) => {
                    tracing::warn!(error = %e, "watching this node's Sandboxes failed; retrying")
                }
            }
        }
        checker.abort();
    }

    /// Handles one observed state of a Sandbox bound here.
    pub fn apply(self: &Arc<Self>, obj: Sandbox) {
        let name = obj.name_any();
        let uid = obj.uid().unwrap_or_default();
        let status = obj.status.clone().unwrap_or_default();
        // A mirror stands for a lease of the node API: nothing to serve.
        if status.node_name.as_deref() != Some(self.node.as_str()) || super::mirror::is_mirror(&obj)
        {
            return;
        }
        let span = tracing::info_span!("sandbox_object", object = %name);
        if obj.meta().deletion_timestamp.is_some() {
            if has_finalizer(&obj) && self.finalizing.lock_or_recover().insert(name.clone()) {
                tokio::spawn(self.clone().finalize(obj).instrument(span));
            }
            return;
        }
        if !matches!(status.phase, SandboxPhase::Bound | SandboxPhase::Ready) {
            return;
        }
        {
            let mut served = self.served.lock_or_recover();
            match served.get(&name) {
                Some(s) if s.uid == uid => return,
                Some(_) => {
                    // A new object under an old name: the old one's sandbox goes.
                    drop(served);
                    self.gone(&name);
                    served = self.served.lock_or_recover();
                }
                None => {}
            }
            served.insert(
                name.clone(),
                Served {
                    uid: uid.clone(),
                    held: Held::Acquiring,
                    keep_alive: obj.spec.keep_alive,
                },
            );
        }
        tokio::spawn(self.clone().serve(obj).instrument(span));
    }

    /// Acquires (or adopts) the object's sandbox and writes `Ready`, or `Failed`.
    async fn serve(self: Arc<Self>, obj: Sandbox) {
        let name = obj.name_any();
        let uid = obj.uid().unwrap_or_default();
        match self.serve_inner(&obj).await {
            Ok(id) => {
                tracing::info!(sandbox = %id, "Sandbox ready");
                self.ready.send_modify(|n| *n += 1);
            }
            Err(ObjectError::ShuttingDown) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve the Sandbox");
                self.forget_if(&name, &uid);
                let message = e.to_string();
                if let Err(e) = self
                    .write_status(&name, SandboxPhase::Failed, None, Some(&message))
                    .await
                {
                    tracing::warn!(error = %e, "writing the Sandbox's failure failed");
                }
            }
        }
    }

    async fn serve_inner(&self, obj: &Sandbox) -> Result<String, ObjectError> {
        let name = obj.name_any();
        let uid = obj.uid().unwrap_or_default();
        let status = obj.status.clone().unwrap_or_default();
        if !has_finalizer(obj) {
            self.retrying("adding the finalizer", || self.add_finalizer(&name))
                .await?;
        }
        let owner = object_owner(&self.mgr, &uid);
        let adopted = status
            .sandbox_id
            .as_deref()
            .filter(|id| self.holds(id, &owner, &uid));
        let id = match (adopted, status.phase) {
            (Some(id), _) => {
                tracing::info!(sandbox = %id, "adopted the Sandbox's sandbox");
                id.to_string()
            }
            (None, SandboxPhase::Ready) => {
                return Err(ObjectError::Node(ApiError::new(
                    ErrorCode::SandboxUnavailable,
                    format!(
                        "sandbox {} is no longer held on this node",
                        status.sandbox_id.as_deref().unwrap_or("?")
                    ),
                )));
            }
            (None, _) => self.acquire(obj, owner).await?,
        };
        // Deleted meanwhile (its finalizer already handled): give the sandbox back.
        if !self.set_ready(&name, &uid, &id) {
            self.release(&id, &owner);
            return Err(ObjectError::ShuttingDown);
        }
        if status.phase != SandboxPhase::Ready || status.sandbox_id.as_deref() != Some(&id) {
            let written = self
                .retrying("writing Ready", || {
                    self.write_status(&name, SandboxPhase::Ready, Some(&id), None)
                })
                .await;
            if let Err(ObjectError::Kube(e)) = &written
                && not_found(e)
            {
                self.gone(&name);
                return Err(ObjectError::ShuttingDown);
            }
            written?;
        }
        Ok(id)
    }

    /// Whether this node holds `id` for the object `uid`.
    fn holds(&self, id: &str, owner: &Owner, uid: &str) -> bool {
        self.mgr
            .sandbox(id, owner)
            .ok()
            .and_then(|sb| sb.lease())
            .is_some_and(|l| l.labels.get(UID_LABEL).map(String::as_str) == Some(uid))
    }

    async fn acquire(&self, obj: &Sandbox, owner: Owner) -> Result<String, ObjectError> {
        let uid = obj.uid().unwrap_or_default();
        let spec = &obj.spec;
        let mut labels: BTreeMap<String, String> = spec.labels.clone();
        labels.insert(OBJECT_LABEL.into(), obj.name_any());
        labels.insert(UID_LABEL.into(), uid.clone());
        let positive = |s: Option<i64>| s.and_then(|s| u64::try_from(s).ok()).filter(|s| *s > 0);
        let request = AcquireRequest {
            pool: spec.pool_ref.clone(),
            count: Some(1),
            env: spec.env.clone(),
            labels,
            ttl_seconds: positive(spec.max_lifetime_seconds),
            idle_timeout_seconds: positive(spec.idle_timeout_seconds),
            request_id: Some(format!("sandbox-object-{uid}")),
        };
        let mut attempt = 0;
        loop {
            if self.mgr.is_draining() {
                return Err(ObjectError::ShuttingDown);
            }
            match self.mgr.acquire(owner, request.clone()).await {
                Ok(infos) => {
                    self.acquires.fetch_add(1, Ordering::Relaxed);
                    let Some(info) = infos.into_iter().next() else {
                        return Err(ObjectError::Node(ApiError::internal(
                            "the acquire returned no sandbox",
                        )));
                    };
                    return Ok(info.id);
                }
                Err(e) if retryable(&e) && attempt + 1 < self.options.attempts => {
                    tracing::info!(error = %e.message, attempt, "acquire failed; retrying");
                    self.pause(attempt).await?;
                    attempt += 1;
                }
                Err(e) => return Err(ObjectError::Node(e)),
            }
        }
    }

    async fn pause(&self, attempt: u32) -> Result<(), ObjectError> {
        tokio::select! {
            () = self.mgr.shutdown.cancelled() => Err(ObjectError::ShuttingDown),
            () = tokio::time::sleep(self.options.backoff(attempt)) => Ok(()),
        }
    }

    /// Runs `op` until it succeeds, a 404 says the object is gone, or the attempts run out.
    pub(super) async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ObjectError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if not_found(&e) => return Err(e.into()),
                Err(e) if attempt + 1 >= self.options.attempts => {
                    tracing::warn!(error = %e, "{what} failed; giving up");
                    return Err(ObjectError::Exhausted(self.options.attempts));
                }
                Err(e) => {
                    tracing::info!(error = %e, attempt, "{what} failed; retrying");
                    self.pause(attempt).await?;
                    attempt += 1;
                }
            }
        }
    }

    /// Adds the finalizer to the object as it is now (the resource version guards the list).
    async fn add_finalizer(&self, name: &str) -> Result<(), kube::Error> {
        let obj = self.api.get(name).await?;
        if has_finalizer(&obj) {
            return Ok(());
        }
        let mut finalizers = obj.finalizers().to_vec();
        finalizers.push(SANDBOX_FINALIZER.into());
        let patch = json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    async fn remove_finalizer(&self, name: &str) -> Result<(), kube::Error> {
        let obj = self.api.get(name).await?;
        if !has_finalizer(&obj) {
            return Ok(());
        }
        let finalizers: Vec<&String> = obj
            .finalizers()
            .iter()
            .filter(|f| *f != SANDBOX_FINALIZER)
            .collect();
        let patch = json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// One merge patch of the status subresource.
    pub async fn write_status(
        &self,
        name: &str,
        phase: SandboxPhase,
        sandbox_id: Option<&str>,
        message: Option<&str>,
    ) -> Result<(), kube::Error> {
        let mut status = json!({"phase": phase, "message": message});
        if let Some(id) = sandbox_id {
            status["sandboxId"] = json!(id);
        }
        self.api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Marks the object's sandbox ready; false if the object is no longer served (deleted).
    fn set_ready(&self, name: &str, uid: &str, id: &str) -> bool {
        let mut served = self.served.lock_or_recover();
        match served.get_mut(name) {
            Some(s) if s.uid == uid => {
                s.held = Held::Ready(id.to_string());
                true
            }
            _ => false,
        }
    }

    fn forget_if(&self, name: &str, uid: &str) {
        let mut served = self.served.lock_or_recover();
        if served.get(name).is_some_and(|s| s.uid == uid) {
            served.remove(name);
        }
    }

    fn release(&self, id: &str, owner: &Owner) {
        match self.mgr.release(id, owner) {
            Ok(()) => tracing::info!(sandbox = %id, "released the Sandbox's sandbox"),
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => tracing::warn!(sandbox = %id, error = %e.message, "release failed"),
        }
    }

    /// The object is gone (or replaced): its sandbox, if held, goes back to its pool.
    fn gone(&self, name: &str) {
        let Some(served) = self.served.lock_or_recover().remove(name) else {
            return;
        };
        if let Held::Ready(id) = served.held {
            self.release(&id, &object_owner(&self.mgr, &served.uid));
        }
    }

    /// Releases the sandbox of a Sandbox being deleted, then removes the finalizer.
    async fn finalize(self: Arc<Self>, obj: Sandbox) {
        let name = obj.name_any();
        let uid = obj.uid().unwrap_or_default();
        self.gone(&name);
        // After a restart the object may not be served yet: its recorded sandbox goes too.
        let owner = object_owner(&self.mgr, &uid);
        if let Some(id) = obj.status.as_ref().and_then(|s| s.sandbox_id.as_deref())
            && self.holds(id, &owner, &uid)
        {
            self.release(id, &owner);
        }
        match self
            .retrying("removing the finalizer", || self.remove_finalizer(&name))
            .await
        {
            Ok(()) => tracing::info!("Sandbox deleted; finalizer removed"),
            Err(ObjectError::Kube(e)) if not_found(&e) => {}
            Err(e) => tracing::warn!(error = %e, "removing the finalizer failed"),
        }
        self.finalizing.lock_or_recover().remove(&name);
    }

    /// Releases the sandbox of `name` once its Tasks are done (a Sandbox without `keepAlive`)
    /// and writes `Released`.
    pub async fn release_after_tasks(&self, name: &str) {
        let Some(served) = self.served.lock_or_recover().remove(name) else {
            return;
        };
        let Held::Ready(id) = served.held else {
            return;
        };
        self.release(&id, &object_owner(&self.mgr, &served.uid));
        let message = "its Tasks finished (keepAlive is false)";
        if let Err(e) = self
            .write_status(name, SandboxPhase::Released, None, Some(message))
            .await
        {
            tracing::warn!(object = %name, error = %e, "writing Released failed");
        }
    }

    async fn check_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.options.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check_once().await;
        }
    }

    /// Writes `Released` or `Failed` for every held sandbox whose lease ended on its own.
    pub async fn check_once(&self) {
        let lost: Vec<(String, ApiError)> = {
            let mut served = self.served.lock_or_recover();
            let mut lost = Vec::new();
            served.retain(|name, s| {
                let Held::Ready(id) = &s.held else {
                    return true;
                };
                match self.mgr.sandbox(id, &object_owner(&self.mgr, &s.uid)) {
                    Ok(_) => true,
                    Err(e) => {
                        lost.push((name.clone(), e));
                        false
                    }
                }
            });
            lost
        };
        for (name, e) in lost {
            let (phase, message) = ended(e);
            tracing::info!(object = %name, ?phase, %message, "Sandbox's sandbox ended");
            if let Err(e) = self.write_status(&name, phase, None, Some(&message)).await {
                tracing::warn!(object = %name, error = %e, "writing the end failed");
            }
        }
    }
}
