//! Daemon settings: command-line flags (each also an environment variable) over an optional
//! config file (TOML, or JSON by extension) over defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::NodeError;
use crate::api::PoolSpec;
use crate::runtime::containerd::RegistryOptions;

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Address of the HTTP API [default: 127.0.0.1:8420]
    #[arg(long, global = true, env = "ARL_LISTEN")]
    pub listen: Option<String>,
    /// Config file (TOML, or JSON when it ends in .json) with settings and pools.
    #[arg(long, global = true, env = "ARL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where sandboxes' sockets and bookkeeping live [default: /run/arl]
    #[arg(long, global = true, env = "ARL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// File of bearer tokens, one per line; re-read when it changes. Without it the API is open.
    #[arg(long, global = true, env = "ARL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Sandboxes created at once at most [default: 16]
    #[arg(long, global = true, env = "ARL_CREATE_CONCURRENCY")]
    pub create_concurrency: Option<usize>,
    /// Name of ARL's cgroup in each hierarchy [default: arl]
    #[arg(long, global = true, env = "ARL_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// First host uid mapped into sandboxes (each gets 65536 ids) [default: 16777216]
    #[arg(long, global = true, env = "ARL_UID_BASE")]
    pub uid_base: Option<u32>,
    /// containerd's socket, for `containerd` pools [default: /run/containerd/containerd.sock]
    #[arg(long, global = true, env = "ARL_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// A registry (`host[:port]`) that `containerd` pools pull from over plain HTTP; repeatable
    #[arg(
        long = "insecure-registry",
        global = true,
        env = "ARL_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials for pulls, as a Docker-style config.json (its `auths`)
    #[arg(long, global = true, env = "ARL_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// Client connections open at once at most; more are answered 503 `overloaded` [default: 8192]
    #[arg(long, global = true, env = "ARL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Snapshots kept on this node at most [default: 64]
    #[arg(long, global = true, env = "ARL_MAX_SNAPSHOTS")]
    pub max_snapshots: Option<usize>,
    /// MiB of file data all snapshots on this node may hold [default: 8192]
    #[arg(long, global = true, env = "ARL_SNAPSHOT_MB")]
    pub snapshot_mb: Option<u64>,
    /// Where snapshots are kept: `disk` (the state directory) or `memory` (a tmpfs of the
    /// node's, sized by --snapshot-mb) [default: disk]
    #[arg(long, global = true, env = "ARL_SNAPSHOT_STORE", value_enum)]
    pub snapshot_store: Option<super::snapshots::Store>,
    /// Serve without a token file on a non-loopback address (anyone who reaches it can run code)
    #[arg(long, global = true, env = "ARL_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Address of the E2B-compatible endpoint (control plane and envd on one port) [default: off]
    #[arg(long, env = "ARL_E2B_LISTEN")]
    pub e2b_listen: Option<String>,
    /// The pool E2B's default template `base` names [default: default]
    #[arg(long, env = "ARL_E2B_DEFAULT_POOL")]
    pub e2b_default_pool: Option<String>,
    /// The domain the E2B endpoint tells clients [default: the host they reached it on]
    #[arg(long, env = "ARL_E2B_DOMAIN")]
    pub e2b_domain: Option<String>,
    /// Threads serving the HTTP API, each with its own event loop [default: the node's cores]
    #[arg(long, global = true, env = "ARL_FRONT_THREADS")]
    pub front_threads: Option<usize>,
    /// On SIGTERM, leave every sandbox running for the next daemon on this state directory
    /// (a restart or an upgrade) instead of destroying them all; always so with --kubernetes
    #[arg(long, global = true, env = "ARL_HANDOVER")]
    pub handover: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub command: Option<NodeCommand>,
}

