//! The Pod of one sandbox, built from its pool: the pool's template (or `image` shorthand) with
//! the agent injected and the pod hardened.
//!
//! - An init container (the ARL image) copies the static `arl` binary into the emptyDir
//!   `arl-bin`; the first container of the template runs it as `arl agent`, so commands run in
//!   the user's image.
//! - The agent listens on `agent.sock` in the emptyDir `arl-run`, which the daemon reaches
//!   from the host through the kubelet's pod directory: no hostPath, no port. Where that
//!   directory cannot be reached (TCP transport), the agent listens instead on the pod's IP at
//!   the daemon's agent port, with the sandbox's token from a Secret of the pod's own
//!   (`secret`), read as an environment variable that the agent takes out of its environment
//!   before it runs anything; the pod is annotated with the port.
//! - Pod Security `baseline` always (no host namespaces, no privilege, no added capabilities,
//!   seccomp `RuntimeDefault`), `restricted` whenever the template runs as non-root; no
//!   service-account token; resources from the pool unless the template sets its own.
//! - Owner labels (node, daemon instance, sandbox; the pool's from its template) let a restarted daemon
//!   find its pods and delete strays; `arl.infra.io/network: egress` opens the egress
//!   NetworkPolicy for pools that allow it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, Secret, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::PoolSpec;
use crate::api::pools::NetworkMode;
use crate::crd::NODE_LABEL;
use crate::runtime::{AGENT_TOKEN_ENV, AgentToken};

/// Label on every sandbox pod: which program manages it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "arl-node";
/// Label naming the daemon install that owns the pod (two installs on one node ignore each
/// other's pods).
pub const INSTANCE_LABEL: &str = "arl.infra.io/instance";
/// Label carrying the sandbox id.
pub const SANDBOX_LABEL: &str = "arl.infra.io/sandbox";
/// Label that lets a pod's egress through the `allow-egress` NetworkPolicy.
pub const NETWORK_LABEL: &str = "arl.infra.io/network";

/// The emptyDir holding the agent's socket (reached from the host).
pub const RUN_VOLUME: &str = "arl-run";
/// The emptyDir the init container copies the agent binary into.
pub const BIN_VOLUME: &str = "arl-bin";
/// The emptyDir behind `/workspace` (unless the template mounts its own there).
pub const WORKSPACE_VOLUME: &str = "arl-workspace";
/// The init container that copies the agent binary.
pub const INSTALL_CONTAINER: &str = "arl-install-agent";

const BIN_DIR: &str = "/.arl/bin";
const RUN_DIR: &str = "/.arl/run";
/// The agent's socket file inside [`RUN_VOLUME`].
pub const SOCKET_NAME: &str = "agent.sock";
/// The unprivileged user the init container copies the binary as.
const INSTALL_UID: i64 = 65534;
/// Annotation on a pod whose agent listens on TCP: the port (its IP is the pod's).
pub const AGENT_PORT_ANNOTATION: &str = "arl.infra.io/agent-port";
/// The key of the agent's token in the pod's Secret.
pub const TOKEN_KEY: &str = "token";
/// The name of the agent's TCP port on the container.
pub const AGENT_PORT_NAME: &str = "arl-agent";
/// The environment variable the pod's IP is given in (for the agent's listen address).
const POD_IP_ENV: &str = "ARL_POD_IP";

/// What the daemon adds to every pod it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContext {
    /// The node the pod is pinned to (this daemon's).
    pub node_name: String,
    pub namespace: String,
    /// The daemon install's name ([`INSTANCE_LABEL`]).
    pub instance: String,
    /// The ARL image (holds the static `arl` binary at `/arl`).
    pub agent_image: String,
    /// The port the agent listens on at the pod's IP, when the daemon reaches agents over TCP;
    /// `None`: through the kubelet's pod directory.
    pub agent_tcp_port: Option<u16>,
}

impl PodContext {
    /// The labels that select this daemon's pods.
    pub fn owner_selector(&self) -> String {
        format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{INSTANCE_LABEL}={},{NODE_LABEL}={}",
            self.instance, self.node_name
        )
    }
}

/// The pod name of a sandbox.
pub fn pod_name(id: &str) -> String {
    format!("arl-{id}")
}

/// The sandbox id of a pod name, if it is one of ours.
pub fn sandbox_id(pod_name: &str) -> Option<&str> {
    pod_name.strip_prefix("arl-")
}

