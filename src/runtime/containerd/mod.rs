//! The `containerd` runtime: a sandbox is a container made from an image in containerd's store
//! (namespace `arl`), whose process is the host's `arl agent`, bind-mounted read-only.
//!
//! One sandbox is, in containerd: a lease (id `arl-<id>`), an overlayfs snapshot (key `<id>`)
//! on top of the image's unpacked layers, a container (id `<id>`) with an OCI spec built here,
//! and its task. All four carry the label `arl.owner`, a hash of the daemon's state directory,
//! so a restarted daemon removes what it left behind and never touches another daemon's.
//!
//! Images are pulled when absent and unpacked by [`image`].

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, KillRequest,
    ListContainersRequest, ListRequest as ListLeasesRequest, PauseTaskRequest, ResumeTaskRequest,
    StartRequest, WaitRequest,
};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::watch;

mod adopt;
mod image;
mod oci;
mod remap;
mod seccomp;
mod snapshot;
mod spec;

use image::Images;
pub use image::RegistryOptions;

use super::{AgentAddress, BoxFuture, Budgets, Created, ExitReason, Runtime, RuntimeError};
use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::util::MutexExt;

/// containerd namespace holding ARL's images and containers.
pub const NAMESPACE: &str = "arl";
const SNAPSHOTTER: &str = "overlayfs";
const SHIM: &str = "io.containerd.runc.v2";
const OWNER_LABEL: &str = "arl.owner";
/// Where the agent binary and its socket directory appear inside the container.
const AGENT_PATH: &str = "/.arl/arl";
const RUN_DIR: &str = "/.arl/run";

#[derive(Debug, Error)]
pub enum ContainerdError {
    #[error("cannot reach containerd at {socket}: {reason}")]
    Connect { socket: String, reason: String },
    #[error("pull {image}: {reason}")]
    Pull { image: String, reason: String },
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("containerd {call}: {status}")]
    Call {
        call: &'static str,
        status: Box<Status>,
    },
}

impl From<ContainerdError> for RuntimeError {
    fn from(err: ContainerdError) -> Self {
        RuntimeError::Backend {
            runtime: "containerd",
            source: Box::new(err),
        }
    }
}

fn call(call: &'static str) -> impl FnOnce(Status) -> ContainerdError {
    move |status| ContainerdError::Call {
        call,
        status: Box::new(status),
    }
}

/// NotFound is success for teardown steps.
fn ignore_missing<T>(result: Result<T, Status>, what: &'static str) -> Result<(), ContainerdError> {
    match result {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(call(what)(s)),
    }
}

#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The daemon's state directory: sandboxes' socket directories live under `containerd/`.
    pub state_dir: PathBuf,
    /// Name of ARL's cgroup under each hierarchy root.
    pub cgroup_parent: String,
    /// How images are pulled.
    pub registry: RegistryOptions,
    /// The process runtime's first host uid: containerd sandboxes' root is the range below it.
    pub uid_base: u32,
}

pub struct ContainerdRuntime {
    client: containerd_client::Client,
    images: Images,
    config: ContainerdConfig,
    dir: PathBuf,
    owner: String,
    exe: PathBuf,
    /// Per live sandbox: becomes the cause when its task has exited.
    exits: Mutex<HashMap<String, watch::Receiver<Option<ExitReason>>>>,
    /// Sandboxes whose teardown after a failed creation failed too (containerd unreachable):
    /// retried before each creation, swept by `reclaim` at shutdown.
    orphans: Mutex<Vec<String>>,
    /// Host uid of root in every sandbox's user namespace (ids `host_id..host_id + 65536`).
    host_id: u32,
    /// Remapped image snapshots are made one at a time.
    remaps: tokio::sync::Mutex<()>,
}

/// Wraps a message in a request for ARL's namespace (and a lease, when given).
fn req<T>(msg: T, lease: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "containerd-namespace",
        MetadataValue::from_static(NAMESPACE),
    );
    if let Some(lease) = lease
        && let Ok(value) = lease.parse()
    {
        r.metadata_mut().insert("containerd-lease", value);
    }
    r
}

fn lease_id(id: &str) -> String {
    format!("arl-{id}")
}

