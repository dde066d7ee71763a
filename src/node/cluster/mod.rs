//! Cluster mode (`arl node --kubernetes`): the node's `kubernetes` runtime and, from this
//! node's WarmPoolShards, its pools (`shards.rs`).

pub mod shards;

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use thiserror::Error;

use super::manager::Manager;
use crate::crd::WarmPoolShard;

use super::config::ClusterArgs;
use crate::runtime::kubernetes::pod::PodContext;
use crate::runtime::kubernetes::{KubernetesConfig, KubernetesRuntime};

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
    KubernetesConfig {
        pod: PodContext {
            node_name: args.node_name.clone().unwrap_or_default(),
            namespace: args.sandbox_namespace.clone(),
            instance: args.instance.clone(),
            agent_image: args.agent_image.clone(),
        },
        pods_dir: args.kubelet_pods_dir.clone(),
    }
}

/// Starts serving this node's shards: their pools, and their status written back.
pub async fn start(
    mgr: Arc<Manager>,
    args: &ClusterArgs,
) -> Result<Arc<shards::ShardSync>, ClusterError> {
    let client = client(args).await?;
    let api: Api<WarmPoolShard> = Api::namespaced(client, &args.sandbox_namespace);
    let sync = shards::ShardSync::new(
        mgr,
        api,
        args.node_name.clone().unwrap_or_default(),
        Duration::from_millis(args.shard_status_interval_ms.max(100)),
    );
    tokio::spawn(sync.clone().run());
    Ok(sync)
}
