//! Kubernetes objects → the planner's inputs: nodes (labels, taints, allocatable, readiness,
//! cordon) and pools (replicas, bounds, per-sandbox requests, placement).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeSelectorRequirement, PodSpec, ResourceRequirements,
    Toleration as K8sToleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use super::planner::{
    NodeInfo, Placement, PoolInfo, Requirement, Resources, Taint, TaintEffect, Toleration,
};
use crate::crd::{Demand, WarmPool};

/// Parses a Kubernetes quantity (`500m`, `2`, `1.5Gi`, `128M`, `1e9`) into a number of units;
/// `None` when it is not a quantity.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    let value = number * factor;
    (value.is_finite() && value >= 0.0).then_some(value)
}

fn resources_of(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let get = |key: &str| {
        map.and_then(|m| m.get(key))
            .and_then(|q| parse_quantity(&q.0))
            .unwrap_or(0.0)
    };
    Resources {
        cpu_millis: (get("cpu") * 1000.0).ceil() as u64,
        memory_bytes: get("memory").ceil() as u64,
    }
}

/// What a container asks for: its requests, else its limits (Kubernetes defaults requests to
/// limits).
fn container_requests(r: Option<&ResourceRequirements>) -> Resources {
    let requests = resources_of(r.and_then(|r| r.requests.as_ref()));
    let limits = resources_of(r.and_then(|r| r.limits.as_ref()));
    Resources {
        cpu_millis: if requests.cpu_millis > 0 {
            requests.cpu_millis
        } else {
            limits.cpu_millis
        },
        memory_bytes: if requests.memory_bytes > 0 {
            requests.memory_bytes
        } else {
            limits.memory_bytes
        },
    }
}

fn pod_requests(spec: &PodSpec) -> Resources {
    spec.containers
        .iter()
        .map(|c| container_requests(c.resources.as_ref()))
        .fold(Resources::default(), |a, b| Resources {
            cpu_millis: a.cpu_millis + b.cpu_millis,
            memory_bytes: a.memory_bytes + b.memory_bytes,
        })
}

fn taint_effect(effect: &str) -> Option<TaintEffect> {
    match effect {
        "NoSchedule" => Some(TaintEffect::NoSchedule),
        "PreferNoSchedule" => Some(TaintEffect::PreferNoSchedule),
        "NoExecute" => Some(TaintEffect::NoExecute),
        _ => None,
    }
}

/// A node as the planner sees it.
pub fn node_info(node: &Node) -> NodeInfo {
    let spec = node.spec.as_ref();
    let status = node.status.as_ref();
    NodeInfo {
        name: node.name_any(),
        labels: node.labels().clone(),
        taints: spec
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some(Taint {
                    key: t.key.clone(),
                    value: t.value.clone().unwrap_or_default(),
                    effect: taint_effect(&t.effect)?,
                })
            })
            .collect(),
        allocatable: resources_of(status.and_then(|s| s.allocatable.as_ref())),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
    }
}

fn toleration(t: &K8sToleration) -> Option<Toleration> {
    let exists = t.operator.as_deref() == Some("Exists");
    let effect = match t.effect.as_deref() {
        None | Some("") => None,
        Some(e) => Some(taint_effect(e)?),
    };
    Some(Toleration {
        key: t.key.clone().filter(|k| !k.is_empty()),
        value: if exists {
            None
        } else {
            Some(t.value.clone().unwrap_or_default())
        },
        effect,
    })
}

fn requirement(r: &NodeSelectorRequirement) -> Option<Requirement> {
    let values = r.values.clone().unwrap_or_default();
    let number = || values.first().and_then(|v| v.parse::<i64>().ok());
    Some(match r.operator.as_str() {
        "In" => Requirement::In(r.key.clone(), values),
        "NotIn" => Requirement::NotIn(r.key.clone(), values),
        "Exists" => Requirement::Exists(r.key.clone()),
        "DoesNotExist" => Requirement::DoesNotExist(r.key.clone()),
        "Gt" => Requirement::Gt(r.key.clone(), number()?),
        "Lt" => Requirement::Lt(r.key.clone(), number()?),
        _ => return None,
    })
}