impl ContainerdRuntime {
    /// Connects to containerd and prepares the sandboxes' directory.
    pub async fn new(config: ContainerdConfig) -> Result<Self, RuntimeError> {
        let client = containerd_client::Client::from_path(&config.socket)
            .await
            .map_err(|e| ContainerdError::Connect {
                socket: config.socket.display().to_string(),
                reason: e.to_string(),
            })?;
        client
            .version()
            .version(Request::new(()))
            .await
            .map_err(|e| ContainerdError::Connect {
                socket: config.socket.display().to_string(),
                reason: e.to_string(),
            })?;
        let dir = config.state_dir.join("containerd");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let state = fs::canonicalize(&config.state_dir)?;
        let owner = hex::encode(&Sha256::digest(state.as_os_str().as_encoded_bytes())[..8]);
        let host_id = config.uid_base.checked_sub(remap::IDS).ok_or_else(|| {
            RuntimeError::Create(format!(
                "uid base {} leaves no room for the containerd sandboxes' uid range below it",
                config.uid_base
            ))
        })?;
        Ok(Self {
            images: Images::new(
                client.channel().into(),
                config.registry.clone(),
                owner.clone(),
            ),
            client,
            config,
            dir,
            owner,
            exe: std::env::current_exe()?,
            exits: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            host_id,
            remaps: tokio::sync::Mutex::new(()),
        })
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn labels(&self, id: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (OWNER_LABEL.to_string(), self.owner.clone()),
            ("arl.sandbox".to_string(), id.to_string()),
        ]);
        for (k, v) in extra {
            labels.insert(k.to_string(), v.to_string());
        }
        labels
    }

    /// Creates sandbox `id`; with `root_changes` (a snapshot's copy of another container's
    /// overlay upper layer) its root starts with those changes, written into its own upper
    /// layer before the task mounts it.
    async fn create_inner(
        &self,
        id: &str,
        spec: &PoolSpec,
        root_changes: Option<&std::path::Path>,
    ) -> Result<Created, RuntimeError> {
        let image = spec
            .image
            .as_deref()
            .ok_or_else(|| RuntimeError::Create("a containerd pool needs an image".into()))?;
        let chain = self.images.snapshot_parent(image).await?;
        let parent = self.remapped(&chain).await?;
        let dir = self.sandbox_dir(id);
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        // The agent (root of the user namespace) creates its socket here.
        std::os::unix::fs::chown(&dir, Some(self.host_id), Some(self.host_id))?;

        let lease = lease_id(id);
        self.client
            .leases()
            .create(req(
                CreateLeaseRequest {
                    id: lease.clone(),
                    labels: self.labels(id, &[]),
                },
                None,
            ))
            .await
            .map_err(call("Leases.Create"))?;
        let mounts = self
            .images
            .prepare_snapshot(id, &parent, self.labels(id, &[]), Some(&lease))
            .await?;
        if let Some(changes) = root_changes {
            self.carry_root_changes(changes, &mounts).await?;
        }

        let oci = spec::oci_spec(
            &spec::Inputs {
                id,
                host_id: self.host_id,
                exe: &self.exe,
                run_dir: &dir,
                cgroup_parent: &self.config.cgroup_parent,
            },
            spec,
        );
        let container = Container {
            id: id.to_string(),
            labels: self.labels(id, &[]),
            image: image.to_string(),
            runtime: Some(ContainerRuntime {
                name: SHIM.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                value: serde_json::to_vec(&oci).map_err(|e| RuntimeError::Create(e.to_string()))?,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.to_string(),
            ..Default::default()
        };
        self.client
            .containers()
            .create(req(
                CreateContainerRequest {
                    container: Some(container),
                },
                Some(&lease),
            ))
            .await
            .map_err(call("Containers.Create"))?;
        self.client
            .tasks()
            .create(req(
                CreateTaskRequest {
                    container_id: id.to_string(),
                    rootfs: mounts,
                    ..Default::default()
                },
                None,
            ))
            .await
            .map_err(call("Tasks.Create"))?;
        // Wait is registered before Start, so even an instant exit is seen.
        let (tx, rx) = watch::channel(None);
        tokio::spawn(watch_task(
            self.client.tasks(),
            id.to_string(),
            self.config.cgroup_parent.clone(),
            tx,
        ));
        self.exits
            .lock_or_recover()
            .insert(id.to_string(), rx.clone());
        self.client
            .tasks()
            .start(req(
                StartRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(call("Tasks.Start"))?;
        // The agent binds its socket a moment after the task starts.
        let socket = dir.join("agent.sock");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if rx.borrow().is_some() {
                return Err(RuntimeError::Create(format!(
                    "the agent exited at once in image {image}"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RuntimeError::Create(
                    "the agent did not create its socket within 20 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Created {
            agent: AgentAddress::Unix(socket),
        })
    }

    /// [`Self::create_inner`], and on failure removes whatever it had made.
    async fn create_or_clean_up(
        &self,
        id: &str,
        spec: &PoolSpec,
        root_changes: Option<&std::path::Path>,
    ) -> Result<Created, RuntimeError> {
        self.retry_orphans().await;
        let result = self.create_inner(id, spec, root_changes).await;
        if result.is_err() {
            if self.destroy_inner(id).await.is_err() {
                self.orphans.lock_or_recover().push(id.to_string());
            }
            let _ = self.remove_dir(id);
        }
        result
    }

    async fn destroy_inner(&self, id: &str) -> Result<(), ContainerdError> {
        let exit = self.exits.lock_or_recover().remove(id);
        let mut tasks = self.client.tasks();
        // A paused task must be resumed to die.
        let _ = tasks
            .resume(req(
                ResumeTaskRequest {
                    container_id: id.to_string(),
                },
                None,
            ))
            .await;
        ignore_missing(
            tasks
                .kill(req(
                    KillRequest {
                        container_id: id.to_string(),
                        exec_id: String::new(),
                        signal: libc::SIGKILL as u32,
                        all: true,
                    },
                    None,
                ))
                .await,
            "Tasks.Kill",
        )
        .or_else(|e| match &e {
            // A task that already stopped cannot be killed; Delete handles it.
            ContainerdError::Call { status, .. } if status.code() == Code::FailedPrecondition => {
                Ok(())
            }
            _ => Err(e),
        })?;
        match exit {
            Some(mut rx) => {
                let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|e| e.is_some()))
                    .await;
            }
            None => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    tasks.wait(req(
                        WaitRequest {
                            container_id: id.to_string(),
                            exec_id: String::new(),
                        },
                        None,
                    )),
                )
                .await;
            }
        }
        ignore_missing(
            tasks
                .delete(req(
                    DeleteTaskRequest {
                        container_id: id.to_string(),
                    },
                    None,
                ))
                .await,
            "Tasks.Delete",
        )?;
        ignore_missing(
            self.client
                .containers()
                .delete(req(DeleteContainerRequest { id: id.to_string() }, None))
                .await,
            "Containers.Delete",
        )?;
        ignore_missing(
            self.client
                .snapshots()
                .remove(req(
                    RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: id.to_string(),
                    },
                    None,
                ))
                .await,
            "Snapshots.Remove",
        )?;
        ignore_missing(
            self.client
                .leases()
                .delete(req(
                    DeleteLeaseRequest {
                        id: lease_id(id),
                        sync: false,
                    },
                    None,
                ))
                .await,
            "Leases.Delete",
        )?;
        Ok(())
    }

    /// Tears down what failed creations left, now that containerd may answer again.
    async fn retry_orphans(&self) {
        let orphans = std::mem::take(&mut *self.orphans.lock_or_recover());
        for id in orphans {
            if self.destroy_inner(&id).await.is_err() {
                self.orphans.lock_or_recover().push(id);
            }
        }
    }

    fn remove_dir(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.sandbox_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Destroy {
                id: id.to_string(),
                reason: format!("remove {}: {e}", dir.display()),
            }),
        }
    }

    async fn reclaim_inner(&self) -> Result<usize, RuntimeError> {
        let filter = format!("labels.\"{OWNER_LABEL}\"=={}", self.owner);
        let mut ids: Vec<String> = self
            .client
            .containers()
            .list(req(
                ListContainersRequest {
                    filters: vec![filter.clone()],
                },
                None,
            ))
            .await
            .map_err(call("Containers.List"))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        let mut snapshots = self
            .client
            .snapshots()
            .list(req(
                ListSnapshotsRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    filters: vec![filter.clone()],
                },
                None,
            ))
            .await
            .map_err(call("Snapshots.List"))?
            .into_inner();
        while let Some(page) = snapshots.message().await.map_err(call("Snapshots.List"))? {
            ids.extend(page.info.into_iter().map(|i| i.name));
        }
        let leases = self
            .client
            .leases()
            .list(req(
                ListLeasesRequest {
                    filters: vec![filter],
                },
                None,
            ))
            .await
            .map_err(call("Leases.List"))?
            .into_inner()
            .leases;
        ids.extend(
            leases
                .into_iter()
                .filter_map(|l| l.id.strip_prefix("arl-").map(str::to_string)),
        );
        if let Ok(entries) = fs::read_dir(&self.dir) {
            ids.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        ids.sort();
        ids.dedup();
        // Sandboxes this daemon holds (created or adopted) stay, and so do the shifted image
        // snapshots under them.
        let holding = {
            let exits = self.exits.lock_or_recover();
            ids.retain(|id| !exits.contains_key(id));
            !exits.is_empty()
        };
        if holding {
            ids.retain(|id| !id.starts_with("arl-remap-"));
        }
        // Shifted image snapshots go after the sandboxes' snapshots on top of them.
        let (remaps, ids): (Vec<String>, Vec<String>) =
            ids.into_iter().partition(|id| id.starts_with("arl-remap-"));
        for id in &ids {
            self.destroy_inner(id).await?;
            self.remove_dir(id)?;
        }
        for key in remaps
            .iter()
            .filter(|k| k.ends_with("-work"))
            .chain(remaps.iter())
        {
            match self.remove_snapshot(key).await {
                Err(ContainerdError::Call { status, .. }) if status.code() != Code::NotFound => {
                    return Err(RuntimeError::from(ContainerdError::Call {
                        call: "Snapshots.Remove",
                        status,
                    }));
                }
                _ => {}
            }
        }
        Ok(ids.len())
    }
}

