//! `arl agent`: the in-sandbox agent. It listens on a Unix socket (inherited from the
//! runtime, or bound at a path) and, for pods the daemon reaches by their IP, on a TCP address
//! where every request must carry the sandbox's token (`Authorization: Bearer`, the token from
//! `ARL_AGENT_TOKEN`; anything else answers 401 and runs nothing). It serves a small HTTP/1.1
//! API to the node daemon:
//!
//! | route | what |
//! |---|---|
//! | `GET /ping` | liveness |
//! | `POST /exec` | run a command (JSON result, or NDJSON with `Accept: application/x-ndjson`) |
//! | `PUT /files?path=&mode=&sha256=` | streamed, atomic file write |
//! | `POST /files` | several files in one call |
//! | `GET /files?path=` | streamed file read |
//! | `DELETE /files?path=` | remove a file |
//! | `POST /fs/{stat,list,mkdir,move,remove}` | file-system operations beyond transfer |
//! | `POST /signal` | signal a running command, by the pid a streamed exec reported |
//! | `POST /reset` | kill every process but the agent, empty the scratch directories |
//! | `GET, POST /sessions`, `GET, DELETE /sessions/{sid}` | persistent shell and Python sessions |
//! | `POST /sessions/{sid}/run` | one command in a session (JSON, or NDJSON like exec) |
//! | `GET /pty` | an interactive terminal: upgrades to a WebSocket |

pub mod exec;
pub mod files;
mod fs;
mod kept;
pub mod oom;
mod pty;
mod session;
mod session_frame;
mod session_routes;
mod spawn;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};

use crate::api::files::MAX_BATCH_BYTES;
use crate::api::{
    ApiError, ExecEvent, ExecRequest, NDJSON, OUTCOME_HEADER, REPORT_PID_HEADER, SignalRequest,
    WriteFilesRequest, WriteFilesResponse,
};
use crate::http::{self, Body, ChannelBody, MAX_JSON_BODY, ndjson_line};
use crate::node::once::{self, Claim};
use crate::quiet_unix::QuietUnixStream;
use crate::runtime::{AGENT_TOKEN_ENV, AgentToken};

/// Directories `reset` empties.
const SCRATCH_DIRS: &[&str] = &["/workspace", "/tmp", "/var/tmp", "/dev/shm", "/root"];
/// How long `reset` waits for the processes it killed to be gone.
const RESET_WAIT: Duration = Duration::from_secs(5);
/// Blocking threads (file operations) of the agent, at most.
const BLOCKING_THREADS: usize = 4;
/// How long an idle blocking thread is kept: for the agent's life.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// An already-listening Unix socket inherited from the runtime.
    #[arg(long, conflicts_with = "socket")]
    pub listen_fd: Option<i32>,
    /// A Unix socket path to bind.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also listen on this TCP address (`IP:PORT`; an IPv6 address may go without brackets),
    /// answering only requests with the token of the environment variable `ARL_AGENT_TOKEN`
    /// (never given on the command line, where `ps` would show it)
    #[arg(long, value_parser = parse_listen_tcp)]
    pub listen_tcp: Option<SocketAddr>,
    /// An open descriptor of the sandbox's memory cgroup counters (`memory.oom_control` or
    /// `memory.events`), to tell OOM kills from other deaths.
    #[arg(long)]
    pub memory_events_fd: Option<i32>,
    /// A descriptor of the sandbox's writable layers, held open for the daemon's snapshots
    /// (it reaches them through this process); the agent never uses it.
    #[arg(long)]
    pub layers_fd: Option<i32>,
}

struct Agent {
    children: exec::Children,
    base_env: Vec<(String, String)>,
    /// Results of execs by request id, for retries (also across restarts of the daemon).
    kept: Arc<kept::KeptMap>,
    /// Persistent shell and Python sessions.
    sessions: session::Sessions,
}

