//! Shared helpers of the daemon benches: the machine description, a daemon started from the
//! release binary, a tiny raw keep-alive HTTP/1.1 client, the "floor" server, Prometheus text
//! parsing and percentile statistics.
//!
//! Each bench includes this file with `#[path = "common.rs"] mod common;`. Run on its own
//! (`cargo bench --bench common`) it prints the machine description and a floor self-check.
#![allow(dead_code)]

// Starting and stopping `arl node`, ports and cgroups: written once for tests and benches.
#[path = "../tests/common/node.rs"]
mod node;

pub use node::{NodeCommand, Stopped, cgroup_roots, clear_cgroup_parent, free_port, terminate};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------
// Machine

/// One line per fact: CPU count and model, kernel, memory, date.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_gib = meminfo_kib("MemTotal") as f64 / (1024.0 * 1024.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: nproc={nproc}, cpu=\"{model}\", kernel={}, memory={mem_gib:.1} GiB, date={}, loadavg={}",
        kernel.trim(),
        utc_now(),
        load.join(" ")
    )
}

pub fn print_header(bench: &str) {
    println!("=== arl bench: {bench} ===");
    println!("{}", machine());
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The number of a `Field: N kB` line of a /proc file (meminfo, status, smaps_rollup).
fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// A field of /proc/meminfo in KiB.
pub fn meminfo_kib(field: &str) -> u64 {
    proc_kib("/proc/meminfo", field).unwrap_or(0)
}

/// A `Vm*` / `Rss*` field of /proc/PID/status in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), field).unwrap_or(0)
}

/// A field of /proc/PID/smaps_rollup in KiB (e.g. "Pss", "Rss").
pub fn smaps_rollup_kib(pid: u32, field: &str) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), field)
}

/// Pids whose parent is `ppid` (from /proc/*/stat).
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces: fields start after the last ')'.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let _state = fields.next();
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// Removes `arl-bench-<pid>` cgroup parents of benches that are no longer running: the
/// kernel can refuse to remove a just-emptied cgroup for a few seconds on a busy machine, so
/// the bench that made it may have had to leave it behind.
pub fn remove_stale_cgroup_parents() {
    for root in cgroup_roots() {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("arl-bench-")
                .and_then(|p| p.split('-').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                // Only empty cgroups can be removed; a non-empty one stays.
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// CPU time of a process in seconds: (own user+system, reaped children's user+system).
pub fn cpu_seconds(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return (0.0, 0.0);
    };
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ((tick(14) + tick(15)) / hz, (tick(16) + tick(17)) / hz)
}

/// Total CPU seconds (own + reaped children) of a set of processes.
pub fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&p| {
            let (own, kids) = cpu_seconds(p);
            own + kids
        })
        .sum()
}

// ------------------------------------------------------------------------------------------
// Statistics

#[derive(Debug, Clone)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn stats(samples: &[f64]) -> Stats {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        n: v.len(),
        min: v.first().copied().unwrap_or(f64::NAN),
        p50: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(f64::NAN),
        mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
    }
}

/// Durations in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Stats {
    /// `n=.. p50=.. p90=.. p99=.. max=..` in ms.
    pub fn line_ms(&self) -> String {
        format!(
            "n={} min={:.3} p50={:.3} p90={:.3} p99={:.3} max={:.3} mean={:.3} (ms)",
            self.n, self.min, self.p50, self.p90, self.p99, self.max, self.mean
        )
    }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

// ------------------------------------------------------------------------------------------
// The daemon

pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pid: u32,
    pub dir: PathBuf,
    pub cgroup_parent: String,
}

