//! Target 4: 1,000 idle warm sandboxes: daemon RSS <= 100 MB and <= 3 MB of memory per idle
//! sandbox.
//!
//! Warms a pool with `min_idle` 1000, `max` 1000 (`--create-concurrency 32`, override with
//! ARL_BENCH_NODE_ARGS) and reports how long that took, then:
//! * the daemon's VmRSS (/proc/PID/status);
//! * per sandbox: (MemAvailable before - after) / 1000 from /proc/meminfo (everything: user
//!   memory, page tables, kernel stacks, slab for namespaces and mounts, tmpfs), with the
//!   Slab / KernelStack / PageTables / Shmem deltas next to it;
//! * per sandbox: the sum of the agents' PSS (/proc/PID/smaps_rollup of each child of the
//!   daemon) / 1000, and the sandboxes' memory cgroups' usage.
//!
//! MemAvailable is system-wide: anything else running on the machine moves it too.

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const N: u64 = 1000;

const MEMINFO: &[&str] = &[
    "MemAvailable",
    "MemFree",
    "Slab",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "Shmem",
    "Cached",
];

fn snapshot() -> Vec<u64> {
    MEMINFO.iter().map(|f| meminfo_kib(f)).collect()
}

/// Sum of `memory.usage_in_bytes` (v1) or `memory.current` (v2) of the sandboxes' cgroups.
fn cgroup_usage_kib(parent: &str) -> (u64, usize) {
    let mut total = 0;
    let mut n = 0;
    for (root, file) in [
        ("/sys/fs/cgroup/memory", "memory.usage_in_bytes"),
        ("/sys/fs/cgroup", "memory.current"),
        ("/sys/fs/cgroup/unified", "memory.current"),
    ] {
        let Ok(entries) = std::fs::read_dir(format!("{root}/{parent}")) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(v) = std::fs::read_to_string(e.path().join(file))
                && let Ok(v) = v.trim().parse::<u64>()
            {
                total += v / 1024;
                n += 1;
            }
        }
        if n > 0 {
            break;
        }
    }
    (total, n)
}

fn main() {
    print_header("idle_memory (target 4)");
    let daemon = Daemon::start(
        "[pools.default]\nmin_idle = 0\nmax = 4\n",
        &["--create-concurrency", "32"],
    );
    let mut c = daemon.client();
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = daemon.rss_kib();
    let before = snapshot();

    let t0 = Instant::now();
    c.put_pool("idle", &pool_spec(N as usize, N as usize));
    let mut marks = Vec::new();
    loop {
        let idle = c.idle("idle");
        for m in [100, 250, 500, 750] {
            if idle >= m && !marks.iter().any(|(k, _)| *k == m) {
                marks.push((m, t0.elapsed()));
            }
        }
        if idle >= N {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "stuck at {idle} idle: {:?}",
            c.pool_status("idle")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let warm = t0.elapsed();
    // Let allocations settle (lazy frees, the first housekeeping pings).
    std::thread::sleep(Duration::from_secs(3));
    let after = snapshot();
    let rss1 = daemon.rss_kib();
    let hwm = status_kib(daemon.pid, "VmHWM");
    let agents = daemon.children();
    let mut pss = 0u64;
    let mut rss_agents = 0u64;
    let mut counted = 0usize;
    for &pid in &agents {
        if let Some(p) = smaps_rollup_kib(pid, "Pss") {
            pss += p;
            rss_agents += smaps_rollup_kib(pid, "Rss").unwrap_or(0);
            counted += 1;
        }
    }
    let (cg, cg_n) = cgroup_usage_kib(&daemon.cgroup_parent);
    let status = c.pool_status("idle");

    println!();
    println!(
        "warmed {N} idle sandboxes in {:.2} s ({:.0} sandboxes/s); reached {}",
        warm.as_secs_f64(),
        N as f64 / warm.as_secs_f64(),
        marks
            .iter()
            .map(|(k, t)| format!("{k} at {:.2} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "pool status: {}",
        serde_json::to_string(&status).expect("json")
    );
    println!(
        "daemon VmRSS: {:.1} MB with no sandboxes -> {:.1} MB with {N} idle (VmHWM {:.1} MB)",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("/proc/meminfo deltas (before - after, per sandbox):");
    for (i, f) in MEMINFO.iter().enumerate() {
        let d = before[i] as i64 - after[i] as i64;
        let d = if *f == "MemAvailable" || *f == "MemFree" {
            d
        } else {
            -d
        };
        println!(
            "  {f:<13} {:>9.1} MB total  {:>8.1} KiB per sandbox",
            d as f64 / 1024.0,
            d as f64 / N as f64
        );
    }
    println!(
        "agents: {counted} children of the daemon; PSS sum {:.1} MB ({:.0} KiB each), RSS sum {:.1} MB ({:.0} KiB each)",
        pss as f64 / 1024.0,
        pss as f64 / counted.max(1) as f64,
        rss_agents as f64 / 1024.0,
        rss_agents as f64 / counted.max(1) as f64
    );
    println!(
        "memory cgroups of the sandboxes: {cg_n} found, usage sum {:.1} MB ({:.0} KiB each)",
        cg as f64 / 1024.0,
        cg as f64 / cg_n.max(1) as f64
    );

    let per_sb_mb = (before[0] as f64 - after[0] as f64) / 1024.0 / N as f64;
    let pss_mb = pss as f64 / 1024.0 / N as f64;
    println!();
    println!(
        "RESULT daemon RSS with {N} idle = {:.1} MB (target <= 100 MB)  {}",
        rss1 as f64 / 1024.0,
        verdict(rss1 as f64 / 1024.0 <= 100.0)
    );
    println!(
        "RESULT memory per idle sandbox (MemAvailable delta / {N}) = {:.2} MB (target <= 3 MB)  {}",
        per_sb_mb,
        verdict(per_sb_mb <= 3.0)
    );
    println!("RESULT agent PSS per idle sandbox = {pss_mb:.2} MB");
    println!(
        "RESULT warming {N} took {:.2} s ({:.0}/s)",
        warm.as_secs_f64(),
        N as f64 / warm.as_secs_f64()
    );
    drop(c);
    let mut daemon = daemon;
    if let Some(t) = daemon.stop() {
        println!(
            "daemon stopped (SIGTERM, destroying {N} sandboxes) in {:.2} s",
            t.as_secs_f64()
        );
    }
}
