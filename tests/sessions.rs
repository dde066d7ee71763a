//! Persistent sessions through a real daemon into real sandboxes: shell state across
//! commands, timeouts that leave the session usable, live Python interpreters, isolation,
//! bounds, streaming, and the sandbox's trajectory.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Daemon, Options, Runtime};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

async fn open(d: &Daemon, id: &str, kind: &str) -> String {
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions"),
            Some(json!({"kind": kind})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "open {kind}: {body}");
    assert_eq!(body["kind"], kind);
    body["id"].as_str().expect("session id").to_string()
}

async fn run_with(d: &Daemon, id: &str, sid: &str, req: Value) -> Value {
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{sid}/run"),
            Some(req),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "run: {body}");
    body
}

async fn run(d: &Daemon, id: &str, sid: &str, code: &str) -> Value {
    run_with(d, id, sid, json!({"code": code})).await
}

/// Waits (up to 20 s) until the session is, or is no longer, running a command.
async fn wait_busy(d: &Daemon, id: &str, sid: &str, busy: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, info) = d
            .call(
                Method::GET,
                &format!("/v1/sandboxes/{id}/sessions/{sid}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{info}");
        if info["busy"] == busy {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "busy never became {busy}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn shell_state_survives_across_commands(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, "shell").await;
    let r = run(
        &d,
        &id,
        &sh,
        "cd /tmp && export GREETING=hello; greet() { echo \"$GREETING $1\"; }; sleep 60 & echo started",
    )
    .await;
    assert_eq!(r["stdout"], "started\n", "{r}");
    assert_eq!(r["exit_code"], 0);
    let r = run(
        &d,
        &id,
        &sh,
        "pwd; greet world; kill -0 $! && echo job alive; echo oops >&2; false",
    )
    .await;
    assert_eq!(r["stdout"], "/tmp\nhello world\njob alive\n", "{r}");
    assert_eq!(r["stderr"], "oops\n");
    assert_eq!(r["exit_code"], 1);
    assert_eq!(r["timed_out"], false);
    // A syntax error is the command's status, not the session's end.
    let r = run(&d, &id, &sh, "echo \"unterminated").await;
    assert_ne!(r["exit_code"], 0, "{r}");
    assert!(!r["stderr"].as_str().unwrap_or("").is_empty(), "{r}");
    let r = run(
        &d,
        &id,
        &sh,
        "echo \"$GREETING\" 'quoted' && sh -c 'exit 7'",
    )
    .await;
    assert_eq!(r["stdout"], "hello quoted\n", "{r}");
    assert_eq!(r["exit_code"], 7);
    // Commands cannot read the session's own input.
    let r = run(&d, &id, &sh, "cat; echo after-cat").await;
    assert_eq!(r["stdout"], "after-cat\n", "{r}");
    let (status, info) = d
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/sessions/{sh}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["runs"], 5);
    assert_eq!(info["busy"], false);
}

async fn a_timed_out_command_leaves_its_session_usable(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, "shell").await;
    run(&d, &id, &sh, "export KEPT=yes; sleep 60 &").await;
    for code in ["echo before; sleep 30; echo never", "while :; do :; done"] {
        let started = Instant::now();
        let r = run_with(&d, &id, &sh, json!({"code": code, "timeout_ms": 300})).await;
        assert_eq!(r["timed_out"], true, "{code}: {r}");
        assert_eq!(r["exit_code"], 130, "{code}: SIGINT: {r}");
        assert_eq!(r["session_ended"], false);
        assert!(!r["stdout"].as_str().unwrap_or("").contains("never"), "{r}");
        assert!(started.elapsed() < Duration::from_secs(10), "{code}");
        let r = run(&d, &id, &sh, "echo $KEPT; kill -0 $! && echo job alive").await;
        assert_eq!(
            r["stdout"], "yes\njob alive\n",
            "state and background jobs outlive the interrupt: {r}"
        );
    }
    // A command that ignores SIGINT is killed after the grace period; the session stays.
    let r = run_with(
        &d,
        &id,
        &sh,
        json!({"code": "sh -c \"trap '' INT; sleep 60\"", "timeout_ms": 200}),
    )
    .await;
    assert_eq!(r["timed_out"], true, "{r}");
    // The shell's trap reports the interrupt once the killed child is gone.
    assert_eq!(r["exit_code"], 130, "{r}");
    assert!(
        r["duration_ms"].as_f64().unwrap_or(0.0) >= 2000.0,
        "killed after the grace: {r}"
    );
    assert_eq!(r["session_ended"], false, "{r}");
    let r = run(&d, &id, &sh, "echo $KEPT").await;
    assert_eq!(r["stdout"], "yes\n", "{r}");
}

