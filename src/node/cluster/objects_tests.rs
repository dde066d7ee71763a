//! The Sandbox and Task objects served by a node, end to end on kube's mock service: a small
//! in-memory API server (lists, watches with field selectors, merge patches of objects and
//! status with resource-version preconditions, deletion held by finalizers) in front of the
//! real watch loops, the real Manager and the fake runtime (whose agent runs commands on the
//! host and writes files in a directory of its own).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::mirror::{MIRROR_LABEL, Mirror};
use super::sandboxes::{ObjectOptions, SANDBOX_FINALIZER, SandboxSync, UID_LABEL};
use super::tasks::TaskSync;
use crate::api::PoolSpec;
use crate::crd::MAX_STEP_OUTPUT;
use crate::node::auth::Auth;
use crate::node::manager::{Manager, ShutdownMode};
use crate::node::records::Records;
use crate::node::testing::FakeRuntime;
use crate::util::random_id;

const NS: &str = "arl-sandboxes";
const GROUP: &str = "/apis/arl.infra.io/v1alpha1/namespaces/arl-sandboxes";

#[derive(Default)]
struct Store {
    version: u64,
    /// By (resource, name).
    objects: BTreeMap<(String, String), Value>,
    /// (version, resource, type, object).
    events: Vec<(u64, String, &'static str, Value)>,
    /// Writes seen: "METHOD path".
    writes: Vec<String>,
}

/// A small API server for `sandboxes` and `tasks` in one namespace.
struct FakeKube {
    store: Mutex<Store>,
    bump: watch::Sender<u64>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(map) = target else { return };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

impl FakeKube {
    fn start() -> (Arc<Self>, Client) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Arc::new(Self {
            store: Mutex::new(Store::default()),
            bump: watch::Sender::new(0),
        });
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let (code, body) = server.answer(req).await;
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(body))
                            .expect("response"),
                    );
                });
            }
        });
        (api, Client::new(svc, NS))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("store")
    }

    /// Stores a change and streams it to watchers.
    fn event(&self, resource: &str, kind: &'static str, mut obj: Value) -> Value {
        {
            let mut st = self.lock();
            st.version += 1;
            let v = st.version;
            obj["metadata"]["resourceVersion"] = json!(v.to_string());
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = (resource.to_string(), name);
            if kind == "DELETED" {
                st.objects.remove(&key);
            } else {
                st.objects.insert(key, obj.clone());
            }
            st.events.push((v, resource.to_string(), kind, obj.clone()));
        }
        self.bump.send_modify(|n| *n += 1);
        obj
    }

    /// Creates an object as a client would (the server gives it a uid).
    fn create(&self, resource: &str, mut obj: Value) {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        obj["metadata"]["namespace"] = json!(NS);
        obj["metadata"]["uid"] = json!(format!("uid-{}", random_id("")));
        obj["metadata"]["creationTimestamp"] = json!("2026-12-03T10:00:00Z");
        assert!(self.get(resource, &name).is_none(), "{name} exists");
        self.event(resource, "ADDED", obj);
    }

    /// Changes an object's status as another writer (the operator) would.
    fn set_status(&self, resource: &str, name: &str, status: Value) {
        let mut obj = self.get(resource, name).expect("stored");
        obj["status"] = status;
        self.event(resource, "MODIFIED", obj);
    }

    fn get(&self, resource: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.to_string(), name.to_string()))
            .cloned()
    }

    fn writes(&self) -> Vec<String> {
        self.lock().writes.clone()
    }

    /// Deletes as `kubectl delete` does: held while finalizers remain.
    fn delete(&self, resource: &str, name: &str) -> Option<Value> {
        let mut obj = self.get(resource, name)?;
        let finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            obj["metadata"]["deletionTimestamp"] = json!("2026-12-03T10:05:00Z");
            Some(self.event(resource, "MODIFIED", obj))
        } else {
            Some(self.event(resource, "DELETED", obj))
        }
    }

    fn matches(selector: Option<&String>, obj: &Value) -> bool {
        let Some(selector) = selector else {
            return true;
        };
        selector.split(',').all(|term| {
            let Some((path, value)) = term.split_once('=') else {
                return false;
            };
            let mut field = obj;
            for part in path.split('.') {
                field = &field[part];
            }
            field.as_str().unwrap_or("") == value
        })
    }

    /// Whether `obj` has every `key=value` label of the selector.
    fn labelled(selector: Option<&String>, obj: &Value) -> bool {
        selector.is_none_or(|selector| {
            selector.split(',').all(|term| {
                term.split_once('=')
                    .is_some_and(|(k, v)| obj["metadata"]["labels"][k].as_str() == Some(v))
            })
        })
    }

    async fn answer(&self, req: Request<Body>) -> (u16, Vec<u8>) {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let body = req.into_body().collect_bytes().await.expect("body");
        let json = |v: Value| serde_json::to_vec(&v).expect("json");
        if method != Method::GET {
            self.lock().writes.push(format!("{method} {}", uri.path()));
        }
        let Some(rest) = uri.path().strip_prefix(&format!("{GROUP}/")) else {
            return (404, json(status_body(404, "NotFound", "no such path")));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let resource = parts[0].to_string();
        let selector = query.get("fieldSelector");
        match (parts.len(), &method) {
            (1, &Method::GET) if query.get("watch").map(String::as_str) == Some("true") => {
                let since = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                (200, self.watch_from(&resource, selector, since).await)
            }
            (1, &Method::POST) => {
                let obj: Value = serde_json::from_slice(&body).expect("object");
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.get(&resource, &name).is_some() {
                    let message = format!("{resource} {name:?} already exists");
                    return (409, json(status_body(409, "AlreadyExists", &message)));
                }
                self.create(&resource, obj);
                (201, json(self.get(&resource, &name).unwrap_or_default()))
            }
            (1, &Method::GET) => {
                let labels = query.get("labelSelector");
                let st = self.lock();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((r, _), o)| *r == resource && Self::matches(selector, o))
                    .filter(|(_, o)| Self::labelled(labels, o))
                    .map(|(_, o)| o.clone())
                    .collect();
                (
                    200,
                    json(
                        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "List",
                        "metadata": {"resourceVersion": st.version.to_string()}, "items": items}),
                    ),
                )
            }
            (2 | 3, _) => {
                let name = parts[1];
                let Some(mut obj) = self.get(&resource, name) else {
                    let message = format!("{resource} {name:?} not found");
                    return (404, json(status_body(404, "NotFound", &message)));
                };
                match method {
                    Method::GET => (200, json(obj)),
                    Method::DELETE => (200, json(self.delete(&resource, name).unwrap_or(obj))),
                    Method::PATCH => {
                        let mut patch: Value = serde_json::from_slice(&body).expect("patch");
                        let wanted = patch["metadata"]["resourceVersion"].clone();
                        if !wanted.is_null() && wanted != obj["metadata"]["resourceVersion"] {
                            return (409, json(status_body(409, "Conflict", "modified")));
                        }
                        if let Some(meta) = patch["metadata"].as_object_mut() {
                            meta.remove("resourceVersion");
                        }
                        if parts.len() == 3 {
                            merge(&mut obj["status"], &patch["status"]);
                        } else {
                            if let Some(p) = patch.as_object_mut() {
                                p.remove("status");
                            }
                            merge(&mut obj, &patch);
                        }
                        let done = obj["metadata"]["deletionTimestamp"].is_string()
                            && obj["metadata"]["finalizers"]
                                .as_array()
                                .is_none_or(|f| f.is_empty());
                        let kind = if done { "DELETED" } else { "MODIFIED" };
                        (200, json(self.event(&resource, kind, obj)))
                    }
                    _ => (405, json(status_body(405, "MethodNotAllowed", "no"))),
                }
            }
            _ => (404, json(status_body(404, "NotFound", "no such path"))),
        }
    }

    /// The events of `resource` after `since` that match the selector, once there are some.
    async fn watch_from(&self, resource: &str, selector: Option<&String>, since: u64) -> Vec<u8> {
        let mut rx = self.bump.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let st = self.lock();
                let lines: Vec<String> = st
                    .events
                    .iter()
                    .filter(|(v, r, _, o)| {
                        *v > since && r == resource && Self::matches(selector, o)
                    })
                    .map(|(_, _, kind, o)| json!({"type": kind, "object": o}).to_string() + "\n")
                    .collect();
                if !lines.is_empty() {
                    return lines.concat().into_bytes();
                }
            }
            if rx.changed().await.is_err() {
                return Vec::new();
            }
        }
    }
}

