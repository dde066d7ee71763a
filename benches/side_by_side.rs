//! The Rust half of the side-by-side bench (`benches/side_by_side.py` drives it and merges its
//! JSON with the Python half and the peers). Everything here is measured against one daemon
//! started from the release binary (or `$ARL_BIN`), in one run, next to same-run floors:
//!
//! * floors: `posix_spawn` + `waitpid` of `/bin/true`; the minimal keep-alive HTTP server that
//!   spawns `/bin/true` per request (common.rs), driven by the same raw client as the daemon;
//! * ARL: exec `/bin/true`; acquire (single, a batch, a burst on pre-opened connections); a new
//!   sandbox (acquire from an empty pool: created inline, process and containerd runtimes);
//!   session commands and fork (hooks: reported as unavailable when the daemon lacks the route);
//!   exec throughput at 1, 8 and 64 clients against the floor server at the same counts;
//! * the front: 64-client throughput and single-client exec latency with `--front-threads` 1
//!   and 2, alternating, against the floor server in the same rounds.
//!
//! `cargo bench --bench side_by_side -- [--quick] [--json PATH] [--only front]`; `--quick` runs a few
//! iterations of each (CI: `cargo test --bench side_by_side -- --quick ...` in the dev profile).

#[path = "common.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The test image `scripts/containerd.sh` imports.
const CONTAINERD_IMAGE: &str = "docker.io/arl/test:latest";

/// How much of everything: the full run and the CI quick mode.
struct Plan {
    quick: bool,
    /// Calls per latency measurement.
    n: usize,
    /// Rounds of the interleaved floor/daemon latency loop.
    rounds: usize,
    /// Timed acquires (single) and batches.
    acquires: usize,
    batch: usize,
    batches: usize,
    burst: usize,
    bursts: usize,
    /// New sandboxes timed, per runtime.
    creates: usize,
    containerd_creates: usize,
    /// How long each throughput measurement counts (after a warm-up of a fifth of it).
    window: Duration,
    /// Alternating rounds of the front-threads comparison.
    front_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                n: 40,
                rounds: 2,
                acquires: 20,
                batch: 8,
                batches: 3,
                burst: 24,
                bursts: 1,
                creates: 3,
                containerd_creates: 2,
                window: Duration::from_millis(400),
                front_rounds: 1,
            }
        } else {
            Plan {
                quick,
                n: 2000,
                rounds: 5,
                acquires: 1000,
                batch: 16,
                batches: 100,
                burst: 300,
                bursts: 4,
                creates: 200,
                containerd_creates: 50,
                window: Duration::from_secs(5),
                front_rounds: 3,
            }
        }
    }
}

/// The rows the Python half merges: measured ones and the ones that could not run, with why.
#[derive(Default)]
struct Report {
    rows: Vec<Value>,
    unavailable: Vec<Value>,
}

impl Report {
    fn latency(&mut self, key: &str, label: &str, samples: &[f64]) -> Stats {
        let s = stats(samples);
        println!("{label}: {}", s.line_ms());
        self.rows.push(json!({
            "key": key, "label": label, "n": s.n, "p50_ms": s.p50, "p99_ms": s.p99,
            "mean_ms": s.mean,
        }));
        s
    }

    fn rate(&mut self, key: &str, label: &str, clients: usize, run: &Rate) {
        let lat = stats(&run.lat);
        println!(
            "{label}: {:.0}/s with {clients} clients ({} calls), latency {}",
            run.rate,
            run.calls,
            lat.line_ms()
        );
        self.rows.push(json!({
            "key": key, "label": label, "n": run.calls, "clients": clients,
            "rate_per_s": run.rate, "p50_ms": lat.p50, "p99_ms": lat.p99,
        }));
    }

    fn missing(&mut self, key: &str, label: &str, reason: String) {
        println!("{label}: not measured: {reason}");
        self.unavailable
            .push(json!({"key": key, "label": label, "reason": reason}));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let plan = Plan::new(quick);
    print_header(if quick {
        "side by side, Rust half (quick)"
    } else {
        "side by side, Rust half"
    });
    let mut report = Report::default();
    let load_before = loadavg();

    // `--only front` runs just the front comparison (for profiling the front).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    if only != Some("front") {
        floors_and_exec(&plan, &mut report);
    }
    front_threads(&plan, &mut report);

