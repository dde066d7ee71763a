//! `arl node`: the per-node daemon. It keeps warm sandboxes in local pools and serves the HTTP
//! API that hands them out and runs commands in them; the hot path never leaves this process
//! and the sandboxes' agents.

mod adopt;
pub(crate) mod agent_client;
pub(crate) mod auth;
mod cluster;
mod config;
mod fork;
mod housekeeping;
mod lease;
#[cfg(test)]
mod lease_tests;
mod listen;
pub(crate) mod manager;
mod metrics;
pub(crate) mod once;
pub(crate) mod pause;
pub(crate) mod peers;
mod pool;
mod records;
mod refill;
mod routes;
pub(crate) mod sandbox;
mod server;
mod snapshots;
#[cfg(test)]
mod testing;
pub mod trajectory;

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::api::pools::RuntimeKind;
use crate::runtime::Runtime;
use crate::runtime::containerd::{ContainerdConfig, ContainerdRuntime};
use crate::runtime::process::{ProcessConfig, ProcessRuntime};
use crate::runtime::registry::Runtimes;

pub use config::{NodeArgs, NodeCommand};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Records(#[from] records::RecordError),
    #[error("start-up: {0}")]
    Start(#[from] adopt::StartError),
    #[error("token file: {0}")]
    Auth(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cluster mode: {0}")]
    Cluster(#[from] cluster::ClusterError),
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
    let command = args.command;
    let settings = args.resolve()?;
    // Sandboxes' agents re-parent to us when their launcher exits, so we can reap them.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; dead agents may linger as zombies");
    }

    if command == Some(NodeCommand::Cleanup) {
        return cleanup(&settings).await;
    }
    // Bind first: a daemon that cannot serve must not touch any sandbox. One listener per
    // front thread (see `listen`).
    let threads = settings.front_threads.max(1);
    let listeners =
        listen::listeners(&settings.listen, threads).map_err(|source| NodeError::Bind {
            addr: settings.listen.clone(),
            source,
        })?;
    let e2b_listeners = match &settings.e2b.listen {
        Some(addr) => Some(
            listen::listeners(addr, threads).map_err(|source| NodeError::Bind {
                addr: addr.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let local = listeners
        .first()
        .ok_or_else(|| NodeError::Config("no listener".into()))?
        .local_addr()?;
    let runtime = runtimes(&settings).await?;
    let records = records::Records::open(&settings.state_dir)?;
    let auth = auth::Auth::new(settings.token_file.clone()).map_err(NodeError::Auth)?;
    if !auth.enabled() {
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
    let mgr = manager::Manager::new(
        Arc::new(runtime),
        auth,
        settings.create_concurrency,
        records,
    );
    mgr.set_snapshots(snapshots::Snapshots::open(
        &settings.state_dir,
        settings.snapshots,
    )?);
    let adopted = mgr.start(&settings.pools).await?;
    if adopted != adopt::Adopted::default() {
        tracing::info!(
            allocated = adopted.allocated,
            idle = adopted.idle,
            lost = adopted.lost,
            swept = adopted.swept,
            "took back the sandboxes an earlier daemon left"
        );
    }
    tracing::info!(
        listen = %local,
        front_threads = threads,
        state_dir = %settings.state_dir.display(),
        pools = settings.pools.len(),
        runtime = mgr.runtime_kind(),
        handover = settings.handover,
        "arl node ready"
    );
    tokio::spawn(mgr.clone().housekeeping());
    if let Some(cluster) = &settings.cluster {
        cluster::start(mgr.clone(), cluster, local).await?;
    }
    let e2b = match e2b_listeners {
        Some(listeners) => {
            if let Some(first) = listeners.first() {
                tracing::info!(listen = %first.local_addr()?, default_pool = %settings.e2b.default_pool, "E2B-compatible endpoint");
            }
            Some((
                listeners,
                crate::e2b::Front::new(mgr.clone(), settings.e2b.front_config()),
            ))
        }
        None => None,
    };
    let shared = server::Shared::new(mgr.clone(), settings.max_connections);
    serve_front(listeners, e2b, shared).await?;
    let mode = if settings.handover {
        tracing::info!("shutting down: handing the sandboxes over to the next daemon");
        manager::ShutdownMode::HandOver
    } else {
        tracing::info!("shutting down: destroying sandboxes");
        manager::ShutdownMode::Stop
    };
    mgr.shutdown(mode).await;
    Ok(())
}

/// The node's runtimes: always the process runtime; containerd when its socket answers.
async fn runtimes(settings: &config::Settings) -> Result<Runtimes, NodeError> {
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
    let kubernetes = match &settings.cluster {
        Some(cluster) => {
            Ok(Arc::new(cluster::kubernetes_runtime(cluster).await?) as Arc<dyn Runtime>)
        }
        None => Err("not in cluster mode (start the node with --kubernetes)".to_string()),
    };
    runtime.register(RuntimeKind::Kubernetes, kubernetes);
    Ok(runtime)
}

/// `arl node cleanup`: destroys every sandbox left on this state directory and forgets
/// their records. The state directory's lock refuses it while a daemon runs there.
async fn cleanup(settings: &config::Settings) -> Result<(), NodeError> {
    let runtime = runtimes(settings).await?;
    let records = records::Records::open(&settings.state_dir)?;
    let n = runtime.reclaim().await?;
    records.clear();
    snapshots::Snapshots::open(&settings.state_dir, settings.snapshots)?.clear();
    tracing::info!(
        sandboxes = n,
        "destroyed the sandboxes left on this state directory"
    );
    println!("removed {n} sandboxes");
    Ok(())
}

/// Serves the HTTP API until SIGTERM/SIGINT on one thread per listener, each with a
/// single-threaded runtime accepting from its own listener (the kernel spreads connections over
/// them, see `listen`). A request then runs start to finish on one thread: with tokio's
/// work-stealing runtime each request woke a second worker (and the one who answered the agent
/// another), about 40 µs per exec on a 2-vCPU VM. A connection stays on the thread that accepted
/// it, so more threads serve more clients at once without adding to any one request. Sandbox
/// work (creation, teardown, refills) stays on the multi-threaded runtime (see `Manager::tasks`),
/// so it never holds up a request.
async fn serve_front(
    listeners: Vec<std::net::TcpListener>,
    e2b: Option<(Vec<std::net::TcpListener>, Arc<crate::e2b::Front>)>,
    shared: Arc<server::Shared>,
) -> Result<(), NodeError> {
    let stop = tokio_util::sync::CancellationToken::new();
    let threads = listeners.len();
    let (mut e2b_listeners, e2b_front): (Vec<Option<std::net::TcpListener>>, _) = match e2b {
        Some((l, front)) => (l.into_iter().map(Some).collect(), Some(front)),
        None => (Vec::new(), None),
    };
    // Each thread says how it ended, once.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<std::io::Result<()>>(threads);
    for (n, listener) in listeners.into_iter().enumerate() {
        let e2b = e2b_listeners
            .get_mut(n)
            .and_then(Option::take)
            .zip(e2b_front.clone());
        let (shared, stop, done_tx) = (shared.clone(), stop.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("arl-http-{n}"))
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|front| {
                        front.block_on(async {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            // The E2B front has a listener on every front thread too; it stops
                            // with the API's front.
                            if let Some((e2b_listener, front)) = e2b {
                                let e2b_listener = tokio::net::TcpListener::from_std(e2b_listener)?;
                                tokio::spawn(crate::e2b::serve(e2b_listener, front, stop.clone()));
                            }
                            server::serve(listener, shared, stop, n).await;
                            Ok(())
                        })
                    });
                let _ = done_tx.blocking_send(served);
            })?;
    }
    drop(done_tx);
    let mut ended = Vec::with_capacity(threads);
    tokio::select! {
        () = shutdown_signal() => {}
        // A front thread that ends on its own (it could not start) ends the node.
        first = done_rx.recv() => ended.extend(first),
    }
    stop.cancel();
    while ended.len() < threads {
        match done_rx.recv().await {
            Some(served) => ended.push(served),
            None => {
                return Err(NodeError::Io(std::io::Error::other(
                    "an HTTP thread ended without a word",
                )));
            }
        }
    }
    ended.into_iter().collect::<std::io::Result<()>>()?;
    Ok(())
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
