//! Snapshots and forks of process sandboxes.
//!
//! A sandbox's whole writable state is one tmpfs (`init.rs`): the upper layer of each overlay
//! (`layers/<name>/upper`: `usr`, `etc`, ... over the host's directories, or `root` over a
//! pool's rootfs) and the plain directories of its root (`rootfs/`: `/workspace`, `/tmp`,
//! `/root`, ...; for a fork, the upper layer `layers/rootfs/upper` of its root). The agent
//! holds a descriptor of that tmpfs (`--layers-fd`), so the daemon reaches it through
//! `/proc/<agent>/fd/<n>` — no mounts on top of it there, nothing of the host under it.
//!
//! * A **snapshot** copies those layers to a host directory while the sandbox is frozen (so
//!   nothing changes under the copy), shifting owners from the sandbox's uid range to 0-based
//!   ids, keeping modes, times, overlay's extended attributes (`user.*` and `trusted.overlay.*`)
//!   and whiteouts. Symbolic links are copied as links and never followed: the sandbox's
//!   files are not trusted. File data is copied in the kernel (`sendfile`), each destination
//!   sized first (the node's in-memory snapshot store, a tmpfs with `huge=within_size`, then
//!   backs it with huge pages) and a large file in pieces, one thread per core: the copy is
//!   bound by the CPU (nothing is fsynced).
//! * A **fork** stacks the snapshot (and the snapshots it came from) under a new sandbox's
//!   overlays as read-only lower layers, mounted idmapped into the fork's own uid range:
//!   copy-on-write, nothing is copied, and a file one fork changes is copied up into that
//!   fork's tmpfs alone. The idmapped mounts are made by `sandbox-init` before it clones the
//!   sandbox (`base_mounts`) and moved into place by the sandbox's first process.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Top-level names of a sandbox root that are not its state: mount points and the host's
/// system directories (their changes are layers of their own).
const NOT_STATE: &[&str] = &[
    "proc", "dev", ".oldroot", "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
];

/// The layer holding a sandbox's own root directory (a fork's or a snapshot's).
pub const ROOT_LAYER: &str = "rootfs";

/// Deepest stack of snapshots under a fork (a fork of a fork of ...).
pub const MAX_DEPTH: usize = 32;

/// Ids each sandbox maps; owners outside the range are stored as this (nobody).
const NOBODY: u32 = 65_534;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("the sandbox's writable state is over the snapshot budget of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The sandbox's layers tmpfs as the daemon sees it.
pub fn layers_root(agent_pid: i32, layers_fd: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{agent_pid}/fd/{layers_fd}"))
}

/// What a snapshot of the tmpfs at `root` copies: (layer name, source directory, whether its
/// top level skips `NOT_STATE`).
fn parts(root: &Path) -> io::Result<Vec<(String, PathBuf, bool)>> {
    let layers = root.join("layers");
    let mut parts = Vec::new();
    let mut own_root = false;
    for entry in fs::read_dir(&layers)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let upper = entry.path().join("upper");
        if !upper.is_dir() {
            continue;
        }
        own_root |= name == ROOT_LAYER || name == "root";
        parts.push((name.clone(), upper, name == ROOT_LAYER));
    }
    if !own_root {
        // A sandbox over the host's directories, not a fork: its root is a plain directory.
        parts.push((ROOT_LAYER.to_string(), root.join("rootfs"), true));
    }
    Ok(parts)
}

/// Copies the writable state of the (frozen) sandbox whose layers tmpfs is `root` into
/// `dest/<layer>`, owners shifted down by `uid_base`; at most `limit` bytes of file data.
/// Returns the bytes copied. `dest` must not exist; on an error it is left for the caller to
/// remove.
pub fn copy_state(
    root: &Path,
    dest: &Path,
    uid_base: u32,
    limit: u64,
) -> Result<u64, SnapshotError> {
    fs::create_dir_all(dest).map_err(io_at(dest))?;
    let mut copy = Copy::new(uid_base, 0, limit);
    for (name, src, skip_mounts) in parts(root).map_err(io_at(root))? {
        let to = dest.join(&name);
        copy.dir(&src, &to, skip_mounts)?;
    }
    Ok(copy.copied())
}

/// Copies the directory tree `src` into `dst` (which must not exist), owners moved from the
/// id range at `from_base` to the one at `to_base`; at most `limit` bytes of file data. Links
/// are copied, never followed. Returns the bytes copied.
pub fn copy_tree(
    src: &Path,
    dst: &Path,
    from_base: u32,
    to_base: u32,
    limit: u64,
) -> Result<u64, SnapshotError> {
    let mut copy = Copy {
        from_base,
        to_base,
        left: limit,
        limit,
    };
    copy.dir(src, dst, false)?;
    Ok(copy.copied())
}

