//! The command-line client of a node's API: `arl exec`, `arl run`, `arl pools`, ...

use std::collections::BTreeMap;
use std::io::Write;

use http_body_util::BodyExt;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::api::{
    AcquireRequest, ErrorBody, ExecEvent, ExecRequest, ForkRequest, NDJSON, PoolList, SandboxList,
    SnapshotInfo, SnapshotList,
};
use crate::http::{self, Body};

pub mod shell;

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Node endpoints, comma-separated; the first is used.
    #[arg(
        long,
        env = "ARL_ENDPOINTS",
        default_value = "http://127.0.0.1:8420",
        global = true
    )]
    pub endpoints: String,
    /// Bearer token.
    #[arg(long, env = "ARL_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ExecOpts {
    /// Environment variables, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Working directory (default /workspace).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Timeout in seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Run this string with /bin/sh -c instead of an argv.
    #[arg(long, conflicts_with = "cmd")]
    pub shell: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error("bad endpoint {0:?}: expected http://HOST:PORT")]
    Endpoint(String),
    #[error("cannot reach {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("{0}")]
    Usage(String),
}

pub struct Client {
    endpoint: String,
    token: Option<String>,
    sender: SendRequest<Body>,
}

impl ClientArgs {
    /// The first endpoint, and its `host:port` (plain HTTP only).
    pub fn first_endpoint(&self) -> Result<(String, String), CliError> {
        let endpoint = self
            .endpoints
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let authority = endpoint
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty())
            .ok_or_else(|| CliError::Endpoint(endpoint.clone()))?
            .to_string();
        Ok((endpoint, authority))
    }
}

impl Client {
    pub async fn connect(args: &ClientArgs) -> Result<Self, CliError> {
        let (endpoint, authority) = args.first_endpoint()?;
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|source| CliError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CliError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            endpoint,
            token: args.token.clone(),
            sender,
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        ndjson: bool,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CliError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.endpoint.trim_start_matches("http://"));
        if let Some(token) = &self.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if ndjson {
            builder = builder.header(ACCEPT, NDJSON);
        }
        let body = match body {
            Some(b) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                http::full(b)
            }
            None => http::empty(),
        };
        let req = builder
            .body(body)
            .map_err(|e| CliError::Http(e.to_string()))?;
        let response = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| CliError::Http(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(CliError::Api { status, message })
    }

    async fn call<T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CliError> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let response = self.send(method, path, body, false).await?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::Http(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(if bytes.is_empty() { b"null" } else { &bytes })
            .map_err(|e| CliError::Http(format!("bad reply: {e}")))
    }

    pub async fn acquire(
        &mut self,
        pool: &str,
        env: BTreeMap<String, String>,
    ) -> Result<String, CliError> {
        let req = AcquireRequest {
            pool: pool.to_string(),
            env,
            ..AcquireRequest::default()
        };
        let list: SandboxList = self.call(Method::POST, "/v1/sandboxes", Some(&req)).await?;
        list.sandboxes
            .into_iter()
            .next()
            .map(|s| s.id)
            .ok_or_else(|| CliError::Http("no sandbox in reply".into()))
    }

    pub async fn release(&mut self, id: &str) -> Result<(), CliError> {
        self.send(Method::DELETE, &format!("/v1/sandboxes/{id}"), None, false)
            .await
            .map(|_| ())
    }

    /// Streams a command's output to our stdout/stderr; returns its exit code.
    pub async fn exec(&mut self, id: &str, opts: &ExecOpts) -> Result<i32, CliError> {
        let req = ExecRequest {
            cmd: (!opts.cmd.is_empty()).then(|| opts.cmd.clone()),
            shell: opts.shell.clone(),
            env: opts.env.iter().cloned().collect(),
            cwd: opts.cwd.clone(),
            timeout_ms: opts.timeout.map(|s| (s * 1000.0) as u64),
            ..ExecRequest::default()
        };
        if req.cmd.is_none() && req.shell.is_none() {
            return Err(CliError::Usage(
                "give a command after `--`, or --shell".into(),
            ));
        }
        let body = serde_json::to_vec(&req).unwrap_or_default();
        let response = self
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(body),
                true,
            )
            .await?;
        let mut body = response.into_body();
        let mut line = Vec::new();
        let mut code = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CliError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            line.extend_from_slice(&data);
            while let Some(pos) = line.iter().position(|&b| b == b'\n') {
                let rest = line.split_off(pos + 1);
                if let Some(c) = print_event(&line)? {
                    code = Some(c);
                }
                line = rest;
            }
        }
        code.ok_or_else(|| CliError::Http("the stream ended without a result".into()))
    }
}

