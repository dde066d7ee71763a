//! Cluster mode: the real `arl node --kubernetes` against the test kubelet, its pools set by
//! this node's WarmPoolShards. The warm count follows the shard's quota, the shard's status
//! is written back at a bounded rate (a burst of 1,000 acquires costs no write of its own),
//! pods that cannot start surface as the shard's `lastError`, and a deleted shard drains its
//! pool.

mod common;
mod kubelet;

use std::time::{Duration, Instant};

use arl::api::{ErrorCode, SandboxList};
use arl::crd::{
    NODE_LABEL, POOL_LABEL, Reuse, SandboxDefinition, WarmPoolShard, WarmPoolShardSpec,
    WarmPoolShardStatus,
};
use common::{BIN, Daemon, Options};
use hyper::{Method, StatusCode};
use kubelet::TestKubelet;
use serde_json::{Value, json};

/// How often the daemon may write each shard's status in these tests.
const INTERVAL_MS: u64 = 500;

/// A shard as the operator writes it, as the test kubelet stores it (JSON).
fn shard(pool: &str, quota: i32, image: &str, generation: i64) -> Value {
    let mut shard = WarmPoolShard::new(
        &shard_name(pool),
        WarmPoolShardSpec {
            node_name: kubelet::NODE.into(),
            pool_name: pool.into(),
            pool_generation: generation,
            quota,
            sandbox: SandboxDefinition {
                image: Some(image.into()),
                reuse: Reuse::Reset,
                ..SandboxDefinition::default()
            },
        },
    );
    shard.metadata.namespace = Some(kubelet::NAMESPACE.into());
    shard.metadata.uid = Some(format!("uid-shard-{pool}"));
    shard.metadata.labels = Some(
        [
            (POOL_LABEL.to_string(), pool.to_string()),
            (NODE_LABEL.to_string(), kubelet::NODE.to_string()),
        ]
        .into(),
    );
    serde_json::to_value(&shard).expect("shard JSON")
}

fn shard_name(pool: &str) -> String {
    format!("{pool}-{}", kubelet::NODE)
}

fn status_writes(kubelet: &TestKubelet) -> usize {
    kubelet
        .seen()
        .iter()
        .filter(|s| s.method == Method::PATCH && s.path.ends_with("/status"))
        .count()
}

async fn start(shards: &[Value]) -> (kubelet::Running, Daemon) {
    let kubelet = TestKubelet::start(BIN).await;
    for s in shards {
        kubelet.put_shard(s.clone());
    }
    let mut args = kubelet::node_args(&kubelet);
    args.extend(["--shard-status-interval-ms".into(), INTERVAL_MS.to_string()]);
    let daemon = Daemon::start(Options {
        args,
        ..Options::default()
    })
    .await;
    (kubelet, daemon)
}

