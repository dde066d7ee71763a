//! The operator against a fake API server on kube's `tower-test` mock service: every request
//! is recorded (method, path, JSON body) and answered the way kube-apiserver answers (created
//! objects get a uid, a resource version and a generation; merge patches are merged; a stale
//! resource version is a 409 Conflict `Status`; a missing object a 404 `Status`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::apply::apply;
use super::desired::{Change, PassOptions, Snapshot, changes};
use super::lease::{Elector, LeaseConfig};
use super::run::pass_if_leader;
use crate::crd::{Sandbox, WarmPool, WarmPoolShard};

const NS: &str = "arl";
const GROUP_PATH: &str = "/apis/arl.infra.io/v1alpha1/namespaces/arl";

/// One recorded request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

impl Seen {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct FakeState {
    /// Objects by path (`…/warmpools/python`), as the server stores them.
    objects: BTreeMap<String, Value>,
    /// Forced answers for the next matching requests: (method, path) → status code.
    failures: VecDeque<(Method, String, u16)>,
    seen: Vec<Seen>,
    version: u64,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeState {
    fn next_version(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    fn answer(&mut self, method: &Method, path: &str, body: &Value) -> (u16, Value) {
        if let Some(i) = self
            .failures
            .iter()
            .position(|(m, p, _)| m == method && p == path)
        {
            let (_, _, code) = self.failures.remove(i).expect("present");
            let reason = if code == 409 {
                "Conflict"
            } else {
                "InternalError"
            };
            return (
                code,
                status(
                    code,
                    reason,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ),
            );
        }
        let (object_path, subresource) = match path.strip_suffix("/status") {
            Some(p) => (p.to_string(), true),
            None => (path.to_string(), false),
        };
        let not_found = || {
            (
                404,
                status(404, "NotFound", &format!("{object_path} not found")),
            )
        };
        match *method {
            Method::GET => match self.objects.get(&object_path) {
                Some(o) => (200, o.clone()),
                None => not_found(),
            },
            Method::POST => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let at = format!("{object_path}/{name}");
                if self.objects.contains_key(&at) {
                    return (
                        409,
                        status(409, "AlreadyExists", &format!("{name} already exists")),
                    );
                }
                let mut object = body.clone();
                let version = self.next_version();
                merge(
                    &mut object,
                    &json!({"metadata": {
                    "uid": format!("uid-{name}"), "resourceVersion": version, "generation": 1,
                    "creationTimestamp": "2026-12-01T00:00:00Z"}}),
                );
                self.objects.insert(at, object.clone());
                (201, object)
            }
            Method::PATCH | Method::PUT => {
                let Some(current) = self.objects.get(&object_path).cloned() else {
                    return not_found();
                };
                if let Some(v) = body["metadata"]["resourceVersion"].as_str()
                    && Some(v) != current["metadata"]["resourceVersion"].as_str()
                {
                    return (
                        409,
                        status(
                            409,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        ),
                    );
                }
                let mut object = current.clone();
                if *method == Method::PUT {
                    object = body.clone();
                } else if subresource {
                    merge(&mut object, &json!({"status": body["status"]}));
                } else {
                    let mut patch = body.clone();
                    if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                    merge(&mut object, &patch);
                }
                let version = self.next_version();
                if !subresource && object["spec"] != current["spec"] {
                    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    object["metadata"]["generation"] = json!(generation);
                }
                object["metadata"]["resourceVersion"] = json!(version);
                self.objects.insert(object_path, object.clone());
                (200, object)
            }
            Method::DELETE => match self.objects.remove(&object_path) {
                Some(o) => (200, o),
                None => not_found(),
            },
            _ => (405, status(405, "MethodNotAllowed", "")),
        }
    }
}

/// A fake API server: a client wired to it and its shared state.
struct Fake {
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            state: Arc::new(Mutex::new(FakeState::default())),
        }
    }

    fn put(&self, path: &str, object: Value) {
        self.state
            .lock()
            .expect("lock")
            .objects
            .insert(path.to_string(), object);
    }

    fn fail_next(&self, method: Method, path: &str, code: u16) {
        self.state
            .lock()
            .expect("lock")
            .failures
            .push_back((method, path.to_string(), code));
    }

    fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.state.lock().expect("lock").seen)
    }

    fn writes(seen: &[Seen]) -> Vec<String> {
        seen.iter()
            .filter(|s| s.method != Method::GET)
            .map(Seen::line)
            .collect()
    }

    fn objects<K: serde::de::DeserializeOwned>(&self, kind: &str) -> Vec<K> {
        let state = self.state.lock().expect("lock");
        let prefix = format!("{GROUP_PATH}/{kind}/");
        state
            .objects
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(_, o)| serde_json::from_value(o.clone()).expect("stored object parses"))
            .collect()
    }

    /// A client whose requests this fake answers.
    fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                let bytes = request.into_body().collect_bytes().await.expect("body");
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("JSON body")
                };
                let (code, answer) = {
                    let mut s = state.lock().expect("lock");
                    s.seen.push(Seen {
                        method: method.clone(),
                        path: path.clone(),
                        body: body.clone(),
                    });
                    s.answer(&method, &path, &body)
                };
                let response = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("JSON")))
                    .expect("response");
                respond.send_response(response);
            }
        });
        Client::new(service, NS)
    }

    /// What the operator's watches would see now.
    fn snapshot(&self, nodes: &[Node]) -> Snapshot {
        Snapshot {
            pools: self.objects("warmpools"),
            shards: self.objects("warmpoolshards"),
            nodes: nodes.to_vec(),
            sandboxes: self.objects("sandboxes"),
        }
    }
}

fn node(name: &str, ip: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        },
    }))
    .expect("node parses")
}

fn cordoned(mut n: Node) -> Node {
    n.spec.get_or_insert_default().unschedulable = Some(true);
    n
}

fn pool_json(replicas: i32) -> Value {
    json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPool",
        "metadata": {"name": "python", "namespace": NS, "uid": "uid-python", "resourceVersion": "1",
                     "generation": 1, "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"replicas": replicas, "image": "python:3.12",
                 "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}}},
    })
}

fn options() -> PassOptions {
    PassOptions {
        node_port: 8420,
        sandbox_namespace: NS.into(),
    }
}

fn now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).expect("time"))
}

async fn pass(fake: &Fake, client: &Client, nodes: &[Node]) -> Vec<Seen> {
    let (_, error) = apply(client, changes(&fake.snapshot(nodes), &now(), &options())).await;
    assert!(error.is_none(), "{error:?}");
    fake.take_seen()
}

fn quotas(fake: &Fake) -> BTreeMap<String, i32> {
    fake.objects::<WarmPoolShard>("warmpoolshards")
        .into_iter()
        .map(|s| (s.spec.node_name.clone(), s.spec.quota))
        .collect()
}

/// Runs the scenario with a bound on time (a stuck request would otherwise hang the test).
async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("scenario finished in time");
}

#[tokio::test]
async fn a_new_pool_gets_exactly_its_shards_then_nothing_more() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        fake.put(&format!("{GROUP_PATH}/warmpools/python"), pool_json(5));
        let nodes = [
            node("n1", "10.0.0.1"),
            node("n2", "10.0.0.2"),
            cordoned(node("n3", "10.0.0.3")),
        ];

        let seen = pass(&fake, &client, &nodes).await;
        assert_eq!(
            Fake::writes(&seen),
            [
                format!("PATCH {GROUP_PATH}/warmpools/python"),
                format!("POST {GROUP_PATH}/warmpoolshards"),
                format!("POST {GROUP_PATH}/warmpoolshards"),
                format!("PATCH {GROUP_PATH}/warmpools/python/status"),
            ]
        );
        // The finalizer write is conditional on the version read.
        assert_eq!(
            seen[1].body,
            json!({"metadata": {"finalizers": ["arl.infra.io/shards"], "resourceVersion": "1"}})
        );
        // The exact shards: owned by the pool, labelled, the pool's definition copied.
        let created: Vec<WarmPoolShard> = seen
            .iter()
            .filter(|s| s.method == Method::POST)
            .map(|s| serde_json::from_value(s.body.clone()).expect("shard body"))
            .collect();
        assert_eq!(created.len(), 2);
        for (shard, (node, quota)) in created.iter().zip([("n1", 3), ("n2", 2)]) {
            assert_eq!(shard.name_any(), format!("python-{node}"));
            assert_eq!(shard.namespace().as_deref(), Some(NS));
            assert_eq!(
                (shard.spec.node_name.as_str(), shard.spec.quota),
                (node, quota)
            );
            assert_eq!(
                (shard.spec.pool_name.as_str(), shard.spec.pool_generation),
                ("python", 1)
            );
            assert_eq!(shard.spec.sandbox.image.as_deref(), Some("python:3.12"));
            assert_eq!(
                shard.labels().get("arl.infra.io/node").map(String::as_str),
                Some(node)
            );
            let owner = &shard.owner_references()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
                ("WarmPool", "uid-python", Some(true))
            );
        }
        let status = &seen.last().expect("status").body["status"];
        assert_eq!(
            (
                status["desired"].clone(),
                status["nodes"].clone(),
                status["ready"].clone()
            ),
            (json!(5), json!(2), json!(0))
        );
        assert_eq!(status["conditions"][0]["reason"], "Warming");

        // Nothing changed: the next pass writes nothing (and reads nothing).
        assert_eq!(pass(&fake, &client, &nodes).await, vec![]);
    })
    .await
}