/// `IP:PORT`, `[IPv6]:PORT` or `IPv6:PORT` (what a pod spec makes of `$(POD_IP):PORT`).
fn parse_listen_tcp(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not IP:PORT"))?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|e| format!("{host:?} is not an IP address: {e}"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("{port:?} is not a port: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Takes the TCP token out of the environment (so no command the agent starts inherits it).
fn take_token() -> Result<AgentToken, String> {
    let value = std::env::var(AGENT_TOKEN_ENV)
        .map_err(|_| format!("--listen-tcp needs the token in {AGENT_TOKEN_ENV}"))?;
    // SAFETY: called from `main` before the runtime or any other thread starts.
    unsafe { std::env::remove_var(AGENT_TOKEN_ENV) };
    AgentToken::parse(&value).ok_or_else(|| format!("{AGENT_TOKEN_ENV} is not 64 hex digits"))
}

pub fn main(args: AgentArgs) -> i32 {
    let token = match args.listen_tcp.map(|_| take_token()).transpose() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("arl agent: {e}");
            return 2;
        }
    };
    // One thread is plenty for one sandbox and keeps an idle agent small. File operations run
    // on blocking threads: one is started now and idle ones never expire, so a sandbox whose
    // pids limit is full still reads and writes files (tokio queues work to an existing
    // thread when it cannot start another). Few, so the idle ones cost little.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arl agent: {e}");
            return 1;
        }
    };
    drop(runtime.spawn_blocking(|| ()));
    match runtime.block_on(serve(args, token)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("arl agent: {e}");
            1
        }
    }
}

/// Binds and listens on a temporary name, then renames it to `path`. Whoever waits for `path`
/// to appear may connect at once: a socket that is bound but not yet listening refuses
/// connections, and `bind` alone would publish the path in that state.
fn bind_then_publish(path: &Path) -> std::io::Result<UnixListener> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(".new");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    std::fs::rename(&staging, path)?;
    Ok(listener)
}

async fn serve(args: AgentArgs, token: Option<AgentToken>) -> std::io::Result<()> {
    // Not dumpable: processes of the sandbox may not ptrace or read the agent's memory.
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)?;
    let listener = match (args.listen_fd, &args.socket) {
        (Some(fd), _) => {
            // SAFETY: the runtime handed us this listening socket's descriptor.
            let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            std_listener.set_nonblocking(true)?;
            Some(UnixListener::from_std(std_listener)?)
        }
        (None, Some(path)) => Some(bind_then_publish(path)?),
        (None, None) if args.listen_tcp.is_some() => None,
        (None, None) => {
            return Err(std::io::Error::other(
                "give --listen-fd, --socket or --listen-tcp",
            ));
        }
    };
    let tcp = match (args.listen_tcp, token) {
        (Some(addr), Some(token)) => Some((bind_tcp(addr).await?, Arc::new(token))),
        (Some(_), None) => return Err(std::io::Error::other("--listen-tcp needs a token")),
        (None, _) => None,
    };
    if let Some(fd) = args.layers_fd {
        // Kept open for the agent's life, but not passed to the commands it starts.
        // SAFETY: fcntl on a descriptor the runtime handed us.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let agent = Arc::new(Agent {
        children: exec::Children::new(oom::OomCounter::open(args.memory_events_fd)),
        base_env: std::env::vars()
            .filter(|(k, _)| k != AGENT_TOKEN_ENV)
            .collect(),
        kept: Arc::new(crate::node::once::OnceMap::new(kept::KEPT_RESULTS)),
        sessions: session::Sessions::default(),
    });
    // Subscribe to SIGCHLD before the first spawn so no exit is missed.
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    let reaper = agent.clone();
    tokio::spawn(async move {
        while sigchld.recv().await.is_some() {
            reaper.children.reap();
        }
    });
    let tcp_loop = async {
        let Some((listener, token)) = &tcp else {
            return std::future::pending::<()>().await;
        };
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("arl agent: accept: {e}");
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                eprintln!("arl agent: connection: {e}");
                continue;
            }
            tokio::spawn(serve_connection(agent.clone(), stream, Some(token.clone())));
        }
    };
    let unix_loop = async {
        let Some(listener) = &listener else {
            return std::future::pending::<()>().await;
        };
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("arl agent: accept: {e}");
                    continue;
                }
            };
            let stream = match stream.into_std().and_then(QuietUnixStream::new) {
                Ok(stream) => stream,
                Err(e) => {
                    eprintln!("arl agent: connection: {e}");
                    continue;
                }
            };
            tokio::spawn(serve_connection(agent.clone(), stream, None));
        }
    };
    tokio::join!(tcp_loop, unix_loop);
    Ok(())
}