/// Builds the pod of sandbox `id` of a pool; the message says what is wrong with the pool.
pub fn build(id: &str, spec: &PoolSpec, ctx: &PodContext) -> Result<Pod, String> {
    let template = template_of(spec)?;
    let mut meta = template.metadata.unwrap_or_default();
    let mut pod_spec = template
        .spec
        .ok_or("the pod template has no `spec`".to_string())?;
    if pod_spec.containers.is_empty() {
        return Err("the pod template has no containers".into());
    }
    let mut labels = meta.labels.take().unwrap_or_default();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(INSTANCE_LABEL.into(), ctx.instance.clone());
    labels.insert(NODE_LABEL.into(), ctx.node_name.clone());
    labels.insert(SANDBOX_LABEL.into(), id.to_string());
    if spec.network == NetworkMode::Host {
        labels.insert(NETWORK_LABEL.into(), "egress".into());
    } else {
        labels.remove(NETWORK_LABEL);
    }
    let mut annotations = meta.annotations.take();
    if let Some(port) = ctx.agent_tcp_port {
        check_port_free(&pod_spec, port)?;
        annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(AGENT_PORT_ANNOTATION.into(), port.to_string());
    }
    let metadata = ObjectMeta {
        name: Some(pod_name(id)),
        namespace: Some(ctx.namespace.clone()),
        labels: Some(labels),
        annotations,
        ..ObjectMeta::default()
    };

    let non_root = runs_as_non_root(&pod_spec);
    harden_pod(&mut pod_spec, ctx);
    let workspace_mounted = pod_spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path.trim_end_matches('/') == "/workspace");
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(empty_dir(BIN_VOLUME, None));
    if ctx.agent_tcp_port.is_none() {
        volumes.push(empty_dir(RUN_VOLUME, None));
    }
    if !workspace_mounted {
        volumes.push(empty_dir(WORKSPACE_VOLUME, Some(spec.disk_mb)));
    }
    let mut init = vec![install_container(ctx)];
    init.extend(pod_spec.init_containers.take().unwrap_or_default());
    pod_spec.init_containers = Some(init);
    for container in pod_spec.init_containers.iter_mut().flatten().skip(1) {
        harden_container(container, non_root);
    }
    for (n, container) in pod_spec.containers.iter_mut().enumerate() {
        harden_container(container, non_root);
        if n == 0 {
            inject_agent(container, spec, !workspace_mounted);
            if let Some(port) = ctx.agent_tcp_port {
                listen_on_tcp(container, id, port);
            }
        }
    }
    Ok(Pod {
        metadata,
        spec: Some(pod_spec),
        status: None,
    })
}

/// Refuses a template whose containers declare the agent's port (it would take it first).
fn check_port_free(spec: &PodSpec, port: u16) -> Result<(), String> {
    let taken = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten().map(move |p| (c, p)))
        .find(|(_, p)| p.container_port == i32::from(port));
    match taken {
        Some((c, _)) => Err(format!(
            "container {:?} declares port {port}, which the agent listens on in this cluster \
             (the node's --agent-port); use another port",
            c.name
        )),
        None => Ok(()),
    }
}

/// The agent listens on the pod's IP (and not on a socket in `arl-run`), with the token of
/// the pod's Secret in its environment.
fn listen_on_tcp(container: &mut Container, id: &str, port: u16) {
    container.command = Some(vec![
        format!("{BIN_DIR}/arl"),
        "agent".into(),
        "--listen-tcp".into(),
        format!("$({POD_IP_ENV}):{port}"),
    ]);
    if let Some(mounts) = container.volume_mounts.as_mut() {
        mounts.retain(|m| m.name != RUN_VOLUME);
    }
    let env = container.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != POD_IP_ENV && e.name != AGENT_TOKEN_ENV);
    env.push(EnvVar {
        name: POD_IP_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: "status.podIP".into(),
            }),
            ..EnvVarSource::default()
        }),
    });
    env.push(EnvVar {
        name: AGENT_TOKEN_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: pod_name(id),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    });
    container
        .ports
        .get_or_insert_with(Vec::new)
        .push(ContainerPort {
            name: Some(AGENT_PORT_NAME.into()),
            container_port: i32::from(port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
}

/// The Secret holding a TCP-reached sandbox's token: named like its pod, with its owner labels,
/// immutable. The runtime makes the pod its owner once the pod exists, so it goes with it.
pub fn secret(id: &str, ctx: &PodContext, token: &AgentToken) -> Secret {
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (INSTANCE_LABEL.to_string(), ctx.instance.clone()),
        (NODE_LABEL.to_string(), ctx.node_name.clone()),
        (SANDBOX_LABEL.to_string(), id.to_string()),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(pod_name(id)),
            namespace: Some(ctx.namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.expose().as_bytes().to_vec()),
        )])),
        immutable: Some(true),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The pool's template, or the one-container template of its `image`.
fn template_of(spec: &PoolSpec) -> Result<PodTemplateSpec, String> {
    match (&spec.template, &spec.image) {
        (Some(_), Some(_)) => Err("give either `template` or `image`, not both".into()),
        (None, None) => Err("a `kubernetes` pool needs an `image` or a `template`".into()),
        (Some(value), None) => serde_json::from_value(value.clone())
            .map_err(|e| format!("`template` is not a pod template: {e}")),
        (None, Some(image)) => Ok(PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "sandbox".into(),
                    image: Some(image.clone()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        }),
    }
}