/// Cluster mode: sandbox pods on this node, quotas from this node's WarmPoolShards.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Run in a Kubernetes cluster: `kubernetes` pools make pods on this node, and this node's
    /// WarmPoolShards set the pools (the API server from the in-cluster config or KUBECONFIG)
    #[arg(long, global = true, env = "ARL_KUBERNETES")]
    pub kubernetes: bool,
    /// A kubeconfig file for the API server [default: the in-cluster config, else KUBECONFIG]
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (the DaemonSet sets it from the downward API)
    #[arg(long, global = true, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the kubelet keeps pod volumes, as mounted into the daemon
    #[arg(
        long,
        global = true,
        env = "ARL_KUBELET_PODS_DIR",
        default_value = "/var/lib/kubelet/pods"
    )]
    pub kubelet_pods_dir: PathBuf,
    /// How the daemon reaches sandbox pods' agents: `unix` (a socket in the pod's emptyDir,
    /// through --kubelet-pods-dir), `tcp` (the pod's IP at --agent-port, with a token per
    /// sandbox in a Secret the pod owns) or `auto` (`unix` when --kubelet-pods-dir is there)
    #[arg(
        long,
        global = true,
        env = "ARL_AGENT_TRANSPORT",
        value_enum,
        default_value = "auto"
    )]
    pub agent_transport: crate::runtime::kubernetes::AgentTransport,
    /// The port sandbox pods' agents listen on at the pod's IP, over the `tcp` transport
    /// (pools whose containers declare it are refused)
    #[arg(long, global = true, env = "ARL_AGENT_PORT", default_value_t = 7390)]
    pub agent_port: u16,
    /// The namespace of sandbox pods and of the WarmPoolShards this node serves
    #[arg(
        long,
        global = true,
        env = "ARL_SANDBOX_NAMESPACE",
        default_value = "arl-sandboxes"
    )]
    pub sandbox_namespace: String,
    /// The ARL image sandbox pods copy the agent from (the DaemonSet's own image)
    #[arg(
        long,
        global = true,
        env = "ARL_AGENT_IMAGE",
        default_value = "arl:latest"
    )]
    pub agent_image: String,
    /// This install's name on sandbox pods' labels (installs on one node ignore each other's)
    #[arg(long, global = true, env = "ARL_INSTANCE", default_value = "arl")]
    pub instance: String,
    /// This node's IP for other nodes' clients (the DaemonSet sets it from the downward
    /// API's `status.hostIP`); with the listen port, the URL written into the shards' status
    #[arg(long, global = true, env = "NODE_IP")]
    pub node_ip: Option<std::net::IpAddr>,
    /// The node API's URL for other nodes' clients, when `--node-ip` and the listen port do
    /// not make it (a proxy, a name)
    #[arg(long, global = true, env = "ARL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Also show sandboxes leased through the node API as Sandbox objects (written in the
    /// background on the status interval, never by the request itself)
    #[arg(long, global = true, env = "ARL_MIRROR_SANDBOXES")]
    pub mirror_sandboxes: bool,
    /// How often, at most, each shard's status is written (milliseconds)
    #[arg(
        long,
        global = true,
        env = "ARL_SHARD_STATUS_INTERVAL_MS",
        default_value_t = 3000
    )]
    pub shard_status_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum NodeCommand {
    /// Destroy every sandbox that a daemon on this state directory left running (after a
    /// hand-over whose successor never came), then exit. Refused while a daemon runs there.
    Cleanup,
}

/// Settings of the E2B-compatible endpoint.
#[derive(Debug, Clone, Default)]
pub struct E2bSettings {
    pub listen: Option<String>,
    pub default_pool: String,
    pub domain: Option<String>,
}

impl E2bSettings {
    pub fn front_config(&self) -> crate::e2b::E2bConfig {
        crate::e2b::E2bConfig {
            default_pool: self.default_pool.clone(),
            domain: self.domain.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    token_file: Option<PathBuf>,
    create_concurrency: Option<usize>,
    cgroup_parent: Option<String>,
    uid_base: Option<u32>,
    containerd_socket: Option<PathBuf>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    registry_auth_file: Option<PathBuf>,
    max_connections: Option<usize>,
    max_snapshots: Option<usize>,
    snapshot_mb: Option<u64>,
    snapshot_store: Option<super::snapshots::Store>,
    #[serde(default)]
    allow_unauthenticated: bool,
    e2b_listen: Option<String>,
    e2b_default_pool: Option<String>,
    e2b_domain: Option<String>,
    front_threads: Option<usize>,
    handover: Option<bool>,
    #[serde(default)]
    pools: BTreeMap<String, PoolSpec>,
}

/// The settings the daemon runs with.
#[derive(Debug)]
pub struct Settings {
    pub listen: String,
    pub state_dir: PathBuf,
    pub token_file: Option<PathBuf>,
    pub create_concurrency: usize,
    pub cgroup_parent: String,
    pub uid_base: u32,
    pub containerd_socket: PathBuf,
    pub registry: RegistryOptions,
    pub max_connections: usize,
    pub snapshots: super::snapshots::Limits,
    pub allow_unauthenticated: bool,
    pub e2b: E2bSettings,
    pub front_threads: usize,
    pub pools: BTreeMap<String, PoolSpec>,
    /// Whether SIGTERM hands the sandboxes over to the next daemon (else destroys them).
    pub handover: bool,
    /// Cluster mode, when on.
    pub cluster: Option<ClusterArgs>,
}

fn read_file(path: &Path) -> Result<FileConfig, NodeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NodeError::Config(format!("reading {}: {e}", path.display())))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
    } else {
        toml::from_str(&text).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
    }
}

