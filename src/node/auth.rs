//! Bearer-token authentication. Tokens come from a file (one per line), re-read when the file
//! changes, so a rotated Kubernetes Secret takes effect without a restart. Only SHA-256
//! digests of tokens are kept; a sandbox belongs to the digest of the token that acquired it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::api::{ApiError, ErrorCode};
use crate::util::RwLockExt;

/// Who is calling: the digest of their token, or nobody in particular when auth is off.
pub type Owner = Option<[u8; 32]>;

pub struct Auth {
    file: Option<PathBuf>,
    state: RwLock<State>,
}

struct State {
    digests: HashSet<[u8; 32]>,
    modified: Option<SystemTime>,
    checked: Instant,
}

const RECHECK: Duration = Duration::from_secs(1);

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn load(file: &PathBuf) -> std::io::Result<(HashSet<[u8; 32]>, Option<SystemTime>)> {
    let text = std::fs::read_to_string(file)?;
    let modified = std::fs::metadata(file).and_then(|m| m.modified()).ok();
    let digests = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(digest)
        .collect();
    Ok((digests, modified))
}

impl Auth {
    /// Loads the token file; without one the API is open (the caller warns loudly).
    pub fn new(file: Option<PathBuf>) -> std::io::Result<Self> {
        let (digests, modified) = match &file {
            Some(f) => load(f)?,
            None => (HashSet::new(), None),
        };
        if file.is_some() && digests.is_empty() {
            return Err(std::io::Error::other("the token file holds no token"));
        }
        Ok(Self {
            file,
            state: RwLock::new(State {
                digests,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    fn refresh(&self) {
        let Some(file) = &self.file else { return };
        {
            let state = self.state.read_or_recover();
            if state.checked.elapsed() < RECHECK {
                return;
            }
        }
        let mut state = self.state.write_or_recover();
        state.checked = Instant::now();
        let modified = std::fs::metadata(file).and_then(|m| m.modified()).ok();
        if modified != state.modified {
            match load(file) {
                Ok((digests, modified)) if !digests.is_empty() => {
                    tracing::info!(tokens = digests.len(), "token file reloaded");
                    state.digests = digests;
                    state.modified = modified;
                }
                Ok(_) => tracing::warn!("token file is empty; keeping the previous tokens"),
                Err(e) => {
                    tracing::warn!(error = %e, "token file unreadable; keeping the previous tokens")
                }
            }
        }
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, header: Option<&str>) -> Result<Owner, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        self.refresh();
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
        let d = digest(token);
        let state = self.state.read_or_recover();
        if state.digests.contains(&d) {
            Ok(Some(d))
        } else {
            Err(ApiError::new(
                ErrorCode::Unauthorized,
                "invalid bearer token",
            ))
        }
    }
}