/// Signals `exited` with the cause when the task `id` exits. A broken Wait (containerd
/// restarting: its tasks' shims keep running) is asked again, so a containerd restart does not
/// kill every sandbox; the watcher ends when the task is gone or nobody listens any more.
async fn watch_task(
    mut tasks: TasksClient<Channel>,
    id: String,
    cgroup_parent: String,
    exited: watch::Sender<Option<ExitReason>>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let wait = tasks.wait(req(
            WaitRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            },
            None,
        ));
        tokio::select! {
            result = wait => match result {
                Ok(reply) => {
                    // The task's cgroup lives until its deletion: its OOM count is still there.
                    let oom_kills = task_oom_kills(&cgroup_parent, &id);
                    let reason = ExitReason::from_exit_status(reply.get_ref().exit_status, oom_kills);
                    let _ = exited.send(Some(reason));
                    return;
                }
                Err(s) if s.code() == Code::NotFound => break,
                Err(s) => tracing::debug!(sandbox = %id, status = %s, "task wait broken; asking again"),
            },
            _ = exited.closed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = exited.closed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    let _ = exited.send(Some(ExitReason::Unknown));
}

/// OOM kills counted in the task's memory cgroup (`cgroupsPath` of its spec).
fn task_oom_kills(cgroup_parent: &str, id: &str) -> Option<u64> {
    crate::runtime::process::cgroup::oom_kills_of(cgroup_parent, id)
}