/// Copies what is in `src` into the existing directory `dst` (its own owner and mode kept),
/// owners moved as [`copy_tree`] does.
pub fn copy_into(
    src: &Path,
    dst: &Path,
    from_base: u32,
    to_base: u32,
    limit: u64,
) -> Result<u64, SnapshotError> {
    let mut copy = Copy {
        from_base,
        to_base,
        left: limit,
        limit,
    };
    copy.entries(src, dst, false)?;
    Ok(copy.copied())
}

struct Copy {
    from_base: u32,
    to_base: u32,
    left: u64,
    limit: u64,
}

impl Copy {
    fn new(from_base: u32, to_base: u32, limit: u64) -> Self {
        Self {
            from_base,
            to_base,
            left: limit,
            limit,
        }
    }

    /// Bytes of file data copied so far.
    fn copied(&self) -> u64 {
        self.limit - self.left
    }

    fn shift(&self, id: u32) -> u32 {
        match id.checked_sub(self.from_base) {
            Some(inside) if inside < 65_536 => self.to_base + inside,
            _ => self.to_base + NOBODY,
        }
    }

    fn dir(&mut self, src: &Path, dst: &Path, top: bool) -> Result<(), SnapshotError> {
        let meta = fs::symlink_metadata(src).map_err(io_at(src))?;
        fs::create_dir(dst).map_err(io_at(dst))?;
        self.entries(src, dst, top)?;
        self.attributes(src, dst, &meta)
    }

    fn entries(&mut self, src: &Path, dst: &Path, top: bool) -> Result<(), SnapshotError> {
        for entry in fs::read_dir(src).map_err(io_at(src))? {
            let entry = entry.map_err(io_at(src))?;
            let name = entry.file_name();
            if top && NOT_STATE.iter().any(|n| name.as_bytes() == n.as_bytes()) {
                continue;
            }
            let from = entry.path();
            let to = dst.join(&name);
            let m = fs::symlink_metadata(&from).map_err(io_at(&from))?;
            let kind = m.file_type();
            if kind.is_dir() {
                self.dir(&from, &to, false)?;
                continue;
            } else if kind.is_symlink() {
                let target = fs::read_link(&from).map_err(io_at(&from))?;
                std::os::unix::fs::symlink(&target, &to).map_err(io_at(&to))?;
            } else if kind.is_file() {
                self.file(&from, &to, &m)?;
            } else if !self.special(&to, &m)? {
                continue;
            }
            self.attributes(&from, &to, &m)?;
        }
        Ok(())
    }

    fn file(&mut self, from: &Path, to: &Path, meta: &fs::Metadata) -> Result<(), SnapshotError> {
        let size = meta.len();
        if size > self.left {
            return Err(SnapshotError::TooLarge { limit: self.limit });
        }
        let src = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(from)
            .map_err(io_at(from))?;
        let dst = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(io_at(to))?;
        // Sized first: a tmpfs with `huge=within_size` (the in-memory snapshot store) then
        // backs the whole file with huge pages, which makes the copy several times faster.
        dst.set_len(size).map_err(io_at(to))?;
        // Bounded by what was measured: a file cannot change under a frozen sandbox, and what
        // is copied is what was measured (and counted against the budget) even if it did.
        let copied = copy_data(&src, &dst, size).map_err(io_at(to))?;
        if copied < size {
            dst.set_len(copied).map_err(io_at(to))?;
        }
        self.left -= copied;
        Ok(())
    }

    /// Whiteouts (character device 0:0) and FIFOs; other device nodes and sockets are not
    /// state a sandbox can make or keep. Returns whether something was made.
    fn special(&self, to: &Path, meta: &fs::Metadata) -> Result<bool, SnapshotError> {
        let mode = meta.mode();
        let kind = mode & libc::S_IFMT;
        let whiteout = kind == libc::S_IFCHR && meta.rdev() == 0;
        if !whiteout && kind != libc::S_IFIFO {
            return Ok(false);
        }
        let c = cpath(to)?;
        // SAFETY: mknod(2) with a NUL-terminated path.
        if unsafe { libc::mknod(c.as_ptr(), kind | (mode & 0o7777), 0) } != 0 {
            return Err(io_at(to)(io::Error::last_os_error()));
        }
        Ok(true)
    }

    /// Owner (shifted), mode, modification time and `user.*` extended attributes.
    fn attributes(&self, from: &Path, to: &Path, meta: &fs::Metadata) -> Result<(), SnapshotError> {
        let c = cpath(to)?;
        let (uid, gid) = (self.shift(meta.uid()), self.shift(meta.gid()));
        // SAFETY: lchown(2) with a NUL-terminated path.
        if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
            return Err(io_at(to)(io::Error::last_os_error()));
        }
        if !meta.file_type().is_symlink() {
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_at(to))?;
        }
        copy_overlay_xattrs(from, to)?;
        let times = [
            libc::timespec {
                tv_sec: meta.atime(),
                tv_nsec: meta.atime_nsec(),
            },
            libc::timespec {
                tv_sec: meta.mtime(),
                tv_nsec: meta.mtime_nsec(),
            },
        ];
        // SAFETY: utimensat(2) with a NUL-terminated path and two timespecs.
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        Ok(())
    }
}

