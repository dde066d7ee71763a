//! Cluster mode (`arl node --kubernetes`): the node's `kubernetes` runtime and, from this
//! node's WarmPoolShards, its pools.

use thiserror::Error;

use super::config::ClusterArgs;
use crate::runtime::kubernetes::pod::PodContext;
use crate::runtime::kubernetes::{KubernetesConfig, KubernetesRuntime};

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("no Kubernetes API configuration (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
}

/// The node's `kubernetes` runtime, on the API server of the in-cluster config or KUBECONFIG.
pub async fn kubernetes_runtime(args: &ClusterArgs) -> Result<KubernetesRuntime, ClusterError> {
    let client = kube::Client::try_default()
        .await
        .map_err(ClusterError::Client)?;
    Ok(KubernetesRuntime::new(client, runtime_config(args)))
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
