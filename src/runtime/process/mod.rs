//! The embedded `process` runtime: a sandbox is `arl agent` as PID 1 of fresh Linux
//! namespaces, with an overlay root, cgroup limits, no_new_privs and a seccomp filter.
//! It needs nothing installed on the host. See `init.rs` for how one is built.

pub mod cgroup;
pub mod init;
pub mod seccomp;
pub mod snapshot;

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use self::cgroup::{Cgroups, Limits};
use self::init::InitConfig;
use super::{AgentAddress, BoxFuture, Budgets, Created, ExitReason, Runtime, RuntimeError};
use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::util::MutexExt;

/// Host uids/gids each sandbox's user namespace maps (root inside is `uid_base` outside).
const IDS_PER_SANDBOX: u32 = 65_536;
const MAX_SLOTS: u32 = 16_384;

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Directory holding one sub-directory per sandbox.
    pub state_dir: PathBuf,
    /// Name of ARL's cgroup under each hierarchy root.
    pub cgroup_parent: String,
    /// First host uid of the sandboxes' id ranges.
    pub uid_base: u32,
}

/// What survives a daemon crash, so the next daemon can clean up.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    pid: i32,
    start_time: u64,
    /// The sandbox's uid range (absent in records of older daemons: not adoptable).
    #[serde(default)]
    slot: Option<u32>,
    /// Where its agent holds the layers tmpfs (absent in records of older daemons: such a
    /// sandbox cannot be snapshotted).
    #[serde(default)]
    layers_fd: Option<i32>,
}

struct Live {
    pid: i32,
    pidfd: Arc<AsyncFd<OwnedFd>>,
    slot: u32,
    layers_fd: Option<i32>,
}

pub struct ProcessRuntime {
    /// Held for our lifetime: one daemon per state directory.
    _lock: fs::File,
    config: ProcessConfig,
    sandboxes_dir: PathBuf,
    cgroups: Cgroups,
    exe: PathBuf,
    live: Mutex<HashMap<String, Live>>,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    free: Vec<u32>,
    next: u32,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        (self.next < MAX_SLOTS).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Takes a given slot (an adopted sandbox's); false when it is taken or out of range.
    fn claim(&mut self, slot: u32) -> bool {
        if slot >= MAX_SLOTS {
            return false;
        }
        if slot < self.next {
            let Some(pos) = self.free.iter().position(|&s| s == slot) else {
                return false;
            };
            self.free.swap_remove(pos);
            return true;
        }
        self.free.extend(self.next..slot);
        self.next = slot + 1;
        true
    }
}

impl ProcessRuntime {
    /// Checks the host can run sandboxes and prepares the state directory.
    pub fn new(config: ProcessConfig) -> Result<Self, RuntimeError> {
        let unsupported = |reason: String| RuntimeError::Unavailable {
            runtime: "process",
            reason,
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(unsupported(
                "the process runtime must run as root (it maps each sandbox's root to an unprivileged host uid range)".into(),
            ));
        }
        let max_userns = fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if max_userns == Some(0) {
            return Err(unsupported(
                "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0)".into(),
            ));
        }
        let cgroups =
            Cgroups::detect(&config.cgroup_parent).map_err(|e| unsupported(e.to_string()))?;
        tracing::info!(layout = %cgroups.describe(), "cgroup controllers");
        let exe = std::env::current_exe()?;
        let sandboxes_dir = config.state_dir.join("sandboxes");
        // Only the daemon looks in here: sandboxes get their socket as a descriptor.
        for dir in [&config.state_dir, &sandboxes_dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            set_mode(dir, 0o700)?;
        }
        let lock = lock_state_dir(&config.state_dir)?;
        Ok(Self {
            _lock: lock,
            config,
            sandboxes_dir,
            cgroups,
            exe,
            live: Mutex::new(HashMap::new()),
            slots: Mutex::new(Slots::default()),
        })
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.sandboxes_dir.join(id)
    }

