//! File-system operations beyond transfer: stat, list (with depth), mkdir (with parents), move
//! and recursive remove. Paths follow the same rules as file transfer: relative paths resolve
//! beneath `/workspace`, and `..` components are refused. The agent is PID 1 of the sandbox's
//! own root, so the paths it resolves cannot name anything outside the sandbox.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::api::fs::{Entry, EntryKind, MAX_LIST_ENTRIES};
use crate::api::{ApiError, ErrorCode, WORKSPACE};

use super::files::io_error;

/// The absolute path a request's path names.
pub fn resolve(path: &str) -> Result<PathBuf, ApiError> {
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
    Ok(if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(WORKSPACE).join(path)
    })
}

fn shown(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Describes one entry.
pub fn stat(path: &Path) -> Result<Entry, ApiError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_error(e, &shown(path)))?;
    let mut kind = kind_of(&meta.file_type());
    let mut symlink_target = None;
    let mut meta_shown = meta.clone();
    if meta.file_type().is_symlink() {
        symlink_target = std::fs::read_link(path).ok().map(|t| shown(&t));
        if let Ok(target) = std::fs::metadata(path) {
            kind = kind_of(&target.file_type());
            meta_shown = target;
        }
    }
    Ok(Entry {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: shown(path),
        kind,
        size: meta_shown.len(),
        mode: meta_shown.mode(),
        uid: meta_shown.uid(),
        gid: meta_shown.gid(),
        modified_ms: meta_shown.mtime() * 1000 + meta_shown.mtime_nsec() / 1_000_000,
        symlink_target,
    })
}

fn kind_of(t: &std::fs::FileType) -> EntryKind {
    if t.is_file() {
        EntryKind::File
    } else if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    }
}

/// Lists a directory down to `depth` levels (1 = its own entries), without following
/// symlinked directories.
pub fn list(path: &Path, depth: u32) -> Result<Vec<Entry>, ApiError> {
    let root = stat(path)?;
    if root.kind != EntryKind::Dir {
        return Err(ApiError::bad_request(format!(
            "{}: not a directory",
            shown(path)
        )));
    }
    let mut out = Vec::new();
    walk(path, depth.max(1), &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, depth: u32, out: &mut Vec<Entry>) -> Result<(), ApiError> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(e, &shown(dir)))?
        .flatten()
        .map(|e| e.path())
        .collect();
    children.sort();
    for child in children {
        if out.len() >= MAX_LIST_ENTRIES {
            return Err(ApiError::bad_request(format!(
                "{}: more than {MAX_LIST_ENTRIES} entries; list a smaller tree",
                shown(dir)
            )));
        }
        // An entry removed meanwhile is simply not listed.
        let Ok(entry) = stat(&child) else { continue };
        let descend = depth > 1 && entry.kind == EntryKind::Dir && entry.symlink_target.is_none();
        out.push(entry);
        if descend {
            walk(&child, depth - 1, out)?;
        }
    }
    Ok(())
}

/// Creates a directory and its parents; `conflict` when it already exists.
pub fn make_dir(path: &Path) -> Result<Entry, ApiError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("{}: already exists", shown(path)),
        ));
    }
    std::fs::create_dir_all(path).map_err(|e| io_error(e, &shown(path)))?;
    stat(path)
}

/// Renames an entry, creating the destination's parents.
pub fn rename(source: &Path, destination: &Path) -> Result<Entry, ApiError> {
    std::fs::symlink_metadata(source).map_err(|e| io_error(e, &shown(source)))?;
    if let Some(parent) = destination.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(e, &shown(parent)))?;
    }
    std::fs::rename(source, destination).map_err(|e| io_error(e, &shown(destination)))?;
    stat(destination)
}

/// Removes a file, a symlink, or a directory with everything in it.
pub fn remove(path: &Path) -> Result<(), ApiError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_error(e, &shown(path)))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
    .map_err(|e| io_error(e, &shown(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_live_in_the_workspace_and_dotdot_is_refused() {
        assert_eq!(
            resolve("a/b").expect("relative"),
            Path::new("/workspace/a/b")
        );
        assert_eq!(resolve("/etc/x").expect("absolute"), Path::new("/etc/x"));
        assert_eq!(
            resolve("a/../b").expect_err("dotdot").code,
            ErrorCode::PathRefused
        );
        resolve("").expect_err("empty");
    }

    #[test]
    fn make_list_move_stat_remove() {
        let base = std::env::temp_dir().join(format!("arl-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let deep = base.join("a/b");
        let made = make_dir(&deep).expect("mkdir -p");
        assert_eq!(made.kind, EntryKind::Dir);
        assert_eq!(
            make_dir(&deep).expect_err("exists").code,
            ErrorCode::Conflict
        );
        std::fs::write(deep.join("f.txt"), b"hello").expect("write");
        let shallow = list(&base, 1).expect("list");
        assert_eq!(shallow.len(), 1, "{shallow:?}");
        let all = list(&base, 3).expect("list deep");
        assert_eq!(all.len(), 3, "{all:?}");
        let moved = rename(&deep.join("f.txt"), &base.join("c/g.txt")).expect("move");
        assert_eq!((moved.kind, moved.size), (EntryKind::File, 5));
        assert_eq!(
            stat(&deep.join("f.txt")).expect_err("moved away").code,
            ErrorCode::NotFound
        );
        remove(&base.join("a")).expect("rm -r");
        assert_eq!(list(&base, 1).expect("list").len(), 1);
        remove(&base).expect("cleanup");
    }
}
