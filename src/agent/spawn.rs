//! Starting an exec's command: `clone(CLONE_VM | CLONE_VFORK)` and `execve`, with its own
//! working directory, environment, process group and pipes.
//!
//! Why not the C library's `posix_spawn` or std's `Command`: in a static binary (which `arl`
//! is) std falls back to fork + exec, copying the agent's page tables (about 0.1 ms per exec);
//! glibc's `posix_spawn` makes some 130 system calls in the child before `execve` (it resets
//! all 64 signal dispositions one by one and checks every file action against the descriptor
//! limit). This child makes about ten: the agent knows which dispositions it changed.
//!
//! The child shares the agent's memory until `execve`, and the agent's thread is suspended
//! meanwhile, so it touches only what was prepared for it, allocates nothing and calls only
//! async-signal-safe functions. All signals stay blocked in it until its own handlers are
//! reset, so none of the agent's handlers can run in it.

use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use crate::util::MutexExt;

/// A started command: its pid and the parent's ends of its pipes.
pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The child's stack: it runs a handful of system calls and nothing else.
const CHILD_STACK: usize = 64 * 1024;

/// The children's stack memory, kept for the agent's life (allocating and freeing 64 KiB per
/// command made glibc's malloc consolidate its heap each time). One is enough: a parent is
/// suspended until its child has exec'ed or exited, and the lock keeps spawns from two threads
/// apart. u128 keeps it 16-byte aligned, as the ABI wants; it is never initialised (only
/// children write to it).
static CHILD_STACK_MEMORY: Mutex<Vec<u128>> = Mutex::new(Vec::new());

/// Where the command may be: itself when it names a path, else each entry of the command's own
/// `PATH` (as `execvp` does; relative entries are taken from the command's working directory).
fn candidates(program: &str, env: &[(&str, &str)]) -> io::Result<Vec<CString>> {
    if program.contains('/') {
        return Ok(vec![c_string(program)?]);
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v);
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            c_string(Path::new(dir).join(program).as_os_str().as_bytes())
        })
        .collect()
}

fn c_string(s: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(s.as_ref()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

/// The kernel's `struct sigaction` (not the C library's, which differs): the handler comes
/// first on every architecture; the rest is room for flags, restorer and mask.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    rest: [u64; 3],
}

/// Signals whose disposition is not the default in the agent (handled, like SIGCHLD, or
/// ignored, like SIGPIPE, including the C library's internal ones, which its own `sigaction`
/// hides): the child resets exactly these. Read once, at the first spawn, after the agent has
/// set up its SIGCHLD handling; the agent changes no disposition later.
fn changed_dispositions() -> &'static [c_int] {
    static CHANGED: OnceLock<Vec<c_int>> = OnceLock::new();
    CHANGED.get_or_init(|| {
        (1..=libc::SIGRTMAX())
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| {
                let mut current = KernelSigaction {
                    handler: 0,
                    rest: [0; 3],
                };
                // SAFETY: rt_sigaction(2) query into a struct large enough for the kernel's.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        std::ptr::null::<KernelSigaction>(),
                        &mut current,
                        8,
                    )
                };
                rc == 0 && current.handler != libc::SIG_DFL
            })
            .collect()
    })
}

/// `/dev/null`, opened once (close-on-exec; a child's `dup2` onto 0 clears that on its copy):
/// a command without input reads it. `None` if it cannot be opened: each child then tries.
fn dev_null() -> Option<RawFd> {
    static DEV_NULL: OnceLock<Option<OwnedFd>> = OnceLock::new();
    DEV_NULL
        .get_or_init(|| std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}

/// Everything the child needs, prepared by the parent (the child may not allocate).
struct ChildPlan<'a> {
    candidates: &'a [*const c_char],
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    stdin: Option<RawFd>,
    stdout: RawFd,
    stderr: RawFd,
    reset: &'a [c_int],
    /// The command's stdin is a terminal it takes as its controlling one, in a session of its
    /// own (a PTY's shell); otherwise it gets a process group of its own.
    tty: bool,
    /// Written by the child when it cannot exec: the errno to report.
    failure: c_int,
}

/// Puts `fd` on `target` for the command (without close-on-exec).
///
/// SAFETY (for callers): only in the spawned child.
unsafe fn install(fd: RawFd, target: RawFd) -> c_int {
    unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    }
}

