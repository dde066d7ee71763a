//! The node's snapshots: each one a directory `<state-dir>/snapshots/<id>/` holding
//! `meta.json` and `layers/` (the runtime's copy of a sandbox's writable state), bounded in
//! count and bytes per node, owned by the token that took it, and kept across restarts.
//!
//! A snapshot stays while anything stands on it: a live sandbox forked from it (or from a
//! snapshot stacked on it), a snapshot taken of such a fork, or forks being made. Deleting one
//! in use is refused; the snapshots a fork of a live sandbox takes on the way, and those of a
//! deleted pool, go by themselves once nothing stands on them (`collect`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use serde::{Deserialize, Serialize};

use super::auth::Owner;
use crate::api::{ApiError, ErrorCode, SnapshotInfo};
use crate::util::MutexExt;

/// Where each snapshot keeps the runtime's copy.
const LAYERS: &str = "layers";

/// Per-node bounds, and where the copies are kept.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub count: usize,
    pub bytes: u64,
    pub store: Store,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            count: 64,
            bytes: 8 << 30,
            store: Store::Disk,
        }
    }
}

/// Where the snapshots' copies live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// A directory of the state directory's filesystem (the default).
    Disk,
    /// A tmpfs of the node's own, sized by the byte bound, with huge pages for large files:
    /// a copy is a memory copy (no disk writes, no write-back) that costs less CPU. Kept
    /// across restarts of the daemon, not of the machine.
    Memory,
}

/// What `meta.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub pool: String,
    pub sandbox: String,
    /// Hex digest of the owner's token (never the token).
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub parent: Option<String>,
    pub bytes: u64,
    pub created_at_ms: u64,
    /// The env of the sandbox's lease, which its forks start with.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Taken on the way to forking a live sandbox: removed once unused.
    #[serde(default)]
    pub ephemeral: bool,
}

pub struct Snapshot {
    pub meta: Meta,
    pub owner: Owner,
    pub dir: PathBuf,
    /// Forks being made from it right now.
    pending: AtomicUsize,
    /// Its pool was deleted: removed once unused.
    doomed: AtomicBool,
}

impl Snapshot {
    pub fn layers(&self) -> PathBuf {
        self.dir.join(LAYERS)
    }
}

/// Holds a snapshot for a fork in the making: it is not removed meanwhile.
pub struct Pending<'a>(&'a Snapshot);

impl<'a> Pending<'a> {
    /// The hold an ephemeral snapshot is added with (`Snapshots::add`), to be dropped once its
    /// forks are made (or failed).
    pub fn take_over(snap: &'a Snapshot) -> Self {
        Pending(snap)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, SeqCst);
    }
}

pub struct Snapshots {
    dir: PathBuf,
    pub limits: Limits,
    entries: Mutex<HashMap<String, std::sync::Arc<Snapshot>>>,
    /// One snapshot is taken at a time, so the byte budget each is given is exact.
    pub taking: tokio::sync::Mutex<()>,
}

impl Snapshots {
    /// The store under `state_dir`, with what an earlier daemon left.
    pub fn open(state_dir: &Path, limits: Limits) -> std::io::Result<Self> {
        let dir = state_dir.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        if limits.store == Store::Memory {
            match memory::mount(&dir, limits.bytes) {
                Ok(how) => tracing::info!(dir = %dir.display(), "snapshots kept in memory ({how})"),
                Err(reason) => tracing::warn!(
                    dir = %dir.display(),
                    %reason,
                    "snapshots kept on disk instead of in memory"
                ),
            }
        }
        let store = Self {
            dir,
            limits,
            entries: Mutex::new(HashMap::new()),
            taking: tokio::sync::Mutex::new(()),
        };
        store.load();
        Ok(store)
    }