    async fn create_inner(
        &self,
        id: &str,
        spec: &PoolSpec,
        slot: u32,
        base: &[PathBuf],
    ) -> Result<Created, RuntimeError> {
        let dir = self.dir(id);
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let procs = self.cgroups.create(
            id,
            Limits {
                memory_bytes: memory_limit_bytes(spec),
                pids: spec.pids,
                cpu_millis: spec.cpu_millis,
            },
        )?;
        let socket = dir.join("agent.sock");
        let config = InitConfig {
            id: id.to_string(),
            dir: dir.clone(),
            socket: socket.clone(),
            cgroup_procs: procs,
            uid_base: self.config.uid_base + slot * IDS_PER_SANDBOX,
            id_count: IDS_PER_SANDBOX,
            disk_mb: spec.disk_mb,
            network: spec.network,
            rootfs: spec.rootfs.as_ref().map(PathBuf::from),
            memory_events: self.cgroups.memory_events(id),
            base: base.to_vec(),
            listen_tcp: None,
        };
        let json =
            serde_json::to_string(&config).map_err(|e| RuntimeError::Create(e.to_string()))?;
        let output = tokio::process::Command::new(&self.exe)
            .arg("sandbox-init")
            .arg(json)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        if !output.status.success() {
            let err = String::from_utf8_lossy(&output.stderr).trim().to_string();
            return Err(RuntimeError::Create(if err.is_empty() {
                format!("sandbox-init exited with {}", output.status)
            } else {
                err
            }));
        }
        let pid: i32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| RuntimeError::Create("sandbox-init printed no pid".into()))?;
        let pidfd = pidfd_open(pid)?;
        let meta = Meta {
            pid,
            start_time: start_time(pid).unwrap_or(0),
            slot: Some(slot),
            layers_fd: Some(init::LAYERS_FD),
        };
        fs::write(
            dir.join("meta.json"),
            serde_json::to_vec(&meta).map_err(|e| RuntimeError::Create(e.to_string()))?,
        )?;
        self.live.lock_or_recover().insert(
            id.to_string(),
            Live {
                pid,
                // SAFETY: the pidfd is owned by the AsyncFd from here on and never closed elsewhere.
                pidfd: Arc::new(
                    unsafe { AsyncFd::register(pidfd) }
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                ),
                slot,
                layers_fd: Some(init::LAYERS_FD),
            },
        );
        Ok(Created {
            agent: AgentAddress::Unix(socket),
        })
    }

