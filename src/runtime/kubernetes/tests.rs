//! The runtime against a fake API server on kube's `tower-test` mock service, answering as
//! kube-apiserver does: created pods get a uid and a resource version, lists carry the
//! collection's resource version, a watch from a resource version streams the events after
//! it (held open until there are some), an expired one answers `410 Gone` (an `ERROR` event),
//! a missing pod is a 404 `Status`. Plus the exact Pod built for a pool (golden files).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::pod::{self, PodContext};
use super::state::{PodState, classify};
use super::{KubernetesConfig, KubernetesRuntime};
use crate::api::PoolSpec;
use crate::api::pools::{NetworkMode, RuntimeKind};
use crate::runtime::{AgentAddress, AgentToken, ExitReason, Runtime};

const NS: &str = "arl-sandboxes";
const NODE: &str = "node-a";

fn ctx() -> PodContext {
    PodContext {
        node_name: NODE.into(),
        namespace: NS.into(),
        instance: "arl".into(),
        agent_image: "registry.example/arl:1.0".into(),
        agent_tcp_port: None,
    }
}

/// The context of a daemon that reaches its agents over TCP at `port`.
fn tcp_ctx(port: u16) -> PodContext {
    PodContext {
        agent_tcp_port: Some(port),
        ..ctx()
    }
}

fn image_pool() -> PoolSpec {
    PoolSpec {
        runtime: RuntimeKind::Kubernetes,
        image: Some("docker.io/library/python:3.12".into()),
        memory_mb: 1024,
        cpu_millis: 500,
        disk_mb: 2048,
        ..PoolSpec::default()
    }
}

fn template_pool() -> PoolSpec {
    PoolSpec {
        runtime: RuntimeKind::Kubernetes,
        network: NetworkMode::Host,
        template: Some(json!({
            "metadata": {"labels": {"arl.infra.io/pool": "swe", "team": "rl"},
                         "annotations": {"note": "kept"}},
            "spec": {
                "hostNetwork": true,
                "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
                "containers": [{
                    "name": "task",
                    "image": "ghcr.io/example/swe-task:7",
                    "command": ["sleep", "infinity"],
                    "env": [{"name": "LANG", "value": "C.UTF-8"}],
                    "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
                    "securityContext": {"privileged": true,
                                        "capabilities": {"add": ["NET_ADMIN"]}},
                    "volumeMounts": [{"name": "work", "mountPath": "/workspace"}]
                }, {
                    "name": "db",
                    "image": "docker.io/library/postgres:16"
                }],
                "volumes": [{"name": "work", "emptyDir": {}}]
            }
        })),
        ..PoolSpec::default()
    }
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/runtime/kubernetes/testdata")
        .join(name)
}

/// Compares a pod with its golden file (`ARL_UPDATE_GOLDEN=1` rewrites the file).
fn golden(name: &str, pod: &Pod) {
    let got = serde_json::to_string_pretty(pod).expect("serialize") + "\n";
    let path = testdata(name);
    if std::env::var_os("ARL_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &got).expect("write golden");
    }
    let want = std::fs::read_to_string(&path).expect("golden file (ARL_UPDATE_GOLDEN=1 writes it)");
    assert_eq!(got, want, "the pod differs from {}", path.display());
}

#[test]
fn the_pod_of_an_image_pool_is_exactly_the_golden_one() {
    let pod = pod::build("sb-0123456789abcdef", &image_pool(), &ctx()).expect("pod");
    golden("pod-image.json", &pod);
}

#[test]
fn the_pod_of_a_template_pool_is_exactly_the_golden_one() {
    let pod = pod::build("sb-0123456789abcdef", &template_pool(), &ctx()).expect("pod");
    golden("pod-template.json", &pod);
}