    fn load(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut found = self.entries.lock_or_recover();
        for entry in entries.flatten() {
            let dir = entry.path();
            let meta = fs::read(dir.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
            let owner = meta.as_ref().and_then(|m| decode_owner(m.owner.as_deref()));
            match (meta, owner) {
                (Some(meta), Some(owner)) if dir.join(LAYERS).is_dir() => {
                    found.insert(
                        meta.id.clone(),
                        std::sync::Arc::new(snapshot(meta, owner, dir)),
                    );
                }
                // Half-made (a crash during a copy) or unreadable: nothing can use it.
                _ => remove_dir(&dir),
            }
        }
    }

    /// A fresh directory for a snapshot being taken (its layers go in `<dir>/layers`).
    /// Fails with a clear 409 when the node keeps its most snapshots already; the bytes left in
    /// the budget come back with the id and directory.
    pub fn reserve(&self) -> Result<(String, PathBuf, u64), ApiError> {
        let entries = self.entries.lock_or_recover();
        if entries.len() >= self.limits.count {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "this node keeps at most {} snapshots ({} now); delete some first",
                    self.limits.count,
                    entries.len()
                ),
            ));
        }
        let used: u64 = entries.values().map(|s| s.meta.bytes).sum();
        let left = self.limits.bytes.saturating_sub(used);
        if left == 0 {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the snapshots on this node hold all {} bytes allowed; delete some first",
                    self.limits.bytes
                ),
            ));
        }
        let id = crate::util::random_id("snap-");
        Ok((id.clone(), self.dir.join(&id), left))
    }

    /// Adds a snapshot whose layers were copied into `dir`.
    pub fn add(
        &self,
        meta: Meta,
        owner: Owner,
        dir: PathBuf,
    ) -> Result<std::sync::Arc<Snapshot>, ApiError> {
        let bytes = serde_json::to_vec(&meta).map_err(|e| ApiError::internal(e.to_string()))?;
        fs::write(dir.join("meta.json"), bytes)
            .map_err(|e| ApiError::internal(format!("writing the snapshot's record: {e}")))?;
        let snap = std::sync::Arc::new(snapshot(meta, owner, dir));
        if snap.meta.ephemeral {
            // Held from its first moment for the forks it is taken for (`Pending::take_over`):
            // nothing may collect it before they are made.
            snap.pending.store(1, SeqCst);
        }
        self.entries
            .lock_or_recover()
            .insert(snap.meta.id.clone(), snap.clone());
        Ok(snap)
    }

    pub fn get(&self, id: &str) -> Option<std::sync::Arc<Snapshot>> {
        self.entries.lock_or_recover().get(id).cloned()
    }

    /// A snapshot of `owner`'s, or why not.
    pub fn owned(&self, id: &str, owner: &Owner) -> Result<std::sync::Arc<Snapshot>, ApiError> {
        match self.get(id) {
            Some(s) if s.owner == *owner => Ok(s),
            Some(_) => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("snapshot {id} belongs to another token"),
            )),
            None => Err(ApiError::not_found(format!(
                "no snapshot {id:?} on this node"
            ))),
        }
    }

    /// The snapshot and those it stands on, top first: the layers of a fork.
    pub fn chain(&self, id: &str) -> Vec<std::sync::Arc<Snapshot>> {
        let entries = self.entries.lock_or_recover();
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next {
            let Some(s) = entries.get(&id) else { break };
            next = s.meta.parent.clone();
            chain.push(s.clone());
            if chain.len() > crate::runtime::process::snapshot::MAX_DEPTH {
                break;
            }
        }
        chain
    }

    /// Holds a snapshot while forks are made from it; fails if it was removed meanwhile.
    /// Counted under the store's lock, where a removal looks at the count.
    pub fn pend<'a>(&self, snap: &'a Snapshot) -> Result<Pending<'a>, ApiError> {
        let entries = self.entries.lock_or_recover();
        match entries.get(&snap.meta.id) {
            Some(s) if std::ptr::eq(&**s, snap) => {
                snap.pending.fetch_add(1, SeqCst);
                Ok(Pending(snap))
            }
            _ => Err(ApiError::not_found(format!(
                "snapshot {} was deleted",
                snap.meta.id
            ))),
        }
    }

    pub fn list(&self, owner: &Owner) -> Vec<std::sync::Arc<Snapshot>> {
        let mut out: Vec<_> = self
            .entries
            .lock_or_recover()
            .values()
            .filter(|s| s.owner == *owner && !s.meta.ephemeral)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        out
    }

    pub fn all(&self) -> Vec<std::sync::Arc<Snapshot>> {
        self.entries.lock_or_recover().values().cloned().collect()
    }

    /// Dooms the snapshots of a deleted pool: each goes once unused.
    pub fn doom_pool(&self, pool: &str) {
        for s in self.entries.lock_or_recover().values() {
            if s.meta.pool == pool {
                s.doomed.store(true, SeqCst);
            }
        }
    }

    /// Removes a snapshot nothing stands on (`in_use` says which do, beyond forks pending
    /// and snapshots stacked on it). Returns false when it is in use.
    ///
    /// `in_use` looks at the live sandboxes and at this store, so it is asked without the
    /// store's lock. A fork that begins after it answered is pending (counted under the lock,
    /// checked below) until its sandboxes are live, so it is seen either way; one that begins
    /// after the removal finds the snapshot gone (`pend`).
    pub fn remove_if_unused(&self, id: &str, in_use: &dyn Fn(&str) -> bool) -> bool {
        let unused = |entries: &HashMap<String, std::sync::Arc<Snapshot>>| {
            entries.get(id).map(|s| {
                s.pending.load(SeqCst) == 0
                    && !entries
                        .values()
                        .any(|o| o.meta.parent.as_deref() == Some(id))
            })
        };
        match unused(&self.entries.lock_or_recover()) {
            None => return true,
            Some(false) => return false,
            Some(true) => {}
        }
        if in_use(id) {
            return false;
        }
        let removed = {
            let mut entries = self.entries.lock_or_recover();
            match unused(&entries) {
                None => return true,
                Some(false) => return false,
                Some(true) => entries.remove(id),
            }
        };
        if let Some(s) = removed {
            remove_dir(&s.dir);
        }
        true
    }

    /// Removes the ephemeral and doomed snapshots nothing stands on any more (repeatedly:
    /// one removed may free its parent). Returns how many.
    pub fn collect(&self, in_use: &dyn Fn(&str) -> bool) -> usize {
        let mut n = 0;
        loop {
            let candidates: Vec<String> = self
                .entries
                .lock_or_recover()
                .values()
                .filter(|s| s.meta.ephemeral || s.doomed.load(SeqCst))
                .map(|s| s.meta.id.clone())
                .collect();
            let before = n;
            for id in candidates {
                if self.remove_if_unused(&id, in_use) {
                    n += 1;
                }
            }
            if n == before {
                return n;
            }
        }
    }

    /// Removes every snapshot (a node stopping for good), and the store's tmpfs.
    pub fn clear(&self) {
        self.entries.lock_or_recover().clear();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                remove_dir(&entry.path());
            }
        }
        memory::unmount(&self.dir);
    }

    /// Removes a half-made snapshot's directory.
    pub fn discard(&self, dir: &Path) {
        remove_dir(dir);
    }
}