fn errno() -> c_int {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Makes the command the OOM killer's first choice, so a sandbox that runs out of memory loses
/// a command and keeps its agent. Raising needs no privilege (lowering below 0 needs
/// CAP_SYS_RESOURCE in the host's user namespace, which nothing in a sandbox has), so a command
/// can at most come back to the agent's own score. Applies to this child only: a vfork child's
/// score is not shared with the agent whose memory it borrows. Failure changes nothing else.
///
/// SAFETY (for callers): only in the spawned child; open, write and close are
/// async-signal-safe.
unsafe fn raise_oom_score() {
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, OOM_SCORE_ADJ.as_ptr().cast(), OOM_SCORE_ADJ.len());
            libc::close(fd);
        }
    }
}

/// The highest OOM score adjustment: always killed before any process at 0.
const OOM_SCORE_ADJ: &[u8] = b"1000";

/// The child, between `clone` and `execve`. Returns only on failure (its value is the exit
/// status; the errno is left in the plan).
extern "C" fn child(plan: *mut c_void) -> c_int {
    // SAFETY: `plan` is the parent's `ChildPlan`, alive and untouched while the parent is
    // suspended (CLONE_VFORK); only async-signal-safe calls follow.
    unsafe {
        let plan = &mut *plan.cast::<ChildPlan>();
        // All zero: SIG_DFL, no flags, empty mask.
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            rest: [0; 3],
        };
        for &sig in plan.reset {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default,
                std::ptr::null_mut::<KernelSigaction>(),
                8,
            );
        }
        let stdin_ok = match plan.stdin {
            Some(fd) => install(fd, 0) >= 0,
            None => {
                let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                fd >= 0 && install(fd, 0) >= 0
            }
        };
        if !stdin_ok
            || install(plan.stdout, 1) < 0
            || install(plan.stderr, 2) < 0
            || !(if plan.tty {
                libc::setsid() >= 0 && libc::ioctl(0, libc::TIOCSCTTY, 0) >= 0
            } else {
                libc::setpgid(0, 0) >= 0
            })
            || libc::chdir(plan.cwd) < 0
        {
            plan.failure = errno();
            return 127;
        }
        raise_oom_score();
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // As execvp: a candidate that is missing (or not a directory on the way) lets the
        // search go on; permission problems are remembered; anything else stops it.
        let mut failure = libc::ENOENT;
        for &path in plan.candidates {
            libc::execve(path, plan.argv, plan.envp);
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => failure = libc::EACCES,
                other => {
                    failure = other;
                    break;
                }
            }
        }
        plan.failure = failure;
        127
    }
}

/// Starts `argv` in `cwd` with exactly `env`, in a process group of its own, with default
/// signal dispositions and an empty mask, stdout and stderr on fresh pipes and stdin on a pipe
/// (when `with_stdin`) or `/dev/null`. A command that cannot be started is an error of kind
/// `NotFound` or `PermissionDenied` (or the exec's own errno); its child has exited by then.
pub fn spawn(
    argv: &[String],
    env: &[(&str, &str)],
    cwd: &str,
    with_stdin: bool,
) -> io::Result<Spawned> {
    // Pipes are close-on-exec; the child puts its ends on 0, 1 and 2 (which clears that).
    let flags = nix::fcntl::OFlag::O_CLOEXEC;
    let (out_r, out_w) = nix::unistd::pipe2(flags)?;
    let (err_r, err_w) = nix::unistd::pipe2(flags)?;
    let stdin_pipe = if with_stdin {
        Some(nix::unistd::pipe2(flags)?)
    } else {
        None
    };
    let stdio = Stdio {
        stdin: stdin_pipe.as_ref().map(|(r, _)| r.as_raw_fd()),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        tty: false,
    };
    let pid = launch(argv, env, cwd, stdio)?;
    Ok(Spawned {
        pid,
        stdin: stdin_pipe.map(|(_, w)| w),
        stdout: out_r,
        stderr: err_r,
    })
}

/// Starts `argv` like [`spawn`], but on a terminal: `tty` (a PTY's secondary end) becomes its
/// stdin, stdout, stderr and controlling terminal, in a new session. Returns its pid.
pub fn spawn_on_tty(
    argv: &[String],
    env: &[(&str, &str)],
    cwd: &str,
    tty: &OwnedFd,
) -> io::Result<i32> {
    let fd = tty.as_raw_fd();
    launch(
        argv,
        env,
        cwd,
        Stdio {
            stdin: Some(fd),
            stdout: fd,
            stderr: fd,
            tty: true,
        },
    )
}

/// Where a command's standard descriptors come from.
struct Stdio {
    stdin: Option<RawFd>,
    stdout: RawFd,
    stderr: RawFd,
    tty: bool,
}

