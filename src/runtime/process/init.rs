//! `arl sandbox-init`: the short-lived helper that turns a pool spec into a running sandbox.
//!
//! The daemon is multi-threaded, so it cannot safely fork and set up namespaces itself. It runs
//! this helper instead (a fresh, single-threaded process), which:
//! 1. joins the sandbox's cgroups, binds the agent's Unix socket on the host, and
//! 2. clones a child into new user, mount, pid, ipc, uts, cgroup (and net) namespaces;
//! 3. maps the child's root to an unprivileged host uid range and lets it go on;
//! 4. the child builds the sandbox filesystem, pivots into it, drops privileges and execs
//!    `arl agent` from a file descriptor of this very binary (so it needs nothing inside the
//!    sandbox), handing it the listening socket;
//! 5. the helper prints the child's host pid and exits; the agent lives on as the sandbox's PID 1.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

use crate::api::NetworkMode;

use super::{seccomp, snapshot};

/// Everything the helper needs, passed as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub id: String,
    /// The sandbox's host directory (its socket and log).
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cgroup_procs: Vec<PathBuf>,
    pub uid_base: u32,
    pub id_count: u32,
    pub disk_mb: u64,
    pub network: NetworkMode,
    pub rootfs: Option<PathBuf>,
    /// The memory cgroup's counters file, handed to the agent open (to tell OOM kills).
    pub memory_events: Option<PathBuf>,
    /// Snapshot directories to stack under the sandbox's layers, top first (a fork).
    #[serde(default)]
    pub base: Vec<PathBuf>,
    /// Also have the agent listen on this TCP address (with `network: host`), with the token
    /// that this helper finds in its own environment (`ARL_AGENT_TOKEN`, never in this
    /// config, which is a command-line argument).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_tcp: Option<std::net::SocketAddr>,
}

/// Where the agent holds the sandbox's layers tmpfs open, for snapshots (`snapshot.rs`).
pub const LAYERS_FD: RawFd = 999;

