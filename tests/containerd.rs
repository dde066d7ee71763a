//! The `containerd` runtime against a real containerd (scripts/containerd.sh starts one and
//! imports the test image): sandboxes work like process ones, release and daemon crashes leave
//! no container, task, snapshot or lease, a killed task is replaced. Pulls: `image_pull.rs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use arl::api::pools::RuntimeKind;
use arl::api::{AcquireRequest, ErrorCode, PoolSpec, PoolView, SandboxInfo};
use common::{Daemon, Options, cmd, ctr};
use hyper::{Method, StatusCode};
use serde_json::json;

const IMAGE: &str = "docker.io/arl/test:latest";

fn pool(name: &str, image: &str, min_idle: usize) -> String {
    format!(
        "[pools.{name}]\nruntime = \"containerd\"\nimage = \"{image}\"\nmin_idle = {min_idle}\nmax = 8\nmemory_mb = 128\n"
    )
}

/// What containerd still holds of these sandboxes: containers, tasks, snapshots, leases, mounts.
fn remains_of(ids: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let wanted = |name: &str| {
        ids.iter()
            .any(|id| name == id || name == format!("arl-{id}"))
    };
    for (what, args) in [
        ("container", &["containers", "ls", "-q"][..]),
        ("task", &["tasks", "ls", "-q"][..]),
        ("snapshot", &["snapshots", "ls"][..]),
        ("lease", &["leases", "ls", "-q"][..]),
    ] {
        for line in ctr(args).lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            if wanted(first) {
                found.push(format!("{what} {first}"));
            }
        }
    }
    // A task's rootfs is mounted under containerd's bundle directory named after the id.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    found.extend(
        mounts
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
            .map(|l| format!("mount {l}")),
    );
    found
}

fn remains(id: &str) -> Vec<String> {
    remains_of(&[id.to_string()])
}

