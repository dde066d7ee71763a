//! Runtimes turn a pool's spec into a running in-sandbox agent and tear it down.
//!
//! Everything above this trait (pools, router, API, metrics) is runtime-blind: a sandbox is an
//! id and the Unix socket its agent listens on.

pub mod containerd;
pub mod exit;
pub mod multi;
pub mod process;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use thiserror::Error;

use crate::api::PoolSpec;
pub use exit::ExitReason;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("this host cannot run {runtime} sandboxes: {reason}")]
    Unsupported {
        runtime: &'static str,
        reason: String,
    },
    #[error("creating a sandbox failed: {0}")]
    Create(String),
    #[error("destroying sandbox {id} failed: {reason}")]
    Destroy { id: String, reason: String },
    #[error(transparent)]
    Cgroup(#[from] process::cgroup::CgroupError),
    #[error(transparent)]
    Containerd(#[from] containerd::ContainerdError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A sandbox the runtime has started.
#[derive(Debug, Clone)]
pub struct Created {
    /// Where the daemon reaches the sandbox's agent.
    pub socket: PathBuf,
}

pub trait Runtime: Send + Sync + 'static {
    /// Short name for logs and metric labels.
    fn kind(&self) -> &'static str;

    fn create<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>>;

    /// Stops every process of the sandbox and removes all it used. Idempotent.
    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Resolves when the sandbox has died on its own (or was destroyed), with the cause.
    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ExitReason>;

    /// Freezes or thaws every process of the sandbox.
    fn set_paused<'a>(
        &'a self,
        id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Removes what an earlier daemon on this host left behind; returns how many sandboxes.
    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>>;
}
