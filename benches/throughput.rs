//! Target 5: 64 concurrent clients (64 connections, each with its own sandbox) exec
//! `/bin/true` as fast as they can: >= 1,500 exec/s. The same-run floor: 64 clients against
//! the minimal keep-alive HTTP server that spawns `/bin/true` per request.
//!
//! Also reports the CPU spent per exec by the daemon, by the agents (with their `/bin/true`
//! children) and by the bench process, to show where the cores go.

#[path = "common.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 64;
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(10);

struct Run {
    rate: f64,
    lat: Stats,
    calls: usize,
    cpu: Vec<(String, f64)>,
}

/// `CLIENTS` threads, one connection each, POST `paths[i]` in a loop for WARMUP + RUN; only
/// calls that start inside RUN count.
fn hammer(addr: SocketAddr, paths: Vec<String>, cpu_of: &dyn Fn() -> Vec<(String, f64)>) -> Run {
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for path in paths {
        let barrier = barrier.clone();
        let stop = stop.clone();
        let measuring = measuring.clone();
        let mut c = Client::connect(addr).expect("connect");
        threads.push(std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(4096);
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let counted = measuring.load(Ordering::Relaxed);
                let t = Instant::now();
                let r = c.request("POST", &path, Some(EXEC_TRUE)).expect("exec");
                let d = ms(t.elapsed());
                assert_eq!(r.status, 200, "exec: {}", r.text());
                if counted && !stop.load(Ordering::Relaxed) {
                    lat.push(d);
                }
            }
            lat
        }));
    }
    barrier.wait();
    std::thread::sleep(WARMUP);
    let cpu0 = cpu_of();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let cpu1 = cpu_of();
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().expect("client thread"));
    }
    let calls = lat.len();
    let cpu = cpu1
        .iter()
        .zip(&cpu0)
        .map(|((k, a), (_, b))| (k.clone(), a - b))
        .collect();
    Run {
        rate: calls as f64 / elapsed.as_secs_f64(),
        lat: stats(&lat),
        calls,
        cpu,
    }
}

