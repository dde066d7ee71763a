//! Exec through a real daemon into real sandboxes: results, streaming, env, cwd, stdin,
//! timeouts, output caps, idempotency and concurrency.

mod common;

use std::time::{Duration, Instant};

use arl::api::{AcquireRequest, ErrorCode, ExecEvent, ExecRequest, ExecResult};
use bytes::Bytes;
use common::{Daemon, Options, Runtime, cmd, map, shell};
use hyper::{Method, StatusCode};

async fn exec_reports_output_exit_code_and_duration(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let r = d.shell(&id, "echo out; echo err >&2; exit 3").await;
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    assert_eq!(r.exit_code, 3);
    assert!(!r.timed_out);
    assert!(!r.truncated);
    assert!(r.duration_ms > 0.0);

    let r = d.run(&id, &cmd(&["printf", "%s|", "a b", "c"])).await;
    assert_eq!(r.stdout, "a b|c|", "argv is passed without a shell");

    let r = d.run(&id, &cmd(&["/no/such/program"])).await;
    assert_eq!(r.exit_code, 127, "a missing program is a result: {r:?}");

    let r = d.shell(&id, "kill -TERM $$").await;
    assert_eq!(r.signal, Some(15));
    assert_eq!(r.exit_code, 128 + 15);
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
    let sandboxes = d
        .acquire_with(&AcquireRequest {
            env: map(&[("LEASE_VAR", "lease"), ("SHARED", "lease")]),
            ..common::acquire("default")
        })
        .await;
    let id = sandboxes[0].id.clone();

    let r = d
        .run(
            &id,
            &ExecRequest {
                env: map(&[("REQ_VAR", "req")]),
                ..shell("echo $POOL_VAR $LEASE_VAR $SHARED $REQ_VAR")
            },
        )
        .await;
    assert_eq!(
        r.stdout, "pool lease lease req\n",
        "late-bound env layers: {r:?}"
    );
    let r = d
        .run(
            &id,
            &ExecRequest {
                env: map(&[("SHARED", "req")]),
                ..shell("echo $SHARED")
            },
        )
        .await;
    assert_eq!(r.stdout, "req\n");

    let r = d.shell(&id, "pwd").await;
    assert_eq!(r.stdout, "/workspace\n");
    d.shell(&id, "mkdir -p /workspace/sub/dir").await;
    let in_dir = |cwd: &str| ExecRequest {
        cwd: Some(cwd.into()),
        ..cmd(&["pwd"])
    };
    let r = d.run(&id, &in_dir("sub/dir")).await;
    assert_eq!(r.stdout, "/workspace/sub/dir\n");
    let r = d.run(&id, &in_dir("/tmp")).await;
    assert_eq!(r.stdout, "/tmp\n");
    let err = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&in_dir("/nope")),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);

    let r = d
        .run(
            &id,
            &ExecRequest {
                stdin: Some("hello".into()),
                ..cmd(&["wc", "-c"])
            },
        )
        .await;
    assert_eq!(r.stdout, "5\n");
    let r = d
        .run(
            &id,
            &ExecRequest {
                stdin_b64: Some("AAH/".into()),
                ..cmd(&["od", "-An", "-tx1"])
            },
        )
        .await;
    assert_eq!(r.stdout.trim(), "00 01 ff");
    // A large stdin that the command ignores does not hang the exec.
    let big = "x".repeat(1 << 20);
    let r = d
        .run(
            &id,
            &ExecRequest {
                stdin: Some(big),
                ..cmd(&["true"])
            },
        )
        .await;
    assert_eq!(r.exit_code, 0);
    // Without stdin a command reads end-of-file from /dev/null, every time: one that changes
    // its stdin's flags or closes it leaves the next command's alone.
    for _ in 0..3 {
        let r = d
            .shell(&id, "cat; readlink /proc/self/fd/0; exec 0<&-; echo closed")
            .await;
        assert_eq!(r.stdout, "/dev/null\nclosed\n", "{r:?}");
        assert_eq!(r.exit_code, 0);
    }
}

