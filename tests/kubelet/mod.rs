//! A test kubelet: a small real HTTP server that plays the Kubernetes API server (pods,
//! WarmPoolShards, and empty collections of Sandboxes and Tasks, in one namespace: list,
//! streamed watch, create, delete, status patch) and the kubelet of one node. For each Pod the
//! daemon creates, it starts the real agent as a process sandbox (`arl sandbox-init`:
//! namespaces, an overlay root, private `/workspace`) whose socket lies where the kubelet keeps
//! the pod's `arl-run` emptyDir (`<pods dir>/<uid>/volumes/kubernetes.io~empty-dir/arl-run/agent.sock`),
//! then reports the Pod `Running`. When an agent dies the Pod turns `Failed` with its exit
//! status; a deleted Pod's agent is killed. Every request is counted, so tests can show the
//! hot path sends none.
//!
//! Over the TCP transport (`start_tcp`) each pod gets an IP of its own on the loopback network
//! (`127.0.0.N`), the agent is started (still as a process sandbox, in the host's network) as
//! its pod spec says: listening on `$(ARL_POD_IP):<port>`, with the token the kubelet reads
//! from the pod's Secret (`secretKeyRef`; a missing Secret keeps the pod `Pending`,
//! `CreateContainerConfigError`). Secrets are kept (create, get, merge patch, delete), and the
//! garbage collector's part is played: deleting a pod deletes the Secrets it owns.
//!
//! Objects are stored as the JSON an API server keeps (`serde_json::Value`), not as typed
//! Kubernetes structs: the server must hold and replay whatever the daemon sends, fields it
//! does not know included, as a real one does.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub const NAMESPACE: &str = "arl-sandboxes";
pub const NODE: &str = "test-node";
/// Images whose name starts so cannot be pulled (the pod stays `Pending`, `ErrImagePull`).
pub const UNPULLABLE: &str = "unpullable.example/";
const SHARDS: &str = "/apis/arl.infra.io/v1alpha1/namespaces/arl-sandboxes/warmpoolshards";
const PODS: &str = "/api/v1/namespaces/arl-sandboxes/pods";
const NODES: &str = "/api/v1/nodes";
const SECRETS: &str = "/api/v1/namespaces/arl-sandboxes/secrets";
/// Declarative Sandboxes and Tasks: none in these tests, but the daemon lists and watches them.
const SANDBOXES: &str = "/apis/arl.infra.io/v1alpha1/namespaces/arl-sandboxes/sandboxes";
const TASKS: &str = "/apis/arl.infra.io/v1alpha1/namespaces/arl-sandboxes/tasks";

/// The kinds of object the server keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pods,
    Shards,
    Nodes,
    Sandboxes,
    Tasks,
}

impl Kind {
    fn of(path: &str) -> Option<Self> {
        match path {
            PODS => Some(Self::Pods),
            SHARDS => Some(Self::Shards),
            NODES => Some(Self::Nodes),
            SANDBOXES => Some(Self::Sandboxes),
            TASKS => Some(Self::Tasks),
            _ => None,
        }
    }

