//! Snapshots and forks of containerd sandboxes, by copying: containerd 1.6 and runc 1.1 have
//! no idmapped mounts to stack a snapshot under a new container's mounts, so a snapshot copies
//! the sandbox's writable state out while its task is frozen (links never followed):
//!
//! * `/workspace` and `/tmp`, the container's tmpfs mounts, through `/proc/<pid>/root`;
//! * the changes to the image's root: the container's overlay upper layer as it is on the
//!   host, whiteouts (deletions) and opaque directories (a directory removed and made again)
//!   included.
//!
//! A fork is a fresh container whose overlay upper layer gets the root changes before its
//! task mounts it, and whose `/workspace` and `/tmp` get theirs before anyone can use it.
//! The full-copy fallback of the process runtime's copy-on-write forks.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::GetRequest;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::types::Mount;

use super::{ContainerdRuntime, SNAPSHOTTER, call, req};
use crate::api::PoolSpec;
use crate::runtime::process::snapshot::{self as layers, SnapshotError};
use crate::runtime::{Created, Runtime, RuntimeError};

/// The directories of a containerd sandbox's own mounts that are part of its writable state.
const STATE_DIRS: &[&str] = &["workspace", "tmp"];

/// Where a snapshot keeps the changes to the image's root (the overlay upper layer).
const ROOT_CHANGES: &str = "rootfs";

/// The writable (upper) directory of an overlay rootfs, from the snapshotter's mounts; `None`
/// when the rootfs is not an overlay (an image without layers is a plain bind mount).
fn upper_dir(mounts: &[Mount]) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.r#type == "overlay")
        .flat_map(|m| &m.options)
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
}

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
        let upper = self.container_upper_dir(id).await?;
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
            if let Some(upper) = upper {
                copied += layers::copy_tree(
                    &upper,
                    &dest.join(ROOT_CHANGES),
                    host_id,
                    0,
                    limit - copied,
                )?;
            }
            Ok(copied)
        })
        .await
    }

    /// The host directory holding the changes sandbox `id` made to its image's root.
    async fn container_upper_dir(&self, id: &str) -> Result<Option<PathBuf>, RuntimeError> {
        let mounts = self
            .client
            .snapshots()
            .mounts(req(
                MountsRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: id.to_string(),
                },
                None,
            ))
            .await
            .map_err(call("Snapshots.Mounts"))?
            .into_inner()
            .mounts;
        Ok(upper_dir(&mounts))
    }

    /// Writes a snapshot's root changes (`changes`, owners 0-based) into the upper layer of a
    /// new container's rootfs (`mounts`, not mounted yet), owners moved into the sandbox range.
    pub(super) async fn carry_root_changes(
        &self,
        changes: &Path,
        mounts: &[Mount],
    ) -> Result<(), RuntimeError> {
        let from = changes.join(ROOT_CHANGES);
        if !from.is_dir() {
            return Ok(());
        }
        let upper = upper_dir(mounts).ok_or_else(|| {
            RuntimeError::Create(
                "the image's root is not an overlay: the parent's root changes have nowhere to go"
                    .into(),
            )
        })?;
        let host_id = self.host_id;
        blocking(move || layers::copy_into(&from, &upper, 0, host_id, u64::MAX)).await?;
        Ok(())
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
        let created = self.create_or_clean_up(id, spec, Some(&top)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.into(),
            source: kind.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Mount::default()
        }
    }

    #[test]
    fn the_upper_layer_comes_from_the_overlay_mount_only() {
        let overlay = mount(
            "overlay",
            &[
                "index=off",
                "workdir=/var/lib/c/snapshots/7/work",
                "upperdir=/var/lib/c/snapshots/7/fs",
                "lowerdir=/var/lib/c/snapshots/3/fs",
            ],
        );
        assert_eq!(
            upper_dir(&[overlay]),
            Some(PathBuf::from("/var/lib/c/snapshots/7/fs"))
        );
        let bind = mount("bind", &["rbind", "rw"]);
        assert_eq!(upper_dir(&[bind]), None);
        assert_eq!(upper_dir(&[]), None);
    }
}
