//! Writes a pass's changes to the API server. Conditional writes (finalizers, Sandbox
//! bindings) carry the resource version they were computed from; a 409 Conflict re-reads the
//! object, re-decides and retries with backoff.

use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info_span, warn};

use super::desired::{Change, ObjectKey};
use crate::crd::{POOL_FINALIZER, Sandbox, SandboxPhase, WarmPool, WarmPoolShard};

/// Attempts of a conditional write before giving up on it for this pass.
const CONFLICT_ATTEMPTS: u32 = 5;
/// First backoff after a conflict; doubled on every retry.
const CONFLICT_BACKOFF: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: still conflicting after {CONFLICT_ATTEMPTS} attempts")]
    Conflicts { what: String },
}

/// What a pass wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub writes: u32,
    pub failed: u32,
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Applies every change; a failing change does not stop the others. Returns the count and
/// the first error (the caller re-runs the pass later).
pub async fn apply(client: &Client, changes: Vec<Change>) -> (Written, Option<ApplyError>) {
    let mut written = Written::default();
    let mut first_error = None;
    for change in changes {
        let label = describe(&change);
        match apply_one(client, change)
            .instrument(info_span!("write", %label))
            .await
        {
            Ok(n) => written.writes += n,
            Err(e) => {
                warn!(error = %e, "write failed");
                written.failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (written, first_error)
}

fn describe(change: &Change) -> String {
    match change {
        Change::AddFinalizer(k) => format!("add finalizer to warmpool {}/{}", k.namespace, k.name),
        Change::RemoveFinalizer(k) => {
            format!("remove finalizer of warmpool {}/{}", k.namespace, k.name)
        }
        Change::CreateShard(s) => format!(
            "create shard {}/{}",
            s.namespace().unwrap_or_default(),
            s.name_any()
        ),
        Change::UpdateShard(k, _) => format!("update shard {}/{}", k.namespace, k.name),
        Change::DeleteShard(k) => format!("delete shard {}/{}", k.namespace, k.name),
        Change::PoolStatus(k, _) => format!("status of warmpool {}/{}", k.namespace, k.name),
        Change::SandboxStatus(k, _, _) => format!("status of sandbox {}/{}", k.namespace, k.name),
    }
}

fn api_error(what: &str) -> impl FnOnce(kube::Error) -> ApplyError + '_ {
    move |source| ApplyError::Api {
        what: what.to_string(),
        source,
    }
}

/// Applies one change; returns the number of writes it took.
async fn apply_one(client: &Client, change: Change) -> Result<u32, ApplyError> {
    let what = describe(&change);
    let params = PatchParams::default();
    match change {
        Change::AddFinalizer(key) => set_finalizer(client, &key, true, &what).await,
        Change::RemoveFinalizer(key) => set_finalizer(client, &key, false, &what).await,
        Change::CreateShard(shard) => {
            let api: Api<WarmPoolShard> =
                Api::namespaced(client.clone(), &shard.namespace().unwrap_or_default());
            match api.create(&PostParams::default(), &shard).await {
                Ok(_) => Ok(1),
                // Created by an earlier pass whose answer was lost: set its spec instead.
                Err(e) if code(&e) == Some(409) => {
                    let patch = Patch::Merge(json!({"spec": shard.spec}));
                    api.patch(&shard.name_any(), &params, &patch)
                        .await
                        .map_err(api_error(&what))?;
                    Ok(2)
                }
                Err(e) => Err(api_error(&what)(e)),
            }
        }
        Change::UpdateShard(key, spec) => {
            let api: Api<WarmPoolShard> = Api::namespaced(client.clone(), &key.namespace);
            match api
                .patch(&key.name, &params, &Patch::Merge(json!({"spec": spec})))
                .await
            {
                Ok(_) => Ok(1),
                Err(e) if code(&e) == Some(404) => Ok(1),
                Err(e) => Err(api_error(&what)(e)),
            }
        }
        Change::DeleteShard(key) => {
            let api: Api<WarmPoolShard> = Api::namespaced(client.clone(), &key.namespace);
            match api.delete(&key.name, &DeleteParams::default()).await {
                Ok(_) => Ok(1),
                Err(e) if code(&e) == Some(404) => Ok(1),
                Err(e) => Err(api_error(&what)(e)),
            }
        }
        Change::PoolStatus(key, status) => {
            let api: Api<WarmPool> = Api::namespaced(client.clone(), &key.namespace);
            match api
                .patch_status(&key.name, &params, &Patch::Merge(json!({"status": status})))
                .await
            {
                Ok(_) => Ok(1),
                Err(e) if code(&e) == Some(404) => Ok(1),
                Err(e) => Err(api_error(&what)(e)),
            }
        }
        Change::SandboxStatus(key, version, status) => {
            bind_sandbox(client, &key, version, &status, &what).await
        }
    }
}

/// Adds or removes the pool finalizer, conditional on the resource version; on conflict,
/// re-reads the pool and decides again.
async fn set_finalizer(
    client: &Client,
    key: &ObjectKey,
    add: bool,
    what: &str,
) -> Result<u32, ApplyError> {
    let api: Api<WarmPool> = Api::namespaced(client.clone(), &key.namespace);
    let mut writes = 0;
    let mut pool = api.get(&key.name).await.map_err(api_error(what))?;
    for attempt in 0..CONFLICT_ATTEMPTS {
        let mut finalizers = pool.finalizers().to_vec();
        let has = finalizers.iter().any(|f| f == POOL_FINALIZER);
        if add == has || (add && pool.metadata.deletion_timestamp.is_some()) {
            return Ok(writes);
        }
        if add {
            finalizers.push(POOL_FINALIZER.to_string());
        } else {
            finalizers.retain(|f| f != POOL_FINALIZER);
        }
        let patch = json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": pool.resource_version(),
        }});
        writes += 1;
        match api
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return Ok(writes),
            Err(e) if code(&e) == Some(409) => {
                debug!(attempt, "conflict; re-reading");
                tokio::time::sleep(CONFLICT_BACKOFF * 2u32.pow(attempt)).await;
                pool = api.get(&key.name).await.map_err(api_error(what))?;
            }
            Err(e) if code(&e) == Some(404) => return Ok(writes),
            Err(e) => return Err(api_error(what)(e)),
        }
    }
    Err(ApplyError::Conflicts {
        what: what.to_string(),
    })
}

