//! The `kubernetes` runtime's numbers, through the test kubelet (`tests/kubelet/`: a real HTTP
//! API server and a kubelet that runs each pod's agent as a process sandbox with its socket in
//! the pod's emptyDir). One daemon serves a `process` pool and a `kubernetes` pool side by side.
//!
//! Targets:
//! * exec `/bin/true` through a kubernetes-runtime sandbox: p50 <= 1.1x the same exec through a
//!   process-runtime sandbox of the same daemon, same run (interleaved rounds): the runtime adds
//!   nothing to the hot path (both reach their agent over a Unix socket);
//! * acquire p50 <= 0.3 ms from the warm kubernetes pool;
//! * 0 API requests of any kind during the acquires, execs and releases (the test API server
//!   counts every request it receives).

#[path = "common.rs"]
mod common;
#[path = "../tests/kubelet/mod.rs"]
mod kubelet;

use std::time::{Duration, Instant};

use common::*;

const WARMUP: usize = 200;
const ROUNDS: usize = 5;
const PER_ROUND: usize = 400;
const ACQUIRES: usize = 500;

const CONFIG: &str = "[pools.proc]\nmin_idle = 1\nmax = 4\n\n\
[pools.pods]\nruntime = \"kubernetes\"\nimage = \"registry.example/task:1\"\nmin_idle = 4\nmax = 16\nreuse = \"reset\"\n";

fn main() {
    print_header("kubernetes runtime (through the test kubelet)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let bin = arl_binary();
    let kube = rt.block_on(kubelet::TestKubelet::start(&bin.display().to_string()));
    let args = kubelet::node_args(&kube);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start(CONFIG, &args);
    let mut c = daemon.client();
    c.wait_idle("proc", 1, Duration::from_secs(60));
    c.wait_idle("pods", 4, Duration::from_secs(120));
    let proc_id = c.acquire("proc");
    let pod_id = c.acquire("pods");
    // The pod lent out is replaced in the background (a refill: one pod created); once the
    // pool is whole again, nothing may reach the API: the watches are open, and acquires,
    // execs and releases (reuse `reset`) never call it.
    c.wait_idle("pods", 4, Duration::from_secs(60));
    let before = kube.requests();
    let proc_path = format!("/v1/sandboxes/{proc_id}/exec");
    let pod_path = format!("/v1/sandboxes/{pod_id}/exec");
    time_execs(&mut c, &proc_path, WARMUP, None);
    time_execs(&mut c, &pod_path, WARMUP, None);
    let (mut on_proc, mut on_pod) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        on_proc.extend(time_execs(&mut c, &proc_path, PER_ROUND, None));
        on_pod.extend(time_execs(&mut c, &pod_path, PER_ROUND, None));
    }
    c.release(&proc_id);
    c.release(&pod_id);

    // Acquire from the warm pod pool; each release (reuse `reset`) puts the pod back.
    c.wait_idle("pods", 4, Duration::from_secs(60));
    let mut acquires = Vec::with_capacity(ACQUIRES);
    for _ in 0..ACQUIRES {
        let t = Instant::now();
        let id = c.acquire("pods");
        acquires.push(ms(t.elapsed()));
        c.release(&id);
        c.wait_idle("pods", 2, Duration::from_secs(30));
    }
    let during = kube.requests() - before;
    for seen in kube.seen().iter().skip(before) {
        println!(
            "  API request during the run: {} {}?{}",
            seen.method, seen.path, seen.query
        );
    }

    let p = stats(&on_proc);
    let k = stats(&on_pod);
    let a = stats(&acquires);
    let ratio = k.p50 / p.p50;
    println!();
    println!("exec /bin/true, one keep-alive connection, {ROUNDS} interleaved rounds:");
    println!("  process-runtime sandbox     {}", p.line_ms());
    println!("  kubernetes-runtime sandbox  {}", k.line_ms());
    println!(
        "  ratio of p50s (kubernetes / process): {ratio:.3}  target <= 1.1: {}",
        verdict(ratio <= 1.1)
    );
    println!("acquire from the warm kubernetes pool (release outside the timed region):");
    println!(
        "  {}  target p50 <= 0.3 ms: {}",
        a.line_ms(),
        verdict(a.p50 <= 0.3)
    );
    println!(
        "API requests during {} execs, {} acquires and their releases: {during}  target 0: {}",
        on_proc.len() + on_pod.len() + 2 * WARMUP,
        ACQUIRES + 2,
        verdict(during == 0)
    );
    drop(daemon);
    drop(kube);
}