    let out = json!({
        "machine": machine(),
        "quick": quick,
        "binary": arl_binary().display().to_string(),
        "load_before": load_before,
        "load_after": loadavg(),
        "rows": report.rows,
        "unavailable": report.unavailable,
    });
    let text = serde_json::to_string_pretty(&out).expect("json");
    match json_path {
        Some(path) => std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {path}: {e}")),
        None => println!("{text}"),
    }
}

/// A uid range of its own for each of this bench's daemons (and apart from the tests' ranges),
/// so sandboxes of daemons running at the same time never share ids.
fn uid_base(daemon: usize) -> String {
    (16_777_216u32 + (31 << 27) + daemon as u32 * (1 << 24)).to_string()
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn config(plan: &Plan) -> String {
    let warm = plan.burst.max(plan.batch) + 8;
    format!(
        "[pools.default]\nmin_idle = 2\nmax = 16\n\n\
         [pools.warm]\nmin_idle = {warm}\nmax = {}\nreuse = \"reset\"\n\n\
         [pools.cold]\nmin_idle = 0\nmax = 16\n\n\
         [pools.clients]\nmin_idle = 0\nmax = 80\n",
        warm + 16
    )
}

/// Everything measured against one daemon with the default front (one thread per core).
fn floors_and_exec(plan: &Plan, report: &mut Report) {
    // -- floors --------------------------------------------------------------------------------
    let warmup = plan.n.min(200);
    for _ in 0..warmup {
        spawn_true().expect("spawn /bin/true");
    }
    let spawns: Vec<f64> = (0..plan.n)
        .map(|_| {
            let t = Instant::now();
            spawn_true().expect("spawn /bin/true");
            ms(t.elapsed())
        })
        .collect();
    report.latency(
        "floor.spawn_rust",
        "floor: posix_spawn + waitpid of /bin/true (Rust)",
        &spawns,
    );

    let daemon = Daemon::start(&config(plan), &["--uid-base", &uid_base(0)]);
    let mut c = daemon.client();
    c.wait_idle("default", 1, Duration::from_secs(60));
    let floor = Floor::start();
    let mut fc = floor.client();
    let id = c.acquire("default");
    let exec_path = format!("/v1/sandboxes/{id}/exec");
    time_execs(&mut fc, "/exec", warmup, None);
    time_execs(&mut c, &exec_path, warmup, None);
    let (mut f, mut a) = (Vec::new(), Vec::new());
    let per = plan.n.div_ceil(plan.rounds);
    for _ in 0..plan.rounds {
        f.extend(time_execs(&mut fc, "/exec", per, None));
        a.extend(time_execs(&mut c, &exec_path, per, None));
    }
    report.latency(
        "floor.http_rust",
        "floor: HTTP server spawning /bin/true per request, Rust client",
        &f,
    );
    report.latency("arl.exec_rust", "ARL: exec true, Rust client", &a);

    sessions_hook(plan, report, &mut c, &id);
    fork_hook(plan, report, &mut c, &id);
    c.release(&id);

    acquire(plan, report, &daemon, &mut c);
    new_sandbox(plan, report, &mut c);
    throughput(plan, report, &mut c, &daemon, &floor);
}

// ------------------------------------------------------------------------------------------
// Hooks for routes other branches add: measured when the daemon has them.

/// Why a route is missing, from an answer: `Some(reason)` when the daemon has no such route.
fn no_route(method: &str, path: &str, r: &Response) -> Option<String> {
    let missing = r.status == 405 || (r.status == 404 && r.text().contains("no route"));
    missing.then(|| {
        format!(
            "not available in this build ({method} {path} answered {})",
            r.status
        )
    })
}

/// Shell-session command `true` (a builtin: no process): `POST .../sessions` creates one,
/// `POST .../sessions/{sid}/run` runs a command in it.
fn sessions_hook(plan: &Plan, report: &mut Report, c: &mut Client, id: &str) {
    let key = "arl.session_rust";
    let label = "ARL: shell-session command true, Rust client";
    let path = format!("/v1/sandboxes/{id}/sessions");
    let created = match c.request("POST", &path, Some(br#"{"kind":"shell"}"#)) {
        Ok(r) => r,
        Err(e) => return report.missing(key, label, format!("request failed: {e}")),
    };
    if let Some(reason) = no_route("POST", "/v1/sandboxes/{id}/sessions", &created) {
        return report.missing(key, label, reason);
    }
    if !(200..300).contains(&created.status) {
        return report.missing(
            key,
            label,
            format!("creating a session: {} {}", created.status, created.text()),
        );
    }
    // Raw JSON: the probe takes either name a build may give the session's id.
    let v: Value = serde_json::from_slice(&created.body).unwrap_or(Value::Null);
    let Some(sid) = v["id"].as_str().or(v["session_id"].as_str()) else {
        return report.missing(key, label, format!("no session id in {v}"));
    };
    let run = format!("{path}/{sid}/run");
    let body = br#"{"code":"true"}"#;
    let mut samples = Vec::with_capacity(plan.n);
    for i in 0..plan.n + plan.n.min(100) {
        let t = Instant::now();
        let r = match c.request("POST", &run, Some(body)) {
            Ok(r) => r,
            Err(e) => return report.missing(key, label, format!("run failed: {e}")),
        };
        let took = ms(t.elapsed());
        if r.status != 200 {
            return report.missing(key, label, format!("run: {} {}", r.status, r.text()));
        }
        if i >= plan.n.min(100) {
            samples.push(took);
        }
    }
    report.latency(key, label, &samples);
    let _ = c.request("DELETE", &format!("{path}/{sid}"), None);
}

/// Fork one sandbox: `POST /v1/sandboxes/{id}/fork` answers the new sandboxes.
fn fork_hook(plan: &Plan, report: &mut Report, c: &mut Client, id: &str) {
    let key = "arl.fork";
    let label = "ARL: fork a sandbox (one child)";
    let path = format!("/v1/sandboxes/{id}/fork");
    let mut samples = Vec::new();
    for _ in 0..plan.creates.min(50) {
        let t = Instant::now();
        let r = match c.request("POST", &path, Some(br#"{"count":1}"#)) {
            Ok(r) => r,
            Err(e) => return report.missing(key, label, format!("request failed: {e}")),
        };
        let took = ms(t.elapsed());
        if let Some(reason) = no_route("POST", "/v1/sandboxes/{id}/fork", &r) {
            return report.missing(key, label, reason);
        }
        if !(200..300).contains(&r.status) {
            return report.missing(key, label, format!("fork: {} {}", r.status, r.text()));
        }
        samples.push(took);
        let forks = serde_json::from_slice::<arl::api::SandboxList>(&r.body)
            .map(|l| l.sandboxes)
            .unwrap_or_default();
        for child in forks {
            c.release(&child.id);
        }
    }
    report.latency(key, label, &samples);
}

// ------------------------------------------------------------------------------------------
// Acquire and new sandboxes

/// Waits until the pool is back at `n` idle with nothing starting (resets and refills done).
fn settle(c: &mut Client, pool: &str, n: u64) {
    c.wait_idle(pool, n, Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.pool_status(pool).starting != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn acquire(plan: &Plan, report: &mut Report, daemon: &Daemon, c: &mut Client) {
    let warm = (plan.burst.max(plan.batch) + 8) as u64;
    settle(c, "warm", warm);
    // Single: each acquire timed alone; the release (a reset back to idle) is not.
    let one = br#"{"pool":"warm","count":1}"#;
    let mut single = Vec::with_capacity(plan.acquires);
    for _ in 0..plan.acquires {
        let t = Instant::now();
        let r = c
            .request("POST", "/v1/sandboxes", Some(one))
            .expect("acquire");
        single.push(ms(t.elapsed()));
        assert_eq!(r.status, 201, "acquire: {}", r.text());
        let id = first_id(&r);
        c.release(&id);
    }
    report.latency(
        "arl.acquire",
        "ARL: acquire one warm sandbox (POST /v1/sandboxes)",
        &single,
    );

    // A batch: one request for `batch` sandboxes.
    let body = format!(r#"{{"pool":"warm","count":{}}}"#, plan.batch);
    let mut batches = Vec::with_capacity(plan.batches);
    for _ in 0..plan.batches {
        settle(c, "warm", warm);
        let t = Instant::now();
        let r = c
            .request("POST", "/v1/sandboxes", Some(body.as_bytes()))
            .expect("acquire batch");
        batches.push(ms(t.elapsed()));
        assert_eq!(r.status, 201, "acquire batch: {}", r.text());
        for sb in r.json::<arl::api::SandboxList>().sandboxes {
            c.release(&sb.id);
        }
    }
    report.latency(
        "arl.acquire_batch",
        &format!("ARL: acquire a batch of {} in one request", plan.batch),
        &batches,
    );

    let mut lat = Vec::new();
    let mut spans = Vec::new();
    for _ in 0..plan.bursts {
        settle(c, "warm", warm);
        let (l, span, ids) = burst(daemon.addr, plan.burst);
        lat.extend(l);
        spans.push(span);
        for id in ids {
            c.release(&id);
        }
    }
    report.latency(
        "arl.acquire_burst",
        &format!(
            "ARL: burst of {} simultaneous acquires (each on its own connection)",
            plan.burst
        ),
        &lat,
    );
    report.latency(
        "arl.acquire_burst_makespan",
        &format!("ARL: burst of {}, until the last answer", plan.burst),
        &spans,
    );
    settle(c, "warm", warm);
}

/// `n` acquires written at once on `n` pre-opened connections, by one single-threaded loop
/// (so `n` bench threads do not compete with the daemon): each one's latency from its own
/// write, the time until the last answer, and the ids.
fn burst(addr: SocketAddr, n: usize) -> (Vec<f64>, f64, Vec<String>) {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let body = r#"{"pool":"warm","count":1}"#;
    let request = format!(
        "POST /v1/sandboxes HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    rt.block_on(async {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            conns.push(s);
        }
        // Every connection answered once (accepted) before the burst starts.
        for s in &mut conns {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                .await
                .expect("write");
            read_one(s).await;
        }
        let t0 = Instant::now();
        let request = &request;
        let answers = futures_util::future::join_all(conns.into_iter().map(|mut s| async move {
            s.write_all(request).await.expect("write");
            let sent = Instant::now();
            let (status, body) = read_one(&mut s).await;
            let done = Instant::now();
            (status, body, ms(done - sent), ms(done - t0))
        }))
        .await;
        let mut lat = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut span: f64 = 0.0;
        for (status, body, l, s) in answers {
            assert_eq!(status, 201, "acquire: {}", String::from_utf8_lossy(&body));
            ids.push(first_id(&Response { status, body }));
            lat.push(l);
            span = span.max(s);
        }
        (lat, span, ids)
    })
}

/// Reads one `Content-Length` response: its status and body.
async fn read_one(s: &mut tokio::net::TcpStream) -> (u16, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return (status, buf[end + 4..end + 4 + len].to_vec());
            }
        }
    }
}

/// Acquires from an empty pool: the sandbox is created inline (a miss), so the request's time
/// is a new sandbox's; the release (a destroy) is not timed.
fn time_creates(c: &mut Client, pool: &str, n: usize) -> Result<Vec<f64>, String> {
    let body = format!(r#"{{"pool":"{pool}","count":1}}"#);
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 1 {
        let t = Instant::now();
        let r = c
            .request("POST", "/v1/sandboxes", Some(body.as_bytes()))
            .map_err(|e| e.to_string())?;
        let took = ms(t.elapsed());
        if r.status != 201 {
            return Err(format!("acquire from {pool}: {} {}", r.status, r.text()));
        }
        let list: arl::api::SandboxList = serde_json::from_slice(&r.body)
            .map_err(|e| format!("acquire from {pool}: {e}: {}", r.text()))?;
        let id = list.sandboxes.into_iter().next().ok_or("no id")?.id;
        if i > 0 {
            out.push(took);
        }
        c.release(&id);
    }
    Ok(out)
}

fn new_sandbox(plan: &Plan, report: &mut Report, c: &mut Client) {
    match time_creates(c, "cold", plan.creates) {
        Ok(s) => {
            report.latency(
                "arl.new_process",
                "ARL: new sandbox, process runtime (acquire from an empty pool)",
                &s,
            );
        }
        Err(e) => report.missing("arl.new_process", "ARL: new sandbox, process runtime", e),
    }
    let key = "arl.new_containerd";
    let label = "ARL: new sandbox, containerd runtime (acquire from an empty pool)";
    let has_image = Command::new("ctr")
        .args([
            "-n",
            "arl",
            "image",
            "check",
            &format!("name=={CONTAINERD_IMAGE}"),
        ])
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CONTAINERD_IMAGE)
        });
    match has_image {
        Err(e) => {
            return report.missing(key, label, format!("no ctr to check for containerd: {e}"));
        }
        Ok(false) => {
            return report.missing(
                key,
                label,
                format!("containerd not running or {CONTAINERD_IMAGE} not imported (scripts/containerd.sh)"),
            );
        }
        Ok(true) => {}
    }
    c.put_pool(
        "ctr",
        &arl::api::PoolSpec {
            runtime: arl::api::pools::RuntimeKind::Containerd,
            image: Some(CONTAINERD_IMAGE.into()),
            ..pool_spec(0, 8)
        },
    );
    match time_creates(c, "ctr", plan.containerd_creates) {
        Ok(s) => {
            report.latency(key, label, &s);
        }
        Err(e) => report.missing(key, label, e),
    }
}

