//! Answers given before a request's body is read leave the kept-alive connection usable: the
//! node reads (bounded) the body it does not need, or says `Connection: close` when it will not.
//! A raw client sends, on one connection, a request that gets such an answer, its body after
//! the head (in the same write, or in a later one), then a valid request, whose answer must come.

mod common;

use std::time::{Duration, Instant};

use arl::api::{ErrorCode, SandboxList};
use common::{Daemon, Options, shell};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One raw HTTP/1.1 connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    }

    fn closes(&self) -> bool {
        self.header("connection").as_deref() == Some("close")
    }

    fn code(&self) -> ErrorCode {
        let body: arl::api::ErrorBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)));
        body.error.code
    }
}

impl Conn {
    async fn open(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes bytes; an error says how the connection ended instead.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("connection broken: {e}"))
    }

    /// Reads one response; an error says how the connection ended instead.
    async fn answer(&mut self) -> Result<Answer, String> {
        tokio::time::timeout(ANSWER_TIMEOUT, self.read_answer())
            .await
            .map_err(|_| "no answer within 10 s".to_string())?
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 16 << 10];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err("the node closed the connection".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("connection broken: {e}")),
        }
    }

    async fn read_answer(&mut self) -> Result<Answer, String> {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head}"))?;
        let mut answer = Answer {
            status,
            head,
            body: Vec::new(),
        };
        let length: usize = answer
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.buf.len() < length {
            self.fill().await?;
        }
        answer.body = self.buf.drain(..length).collect();
        Ok(answer)
    }

    /// Whether the node closes the connection (without sending anything more).
    async fn closed(&mut self) -> bool {
        matches!(
            tokio::time::timeout(ANSWER_TIMEOUT, self.fill()).await,
            Ok(Err(_))
        )
    }
}

/// A request's head with a body of `length` bytes.
fn head(method: &str, path: &str, token: Option<&str>, length: usize) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: node\r\n{auth}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Sends a request whose answer comes early, its body after the head (in the same write, or
/// in a second one), expects `status`, then checks the connection still serves a valid request.
async fn early_then_valid(
    d: &Daemon,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    status: u16,
) {
    for late in [false, true] {
        let mut conn = Conn::open(d.port).await;
        let sent = if late {
            // The head alone first; the body follows in its own writes, longer than what the
            // node reads with the head (trailing blanks are still valid JSON).
            let mut body = body.to_vec();
            body.resize(body.len() + (64 << 10), b' ');
            let head = head(method, path, token, body.len());
            conn.send(head.as_bytes()).await.and(conn.send(&body).await)
        } else {
            let mut request = head(method, path, token, body.len()).into_bytes();
            request.extend_from_slice(body);
            conn.send(&request).await
        };
        sent.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let first = conn
            .answer()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(
            first.status, status,
            "{method} {path} (late: {late}): {first:?}"
        );
        assert!(!first.closes(), "{method} {path} closes: {first:?}");
        let token = d.token.as_deref();
        let sent = conn.send(head_for_list(token).as_bytes()).await;
        let second = async {
            sent?;
            conn.answer().await
        }
        .await
        .unwrap_or_else(|e| panic!("the request after {method} {path} (body late: {late}): {e}"));
        assert_eq!(second.status, 200, "{second:?}");
        let _: SandboxList = serde_json::from_slice(&second.body).expect("a sandbox list");
    }
}

fn head_for_list(token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET /v1/sandboxes HTTP/1.1\r\nHost: node\r\n{auth}\r\n")
}

fn exec_body() -> Vec<u8> {
    serde_json::to_vec(&shell("echo hello")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_leave_the_connection_usable() {
    let d = Daemon::start(Options::default()).await;
    let exec = exec_body();
    // Unknown sandbox, on the hot path.
    early_then_valid(&d, "POST", "/v1/sandboxes/sb-nope/exec", None, &exec, 404).await;
    // No such route, and a method the route does not take.
    early_then_valid(&d, "POST", "/v1/nothing/here", None, &exec, 404).await;
    early_then_valid(&d, "PUT", "/v1/sandboxes/sb-nope", None, &exec, 405).await;
    // An upload to an unknown sandbox, small enough to read and drop.
    let upload = vec![b'x'; 200 << 10];
    early_then_valid(
        &d,
        "PUT",
        "/v1/sandboxes/sb-nope/files?path=/tmp/f",
        None,
        &upload,
        404,
    )
    .await;
    // Routes that take no body but were sent one, on a real sandbox.
    let id = d.acquire("default").await;
    early_then_valid(
        &d,
        "POST",
        &format!("/v1/sandboxes/{id}/reset"),
        None,
        b"{}",
        200,
    )
    .await;
    early_then_valid(&d, "GET", &format!("/v1/sandboxes/{id}"), None, b"{}", 200).await;
    // A bad request read whole.
    early_then_valid(
        &d,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        None,
        b"{not json",
        400,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_leaves_the_connection_usable() {
    let d = Daemon::start(Options {
        tokens: vec!["good-token".into()],
        ..Options::default()
    })
    .await;
    let exec = exec_body();
    early_then_valid(
        &d,
        "POST",
        "/v1/sandboxes/sb-nope/exec",
        Some("bad-token"),
        &exec,
        401,
    )
    .await;
    early_then_valid(&d, "POST", "/v1/sandboxes", None, &exec, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_too_large_to_read_are_answered_with_connection_close() {
    let d = Daemon::start(Options::default()).await;
    // An upload of a gigabyte to an unknown sandbox: answered at once, closing the connection.
    let mut conn = Conn::open(d.port).await;
    let started = Instant::now();
    conn.send(
        head(
            "PUT",
            "/v1/sandboxes/sb-nope/files?path=/tmp/big",
            None,
            1 << 30,
        )
        .as_bytes(),
    )
    .await
    .expect("write the head");
    // Some of the body; the node may close before it is all written.
    let _ = conn.send(&vec![b'x'; 64 << 10]).await;
    let answer = conn.answer().await.expect("an answer");
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(answer.closes(), "says it closes: {answer:?}");
    assert!(conn.closed().await, "and closes");
    assert!(started.elapsed() < ANSWER_TIMEOUT);
    // A JSON body past its bound: 413, and the connection closes, said so.
    let mut conn = Conn::open(d.port).await;
    conn.send(head("POST", "/v1/sandboxes", None, 4 << 20).as_bytes())
        .await
        .expect("write the head");
    let answer = conn.answer().await.expect("an answer");
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.code(), ErrorCode::PayloadTooLarge);
    assert!(answer.closes(), "says it closes: {answer:?}");
    assert!(conn.closed().await, "and closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_leave_the_connection_usable() {
    let mut d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    // A running command holds the drain open; its sandbox shows `sleep` once it runs.
    let running = d.exec_in_background(&id, "sleep 2; echo finished");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = d.shell(&id, "pgrep -x sleep || true").await;
        if !r.stdout.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the command never started");
    }
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.send_empty(Method::GET, "/readyz").await.status != StatusCode::SERVICE_UNAVAILABLE {
        assert!(Instant::now() < deadline, "never drained");
    }
    let exec = exec_body();
    early_then_valid(
        &d,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        None,
        &exec,
        503,
    )
    .await;
    running
        .await
        .expect("exec task")
        .expect::<arl::api::ExecResult>(StatusCode::OK);
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
}