/// Host system directories a default sandbox sees (copy-on-write, through overlays).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Capabilities root keeps inside a sandbox (the usual container default set).
const KEPT_CAPS: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the helper; returns the process exit code.
pub fn main(config_json: &str) -> i32 {
    let config: InitConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandbox-init: bad config: {e}");
            return 2;
        }
    };
    match launch(&config) {
        Ok(pid) => {
            println!("{pid}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn launch(cfg: &InitConfig) -> Result<i32, String> {
    let me = std::process::id().to_string();
    for procs in &cfg.cgroup_procs {
        fs::write(procs, &me).map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    let exe = fs::File::open("/proc/self/exe").map_err(|e| format!("open own binary: {e}"))?;
    let _ = fs::remove_file(&cfg.socket);
    let listener = UnixListener::bind(&cfg.socket)
        .map_err(|e| format!("bind {}: {e}", cfg.socket.display()))?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.dir.join("agent.log"))
        .map_err(|e| format!("open agent log: {e}"))?;
    let devnull = fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
    let memory_events = match &cfg.memory_events {
        Some(path) => {
            Some(fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?)
        }
        None => None,
    };
    protect_agent_from_oom_killer();
    // Made before the clone, so the sandbox's first process inherits them.
    let bases = snapshot::base_mounts(&cfg.base, cfg.uid_base, cfg.id_count)?;
    let base_fds: Vec<RawFd> = bases.iter().map(|fd| fd.as_raw_fd()).collect();

    let (go_read, go_write) = pipe()?;
    let (status_read, status_write) = pipe()?;

    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if cfg.network == NetworkMode::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }

    let mut stack = vec![0u8; 1 << 20];
    let child_cfg = cfg.clone();
    let listener_fd = listener.as_raw_fd();
    let fds = ChildFds {
        go: go_read.as_raw_fd(),
        status: status_write.as_raw_fd(),
        exe: exe.as_raw_fd(),
        listener: listener_fd,
        log: log.as_raw_fd(),
        devnull: devnull.as_raw_fd(),
        memory_events: memory_events.as_ref().map(|f| f.as_raw_fd()),
    };
    let child = Box::new(move || child_main(&child_cfg, fds, &base_fds));
    // SAFETY: this helper is single-threaded, so the cloned child owns a consistent copy of
    // the address space; it ends in execve or _exit and never returns into our frames.
    let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(|e| format!("clone sandbox namespaces: {e}"))?;
    drop(go_read);
    drop(status_write);

    let map = format!("0 {} {}\n", cfg.uid_base, cfg.id_count);
    let pid_dir = PathBuf::from(format!("/proc/{pid}"));
    fs::write(pid_dir.join("uid_map"), &map).map_err(|e| format!("write uid_map: {e}"))?;
    fs::write(pid_dir.join("gid_map"), &map).map_err(|e| format!("write gid_map: {e}"))?;
    let mut go = fs::File::from(go_write);
    go.write_all(b"g")
        .map_err(|e| format!("release child: {e}"))?;
    drop(go);

    // The status pipe closes on the child's successful exec; anything written is an error.
    let mut status = String::new();
    fs::File::from(status_read)
        .read_to_string(&mut status)
        .map_err(|e| format!("read child status: {e}"))?;
    if !status.is_empty() {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(status);
    }
    Ok(pid.as_raw())
}

#[derive(Clone, Copy)]
struct ChildFds {
    go: RawFd,
    status: RawFd,
    exe: RawFd,
    listener: RawFd,
    log: RawFd,
    devnull: RawFd,
    memory_events: Option<RawFd>,
}

/// Puts the agent (this helper's child) at OOM score adjustment 0, whatever the daemon's is:
/// the agent raises every command it starts to +1000, so the OOM killer picks commands first.
/// 0 and not -1000: lowering needs CAP_SYS_RESOURCE, which many hosts withhold from root, and
/// where it is held, -1000 would also become the floor commands could lower themselves back to
/// (a command at -1000 is never killed, and its sandbox would stall out of memory instead).
/// Writing 0 with that capability pins the floor at 0. A failure (a daemon above 0 without the
/// capability) leaves the agent where the daemon is, still below its commands.
fn protect_agent_from_oom_killer() {
    let _ = fs::write("/proc/self/oom_score_adj", "0");
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

/// Runs in the cloned child: PID 1 of the new pid namespace.
fn child_main(cfg: &InitConfig, fds: ChildFds, bases: &[RawFd]) -> isize {
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte from our own pipe fd.
    let n = unsafe { libc::read(fds.go, byte.as_mut_ptr().cast(), 1) };
    if n != 1 {
        return 1;
    }
    let err = match setup(cfg, fds, bases) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let msg = format!("sandbox {}: {err}", cfg.id);
    // SAFETY: write to our own status pipe, then leave without running destructors.
    unsafe {
        libc::write(fds.status, msg.as_ptr().cast(), msg.len());
        libc::_exit(1)
    }
}

enum Never {}

fn setup(cfg: &InitConfig, fds: ChildFds, bases: &[RawFd]) -> Result<Never, String> {
    become_root()?;
    build_root(cfg, bases)?;
    nix::unistd::sethostname("sandbox").map_err(|e| format!("sethostname: {e}"))?;
    if cfg.network == NetworkMode::None {
        loopback_up()?;
    }
    stdio(fds)?;
    // The listener, the memory counters and the layers must survive exec; everything else of
    // ours is close-on-exec.
    for fd in [fds.listener, LAYERS_FD]
        .into_iter()
        .chain(fds.memory_events)
    {
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(format!(
                "keep descriptor {fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    limit_core_dumps();
    drop_privileges()?;
    exec_agent(fds, cfg.listen_tcp)
}

fn become_root() -> Result<(), String> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(|e| format!("setgid: {e}"))?;
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(|e| format!("setuid: {e}"))
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce(nix::Error) -> String {
    let msg = format!("mount {what} on {}", target.display());
    move |e| format!("{msg}: {e}")
}

fn mkdir(path: &Path, mode: u32) -> Result<(), String> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", path.display())),
    }
    // The umask must not weaken sticky or world-writable directories.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// An overlay of `lowers` (top first) with its upper layer in `layers`, on `target`.
fn overlay(lowers: &[PathBuf], layers: &Path, target: &Path) -> Result<(), String> {
    let upper = layers.join("upper");
    let work = layers.join("work");
    for d in [layers, &upper, &work, target] {
        mkdir(d, 0o755)?;
    }
    let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    let lower = lower.join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={},userxattr",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(mount_err(&format!("overlay of {lower}"), target))
}

/// The lower layers of the overlay named `name`: the snapshots' layers of that name (top
/// first), then `own` (the host's directory or the pool's rootfs), if any.
fn lowers(snapshots: &[PathBuf], name: &str, own: Option<PathBuf>) -> Vec<PathBuf> {
    snapshots
        .iter()
        .map(|s| s.join(name))
        .filter(|l| l.is_dir())
        .chain(own)
        .collect()
}

/// Builds the sandbox root and pivots into it.
fn build_root(cfg: &InitConfig, bases: &[RawFd]) -> Result<(), String> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(mount_err("private propagation", Path::new("/")))?;

    // The pool's rootfs is opened before anything is mounted over the host's tree.
    let rootfs = match &cfg.rootfs {
        Some(path) => {
            Some(fs::File::open(path).map_err(|e| format!("open rootfs {}: {e}", path.display()))?)
        }
        None => None,
    };
    // One tmpfs holds the writable layers and the new root; it is sized by the pool's disk_mb.
    // It goes over /tmp of this private mount namespace (the host never sees it), so no host
    // directory has to be reachable by the sandbox's unprivileged uids.
    let base = PathBuf::from("/tmp");
    let size = format!("size={}m,mode=0755", cfg.disk_mb);
    mount(
        Some("tmpfs"),
        &base,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(size.as_str()),
    )
    .map_err(mount_err("tmpfs", &base))?;
    hold_layers(&base)?;
    let layers = base.join("layers");
    let root = base.join("rootfs");
    mkdir(&layers, 0o700)?;
    // A fork's snapshots, attached under the tmpfs (they leave with the old root below; the
    // overlays keep their own references).
    let mut snapshots = Vec::new();
    if !bases.is_empty() {
        mkdir(&base.join("base"), 0o700)?;
    }
    for (i, fd) in bases.iter().enumerate() {
        let at = base.join("base").join(i.to_string());
        mkdir(&at, 0o700)?;
        snapshot::attach(*fd, &at)?;
        snapshots.push(at);
    }

    match &rootfs {
        Some(dir) => {
            let own = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            overlay(
                &lowers(&snapshots, "root", Some(own)),
                &layers.join("root"),
                &root,
            )?
        }
        None => {
            let below = lowers(&snapshots, snapshot::ROOT_LAYER, None);
            if below.is_empty() {
                mkdir(&root, 0o755)?;
                // pivot_root needs the new root to be a mount point.
                mount(Some(&root), &root, none, MsFlags::MS_BIND, none)
                    .map_err(mount_err("bind", &root))?;
            } else {
                // A fork's root: its snapshots' directories, copy-on-write.
                overlay(&below, &layers.join(snapshot::ROOT_LAYER), &root)?;
            }
            for dir in SYSTEM_DIRS {
                let host = Path::new(dir);
                let name = &dir[1..];
                let inside = root.join(name);
                match fs::symlink_metadata(host) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        let target =
                            fs::read_link(host).map_err(|e| format!("readlink {dir}: {e}"))?;
                        symlink(&target, &inside)
                            .map_err(|e| format!("symlink {}: {e}", inside.display()))?;
                    }
                    Ok(meta) if meta.is_dir() => overlay(
                        &lowers(&snapshots, name, Some(host.to_path_buf())),
                        &layers.join(name),
                        &inside,
                    )?,
                    _ => {}
                }
            }
        }
    }

    for (dir, mode) in [
        ("proc", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("workspace", 0o755),
        ("root", 0o700),
        ("run", 0o755),
        ("home", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
    ] {
        mkdir(&root.join(dir), mode)?;
    }

    let proc_dir = root.join("proc");
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(mount_err("proc", &proc_dir))?;
    build_dev(&root.join("dev"))?;

    let old = root.join(".oldroot");
    mkdir(&old, 0o700)?;
    nix::unistd::pivot_root(&root, &old).map_err(|e| format!("pivot_root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    umount2("/.oldroot", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
    fs::remove_dir("/.oldroot").map_err(|e| format!("remove old root: {e}"))?;
    nix::unistd::chdir("/workspace").map_err(|e| format!("chdir /workspace: {e}"))
}

/// Opens the layers tmpfs at the agent's `LAYERS_FD` (not close-on-exec; the agent marks it
/// so), for the daemon's snapshots.
fn hold_layers(base: &Path) -> Result<(), String> {
    let dir = fs::File::open(base).map_err(|e| format!("open {}: {e}", base.display()))?;
    // SAFETY: dup2 onto a descriptor number far above any this process has open.
    if unsafe { libc::dup2(dir.as_raw_fd(), LAYERS_FD) } < 0 {
        return Err(format!("hold layers: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn build_dev(dev: &Path) -> Result<(), String> {
    let none: Option<&str> = None;
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=256k,mode=0755"),
    )
    .map_err(mount_err("tmpfs", dev))?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::File::create(&target).map_err(|e| format!("create {}: {e}", target.display()))?;
        let host = Path::new("/dev").join(name);
        mount(Some(&host), &target, none, MsFlags::MS_BIND, none)
            .map_err(mount_err(&format!("bind {}", host.display()), &target))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        symlink(target, dev.join(link)).map_err(|e| format!("symlink /dev/{link}: {e}"))?;
    }
    let pts = dev.join("pts");
    mkdir(&pts, 0o755)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(mount_err("devpts", &pts))?;
    let shm = dev.join("shm");
    mkdir(&shm, 0o1777)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=64m,mode=1777"),
    )
    .map_err(mount_err("tmpfs", &shm))
}

fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket + ioctl on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(format!("get lo flags: {}", std::io::Error::last_os_error()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(format!("bring lo up: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn stdio(fds: ChildFds) -> Result<(), String> {
    // SAFETY: dup2 onto the standard descriptors of this process.
    unsafe {
        if libc::dup2(fds.devnull, 0) < 0
            || libc::dup2(fds.devnull, 1) < 0
            || libc::dup2(fds.log, 2) < 0
        {
            return Err(format!("stdio: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn limit_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// Narrows the capability bounding set, sets no_new_privs and installs the seccomp filter.
fn drop_privileges() -> Result<(), String> {
    for cap in 0..64u32 {
        if KEPT_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            // EINVAL: past the kernel's last capability.
            break;
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    seccomp::install().map_err(|e| format!("seccomp: {e}"))
}

fn exec_agent(fds: ChildFds, listen_tcp: Option<std::net::SocketAddr>) -> Result<Never, String> {
    let listen = fds.listener.to_string();
    let tcp = listen_tcp.map(|addr| addr.to_string());
    let events = fds.memory_events.map(|fd| fd.to_string());
    let layers = LAYERS_FD.to_string();
    let mut args: Vec<&str> = vec![
        "arl",
        "agent",
        "--listen-fd",
        &listen,
        "--layers-fd",
        &layers,
    ];
    if let Some(events) = &events {
        args.extend(["--memory-events-fd", events]);
    }
    if let Some(tcp) = &tcp {
        args.extend(["--listen-tcp", tcp]);
    }
    let args: Vec<CString> = args
        .iter()
        .map(|s| CString::new(*s).expect("digits and static words have no NUL"))
        .collect();
    let env: Vec<CString> = [
        PATH_ENV,
        "HOME=/root",
        "LANG=C.UTF-8",
        "HOSTNAME=sandbox",
        "TERM=xterm",
    ]
    .iter()
    .map(|s| CString::new(*s).expect("static env"))
    .collect();
    let mut env = env;
    if tcp.is_some() {
        let token = std::env::var(crate::runtime::AGENT_TOKEN_ENV).unwrap_or_default();
        let entry = CString::new(format!("{}={token}", crate::runtime::AGENT_TOKEN_ENV))
            .map_err(|_| "the agent's token has a NUL".to_string())?;
        env.push(entry);
    }
    // SAFETY: the fd is this binary, opened before pivot_root.
    let exe = unsafe { std::os::fd::BorrowedFd::borrow_raw(fds.exe) };
    match nix::unistd::fexecve(exe, &args, &env) {
        Err(err) => Err(format!("exec agent: {err}")),
        Ok(never) => match never {},
    }
}
