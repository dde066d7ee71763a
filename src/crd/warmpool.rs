//! `WarmPool`: cluster-wide warm sandboxes of one definition, spread over nodes by the operator.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, PodTemplateSpec, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Network, Reuse, SandboxDefinition, pod_template_schema};

/// Keep `replicas` warm sandboxes ready across the nodes that match the pool's node selection.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "WarmPool",
    doc = "Warm sandboxes of one definition, kept ready across the cluster's nodes.",
    namespaced,
    cel,
    status = "WarmPoolStatus",
    shortname = "wp",
    category = "arl",
    derive = "PartialEq",
    derive = "Default",
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63").message("a WarmPool name must be a DNS label (lowercase letters, digits, '-'; at most 63)"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(name = "Idle", type_ = "integer", json_path = ".status.idle"),
    printcolumn(name = "Allocated", type_ = "integer", json_path = ".status.allocated"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.template) != has(self.image)").message("exactly one of template or image must be set"),
    validation = Rule::new("has(self.image) || (!has(self.resources) && !has(self.env))").message("resources and env go with image; put them in the template instead"),
    validation = Rule::new("!has(self.maxPerNode) || self.minPerNode <= self.maxPerNode").message("minPerNode must not exceed maxPerNode"),
)]
pub struct WarmPoolSpec {
    /// Warm (idle, ready) sandboxes to keep across the cluster.
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,
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
    /// Only nodes with all these labels hold the pool's sandboxes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pool's sandboxes tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node affinity as in a pod spec (its required node-affinity terms narrow the nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "affinity_schema")]
    pub affinity: Option<Affinity>,
    /// Every eligible node keeps at least this many (while replicas allow).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("minPerNode must not be negative"))]
    pub min_per_node: i32,
    /// No node keeps more than this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxPerNode must be at least 1"))]
    pub max_per_node: Option<i32>,
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

/// Affinity is kept opaque in the schema for the same size reason as the pod template; the
/// operator parses it with the typed `Affinity`.
fn affinity_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let _ = g;
    schemars::json_schema!({
        "type": "object",
        "description": "Affinity as in a pod spec; required node-affinity terms narrow the nodes.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

impl WarmPoolSpec {
    /// The part of the spec that every shard carries.
    pub fn sandbox_definition(&self) -> SandboxDefinition {
        SandboxDefinition {
            template: self.template.clone(),
            image: self.image.clone(),
            resources: self.resources.clone(),
            env: self.env.clone(),
            reuse: self.reuse,
            idle_timeout_seconds: self.idle_timeout_seconds,
            max_lifetime_seconds: self.max_lifetime_seconds,
            network: self.network,
        }
    }
}

/// The pool as the operator last saw it, rolled up from its shards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// The spec generation this status describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// Warm sandboxes the plan asks for (equals replicas unless capacity falls short).
    #[serde(default)]
    pub desired: i32,
    /// Idle sandboxes reported by shards on the pool's current generation.
    #[serde(default)]
    pub ready: i32,
    /// Idle sandboxes reported by every shard.
    #[serde(default)]
    pub idle: i32,
    /// Sandboxes lent out.
    #[serde(default)]
    pub allocated: i32,
    /// Sandboxes being created.
    #[serde(default)]
    pub starting: i32,
    /// Nodes with a non-zero quota.
    #[serde(default)]
    pub nodes: i32,
    /// Replicas that no eligible node has room for.
    #[serde(default)]
    pub shortfall: i32,
    /// `Ready` (every shard has its quota warm) and `Degraded` (shortfall or failing nodes,
    /// with their last errors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
