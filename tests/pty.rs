//! The interactive terminal (`GET /v1/sandboxes/{id}/pty`) driven by a WebSocket client
//! through a real daemon into real sandboxes: echo, resize seen by `stty size`, Ctrl-C, a
//! signal message, the exit status, and clear refusals.
//!
//! Output is matched on what only the shell's work can print (`$((1+1))` expanded), never on
//! the terminal's echo of what was typed.

mod common;

use std::time::{Duration, Instant};

use arl::api::ErrorCode;
use arl::api::pty::{PtyControl, PtyExit};
use arl::node::trajectory::Step;
use common::{Daemon, Options, Runtime};
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<TcpStream>;

async fn connect(d: &Daemon, id: &str, query: &str) -> Ws {
    let stream = TcpStream::connect(("127.0.0.1", d.port))
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{}/v1/sandboxes/{id}/pty?{query}", d.port);
    let (ws, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("WebSocket handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Terminal output until `needle` appears (within 15 s); what came before it is returned and
/// dropped from `seen`.
async fn read_until(ws: &mut Ws, seen: &mut String, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(at) = seen.find(needle) {
            let before = seen[..at].to_string();
            seen.drain(..at + needle.len());
            return before;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} on the terminal; it showed {seen:?}"));
        match message {
            Some(Ok(Message::Binary(bytes))) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Some(Ok(Message::Text(text))) => panic!("control message before {needle:?}: {text}"),
            other => panic!("the terminal ended before {needle:?} ({other:?}); it showed {seen:?}"),
        }
    }
}

async fn type_in(ws: &mut Ws, keys: &str) {
    ws.send(Message::binary(keys.as_bytes().to_vec()))
        .await
        .expect("send keys");
}

async fn control(ws: &mut Ws, message: &PtyControl) {
    ws.send(Message::text(
        serde_json::to_string(message).expect("control message"),
    ))
    .await
    .expect("send control");
}

/// Waits (through exec, with a deadline) until a process whose command line is `args` runs in
/// the terminal's foreground process group: a Ctrl-C sent earlier could reach the shell
/// between two commands, which shells do not pass on.
async fn wait_in_foreground(d: &Daemon, id: &str, args: &str) {
    let probe = format!(
        "for p in /proc/[0-9]*; do if [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = '{args} ' ]; then \
         set -- $(sed 's/.*) //' $p/stat); [ \"$3\" = \"$6\" ] && echo foreground; fi; done"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = d.shell(id, &probe).await;
        if r.stdout.contains("foreground") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} never ran in the foreground: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The exit message, as sent, and the close that follows it.
async fn exit_status(ws: &mut Ws) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next())
            .await
            .expect("no exit message")
        {
            Some(Ok(Message::Text(text))) => {
                let exit: Value = serde_json::from_str(text.as_str()).expect("JSON");
                let next = tokio::time::timeout(left, ws.next())
                    .await
                    .expect("no close");
                assert!(
                    matches!(next, Some(Ok(Message::Close(_))) | None),
                    "a close follows the exit: {next:?}"
                );
                return exit;
            }
            Some(Ok(Message::Binary(_))) => {}
            other => panic!("the terminal ended without an exit message: {other:?}"),
        }
    }
}

