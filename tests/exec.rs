//! Exec through a real daemon into real sandboxes: results, streaming, env, cwd, stdin,
//! timeouts, output caps, idempotency and concurrency.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Daemon, Options, Runtime};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

async fn exec_reports_output_exit_code_and_duration(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let r = d.sh(&id, "echo out; echo err >&2; exit 3").await;
    assert_eq!(r["stdout"], "out\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["timed_out"], false);
    assert_eq!(r["truncated"], false);
    assert!(r["duration_ms"].as_f64().unwrap() > 0.0);

    let r = d
        .exec(&id, json!({"cmd": ["printf", "%s|", "a b", "c"]}))
        .await;
    assert_eq!(r["stdout"], "a b|c|", "argv is passed without a shell");

    let r = d.exec(&id, json!({"cmd": ["/no/such/program"]})).await;
    assert_eq!(r["exit_code"], 127, "a missing program is a result: {r}");

    let r = d.sh(&id, "kill -TERM $$").await;
    assert_eq!(r["signal"], 15);
    assert_eq!(r["exit_code"], 128 + 15);
}

async fn env_cwd_and_stdin(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some(
            "[pools.default]\nmin_idle = 1\nenv = { POOL_VAR = \"pool\", SHARED = \"pool\" }\n"
                .into(),
        ),
        ..Options::on(rt)
    })
    .await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "default", "env": {"LEASE_VAR": "lease", "SHARED": "lease"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["sandboxes"][0]["id"].as_str().unwrap().to_string();

    let r = d
        .exec(&id, json!({"shell": "echo $POOL_VAR $LEASE_VAR $SHARED $REQ_VAR", "env": {"REQ_VAR": "req"}}))
        .await;
    assert_eq!(
        r["stdout"], "pool lease lease req\n",
        "late-bound env layers: {r}"
    );
    let r = d
        .exec(
            &id,
            json!({"shell": "echo $SHARED", "env": {"SHARED": "req"}}),
        )
        .await;
    assert_eq!(r["stdout"], "req\n");

    let r = d.sh(&id, "pwd").await;
    assert_eq!(r["stdout"], "/workspace\n");
    d.sh(&id, "mkdir -p /workspace/sub/dir").await;
    let r = d.exec(&id, json!({"cmd": ["pwd"], "cwd": "sub/dir"})).await;
    assert_eq!(r["stdout"], "/workspace/sub/dir\n");
    let r = d.exec(&id, json!({"cmd": ["pwd"], "cwd": "/tmp"})).await;
    assert_eq!(r["stdout"], "/tmp\n");
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["pwd"], "cwd": "/nope"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let r = d
        .exec(&id, json!({"cmd": ["wc", "-c"], "stdin": "hello"}))
        .await;
    assert_eq!(r["stdout"], "5\n");
    let r = d
        .exec(
            &id,
            json!({"cmd": ["od", "-An", "-tx1"], "stdin_b64": "AAH/"}),
        )
        .await;
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "00 01 ff");
    // A large stdin that the command ignores does not hang the exec.
    let big = "x".repeat(1 << 20);
    let r = d.exec(&id, json!({"cmd": ["true"], "stdin": big})).await;
    assert_eq!(r["exit_code"], 0);
}

async fn streaming_delivers_chunks_as_they_come(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let body = json!({"shell": "echo one; sleep 1; echo two >&2; exit 4"});
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("/v1/sandboxes/{id}/exec"))
        .header("host", "localhost")
        .header("accept", "application/x-ndjson")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.into_body();
    let mut events: Vec<(Duration, Value)> = Vec::new();
    let mut buf = Vec::new();
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                events.push((started.elapsed(), serde_json::from_slice(&line).unwrap()));
            }
        }
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["stdout", "stderr", "result"], "{events:?}");
    assert_eq!(events[0].1["data"], "one\n");
    assert_eq!(events[1].1["data"], "two\n");
    assert_eq!(events[2].1["exit_code"], 4);
    // The first chunk arrived well before the command finished. (Half a second of slack: on a
    // loaded 2-vCPU runner one chunk was once held ~200 ms, the size of a TCP retransmission
    // timeout.)
    assert!(
        events[2].0 - events[0].0 >= Duration::from_millis(500),
        "{events:?}"
    );
}