/// Polls `cond` until it holds; fails the test after 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn options() -> ObjectOptions {
    ObjectOptions {
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(50),
        attempts: 5,
        check_interval: Duration::from_millis(20),
    }
}

struct Node {
    mgr: Arc<Manager>,
    sandboxes: Arc<SandboxSync>,
}

/// A node daemon "n1" serving Sandboxes and Tasks from `client`, with a warm pool `py`.
async fn node(fake: &Arc<FakeRuntime>, records: Records, client: &Client) -> Node {
    let mgr = Manager::new(fake.clone(), Auth::new(None).expect("auth"), 16, records);
    let pool = PoolSpec {
        min_idle: 1,
        max: 4,
        ..PoolSpec::default()
    };
    mgr.start(&BTreeMap::from([("py".to_string(), pool)]))
        .await
        .expect("start");
    let sandboxes = SandboxSync::new(
        mgr.clone(),
        Api::namespaced(client.clone(), NS),
        "n1".into(),
        options(),
    );
    let tasks = TaskSync::new(sandboxes.clone(), Api::namespaced(client.clone(), NS));
    tokio::spawn(sandboxes.clone().run());
    tokio::spawn(tasks.run());
    Node { mgr, sandboxes }
}

/// A Sandbox of pool `py`, bound to `node` by the operator.
fn bound_sandbox(api: &FakeKube, name: &str, node: &str, keep_alive: bool) {
    api.create(
        "sandboxes",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": name},
            "spec": {"poolRef": "py", "keepAlive": keep_alive, "env": {"EPISODE": "7"},
                     "labels": {"team": "rl"}, "maxLifetimeSeconds": 3600}}),
    );
    api.set_status(
        "sandboxes",
        name,
        json!({"phase": "Bound", "nodeName": node, "nodeEndpoint": "http://10.0.0.1:8080"}),
    );
}

