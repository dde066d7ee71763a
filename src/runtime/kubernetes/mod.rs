//! The `kubernetes` runtime: a sandbox is a Pod pinned to this node, built from the pool's
//! template with the agent injected (`pod.rs`), whose agent the daemon reaches over a Unix
//! socket in the pod's emptyDir through the kubelet's pod directory (`socket.rs`).
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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use thiserror::Error;

use self::pod::PodContext;
use self::socket::AgentDir;
use self::state::{PodState, PodTable};
use super::{AgentAddress, BoxFuture, Budgets, Created, ExitReason, Runtime, RuntimeError};
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

/// Where this daemon's pods go and how it reaches them.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    pub pod: PodContext,
    /// The kubelet's pod directory as mounted into the daemon.
    pub pods_dir: PathBuf,
}

/// A pod the daemon holds.
struct Held {
    uid: String,
    /// Keeps the agent's socket path (through this descriptor) valid.
    _dir: Arc<AgentDir>,
}

pub struct KubernetesRuntime {
    config: KubernetesConfig,
    pods: Api<Pod>,
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
        let pods: Api<Pod> = Api::namespaced(client, &config.pod.namespace);
        let table = Arc::new(PodTable::default());
        let selector = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", config.pod.node_name))
            .labels(&config.pod.owner_selector());
        let watch = tokio::spawn(state::run_watch(pods.clone(), selector, table.clone()));
        Self {
            config,
            pods,
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
        let made = self
            .pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(backend)?;
        self.table.created(&name, &made);
        let uid = made.metadata.uid.clone().unwrap_or_default();
        tracing::debug!(pod = %name, %uid, "sandbox pod created");
        // The watch says when it runs, or why it cannot.
        let started = self
            .table
            .wait_for(&name, |facts| match facts.map(|f| &f.state) {
                Some(PodState::Running) => Some(Ok(())),
                Some(PodState::Pending {
                    problem: Some(problem),
                }) => Some(Err(format!("pod {name} cannot start: {problem}"))),
                Some(PodState::Finished(reason, problem)) => Some(Err(match problem {
                    Some(problem) => format!("pod {name} failed: {problem}"),
                    None => format!("pod {name} ended before it was ready: {reason}"),
                })),
                Some(PodState::Gone) => Some(Err(format!("pod {name} was deleted while starting"))),
                _ => None,
            })
            .await;
        started.map_err(RuntimeError::Create)?;
        let dir =
            Arc::new(AgentDir::open(&self.config.pods_dir, &uid).map_err(RuntimeError::Create)?);
        wait_for_agent(&dir.socket()).await?;
        let agent = AgentAddress::Unix(dir.socket());
        self.held
            .lock_or_recover()
            .insert(id.to_string(), Held { uid, _dir: dir });
        Ok(Created { agent })
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

    fn adopt_inner(&self, id: &str) -> Result<Created, RuntimeError> {
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
        let dir = Arc::new(AgentDir::open(&self.config.pods_dir, &facts.uid).map_err(refuse)?);
        let agent = AgentAddress::Unix(dir.socket());
        self.held.lock_or_recover().insert(
            id.to_string(),
            Held {
                uid: facts.uid,
                _dir: dir,
            },
        );
        Ok(Created { agent })
    }
}

fn backend(e: kube::Error) -> RuntimeError {
    RuntimeError::Backend {
        runtime: KIND,
        source: Box::new(KubeRuntimeError::Api(e)),
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
        pod::validate(spec)
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
            self.adopt_inner(id)
        })
    }
}