/// The shard's status as the daemon last wrote it (none yet: the default, all zero).
fn shard_status(kubelet: &TestKubelet, pool: &str) -> WarmPoolShardStatus {
    kubelet
        .shard(&shard_name(pool))
        .map(|s| serde_json::from_value::<WarmPoolShard>(s).expect("a WarmPoolShard"))
        .and_then(|s| s.status)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_count_follows_the_quota_and_status_writes_stay_bounded_over_1000_acquires() {
    let (kubelet, daemon) = start(&[shard("py", 2, "registry.example/py:1", 1)]).await;
    kubelet
        .until("the shard's status to show 2 idle", 60, |k| {
            let st = shard_status(k, "py");
            st.idle == 2 && st.observed_pool_generation == 1
        })
        .await;
    assert_eq!(kubelet.running_pods().len(), 2);
    let pool = daemon.status("py").await;
    assert_eq!(pool.idle, 2, "{pool:?}");

    // The operator raises the quota: one more pod, and the status says so.
    kubelet.put_shard(shard("py", 3, "registry.example/py:1", 1));
    kubelet
        .until("3 idle in the status", 60, |k| {
            shard_status(k, "py").idle == 3
        })
        .await;
    assert_eq!(kubelet.running_pods().len(), 3);

    // 1,000 acquires (each released, reuse `reset`): status writes follow the clock, not them.
    let before = status_writes(&kubelet);
    let started = Instant::now();
    for _ in 0..1000 {
        let list: SandboxList = daemon
            .post("/v1/sandboxes", &common::acquire("py"), StatusCode::CREATED)
            .await;
        assert_eq!(list.sandboxes.len(), 1, "{list:?}");
        assert_eq!(
            daemon.release(&list.sandboxes[0].id).await,
            StatusCode::NO_CONTENT
        );
    }
    let elapsed = started.elapsed();
    let writes = status_writes(&kubelet) - before;
    let ticks = (elapsed.as_millis() as u64).div_ceil(INTERVAL_MS) as usize;
    println!(
        "1000 acquires in {:.2} s: {writes} status writes ({ticks} status intervals)",
        elapsed.as_secs_f64()
    );
    assert!(
        writes <= ticks + 1,
        "{writes} status writes over {ticks} intervals: writes must follow the clock"
    );
    assert!(writes < 1000 / 10, "{writes} writes for 1000 acquires");
    kubelet
        .until("the demand figures", 30, |k| {
            shard_status(k, "py").demand.acquires_per_minute >= 1000
        })
        .await;

    // The shard goes: its pool and pods go too.
    kubelet.delete_shard(&shard_name("py"));
    kubelet
        .until("the pods deleted", 60, |k| k.pods().is_empty())
        .await;
    let err = daemon
        .send_empty(Method::GET, "/v1/pools/py")
        .await
        .expect_error(StatusCode::NOT_FOUND);
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_is_the_shards_last_error() {
    let image = format!("{}missing:1", kubelet::UNPULLABLE);
    let (kubelet, daemon) = start(&[shard("bad", 1, &image, 4)]).await;
    kubelet
        .until("lastError in the shard's status", 60, |k| {
            shard_status(k, "bad")
                .last_error
                .is_some_and(|e| e.reason == "ImagePullFailed")
        })
        .await;
    let st = shard_status(&kubelet, "bad");
    assert!(
        st.last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("ErrImagePull")),
        "{st:?}"
    );
    let pool = daemon.status("bad").await;
    assert!(
        pool.last_error
            .as_deref()
            .is_some_and(|m| m.contains("ErrImagePull")),
        "{pool:?}"
    );
    // Each failed pod is deleted, and the retries back off rather than spin: the refill
    // waits 100, 200, 400 ms ... after the 1st, 2nd, 3rd ... failure in a row, so the 4th
    // creation comes at least 400 ms after the 3rd whatever the machine's load.
    let creations = |k: &TestKubelet| -> Vec<Instant> {
        k.seen()
            .iter()
            .filter(|s| s.method == Method::POST && s.path.ends_with("/pods"))
            .map(|s| s.at)
            .collect()
    };
    kubelet
        .until("four creations", 30, |k| creations(k).len() >= 4)
        .await;
    let at = creations(&kubelet);
    assert!(
        at[3] - at[2] >= Duration::from_millis(400),
        "no backoff between failed creations: {:?}",
        at.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
    );
    kubelet
        .until("the failed pods deleted", 30, |k| k.pods().len() <= 1)
        .await;
}

/// Another node's shard of `pool`, as its daemon reports it.
fn peer_shard(pool: &str, node: &str, endpoint: &str, idle: i32) -> Value {
    let mut shard = shard(pool, 1, "registry.example/py:1", 1);
    shard["metadata"]["name"] = json!(format!("{pool}-{node}"));
    shard["metadata"]["uid"] = json!(format!("uid-shard-{pool}-{node}"));
    shard["metadata"]["labels"][NODE_LABEL] = json!(node);
    shard["spec"]["nodeName"] = json!(node);
    shard["status"] = json!({"endpoint": endpoint, "idle": idle, "observedPoolGeneration": 1});
    shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_sends_clients_to_the_peers_its_shards_show_idle() {
    let peer = "http://10.1.1.2:8420";
    let (kubelet, daemon) = start(&[
        shard("py", 1, "registry.example/py:1", 1),
        peer_shard("py", "node-b", peer, 4),
        peer_shard("other", "node-c", "http://10.1.1.3:8420", 9),
    ])
    .await;
    kubelet
        .until("the shard's status to show 1 idle", 60, |k| {
            shard_status(k, "py").idle == 1
        })
        .await;
    // This node advertises its own API (the listen address: a definite IP here).
    assert_eq!(
        shard_status(&kubelet, "py").endpoint.as_deref(),
        Some(format!("http://127.0.0.1:{}", daemon.port).as_str())
    );
    // The listing adds the peers' idle sandboxes of this pool (not of another pool).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pool = daemon.status("py").await;
        if pool.cluster_idle == Some(1 + 4) {
            break;
        }
        assert!(Instant::now() < deadline, "cluster_idle never 5: {pool:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Cordoned: refused as draining, naming the peer; the endpoint is withdrawn.
    kubelet.set_unschedulable(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        let reply = daemon
            .send(Method::POST, "/v1/sandboxes", Some(&common::acquire("py")))
            .await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply.error();
        }
        let list: SandboxList = reply.expect(StatusCode::CREATED);
        daemon.release(&list.sandboxes[0].id).await;
        assert!(Instant::now() < deadline, "the cordon never took effect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(err.code, ErrorCode::Draining);
    assert_eq!(err.alternatives, [peer]);
    kubelet
        .until("the endpoint withdrawn", 30, |k| {
            shard_status(k, "py").endpoint.is_none()
        })
        .await;

    // The peer's share runs dry: nothing to name.
    kubelet.put_shard(peer_shard("py", "node-b", peer, 0));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let err = daemon
            .send(Method::POST, "/v1/sandboxes", Some(&common::acquire("py")))
            .await
            .expect_error(StatusCode::SERVICE_UNAVAILABLE);
        if err.alternatives.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the dry peer is still named");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(daemon);
}
