//! The `kubernetes` runtime: a sandbox is a Pod pinned to this node, built from the pool's
//! template with the agent injected (`pod.rs`), whose agent the daemon reaches over a Unix
//! socket in the pod's emptyDir through the kubelet's pod directory (`socket.rs`) or, where
//! that directory cannot be reached (another kubelet root, a virtual kubelet), over TCP at the
//! pod's IP with a token per sandbox, kept in a Secret the pod owns ([`AgentTransport`]).
//!
//! The API server is used only to create and delete pods and by one watch of this node's
//! pods (`state.rs`); acquire, exec, files and release never reach it. A creation posts the
//! pod, waits for the watch to report it running (or stuck: an image that cannot be pulled,
//! an unschedulable pod), then for its agent to answer. A pod that fails, is evicted or is
//! deleted by someone else ends its sandbox (`exited`). After a restart the daemon takes its
//! pods back by name from the watch's first list and deletes the strays (`reclaim`).

pub mod install;
pub mod pod;
pub mod socket;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use thiserror::Error;

use self::pod::PodContext;
use self::socket::AgentDir;
use self::state::{PodState, PodTable};
use super::{
    AgentAddress, AgentToken, BoxFuture, Budgets, Created, ExitReason, Runtime, RuntimeError,
};
use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::util::MutexExt;

const KIND: &str = "kubernetes";

/// How long a new pod's agent may take to open its socket once the pod runs.
const AGENT_START: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum KubeRuntimeError {
    #[error("the API server refused: {0}")]
    Api(#[source] kube::Error),
}

/// How the daemon reaches its pods' agents (`--agent-transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentTransport {
    /// A Unix socket in the pod's emptyDir, through the kubelet's pod directory.
    Unix,
    /// TCP to the pod's IP, with a token per sandbox.
    Tcp,
    /// `unix` when the kubelet's pod directory is there, else `tcp`.
    Auto,
}

impl AgentTransport {
    /// `auto` made definite: the Unix socket when the kubelet's pod directory is a directory
    /// this daemon sees.
    pub fn resolve(self, pods_dir: &std::path::Path) -> Self {
        match self {
            Self::Auto if pods_dir.is_dir() => Self::Unix,
            Self::Auto => Self::Tcp,
            other => other,
        }
    }
}

/// Where this daemon's pods go and how it reaches them (`pod.agent_tcp_port` set: over TCP).
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    pub pod: PodContext,
    /// The kubelet's pod directory as mounted into the daemon.
    pub pods_dir: PathBuf,
}

