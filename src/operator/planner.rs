//! The quota planner: a pure function from pools, nodes and observed demand to per-node quotas.
//!
//! For each pool (in key order, so earlier pools claim node capacity first):
//!
//! 1. **Eligible nodes**: ready, schedulable (not cordoned), matching the pool's node selector
//!    and required node-affinity terms, with every `NoSchedule`/`NoExecute` taint tolerated.
//! 2. **Bounds** per node: `lo = minPerNode`, `hi = min(maxPerNode, what the node's remaining
//!    allocatable CPU and memory hold at the pool's per-sandbox requests)`. When the minimums
//!    alone exceed the replicas, they are dropped (and reported) rather than overshooting.
//! 3. **Targets**: `total = min(replicas, Σ hi)` (the rest is the reported shortfall) split in
//!    proportion to each node's demand weight, clamped into `[lo, hi]` (water-filling).
//! 4. **Integer quotas, sticky**: start from the current quotas clamped into the bounds; add
//!    missing units to the node furthest below its target and remove surplus from the node
//!    furthest above it; then move single units from a node at least one whole unit above its
//!    target to one at least one whole unit below it, until no such pair remains.
//!
//! Why this shape: step 4 only moves what it must. When a node leaves, its units go to the
//! nodes furthest below target and nothing else moves; when a node joins, it takes units only
//! from nodes that are now a whole unit above target. Every move lowers Σ(q − t)², so the loop
//! ends, and a plan fed back as the current quotas with the same inputs is returned unchanged:
//! there is no pair of plans to oscillate between. Demand weights are quantised to powers of
//! two, so demand noise within a factor of two does not move anything.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, btree_map};
use std::iter::Peekable;

use crate::crd::Demand;

/// CPU and memory, as Kubernetes quantities reduce to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Resources {
    fn times(self, n: u32) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_mul(u64::from(n)),
            memory_bytes: self.memory_bytes.saturating_mul(u64::from(n)),
        }
    }

    fn minus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    /// How many `per` fit in `self` (unbounded when `per` asks for nothing).
    fn fits(self, per: Resources) -> u64 {
        let cpu = self
            .cpu_millis
            .checked_div(per.cpu_millis)
            .unwrap_or(u64::MAX);
        let memory = self
            .memory_bytes
            .checked_div(per.memory_bytes)
            .unwrap_or(u64::MAX);
        cpu.min(memory)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

/// A toleration as in a pod spec (`operator: Exists` when `value` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    /// `None` with `Exists` tolerates every taint.
    pub key: Option<String>,
    pub value: Option<String>,
    /// `None` tolerates every effect.
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    fn tolerates(&self, taint: &Taint) -> bool {
        let key = self.key.as_ref().is_none_or(|k| *k == taint.key);
        let value = self.value.as_ref().is_none_or(|v| *v == taint.value);
        let effect = self.effect.is_none_or(|e| e == taint.effect);
        key && value && effect
    }
}

/// One requirement of a node-affinity term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    Gt(String, i64),
    Lt(String, i64),
    /// `matchFields` on `metadata.name`.
    NameIn(Vec<String>),
}

impl Requirement {
    fn matches(&self, node: &NodeInfo) -> bool {
        let label = |k: &String| node.labels.get(k);
        let number = |k: &String| label(k).and_then(|v| v.parse::<i64>().ok());
        match self {
            Requirement::In(k, vs) => label(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
            Requirement::Gt(k, n) => number(k).is_some_and(|v| v > *n),
            Requirement::Lt(k, n) => number(k).is_some_and(|v| v < *n),
            Requirement::NameIn(names) => names.contains(&node.name),
        }
    }
}

/// Where a pool may place sandboxes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// Required node-affinity terms: a node must match every requirement of at least one term
    /// (no terms: any node).
    pub required_terms: Vec<Vec<Requirement>>,
}

/// A node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub allocatable: Resources,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// Cordoned (`spec.unschedulable`).
    pub unschedulable: bool,
}

