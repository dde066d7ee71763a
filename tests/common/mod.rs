//! Test harness: a real `arl node` (as root; process or containerd pools) on a free port with
//! its own state directory and cgroup parent, and a small HTTP client. Starting and stopping
//! the process is `node.rs`, shared with the benches.
#![allow(dead_code)]

mod node;

pub use node::{cgroup_roots, free_port};

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use arl::api::{
    AcquireRequest, ApiError, ErrorBody, ExecRequest, ExecResult, PoolStatus, PoolView,
    SandboxInfo, SandboxList,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub const BIN: &str = env!("CARGO_BIN_EXE_arl");

pub struct Daemon {
    pub port: u16,
    pub dir: tempdir::TempDir,
    pub cgroup_parent: String,
    pub token: Option<String>,
    pub runtime: Runtime,
    child: Option<Child>,
    config: Option<String>,
    args: Vec<String>,
    /// The address the daemon listens on.
    host: String,
}

/// A directory removed on drop.
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            let mut bytes = [0u8; 6];
            getrandom(&mut bytes);
            let path = std::env::temp_dir().join(format!("arl-test-{tag}-{}", hex(&bytes)));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            super::node::unmount_under(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub use super::node::random_bytes as getrandom;

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A response: its status and body, read as an `arl::api` model on demand.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    /// The body as text (for assertion messages).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body as a `T`; panics with the body when it is not one.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not a {}: {e}: {}",
                self.status,
                std::any::type_name::<T>(),
                self.text()
            )
        })
    }

    /// Asserts the status, then reads the body as a `T`.
    pub fn expect<T: DeserializeOwned>(&self, status: StatusCode) -> T {
        assert_eq!(self.status, status, "{}", self.text());
        self.json()
    }

    /// The `{"error": ...}` body; asserts that the status is the one its code maps to.
    pub fn error(&self) -> ApiError {
        let ErrorBody { error } = self.json();
        assert_eq!(
            self.status.as_u16(),
            error.status(),
            "status of {:?}: {}",
            error.code,
            self.text()
        );
        error
    }

    /// Asserts the status, then reads the `{"error": ...}` body.
    pub fn expect_error(&self, status: StatusCode) -> ApiError {
        assert_eq!(self.status, status, "{}", self.text());
        self.error()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.text())
    }
}

/// An exec of an argv (add fields with `ExecRequest { cwd: ..., ..cmd(&[...]) }`).
pub fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: Some(argv.iter().map(|a| a.to_string()).collect()),
        ..ExecRequest::default()
    }
}

/// An exec of a `/bin/sh -c` script.
pub fn shell(script: &str) -> ExecRequest {
    ExecRequest {
        shell: Some(script.into()),
        ..ExecRequest::default()
    }
}

/// An acquire from `pool` (add fields with `AcquireRequest { count: ..., ..acquire(pool) }`).
pub fn acquire(pool: &str) -> AcquireRequest {
    AcquireRequest {
        pool: pool.into(),
        ..AcquireRequest::default()
    }
}

