//! The thin cluster operator: it decides how many warm sandboxes each node keeps per pool,
//! binds declarative Sandboxes to nodes, and never touches the hot path.
//!
//! - [`planner`]: the quota planner, a pure function;
//! - [`convert`]: Kubernetes objects → the planner's inputs;
//! - [`desired`]: one pass, as a pure function from what the operator sees to the writes
//!   (with [`rollup`] for `WarmPool.status` and [`binding`] for Sandboxes);
//! - [`apply`]: the writes, with conflict retries;
//! - [`lease`]: leader election on a Lease;
//! - [`health`]: the probes and metrics endpoint;
//! - [`run`]: watches, the pass loop, the process.
//!
//! Tasks are not the operator's: the daemon of the node a Task's Sandbox is bound to runs it.

pub mod apply;
pub mod binding;
pub mod convert;
pub mod desired;
pub mod health;
pub mod lease;
pub mod planner;
pub mod rollup;
pub mod run;

#[cfg(test)]
mod tests;

use std::time::Duration;

use desired::PassOptions;
use lease::LeaseConfig;

/// `arl operator` settings.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// The node daemons' API port (published in Sandbox status).
    #[arg(long, env = "ARL_NODE_PORT", default_value_t = 8420)]
    pub node_port: u16,
    /// The namespace the node daemons serve (their `--sandbox-namespace`): WarmPools
    /// elsewhere get no shards and a condition saying so.
    #[arg(long, env = "ARL_SANDBOX_NAMESPACE", default_value = "arl-sandboxes")]
    pub sandbox_namespace: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "ARL_LEASE_NAMESPACE", default_value = "arl-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "ARL_LEASE_NAME", default_value = "arl-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease [default: the host name]
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease lasts without renewal.
    #[arg(long, env = "ARL_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(
        long,
        env = "ARL_OPERATOR_HEALTH_LISTEN",
        default_value = "0.0.0.0:8081"
    )]
    pub health_listen: std::net::SocketAddr,
}

/// `arl operator`.
pub fn main(args: OperatorArgs) -> i32 {
    crate::logging::init();
    let identity = args.identity.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| crate::util::random_id("operator-"))
    });
    let lease = LeaseConfig {
        namespace: args.lease_namespace,
        name: args.lease_name,
        identity,
        duration: Duration::from_secs(args.lease_seconds.max(3)),
    };
    let options = PassOptions {
        node_port: args.node_port,
        sandbox_namespace: args.sandbox_namespace,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arl operator: {e}");
            return 1;
        }
    };
    match runtime.block_on(run::run(lease, options, args.health_listen)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("arl operator: {e}");
            1
        }
    }
}
