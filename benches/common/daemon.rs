//! `arl node` started from the release binary for a bench, and stopped with a leak check.

use super::*;

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
        Self::start_bin(arl_binary(), config_toml, extra)
    }

    /// As [`Daemon::start`], with another `arl` binary (a same-run A/B of two builds).
    pub fn start_bin(bin: PathBuf, config_toml: &str, extra: &[&str]) -> Daemon {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "error: the benches start `arl node`, which needs root (sandboxes use namespaces and cgroups)"
            );
            std::process::exit(2);
        }
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
        // The snapshots' tmpfs (it outlives a daemon, as it would a restart).
        unmount_under(&self.dir);
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