#[test]
fn the_pod_of_a_tcp_reached_agent_is_exactly_the_golden_one() {
    let pod = pod::build("sb-0123456789abcdef", &image_pool(), &tcp_ctx(7390)).expect("pod");
    golden("pod-image-tcp.json", &pod);
    // The token is not in the pod: only a reference to the pod's Secret.
    let text = serde_json::to_string(&pod).expect("json");
    assert!(text.contains("secretKeyRef"), "{text}");
    let token = crate::runtime::AgentToken::generate();
    let secret = pod::secret("sb-0123456789abcdef", &tcp_ctx(7390), &token);
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("arl-sb-0123456789abcdef")
    );
    assert_eq!(secret.immutable, Some(true));
    let stored = secret.data.as_ref().and_then(|d| d.get(pod::TOKEN_KEY));
    assert_eq!(
        stored.map(|b| b.0.as_slice()),
        Some(token.expose().as_bytes())
    );
    assert_eq!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(pod::SANDBOX_LABEL)),
        Some(&"sb-0123456789abcdef".to_string())
    );
}

#[test]
fn a_template_that_declares_the_agents_port_is_refused_over_tcp_only() {
    let mut spec = template_pool();
    if let Some(template) = spec.template.as_mut() {
        template["spec"]["containers"][1]["ports"] = json!([{"containerPort": 7390}]);
    }
    let err = pod::validate(&spec, Some(7390)).expect_err("the agent's port");
    assert!(err.contains("\"db\" declares port 7390"), "{err}");
    pod::validate(&spec, Some(7391)).expect("another port is fine");
    pod::validate(&spec, None).expect("no port over the Unix socket");
}

#[test]
fn every_pod_meets_baseline_and_non_root_ones_restricted() {
    for (spec, non_root) in [(image_pool(), false), (template_pool(), true)] {
        let pod = pod::build("sb-1", &spec, &ctx()).expect("pod");
        let ps = pod.spec.as_ref().expect("spec");
        assert_eq!(ps.node_name.as_deref(), Some(NODE));
        assert_eq!(ps.automount_service_account_token, Some(false));
        assert_eq!(ps.host_network, None, "no host namespaces");
        assert!(
            ps.volumes.iter().flatten().all(|v| v.host_path.is_none()),
            "no hostPath"
        );
        let seccomp = ps
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref());
        assert_eq!(seccomp.map(|p| p.type_.as_str()), Some("RuntimeDefault"));
        for c in ps.init_containers.iter().flatten().chain(&ps.containers) {
            let sc = c.security_context.as_ref().expect("security context");
            assert_eq!(sc.privileged, Some(false), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            let caps = sc.capabilities.as_ref().expect("caps");
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
            assert_eq!(caps.add, None, "{}", c.name);
            if non_root || c.name == pod::INSTALL_CONTAINER {
                assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            }
        }
        let agent = &ps.containers[0];
        assert_eq!(
            agent.command.as_ref().map(|c| c[1..].join(" ")),
            Some("agent --socket /.arl/run/agent.sock".into())
        );
        let limits = agent.resources.as_ref().and_then(|r| r.limits.as_ref());
        assert!(
            limits.is_some_and(|l| l.contains_key("memory")),
            "resources always set"
        );
    }
}

#[test]
fn bad_pools_are_refused_with_the_reason() {
    let both = PoolSpec {
        template: Some(json!({"spec": {"containers": [{"name": "a", "image": "b"}]}})),
        ..image_pool()
    };
    assert!(pod::validate(&both, None).unwrap_err().contains("not both"));
    let neither = PoolSpec {
        runtime: RuntimeKind::Kubernetes,
        ..PoolSpec::default()
    };
    assert!(
        pod::validate(&neither, None)
            .unwrap_err()
            .contains("needs an `image`")
    );
    let empty = PoolSpec {
        template: Some(json!({"spec": {"containers": []}})),
        image: None,
        ..image_pool()
    };
    assert!(
        pod::validate(&empty, None)
            .unwrap_err()
            .contains("no containers")
    );
    let garbage = PoolSpec {
        template: Some(json!({"spec": {"containers": "no"}})),
        image: None,
        ..image_pool()
    };
    assert!(
        pod::validate(&garbage, None)
            .unwrap_err()
            .contains("not a pod template")
    );
}

fn pod_with_status(status: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "arl-sb-1", "uid": "u1"},
        "spec": {"containers": [{"name": "sandbox", "image": "x"}]},
        "status": status,
    }))
    .expect("pod")
}