async fn timeout_kills_the_whole_tree(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let started = Instant::now();
    let r = d
        .exec(
            &id,
            json!({"shell": "sleep 300 & echo $! > /tmp/bg; setsid sleep 300 & echo $! > /tmp/bg2; echo started; sleep 300", "timeout_ms": 500}),
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["signal"], 9);
    assert_eq!(
        r["stdout"], "started\n",
        "output before the timeout is kept"
    );
    let r = d.sh(&id, "kill -0 $(cat /tmp/bg) 2>/dev/null && echo alive; kill -0 $(cat /tmp/bg2) 2>/dev/null && echo alive2; echo checked").await;
    assert_eq!(r["stdout"], "checked\n", "grandchildren must be dead: {r}");
}

async fn background_process_does_not_hold_the_exec(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let started = Instant::now();
    let r = d.sh(&id, "sleep 60 & echo done").await;
    assert_eq!(r["stdout"], "done\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the exec waited for its background child"
    );
}

async fn huge_output_is_capped_and_daemon_memory_stays_bounded(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let before = common::rss_kib(d.pid());
    let r = d.exec(&id, json!({"shell": "head -c 200000000 /dev/zero | tr '\\0' x; echo tail >&2", "timeout_ms": 60000})).await;
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["stderr"], "tail\n");
    let r = d
        .exec(
            &id,
            json!({"shell": "head -c 5000 /dev/zero | tr '\\0' y", "max_output_bytes": 100}),
        )
        .await;
    assert_eq!(r["stdout"].as_str().unwrap().len(), 100);
    assert_eq!(r["truncated"], true);

    // Streaming 200 MB: also cut at the cap.
    let (status, bytes) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(Bytes::from(
                json!({"shell": "head -c 200000000 /dev/zero | tr '\\0' z"}).to_string(),
            )),
            None,
            &[("accept", "application/x-ndjson")],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&bytes);
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "result");
    assert_eq!(last["truncated"], true);
    let streamed: usize = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap().len())
        .sum();
    assert_eq!(streamed, 1 << 20);
    let after = common::rss_kib(d.pid());
    assert!(
        after < before + 64 * 1024,
        "daemon RSS grew from {before} KiB to {after} KiB"
    );
}

async fn request_id_makes_exec_idempotent(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let req = json!({"shell": "echo x >> /workspace/count; wc -l < /workspace/count", "request_id": "step-1"});
    let first = d.exec(&id, req.clone()).await;
    let second = d.exec(&id, req).await;
    assert_eq!(first["stdout"], "1\n");
    assert_eq!(second, first, "the retry returns the first result");
    let r = d.sh(&id, "wc -l < /workspace/count").await;
    assert_eq!(r["stdout"], "1\n", "the command ran once");
    // A request refused before anything ran is not replayed: the corrected retry runs.
    let (status, _) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["pwd"], "cwd": "/nope", "request_id": "step-fix"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let fixed = d
        .exec(
            &id,
            json!({"cmd": ["pwd"], "cwd": "/tmp", "request_id": "step-fix"}),
        )
        .await;
    assert_eq!(fixed["stdout"], "/tmp\n");
    // Two attempts in flight at once: one runs, both get its result.
    let req = json!({"shell": "sleep 0.3; echo y >> /workspace/count2; wc -l < /workspace/count2", "request_id": "step-concurrent"});
    let (a, b) = tokio::join!(d.exec(&id, req.clone()), d.exec(&id, req));
    assert_eq!(a, b);
    assert_eq!(a["stdout"], "1\n");
    let third = d.exec(&id, json!({"shell": "echo x >> /workspace/count; wc -l < /workspace/count", "request_id": "step-2"})).await;
    assert_eq!(third["stdout"], "2\n");
}