/// How the daemon reaches a pod it holds.
enum Reach {
    /// Keeps the agent's socket path (through this descriptor) valid.
    Dir(#[allow(dead_code)] Arc<AgentDir>),
    /// Over TCP; `secret_owned`: the pod owns its Secret (so deleting the pod deletes it).
    Tcp { secret_owned: bool },
}

/// A pod the daemon holds.
struct Held {
    uid: String,
    reach: Reach,
}

pub struct KubernetesRuntime {
    config: KubernetesConfig,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    table: Arc<PodTable>,
    held: Mutex<HashMap<String, Held>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for KubernetesRuntime {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl KubernetesRuntime {
    /// Starts watching this node's pods (needs a Tokio runtime).
    pub fn new(client: Client, config: KubernetesConfig) -> Self {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &config.pod.namespace);
        let secrets: Api<Secret> = Api::namespaced(client, &config.pod.namespace);
        let table = Arc::new(PodTable::default());
        let selector = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", config.pod.node_name))
            .labels(&config.pod.owner_selector());
        let watch = tokio::spawn(state::run_watch(pods.clone(), selector, table.clone()));
        Self {
            config,
            pods,
            secrets,
            table,
            held: Mutex::new(HashMap::new()),
            watch,
        }
    }

    /// The pods as the watch sees them.
    pub fn table(&self) -> &Arc<PodTable> {
        &self.table
    }

    async fn create_inner(&self, id: &str, spec: &PoolSpec) -> Result<Created, RuntimeError> {
        let pod = pod::build(id, spec, &self.config.pod).map_err(RuntimeError::Create)?;
        let name = pod::pod_name(id);
        // Over TCP the agent's token goes first, in a Secret the pod reads at its start.
        let token = match self.config.pod.agent_tcp_port {
            Some(_) => {
                let token = AgentToken::generate();
                self.secrets
                    .create(
                        &PostParams::default(),
                        &pod::secret(id, &self.config.pod, &token),
                    )
                    .await
                    .map_err(backend)?;
                Some(token)
            }
            None => None,
        };
        let made = match self.pods.create(&PostParams::default(), &pod).await {
            Ok(made) => made,
            Err(e) => {
                if token.is_some() {
                    self.delete_secret(id).await;
                }
                return Err(backend(e));
            }
        };
        self.table.created(&name, &made);
        let uid = made.metadata.uid.clone().unwrap_or_default();
        tracing::debug!(pod = %name, %uid, "sandbox pod created");
        let secret_owned = match &token {
            Some(_) => self.give_secret_to(id, &uid).await,
            None => false,
        };
        let result = self.start(id, &name, &uid, token, secret_owned).await;
        if result.is_err() && token_left_behind(&self.config, secret_owned) {
            self.delete_secret(id).await;
        }
        result
    }

    /// Waits for a created pod to run and its agent to listen; holds it.
    async fn start(
        &self,
        id: &str,
        name: &str,
        uid: &str,
        token: Option<AgentToken>,
        secret_owned: bool,
    ) -> Result<Created, RuntimeError> {
        let tcp = token.is_some();
        // The watch says when it runs (with its IP, over TCP), or why it cannot.
        let started = self
            .table
            .wait_for(name, |facts| match facts.map(|f| (&f.state, f.ip)) {
                Some((PodState::Running, ip)) if !tcp || ip.is_some() => Some(Ok(ip)),
                Some((
                    PodState::Pending {
                        problem: Some(problem),
                    },
                    _,
                )) => Some(Err(format!("pod {name} cannot start: {problem}"))),
                Some((PodState::Finished(reason, problem), _)) => Some(Err(match problem {
                    Some(problem) => format!("pod {name} failed: {problem}"),
                    None => format!("pod {name} ended before it was ready: {reason}"),
                })),
                Some((PodState::Gone, _)) => {
                    Some(Err(format!("pod {name} was deleted while starting")))
                }
                _ => None,
            })
            .await;
        let ip = started.map_err(RuntimeError::Create)?;
        let (agent, reach) = match (token, ip, self.config.pod.agent_tcp_port) {
            (Some(token), Some(ip), Some(port)) => {
                let addr = SocketAddr::new(ip, port);
                wait_for_tcp_agent(addr).await?;
                (
                    AgentAddress::Tcp { addr, token },
                    Reach::Tcp { secret_owned },
                )
            }
            _ => {
                let dir = Arc::new(
                    AgentDir::open(&self.config.pods_dir, uid).map_err(RuntimeError::Create)?,
                );
                wait_for_agent(&dir.socket()).await?;
                (AgentAddress::Unix(dir.socket()), Reach::Dir(dir))
            }
        };
        self.held.lock_or_recover().insert(
            id.to_string(),
            Held {
                uid: uid.to_string(),
                reach,
            },
        );
        Ok(Created { agent })
    }

    /// Makes the pod the owner of its Secret, so the Secret goes with the pod whoever deletes
    /// it. Whether that worked (if not, the runtime deletes the Secret itself).
    async fn give_secret_to(&self, id: &str, uid: &str) -> bool {
        let name = pod::pod_name(id);
        let patch = serde_json::json!({"metadata": {"ownerReferences": [{
            "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]}});
        match self
            .secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "the pod could not be made the owner of its token's Secret; it is deleted with the sandbox");
                false
            }
        }
    }

    /// Deletes a sandbox's Secret (gone already is fine).
    async fn delete_secret(&self, id: &str) {
        let name = pod::pod_name(id);
        match self.secrets.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "deleting a sandbox's Secret failed")
            }
        }
    }

