//! A runtime for unit tests of the lease core: each sandbox is a small HTTP server on a Unix
//! socket in a temporary directory (answering `/ping` and `/reset` as an agent does), so the
//! manager's real agent client talks to it, without root and in microseconds. Failures are
//! injected on demand: creations that fail, resets that fail, sandboxes that die. `/exec` runs
//! its command on the host (no isolation: tests only) in the sandbox's own directory
//! ([`FakeRuntime::root`]), and `POST /files` writes under that directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::http;
use crate::runtime::{AgentAddress, BoxFuture, Created, ExitReason, Runtime, RuntimeError};
use crate::util::{MutexExt, random_id};

struct FakeSandbox {
    server: JoinHandle<()>,
    died: watch::Sender<bool>,
    socket: PathBuf,
}

pub struct FakeRuntime {
    dir: PathBuf,
    live: Mutex<HashMap<String, FakeSandbox>>,
    /// How many of the next creations fail.
    pub fail_creates: AtomicUsize,
    /// Whether resets answer an error.
    pub fail_resets: Arc<AtomicBool>,
    pub creates: AtomicUsize,
    pub destroys: AtomicUsize,
}

impl FakeRuntime {
    pub fn new() -> Arc<Self> {
        let dir = std::env::temp_dir().join(random_id("arl-fake-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Arc::new(Self {
            dir,
            live: Mutex::new(HashMap::new()),
            fail_creates: AtomicUsize::new(0),
            fail_resets: Arc::new(AtomicBool::new(false)),
            creates: AtomicUsize::new(0),
            destroys: AtomicUsize::new(0),
        })
    }