/// Whether the template promises a non-root user (then the pod can meet `restricted`).
fn runs_as_non_root(spec: &PodSpec) -> bool {
    let pod = spec.security_context.as_ref();
    let pod_says = pod.and_then(|s| s.run_as_non_root) == Some(true)
        || pod.and_then(|s| s.run_as_user).is_some_and(|u| u > 0);
    spec.containers.iter().all(|c| {
        let c = c.security_context.as_ref();
        match (
            c.and_then(|s| s.run_as_non_root),
            c.and_then(|s| s.run_as_user),
        ) {
            (_, Some(uid)) => uid > 0,
            (Some(non_root), None) => non_root,
            (None, None) => pod_says,
        }
    })
}

/// Pod-level settings: pinned to this node, no host namespaces, no token, seccomp.
fn harden_pod(spec: &mut PodSpec, ctx: &PodContext) {
    spec.node_name = Some(ctx.node_name.clone());
    spec.restart_policy = Some("Never".into());
    spec.automount_service_account_token = Some(false);
    spec.enable_service_links = Some(false);
    spec.host_network = None;
    spec.host_pid = None;
    spec.host_ipc = None;
    spec.share_process_namespace = None;
    // The agent ends its commands' process groups on SIGTERM; a sandbox has nothing to flush.
    spec.termination_grace_period_seconds = Some(2);
    let security = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    security.seccomp_profile = Some(runtime_default());
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// Container-level settings every container gets: no privilege, no escalation, no
/// capabilities; non-root when the template promised it.
fn harden_container(container: &mut Container, non_root: bool) {
    let security = container
        .security_context
        .get_or_insert_with(SecurityContext::default);
    security.privileged = Some(false);
    security.allow_privilege_escalation = Some(false);
    security.capabilities = Some(Capabilities {
        add: None,
        drop: Some(vec!["ALL".into()]),
    });
    security.proc_mount = None;
    if non_root {
        security.run_as_non_root = Some(true);
    }
    if security
        .seccomp_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        security.seccomp_profile = Some(runtime_default());
    }
}

/// The first container runs the agent (its own command is replaced) with its volumes and the
/// pool's resources (unless the template set some).
fn inject_agent(container: &mut Container, spec: &PoolSpec, mount_workspace: bool) {
    container.command = Some(vec![
        format!("{BIN_DIR}/arl"),
        "agent".into(),
        "--socket".into(),
        format!("{RUN_DIR}/{SOCKET_NAME}"),
    ]);
    container.args = None;
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    mounts.push(mount(BIN_VOLUME, BIN_DIR, true));
    mounts.push(mount(RUN_VOLUME, RUN_DIR, false));
    if mount_workspace {
        mounts.push(mount(WORKSPACE_VOLUME, "/workspace", false));
    }
    let unset = container
        .resources
        .as_ref()
        .is_none_or(|r| r.limits.is_none() && r.requests.is_none());
    if unset {
        let amounts = BTreeMap::from([
            ("cpu".to_string(), Quantity(format!("{}m", spec.cpu_millis))),
            (
                "memory".to_string(),
                Quantity(format!("{}Mi", spec.memory_mb)),
            ),
        ]);
        container.resources = Some(ResourceRequirements {
            limits: Some(amounts.clone()),
            requests: Some(amounts),
            ..ResourceRequirements::default()
        });
    }
}

/// Copies the static `arl` binary of the ARL image into the shared emptyDir, as an
/// unprivileged user (an emptyDir is world-writable).
fn install_container(ctx: &PodContext) -> Container {
    let small = BTreeMap::from([
        ("cpu".to_string(), Quantity("100m".into())),
        ("memory".to_string(), Quantity("64Mi".into())),
    ]);
    Container {
        name: INSTALL_CONTAINER.into(),
        image: Some(ctx.agent_image.clone()),
        command: Some(vec![
            "/arl".into(),
            "install-agent".into(),
            format!("{BIN_DIR}/arl"),
        ]),
        volume_mounts: Some(vec![mount(BIN_VOLUME, BIN_DIR, false)]),
        resources: Some(ResourceRequirements {
            limits: Some(small.clone()),
            requests: Some(small),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            run_as_non_root: Some(true),
            run_as_user: Some(INSTALL_UID),
            run_as_group: Some(INSTALL_UID),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn empty_dir(name: &str, size_mb: Option<u64>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: size_mb.map(|mb| Quantity(format!("{mb}Mi"))),
        }),
        ..Volume::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// Checks what a `kubernetes` pool must have: exactly one of `image` and `template`, a
/// template that parses and has a container, no `rootfs`, no container port that is the
/// agent's (`agent_tcp_port`).
pub fn validate(spec: &PoolSpec, agent_tcp_port: Option<u16>) -> Result<(), String> {
    if spec.rootfs.is_some() {
        return Err(
            "`rootfs` is for `process` pools; a `kubernetes` pool uses `image` or `template`"
                .into(),
        );
    }
    if spec.read_only_root {
        return Err("`read_only_root` is for `containerd` pools; set `readOnlyRootFilesystem` in a `kubernetes` pool's template".into());
    }
    let ctx = PodContext {
        node_name: "validate".into(),
        namespace: "validate".into(),
        instance: "validate".into(),
        agent_image: "validate".into(),
        agent_tcp_port,
    };
    build("sb-validate", spec, &ctx).map(|_| ())
}
