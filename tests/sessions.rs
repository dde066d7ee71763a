//! Persistent sessions through a real daemon into real sandboxes: shell state across
//! commands, timeouts that leave the session usable, live Python interpreters, isolation,
//! bounds, streaming, and the sandbox's trajectory.

mod common;

use std::time::{Duration, Instant};

use arl::api::ErrorCode;
use arl::api::sessions::{
    CreateSessionRequest, RunEvent, RunRequest, RunResult, SessionInfo, SessionKind, SessionList,
};
use arl::node::trajectory::Step;
use bytes::Bytes;
use common::{Daemon, Options, Runtime, map};
use hyper::{Method, StatusCode};
use serde_json::json;

/// A session request of `kind`, with no env or cwd.
fn session(kind: SessionKind) -> CreateSessionRequest {
    CreateSessionRequest {
        kind,
        env: Default::default(),
        cwd: None,
    }
}

async fn open(d: &Daemon, id: &str, kind: SessionKind) -> String {
    let info: SessionInfo = d
        .post(
            &format!("/v1/sandboxes/{id}/sessions"),
            &session(kind),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(info.kind, kind);
    info.id
}

/// A run of `code`, with no timeout or output cap.
fn code(code: &str) -> RunRequest {
    RunRequest {
        code: code.into(),
        timeout_ms: None,
        max_output_bytes: None,
    }
}

async fn run_with(d: &Daemon, id: &str, sid: &str, req: &RunRequest) -> RunResult {
    d.post(
        &format!("/v1/sandboxes/{id}/sessions/{sid}/run"),
        req,
        StatusCode::OK,
    )
    .await
}

async fn run(d: &Daemon, id: &str, sid: &str, snippet: &str) -> RunResult {
    run_with(d, id, sid, &code(snippet)).await
}

/// A run of `snippet` interrupted after `timeout_ms`.
fn timed(snippet: &str, timeout_ms: u64) -> RunRequest {
    RunRequest {
        timeout_ms: Some(timeout_ms),
        ..code(snippet)
    }
}

/// Waits (up to 20 s) until the session is, or is no longer, running a command.
async fn wait_busy(d: &Daemon, id: &str, sid: &str, busy: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: SessionInfo = d.get(&format!("/v1/sandboxes/{id}/sessions/{sid}")).await;
        if info.busy == busy {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "busy never became {busy}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn shell_state_survives_across_commands(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, SessionKind::Shell).await;
    let r = run(
        &d,
        &id,
        &sh,
        "cd /tmp && export GREETING=hello; greet() { echo \"$GREETING $1\"; }; sleep 60 & echo started",
    )
    .await;
    assert_eq!(r.stdout, "started\n", "{r:?}");
    assert_eq!(r.exit_code, 0);
    let r = run(
        &d,
        &id,
        &sh,
        "pwd; greet world; kill -0 $! && echo job alive; echo oops >&2; false",
    )
    .await;
    assert_eq!(r.stdout, "/tmp\nhello world\njob alive\n", "{r:?}");
    assert_eq!(r.stderr, "oops\n");
    assert_eq!(r.exit_code, 1);
    assert!(!r.timed_out);
    // A syntax error is the command's status, not the session's end.
    let r = run(&d, &id, &sh, "echo \"unterminated").await;
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert!(!r.stderr.is_empty(), "{r:?}");
    let r = run(
        &d,
        &id,
        &sh,
        "echo \"$GREETING\" 'quoted' && sh -c 'exit 7'",
    )
    .await;
    assert_eq!(r.stdout, "hello quoted\n", "{r:?}");
    assert_eq!(r.exit_code, 7);
    // Commands cannot read the session's own input.
    let r = run(&d, &id, &sh, "cat; echo after-cat").await;
    assert_eq!(r.stdout, "after-cat\n", "{r:?}");
    let info: SessionInfo = d.get(&format!("/v1/sandboxes/{id}/sessions/{sh}")).await;
    assert_eq!(info.id, sh);
    assert_eq!(info.runs, 5);
    assert!(!info.busy);
}

async fn a_timed_out_command_leaves_its_session_usable(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, SessionKind::Shell).await;
    run(&d, &id, &sh, "export KEPT=yes; sleep 60 &").await;
    for snippet in ["echo before; sleep 30; echo never", "while :; do :; done"] {
        let started = Instant::now();
        let r = run_with(&d, &id, &sh, &timed(snippet, 300)).await;
        assert!(r.timed_out, "{snippet}: {r:?}");
        assert_eq!(r.exit_code, 130, "{snippet}: SIGINT: {r:?}");
        assert!(!r.session_ended);
        assert!(!r.stdout.contains("never"), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{snippet}");
        let r = run(&d, &id, &sh, "echo $KEPT; kill -0 $! && echo job alive").await;
        assert_eq!(
            r.stdout, "yes\njob alive\n",
            "state and background jobs outlive the interrupt: {r:?}"
        );
    }
    // A command that ignores SIGINT is killed after the grace period; the session stays.
    let r = run_with(&d, &id, &sh, &timed("sh -c \"trap '' INT; sleep 60\"", 200)).await;
    assert!(r.timed_out, "{r:?}");
    // The shell's trap reports the interrupt once the killed child is gone.
    assert_eq!(r.exit_code, 130, "{r:?}");
    assert!(r.duration_ms >= 2000.0, "killed after the grace: {r:?}");
    assert!(!r.session_ended, "{r:?}");
    let r = run(&d, &id, &sh, "echo $KEPT").await;
    assert_eq!(r.stdout, "yes\n", "{r:?}");
}

async fn sessions_of_a_sandbox_are_isolated_and_bounded(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let a = open(&d, &id, SessionKind::Shell).await;
    let b = open(&d, &id, SessionKind::Shell).await;
    assert_ne!(a, b);
    run(&d, &id, &a, "cd /tmp; export ONLY_A=1; f() { :; }").await;
    let r = run(
        &d,
        &id,
        &b,
        "pwd; echo \"[${ONLY_A:-}]\"; command -v f || echo no-f",
    )
    .await;
    assert_eq!(r.stdout, "/workspace\n[]\nno-f\n", "{r:?}");

    // One run at a time per session; another session is not held up.
    let port = d.port;
    let path = format!("/v1/sandboxes/{id}/sessions/{a}/run");
    let body = Bytes::from(serde_json::to_vec(&timed("sleep 60", 60000)).expect("json"));
    let busy = tokio::spawn(async move {
        common::request(port, Method::POST, &path, Some(body), None, &[]).await
    });
    wait_busy(&d, &id, &a, true).await;
    let run_a = format!("/v1/sandboxes/{id}/sessions/{a}/run");
    let err = d
        .send(Method::POST, &run_a, Some(&code("true")))
        .await
        .expect_error(StatusCode::CONFLICT);
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(run(&d, &id, &b, "echo free").await.stdout, "free\n");
    // Closing a session stops its command (and the run reports the session's end).
    let reply = d
        .send_empty(Method::DELETE, &format!("/v1/sandboxes/{id}/sessions/{a}"))
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{reply}");
    let (status, body) = busy.await.expect("task").expect("request");
    let ended: RunResult = common::Reply { status, body }.expect(StatusCode::OK);
    assert!(ended.session_ended, "{ended:?}");
    let err = d
        .send(Method::POST, &run_a, Some(&code("true")))
        .await
        .expect_error(StatusCode::NOT_FOUND);
    assert_eq!(err.code, ErrorCode::NotFound);

    // `exit` ends the session and says so.
    let r = run(&d, &id, &b, "echo bye; exit 4").await;
    assert!(r.session_ended, "{r:?}");
    assert_eq!(r.exit_code, 4, "{r:?}");
    assert_eq!(r.stdout, "bye\n");

    // At most 16 live sessions per sandbox.
    for _ in 0..16 {
        open(&d, &id, SessionKind::Shell).await;
    }
    let err = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions"),
            Some(&session(SessionKind::Shell)),
        )
        .await
        .expect_error(StatusCode::CONFLICT);
    assert_eq!(err.code, ErrorCode::Conflict);
    let list: SessionList = d.get(&format!("/v1/sandboxes/{id}/sessions")).await;
    assert_eq!(list.sessions.len(), 16, "{list:?}");

    // Output past the cap is dropped and flagged; the session stays in step.
    let sh = list.sessions[0].id.clone();
    let r = run_with(
        &d,
        &id,
        &sh,
        &RunRequest {
            max_output_bytes: Some(100),
            ..code("i=0; while [ $i -lt 2000 ]; do echo 0123456789; i=$((i+1)); done")
        },
    )
    .await;
    assert!(r.truncated, "{r:?}");
    assert_eq!(r.stdout.len(), 100);
    assert_eq!(run(&d, &id, &sh, "echo next").await.stdout, "next\n");
}

async fn runs_stream_as_ndjson(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, SessionKind::Shell).await;
    let req = code("echo one; echo two >&2; echo three; exit_code=5; (exit $exit_code)");
    let (status, body) = d
        .request_with(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{sh}/run"),
            Some(Bytes::from(serde_json::to_vec(&req).expect("json"))),
            None,
            &[("accept", "application/x-ndjson")],
        )
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    let events: Vec<RunEvent> = common::ndjson(&body);
    let stdout: String = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Stdout { data } => Some(data.as_str()),
            _ => None,
        })
        .collect();
    let stderr: String = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Stderr { data } => Some(data.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stdout, "one\nthree\n", "{events:?}");
    assert_eq!(stderr, "two\n");
    let Some(RunEvent::Result(last)) = events.last() else {
        panic!("the stream ends with its result: {events:?}")
    };
    assert_eq!(last.exit_code, 5);
}