    async fn destroy_inner(&self, id: &str) -> Result<(), RuntimeError> {
        let live = self.live.lock_or_recover().remove(id);
        if let Some(live) = &live {
            // A frozen sandbox must be thawed to die; then killing PID 1 of a pid namespace
            // kills every process in it.
            let _ = self.cgroups.freeze(id, false).await;
            pidfd_kill(live.pidfd.get_ref());
            let _ = tokio::time::timeout(Duration::from_secs(5), live.pidfd.readable()).await;
            reap(live.pidfd.get_ref());
        }
        self.cgroups.remove(id).await?;
        let dir = self.dir(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| RuntimeError::Destroy {
                id: id.to_string(),
                reason: format!("remove {}: {e}", dir.display()),
            })?;
        }
        if let Some(live) = live {
            let _ = live.pid;
            self.slots.lock_or_recover().free.push(live.slot);
        }
        Ok(())
    }

    async fn reclaim_inner(&self) -> Result<usize, RuntimeError> {
        let mut ids: Vec<String> = Vec::new();
        if let Ok(entries) = fs::read_dir(&self.sandboxes_dir) {
            for entry in entries.flatten() {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        // Sandboxes this daemon holds (created or adopted) stay.
        {
            let live = self.live.lock_or_recover();
            ids.retain(|id| !live.contains_key(id));
        }
        // Only sandboxes recorded in our own state directory: a cgroup without a record there
        // belongs to another daemon sharing the cgroup parent, and is not ours to kill.
        let mut killed = Vec::new();
        for id in &ids {
            let dir = self.dir(id);
            if let Ok(bytes) = fs::read(dir.join("meta.json"))
                && let Ok(meta) = serde_json::from_slice::<Meta>(&bytes)
                && start_time(meta.pid) == Some(meta.start_time)
            {
                // SAFETY: kill(2) of a pid whose start time proves it is still our agent.
                unsafe { libc::kill(meta.pid, libc::SIGKILL) };
                killed.push(meta.pid);
            }
            self.cgroups.remove(id).await?;
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
        }
        reap_killed(&killed);
        Ok(ids.len())
    }
}

/// The pool options a process sandbox understands: a root filesystem directory, never an image.
pub fn validate_spec(spec: &PoolSpec) -> Result<(), String> {
    if spec.image.is_some() {
        return Err("`image` needs `runtime = \"containerd\"`".into());
    }
    if spec.read_only_root {
        return Err("`read_only_root` needs `runtime = \"containerd\"`".into());
    }
    if spec.template.is_some() {
        return Err("`template` needs `runtime = \"kubernetes\"`".into());
    }
    if let Some(root) = &spec.rootfs
        && !root.starts_with('/')
    {
        return Err("`rootfs` must be an absolute path".into());
    }
    Ok(())
}

impl ProcessRuntime {
    /// Takes back a sandbox an earlier daemon left: its agent must be the very process
    /// recorded (pid and start time, checked again once a pidfd pins it), with its socket.
    async fn adopt_inner(&self, id: &str) -> Result<Created, RuntimeError> {
        let refuse = |reason: &str| RuntimeError::Adopt {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(refuse("not a sandbox id"));
        }
        if self.live.lock_or_recover().contains_key(id) {
            return Err(refuse("already held"));
        }
        let dir = self.dir(id);
        let meta: Meta = fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| refuse("no readable meta.json"))?;
        let slot = meta.slot.ok_or_else(|| refuse("no uid slot recorded"))?;
        let socket = dir.join("agent.sock");
        if !socket.exists() {
            return Err(refuse("no agent socket"));
        }
        if start_time(meta.pid) != Some(meta.start_time) {
            return Err(refuse("its agent is gone"));
        }
        let pidfd = pidfd_open(meta.pid)?;
        // The pid might have been reused between the check and the open: the pidfd now pins
        // whichever process it is, so check again.
        if start_time(meta.pid) != Some(meta.start_time) {
            return Err(refuse("its agent is gone"));
        }
        if !self.slots.lock_or_recover().claim(slot) {
            return Err(refuse("its uid slot is taken"));
        }
        // SAFETY: the pidfd is owned by the AsyncFd from here on and never closed elsewhere.
        let pidfd = match unsafe { AsyncFd::register(pidfd) } {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                self.slots.lock_or_recover().free.push(slot);
                return Err(RuntimeError::Io(std::io::Error::other(e.to_string())));
            }
        };
        self.live.lock_or_recover().insert(
            id.to_string(),
            Live {
                pid: meta.pid,
                pidfd,
                slot,
                layers_fd: meta.layers_fd,
            },
        );
        Ok(Created {
            agent: AgentAddress::Unix(socket),
        })
    }
}

impl ProcessRuntime {
    /// Creates a sandbox, over the given snapshots (top first) for a fork.
    async fn create_on(
        &self,
        id: &str,
        spec: &PoolSpec,
        base: &[PathBuf],
    ) -> Result<Created, RuntimeError> {
        if base.len() > snapshot::MAX_DEPTH {
            return Err(RuntimeError::Create(format!(
                "a fork stacks at most {} snapshots",
                snapshot::MAX_DEPTH
            )));
        }
        let slot = self.slots.lock_or_recover().take().ok_or_else(|| {
            RuntimeError::Create(format!("more than {MAX_SLOTS} sandboxes on this node"))
        })?;
        let result = self.create_inner(id, spec, slot, base).await;
        if result.is_err() {
            let live = self.live.lock_or_recover().contains_key(id);
            if live {
                let _ = self.destroy_inner(id).await;
            } else {
                let _ = self.cgroups.remove(id).await;
                let _ = fs::remove_dir_all(self.dir(id));
                self.slots.lock_or_recover().free.push(slot);
            }
        }
        result
    }

