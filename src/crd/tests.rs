//! The checked-in CRD YAML is what the types generate; the CEL rules say what they mean.

use std::path::Path;

use kube::CustomResourceExt;
use serde_json::json;

use super::*;

fn crds_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crds")
}

#[test]
fn checked_in_crds_match_the_types() {
    // `UPDATE_CRDS=1 cargo test --lib crd::` rewrites them.
    let update = std::env::var_os("UPDATE_CRDS").is_some();
    for crd in all() {
        let generated = to_yaml(&crd).expect("CRD serialises");
        let path = crds_dir().join(file_name(&crd));
        if update {
            std::fs::write(&path, &generated).expect("write CRD");
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} is stale: run `arl crds --out-dir crds` (or UPDATE_CRDS=1 cargo test --lib crd::)",
            path.display()
        );
    }
}

#[test]
fn shard_is_selectable_by_node_with_a_leading_dot() {
    let crd = WarmPoolShard::crd();
    let fields: Vec<String> = crd.spec.versions[0]
        .selectable_fields
        .iter()
        .flatten()
        .map(|f| f.json_path.clone())
        .collect();
    assert_eq!(fields, [".spec.nodeName", ".spec.poolName"]);
}

#[test]
fn every_crd_has_a_status_subresource_and_a_short_name() {
    for crd in all() {
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{:?} has no status subresource",
            crd.metadata.name
        );
        assert!(
            !crd.spec
                .names
                .short_names
                .clone()
                .unwrap_or_default()
                .is_empty()
        );
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(version.name, VERSION);
    }
}

#[test]
fn warmpool_printer_columns_show_the_pool_state() {
    let crd = WarmPool::crd();
    let names: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        names,
        ["Replicas", "Ready", "Idle", "Allocated", "Nodes", "Age"]
    );
}

fn pool(spec: serde_json::Value) -> WarmPool {
    serde_json::from_value(json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPool",
        "metadata": {"name": "python", "namespace": "arl"},
        "spec": spec,
    }))
    .expect("pool parses")
}

