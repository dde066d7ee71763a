//! Properties of the planner over random clusters.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const GIB: u64 = 1 << 30;

fn arb_node(index: usize) -> impl Strategy<Value = NodeInfo> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.1),
        0u64..16_000,
        0u64..64,
    )
        .prop_map(move |(zone, gpu, tainted, ready, cordoned, cpu, mem)| {
            let mut labels = BTreeMap::from([("zone".to_string(), zone.to_string())]);
            if gpu {
                labels.insert("gpu".into(), "true".into());
            }
            NodeInfo {
                name: format!("node-{index:03}"),
                labels,
                taints: if tainted {
                    vec![Taint {
                        key: "dedicated".into(),
                        value: "arl".into(),
                        effect: TaintEffect::NoSchedule,
                    }]
                } else {
                    vec![]
                },
                allocatable: Resources {
                    cpu_millis: cpu,
                    memory_bytes: mem * GIB,
                },
                ready,
                unschedulable: cordoned,
            }
        })
}

fn arb_nodes(max: usize) -> impl Strategy<Value = Vec<NodeInfo>> {
    (1..=max).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_pool(index: usize) -> impl Strategy<Value = PoolInfo> {
    (
        0u32..200,
        0u32..3,
        prop::option::of(1u32..40),
        0u64..2_000,
        0u64..4,
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        any::<bool>(),
        any::<bool>(),
        prop::collection::btree_map(0usize..30, (0i32..300, 0i32..50), 0..10),
    )
        .prop_map(
            move |(replicas, min, max, cpu, mem, zone, tolerate, gpu_only, demand)| {
                let max = max.map(|m| m.max(min));
                let mut placement = Placement::default();
                if let Some(zone) = zone {
                    placement.node_selector.insert("zone".into(), zone.into());
                }
                if tolerate {
                    placement.tolerations.push(Toleration {
                        key: Some("dedicated".into()),
                        value: Some("arl".into()),
                        effect: Some(TaintEffect::NoSchedule),
                    });
                }
                if gpu_only {
                    placement
                        .required_terms
                        .push(vec![Requirement::Exists("gpu".into())]);
                }
                PoolInfo {
                    key: format!("ns/pool-{index}"),
                    replicas,
                    min_per_node: min,
                    max_per_node: max,
                    per_sandbox: Resources {
                        cpu_millis: cpu,
                        memory_bytes: mem * GIB / 4,
                    },
                    placement,
                    demand: demand
                        .into_iter()
                        .map(|(n, (a, m))| {
                            (
                                format!("node-{n:03}"),
                                Demand {
                                    acquires_per_minute: a,
                                    misses_per_minute: m,
                                },
                            )
                        })
                        .collect(),
                    current: BTreeMap::new(),
                }
            },
        )
}

fn arb_pools(max: usize) -> impl Strategy<Value = Vec<PoolInfo>> {
    (1..=max).prop_flat_map(|n| (0..n).map(arb_pool).collect::<Vec<_>>())
}

/// An independent statement of who may hold a pool's sandboxes.
fn may_use(node: &NodeInfo, pool: &PoolInfo) -> bool {
    let selector_ok = pool
        .placement
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    let tainted = !node.taints.is_empty();
    let tolerated = !pool.placement.tolerations.is_empty();
    let gpu_ok = pool.placement.required_terms.is_empty() || node.labels.contains_key("gpu");
    node.ready && !node.unschedulable && selector_ok && (!tainted || tolerated) && gpu_ok
}

/// A cluster with room to spare: capacity never binds, so only placement and bounds matter.
fn roomy(mut nodes: Vec<NodeInfo>) -> Vec<NodeInfo> {
    for n in &mut nodes {
        n.allocatable = Resources {
            cpu_millis: 1 << 40,
            memory_bytes: 1 << 60,
        };
    }
    nodes
}

fn with_current(mut pool: PoolInfo, plan: &PoolPlan) -> PoolInfo {
    pool.current = plan.quotas.clone();
    pool
}

fn moved(before: &PoolPlan, after: &PoolPlan, skip: &str) -> u64 {
    let names: std::collections::BTreeSet<&String> =
        before.quotas.keys().chain(after.quotas.keys()).collect();
    names
        .into_iter()
        .filter(|n| n.as_str() != skip)
        .map(|n| {
            let a = before.quotas.get(n).copied().unwrap_or(0);
            let b = after.quotas.get(n).copied().unwrap_or(0);
            u64::from(a.abs_diff(b))
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn quotas_sum_to_replicas_unless_capacity_falls_short(nodes in arb_nodes(30), pool in arb_pool(0)) {
        let plan = plan(&nodes, std::slice::from_ref(&pool));
        let p = &plan.pools[0];
        // The room every eligible node offers, computed independently.
        let room: u64 = nodes
            .iter()
            .filter(|n| may_use(n, &pool))
            .map(|n| {
                let by_cpu = n.allocatable.cpu_millis.checked_div(pool.per_sandbox.cpu_millis).unwrap_or(u64::MAX);
                let by_mem = n.allocatable.memory_bytes.checked_div(pool.per_sandbox.memory_bytes).unwrap_or(u64::MAX);
                by_cpu.min(by_mem).min(pool.max_per_node.map_or(u64::MAX, u64::from))
            })
            .fold(0u64, u64::saturating_add);
        let replicas = u64::from(pool.replicas);
        prop_assert_eq!(p.total(), replicas.min(room));
        prop_assert_eq!(p.total() + u64::from(p.shortfall), replicas);
    }

    #[test]
    fn placement_capacity_and_bounds_are_honoured(nodes in arb_nodes(30), pools in arb_pools(4)) {
        let plan = plan(&nodes, &pools);
        let mut used: BTreeMap<&str, Resources> = BTreeMap::new();
        for (p, pool) in plan.pools.iter().zip({
            let mut sorted: Vec<&PoolInfo> = pools.iter().collect();
            sorted.sort_by(|a, b| a.key.cmp(&b.key));
            sorted
        }) {
            prop_assert_eq!(&p.key, &pool.key);
            prop_assert_eq!(p.total() + u64::from(p.shortfall), u64::from(pool.replicas));
            for (name, &q) in &p.quotas {
                let node = nodes.iter().find(|n| &n.name == name).expect("a planned node exists");
                // Cordoned, unschedulable, not-ready, unselected or untolerated nodes get nothing.
                prop_assert!(may_use(node, pool), "{} got {} of {}", name, q, pool.key);
                prop_assert!(pool.max_per_node.is_none_or(|m| q <= m));
                let u = used.entry(name.as_str()).or_default();
                u.cpu_millis += pool.per_sandbox.cpu_millis * u64::from(q);
                u.memory_bytes += pool.per_sandbox.memory_bytes * u64::from(q);
            }
            if !p.min_unmet {
                for node in nodes.iter().filter(|n| may_use(n, pool)) {
                    prop_assert!(p.quotas.get(&node.name).copied().unwrap_or(0) >= pool.min_per_node);
                }
            }
        }
        for node in &nodes {
            let u = used.get(node.name.as_str()).copied().unwrap_or_default();
            prop_assert!(u.cpu_millis <= node.allocatable.cpu_millis, "{} cpu over", node.name);
            prop_assert!(u.memory_bytes <= node.allocatable.memory_bytes, "{} memory over", node.name);
        }
    }

    #[test]
    fn a_plan_fed_back_is_a_fixed_point(nodes in arb_nodes(30), pools in arb_pools(4)) {
        let first = plan(&nodes, &pools);
        let again: Vec<PoolInfo> = pools
            .iter()
            .map(|p| with_current(p.clone(), first.pools.iter().find(|q| q.key == p.key).expect("planned")))
            .collect();
        prop_assert_eq!(plan(&nodes, &again), first);
    }

    #[test]
    fn input_order_does_not_matter(nodes in arb_nodes(20), pools in arb_pools(3)) {
        let mut reversed_nodes = nodes.clone();
        reversed_nodes.reverse();
        let mut reversed_pools = pools.clone();
        reversed_pools.reverse();
        prop_assert_eq!(plan(&reversed_nodes, &reversed_pools), plan(&nodes, &pools));
    }

    #[test]
    fn a_leaving_node_moves_only_its_share(nodes in arb_nodes(30), pool in arb_pool(0), lost in any::<prop::sample::Index>()) {
        let nodes = roomy(nodes);
        let before = plan(&nodes, std::slice::from_ref(&pool)).pools.remove(0);
        let gone = lost.get(&nodes).name.clone();
        let rest: Vec<NodeInfo> = nodes.iter().filter(|n| n.name != gone).cloned().collect();
        let after = plan(&rest, &[with_current(pool.clone(), &before)]).pools.remove(0);
        let share = u64::from(before.quotas.get(&gone).copied().unwrap_or(0));
        prop_assert!(!after.quotas.contains_key(&gone));
        if !before.min_unmet && !after.min_unmet {
            // Nothing but the lost share moves: the survivors gain exactly that much, less what
            // they have no room for (which becomes shortfall).
            let unplaced = u64::from(after.shortfall - before.shortfall);
            prop_assert_eq!(moved(&before, &after, &gone), share - unplaced);
            for (name, &q) in &before.quotas {
                if name != &gone {
                    prop_assert!(after.quotas.get(name).copied().unwrap_or(0) >= q);
                }
            }
        }
    }

    #[test]
    fn a_joining_node_takes_only_its_share(nodes in arb_nodes(30), pool in arb_pool(0), joiner in arb_node(999)) {
        let nodes = roomy(nodes);
        let before = plan(&nodes, std::slice::from_ref(&pool)).pools.remove(0);
        let mut more = nodes.clone();
        more.extend(roomy(vec![joiner.clone()]));
        let after = plan(&more, &[with_current(pool.clone(), &before)]).pools.remove(0);
        let share = u64::from(after.quotas.get(&joiner.name).copied().unwrap_or(0));
        if !before.min_unmet && !after.min_unmet {
            // The others give up exactly the joiner's share, less what it took from the
            // shortfall (replicas nobody had room for before).
            let filled = u64::from(before.shortfall - after.shortfall);
            prop_assert_eq!(moved(&before, &after, &joiner.name), share - filled);
            for (name, &q) in &after.quotas {
                if name != &joiner.name {
                    prop_assert!(q <= before.quotas.get(name).copied().unwrap_or(0));
                }
            }
        }
    }

    #[test]
    fn busier_nodes_get_at_least_as_much(nodes in arb_nodes(30), pool in arb_pool(0)) {
        let nodes = roomy(nodes);
        let p = plan(&nodes, std::slice::from_ref(&pool)).pools.remove(0);
        let eligible: Vec<&NodeInfo> = nodes.iter().filter(|n| may_use(n, &pool)).collect();
        let weight = |n: &NodeInfo| demand_weight(&pool.demand.get(&n.name).copied().unwrap_or_default());
        let quota = |n: &NodeInfo| p.quotas.get(&n.name).copied().unwrap_or(0);
        for a in &eligible {
            for b in &eligible {
                if weight(a) > weight(b) {
                    prop_assert!(quota(a) >= quota(b), "{} (w {}) got {} < {} (w {}) got {}",
                        a.name, weight(a), quota(a), b.name, weight(b), quota(b));
                }
            }
        }
    }

    #[test]
    fn demand_noise_within_a_bucket_moves_nothing(nodes in arb_nodes(20), pool in arb_pool(0), node in any::<prop::sample::Index>()) {
        let first = plan(&nodes, std::slice::from_ref(&pool)).pools.remove(0);
        let name = node.get(&nodes).name.clone();
        let mut noisy = with_current(pool.clone(), &first);
        let d = noisy.demand.entry(name).or_default();
        let w = demand_weight(d);
        // Raise the rate as far as it stays in the same power-of-two bucket.
        while demand_weight(&Demand { acquires_per_minute: d.acquires_per_minute + 1, ..*d }) == w {
            d.acquires_per_minute += 1;
        }
        prop_assert_eq!(plan(&nodes, &[noisy]).pools.remove(0), first);
    }
}

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: BTreeMap::new(),
        taints: vec![],
        allocatable: Resources {
            cpu_millis: 8_000,
            memory_bytes: 32 * GIB,
        },
        ready: true,
        unschedulable: false,
    }
}

fn simple_pool(replicas: u32) -> PoolInfo {
    PoolInfo {
        key: "ns/p".into(),
        replicas,
        min_per_node: 0,
        max_per_node: None,
        per_sandbox: Resources {
            cpu_millis: 500,
            memory_bytes: GIB,
        },
        placement: Placement::default(),
        demand: BTreeMap::new(),
        current: BTreeMap::new(),
    }
}

#[test]
fn even_spread_over_equal_nodes() {
    let nodes: Vec<NodeInfo> = ["a", "b", "c"].into_iter().map(node).collect();
    let p = plan(&nodes, &[simple_pool(10)]).pools.remove(0);
    assert_eq!(
        p.quotas,
        BTreeMap::from([("a".into(), 4), ("b".into(), 3), ("c".into(), 3)])
    );
    assert_eq!((p.shortfall, p.eligible), (0, 3));
}

#[test]
fn capacity_shortfall_is_reported() {
    // 8 cores at half a core each: 16 per node.
    let nodes: Vec<NodeInfo> = ["a", "b"].into_iter().map(node).collect();
    let p = plan(&nodes, &[simple_pool(40)]).pools.remove(0);
    assert_eq!(p.total(), 32);
    assert_eq!(p.shortfall, 8);
}

#[test]
fn a_cordoned_node_hands_its_share_to_the_others() {
    let mut nodes: Vec<NodeInfo> = ["a", "b", "c"].into_iter().map(node).collect();
    let before = plan(&nodes, &[simple_pool(9)]).pools.remove(0);
    nodes[1].unschedulable = true;
    let after = plan(&nodes, &[with_current(simple_pool(9), &before)])
        .pools
        .remove(0);
    assert_eq!(
        after.quotas,
        BTreeMap::from([("a".into(), 5), ("c".into(), 4)])
    );
}

#[test]
fn demand_tilts_the_split() {
    let nodes: Vec<NodeInfo> = ["a", "b"].into_iter().map(node).collect();
    let mut pool = simple_pool(12);
    pool.demand.insert(
        "a".into(),
        Demand {
            acquires_per_minute: 100,
            misses_per_minute: 0,
        },
    );
    pool.demand.insert(
        "b".into(),
        Demand {
            acquires_per_minute: 30,
            misses_per_minute: 0,
        },
    );
    let p = plan(&nodes, &[pool]).pools.remove(0);
    // Weights 128 and 32.
    assert_eq!(
        p.quotas,
        BTreeMap::from([("a".into(), 10), ("b".into(), 2)])
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// The water level is exact: the targets sum to the total, stay within their bounds, and
    /// every slot strictly between its bounds sits at the same level `target / weight`, with
    /// slots held at `lo` above it and slots at `hi` below it.
    #[test]
    fn water_fill_finds_the_level(
        bounds in prop::collection::vec((0u32..20, 0u32..40, 0u32..6), 1..40),
        share in 0.0f64..=1.0,
    ) {
        let mut slots: Vec<Slot> = bounds
            .iter()
            .map(|&(lo, extra, _)| Slot { node: 0, name: "n", lo, hi: lo + extra, target: 0.0, quota: 0 })
            .collect();
        let weights: Vec<f64> = bounds.iter().map(|&(_, _, p)| f64::from(1u32 << p)).collect();
        let lo: f64 = slots.iter().map(|s| f64::from(s.lo)).sum();
        let hi: f64 = slots.iter().map(|s| f64::from(s.hi)).sum();
        let total = (lo + share * (hi - lo)).round();
        water_fill(&mut slots, &weights, total);
        let sum: f64 = slots.iter().map(|s| s.target).sum();
        prop_assert!((sum - total).abs() < 1e-6, "sum {sum} total {total}");
        let free: Vec<f64> = slots
            .iter()
            .zip(&weights)
            .filter(|(s, _)| s.target > f64::from(s.lo) + 1e-9 && s.target < f64::from(s.hi) - 1e-9)
            .map(|(s, w)| s.target / w)
            .collect();
        for (s, w) in slots.iter().zip(&weights) {
            prop_assert!(s.target >= f64::from(s.lo) - 1e-9 && s.target <= f64::from(s.hi) + 1e-9);
            for level in &free {
                if s.target <= f64::from(s.lo) + 1e-9 && s.hi > s.lo {
                    prop_assert!(f64::from(s.lo) / w >= level - 1e-9);
                }
                if s.target >= f64::from(s.hi) - 1e-9 && s.hi > s.lo {
                    prop_assert!(f64::from(s.hi) / w <= level + 1e-9);
                }
            }
        }
        if let Some(first) = free.first() {
            prop_assert!(free.iter().all(|l| (l - first).abs() < 1e-6), "{free:?}");
        }
    }

    /// Settling's first sweep takes exactly the units that raising the largest shortfall one
    /// unit at a time would: the quotas equal those of the unit-at-a-time loop alone.
    #[test]
    fn the_settling_sweep_matches_unit_steps(
        slots in prop::collection::vec((0u32..10, 0u32..30, 0.0f64..=1.0, 0u32..40), 1..40),
        share in 0.0f64..=1.0,
    ) {
        let mut swept: Vec<Slot> = slots
            .iter()
            .map(|&(lo, extra, at, current)| {
                let hi = lo + extra;
                Slot {
                    node: 0,
                    name: "n",
                    lo,
                    hi,
                    target: f64::from(lo) + at * f64::from(extra),
                    quota: current.clamp(lo, hi),
                }
            })
            .collect();
        let lo: u64 = swept.iter().map(|s| u64::from(s.lo)).sum();
        let hi: u64 = swept.iter().map(|s| u64::from(s.hi)).sum();
        let total = lo + (share * (hi - lo) as f64).round() as u64;
        let mut stepped: Vec<Slot> = swept
            .iter()
            .map(|s| Slot { node: 0, name: "n", lo: s.lo, hi: s.hi, target: s.target, quota: s.quota })
            .collect();
        settle(&mut swept, total);
        settle_by_units(&mut stepped, total);
        let a: Vec<u32> = swept.iter().map(|s| s.quota).collect();
        let b: Vec<u32> = stepped.iter().map(|s| s.quota).collect();
        prop_assert_eq!(a, b);
    }
}
