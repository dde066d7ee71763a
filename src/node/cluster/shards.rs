//! This node's WarmPoolShards → its pools, and its pools → the shards' status.
//!
//! One watch (field selector `spec.nodeName=<node>`) keeps a pool per shard: a `kubernetes`
//! pool named after the WarmPool whose warm count is the shard's quota and whose pods are
//! built from the shard's sandbox definition. A shard that goes takes its pool with it.
//!
//! Status goes back on a ticker, never from a request: every `interval` each shard whose
//! figures changed since its last write gets one merge patch of its status subresource, so a
//! shard costs at most one write per interval however many acquires and execs run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::PoolSpec;
use crate::api::pools::{NetworkMode, ReusePolicy, RuntimeKind};
use crate::crd::{
    Demand, Network, POOL_LABEL, Reuse, ShardError, WarmPoolShard, WarmPoolShardSpec,
    WarmPoolShardStatus,
};
use crate::node::manager::Manager;
use crate::util::MutexExt;
use tokio_util::sync::CancellationToken;

/// Sandboxes of one pool on one node at most (idle, starting and lent out together).
const MAX_PER_NODE: usize = 16_384;
/// How far back the demand figures look.
const DEMAND_WINDOW: Duration = Duration::from_secs(60);

/// The pool a shard asks for; the message says why the shard cannot be served.
pub fn pool_spec(shard: &WarmPoolShardSpec) -> Result<PoolSpec, String> {
    let def = &shard.sandbox;
    let mut template = match (&def.template, &def.image) {
        (Some(template), _) => template.clone(),
        (None, Some(image)) => PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "sandbox".into(),
                    image: Some(image.clone()),
                    resources: def.resources.clone(),
                    env: def.env.clone(),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        },
        (None, None) => return Err("the shard's sandbox has neither template nor image".into()),
    };
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(POOL_LABEL.into(), shard.pool_name.clone());
    let template = serde_json::to_value(&template).map_err(|e| e.to_string())?;
    let positive = |s: Option<i64>| s.and_then(|s| u64::try_from(s).ok());
    Ok(PoolSpec {
        runtime: RuntimeKind::Kubernetes,
        min_idle: usize::try_from(shard.quota).unwrap_or(0).min(MAX_PER_NODE),
        max: MAX_PER_NODE,
        reuse: match def.reuse {
            Reuse::Destroy => ReusePolicy::Destroy,
            Reuse::Reset => ReusePolicy::Reset,
        },
        network: match def.network {
            Network::None => NetworkMode::None,
            Network::Egress => NetworkMode::Host,
        },
        template: Some(template),
        idle_timeout_seconds: positive(def.idle_timeout_seconds),
        max_lifetime_seconds: positive(def.max_lifetime_seconds),
        ..PoolSpec::default()
    })
}

/// The machine-readable cause of a creation failure, for the shard's `lastError.reason`.
pub fn error_reason(message: &str) -> &'static str {
    if [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
    ]
    .iter()
    .any(|r| message.contains(r))
    {
        "ImagePullFailed"
    } else if message.contains("Unschedulable") || message.contains("OutOf") {
        "Unschedulable"
    } else {
        "CreateFailed"
    }
}

/// The merge patch that makes a shard's status `status`: the optional fields it lacks are
/// sent as `null`, since a merge patch leaves a field it does not name as it was (a cleared
/// error or a withdrawn endpoint would otherwise stay).
fn status_patch(status: &WarmPoolShardStatus) -> serde_json::Value {
    let mut value = json!(status);
    if let Some(fields) = value.as_object_mut() {
        for optional in ["endpoint", "lastError"] {
            fields.entry(optional).or_insert(serde_json::Value::Null);
        }
    }
    json!({ "status": value })
}

/// When, and how many acquires and misses a pool had counted by then.
type Sample = (Instant, u64, u64);

/// A shard served by this node: its object's name and the pool it feeds.
#[derive(Debug, Clone)]
struct Served {
    pool: String,
    generation: i64,
    /// The spec applied, so that the shard's own status updates change nothing.
    spec: WarmPoolShardSpec,
}

pub struct ShardSync {
    mgr: Arc<Manager>,
    api: Api<WarmPoolShard>,
    node: String,
    /// This node's API as other nodes' clients reach it (written into the shards' status).
    endpoint: Option<String>,
    interval: Duration,
    served: Mutex<HashMap<String, Served>>,
    /// The status last written per shard.
    written: Mutex<HashMap<String, WarmPoolShardStatus>>,
    /// Acquire counts sampled per pool, for the demand figures.
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
    /// The watch of each served pool's other shards (`peers.rs`), by pool.
    following: Mutex<HashMap<String, CancellationToken>>,
    /// Status writes so far (for tests and metrics).
    pub writes: std::sync::atomic::AtomicU64,
}

