//! Snapshots and forks of containerd sandboxes, by copying: containerd 1.6 and runc 1.1 have
//! no idmapped mounts to stack a snapshot under a new container's tmpfs mounts, so a snapshot
//! copies the task's `/workspace` and `/tmp` out (through `/proc/<pid>/root`, the task frozen,
//! links never followed) and a fork is a fresh container with that copy written back into
//! its `/workspace` and `/tmp` before anyone can use it. The full-copy fallback of the process
//! runtime's copy-on-write forks; the image's own root filesystem is not carried over.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::GetRequest;

use super::{ContainerdRuntime, call, req};
use crate::api::PoolSpec;
use crate::runtime::process::snapshot::{self as layers, SnapshotError};
use crate::runtime::{Created, Runtime, RuntimeError};

/// The directories of a containerd sandbox that make its writable state.
const STATE_DIRS: &[&str] = &["workspace", "tmp"];

impl ContainerdRuntime {
    /// The host pid of a sandbox's task (its agent).
    async fn task_pid(&self, id: &str) -> Result<u32, RuntimeError> {
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
            .ok_or_else(|| RuntimeError::Destroy {
                id: id.to_string(),
                reason: "no task".into(),
            })?;
        Ok(task.pid)
    }

    pub(super) async fn snapshot_inner(
        &self,
        id: &str,
        dest: &Path,
        limit: u64,
    ) -> Result<u64, RuntimeError> {
        let root = PathBuf::from(format!("/proc/{}/root", self.task_pid(id).await?));
        let (dest, host_id) = (dest.to_path_buf(), self.host_id);
        blocking(move || {
            std::fs::create_dir_all(&dest).map_err(|source| SnapshotError::Io {
                path: dest.clone(),
                source,
            })?;
            let mut copied = 0;
            for dir in STATE_DIRS {
                copied += layers::copy_tree(
                    &root.join(dir),
                    &dest.join(dir),
                    host_id,
                    0,
                    limit - copied,
                )?;
            }
            Ok(copied)
        })
        .await
    }

    pub(super) async fn fork_inner(
        &self,
        id: &str,
        spec: &PoolSpec,
        base: &[PathBuf],
    ) -> Result<Created, RuntimeError> {
        // Stacked snapshots are layers of changes only for copy-on-write runtimes; here each
        // snapshot holds the whole directories, so the top one is all there is to copy.
        let top = base
            .first()
            .cloned()
            .ok_or_else(|| RuntimeError::Create("a fork needs a snapshot".into()))?;
        let created = self.create(id, spec).await?;
        let copied = async {
            let root = PathBuf::from(format!("/proc/{}/root", self.task_pid(id).await?));
            let host_id = self.host_id;
            blocking(move || {
                // The container's tmpfs belongs to its user namespace: only ids mapped there
                // may create files on it, so the copy runs as its root (`host_id`).
                as_owner(host_id, move || {
                    let mut copied = 0;
                    for dir in STATE_DIRS {
                        let from = top.join(dir);
                        if from.is_dir() {
                            copied +=
                                layers::copy_into(&from, &root.join(dir), 0, host_id, u64::MAX)?;
                        }
                    }
                    Ok(copied)
                })
            })
            .await
        }
        .await;
        match copied {
            Ok(_) => Ok(created),
            Err(e) => {
                let _ = self.destroy(id).await;
                Err(e)
            }
        }
    }
}

/// Runs `work` on a thread of its own whose file-system ids are `id` (what new files are owned
/// by), with the file capabilities that change drops raised again (chown, reading anything):
/// credentials are per thread, and this one ends with the work.
fn as_owner(
    id: u32,
    work: impl FnOnce() -> Result<u64, SnapshotError> + Send + 'static,
) -> Result<u64, SnapshotError> {
    let thread = std::thread::spawn(move || {
        // SAFETY: setfsuid/setfsgid/capget/capset change only this thread's credentials;
        // the structs are sized for capability version 3.
        unsafe {
            libc::setfsgid(id);
            libc::setfsuid(id);
            let mut header = CapHeader {
                version: 0x2008_0522,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) == 0 {
                for d in &mut data {
                    d.effective = d.permitted;
                }
                libc::syscall(libc::SYS_capset, &header, data.as_ptr());
            }
        }
        work()
    });
    thread.join().unwrap_or_else(|_| {
        Err(SnapshotError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other("the copy thread panicked"),
        })
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

async fn blocking(
    work: impl FnOnce() -> Result<u64, SnapshotError> + Send + 'static,
) -> Result<u64, RuntimeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RuntimeError::Io(std::io::Error::other(e.to_string())))?
        .map_err(|e| match e {
            SnapshotError::TooLarge { limit } => RuntimeError::TooLarge { limit },
            other => RuntimeError::Backend {
                runtime: "containerd",
                source: Box::new(other),
            },
        })
}
