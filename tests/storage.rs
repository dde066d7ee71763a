//! Limits that cannot kill a sandbox: a full disk is ENOSPC to the writer (507 from the files
//! API), a memory hog is OOM-killed alone and reported, pids exhaustion leaves the agent
//! answering, and a sandbox that does die is reported with its cause.

mod common;

use std::time::{Duration, Instant};

use arl::api::{ErrorCode, ExecRequest, ExecResult, FileInfo, SandboxInfo};
use bytes::Bytes;
use common::{Daemon, Options, Reply, Runtime, cmd, shell};
use hyper::{Method, StatusCode};

/// A small pool keeps the limit tests fast: 64 MiB of disk, 64 MiB for processes.
const SMALL: &str = "[pools.small]\nmin_idle = 1\nmemory_mb = 64\ndisk_mb = 64\n";

async fn small_pool(rt: Runtime) -> Daemon {
    Daemon::start(Options {
        config: Some(SMALL.into()),
        ..Options::on(rt)
    })
    .await
}

/// `PUT` of `len` zero bytes: the reply.
async fn upload(d: &Daemon, id: &str, path: &str, len: usize) -> Reply {
    let (status, body) = d
        .request_raw(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path={path}"),
            Some(Bytes::from(vec![0u8; len])),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
    Reply { status, body }
}

/// The value of one sample of the failure counter (0 when absent).
fn failures(metrics: &str, pool: &str, reason: &str) -> f64 {
    let prefix = format!("arl_sandbox_failures_total{{pool=\"{pool}\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn a_700_mb_write_on_the_default_pool_leaves_the_sandbox_usable(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let r = d
        .run(
            &id,
            &ExecRequest {
                timeout_ms: Some(60000),
                ..shell("head -c 700000000 /dev/zero > /workspace/f; echo rc=$?")
            },
        )
        .await;
    let wrote = r.stdout == "rc=0\n";
    let refused = r.stderr.contains("No space left on device");
    assert!(wrote || refused, "the write succeeds or is ENOSPC: {r:?}");
    assert!(!r.oom_killed, "{r:?}");
    let r = d.shell(&id, "rm /workspace/f && echo alive").await;
    assert_eq!(r.stdout, "alive\n", "{r:?}");
}

async fn a_full_disk_is_enospc_and_the_sandbox_lives(rt: Runtime) {
    let d = small_pool(rt).await;
    let id = d.acquire("small").await;
    let r = d
        .shell(&id, "dd if=/dev/zero of=/workspace/f bs=1M count=100")
        .await;
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert_eq!(r.signal, None, "the writer is refused, not killed: {r:?}");
    assert!(r.stderr.contains("No space left on device"), "{r:?}");
    assert_eq!(d.shell(&id, "echo alive").await.stdout, "alive\n");

    // The files API says the same with 507, naming the limit; nothing is left behind.
    let err = upload(&d, &id, "/workspace/big.bin", 80 << 20)
        .await
        .expect_error(StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(err.code, ErrorCode::InsufficientStorage, "{err:?}");
    assert!(
        err.message.contains("64 MiB"),
        "the limit is named: {}",
        err.message
    );
    let r = d
        .shell(&id, "ls /workspace; rm /workspace/f && echo freed")
        .await;
    assert_eq!(r.stdout, "f\nfreed\n", "{r:?}");
    let info: FileInfo = upload(&d, &id, "/workspace/big.bin", 32 << 20)
        .await
        .expect(StatusCode::OK);
    assert_eq!(info.size, 32 << 20, "room again after the rm: {info:?}");
}

async fn a_memory_hog_beside_a_full_disk_is_oom_killed_alone(rt: Runtime) {
    let d = small_pool(rt).await;
    let id = d.acquire("small").await;
    // Files fill the disk (they are memory too); then a process wants far more than is left.
    let r = d
        .shell(
            &id,
            "head -c 60000000 /dev/zero > /workspace/fill && echo filled",
        )
        .await;
    assert_eq!(r.stdout, "filled\n", "{r:?}");
    let r = d
        .run(
            &id,
            &ExecRequest {
                timeout_ms: Some(30000),
                ..cmd(&["dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1"])
            },
        )
        .await;
    assert_eq!(r.signal, Some(9), "the hog is killed: {r:?}");
    assert!(r.oom_killed, "by the OOM killer, and it says so: {r:?}");
    // A shell's report of its child's OOM kill (128 + 9) counts too.
    let r = d
        .shell(&id, "dd if=/dev/zero of=/dev/null bs=400M count=1; exit $?")
        .await;
    assert_eq!((r.exit_code, r.oom_killed), (137, true), "{r:?}");
    let r = d.shell(&id, "wc -c < /workspace/fill").await;
    assert_eq!(r.stdout.trim(), "60000000", "{r:?}");
    // A kill that is not the OOM killer's is not reported as one.
    let r = d.shell(&id, "kill -KILL $$").await;
    assert_eq!((r.signal, r.oom_killed), (Some(9), false), "{r:?}");
    assert_eq!(failures(&d.metrics_text().await, "small", "oom"), 0.0);
}

async fn pids_exhaustion_leaves_the_agent_answering(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 1\npids = 32\n".into()),
        ..Options::on(rt)
    })
    .await;
    let id = d.acquire("default").await;
    let agent = d.agent_pid(&id);
    // Sleepers started by the agent itself fill the pids limit and hold it (a shell or a fork
    // bomb dies of its first failed fork and frees its slot). One more for every probe that
    // still found room, until none does.
    let sleeper = || {
        let (port, id) = (d.port, id.clone());
        tokio::spawn(async move {
            common::exec_on(
                port,
                &id,
                &ExecRequest {
                    timeout_ms: Some(30000),
                    ..cmd(&["sleep", "60"])
                },
            )
            .await
        })
    };
    let mut sleepers: Vec<_> = (0..40).map(|_| sleeper()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = d.shell(&id, "true").await;
        if r.exit_code != 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sleepers never reached the limit"
        );
        sleepers.push(sleeper());
    }
    // The agent still answers every route while no process can start.
    let info: FileInfo = upload(&d, &id, "/workspace/during.txt", 16)
        .await
        .expect(StatusCode::OK);
    assert_eq!(info.size, 16, "{info:?}");
    let (status, body) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=/workspace/during.txt"),
            None,
            None,
        )
        .await
        .expect("read");
    assert_eq!((status, body.len()), (StatusCode::OK, 16));
    let r = d.shell(&id, "true").await;
    assert_ne!(r.exit_code, 0, "still full: {r:?}");
    // A reset clears the table; the sleepers' execs then end with results.
    let info: SandboxInfo = d.action(&id, "reset").await.expect(StatusCode::OK);
    assert_eq!(info.id, id);
    for sleeper in sleepers {
        // `exec_on` asserts a 200 with an `ExecResult` body: every exec ends with a result.
        let _: ExecResult = sleeper.await.expect("sleeper task");
    }
    assert_eq!(d.shell(&id, "echo alive").await.stdout, "alive\n");
    assert!(common::alive(agent), "the same agent lives on");
}