impl NodeInfo {
    /// Whether `placement` lets a pool use this node.
    pub fn admits(&self, placement: &Placement) -> bool {
        self.ready
            && !self.unschedulable
            && placement
                .node_selector
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
            && self
                .taints
                .iter()
                .filter(|t| t.effect != TaintEffect::PreferNoSchedule)
                .all(|t| placement.tolerations.iter().any(|tol| tol.tolerates(t)))
            && (placement.required_terms.is_empty()
                || placement
                    .required_terms
                    .iter()
                    .any(|term| term.iter().all(|r| r.matches(self))))
    }
}

/// A pool as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolInfo {
    /// `namespace/name`; pools are planned in this order.
    pub key: String,
    pub replicas: u32,
    pub min_per_node: u32,
    pub max_per_node: Option<u32>,
    /// Requests of one sandbox.
    pub per_sandbox: Resources,
    pub placement: Placement,
    /// Observed demand by node (from the shards' status).
    pub demand: BTreeMap<String, Demand>,
    /// Current quotas by node (from the shards' spec).
    pub current: BTreeMap<String, u32>,
}

/// One pool's quotas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolPlan {
    pub key: String,
    /// Quota by node; nodes without an entry get nothing.
    pub quotas: BTreeMap<String, u32>,
    /// Nodes the pool may use.
    pub eligible: u32,
    /// Replicas no eligible node had room for.
    pub shortfall: u32,
    /// `minPerNode` could not be honoured (the minimums exceed the replicas or the room).
    pub min_unmet: bool,
}

impl PoolPlan {
    pub fn total(&self) -> u64 {
        self.quotas.values().map(|&q| u64::from(q)).sum()
    }
}

/// Quotas for every pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub pools: Vec<PoolPlan>,
}

/// The weight of a node's demand: 1 + acquires (misses count twice), rounded up to a power of
/// two so that noise does not move quotas.
pub fn demand_weight(demand: &Demand) -> u32 {
    let acquires = u32::try_from(demand.acquires_per_minute.max(0)).unwrap_or(0);
    let misses = u32::try_from(demand.misses_per_minute.max(0)).unwrap_or(0);
    let rate = 1u32
        .saturating_add(acquires)
        .saturating_add(misses.saturating_mul(2))
        .min(1 << 16);
    rate.next_power_of_two()
}

/// Plans every pool over the nodes.
pub fn plan(nodes: &[NodeInfo], pools: &[PoolInfo]) -> Plan {
    let mut nodes: Vec<&NodeInfo> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut remaining: Vec<Resources> = nodes.iter().map(|n| n.allocatable).collect();
    let mut order: Vec<&PoolInfo> = pools.iter().collect();
    order.sort_by(|a, b| a.key.cmp(&b.key));
    let mut plans = Vec::with_capacity(order.len());
    for pool in order {
        plans.push(plan_pool(&nodes, &mut remaining, pool));
    }
    Plan { pools: plans }
}

/// One eligible node during planning.
struct Slot<'a> {
    /// The node's index in the planning order (and in `remaining`).
    node: usize,
    name: &'a str,
    lo: u32,
    hi: u32,
    target: f64,
    quota: u32,
}

