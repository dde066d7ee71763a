//! The operator process: watchers keep reflector stores of pools, shards, nodes and sandboxes;
//! any change triggers a planning pass (debounced); the pass runs only while this replica holds
//! the Lease.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use super::apply::{Written, apply};
use super::desired::{PassOptions, Snapshot, changes};
use super::health::{self, Health};
use super::lease::{Elector, LeaseConfig};
use crate::crd::{Sandbox, WarmPool, WarmPoolShard};

/// A pass runs at most this often: bursts of events collapse into one.
const DEBOUNCE: Duration = Duration::from_millis(500);
/// A pass runs at least this often, even without events.
const RESYNC: Duration = Duration::from_secs(60);
/// Wait before re-running a pass whose writes failed.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {0}")]
    Config(#[source] kube::Error),
    #[error("the watch of {0} never became ready")]
    NotReady(&'static str),
    #[error("the health endpoint could not listen on {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Leadership as the pass sees it: when this replica last renewed the Lease.
pub type Leadership = watch::Receiver<Option<Instant>>;

/// Whether `leadership` allows writing now.
pub fn leads(leadership: &Leadership, lease: Duration) -> bool {
    leadership.borrow().is_some_and(|t| t.elapsed() < lease)
}

/// Runs one pass over `snapshot` if this replica leads; `None` when it does not.
pub async fn pass_if_leader(
    client: &Client,
    snapshot: &Snapshot,
    leadership: &Leadership,
    lease: Duration,
    options: &PassOptions,
) -> Option<Written> {
    if !leads(leadership, lease) {
        return None;
    }
    let now = Time(Timestamp::now());
    let changes = changes(snapshot, &now, options);
    if changes.is_empty() {
        return Some(Written::default());
    }
    let (written, error) = apply(client, changes).await;
    if let Some(e) = error {
        warn!(error = %e, failed = written.failed, "some writes failed; the next pass retries");
    }
    Some(written)
}

fn store<K>(api: Api<K>, notify: Arc<Notify>, prune: fn(&mut K)) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(prune)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!(error = %e, "watch error (retrying with backoff)");
            }
            notify.notify_one();
        }
    });
    reader
}

fn snapshot(
    pools: &Store<WarmPool>,
    shards: &Store<WarmPoolShard>,
    nodes: &Store<Node>,
    sandboxes: &Store<Sandbox>,
) -> Snapshot {
    Snapshot {
        pools: pools.state().iter().map(|p| (**p).clone()).collect(),
        shards: shards.state().iter().map(|p| (**p).clone()).collect(),
        nodes: nodes.state().iter().map(|p| (**p).clone()).collect(),
        sandboxes: sandboxes.state().iter().map(|p| (**p).clone()).collect(),
    }
}

/// Runs the operator until SIGTERM/SIGINT, with its probes and metrics on `health_addr`.
pub async fn run(
    lease: LeaseConfig,
    options: PassOptions,
    health_addr: std::net::SocketAddr,
) -> Result<(), OperatorError> {
    let health = Health::new(RESYNC);
    let listener = health::bind(health_addr)
        .await
        .map_err(|source| OperatorError::Health {
            addr: health_addr,
            source,
        })?;
    tokio::spawn(health::serve(listener, health.clone()));
    let client = Client::try_default().await.map_err(OperatorError::Config)?;
    let notify = Arc::new(Notify::new());
    let pools = store(Api::<WarmPool>::all(client.clone()), notify.clone(), |p| {
        p.metadata.managed_fields = None;
    });
    let shards = store(
        Api::<WarmPoolShard>::all(client.clone()),
        notify.clone(),
        |s| {
            s.metadata.managed_fields = None;
        },
    );
    let nodes = store(Api::<Node>::all(client.clone()), notify.clone(), |n| {
        n.metadata.managed_fields = None;
        n.metadata.annotations = None;
        if let Some(s) = n.status.as_mut() {
            s.images = None;
            s.volumes_attached = None;
            s.volumes_in_use = None;
        }
    });
    let sandboxes = store(Api::<Sandbox>::all(client.clone()), notify.clone(), |s| {
        s.metadata.managed_fields = None;
    });
    for (name, ready) in [
        ("warmpools", pools.wait_until_ready().await.is_ok()),
        ("warmpoolshards", shards.wait_until_ready().await.is_ok()),
        ("nodes", nodes.wait_until_ready().await.is_ok()),
        ("sandboxes", sandboxes.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            return Err(OperatorError::NotReady(name));
        }
    }
    info!("watches ready");
    health.set_watches_ready();

    let (leader_tx, leadership) = watch::channel(None);
    let mut elector = Elector::new(client.clone(), lease.clone());
    let elector_notify = notify.clone();
    let period = lease.retry_period();
    let election_health = health.clone();
    let election = tokio::spawn(
        async move {
            loop {
                let was = elector.is_leader();
                match elector.tick().await {
                    Ok(true) => {
                        election_health.leader.set(1);
                        let _ = leader_tx.send(Some(Instant::now()));
                        if !was {
                            elector_notify.notify_one();
                        }
                    }
                    Ok(false) => {
                        election_health.leader.set(0);
                        let _ = leader_tx.send(None);
                    }
                    Err(e) => warn!(error = %e, "lease round failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = shutdown_signal() => break,
                }
            }
            if let Err(e) = elector.release().await {
                warn!(error = %e, "could not release the lease");
            }
        }
        .instrument(info_span!("election")),
    );

    loop {
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
            _ = shutdown_signal() => break,
        }
        health.turned();
        tokio::time::sleep(DEBOUNCE).await;
        let started = Instant::now();
        let snap = snapshot(&pools, &shards, &nodes, &sandboxes);
        let span = info_span!("pass", pools = snap.pools.len(), shards = snap.shards.len());
        if let Some(written) = pass_if_leader(&client, &snap, &leadership, lease.duration, &options)
            .instrument(span)
            .await
        {
            health.passes.inc();
            health.pass_seconds.observe(started.elapsed().as_secs_f64());
            health
                .writes
                .with_label_values(&["ok"])
                .inc_by(u64::from(written.writes));
            health
                .writes
                .with_label_values(&["failed"])
                .inc_by(u64::from(written.failed));
            if written.writes > 0 || written.failed > 0 {
                info!(
                    writes = written.writes,
                    failed = written.failed,
                    "pass applied"
                );
            }
            if written.failed > 0 {
                let again = notify.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY).await;
                    again.notify_one();
                });
            }
        }
    }
    if election.await.is_err() {
        error!("the election task panicked");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