/// The release binary: `$ARL_BIN`, or `target/<triple>/release/arl` next to Cargo.toml (or under
/// `$CARGO_TARGET_DIR`).
pub fn arl_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("ARL_BIN") {
        return PathBuf::from(bin);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| {
            let t = PathBuf::from(t);
            if t.is_absolute() { t } else { manifest.join(t) }
        })
        .unwrap_or_else(|| manifest.join("target"));
    // The build names its target (see .cargo/config.toml): `target/<triple>/release/arl`.
    let bin = std::fs::read_dir(&target)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("release").join("arl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| target.join("release").join("arl"));
    if !bin.exists() {
        eprintln!(
            "error: {} does not exist.\n\
             The benches start the daemon from the release binary: run `cargo build --release` first\n\
             (or point ARL_BIN at an `arl` binary).",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

/// A fresh, private temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("arl-bench-{tag}-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
}

impl Daemon {
    /// Starts `arl node` with `config` (TOML) and `extra` flags; waits for /healthz.
    pub fn start(config_toml: &str, extra: &[&str]) -> Daemon {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "error: the benches start `arl node`, which needs root (sandboxes use namespaces and cgroups)"
            );
            std::process::exit(2);
        }
        let bin = arl_binary();
        let dir = temp_dir("node");
        let state = dir.join("state");
        let config = dir.join("node.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let port = free_port();
        // Our own cgroup parent: a daemon reclaims (kills) sandboxes it finds under its
        // parent at start, so sharing "arl" with another daemon on this machine would hurt.
        // (A second daemon of the same bench gets a parent of its own too: a daemon's stop
        // counts whatever is left under its parent as leaked.)
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let cgroup_parent = match STARTED.fetch_add(1, Ordering::Relaxed) {
            0 => format!("arl-bench-{}", std::process::id()),
            n => format!("arl-bench-{}-{n}", std::process::id()),
        };
        remove_stale_cgroup_parents();
        let user_args: Vec<String> = std::env::var("ARL_BENCH_NODE_ARGS")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        if !user_args.is_empty() {
            println!(
                "extra daemon flags from ARL_BENCH_NODE_ARGS: {}",
                user_args.join(" ")
            );
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let command = NodeCommand {
            bin: bin.clone(),
            listen: addr.to_string(),
            state_dir: state,
            cgroup_parent: cgroup_parent.clone(),
            config: Some(config),
            token_file: None,
            log: dir.join("node.log"),
            log_filter: std::env::var("ARL_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            args: extra
                .iter()
                .map(|a| a.to_string())
                .chain(user_args)
                .collect(),
        };
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let pid = child.id();
        let mut daemon = Daemon {
            child: Some(child),
            addr,
            pid,
            dir,
            cgroup_parent,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(daemon.dir.join("node.log")).unwrap_or_default();
                panic!("arl node exited early ({status}):\n{log}");
            }
            if let Ok(mut c) = Client::connect(addr)
                && let Ok(r) = c.request("GET", "/healthz", None)
                && r.status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "arl node did not answer /healthz within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr).expect("connect to daemon")
    }

    /// The Unix socket of a sandbox's agent (process runtime layout).
    pub fn agent_socket(&self, id: &str) -> PathBuf {
        self.dir
            .join("state")
            .join("sandboxes")
            .join(id)
            .join("agent.sock")
    }

    /// The daemon's direct children: the sandboxes' agents (and any helper running now).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid)
    }

    /// Waits until the daemon has exactly `n` children (e.g. destroys have finished).
    pub fn wait_children(&self, n: usize, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.children().len() == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid, "VmRSS")
    }

    /// Sends SIGTERM and waits for the daemon to destroy its sandboxes and exit.
    pub fn stop(&mut self) -> Option<Duration> {
        let mut child = self.child.take()?;
        let started = Instant::now();
        if terminate(&mut child, Duration::from_secs(120)) == Stopped::Killed {
            eprintln!("arl node did not exit within 120 s of SIGTERM; killed it");
        }
        let took = started.elapsed();
        // Every sandbox should be gone with the daemon: report (and kill) any agent left.
        let leaked = clear_cgroup_parent(&self.cgroup_parent);
        if leaked > 0 {
            println!(
                "WARNING: {leaked} processes of this daemon's sandboxes outlived it (SIGTERM); killed them"
            );
        }
        if std::env::var_os("ARL_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("daemon files kept in {}", self.dir.display());
        }
        Some(took)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------------------------------
// Raw keep-alive HTTP/1.1 client

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", self.text()))
    }
}

/// One kept-alive connection; requests go one at a time.
pub struct Client {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    out: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Client {
            writer: Box::new(stream.try_clone()?),
            reader: BufReader::with_capacity(64 * 1024, Box::new(stream)),
            out: Vec::with_capacity(1024),
        })
    }

    /// A connection to a Unix socket (a sandbox's agent, to bypass the daemon).
    pub fn connect_unix(path: &Path) -> std::io::Result<Client> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        Ok(Client {
            writer: Box::new(stream.try_clone()?),
            reader: BufReader::with_capacity(64 * 1024, Box::new(stream)),
            out: Vec::with_capacity(1024),
        })
    }

    /// Writes the whole request in one `write` (one segment).
    pub fn send(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<()> {
        self.out.clear();
        write!(self.out, "{method} {path} HTTP/1.1\r\nHost: bench\r\n")?;
        if let Some(body) = body {
            write!(
                self.out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )?;
            self.out.extend_from_slice(body);
        } else {
            self.out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&self.out)
    }

    pub fn recv(&mut self) -> std::io::Result<Response> {
        read_response(&mut self.reader)
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        self.send(method, path, body)?;
        self.recv()
    }

    pub fn get_json(&mut self, path: &str) -> serde_json::Value {
        let r = self.request("GET", path, None).expect("GET");
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    /// `POST /v1/sandboxes` for one sandbox of `pool`; its id.
    pub fn acquire(&mut self, pool: &str) -> String {
        let body = format!(r#"{{"pool":"{pool}","count":1}}"#);
        let r = self
            .request("POST", "/v1/sandboxes", Some(body.as_bytes()))
            .expect("acquire");
        assert_eq!(r.status, 201, "acquire: {}", r.text());
        r.json()["sandboxes"][0]["id"]
            .as_str()
            .expect("id")
            .to_string()
    }

    pub fn release(&mut self, id: &str) {
        let r = self
            .request("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .expect("release");
        assert_eq!(r.status, 204, "release {id}: {}", r.text());
    }

    pub fn put_pool(&mut self, name: &str, spec: &serde_json::Value) {
        let body = serde_json::to_vec(spec).unwrap();
        let r = self
            .request("PUT", &format!("/v1/pools/{name}"), Some(&body))
            .expect("put pool");
        assert_eq!(r.status, 200, "PUT pool {name}: {}", r.text());
    }

    /// `status` of one pool (idle, allocated, starting, total, ...).
    pub fn pool_status(&mut self, name: &str) -> serde_json::Value {
        self.get_json(&format!("/v1/pools/{name}"))["status"].clone()
    }

    pub fn idle(&mut self, name: &str) -> u64 {
        self.pool_status(name)["idle"].as_u64().unwrap_or(0)
    }

    /// Polls until the pool has at least `n` idle sandboxes; the time it took.
    pub fn wait_idle(&mut self, name: &str, n: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let st = self.pool_status(name);
            if st["idle"].as_u64().unwrap_or(0) >= n {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                panic!("pool {name} did not reach {n} idle within {timeout:?}: {st}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn metrics(&mut self) -> Metrics {
        let r = self.request("GET", "/metrics", None).expect("metrics");
        assert_eq!(r.status, 200);
        Metrics::parse(&r.text())
    }
}

fn read_response(reader: &mut impl BufRead) -> std::io::Result<Response> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    line.clear();
                    reader.read_line(&mut line)?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

// ------------------------------------------------------------------------------------------
// Prometheus text

/// Samples keyed by `name{labels}` exactly as rendered.
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((key, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                map.insert(key.to_string(), v);
            }
        }
        Metrics(map)
    }

    /// Sum of the samples named `name` whose labels include every `k="v"` in `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                let (n, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
                n == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Cumulative histogram buckets `(le, count)` of `name` for the given labels, sorted by le.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (k, v) in &self.0 {
            let Some((n, rest)) = k.split_once('{') else {
                continue;
            };
            if n != bucket
                || !labels
                    .iter()
                    .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
            {
                continue;
            }
            let Some(le) = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
                continue;
            };
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += v;
        }
        let mut out: Vec<(f64, f64)> = by_le.into_values().collect();
        out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        out
    }
}

/// Bucket-wise difference of two cumulative histograms (after - before).
pub fn bucket_delta(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|x| x.1)
                .unwrap_or(0.0);
            (*le, c - b)
        })
        .collect()
}