/// Kills every process of the sandbox's cgroups from the host.
fn kill_cgroup(d: &Daemon, id: &str) {
    let mut killed = 0;
    for root in common::cgroup_roots() {
        let procs = root.join(&d.cgroup_parent).join(id).join("cgroup.procs");
        for pid in std::fs::read_to_string(&procs).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) of a process of the test's own sandbox.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
    }
    assert!(killed > 0, "no process in the sandbox's cgroups");
}

/// The next request's 503, once the daemon has seen the death (bounded).
async fn refused_after_death(d: &Daemon, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = d
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(&cmd(&["true"])),
            )
            .await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            let err = reply.error();
            assert_eq!(err.code, ErrorCode::SandboxUnavailable, "{err:?}");
            return err.message;
        }
        assert!(
            Instant::now() < deadline,
            "the sandbox still answers: {reply}"
        );
    }
}

async fn a_killed_sandbox_is_reported_with_its_cause(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 1\n".into()),
        ..Options::on(rt)
    })
    .await;
    let id = d.acquire("default").await;
    kill_cgroup(&d, &id);
    let message = refused_after_death(&d, &id).await;
    assert!(
        message.contains("killed") && message.contains("SIGKILL"),
        "{message}"
    );
    let metrics = d.metrics_text().await;
    assert_eq!(failures(&metrics, "default", "killed"), 1.0, "{metrics}");
    assert!(d.log().contains("killed"), "the log says why: {}", d.log());
}

async fn an_oom_killed_agent_is_reported_as_such(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 1\nmemory_mb = 64\ndisk_mb = 16\n".into()),
        ..Options::on(rt)
    })
    .await;
    let id = d.acquire("default").await;
    // Only the node can make its agent the OOM killer's choice: raise the agent to the top
    // and let the hog come down to 0 (which it may).
    let agent = d.agent_pid(&id);
    std::fs::write(format!("/proc/{agent}/oom_score_adj"), "1000").expect("raise the agent");
    let err = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&shell(
                "echo 0 > /proc/self/oom_score_adj && exec dd if=/dev/zero of=/dev/null bs=400M count=1",
            )),
        )
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.code, ErrorCode::SandboxUnavailable);
    assert!(
        err.message.contains("OOM-killed"),
        "the caught request says why: {}",
        err.message
    );
    let message = refused_after_death(&d, &id).await;
    assert!(message.contains("OOM-killed"), "{message}");
    let metrics = d.metrics_text().await;
    assert_eq!(failures(&metrics, "default", "oom"), 1.0, "{metrics}");
}

crate::on_every_runtime!(
    a_700_mb_write_on_the_default_pool_leaves_the_sandbox_usable,
    a_full_disk_is_enospc_and_the_sandbox_lives,
    a_memory_hog_beside_a_full_disk_is_oom_killed_alone,
    pids_exhaustion_leaves_the_agent_answering,
    a_killed_sandbox_is_reported_with_its_cause,
    an_oom_killed_agent_is_reported_as_such,
);