    fn list(self) -> (&'static str, &'static str) {
        match self {
            Self::Pods => ("v1", "PodList"),
            Self::Shards => ("arl.infra.io/v1alpha1", "WarmPoolShardList"),
            Self::Nodes => ("v1", "NodeList"),
            Self::Sandboxes => ("arl.infra.io/v1alpha1", "SandboxList"),
            Self::Tasks => ("arl.infra.io/v1alpha1", "TaskList"),
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// One kind of object: stored objects, their events, and the open watches.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    events: Vec<(u64, String)>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
}

/// A request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }
}

#[derive(Default)]
struct State {
    version: u64,
    pods: Collection,
    shards: Collection,
    nodes: Collection,
    /// Secrets by name (no watch).
    secrets: BTreeMap<String, Value>,
    sandboxes: Collection,
    tasks: Collection,
    /// The agent pid of each running pod.
    agents: BTreeMap<String, i32>,
    seen: Vec<Seen>,
    next_slot: u32,
}

pub struct TestKubelet {
    pub port: u16,
    pub pods_dir: PathBuf,
    /// The kubeconfig pointing at this server.
    pub kubeconfig: PathBuf,
    root: PathBuf,
    state: Mutex<State>,
    bin: String,
    /// The port agents listen on at their pod's IP, over the TCP transport.
    pub agent_port: Option<u16>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn full(v: &Value) -> Body {
    Full::new(Bytes::from(serde_json::to_vec(v).expect("json"))).boxed()
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

impl State {
    fn collection(&mut self, kind: Kind) -> &mut Collection {
        match kind {
            Kind::Pods => &mut self.pods,
            Kind::Shards => &mut self.shards,
            Kind::Nodes => &mut self.nodes,
            Kind::Sandboxes => &mut self.sandboxes,
            Kind::Tasks => &mut self.tasks,
        }
    }
}

impl TestKubelet {
    /// Starts the server (on the calling Tokio runtime) and makes this process the reaper of
    /// the agents it starts.
    pub async fn start(bin: &str) -> Running {
        Running(Self::start_with(bin, None).await)
    }

    /// Starts a kubelet whose pods the daemon reaches over TCP at their IP (`node_args_tcp`).
    pub async fn start_tcp(bin: &str) -> Running {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        Running(Self::start_with(bin, Some(port)).await)
    }

    async fn start_with(bin: &str, agent_port: Option<u16>) -> Arc<Self> {
        // SAFETY: prctl(2) on this process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let mut random = [0u8; 6];
        // SAFETY: getrandom(2) into our buffer.
        unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
        let tag: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let root = std::env::temp_dir().join(format!("arl-test-kubelet-{tag}"));
        let pods_dir = root.join("pods");
        std::fs::create_dir_all(&pods_dir).expect("pods dir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {NAMESPACE}\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: test-token\n"
            ),
        )
        .expect("kubeconfig");
        let kubelet = Arc::new(Self {
            port,
            pods_dir,
            kubeconfig,
            root,
            state: Mutex::new(State::default()),
            bin: bin.to_string(),
            agent_port,
        });
        kubelet.set_unschedulable(false);
        let server = kubelet.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        kubelet
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("kubelet state")
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Waits until the daemon watches every collection it follows (so that nothing of its
    /// start-up lands in a window a test measures); fails the test after `secs`.
    pub async fn wait_watching(&self, secs: u64) {
        let deadline = Instant::now() + std::time::Duration::from_secs(secs);
        let watched = |path: &str| {
            self.lock()
                .seen
                .iter()
                .any(|s| s.path == path && s.query.contains("watch=true"))
        };
        while ![PODS, SHARDS, NODES, SANDBOXES, TASKS]
            .iter()
            .all(|p| watched(p))
        {
            assert!(
                Instant::now() < deadline,
                "the daemon never watched everything"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// How many requests so far.
    pub fn requests(&self) -> usize {
        self.lock().seen.len()
    }

    /// Names of the pods that exist.
    pub fn pods(&self) -> Vec<String> {
        self.lock().pods.objects.keys().cloned().collect()
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        self.lock().pods.objects.get(name).cloned()
    }

    /// Names of the running pods.
    pub fn running_pods(&self) -> Vec<String> {
        self.lock()
            .pods
            .objects
            .iter()
            .filter(|(_, p)| p["status"]["phase"] == "Running")
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn agent_pid(&self, pod: &str) -> Option<i32> {
        self.lock().agents.get(pod).copied()
    }

    pub fn secret(&self, name: &str) -> Option<Value> {
        self.lock().secrets.get(name).cloned()
    }

    pub fn secrets(&self) -> Vec<String> {
        self.lock().secrets.keys().cloned().collect()
    }

    pub fn shard(&self, name: &str) -> Option<Value> {
        self.lock().shards.objects.get(name).cloned()
    }

    /// Stores (creates or replaces) a WarmPoolShard, as the operator would.
    pub fn put_shard(&self, shard: Value) {
        let mut st = self.lock();
        let name = shard["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let kind = if st.shards.objects.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let mut shard = shard;
        if let Some(old) = st.shards.objects.get(&name)
            && shard.get("status").is_none()
        {
            shard["status"] = old["status"].clone();
        }
        Self::store(&mut st, Kind::Shards, kind, shard);
    }

    /// The node's `spec.unschedulable`, as `kubectl cordon` / `uncordon` set it.
    pub fn set_unschedulable(&self, unschedulable: bool) {
        let node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "uid": "uid-node"},
            "spec": {"unschedulable": unschedulable}});
        let mut st = self.lock();
        let kind = if st.nodes.objects.is_empty() {
            "ADDED"
        } else {
            "MODIFIED"
        };
        Self::store(&mut st, Kind::Nodes, kind, node);
    }

    /// Deletes a WarmPoolShard.
    pub fn delete_shard(&self, name: &str) {
        let mut st = self.lock();
        if let Some(shard) = st.shards.objects.get(name).cloned() {
            Self::store(&mut st, Kind::Shards, "DELETED", shard);
        }
    }

    /// Records a change and streams it to the watches of its collection.
    fn store(st: &mut State, which: Kind, kind: &str, mut object: Value) -> Value {
        st.version += 1;
        let version = st.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let collection = st.collection(which);
        if kind == "DELETED" {
            collection.objects.remove(&name);
        } else {
            collection.objects.insert(name, object.clone());
        }
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        collection.events.push((version, line.clone()));
        collection
            .watchers
            .retain(|w| w.send(Bytes::from(line.clone())).is_ok());
        object
    }

    /// Kills a pod's agent from outside (as an OOM kill or a crash would); the kubelet then
    /// reports the pod failed.
    pub fn kill_agent(&self, pod: &str) {
        let pid = self.agent_pid(pod).expect("a running pod");
        // SAFETY: kill(2) on a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    /// Deletes a pod as someone else would (`kubectl delete pod`).
    pub fn delete_pod(&self, pod: &str) {
        self.remove_pod(pod);
    }

    fn remove_pod(&self, name: &str) -> Option<Value> {
        let (pod, pid) = {
            let mut st = self.lock();
            let pod = st.pods.objects.get(name).cloned()?;
            let pid = st.agents.remove(name);
            Self::store(&mut st, Kind::Pods, "DELETED", pod.clone());
            // The garbage collector: what the pod owned goes with it.
            let uid = pod["metadata"]["uid"].clone();
            st.secrets.retain(|_, secret| {
                !secret["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|owner| owner["kind"] == "Pod" && owner["uid"] == uid)
            });
            (pod, pid)
        };
        if let Some(pid) = pid {
            // SAFETY: kill(2) on a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(uid) = pod["metadata"]["uid"].as_str() {
            let _ = std::fs::remove_dir_all(self.pods_dir.join(uid));
        }
        Some(pod)
    }

    async fn answer(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let params: BTreeMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        self.lock().seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
            at: Instant::now(),
        });
        let (code, reply) = match (path.as_str(), &method) {
            (_, &Method::GET) if Kind::of(&path).is_some() => {
                let which = Kind::of(&path).expect("a collection");
                if params.get("watch").map(String::as_str) == Some("true") {
                    let since = params
                        .get("resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    return self.watch(which, since);
                }
                let mut st = self.lock();
                let version = st.version.to_string();
                let items: Vec<Value> = st.collection(which).objects.values().cloned().collect();
                let (api_version, kind) = which.list();
                (
                    200,
                    json!({"apiVersion": api_version, "kind": kind,
                           "metadata": {"resourceVersion": version}, "items": items}),
                )
            }
            (PODS, &Method::POST) => self.create_pod(body),
            (SECRETS, &Method::POST) => self.create_secret(body),
            _ => {
                if let Some(name) = path.strip_prefix(&format!("{SECRETS}/")) {
                    self.secret_item(&method, name, &body)
                } else if let Some(name) = path.strip_prefix(&format!("{PODS}/")) {
                    self.pod_item(&method, name)
                } else if let Some(rest) = path.strip_prefix(&format!("{SHARDS}/")) {
                    self.shard_item(&method, rest, &body)
                } else {
                    (404, status(404, "NotFound", &format!("{path} not found")))
                }
            }
        };
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(full(&reply))
            .expect("response")
    }

    /// A streamed watch: the events after `since`, then each new one as it happens.
    fn watch(&self, which: Kind, since: u64) -> Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        {
            let mut st = self.lock();
            let collection = st.collection(which);
            for (version, line) in &collection.events {
                if *version > since {
                    let _ = tx.send(Bytes::from(line.clone()));
                }
            }
            collection.watchers.push(tx);
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("response")
    }

    fn create_pod(self: &Arc<Self>, mut pod: Value) -> (u16, Value) {
        let Some(name) = pod["metadata"]["name"].as_str().map(str::to_string) else {
            return (422, status(422, "Invalid", "metadata.name: Required value"));
        };
        let stored = {
            let mut st = self.lock();
            if st.pods.objects.contains_key(&name) {
                return (
                    409,
                    status(
                        409,
                        "AlreadyExists",
                        &format!("pods \"{name}\" already exists"),
                    ),
                );
            }
            st.next_slot += 1;
            let slot = st.next_slot;
            let mut random = [0u8; 6];
            // SAFETY: getrandom(2) into our buffer.
            unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
            let tail: String = random.iter().map(|b| format!("{b:02x}")).collect();
            pod["metadata"]["uid"] = json!(format!("{slot:08x}-0000-4000-8000-{tail}"));
            pod["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
            pod["status"] = json!({"phase": "Pending"});
            let stored = Self::store(&mut st, Kind::Pods, "ADDED", pod);
            (stored, slot)
        };
        let (pod, slot) = stored;
        let kubelet = self.clone();
        let started = pod.clone();
        std::thread::spawn(move || kubelet.run_pod(started, slot));
        (201, pod)
    }

    fn create_secret(&self, mut secret: Value) -> (u16, Value) {
        let Some(name) = secret["metadata"]["name"].as_str().map(str::to_string) else {
            return (422, status(422, "Invalid", "metadata.name: Required value"));
        };
        let mut st = self.lock();
        if st.secrets.contains_key(&name) {
            return (
                409,
                status(
                    409,
                    "AlreadyExists",
                    &format!("secrets \"{name}\" already exists"),
                ),
            );
        }
        st.version += 1;
        secret["metadata"]["uid"] = json!(format!("uid-secret-{}", st.version));
        secret["metadata"]["resourceVersion"] = json!(st.version.to_string());
        st.secrets.insert(name, secret.clone());
        (201, secret)
    }

    fn secret_item(&self, method: &Method, name: &str, patch: &Value) -> (u16, Value) {
        let mut st = self.lock();
        let Some(secret) = st.secrets.get_mut(name) else {
            return (
                404,
                status(404, "NotFound", &format!("secrets \"{name}\" not found")),
            );
        };
        match *method {
            Method::GET => (200, secret.clone()),
            Method::PATCH => {
                merge(secret, patch);
                (200, secret.clone())
            }
            Method::DELETE => {
                let secret = secret.clone();
                st.secrets.remove(name);
                (200, secret)
            }
            _ => (405, status(405, "MethodNotAllowed", "not here")),
        }
    }

    /// What the kubelet makes of the agent container's spec over TCP: the pod's IP, the
    /// address the agent is told to listen on (`$(VAR)` expanded from its env) and its token
    /// (from the Secret its env names); an error is the kubelet's waiting reason.
    fn tcp_agent(&self, pod: &Value, slot: u32) -> Result<(String, String, String), String> {
        let ip = format!("127.0.0.{}", 2 + slot % 250);
        let container = &pod["spec"]["containers"][0];
        let mut env = BTreeMap::new();
        let mut token = None;
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_string();
            let from = &var["valueFrom"];
            let value = if let Some(field) = from["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "status.podIP" => ip.clone(),
                    other => return Err(format!("unsupported fieldRef {other}")),
                }
            } else if let Some(secret) = from["secretKeyRef"]["name"].as_str() {
                let key = from["secretKeyRef"]["key"].as_str().unwrap_or_default();
                let data = self
                    .secret(secret)
                    .and_then(|s| s["data"][key].as_str().map(str::to_string))
                    .ok_or_else(|| format!("secret \"{secret}\" not found"))?;
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(|e| format!("secret {secret}: {e}"))?;
                String::from_utf8(bytes).map_err(|e| format!("secret {secret}: {e}"))?
            } else {
                var["value"].as_str().unwrap_or_default().to_string()
            };
            if name == "ARL_AGENT_TOKEN" {
                token = Some(value.clone());
            }
            env.insert(name, value);
        }
        let command: Vec<&str> = container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let listen = command
            .iter()
            .position(|a| *a == "--listen-tcp")
            .and_then(|i| command.get(i + 1))
            .ok_or("the agent is not told to listen on TCP")?;
        let mut listen = listen.to_string();
        for (name, value) in &env {
            listen = listen.replace(&format!("$({name})"), value);
        }
        let token = token.ok_or("no ARL_AGENT_TOKEN in the agent's env")?;
        Ok((ip, listen, token))
    }

    /// The kubelet's part: the emptyDir, the agent as a process sandbox, `Running`; then the
    /// agent's exit turns the pod `Failed`.
    fn run_pod(self: Arc<Self>, pod: Value, slot: u32) {
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let container = pod["spec"]["containers"][0]["name"].clone();
        let image = pod["spec"]["containers"][0]["image"].as_str().unwrap_or("");
        if image.starts_with(UNPULLABLE) {
            self.set_status(
                &name,
                json!({"phase": "Pending", "containerStatuses": [{"name": container, "image": image,
                    "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {
                    "reason": "ErrImagePull", "message": format!("pull {image}: not found")}}}]}),
            );
            return;
        }
        let dir = self
            .pods_dir
            .join(&uid)
            .join("volumes/kubernetes.io~empty-dir/arl-run");
        std::fs::create_dir_all(&dir).expect("emptyDir");
        // The socket is bound relative to the emptyDir: its full path, like a real kubelet's,
        // is longer than a socket path may be.
        let mut config = json!({
            "id": name, "dir": dir, "socket": "agent.sock", "cgroup_procs": [],
            "uid_base": (1u32 << 31) + slot * 65536, "id_count": 65536, "disk_mb": 64,
            "network": "none", "rootfs": null, "memory_events": null,
        });
        let mut command = std::process::Command::new(&self.bin);
        let mut pod_ip = None;
        if self.agent_port.is_some() {
            match self.tcp_agent(&pod, slot) {
                Ok((ip, listen, token)) => {
                    config["network"] = json!("host");
                    config["listen_tcp"] = json!(listen);
                    command.env("ARL_AGENT_TOKEN", token);
                    pod_ip = Some(ip);
                }
                Err(message) => {
                    self.set_status(
                        &name,
                        json!({"phase": "Pending", "containerStatuses": [{"name": container,
                            "image": image, "imageID": "", "ready": false, "restartCount": 0,
                            "state": {"waiting": {"reason": "CreateContainerConfigError",
                            "message": message}}}]}),
                    );
                    return;
                }
            }
        }
        let out = command
            .current_dir(&dir)
            .arg("sandbox-init")
            .arg(config.to_string())
            .output()
            .expect("run sandbox-init");
        let pid: Option<i32> = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
        let Some(pid) = pid.filter(|_| out.status.success()) else {
            let message = String::from_utf8_lossy(&out.stderr).to_string();
            self.set_status(
                &name,
                json!({"phase": "Failed", "reason": "StartError", "message": message}),
            );
            return;
        };
        {
            let mut st = self.lock();
            if !st.pods.objects.contains_key(&name) {
                drop(st);
                // SAFETY: kill(2) on the agent this thread started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = nix_wait(pid);
                return;
            }
            st.agents.insert(name.clone(), pid);
        }
        let mut running = json!({"phase": "Running", "containerStatuses": [{"name": container,
            "image": "x", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {}}}]});
        if let Some(ip) = pod_ip {
            running["podIP"] = json!(ip);
        }
        self.set_status(&name, running);
        let code = nix_wait(pid);
        // A pod deleted meanwhile is gone already; else the agent died on its own.
        let still_ours = self.lock().agents.remove(&name).is_some();
        if still_ours {
            self.set_status(
                &name,
                json!({"phase": "Failed", "containerStatuses": [{"name": container, "image": "x",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": code}}}]}),
            );
        }
    }

    fn set_status(&self, name: &str, status: Value) {
        let mut st = self.lock();
        let Some(mut pod) = st.pods.objects.get(name).cloned() else {
            return;
        };
        pod["status"] = status;
        Self::store(&mut st, Kind::Pods, "MODIFIED", pod);
    }

    fn pod_item(&self, method: &Method, name: &str) -> (u16, Value) {
        let not_found = || {
            (
                404,
                status(404, "NotFound", &format!("pods \"{name}\" not found")),
            )
        };
        match *method {
            Method::GET => match self.pod(name) {
                Some(pod) => (200, pod),
                None => not_found(),
            },
            Method::DELETE => match self.remove_pod(name) {
                Some(pod) => (200, pod),
                None => not_found(),
            },
            _ => (405, status(405, "MethodNotAllowed", "not here")),
        }
    }

    fn shard_item(&self, method: &Method, rest: &str, patch: &Value) -> (u16, Value) {
        let (name, sub) = match rest.split_once('/') {
            Some((n, s)) => (n, Some(s)),
            None => (rest, None),
        };
        let mut st = self.lock();
        let Some(mut shard) = st.shards.objects.get(name).cloned() else {
            return (
                404,
                status(
                    404,
                    "NotFound",
                    &format!("warmpoolshards \"{name}\" not found"),
                ),
            );
        };
        match (method, sub) {
            (&Method::GET, _) => (200, shard),
            (&Method::PATCH, Some("status")) => {
                if let Some(status) = patch.get("status") {
                    merge(
                        shard
                            .as_object_mut()
                            .map(|o| o.entry("status").or_insert(json!({})))
                            .expect("object"),
                        status,
                    );
                }
                let stored = Self::store(&mut st, Kind::Shards, "MODIFIED", shard);
                (200, stored)
            }
            _ => (405, status(405, "MethodNotAllowed", "not here")),
        }
    }

    /// Waits (bounded) until `test` holds.
    pub async fn until(&self, what: &str, secs: u64, test: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !test(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reaps an agent (this process is its subreaper); its exit status as a container's.
fn nix_wait(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid(2) on a child of this process.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return 255;
    }
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// A started kubelet, as the test holds it. Its server and each pod's thread hold the kubelet
/// too (a pod's thread until its agent exits), so the pods' agents are killed when the test's
/// handle goes, not when the last reference does (that would never come).
pub struct Running(Arc<TestKubelet>);

impl std::ops::Deref for Running {
    type Target = TestKubelet;

    fn deref(&self) -> &TestKubelet {
        &self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pids: Vec<i32> = self.lock().agents.values().copied().collect();
        for pid in pids {
            // SAFETY: kill(2) on agents this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The daemon flags that point `arl node --kubernetes` at this kubelet.
pub fn node_args(kubelet: &TestKubelet) -> Vec<String> {
    vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubelet.kubeconfig.display().to_string(),
        "--node-name".into(),
        NODE.into(),
        "--kubelet-pods-dir".into(),
        kubelet.pods_dir.display().to_string(),
        "--sandbox-namespace".into(),
        NAMESPACE.into(),
    ]
}

/// The daemon flags that point `arl node --kubernetes` at this kubelet, its pods' agents
/// reached over TCP at their IPs.
pub fn node_args_tcp(kubelet: &TestKubelet) -> Vec<String> {
    let mut args = node_args(kubelet);
    args.extend([
        "--agent-transport".into(),
        "tcp".into(),
        "--agent-port".into(),
        kubelet.agent_port.expect("a TCP kubelet").to_string(),
    ]);
    args
}

/// Whether a path exists (for readable assertions).
pub fn exists(path: &Path) -> bool {
    path.exists()
}
