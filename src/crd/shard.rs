//! `WarmPoolShard`: one pool's share on one node — the contract between the operator and the
//! node daemons.
//!
//! - Name: `<pool>-<node>` (shortened with a hash when too long; see [`shard_name`]), in the
//!   pool's namespace, owned by the pool (garbage-collected with it), labelled with
//!   [`POOL_LABEL`](super::POOL_LABEL) and [`NODE_LABEL`](super::NODE_LABEL).
//! - Spec, written only by the operator: `nodeName`, `poolName`, `poolGeneration`, `quota`
//!   (how many idle, ready sandboxes of the pool this node keeps) and `sandbox` (the pool's
//!   sandbox definition, copied so that the daemon needs no other object).
//! - Status, written only by that node's daemon through the status subresource: `idle`,
//!   `allocated`, `starting`, `observedPoolGeneration`, `lastError`, `demand`.
//! - A daemon lists and watches only its own shards with the field selector
//!   `spec.nodeName=<node>` (a CRD selectable field).
//!
//! A daemon's loop: keep `quota` idle sandboxes built from `sandbox` (replace those built from
//! an older `poolGeneration` as they come back), and patch the status when the counts change
//! (coalesced; the operator re-plans from `demand`). When the shard disappears, drain the pool.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::common::SandboxDefinition;

/// One pool's quota on one node.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "WarmPoolShard",
    doc = "One WarmPool's share on one node: spec written by the operator, status by that node's daemon.",
    namespaced,
    cel,
    status = "WarmPoolShardStatus",
    shortname = "wps",
    category = "arl",
    derive = "PartialEq",
    derive = "Default",
    selectable = ".spec.nodeName",
    selectable = ".spec.poolName",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Quota", type_ = "integer", json_path = ".spec.quota"),
    printcolumn(name = "Idle", type_ = "integer", json_path = ".status.idle"),
    printcolumn(name = "Allocated", type_ = "integer", json_path = ".status.allocated"),
    printcolumn(name = "Starting", type_ = "integer", json_path = ".status.starting"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolShardSpec {
    /// The node whose daemon keeps these sandboxes (never changes).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,
    /// The WarmPool (same namespace) this shard belongs to (never changes).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("poolName is immutable"))]
    pub pool_name: String,
    /// The pool's `metadata.generation` that `sandbox` was copied from.
    pub pool_generation: i64,
    /// Idle, ready sandboxes this node keeps for the pool.
    #[x_kube(validation = Rule::new("self >= 0").message("quota must not be negative"))]
    pub quota: i32,
    /// How the sandboxes are built (the pool's definition at `poolGeneration`).
    pub sandbox: SandboxDefinition,
}

/// What the node's daemon reports about its share.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolShardStatus {
    /// The node API's URL while it takes acquires (absent while the node is cordoned or
    /// draining): where other nodes send clients when their share of the pool runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The `poolGeneration` the daemon has applied.
    #[serde(default)]
    pub observed_pool_generation: i64,
    /// Ready sandboxes waiting to be acquired.
    #[serde(default)]
    pub idle: i32,
    /// Sandboxes lent out.
    #[serde(default)]
    pub allocated: i32,
    /// Sandboxes being created.
    #[serde(default)]
    pub starting: i32,
    /// The last failure to create a sandbox, if the latest attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ShardError>,
    /// How fast the node's share drains (the planner weighs quotas by it).
    #[serde(default)]
    pub demand: Demand,
}

/// A failure reported by a daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardError {
    /// Short machine-readable cause, e.g. `ImagePullFailed`.
    pub reason: String,
    /// What went wrong, for humans.
    #[schemars(length(max = 1024))]
    pub message: String,
    /// When it happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// Acquire demand on one node, smoothed by the daemon over the last minutes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Demand {
    /// Acquires served per minute.
    #[serde(default)]
    pub acquires_per_minute: i32,
    /// Acquires per minute that found no idle sandbox.
    #[serde(default)]
    pub misses_per_minute: i32,
}

/// The shard name for a pool and a node: `<pool>-<node>`, or, when that exceeds the 253
/// characters an object name may have, a prefix of it plus a hash of the pair.
pub fn shard_name(pool: &str, node: &str) -> String {
    let full = format!("{pool}-{node}");
    if full.len() <= 253 {
        return full;
    }
    let hash = hex::encode(&Sha256::digest(format!("{pool}\0{node}").as_bytes())[..8]);
    let mut prefix: String = full.chars().take(253 - 17).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{hash}")
}