/// Writes a Sandbox's status conditional on `version`. On conflict, re-reads it: if it still
/// waits for a node, writes the same decision on the new version; if someone else moved it
/// on, leaves it.
async fn bind_sandbox(
    client: &Client,
    key: &ObjectKey,
    mut version: String,
    status: &crate::crd::SandboxStatus,
    what: &str,
) -> Result<u32, ApplyError> {
    let api: Api<Sandbox> = Api::namespaced(client.clone(), &key.namespace);
    let mut writes = 0;
    for attempt in 0..CONFLICT_ATTEMPTS {
        // Explicit nulls clear what the new status does not carry.
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "status": {
                "phase": status.phase,
                "nodeName": status.node_name,
                "nodeEndpoint": status.node_endpoint,
                "sandboxId": status.sandbox_id,
                "message": status.message,
            },
        });
        writes += 1;
        match api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return Ok(writes),
            Err(e) if code(&e) == Some(409) => {
                debug!(attempt, "conflict; re-reading");
                tokio::time::sleep(CONFLICT_BACKOFF * 2u32.pow(attempt)).await;
                let fresh = match api.get(&key.name).await {
                    Ok(s) => s,
                    Err(e) if code(&e) == Some(404) => return Ok(writes),
                    Err(e) => return Err(api_error(what)(e)),
                };
                let still_waiting = fresh.metadata.deletion_timestamp.is_none()
                    && fresh
                        .status
                        .as_ref()
                        .is_none_or(|s| s.phase == SandboxPhase::Pending && s.node_name.is_none());
                if !still_waiting {
                    return Ok(writes);
                }
                version = fresh.resource_version().unwrap_or_default();
            }
            Err(e) if code(&e) == Some(404) => return Ok(writes),
            Err(e) => return Err(api_error(what)(e)),
        }
    }
    Err(ApplyError::Conflicts {
        what: what.to_string(),
    })
}