// ------------------------------------------------------------------------------------------
// Throughput

struct Rate {
    rate: f64,
    calls: usize,
    /// Each counted call's latency, ms.
    lat: Vec<f64>,
}

/// One client per path, each on its own connection and thread, POSTing exec of `/bin/true`
/// in a loop; a warm-up of a fifth of `window`, then `window` counted.
fn hammer(addr: SocketAddr, paths: &[String], window: Duration) -> Rate {
    let barrier = Arc::new(Barrier::new(paths.len() + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = paths
        .iter()
        .map(|path| {
            let (barrier, stop, measuring) = (barrier.clone(), stop.clone(), measuring.clone());
            let path = path.clone();
            let mut c = Client::connect(addr).expect("connect");
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(1024);
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
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(window / 5);
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().expect("client thread"));
    }
    Rate {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        calls: lat.len(),
        lat,
    }
}

/// `n` sandboxes of the `clients` pool, as exec paths.
fn exec_paths(c: &mut Client, n: usize) -> Vec<String> {
    let body = format!(r#"{{"pool":"clients","count":{n}}}"#);
    let r = c
        .request("POST", "/v1/sandboxes", Some(body.as_bytes()))
        .expect("acquire clients");
    assert_eq!(r.status, 201, "acquire {n}: {}", r.text());
    r.json::<arl::api::SandboxList>()
        .sandboxes
        .iter()
        .map(|sb| format!("/v1/sandboxes/{}/exec", sb.id))
        .collect()
}

fn throughput(plan: &Plan, report: &mut Report, c: &mut Client, daemon: &Daemon, floor: &Floor) {
    let paths = exec_paths(c, 64);
    for clients in [1usize, 8, 64] {
        let arl = hammer(daemon.addr, &paths[..clients], plan.window);
        let flo = hammer(floor.addr, &vec!["/exec".to_string(); clients], plan.window);
        report.rate(
            &format!("floor.rate_{clients}"),
            &format!("floor server: exec rate, {clients} clients"),
            clients,
            &flo,
        );
        report.rate(
            &format!("arl.rate_{clients}"),
            &format!("ARL: exec rate, {clients} clients"),
            clients,
            &arl,
        );
    }
    // A fresh connection: the daemon closes a keep-alive connection idle for longer than its
    // header-read timeout (30 s), and `c` sat idle through the rounds.
    let mut c = daemon.client();
    for p in paths {
        let id = p
            .trim_start_matches("/v1/sandboxes/")
            .trim_end_matches("/exec");
        c.release(id);
    }
}

// ------------------------------------------------------------------------------------------
// The front: 1 vs 2 threads

/// CPU seconds of each thread of a process, by thread name.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out: Vec<(String, f64)> = Vec::new();
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        // After the name: state(3) ... utime(14) stime(15).
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let tick = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let secs = (tick(14) + tick(15)) / hz;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += secs,
            None => out.push((name, secs)),
        }
    }
    out
}