fn phase(api: &FakeKube, name: &str) -> String {
    api.get("sandboxes", name)
        .and_then(|o| o["status"]["phase"].as_str().map(String::from))
        .unwrap_or_default()
}

fn sandbox_id(api: &FakeKube, name: &str) -> String {
    api.get("sandboxes", name)
        .and_then(|o| o["status"]["sandboxId"].as_str().map(String::from))
        .unwrap_or_default()
}

fn task_state(api: &FakeKube, name: &str) -> String {
    api.get("tasks", name)
        .and_then(|o| o["status"]["state"].as_str().map(String::from))
        .unwrap_or_default()
}

fn finished(api: &FakeKube, name: &str) -> bool {
    matches!(task_state(api, name).as_str(), "Succeeded" | "Failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_sandbox_is_acquired_and_ready_and_its_deletion_releases_it() {
    let (api, client) = FakeKube::start();
    let fake = FakeRuntime::new();
    let n = node(&fake, Records::disabled(), &client).await;
    // Bound to another node: not ours.
    bound_sandbox(&api, "elsewhere", "n2", true);
    bound_sandbox(&api, "sb", "n1", true);

    eventually("Ready", || phase(&api, "sb") == "Ready").await;
    let obj = api.get("sandboxes", "sb").expect("object");
    let id = sandbox_id(&api, "sb");
    assert_eq!(obj["status"]["nodeEndpoint"], "http://10.0.0.1:8080");
    assert_eq!(obj["metadata"]["finalizers"], json!([SANDBOX_FINALIZER]));
    // The lease carries the object's env, labels and identity.
    let sb = n.mgr.sandbox(&id, &None).expect("held");
    let lease = sb.lease().expect("lease");
    assert_eq!(lease.env.get("EPISODE").map(String::as_str), Some("7"));
    assert_eq!(lease.labels.get("team").map(String::as_str), Some("rl"));
    assert_eq!(
        lease.labels.get(UID_LABEL),
        obj["metadata"]["uid"].as_str().map(String::from).as_ref()
    );
    assert!(lease.expires_at_ms.is_some(), "maxLifetimeSeconds applied");
    assert_eq!(phase(&api, "elsewhere"), "Bound");
    assert_eq!(n.sandboxes.acquires.load(Ordering::Relaxed), 1);
    // Writes: the finalizer, then Ready: nothing for the other node's object.
    assert_eq!(
        api.writes(),
        [
            format!("PATCH {GROUP}/sandboxes/sb"),
            format!("PATCH {GROUP}/sandboxes/sb/status"),
        ]
    );

    // kubectl delete: held by the finalizer until the sandbox is released.
    api.delete("sandboxes", "sb");
    eventually("the object gone", || api.get("sandboxes", "sb").is_none()).await;
    assert!(n.mgr.sandbox(&id, &None).is_err(), "released");
    n.mgr.shutdown(ShutdownMode::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_its_steps_with_bounded_results_and_a_failing_step_fails_it() {
    let (api, client) = FakeKube::start();
    let fake = FakeRuntime::new();
    let n = node(&fake, Records::disabled(), &client).await;
    bound_sandbox(&api, "sb", "n1", true);
    // Created before its Sandbox is ready: it waits for it.
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
        "metadata": {"name": "t1"},
        "spec": {"sandboxRef": "sb", "steps": [
            {"name": "patch", "type": "FilePatch", "path": "main.py", "workDir": "/work",
             "content": "print('hi')\n"},
            {"name": "run", "type": "Command", "workDir": "/work",
             "command": ["sh", "-c", "cat main.py; echo \"$EPISODE $STEP\" >&2"],
             "env": {"STEP": "two"}},
            {"name": "loud", "type": "Command",
             "command": ["sh", "-c", "head -c 10000 /dev/zero | tr '\\0' x; echo END"]},
        ]}}),
    );
    eventually("t1 finished", || finished(&api, "t1")).await;
    let task = api.get("tasks", "t1").expect("t1");
    assert_eq!(task["status"]["state"], "Succeeded", "{task:#}");
    let steps = &task["status"]["steps"];
    assert_eq!(steps.as_array().map(Vec::len), Some(3), "{task}");
    assert_eq!(steps[0]["name"], "patch");
    assert!(steps[0]["error"].is_null(), "{task}");
    assert_eq!(steps[1]["exitCode"], 0);
    assert_eq!(steps[1]["stdout"], "print('hi')\n");
    assert_eq!(steps[1]["stderr"], "7 two\n");
    assert_eq!(steps[1]["truncated"], false);
    let loud = steps[2]["stdout"].as_str().expect("stdout");
    assert_eq!(loud.chars().count(), MAX_STEP_OUTPUT);
    assert!(loud.ends_with("xxxEND\n"), "the tail is kept");
    assert_eq!(steps[2]["truncated"], true);
    assert_eq!(task["status"]["exitCode"], 0);
    assert!(task["status"]["startTime"].is_string());
    assert!(task["status"]["completionTime"].is_string());
    let id = sandbox_id(&api, "sb");
    assert_eq!(
        std::fs::read_to_string(fake.root(&id).join("work/main.py")).expect("file"),
        "print('hi')\n"
    );
    // Bounded writes: Running, one per step but the last, the end.
    let task_writes = api
        .writes()
        .iter()
        .filter(|w| w.contains("/tasks/t1/status"))
        .count();
    assert_eq!(task_writes, 4);

    // A failing step stops the Task and fails it.
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
        "metadata": {"name": "t2"},
        "spec": {"sandboxRef": "sb", "steps": [
            {"name": "bad", "type": "Command", "command": ["sh", "-c", "echo oops >&2; exit 3"]},
            {"name": "never", "type": "Command", "command": ["true"]},
        ]}}),
    );
    eventually("t2 finished", || finished(&api, "t2")).await;
    let task = api.get("tasks", "t2").expect("t2");
    assert_eq!(task["status"]["state"], "Failed", "{task:#}");
    assert_eq!(task["status"]["exitCode"], 3);
    assert_eq!(task["status"]["steps"].as_array().map(Vec::len), Some(1));
    assert_eq!(task["status"]["steps"][0]["stderr"], "oops\n");
    assert!(
        task["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bad"))
    );
    // A step past its timeout fails with the reason.
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
        "metadata": {"name": "t3"},
        "spec": {"sandboxRef": "sb", "timeoutSeconds": 1, "steps": [
            {"name": "slow", "type": "Command", "command": ["sleep", "20"]},
        ]}}),
    );
    eventually("t3 finished", || finished(&api, "t3")).await;
    let task = api.get("tasks", "t3").expect("t3");
    assert_eq!(task["status"]["state"], "Failed", "{task:#}");
    assert!(
        task["status"]["steps"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{task}"
    );
    // With ttlSecondsAfterFinished 0 a Task is deleted once its end is written; without, kept.
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
            "metadata": {"name": "t4"},
            "spec": {"sandboxRef": "sb", "ttlSecondsAfterFinished": 0, "steps": [
                {"name": "one", "type": "Command", "command": ["true"]}]}}),
    );
    // The fake logs a request as it arrives and stores its effect a moment later.
    eventually("t4 deleted", || {
        api.writes().contains(&format!("DELETE {GROUP}/tasks/t4"))
            && api.get("tasks", "t4").is_none()
    })
    .await;
    let t4: Vec<String> = api
        .writes()
        .into_iter()
        .filter(|w| w.contains("/tasks/t4"))
        .collect();
    assert_eq!(
        t4,
        [
            format!("PATCH {GROUP}/tasks/t4/status"),
            format!("PATCH {GROUP}/tasks/t4/status"),
            format!("DELETE {GROUP}/tasks/t4"),
        ],
        "Running, the end, then the deletion"
    );
    assert!(api.get("tasks", "t1").is_some() && api.get("tasks", "t2").is_some());
    n.mgr.shutdown(ShutdownMode::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_alive_the_sandbox_is_released_once_its_task_is_done() {
    let (api, client) = FakeKube::start();
    let fake = FakeRuntime::new();
    let n = node(&fake, Records::disabled(), &client).await;
    bound_sandbox(&api, "sb", "n1", false);
    eventually("Ready", || phase(&api, "sb") == "Ready").await;
    let id = sandbox_id(&api, "sb");
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
            "metadata": {"name": "t"},
            "spec": {"sandboxRef": "sb", "steps": [
                {"name": "one", "type": "Command", "command": ["true"]}]}}),
    );
    eventually("Released", || phase(&api, "sb") == "Released").await;
    assert_eq!(task_state(&api, "t"), "Succeeded");
    assert!(n.mgr.sandbox(&id, &None).is_err(), "released");
    n.mgr.shutdown(ShutdownMode::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_lease_is_written_and_an_unknown_pool_fails_after_bounded_retries() {
    let (api, client) = FakeKube::start();
    let fake = FakeRuntime::new();
    let n = node(&fake, Records::disabled(), &client).await;
    bound_sandbox(&api, "sb", "n1", true);
    eventually("Ready", || phase(&api, "sb") == "Ready").await;
    // Its sandbox dies: the next check writes Failed.
    fake.kill(&sandbox_id(&api, "sb"));
    eventually("Failed", || phase(&api, "sb") == "Failed").await;

    api.create(
        "sandboxes",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "nopool"}, "spec": {"poolRef": "missing"}}),
    );
    api.set_status(
        "sandboxes",
        "nopool",
        json!({"phase": "Bound", "nodeName": "n1"}),
    );
    eventually("Failed", || phase(&api, "nopool") == "Failed").await;
    let obj = api.get("sandboxes", "nopool").expect("object");
    assert!(
        obj["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing")),
        "{obj}"
    );
    assert_eq!(n.sandboxes.acquires.load(Ordering::Relaxed), 1);
    n.mgr.shutdown(ShutdownMode::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_adopts_the_sandbox_instead_of_acquiring_again() {
    let (api, client) = FakeKube::start();
    let fake = FakeRuntime::new();
    let state = std::env::temp_dir().join(random_id("arl-objects-"));
    std::fs::create_dir_all(&state).expect("state dir");
    let first = node(&fake, Records::open(&state).expect("records"), &client).await;
    bound_sandbox(&api, "sb", "n1", true);
    eventually("Ready", || phase(&api, "sb") == "Ready").await;
    let id = sandbox_id(&api, "sb");
    first.mgr.shutdown(ShutdownMode::HandOver).await;
    let creates = fake.creates.load(Ordering::Relaxed);

    // A Task the first daemon was running when it stopped.
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
            "metadata": {"name": "cut"},
            "spec": {"sandboxRef": "sb", "steps": [
                {"name": "one", "type": "Command", "command": ["true"]}]}}),
    );
    api.set_status(
        "tasks",
        "cut",
        json!({"state": "Running", "startTime": "2026-12-03T10:01:00Z"}),
    );
    let writes = api.writes().len();

    let second = node(&fake, Records::open(&state).expect("records"), &client).await;
    eventually("adopted", || second.sandboxes.ready_sandbox("sb").is_some()).await;
    assert_eq!(
        second.sandboxes.ready_sandbox("sb").map(|s| s.id),
        Some(id.clone())
    );
    assert_eq!(
        second.sandboxes.acquires.load(Ordering::Relaxed),
        0,
        "not acquired again"
    );
    assert_eq!(sandbox_id(&api, "sb"), id);
    // The cut-off Task is failed (it cannot be resumed), and nothing else is written.
    eventually("cut failed", || finished(&api, "cut")).await;
    let cut = api.get("tasks", "cut").expect("cut");
    assert_eq!(cut["status"]["state"], "Failed");
    assert!(
        cut["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("restarted")),
        "{cut}"
    );
    assert_eq!(
        api.writes()[writes..],
        [format!("PATCH {GROUP}/tasks/cut/status")],
        "the Sandbox was Ready: nothing to write for it"
    );
    assert_eq!(fake.creates.load(Ordering::Relaxed), creates);
    // Its Tasks run in the adopted sandbox.
    api.create(
        "tasks",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Task",
            "metadata": {"name": "t"},
            "spec": {"sandboxRef": "sb", "steps": [
                {"name": "one", "type": "Command", "command": ["sh", "-c", "echo $EPISODE"]}]}}),
    );
    eventually("t done", || task_state(&api, "t") == "Succeeded").await;
    assert_eq!(
        api.get("tasks", "t").expect("t")["status"]["steps"][0]["stdout"],
        "7\n"
    );
    // And its deletion still releases it.
    api.delete("sandboxes", "sb");
    eventually("the object gone", || api.get("sandboxes", "sb").is_none()).await;
    assert!(second.mgr.sandbox(&id, &None).is_err(), "released");
    second.mgr.shutdown(ShutdownMode::Stop).await;
    let _ = std::fs::remove_dir_all(&state);
}

