//! A runtime for unit tests of the lease core: each sandbox is a small HTTP server on a Unix
//! socket in a temporary directory (answering `/ping` and `/reset` as an agent does), so the
//! manager's real agent client talks to it, without root and in microseconds. Failures are
//! injected on demand: creations that fail, resets that fail, sandboxes that die.

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
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fail_resets = fail_resets.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let fail = fail_resets.load(Ordering::Relaxed);
                        async move {
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