fn snapshot(meta: Meta, owner: Owner, dir: PathBuf) -> Snapshot {
    Snapshot {
        meta,
        owner,
        dir,
        pending: AtomicUsize::new(0),
        doomed: AtomicBool::new(false),
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot failed");
    }
}

/// The owner digest as stored (`None` in the file: a node without tokens).
pub fn encode_owner(owner: &Owner) -> Option<String> {
    owner.map(hex::encode)
}

fn decode_owner(stored: Option<&str>) -> Option<Owner> {
    match stored {
        None => Some(None),
        Some(hex_digest) => {
            let bytes = hex::decode(hex_digest).ok()?;
            Some(Some(bytes.try_into().ok()?))
        }
    }
}

impl Snapshot {
    pub fn info(&self, forks: usize) -> SnapshotInfo {
        SnapshotInfo {
            id: self.meta.id.clone(),
            pool: self.meta.pool.clone(),
            sandbox: self.meta.sandbox.clone(),
            parent: self.meta.parent.clone(),
            bytes: self.meta.bytes,
            created_at_ms: self.meta.created_at_ms,
            forks,
        }
    }
}

/// The in-memory store: a tmpfs mounted over `<state-dir>/snapshots`.
pub mod memory {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use nix::mount::{MntFlags, MsFlags};

