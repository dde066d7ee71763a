//! What the daemon knows about each of its sandboxes, kept in the state directory so that a
//! successor (after a restart, an upgrade or a crash) can take them back: one small file per
//! sandbox, `<state-dir>/records/<id>.json`, holding one line of JSON.
//!
//! A record is rewritten in place by a single `pwrite` of the new line at offset 0, without
//! truncating: a reader takes the first line and ignores what an older, longer record left
//! after it. The write lands in the page cache whole, so a daemon killed at any moment leaves
//! the old record or the new one (a record over a page long could in principle be cut by a
//! kill between its pages: it then fails to parse and its sandbox is destroyed, never
//! misattributed). Writing to a temporary name and renaming it into place was the first
//! design: on ext4 a rename over an existing file flushes the data to disk first
//! (`auto_da_alloc`), which took an acquire from 12 µs to 0.4 ms.
//!
//! A record is written when a sandbox joins a pool (created, or reset for reuse) and when its
//! lease begins; it is removed before the sandbox is destroyed or reset. Nothing is written on
//! exec: the idle deadline of an adopted lease starts again at adoption.
//!
//! Each record's file stays open from its first write to its removal, so the write on the
//! acquire path is one `pwrite` (no path lookup, no open and close), and the line is
//! serialized from borrowed fields without copying the lease.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::auth::Owner;
use super::sandbox::{Lease, Sandbox};
use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::util::MutexExt;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("writing the record of sandbox {id}: {source}")]
    Write {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the records directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One sandbox, as a successor needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub pool: String,
    pub runtime: RuntimeKind,
    pub created_at_ms: u64,
    /// Absent while the sandbox is idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<StoredLease>,
    /// Frozen when recorded: a successor thaws it to check its agent, then freezes it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The snapshot it was forked from, which must outlive it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// A lease on disk: the owner as the hex digest of its token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub acquired_at_ms: u64,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl StoredLease {
    pub fn from_lease(lease: &Lease) -> Self {
        Self {
            owner: lease.owner.map(hex::encode),
            env: lease.env.clone(),
            labels: lease.labels.clone(),
            acquired_at_ms: lease.acquired_at_ms,
            expires_at_ms: lease.expires_at_ms,
            idle_timeout_ms: lease.idle_timeout_ms,
            request_id: lease.request_id.clone(),
        }
    }

    /// The lease again; `None` when the owner digest is not one.
    pub fn to_lease(&self) -> Option<Lease> {
        let owner: Owner = match &self.owner {
            None => None,
            Some(hex_digest) => {
                let bytes = hex::decode(hex_digest).ok()?;
                Some(bytes.try_into().ok()?)
            }
        };
        Some(Lease {
            owner,
            env: self.env.clone(),
            labels: self.labels.clone(),
            acquired_at_ms: self.acquired_at_ms,
            expires_at_ms: self.expires_at_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            request_id: self.request_id.clone(),
        })
    }
}

/// A record's line serialized straight from the sandbox (the same JSON as [`Record`]).
#[derive(Serialize)]
struct RecordView<'a> {
    id: &'a str,
    pool: &'a str,
    runtime: RuntimeKind,
    created_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseView<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    paused: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<String>,
}

#[derive(Serialize)]
struct LeaseView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    env: &'a BTreeMap<String, String>,
    labels: &'a BTreeMap<String, String>,
    acquired_at_ms: u64,
    expires_at_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

impl<'a> RecordView<'a> {
    fn new(
        id: &'a str,
        pool: &'a str,
        runtime: RuntimeKind,
        created_at_ms: u64,
        lease: Option<&'a Lease>,
    ) -> Self {
        Self {
            id,
            pool,
            runtime,
            created_at_ms,
            paused: false,
            base: None,
            lease: lease.map(|lease| LeaseView {
                owner: lease.owner.map(hex::encode),
                env: &lease.env,
                labels: &lease.labels,
                acquired_at_ms: lease.acquired_at_ms,
                expires_at_ms: lease.expires_at_ms,
                idle_timeout_ms: lease.idle_timeout_ms,
                request_id: lease.request_id.as_deref(),
            }),
        }
    }
}

impl Record {
    pub fn of(sb: &Sandbox) -> Self {
        Self {
            id: sb.id.clone(),
            pool: sb.pool.clone(),
            runtime: sb.runtime,
            created_at_ms: sb.created_at_ms,
            lease: sb.lease().as_ref().map(StoredLease::from_lease),
            paused: sb.paused.load(std::sync::atomic::Ordering::SeqCst),
            base: sb.base(),
        }
    }
}

/// The records directory; `None` keeps nothing (unit tests of the lease core).
pub struct Records {
    dir: Option<PathBuf>,
    /// The open file of each record, by sandbox id.
    open: std::sync::Mutex<HashMap<String, Arc<fs::File>>>,
}