fn rule_messages(result: Result<(), kube::core::cel::ValidationErrors>) -> Vec<String> {
    match result {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

#[test]
fn warmpool_cel_accepts_a_sound_pool() {
    let p = pool(json!({"replicas": 10, "image": "python:3.12", "minPerNode": 1, "maxPerNode": 4}));
    assert_eq!(rule_messages(p.validate_cel()), Vec::<String>::new());
    let p = pool(
        json!({"replicas": 0, "template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}),
    );
    assert_eq!(rule_messages(p.validate_cel()), Vec::<String>::new());
}

#[test]
fn warmpool_cel_rejects_broken_invariants() {
    let cases = [
        (
            json!({"replicas": -1, "image": "x"}),
            "replicas must not be negative",
        ),
        (
            json!({"replicas": 1}),
            "exactly one of template or image must be set",
        ),
        (
            json!({"replicas": 1, "image": "x", "template": {"spec": {"containers": []}}}),
            "exactly one of template or image must be set",
        ),
        (
            json!({"replicas": 1, "image": "x", "minPerNode": 5, "maxPerNode": 2}),
            "minPerNode must not exceed maxPerNode",
        ),
        (
            json!({"replicas": 1, "template": {"spec": {"containers": []}}, "env": [{"name": "A", "value": "1"}]}),
            "resources and env go with image; put them in the template instead",
        ),
        (
            json!({"replicas": 1, "image": "x", "idleTimeoutSeconds": 0}),
            "idleTimeoutSeconds must be positive",
        ),
    ];
    for (spec, message) in cases {
        let messages = rule_messages(pool(spec.clone()).validate_cel());
        assert!(
            messages.iter().any(|m| m == message),
            "{spec} should fail with {message:?}, got {messages:?}"
        );
    }
}

#[test]
fn warmpool_cel_rejects_a_name_that_is_not_a_dns_label() {
    let mut p = pool(json!({"replicas": 1, "image": "x"}));
    p.metadata.name = Some("Bad.Name".into());
    assert!(!rule_messages(p.validate_cel()).is_empty());
}

#[test]
fn shard_node_and_pool_are_immutable() {
    let old = WarmPoolShard::new(
        "python-n1",
        WarmPoolShardSpec {
            node_name: "n1".into(),
            pool_name: "python".into(),
            pool_generation: 1,
            quota: 3,
            sandbox: SandboxDefinition {
                image: Some("x".into()),
                ..Default::default()
            },
        },
    );
    let mut moved = old.clone();
    moved.spec.quota = 5;
    assert_eq!(
        rule_messages(moved.validate_cel_update(&old)),
        Vec::<String>::new()
    );
    moved.spec.node_name = "n2".into();
    assert_eq!(
        rule_messages(moved.validate_cel_update(&old)),
        ["nodeName is immutable"]
    );
    let mut negative = old.clone();
    negative.spec.quota = -1;
    assert_eq!(
        rule_messages(negative.validate_cel()),
        ["quota must not be negative"]
    );
}

#[test]
fn sandbox_definition_rules_hold_inside_a_shard() {
    let bad = json!({"reuse": "reset", "network": "none"});
    assert!(SandboxDefinition::validate_cel(&bad, None).is_err());
    let good = json!({"image": "x", "reuse": "reset", "network": "egress"});
    assert!(SandboxDefinition::validate_cel(&good, None).is_ok());
}

#[test]
fn task_steps_need_what_their_type_runs() {
    assert!(TaskStep::validate_cel(&json!({"name": "a", "type": "Command"}), None).is_err());
    assert!(
        TaskStep::validate_cel(
            &json!({"name": "a", "type": "Command", "command": []}),
            None
        )
        .is_err()
    );
    assert!(
        TaskStep::validate_cel(
            &json!({"name": "a", "type": "Command", "command": ["ls"]}),
            None
        )
        .is_ok()
    );
    assert!(
        TaskStep::validate_cel(
            &json!({"name": "a", "type": "FilePatch", "path": "f"}),
            None
        )
        .is_err()
    );
    assert!(
        TaskStep::validate_cel(
            &json!({"name": "a", "type": "FilePatch", "path": "f", "content": ""}),
            None
        )
        .is_ok()
    );
}

#[test]
fn task_spec_is_immutable_and_sandbox_pool_ref_too() {
    let task: Task = serde_json::from_value(json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "Task", "metadata": {"name": "t"},
        "spec": {"sandboxRef": "s", "steps": [{"name": "a", "type": "Command", "command": ["true"]}]},
    }))
    .expect("task parses");
    let mut changed = task.clone();
    changed.spec.sandbox_ref = "other".into();
    assert_eq!(
        rule_messages(changed.validate_cel_update(&task)),
        ["a Task's spec is immutable"]
    );

    let sandbox = Sandbox::new(
        "s",
        SandboxSpec {
            pool_ref: "python".into(),
            ..Default::default()
        },
    );
    let mut moved = sandbox.clone();
    moved.spec.pool_ref = "other".into();
    assert_eq!(
        rule_messages(moved.validate_cel_update(&sandbox)),
        ["poolRef is immutable"]
    );
}

#[test]
fn shard_names_stay_valid_object_names() {
    assert_eq!(shard_name("python", "node-1"), "python-node-1");
    let long_node = format!("{}.example.com", "n".repeat(240));
    let a = shard_name("python", &long_node);
    let b = shard_name("python", &format!("{}.example.org", "n".repeat(240)));
    assert!(a.len() <= 253 && b.len() <= 253);
    assert_ne!(a, b);
    assert!(!a.contains(".-"));
}

#[test]
fn step_output_keeps_the_tail_within_the_bound() {
    let (kept, cut) = bound_output("short");
    assert_eq!((kept.as_str(), cut), ("short", false));
    let long = format!("{}END", "x".repeat(MAX_STEP_OUTPUT * 2));
    let (kept, cut) = bound_output(&long);
    assert!(cut && kept.ends_with("END") && kept.chars().count() == MAX_STEP_OUTPUT);
}

#[test]
fn the_examples_pass_the_cel_rules() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/k8s");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/k8s") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        let doc: serde_json::Value = serde_saphyr::from_str(&text).expect("example is YAML");
        let result = match doc["kind"].as_str() {
            Some("WarmPool") => serde_json::from_value::<WarmPool>(doc)
                .expect("WarmPool")
                .validate_cel(),
            Some("Sandbox") => serde_json::from_value::<Sandbox>(doc)
                .expect("Sandbox")
                .validate_cel(),
            Some("Task") => serde_json::from_value::<Task>(doc)
                .expect("Task")
                .validate_cel(),
            _ => continue,
        };
        assert_eq!(
            rule_messages(result),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} examples checked");
}
