//! File transfer inside the sandbox, confined with `openat2(2)`.
//!
//! Relative paths resolve beneath `/workspace` (`RESOLVE_BENEATH`: a symlink or `..` that would
//! leave it is refused by the kernel). Absolute paths resolve inside the sandbox root
//! (`RESOLVE_IN_ROOT`). Magic links (`/proc/*/exe`, `/proc/*/fd/*`) are never followed, and any
//! `..` component is refused outright. Writes go to a temporary file that is renamed into place.

use std::os::fd::{AsFd, OwnedFd};

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::files::Encoding;
use crate::api::{ApiError, ErrorCode, FileContent, FileInfo, WORKSPACE};
use crate::http::BoxError;

/// Largest single file accepted by a streamed write.
pub const MAX_FILE_BYTES: u64 = 4 << 30;
const DEFAULT_MODE: u32 = 0o644;

fn errno_error(e: Errno, path: &str) -> ApiError {
    match e {
        Errno::EXDEV | Errno::ELOOP => ApiError::new(
            ErrorCode::PathRefused,
            format!("{path}: the path leaves the allowed root through a link"),
        ),
        Errno::ENOENT => ApiError::not_found(format!("{path}: no such file or directory")),
        Errno::EACCES | Errno::EPERM => {
            ApiError::new(ErrorCode::Forbidden, format!("{path}: permission denied"))
        }
        Errno::ENOTDIR => ApiError::bad_request(format!("{path}: a parent is not a directory")),
        Errno::EISDIR => ApiError::bad_request(format!("{path}: is a directory")),
        Errno::ENOSPC | Errno::EDQUOT => ApiError::new(
            ErrorCode::InsufficientStorage,
            match disk_limit_mib(path) {
                Some(mib) => {
                    format!("{path}: no space left on the sandbox's disk (its limit is {mib} MiB)")
                }
                None => format!("{path}: no space left on the sandbox's disk"),
            },
        ),
        Errno::ENAMETOOLONG => ApiError::bad_request(format!("{path}: name too long")),
        Errno::EBUSY => ApiError::bad_request(format!("{path}: busy (a mount point?)")),
        other => ApiError::internal(format!("{path}: {other}")),
    }
}

/// Size of the filesystem holding `path` (or its nearest existing ancestor): the disk limit.
fn disk_limit_mib(path: &str) -> Option<u64> {
    std::path::Path::new(path).ancestors().find_map(|p| {
        let st = nix::sys::statvfs::statvfs(p).ok()?;
        Some((st.blocks() as u64).saturating_mul(st.fragment_size() as u64) >> 20)
    })
}

pub(super) fn io_error(e: std::io::Error, path: &str) -> ApiError {
    match e.raw_os_error() {
        Some(code) => errno_error(Errno::from_raw(code), path),
        None => ApiError::internal(format!("{path}: {e}")),
    }
}

/// A path split into the directory it lives in (opened, confined) and its final name.
struct Target {
    dir: OwnedFd,
    name: String,
    display: String,
}

struct Root {
    fd: OwnedFd,
    resolve: ResolveFlag,
    rel: String,
    display: String,
}