async fn streaming_delivers_chunks_as_they_come(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let body = shell("echo one; sleep 1; echo two >&2; exit 4");
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
        .body(http_body_util::Full::new(Bytes::from(
            serde_json::to_vec(&body).unwrap(),
        )))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.into_body();
    let mut events: Vec<(Duration, ExecEvent)> = Vec::new();
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
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        events[0].1,
        ExecEvent::Stdout {
            data: "one\n".into()
        }
    );
    assert_eq!(
        events[1].1,
        ExecEvent::Stderr {
            data: "two\n".into()
        }
    );
    let ExecEvent::Result(result) = &events[2].1 else {
        panic!("{events:?}")
    };
    assert_eq!(result.exit_code, 4);
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
        .run(
            &id,
            &ExecRequest {
                timeout_ms: Some(500),
                ..shell("sleep 300 & echo $! > /tmp/bg; setsid sleep 300 & echo $! > /tmp/bg2; echo started; sleep 300")
            },
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.signal, Some(9));
    assert_eq!(r.stdout, "started\n", "output before the timeout is kept");
    let r = d.shell(&id, "kill -0 $(cat /tmp/bg) 2>/dev/null && echo alive; kill -0 $(cat /tmp/bg2) 2>/dev/null && echo alive2; echo checked").await;
    assert_eq!(r.stdout, "checked\n", "grandchildren must be dead: {r:?}");
}

async fn background_process_does_not_hold_the_exec(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let started = Instant::now();
    let r = d.shell(&id, "sleep 60 & echo done").await;
    assert_eq!(r.stdout, "done\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the exec waited for its background child"
    );
}