/// The upper bound of the bucket holding the `p`-th percentile, and the linear interpolation
/// inside it (Prometheus' histogram_quantile), in seconds.
pub fn histogram_quantile(buckets: &[(f64, f64)], p: f64) -> (f64, f64) {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let rank = p / 100.0 * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            let interp = if le.is_infinite() {
                prev.0
            } else {
                prev.0 + (le - prev.0) * (rank - prev.1) / (c - prev.1).max(1e-9)
            };
            return (le, interp);
        }
        prev = (le, c);
    }
    (f64::INFINITY, f64::INFINITY)
}

// ------------------------------------------------------------------------------------------
// The floor: a minimal keep-alive HTTP server that spawns /bin/true per request

pub struct Floor {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Floor {
    /// Thread per connection; each request runs `/bin/true` (`posix_spawn`, `waitpid`) and
    /// answers a small JSON body with its exit code and duration.
    pub fn start() -> Floor {
        let listener = TcpListener::bind("127.0.0.1:0").expect("floor bind");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || {
                    let _ = floor_connection(stream);
                });
            }
        });
        Floor { addr, stop }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr).expect("connect to floor")
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Runs `/bin/true` and waits for it, the cheapest way a server can: `posix_spawn` + `waitpid`
/// (std's `Command` forks in a static binary, copying the page tables, which would flatter ARL).
pub fn spawn_true() -> std::io::Result<i32> {
    let path = c"/bin/true";
    let argv = [path.as_ptr().cast_mut(), std::ptr::null_mut()];
    let envp = [std::ptr::null_mut()];
    let mut pid = 0;
    // SAFETY: a NUL-terminated path, NULL-terminated argv and envp that outlive the call.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let mut status = 0;
    // SAFETY: waiting for the child just spawned.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(libc::WEXITSTATUS(status))
}

fn floor_connection(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        let started = Instant::now();
        let code = spawn_true()?;
        let reply = format!(
            r#"{{"stdout":"","stderr":"","exit_code":{code},"signal":null,"timed_out":false,"truncated":false,"duration_ms":{:.3}}}"#,
            ms(started.elapsed())
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(reply.as_bytes());
        writer.write_all(&out)?;
    }
}

pub const EXEC_TRUE: &[u8] = br#"{"cmd":["/bin/true"]}"#;

/// Times `n` calls of `POST path` with `body` on one client; milliseconds each. Panics on a
/// non-200 answer or a nonzero exit code.
pub fn time_execs(
    client: &mut Client,
    path: &str,
    n: usize,
    agent_ms: Option<&mut Vec<f64>>,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut agent = agent_ms;
    for _ in 0..n {
        let t = Instant::now();
        let r = client.request("POST", path, Some(EXEC_TRUE)).expect("exec");
        out.push(ms(t.elapsed()));
        assert_eq!(r.status, 200, "exec: {}", r.text());
        let v = r.json();
        assert_eq!(v["exit_code"].as_i64(), Some(0), "exec: {v}");
        if let Some(a) = agent.as_deref_mut() {
            a.push(v["duration_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    out
}

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
