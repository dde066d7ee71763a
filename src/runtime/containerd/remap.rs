//! The image's root filesystem shifted into the sandboxes' user namespace.
//!
//! Sandboxes run in a user namespace whose root is an unprivileged host uid (`host_id`), so
//! image files owned by host root would be nobody's inside. containerd 1.6 and runc 1.1 have
//! no idmapped mounts, so, once per image and daemon, a copy of the image's top snapshot is
//! chowned by `host_id` and committed; every sandbox's snapshot is then a cheap layer on it.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::CommitSnapshotRequest;
use containerd_client::types::Mount;

use super::{ContainerdError, ContainerdRuntime, OWNER_LABEL, SNAPSHOTTER, call, req};

/// Container ids 0..IDS map to host ids `host_id..host_id + IDS`.
pub const IDS: u32 = 65536;

impl ContainerdRuntime {
    /// The committed snapshot, owned by the sandboxes' root, that sandboxes of the image whose
    /// top snapshot is `chain` start from; made on first use.
    pub(super) async fn remapped(&self, chain: &str) -> Result<String, ContainerdError> {
        let name = format!(
            "arl-remap-{}-{}-{}",
            self.owner,
            self.host_id,
            chain.trim_start_matches("sha256:")
        );
        if self.images.snapshot_exists(&name).await? {
            return Ok(name);
        }
        // Made one at a time; whoever waited finds it made.
        let _one_at_a_time = self.remaps.lock().await;
        if self.images.snapshot_exists(&name).await? {
            return Ok(name);
        }
        let work = format!("{name}-work");
        let _ = self.remove_snapshot(&work).await;
        let labels = HashMap::from([
            (OWNER_LABEL.to_string(), self.owner.clone()),
            // Kept until the daemon removes it (its sweep goes by the owner label).
            ("containerd.io/gc.root".to_string(), "arl".to_string()),
        ]);
        let mounts = self
            .images
            .prepare_snapshot(&work, chain, labels.clone(), None)
            .await?;
        let target = self.dir.join(format!("remap-{}", std::process::id()));
        let shift = self.host_id;
        let chowned = tokio::task::spawn_blocking(move || chown_tree(&mounts, &target, shift))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        if let Err(reason) = chowned {
            let _ = self.remove_snapshot(&work).await;
            return Err(ContainerdError::Image {
                image: chain.to_string(),
                reason: format!("shifting the root filesystem into the user namespace: {reason}"),
            });
        }
        let committed = self
            .client
            .snapshots()
            .commit(req(
                CommitSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    name: name.clone(),
                    key: work.clone(),
                    labels,
                },
                None,
            ))
            .await;
        if let Err(s) = committed {
            let _ = self.remove_snapshot(&work).await;
            return Err(call("Snapshots.Commit")(s));
        }
        tracing::info!(snapshot = %name, "image root filesystem shifted for user namespaces");
        Ok(name)
    }

    pub(super) async fn remove_snapshot(&self, key: &str) -> Result<(), ContainerdError> {
        self.images
            .remove_snapshot(key)
            .await
            .map_err(call("Snapshots.Remove"))
    }
}

/// Mounts the snapshot at `target`, adds `shift` to every owner and group in it, unmounts.
fn chown_tree(mounts: &[Mount], target: &Path, shift: u32) -> Result<(), String> {
    let mount = mounts.first().ok_or("the snapshot has no mounts")?;
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let bind = mount.options.iter().any(|o| o == "bind" || o == "rbind");
    let data: Vec<&str> = mount
        .options
        .iter()
        .map(String::as_str)
        .filter(|o| !matches!(*o, "bind" | "rbind" | "rw" | "ro"))
        .collect();
    let flags = if bind {
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC
    } else {
        nix::mount::MsFlags::empty()
    };
    let data = data.join(",");
    nix::mount::mount(
        Some(mount.source.as_str()),
        target,
        Some(mount.r#type.as_str()),
        flags,
        (!bind).then_some(data.as_str()),
    )
    .map_err(|e| format!("mount {}: {e}", mount.r#type))?;
    let walked = shift_owners(target, shift);
    let unmounted = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(target);
    walked?;
    unmounted.map_err(|e| format!("unmount: {e}"))
}

/// Every entry below (and including) `root`: uid and gid plus `shift`. chown clears the
/// set-id bits, so they are put back on regular files.
fn shift_owners(root: &Path, shift: u32) -> Result<(), String> {
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid >= IDS || gid >= IDS {
            // Already outside the container's range: leave it as it is (nobody's inside).
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(uid + shift), Some(gid + shift))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
        let mode = meta.permissions().mode();
        if meta.is_file() && mode & 0o6000 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| format!("{}: {e}", path.display()))? {
                stack.push(entry.map_err(|e| e.to_string())?.path());
            }
        }
    }
    Ok(())
}