fn print_run(label: &str, r: &Run) {
    println!(
        "{label}: {} calls in {:.0} s = {:.0} exec/s; latency {}",
        r.calls,
        RUN.as_secs_f64(),
        r.rate,
        r.lat.line_ms()
    );
    let total: f64 = r.cpu.iter().map(|(_, v)| v).sum();
    let parts: Vec<String> = r
        .cpu
        .iter()
        .map(|(k, v)| format!("{k} {:.0} us", v / r.calls.max(1) as f64 * 1e6))
        .collect();
    println!(
        "  CPU per exec: {} = {:.0} us total; {:.2} of {} cores busy",
        parts.join(" + "),
        total / r.calls.max(1) as f64 * 1e6,
        total / RUN.as_secs_f64(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
}

/// Sets the sandboxes' parent cgroup's CPU weight to 64x the default (v1 `cpu.shares`, or v2
/// `cpu.weight`); what it wrote, if it could.
/// The parent cgroup's CPU weight file and the value the daemon gave it.
fn parent_weight(parent: &str) -> Option<(String, String)> {
    [
        format!("/sys/fs/cgroup/cpu/{parent}/cpu.shares"),
        format!("/sys/fs/cgroup/{parent}/cpu.weight"),
    ]
    .into_iter()
    .find_map(|file| {
        let value = std::fs::read_to_string(&file).ok()?;
        Some((file, value.trim().to_string()))
    })
}

fn raise_parent_weight(parent: &str) -> Option<String> {
    let (file, original) = parent_weight(parent)?;
    let raised = if file.ends_with("cpu.shares") {
        "65536"
    } else {
        "6400"
    };
    std::fs::write(&file, raised).ok()?;
    Some(format!(
        "{} {original} -> {raised}",
        file.rsplit('/').next().unwrap_or("")
    ))
}

fn restore_parent_weight(original: &Option<(String, String)>) {
    if let Some((file, value)) = original {
        let _ = std::fs::write(file, value);
    }
}

fn main() {
    print_header("throughput (target 5)");
    let daemon = Daemon::start("[pools.default]\nmin_idle = 0\nmax = 4\n", &[]);
    let mut c = daemon.client();
    c.put_pool("tp", &pool_spec(CLIENTS, 2 * CLIENTS + 8));
    c.wait_idle("tp", CLIENTS as u64, Duration::from_secs(60));
    let paths: Vec<String> = (0..CLIENTS)
        .map(|_| format!("/v1/sandboxes/{}/exec", c.acquire("tp")))
        .collect();
    // Replacements for the acquired sandboxes are being created: let them finish.
    c.wait_idle("tp", CLIENTS as u64, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let me = std::process::id();
    let dpid = daemon.pid;
    let agents = daemon.children();
    let daemon_cpu = move || {
        vec![
            ("daemon".to_string(), cpu_seconds(dpid).0),
            ("agents+children".to_string(), cpu_total(&agents)),
            ("bench client".to_string(), cpu_seconds(me).0),
        ]
    };
    let arl = hammer(daemon.addr, paths.clone(), &daemon_cpu);

    // Diagnostic: every sandbox has its own cpu cgroup under the daemon's parent, and with CFS
    // group scheduling the parent (the daemon gives it the weight of every core) is what
    // competes with everything else on the machine. Raise its weight further and run again.
    let original = parent_weight(&daemon.cgroup_parent);
    let shares = raise_parent_weight(&daemon.cgroup_parent);
    let boosted = shares.map(|s| (s, hammer(daemon.addr, paths.clone(), &daemon_cpu)));
    // And back to the daemon's weight, to rule out a warm-up effect of running second.
    let again = boosted.as_ref().map(|_| {
        restore_parent_weight(&original);
        hammer(daemon.addr, paths, &daemon_cpu)
    });

    let floor = Floor::start();
    let floor_cpu = move || {
        let (own, kids) = cpu_seconds(me);
        vec![
            ("bench client + floor server".to_string(), own),
            ("/bin/true children".to_string(), kids),
        ]
    };
    let flo = hammer(floor.addr, vec!["/exec".to_string(); CLIENTS], &floor_cpu);

    println!();
    print_run(&format!("arl daemon, {CLIENTS} clients"), &arl);
    print_run(&format!("floor, {CLIENTS} clients"), &flo);
    if let Some(a) = &again {
        print_run(
            &format!("diagnostic: arl daemon, {CLIENTS} clients, default weight again"),
            a,
        );
    }
    if let Some((what, b)) = &boosted {
        print_run(
            &format!("diagnostic: arl daemon, {CLIENTS} clients, sandboxes' parent cgroup {what}"),
            b,
        );
    }
    println!();
    println!(
        "RESULT {CLIENTS}-client exec rate = {:.0} exec/s (target >= 1500/s)  {}",
        arl.rate,
        verdict(arl.rate >= 1500.0)
    );
    println!(
        "RESULT floor rate = {:.0} exec/s; arl/floor = {:.2}",
        flo.rate,
        arl.rate / flo.rate
    );
    if let Some(a) = &again {
        println!(
            "RESULT diagnostic, default weight again: {:.0} exec/s, p50 {:.2} ms, p99 {:.2} ms",
            a.rate, a.lat.p50, a.lat.p99
        );
    }
    if let Some((what, b)) = &boosted {
        println!(
            "RESULT diagnostic, parent cgroup {what}: {:.0} exec/s, p50 {:.2} ms, p99 {:.2} ms",
            b.rate, b.lat.p50, b.lat.p99
        );
    }
    println!(
        "RESULT latency under load: arl p50 {:.2} ms p99 {:.2} ms; floor p50 {:.2} ms p99 {:.2} ms",
        arl.lat.p50, arl.lat.p99, flo.lat.p50, flo.lat.p99
    );
    drop(c);
    let mut daemon = daemon;
    if let Some(t) = daemon.stop() {
        println!("daemon stopped (SIGTERM) in {:.0} ms", ms(t));
    }
}
