//! Runtimes turn a pool's spec into a running in-sandbox agent and tear it down.
//!
//! Everything above this trait (pools, router, API, metrics) is runtime-blind: a sandbox is an
//! id and the Unix socket its agent listens on.

pub mod containerd;
pub mod multi;
pub mod process;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use thiserror::Error;

use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;

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
    #[error("cannot take back sandbox {id}: {reason}")]
    Adopt { id: String, reason: String },
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

    /// Resolves when the sandbox has died on its own (or was destroyed).
    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;

    /// Freezes or thaws every process of the sandbox.
    fn set_paused<'a>(
        &'a self,
        id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Removes every sandbox of this state directory that the runtime does not hold (not
    /// created nor adopted by this daemon): what an earlier daemon left and nobody took back,
    /// or what a failed teardown left. Returns how many sandboxes.
    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>>;

    /// Takes back a sandbox that an earlier daemon on this state directory left running:
    /// checks that it is the one that daemon made and that it is alive, and watches it again
    /// (`exited`, `destroy`, `set_paused` work on it). An error means it cannot be vouched
    /// for; the caller destroys it.
    fn adopt<'a>(
        &'a self,
        id: &'a str,
        kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        let _ = (id, kind);
        Box::pin(async move {
            Err(RuntimeError::Unsupported {
                runtime: self.kind(),
                reason: "it cannot take back sandboxes after a restart".into(),
            })
        })
    }
}
