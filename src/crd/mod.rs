//! The custom resources of a cluster install (group `arl.infra.io`, version `v1alpha1`).
//!
//! - [`WarmPool`]: what users write — cluster-wide warm replicas of one sandbox definition;
//! - [`WarmPoolShard`]: one per pool and node — the contract between the operator (writes the
//!   spec: the node's quota and the pool's sandbox definition) and that node's daemon (writes the
//!   status: idle / allocated / starting / last error / demand);
//! - [`Sandbox`]: a declarative sandbox, bound by the operator to a node with idle capacity;
//! - [`Task`]: declarative steps run in a bound sandbox by that node's daemon.
//!
//! `arl crds` prints the CRD YAML generated from these types; `crds/` holds the same text, and
//! a test fails when the two differ.

// kube's `printcolumn(name = .., type_ = ..)` repeats keys that this lint takes for duplicated
// attributes.
#![allow(clippy::duplicated_attributes)]

mod common;
mod sandbox;
mod shard;
mod task;
mod warmpool;

pub use common::*;
pub use sandbox::*;
pub use shard::*;
pub use task::*;
pub use warmpool::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every ARL resource.
pub const GROUP: &str = "arl.infra.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD, in the order `arl crds` prints them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        WarmPool::crd(),
        WarmPoolShard::crd(),
        Sandbox::crd(),
        Task::crd(),
    ]
}

/// The file name under `crds/` of a CRD (`<plural>.<group>.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as a YAML document.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(crd)
}

/// Every CRD as one multi-document YAML stream (what `arl crds` prints).
pub fn all_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&to_yaml(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