    /// Copies a (frozen) sandbox's writable layers into `dest`, through its agent's hold.
    async fn snapshot_inner(&self, id: &str, dest: &Path, limit: u64) -> Result<u64, RuntimeError> {
        let (pid, slot, layers_fd) = {
            let live = self.live.lock_or_recover();
            let live = live.get(id).ok_or_else(|| RuntimeError::Destroy {
                id: id.to_string(),
                reason: "no such sandbox".into(),
            })?;
            (live.pid, live.slot, live.layers_fd)
        };
        let layers_fd = layers_fd.ok_or(RuntimeError::NotSupported {
            runtime: "process",
            operation: "snapshot a sandbox made by an older daemon",
        })?;
        let root = snapshot::layers_root(pid, layers_fd);
        let uid_base = self.config.uid_base + slot * IDS_PER_SANDBOX;
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || snapshot::copy_state(&root, &dest, uid_base, limit))
            .await
            .map_err(|e| RuntimeError::Io(std::io::Error::other(e.to_string())))?
            .map_err(|e| match e {
                snapshot::SnapshotError::TooLarge { limit } => RuntimeError::TooLarge { limit },
                other => RuntimeError::Backend {
                    runtime: "process",
                    source: Box::new(other),
                },
            })
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn validate(&self, spec: &PoolSpec) -> Result<(), String> {
        validate_spec(spec)
    }

    fn budgets(&self) -> Budgets {
        Budgets {
            create: Duration::from_secs(30),
            destroy: Duration::from_secs(30),
        }
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(self.create_on(id, spec, &[]))
    }

    fn snapshot<'a>(
        &'a self,
        id: &'a str,
        dest: &'a Path,
        limit: u64,
    ) -> BoxFuture<'a, Result<u64, RuntimeError>> {
        Box::pin(self.snapshot_inner(id, dest, limit))
    }

    fn fork<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
        base: &'a [PathBuf],
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(self.create_on(id, spec, base))
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.destroy_inner(id))
    }

    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ExitReason> {
        let pidfd = self.live.lock_or_recover().get(id).map(|l| l.pidfd.clone());
        Box::pin(async move {
            let Some(pidfd) = pidfd else {
                return ExitReason::Destroyed;
            };
            let _ = pidfd.readable().await;
            // `destroy` forgets the sandbox before it kills the agent.
            if !self.live.lock_or_recover().contains_key(id) {
                return ExitReason::Destroyed;
            }
            // Read before `destroy` removes the cgroup; the status is peeked, not reaped
            // (`destroy` reaps).
            let oom_kills = self.cgroups.oom_kills(id);
            let reason = match peek_exit(pidfd.get_ref()) {
                Some((code, signal)) => ExitReason::classify(code, signal, oom_kills),
                None => ExitReason::Unknown,
            };
            if reason != ExitReason::Destroyed && reason != ExitReason::Unknown {
                let log = self.dir(id).join("agent.log");
                if let Some(tail) = log_tail(&log) {
                    tracing::info!(sandbox = %id, agent_log = %tail, "last lines of the dead agent's log");
                }
            }
            reason
        })
    }

    fn set_paused<'a>(
        &'a self,
        id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { Ok(self.cgroups.freeze(id, paused).await?) })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
        Box::pin(self.reclaim_inner())
    }

    fn adopt<'a>(
        &'a self,
        id: &'a str,
        _kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(self.adopt_inner(id))
    }
}

