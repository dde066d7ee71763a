//! HTTP conformance and node readiness: 405 with `Allow`, readiness that says why, draining
//! that answers instead of refusing connections, the connection cap, an exec cut short by a
//! release, and no unauthenticated API on a reachable address.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arl::api::{ErrorCode, ExecResult, PoolSpec, PoolView};
use common::{BIN, Daemon, Options, cmd};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_methods_answer_405_with_allow() {
    let d = Daemon::start(Options::default()).await;
    for (method, path, allow) in [
        (Method::PUT, "/v1/sandboxes/sb-x", "GET, DELETE"),
        (Method::GET, "/v1/sandboxes/sb-x/exec", "POST"),
        (Method::DELETE, "/v1/pools", "GET"),
        (Method::POST, "/healthz", "GET"),
    ] {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .expect("connect");
        let head = read_head(
            stream,
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 405"), "{method} {path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{method} {path}: {head}"
        );
        assert!(head.contains("method_not_allowed"), "{head}");
    }
    // Unknown paths stay 404.
    let err = d
        .send_empty(Method::GET, "/v1/nothing")
        .await
        .expect_error(StatusCode::NOT_FOUND);
    assert_eq!(err.code, ErrorCode::NotFound);
}

/// Sends a raw request and reads the response until the connection closes or 64 KiB arrive.
async fn read_head(mut stream: tokio::net::TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got < buf.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            // Kept alive: what came is the whole answer once the body is in.
            Err(_) if got > 0 => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&buf[..got]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_why_while_no_pool_can_create() {
    let d = Daemon::start(Options {
        config: Some("[pools.broken]\nmin_idle = 1\nrootfs = \"/nonexistent/rootfs\"\n".into()),
        ..Options::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let reply = d.send_empty(Method::GET, "/readyz").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply.error();
        }
        assert!(Instant::now() < deadline, "still {reply}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(err.code, ErrorCode::SandboxUnavailable, "{err:?}");
    assert!(
        err.message.contains("\"broken\""),
        "names the pool: {}",
        err.message
    );
    // Liveness is another matter: the process answers.
    let reply = d.send_empty(Method::GET, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply}");
    // A working pool makes the node ready again.
    let spec = PoolSpec {
        min_idle: 1,
        max: 2,
        ..PoolSpec::default()
    };
    let view: PoolView = d
        .send(Method::PUT, "/v1/pools/fine", Some(&spec))
        .await
        .expect(StatusCode::OK);
    assert_eq!(view.spec, spec);
    d.wait_status("fine", 20, |s| s.idle >= 1).await;
    let reply = d.send_empty(Method::GET, "/readyz").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_503_while_running_work_finishes() {
    let mut d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    let running = d.exec_in_background(&id, "sleep 1; echo finished");
    // The command is running once the sandbox shows a `sleep` process.
    wait_for_process(&d, &id, "sleep").await;
    let pid = d.pid();
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = d.send_empty(Method::GET, "/readyz").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(reply.error().code, ErrorCode::Draining, "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "never drained: {reply}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New work gets a clear, retryable answer on an open listener.
    let err = d
        .send(
            Method::POST,
            "/v1/sandboxes",
            Some(&common::acquire("default")),
        )
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.code, ErrorCode::Draining);
    assert!(err.retryable);
    let reply = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&cmd(&["true"])),
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    // The command that was running finishes and answers.
    let r: ExecResult = running.await.expect("exec task").expect(StatusCode::OK);
    assert_eq!(r.stdout, "finished\n");
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_cut_short_by_a_release_says_released() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    let running = d.exec_in_background(&id, "sleep 30");
    wait_for_process(&d, &id, "sleep").await;
    assert_eq!(d.release(&id).await, StatusCode::NO_CONTENT);
    let err = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the exec ends with the sandbox")
        .expect("exec task")
        .expect_error(StatusCode::GONE);
    assert_eq!(err.code, ErrorCode::Released, "{err:?}");
    assert!(!err.retryable, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_a_clear_503() {
    let d = Daemon::start(Options {
        args: vec!["--max-connections".into(), "2".into()],
        ..Options::default()
    })
    .await;
    // Two idle connections hold both places (the harness's readiness probe has closed its own).
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        held.clear();
        for _ in 0..2 {
            held.push(
                tokio::net::TcpStream::connect(("127.0.0.1", d.port))
                    .await
                    .expect("connect"),
            );
        }
        let third = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .expect("connect");
        let answer = read_head(third, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("overloaded"), "{answer}");
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{answer}"
            );
            break;
        }
        // An earlier connection was still being closed by the daemon: try again.
        assert!(Instant::now() < deadline, "never capped: {answer}");
    }
    drop(held);
    // Places come back when connections close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((StatusCode::OK, _)) = d.request_raw(Method::GET, "/healthz", None, None).await {
            break;
        }
        assert!(Instant::now() < deadline, "the cap never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn no_unauthenticated_api_on_a_reachable_address() {
    let dir = common::tempdir::TempDir::new("unauth");
    let out = Command::new(BIN)
        .args(["node", "--listen", "0.0.0.0:0", "--state-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run arl node");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve an unauthenticated API")
            && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_unauthenticated_serves_anyway() {
    let d = Daemon::start_on(
        "0.0.0.0",
        Options {
            args: vec!["--allow-unauthenticated".into()],
            ..Options::default()
        },
    )
    .await;
    let pools: arl::api::PoolList = d.get("/v1/pools").await;
    assert!(!pools.pools.is_empty(), "{pools:?}");
    assert!(d.log().contains("NO AUTHENTICATION"), "{}", d.log());
}

/// Waits until a process whose command line starts with `name` runs in the sandbox.
async fn wait_for_process(d: &Daemon, id: &str, name: &str) {
    let agent = d.agent_pid(id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !descendants(agent).iter().any(|cmd| cmd.starts_with(name)) {
        assert!(Instant::now() < deadline, "no {name} in sandbox {id}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The command names of a process's descendants.
fn descendants(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            if let Ok(comm) = std::fs::read_to_string(format!("/proc/{child}/comm")) {
                out.push(comm.trim().to_string());
            }
            stack.push(child);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_front_thread_serves() {
    let d = Daemon::start(Options {
        args: vec!["--front-threads".into(), "3".into()],
        ..Options::default()
    })
    .await;
    // A thread names itself once it first runs, which under load can be a moment after the
    // node answers.
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .expect("tasks")
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| c.starts_with("arl-http"))
            .collect();
        names.sort();
        names
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while names().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(names(), ["arl-http-0", "arl-http-1", "arl-http-2"]);
    // Many connections at once, each answered, whichever thread took it.
    let calls = (0..96).map(|_| {
        let port = d.port;
        tokio::spawn(async move {
            Daemon::attach(port)
                .request_raw(Method::GET, "/v1/pools", None, None)
                .await
        })
    });
    for call in futures_util::future::join_all(calls).await {
        let (status, _) = call.expect("task").expect("answer");
        assert_eq!(status, StatusCode::OK);
    }
    // And they spread over the threads: each thread has a listener of its own in one
    // SO_REUSEPORT group, so every thread accepted some of the 96 (by the kernel's hash of
    // the connections' ports, all on one of 3 threads has odds of ~1e-16). With one shared
    // listener, the first thread to wake took whole bursts.
    let metrics = d.metrics_text().await;
    for thread in 0..3 {
        let accepted: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "arl_http_connections_total{{thread=\"{thread}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(
            accepted > 0.0,
            "front thread {thread} accepted no connection:\n{metrics}"
        );
    }
}
