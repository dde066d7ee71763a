//! ARL: warm sandboxes with near-zero latency for AI agents.
//!
//! One library, one binary (`src/main.rs` only parses the command line). The modules, from the
//! wire outwards:
//!
//! - [`api`]: the wire types shared by the daemon, the agent, the CLI, tests and benches;
//! - [`node`]: the per-node daemon (pools, leases, HTTP API, metrics);
//! - [`runtime`]: what a sandbox is (the `Runtime` trait and its backends);
//! - [`agent`]: the in-sandbox agent that spawns commands and moves files;
//! - [`cli`]: the command-line client of a node;
//! - [`crd`]: the custom resources of a cluster install;
//! - [`operator`]: the cluster operator (quota planner, controllers, leader election).

pub mod agent;
pub mod api;
pub mod cli;
pub mod crd;
pub mod e2b;
pub mod http;
pub mod logging;
pub mod node;
pub mod operator;
pub mod quiet_unix;
pub mod runtime;
pub mod util;
