//! The runtime-blind behaviour suite: the same checks against a `process` pool and a
//! `containerd` pool (scripts/containerd.sh starts containerd and imports the test image, a
//! busybox userland). Whatever makes a sandbox, the API behaves the same.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Daemon, Options};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const CONFIG: &str = "[pools.proc]\nmin_idle = 1\nmax = 4\n\n\
[pools.ctrd]\nruntime = \"containerd\"\nimage = \"docker.io/arl/test:latest\"\nmin_idle = 1\nmax = 4\n";

async fn acquire_with_env(d: &Daemon, pool: &str) -> String {
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": pool, "env": {"LEASE": "lease"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pool}: {body}");
    body["sandboxes"][0]["id"].as_str().unwrap().to_string()
}

async fn exec_semantics(d: &Daemon, pool: &str) {
    let id = acquire_with_env(d, pool).await;
    let r = d.sh(&id, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (
            r["stdout"].as_str(),
            r["stderr"].as_str(),
            r["exit_code"].as_i64()
        ),
        (Some("out\n"), Some("err\n"), Some(3)),
        "{pool}: {r}"
    );
    let r = d
        .exec(&id, json!({"cmd": ["printf", "%s|", "a b", "c"]}))
        .await;
    assert_eq!(r["stdout"], "a b|c|", "{pool}");
    let r = d.exec(&id, json!({"cmd": ["/no/such/program"]})).await;
    assert_eq!(r["exit_code"], 127, "{pool}: {r}");
    let r = d
        .exec(
            &id,
            json!({"shell": "echo $LEASE $REQ", "env": {"REQ": "req"}}),
        )
        .await;
    assert_eq!(r["stdout"], "lease req\n", "{pool}: late-bound env");
    d.sh(&id, "mkdir -p sub").await;
    let r = d.exec(&id, json!({"cmd": ["pwd"], "cwd": "sub"})).await;
    assert_eq!(r["stdout"], "/workspace/sub\n", "{pool}");
    let r = d
        .exec(&id, json!({"cmd": ["wc", "-c"], "stdin": "hello"}))
        .await;
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "5", "{pool}");
    let r = d
        .exec(
            &id,
            json!({"shell": "head -c 5000 /dev/zero | tr '\\0' y", "max_output_bytes": 100}),
        )
        .await;
    assert_eq!(
        (
            r["stdout"].as_str().unwrap().len(),
            r["truncated"].as_bool()
        ),
        (100, Some(true)),
        "{pool}"
    );

    let started = Instant::now();
    let r = d
        .exec(&id, json!({"shell": "sleep 300 & echo $! > /tmp/bg; setsid sleep 300 & echo $! > /tmp/bg2; sleep 300", "timeout_ms": 300}))
        .await;
    assert_eq!(r["timed_out"], true, "{pool}: {r}");
    assert!(started.elapsed() < Duration::from_secs(10), "{pool}");
    let r = d.sh(&id, "kill -0 $(cat /tmp/bg) 2>/dev/null && echo alive; kill -0 $(cat /tmp/bg2) 2>/dev/null && echo alive; echo checked").await;
    assert_eq!(r["stdout"], "checked\n", "{pool}: the whole tree dies");

    let req =
        json!({"shell": "echo x >> /workspace/n; wc -l < /workspace/n", "request_id": "once"});
    let first = d.exec(&id, req.clone()).await;
    assert_eq!(d.exec(&id, req).await, first, "{pool}");
    assert_eq!(
        first["stdout"].as_str().unwrap().trim(),
        "1",
        "{pool}: ran once"
    );

    let (status, bytes) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(Bytes::from(
                json!({"shell": "echo a; echo b >&2"}).to_string(),
            )),
            None,
            &[("accept", "application/x-ndjson")],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<String> = String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("result"),
        "{pool}: {kinds:?}"
    );
    assert!(
        kinds.contains(&"stdout".to_string()) && kinds.contains(&"stderr".to_string()),
        "{pool}: {kinds:?}"
    );
}

async fn files_and_reset(d: &Daemon, pool: &str) {
    let id = acquire_with_env(d, pool).await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let (status, body) = d
        .request_raw(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=d/blob&mode=640"),
            Some(Bytes::from(data.clone())),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "{pool}: {}",
        String::from_utf8_lossy(&body)
    );
    let (status, back) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=d/blob"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!((status, back.len()), (StatusCode::OK, data.len()), "{pool}");
    assert!(back[..] == data[..], "{pool}: round trip");
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/files"),
            Some(json!({"files": {"a.sh": {"content": "echo from a", "mode": 493}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{pool}: {body}");
    assert_eq!(
        d.exec(&id, json!({"cmd": ["sh", "a.sh"]})).await["stdout"],
        "from a\n",
        "{pool}"
    );
    d.sh(&id, "ln -s / /workspace/up").await;
    for path in ["../etc/passwd", "up/etc/passwd"] {
        let (status, body) = d
            .request_raw(
                Method::GET,
                &format!("/v1/sandboxes/{id}/files?path={path}"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{pool} {path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    d.sh(&id, "sleep 300 &").await;
    let (status, _) = d.action(&id, "reset").await;
    assert_eq!(status, StatusCode::OK, "{pool}");
    let r = d
        .sh(&id, "ls -A /workspace; pgrep -x sleep || echo none")
        .await;
    assert_eq!(
        r["stdout"], "none\n",
        "{pool}: workspace wiped, processes gone: {r}"
    );
    let status = d.release(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_behaviour_on_every_runtime() {
    let d = Daemon::start(Options {
        config: Some(CONFIG.into()),
        ..Options::default()
    })
    .await;
    for pool in ["proc", "ctrd"] {
        d.wait_pool(pool, 30, |s| s["idle"] == 1).await;
        exec_semantics(&d, pool).await;
        files_and_reset(&d, pool).await;
    }
}
