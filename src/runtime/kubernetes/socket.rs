//! The way from the host to a pod's agent: the pod's `arl-run` emptyDir as the kubelet keeps
//! it (`<pods dir>/<pod uid>/volumes/kubernetes.io~empty-dir/arl-run/`), held open as a
//! directory descriptor. The agent's address is then `/proc/self/fd/<n>/agent.sock`, which
//! fits the 108 bytes of a socket path whatever the kubelet's root.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use super::pod::{RUN_VOLUME, SOCKET_NAME};

/// The host directory of a pod's `arl-run` emptyDir.
pub fn run_dir(pods_dir: &Path, uid: &str) -> PathBuf {
    pods_dir
        .join(uid)
        .join("volumes")
        .join("kubernetes.io~empty-dir")
        .join(RUN_VOLUME)
}

/// An open pod directory and the socket address through it.
#[derive(Debug)]
pub struct AgentDir {
    fd: OwnedFd,
}

impl AgentDir {
    /// Opens the pod's run directory (it must exist: the kubelet made it before the pod ran).
    pub fn open(pods_dir: &Path, uid: &str) -> Result<Self, String> {
        if uid.is_empty() || uid.contains('/') || uid.contains("..") {
            return Err(format!("pod uid {uid:?} is not a uid"));
        }
        let dir = run_dir(pods_dir, uid);
        let fd = open(
            &dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            format!(
                "cannot open the pod's socket directory {}: {e}",
                dir.display()
            )
        })?;
        Ok(Self { fd })
    }

    /// The agent's socket, through the open descriptor.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}/{SOCKET_NAME}",
            self.fd.as_raw_fd()
        ))
    }
}