fn print_event(line: &[u8]) -> Result<Option<i32>, CliError> {
    let event: ExecEvent = serde_json::from_slice(line)
        .map_err(|e| CliError::Http(format!("bad stream line: {e}")))?;
    match event {
        ExecEvent::Stdout { data } => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data.as_bytes());
            let _ = out.flush();
        }
        ExecEvent::Stderr { data } => {
            let _ = std::io::stderr().lock().write_all(data.as_bytes());
        }
        ExecEvent::Result(r) => {
            if r.timed_out {
                eprintln!("arl: timed out after {:.0} ms", r.duration_ms);
            }
            if r.truncated {
                eprintln!("arl: output truncated");
            }
            return Ok(Some(r.exit_code));
        }
        ExecEvent::Error { error } => return Err(CliError::Http(error.message)),
    }
    Ok(None)
}

pub async fn pools(args: &ClientArgs) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let list: PoolList = client.call(Method::GET, "/v1/pools", None::<&()>).await?;
    println!(
        "{:<20} {:>6} {:>9} {:>8} {:>8} {:>6}",
        "POOL", "IDLE", "ALLOCATED", "STARTING", "MIN_IDLE", "MAX"
    );
    for p in list.pools {
        println!(
            "{:<20} {:>6} {:>9} {:>8} {:>8} {:>6}",
            p.name,
            p.status.idle,
            p.status.allocated,
            p.status.starting,
            p.spec.min_idle,
            p.spec.max
        );
    }
    Ok(0)
}

pub async fn sandboxes(args: &ClientArgs) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let list: SandboxList = client
        .call(Method::GET, "/v1/sandboxes", None::<&()>)
        .await?;
    println!("{:<22} {:<16} {:<10}", "SANDBOX", "POOL", "STATE");
    for s in list.sandboxes {
        println!("{:<22} {:<16} {:<10?}", s.id, s.pool, s.state);
    }
    Ok(0)
}

pub async fn acquire(
    args: &ClientArgs,
    pool: &str,
    env: Vec<(String, String)>,
) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    println!("{}", client.acquire(pool, env.into_iter().collect()).await?);
    Ok(0)
}

pub async fn release(args: &ClientArgs, id: &str) -> Result<i32, CliError> {
    Client::connect(args).await?.release(id).await?;
    Ok(0)
}

pub async fn exec(args: &ClientArgs, id: &str, opts: &ExecOpts) -> Result<i32, CliError> {
    Client::connect(args).await?.exec(id, opts).await
}

/// Acquire, exec, release in one.
pub async fn run(args: &ClientArgs, pool: &str, opts: &ExecOpts) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let id = client.acquire(pool, BTreeMap::new()).await?;
    let result = client.exec(&id, opts).await;
    let released = client.release(&id).await;
    let code = result?;
    released?;
    Ok(code)
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionAction {
    /// Start a session and print its id.
    Open {
        /// Sandbox id.
        sandbox: String,
        /// `shell` or `python`.
        #[arg(long, default_value = "shell")]
        kind: String,
    },
    /// Run a command line (shell) or a snippet (Python) in a session; `-` reads it from stdin.
    Run {
        sandbox: String,
        session: String,
        /// Timeout in seconds (SIGINT, then kill; the session stays).
        #[arg(long)]
        timeout: Option<f64>,
        /// The code (words are joined with spaces).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        code: Vec<String>,
    },
    /// List a sandbox's sessions.
    List { sandbox: String },
    /// End a session.
    Close { sandbox: String, session: String },
}