/// The required node-affinity terms; a term with a requirement the planner cannot read
/// matches no node (never place where the scheduler would refuse).
fn required_terms(affinity: Option<&Affinity>) -> Vec<Vec<Requirement>> {
    let Some(terms) = affinity
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return vec![];
    };
    terms
        .node_selector_terms
        .iter()
        .map(|term| {
            let mut reqs: Vec<Requirement> = Vec::new();
            for r in term.match_expressions.iter().flatten() {
                match requirement(r) {
                    Some(req) => reqs.push(req),
                    None => return vec![Requirement::NameIn(vec![])],
                }
            }
            for f in term.match_fields.iter().flatten() {
                match (f.key.as_str(), f.operator.as_str()) {
                    ("metadata.name", "In") => {
                        reqs.push(Requirement::NameIn(f.values.clone().unwrap_or_default()))
                    }
                    _ => return vec![Requirement::NameIn(vec![])],
                }
            }
            reqs
        })
        .collect()
}

/// A pool as the planner sees it; `shards` gives current quotas and demand by node.
pub fn pool_info(
    pool: &WarmPool,
    current: BTreeMap<String, u32>,
    demand: BTreeMap<String, Demand>,
) -> PoolInfo {
    let spec = &pool.spec;
    let pod = spec.template.as_ref().and_then(|t| t.spec.as_ref());
    let per_sandbox = match pod {
        Some(pod) => pod_requests(pod),
        None => container_requests(spec.resources.as_ref()),
    };
    let mut placement = Placement {
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.iter().filter_map(toleration).collect(),
        required_terms: required_terms(spec.affinity.as_ref()),
    };
    if let Some(pod) = pod {
        placement
            .node_selector
            .extend(pod.node_selector.clone().unwrap_or_default());
        placement
            .tolerations
            .extend(pod.tolerations.iter().flatten().filter_map(toleration));
        if placement.required_terms.is_empty() {
            placement.required_terms = required_terms(pod.affinity.as_ref());
        }
    }
    PoolInfo {
        key: format!(
            "{}/{}",
            pool.namespace().unwrap_or_default(),
            pool.name_any()
        ),
        replicas: u32::try_from(spec.replicas).unwrap_or(0),
        min_per_node: u32::try_from(spec.min_per_node).unwrap_or(0),
        max_per_node: spec.max_per_node.map(|m| u32::try_from(m).unwrap_or(0)),
        per_sandbox,
        placement,
        demand,
        current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("128M"), Some(128e6));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("lots"), None);
        assert_eq!(parse_quantity("5Qi"), None);
    }

    #[test]
    fn a_node_reads_as_the_planner_needs() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"zone": "a"}},
            "spec": {"unschedulable": true, "taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]},
            "status": {
                "allocatable": {"cpu": "3900m", "memory": "15Gi"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))
        .expect("node parses");
        let info = node_info(&node);
        assert_eq!(
            info.allocatable,
            Resources {
                cpu_millis: 3900,
                memory_bytes: 15 << 30
            }
        );
        assert!(info.ready && info.unschedulable);
        assert_eq!(info.taints[0].effect, TaintEffect::NoSchedule);
    }

    #[test]
    fn a_template_pool_sums_its_containers_and_keeps_its_placement() {
        let pool: WarmPool = serde_json::from_value(json!({
            "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "replicas": 4,
                "nodeSelector": {"zone": "a"},
                "template": {"spec": {
                    "containers": [
                        {"name": "main", "image": "x", "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}}},
                        {"name": "side", "image": "y", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
                    ],
                    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "arch", "operator": "In", "values": ["amd64"]}]}]
                    }}},
                }},
            },
        }))
        .expect("pool parses");
        let info = pool_info(&pool, BTreeMap::new(), BTreeMap::new());
        assert_eq!(info.key, "ns/p");
        assert_eq!(
            info.per_sandbox,
            Resources {
                cpu_millis: 1250,
                memory_bytes: (256 << 20) + (1 << 30)
            }
        );
        assert_eq!(
            info.placement.node_selector.get("zone").map(String::as_str),
            Some("a")
        );
        assert_eq!(info.placement.tolerations[0].value, None);
        assert_eq!(
            info.placement.required_terms,
            vec![vec![Requirement::In("arch".into(), vec!["amd64".into()])]]
        );
    }
}
