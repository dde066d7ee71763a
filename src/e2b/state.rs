//! What the E2B front remembers beyond the manager: per sandbox, the template it was asked
//! for, the envd access token it handed out, the processes started through envd, and the
//! code interpreter's contexts.
//! Ownership, leases and the sandboxes themselves stay with the manager.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::http::BoxError;
use crate::node::auth::Owner;
use crate::util::MutexExt;

/// ARL sandbox ids are `sb-<hex>`; E2B's may hold only `[a-z0-9]` (its proxy splits host
/// names on `-`), so the E2B id is the hex part.
const ARL_PREFIX: &str = "sb-";

/// The E2B id of an ARL sandbox.
pub fn e2b_id(arl_id: &str) -> String {
    arl_id
        .strip_prefix(ARL_PREFIX)
        .unwrap_or(arl_id)
        .to_string()
}

/// The ARL id of an E2B id, if it is one.
pub fn arl_id(e2b_id: &str) -> Option<String> {
    let valid = !e2b_id.is_empty()
        && e2b_id.len() <= 64
        && e2b_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    valid.then(|| format!("{ARL_PREFIX}{e2b_id}"))
}

/// A sandbox handed out through the E2B front.
pub struct E2bSandbox {
    pub owner: Owner,
    pub template: String,
    pub access_token: String,
    pub processes: Mutex<HashMap<u32, Arc<Process>>>,
    /// The code interpreter's contexts, by id.
    pub contexts: Mutex<BTreeMap<String, Arc<Context>>>,
}

/// A code interpreter context: a persistent session in the sandbox's agent, started at its
/// first execution and again after it ended.
pub struct Context {
    pub id: String,
    /// `python` or `bash`.
    pub language: &'static str,
    pub cwd: String,
    /// The agent's session, while one is live.
    pub session: Mutex<Option<String>>,
    pub executions: AtomicU64,
    /// Held by the execution under way: the next one waits its turn, as in a Jupyter kernel.
    pub turn: Arc<tokio::sync::Mutex<()>>,
}

/// A process started through `process.Process/Start`, while it runs.
pub struct Process {
    pub pid: u32,
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub tag: Option<String>,
    /// Response bodies following its events (the starter's, and any `Connect`'s).
    pub followers: Mutex<Vec<mpsc::Sender<Result<Bytes, BoxError>>>>,
}

#[derive(Default)]
pub struct Registry {
    sandboxes: Mutex<HashMap<String, Arc<E2bSandbox>>>,
}

impl Registry {
    pub fn insert(&self, arl_id: String, sandbox: E2bSandbox) -> Arc<E2bSandbox> {
        let sandbox = Arc::new(sandbox);
        self.sandboxes
            .lock_or_recover()
            .insert(arl_id, sandbox.clone());
        sandbox
    }

    pub fn get(&self, arl_id: &str) -> Option<Arc<E2bSandbox>> {
        self.sandboxes.lock_or_recover().get(arl_id).cloned()
    }

    pub fn remove(&self, arl_id: &str) {
        self.sandboxes.lock_or_recover().remove(arl_id);
    }

    /// Forgets the sandboxes the manager no longer holds (released, expired, dead).
    pub fn retain(&self, alive: impl Fn(&str, &Owner) -> bool) {
        self.sandboxes
            .lock_or_recover()
            .retain(|id, sb| alive(id, &sb.owner));
    }
}

impl E2bSandbox {
    pub fn process(&self, pid: u32) -> Option<Arc<Process>> {
        self.processes.lock_or_recover().get(&pid).cloned()
    }

    pub fn process_by_tag(&self, tag: &str) -> Option<Arc<Process>> {
        self.processes
            .lock_or_recover()
            .values()
            .find(|p| p.tag.as_deref() == Some(tag))
            .cloned()
    }

    pub fn processes(&self) -> Vec<Arc<Process>> {
        let mut all: Vec<_> = self.processes.lock_or_recover().values().cloned().collect();
        all.sort_by_key(|p| p.pid);
        all
    }
}

impl Process {
    /// Sends an envelope to every follower, dropping those that went away (the process keeps
    /// running: a client that disconnects does not stop it, as with envd).
    pub async fn broadcast(&self, frame: Bytes) {
        let followers: Vec<_> = self.followers.lock_or_recover().clone();
        let mut gone = Vec::new();
        for (i, tx) in followers.iter().enumerate() {
            if tx.send(Ok(frame.clone())).await.is_err() {
                gone.push(i);
            }
        }
        if !gone.is_empty() {
            self.followers
                .lock_or_recover()
                .retain(|tx| !tx.is_closed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_both_ways_and_refuse_what_a_host_name_cannot_hold() {
        assert_eq!(e2b_id("sb-0123abcd"), "0123abcd");
        assert_eq!(arl_id("0123abcd").as_deref(), Some("sb-0123abcd"));
        assert_eq!(arl_id("a-b"), None);
        assert_eq!(arl_id("A1"), None);
        assert_eq!(arl_id(""), None);
    }
}