/// Files at least this large are copied in pieces by several threads.
const PARALLEL_FROM: u64 = 16 << 20;

/// Pieces of a parallel copy start at multiples of this (a huge page).
const PIECE_ALIGN: u64 = 2 << 20;

/// Copies the first `size` bytes of `src` into `dst` (sized already), in the kernel
/// (`sendfile`); a large file in pieces, one per core (up to 4) — on a tmpfs the copy is
/// bound by the CPU (allocating and filling pages), so cores add up. Returns the bytes copied
/// (fewer if `src` is shorter).
fn copy_data(src: &fs::File, dst: &fs::File, size: u64) -> io::Result<u64> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as u64;
    if size < PARALLEL_FROM || workers < 2 {
        return copy_range(src, dst, 0, size);
    }
    let piece = size.div_ceil(workers).div_ceil(PIECE_ALIGN) * PIECE_ALIGN;
    // Each piece writes through a description of its own (its own file offset).
    let reopen = || {
        fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", dst.as_raw_fd()))
    };
    std::thread::scope(|scope| {
        let mut pieces = Vec::new();
        let mut start = piece;
        while start < size {
            let len = piece.min(size - start);
            let out = reopen()?;
            pieces.push(scope.spawn(move || copy_range(src, &out, start, len)));
            start += len;
        }
        let mut copied = copy_range(src, dst, 0, piece.min(size))?;
        let mut whole = copied == piece.min(size);
        for p in pieces {
            let n = p
                .join()
                .map_err(|_| io::Error::other("a copying thread panicked"))??;
            // A short piece (the source shorter than measured) ends the file there.
            if whole {
                copied += n;
            }
            whole &= n == piece;
        }
        Ok(copied)
    })
}

/// Copies `len` bytes of `src` from `offset` to the same offset of `dst` with `sendfile`
/// (across filesystems, unlike `copy_file_range`), then reads and writes if the kernel
/// refuses. Returns the bytes copied (fewer at the end of `src`).
fn copy_range(src: &fs::File, dst: &fs::File, offset: u64, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    let mut off = offset as libc::off_t;
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: the descriptors are open; `off` is the input offset the kernel advances;
        // the output is written at its file offset, moved to where this piece belongs first.
        let n = unsafe {
            if done == 0 && libc::lseek(dst.as_raw_fd(), offset as libc::off_t, libc::SEEK_SET) < 0
            {
                return Err(io::Error::last_os_error());
            }
            libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut off, want)
        };
        match n {
            0 => return Ok(done),
            n if n > 0 => done += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EINVAL | libc::ENOSYS) if done == 0 => break,
                    _ => return Err(e),
                }
            }
        }
    }
    if done == len {
        return Ok(done);
    }
    // sendfile refused this pair of files: a plain copy.
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = src.read_at(&mut buf[..want], offset + done)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(done)
}

fn cpath(path: &Path) -> Result<CString, SnapshotError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SnapshotError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"),
    })
}

/// Copies the `user.*` extended attributes (overlay's opaque and redirect marks live there
/// under `userxattr`) and overlay's own `trusted.overlay.*` marks (an overlay mounted by the
/// host, as containerd's are; a sandbox cannot set `trusted.*` names itself), without
/// following links.
fn copy_overlay_xattrs(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    let (src, dst) = (cpath(from)?, cpath(to)?);
    let mut names = vec![0u8; 4096];
    // SAFETY: llistxattr(2) into a buffer of the given size.
    let n = unsafe { libc::llistxattr(src.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Ok(());
    }
    let mut value = vec![0u8; 64 << 10];
    for name in names[..n as usize].split(|&b| b == 0) {
        if !name.starts_with(b"user.") && !name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: lgetxattr(2)/lsetxattr(2) with NUL-terminated names and sized buffers.
        unsafe {
            let len = libc::lgetxattr(
                src.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            );
            if len < 0 {
                continue;
            }
            if libc::lsetxattr(
                dst.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                len as usize,
                0,
            ) != 0
            {
                return Err(io_at(to)(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

// ---- forks: idmapped, read-only mounts of the snapshots (run in `sandbox-init`) ----

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Detached, read-only mounts of each snapshot directory, with owners mapped through `0 →
/// uid_base` (`count` ids): the fork's root sees the files as their snapshot's owners did.
/// The mapping is borrowed from a short-lived helper process in a user namespace of its own.
pub fn base_mounts(dirs: &[PathBuf], uid_base: u32, count: u32) -> Result<Vec<OwnedFd>, String> {
    if dirs.is_empty() {
        return Ok(Vec::new());
    }
    let userns = mapped_userns(uid_base, count)?;
    let mut mounts = Vec::new();
    for dir in dirs {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| "NUL in a snapshot path")?;
        // SAFETY: open_tree(2) with a NUL-terminated path; returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                c.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(format!(
                "open_tree {}: {}",
                dir.display(),
                io::Error::last_os_error()
            ));
        }
        // SAFETY: the kernel just returned this fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        // SAFETY: mount_setattr(2) on our detached mount with a properly sized struct.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "idmapped mount of {} (the snapshot's filesystem must support idmapped mounts): {}",
                dir.display(),
                io::Error::last_os_error()
            ));
        }
        mounts.push(fd);
    }
    Ok(mounts)
}