/// Two daemons, `--front-threads 1` and `2`, each with 64 busy clients and then one, taken in
/// turn with the floor server in every round, so load on the machine hits all alike.
fn front_threads(plan: &Plan, report: &mut Report) {
    let pools = "[pools.clients]\nmin_idle = 0\nmax = 80\n";
    let daemons: Vec<(usize, Daemon)> = [1usize, 2]
        .into_iter()
        .map(|t| {
            let uids = uid_base(t);
            (
                t,
                Daemon::start(
                    pools,
                    &["--front-threads", &t.to_string(), "--uid-base", &uids],
                ),
            )
        })
        .collect();
    let mut paths = Vec::new();
    for (_, d) in &daemons {
        let mut c = d.client();
        paths.push(exec_paths(&mut c, 64));
    }
    let floor = Floor::start();
    let floor_paths = vec!["/exec".to_string(); 64];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut calls = [0usize; 3];
    let mut rate_lat: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut single: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let n = (plan.n / 2).max(20);
    for _ in 0..plan.front_rounds {
        for (i, addr) in daemons
            .iter()
            .map(|(_, d)| d.addr)
            .chain([floor.addr])
            .enumerate()
        {
            let p = if i < 2 { &paths[i] } else { &floor_paths };
            let pid = daemons.get(i).map(|(_, d)| d.pid);
            let before = pid.map(thread_cpu).unwrap_or_default();
            let r = hammer(addr, p, plan.window);
            if let Some(pid) = pid {
                // Whether the connections (and so the work) spread over the front threads.
                let after = thread_cpu(pid);
                let per_thread: Vec<String> = after
                    .iter()
                    .filter(|(name, _)| name.starts_with("arl-http"))
                    .map(|(name, t)| {
                        let t0 = before
                            .iter()
                            .find(|(n, _)| n == name)
                            .map_or(0.0, |(_, t0)| *t0);
                        format!(
                            "{name} {:.0} us/exec",
                            (t - t0) / r.calls.max(1) as f64 * 1e6
                        )
                    })
                    .collect();
                let total: f64 = after.iter().map(|(_, t)| t).sum::<f64>()
                    - before.iter().map(|(_, t)| t).sum::<f64>();
                println!(
                    "  {}: {:.0}/s; daemon CPU {:.0} us/exec, front threads: {}",
                    daemons[i].0,
                    r.rate,
                    total / r.calls.max(1) as f64 * 1e6,
                    per_thread.join(", ")
                );
            }
            rates[i].push(r.rate);
            calls[i] += r.calls;
            rate_lat[i].extend(r.lat);
            let mut c = Client::connect(addr).expect("connect");
            time_execs(&mut c, &p[0], n.min(100), None);
            single[i].extend(time_execs(&mut c, &p[0], n, None));
        }
    }
    let median = |v: &[f64]| stats(v).p50;
    for (i, name) in ["front_1", "front_2", "front_floor"].iter().enumerate() {
        let who = match i {
            0 => "ARL --front-threads 1".to_string(),
            1 => "ARL --front-threads 2".to_string(),
            _ => "floor server".to_string(),
        };
        let rate = Rate {
            rate: median(&rates[i]),
            calls: calls[i],
            lat: std::mem::take(&mut rate_lat[i]),
        };
        report.rate(
            &format!("{name}.rate_64"),
            &format!(
                "{who}: exec rate, 64 clients (median of {} rounds)",
                plan.front_rounds
            ),
            64,
            &rate,
        );
        report.latency(
            &format!("{name}.exec_1"),
            &format!("{who}: exec true, one client"),
            &single[i],
        );
    }
    if plan.quick {
        println!("(quick mode: one short round; the numbers are not meant to be read)");
    }
}
