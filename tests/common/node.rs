//! The `arl node` process as every harness starts and stops it: the tests (`tests/common`),
//! the benches (`benches/common.rs`) and the restart bench include this one file (with
//! `#[path]`), so the command line, free ports, cgroup parents and shutdown are written once.
//! Standard library and `libc` only: the tests drive it from tokio, the benches from threads.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Fills `buf` with random bytes.
pub fn random_bytes(buf: &mut [u8]) {
    // SAFETY: getrandom(2) into our own buffer.
    unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
}

/// `n` random bytes, in hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    random_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Detaches every mount at or under `dir` (a daemon's state directory keeps its snapshots on
/// a tmpfs of its own, which outlives the daemon as it would a restart), deepest first, so the
/// directory can be removed.
pub fn unmount_under(dir: &std::path::Path) {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The mounted cgroup hierarchies (v1 controllers and the unified one).
pub fn cgroup_roots() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let point = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// How `arl node` is started: its address, state and cgroup parent (its own: a daemon
/// reclaims what it finds under its parent), and the files and flags a harness adds.
pub struct NodeCommand {
    pub bin: PathBuf,
    pub listen: String,
    pub state_dir: PathBuf,
    pub cgroup_parent: String,
    pub config: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Both output streams are appended here (a restarted daemon's log follows the last).
    pub log: PathBuf,
    /// `ARL_LOG`.
    pub log_filter: String,
    pub args: Vec<String>,
}

impl NodeCommand {
    pub fn spawn(&self) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        if let Some(tokens) = &self.token_file {
            cmd.arg("--token-file").arg(tokens);
        }
        cmd.args(&self.args)
            .env("ARL_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    }

    pub fn read_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How a daemon asked to stop went.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It exited by itself, with this code (`None`: by a signal).
    Exited(Option<i32>),
    /// It outlived the grace period and was killed.
    Killed,
}

/// SIGTERM, then up to `grace` for the exit, then SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) -> Stopped {
    // SAFETY: kill(2) of our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Stopped::Exited(status.code()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Stopped::Killed;
            }
        }
    }
}

/// Kills whatever is left under a daemon's cgroup parent and removes the parent with its
/// sandboxes' cgroups (a just-emptied cgroup can refuse rmdir for a moment: retried for up
/// to three seconds). Returns how many processes were left.
pub fn clear_cgroup_parent(parent: &str) -> usize {
    if parent.is_empty() {
        return 0;
    }
    let mut left = Vec::new();
    for root in cgroup_roots() {
        let Ok(entries) = std::fs::read_dir(root.join(parent)) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(procs) = std::fs::read_to_string(e.path().join("cgroup.procs")) {
                left.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
    }
    left.sort_unstable();
    left.dedup();
    for pid in &left {
        // SAFETY: kill(2) of a process in this daemon's own sandbox cgroups.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut remaining = false;
        for root in cgroup_roots() {
            let dir = root.join(parent);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            if dir.exists() && std::fs::remove_dir(&dir).is_err() {
                remaining = true;
            }
        }
        if !remaining || Instant::now() > deadline {
            return left.len();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