async fn huge_output_is_capped_and_daemon_memory_stays_bounded(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let before = common::rss_kib(d.pid());
    let r = d
        .run(
            &id,
            &ExecRequest {
                timeout_ms: Some(60000),
                ..shell("head -c 200000000 /dev/zero | tr '\\0' x; echo tail >&2")
            },
        )
        .await;
    assert_eq!(r.exit_code, 0);
    assert!(r.truncated);
    assert_eq!(r.stdout.len(), 1 << 20);
    assert_eq!(r.stderr, "tail\n");
    let r = d
        .run(
            &id,
            &ExecRequest {
                max_output_bytes: Some(100),
                ..shell("head -c 5000 /dev/zero | tr '\\0' y")
            },
        )
        .await;
    assert_eq!(r.stdout.len(), 100);
    assert!(r.truncated);

    // Streaming 200 MB: also cut at the cap.
    let (status, bytes) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(Bytes::from(
                serde_json::to_vec(&shell("head -c 200000000 /dev/zero | tr '\\0' z")).unwrap(),
            )),
            None,
            &[("accept", "application/x-ndjson")],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let events: Vec<ExecEvent> = common::ndjson(&bytes);
    let Some(ExecEvent::Result(last)) = events.last() else {
        panic!("the stream ends with its result: {:?}", events.last())
    };
    assert!(last.truncated);
    let streamed: usize = events
        .iter()
        .map(|e| match e {
            ExecEvent::Stdout { data } => data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(streamed, 1 << 20);
    let after = common::rss_kib(d.pid());
    assert!(
        after < before + 64 * 1024,
        "daemon RSS grew from {before} KiB to {after} KiB"
    );
}

/// Output is read into buffers that start small and grow: every size, across the growth
/// steps, comes back whole and in order, on both streams.
async fn output_of_every_size_comes_back_byte_exact(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let lines: String = (1..=120_000).map(|i| format!("{i}\n")).collect();
    for size in [0usize, 1, 4095, 4096, 4097, 8192, 65_536, 70_001, 600_000] {
        let r = d
            .run(
                &id,
                &shell(&format!(
                    "seq 1 120000 | head -c {size}; seq 1 120000 | head -c {size} >&2"
                )),
            )
            .await;
        assert_eq!(r.exit_code, 0, "{size}: {}", r.stderr.len());
        assert!(!r.truncated, "{size}");
        assert_eq!(r.stdout.len(), size);
        assert!(r.stdout == lines[..size], "stdout of {size} bytes differs");
        assert!(r.stderr == lines[..size], "stderr of {size} bytes differs");
    }
}

async fn request_id_makes_exec_idempotent(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let with_id = |req: ExecRequest, request_id: &str| ExecRequest {
        request_id: Some(request_id.into()),
        ..req
    };
    let count = shell("echo x >> /workspace/count; wc -l < /workspace/count");
    let req = with_id(count.clone(), "step-1");
    let first = d.run(&id, &req).await;
    let second = d.run(&id, &req).await;
    assert_eq!(first.stdout, "1\n");
    assert_eq!(second, first, "the retry returns the first result");
    let r = d.shell(&id, "wc -l < /workspace/count").await;
    assert_eq!(r.stdout, "1\n", "the command ran once");
    // A request refused before anything ran is not replayed: the corrected retry runs.
    let in_dir = |cwd: &str| ExecRequest {
        cwd: Some(cwd.into()),
        ..with_id(cmd(&["pwd"]), "step-fix")
    };
    let reply = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&in_dir("/nope")),
        )
        .await;
    assert_eq!(
        reply.expect_error(StatusCode::BAD_REQUEST).code,
        ErrorCode::BadRequest
    );
    let fixed = d.run(&id, &in_dir("/tmp")).await;
    assert_eq!(fixed.stdout, "/tmp\n");
    // Two attempts in flight at once: one runs, both get its result.
    let req = with_id(
        shell("sleep 0.3; echo y >> /workspace/count2; wc -l < /workspace/count2"),
        "step-concurrent",
    );
    let (a, b) = tokio::join!(d.run(&id, &req), d.run(&id, &req));
    assert_eq!(a, b);
    assert_eq!(a.stdout, "1\n");
    let third = d.run(&id, &with_id(count, "step-2")).await;
    assert_eq!(third.stdout, "2\n");
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
                    .run(&id, &cmd(&["echo", &format!("{client}-{step}")]))
                    .await;
                assert_eq!(r.stdout, format!("{client}-{step}\n"));
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
    // Raw bodies: each is malformed JSON or a shape the `ExecRequest` model cannot express.
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
        let err = common::Reply {
            status,
            body: bytes,
        }
        .expect_error(StatusCode::BAD_REQUEST);
        assert_eq!(err.code, ErrorCode::BadRequest, "{body}: {err:?}");
        assert!(err.message.contains(needle), "{body}: {err:?}");
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
    assert_eq!(d.shell(&id, "echo fine").await.stdout, "fine\n");
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
                let r = d.run(&id, &cmd(&["echo", &word])).await;
                assert_eq!(r.stdout, format!("{word}\n"), "{r:?}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
}

async fn ndjson_events(d: &Daemon, id: &str, req: &ExecRequest) -> Vec<ExecEvent> {
    let (status, bytes) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(Bytes::from(serde_json::to_vec(req).unwrap())),
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
    common::ndjson(&bytes)
}

async fn streaming_exec_is_idempotent_and_survives_a_lost_client(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let req = ExecRequest {
        request_id: Some("s-1".into()),
        ..shell("echo run >> /workspace/runs; echo out; echo err >&2; exit 2")
    };
    let first = ndjson_events(&d, &id, &req).await;
    let again = ndjson_events(&d, &id, &req).await;
    let stdout = |events: &[ExecEvent]| -> String {
        events
            .iter()
            .filter_map(|e| match e {
                ExecEvent::Stdout { data } => Some(data.as_str()),
                _ => None,
            })
            .collect()
    };
    let stderr: String = again
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Stderr { data } => Some(data.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stdout(&first), "out\n");
    assert_eq!(stdout(&again), "out\n");
    assert_eq!(stderr, "err\n");
    let Some(ExecEvent::Result(ExecResult { exit_code, .. })) = again.last() else {
        panic!("{again:?}")
    };
    assert_eq!(*exit_code, 2);
    // The same id in JSON mode gets the same result, rebuilt from the stream.
    let json_retry = d.run(&id, &req).await;
    assert_eq!(json_retry.stdout, "out\n");
    assert_eq!(json_retry.exit_code, 2);
    assert_eq!(
        d.shell(&id, "wc -l < /workspace/runs").await.stdout,
        "1\n",
        "ran once"
    );

    // A client that goes away mid-stream: the command still finishes, a retry gets it all.
    let req = ExecRequest {
        request_id: Some("s-2".into()),
        ..shell("echo first; sleep 0.5; echo second; echo done >> /workspace/lost")
    };
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
            .body(http_body_util::Full::new(Bytes::from(
                serde_json::to_vec(&req).unwrap(),
            )))
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
    let retry = d.run(&id, &req).await;
    assert_eq!(retry.stdout, "first\nsecond\n", "{retry:?}");
    assert_eq!(d.shell(&id, "cat /workspace/lost").await.stdout, "done\n");
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
    output_of_every_size_comes_back_byte_exact,
    request_id_makes_exec_idempotent,
    sixty_four_concurrent_clients,
    malformed_exec_requests_get_clear_errors,
    concurrent_execs_in_one_sandbox_keep_their_output,
    streaming_exec_is_idempotent_and_survives_a_lost_client,
);