fn root_for(path: &str) -> Result<Root, ApiError> {
    if path.is_empty() || path.len() > 4096 || path.contains('\0') {
        return Err(ApiError::bad_request(
            "`path` must be 1-4096 bytes without NUL",
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(ApiError::new(
            ErrorCode::PathRefused,
            format!("{path}: `..` components are not allowed"),
        ));
    }
    let (base, resolve, rel, display) = match path.strip_prefix('/') {
        Some(rel) => ("/", ResolveFlag::RESOLVE_IN_ROOT, rel, path.to_string()),
        None => (
            WORKSPACE,
            ResolveFlag::RESOLVE_BENEATH,
            path,
            format!("{WORKSPACE}/{path}"),
        ),
    };
    let fd = nix::fcntl::open(
        base,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_error(e, base))?;
    Ok(Root {
        fd,
        resolve: resolve | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        rel: rel.trim_matches('/').to_string(),
        display,
    })
}

fn open_in<Fd: AsFd>(
    dir: Fd,
    rel: &str,
    flags: OFlag,
    mode: u32,
    resolve: ResolveFlag,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(resolve);
    openat2(dir, if rel.is_empty() { "." } else { rel }, how)
}

/// Opens the parent directory of `path`, creating missing parents when asked.
fn target(path: &str, create_parents: bool) -> Result<Target, ApiError> {
    let root = root_for(path)?;
    let (parent, name) = match root.rel.rsplit_once('/') {
        Some((p, n)) => (p.to_string(), n.to_string()),
        None => (String::new(), root.rel.clone()),
    };
    if name.is_empty() || name == "." {
        return Err(ApiError::bad_request(format!(
            "{path}: names a directory, not a file"
        )));
    }
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY;
    let dir = match open_in(&root.fd, &parent, dir_flags, 0, root.resolve) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if create_parents => {
            let mut cur = open_in(&root.fd, "", dir_flags, 0, root.resolve)
                .map_err(|e| errno_error(e, path))?;
            for comp in parent.split('/').filter(|c| !c.is_empty() && *c != ".") {
                match nix::sys::stat::mkdirat(&cur, comp, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno_error(e, path)),
                }
                cur = open_in(
                    &cur,
                    comp,
                    dir_flags,
                    0,
                    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS,
                )
                .map_err(|e| errno_error(e, path))?;
            }
            cur
        }
        Err(e) => return Err(errno_error(e, path)),
    };
    Ok(Target {
        dir,
        name,
        display: root.display,
    })
}

fn temp_name(name: &str) -> String {
    let mut bytes = [0u8; 6];
    crate::util::random_bytes(&mut bytes);
    format!(
        ".{}.arl-{}",
        name.chars().take(64).collect::<String>(),
        hex::encode(bytes)
    )
}

/// A file written to its temporary name, ready to be renamed into place.
struct Staged {
    target: Target,
    temp: String,
    info: FileInfo,
}

impl Staged {
    fn commit(self) -> Result<FileInfo, ApiError> {
        nix::fcntl::renameat(
            &self.target.dir,
            self.temp.as_str(),
            &self.target.dir,
            self.target.name.as_str(),
        )
        .map_err(|e| {
            self.discard_ref();
            errno_error(e, &self.info.path)
        })?;
        Ok(self.info)
    }

    fn discard_ref(&self) {
        let _ = nix::unistd::unlinkat(
            &self.target.dir,
            self.temp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

impl Staged {
    /// Opens a temporary file next to `path` (creating parents), with `mode`.
    fn create(path: &str, mode: u32) -> Result<(Self, tokio::fs::File), ApiError> {
        let target = target(path, true)?;
        let temp = temp_name(&target.name);
        let fd = open_in(
            &target.dir,
            &temp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o600,
            ResolveFlag::RESOLVE_BENEATH,
        )
        .map_err(|e| errno_error(e, &target.display))?;
        // The umask must not change the requested mode.
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))
            .map_err(|e| errno_error(e, &target.display))?;
        let info = FileInfo {
            path: target.display.clone(),
            size: 0,
            sha256: String::new(),
        };
        let file = tokio::fs::File::from_std(std::fs::File::from(fd));
        Ok((Self { target, temp, info }, file))
    }
}

pub fn parse_mode(mode: Option<&str>) -> Result<u32, ApiError> {
    match mode {
        None => Ok(DEFAULT_MODE),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::bad_request(format!("`mode` {m:?} is not an octal file mode"))
            }),
    }
}