/// `[(k, v)]` as the string map of env and labels.
pub fn map(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `{"type": ...}` lines of an NDJSON body, each as a `T`.
pub fn ndjson<T: DeserializeOwned>(body: &[u8]) -> Vec<T> {
    String::from_utf8_lossy(body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// What makes the sandboxes of a test's pools.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Runtime {
    /// Namespaces over the host's /usr and /etc.
    #[default]
    Process,
    /// Containers from the busybox test image (scripts/containerd.sh imports it).
    Containerd,
}

/// The test image of `containerd` pools.
pub const TEST_IMAGE: &str = "docker.io/arl/test:latest";

impl Runtime {
    /// The daemon config with every pool made by this runtime (the embedded `default` pool
    /// too, when the config names none).
    pub fn config(self, config: Option<String>) -> Option<String> {
        match self {
            Runtime::Process => config,
            Runtime::Containerd => {
                let config = config.unwrap_or_else(|| "[pools.default]\n".into());
                let mut out = String::new();
                for line in config.lines() {
                    out.push_str(line);
                    out.push('\n');
                    if line.trim_start().starts_with("[pools.") {
                        out.push_str(&format!(
                            "runtime = \"containerd\"\nimage = \"{TEST_IMAGE}\"\n"
                        ));
                    }
                }
                Some(out)
            }
        }
    }
}

/// Runs each named `async fn(Runtime)` as two tests, `on_process::name` and
/// `on_containerd::name`: the runtime-blind behaviour suite.
#[macro_export]
macro_rules! on_every_runtime {
    ($($name:ident),+ $(,)?) => {
        mod on_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Runtime::Process).await
                }
            )+
        }
        mod on_containerd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Runtime::Containerd).await
                }
            )+
        }
    };
}

#[derive(Default)]
pub struct Options {
    /// What makes the sandboxes.
    pub runtime: Runtime,
    /// TOML config (pools, ...).
    pub config: Option<String>,
    /// Tokens for the token file; the first is the client's default.
    pub tokens: Vec<String>,
    /// More `arl node` flags.
    pub args: Vec<String>,
}

impl Options {
    /// Default options on the given runtime.
    pub fn on(runtime: Runtime) -> Self {
        Self {
            runtime,
            ..Self::default()
        }
    }
}

impl Daemon {
    pub async fn start(opts: Options) -> Self {
        Self::start_on("127.0.0.1", opts).await
    }

    /// Starts a daemon listening on `host` (clients still connect over loopback).
    pub async fn start_on(host: &str, opts: Options) -> Self {
        let dir = tempdir::TempDir::new("node");
        let mut daemon = Self {
            port: free_port(),
            cgroup_parent: format!("arl-test-{}", node::random_hex(4)),
            token: opts.tokens.first().cloned(),
            dir,
            runtime: opts.runtime,
            child: None,
            config: opts.runtime.config(opts.config),
            args: opts.args,
            host: host.to_string(),
        };
        if !opts.tokens.is_empty() {
            std::fs::write(daemon.dir.path().join("tokens"), opts.tokens.join("\n"))
                .expect("token file");
        }
        if let Some(config) = &daemon.config {
            std::fs::write(daemon.dir.path().join("config.toml"), config).expect("config file");
        }
        daemon.spawn().await;
        daemon
    }

    /// Runs `script` in sandbox `id` from another task, so that the test can act while it
    /// runs (a drain, a restart).
    pub fn exec_in_background(&self, id: &str, script: &str) -> tokio::task::JoinHandle<Reply> {
        let (port, path, req) = (self.port, format!("/v1/sandboxes/{id}/exec"), shell(script));
        tokio::spawn(async move {
            Daemon::attach(port)
                .send(Method::POST, &path, Some(&req))
                .await
        })
    }

