//! Taking back a sandbox an earlier daemon left: its task keeps running in its shim while no
//! daemon watches it, so a successor checks the container is its own and the task is running,
//! and watches it again.

use containerd_client::services::v1::{GetContainerRequest, GetRequest};
use containerd_client::types::v1::Status as TaskStatus;
use tokio::sync::watch;

use super::{ContainerdRuntime, OWNER_LABEL, call, req, watch_task};
use crate::runtime::{AgentAddress, Created, RuntimeError};
use crate::util::MutexExt;

impl ContainerdRuntime {
    pub(super) async fn adopt_inner(&self, id: &str) -> Result<Created, RuntimeError> {
        let refuse = |reason: &str| RuntimeError::Adopt {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(refuse("not a sandbox id"));
        }
        if self.exits.lock_or_recover().contains_key(id) {
            return Err(refuse("already held"));
        }
        let container = self
            .client
            .containers()
            .get(req(GetContainerRequest { id: id.to_string() }, None))
            .await
            .map_err(call("Containers.Get"))?
            .into_inner()
            .container
            .ok_or_else(|| refuse("no container"))?;
        if container.labels.get(OWNER_LABEL) != Some(&self.owner) {
            return Err(refuse("its container belongs to another daemon"));
        }
        let task = self
            .client
            .tasks()
            .get(req(
                GetRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(call("Tasks.Get"))?
            .into_inner()
            .process
            .ok_or_else(|| refuse("no task"))?;
        // A paused task would hold every request: only running ones are taken back.
        if task.status != TaskStatus::Running as i32 {
            return Err(refuse("its task is not running"));
        }
        let socket = self.sandbox_dir(id).join("agent.sock");
        if !socket.exists() {
            return Err(refuse("no agent socket"));
        }
        let (tx, rx) = watch::channel(None);
        tokio::spawn(watch_task(
            self.client.tasks(),
            id.to_string(),
            self.config.cgroup_parent.clone(),
            tx,
        ));
        self.exits.lock_or_recover().insert(id.to_string(), rx);
        Ok(Created {
            agent: AgentAddress::Unix(socket),
        })
    }
}