/// Takes an exclusive lock on the state directory, or says who holds it.
fn lock_state_dir(dir: &Path) -> Result<fs::File, RuntimeError> {
    let path = dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(RuntimeError::Unavailable {
            runtime: "process",
            reason: format!(
                "another arl node is using the state directory {} (give each daemon its own --state-dir)",
                dir.display()
            ),
        });
    }
    Ok(file)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) on a pidfd we own; a pidfd never refers to a reused pid.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// The sandbox's memory limit: its processes' `memory_mb` plus its writable layer's `disk_mb`.
/// The writable layer is a tmpfs, whose pages are charged to the sandbox's memory cgroup: with
/// the two added, a full disk is ENOSPC to the writer and never an out-of-memory kill, and files
/// never eat into the memory the pool promised its processes.
fn memory_limit_bytes(spec: &PoolSpec) -> u64 {
    spec.memory_mb
        .saturating_add(spec.disk_mb)
        .saturating_mul(1 << 20)
}

/// The exit status of a dead agent, left to be reaped: (exit code, or terminating signal).
fn peek_exit(pidfd: &OwnedFd) -> Option<(Option<i32>, Option<i32>)> {
    // SAFETY: waitid on a pidfd with a zeroed siginfo; WNOWAIT leaves the child waitable.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 || info.si_pid() == 0 {
            return None;
        }
        let status = info.si_status();
        match info.si_code {
            libc::CLD_EXITED => Some((Some(status), None)),
            libc::CLD_KILLED | libc::CLD_DUMPED => Some((None, Some(status))),
            _ => None,
        }
    }
}

/// The last lines of a dead agent's log (what it said before it went), bounded.
fn log_tail(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(1024))).ok()?;
    let mut bytes = Vec::new();
    file.take(1024).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Collects the exit status of a dead agent (the daemon is their subreaper).
fn reap(pidfd: &OwnedFd) {
    // SAFETY: waitid on a pidfd with a zeroed siginfo; ECHILD when it is not our child.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        );
    }
}

/// Reaps the agents a reclaim killed (re-parented to us, the subreaper), each by its pid. Never
/// `waitpid(-1)`: that would also take the exit status of a child someone else waits for, such
/// as a `sandbox-init` launcher tokio is awaiting, and fail that creation with ECHILD.
fn reap_killed(pids: &[i32]) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    for &pid in pids {
        // Dead by now (its cgroups are empty); ECHILD when it was not our child.
        let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// The process start time (clock ticks since boot), to tell a pid from its reuse.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod reap_tests {
    use super::*;

    /// A reclaim must not take the exit status of a child that someone else waits for.
    #[tokio::test]
    async fn a_reclaim_leaves_other_childrens_exit_status_alone() {
        if !nix::unistd::geteuid().is_root() {
            panic!("the process runtime's tests run as root (scripts/test.sh)");
        }
        let state = std::env::temp_dir().join(format!("arl-reap-test-{}", std::process::id()));
        let runtime = ProcessRuntime::new(ProcessConfig {
            state_dir: state.clone(),
            cgroup_parent: format!("arl-reap-test-{}", std::process::id()),
            uid_base: 1 << 24,
        })
        .expect("process runtime");
        // A stale sandbox directory gives the reclaim something to do.
        fs::create_dir_all(state.join("sandboxes").join("sb-stale")).expect("stale dir");
        let mut child = tokio::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawn");
        let pid = child.id().expect("pid");
        // Wait until it is a zombie: its exit status is there for the taking.
        let zombie = || {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
        };
        for _ in 0..5000 {
            if zombie() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(zombie(), "the child never exited");
        assert_eq!(runtime.reclaim().await.expect("reclaim"), 1);
        let status = child.wait().await.expect("its status is still ours");
        assert_eq!(status.code(), Some(7));
        let _ = fs::remove_dir_all(&state);
    }
}
