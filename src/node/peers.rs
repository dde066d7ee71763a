//! Other nodes' idle capacity per pool, as their shards last reported it (cluster mode).
//!
//! The cluster watch (`cluster::peers`) fills it from the WarmPoolShard statuses of the pools
//! this node serves; the request path only reads it: a refused acquire names the peers with
//! idle sandboxes (`alternatives`), and the pool listing adds their idle count to this
//! node's. No API call is ever made on the request path.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use crate::util::RwLockExt;

/// Alternatives named in one refusal at most: enough to route around a busy node, few
/// enough that the answer stays small in a cluster of thousands.
pub const MAX_ALTERNATIVES: usize = 8;

/// What one peer's shard of a pool said last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's node API (absent while it takes no acquires: cordoned or draining).
    pub endpoint: Option<String>,
    pub idle: usize,
}

/// Peers by pool and node. A pool is present once its peers are being watched (even with
/// none), so that a pool without a watch reports no cluster-wide figure at all.
#[derive(Debug, Default)]
pub struct Peers {
    pools: RwLock<HashMap<String, BTreeMap<String, Peer>>>,
}

impl Peers {
    /// Starts following `pool`'s peers, with none known yet.
    pub fn watch(&self, pool: &str) {
        self.pools
            .write_or_recover()
            .entry(pool.to_string())
            .or_default();
    }

    /// Stops following `pool` (this node no longer serves it).
    pub fn forget(&self, pool: &str) {
        self.pools.write_or_recover().remove(pool);
    }

    /// Replaces everything known of `pool`'s peers (after a fresh list).
    pub fn replace(&self, pool: &str, peers: BTreeMap<String, Peer>) {
        if let Some(known) = self.pools.write_or_recover().get_mut(pool) {
            *known = peers;
        }
    }

    /// Records what `node`'s shard of `pool` says now.
    pub fn set(&self, pool: &str, node: &str, peer: Peer) {
        if let Some(known) = self.pools.write_or_recover().get_mut(pool) {
            known.insert(node.to_string(), peer);
        }
    }

    /// `node`'s shard of `pool` is gone.
    pub fn remove(&self, pool: &str, node: &str) {
        if let Some(known) = self.pools.write_or_recover().get_mut(pool) {
            known.remove(node);
        }
    }

    /// The endpoints of the peers with idle sandboxes of `pool`, most idle first.
    pub fn alternatives(&self, pool: &str) -> Vec<String> {
        let pools = self.pools.read_or_recover();
        let Some(known) = pools.get(pool) else {
            return Vec::new();
        };
        let mut open: Vec<(&String, usize)> = known
            .values()
            .filter(|p| p.idle > 0)
            .filter_map(|p| Some((p.endpoint.as_ref()?, p.idle)))
            .collect();
        // Stable: equally idle peers keep their node-name order, so answers do not flap.
        open.sort_by_key(|p| std::cmp::Reverse(p.1));
        open.into_iter()
            .take(MAX_ALTERNATIVES)
            .map(|(endpoint, _)| endpoint.clone())
            .collect()
    }

    /// The idle sandboxes of `pool` on the peers that take acquires, if `pool` is followed.
    pub fn idle(&self, pool: &str) -> Option<usize> {
        let pools = self.pools.read_or_recover();
        let known = pools.get(pool)?;
        Some(
            known
                .values()
                .filter(|p| p.endpoint.is_some())
                .map(|p| p.idle)
                .sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(endpoint: &str, idle: usize) -> Peer {
        Peer {
            endpoint: Some(endpoint.into()),
            idle,
        }
    }

    #[test]
    fn alternatives_are_the_peers_with_idle_sandboxes_most_idle_first() {
        let peers = Peers::default();
        assert_eq!(peers.idle("py"), None, "a pool not followed has no figure");
        peers.set("py", "n2", peer("http://10.0.0.2:8080", 1));
        assert_eq!(
            peers.idle("py"),
            None,
            "nothing is kept of a pool not followed"
        );
        peers.watch("py");
        assert_eq!(peers.idle("py"), Some(0));
        assert!(peers.alternatives("py").is_empty());
        peers.set("py", "n2", peer("http://10.0.0.2:8080", 1));
        peers.set("py", "n3", peer("http://10.0.0.3:8080", 5));
        peers.set("py", "n4", peer("http://10.0.0.4:8080", 0));
        peers.set(
            "py",
            "n5",
            Peer {
                endpoint: None,
                idle: 9,
            },
        );
        assert_eq!(
            peers.alternatives("py"),
            ["http://10.0.0.3:8080", "http://10.0.0.2:8080"],
            "the empty peer and the cordoned one are not named"
        );
        assert_eq!(
            peers.idle("py"),
            Some(6),
            "a cordoned peer's idle is not offered"
        );
        assert!(peers.alternatives("other").is_empty());

        peers.set("py", "n3", peer("http://10.0.0.3:8080", 0));
        peers.remove("py", "n2");
        assert!(peers.alternatives("py").is_empty());
        peers.replace(
            "py",
            BTreeMap::from([("n6".into(), peer("http://n6:1", 2))]),
        );
        assert_eq!(peers.alternatives("py"), ["http://n6:1"]);
        peers.forget("py");
        assert_eq!(peers.idle("py"), None);
    }

    #[test]
    fn a_refusal_names_a_bounded_number_of_peers() {
        let peers = Peers::default();
        peers.watch("py");
        for n in 0..100 {
            peers.set(
                "py",
                &format!("n{n:03}"),
                peer(&format!("http://n{n}:1"), n + 1),
            );
        }
        let named = peers.alternatives("py");
        assert_eq!(named.len(), MAX_ALTERNATIVES);
        assert_eq!(named[0], "http://n99:1");
        assert_eq!(peers.idle("py"), Some((1..=100).sum()));
    }
}
