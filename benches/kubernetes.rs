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
//!
//! Beside it, a second daemon and test kubelet over the TCP transport (each pod's agent at its
//! own IP, `127.0.0.N`, with its token on every request): the same exec, interleaved with the
//! others, and its ratio to that daemon's own process-runtime sandbox.

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

/// One daemon with a process pool and a kubernetes pool, against a test kubelet of its own.
struct Side {
    // Dropped in this order: the client, the daemon, then its kubelet.
    c: Client,
    /// Kept (not read) so the daemon lives as long as the side.
    _daemon: Daemon,
    kube: kubelet::Running,
    proc_path: String,
    pod_path: String,
    proc_id: String,
    pod_id: String,
}

fn side(rt: &tokio::runtime::Runtime, tcp: bool) -> Side {
    let bin = arl_binary().display().to_string();
    let kube = if tcp {
        rt.block_on(kubelet::TestKubelet::start_tcp(&bin))
    } else {
        rt.block_on(kubelet::TestKubelet::start(&bin))
    };
    let args = if tcp {
        kubelet::node_args_tcp(&kube)
    } else {
        kubelet::node_args(&kube)
    };
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
    Side {
        kube,
        _daemon: daemon,
        c,
        proc_path: format!("/v1/sandboxes/{proc_id}/exec"),
        pod_path: format!("/v1/sandboxes/{pod_id}/exec"),
        proc_id,
        pod_id,
    }
}

fn main() {
    print_header("kubernetes runtime (through the test kubelet)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut unix = side(&rt, false);
    let mut tcp = side(&rt, true);
    let before = unix.kube.requests();
    let tcp_before = tcp.kube.requests();
    for s in [&mut unix, &mut tcp] {
        time_execs(&mut s.c, &s.proc_path, WARMUP, None);
        time_execs(&mut s.c, &s.pod_path, WARMUP, None);
    }
    let (mut on_proc, mut on_pod) = (Vec::new(), Vec::new());
    let (mut on_tcp_proc, mut on_tcp_pod) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        on_proc.extend(time_execs(&mut unix.c, &unix.proc_path, PER_ROUND, None));
        on_pod.extend(time_execs(&mut unix.c, &unix.pod_path, PER_ROUND, None));
        on_tcp_proc.extend(time_execs(&mut tcp.c, &tcp.proc_path, PER_ROUND, None));
        on_tcp_pod.extend(time_execs(&mut tcp.c, &tcp.pod_path, PER_ROUND, None));
    }
    for s in [&mut unix, &mut tcp] {
        s.c.release(&s.proc_id);
        s.c.release(&s.pod_id);
    }
    let tcp_during = tcp.kube.requests() - tcp_before;
    drop(tcp);

    // Acquire from the warm pod pool; each release (reuse `reset`) puts the pod back.
    let c = &mut unix.c;
    c.wait_idle("pods", 4, Duration::from_secs(60));
    let mut acquires = Vec::with_capacity(ACQUIRES);
    for _ in 0..ACQUIRES {
        let t = Instant::now();
        let id = c.acquire("pods");
        acquires.push(ms(t.elapsed()));
        c.release(&id);
        c.wait_idle("pods", 2, Duration::from_secs(30));
    }
    let during = unix.kube.requests() - before;
    for seen in unix.kube.seen().iter().skip(before) {
        println!(
            "  API request during the run: {} {}?{}",
            seen.method, seen.path, seen.query
        );
    }

    let p = stats(&on_proc);
    let k = stats(&on_pod);
    let tp = stats(&on_tcp_proc);
    let tk = stats(&on_tcp_pod);
    let a = stats(&acquires);
    let ratio = k.p50 / p.p50;
    let tcp_ratio = tk.p50 / tp.p50;
    println!();
    println!("exec /bin/true, one keep-alive connection, {ROUNDS} interleaved rounds:");
    println!("  process-runtime sandbox     {}", p.line_ms());
    println!("  kubernetes-runtime sandbox  {}", k.line_ms());
    println!(
        "  ratio of p50s (kubernetes / process): {ratio:.3}  target <= 1.1: {}",
        verdict(ratio <= 1.1)
    );
    println!(
        "over the TCP transport (a second daemon; agents at their pod IPs, token per sandbox):"
    );
    println!("  process-runtime sandbox     {}", tp.line_ms());
    println!("  kubernetes-runtime sandbox  {}", tk.line_ms());
    println!(
        "  ratio of p50s (kubernetes over TCP / process): {tcp_ratio:.3}; TCP / Unix-socket pod: {:.3}",
        tk.p50 / k.p50
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
    println!(
        "API requests of the TCP daemon during its {} execs: {tcp_during}  target 0: {}",
        on_tcp_proc.len() + on_tcp_pod.len() + 2 * WARMUP,
        verdict(tcp_during == 0)
    );
    drop(unix);
}