    /// Linux release from which tmpfs takes idmapped mounts (forks stack snapshots that way).
    const IDMAPPED_TMPFS: (u32, u32) = (6, 3);

    /// Room beyond the byte bound for what is not file data (a page per small file, dirs).
    fn size(bytes: u64) -> u64 {
        bytes.saturating_add(bytes / 16).saturating_add(64 << 20)
    }

    /// Whether `dir` is the root of a tmpfs mount.
    pub fn is_mounted(dir: &Path) -> bool {
        let (Ok(here), Some(parent)) = (std::fs::metadata(dir), dir.parent()) else {
            return false;
        };
        let Ok(above) = std::fs::metadata(parent) else {
            return false;
        };
        here.dev() != above.dev()
            && nix::sys::statfs::statfs(dir)
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    }

    /// Mounts the store's tmpfs on `dir` (or resizes the one an earlier daemon left). Says how,
    /// or why the store stays on disk: a kernel whose tmpfs cannot be mounted idmapped, or
    /// snapshots already on disk there (from a daemon that kept them on disk).
    pub fn mount(dir: &Path, bytes: u64) -> Result<&'static str, String> {
        let opts = |huge: bool| {
            format!(
                "size={},mode=0700{}",
                size(bytes),
                if huge { ",huge=within_size" } else { "" }
            )
        };
        if is_mounted(dir) {
            // Resized to this daemon's bound; one it cannot shrink to (it holds more) stays.
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            let opts = opts(true);
            let resized = nix::mount::mount(None::<&str>, dir, None::<&str>, flags, Some(&*opts));
            return Ok(match resized {
                Ok(()) => "the tmpfs an earlier daemon mounted",
                Err(_) => "the tmpfs an earlier daemon mounted, at its old size",
            });
        }
        match release() {
            Some(r) if r >= IDMAPPED_TMPFS => {}
            _ => return Err("this kernel's tmpfs cannot be mounted idmapped (Linux < 6.3)".into()),
        }
        if std::fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .next()
            .is_some()
        {
            return Err("snapshots an earlier daemon kept on disk are there".into());
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let tmpfs = |huge| {
            nix::mount::mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                flags,
                Some(opts(huge).as_str()),
            )
        };
        match tmpfs(true) {
            Ok(()) => Ok("a tmpfs with huge pages for large files"),
            // A kernel without huge pages for tmpfs.
            Err(nix::errno::Errno::EINVAL) => tmpfs(false)
                .map(|()| "a tmpfs")
                .map_err(|e| format!("mounting a tmpfs: {e}")),
            Err(e) => Err(format!("mounting a tmpfs: {e}")),
        }
    }

    /// Unmounts the store's tmpfs, if it has one (forks still standing on it keep theirs).
    pub fn unmount(dir: &Path) {
        if is_mounted(dir)
            && let Err(e) = nix::mount::umount2(dir, MntFlags::MNT_DETACH)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "unmounting the snapshots' tmpfs");
        }
    }

    /// The kernel's (major, minor) release.
    fn release() -> Option<(u32, u32)> {
        // SAFETY: uname(2) fills the zeroed struct it is given.
        let uts = unsafe {
            let mut uts: libc::utsname = std::mem::zeroed();
            if libc::uname(&mut uts) != 0 {
                return None;
            }
            uts
        };
        let release: Vec<u8> = uts
            .release
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        parse_release(&release)
    }

    fn parse_release(release: &[u8]) -> Option<(u32, u32)> {
        let text = std::str::from_utf8(release).ok()?;
        let mut parts = text.split(|c: char| !c.is_ascii_digit());
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn releases_parse() {
            assert_eq!(super::parse_release(b"6.18.44"), Some((6, 18)));
            assert_eq!(super::parse_release(b"5.15.0-91-generic"), Some((5, 15)));
            assert_eq!(super::parse_release(b"junk"), None);
        }
    }
}