    /// Deletes this daemon's token Secrets that no sandbox it holds uses: a daemon killed
    /// between creating a Secret and its pod, or before the pod owned it, leaves one that
    /// nothing would ever collect. Best effort: a refusal is logged.
    async fn sweep_secrets(&self) {
        let params = ListParams::default().labels(&self.config.pod.owner_selector());
        // Names only: the tokens themselves are not fetched.
        let list = match self.secrets.list_metadata(&params).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this daemon's token Secrets to sweep them");
                return;
            }
        };
        let strays: Vec<String> = {
            let held = self.held.lock_or_recover();
            list.items
                .into_iter()
                .filter_map(|s| s.metadata.name)
                .filter(|name| pod::sandbox_id(name).is_some_and(|id| !held.contains_key(id)))
                .collect()
        };
        for name in &strays {
            tracing::info!(secret = %name, "deleting a token Secret no sandbox of this daemon uses");
            if let Some(id) = pod::sandbox_id(name) {
                self.delete_secret(id).await;
            }
        }
    }

    async fn delete_pod(&self, id: &str) -> Result<(), RuntimeError> {
        let name = pod::pod_name(id);
        match self.pods.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                return Err(RuntimeError::Destroy {
                    id: id.to_string(),
                    reason: e.to_string(),
                });
            }
        }
        self.table.forget(&name);
        Ok(())
    }

    async fn adopt_inner(&self, id: &str) -> Result<Created, RuntimeError> {
        let refuse = |reason: String| RuntimeError::Adopt {
            id: id.to_string(),
            reason,
        };
        let name = pod::pod_name(id);
        let facts = self
            .table
            .get(&name)
            .ok_or_else(|| refuse(format!("no pod {name} of this daemon on this node")))?;
        if facts.state != PodState::Running {
            return Err(refuse(format!(
                "its pod {name} is not running ({:?})",
                facts.state
            )));
        }
        // The pod says how it was made to be reached, whatever this daemon's setting.
        let (agent, reach) = match facts.agent_port {
            Some(port) => {
                let ip = facts
                    .ip
                    .ok_or_else(|| refuse(format!("its pod {name} has no IP")))?;
                let token = self.read_token(&name).await.map_err(refuse)?;
                (
                    AgentAddress::Tcp {
                        addr: SocketAddr::new(ip, port),
                        token,
                    },
                    Reach::Tcp { secret_owned: true },
                )
            }
            None => {
                let dir =
                    Arc::new(AgentDir::open(&self.config.pods_dir, &facts.uid).map_err(refuse)?);
                (AgentAddress::Unix(dir.socket()), Reach::Dir(dir))
            }
        };
        self.held.lock_or_recover().insert(
            id.to_string(),
            Held {
                uid: facts.uid,
                reach,
            },
        );
        Ok(Created { agent })
    }

    /// The token of a TCP-reached pod, from its Secret (one read, at adoption only).
    async fn read_token(&self, name: &str) -> Result<AgentToken, String> {
        let secret = self
            .secrets
            .get(name)
            .await
            .map_err(|e| format!("its token's Secret {name} cannot be read: {e}"))?;
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(pod::TOKEN_KEY))
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .and_then(AgentToken::parse)
            .ok_or_else(|| format!("its token's Secret {name} holds no token"))
    }
}

/// Whether a failed creation over TCP must delete the Secret itself (the pod does not own it).
fn token_left_behind(config: &KubernetesConfig, secret_owned: bool) -> bool {
    config.pod.agent_tcp_port.is_some() && !secret_owned
}

fn backend(e: kube::Error) -> RuntimeError {
    RuntimeError::Backend {
        runtime: KIND,
        source: Box::new(KubeRuntimeError::Api(e)),
    }
}