/// Binds the TCP address; the unspecified IPv6 address falls back to IPv4's where the host
/// has no IPv6.
async fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if addr.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) => TcpListener::bind(
            SocketAddr::new(IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED), addr.port()),
        )
        .await
        .map_err(|_| e),
        other => other,
    }
}

/// Serves one connection; `token`, for TCP ones, must come with every request.
async fn serve_connection<S>(agent: Arc<Agent>, stream: S, token: Option<Arc<AgentToken>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let agent = agent.clone();
        let token = token.clone();
        async move {
            if let Some(token) = &token
                && !authorized(token, &req)
            {
                return Ok::<_, std::convert::Infallible>(http::error(ApiError::new(
                    crate::api::ErrorCode::Unauthorized,
                    "this agent answers only requests with its sandbox's token",
                )));
            }
            Ok(route(&agent, req).await)
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

/// Whether a request carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized<B>(token: &AgentToken, req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|presented| token.matches(presented))
}

async fn route(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ping") => Ok(http::json(StatusCode::OK, &serde_json::json!({"ok": true}))),
        (&Method::POST, "/exec") => exec_route(agent, req).await,
        (&Method::PUT, "/files") => write_file(req).await,
        (&Method::POST, "/files") => write_files(req).await,
        (&Method::GET, "/files") => read_file(req).await,
        (&Method::DELETE, "/files") => required_path(&req)
            .and_then(|p| files::remove(&p))
            .map(|()| http::no_content()),
        (&Method::POST, op) if op.starts_with("/fs/") => fs_route(req).await,
        (&Method::POST, "/signal") => signal(agent, req).await,
        (&Method::POST, "/reset") => reset(agent).await,
        (&Method::GET, "/pty") => pty::route(agent, req).await,
        (_, path) if path == "/sessions" || path.starts_with("/sessions/") => {
            session_routes::route(agent, req).await
        }
        _ => Err(ApiError::not_found(format!(
            "no agent route {} {}",
            req.method(),
            req.uri().path()
        ))),
    };
    result.unwrap_or_else(http::error)
}

fn required_path<B>(req: &Request<B>) -> Result<String, ApiError> {
    http::query_param(req.uri(), "path")
        .ok_or_else(|| ApiError::bad_request("query parameter `path` is required"))
}

async fn exec_route(
    agent: &Arc<Agent>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let streaming = http::wants_ndjson(&req);
    let report_pid = req.headers().contains_key(REPORT_PID_HEADER);
    let exec_req: ExecRequest = http::read_json(req, MAX_JSON_BODY * 64).await?;
    exec_req.validate().map_err(ApiError::bad_request)?;
    let Some(id) = exec_req.request_id.clone() else {
        return exec_now(agent, exec_req, streaming, report_pid).await;
    };
    // At most once per request id: a retry waits for the first run or gets its result.
    let publish = match agent.kept.claim(&id) {
        Claim::Done(kept) => return Ok(kept.answer(streaming)),
        Claim::Wait(rx) => return once::wait(rx).await.map(|k| k.answer(streaming)),
        Claim::Run(tx) => tx,
    };
    if streaming {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        spawn_streamed(agent.clone(), exec_req, tx, report_pid);
        let body = kept::tee(rx, publish, agent.kept.clone(), id);
        return Ok(Response::builder()
            .header(CONTENT_TYPE, NDJSON)
            .body(body)
            .unwrap_or_else(|_| http::error(ApiError::internal("response"))));
    }
    // Detached: the command and its kept result outlive the connection that asked.
    let run = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let result = exec::run(
                &agent.children,
                &agent.base_env,
                exec_req,
                exec::Sink::Capture,
            )
            .await;
            match &result {
                Ok(result) => {
                    let _ = publish.send(Some(kept::Kept::of(result)));
                }
                Err(_) => agent.kept.forget(&id),
            }
            result
        })
    };
    let result = run
        .await
        .map_err(|e| ApiError::internal(format!("exec task failed: {e}")))??;
    Ok(json_result(&result))
}

