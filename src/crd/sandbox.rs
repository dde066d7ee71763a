//! `Sandbox`: a declarative sandbox. The operator binds it to a node whose shard of the pool
//! shows idle capacity; that node's daemon then acquires a warm sandbox for it and reports
//! `Ready` with the sandbox id.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A sandbox from a WarmPool, held until deleted (or until its timeouts expire).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "Sandbox",
    doc = "A declarative sandbox from a WarmPool, bound to a node by the operator.",
    namespaced,
    cel,
    status = "SandboxStatus",
    shortname = "sbx",
    category = "arl",
    // The node's daemon watches only the Sandboxes bound to it (`status.nodeName=<node>`).
    selectable = ".status.nodeName",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolRef"),
    printcolumn(
        name = "Sandbox",
        type_ = "string",
        json_path = ".status.sandboxId",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The WarmPool (same namespace) to take the sandbox from (never changes).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("poolRef is immutable"))]
    pub pool_ref: String,
    /// Keep the sandbox after its Tasks finished (otherwise it is released once they all did).
    #[serde(default)]
    pub keep_alive: bool,
    /// Environment applied to every command run in the sandbox (late binding: no cold start).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Labels attached to the acquired sandbox (visible in the node API).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Release the sandbox after it was idle this long (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("idleTimeoutSeconds must be positive"))]
    pub idle_timeout_seconds: Option<i64>,
    /// Release the sandbox this long after it became ready (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("maxLifetimeSeconds must be positive"))]
    pub max_lifetime_seconds: Option<i64>,
}

/// Where a Sandbox is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SandboxPhase {
    /// Waiting for a node with idle capacity.
    #[default]
    Pending,
    /// A node was chosen (`nodeName`); its daemon is acquiring the sandbox.
    Bound,
    /// Acquired: `sandboxId` and `nodeEndpoint` say where to reach it.
    Ready,
    /// Given back to its pool.
    Released,
    /// It could not be acquired or was lost (`message` says why).
    Failed,
}

/// Where the sandbox lives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default)]
    pub phase: SandboxPhase,
    /// The node it was bound to (set by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The node API's address (`http://<node IP>:<port>`), set by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_endpoint: Option<String>,
    /// The node API's sandbox id (set by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Why it is Pending or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
