//! Cluster mode (`arl node --kubernetes`): the node's `kubernetes` runtime; from this
//! node's WarmPoolShards, its pools (`shards.rs`); the Sandbox objects bound to this node, a
//! sandbox each (`sandboxes.rs`), and the Tasks run in them (`tasks.rs`); from its Node
//! object, whether it is cordoned (`watch_node`).

pub mod mirror;
#[cfg(test)]
mod objects_tests;
pub mod peers;
pub mod sandboxes;
pub mod shards;
pub mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use thiserror::Error;

use super::manager::Manager;
use crate::crd::{Sandbox, Task, WarmPoolShard};

use super::config::ClusterArgs;
use crate::runtime::kubernetes::pod::PodContext;
use crate::runtime::kubernetes::{AgentTransport, KubernetesConfig, KubernetesRuntime};

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("no Kubernetes API configuration (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
}

/// The node's `kubernetes` runtime, on the API server of the in-cluster config or KUBECONFIG.
pub async fn kubernetes_runtime(args: &ClusterArgs) -> Result<KubernetesRuntime, ClusterError> {
    let client = client(args).await?;
    Ok(KubernetesRuntime::new(client, runtime_config(args)))
}

/// A client of the API server: from `--kubeconfig` when given, else in-cluster or KUBECONFIG.
pub async fn client(args: &ClusterArgs) -> Result<kube::Client, ClusterError> {
    let Some(path) = &args.kubeconfig else {
        return kube::Client::try_default()
            .await
            .map_err(ClusterError::Client);
    };
    let kubeconfig_error = |source| ClusterError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(kubeconfig_error)?;
    kube::Client::try_from(config).map_err(ClusterError::Client)
}

fn runtime_config(args: &ClusterArgs) -> KubernetesConfig {
    let transport = args.agent_transport.resolve(&args.kubelet_pods_dir);
    tracing::info!(
        ?transport,
        pods_dir = %args.kubelet_pods_dir.display(),
        "sandbox pods' agents are reached over {}",
        if transport == AgentTransport::Tcp { "TCP at the pod's IP" } else { "a Unix socket through the kubelet's pod directory" }
    );
    KubernetesConfig {
        pod: PodContext {
            node_name: args.node_name.clone().unwrap_or_default(),
            namespace: args.sandbox_namespace.clone(),
            instance: args.instance.clone(),
            agent_image: args.agent_image.clone(),
            agent_tcp_port: (transport == AgentTransport::Tcp).then_some(args.agent_port),
        },
        pods_dir: args.kubelet_pods_dir.clone(),
    }
}

/// Starts serving this node's shards (their pools, and their status written back), the
/// Sandbox objects bound to it and their Tasks. `local` is the address the node API listens on.
pub async fn start(
    mgr: Arc<Manager>,
    args: &ClusterArgs,
    local: SocketAddr,
) -> Result<Arc<shards::ShardSync>, ClusterError> {
    let client = client(args).await?;
    let node = args.node_name.clone().unwrap_or_default();
    let api: Api<WarmPoolShard> = Api::namespaced(client.clone(), &args.sandbox_namespace);
    let endpoint = advertised(args, local);
    match &endpoint {
        Some(url) => tracing::info!(%url, "other nodes' clients are sent to this node at"),
        None => tracing::warn!(
            "no address for other nodes' clients (set NODE_IP or --advertise-url): \
             this node is never named as an alternative"
        ),
    }
    let sync = shards::ShardSync::new(
        mgr.clone(),
        api,
        node.clone(),
        endpoint,
        Duration::from_millis(args.shard_status_interval_ms.max(100)),
    );
    tokio::spawn(sync.clone().run());
    let objects = sandboxes::SandboxSync::new(
        mgr.clone(),
        Api::<Sandbox>::namespaced(client.clone(), &args.sandbox_namespace),
        node.clone(),
        sandboxes::ObjectOptions::default(),
    );
    let tasks = tasks::TaskSync::new(
        objects.clone(),
        Api::<Task>::namespaced(client.clone(), &args.sandbox_namespace),
    );
    tokio::spawn(objects.run());
    if args.mirror_sandboxes {
        let mirror = mirror::Mirror::new(
            mgr.clone(),
            Api::<Sandbox>::namespaced(client.clone(), &args.sandbox_namespace),
            node.clone(),
            advertised(args, local),
            Duration::from_millis(args.shard_status_interval_ms.max(100)),
        );
        tokio::spawn(mirror.run());
    }
    tokio::spawn(tasks.run());
    tokio::spawn(watch_node(mgr, Api::all(client), node));
    Ok(sync)
}

/// The node API's URL for other nodes' clients: `--advertise-url`, else `--node-ip` with the
/// listen port, else the listen address itself when it is a definite one.
pub fn advertised(args: &ClusterArgs, local: SocketAddr) -> Option<String> {
    if let Some(url) = &args.advertise_url {
        return Some(url.trim_end_matches('/').to_string());
    }
    let ip = args
        .node_ip
        .or_else(|| (!local.ip().is_unspecified()).then_some(local.ip()))?;
    Some(format!("http://{}", SocketAddr::new(ip, local.port())))
}

/// Follows this node's `spec.unschedulable`: a cordoned node (`kubectl cordon`, or the first
/// step of `kubectl drain`) stops refilling, turns `/readyz` 503 and refuses new acquires as
/// retryable, while the sandboxes lent out run on; an uncordon brings it back. A `kubectl
/// drain` then evicts the sandbox pods itself (skipping this DaemonSet's pod), and as the
/// node makes nothing new, nothing evicted is replaced.
pub async fn watch_node(mgr: Arc<Manager>, api: Api<Node>, node: String) {
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            () = mgr.shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        let object = match event {
            Ok(Event::Apply(object) | Event::InitApply(object)) => object,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching this node failed; retrying");
                continue;
            }
        };
        let cordoned = object
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if mgr.set_cordoned(cordoned) {
            if cordoned {
                tracing::info!(%node, "node cordoned: no refills, no new leases; leases run on");
            } else {
                tracing::info!(%node, "node uncordoned: refilling and serving again");
            }
        }
    }
}
