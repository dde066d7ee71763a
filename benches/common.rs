//! Shared helpers of the daemon benches: the machine description, a daemon started from the
//! release binary, a tiny raw keep-alive HTTP/1.1 client, the "floor" server, Prometheus text
//! parsing and percentile statistics.
//!
//! One file per job under `common/`. Each bench includes this file with
//! `#[path = "common.rs"] mod common;`. Run on its own
//! (`cargo bench --bench common`) it prints the machine description and a floor self-check.
#![allow(dead_code)]

// Starting and stopping `arl node`, ports and cgroups: written once for tests and benches.
#[path = "../tests/common/node.rs"]
mod node;

#[allow(unused_imports)] // each bench uses a part
pub use node::{
    NodeCommand, Stopped, cgroup_roots, clear_cgroup_parent, free_port, terminate, unmount_under,
};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "common/machine.rs"]
mod machine;
#[allow(unused_imports)] // each bench uses a part
pub use machine::*;
#[path = "common/stats.rs"]
mod stats;
#[allow(unused_imports)] // each bench uses a part
pub use stats::*;
#[path = "common/daemon.rs"]
mod daemon;
#[allow(unused_imports)] // each bench uses a part
pub use daemon::*;
#[path = "common/client.rs"]
mod client;
#[allow(unused_imports)] // each bench uses a part
pub use client::*;
#[path = "common/metrics.rs"]
mod metrics;
#[allow(unused_imports)] // each bench uses a part
pub use metrics::*;
#[path = "common/floor.rs"]
mod floor;
#[allow(unused_imports)] // each bench uses a part
pub use floor::*;

/// `cargo bench --bench common`: the machine and a floor self-check.
fn main() {
    print_header("common (machine + floor self-check)");
    let floor = Floor::start();
    let mut c = floor.client();
    time_execs(&mut c, "/exec", 100, None);
    let s = stats(&time_execs(&mut c, "/exec", 1000, None));
    println!(
        "floor: exec /bin/true via a minimal keep-alive HTTP server: {}",
        s.line_ms()
    );
}
