//! Idle auto-pause: a leased sandbox idle past its pool's `auto_pause_after_seconds` is
//! frozen (its processes make no progress), counted as paused, and thawed by the next request
//! with its state intact; a running command is never frozen under itself; a paused sandbox
//! survives a restart of the daemon, still paused.

mod common;

use std::time::{Duration, Instant};

use arl::api::{ExecRequest, SandboxInfo};
use common::{Daemon, Options, Runtime, shell};
use hyper::{Method, StatusCode};

crate::on_every_runtime!(
    an_idle_sandbox_is_frozen_and_the_next_request_thaws_it,
    a_paused_sandbox_survives_a_restart_still_paused,
);

fn auto_pausing(rt: Runtime, after: u64) -> Options {
    Options {
        config: Some(format!(
            "[pools.default]\nmin_idle = 1\nmax = 4\nauto_pause_after_seconds = {after}\n"
        )),
        ..Options::on(rt)
    }
}

/// The freezer's word on the sandbox's agent, whichever runtime made it: v1's `freezer.state`
/// or v2's `cgroup.events` of the cgroup `/proc/<pid>/cgroup` names.
fn frozen(d: &Daemon, id: &str) -> bool {
    let pid = d.agent_pid(id);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    cgroups.lines().any(|line| {
        let path = line
            .splitn(3, ':')
            .nth(2)
            .unwrap_or("")
            .trim_start_matches('/');
        common::cgroup_roots().iter().any(|root| {
            let dir = root.join(path);
            std::fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
                || std::fs::read_to_string(dir.join("cgroup.events"))
                    .is_ok_and(|e| e.lines().any(|l| l == "frozen 1"))
        })
    })
}

/// Lines of a file inside the sandbox, read from the host (a request would thaw it).
fn ticks(d: &Daemon, id: &str) -> usize {
    let path = format!("/proc/{}/root/tmp/ticks", d.agent_pid(id));
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

async fn start_ticker(d: &Daemon, id: &str) {
    d.shell(
        id,
        "(while :; do echo x >> /tmp/ticks; sleep 0.02; done) >/dev/null 2>&1 &",
    )
    .await;
}

async fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn an_idle_sandbox_is_frozen_and_the_next_request_thaws_it(rt: Runtime) {
    let d = Daemon::start(auto_pausing(rt, 1)).await;
    let id = d.acquire("default").await;
    start_ticker(&d, &id).await;
    d.wait_status("default", 10, |s| s.paused == 1).await;
    assert!(frozen(&d, &id), "counted paused but not frozen");
    // Frozen: the ticker makes no progress (it ticks every 20 ms when it runs).
    let before = ticks(&d, &id);
    assert!(before > 0, "the ticker never ticked");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ticks(&d, &id), before, "a frozen sandbox made progress");
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("arl_sandboxes{pool=\"default\",state=\"paused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arl_pause_seconds_count{action=\"pause\",cause=\"auto\"} 1"),
        "{metrics}"
    );

    // Any request thaws it first, transparently: the command runs and sees the state.
    let r = d.shell(&id, "wc -l < /tmp/ticks").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let seen: usize = r.stdout.trim().parse().unwrap();
    assert!(seen >= before, "{seen} < {before}");
    assert!(!frozen(&d, &id));
    wait_until("the ticker resuming", 10, || ticks(&d, &id) > seen).await;
    let status = d.status("default").await;
    assert_eq!(status.paused, 0, "{status:?}");

    // It pauses again when idle again, and a file read thaws it as well.
    d.wait_status("default", 10, |s| s.paused == 1).await;
    let (status, body) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=/tmp/ticks"),
            None,
            None,
        )
        .await
        .expect("read file");
    assert_eq!(status, 200);
    assert!(!body.is_empty());
    assert!(!frozen(&d, &id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_command_is_never_frozen_under_itself() {
    let d = Daemon::start(auto_pausing(Runtime::Process, 1)).await;
    let id = d.acquire("default").await;
    let started = Instant::now();
    // Runs past the idle time: the sandbox is in use all along.
    let r = d
        .run(
            &id,
            &ExecRequest {
                timeout_ms: Some(20000),
                ..shell("sleep 2.5; echo done")
            },
        )
        .await;
    assert_eq!(r.stdout, "done\n", "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(d.status("default").await.paused, 0);
}

async fn a_paused_sandbox_survives_a_restart_still_paused(rt: Runtime) {
    let mut d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 1\nmax = 4\n".into()),
        ..Options::on(rt)
    })
    .await;
    let id = d.acquire("default").await;
    d.shell(&id, "echo kept > /workspace/state").await;
    let info: SandboxInfo = d.action(&id, "pause").await.expect(StatusCode::OK);
    assert_eq!(info.id, id);
    assert!(frozen(&d, &id));
    d.kill9();
    d.spawn().await;
    // Taken back, not destroyed, and frozen again.
    let status = d.status("default").await;
    assert_eq!(status.paused, 1, "{status:?}");
    assert_eq!(status.allocated, 1, "{status:?}");
    assert!(frozen(&d, &id), "taken back but not frozen again");
    let r = d.shell(&id, "cat /workspace/state").await;
    assert_eq!(r.stdout, "kept\n", "{r:?}");
    assert!(!frozen(&d, &id));
}
