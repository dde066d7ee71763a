//! Optional (`--mirror-sandboxes`): sandboxes leased through the node API, shown as `Sandbox`
//! objects so that `kubectl get sandboxes` lists them too.
//!
//! Off the request path entirely: a ticker compares the node's leases (memory) with what it
//! mirrored, creates an object (phase `Ready`, node, endpoint, sandbox id) for each new lease
//! and deletes the object of each lease that ended, a bounded number per round. Acquires and
//! execs never wait for it or write anything themselves. Mirrors carry the label
//! [`MIRROR_LABEL`], so the operator never binds them and this node's object watch does not
//! serve them; deleting one does not end the lease (the SDK holder owns it), the next round
//! puts it back. A restarted daemon lists its mirrors and keeps those of leases it still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::sandboxes::{OBJECT_LABEL, not_found};
use crate::api::SandboxInfo;
use crate::crd::{NODE_LABEL, POOL_LABEL, Sandbox, SandboxPhase, SandboxSpec, SandboxStatus};
use crate::node::manager::Manager;
use crate::util::MutexExt;

/// Label on the mirror objects (value `"true"`).
pub const MIRROR_LABEL: &str = "arl.infra.io/mirror";
/// Creations or deletions per round at most: a burst of leases reaches the API server spread
/// over rounds, not at once.
const PER_ROUND: usize = 64;

/// Whether `sandbox` is a mirror (neither bound by the operator nor served by a node).
pub fn is_mirror(sandbox: &Sandbox) -> bool {
    sandbox
        .labels()
        .get(MIRROR_LABEL)
        .is_some_and(|v| v == "true")
}

/// The mirror object's name for a sandbox id (ids are lowercase letters, digits and `-`).
fn object_name(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(240)
        .collect();
    format!("node-{}", clean.trim_matches('-'))
}

pub struct Mirror {
    mgr: Arc<Manager>,
    api: Api<Sandbox>,
    node: String,
    endpoint: Option<String>,
    interval: Duration,
    /// Object name by sandbox id, of the leases mirrored.
    mirrored: std::sync::Mutex<BTreeMap<String, String>>,
    /// API writes so far (creations, status writes, deletions).
    pub writes: AtomicU64,
}

impl Mirror {
    pub fn new(
        mgr: Arc<Manager>,
        api: Api<Sandbox>,
        node: String,
        endpoint: Option<String>,
        interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            mgr,
            api,
            node,
            endpoint,
            interval,
            mirrored: std::sync::Mutex::new(BTreeMap::new()),
            writes: AtomicU64::new(0),
        })
    }

    /// Takes back an earlier daemon's mirrors, then mirrors on a ticker until shutdown.
    pub async fn run(self: Arc<Self>) {
        if let Err(e) = self.take_back().await {
            tracing::warn!(error = %e, "listing this node's mirrored Sandboxes failed");
        }
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.mgr.shutdown.cancelled() => return,
                _ = tick.tick() => self.round().await,
            }
        }
    }

    /// The leases of the node API (not those made for Sandbox objects), by sandbox id.
    fn leases(&self) -> BTreeMap<String, SandboxInfo> {
        self.mgr
            .leased()
            .into_iter()
            .filter(|s| !s.labels.contains_key(OBJECT_LABEL))
            .map(|s| (s.id.clone(), s))
            .collect()
    }

    /// Mirrors an earlier daemon left: kept for leases still held, deleted otherwise.
    async fn take_back(&self) -> Result<(), kube::Error> {
        let selector = format!("{MIRROR_LABEL}=true,{NODE_LABEL}={}", self.node);
        let found = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await?;
        let leases = self.leases();
        for object in found {
            let id = object.status.as_ref().and_then(|s| s.sandbox_id.clone());
            match id {
                Some(id) if leases.contains_key(&id) => {
                    self.mirrored
                        .lock_or_recover()
                        .insert(id, object.name_any());
                }
                _ => {
                    self.delete(&object.name_any()).await;
                }
            }
        }
        Ok(())
    }

    /// One round: new leases get an object, ended ones lose theirs.
    pub async fn round(&self) {
        let leases = self.leases();
        let (new, ended): (Vec<SandboxInfo>, Vec<(String, String)>) = {
            let mirrored = self.mirrored.lock_or_recover();
            let new = leases
                .values()
                .filter(|s| !mirrored.contains_key(&s.id))
                .take(PER_ROUND)
                .cloned()
                .collect();
            let ended = mirrored
                .iter()
                .filter(|(id, _)| !leases.contains_key(*id))
                .take(PER_ROUND)
                .map(|(id, name)| (id.clone(), name.clone()))
                .collect();
            (new, ended)
        };
        for (id, name) in ended {
            if self.delete(&name).await {
                self.mirrored.lock_or_recover().remove(&id);
            }
        }
        for lease in new {
            match self.create(&lease).await {
                Ok(name) => {
                    self.mirrored.lock_or_recover().insert(lease.id, name);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %lease.id, error = %e, "mirroring the sandbox failed; next round retries")
                }
            }
        }
    }

    async fn create(&self, lease: &SandboxInfo) -> Result<String, kube::Error> {
        let name = object_name(&lease.id);
        let mut object = Sandbox::new(
            &name,
            SandboxSpec {
                pool_ref: lease.pool.clone(),
                keep_alive: true,
                labels: lease.labels.clone(),
                ..SandboxSpec::default()
            },
        );
        object.metadata.labels = Some(BTreeMap::from([
            (MIRROR_LABEL.to_string(), "true".to_string()),
            (NODE_LABEL.to_string(), self.node.clone()),
            (POOL_LABEL.to_string(), lease.pool.clone()),
        ]));
        match self.api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            // Made by an earlier round or daemon: its status is written again below.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        }
        let status = SandboxStatus {
            phase: SandboxPhase::Ready,
            node_name: Some(self.node.clone()),
            node_endpoint: self.endpoint.clone(),
            sandbox_id: Some(lease.id.clone()),
            message: Some("leased through the node API (mirrored)".into()),
        };
        self.api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(name)
    }

    /// Deletes a mirror; false when it is still there (the next round tries again).
    async fn delete(&self, name: &str) -> bool {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) if not_found(&e) => true,
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "deleting a mirror failed");
                false
            }
        }
    }
}
