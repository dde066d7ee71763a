//! Wire types shared by the node daemon, the in-sandbox agent and the CLI.
//!
//! Everything here is plain data with serde derives; behaviour lives with its owner.

pub mod error;
pub mod exec;
pub mod files;
pub mod fs;
pub mod pools;
pub mod pty;
pub mod sandboxes;
pub mod sessions;
pub mod snapshots;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use exec::{ExecEvent, ExecOutcome, ExecRequest, ExecResult, SignalRequest};
pub use files::{FileContent, FileInfo, WriteFilesRequest, WriteFilesResponse};
pub use pools::{NetworkMode, PoolList, PoolSpec, PoolStatus, PoolView, ReusePolicy};
pub use sandboxes::{AcquireRequest, SandboxInfo, SandboxList, SandboxState};
pub use snapshots::{ForkRequest, SnapshotInfo, SnapshotList};

/// Media type of streamed exec output: one JSON [`ExecEvent`] per line.
pub const NDJSON: &str = "application/x-ndjson";

/// Header the agent sets on exec responses so the daemon can count outcomes without parsing.
pub const OUTCOME_HEADER: &str = "x-arl-exec-outcome";

/// Request header asking the agent to open a streamed exec with a `{"type":"started","pid":N}`
/// line, so that the caller can signal the command while it runs (`POST /signal`).
pub const REPORT_PID_HEADER: &str = "x-arl-report-pid";

/// Default TCP port of the node API.
pub const DEFAULT_PORT: u16 = 8420;

/// Where sandboxes see their working directory.
pub const WORKSPACE: &str = "/workspace";