async fn a_terminal_echoes_resizes_interrupts_and_exits(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let mut ws = connect(&d, &id, "cols=100&rows=30").await;
    let mut seen = String::new();

    // A prompt only the shell can print (typed, it reads `${P}dy`): the shell waits for input
    // when it shows. Keys typed while an interrupt is being handled may be dropped, as on any
    // terminal, so the tests type after an interrupt once the prompt is back.
    type_in(&mut ws, "P=rea; PS1=\"${P}dy> \"; echo hello-$((40+2))\n").await;
    read_until(&mut ws, &mut seen, "hello-42").await;
    type_in(&mut ws, "stty size; echo size-$((1+1))\n").await;
    let before = read_until(&mut ws, &mut seen, "size-2").await;
    assert!(before.contains("30 100"), "initial size: {before:?}");

    control(
        &mut ws,
        &PtyControl::Resize {
            cols: 120,
            rows: 40,
        },
    )
    .await;
    type_in(&mut ws, "stty size; echo size-$((2+2))\n").await;
    let before = read_until(&mut ws, &mut seen, "size-4").await;
    assert!(before.contains("40 120"), "after the resize: {before:?}");

    // Ctrl-C (the byte, through the terminal's line discipline) stops the foreground command.
    let started = Instant::now();
    type_in(
        &mut ws,
        "echo started-$((1+2)); sleep 31; echo after-$((2+3))\n",
    )
    .await;
    read_until(&mut ws, &mut seen, "started-3").await;
    wait_in_foreground(&d, &id, "sleep 31").await;
    type_in(&mut ws, "\x03").await;
    let mut before = read_until(&mut ws, &mut seen, "ready> ").await;
    type_in(&mut ws, "echo alive-$((3+4))\n").await;
    before += &read_until(&mut ws, &mut seen, "alive-7").await;
    assert!(
        !before.contains("after-5"),
        "the list was interrupted: {before:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // So does a signal message, sent to the terminal's foreground process group.
    type_in(
        &mut ws,
        "echo again-$((1+5)); sleep 32; echo after-$((3+3))\n",
    )
    .await;
    read_until(&mut ws, &mut seen, "again-6").await;
    wait_in_foreground(&d, &id, "sleep 32").await;
    control(
        &mut ws,
        &PtyControl::Signal {
            signal: "INT".into(),
        },
    )
    .await;
    let mut before = read_until(&mut ws, &mut seen, "ready> ").await;
    type_in(&mut ws, "echo alive-$((4+4))\n").await;
    before += &read_until(&mut ws, &mut seen, "alive-8").await;
    assert!(!before.contains("after-6"), "{before:?}");
    assert!(started.elapsed() < Duration::from_secs(20));

    type_in(&mut ws, "exit 3\n").await;
    // The exact wire shape (its `type` tag, no `signal`): the message as sent, against the
    // model's own serialization.
    let exit = exit_status(&mut ws).await;
    let expected = PtyExit {
        exit_code: 3,
        signal: None,
    };
    assert_eq!(exit, serde_json::to_value(&expected).expect("json"));

    // The sandbox goes on serving, and its trajectory shows the terminal.
    assert_eq!(d.shell(&id, "echo still").await.stdout, "still\n");
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
    let steps: Vec<Step> = common::ndjson(&body);
    let first = steps.first().expect("a step");
    assert_eq!(first.action, "pty_open", "{first:?}");
    assert_eq!(first.status, 101);
}

async fn a_client_that_goes_away_ends_its_terminal(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let mut ws = connect(&d, &id, "").await;
    type_in(&mut ws, "sleep 987; echo pid-$((5+5))\n").await;
    // The sleep is running once /proc shows it (checked through exec, with a deadline).
    let deadline = Instant::now() + Duration::from_secs(15);
    let running = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 987'";
    loop {
        let r = d.shell(&id, running).await;
        if r.stdout.trim() != "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the sleep never started: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = d.shell(&id, running).await;
        if r.stdout.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the terminal's processes outlived it: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

on_every_runtime!(
    a_terminal_echoes_resizes_interrupts_and_exits,
    a_client_that_goes_away_ends_its_terminal,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_terminals_are_refused() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    // A plain GET is not a WebSocket.
    let err = d
        .send_empty(Method::GET, &format!("/v1/sandboxes/{id}/pty"))
        .await
        .expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::BadRequest);
    // Sizes out of bounds.
    let stream = TcpStream::connect(("127.0.0.1", d.port))
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{}/v1/sandboxes/{id}/pty?cols=0", d.port);
    match tokio_tungstenite::client_async(url, stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::BAD_REQUEST)
        }
        other => panic!("a zero-column terminal: {:?}", other.map(|(_, r)| r)),
    }
    // An unknown sandbox.
    let stream = TcpStream::connect(("127.0.0.1", d.port))
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{}/v1/sandboxes/nope/pty", d.port);
    match tokio_tungstenite::client_async(url, stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::NOT_FOUND)
        }
        other => panic!("an unknown sandbox: {:?}", other.map(|(_, r)| r)),
    }
}