/// Plans one pool and takes what its quotas need from each node's `remaining` resources.
fn plan_pool(nodes: &[&NodeInfo], remaining: &mut [Resources], pool: &PoolInfo) -> PoolPlan {
    let replicas = u64::from(pool.replicas);
    let mut slots: Vec<Slot> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    // Nodes come sorted by name, like the maps' keys: walk them side by side.
    let mut demands = pool.demand.iter().peekable();
    for (i, node) in nodes.iter().enumerate() {
        if !node.admits(&pool.placement) {
            continue;
        }
        let room = remaining[i].fits(pool.per_sandbox).min(replicas);
        let hi = pool.max_per_node.map_or(room, |m| room.min(u64::from(m)));
        let hi = u32::try_from(hi).unwrap_or(u32::MAX);
        slots.push(Slot {
            node: i,
            name: &node.name,
            lo: pool.min_per_node.min(hi),
            hi,
            target: 0.0,
            quota: 0,
        });
        let demand = next_for(&mut demands, &node.name)
            .copied()
            .unwrap_or_default();
        weights.push(f64::from(demand_weight(&demand)));
    }
    let room: u64 = slots.iter().map(|s| u64::from(s.hi)).sum();
    let total = replicas.min(room);
    let minimums: u64 = slots.iter().map(|s| u64::from(s.lo)).sum();
    let mut min_unmet = pool.min_per_node > 0 && slots.iter().any(|s| s.lo < pool.min_per_node);
    if minimums > total {
        min_unmet = true;
        slots.iter_mut().for_each(|s| s.lo = 0);
    }
    water_fill(&mut slots, &weights, total as f64);
    let mut currents = pool.current.iter().peekable();
    for slot in &mut slots {
        let current = next_for(&mut currents, slot.name).copied().unwrap_or(0);
        slot.quota = current.clamp(slot.lo, slot.hi);
    }
    settle(&mut slots, total);
    for slot in &slots {
        remaining[slot.node] = remaining[slot.node].minus(pool.per_sandbox.times(slot.quota));
    }
    PoolPlan {
        key: pool.key.clone(),
        quotas: slots
            .iter()
            .filter(|s| s.quota > 0)
            .map(|s| (s.name.to_string(), s.quota))
            .collect(),
        eligible: u32::try_from(slots.len()).unwrap_or(u32::MAX),
        shortfall: u32::try_from(replicas - total).unwrap_or(u32::MAX),
        min_unmet,
    }
}

/// The value of `name` in a map walked in key order by ascending names (cheaper than a lookup
/// per node: a thousand lookups of similar names spend their time comparing strings).
fn next_for<'a, V>(
    entries: &mut Peekable<btree_map::Iter<'a, String, V>>,
    name: &str,
) -> Option<&'a V> {
    while let Some((key, value)) = entries.peek() {
        match key.as_str().cmp(name) {
            Ordering::Less => {
                entries.next();
            }
            Ordering::Equal => return Some(value),
            Ordering::Greater => return None,
        }
    }
    None
}

/// Sets each slot's real-valued target: `clamp(λ·w, lo, hi)` with `λ` chosen so the targets sum
/// to `total` (`total ≤ Σ hi` and `Σ lo ≤ total` hold). The sum is piecewise linear in `λ`,
/// bending where a slot leaves its `lo` (at `lo/w`) or reaches its `hi` (at `hi/w`): walking
/// those points in order finds `λ` exactly, in `O(n log n)`.
fn water_fill(slots: &mut [Slot], weights: &[f64], total: f64) {
    // (λ at the bend, the slot's weight, +1 when it starts growing / -1 when it stops).
    let mut bends: Vec<(f64, f64, f64, f64)> = Vec::with_capacity(2 * slots.len());
    let mut fixed = 0.0; // the sum of the slots not growing at the current λ
    for (s, &w) in slots.iter().zip(weights) {
        let (lo, hi) = (f64::from(s.lo), f64::from(s.hi));
        fixed += lo;
        if hi > lo {
            bends.push((lo / w, w, lo, 1.0));
            bends.push((hi / w, w, hi, -1.0));
        }
    }
    bends.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Between bends the sum is `fixed + slope·λ`.
    let mut slope = 0.0;
    let mut lambda = 0.0;
    for &(at, w, bound, sign) in &bends {
        if slope > 0.0 && fixed + slope * at >= total {
            break;
        }
        lambda = at;
        if sign > 0.0 {
            fixed -= bound;
            slope += w;
        } else {
            fixed += bound;
            slope -= w;
        }
    }
    if slope > EPSILON {
        lambda = ((total - fixed) / slope).max(lambda);
    }
    for (slot, w) in slots.iter_mut().zip(weights) {
        slot.target = (lambda * w).clamp(f64::from(slot.lo), f64::from(slot.hi));
    }
}

