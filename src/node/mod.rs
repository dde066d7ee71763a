//! `arl node`: the per-node daemon. It keeps warm sandboxes in local pools and serves the HTTP
//! API that hands them out and runs commands in them; the hot path never leaves this process
//! and the sandboxes' agents.

pub(crate) mod agent_client;
pub(crate) mod auth;
mod config;
pub(crate) mod manager;
mod metrics;
mod once;
mod pool;
mod routes;
pub(crate) mod sandbox;
mod server;

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::api::pools::RuntimeKind;
use crate::runtime::Runtime;
use crate::runtime::containerd::{ContainerdConfig, ContainerdRuntime};
use crate::runtime::process::{ProcessConfig, ProcessRuntime};
use crate::runtime::registry::Runtimes;

pub use config::NodeArgs;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("token file: {0}")]
    Auth(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub fn main(args: NodeArgs) -> i32 {
    crate::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arl node: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("arl node: {e}");
            1
        }
    }
}

async fn run(args: NodeArgs) -> Result<(), NodeError> {
    let settings = args.resolve()?;
    // Sandboxes' agents re-parent to us when their launcher exits, so we can reap them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    // Bind first: a daemon that cannot serve must not touch any sandbox.
    let listener = std::net::TcpListener::bind(&settings.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| NodeError::Bind {
            addr: settings.listen.clone(),
            source,
        })?;
    let e2b_listener = match &settings.e2b.listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| NodeError::Bind {
                    addr: addr.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let process = ProcessRuntime::new(ProcessConfig {
        state_dir: settings.state_dir.clone(),
        cgroup_parent: settings.cgroup_parent.clone(),
        uid_base: settings.uid_base,
    })?;
    // containerd is optional: without it, only `containerd` pools fail (with a clear error).
    let socket = &settings.containerd_socket;
    let containerd = if socket.exists() {
        ContainerdRuntime::new(ContainerdConfig {
            socket: socket.clone(),
            state_dir: settings.state_dir.clone(),
            cgroup_parent: settings.cgroup_parent.clone(),
            registry: settings.registry.clone(),
            uid_base: settings.uid_base,
        })
        .await
        .map(|r| Arc::new(r) as Arc<dyn Runtime>)
        .map_err(|e| e.to_string())
    } else {
        Err(format!(
            "no containerd socket at {} (set --containerd-socket)",
            socket.display()
        ))
    };
    if let Err(reason) = &containerd {
        tracing::info!(%reason, "containerd runtime unavailable");
    }
    let mut runtime = Runtimes::new();
    runtime.register(RuntimeKind::Process, Ok(Arc::new(process)));
    runtime.register(RuntimeKind::Containerd, containerd);
    let reclaimed = runtime.reclaim().await?;
    if reclaimed > 0 {
        tracing::warn!(
            sandboxes = reclaimed,
            "removed sandboxes left by an earlier daemon"
        );
    }
    let auth = auth::Auth::new(settings.token_file.clone()).map_err(NodeError::Auth)?;
    if !auth.enabled() {
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() && !settings.allow_unauthenticated {
            return Err(NodeError::Config(format!(
                "refusing to serve an unauthenticated API on {local}: anyone who can reach it could run code in sandboxes; give --token-file, listen on a loopback address, or pass --allow-unauthenticated"
            )));
        }
        tracing::warn!(
            "NO AUTHENTICATION: no --token-file given, so anyone who can reach {} can run code in sandboxes",
            settings.listen
        );
    }
    let mgr = manager::Manager::new(Arc::new(runtime), auth, settings.create_concurrency);
    for (name, spec) in &settings.pools {
        mgr.put_pool(name, spec.clone())
            .map_err(|e| NodeError::Config(format!("pool {name}: {}", e.message)))?;
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        state_dir = %settings.state_dir.display(),
        pools = settings.pools.len(),
        runtime = mgr.runtime_kind(),
        "arl node ready"
    );
    tokio::spawn(mgr.clone().housekeeping());
    let e2b = match e2b_listener {
        Some(listener) => {
            tracing::info!(listen = %listener.local_addr()?, default_pool = %settings.e2b.default_pool, "E2B-compatible endpoint");
            Some((listener, settings.e2b.front_config()))
        }
        None => None,
    };
    serve_front(listener, e2b, mgr.clone(), settings.max_connections).await?;
    tracing::info!("shutting down: destroying sandboxes");
    mgr.shutdown().await;
    Ok(())
}

/// Serves the HTTP API until SIGTERM/SIGINT, on a thread of its own with a single-threaded
/// runtime. A request then runs start to finish on one thread: with tokio's work-stealing
/// runtime each request woke a second worker (and the one who answered the agent another),
/// about 40 µs per exec on a 2-vCPU VM. Sandbox work (creation, teardown, refills) stays on the
/// multi-threaded runtime (see `Manager::tasks`), so it never holds up a request.
async fn serve_front(
    listener: std::net::TcpListener,
    e2b: Option<(std::net::TcpListener, crate::e2b::E2bConfig)>,
    mgr: Arc<manager::Manager>,
    max_connections: usize,
) -> Result<(), NodeError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("arl-http".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|front| {
                    front.block_on(async {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        // The E2B front shares this thread (and so the agents' kept-alive
                        // connections); it ends with the API's front.
                        if let Some((e2b_listener, config)) = e2b {
                            let e2b_listener = tokio::net::TcpListener::from_std(e2b_listener)?;
                            tokio::spawn(crate::e2b::serve(e2b_listener, mgr.clone(), config));
                        }
                        server::serve(listener, mgr, max_connections, shutdown_signal()).await;
                        Ok(())
                    })
                });
            let _ = done_tx.send(served);
        })?;
    match done_rx.await {
        Ok(served) => Ok(served?),
        Err(_) => Err(NodeError::Io(std::io::Error::other(
            "the HTTP thread ended without a word",
        ))),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not drain gracefully");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Default state directory.
pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/arl")
}
