//! Shard statuses rolled up into `WarmPool.status`: counts, and the `Ready` and `Degraded`
//! conditions. Condition times only change when a condition's status flips, so an unchanged
//! cluster rolls up to an unchanged status (and the operator writes nothing).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::planner::PoolPlan;
use crate::crd::{WarmPool, WarmPoolShard, WarmPoolStatus};

/// At most this many failing nodes are named in the `Degraded` message.
const MAX_NAMED_ERRORS: usize = 5;

/// The status of `pool` given its plan and its shards.
pub fn pool_status(
    pool: &WarmPool,
    plan: &PoolPlan,
    shards: &[&WarmPoolShard],
    now: &Time,
) -> WarmPoolStatus {
    let generation = pool.metadata.generation.unwrap_or(0);
    let mut status = WarmPoolStatus {
        observed_generation: generation,
        desired: clamp_i32(plan.total()),
        nodes: clamp_i32(plan.quotas.len() as u64),
        shortfall: i32::try_from(plan.shortfall).unwrap_or(i32::MAX),
        ..Default::default()
    };
    let mut errors: Vec<String> = Vec::new();
    let mut warm = true;
    for shard in shards {
        let s = shard.status.clone().unwrap_or_default();
        status.idle += s.idle;
        status.allocated += s.allocated;
        status.starting += s.starting;
        let current = s.observed_pool_generation == generation;
        if current {
            status.ready += s.idle;
        }
        let quota = plan.quotas.get(&shard.spec.node_name).copied().unwrap_or(0);
        if !current || s.idle < i32::try_from(quota).unwrap_or(i32::MAX) {
            warm = false;
        }
        if let Some(e) = &s.last_error {
            errors.push(format!(
                "{}: {}: {}",
                shard.spec.node_name, e.reason, e.message
            ));
        }
    }
    // Planned nodes without a shard yet are not warm either.
    if plan
        .quotas
        .keys()
        .any(|n| !shards.iter().any(|s| &s.spec.node_name == n))
    {
        warm = false;
    }
    errors.sort();
    let old = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let ready = if plan.shortfall > 0 && status.desired == 0 {
        (
            "False",
            "NoEligibleCapacity",
            format!(
                "no eligible node has room for the {} replicas",
                pool.spec.replicas
            ),
        )
    } else if warm {
        (
            "True",
            "Warm",
            format!("{}/{} warm", status.ready, status.desired),
        )
    } else {
        (
            "False",
            "Warming",
            format!("{}/{} warm", status.ready, status.desired),
        )
    };
    let degraded = if plan.shortfall > 0 {
        (
            "True",
            "Shortfall",
            format!(
                "{} of {} replicas do not fit on the {} eligible nodes",
                plan.shortfall, pool.spec.replicas, plan.eligible
            ),
        )
    } else if !errors.is_empty() {
        let named: Vec<&str> = errors
            .iter()
            .take(MAX_NAMED_ERRORS)
            .map(String::as_str)
            .collect();
        let more = errors.len().saturating_sub(MAX_NAMED_ERRORS);
        let mut message = format!("{} node(s) failing: {}", errors.len(), named.join("; "));
        if more > 0 {
            message.push_str(&format!("; and {more} more"));
        }
        ("True", "NodeErrors", message)
    } else if plan.min_unmet {
        (
            "True",
            "MinPerNodeUnmet",
            "minPerNode cannot be met on every eligible node".to_string(),
        )
    } else {
        (
            "False",
            "AsPlanned",
            "every planned replica has a node".to_string(),
        )
    };
    status.conditions = vec![
        condition(old, "Ready", ready, generation, now),
        condition(old, "Degraded", degraded, generation, now),
    ];
    status
}

/// The status of a pool in a namespace the nodes do not serve: nothing planned, and why.
pub fn unserved_status(pool: &WarmPool, served: &str, now: &Time) -> WarmPoolStatus {
    let generation = pool.metadata.generation.unwrap_or(0);
    let old = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let message = format!(
        "the node daemons serve WarmPools in namespace {served:?} only (their \
         --sandbox-namespace): create this pool there"
    );
    WarmPoolStatus {
        observed_generation: generation,
        conditions: vec![
            condition(
                old,
                "Ready",
                ("False", "NamespaceNotServed", message.clone()),
                generation,
                now,
            ),
            condition(
                old,
                "Degraded",
                ("True", "NamespaceNotServed", message),
                generation,
                now,
            ),
        ],
        ..Default::default()
    }
}

fn clamp_i32(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn condition(
    old: &[Condition],
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: i64,
    now: &Time,
) -> Condition {
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}