impl ShardSync {
    pub fn new(
        mgr: Arc<Manager>,
        api: Api<WarmPoolShard>,
        node: String,
        endpoint: Option<String>,
        interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            mgr,
            api,
            node,
            endpoint,
            interval,
            following: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            samples: Mutex::new(HashMap::new()),
            writes: Default::default(),
        })
    }

    /// Watches this node's shards and writes their status until the node shuts down.
    pub async fn run(self: Arc<Self>) {
        let status = tokio::spawn(self.clone().status_loop());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut stream = watcher(self.api.clone(), config).default_backoff().boxed();
        let mut listed: Option<Vec<String>> = None;
        loop {
            let event = tokio::select! {
                // Shutdown first: a ready event must not be served after it.
                biased;
                () = self.mgr.shutdown.cancelled() => break,
                event = stream.next() => event,
            };
            let Some(event) = event else { break };
            match event {
                Ok(Event::Init) => listed = Some(Vec::new()),
                Ok(Event::InitApply(shard)) => {
                    if let Some(names) = listed.as_mut() {
                        names.push(shard.name_any());
                    }
                    self.apply(&shard);
                    self.follow_peers(&shard);
                }
                Ok(Event::InitDone) => {
                    let names = listed.take().unwrap_or_default();
                    let gone: Vec<String> = self
                        .served
                        .lock_or_recover()
                        .keys()
                        .filter(|n| !names.contains(n))
                        .cloned()
                        .collect();
                    for name in gone {
                        self.remove(&name);
                    }
                }
                Ok(Event::Apply(shard)) => {
                    self.apply(&shard);
                    self.follow_peers(&shard);
                }
                Ok(Event::Delete(shard)) => self.remove(&shard.name_any()),
                Err(e) => {
                    tracing::warn!(error = %e, "watching this node's shards failed; retrying")
                }
            }
        }
        status.abort();
        for (_, stop) in self.following.lock_or_recover().drain() {
            stop.cancel();
        }
    }

    /// Starts watching the other nodes' shards of a pool this node has started serving.
    fn follow_peers(&self, shard: &WarmPoolShard) {
        let pool = &shard.spec.pool_name;
        let served = self
            .served
            .lock_or_recover()
            .get(&shard.name_any())
            .is_some_and(|s| s.pool == *pool);
        let mut following = self.following.lock_or_recover();
        if !served || following.contains_key(pool) {
            return;
        }
        let stop = self.mgr.shutdown.child_token();
        following.insert(pool.clone(), stop.clone());
        self.mgr.peers.watch(pool);
        tokio::spawn(super::peers::follow(
            self.mgr.clone(),
            self.api.clone(),
            pool.clone(),
            self.node.clone(),
            stop,
        ));
    }

    fn apply(&self, shard: &WarmPoolShard) {
        let name = shard.name_any();
        let spec = &shard.spec;
        if spec.node_name != self.node {
            return;
        }
        if self
            .served
            .lock_or_recover()
            .get(&name)
            .is_some_and(|s| s.spec == *spec)
        {
            return;
        }
        let result = pool_spec(spec).and_then(|pool| {
            self.mgr
                .put_pool(&spec.pool_name, pool)
                .map_err(|e| e.message)
        });
        match result {
            Ok(()) => {
                tracing::info!(shard = %name, pool = %spec.pool_name, quota = spec.quota, "serving shard");
                self.served.lock_or_recover().insert(
                    name,
                    Served {
                        pool: spec.pool_name.clone(),
                        generation: spec.pool_generation,
                        spec: spec.clone(),
                    },
                );
            }
            Err(e) => tracing::warn!(shard = %name, error = %e, "cannot serve shard"),
        }
    }

    fn remove(&self, name: &str) {
        let Some(served) = self.served.lock_or_recover().remove(name) else {
            return;
        };
        self.written.lock_or_recover().remove(name);
        if let Some(stop) = self.following.lock_or_recover().remove(&served.pool) {
            stop.cancel();
        }
        self.mgr.peers.forget(&served.pool);
        tracing::info!(shard = %name, pool = %served.pool, "shard gone; draining its pool");
        if let Err(e) = self.mgr.delete_pool(&served.pool) {
            tracing::warn!(pool = %served.pool, error = %e.message, "deleting the pool failed");
        }
    }

    async fn status_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.write_changed().await;
        }
    }

    /// One round: patches the status of every shard whose figures changed.
    pub async fn write_changed(&self) {
        let served: Vec<(String, Served)> = self
            .served
            .lock_or_recover()
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        for (name, served) in served {
            let Some(status) = self.status_of(&served) else {
                continue;
            };
            if self.written.lock_or_recover().get(&name) == Some(&status) {
                continue;
            }
            let patch = Patch::Merge(status_patch(&status));
            match self
                .api
                .patch_status(&name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    // Remembered before counted: whoever sees the count sees it written.
                    self.written.lock_or_recover().insert(name, status);
                    self.writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(shard = %name, error = %e, "writing the shard's status failed")
                }
            }
        }
    }

    fn status_of(&self, served: &Served) -> Option<WarmPoolShardStatus> {
        let view = self.mgr.pool_view(&served.pool).ok()?;
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        // Other nodes' clients are sent here only while this node takes acquires.
        let accepting = !self.mgr.is_cordoned() && !self.mgr.is_draining();
        Some(WarmPoolShardStatus {
            endpoint: self.endpoint.clone().filter(|_| accepting),
            observed_pool_generation: served.generation,
            idle: count(view.status.idle),
            allocated: count(view.status.allocated),
            starting: count(view.status.starting),
            last_error: view.status.last_error.as_deref().map(|message| ShardError {
                reason: error_reason(message).into(),
                message: message.chars().take(1024).collect(),
                time: None,
            }),
            demand: self.demand(&served.pool),
        })
    }

    /// Acquires (and misses) of the pool over the last minute, from the acquire histogram.
    fn demand(&self, pool: &str) -> Demand {
        let histogram = &self.mgr.metrics.acquire_seconds;
        let hits = histogram
            .with_label_values(&[pool, "hit"])
            .get_sample_count();
        let misses = histogram
            .with_label_values(&[pool, "miss"])
            .get_sample_count();
        let now = Instant::now();
        let mut samples = self.samples.lock_or_recover();
        let window = samples.entry(pool.to_string()).or_default();
        window.push_back((now, hits + misses, misses));
        while window
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > DEMAND_WINDOW)
        {
            window.pop_front();
        }
        let (_, total0, misses0) = window.front().copied().unwrap_or((now, 0, 0));
        let per_minute = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
        Demand {
            acquires_per_minute: per_minute(hits + misses - total0),
            misses_per_minute: per_minute(misses - misses0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AcquireRequest;
    use crate::crd::SandboxDefinition;
    use crate::node::auth::Auth;
    use crate::node::records::Records;
    use crate::node::testing::FakeRuntime;
    use kube::client::Body;

    fn shard(quota: i32) -> WarmPoolShardSpec {
        WarmPoolShardSpec {
            node_name: "n1".into(),
            pool_name: "py".into(),
            pool_generation: 3,
            quota,
            sandbox: SandboxDefinition {
                image: Some("python:3.12".into()),
                reuse: Reuse::Reset,
                network: Network::Egress,
                idle_timeout_seconds: Some(60),
                ..SandboxDefinition::default()
            },
        }
    }

    #[test]
    fn a_shard_becomes_a_kubernetes_pool_kept_at_its_quota() {
        let spec = pool_spec(&shard(5)).expect("pool");
        assert_eq!(spec.runtime, RuntimeKind::Kubernetes);
        assert_eq!(spec.min_idle, 5);
        assert_eq!(spec.reuse, ReusePolicy::Reset);
        assert_eq!(spec.network, NetworkMode::Host);
        assert_eq!(spec.idle_timeout_seconds, Some(60));
        assert!(spec.validate().is_ok());
        let template = spec.template.expect("template");
        assert_eq!(template["metadata"]["labels"][POOL_LABEL], "py");
        assert_eq!(template["spec"]["containers"][0]["image"], "python:3.12");
        assert!(
            crate::runtime::kubernetes::pod::validate(
                &PoolSpec {
                    template: Some(template),
                    ..spec
                },
                None
            )
            .is_ok()
        );
        assert_eq!(pool_spec(&shard(-1)).expect("pool").min_idle, 0);
    }

    #[test]
    fn creation_failures_get_a_reason_the_operator_reads() {
        assert_eq!(
            error_reason("pod x cannot start: ErrImagePull: manifest unknown"),
            "ImagePullFailed"
        );
        assert_eq!(
            error_reason("pod x cannot start: Unschedulable: 0/3 nodes"),
            "Unschedulable"
        );
        assert_eq!(
            error_reason("pod x failed: OutOfcpu: no room"),
            "Unschedulable"
        );
        assert_eq!(error_reason("agent did not start"), "CreateFailed");
    }

    /// Polls `cond` until it holds; fails the test after 5 s.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// On kube's mock service: the status goes out once per change, from the ticker only; a
    /// burst of 1,000 acquires (each released, reuse `reset`) writes nothing, and the next
    /// round writes it once with the demand it made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_writes_come_from_the_ticker_once_per_change_never_from_acquires() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let client = kube::Client::new(service, "arl-sandboxes");
        let mut object = WarmPoolShard::new("py-n1", shard(2));
        object.metadata.namespace = Some("arl-sandboxes".into());
        let reply = serde_json::to_vec(&object).expect("json");
        let patches: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let seen = patches.clone();
        let patches_seen = patches.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                assert_eq!(request.method(), http::Method::PATCH);
                assert_eq!(
                    request.uri().path(),
                    "/apis/arl.infra.io/v1alpha1/namespaces/arl-sandboxes/warmpoolshards/py-n1/status"
                );
                let body = request.into_body().collect_bytes().await.expect("body");
                seen.lock_or_recover()
                    .push(serde_json::from_slice(&body).expect("patch"));
                send.send_response(
                    http::Response::builder()
                        .body(Body::from(reply.clone()))
                        .expect("response"),
                );
            }
        });
        let fake = FakeRuntime::new();
        let mgr = Manager::new(
            fake.clone(),
            Auth::new(None).expect("auth"),
            16,
            Records::disabled(),
        );
        mgr.start(&BTreeMap::new()).await.expect("start");
        let sync = ShardSync::new(
            mgr.clone(),
            Api::namespaced(client, "arl-sandboxes"),
            "n1".into(),
            Some("http://10.0.0.1:8420".into()),
            Duration::from_secs(3600),
        );
        sync.apply(&object);
        let idle = |n: usize| {
            mgr.pool_view("py")
                .is_ok_and(|v| v.status.idle == n && v.status.starting == 0)
        };
        eventually("2 idle", || idle(2)).await;
        // The ticker's first round writes the status once; nothing changes, nothing more.
        let ticker = tokio::spawn(sync.clone().status_loop());
        eventually("the first write", || {
            sync.writes.load(std::sync::atomic::Ordering::Relaxed) == 1
        })
        .await;
        assert_eq!(patches.lock_or_recover()[0]["status"]["idle"], 2);
        assert_eq!(
            patches.lock_or_recover()[0]["status"]["endpoint"],
            "http://10.0.0.1:8420"
        );
        assert!(
            patches.lock_or_recover()[0]["status"]["lastError"].is_null(),
            "no error: a stale one is cleared"
        );
        sync.write_changed().await;
        assert_eq!(
            patches.lock_or_recover().len(),
            1,
            "an unchanged status is not written"
        );

        for _ in 0..1000 {
            let got = mgr
                .acquire(
                    None,
                    AcquireRequest {
                        pool: "py".into(),
                        count: None,
                        env: Default::default(),
                        labels: Default::default(),
                        ttl_seconds: None,
                        idle_timeout_seconds: None,
                        request_id: None,
                    },
                )
                .await
                .expect("acquire");
            mgr.release(&got[0].id, &None).expect("release");
        }
        assert_eq!(
            patches.lock_or_recover().len(),
            1,
            "1,000 acquires caused status writes"
        );
        assert_eq!(sync.writes.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The resets end (misses made a few more sandboxes, which stay warm).
        eventually("the resets done", || {
            mgr.pool_view("py")
                .is_ok_and(|v| v.status.starting == 0 && v.status.idle >= 2)
        })
        .await;
        sync.write_changed().await;
        let patches = patches.lock_or_recover().clone();
        assert_eq!(patches.len(), 2);
        let demand = &patches[1]["status"]["demand"];
        assert_eq!(demand["acquiresPerMinute"], 1000, "{demand}");
        assert_eq!(patches[1]["status"]["observedPoolGeneration"], 3);
        ticker.abort();

        // Cordoned: the endpoint is withdrawn (other nodes stop sending clients here).
        assert!(mgr.set_cordoned(true));
        sync.write_changed().await;
        let last = patches_seen
            .lock_or_recover()
            .last()
            .cloned()
            .expect("a patch");
        assert!(last["status"]["endpoint"].is_null(), "{last}");
        assert!(
            last["status"]
                .as_object()
                .is_some_and(|s| s.contains_key("endpoint")),
            "the withdrawal is written as null: {last}"
        );
    }
}
