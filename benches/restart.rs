//! Issue 11: restart to serving again with many leased sandboxes (process runtime).
//!
//! A daemon with `--handover` warms N sandboxes (default 1000, `ARL_BENCH_RESTART_N`) and
//! leases them all. Then, R times: SIGTERM (the daemon hands over and exits), start a new
//! daemon on the same state directory and time until it serves again: `/healthz` answers and
//! an exec in a leased sandbox succeeds. Each restart must take every sandbox back (checked:
//! the pool shows N allocated, none created anew). Target: restart to serving <= 2 s.
//! At the end the last daemon hands over once more and `arl node cleanup` removes everything.

#[path = "common.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

const ROUNDS: usize = 5;

fn sandboxes() -> usize {
    std::env::var("ARL_BENCH_RESTART_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

struct Node {
    bin: PathBuf,
    dir: PathBuf,
    addr: SocketAddr,
    cgroup_parent: String,
}

impl Node {
    fn spawn(&self) -> Child {
        NodeCommand {
            bin: self.bin.clone(),
            listen: self.addr.to_string(),
            state_dir: self.dir.join("state"),
            cgroup_parent: self.cgroup_parent.clone(),
            config: Some(self.dir.join("node.toml")),
            token_file: None,
            log: self.dir.join("node.log"),
            log_filter: "warn".into(),
            args: vec!["--handover".into()],
        }
        .spawn()
        .expect("start arl node")
    }

    /// Polls until the daemon answers `/healthz`.
    fn wait_healthy(&self, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default();
                panic!("arl node exited ({status}):\n{log}");
            }
            if let Ok(mut c) = Client::connect(self.addr)
                && let Ok(r) = c.request("GET", "/healthz", None)
                && r.status == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "arl node never became healthy");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn cleanup(&self) -> String {
        let out = Command::new(&self.bin)
            .args(["node", "cleanup", "--state-dir"])
            .arg(self.dir.join("state"))
            .args(["--cgroup-parent", &self.cgroup_parent])
            .env("ARL_LOG", "warn")
            .output()
            .expect("arl node cleanup");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// SIGTERM and wait for the exit; returns how long the hand-over took.
fn hand_over(child: &mut Child) -> Duration {
    let started = Instant::now();
    // SAFETY: kill(2) of our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    started.elapsed()
}

fn exec_ok(addr: SocketAddr, id: &str) -> bool {
    let Ok(mut c) = Client::connect(addr) else {
        return false;
    };
    let body = serde_json::to_vec(&arl::api::ExecRequest {
        cmd: Some(vec!["true".into()]),
        ..Default::default()
    })
    .expect("json");
    matches!(
        c.request("POST", &format!("/v1/sandboxes/{id}/exec"), Some(&body)),
        Ok(r) if r.status == 200
    )
}

fn agents_in(cgroup_parent: &str) -> usize {
    let mut n = 0;
    for root in cgroup_roots() {
        if let Ok(entries) = std::fs::read_dir(root.join(cgroup_parent).as_path()) {
            n = n.max(entries.flatten().filter(|e| e.path().is_dir()).count());
        }
    }
    n
}

fn main() {
    print_header("restart");
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("error: the benches start `arl node`, which needs root");
        std::process::exit(2);
    }
    let n = sandboxes();
    remove_stale_cgroup_parents();
    let node = Node {
        bin: arl_binary(),
        dir: temp_dir("restart"),
        addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        cgroup_parent: format!("arl-bench-{}", std::process::id()),
    };
    std::fs::write(
        node.dir.join("node.toml"),
        format!("[pools.default]\nmin_idle = {n}\nmax = {n}\n"),
    )
    .expect("config");
    let mut child = node.spawn();
    node.wait_healthy(&mut child);
    let mut c = Client::connect(node.addr).expect("client");
    let warmed = c.wait_idle("default", n as u64, Duration::from_secs(600));
    println!("{n} sandboxes warm in {:.1} s", warmed.as_secs_f64());
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let count = (n - ids.len()).min(1000);
        let body = serde_json::to_vec(&arl::api::AcquireRequest {
            pool: "default".into(),
            count: Some(count),
            ..Default::default()
        })
        .expect("json");
        let r = c
            .request("POST", "/v1/sandboxes", Some(&body))
            .expect("acquire");
        assert_eq!(r.status, 201, "acquire: {}", r.text());
        let list: arl::api::SandboxList = r.json();
        ids.extend(list.sandboxes.into_iter().map(|sb| sb.id));
    }
    println!("{n} sandboxes leased");
    drop(c);

    let (mut handovers, mut serving, mut outage) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let probe = &ids[round * 7 % n];
        let t0 = Instant::now();
        handovers.push(ms(hand_over(&mut child)));
        let t1 = Instant::now();
        child = node.spawn();
        node.wait_healthy(&mut child);
        while !exec_ok(node.addr, probe) {
            assert!(
                t1.elapsed() < Duration::from_secs(120),
                "never served again"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        serving.push(ms(t1.elapsed()));
        outage.push(ms(t0.elapsed()));
        let status = Client::connect(node.addr)
            .expect("client")
            .pool_status("default");
        assert_eq!(
            status.allocated, n,
            "round {round}: not all taken back: {status:?}"
        );
        assert_eq!(status.total, n, "round {round}: {status:?}");
    }
    let metrics = Client::connect(node.addr).expect("client").metrics();
    let adopted = metrics.sum(
        "arl_sandboxes_adopted_total",
        &[("runtime", "process"), ("state", "allocated")],
    );
    let serving_stats = stats(&serving);
    println!();
    println!("| what | median | min | max |");
    println!("|---|---|---|---|");
    for (label, samples) in [
        ("SIGTERM to exit (hand-over)", &handovers),
        (
            "new daemon start to serving (healthz + exec in a leased sandbox)",
            &serving,
        ),
        ("SIGTERM to serving again", &outage),
    ] {
        let s = stats(samples);
        println!(
            "| {label} | {:.0} ms | {:.0} ms | {:.0} ms |",
            s.p50, s.min, s.max
        );
    }
    println!();
    println!(
        "restart to serving with {n} leased sandboxes: median {:.0} ms (target <= 2000 ms) {}; last restart adopted {adopted} allocated",
        serving_stats.p50,
        verdict(serving_stats.p50 <= 2000.0)
    );
    hand_over(&mut child);
    println!("cleanup: {}", node.cleanup());
    let left = agents_in(&node.cgroup_parent);
    if left > 0 {
        println!("WARNING: {left} sandbox cgroups left after cleanup");
    }
    clear_cgroup_parent(&node.cgroup_parent);
    remove_dir(&node.dir);
}

fn remove_dir(dir: &Path) {
    if std::env::var_os("ARL_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