#[test]
fn a_pool_outside_the_served_namespace_gets_no_shards_and_says_why() {
    let mut pool = pool_json(3);
    pool["metadata"]["namespace"] = json!("team-a");
    let mut stray = serde_json::from_value::<WarmPoolShard>(json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPoolShard",
        "metadata": {"name": "python-n1", "namespace": "team-a"},
        "spec": {"nodeName": "n1", "poolName": "python", "poolGeneration": 1, "quota": 3,
                 "sandbox": {"image": "python:3.12"}},
    }))
    .expect("shard");
    stray.metadata.namespace = Some("team-a".into());
    let snapshot = Snapshot {
        pools: vec![serde_json::from_value(pool).expect("pool")],
        shards: vec![stray],
        nodes: vec![node("n1", "10.0.0.1")],
        sandboxes: Vec::new(),
    };
    let out = changes(&snapshot, &now(), &options());
    let kinds: Vec<String> = out
        .iter()
        .map(|c| match c {
            Change::AddFinalizer(k) => format!("finalizer {}/{}", k.namespace, k.name),
            Change::DeleteShard(k) => format!("delete {}/{}", k.namespace, k.name),
            Change::PoolStatus(k, _) => format!("status {}/{}", k.namespace, k.name),
            other => format!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "finalizer team-a/python",
            "delete team-a/python-n1",
            "status team-a/python"
        ]
    );
    let Some(Change::PoolStatus(_, status)) = out.last() else {
        panic!("no status");
    };
    assert_eq!(status.desired, 0);
    let ready = &status.conditions[0];
    assert_eq!(
        (
            ready.type_.as_str(),
            ready.status.as_str(),
            ready.reason.as_str()
        ),
        ("Ready", "False", "NamespaceNotServed")
    );
    assert!(ready.message.contains("\"arl\""), "{}", ready.message);
}

/// A pool with shards python-n1..n3 at quota 3 each, as the operator left them.
async fn settled(fake: &Fake, client: &Client, nodes: &[Node]) {
    fake.put(&format!("{GROUP_PATH}/warmpools/python"), pool_json(9));
    pass(fake, client, nodes).await;
    assert_eq!(
        quotas(fake),
        BTreeMap::from([("n1".into(), 3), ("n2".into(), 3), ("n3".into(), 3)])
    );
}

fn three_nodes() -> Vec<Node> {
    vec![
        node("n1", "10.0.0.1"),
        node("n2", "10.0.0.2"),
        node("n3", "10.0.0.3"),
    ]
}

#[tokio::test]
async fn a_lost_node_moves_only_its_share() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let mut nodes = three_nodes();
        settled(&fake, &client, &nodes).await;
        nodes.remove(1);
        let seen = pass(&fake, &client, &nodes).await;
        assert_eq!(
            Fake::writes(&seen),
            [
                format!("PATCH {GROUP_PATH}/warmpoolshards/python-n1"),
                format!("PATCH {GROUP_PATH}/warmpoolshards/python-n3"),
                format!("DELETE {GROUP_PATH}/warmpoolshards/python-n2"),
                format!("PATCH {GROUP_PATH}/warmpools/python/status"),
            ]
        );
        assert_eq!(
            quotas(&fake),
            BTreeMap::from([("n1".into(), 5), ("n3".into(), 4)])
        );
    })
    .await
}