async fn wait_gone(id: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = remains(id);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(config: String) -> Daemon {
    Daemon::start(Options {
        config: Some(config),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_has_its_image_loopback_and_the_seccomp_filter() {
    // (Exec, files, timeouts, reset, pause and deaths run on containerd pools too: the
    // runtime-blind suites in exec.rs, isolation.rs and lifecycle.rs.)
    let d = start(pool("c", IMAGE, 1)).await;
    d.wait_status("c", 30, |s| s.idle == 1).await;
    let id = d.acquire("c").await;
    // The container's own view: busybox root, loopback only, the pool's memory limit.
    let r = d
        .shell(&id, "ls /bin/busybox; cat /proc/net/dev | grep -c :")
        .await;
    assert_eq!(r.stdout, "/bin/busybox\n1\n", "{r:?}");
    // A user namespace: root inside is the unprivileged host uid range below the process
    // runtime's (uid base 16777216 - 65536), and the image's files are root's inside.
    let r = d
        .shell(
            &id,
            "cat /proc/self/uid_map; stat -c %u /bin/busybox; touch /etc/x && echo wrote",
        )
        .await;
    let out: Vec<&str> = r.stdout.split_whitespace().collect();
    assert_eq!(out, ["0", "16711680", "65536", "0", "wrote"], "{r:?}");
    let pid = common::task_pid(&ctr(&["tasks", "ls"]), &id).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(uid, Some("16711680"), "the agent's host uid: {status}");
    // The seccomp filter: no new namespaces, no mounts; no_new_privs is set.
    let r = d
        .shell(
            &id,
            "unshare -U true; echo unshare=$?; mount -t tmpfs x /mnt; echo mount=$?; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status",
        )
        .await;
    let out = &r.stdout;
    assert!(
        out.contains("unshare=1") && out.contains("mount=1") && !out.contains("mount=0"),
        "{r:?}"
    );
    assert!(
        out.contains("Seccomp:\t2") && out.contains("NoNewPrivs:\t1"),
        "{r:?}"
    );

    let status = d.release(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(&id, 15).await;
    assert!(
        !d.state_dir().join("containerd").join(&id).exists(),
        "socket directory removed"
    );
    for hierarchy in common::cgroup_roots() {
        let cg = hierarchy.join(&d.cgroup_parent).join(&id);
        assert!(!cg.exists(), "cgroup left: {}", cg.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_destroy_cycles_leave_nothing() {
    // 200 sandboxes, four at a time.
    let mut d = start(pool("c", IMAGE, 4)).await;
    let mut ids: Vec<String> = Vec::new();
    for _ in 0..50 {
        d.wait_status("c", 30, |s| s.idle == 4).await;
        let sandboxes = d
            .acquire_with(&AcquireRequest {
                count: Some(4),
                ..common::acquire("c")
            })
            .await;
        assert_eq!(sandboxes.len(), 4, "{sandboxes:?}");
        for sb in sandboxes {
            let id = sb.id;
            let r = d.run(&id, &cmd(&["true"])).await;
            assert_eq!(r.exit_code, 0, "{r:?}");
            let status = d.release(&id).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            ids.push(id);
        }
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(d.terminate(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = remains_of(&ids);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    assert!(
        std::fs::read_dir(d.state_dir().join("containerd"))
            .map(|r| r.count())
            .unwrap_or(0)
            == 0,
        "socket directories left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containerd_pool_needs_an_image() {
    let d = start(pool("c", IMAGE, 0)).await;
    let put_bad = |spec: PoolSpec| {
        let d = &d;
        async move {
            d.send(Method::PUT, "/v1/pools/bad", Some(&spec))
                .await
                .expect_error(StatusCode::BAD_REQUEST)
        }
    };
    let err = put_bad(PoolSpec {
        runtime: RuntimeKind::Containerd,
        min_idle: 0,
        ..PoolSpec::default()
    })
    .await;
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("needs an `image`"), "{err:?}");
    let err = put_bad(PoolSpec {
        image: Some(IMAGE.into()),
        min_idle: 0,
        ..PoolSpec::default()
    })
    .await;
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("containerd"), "{err:?}");
    // An existing config without the new fields keeps working: a process pool. (Raw JSON: the
    // point is a body that omits `runtime` and `image`, which a serialized `PoolSpec` names.)
    let reply = d
        .send(
            Method::PUT,
            "/v1/pools/plain",
            Some(&json!({"min_idle": 0})),
        )
        .await;
    assert!(reply.status.is_success(), "{reply}");
    let view: PoolView = d.get("/v1/pools/plain").await;
    assert_eq!(view.spec.runtime, RuntimeKind::Process);
    assert_eq!(view.spec.image, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_task_gets_the_sandbox_replaced() {
    let d = start(pool("c", IMAGE, 1)).await;
    d.wait_status("c", 30, |s| s.idle == 1).await;
    let id = d.acquire("c").await;
    d.wait_status("c", 30, |s| s.idle == 1).await;
    ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
    wait_gone(&id, 15).await;
    let err = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&cmd(&["true"])),
        )
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.code, ErrorCode::SandboxUnavailable);
    assert!(err.message.contains("died"), "{err:?}");
    let s = d.wait_status("c", 30, |s| s.idle == 1).await;
    assert_eq!(s.allocated, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_takes_back_the_containers_of_a_killed_one() {
    let mut d = start(pool("c", IMAGE, 2)).await;
    d.wait_status("c", 30, |s| s.idle == 2).await;
    let held = d.acquire("c").await;
    d.wait_status("c", 30, |s| s.idle == 2).await;
    let ids = |d: &Daemon| -> Vec<String> {
        std::fs::read_dir(d.state_dir().join("containerd"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let old = ids(&d);
    assert_eq!(old.len(), 3, "{old:?}");
    assert!(old.contains(&held));
    for id in &old {
        let held = remains(id);
        for what in ["container", "task", "snapshot", "lease", "mount"] {
            assert!(
                held.iter().any(|h| h.starts_with(what)),
                "{id}: no {what} in {held:?}"
            );
        }
    }
    d.kill9();
    d.spawn().await;
    // Taken back, not rebuilt: the held one is still leased, the idle ones are the pool again.
    let info: SandboxInfo = d.get(&format!("/v1/sandboxes/{held}")).await;
    assert_eq!(info.id, held);
    assert_eq!(d.shell(&held, "echo back").await.stdout, "back\n");
    let s = d.wait_status("c", 30, |s| s.idle == 2).await;
    assert_eq!(s.allocated, 1, "{s:?}");
    let mut now = ids(&d);
    now.sort();
    let mut before = old.clone();
    before.sort();
    assert_eq!(now, before, "the same containers, none rebuilt");
    // A graceful stop leaves nothing.
    assert_eq!(d.terminate(), Some(0));
    for id in &old {
        assert!(remains(id).is_empty(), "{id}: {:?}", remains(id));
    }
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_a_container() {
    let d = start(pool("c", IMAGE, 1)).await;
    d.wait_status("c", 30, |s| s.idle == 1).await;
    let id = d.acquire("c").await;
    let info: SandboxInfo = d.action(&id, "pause").await.expect(StatusCode::OK);
    assert_eq!(info.id, id);
    let tasks = ctr(&["tasks", "ls"]);
    let line = tasks
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default();
    assert!(line.contains("PAUSED"), "{tasks}");
    let info: SandboxInfo = d.action(&id, "resume").await.expect(StatusCode::OK);
    assert_eq!(info.id, id);
    let r = d.run(&id, &cmd(&["echo", "back"])).await;
    assert_eq!(r.stdout, "back\n");
    // A paused sandbox can still be released, and leaves nothing.
    d.action(&id, "pause").await;
    let status = d.release(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(&id, 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_containerd_only_containerd_pools_fail() {
    let config = format!(
        "containerd_socket = \"/nonexistent/containerd.sock\"\n{}\n[pools.p]\nmin_idle = 1\n",
        pool("c", IMAGE, 1)
    );
    let d = start(config).await;
    let s = d.wait_status("c", 20, |s| s.last_error.is_some()).await;
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("containerd") && err.contains("/nonexistent/containerd.sock"),
        "{err}"
    );
    let reply = d
        .send(Method::POST, "/v1/sandboxes", Some(&common::acquire("c")))
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    d.wait_status("p", 20, |s| s.idle == 1).await;
    let id = d.acquire("p").await;
    let r = d.run(&id, &cmd(&["echo", "ok"])).await;
    assert_eq!(r.stdout, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_root_keeps_workspace_and_tmp_writable() {
    let d = start(pool("ro", IMAGE, 1) + "read_only_root = true\n").await;
    d.wait_status("ro", 30, |s| s.idle == 1).await;
    let id = d.acquire("ro").await;
    let r = d
        .shell(
            &id,
            "touch /etc/x 2>&1 || echo refused; touch /workspace/a /tmp/b && echo writable",
        )
        .await;
    let out = &r.stdout;
    assert!(
        out.contains("Read-only file system") && out.contains("refused"),
        "{r:?}"
    );
    assert!(out.ends_with("writable\n"), "{r:?}");
    // Only containerd pools have this option.
    let spec = PoolSpec {
        read_only_root: true,
        ..PoolSpec::default()
    };
    let err = d
        .send(Method::PUT, "/v1/pools/p", Some(&spec))
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
}

/// A containerd of this test's own (own root, state and socket), for what must not disturb the
/// shared one: killing and restarting it. Stopped and wiped on drop.
struct PrivateContainerd {
    dir: common::tempdir::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateContainerd {
    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "arl"])
            .args(args)
            .output()
            .expect("run ctr")
    }

    async fn start() -> Self {
        let dir = common::tempdir::TempDir::new("containerd");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
            ),
        )
        .expect("containerd config");
        let mut c = Self { dir, child: None };
        c.spawn().await;
        let work = std::env::var("ARL_CONTAINERD_WORK")
            .unwrap_or_else(|_| "/var/tmp/arl-containerd".into());
        let out = c.ctr(&["image", "import", &format!("{work}/test-image.tar")]);
        assert!(
            out.status.success(),
            "import (scripts/containerd.sh builds the archive): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("containerd.log")).ok();
        self.child = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(self.dir.path().join("config.toml"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log.map_or(std::process::Stdio::null(), Into::into))
                .spawn()
                .expect("start containerd"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pid of the sandbox's task (its agent), from `ctr tasks ls`.
    fn task_pid(&self, id: &str) -> Option<i32> {
        let out = self.ctr(&["tasks", "ls"]);
        common::task_pid(&String::from_utf8_lossy(&out.stdout), id)
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        // A failed test can leave tasks, whose shims and containers outlive containerd: kill
        // each shim of this instance's and its container's init (the whole pid namespace
        // goes with it), whether containerd still answers or not.
        let address = self.socket().display().to_string();
        let pids: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let parent_of = |pid: i32| -> Option<i32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
        };
        for &shim in &pids {
            let cmdline = std::fs::read(format!("/proc/{shim}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !(cmdline.contains("containerd-shim") && cmdline.contains(&address)) {
                continue;
            }
            for &child in &pids {
                if parent_of(child) == Some(shim) {
                    // SAFETY: kill(2) of a container init this test's containerd started.
                    unsafe { libc::kill(child, libc::SIGKILL) };
                }
            }
            // SAFETY: kill(2) of this test's containerd's shim.
            unsafe { libc::kill(shim, libc::SIGKILL) };
        }
        self.kill9();
        // Snapshot mounts, if any, go before the directory.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
        {
            let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_outlive_a_containerd_restart() {
    let mut containerd = PrivateContainerd::start().await;
    let d = Daemon::start(Options {
        config: Some(pool("c", IMAGE, 2)),
        args: vec![
            "--containerd-socket".into(),
            containerd.socket().display().to_string(),
        ],
        ..Options::default()
    })
    .await;
    d.wait_status("c", 30, |s| s.idle == 2).await;
    let id = d.acquire("c").await;
    d.shell(&id, "echo before > /workspace/state").await;
    let agent = containerd.task_pid(&id);
    assert!(agent.is_some());

    // containerd dies: the hot path does not need it. Commands run, a warm sandbox is handed out.
    containerd.kill9();
    let r = d.shell(&id, "cat /workspace/state").await;
    assert_eq!(r.stdout, "before\n", "{r:?}");
    let warm = d.acquire("c").await;
    assert_eq!(d.shell(&warm, "echo warm").await.stdout, "warm\n");

    // containerd is back: the same sandboxes go on (not taken for dead and replaced), and new
    // ones are made again.
    containerd.spawn().await;
    d.wait_status("c", 30, |s| s.idle == 2).await;
    let r = d.shell(&id, "cat /workspace/state").await;
    assert_eq!(r.stdout, "before\n", "{r:?}");
    assert_eq!(
        containerd.task_pid(&id),
        agent,
        "the sandbox was not replaced"
    );
    let s = d.status("c").await;
    assert_eq!(s.allocated, 2, "{s:?}");

    // Release goes through the new containerd and leaves nothing behind.
    assert_eq!(d.release(&id).await, StatusCode::NO_CONTENT);
    assert_eq!(d.release(&warm).await, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = containerd.ctr(&["containers", "ls", "-q"]);
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        if !listed.contains(&id) && !listed.contains(&warm) {
            break;
        }
        assert!(Instant::now() < deadline, "left: {listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(d);
    let out = containerd.ctr(&["containers", "ls", "-q"]);
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The image's snapshot shifted into the sandboxes' user namespace goes with the daemon.
    let out = containerd.ctr(&["snapshots", "ls"]);
    let snapshots = String::from_utf8_lossy(&out.stdout);
    assert!(!snapshots.contains("arl-remap-"), "{snapshots}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_network_container_sees_the_hosts_interfaces() {
    let d = start(format!("{}network = \"host\"\n", pool("h", IMAGE, 1))).await;
    d.wait_status("h", 30, |s| s.idle == 1).await;
    let id = d.acquire("h").await;
    // More than loopback, and /sys (bound from the host: sysfs cannot be mounted without a
    // network namespace of the user namespace's own) is there, read-only.
    let r = d
        .shell(
            &id,
            "grep -c : /proc/net/dev; ls /sys/class/net | grep -c .; touch /sys/x 2>/dev/null || echo ro",
        )
        .await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    let host_interfaces = std::fs::read_dir("/sys/class/net").map_or(0, |d| d.count());
    assert_eq!(
        lines,
        [
            host_interfaces.to_string().as_str(),
            host_interfaces.to_string().as_str(),
            "ro"
        ],
        "{r:?}"
    );
}