/// Runs an exec without a request id.
async fn exec_now(
    agent: &Arc<Agent>,
    exec_req: ExecRequest,
    streaming: bool,
    report_pid: bool,
) -> Result<Response<Body>, ApiError> {
    if !streaming {
        let result = exec::run(
            &agent.children,
            &agent.base_env,
            exec_req,
            exec::Sink::Capture,
        )
        .await?;
        return Ok(json_result(&result));
    }
    let (tx, body) = ChannelBody::channel(16);
    spawn_streamed(agent.clone(), exec_req, tx, report_pid);
    Ok(Response::builder()
        .header(CONTENT_TYPE, NDJSON)
        .body(body)
        .unwrap_or_else(|_| http::error(ApiError::internal("response"))))
}

fn json_result(result: &crate::api::ExecResult) -> Response<Body> {
    let mut response = http::json(StatusCode::OK, result);
    response.headers_mut().insert(
        OUTCOME_HEADER,
        hyper::header::HeaderValue::from_static(result.outcome().as_str()),
    );
    response
}

/// Runs a streamed exec in a task of its own, its events and then its result (or error)
/// sent as NDJSON lines; `report_pid` first sends the command's pid.
fn spawn_streamed(
    agent: Arc<Agent>,
    exec_req: ExecRequest,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, http::BoxError>>,
    report_pid: bool,
) {
    tokio::spawn(async move {
        let event = match exec::run(
            &agent.children,
            &agent.base_env,
            exec_req,
            if report_pid {
                exec::Sink::StreamWithPid(tx.clone())
            } else {
                exec::Sink::Stream(tx.clone())
            },
        )
        .await
        {
            Ok(result) => ExecEvent::Result(result),
            Err(error) => ExecEvent::Error { error },
        };
        let _ = tx.send(Ok(ndjson_line(&event))).await;
    });
}

async fn write_file(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = required_path(&req)?;
    let mode = files::parse_mode(http::query_param(req.uri(), "mode").as_deref())?;
    let sha = http::query_param(req.uri(), "sha256");
    let info = files::write_stream(&path, mode, sha, req.into_body()).await?;
    Ok(http::json(StatusCode::OK, &info))
}

async fn write_files(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let batch: WriteFilesRequest = http::read_json(req, MAX_BATCH_BYTES).await?;
    let files = files::write_many(batch.files.into_iter().collect()).await?;
    Ok(http::json(StatusCode::OK, &WriteFilesResponse { files }))
}

async fn read_file(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = required_path(&req)?;
    let (file, size) = files::open_read(&path).await?;
    let (tx, body) = ChannelBody::channel(4);
    tokio::spawn(files::pump_file(file, tx));
    Ok(Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, size)
        .body(body)
        .unwrap_or_else(|_| http::error(ApiError::internal("response"))))
}