async fn sessions_of_a_sandbox_are_isolated_and_bounded(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let a = open(&d, &id, "shell").await;
    let b = open(&d, &id, "shell").await;
    assert_ne!(a, b);
    run(&d, &id, &a, "cd /tmp; export ONLY_A=1; f() { :; }").await;
    let r = run(
        &d,
        &id,
        &b,
        "pwd; echo \"[${ONLY_A:-}]\"; command -v f || echo no-f",
    )
    .await;
    assert_eq!(r["stdout"], "/workspace\n[]\nno-f\n", "{r}");

    // One run at a time per session; another session is not held up.
    let port = d.port;
    let path = format!("/v1/sandboxes/{id}/sessions/{a}/run");
    let body = Bytes::from(r#"{"code": "sleep 60", "timeout_ms": 60000}"#);
    let busy = tokio::spawn(async move {
        common::request(port, Method::POST, &path, Some(body), None, &[]).await
    });
    wait_busy(&d, &id, &a, true).await;
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{a}/run"),
            Some(json!({"code": "true"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(run(&d, &id, &b, "echo free").await["stdout"], "free\n");
    // Closing a session stops its command (and the run reports the session's end).
    let (status, _) = d
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/sessions/{a}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = busy.await.expect("task").expect("request");
    assert_eq!(status, StatusCode::OK);
    let ended: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(ended["session_ended"], true, "{ended}");
    let (status, _) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{a}/run"),
            Some(json!({"code": "true"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // `exit` ends the session and says so.
    let r = run(&d, &id, &b, "echo bye; exit 4").await;
    assert_eq!(r["session_ended"], true, "{r}");
    assert_eq!(r["exit_code"], 4, "{r}");
    assert_eq!(r["stdout"], "bye\n");

    // At most 16 live sessions per sandbox.
    for _ in 0..16 {
        open(&d, &id, "shell").await;
    }
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions"),
            Some(json!({"kind": "shell"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, list) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/sessions"), None)
        .await;
    assert_eq!(
        list["sessions"].as_array().map(Vec::len),
        Some(16),
        "{list}"
    );

    // Output past the cap is dropped and flagged; the session stays in step.
    let sh = list["sessions"][0]["id"].as_str().expect("id").to_string();
    let r = run_with(
        &d,
        &id,
        &sh,
        json!({"code": "i=0; while [ $i -lt 2000 ]; do echo 0123456789; i=$((i+1)); done", "max_output_bytes": 100}),
    )
    .await;
    assert_eq!(r["truncated"], true, "{r}");
    assert_eq!(r["stdout"].as_str().map(str::len), Some(100));
    assert_eq!(run(&d, &id, &sh, "echo next").await["stdout"], "next\n");
}

async fn runs_stream_as_ndjson(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, "shell").await;
    let (status, body) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{sh}/run"),
            Some(Bytes::from(
                r#"{"code": "echo one; echo two >&2; echo three; exit_code=5; (exit $exit_code)"}"#,
            )),
            None,
            &[("accept", "application/x-ndjson")],
        )
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    let events: Vec<Value> = std::str::from_utf8(&body)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let text = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["data"].as_str().unwrap_or_default())
            .collect()
    };
    assert_eq!(text("stdout"), "one\nthree\n", "{events:?}");
    assert_eq!(text("stderr"), "two\n");
    let last = events.last().expect("events");
    assert_eq!(last["type"], "result");
    assert_eq!(last["exit_code"], 5);
}

/// A streamed run whose client goes away is interrupted even when it writes nothing (the
/// agent watches the stream, not only its output), so the session is soon free again.
async fn an_abandoned_silent_run_is_interrupted(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, "shell").await;
    let abandoned = Instant::now();
    {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        let conn = tokio::spawn(conn);
        let request = hyper::Request::post(format!("/v1/sandboxes/{id}/sessions/{sh}/run"))
            .header("host", "localhost")
            .header("accept", "application/x-ndjson")
            .body(http_body_util::Full::new(Bytes::from(
                r#"{"code": "sleep 60; echo never", "timeout_ms": 120000}"#,
            )))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        drop(sender);
        conn.abort();
    }
    // The session is free well before the command's 60 s (SIGINT stops `sleep` at once).
    wait_busy(&d, &id, &sh, false).await;
    assert!(abandoned.elapsed() < Duration::from_secs(20));
    let r = run(&d, &id, &sh, "echo free").await;
    assert_eq!(r["stdout"], "free\n", "{r}");
}

on_every_runtime!(
    an_abandoned_silent_run_is_interrupted,
    shell_state_survives_across_commands,
    a_timed_out_command_leaves_its_session_usable,
    sessions_of_a_sandbox_are_isolated_and_bounded,
    runs_stream_as_ndjson,
);

/// Python sessions run on process sandboxes (the host's python3 under the overlay; the
/// containerd test image has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sessions_keep_their_variables_and_report_values_and_errors() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    let py = open(&d, &id, "python").await;
    let r = run(&d, &id, &py, "x = 41\nprint('hi')\nx + 1").await;
    assert_eq!(r["stdout"], "hi\n", "{r}");
    assert_eq!(r["value"], "42");
    assert_eq!(r["exit_code"], 0);
    assert!(r.get("error").is_none(), "{r}");
    let r = run(&d, &id, &py, "x += 1\nx").await;
    assert_eq!(r["value"], "42", "variables persist: {r}");
    let r = run(&d, &id, &py, "y = None").await;
    assert!(r.get("value").is_none(), "a statement has no value: {r}");

    let r = run(
        &d,
        &id,
        &py,
        "import sys\nprint('to stderr', file=sys.stderr)\ndef f():\n    return 1 / 0\nf()",
    )
    .await;
    assert_eq!(r["exit_code"], 1, "{r}");
    assert_eq!(r["stderr"], "to stderr\n");
    assert_eq!(r["error"]["ename"], "ZeroDivisionError");
    assert_eq!(r["error"]["evalue"], "division by zero");
    let tb = r["error"]["traceback"].as_array().expect("traceback");
    assert_eq!(
        tb.first().and_then(Value::as_str),
        Some("Traceback (most recent call last):")
    );
    assert_eq!(
        tb.last().and_then(Value::as_str),
        Some("ZeroDivisionError: division by zero")
    );
    assert!(
        tb.iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("return 1 / 0"))),
        "the snippet's own lines: {tb:?}"
    );
    assert!(
        !tb.iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("_run"))),
        "no helper frames: {tb:?}"
    );

    // Rich output where the object offers it.
    let r = run(
        &d,
        &id,
        &py,
        "class Card:\n    def _repr_html_(self):\n        return '<b>card</b>'\n    def __repr__(self):\n        return 'Card()'\nCard()",
    )
    .await;
    assert_eq!(r["value"], "Card()", "{r}");
    assert_eq!(r["data"]["text/html"], "<b>card</b>");
    assert_eq!(r["data"]["text/plain"], "Card()");

    // Ctrl-C on timeout interrupts a busy loop; the interpreter and its variables stay.
    let started = Instant::now();
    let r = run_with(
        &d,
        &id,
        &py,
        json!({"code": "n = 0\nwhile True:\n    n += 1", "timeout_ms": 300}),
    )
    .await;
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["error"]["ename"], "KeyboardInterrupt", "{r}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = run(&d, &id, &py, "(x, n > 0)").await;
    assert_eq!(r["value"], "(42, True)", "{r}");
    // input() reads nothing of the session's own requests.
    let r = run(&d, &id, &py, "input()").await;
    assert_eq!(r["error"]["ename"], "EOFError", "{r}");

    // Huge messages and values are cut, and the session stays in step.
    let r = run(&d, &id, &py, "raise ValueError('v' * 40_000_000)").await;
    assert_eq!(r["error"]["ename"], "ValueError");
    let evalue = r["error"]["evalue"].as_str().unwrap_or_default();
    assert!(
        evalue.len() <= (1 << 20) + 3 && evalue.ends_with("..."),
        "{}",
        evalue.len()
    );
    let r = run(&d, &id, &py, "'w' * 40_000_000").await;
    assert!(
        r["value"]
            .as_str()
            .is_some_and(|v| v.len() <= (1 << 20) + 3)
    );
    assert_eq!(run(&d, &id, &py, "x").await["value"], "42");

    // Python sessions are isolated from each other.
    let other = open(&d, &id, "python").await;
    let r = run(&d, &id, &other, "'x' in globals()").await;
    assert_eq!(r["value"], "False", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_requests_get_clear_errors() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    for (body, status) in [
        (json!({"kind": "ruby"}), StatusCode::BAD_REQUEST),
        (
            json!({"kind": "shell", "cwd": "/no/such/dir"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"kind": "shell", "env": {"A=B": "x"}}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (got, answer) = d
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/sessions"),
                Some(body),
            )
            .await;
        assert_eq!(got, status, "{answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    for sid in ["shell-999", "Bad..Id"] {
        let (got, _) = d
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/sessions/{sid}/run"),
                Some(json!({"code": "true"})),
            )
            .await;
        assert_eq!(got, StatusCode::NOT_FOUND, "{sid}");
    }
    let sh = open(&d, &id, "shell").await;
    let (got, answer) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{sh}/run"),
            Some(json!({"code": "a\u{0}b"})),
        )
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(run(&d, &id, &sh, "echo fine").await["stdout"], "fine\n");
}

