//! Sandbox binding: a Sandbox that waits for a node is bound to the node whose shard of its
//! pool shows the most idle sandboxes not yet promised to other Sandboxes. That node's daemon
//! then acquires one for it (the operator never calls a node).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::{Resource, ResourceExt};

use super::desired::{Change, ObjectKey, PassOptions, Snapshot};
use crate::crd::{Sandbox, SandboxPhase, SandboxStatus};

/// The node API's address of `node`: its internal IP, else any address.
pub fn node_endpoint(node: &Node, port: u16) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    let address = addresses
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .or_else(|| addresses.iter().find(|a| a.type_.ends_with("IP")))?;
    Some(if address.address.contains(':') {
        format!("http://[{}]:{port}", address.address)
    } else {
        format!("http://{}:{port}", address.address)
    })
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
}

fn waiting(sandbox: &Sandbox) -> bool {
    // A node's mirror of a lease of its API is bound already (its status follows).
    sandbox.meta().deletion_timestamp.is_none()
        && sandbox
            .labels()
            .get("arl.infra.io/mirror")
            .is_none_or(|v| v != "true")
        && sandbox
            .status
            .as_ref()
            .is_none_or(|s| s.phase == SandboxPhase::Pending && s.node_name.is_none())
}

/// Status writes for Sandboxes that wait for a node.
pub fn bindings(snapshot: &Snapshot, options: &PassOptions) -> Vec<Change> {
    let nodes: BTreeMap<String, &Node> = snapshot
        .nodes
        .iter()
        .filter(|n| ready(n))
        .map(|n| (n.name_any(), n))
        .collect();
    // Idle capacity by (namespace, pool) and node, less what Bound sandboxes already claim.
    let mut free: BTreeMap<(String, String), BTreeMap<String, i64>> = BTreeMap::new();
    for shard in &snapshot.shards {
        if !nodes.contains_key(&shard.spec.node_name) || shard.meta().deletion_timestamp.is_some() {
            continue;
        }
        let idle = shard.status.as_ref().map_or(0, |s| i64::from(s.idle));
        free.entry((
            shard.namespace().unwrap_or_default(),
            shard.spec.pool_name.clone(),
        ))
        .or_default()
        .insert(shard.spec.node_name.clone(), idle);
    }
    for sandbox in &snapshot.sandboxes {
        if let Some(status) = &sandbox.status
            && status.phase == SandboxPhase::Bound
            && let Some(node) = &status.node_name
            && let Some(n) = free
                .get_mut(&(
                    sandbox.namespace().unwrap_or_default(),
                    sandbox.spec.pool_ref.clone(),
                ))
                .and_then(|m| m.get_mut(node))
        {
            *n -= 1;
        }
    }

    let mut queue: Vec<&Sandbox> = snapshot.sandboxes.iter().filter(|s| waiting(s)).collect();
    queue.sort_by(|a, b| {
        (a.meta().creation_timestamp.as_ref(), a.name_any())
            .cmp(&(b.meta().creation_timestamp.as_ref(), b.name_any()))
    });
    let mut out = Vec::new();
    for sandbox in queue {
        let namespace = sandbox.namespace().unwrap_or_default();
        let pool = &sandbox.spec.pool_ref;
        let pool_exists = snapshot
            .pools
            .iter()
            .any(|p| p.namespace().unwrap_or_default() == namespace && &p.name_any() == pool);
        let choice = free
            .get_mut(&(namespace, pool.clone()))
            .and_then(|by_node| {
                let (node, n) = by_node
                    .iter_mut()
                    .filter(|(_, n)| **n > 0)
                    // Most free first; ties go to the first name.
                    .max_by(|(a_name, a), (b_name, b)| a.cmp(b).then_with(|| b_name.cmp(a_name)))?;
                *n -= 1;
                Some(node.clone())
            });
        let status = match choice {
            Some(node) => SandboxStatus {
                phase: SandboxPhase::Bound,
                node_endpoint: nodes
                    .get(&node)
                    .and_then(|n| node_endpoint(n, options.node_port)),
                node_name: Some(node),
                ..Default::default()
            },
            None => SandboxStatus {
                phase: SandboxPhase::Pending,
                message: Some(if pool_exists {
                    format!("no node has an idle sandbox of WarmPool {pool:?} yet")
                } else {
                    format!("WarmPool {pool:?} does not exist")
                }),
                ..Default::default()
            },
        };
        if sandbox.status.as_ref() != Some(&status) {
            out.push(Change::SandboxStatus(
                ObjectKey::of(sandbox),
                sandbox.resource_version().unwrap_or_default(),
                Box::new(status),
            ));
        }
    }
    out
}
