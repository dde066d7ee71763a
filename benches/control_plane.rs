//! Control-plane numbers: the quota planner at cluster scale, how much a node's loss moves,
//! and how many API writes the operator's passes make (steady state, scale-up).
//!
//! Writes are counted from the pass's decisions (`operator::desired::changes`): `apply` makes
//! exactly one API write per change unless a conditional write meets a conflict. The passes
//! run against an in-memory cluster that takes every write as the API server would.
//!
//! `cargo bench --bench control_plane`

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use arl::crd::{Demand, POOL_FINALIZER, WarmPool, WarmPoolShardStatus};
use arl::operator::desired::{Change, PassOptions, Snapshot, changes};
use arl::operator::planner::{self, NodeInfo, Placement, PoolInfo, Resources};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

const GIB: u64 = 1 << 30;

fn planner_nodes(n: usize) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| NodeInfo {
            name: format!("node-{i:04}"),
            labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 3))]),
            taints: vec![],
            allocatable: Resources {
                cpu_millis: 64_000,
                memory_bytes: 256 * GIB,
            },
            ready: true,
            unschedulable: false,
        })
        .collect()
}

fn planner_pools(n: usize, nodes: usize) -> Vec<PoolInfo> {
    (0..n)
        .map(|i| {
            let mut placement = Placement::default();
            if i % 5 == 0 {
                placement
                    .node_selector
                    .insert("zone".into(), format!("z{}", i % 3));
            }
            PoolInfo {
                key: format!("ns/pool-{i:02}"),
                replicas: 1_000 + 37 * i as u32,
                min_per_node: 0,
                max_per_node: Some(8),
                per_sandbox: Resources {
                    cpu_millis: 100,
                    memory_bytes: GIB / 4,
                },
                placement,
                // Every seventh node drains a little faster for this pool.
                demand: (0..nodes)
                    .filter(|n| (n + i) % 7 == 0)
                    .map(|n| {
                        (
                            format!("node-{n:04}"),
                            Demand {
                                acquires_per_minute: 20,
                                misses_per_minute: 1,
                            },
                        )
                    })
                    .collect(),
                current: BTreeMap::new(),
            }
        })
        .collect()
}

fn stats(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn bench_planner() {
    let nodes = planner_nodes(1_000);
    let pools = planner_pools(50, 1_000);
    let runs = 30;

    // Floor: one pass over every (pool, node) pair doing the cheapest useful work (the
    // placement check), in the same run.
    let mut floor = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let admitted: usize = pools
            .iter()
            .map(|p| nodes.iter().filter(|n| n.admits(&p.placement)).count())
            .sum();
        std::hint::black_box(admitted);
        floor.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut fresh = Vec::new();
    let mut plan = planner::plan(&nodes, &pools);
    for _ in 0..runs {
        let t = Instant::now();
        plan = std::hint::black_box(planner::plan(&nodes, &pools));
        fresh.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let settled: Vec<PoolInfo> = pools
        .iter()
        .zip(&plan.pools)
        .map(|(p, q)| PoolInfo {
            current: q.quotas.clone(),
            ..p.clone()
        })
        .collect();
    let mut steady = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let again = std::hint::black_box(planner::plan(&nodes, &settled));
        steady.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(again, plan, "a settled plan must be a fixed point");
    }
    let (f50, f99) = stats(floor);
    let (p50, p99) = stats(fresh);
    let (s50, s99) = stats(steady);
    let total: u64 = plan.pools.iter().map(|p| p.total()).sum();
    println!("planner: 1000 nodes x 50 pools ({total} warm replicas), {runs} runs");
    println!(
        "  fresh plan      p50 {p50:7.2} ms  p99 {p99:7.2} ms  (target <= 20 ms; ratio to floor {:.1}x)",
        p50 / f50
    );
    println!("  re-plan, steady p50 {s50:7.2} ms  p99 {s99:7.2} ms");
    println!("  floor (placement check of every pair) p50 {f50:.2} ms  p99 {f99:.2} ms");

    // One node leaves: what moves.
    let lost = "node-0500";
    let rest: Vec<NodeInfo> = nodes.iter().filter(|n| n.name != lost).cloned().collect();
    let t = Instant::now();
    let after = planner::plan(&rest, &settled);
    let replan_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut share = 0u64;
    let mut moved = 0u64;
    let mut touched_nodes = std::collections::BTreeSet::new();
    for (before, after) in plan.pools.iter().zip(&after.pools) {
        share += u64::from(before.quotas.get(lost).copied().unwrap_or(0));
        for node in &rest {
            let a = before.quotas.get(&node.name).copied().unwrap_or(0);
            let b = after.quotas.get(&node.name).copied().unwrap_or(0);
            if a != b {
                touched_nodes.insert(node.name.clone());
            }
            moved += u64::from(a.abs_diff(b));
        }
    }
    println!(
        "  losing {lost}: its share {share} units; units moved on the other nodes {moved} (on {} nodes); re-plan {replan_ms:.2} ms",
        touched_nodes.len()
    );
}

fn node(i: usize) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": format!("node-{i:03}")},
        "spec": {},
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi"},
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", i / 250, i % 250 + 1)}],
        },
    }))
    .expect("node")
}