/// The pool options a containerd sandbox understands: an image, never a root directory.
pub fn validate_spec(spec: &PoolSpec) -> Result<(), String> {
    let Some(image) = &spec.image else {
        return Err("a `containerd` pool needs an `image`".into());
    };
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("`image` {image:?} is not an image reference"));
    }
    if spec.rootfs.is_some() {
        return Err("`rootfs` is for `process` pools; a `containerd` pool uses `image`".into());
    }
    if spec.template.is_some() {
        return Err(
            "`template` is for `kubernetes` pools; a `containerd` pool uses `image`".into(),
        );
    }
    Ok(())
}

impl Runtime for ContainerdRuntime {
    fn kind(&self) -> &'static str {
        "containerd"
    }

    fn validate(&self, spec: &PoolSpec) -> Result<(), String> {
        validate_spec(spec)
    }

    fn budgets(&self) -> Budgets {
        Budgets {
            // A creation may pull and unpack the image first.
            create: Duration::from_secs(600),
            destroy: Duration::from_secs(60),
        }
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(self.create_or_clean_up(id, spec, None))
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.destroy_inner(id)
                .await
                .map_err(|e| RuntimeError::Destroy {
                    id: id.to_string(),
                    reason: e.to_string(),
                })?;
            self.remove_dir(id)
        })
    }

    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ExitReason> {
        let rx = self.exits.lock_or_recover().get(id).cloned();
        Box::pin(async move {
            let Some(mut rx) = rx else {
                return ExitReason::Destroyed;
            };
            let reason = match rx.wait_for(|e| e.is_some()).await {
                Ok(reason) => reason.unwrap_or(ExitReason::Unknown),
                Err(_) => ExitReason::Destroyed,
            };
            // `destroy` forgets the sandbox before it kills the task.
            if self.exits.lock_or_recover().contains_key(id) {
                reason
            } else {
                ExitReason::Destroyed
            }
        })
    }

    fn set_paused<'a>(
        &'a self,
        id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut tasks = self.client.tasks();
            let container_id = id.to_string();
            let result = if paused {
                tasks
                    .pause(req(PauseTaskRequest { container_id }, None))
                    .await
                    .map_err(call("Tasks.Pause"))
            } else {
                tasks
                    .resume(req(ResumeTaskRequest { container_id }, None))
                    .await
                    .map_err(call("Tasks.Resume"))
            };
            result.map(|_| ()).map_err(RuntimeError::from)
        })
    }

    fn snapshot<'a>(
        &'a self,
        id: &'a str,
        dest: &'a std::path::Path,
        limit: u64,
    ) -> BoxFuture<'a, Result<u64, RuntimeError>> {
        Box::pin(self.snapshot_inner(id, dest, limit))
    }

    fn fork<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
        base: &'a [PathBuf],
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(self.fork_inner(id, spec, base))
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
        Box::pin(self.reclaim_inner())
    }

    fn adopt<'a>(
        &'a self,
        id: &'a str,
        _kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(self.adopt_inner(id))
    }
}