    pub fn live(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.live.lock_or_recover().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The sandbox dies on its own: its agent stops answering and `exited` resolves.
    pub fn kill(&self, id: &str) {
        if let Some(sb) = self.live.lock_or_recover().get(id) {
            sb.server.abort();
            let _ = std::fs::remove_file(&sb.socket);
            sb.died.send_replace(true);
        }
    }

    fn serve(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        let socket = self.dir.join(format!("{id}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let fail_resets = self.fail_resets.clone();
        let root = self.root(id);
        std::fs::create_dir_all(&root)?;
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fail_resets = fail_resets.clone();
                let root = root.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let fail = fail_resets.load(Ordering::Relaxed);
                        let root = root.clone();
                        async move {
                            match (req.method(), req.uri().path()) {
                                (&Method::POST, "/exec") => return Ok(fake_exec(&root, req).await),
                                (&Method::POST, "/files") => {
                                    return Ok(fake_write_files(&root, req).await);
                                }
                                _ => {}
                            }
                            let status = match (req.method(), req.uri().path()) {
                                (&Method::GET, "/ping") => StatusCode::OK,
                                (&Method::POST, "/reset") if fail => {
                                    StatusCode::SERVICE_UNAVAILABLE
                                }
                                (&Method::POST, "/reset") => StatusCode::OK,
                                _ => StatusCode::NOT_FOUND,
                            };
                            Ok::<_, std::convert::Infallible>(http::json(
                                status,
                                &serde_json::json!({"ok": status == StatusCode::OK}),
                            ))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let (died, _) = watch::channel(false);
        self.live.lock_or_recover().insert(
            id.to_string(),
            FakeSandbox {
                server,
                died,
                socket: socket.clone(),
            },
        );
        Ok(socket)
    }
}

impl FakeRuntime {
    /// The directory a fake sandbox's commands run in and its files are written under.
    pub fn root(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.root"))
    }
}

/// Where a sandbox path lands under a fake sandbox's directory.
fn under(root: &std::path::Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn fake_reply(status: StatusCode, value: &serde_json::Value) -> hyper::Response<http::Body> {
    http::json(status, value)
}

/// Runs an exec request's argv on the host, in the sandbox's directory, as the agent would
/// answer it (output cut at `max_output_bytes`, the timeout kills).
async fn fake_exec(
    root: &std::path::Path,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http::Body> {
    use http_body_util::BodyExt;
    let bad = |m: String| {
        fake_reply(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": {"code": "bad_request", "message": m, "retryable": false}}),
        )
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(e.to_string()),
    };
    let exec: crate::api::ExecRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    let argv = match exec.argv() {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    let cwd = exec
        .cwd
        .as_deref()
        .map_or(root.to_path_buf(), |c| under(root, c));
    let _ = std::fs::create_dir_all(&cwd);
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .envs(&exec.env)
        .current_dir(&cwd)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let started = std::time::Instant::now();
    let timeout = std::time::Duration::from_millis(exec.timeout_ms.unwrap_or(30_000));
    let (output, timed_out) = match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => (Some(output), false),
        Ok(Err(e)) => return bad(e.to_string()),
        Err(_) => (None, true),
    };
    let limit = exec.max_output_bytes.unwrap_or(usize::MAX);
    let cut = |bytes: &[u8]| String::from_utf8_lossy(&bytes[..bytes.len().min(limit)]).into_owned();
    let result = crate::api::ExecResult {
        stdout: output.as_ref().map(|o| cut(&o.stdout)).unwrap_or_default(),
        stderr: output.as_ref().map(|o| cut(&o.stderr)).unwrap_or_default(),
        exit_code: output.as_ref().and_then(|o| o.status.code()).unwrap_or(137),
        signal: timed_out.then_some(9),
        timed_out,
        truncated: output
            .as_ref()
            .is_some_and(|o| o.stdout.len() > limit || o.stderr.len() > limit),
        oom_killed: false,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    fake_reply(StatusCode::OK, &serde_json::json!(result))
}

/// Writes a batch of text files under the sandbox's directory.
async fn fake_write_files(
    root: &std::path::Path,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http::Body> {
    use http_body_util::BodyExt;
    let fail = |m: String| {
        fake_reply(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": {"code": "bad_request", "message": m, "retryable": false}}),
        )
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail(e.to_string()),
    };
    let batch: crate::api::WriteFilesRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    for (path, content) in batch.files {
        let crate::api::FileContent::Text(text) = content else {
            return fail("the fake writes text only".into());
        };
        let target = under(root, &path);
        if let Some(parent) = target.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::write(&target, text) {
            return fail(e.to_string());
        }
    }
    fake_reply(StatusCode::OK, &serde_json::json!({"files": []}))
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        for (_, sb) in self.live.lock_or_recover().drain() {
            sb.server.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        _spec: &'a PoolSpec,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(async move {
            self.creates.fetch_add(1, Ordering::Relaxed);
            let failing = self
                .fail_creates
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(RuntimeError::Create("injected failure".into()));
            }
            Ok(Created {
                agent: AgentAddress::Unix(self.serve(id)?),
            })
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if let Some(sb) = self.live.lock_or_recover().remove(id) {
                self.destroys.fetch_add(1, Ordering::Relaxed);
                sb.server.abort();
                let _ = std::fs::remove_file(&sb.socket);
                sb.died.send_replace(true);
            }
            Ok(())
        })
    }

    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ExitReason> {
        let rx = self
            .live
            .lock_or_recover()
            .get(id)
            .map(|sb| sb.died.subscribe());
        Box::pin(async move {
            if let Some(mut rx) = rx {
                let _ = rx.wait_for(|dead| *dead).await;
            }
            ExitReason::Unknown
        })
    }

    fn set_paused<'a>(
        &'a self,
        _id: &'a str,
        _paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
        Box::pin(async { Ok(0) })
    }

    /// A sandbox of an earlier manager on this fake is taken back while it still answers.
    fn adopt<'a>(
        &'a self,
        id: &'a str,
        _kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(async move {
            let live = self.live.lock_or_recover();
            match live.get(id) {
                Some(sb) if !*sb.died.borrow() => Ok(Created {
                    agent: AgentAddress::Unix(sb.socket.clone()),
                }),
                _ => Err(RuntimeError::Adopt {
                    id: id.to_string(),
                    reason: "gone".into(),
                }),
            }
        })
    }
}
