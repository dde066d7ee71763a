//! One planning pass, as a pure function: from what the operator sees (pools, shards, nodes,
//! sandboxes) to the writes that bring the cluster in line. An unchanged cluster yields no
//! change at all.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};

use super::binding;
use super::convert::{node_info, pool_info};
use super::planner::{self, PoolPlan};
use super::rollup::{pool_status, unserved_status};
use crate::crd::{
    NODE_LABEL, POOL_FINALIZER, POOL_LABEL, Sandbox, SandboxStatus, WarmPool, WarmPoolShard,
    WarmPoolShardSpec, WarmPoolStatus, shard_name,
};

/// What the operator sees.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pools: Vec<WarmPool>,
    pub shards: Vec<WarmPoolShard>,
    pub nodes: Vec<Node>,
    pub sandboxes: Vec<Sandbox>,
}

/// Settings of a pass.
#[derive(Debug, Clone)]
pub struct PassOptions {
    /// The node daemons' API port (for `Sandbox.status.nodeEndpoint`).
    pub node_port: u16,
    /// The namespace the node daemons serve (their `--sandbox-namespace`): only WarmPools
    /// there get shards.
    pub sandbox_namespace: String,
}

/// An object by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of<K: Resource>(obj: &K) -> Self {
        ObjectKey {
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }
}

/// One write.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    AddFinalizer(ObjectKey),
    RemoveFinalizer(ObjectKey),
    CreateShard(Box<WarmPoolShard>),
    UpdateShard(ObjectKey, Box<WarmPoolShardSpec>),
    DeleteShard(ObjectKey),
    PoolStatus(ObjectKey, Box<WarmPoolStatus>),
    /// Sandbox status, conditional on the resource version it was computed from.
    SandboxStatus(ObjectKey, String, Box<SandboxStatus>),
}

/// The writes of one pass, in the order they are applied.
pub fn changes(snapshot: &Snapshot, now: &Time, options: &PassOptions) -> Vec<Change> {
    let mut out = Vec::new();
    let nodes: Vec<_> = snapshot.nodes.iter().map(node_info).collect();
    let node_names: std::collections::BTreeSet<&str> =
        nodes.iter().map(|n| n.name.as_str()).collect();

    // Shards by pool.
    let mut shards_of: BTreeMap<ObjectKey, Vec<&WarmPoolShard>> = BTreeMap::new();
    for shard in &snapshot.shards {
        let key = ObjectKey {
            namespace: shard.namespace().unwrap_or_default(),
            name: shard.spec.pool_name.clone(),
        };
        shards_of.entry(key).or_default().push(shard);
    }

    let mut live: Vec<&WarmPool> = Vec::new();
    for pool in &snapshot.pools {
        let key = ObjectKey::of(pool);
        let has_finalizer = pool.finalizers().iter().any(|f| f == POOL_FINALIZER);
        if pool.meta().deletion_timestamp.is_some() {
            // Deleting: shards first, then let the pool go.
            let shards = shards_of.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            for shard in shards {
                if shard.meta().deletion_timestamp.is_none() {
                    out.push(Change::DeleteShard(ObjectKey::of(*shard)));
                }
            }
            if shards.is_empty() && has_finalizer {
                out.push(Change::RemoveFinalizer(key));
            }
            continue;
        }
        if !has_finalizer {
            out.push(Change::AddFinalizer(key.clone()));
        }
        if key.namespace != options.sandbox_namespace {
            // No node watches shards here: say so on the pool rather than warm nothing.
            for shard in shards_of.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
                if shard.meta().deletion_timestamp.is_none() {
                    out.push(Change::DeleteShard(ObjectKey::of(*shard)));
                }
            }
            let status = unserved_status(pool, &options.sandbox_namespace, now);
            if pool.status.as_ref() != Some(&status) {
                out.push(Change::PoolStatus(key, Box::new(status)));
            }
            continue;
        }
        live.push(pool);
    }

    let infos: Vec<_> = live
        .iter()
        .map(|pool| {
            let shards = shards_of
                .get(&ObjectKey::of(*pool))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let current = shards
                .iter()
                .map(|s| {
                    (
                        s.spec.node_name.clone(),
                        u32::try_from(s.spec.quota).unwrap_or(0),
                    )
                })
                .collect();
            let demand = shards
                .iter()
                .map(|s| {
                    (
                        s.spec.node_name.clone(),
                        s.status.clone().unwrap_or_default().demand,
                    )
                })
                .collect();
            pool_info(pool, current, demand)
        })
        .collect();
    let plan = planner::plan(&nodes, &infos);
    let plan_of: BTreeMap<&str, &PoolPlan> =
        plan.pools.iter().map(|p| (p.key.as_str(), p)).collect();

    for (pool, info) in live.iter().zip(&infos) {
        let key = ObjectKey::of(*pool);
        let empty = PoolPlan::default();
        let pool_plan = plan_of.get(info.key.as_str()).copied().unwrap_or(&empty);
        let shards = shards_of.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        shard_changes(pool, pool_plan, shards, &node_names, &mut out);
        let status = pool_status(pool, pool_plan, shards, now);
        if pool.status.as_ref() != Some(&status) {
            out.push(Change::PoolStatus(key, Box::new(status)));
        }
    }

    // Shards whose pool is gone (garbage collection would get them too, eventually).
    for (key, shards) in &shards_of {
        if !snapshot.pools.iter().any(|p| ObjectKey::of(p) == *key) {
            for shard in shards {
                if shard.meta().deletion_timestamp.is_none() {
                    out.push(Change::DeleteShard(ObjectKey::of(*shard)));
                }
            }
        }
    }

    out.extend(binding::bindings(snapshot, options));
    out
}