fn pool(i: usize, replicas: i32) -> WarmPool {
    serde_json::from_value(json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPool",
        "metadata": {"name": format!("pool-{i:02}"), "namespace": "arl", "uid": format!("uid-{i}"),
                     "generation": 1, "resourceVersion": "1"},
        "spec": {"replicas": replicas, "image": "python:3.12",
                 "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}}},
    }))
    .expect("pool")
}

/// Takes a pass's writes as the API server would (and, for shards, as the daemons would
/// answer: each reports its quota warm).
fn take(snapshot: &mut Snapshot, changes: Vec<Change>) {
    for change in changes {
        match change {
            Change::AddFinalizer(k) => {
                if let Some(p) = snapshot
                    .pools
                    .iter_mut()
                    .find(|p| p.metadata.name.as_deref() == Some(&k.name))
                {
                    p.metadata
                        .finalizers
                        .get_or_insert_default()
                        .push(POOL_FINALIZER.into());
                }
            }
            Change::RemoveFinalizer(_) | Change::SandboxStatus(..) => {}
            Change::CreateShard(s) => snapshot.shards.push(*s),
            Change::UpdateShard(k, spec) => {
                if let Some(s) = snapshot
                    .shards
                    .iter_mut()
                    .find(|s| s.metadata.name.as_deref() == Some(&k.name))
                {
                    s.spec = *spec;
                }
            }
            Change::DeleteShard(k) => snapshot
                .shards
                .retain(|s| s.metadata.name.as_deref() != Some(&k.name)),
            Change::PoolStatus(k, status) => {
                if let Some(p) = snapshot
                    .pools
                    .iter_mut()
                    .find(|p| p.metadata.name.as_deref() == Some(&k.name))
                {
                    p.status = Some(*status);
                }
            }
        }
    }
}

fn daemons_report(snapshot: &mut Snapshot) {
    for s in &mut snapshot.shards {
        s.status = Some(WarmPoolShardStatus {
            observed_pool_generation: s.spec.pool_generation,
            idle: s.spec.quota,
            ..Default::default()
        });
    }
}

fn shard_writes(changes: &[Change]) -> usize {
    changes
        .iter()
        .filter(|c| {
            matches!(
                c,
                Change::CreateShard(_) | Change::UpdateShard(..) | Change::DeleteShard(_)
            )
        })
        .count()
}

fn bench_operator() {
    let options = PassOptions {
        node_port: 8420,
        sandbox_namespace: "arl".into(),
    };
    let now = Time(Timestamp::now());

    // Steady state: 10 pools x 100 nodes = 1,000 shards, settled and warm.
    let mut snapshot = Snapshot {
        pools: (0..10).map(|i| pool(i, 300)).collect(),
        nodes: (0..100).map(node).collect(),
        ..Default::default()
    };
    for _ in 0..3 {
        let c = changes(&snapshot, &now, &options);
        take(&mut snapshot, c);
        daemons_report(&mut snapshot);
    }
    let settle = changes(&snapshot, &now, &options);
    take(&mut snapshot, settle);
    // One simulated minute: a resync pass plus a pass per node-status event (every node
    // reports once a minute), 101 passes in all.
    let mut writes = 0;
    let mut pass_ms = Vec::new();
    for _ in 0..101 {
        let t = Instant::now();
        let c = changes(&snapshot, &now, &options);
        pass_ms.push(t.elapsed().as_secs_f64() * 1e3);
        writes += c.len();
    }
    let (p50, p99) = stats(pass_ms);
    println!(
        "operator steady state: {} shards, 101 passes in a minute: {writes} API writes (target 0); pass p50 {p50:.2} ms p99 {p99:.2} ms",
        snapshot.shards.len()
    );

    // Scale-up: a new pool of 1,000 replicas over 100 nodes.
    let mut snapshot = Snapshot {
        pools: vec![pool(0, 0)],
        nodes: (0..100).map(node).collect(),
        ..Default::default()
    };
    let c = changes(&snapshot, &now, &options);
    take(&mut snapshot, c);
    snapshot.pools[0].spec.replicas = 1_000;
    snapshot.pools[0].metadata.generation = Some(2);
    let c = changes(&snapshot, &now, &options);
    let shard = shard_writes(&c);
    let all = c.len();
    take(&mut snapshot, c);
    daemons_report(&mut snapshot);
    let after = changes(&snapshot, &now, &options);
    let follow = after.len();
    take(&mut snapshot, after);
    let last = changes(&snapshot, &now, &options).len();
    println!(
        "operator scale-up 0 -> 1000 replicas over 100 nodes: {shard} shard writes (target <= 100), {all} writes in that pass; {follow} status write(s) once the daemons report; then {last}"
    );
}

fn main() {
    common::print_header("control_plane");
    bench_planner();
    bench_operator();
}