#[tokio::test]
async fn a_joining_node_takes_whole_units_from_the_others() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let mut nodes = three_nodes();
        settled(&fake, &client, &nodes).await;
        // Nine over four nodes: targets 2.25, nobody is a whole unit above target: no move.
        nodes.push(node("n4", "10.0.0.4"));
        assert_eq!(
            Fake::writes(&pass(&fake, &client, &nodes).await),
            Vec::<String>::new()
        );
        // Eighteen over four: 4.5 each; n4 takes units only from nodes a unit above target.
        let path = format!("{GROUP_PATH}/warmpools/python");
        let mut pool = pool_json(18);
        pool["metadata"]["finalizers"] = json!(["arl.infra.io/shards"]);
        pool["metadata"]["generation"] = json!(2);
        fake.put(&path, pool);
        pass(&fake, &client, &nodes).await;
        let q = quotas(&fake);
        assert_eq!(q.values().sum::<i32>(), 18);
        assert!(q.values().all(|&n| n == 4 || n == 5), "{q:?}");
    })
    .await
}

#[tokio::test]
async fn a_cordoned_node_keeps_a_zero_quota_shard_while_it_lends_sandboxes() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let mut nodes = three_nodes();
        settled(&fake, &client, &nodes).await;
        // n2's daemon reports one sandbox lent out.
        let shard_path = format!("{GROUP_PATH}/warmpoolshards/python-n2");
        let mut shard = fake.state.lock().expect("lock").objects[&shard_path].clone();
        shard["status"] = json!({"idle": 2, "allocated": 1, "observedPoolGeneration": 1});
        fake.put(&shard_path, shard);
        nodes[1] = cordoned(nodes[1].clone());
        let seen = pass(&fake, &client, &nodes).await;
        let patch = seen
            .iter()
            .find(|s| s.path == shard_path)
            .expect("n2 patched");
        assert_eq!(patch.body["spec"]["quota"], json!(0));
        assert_eq!(
            quotas(&fake),
            BTreeMap::from([("n1".into(), 5), ("n2".into(), 0), ("n3".into(), 4)])
        );
    })
    .await
}

#[tokio::test]
async fn shard_statuses_roll_up_into_the_pool() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let nodes = three_nodes();
        settled(&fake, &client, &nodes).await;
        for (node, idle, allocated, error) in [("n1", 3, 1, None), ("n2", 3, 0, None), ("n3", 1, 2, Some("ImagePullFailed"))] {
            let path = format!("{GROUP_PATH}/warmpoolshards/python-{node}");
            let mut shard = fake.state.lock().expect("lock").objects[&path].clone();
            shard["status"] = json!({"idle": idle, "allocated": allocated, "starting": 0, "observedPoolGeneration": 1});
            if let Some(reason) = error {
                shard["status"]["lastError"] = json!({"reason": reason, "message": "pull access denied"});
            }
            fake.put(&path, shard);
        }
        let seen = pass(&fake, &client, &nodes).await;
        assert_eq!(Fake::writes(&seen), [format!("PATCH {GROUP_PATH}/warmpools/python/status")]);
        let status = &seen[0].body["status"];
        assert_eq!(
            (status["idle"].clone(), status["ready"].clone(), status["allocated"].clone(), status["desired"].clone()),
            (json!(7), json!(7), json!(3), json!(9))
        );
        let conditions = status["conditions"].as_array().expect("conditions");
        assert_eq!((conditions[0]["type"].clone(), conditions[0]["status"].clone()), (json!("Ready"), json!("False")));
        assert_eq!((conditions[1]["type"].clone(), conditions[1]["status"].clone()), (json!("Degraded"), json!("True")));
        assert_eq!(conditions[1]["message"], "1 node(s) failing: n3: ImagePullFailed: pull access denied");
        // Rolled up once; the same statuses again write nothing.
        assert_eq!(pass(&fake, &client, &nodes).await, vec![]);
    })
    .await
}

fn sandbox_json(name: &str, created: &str) -> Value {
    json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "resourceVersion": "7",
                     "creationTimestamp": created},
        "spec": {"poolRef": "python"},
    })
}

async fn two_idle_on_n2(fake: &Fake, client: &Client, nodes: &[Node]) {
    settled(fake, client, nodes).await;
    for (node, idle) in [("n1", 0), ("n2", 2), ("n3", 0)] {
        let path = format!("{GROUP_PATH}/warmpoolshards/python-{node}");
        let mut shard = fake.state.lock().expect("lock").objects[&path].clone();
        shard["status"] = json!({"idle": idle, "allocated": 0, "observedPoolGeneration": 1});
        fake.put(&path, shard);
    }
    pass(fake, client, nodes).await; // status roll-up
}

