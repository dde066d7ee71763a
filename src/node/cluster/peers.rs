//! The other nodes' shards of a pool this node serves → `Manager::peers`.
//!
//! One watch per served pool (field selector `spec.poolName=<pool>`, a selectable field of
//! the CRD), started when the node starts serving the pool and stopped when it stops. Each
//! event only updates memory; the request path reads it (`node::peers`) and never calls
//! the API. The shards' statuses change at most once per status interval of their node, so
//! a pool on N nodes costs each of them at most N events per interval.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Resource};
use tokio_util::sync::CancellationToken;

use crate::crd::WarmPoolShard;
use crate::node::manager::Manager;
use crate::node::peers::Peer;

/// What a shard offers to the other nodes: its node's endpoint while it takes acquires
/// (not while the shard is being deleted), and its idle count.
fn peer(shard: &WarmPoolShard) -> Peer {
    let status = shard.status.as_ref();
    let leaving = shard.meta().deletion_timestamp.is_some();
    Peer {
        endpoint: status.and_then(|s| s.endpoint.clone()).filter(|_| !leaving),
        idle: status.map_or(0, |s| usize::try_from(s.idle).unwrap_or(0)),
    }
}

/// Follows the shards of `pool` on nodes other than `node` until `stop` (the caller has
/// `Manager::peers` watch the pool before, and forget it after).
pub async fn follow(
    mgr: Arc<Manager>,
    api: Api<WarmPoolShard>,
    pool: String,
    node: String,
    stop: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("spec.poolName={pool}"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listed: Option<BTreeMap<String, Peer>> = None;
    // The selector already keeps to this pool and the node's own shard is not a peer; the
    // check is repeated so that a server ignoring the selector cannot mix pools.
    let other =
        |shard: &WarmPoolShard| shard.spec.pool_name == pool && shard.spec.node_name != node;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            event = stream.next() => event,
        };
        let Some(event) = event else { break };
        match event {
            Ok(Event::Init) => listed = Some(BTreeMap::new()),
            Ok(Event::InitApply(shard)) => {
                if let Some(peers) = listed.as_mut()
                    && other(&shard)
                {
                    peers.insert(shard.spec.node_name.clone(), peer(&shard));
                }
            }
            Ok(Event::InitDone) => mgr.peers.replace(&pool, listed.take().unwrap_or_default()),
            Ok(Event::Apply(shard)) if other(&shard) => {
                mgr.peers.set(&pool, &shard.spec.node_name, peer(&shard));
            }
            Ok(Event::Delete(shard)) if other(&shard) => {
                mgr.peers.remove(&pool, &shard.spec.node_name)
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => {}
            Err(e) => {
                tracing::warn!(%pool, error = %e, "watching the pool's other shards failed; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! On kube's `tower-test` mock service answering as kube-apiserver does: a list carries
    //! the collection's resource version, a watch from it is held open until there are events
    //! after it. Shards of three other nodes and this one's; the real manager over the fake
    //! runtime.

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::sync::watch;

    use super::*;
    use crate::api::pools::PoolSpec;
    use crate::api::{AcquireRequest, ErrorCode};
    use crate::node::auth::Auth;
    use crate::node::records::Records;
    use crate::node::testing::FakeRuntime;
    use crate::util::MutexExt;

    const NS: &str = "arl-sandboxes";
    const COLLECTION: &str = "/apis/arl.infra.io/v1alpha1/namespaces/arl-sandboxes/warmpoolshards";

    #[derive(Default)]
    struct Shards {
        events: Vec<(u64, &'static str, Value)>,
        stored: BTreeMap<String, Value>,
        version: u64,
        /// Requests seen: "METHOD path?query".
        seen: Vec<String>,
    }

    struct FakeApi {
        state: Mutex<Shards>,
        bump: watch::Sender<u64>,
    }

    impl FakeApi {
        fn start() -> (Arc<Self>, kube::Client) {
            let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let api = Arc::new(Self {
                state: Mutex::new(Shards::default()),
                bump: watch::Sender::new(0),
            });
            let server = api.clone();
            tokio::spawn(async move {
                while let Some((req, send)) = handle.next_request().await {
                    let server = server.clone();
                    tokio::spawn(async move {
                        let body = server.answer(req.method().clone(), req.uri().clone()).await;
                        send.send_response(Response::new(Body::from(body)));
                    });
                }
            });
            (api, kube::Client::new(svc, NS))
        }

        /// A shard of pool `py` on `node` as its daemon reports it.
        fn shard(&self, kind: &'static str, node: &str, endpoint: Option<&str>, idle: i32) {
            let mut st = self.state.lock_or_recover();
            st.version += 1;
            let version = st.version;
            let name = format!("py-{node}");
            let object = json!({
                "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPoolShard",
                "metadata": {"name": name, "namespace": NS,
                             "resourceVersion": version.to_string()},
                "spec": {"nodeName": node, "poolName": "py", "poolGeneration": 1, "quota": 2,
                         "sandbox": {"image": "python:3.12"}},
                "status": {"endpoint": endpoint, "idle": idle},
            });
            if kind == "DELETED" {
                st.stored.remove(&name);
            } else {
                st.stored.insert(name, object.clone());
            }
            st.events.push((version, kind, object));
            drop(st);
            self.bump.send_modify(|n| *n += 1);
        }

        fn requests(&self) -> usize {
            self.state.lock_or_recover().seen.len()
        }

        async fn answer(&self, method: Method, uri: http::Uri) -> Vec<u8> {
            let query = uri.query().unwrap_or("");
            self.state
                .lock_or_recover()
                .seen
                .push(format!("{method} {uri}"));
            assert_eq!(method, Method::GET, "only the watch calls the API");
            assert_eq!(uri.path(), COLLECTION);
            assert!(
                query.contains("fieldSelector=spec.poolName%3Dpy"),
                "the pool's shards only: {query}"
            );
            if !query.contains("watch=true") {
                let st = self.state.lock_or_recover();
                let items: Vec<&Value> = st.stored.values().collect();
                return serde_json::to_vec(&json!({
                    "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPoolShardList",
                    "metadata": {"resourceVersion": st.version.to_string()}, "items": items,
                }))
                .unwrap_or_default();
            }
            let since: u64 = query
                .split('&')
                .find_map(|p| p.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut rx = self.bump.subscribe();
            loop {
                rx.borrow_and_update();
                let lines: String = self
                    .state
                    .lock_or_recover()
                    .events
                    .iter()
                    .filter(|(v, _, _)| *v > since)
                    .map(|(_, kind, object)| {
                        format!("{}\n", json!({"type": kind, "object": object}))
                    })
                    .collect();
                if !lines.is_empty() {
                    return lines.into_bytes();
                }
                if rx.changed().await.is_err() {
                    return Vec::new();
                }
            }
        }
    }

    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn acquire() -> AcquireRequest {
        AcquireRequest {
            pool: "py".into(),
            count: None,
            env: Default::default(),
            labels: Default::default(),
            ttl_seconds: None,
            idle_timeout_seconds: None,
            request_id: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_acquire_names_the_other_nodes_with_idle_sandboxes() {
        let (api, client) = FakeApi::start();
        api.shard("ADDED", "n1", Some("http://10.0.0.1:8420"), 7);
        api.shard("ADDED", "n2", Some("http://10.0.0.2:8420"), 3);
        api.shard("ADDED", "n3", Some("http://10.0.0.3:8420"), 0);
        let mgr = Manager::new(
            FakeRuntime::new(),
            Auth::new(None).expect("auth"),
            4,
            Records::disabled(),
        );
        mgr.start(&BTreeMap::new()).await.expect("start");
        let one = PoolSpec {
            min_idle: 1,
            max: 1,
            ..PoolSpec::default()
        };
        mgr.put_pool("py", one).expect("pool");
        eventually("one idle", || {
            mgr.pool_view("py").is_ok_and(|v| v.status.idle == 1)
        })
        .await;
        assert_eq!(mgr.pool_view("py").expect("pool").status.cluster_idle, None);

        let stop = CancellationToken::new();
        mgr.peers.watch("py");
        tokio::spawn(follow(
            mgr.clone(),
            Api::namespaced(client, NS),
            "py".into(),
            "n1".into(),
            stop.clone(),
        ));
        eventually("the peers listed", || {
            mgr.peers.alternatives("py") == ["http://10.0.0.2:8420"]
        })
        .await;
        // This node's own shard (n1, idle 7) is not a peer; the listing adds the peers' idle.
        let view = mgr.pool_view("py").expect("pool");
        assert_eq!(view.status.cluster_idle, Some(1 + 3));

        // The pool's one sandbox is lent: the next acquire is refused with the alternatives,
        // and neither it nor the first made an API request.
        let before = api.requests();
        let lent = mgr.acquire(None, acquire()).await.expect("acquire");
        let err = mgr.acquire(None, acquire()).await.expect_err("exhausted");
        assert_eq!(err.code, ErrorCode::PoolExhausted);
        assert_eq!(err.alternatives, ["http://10.0.0.2:8420"]);
        assert_eq!(api.requests(), before, "an acquire called the API");

        // Figures move with the shards' statuses: the most idle first; a cordoned peer (no
        // endpoint) and a deleted shard drop out.
        api.shard("MODIFIED", "n3", Some("http://10.0.0.3:8420"), 5);
        eventually("n3 first", || {
            mgr.peers.alternatives("py") == ["http://10.0.0.3:8420", "http://10.0.0.2:8420"]
        })
        .await;
        api.shard("MODIFIED", "n2", None, 3);
        eventually("n2 withdrawn", || {
            mgr.peers.alternatives("py") == ["http://10.0.0.3:8420"]
        })
        .await;
        api.shard("DELETED", "n3", Some("http://10.0.0.3:8420"), 5);
        eventually("n3 gone", || mgr.peers.alternatives("py").is_empty()).await;
        let err = mgr.acquire(None, acquire()).await.expect_err("exhausted");
        assert!(err.alternatives.is_empty(), "{:?}", err.alternatives);

        // Cordoned: refused as draining, with the peers that still have idle sandboxes.
        api.shard("MODIFIED", "n2", Some("http://10.0.0.2:8420"), 2);
        eventually("n2 back", || !mgr.peers.alternatives("py").is_empty()).await;
        assert!(mgr.set_cordoned(true));
        let err = mgr.acquire(None, acquire()).await.expect_err("cordoned");
        assert_eq!(err.code, ErrorCode::Draining);
        assert_eq!(err.alternatives, ["http://10.0.0.2:8420"]);
        mgr.release(&lent[0].id, &None).expect("release");
        stop.cancel();
    }
}