pub async fn session(args: &ClientArgs, action: SessionAction) -> Result<i32, CliError> {
    use crate::api::sessions::{
        CreateSessionRequest, RunEvent, RunRequest, SessionInfo, SessionKind, SessionList,
    };
    let mut client = Client::connect(args).await?;
    match action {
        SessionAction::Open { sandbox, kind } => {
            let kind = match kind.as_str() {
                "shell" => SessionKind::Shell,
                "python" => SessionKind::Python,
                other => return Err(CliError::Usage(format!("no session kind {other:?}"))),
            };
            let req = CreateSessionRequest {
                kind,
                env: BTreeMap::new(),
                cwd: None,
            };
            let info: SessionInfo = client
                .call(
                    Method::POST,
                    &format!("/v1/sandboxes/{sandbox}/sessions"),
                    Some(&req),
                )
                .await?;
            println!("{}", info.id);
            Ok(0)
        }
        SessionAction::List { sandbox } => {
            let list: SessionList = client
                .call(
                    Method::GET,
                    &format!("/v1/sandboxes/{sandbox}/sessions"),
                    None::<&()>,
                )
                .await?;
            println!(
                "{:<16} {:<8} {:>8} {:>6}",
                "SESSION", "KIND", "RUNS", "BUSY"
            );
            for s in list.sessions {
                println!(
                    "{:<16} {:<8} {:>8} {:>6}",
                    s.id,
                    s.kind.as_str(),
                    s.runs,
                    s.busy
                );
            }
            Ok(0)
        }
        SessionAction::Close { sandbox, session } => {
            let path = format!("/v1/sandboxes/{sandbox}/sessions/{session}");
            client.send(Method::DELETE, &path, None, false).await?;
            Ok(0)
        }
        SessionAction::Run {
            sandbox,
            session,
            timeout,
            code,
        } => {
            let code = if code == ["-"] {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map_err(|e| CliError::Usage(format!("reading stdin: {e}")))?;
                text
            } else {
                code.join(" ")
            };
            let req = RunRequest {
                code,
                timeout_ms: timeout.map(|s| (s * 1000.0) as u64),
                max_output_bytes: None,
            };
            let path = format!("/v1/sandboxes/{sandbox}/sessions/{session}/run");
            let body = serde_json::to_vec(&req).unwrap_or_default();
            let response = client.send(Method::POST, &path, Some(body), true).await?;
            let mut body = response.into_body();
            let mut line = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| CliError::Http(e.to_string()))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                line.extend_from_slice(&data);
                while let Some(pos) = line.iter().position(|&b| b == b'\n') {
                    let rest = line.split_off(pos + 1);
                    let event: RunEvent = serde_json::from_slice(&line)
                        .map_err(|e| CliError::Http(format!("bad stream line: {e}")))?;
                    line = rest;
                    match event {
                        RunEvent::Stdout { data } => {
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(data.as_bytes());
                            let _ = out.flush();
                        }
                        RunEvent::Stderr { data } => {
                            let _ = std::io::stderr().lock().write_all(data.as_bytes());
                        }
                        RunEvent::Error { error } => return Err(CliError::Http(error.message)),
                        RunEvent::Result(r) => {
                            if let Some(value) = &r.value {
                                println!("{value}");
                            }
                            if let Some(error) = &r.error {
                                eprintln!("{}", error.traceback.join("\n"));
                            }
                            if r.timed_out {
                                eprintln!("arl: interrupted after {:.0} ms", r.duration_ms);
                            }
                            if r.session_ended {
                                eprintln!("arl: the session ended");
                            }
                            return Ok(r.exit_code);
                        }
                    }
                }
            }
            Err(CliError::Http("the stream ended without a result".into()))
        }
    }
}

pub async fn trajectory(args: &ClientArgs, sandbox: &str) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let path = format!("/v1/sandboxes/{sandbox}/trajectory");
    let response = client.send(Method::GET, &path, None, false).await?;
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| CliError::Http(e.to_string()))?
        .to_bytes();
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&bytes);
    let _ = out.flush();
    Ok(0)
}

pub async fn pause(args: &ClientArgs, id: &str, paused: bool) -> Result<i32, CliError> {
    let action = if paused { "pause" } else { "resume" };
    Client::connect(args)
        .await?
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/{action}"),
            None,
            false,
        )
        .await?;
    Ok(0)
}

pub async fn snapshot(args: &ClientArgs, id: &str) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let snap: SnapshotInfo = client
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshots"),
            None::<&()>,
        )
        .await?;
    println!("{}", snap.id);
    Ok(0)
}

pub async fn snapshots(args: &ClientArgs) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let list: SnapshotList = client
        .call(Method::GET, "/v1/snapshots", None::<&()>)
        .await?;
    println!(
        "{:<24} {:<16} {:<22} {:>12} {:>6}",
        "SNAPSHOT", "POOL", "FROM", "BYTES", "FORKS"
    );
    for s in list.snapshots {
        println!(
            "{:<24} {:<16} {:<22} {:>12} {:>6}",
            s.id, s.pool, s.sandbox, s.bytes, s.forks
        );
    }
    Ok(0)
}

pub async fn delete_snapshot(args: &ClientArgs, id: &str) -> Result<i32, CliError> {
    Client::connect(args)
        .await?
        .send(Method::DELETE, &format!("/v1/snapshots/{id}"), None, false)
        .await?;
    Ok(0)
}

/// Forks from a snapshot (`snap-…`) or straight from a live sandbox.
pub async fn fork(args: &ClientArgs, from: &str, count: usize) -> Result<i32, CliError> {
    let mut client = Client::connect(args).await?;
    let path = if from.starts_with("snap-") {
        format!("/v1/snapshots/{from}/fork")
    } else {
        format!("/v1/sandboxes/{from}/fork")
    };
    let req = ForkRequest {
        count: Some(count),
        ..ForkRequest::default()
    };
    let list: SandboxList = client.call(Method::POST, &path, Some(&req)).await?;
    for s in list.sandboxes {
        println!("{}", s.id);
    }
    Ok(0)
}

/// Runs one client command on a small runtime; maps errors to exit code 1 (or 2 for usage).
pub fn main(fut: impl std::future::Future<Output = Result<i32, CliError>>) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arl: {e}");
            return 1;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e @ CliError::Usage(_)) => {
            eprintln!("arl: {e}");
            2
        }
        Err(e) => {
            eprintln!("arl: {e}");
            1
        }
    }
}