#[test]
fn pod_states_name_their_causes() {
    let pull = pod_with_status(json!({"phase": "Pending", "containerStatuses": [{
        "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "back-off pulling x"}}}]}));
    assert!(
        matches!(classify(&pull), PodState::Pending { problem: Some(p) } if p.reason == "ImagePullBackOff")
    );
    let unschedulable = pod_with_status(json!({"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available"}]}));
    assert!(
        matches!(classify(&unschedulable), PodState::Pending { problem: Some(p) } if p.reason == "Unschedulable")
    );
    let evicted = pod_with_status(json!({"phase": "Failed", "reason": "Evicted",
        "message": "The node was low on resource: memory."}));
    assert_eq!(
        classify(&evicted),
        PodState::Finished(
            ExitReason::Evicted,
            Some(super::state::Problem {
                reason: "Evicted".into(),
                message: "The node was low on resource: memory.".into()
            })
        )
    );
    let oom = pod_with_status(json!({"phase": "Failed", "containerStatuses": [{
        "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
    assert!(matches!(
        classify(&oom),
        PodState::Finished(ExitReason::OomKilled, _)
    ));
    let killed = pod_with_status(json!({"phase": "Running", "containerStatuses": [{
        "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}));
    assert!(matches!(
        classify(&killed),
        PodState::Finished(ExitReason::Killed { signal: 9 }, _)
    ));
    let running = pod_with_status(json!({"phase": "Running", "containerStatuses": [{
        "name": "sandbox", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
        "state": {"running": {}}}]}));
    assert_eq!(classify(&running), PodState::Running);
}

// ---- the fake API server ------------------------------------------------------------------

#[derive(Default)]
struct Fake {
    /// Pods by name, as stored.
    pods: BTreeMap<String, Value>,
    /// Secrets by name, as stored.
    secrets: BTreeMap<String, Value>,
    /// Every event so far: (resource version, type, object).
    events: Vec<(u64, &'static str, Value)>,
    version: u64,
    /// Answer the next watch with 410 Gone.
    expire_next_watch: bool,
    /// Requests seen: "METHOD path?query".
    seen: Vec<String>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

struct FakeApi {
    state: Arc<Mutex<Fake>>,
    /// Bumped on every new event (wakes held watches).
    bump: watch::Sender<u64>,
}

impl FakeApi {
    fn start() -> (Arc<Self>, Client) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Arc::new(Self {
            state: Arc::new(Mutex::new(Fake::default())),
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.state.lock().expect("fake state")
    }

    /// Stores a pod change and streams it to watchers.
    fn event(&self, kind: &'static str, mut pod: Value) {
        {
            let mut st = self.lock();
            st.version += 1;
            let v = st.version;
            pod["metadata"]["resourceVersion"] = json!(v.to_string());
            let name = pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if kind == "DELETED" {
                st.pods.remove(&name);
            } else {
                st.pods.insert(name, pod.clone());
            }
            st.events.push((v, kind, pod));
        }
        self.bump.send_modify(|n| *n += 1);
    }

    /// Marks a stored pod running (as its kubelet would).
    fn set_running(&self, name: &str) {
        let mut pod = self.lock().pods.get(name).cloned().expect("pod stored");
        pod["status"] = json!({"phase": "Running", "containerStatuses": [{
            "name": pod["spec"]["containers"][0]["name"], "image": "x", "imageID": "",
            "ready": true, "restartCount": 0, "state": {"running": {}}}]});
        self.event("MODIFIED", pod);
    }

    /// Marks a stored pod running with an IP.
    fn set_running_at(&self, name: &str, ip: &str) {
        let mut pod = self.lock().pods.get(name).cloned().expect("pod stored");
        pod["status"] = json!({"phase": "Running", "podIP": ip, "containerStatuses": [{
            "name": pod["spec"]["containers"][0]["name"], "image": "x", "imageID": "",
            "ready": true, "restartCount": 0, "state": {"running": {}}}]});
        self.event("MODIFIED", pod);
    }

    fn set_status(&self, name: &str, status: Value) {
        let mut pod = self.lock().pods.get(name).cloned().expect("pod stored");
        pod["status"] = status;
        self.event("MODIFIED", pod);
    }

    fn seen(&self) -> Vec<String> {
        self.lock().seen.clone()
    }

    async fn answer(&self, req: Request<Body>) -> (u16, Vec<u8>) {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let body = req.into_body().collect_bytes().await.expect("body");
        let path = uri.path().to_string();
        self.lock().seen.push(format!(
            "{method} {}",
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("")
        ));
        let collection = format!("/api/v1/namespaces/{NS}/pods");
        let json = |v: Value| serde_json::to_vec(&v).expect("json");
        if path == collection
            && method == Method::GET
            && query.get("watch").map(String::as_str) == Some("true")
        {
            let since: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return (200, self.watch_from(since).await);
        }
        if path == collection && method == Method::GET {
            let st = self.lock();
            let items: Vec<Value> = st.pods.values().cloned().collect();
            return (
                200,
                json(json!({"apiVersion": "v1", "kind": "PodList",
                            "metadata": {"resourceVersion": st.version.to_string()},
                            "items": items})),
            );
        }
        if path == collection && method == Method::POST {
            let mut pod: Value = serde_json::from_slice(&body).expect("pod body");
            let name = pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if self.lock().pods.contains_key(&name) {
                return (
                    409,
                    json(status(
                        409,
                        "AlreadyExists",
                        &format!("pods \"{name}\" already exists"),
                    )),
                );
            }
            pod["metadata"]["uid"] = json!(format!("uid-{name}"));
            pod["status"] = json!({"phase": "Pending"});
            self.event("ADDED", pod.clone());
            let stored = self.lock().pods.get(&name).cloned().expect("stored");
            return (201, json(stored));
        }
        if let Some(name) = path.strip_prefix(&format!("{collection}/")) {
            let name = name.to_string();
            let Some(pod) = self.lock().pods.get(&name).cloned() else {
                return (
                    404,
                    json(status(
                        404,
                        "NotFound",
                        &format!("pods \"{name}\" not found"),
                    )),
                );
            };
            if method == Method::DELETE {
                self.event("DELETED", pod.clone());
                return (200, json(pod));
            }
            return (200, json(pod));
        }
        let secrets = format!("/api/v1/namespaces/{NS}/secrets");
        if path == secrets && method == Method::GET {
            // As the API server lists metadata only: each `key=value` of the selector must hold.
            let selector = query.get("labelSelector").cloned().unwrap_or_default();
            let st = self.lock();
            let items: Vec<Value> = st
                .secrets
                .values()
                .filter(|s| {
                    selector.split(',').filter(|p| !p.is_empty()).all(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        s["metadata"]["labels"][k].as_str() == Some(v)
                    })
                })
                .map(|s| {
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                "metadata": s["metadata"].clone()})
                })
                .collect();
            return (
                200,
                json(
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                            "metadata": {"resourceVersion": st.version.to_string()},
                            "items": items}),
                ),
            );
        }
        if path == secrets && method == Method::POST {
            let mut secret: Value = serde_json::from_slice(&body).expect("secret body");
            let name = secret["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut st = self.lock();
            if st.secrets.contains_key(&name) {
                return (409, json(status(409, "AlreadyExists", "exists")));
            }
            secret["metadata"]["uid"] = json!(format!("uid-secret-{name}"));
            st.secrets.insert(name, secret.clone());
            return (201, json(secret));
        }
        if let Some(name) = path.strip_prefix(&format!("{secrets}/")) {
            let mut st = self.lock();
            let Some(secret) = st.secrets.get_mut(name) else {
                return (404, json(status(404, "NotFound", "no such secret")));
            };
            if method == Method::PATCH {
                let patch: Value = serde_json::from_slice(&body).expect("patch body");
                secret["metadata"]["ownerReferences"] =
                    patch["metadata"]["ownerReferences"].clone();
            }
            let answer = secret.clone();
            if method == Method::DELETE {
                st.secrets.remove(name);
            }
            return (200, json(answer));
        }
        (404, json(status(404, "NotFound", "no such path")))
    }

    /// The events after `since`, once there are some (or a 410 when asked to expire).
    async fn watch_from(&self, since: u64) -> Vec<u8> {
        let mut rx = self.bump.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let mut st = self.lock();
                if std::mem::take(&mut st.expire_next_watch) {
                    let line = json!({"type": "ERROR", "object": status(410, "Expired",
                        "too old resource version")});
                    return format!("{line}\n").into_bytes();
                }
                let lines: String = st
                    .events
                    .iter()
                    .filter(|(v, _, _)| *v > since)
                    .map(|(_, kind, object)| {
                        format!("{}\n", json!({"type": kind, "object": object}))
                    })
                    .collect();
                if !lines.is_empty() {
                    return lines.into_bytes();
                }
            }
            if rx.changed().await.is_err() {
                return Vec::new();
            }
        }
    }
}

/// A kubelet pod directory with the agent's socket listening for a pod uid.
struct PodsDir {
    root: PathBuf,
    _listeners: Mutex<Vec<std::os::unix::net::UnixListener>>,
}

impl PodsDir {
    fn new() -> Self {
        let root =
            std::env::temp_dir().join(format!("arl-kube-pods-{}", crate::util::random_id("")));
        std::fs::create_dir_all(&root).expect("pods dir");
        Self {
            root,
            _listeners: Mutex::new(Vec::new()),
        }
    }

    /// What the kubelet and the agent do for a running pod: the emptyDir and the socket.
    fn agent_listens(&self, uid: &str) {
        let dir = super::socket::run_dir(&self.root, uid);
        std::fs::create_dir_all(&dir).expect("emptyDir");
        let listener =
            std::os::unix::net::UnixListener::bind(dir.join("agent.sock")).expect("bind");
        self._listeners.lock().expect("listeners").push(listener);
    }
}

impl Drop for PodsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn runtime(client: Client, pods: &PodsDir) -> KubernetesRuntime {
    runtime_with(client, pods, ctx())
}

fn runtime_with(client: Client, pods: &PodsDir, ctx: PodContext) -> KubernetesRuntime {
    KubernetesRuntime::new(
        client,
        KubernetesConfig {
            pod: ctx,
            pods_dir: pods.root.clone(),
        },
    )
}

/// Bounded wait for a condition of the fake's state.
async fn until(what: &str, test: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !test() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn create_posts_the_pod_waits_for_running_and_reaches_the_agent_through_the_pod_dir() {
    let (api, client) = FakeApi::start();
    let pods = PodsDir::new();
    let rt = runtime(client, &pods);
    let spec = image_pool();
    let creating = rt.create("sb-1", &spec);
    let api2 = api.clone();
    let kubelet = async {
        until("the pod", || api2.lock().pods.contains_key("arl-sb-1")).await;
        pods.agent_listens("uid-arl-sb-1");
        api2.set_running("arl-sb-1");
    };
    let (created, ()) = tokio::join!(creating, kubelet);
    let created = created.expect("created");
    let AgentAddress::Unix(socket) = created.agent else {
        panic!("a Unix socket: {:?}", created.agent)
    };
    assert!(socket.starts_with("/proc/self/fd/"), "{}", socket.display());
    assert!(socket.as_os_str().len() < 108);
    std::os::unix::net::UnixStream::connect(&socket).expect("the agent's socket, through the fd");
    let posted = api.seen().iter().filter(|l| l.starts_with("POST")).count();
    assert_eq!(posted, 1);
    // The watch selects this node's pods with the owner labels.
    let watch = api
        .seen()
        .into_iter()
        .find(|l| l.contains("watch=true"))
        .expect("a watch");
    assert!(
        watch.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{watch}"
    );
    assert!(watch.contains("arl.infra.io%2Finstance%3Darl"), "{watch}");

    // Destroy deletes the pod; `exited` then says the daemon did it.
    rt.destroy("sb-1").await.expect("destroyed");
    assert_eq!(rt.exited("sb-1").await, ExitReason::Destroyed);
    assert!(
        api.seen()
            .iter()
            .any(|l| l.starts_with("DELETE") && l.contains("/pods/arl-sb-1"))
    );
    rt.destroy("sb-1")
        .await
        .expect("destroying twice is fine (404)");
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_creation_with_the_kubelets_reason() {
    let (api, client) = FakeApi::start();
    let pods = PodsDir::new();
    let rt = runtime(client, &pods);
    let spec = image_pool();
    let api2 = api.clone();
    let kubelet = async {
        until("the pod", || api2.lock().pods.contains_key("arl-sb-2")).await;
        api2.set_status(
            "arl-sb-2",
            json!({"phase": "Pending", "containerStatuses": [{
            "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}}]}),
        );
    };
    let (created, ()) = tokio::join!(rt.create("sb-2", &spec), kubelet);
    let err = created.expect_err("cannot start").to_string();
    assert!(err.contains("ErrImagePull: manifest unknown"), "{err}");
}

#[tokio::test]
async fn evicted_failed_and_vanished_pods_end_their_sandboxes_with_the_cause() {
    let (api, client) = FakeApi::start();
    let pods = PodsDir::new();
    let rt = runtime(client, &pods);
    let spec = image_pool();
    for id in ["sb-e", "sb-f", "sb-d"] {
        let name = pod::pod_name(id);
        let api2 = api.clone();
        let kubelet = async {
            until("the pod", || api2.lock().pods.contains_key(&name)).await;
            pods.agent_listens(&format!("uid-{name}"));
            api2.set_running(&name);
        };
        let (created, ()) = tokio::join!(rt.create(id, &spec), kubelet);
        created.expect("created");
    }
    api.set_status(
        "arl-sb-e",
        json!({"phase": "Failed", "reason": "Evicted", "message": "low memory"}),
    );
    assert_eq!(rt.exited("sb-e").await, ExitReason::Evicted);
    api.set_status(
        "arl-sb-f",
        json!({"phase": "Failed", "containerStatuses": [{
        "name": "sandbox", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 3}}}]}),
    );
    assert_eq!(rt.exited("sb-f").await, ExitReason::AgentExited { code: 3 });
    let pod = api.lock().pods.get("arl-sb-d").cloned().expect("pod");
    api.event("DELETED", pod);
    assert_eq!(rt.exited("sb-d").await, ExitReason::Deleted);
}

#[tokio::test]
async fn after_a_restart_own_pods_are_taken_back_and_strays_deleted_even_across_an_expired_watch() {
    let (api, client) = FakeApi::start();
    let pods = PodsDir::new();
    // What the predecessor left: two running pods of this daemon.
    for name in ["arl-sb-keep", "arl-sb-stray"] {
        api.event(
            "ADDED",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}")},
            "spec": {"nodeName": NODE, "containers": [{"name": "sandbox", "image": "x"}]}}),
        );
        api.set_running(name);
        pods.agent_listens(&format!("uid-{name}"));
    }
    api.lock().expire_next_watch = true;
    let rt = runtime(client, &pods);
    let created = rt
        .adopt("sb-keep", RuntimeKind::Kubernetes)
        .await
        .expect("taken back");
    let AgentAddress::Unix(socket) = created.agent else {
        panic!("a Unix socket: {:?}", created.agent)
    };
    std::os::unix::net::UnixStream::connect(&socket).expect("agent reachable");
    let err = rt
        .adopt("sb-gone", RuntimeKind::Kubernetes)
        .await
        .expect_err("no pod");
    assert!(err.to_string().contains("no pod arl-sb-gone"), "{err}");
    assert_eq!(rt.reclaim().await.expect("reclaim"), 1, "only the stray");
    let deletes: Vec<String> = api
        .seen()
        .into_iter()
        .filter(|l| l.starts_with("DELETE"))
        .collect();
    assert_eq!(deletes.len(), 1);
    assert!(deletes[0].contains("arl-sb-stray"), "{deletes:?}");
    // The expired watch (410) was answered by a fresh list; the runtime still follows events.
    until("a re-list", || {
        api.seen()
            .iter()
            .filter(|l| l.starts_with("GET") && !l.contains("watch=true"))
            .count()
            >= 2
    })
    .await;
    api.set_status(
        "arl-sb-keep",
        json!({"phase": "Failed", "reason": "Evicted"}),
    );
    assert_eq!(rt.exited("sb-keep").await, ExitReason::Evicted);
}

/// A daemon killed between creating a sandbox's token Secret and its pod leaves a Secret no
/// pod owns: its successor's sweep deletes it, keeps the Secret of a sandbox it took back, and
/// leaves another node's alone.
#[tokio::test]
async fn after_a_restart_token_secrets_no_sandbox_uses_are_deleted() {
    let (api, client) = FakeApi::start();
    let pods = PodsDir::new();
    let ctx = ctx();
    let token = AgentToken::generate();
    api.event(
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "arl-sb-keep", "namespace": NS, "uid": "uid-arl-sb-keep"},
        "spec": {"nodeName": NODE, "containers": [{"name": "sandbox", "image": "x"}]}}),
    );
    api.set_running("arl-sb-keep");
    pods.agent_listens("uid-arl-sb-keep");
    let other_node = PodContext {
        node_name: "node-b".into(),
        ..ctx.clone()
    };
    for (id, owner) in [
        ("sb-keep", &ctx),
        ("sb-orphan", &ctx),
        ("sb-b", &other_node),
    ] {
        let secret = serde_json::to_value(pod::secret(id, owner, &token)).expect("json");
        api.lock().secrets.insert(pod::pod_name(id), secret);
    }
    let rt = runtime_with(client, &pods, ctx);
    rt.adopt("sb-keep", RuntimeKind::Kubernetes)
        .await
        .expect("taken back");
    assert_eq!(rt.reclaim().await.expect("reclaim"), 0, "no stray pods");
    let left: Vec<String> = api.lock().secrets.keys().cloned().collect();
    assert_eq!(left, ["arl-sb-b", "arl-sb-keep"]);
}

#[tokio::test]
async fn over_tcp_the_token_goes_to_an_owned_secret_and_the_agent_is_reached_at_the_pod_ip() {
    let (api, client) = FakeApi::start();
    let pods = PodsDir::new();
    // The agent: something listening at the pod's IP and the daemon's agent port.
    let agent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = agent.local_addr().expect("addr").port();
    let rt = runtime_with(client.clone(), &pods, tcp_ctx(port));
    let spec = image_pool();
    let api2 = api.clone();
    let kubelet = async {
        until("the pod", || api2.lock().pods.contains_key("arl-sb-t")).await;
        // Running without an IP yet: the runtime waits for the IP.
        api2.set_running("arl-sb-t");
        api2.set_running_at("arl-sb-t", "127.0.0.1");
    };
    let (created, ()) = tokio::join!(rt.create("sb-t", &spec), kubelet);
    let created = created.expect("created");
    let AgentAddress::Tcp { addr, token } = created.agent.clone() else {
        panic!("a TCP address: {:?}", created.agent)
    };
    assert_eq!(addr, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(
        !format!("{:?}", created.agent).contains(token.expose()),
        "Debug never shows the token"
    );
    // The Secret first, then the pod, then the pod made the Secret's owner.
    let writes: Vec<String> = api
        .seen()
        .into_iter()
        .filter(|l| !l.starts_with("GET"))
        .map(|l| l.split('?').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        writes,
        vec![
            format!("POST /api/v1/namespaces/{NS}/secrets"),
            format!("POST /api/v1/namespaces/{NS}/pods"),
            format!("PATCH /api/v1/namespaces/{NS}/secrets/arl-sb-t"),
        ]
    );
    let secret = api.lock().secrets.get("arl-sb-t").cloned().expect("secret");
    let stored = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["token"].as_str().expect("token"))
            .expect("base64")
    };
    assert_eq!(stored, token.expose().as_bytes());
    assert_eq!(
        secret["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "arl-sb-t", "uid": "uid-arl-sb-t"}])
    );
    let pod = api.lock().pods.get("arl-sb-t").cloned().expect("pod");
    assert_eq!(
        pod["metadata"]["annotations"]["arl.infra.io/agent-port"],
        json!(port.to_string())
    );

    // A successor (this daemon restarted) takes the pod back with the Secret's token.
    let successor = runtime_with(client, &pods, tcp_ctx(port));
    let adopted = successor
        .adopt("sb-t", RuntimeKind::Kubernetes)
        .await
        .expect("taken back");
    assert_eq!(adopted.agent, AgentAddress::Tcp { addr, token });

    // Destroy deletes the pod; the Secret goes with it (its owner), no call of its own.
    rt.destroy("sb-t").await.expect("destroyed");
    assert!(
        !api.seen()
            .iter()
            .any(|l| l.starts_with("DELETE") && l.contains("/secrets/")),
        "{:?}",
        api.seen()
    );
    drop(agent);
}