#[tokio::test]
async fn sandboxes_bind_to_nodes_with_idle_capacity() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let nodes = three_nodes();
        two_idle_on_n2(&fake, &client, &nodes).await;
        for (i, name) in ["s1", "s2", "s3"].iter().enumerate() {
            fake.put(
                &format!("{GROUP_PATH}/sandboxes/{name}"),
                sandbox_json(name, &format!("2026-12-01T00:00:0{i}Z")),
            );
        }
        // A node's mirror of one of its leases (status not written yet) is never bound.
        let mut mirror = sandbox_json("node-sb-1", "2026-12-01T00:00:00Z");
        mirror["metadata"]["labels"] = json!({"arl.infra.io/mirror": "true"});
        fake.put(&format!("{GROUP_PATH}/sandboxes/node-sb-1"), mirror);
        let seen = pass(&fake, &client, &nodes).await;
        assert_eq!(
            Fake::writes(&seen),
            ["s1", "s2", "s3"].map(|s| format!("PATCH {GROUP_PATH}/sandboxes/{s}/status"))
        );
        assert_eq!(seen[0].body["metadata"]["resourceVersion"], "7");
        let sandboxes: BTreeMap<String, Sandbox> = fake
            .objects::<Sandbox>("sandboxes")
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect();
        let status = |n: &str| sandboxes[n].status.clone().expect("status");
        assert_eq!(status("s1").node_name.as_deref(), Some("n2"));
        assert_eq!(
            status("s1").node_endpoint.as_deref(),
            Some("http://10.0.0.2:8420")
        );
        assert_eq!(status("s2").node_name.as_deref(), Some("n2"));
        assert_eq!(status("s3").node_name, None);
        assert_eq!(
            status("s3").message.as_deref(),
            Some("no node has an idle sandbox of WarmPool \"python\" yet")
        );
        // Bound and pending sandboxes are left alone until something changes.
        assert_eq!(pass(&fake, &client, &nodes).await, vec![]);
    })
    .await
}

#[tokio::test]
async fn a_conflicting_binding_is_retried_on_the_fresh_version() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let nodes = three_nodes();
        two_idle_on_n2(&fake, &client, &nodes).await;
        let path = format!("{GROUP_PATH}/sandboxes/s1");
        fake.put(&path, sandbox_json("s1", "2026-12-01T00:00:00Z"));
        let snapshot = fake.snapshot(&nodes);
        // Someone updates the sandbox after the operator's snapshot (labels, say).
        fake.state
            .lock()
            .expect("lock")
            .objects
            .get_mut(&path)
            .expect("s1")["metadata"]["resourceVersion"] = json!("8");
        let (written, error) = apply(&client, changes(&snapshot, &now(), &options())).await;
        assert!(error.is_none(), "{error:?}");
        let lines: Vec<String> = fake.take_seen().iter().map(Seen::line).collect();
        assert_eq!(
            lines,
            [
                format!("PATCH {path}/status"),
                format!("GET {path}"),
                format!("PATCH {path}/status"),
            ]
        );
        assert_eq!(written.writes, 2);
        let bound: Sandbox =
            serde_json::from_value(fake.state.lock().expect("lock").objects[&path].clone())
                .expect("s1");
        assert_eq!(
            bound.status.expect("status").node_name.as_deref(),
            Some("n2")
        );
    })
    .await
}

#[tokio::test]
async fn a_conflicting_finalizer_write_is_retried() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let path = format!("{GROUP_PATH}/warmpools/python");
        fake.put(&path, pool_json(0));
        fake.fail_next(Method::PATCH, &path, 409);
        let (written, error) = apply(
            &client,
            vec![Change::AddFinalizer(super::desired::ObjectKey {
                namespace: NS.into(),
                name: "python".into(),
            })],
        )
        .await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(written.writes, 2);
        let lines: Vec<String> = fake.take_seen().iter().map(Seen::line).collect();
        assert_eq!(
            lines,
            [
                format!("GET {path}"),
                format!("PATCH {path}"),
                format!("GET {path}"),
                format!("PATCH {path}")
            ]
        );
        let pool: WarmPool =
            serde_json::from_value(fake.state.lock().expect("lock").objects[&path].clone())
                .expect("pool");
        assert_eq!(pool.finalizers(), ["arl.infra.io/shards"]);
    })
    .await
}