fn launch(argv: &[String], env: &[(&str, &str)], cwd: &str, stdio: Stdio) -> io::Result<i32> {
    let program = argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let paths = candidates(program, env)?;
    let args = argv.iter().map(c_string).collect::<io::Result<Vec<_>>>()?;
    let vars = env
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    let path_ptrs: Vec<*const c_char> = paths.iter().map(|p| p.as_ptr()).collect();
    let mut arg_ptrs: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const c_char> = vars.iter().map(|v| v.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let cwd_c = c_string(cwd)?;

    let mut plan = ChildPlan {
        candidates: &path_ptrs,
        argv: arg_ptrs.as_ptr(),
        envp: env_ptrs.as_ptr(),
        cwd: cwd_c.as_ptr(),
        stdin: stdio.stdin.or_else(dev_null),
        stdout: stdio.stdout,
        stderr: stdio.stderr,
        reset: changed_dispositions(),
        tty: stdio.tty,
        failure: 0,
    };
    let mut stack = CHILD_STACK_MEMORY.lock_or_recover();
    if stack.capacity() < CHILD_STACK / 16 {
        stack.reserve_exact(CHILD_STACK / 16);
    }
    // SAFETY: the child runs on `stack` with `plan`, both alive and held until clone returns
    // (the parent is suspended until the child has exec'ed or exited, after which the child
    // no longer uses either). Signals are blocked around the clone so that no handler of the
    // agent runs in the child before it resets them.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut saved: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
        let top = stack.as_mut_ptr().add(stack.capacity()).cast::<c_void>();
        let pid = libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw mut plan).cast::<c_void>(),
        );
        let clone_error = errno();
        libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut());
        if pid < 0 {
            return Err(io::Error::from_raw_os_error(clone_error));
        }
        pid
    };
    drop(stack);
    if plan.failure != 0 {
        // The child has exited (status 127); the reaper collects it.
        return Err(io::Error::from_raw_os_error(plan.failure));
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::spawn;
    use std::io::Read;

    fn run(argv: &[&str], env: &[(&str, &str)], cwd: &str) -> std::io::Result<(String, i32)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let child = spawn(&argv, env, cwd, false)?;
        let mut out = String::new();
        std::fs::File::from(child.stdout)
            .read_to_string(&mut out)
            .expect("read stdout");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(
            unsafe { libc::waitpid(child.pid, &mut status, 0) },
            child.pid
        );
        Ok((out, libc::WEXITSTATUS(status)))
    }

    #[test]
    fn commands_are_found_in_their_own_path_and_run_where_asked() {
        let (out, code) = run(
            &[
                "sh",
                "-c",
                "pwd; echo \"$X\"; grep -E '^Sig(Blk|Ign)' /proc/self/status; exit 3",
            ],
            &[("PATH", "/nonexistent:/bin"), ("X", "x=1")],
            "/tmp",
        )
        .expect("spawn sh");
        // Nothing blocked and nothing ignored (this test process ignores SIGPIPE, as the
        // agent does): every disposition changed here is back to the default.
        assert_eq!(
            out,
            "/tmp\nx=1\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
        );
        assert_eq!(code, 3);
        // The last PATH given wins; a command nowhere on it is NotFound.
        let missing = run(&["sh"], &[("PATH", "/bin"), ("PATH", "/nonexistent")], "/");
        assert_eq!(
            missing.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        // A relative PATH entry is taken from the command's working directory.
        let (out, _) = run(&["sh", "-c", "echo ok"], &[("PATH", "bin")], "/").expect("spawn");
        assert_eq!(out, "ok\n");
    }

    #[test]
    fn commands_are_the_oom_killers_first_choice_and_the_spawner_is_not() {
        let before = std::fs::read_to_string("/proc/self/oom_score_adj").expect("own score");
        let (out, code) = run(
            &["cat", "/proc/self/oom_score_adj"],
            &[("PATH", "/bin:/usr/bin")],
            "/",
        )
        .expect("spawn cat");
        assert_eq!((out.as_str(), code), ("1000\n", 0));
        let after = std::fs::read_to_string("/proc/self/oom_score_adj").expect("own score");
        assert_eq!(before, after);
        assert_ne!(after.trim(), "1000");
    }

    #[test]
    fn what_cannot_be_executed_is_an_error_of_its_kind() {
        let file = std::env::temp_dir().join(format!("arl-spawn-{}", std::process::id()));
        std::fs::write(&file, "#!/bin/sh\n").expect("write");
        let path = file.to_str().expect("utf-8 path");
        let denied = run(&[path], &[], "/").err().map(|e| e.kind());
        let _ = std::fs::remove_file(&file);
        assert_eq!(denied, Some(std::io::ErrorKind::PermissionDenied));
        let no_cwd = run(&["true"], &[], "/nonexistent-dir")
            .err()
            .map(|e| e.kind());
        assert_eq!(no_cwd, Some(std::io::ErrorKind::NotFound));
    }
}