/// Waits until the agent accepts connections at the pod's IP (it listens as it starts).
async fn wait_for_tcp_agent(addr: SocketAddr) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + AGENT_START;
    let mut delay = Duration::from_millis(2);
    loop {
        let attempt = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Ok(Err(e)) => {
                return Err(RuntimeError::Create(format!(
                    "the pod runs but its agent did not listen on {addr} within {} s: {e}",
                    AGENT_START.as_secs()
                )));
            }
            Err(_) => {
                return Err(RuntimeError::Create(format!(
                    "the pod runs but its agent did not listen on {addr} within {} s",
                    AGENT_START.as_secs()
                )));
            }
        }
    }
}

/// Waits until the agent accepts connections on its socket (it binds it as it starts).
async fn wait_for_agent(socket: &std::path::Path) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + AGENT_START;
    let mut delay = Duration::from_millis(2);
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(RuntimeError::Create(format!(
                    "the pod runs but its agent did not open {} within {} s: {e}",
                    socket.display(),
                    AGENT_START.as_secs()
                )));
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

impl Runtime for KubernetesRuntime {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self, spec: &PoolSpec) -> Result<(), String> {
        pod::validate(spec, self.config.pod.agent_tcp_port)
    }

    fn budgets(&self) -> Budgets {
        Budgets {
            // A creation may wait for the kubelet to pull the image.
            create: Duration::from_secs(300),
            destroy: Duration::from_secs(60),
        }
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        let span = tracing::info_span!("create_pod", sandbox = %id);
        Box::pin(tracing::Instrument::instrument(
            self.create_inner(id, spec),
            span,
        ))
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            // Forgotten first, so `exited` reads the deletion as the daemon's own.
            let held = self.held.lock_or_recover().remove(id);
            if let Err(e) = self.delete_pod(id).await {
                if let Some(held) = held {
                    self.held.lock_or_recover().insert(id.to_string(), held);
                }
                return Err(e);
            }
            // A Secret the pod does not own would outlive it.
            if let Some(Held {
                reach: Reach::Tcp {
                    secret_owned: false,
                },
                ..
            }) = held
            {
                self.delete_secret(id).await;
            }
            Ok(())
        })
    }

    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ExitReason> {
        Box::pin(async move {
            let name = pod::pod_name(id);
            let Some(uid) = self.held.lock_or_recover().get(id).map(|h| h.uid.clone()) else {
                return ExitReason::Destroyed;
            };
            let reason = self
                .table
                .wait_for(&name, |facts| match facts {
                    None => Some(ExitReason::Deleted),
                    Some(f) if f.uid != uid => Some(ExitReason::Deleted),
                    Some(f) => match &f.state {
                        PodState::Finished(reason, _) => Some(*reason),
                        PodState::Gone => Some(ExitReason::Deleted),
                        _ => None,
                    },
                })
                .await;
            if !self.held.lock_or_recover().contains_key(id) {
                return ExitReason::Destroyed;
            }
            reason
        })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
        Box::pin(async move {
            self.table.wait_synced().await;
            let strays: Vec<String> = {
                let held = self.held.lock_or_recover();
                self.table
                    .names()
                    .into_iter()
                    .filter(|name| pod::sandbox_id(name).is_none_or(|id| !held.contains_key(id)))
                    .collect()
            };
            let mut n = 0;
            for name in strays {
                let Some(id) = pod::sandbox_id(&name) else {
                    continue;
                };
                tracing::info!(pod = %name, "deleting a sandbox pod no sandbox of this daemon holds");
                self.delete_pod(id).await?;
                n += 1;
            }
            self.sweep_secrets().await;
            Ok(n)
        })
    }

    fn adopt<'a>(
        &'a self,
        id: &'a str,
        _kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(async move {
            self.table.wait_synced().await;
            self.adopt_inner(id).await
        })
    }
}
