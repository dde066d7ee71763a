//! Pools, leases, auth, metrics, and the daemon's and agents' deaths: nothing leaks, pools
//! refill, callers get clear errors.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Daemon, Options, Runtime, alive};
use hyper::{Method, StatusCode};
use serde_json::json;

async fn pools_acquire_many_release_and_exhaustion(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.small]\nmin_idle = 2\nmax = 3\n".into()),
        ..Options::on(rt)
    })
    .await;
    d.wait_pool("small", 20, |s| s["idle"] == 2).await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "small", "count": 3, "labels": {"episode": "7"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ids: Vec<String> = body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(body["sandboxes"][0]["labels"]["episode"], "7");
    assert_eq!(body["sandboxes"][0]["state"], "allocated");

    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "small"})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "pool_exhausted");
    assert_eq!(body["error"]["retryable"], true);

    let (_, list) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 3);
    let (status, _) = d
        .call(Method::DELETE, &format!("/v1/sandboxes/{}", ids[2]), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    d.wait_pool("small", 20, |s| s["idle"] == 1 && s["total"] == 3)
        .await;
    // Two more would exceed max = 3 even though one is warm: refused, the warm one untouched.
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "small", "count": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(d.pool_status("small").await["idle"], 1);
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "small"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ids = vec![
        ids[0].clone(),
        ids[1].clone(),
        body["sandboxes"][0]["id"].as_str().unwrap().to_string(),
    ];
    for id in &ids {
        let status = d.release(id).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = d
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    d.wait_pool("small", 20, |s| s["idle"] == 2 && s["allocated"] == 0)
        .await;

    // A retried acquire with the same request id gets the same sandbox, not a second one.
    let req = json!({"pool": "small", "request_id": "episode-42"});
    let (status, first) = d
        .call(Method::POST, "/v1/sandboxes", Some(req.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, again) = d.call(Method::POST, "/v1/sandboxes", Some(req)).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(first["sandboxes"][0]["id"], again["sandboxes"][0]["id"]);
    assert_eq!(d.pool_status("small").await["allocated"], 1);
    let rid = first["sandboxes"][0]["id"].as_str().unwrap().to_string();
    d.call(Method::DELETE, &format!("/v1/sandboxes/{rid}"), None)
        .await;

    // Pools over the API: create, validate, delete.
    let (status, body) = d
        .call(
            Method::PUT,
            "/v1/pools/extra",
            Some(json!({"min_idle": 1, "max": 2, "memory_mb": 128})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["spec"]["memory_mb"], 128);
    d.wait_pool("extra", 20, |s| s["idle"] == 1).await;
    for bad in [
        json!({"min_idle": 5, "max": 2}),
        json!({"max": 0}),
        json!({"memory_mb": 1}),
        json!({"nonsense": true}),
    ] {
        let (status, body) = d
            .call(Method::PUT, "/v1/pools/extra", Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = d
        .call(Method::PUT, "/v1/pools/Bad_Name", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = d.call(Method::DELETE, "/v1/pools/extra", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "extra"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
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
        let (status, body) = d
            .call(method.clone(), path, Some(json!({"cmd": ["true"]})))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
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
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "default", "count": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
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
    let (status, body) = d.call_as(None, Method::GET, "/v1/pools", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = d
        .call_as(Some("mallory"), Method::GET, "/v1/pools", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
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
        let (status, body) = d
            .call_as(
                Some("bob-token"),
                method,
                &path,
                Some(json!({"cmd": ["true"]})),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    let (_, list) = d
        .call_as(Some("bob-token"), Method::GET, "/v1/sandboxes", None)
        .await;
    assert_eq!(
        list["sandboxes"].as_array().unwrap().len(),
        0,
        "bob sees none of alice's sandboxes"
    );
    assert_eq!(d.sh(&id, "echo mine").await["stdout"], "mine\n");

    // Tokens are re-read when the file changes.
    std::fs::write(d.dir.path().join("tokens"), "carol-token\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = d
            .call_as(Some("carol-token"), Method::GET, "/v1/pools", None)
            .await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "new token never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = d
        .call_as(Some("bob-token"), Method::GET, "/v1/pools", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn killed_agent_is_replaced(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    d.wait_pool("default", 20, |s| s["idle"] == 2).await;
    let id = d.acquire("default").await;
    let pid = d.agent_pid(&id);
    // SAFETY: kill(2) of the sandbox's agent.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = d
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"cmd": ["true"]})),
            )
            .await;
        // Until the daemon notices, the agent is merely unreachable; then the sandbox is dead.
        if status == StatusCode::SERVICE_UNAVAILABLE
            && body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("died")
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "dead sandbox still answers {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body["error"]["code"], "sandbox_unavailable");
    assert_eq!(body["error"]["retryable"], true);
    let status = d.release(&id).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "releasing a dead sandbox is done at once"
    );
    d.wait_pool("default", 20, |s| s["idle"] == 2 && s["allocated"] == 0)
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
    d.wait_pool("default", 20, |s| s["idle"] == 3).await;
    let held = d.acquire("default").await;
    d.sh(&held, "sleep 300 &").await;
    d.wait_pool("default", 20, |s| s["idle"] == 3 && s["starting"] == 0)
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
    d.wait_pool("default", 20, |s| s["idle"] == 3).await;
    let (status, body) = d
        .call(Method::GET, &format!("/v1/sandboxes/{held}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let id = d.acquire("default").await;
    assert_eq!(d.sh(&id, "echo new").await["stdout"], "new\n");
}

async fn graceful_shutdown_destroys_everything(rt: Runtime) {
    let mut d = Daemon::start(Options::on(rt)).await;
    d.wait_pool("default", 20, |s| s["idle"] == 2).await;
    let id = d.acquire("default").await;
    let pid = d.agent_pid(&id);
    d.sh(&id, "sleep 300 &").await;
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
    d.wait_pool("default", 20, |s| s["idle"] == 1).await;
    let id = d.acquire("default").await;
    d.sh(
        &id,
        "echo data > /workspace/f; echo t > /tmp/t; sleep 300 &",
    )
    .await;
    let (status, body) = d.action(&id, "reset").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = d
        .sh(
            &id,
            "ls -A /workspace /tmp; cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$' || true",
        )
        .await;
    assert_eq!(r["stdout"], "/tmp:\n\n/workspace:\n0\n", "{r}");

    // Released with reuse = reset: the same sandbox comes back, clean, with a fresh lease.
    d.sh(&id, "echo more > /workspace/g").await;
    let status = d.release(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    d.wait_pool("default", 20, |s| s["idle"] == 1).await;
    let again = d.acquire("default").await;
    assert_eq!(again, id, "reset policy reuses the sandbox");
    assert_eq!(d.sh(&again, "ls -A /workspace").await["stdout"], "");
}

async fn ttl_and_idle_timeout_expire_leases(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let (_, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "default", "ttl_seconds": 1})),
        )
        .await;
    let ttl = body["sandboxes"][0]["id"].as_str().unwrap().to_string();
    assert!(body["sandboxes"][0]["expires_at_ms"].as_u64().is_some());
    let (_, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "default", "idle_timeout_seconds": 1})),
        )
        .await;
    let idle = body["sandboxes"][0]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in [ttl, idle] {
        loop {
            let (status, body) = d
                .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await;
            if status != StatusCode::OK {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("expired"),
                    "{body}"
                );
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
    d.wait_pool("default", 20, |s| s["idle"] == 2).await;
    let id = d.acquire("default").await;
    d.sh(&id, "exit 1").await;
    d.sh(&id, "true").await;
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
    assert_eq!(d.sh(&id, "echo still here").await["stdout"], "still here\n");
}

async fn pause_freezes_and_resume_thaws(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    d.sh(
        &id,
        "(while :; do echo x >> /tmp/ticks; sleep 0.05; done) >/dev/null 2>&1 &",
    )
    .await;
    let (status, body) = d.action(&id, "pause").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let status = d.pool_status("default").await;
    assert_eq!(status["paused"], 1, "{status}");
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
    assert_eq!(d.sh(&id, "echo up").await["stdout"], "up\n");
    assert_eq!(d.pool_status("default").await["paused"], 0);
    d.action(&id, "pause").await;
    let (status, _) = d.action(&id, "resume").await;
    assert_eq!(status, StatusCode::OK);
    let a = d.sh(&id, "wc -l < /tmp/ticks").await["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = d.sh(&id, "wc -l < /tmp/ticks").await["stdout"]
            .as_str()
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap();
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
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["true"], "timeout_ms": 200})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(d.sh(&id, "echo back").await["stdout"], "back\n");
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
