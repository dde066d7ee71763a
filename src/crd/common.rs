//! Types shared by several resources: the sandbox definition a pool hands to its shards, the
//! reuse and network policies, and the schema of an embedded pod template.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, PodTemplateSpec, ResourceRequirements};
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// What happens to a sandbox when it is released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Reuse {
    /// Destroy it and warm a fresh one.
    #[default]
    Destroy,
    /// Kill its processes, wipe its workspace and put it back in the pool.
    Reset,
}

/// The network a pool's sandboxes get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No egress (a NetworkPolicy denies it in a cluster; loopback only on a plain host).
    #[default]
    None,
    /// Egress allowed.
    Egress,
}

/// How a pool's sandboxes are built: either a full pod `template` or the `image` shorthand
/// (with optional `resources` and `env`), plus the lifecycle policies. The operator copies the
/// pool's definition into every shard, so a node's daemon needs nothing but its own shards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("has(self.template) != has(self.image)").message("exactly one of template or image must be set"),
    validation = Rule::new("has(self.image) || (!has(self.resources) && !has(self.env))").message("resources and env go with image; put them in the template instead"),
)]
pub struct SandboxDefinition {
    /// A pod template (as in a Deployment); the first container runs the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pod_template_schema")]
    pub template: Option<PodTemplateSpec>,
    /// Shorthand for a one-container template: the image to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Resources of the shorthand's container (requests count against node capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Environment of the shorthand's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Destroy or reset a released sandbox.
    #[serde(default)]
    pub reuse: Reuse,
    /// Release a sandbox idle this long (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("idleTimeoutSeconds must be positive"))]
    pub idle_timeout_seconds: Option<i64>,
    /// Release a sandbox this long after it was acquired (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("maxLifetimeSeconds must be positive"))]
    pub max_lifetime_seconds: Option<i64>,
    /// Egress policy.
    #[serde(default)]
    pub network: Network,
}

/// An embedded pod template is kept as an opaque object in the CRD schema: the full
/// PodTemplateSpec schema would make the CRD larger than the 256 KiB that a client-side
/// `kubectl apply` can annotate. The operator and the daemons parse it with the typed
/// `PodTemplateSpec`, and the apiserver validates the pods made from it.
pub fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "A pod template (metadata and spec), as in a Deployment.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Labels as a plain map, for selectors.
pub type Labels = BTreeMap<String, String>;

/// The finalizer the operator puts on WarmPools so that their shards go first.
pub const POOL_FINALIZER: &str = "arl.infra.io/shards";
/// Label on a shard naming its pool.
pub const POOL_LABEL: &str = "arl.infra.io/pool";
/// Label on a shard naming its node.
pub const NODE_LABEL: &str = "arl.infra.io/node";