    /// A client of a daemon started elsewhere (for requests from other tasks); it starts and
    /// stops nothing.
    pub fn attach(port: u16) -> Self {
        Self {
            port,
            dir: tempdir::TempDir::new("client"),
            cgroup_parent: String::new(),
            token: None,
            runtime: Runtime::default(),
            child: None,
            config: None,
            args: Vec::new(),
            host: "127.0.0.1".into(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn command(&self) -> node::NodeCommand {
        let dir = self.dir.path();
        node::NodeCommand {
            bin: PathBuf::from(BIN),
            listen: format!("{}:{}", self.host, self.port),
            state_dir: self.state_dir(),
            cgroup_parent: self.cgroup_parent.clone(),
            config: self.config.is_some().then(|| dir.join("config.toml")),
            token_file: self.token.is_some().then(|| dir.join("tokens")),
            log: dir.join("node.log"),
            log_filter: "warn".into(),
            args: self.args.clone(),
        }
    }

    /// (Re)starts the daemon process and waits until it is ready.
    pub async fn spawn(&mut self) {
        self.child = Some(self.command().spawn().expect("start arl node"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((StatusCode::OK, _)) =
                self.request_raw(Method::GET, "/healthz", None, None).await
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("arl node exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "arl node not ready: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        self.command().read_log()
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        match node::terminate(&mut child, Duration::from_secs(30)) {
            node::Stopped::Exited(code) => code,
            node::Stopped::Killed => None,
        }
    }

    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Bytes), String> {
        self.request_with(method, path, body, token, &[]).await
    }

    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), String> {
        request(self.port, method, path, body, token, headers).await
    }

    /// A request with the default token and an optional JSON body.
    pub async fn send<B: Serialize>(&self, method: Method, path: &str, body: Option<&B>) -> Reply {
        self.send_as(self.token.as_deref(), method, path, body)
            .await
    }

    /// A request with `token` and an optional JSON body.
    pub async fn send_as<B: Serialize>(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Reply {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("json")));
        let (status, body) = self
            .request_raw(method, path, body, token)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        Reply { status, body }
    }

    /// A request without a body.
    pub async fn send_empty(&self, method: Method, path: &str) -> Reply {
        self.send::<()>(method, path, None).await
    }

    /// `GET path`: asserts 200 and reads the body as a `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> T {
        self.send_empty(Method::GET, path)
            .await
            .expect(StatusCode::OK)
    }

    /// `POST path` with a JSON body: asserts `status` and reads the answer as a `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        status: StatusCode,
    ) -> T {
        self.send(Method::POST, path, Some(body))
            .await
            .expect(status)
    }

    /// `POST /v1/sandboxes`: the sandboxes acquired (asserts 201).
    pub async fn acquire_with(&self, req: &AcquireRequest) -> Vec<SandboxInfo> {
        let list: SandboxList = self.post("/v1/sandboxes", req, StatusCode::CREATED).await;
        list.sandboxes
    }

    /// One sandbox from `pool`: its id.
    pub async fn acquire(&self, pool: &str) -> String {
        let mut sandboxes = self.acquire_with(&acquire(pool)).await;
        assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
        sandboxes.remove(0).id
    }

    /// `POST /v1/sandboxes/{id}/{action}` (`reset`, `pause`, `resume`).
    pub async fn action(&self, id: &str, action: &str) -> Reply {
        self.send_empty(Method::POST, &format!("/v1/sandboxes/{id}/{action}"))
            .await
    }

    /// `DELETE /v1/sandboxes/{id}`: the release's status.
    pub async fn release(&self, id: &str) -> StatusCode {
        self.send_empty(Method::DELETE, &format!("/v1/sandboxes/{id}"))
            .await
            .status
    }

    /// `PUT /v1/sandboxes/{id}/files?path=…`: the status.
    pub async fn put_file(&self, id: &str, path: &str, data: &'static [u8]) -> StatusCode {
        self.request_raw(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path={path}"),
            Some(Bytes::from_static(data)),
            None,
        )
        .await
        .map(|(status, _)| status)
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
    }

    /// `POST /v1/sandboxes/{id}/exec`: the result (asserts 200).
    pub async fn run(&self, id: &str, req: &ExecRequest) -> ExecResult {
        self.post(&format!("/v1/sandboxes/{id}/exec"), req, StatusCode::OK)
            .await
    }

    /// A `/bin/sh -c` exec: the result (asserts 200).
    pub async fn shell(&self, id: &str, script: &str) -> ExecResult {
        self.run(id, &shell(script)).await
    }

    /// `GET /v1/pools/{pool}`: its status.
    pub async fn status(&self, pool: &str) -> PoolStatus {
        self.get::<PoolView>(&format!("/v1/pools/{pool}"))
            .await
            .status
    }

    /// Polls until `pred` holds for the pool's status, up to `secs`.
    pub async fn wait_status(
        &self,
        pool: &str,
        secs: u64,
        pred: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let status = self.status(pool).await;
            if pred(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pool {pool} never reached the state; last {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics_text(&self) -> String {
        let (_, bytes) = self
            .request_raw(Method::GET, "/metrics", None, None)
            .await
            .expect("metrics");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The host pid of a sandbox's agent.
    pub fn agent_pid(&self, id: &str) -> i32 {
        if self.runtime == Runtime::Containerd {
            // The task's pid is the agent's.
            let tasks = ctr(&["tasks", "ls"]);
            return task_pid(&tasks, id).unwrap_or_else(|| panic!("no task {id} in {tasks}"));
        }
        let meta = std::fs::read(
            self.state_dir()
                .join("sandboxes")
                .join(id)
                .join("meta.json"),
        )
        .expect("meta.json");
        /// The part of the process runtime's `meta.json` read here.
        #[derive(serde::Deserialize)]
        struct Meta {
            pid: i32,
        }
        let meta: Meta = serde_json::from_slice(&meta).expect("meta");
        meta.pid
    }

    /// Sandbox directories and cgroups that exist for this daemon.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for dir in ["sandboxes", "containerd"] {
            if let Ok(entries) = std::fs::read_dir(self.state_dir().join(dir)) {
                for e in entries.flatten() {
                    found.push(format!("dir {}", e.path().display()));
                }
            }
        }
        if self.runtime == Runtime::Containerd {
            // Containers, snapshots and leases carry the daemon's owner label: a hash of its
            // canonical state directory.
            use sha2::Digest;
            let state = std::fs::canonicalize(self.state_dir()).unwrap_or(self.state_dir());
            let owner =
                hex::encode(&sha2::Sha256::digest(state.as_os_str().as_encoded_bytes())[..8]);
            let filter = format!("labels.\"arl.owner\"=={owner}");
            for (what, args) in [
                ("container", &["containers", "ls", "-q", &filter][..]),
                ("lease", &["leases", "ls", "-q", &filter][..]),
            ] {
                for line in ctr(args).lines().filter(|l| !l.is_empty()) {
                    found.push(format!("{what} {line}"));
                }
            }
        }
        for hierarchy in cgroup_roots() {
            if let Ok(entries) = std::fs::read_dir(hierarchy.join(&self.cgroup_parent)) {
                for e in entries.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        found.push(format!("cgroup {}", e.path().display()));
                    }
                }
            }
        }
        found
    }
}

/// One HTTP request to the daemon on `port` (for tasks that do not hold the `Daemon`).
pub async fn request(
    port: u16,
    method: Method,
    path: &str,
    body: Option<Bytes>,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        builder = builder.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

/// An exec on the daemon at `port` with no token; the result (panics unless 200).
pub async fn exec_on(port: u16, id: &str, req: &ExecRequest) -> ExecResult {
    let body = Bytes::from(serde_json::to_vec(req).expect("json"));
    let (status, bytes) = request(
        port,
        Method::POST,
        &format!("/v1/sandboxes/{id}/exec"),
        Some(body),
        None,
        &[],
    )
    .await
    .expect("exec request");
    Reply {
        status,
        body: bytes,
    }
    .expect(StatusCode::OK)
}

/// `ctr -n arl <args>` stdout.
pub fn ctr(args: &[&str]) -> String {
    let out = Command::new("ctr")
        .args(["-n", "arl"])
        .args(args)
        .output()
        .expect("run ctr (scripts/containerd.sh installs it)");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A task's pid in the output of `ctr tasks ls` (TASK PID STATUS).
pub fn task_pid(tasks: &str, id: &str) -> Option<i32> {
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

pub fn alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; check its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .map(|zombie| !zombie)
        .unwrap_or(false)
}

pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        node::clear_cgroup_parent(&self.cgroup_parent);
    }
}