impl NodeArgs {
    pub fn resolve(self) -> Result<Settings, NodeError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut pools = file.pools;
        // In a cluster the node's shards name its pools; alone, it starts with one.
        if pools.is_empty() && !self.cluster.kubernetes {
            pools.insert("default".to_string(), PoolSpec::default());
        }
        for (name, spec) in &pools {
            crate::api::pools::validate_pool_name(name).map_err(NodeError::Config)?;
            spec.validate()
                .map_err(|e| NodeError::Config(format!("pool {name}: {e}")))?;
        }
        let cgroup_parent = self
            .cgroup_parent
            .or(file.cgroup_parent)
            .unwrap_or_else(|| "arl".into());
        if cgroup_parent.is_empty() || cgroup_parent.contains("..") {
            return Err(NodeError::Config(
                "cgroup parent must be a plain name".into(),
            ));
        }
        let mut registry = RegistryOptions {
            insecure: self.insecure_registries,
            ..Default::default()
        };
        registry.insecure.extend(file.insecure_registries);
        if let Some(path) = self.registry_auth_file.or(file.registry_auth_file) {
            registry.auths = RegistryOptions::read_auth_file(&path).map_err(NodeError::Config)?;
        }
        Ok(Settings {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| format!("127.0.0.1:{}", crate::api::DEFAULT_PORT)),
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(super::default_state_dir),
            token_file: self.token_file.or(file.token_file),
            create_concurrency: self
                .create_concurrency
                .or(file.create_concurrency)
                .unwrap_or(16)
                .max(1),
            cgroup_parent,
            uid_base: self.uid_base.or(file.uid_base).unwrap_or(1 << 24),
            containerd_socket: self
                .containerd_socket
                .or(file.containerd_socket)
                .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock")),
            registry,
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(8192)
                .max(1),
            snapshots: super::snapshots::Limits {
                count: self.max_snapshots.or(file.max_snapshots).unwrap_or(64),
                bytes: self
                    .snapshot_mb
                    .or(file.snapshot_mb)
                    .unwrap_or(8192)
                    .saturating_mul(1 << 20),
                store: self
                    .snapshot_store
                    .or(file.snapshot_store)
                    .unwrap_or(super::snapshots::Store::Disk),
            },
            allow_unauthenticated: self.allow_unauthenticated || file.allow_unauthenticated,
            e2b: E2bSettings {
                listen: self.e2b_listen.or(file.e2b_listen),
                default_pool: self
                    .e2b_default_pool
                    .or(file.e2b_default_pool)
                    .unwrap_or_else(|| "default".into()),
                domain: self.e2b_domain.or(file.e2b_domain),
            },
            front_threads: self
                .front_threads
                .or(file.front_threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .clamp(1, 256),
            pools,
            // In a cluster a SIGTERM is a rolling upgrade: the successor takes the pods over.
            handover: self.handover || file.handover.unwrap_or(false) || self.cluster.kubernetes,
            cluster: match self.cluster.kubernetes {
                true => {
                    if self.cluster.node_name.as_deref().is_none_or(str::is_empty) {
                        return Err(NodeError::Config(
                            "--kubernetes needs the node's name (--node-name or NODE_NAME)".into(),
                        ));
                    }
                    Some(self.cluster)
                }
                false => None,
            },
        })
    }
}
