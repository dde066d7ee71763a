//! The containerd runtime (issue 4): a new containerd sandbox ready, and exec `/bin/true`
//! through ARL against `ctr task exec` into the same container, in the same run.
//!
//! * Ready, p50 <= 150 ms: take the only idle sandbox of a pool with `min_idle` 1 and time
//!   until the pool shows 1 idle again (container created, task started, agent answered).
//! * Exec, p50 <= 1 ms and >= 15x faster than `ctr -n arl task exec` of `/bin/true` into the
//!   same container (the CLI the operators would use; it includes the Go CLI's start-up).
//!
//! Needs containerd running and the test image imported: `scripts/containerd.sh` (as root).

#[path = "common.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const IMAGE: &str = "docker.io/arl/test:latest";

fn samples(default: usize) -> usize {
    std::env::var("ARL_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    print_header("containerd runtime (issue 4)");
    let config = format!(
        "[pools.ctr]\nruntime = \"containerd\"\nimage = \"{IMAGE}\"\nmin_idle = 1\nmax = 4\n"
    );
    let daemon = Daemon::start(&config, &[]);
    let mut c = daemon.client();
    c.wait_idle("ctr", 1, Duration::from_secs(60));

    // --- Ready latency, one at a time.
    for _ in 0..10 {
        let id = c.acquire("ctr");
        c.wait_idle("ctr", 1, Duration::from_secs(30));
        c.release(&id);
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = samples(200);
    let mut ready = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let id = c.acquire("ctr");
        loop {
            if c.pool_status("ctr").idle == 1 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no replacement");
            std::thread::sleep(Duration::from_micros(250));
        }
        ready.push(ms(t0.elapsed()));
        c.release(&id);
        // Let the destroy finish outside the timed region.
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = stats(&ready);
    println!("new containerd sandbox ready: {}", ready.line_ms());
    println!("  target p50 <= 150 ms: {}", verdict(ready.p50 <= 150.0));

    // --- Exec through ARL vs `ctr task exec` into the same container.
    let id = c.acquire("ctr");
    let path = format!("/v1/sandboxes/{id}/exec");
    time_execs(&mut c, &path, 100, None);
    let arl = stats(&time_execs(&mut c, &path, samples(1000), None));
    let m = samples(50).min(100);
    let mut ctr = Vec::with_capacity(m);
    for i in 0..m + 5 {
        let t = Instant::now();
        let out = Command::new("ctr")
            .args(["-n", "arl", "task", "exec", "--exec-id"])
            .arg(format!("bench-{i}"))
            .arg(&id)
            .arg("/bin/true")
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr task exec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i >= 5 {
            ctr.push(ms(t.elapsed()));
        }
    }
    let ctr = stats(&ctr);
    println!("exec /bin/true through ARL:     {}", arl.line_ms());
    println!("exec /bin/true with ctr task exec: {}", ctr.line_ms());
    let ratio = ctr.p50 / arl.p50;
    println!(
        "  target p50 <= 1 ms: {}; target >= 15x faster than ctr: {:.1}x {}",
        verdict(arl.p50 <= 1.0),
        ratio,
        verdict(ratio >= 15.0)
    );
    c.release(&id);
}
