//! Cluster mode: the real `arl node --kubernetes` against the test kubelet, its pools set by
//! this node's WarmPoolShards. The warm count follows the shard's quota, the shard's status
//! is written back at a bounded rate (a burst of 1,000 acquires costs no write of its own),
//! pods that cannot start surface as the shard's `lastError`, and a deleted shard drains its
//! pool.

mod common;
mod kubelet;

use std::time::{Duration, Instant};

use common::{BIN, Daemon, Options};
use hyper::{Method, StatusCode};
use kubelet::TestKubelet;
use serde_json::{Value, json};

/// How often the daemon may write each shard's status in these tests.
const INTERVAL_MS: u64 = 500;

fn shard(pool: &str, quota: i32, image: &str, generation: i64) -> Value {
    json!({
        "apiVersion": "arl.infra.io/v1alpha1", "kind": "WarmPoolShard",
        "metadata": {"name": format!("{pool}-{}", kubelet::NODE), "namespace": kubelet::NAMESPACE,
                     "uid": format!("uid-shard-{pool}"),
                     "labels": {"arl.infra.io/pool": pool, "arl.infra.io/node": kubelet::NODE}},
        "spec": {"nodeName": kubelet::NODE, "poolName": pool, "poolGeneration": generation,
                 "quota": quota, "sandbox": {"image": image, "reuse": "reset"}},
    })
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

async fn start(shards: &[Value]) -> (std::sync::Arc<TestKubelet>, Daemon) {
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

fn shard_status(kubelet: &TestKubelet, pool: &str) -> Value {
    kubelet
        .shard(&shard_name(pool))
        .map(|s| s["status"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_count_follows_the_quota_and_status_writes_stay_bounded_over_1000_acquires() {
    let (kubelet, daemon) = start(&[shard("py", 2, "registry.example/py:1", 1)]).await;
    kubelet
        .until("the shard's status to show 2 idle", 60, |k| {
            let st = shard_status(k, "py");
            st["idle"] == 2 && st["observedPoolGeneration"] == 1
        })
        .await;
    assert_eq!(kubelet.running_pods().len(), 2);
    let pool = daemon.pool_status("py").await;
    assert_eq!(pool["idle"], 2, "{pool}");

    // The operator raises the quota: one more pod, and the status says so.
    kubelet.put_shard(shard("py", 3, "registry.example/py:1", 1));
    kubelet
        .until("3 idle in the status", 60, |k| {
            shard_status(k, "py")["idle"] == 3
        })
        .await;
    assert_eq!(kubelet.running_pods().len(), 3);

    // 1,000 acquires (each released, reuse `reset`): status writes follow the clock, not them.
    let before = status_writes(&kubelet);
    let started = Instant::now();
    for _ in 0..1000 {
        let (status, body) = daemon
            .call(Method::POST, "/v1/sandboxes", Some(json!({"pool": "py"})))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["sandboxes"][0]["id"].as_str().expect("id").to_string();
        assert_eq!(daemon.release(&id).await, StatusCode::NO_CONTENT);
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
            shard_status(k, "py")["demand"]["acquiresPerMinute"]
                .as_i64()
                .is_some_and(|n| n >= 1000)
        })
        .await;

    // The shard goes: its pool and pods go too.
    kubelet.delete_shard(&shard_name("py"));
    kubelet
        .until("the pods deleted", 60, |k| k.pods().is_empty())
        .await;
    let (status, _) = daemon.call(Method::GET, "/v1/pools/py", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_is_the_shards_last_error() {
    let image = format!("{}missing:1", kubelet::UNPULLABLE);
    let (kubelet, daemon) = start(&[shard("bad", 1, &image, 4)]).await;
    kubelet
        .until("lastError in the shard's status", 60, |k| {
            shard_status(k, "bad")["lastError"]["reason"] == "ImagePullFailed"
        })
        .await;
    let st = shard_status(&kubelet, "bad");
    assert!(
        st["lastError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ErrImagePull")),
        "{st}"
    );
    let pool = daemon.pool_status("bad").await;
    assert!(
        pool["last_error"]
            .as_str()
            .is_some_and(|m| m.contains("ErrImagePull")),
        "{pool}"
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