/// A streamed run whose client goes away is interrupted even when it writes nothing (the
/// agent watches the stream, not only its output), so the session is soon free again.
async fn an_abandoned_silent_run_is_interrupted(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let sh = open(&d, &id, SessionKind::Shell).await;
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
                serde_json::to_vec(&timed("sleep 60; echo never", 120000)).expect("json"),
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
    assert_eq!(r.stdout, "free\n", "{r:?}");
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
    let py = open(&d, &id, SessionKind::Python).await;
    let r = run(&d, &id, &py, "x = 41\nprint('hi')\nx + 1").await;
    assert_eq!(r.stdout, "hi\n", "{r:?}");
    assert_eq!(r.value.as_deref(), Some("42"));
    assert_eq!(r.exit_code, 0);
    assert!(r.error.is_none(), "{r:?}");
    let r = run(&d, &id, &py, "x += 1\nx").await;
    assert_eq!(r.value.as_deref(), Some("42"), "variables persist: {r:?}");
    let r = run(&d, &id, &py, "y = None").await;
    assert!(r.value.is_none(), "a statement has no value: {r:?}");

    let r = run(
        &d,
        &id,
        &py,
        "import sys\nprint('to stderr', file=sys.stderr)\ndef f():\n    return 1 / 0\nf()",
    )
    .await;
    assert_eq!(r.exit_code, 1, "{r:?}");
    assert_eq!(r.stderr, "to stderr\n");
    let error = r.error.as_ref().expect("an exception");
    assert_eq!(error.ename, "ZeroDivisionError");
    assert_eq!(error.evalue, "division by zero");
    let tb = &error.traceback;
    assert_eq!(
        tb.first().map(String::as_str),
        Some("Traceback (most recent call last):")
    );
    assert_eq!(
        tb.last().map(String::as_str),
        Some("ZeroDivisionError: division by zero")
    );
    assert!(
        tb.iter().any(|l| l.contains("return 1 / 0")),
        "the snippet's own lines: {tb:?}"
    );
    assert!(
        !tb.iter().any(|l| l.contains("_run")),
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
    assert_eq!(r.value.as_deref(), Some("Card()"), "{r:?}");
    // The rich representations are free-form JSON by MIME type in the model too.
    let data = r.data.as_ref().expect("rich output");
    assert_eq!(data.get("text/html"), Some(&json!("<b>card</b>")));
    assert_eq!(data.get("text/plain"), Some(&json!("Card()")));

    // Ctrl-C on timeout interrupts a busy loop; the interpreter and its variables stay.
    let ename = |r: &RunResult| r.error.as_ref().map(|e| e.ename.clone());
    let started = Instant::now();
    let r = run_with(&d, &id, &py, &timed("n = 0\nwhile True:\n    n += 1", 300)).await;
    assert!(r.timed_out, "{r:?}");
    assert_eq!(ename(&r).as_deref(), Some("KeyboardInterrupt"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = run(&d, &id, &py, "(x, n > 0)").await;
    assert_eq!(r.value.as_deref(), Some("(42, True)"), "{r:?}");
    // input() reads nothing of the session's own requests.
    let r = run(&d, &id, &py, "input()").await;
    assert_eq!(ename(&r).as_deref(), Some("EOFError"), "{r:?}");

    // Huge messages and values are cut, and the session stays in step.
    let r = run(&d, &id, &py, "raise ValueError('v' * 40_000_000)").await;
    let error = r.error.expect("an exception");
    assert_eq!(error.ename, "ValueError");
    let evalue = error.evalue;
    assert!(
        evalue.len() <= (1 << 20) + 3 && evalue.ends_with("..."),
        "{}",
        evalue.len()
    );
    let r = run(&d, &id, &py, "'w' * 40_000_000").await;
    assert!(r.value.is_some_and(|v| v.len() <= (1 << 20) + 3));
    assert_eq!(run(&d, &id, &py, "x").await.value.as_deref(), Some("42"));

    // Python sessions are isolated from each other.
    let other = open(&d, &id, SessionKind::Python).await;
    let r = run(&d, &id, &other, "'x' in globals()").await;
    assert_eq!(r.value.as_deref(), Some("False"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_requests_get_clear_errors() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    let sessions = format!("/v1/sandboxes/{id}/sessions");
    // A kind the `SessionKind` model has no name for: raw JSON.
    let err = d
        .send(Method::POST, &sessions, Some(&json!({"kind": "ruby"})))
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(!err.message.is_empty(), "{err:?}");
    for body in [
        CreateSessionRequest {
            cwd: Some("/no/such/dir".into()),
            ..session(SessionKind::Shell)
        },
        CreateSessionRequest {
            env: map(&[("A=B", "x")]),
            ..session(SessionKind::Shell)
        },
    ] {
        let err = d
            .send(Method::POST, &sessions, Some(&body))
            .await
            .expect_error(StatusCode::BAD_REQUEST);
        assert_eq!(err.code, ErrorCode::BadRequest, "{body:?}");
        assert!(!err.message.is_empty(), "{err:?}");
    }
    for sid in ["shell-999", "Bad..Id"] {
        let err = d
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{id}/sessions/{sid}/run"),
                Some(&code("true")),
            )
            .await
            .expect_error(StatusCode::NOT_FOUND);
        assert_eq!(err.code, ErrorCode::NotFound, "{sid}");
    }
    let sh = open(&d, &id, SessionKind::Shell).await;
    let err = d
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/sessions/{sh}/run"),
            Some(&code("a\u{0}b")),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert_eq!(run(&d, &id, &sh, "echo fine").await.stdout, "fine\n");
}

/// The sandbox's trajectory, one JSON line a step.
async fn trajectory(d: &Daemon, id: &str) -> Vec<Step> {
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
    common::ndjson(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trajectory_records_actions_in_order_within_its_bound() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    d.shell(&id, "echo hello").await;
    assert_eq!(d.put_file(&id, "notes.txt", b"abc").await, StatusCode::OK);
    let sh = open(&d, &id, SessionKind::Shell).await;
    run(&d, &id, &sh, "echo in-session; false").await;
    let steps = trajectory(&d, &id).await;
    let actions: Vec<&str> = steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(
        actions,
        ["exec", "file_write", "session_open", "session_run"],
        "{steps:?}"
    );
    assert_eq!(steps[0].input.as_deref(), Some("echo hello"));
    assert_eq!(steps[0].stdout.as_deref(), Some("hello\n"));
    assert_eq!(steps[0].exit_code, Some(0));
    assert_eq!(steps[1].input.as_deref(), Some("notes.txt"));
    assert_eq!(steps[1].bytes, Some(3));
    assert_eq!(steps[2].session.as_deref(), Some(sh.as_str()));
    assert_eq!(steps[3].exit_code, Some(1));
    assert_eq!(steps[3].stdout.as_deref(), Some("in-session\n"));
    let seqs: Vec<u64> = steps.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert!(steps.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));

    // Bounded: the oldest steps give way, the rest stay in order.
    for _ in 0..260 {
        run(&d, &id, &sh, "true").await;
    }
    let seqs: Vec<u64> = trajectory(&d, &id).await.iter().map(|s| s.seq).collect();
    assert_eq!(seqs.len(), 256);
    assert_eq!(seqs.last(), Some(&264));
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}