/// `POST /fs/{op}`: the file-system operations of [`fs`], JSON in and out.
async fn fs_route(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    use crate::api::fs::{EntryList, MoveRequest, PathRequest};
    let op = req.uri().path().trim_start_matches("/fs/").to_string();
    if op == "move" {
        let body: MoveRequest = http::read_json(req, MAX_JSON_BODY).await?;
        let (from, to) = (fs::resolve(&body.source)?, fs::resolve(&body.destination)?);
        return Ok(http::json(StatusCode::OK, &fs::rename(&from, &to)?));
    }
    let body: PathRequest = http::read_json(req, MAX_JSON_BODY).await?;
    let path = fs::resolve(&body.path)?;
    match op.as_str() {
        "stat" => Ok(http::json(StatusCode::OK, &fs::stat(&path)?)),
        "mkdir" => Ok(http::json(StatusCode::OK, &fs::make_dir(&path)?)),
        "remove" => fs::remove(&path).map(|()| http::no_content()),
        "list" => {
            let entries = fs::list(&path, body.depth.unwrap_or(1))?;
            Ok(http::json(StatusCode::OK, &EntryList { entries }))
        }
        other => Err(ApiError::not_found(format!(
            "no file-system operation {other:?}"
        ))),
    }
}

/// `POST /signal {"pid", "signal"}`: 204, or 404 when `pid` is not a running command.
async fn signal(agent: &Arc<Agent>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: SignalRequest = http::read_json(req, MAX_JSON_BODY).await?;
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::bad_request(format!(
            "signal {} is not a signal number",
            body.signal
        )));
    }
    if exec::signal(&agent.children, body.pid, body.signal) {
        Ok(http::no_content())
    } else {
        Err(ApiError::not_found(format!(
            "no running command with pid {}",
            body.pid
        )))
    }
}

/// Kills every process but the agent, waits until they are gone, and empties the scratch
/// directories. SIGKILL takes a moment to act on each process (a fork bomb's are hundreds): the
/// reply waits for the last one, so that the next command finds an empty sandbox, and is an
/// error if any is still there after `RESET_WAIT` (the daemon then destroys the sandbox rather
/// than lend it again).
async fn reset(agent: &Arc<Agent>) -> Result<Response<Body>, ApiError> {
    exec::kill_all_but_self();
    // The next lease's request ids start afresh, and its sessions.
    agent.kept.clear();
    agent.sessions.clear();
    let deadline = tokio::time::Instant::now() + RESET_WAIT;
    loop {
        let reaped = agent.children.reaped.notified();
        tokio::pin!(reaped);
        // Registered before looking, so a reap in between is not missed.
        reaped.as_mut().enable();
        if !agent.children.reap() {
            break;
        }
        if tokio::time::timeout_at(deadline, reaped).await.is_err() {
            return Err(ApiError::unavailable(format!(
                "processes outlived the reset's SIGKILL for {} s",
                RESET_WAIT.as_secs()
            )));
        }
    }
    for dir in SCRATCH_DIRS {
        files::wipe_dir(dir);
    }
    Ok(http::json(StatusCode::OK, &serde_json::json!({"ok": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime waits for the socket path to appear and connects at once; whoever sees the
    /// path must find a listener behind it, and no staging name may be left. A watcher thread
    /// spins on the path while the agent side binds, many times over. (The bind-to-listen window
    /// of a plain `bind` is a few µs, so this catches it only now and then; under load, with the
    /// agent preempted in between, it was seen in CI.)
    #[test]
    fn the_socket_path_appears_only_once_it_listens() {
        let dir = std::env::temp_dir().join(format!("arl-agent-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("agent.sock");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for round in 0..300 {
            let _ = std::fs::remove_file(&path);
            let watched = path.clone();
            let watcher = std::thread::spawn(move || {
                while !watched.exists() {
                    std::hint::spin_loop();
                }
                std::os::unix::net::UnixStream::connect(&watched).map(|_| ())
            });
            let listener = runtime.block_on(async { bind_then_publish(&path) });
            let connected = watcher.join().expect("watcher thread");
            assert!(connected.is_ok(), "round {round}: {connected:?}");
            drop(listener);
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(names, vec![std::ffi::OsString::from("agent.sock")]);
    }
}
