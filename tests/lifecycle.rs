//! Pools, leases, auth, metrics, and the daemon's and agents' deaths: nothing leaks, pools
//! refill, callers get clear errors.

mod common;

use std::time::{Duration, Instant};

use arl::api::{
    AcquireRequest, ErrorCode, ExecRequest, PoolSpec, PoolView, SandboxInfo, SandboxList,
    SandboxState,
};
use bytes::Bytes;
use common::{Daemon, Options, Runtime, acquire, alive, cmd, map};
use hyper::{Method, StatusCode};
use serde_json::json;

async fn pools_acquire_many_release_and_exhaustion(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.small]\nmin_idle = 2\nmax = 3\n".into()),
        ..Options::on(rt)
    })
    .await;
    d.wait_status("small", 20, |s| s.idle == 2).await;
    let sandboxes = d
        .acquire_with(&AcquireRequest {
            count: Some(3),
            labels: map(&[("episode", "7")]),
            ..acquire("small")
        })
        .await;
    let ids: Vec<String> = sandboxes.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(sandboxes[0].labels, map(&[("episode", "7")]));
    assert_eq!(sandboxes[0].state, SandboxState::Allocated);

    let client = &d;
    let acquire_reply = move |req: AcquireRequest| async move {
        client.send(Method::POST, "/v1/sandboxes", Some(&req)).await
    };
    let err = acquire_reply(acquire("small"))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.code, ErrorCode::PoolExhausted);
    assert!(err.retryable);

    let list: SandboxList = d.get("/v1/sandboxes").await;
    assert_eq!(list.sandboxes.len(), 3);
    let reply = d
        .send_empty(Method::DELETE, &format!("/v1/sandboxes/{}", ids[2]))
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply}");
    d.wait_status("small", 20, |s| s.idle == 1 && s.total == 3)
        .await;
    // Two more would exceed max = 3 even though one is warm: refused, the warm one untouched.
    let err = acquire_reply(AcquireRequest {
        count: Some(2),
        ..acquire("small")
    })
    .await
    .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.code, ErrorCode::PoolExhausted);
    assert_eq!(d.status("small").await.idle, 1);
    let ids = vec![ids[0].clone(), ids[1].clone(), d.acquire("small").await];
    for id in &ids {
        let status = d.release(id).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let err = d
            .send_empty(Method::GET, &format!("/v1/sandboxes/{id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND);
        assert_eq!(err.code, ErrorCode::NotFound);
    }
    d.wait_status("small", 20, |s| s.idle == 2 && s.allocated == 0)
        .await;

    // A retried acquire with the same request id gets the same sandbox, not a second one.
    let req = AcquireRequest {
        request_id: Some("episode-42".into()),
        ..acquire("small")
    };
    let first = d.acquire_with(&req).await;
    let again = d.acquire_with(&req).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(first[0].id, again[0].id);
    assert_eq!(d.status("small").await.allocated, 1);
    assert_eq!(d.release(&first[0].id).await, StatusCode::NO_CONTENT);

    // Pools over the API: create, validate, delete.
    let spec = PoolSpec {
        min_idle: 1,
        max: 2,
        memory_mb: 128,
        ..PoolSpec::default()
    };
    let view: PoolView = d
        .send(Method::PUT, "/v1/pools/extra", Some(&spec))
        .await
        .expect(StatusCode::OK);
    assert_eq!(view.spec, spec);
    d.wait_status("extra", 20, |s| s.idle == 1).await;
    for bad in [
        PoolSpec {
            min_idle: 5,
            max: 2,
            ..PoolSpec::default()
        },
        PoolSpec {
            max: 0,
            ..PoolSpec::default()
        },
        PoolSpec {
            memory_mb: 1,
            ..PoolSpec::default()
        },
    ] {
        let err = d
            .send(Method::PUT, "/v1/pools/extra", Some(&bad))
            .await
            .expect_error(StatusCode::BAD_REQUEST);
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}: {err:?}");
    }
    // A field no spec has: raw JSON, which the `PoolSpec` model cannot express.
    let err = d
        .send(
            Method::PUT,
            "/v1/pools/extra",
            Some(&json!({"nonsense": true})),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
    let err = d
        .send(
            Method::PUT,
            "/v1/pools/Bad_Name",
            Some(&PoolSpec::default()),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
    let reply = d.send_empty(Method::DELETE, "/v1/pools/extra").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply}");
    let err = acquire_reply(acquire("extra"))
        .await
        .expect_error(StatusCode::NOT_FOUND);
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_bad_bodies_and_routes() {
    let d = Daemon::start(Options::default()).await;
    for (method, path) in [
        (Method::GET, "/v1/sandboxes/sb-nope"),
        (Method::DELETE, "/v1/sandboxes/sb-nope"),
        (Method::POST, "/v1/sandboxes/sb-nope/exec"),
        (Method::GET, "/v1/sandboxes/sb-nope/files?path=x"),
        (Method::GET, "/v1/pools/nope"),
        (Method::GET, "/v2/whatever"),
    ] {
        let err = d
            .send(method.clone(), path, Some(&cmd(&["true"])))
            .await
            .expect_error(StatusCode::NOT_FOUND);
        assert_eq!(err.code, ErrorCode::NotFound, "{method} {path}: {err:?}");
    }
    // Raw bodies: malformed JSON, and one past the body limit.
    let (status, body) = d
        .request_raw(
            Method::POST,
            "/v1/sandboxes",
            Some(Bytes::from("[1,2")),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let huge = Bytes::from(format!(
        r#"{{"pool": "default", "labels": {{"x": "{}"}}}}"#,
        "y".repeat(2 << 20)
    ));
    let (status, _) = d
        .request_raw(Method::POST, "/v1/sandboxes", Some(huge), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let err = d
        .send(
            Method::POST,
            "/v1/sandboxes",
            Some(&AcquireRequest {
                count: Some(0),
                ..acquire("default")
            }),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
    let id = d.acquire("default").await;
    let (status, body) = d
        .request_raw(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files"),
            Some(Bytes::from("x")),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "path is required: {}",
        String::from_utf8_lossy(&body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_refuses_missing_wrong_and_foreign_tokens() {
    let d = Daemon::start(Options {
        tokens: vec!["alice-token".into(), "bob-token".into()],
        ..Options::default()
    })
    .await;
    let client = &d;
    let pools_as = move |token: Option<&'static str>| async move {
        client
            .send_as::<()>(token, Method::GET, "/v1/pools", None)
            .await
    };
    let err = pools_as(None).await.expect_error(StatusCode::UNAUTHORIZED);
    assert_eq!(err.code, ErrorCode::Unauthorized);
    let err = pools_as(Some("mallory"))
        .await
        .expect_error(StatusCode::UNAUTHORIZED);
    assert_eq!(err.code, ErrorCode::Unauthorized);
    let (status, _) = d
        .request_raw(Method::GET, "/healthz", None, None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "health stays open");

    let id = d.acquire("default").await;
    for (method, path) in [
        (Method::GET, format!("/v1/sandboxes/{id}")),
        (Method::POST, format!("/v1/sandboxes/{id}/exec")),
        (Method::DELETE, format!("/v1/sandboxes/{id}")),
    ] {
        let err = d
            .send_as(Some("bob-token"), method, &path, Some(&cmd(&["true"])))
            .await
            .expect_error(StatusCode::FORBIDDEN);
        assert_eq!(err.code, ErrorCode::Forbidden, "{path}: {err:?}");
    }
    let list: SandboxList = d
        .send_as::<()>(Some("bob-token"), Method::GET, "/v1/sandboxes", None)
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        list.sandboxes.len(),
        0,
        "bob sees none of alice's sandboxes"
    );
    assert_eq!(d.shell(&id, "echo mine").await.stdout, "mine\n");

    // Tokens are re-read when the file changes.
    std::fs::write(d.dir.path().join("tokens"), "carol-token\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if pools_as(Some("carol-token")).await.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "new token never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = pools_as(Some("bob-token"))
        .await
        .expect_error(StatusCode::UNAUTHORIZED);
    assert_eq!(err.code, ErrorCode::Unauthorized);
}

async fn killed_agent_is_replaced(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    d.wait_status("default", 20, |s| s.idle == 2).await;
    let id = d.acquire("default").await;
    let pid = d.agent_pid(&id);
    // SAFETY: kill(2) of the sandbox's agent.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let reply = d
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(&cmd(&["true"])),
            )
            .await;
        // Until the daemon notices, the agent is merely unreachable; then the sandbox is dead.
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            let err = reply.error();
            if err.message.contains("died") {
                break err;
            }
        }
        assert!(
            Instant::now() < deadline,
            "dead sandbox still answers {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(err.code, ErrorCode::SandboxUnavailable);
    assert!(err.retryable);
    let status = d.release(&id).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "releasing a dead sandbox is done at once"
    );
    d.wait_status("default", 20, |s| s.idle == 2 && s.allocated == 0)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.leftovers().iter().any(|l| l.contains(&id)) {
        assert!(
            Instant::now() < deadline,
            "dead sandbox not cleaned: {:?}",
            d.leftovers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid));
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains(r#"arl_sandbox_failures_total{pool="default",reason="killed"} 1"#),
        "{metrics}"
    );
}

async fn daemon_kill9_then_restart_leaks_nothing(rt: Runtime) {
    let mut d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 3\n".into()),
        ..Options::on(rt)
    })
    .await;
    d.wait_status("default", 20, |s| s.idle == 3).await;
    let held = d.acquire("default").await;
    d.shell(&held, "sleep 300 &").await;
    d.wait_status("default", 20, |s| s.idle == 3 && s.starting == 0)
        .await;
    let dir = match rt {
        Runtime::Process => "sandboxes",
        Runtime::Containerd => "containerd",
    };
    let old: Vec<String> = std::fs::read_dir(d.state_dir().join(dir))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let pids: Vec<i32> = old.iter().map(|id| d.agent_pid(id)).collect();
    assert!(old.len() >= 3);
    d.kill9();
    assert!(
        pids.iter().all(|&p| alive(p)),
        "sandboxes outlive a killed daemon"
    );

    // No successor: `arl node cleanup` removes everything the killed daemon left.
    let out = std::process::Command::new(common::BIN)
        .args(["node", "cleanup", "--state-dir"])
        .arg(d.state_dir())
        .args(["--cgroup-parent", &d.cgroup_parent])
        .output()
        .expect("arl node cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for &pid in &pids {
        assert!(!alive(pid), "old agent {pid} survived the cleanup");
    }
    let leftovers = d.leftovers();
    for id in &old {
        assert!(
            !leftovers.iter().any(|l| l.contains(id.as_str())),
            "{id} leaked: {leftovers:?}"
        );
    }

    d.spawn().await;
    d.wait_status("default", 20, |s| s.idle == 3).await;
    let err = d
        .send_empty(Method::GET, &format!("/v1/sandboxes/{held}"))
        .await
        .expect_error(StatusCode::NOT_FOUND);
    assert_eq!(err.code, ErrorCode::NotFound);
    let id = d.acquire("default").await;
    assert_eq!(d.shell(&id, "echo new").await.stdout, "new\n");
}

async fn graceful_shutdown_destroys_everything(rt: Runtime) {
    let mut d = Daemon::start(Options::on(rt)).await;
    d.wait_status("default", 20, |s| s.idle == 2).await;
    let id = d.acquire("default").await;
    let pid = d.agent_pid(&id);
    d.shell(&id, "sleep 300 &").await;
    assert_eq!(d.terminate(), Some(0));
    assert!(!alive(pid));
    assert_eq!(d.leftovers(), Vec::<String>::new());
}

async fn reset_and_reuse_policy(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 1\nmax = 1\nreuse = \"reset\"\n".into()),
        ..Options::on(rt)
    })
    .await;
    d.wait_status("default", 20, |s| s.idle == 1).await;
    let id = d.acquire("default").await;
    d.shell(
        &id,
        "echo data > /workspace/f; echo t > /tmp/t; sleep 300 &",
    )
    .await;
    let info: SandboxInfo = d.action(&id, "reset").await.expect(StatusCode::OK);
    assert_eq!(info.id, id);
    let r = d
        .shell(
            &id,
            "ls -A /workspace /tmp; cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$' || true",
        )
        .await;
    assert_eq!(r.stdout, "/tmp:\n\n/workspace:\n0\n", "{r:?}");

    // Released with reuse = reset: the same sandbox comes back, clean, with a fresh lease.
    d.shell(&id, "echo more > /workspace/g").await;
    let status = d.release(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    d.wait_status("default", 20, |s| s.idle == 1).await;
    let again = d.acquire("default").await;
    assert_eq!(again, id, "reset policy reuses the sandbox");
    assert_eq!(d.shell(&again, "ls -A /workspace").await.stdout, "");
}

async fn ttl_and_idle_timeout_expire_leases(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let ttl = d
        .acquire_with(&AcquireRequest {
            ttl_seconds: Some(1),
            ..acquire("default")
        })
        .await;
    assert!(ttl[0].expires_at_ms.is_some(), "{ttl:?}");
    let idle = d
        .acquire_with(&AcquireRequest {
            idle_timeout_seconds: Some(1),
            ..acquire("default")
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in [&ttl[0].id, &idle[0].id] {
        loop {
            let reply = d
                .send_empty(Method::GET, &format!("/v1/sandboxes/{id}"))
                .await;
            if reply.status != StatusCode::OK {
                let err = reply.expect_error(StatusCode::SERVICE_UNAVAILABLE);
                assert!(err.message.contains("expired"), "{err:?}");
                break;
            }
            assert!(Instant::now() < deadline, "lease of {id} never expired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_latency_histograms_and_gauges() {
    let d = Daemon::start(Options::default()).await;
    d.wait_status("default", 20, |s| s.idle == 2).await;
    let id = d.acquire("default").await;
    d.shell(&id, "exit 1").await;
    d.shell(&id, "true").await;
    let text = d.metrics_text().await;
    for needle in [
        r#"arl_acquire_seconds_count{pool="default",result="hit"}"#,
        r#"arl_exec_seconds_count{pool="default"} 2"#,
        r#"arl_execs_total{outcome="nonzero",pool="default"} 1"#,
        r#"arl_execs_total{outcome="ok",pool="default"} 1"#,
        r#"arl_sandbox_create_seconds_bucket{pool="default",runtime="process""#,
        r#"arl_http_request_seconds_count{code="200",route="/v1/sandboxes/{id}/exec"} 2"#,
        r#"arl_sandboxes{pool="default",state="allocated"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(!text.contains(&id), "sandbox ids must never be labels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_cannot_disturb_the_first() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    let run = |listen: String| {
        std::process::Command::new(common::BIN)
            .args([
                "node",
                "--listen",
                &listen,
                "--cgroup-parent",
                &d.cgroup_parent,
            ])
            .arg("--state-dir")
            .arg(d.state_dir())
            .output()
            .expect("run arl node")
    };
    // Same port: refused before it touches any sandbox.
    let out = run(format!("127.0.0.1:{}", d.port));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen"),
        "{out:?}"
    );
    // Same state directory: refused by its lock.
    let out = run("127.0.0.1:0".into());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another arl node"),
        "{out:?}"
    );
    assert_eq!(d.shell(&id, "echo still here").await.stdout, "still here\n");
}

async fn pause_freezes_and_resume_thaws(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    d.shell(
        &id,
        "(while :; do echo x >> /tmp/ticks; sleep 0.05; done) >/dev/null 2>&1 &",
    )
    .await;
    let info: SandboxInfo = d.action(&id, "pause").await.expect(StatusCode::OK);
    assert_eq!(info.id, id);
    let status = d.status("default").await;
    assert_eq!(status.paused, 1, "{status:?}");
    let pid = d.agent_pid(&id);
    // The freezer says so: cgroup v2's `cgroup.events` or v1's `freezer.state`, whichever the
    // runtime froze with.
    let events: Vec<String> = common::cgroup_roots()
        .iter()
        .flat_map(|root| {
            let dir = root.join(&d.cgroup_parent).join(&id);
            [dir.join("cgroup.events"), dir.join("freezer.state")]
        })
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .collect();
    if !events.is_empty() {
        assert!(
            events
                .iter()
                .any(|e| e.contains("frozen 1") || e.trim() == "FROZEN"),
            "{events:?}"
        );
    }
    // A request thaws it transparently.
    assert_eq!(d.shell(&id, "echo up").await.stdout, "up\n");
    assert_eq!(d.status("default").await.paused, 0);
    d.action(&id, "pause").await;
    let reply = d.action(&id, "resume").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply}");
    let (client, sandbox) = (&d, &id);
    let ticks = move || async move {
        client
            .shell(sandbox, "wc -l < /tmp/ticks")
            .await
            .stdout
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let a = ticks().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = ticks().await;
        if b > a {
            break;
        }
        assert!(Instant::now() < deadline, "the ticker never resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A paused sandbox can still be released (and is destroyed, not reused).
    d.action(&id, "pause").await;
    let status = d.release(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "paused sandbox survived its release"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_stuck_agent_does_not_hold_requests_forever(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let pid = d.agent_pid(&id);
    // SAFETY: kill(2) of the sandbox's agent: stopped, it accepts connections but never answers.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = Instant::now();
    let err = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&ExecRequest {
                timeout_ms: Some(200),
                ..cmd(&["true"])
            }),
        )
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.code, ErrorCode::SandboxUnavailable);
    assert!(err.message.contains("did not answer"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(d.shell(&id, "echo back").await.stdout, "back\n");
}

crate::on_every_runtime!(
    pools_acquire_many_release_and_exhaustion,
    killed_agent_is_replaced,
    daemon_kill9_then_restart_leaks_nothing,
    graceful_shutdown_destroys_everything,
    reset_and_reuse_policy,
    ttl_and_idle_timeout_expire_leases,
    pause_freezes_and_resume_thaws,
    a_stuck_agent_does_not_hold_requests_forever,
);