/// Creates, updates and deletes the shards of one live pool.
fn shard_changes(
    pool: &WarmPool,
    plan: &PoolPlan,
    shards: &[&WarmPoolShard],
    nodes: &std::collections::BTreeSet<&str>,
    out: &mut Vec<Change>,
) {
    let generation = pool.metadata.generation.unwrap_or(0);
    let sandbox = pool.spec.sandbox_definition();
    let spec_for = |node: &str, quota: u32| WarmPoolShardSpec {
        node_name: node.to_string(),
        pool_name: pool.name_any(),
        pool_generation: generation,
        quota: i32::try_from(quota).unwrap_or(i32::MAX),
        sandbox: sandbox.clone(),
    };
    for (node, &quota) in &plan.quotas {
        let wanted = spec_for(node, quota);
        match shards.iter().find(|s| &s.spec.node_name == node) {
            Some(shard) if shard.spec != wanted => {
                out.push(Change::UpdateShard(ObjectKey::of(*shard), Box::new(wanted)));
            }
            Some(_) => {}
            None => out.push(Change::CreateShard(Box::new(new_shard(pool, wanted)))),
        }
    }
    for shard in shards {
        if plan.quotas.contains_key(&shard.spec.node_name)
            || shard.meta().deletion_timestamp.is_some()
        {
            continue;
        }
        // Off the plan. Keep the shard at quota 0 while its node still lends sandboxes out
        // (so they stay counted), else remove it and let the daemon drain.
        let busy = shard
            .status
            .as_ref()
            .is_some_and(|s| s.allocated > 0 || s.starting > 0);
        if busy && nodes.contains(shard.spec.node_name.as_str()) {
            let wanted = spec_for(&shard.spec.node_name, 0);
            if shard.spec != wanted {
                out.push(Change::UpdateShard(ObjectKey::of(*shard), Box::new(wanted)));
            }
        } else {
            out.push(Change::DeleteShard(ObjectKey::of(*shard)));
        }
    }
}

/// A new shard of `pool`: owned by it, labelled with pool and node.
pub fn new_shard(pool: &WarmPool, spec: WarmPoolShardSpec) -> WarmPoolShard {
    let mut shard = WarmPoolShard::new(&shard_name(&pool.name_any(), &spec.node_name), spec);
    shard.metadata.namespace = pool.namespace();
    shard.metadata.labels = Some(BTreeMap::from([
        (POOL_LABEL.to_string(), pool.name_any()),
        (NODE_LABEL.to_string(), label_value(&shard.spec.node_name)),
    ]));
    shard.metadata.owner_references = pool.controller_owner_ref(&()).map(|r| vec![r]);
    shard
}

/// A label value holds at most 63 characters; longer node names are cut (the spec keeps the
/// full name, and daemons select on the spec).
fn label_value(s: &str) -> String {
    let mut v: String = s.chars().take(63).collect();
    while v.ends_with(['-', '.', '_']) {
        v.pop();
    }
    v
}
