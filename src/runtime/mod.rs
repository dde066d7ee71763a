//! Runtimes turn a pool's spec into a running in-sandbox agent and tear it down.
//!
//! Everything above this trait (pools, router, API, metrics) is runtime-blind: a sandbox is an
//! id and the address its agent listens on. Backends register in a [`registry::Runtimes`] by
//! kind; adding one is a module here and one `register` call at start-up.

pub mod containerd;
pub mod exit;
pub mod kubernetes;
pub mod process;
pub mod registry;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use thiserror::Error;

use crate::api::pools::RuntimeKind;
use crate::api::{ApiError, ErrorCode, PoolSpec};
pub use exit::ExitReason;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The error of a backend, kept whole as the source of a [`RuntimeError`].
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// This node cannot make this kind of sandbox at all (no containerd, no user namespaces, ...).
    #[error("this host cannot run {runtime} sandboxes: {reason}")]
    Unavailable {
        runtime: &'static str,
        reason: String,
    },
    /// The runtime has no such operation.
    #[error("{runtime} sandboxes cannot {operation}")]
    NotSupported {
        runtime: &'static str,
        operation: &'static str,
    },
    #[error("creating a sandbox failed: {0}")]
    Create(String),
    /// A creation or teardown ran past the runtime's time budget.
    #[error("{runtime}: {operation} sandbox {id} took longer than {} s", budget.as_secs())]
    OverBudget {
        runtime: &'static str,
        operation: &'static str,
        id: String,
        budget: Duration,
    },
    /// A sandbox an earlier daemon left cannot be vouched for.
    #[error("cannot take back sandbox {id}: {reason}")]
    Adopt { id: String, reason: String },
    #[error("destroying sandbox {id} failed: {reason}")]
    Destroy { id: String, reason: String },
    /// A failure inside a backend (its own error type is the source).
    #[error("{runtime}: {source}")]
    Backend {
        runtime: &'static str,
        #[source]
        source: BackendError,
    },
    /// A snapshot would be larger than the bytes allowed to it.
    #[error(
        "the sandbox's writable state is over the {limit} bytes left for snapshots on this node"
    )]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The wire shape of a runtime failure, at the edge of the API.
impl From<RuntimeError> for ApiError {
    fn from(err: RuntimeError) -> Self {
        match err {
            RuntimeError::NotSupported { .. } => {
                ApiError::new(ErrorCode::NotSupported, err.to_string())
            }
            RuntimeError::TooLarge { .. } => {
                ApiError::new(ErrorCode::PayloadTooLarge, err.to_string())
            }
            RuntimeError::Unavailable { .. }
            | RuntimeError::Create(_)
            | RuntimeError::Adopt { .. }
            | RuntimeError::OverBudget { .. } => ApiError::unavailable(err.to_string()),
            RuntimeError::Destroy { .. } | RuntimeError::Backend { .. } | RuntimeError::Io(_) => {
                ApiError::internal(err.to_string())
            }
        }
    }
}

/// Where the daemon reaches a sandbox's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// A Unix socket on this host (process and containerd sandboxes; pods through the
    /// kubelet's pod directory).
    Unix(PathBuf),
    /// A TCP address (a pod's IP, where its kubelet directory cannot be reached), where the
    /// agent answers only requests that carry the sandbox's token.
    Tcp {
        addr: std::net::SocketAddr,
        token: AgentToken,
    },
}

/// The secret that a TCP-reached agent asks of every request (`Authorization: Bearer`): 256
/// random bits per sandbox, written as 64 hex digits. Never shown by `Debug`.
#[derive(Clone)]
pub struct AgentToken(String);

/// The environment variable a TCP-listening agent reads its token from.
pub const AGENT_TOKEN_ENV: &str = "ARL_AGENT_TOKEN";

impl AgentToken {
    /// A fresh token from the kernel's random source.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        crate::util::random_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// A token handed over as text (a Secret's value, an environment variable); `None` unless
    /// it is 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(text.to_ascii_lowercase()))
    }

    /// The token's text, for the few places that hand it on (the pod's Secret, a header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        // Lengths are public (always 64); only the contents are compared in constant time.
        presented.len() == self.0.len() && bool::from(self.0.as_bytes().ct_eq(presented))
    }
}

impl PartialEq for AgentToken {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for AgentToken {}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

/// A sandbox the runtime has started.
#[derive(Debug, Clone)]
pub struct Created {
    /// Where the daemon reaches the sandbox's agent.
    pub agent: AgentAddress,
}

/// How long a runtime's creations and teardowns may take before they count as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub create: Duration,
    pub destroy: Duration,
}

pub trait Runtime: Send + Sync + 'static {
    /// Short name for logs and metric labels.
    fn kind(&self) -> &'static str;

    /// Checks what only this runtime knows about a pool's spec (the generic bounds are
    /// `PoolSpec::validate`'s); the message says what to fix.
    fn validate(&self, _spec: &PoolSpec) -> Result<(), String> {
        Ok(())
    }

    /// Time budgets of this runtime's creations and teardowns.
    fn budgets(&self) -> Budgets {
        Budgets {
            create: Duration::from_secs(60),
            destroy: Duration::from_secs(30),
        }
    }

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
        _id: &'a str,
        _paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        let kind = self.kind();
        Box::pin(async move {
            Err(RuntimeError::NotSupported {
                runtime: kind,
                operation: "pause",
            })
        })
    }

    /// Copies the sandbox's writable state (its files, never its processes) into `dest`, a
    /// directory that does not exist yet, to be stacked under forks; at most `limit` bytes.
    /// The caller has frozen the sandbox. Returns the bytes copied.
    fn snapshot<'a>(
        &'a self,
        _id: &'a str,
        _dest: &'a Path,
        _limit: u64,
    ) -> BoxFuture<'a, Result<u64, RuntimeError>> {
        let kind = self.kind();
        Box::pin(async move {
            Err(RuntimeError::NotSupported {
                runtime: kind,
                operation: "snapshot",
            })
        })
    }

    /// Creates a sandbox whose writable state starts as the snapshots in `base` (top first,
    /// each one `snapshot`'s `dest`), copy-on-write where the runtime can.
    fn fork<'a>(
        &'a self,
        _id: &'a str,
        _spec: &'a PoolSpec,
        _base: &'a [PathBuf],
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        let kind = self.kind();
        Box::pin(async move {
            Err(RuntimeError::NotSupported {
                runtime: kind,
                operation: "fork",
            })
        })
    }

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
        _id: &'a str,
        _kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        let kind = self.kind();
        Box::pin(async move {
            Err(RuntimeError::NotSupported {
                runtime: kind,
                operation: "be taken back after a restart",
            })
        })
    }
}