/// Tolerance for comparing real-valued targets.
const EPSILON: f64 = 1e-6;

/// A heap entry: how far a slot is from its target in one direction, tagged with the quota it
/// was computed from (entries whose slot moved since are stale and skipped).
#[derive(PartialEq)]
struct Gap {
    gap: f64,
    index: Reverse<usize>,
    quota: u32,
}

impl Eq for Gap {}

impl PartialOrd for Gap {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Gap {
    fn cmp(&self, other: &Self) -> Ordering {
        self.gap
            .total_cmp(&other.gap)
            .then_with(|| self.index.cmp(&other.index))
    }
}

/// Heaps of slots below their target (that may grow) and above it (that may shrink).
struct Gaps {
    below: BinaryHeap<Gap>,
    above: BinaryHeap<Gap>,
}

impl Gaps {
    fn new(slots: &[Slot]) -> Self {
        let mut gaps = Gaps {
            below: BinaryHeap::with_capacity(slots.len()),
            above: BinaryHeap::with_capacity(slots.len()),
        };
        for i in 0..slots.len() {
            gaps.push(slots, i);
        }
        gaps
    }

    fn push(&mut self, slots: &[Slot], i: usize) {
        let s = &slots[i];
        let diff = f64::from(s.quota) - s.target;
        if s.quota < s.hi {
            self.below.push(Gap {
                gap: -diff,
                index: Reverse(i),
                quota: s.quota,
            });
        }
        if s.quota > s.lo {
            self.above.push(Gap {
                gap: diff,
                index: Reverse(i),
                quota: s.quota,
            });
        }
    }

    fn top(heap: &mut BinaryHeap<Gap>, slots: &[Slot]) -> Option<(usize, f64)> {
        while let Some(g) = heap.peek() {
            if slots[g.index.0].quota == g.quota {
                return Some((g.index.0, g.gap));
            }
            heap.pop();
        }
        None
    }
}

/// Brings the quotas to sum `total`, then moves whole units between slots that are each at
/// least one unit off target in opposite directions.
fn settle(slots: &mut [Slot], total: u64) {
    let sum: u64 = slots.iter().map(|s| u64::from(s.quota)).sum();
    // Raising the largest shortfall one unit at a time first takes every unit that leaves a
    // slot still below its target, when the budget covers them all: take those in one sweep
    // (a fresh plan would otherwise make a heap step per replica).
    let floor = |s: &Slot| s.target.floor() as u32;
    let lift: u64 = slots
        .iter()
        .map(|s| u64::from(floor(s).saturating_sub(s.quota)))
        .sum();
    if sum + lift <= total {
        for slot in slots.iter_mut() {
            slot.quota = slot.quota.max(floor(slot).min(slot.hi));
        }
    }
    settle_by_units(slots, total);
}

/// Settles one unit at a time, the largest gap first.
fn settle_by_units(slots: &mut [Slot], total: u64) {
    let mut sum: u64 = slots.iter().map(|s| u64::from(s.quota)).sum();
    let mut gaps = Gaps::new(slots);
    while sum < total {
        let Some((i, _)) = Gaps::top(&mut gaps.below, slots) else {
            break;
        };
        slots[i].quota += 1;
        sum += 1;
        gaps.push(slots, i);
    }
    while sum > total {
        let Some((i, _)) = Gaps::top(&mut gaps.above, slots) else {
            break;
        };
        slots[i].quota -= 1;
        sum -= 1;
        gaps.push(slots, i);
    }
    while let (Some((from, over)), Some((to, under))) = (
        Gaps::top(&mut gaps.above, slots),
        Gaps::top(&mut gaps.below, slots),
    ) {
        if over < 1.0 - EPSILON || under < 1.0 - EPSILON || from == to {
            break;
        }
        slots[from].quota -= 1;
        slots[to].quota += 1;
        gaps.push(slots, from);
        gaps.push(slots, to);
    }
}

#[cfg(test)]
mod tests;