/// Streams a request body into a file; verifies `expected_sha256` when given.
pub async fn write_stream(
    path: &str,
    mode: u32,
    expected_sha256: Option<String>,
    mut body: Incoming,
) -> Result<FileInfo, ApiError> {
    let (staged, mut file) = Staged::create(path, mode)?;
    let display = staged.info.path.clone();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let written: Result<(), ApiError> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                size += data.len() as u64;
                if size > MAX_FILE_BYTES {
                    return Err(ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("files are at most {MAX_FILE_BYTES} bytes"),
                    ));
                }
                hasher.update(&data);
                file.write_all(&data)
                    .await
                    .map_err(|e| io_error(e, &display))?;
            }
        }
        file.flush().await.map_err(|e| io_error(e, &display))
    }
    .await;
    // A full disk is answered after the rest of the upload (read and dropped, within the file
    // size bound): a reply before the body's end makes the sender see a broken connection
    // instead of the 507.
    if let Err(e) = &written
        && e.code == ErrorCode::InsufficientStorage
    {
        while size <= MAX_FILE_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    size += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => break,
            }
        }
    }
    finish(staged, written, hasher, size, expected_sha256)
}

fn finish(
    mut staged: Staged,
    written: Result<(), ApiError>,
    hasher: Sha256,
    size: u64,
    expected: Option<String>,
) -> Result<FileInfo, ApiError> {
    if let Err(e) = written {
        staged.discard_ref();
        return Err(e);
    }
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = expected
        && !expected.eq_ignore_ascii_case(&sha256)
    {
        staged.discard_ref();
        return Err(ApiError::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "{}: sha256 is {sha256}, expected {expected}",
                staged.info.path
            ),
        ));
    }
    staged.info.size = size;
    staged.info.sha256 = sha256;
    staged.commit()
}

/// Writes several files: all are staged first, then renamed into place.
pub async fn write_many(files: Vec<(String, FileContent)>) -> Result<Vec<FileInfo>, ApiError> {
    let mut staged = Vec::with_capacity(files.len());
    let result: Result<(), ApiError> = async {
        for (path, content) in files {
            let (bytes, mode) = match content {
                FileContent::Text(text) => (Bytes::from(text.into_bytes()), DEFAULT_MODE),
                FileContent::Detailed {
                    content,
                    encoding,
                    mode,
                } => {
                    let bytes = match encoding {
                        Encoding::Utf8 => Bytes::from(content.into_bytes()),
                        Encoding::Base64 => Bytes::from(
                            base64::engine::general_purpose::STANDARD
                                .decode(content)
                                .map_err(|e| {
                                    ApiError::bad_request(format!("{path}: invalid base64: {e}"))
                                })?,
                        ),
                    };
                    (bytes, mode.unwrap_or(DEFAULT_MODE) & 0o7777)
                }
            };
            let (mut one, mut file) = Staged::create(&path, mode)?;
            let display = one.info.path.clone();
            // tokio's File writes in the background: flush to see the write's real outcome.
            let written = match file.write_all(&bytes).await {
                Ok(()) => file.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                one.discard_ref();
                return Err(io_error(e, &display));
            }
            one.info.size = bytes.len() as u64;
            one.info.sha256 = hex::encode(Sha256::digest(&bytes));
            staged.push(one);
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        for s in &staged {
            s.discard_ref();
        }
        return Err(e);
    }
    staged.into_iter().map(Staged::commit).collect()
}

/// Opens a regular file for reading; returns it with its size.
pub async fn open_read(path: &str) -> Result<(tokio::fs::File, u64), ApiError> {
    let root = root_for(path)?;
    let fd = open_in(&root.fd, &root.rel, OFlag::O_RDONLY, 0, root.resolve)
        .map_err(|e| errno_error(e, &root.display))?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| io_error(e, &root.display))?;
    if !meta.is_file() {
        return Err(ApiError::bad_request(format!(
            "{}: not a regular file",
            root.display
        )));
    }
    Ok((tokio::fs::File::from_std(file), meta.len()))
}

/// Streams a file into a channel body in chunks.
pub async fn pump_file(
    mut file: tokio::fs::File,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if tx
                    .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(Box::new(e))).await;
                return;
            }
        }
    }
}

pub fn remove(path: &str) -> Result<(), ApiError> {
    let target = target(path, false)?;
    nix::unistd::unlinkat(
        &target.dir,
        target.name.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    )
    .map_err(|e| errno_error(e, &target.display))
}

/// Empties a directory, keeping the directory itself.
pub fn wipe_dir(dir: &str) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let _ = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}
