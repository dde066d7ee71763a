//! The real `arl agent` listening on TCP (as in a pod the daemon reaches by its IP): every
//! request must carry the sandbox's token; without it, or with another, the agent answers 401
//! and runs nothing. The token is never on the command line nor in the commands' environment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_arl");

struct Agent {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    // SAFETY: getrandom(2) into our own buffer.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts an agent on a free loopback port with `token` in its environment and waits (bounded)
/// until it accepts connections.
fn start(token: &str) -> Agent {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let dir = std::env::temp_dir().join(format!("arl-agent-tcp-{}", random_hex(6)));
    std::fs::create_dir_all(&dir).expect("dir");
    let child = Command::new(BIN)
        .args(["agent", "--listen-tcp", &addr.to_string()])
        .env("ARL_AGENT_TOKEN", token)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the agent");
    let agent = Agent { child, addr, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the agent never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    agent
}

/// One HTTP/1.1 request on a connection of its own; the status and body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn without_the_right_token_every_request_answers_401_and_runs_nothing() {
    let token = random_hex(32);
    let agent = start(&token);
    let marker = agent.dir.join("ran");
    let exec = format!(
        r#"{{"cmd": ["/bin/sh", "-c", "touch {}"], "cwd": "{}"}}"#,
        marker.display(),
        agent.dir.display()
    );
    let other = random_hex(32);
    let refused = [
        None,
        Some(format!("Bearer {other}")),
        Some(format!("Bearer {}", &token[..63])),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
        Some(token.clone()),
    ];
    for auth in &refused {
        let (status, body) = request(agent.addr, "GET", "/ping", auth.as_deref(), "");
        assert_eq!(status, 401, "ping with {auth:?}: {body}");
        let (status, body) = request(agent.addr, "POST", "/exec", auth.as_deref(), &exec);
        assert_eq!(status, 401, "exec with {auth:?}: {body}");
        assert!(body.contains("unauthorized"), "{body}");
    }
    assert!(!marker.exists(), "a refused exec ran");

    let bearer = format!("Bearer {token}");
    let (status, _) = request(agent.addr, "GET", "/ping", Some(&bearer), "");
    assert_eq!(status, 200);
    let (status, body) = request(agent.addr, "POST", "/exec", Some(&bearer), &exec);
    assert_eq!(status, 200, "{body}");
    assert!(marker.exists(), "the authorized exec ran");
    // The commands it runs do not inherit the token.
    let (status, body) = request(
        agent.addr,
        "POST",
        "/exec",
        Some(&bearer),
        &format!(
            r#"{{"cmd": ["/usr/bin/env"], "cwd": "{}"}}"#,
            agent.dir.display()
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("PATH="), "{body}");
    assert!(!body.contains("ARL_AGENT_TOKEN"), "{body}");
    assert!(!body.contains(&token), "{body}");
    // Nor does anyone reading its command line see it.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.child.id())).expect("cmdline");
    assert!(!String::from_utf8_lossy(&cmdline).contains(&token));
}

#[test]
fn the_agent_refuses_to_listen_on_tcp_without_a_well_formed_token() {
    for token in [None, Some("short"), Some("")] {
        let mut command = Command::new(BIN);
        command
            .args(["agent", "--listen-tcp", "127.0.0.1:1"])
            .env_remove("ARL_AGENT_TOKEN")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            command.env("ARL_AGENT_TOKEN", token);
        }
        let out = command.output().expect("run the agent");
        assert_eq!(out.status.code(), Some(2), "{token:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("ARL_AGENT_TOKEN"), "{err}");
    }
}
