//! `posix_spawn` of an exec's command, with its own working directory, environment and pipes.
//!
//! std's `Command::current_dir` needs `posix_spawn_file_actions_addchdir_np`, which std looks
//! up at run time; a static binary (which `arl` is) cannot, so std falls back to fork + exec,
//! copying the agent's page tables: about 0.1 ms more per exec. This calls the C library's
//! `posix_spawn` directly (glibc runs it as `clone(CLONE_VM | CLONE_VFORK)` and reports exec
//! failures as its return value).

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A started command: its pid and the parent's ends of its pipes.
pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where `program` is: itself when it names a path, else the first executable match in the
/// command's own `PATH` (relative entries are taken from `cwd`).
fn resolve(program: &str, env: &[(&str, &str)], cwd: &str) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(cwd).join(dir).join(program);
        let Ok(c) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: access(2) on a NUL-terminated path.
        if candidate.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
    }
    Err(io::Error::from(io::ErrorKind::NotFound))
}

fn c_string(s: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(s.as_ref()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The C library's spawn settings, released on drop.
struct Actions(libc::posix_spawn_file_actions_t);
struct Attributes(libc::posix_spawnattr_t);

impl Drop for Actions {
    fn drop(&mut self) {
        // SAFETY: initialised in `spawn` before any use.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in `spawn` before any use.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// Starts `argv` in `cwd` with exactly `env`, in a process group of its own, with default
/// signal dispositions and mask, stdout and stderr on fresh pipes and stdin on a pipe (when
/// `with_stdin`) or `/dev/null`.
pub fn spawn(
    argv: &[String],
    env: &[(&str, &str)],
    cwd: &str,
    with_stdin: bool,
) -> io::Result<Spawned> {
    let program = argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let path = c_string(resolve(program, env, cwd)?.as_os_str().as_bytes())?;
    let args = argv.iter().map(c_string).collect::<io::Result<Vec<_>>>()?;
    let vars = env
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    let mut arg_ptrs: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    arg_ptrs.push(std::ptr::null_mut());
    let mut env_ptrs: Vec<*mut c_char> = vars.iter().map(|v| v.as_ptr().cast_mut()).collect();
    env_ptrs.push(std::ptr::null_mut());
    let cwd_c = c_string(cwd)?;
    let dev_null = c"/dev/null";

    // Pipes are close-on-exec; the child's ends are dup2'ed onto 0, 1 and 2 (which clears it).
    let flags = nix::fcntl::OFlag::O_CLOEXEC;
    let (out_r, out_w) = nix::unistd::pipe2(flags)?;
    let (err_r, err_w) = nix::unistd::pipe2(flags)?;
    let stdin_pipe = if with_stdin {
        Some(nix::unistd::pipe2(flags)?)
    } else {
        None
    };

    // SAFETY: plain C library calls on values owned here; every pointer outlives the call.
    unsafe {
        let mut actions = Actions(std::mem::zeroed());
        check(libc::posix_spawn_file_actions_init(&mut actions.0))?;
        match &stdin_pipe {
            Some((r, _)) => check(libc::posix_spawn_file_actions_adddup2(
                &mut actions.0,
                r.as_raw_fd(),
                0,
            ))?,
            None => check(libc::posix_spawn_file_actions_addopen(
                &mut actions.0,
                0,
                dev_null.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?,
        }
        check(libc::posix_spawn_file_actions_adddup2(
            &mut actions.0,
            out_w.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut actions.0,
            err_w.as_raw_fd(),
            2,
        ))?;
        check(libc::posix_spawn_file_actions_addchdir_np(
            &mut actions.0,
            cwd_c.as_ptr(),
        ))?;

        let mut attrs = Attributes(std::mem::zeroed());
        check(libc::posix_spawnattr_init(&mut attrs.0))?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let mut defaults: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut defaults);
        // The agent ignores SIGPIPE (as every Rust program does); its commands must not.
        libc::sigaddset(&mut defaults, libc::SIGPIPE);
        check(libc::posix_spawnattr_setsigmask(&mut attrs.0, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(&mut attrs.0, &defaults))?;
        check(libc::posix_spawnattr_setpgroup(&mut attrs.0, 0))?;
        check(libc::posix_spawnattr_setflags(
            &mut attrs.0,
            (libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        ))?;

        let mut pid: libc::pid_t = 0;
        check(libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attrs.0,
            arg_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
        ))?;
        Ok(Spawned {
            pid,
            stdin: stdin_pipe.map(|(_, w)| w),
            stdout: out_r,
            stderr: err_r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn programs_are_found_in_the_commands_own_path() {
        let sh = resolve("sh", &[("PATH", "/nonexistent:/bin")], "/").ok();
        assert_eq!(sh.as_deref(), Some(std::path::Path::new("/bin/sh")));
        assert!(resolve("sh", &[("PATH", "/nonexistent")], "/").is_err());
        // A path is taken as it is; the last PATH given wins.
        assert_eq!(
            resolve("./x", &[], "/").ok().as_deref(),
            Some(std::path::Path::new("./x"))
        );
        assert!(resolve("sh", &[("PATH", "/bin"), ("PATH", "/nonexistent")], "/").is_err());
    }
}