/// Pools created through the API are kept under `records/pools/<name>.json`, so their
/// sandboxes have a pool to come back to.
const POOLS: &str = "pools";

impl Records {
    /// Records under `state_dir`, creating the directory (owner-only: leases hold env values).
    pub fn open(state_dir: &Path) -> Result<Self, RecordError> {
        let dir = state_dir.join("records");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| RecordError::Dir {
                path: dir.clone(),
                source,
            })?;
        let pools = dir.join(POOLS);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&pools)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|source| RecordError::Dir {
                path: pools,
                source,
            })?;
        Ok(Self {
            dir: Some(dir),
            open: Default::default(),
        })
    }

    /// Keeps a pool created or changed through the API.
    pub fn put_pool(&self, name: &str, spec: &PoolSpec) {
        let Some(dir) = &self.dir else { return };
        let write = || -> std::io::Result<()> {
            let json = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
            let tmp = dir.join(POOLS).join(format!(".{name}.tmp"));
            fs::write(&tmp, json)?;
            fs::rename(&tmp, dir.join(POOLS).join(format!("{name}.json")))
        };
        if let Err(e) = write() {
            tracing::warn!(pool = %name, error = %e, "pool record not saved");
        }
    }

    pub fn remove_pool(&self, name: &str) {
        let Some(dir) = &self.dir else { return };
        let _ = fs::remove_file(dir.join(POOLS).join(format!("{name}.json")));
    }

    /// The pools created through the API, by name.
    pub fn load_pools(&self) -> BTreeMap<String, PoolSpec> {
        let mut pools = BTreeMap::new();
        let Some(dir) = &self.dir else { return pools };
        let Ok(entries) = fs::read_dir(dir.join(POOLS)) else {
            return pools;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string);
            let spec = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<PoolSpec>(&bytes).ok());
            match (name, spec) {
                (Some(name), Some(spec)) => {
                    pools.insert(name, spec);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "unreadable pool record removed");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        pools
    }

    #[cfg(test)]
    pub fn disabled() -> Self {
        Self {
            dir: None,
            open: Default::default(),
        }
    }

    fn path(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    /// Writes (or replaces) the record of a sandbox: one line, written in place.
    pub fn put(&self, record: &Record) -> Result<(), RecordError> {
        // serde_json escapes newlines inside strings: the record is exactly one line.
        self.write_line(&record.id, || serde_json::to_vec(record))
    }

    /// Writes a sandbox's current record, logging (not failing) when the disk refuses: the
    /// sandbox works on, only a successor could not take it back.
    pub fn save(&self, sb: &Sandbox) {
        let lease = sb.lease();
        let view = RecordView {
            paused: sb.paused.load(std::sync::atomic::Ordering::SeqCst),
            base: sb.base(),
            ..RecordView::new(
                &sb.id,
                &sb.pool,
                sb.runtime,
                sb.created_at_ms,
                lease.as_ref(),
            )
        };
        if let Err(e) = self.write_line(&sb.id, || serde_json::to_vec(&view)) {
            tracing::warn!(sandbox = %sb.id, error = %e, "sandbox record not saved");
        }
    }

    fn write_line(
        &self,
        id: &str,
        serialize: impl FnOnce() -> serde_json::Result<Vec<u8>>,
    ) -> Result<(), RecordError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let write = || -> std::io::Result<()> {
            let mut line = serialize().map_err(std::io::Error::other)?;
            line.push(b'\n');
            self.file(dir, id)?.write_all_at(&line, 0)
        };
        write().map_err(|source| RecordError::Write {
            id: id.to_string(),
            source,
        })
    }

    /// The record's open file, opened (and created) on its first write.
    fn file(&self, dir: &Path, id: &str) -> std::io::Result<Arc<fs::File>> {
        if let Some(file) = self.open.lock_or_recover().get(id) {
            return Ok(file.clone());
        }
        let file = Arc::new(
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(Self::path(dir, id))?,
        );
        self.open
            .lock_or_recover()
            .insert(id.to_string(), file.clone());
        Ok(file)
    }

    pub fn remove(&self, id: &str) {
        let Some(dir) = &self.dir else { return };
        self.open.lock_or_recover().remove(id);
        match fs::remove_file(Self::path(dir, id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "sandbox record not removed"),
        }
    }

    /// Every readable record; unreadable ones (and stray temporary files) are removed, so
    /// their sandboxes count as unrecorded and are destroyed.
    pub fn load(&self) -> Vec<Record> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            let parsed = fs::read(&path)
                .ok()
                .and_then(|bytes| {
                    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
                    serde_json::from_slice::<Record>(line).ok()
                })
                .filter(|r| path.file_name() == Some(format!("{}.json", r.id).as_ref()));
            match parsed {
                Some(record) => records.push(record),
                None => {
                    tracing::warn!(path = %path.display(), "unreadable sandbox record removed");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    }

    /// Forgets every record (`arl node cleanup`, and a stop that destroyed everything).
    pub fn clear(&self) {
        let Some(dir) = &self.dir else { return };
        self.open.lock_or_recover().clear();
        for dir in [dir.clone(), dir.join(POOLS)] {
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(crate::util::random_id("arl-records-"));
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_dropped() {
        let dir = temp_dir();
        let records = Records::open(&dir).expect("open");
        let leased = Record {
            id: "sb-1".into(),
            pool: "default".into(),
            runtime: RuntimeKind::Containerd,
            created_at_ms: 5,
            lease: Some(StoredLease::from_lease(&Lease {
                owner: Some([7u8; 32]),
                env: [("A".to_string(), "b".to_string())].into(),
                labels: BTreeMap::new(),
                acquired_at_ms: 6,
                expires_at_ms: Some(9),
                idle_timeout_ms: None,
                request_id: Some("r-1".into()),
            })),
            paused: true,
            base: Some("snap-1".into()),
        };
        let idle = Record {
            id: "sb-2".into(),
            lease: None,
            ..leased.clone()
        };
        records.put(&leased).expect("put");
        records.put(&idle).expect("put");
        // Rewritten shorter in place: what the longer one left after the line is ignored.
        let mut long = idle.clone();
        long.pool = "x".repeat(300);
        records.put(&long).expect("put");
        records.put(&idle).expect("put");
        fs::write(dir.join("records/sb-3.json"), b"{half").expect("write");
        fs::write(dir.join("records/.sb-4.tmp"), b"{}").expect("write");
        assert_eq!(records.load(), vec![leased.clone(), idle.clone()]);
        let lease = leased
            .lease
            .as_ref()
            .and_then(StoredLease::to_lease)
            .expect("lease");
        assert_eq!(lease.owner, Some([7u8; 32]));
        assert_eq!(lease.expires_at_ms, Some(9));
        records.remove("sb-1");
        records.remove("sb-1");
        assert_eq!(records.load(), vec![idle]);
        assert_eq!(fs::read_dir(dir.join("records")).expect("dir").count(), 2);
        records.put_pool("api", &PoolSpec::default());
        assert_eq!(records.load_pools().len(), 1);
        records.remove_pool("api");
        assert!(records.load_pools().is_empty());
        records.clear();
        assert!(records.load().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_borrowed_view_writes_the_same_line_as_a_record() {
        let lease = Lease {
            owner: Some([3u8; 32]),
            env: [("K".to_string(), "v\nw".to_string())].into(),
            labels: [("l".to_string(), "m".to_string())].into(),
            acquired_at_ms: 1,
            expires_at_ms: None,
            idle_timeout_ms: Some(4),
            request_id: Some("retry-me".into()),
        };
        let without_request = Lease {
            request_id: None,
            ..lease.clone()
        };
        let cases = [
            (Some(&lease), false, None),
            (Some(&lease), true, Some("snap-2")),
            (Some(&without_request), false, Some("snap-3")),
            (None, false, None),
        ];
        for (lease, paused, base) in cases {
            let record = Record {
                id: "sb-9".into(),
                pool: "p".into(),
                runtime: RuntimeKind::Process,
                created_at_ms: 2,
                lease: lease.map(StoredLease::from_lease),
                paused,
                base: base.map(str::to_string),
            };
            let view = RecordView {
                paused,
                base: base.map(str::to_string),
                ..RecordView::new("sb-9", "p", RuntimeKind::Process, 2, lease)
            };
            let line = serde_json::to_vec(&view).expect("view");
            assert_eq!(line, serde_json::to_vec(&record).expect("record"));
            let parsed: Record = serde_json::from_slice(&line).expect("parse");
            assert_eq!(parsed, record);
        }
    }

    #[test]
    fn a_removed_record_is_written_afresh_not_through_its_old_file() {
        let dir = temp_dir();
        let records = Records::open(&dir).expect("open");
        let idle = Record {
            id: "sb-5".into(),
            pool: "p".into(),
            runtime: RuntimeKind::Process,
            created_at_ms: 1,
            lease: None,
            paused: false,
            base: None,
        };
        records.put(&idle).expect("put");
        records.remove("sb-5");
        assert!(records.load().is_empty());
        records.put(&idle).expect("put again");
        assert_eq!(records.load(), vec![idle]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_malformed_owner_digest_is_no_lease() {
        let stored = StoredLease {
            owner: Some("zz".into()),
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            acquired_at_ms: 0,
            expires_at_ms: None,
            idle_timeout_ms: None,
            request_id: None,
        };
        assert!(stored.to_lease().is_none());
    }
}