async fn sixty_four_concurrent_clients(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 16\nmax = 80\n".into()),
        ..Options::on(rt)
    })
    .await;
    let d = std::sync::Arc::new(d);
    let mut tasks = Vec::new();
    for client in 0..64 {
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let id = d.acquire("default").await;
            for step in 0..10 {
                let r = d
                    .exec(&id, json!({"cmd": ["echo", format!("{client}-{step}")]}))
                    .await;
                assert_eq!(r["stdout"], format!("{client}-{step}\n"));
            }
            let status = d.release(&id).await;
            assert_eq!(status, StatusCode::NO_CONTENT);
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

async fn malformed_exec_requests_get_clear_errors(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let path = format!("/v1/sandboxes/{id}/exec");
    for (body, needle) in [
        ("{not json", "invalid JSON"),
        ("{}", "one of `cmd` or `shell`"),
        (r#"{"cmd": []}"#, "empty"),
        (r#"{"cmd": ["true"], "shell": "true"}"#, "not both"),
        (r#"{"cmd": "true"}"#, "invalid JSON"),
        (r#"{"cmd": ["true"], "bogus": 1}"#, "unknown field"),
        (r#"{"cmd": ["true"], "stdin_b64": "%%%"}"#, "stdin_b64"),
    ] {
        let (status, bytes) = d
            .request_raw(Method::POST, &path, Some(Bytes::from(body)), None)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], "bad_request");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    // Over the body limit: 413, and the sandbox still works.
    let huge = format!(
        r#"{{"cmd": ["true"], "stdin": "{}"}}"#,
        "a".repeat(17 << 20)
    );
    let (status, _) = d
        .request_raw(Method::POST, &path, Some(Bytes::from(huge)), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(d.sh(&id, "echo fine").await["stdout"], "fine\n");
}

async fn concurrent_execs_in_one_sandbox_keep_their_output(rt: Runtime) {
    let d = std::sync::Arc::new(Daemon::start(Options::on(rt)).await);
    let id = d.acquire("default").await;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let d = d.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let word = format!("{worker}-{i}");
                let r = d.exec(&id, json!({"cmd": ["echo", word]})).await;
                assert_eq!(r["stdout"], format!("{word}\n"), "{r}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
}

async fn ndjson_events(d: &Daemon, id: &str, req: Value) -> Vec<Value> {
    let (status, bytes) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(Bytes::from(req.to_string())),
            None,
            &[("accept", "application/x-ndjson")],
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn streaming_exec_is_idempotent_and_survives_a_lost_client(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let req = json!({"shell": "echo run >> /workspace/runs; echo out; echo err >&2; exit 2", "request_id": "s-1"});
    let first = ndjson_events(&d, &id, req.clone()).await;
    let again = ndjson_events(&d, &id, req.clone()).await;
    let text = |events: &[Value], kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["data"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(text(&first, "stdout"), "out\n");
    assert_eq!(text(&again, "stdout"), "out\n");
    assert_eq!(text(&again, "stderr"), "err\n");
    assert_eq!(again.last().unwrap()["exit_code"], 2);
    // The same id in JSON mode gets the same result, rebuilt from the stream.
    let json_retry = d.exec(&id, req).await;
    assert_eq!(json_retry["stdout"], "out\n");
    assert_eq!(json_retry["exit_code"], 2);
    assert_eq!(
        d.sh(&id, "wc -l < /workspace/runs").await["stdout"],
        "1\n",
        "ran once"
    );

    // A client that goes away mid-stream: the command still finishes, a retry gets it all.
    let req = json!({"shell": "echo first; sleep 0.5; echo second; echo done >> /workspace/lost", "request_id": "s-2"});
    {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let request = hyper::Request::post(format!("/v1/sandboxes/{id}/exec"))
            .header("host", "localhost")
            .header("accept", "application/x-ndjson")
            .body(http_body_util::Full::new(Bytes::from(req.to_string())))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let mut body = response.into_body();
        use http_body_util::BodyExt;
        let first_chunk = body.frame().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(first_chunk.data_ref().unwrap()).contains("first"));
        drop(body);
        drop(sender);
        conn.abort();
    }
    let retry = d.exec(&id, req).await;
    assert_eq!(retry["stdout"], "first\nsecond\n", "{retry}");
    assert_eq!(d.sh(&id, "cat /workspace/lost").await["stdout"], "done\n");
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains(r#"arl_execs_total{outcome="nonzero",pool="default"} 1"#),
        "{metrics}"
    );
}

crate::on_every_runtime!(
    exec_reports_output_exit_code_and_duration,
    env_cwd_and_stdin,
    streaming_delivers_chunks_as_they_come,
    timeout_kills_the_whole_tree,
    background_process_does_not_hold_the_exec,
    huge_output_is_capped_and_daemon_memory_stays_bounded,
    request_id_makes_exec_idempotent,
    sixty_four_concurrent_clients,
    malformed_exec_requests_get_clear_errors,
    concurrent_execs_in_one_sandbox_keep_their_output,
    streaming_exec_is_idempotent_and_survives_a_lost_client,
);