/// With `--mirror-sandboxes`: leases of the node API appear as Sandbox objects, in the
/// background (the acquire writes nothing itself), are not served as objects, go when the
/// lease ends, and a restarted daemon keeps the mirrors of the leases it still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_the_node_api_are_mirrored_in_the_background() {
    let (api, client) = FakeKube::start();
    let fake = FakeRuntime::new();
    let n = node(&fake, Records::disabled(), &client).await;
    let mirror = |mgr: &Arc<Manager>| {
        Mirror::new(
            mgr.clone(),
            Api::namespaced(client.clone(), NS),
            "n1".into(),
            Some("http://10.0.0.1:8420".into()),
            Duration::from_secs(3600),
        )
    };
    let m = mirror(&n.mgr);
    let before = api.writes().len();
    let lease = n
        .mgr
        .acquire(
            None,
            crate::api::AcquireRequest {
                pool: "py".into(),
                count: None,
                env: Default::default(),
                labels: BTreeMap::from([("episode".to_string(), "7".to_string())]),
                ttl_seconds: None,
                idle_timeout_seconds: None,
                request_id: None,
            },
        )
        .await
        .expect("acquire");
    let id = lease[0].id.clone();
    assert_eq!(api.writes().len(), before, "the acquire wrote nothing");

    m.round().await;
    let name = format!("node-{id}");
    let object = api.get("sandboxes", &name).expect("mirrored");
    assert_eq!(object["metadata"]["labels"][MIRROR_LABEL], "true");
    assert_eq!(object["metadata"]["labels"]["arl.infra.io/node"], "n1");
    assert_eq!(object["spec"]["poolRef"], "py");
    assert_eq!(object["spec"]["labels"]["episode"], "7");
    assert_eq!(object["status"]["phase"], "Ready");
    assert_eq!(object["status"]["sandboxId"], id.as_str());
    assert_eq!(object["status"]["nodeEndpoint"], "http://10.0.0.1:8420");
    assert_eq!(
        api.writes()[before..],
        [
            format!("POST {GROUP}/sandboxes"),
            format!("PATCH {GROUP}/sandboxes/{name}/status"),
        ]
    );
    // The node's object watch sees a Ready Sandbox bound here and leaves it alone.
    m.round().await;
    assert_eq!(
        api.writes().len(),
        before + 2,
        "an unchanged lease writes nothing"
    );
    assert_eq!(n.sandboxes.acquires.load(Ordering::Relaxed), 0);
    assert!(!n.sandboxes.serves(&name));

    // A restarted daemon keeps the mirror of a lease it still holds, deletes a stale one.
    api.create(
        "sandboxes",
        json!({"apiVersion": "arl.infra.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "node-stale", "labels": {MIRROR_LABEL: "true",
                                                          "arl.infra.io/node": "n1"}},
            "spec": {"poolRef": "py"}}),
    );
    api.set_status(
        "sandboxes",
        "node-stale",
        json!({"phase": "Ready", "nodeName": "n1", "sandboxId": "gone"}),
    );
    let successor = mirror(&n.mgr);
    let run = tokio::spawn(successor.clone().run());
    eventually("the stale mirror deleted", || {
        api.get("sandboxes", "node-stale").is_none()
    })
    .await;
    assert!(
        api.get("sandboxes", &name).is_some(),
        "the held lease's mirror stays"
    );
    run.abort();

    // The lease ends: its mirror goes.
    n.mgr.release(&id, &None).expect("release");
    successor.round().await;
    assert!(
        api.get("sandboxes", &name).is_none(),
        "the ended lease's mirror is deleted"
    );
    n.mgr.shutdown(ShutdownMode::Stop).await;
}
