//! The OCI runtime spec of a containerd sandbox: namespaces (user, with root mapped to an
//! unprivileged host range), mounts (the agent binary read-only, its socket directory, tmpfs
//! `/workspace` and `/tmp`), limits, capabilities, masked paths and the seccomp profile. A
//! golden file pins it: a change to what a sandbox is shows up as a diff in review.

use std::path::Path;

use serde_json::{Value, json};

use super::remap;
use super::seccomp::seccomp_profile;
use super::{AGENT_PATH, RUN_DIR};
use crate::api::{NetworkMode, PoolSpec};

/// What a sandbox's spec depends on besides its pool's spec.
pub struct Inputs<'a> {
    pub id: &'a str,
    /// Host uid (and gid) of root inside.
    pub host_id: u32,
    /// The `arl` binary, bind-mounted as the agent.
    pub exe: &'a Path,
    /// The sandbox's directory on the host, where the agent makes its socket.
    pub run_dir: &'a Path,
    pub cgroup_parent: &'a str,
}

/// The OCI runtime spec of a sandbox.
pub fn oci_spec(inputs: &Inputs<'_>, spec: &PoolSpec) -> Value {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    // A user namespace: root inside is an unprivileged host uid.
    namespaces.push(json!({"type": "user"}));
    if spec.network == NetworkMode::None {
        namespaces.push(json!({"type": "network"}));
    }
    // sysfs can be mounted only in a network namespace of the user namespace's own.
    let sys = if spec.network == NetworkMode::None {
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]})
    } else {
        json!({"destination": "/sys", "type": "bind", "source": "/sys",
               "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
    };
    let ids = json!([{"containerID": 0, "hostID": inputs.host_id, "size": remap::IDS}]);
    // The pool's env is not baked in: it reaches each exec through the lease (late binding).
    let env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"];
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let size = |mb: u64| format!("size={}m", mb.max(1));
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_PATH, "agent", "--socket", format!("{RUN_DIR}/agent.sock")],
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": spec.read_only_root},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            sys,
            {"destination": AGENT_PATH, "type": "bind", "source": inputs.exe,
             "options": ["rbind", "ro", "nosuid", "nodev"]},
            {"destination": RUN_DIR, "type": "bind", "source": inputs.run_dir,
             "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]},
            {"destination": "/workspace", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", size(spec.disk_mb)]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", size(spec.disk_mb)]},
            // The container's own cgroups, read-only: the agent reads its memory cgroup's
            // OOM-kill count there to tell an OOM kill from other deaths.
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["ro", "nosuid", "noexec", "nodev"]},
        ],
        "linux": {
            "uidMappings": ids,
            "gidMappings": ids,
            "cgroupsPath": format!("/{}/{}", inputs.cgroup_parent, inputs.id),
            "namespaces": namespaces,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": memory_limit_bytes(spec)},
                "pids": {"limit": spec.pids},
                "cpu": {"quota": spec.cpu_millis * 100, "period": 100_000},
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "seccomp": seccomp_profile(),
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

/// A container's memory limit: its processes' `memory_mb` plus the two tmpfs mounts
/// (`/workspace` and `/tmp`, `disk_mb` each), whose pages are charged to the container's memory
/// cgroup: with all added, a full tmpfs is ENOSPC to the writer, never an out-of-memory kill.
fn memory_limit_bytes(spec: &PoolSpec) -> u64 {
    spec.memory_mb
        .saturating_add(spec.disk_mb.saturating_mul(2))
        .saturating_mul(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pools::RuntimeKind;

    fn golden_inputs() -> Inputs<'static> {
        Inputs {
            id: "sb-golden",
            host_id: 1 << 24,
            exe: Path::new("/usr/local/bin/arl"),
            run_dir: Path::new("/run/arl/sandboxes/sb-golden"),
            cgroup_parent: "arl",
        }
    }

    /// Compares with the checked-in golden file; `UPDATE_GOLDEN=1` rewrites it.
    fn check_golden(name: &str, value: &Value) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/runtime/containerd/testdata")
            .join(name);
        let text = serde_json::to_string_pretty(value).expect("json") + "\n";
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).expect("write golden");
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            golden == text,
            "{} is stale; check the change and rerun with UPDATE_GOLDEN=1:\n{text}",
            path.display()
        );
    }

    #[test]
    fn default_pool_spec_matches_its_golden_file() {
        let spec = PoolSpec {
            runtime: RuntimeKind::Containerd,
            image: Some("docker.io/library/python:3.12".into()),
            ..PoolSpec::default()
        };
        check_golden("spec-default.json", &oci_spec(&golden_inputs(), &spec));
    }

    #[test]
    fn host_network_read_only_pool_matches_its_golden_file() {
        let spec = PoolSpec {
            runtime: RuntimeKind::Containerd,
            image: Some("docker.io/library/python:3.12".into()),
            network: NetworkMode::Host,
            read_only_root: true,
            memory_mb: 256,
            disk_mb: 64,
            pids: 32,
            cpu_millis: 500,
            ..PoolSpec::default()
        };
        check_golden("spec-host-network.json", &oci_spec(&golden_inputs(), &spec));
    }
}