#[tokio::test]
async fn deleting_a_pool_removes_its_shards_then_its_finalizer() {
    bounded(async {
        let fake = Fake::new();
        let client = fake.client();
        let nodes = three_nodes();
        settled(&fake, &client, &nodes).await;
        let path = format!("{GROUP_PATH}/warmpools/python");
        fake.state
            .lock()
            .expect("lock")
            .objects
            .get_mut(&path)
            .expect("pool")["metadata"]["deletionTimestamp"] = json!("2026-12-01T01:00:00Z");
        let seen = pass(&fake, &client, &nodes).await;
        assert_eq!(
            Fake::writes(&seen),
            ["n1", "n2", "n3"].map(|n| format!("DELETE {GROUP_PATH}/warmpoolshards/python-{n}"))
        );
        // The shards are gone: now the finalizer goes.
        let seen = pass(&fake, &client, &nodes).await;
        assert_eq!(Fake::writes(&seen), [format!("PATCH {path}")]);
        assert_eq!(
            seen.last().expect("patch").body["metadata"]["finalizers"],
            json!([])
        );
    })
    .await
}

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: "arl-system".into(),
        name: "arl-operator".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
    }
}

#[tokio::test(start_paused = true)]
async fn a_standby_replica_writes_nothing_until_the_lease_expires() {
    let fake = Fake::new();
    let client = fake.client();
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/arl-system/leases/arl-operator";
    fake.put(lease_path, json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "arl-operator", "namespace": "arl-system", "resourceVersion": "50"},
        "spec": {"holderIdentity": "operator-a", "leaseDurationSeconds": 15,
                 "renewTime": "2026-12-01T00:00:00.000000Z", "leaseTransitions": 0},
    }));
    fake.put(&format!("{GROUP_PATH}/warmpools/python"), pool_json(2));
    let nodes = three_nodes();
    let mut b = Elector::new(client.clone(), lease_config("operator-b"));
    let (tx, leadership) = tokio::sync::watch::channel(None);
    let lease = Duration::from_secs(15);

    // A holds the lease: B stands by and its pass writes nothing.
    assert!(!b.tick().await.expect("tick"));
    assert_eq!(
        pass_if_leader(
            &client,
            &fake.snapshot(&nodes),
            &leadership,
            lease,
            &options()
        )
        .await,
        None
    );
    assert_eq!(Fake::writes(&fake.take_seen()), Vec::<String>::new());

    // A keeps renewing: B still stands by after more than a lease duration.
    tokio::time::advance(Duration::from_secs(10)).await;
    fake.state
        .lock()
        .expect("lock")
        .objects
        .get_mut(lease_path)
        .expect("lease")["spec"]["renewTime"] = json!("2026-12-01T00:00:10.000000Z");
    assert!(!b.tick().await.expect("tick"));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!b.tick().await.expect("tick"));
    assert_eq!(Fake::writes(&fake.take_seen()), Vec::<String>::new());

    // A stops renewing; once the lease has not changed for its duration, B takes it over.
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(b.tick().await.expect("tick"));
    let seen = fake.take_seen();
    assert_eq!(Fake::writes(&seen), [format!("PUT {lease_path}")]);
    let put = &seen.last().expect("put").body["spec"];
    assert_eq!(
        (
            put["holderIdentity"].clone(),
            put["leaseTransitions"].clone()
        ),
        (json!("operator-b"), json!(1))
    );
    tx.send(Some(tokio::time::Instant::now())).expect("send");
    let written = pass_if_leader(
        &client,
        &fake.snapshot(&nodes),
        &leadership,
        lease,
        &options(),
    )
    .await
    .expect("leads");
    assert!(written.writes > 0);

    // The old holder, back, sees B's lease and stands by.
    let mut a = Elector::new(client.clone(), lease_config("operator-a"));
    assert!(!a.tick().await.expect("tick"));
    // And B's leadership lapses if it stops renewing.
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(!super::run::leads(&leadership, lease));
}

#[tokio::test(start_paused = true)]
async fn two_replicas_racing_for_a_missing_lease_elect_one() {
    let fake = Fake::new();
    let client = fake.client();
    let mut a = Elector::new(client.clone(), lease_config("operator-a"));
    let mut b = Elector::new(client.clone(), lease_config("operator-b"));
    assert!(a.tick().await.expect("a"));
    assert!(!b.tick().await.expect("b"));
    // A renews with the version it read; B keeps standing by.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(a.tick().await.expect("a renews"));
    assert!(!b.tick().await.expect("b"));
    let lines: Vec<String> = Fake::writes(&fake.take_seen());
    assert_eq!(
        lines,
        [
            "POST /apis/coordination.k8s.io/v1/namespaces/arl-system/leases",
            "PUT /apis/coordination.k8s.io/v1/namespaces/arl-system/leases/arl-operator",
        ]
    );
}