/// Attaches a detached mount at `target` (in the caller's own mount namespace).
pub fn attach(mount: i32, target: &Path) -> Result<(), String> {
    let c = CString::new(target.as_os_str().as_bytes()).map_err(|_| "NUL in a path")?;
    // SAFETY: move_mount(2) of a detached mount fd onto a NUL-terminated path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount,
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(format!(
            "attach snapshot at {}: {}",
            target.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A user namespace mapping `0 → base` for `count` ids, held by a descriptor: a child
/// process makes it and is killed once the descriptor is open.
fn mapped_userns(base: u32, count: u32) -> Result<OwnedFd, String> {
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: sandbox-init is single-threaded; the child only calls async-signal-safe
    // functions (unshare, write, pause, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
            let byte: u8 = if ok { b'k' } else { b'e' };
            libc::write(ready_w.as_raw_fd(), (&byte as *const u8).cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    drop(ready_w);
    let result = (|| {
        let mut byte = [0u8; 1];
        let n = nix::unistd::read(&ready_r, &mut byte).map_err(|e| format!("read: {e}"))?;
        if n != 1 || byte[0] != b'k' {
            return Err("cannot create a user namespace for the snapshot's id mapping".to_string());
        }
        let map = format!("0 {base} {count}\n");
        for file in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{file}"), &map)
                .map_err(|e| format!("write {file} of the mapping namespace: {e}"))?;
        }
        let ns = fs::File::open(format!("/proc/{pid}/ns/user"))
            .map_err(|e| format!("open the mapping namespace: {e}"))?;
        Ok(OwnedFd::from(ns))
    })();
    // SAFETY: kill and reap our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let mut bytes = [0u8; 8];
        // SAFETY: getrandom(2) into our own buffer.
        unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let dir = std::env::temp_dir().join(format!("arl-copy-{tag}-{}", hex::encode(bytes)));
        fs::create_dir(&dir).unwrap();
        dir
    }

    /// A large file is copied in pieces by several threads: every byte lands where it was,
    /// including the last, odd-sized piece.
    #[test]
    fn large_files_are_copied_whole_in_pieces() {
        let dir = temp("whole");
        let size = PARALLEL_FROM * 2 + 12_345;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(dir.join("src"), &data).unwrap();
        for (name, len) in [("small", 4_097u64), ("large", size)] {
            let src = fs::File::open(dir.join("src")).unwrap();
            let to = dir.join(name);
            let dst = fs::File::create_new(&to).unwrap();
            dst.set_len(len).unwrap();
            assert_eq!(copy_data(&src, &dst, len).unwrap(), len);
            drop(dst);
            assert!(
                fs::read(&to).unwrap() == data[..len as usize],
                "{name} differs"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A source shorter than measured ends the copy where the source ends (a piece past its
    /// end copies nothing, and nothing after a short piece counts).
    #[test]
    fn a_short_source_copies_what_there_is() {
        let dir = temp("short");
        let real = PARALLEL_FROM + 5;
        fs::write(dir.join("src"), vec![9u8; real as usize]).unwrap();
        let src = fs::File::open(dir.join("src")).unwrap();
        let dst = fs::File::create_new(dir.join("dst")).unwrap();
        let claimed = PARALLEL_FROM * 3;
        dst.set_len(claimed).unwrap();
        let copied = copy_data(&src, &dst, claimed).unwrap();
        assert_eq!(copied, real);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owners_shift_into_the_snapshot_range_and_strangers_become_nobody() {
        let copy = Copy::new(100_000, 0, 0);
        assert_eq!(copy.shift(100_000), 0);
        assert_eq!(copy.shift(100_999), 999);
        assert_eq!(copy.shift(99_999), NOBODY);
        assert_eq!(copy.shift(100_000 + 65_536), NOBODY);
        let back = Copy::new(0, 200_000, 0);
        assert_eq!(back.shift(5), 200_005);
    }
}