/// The sandbox's trajectory, one JSON value a step.
async fn trajectory(d: &Daemon, id: &str) -> Vec<Value> {
    let (status, body) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/trajectory"),
            None,
            None,
        )
        .await
        .expect("trajectory");
    assert_eq!(status, StatusCode::OK);
    std::str::from_utf8(&body)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trajectory_records_actions_in_order_within_its_bound() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    d.sh(&id, "echo hello").await;
    assert_eq!(d.put_file(&id, "notes.txt", b"abc").await, StatusCode::OK);
    let sh = open(&d, &id, "shell").await;
    run(&d, &id, &sh, "echo in-session; false").await;
    let steps = trajectory(&d, &id).await;
    let actions: Vec<&str> = steps.iter().filter_map(|s| s["action"].as_str()).collect();
    assert_eq!(
        actions,
        ["exec", "file_write", "session_open", "session_run"],
        "{steps:?}"
    );
    assert_eq!(steps[0]["input"], "echo hello");
    assert_eq!(steps[0]["stdout"], "hello\n");
    assert_eq!(steps[0]["exit_code"], 0);
    assert_eq!(steps[1]["input"], "notes.txt");
    assert_eq!(steps[1]["bytes"], 3);
    assert_eq!(steps[2]["session"], sh.as_str());
    assert_eq!(steps[3]["exit_code"], 1);
    assert_eq!(steps[3]["stdout"], "in-session\n");
    let seqs: Vec<u64> = steps.iter().filter_map(|s| s["seq"].as_u64()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert!(
        steps
            .windows(2)
            .all(|w| w[0]["at_ms"].as_u64() <= w[1]["at_ms"].as_u64())
    );

    // Bounded: the oldest steps give way, the rest stay in order.
    for _ in 0..260 {
        run(&d, &id, &sh, "true").await;
    }
    let seqs: Vec<u64> = trajectory(&d, &id)
        .await
        .iter()
        .map(|s| s["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs.len(), 256);
    assert_eq!(seqs.last(), Some(&264));
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}
