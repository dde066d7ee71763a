//! The E2B-compatible front door: one plain HTTP/1.1 listener that serves E2B's control plane
//! (create, connect, list, get, kill, set timeout) and, for each sandbox, envd (Connect RPCs
//! for processes and the file system, `/files`, `/health`) and the code interpreter
//! (`/execute`, contexts) — routed as E2B's own proxy does,
//! by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers or a `{port}-{id}.{domain}` Host.
//!
//! It is a second front door over the same engine: sandboxes come from the manager's pools,
//! commands and files go through the sandboxes' agents, ownership is the node's token digest,
//! and metrics land in the node's registry. Whatever is not served answers Connect's
//! `unimplemented` (envd) or `501` (control plane), never a bare 404.

mod connect;
mod control;
mod envd;
mod files;
mod filesystem;
mod interpreter;
mod process;
mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::ApiError;
use crate::api::sessions::MAX_CODE_BYTES;
use crate::http::{self, Body, MAX_JSON_BODY};
use crate::node::manager::Manager;

/// The envd port of a sandbox (E2B's constant).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port (E2B's constant).
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// The envd version reported: the lowest that has what this front serves and that does not
/// make the SDK force a user on every call. Features the SDK gates behind later versions
/// (closing stdin, streamed/octet-stream uploads, file metadata, watch options) are then
/// refused by the SDK itself, before any request.
pub const ENVD_VERSION: &str = "0.4.0";

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the E2B front.
#[derive(Debug, Clone)]
pub struct E2bConfig {
    /// The pool that template `base` (E2B's default) names.
    pub default_pool: String,
    /// The domain returned to clients; when unset, the host the request came in on.
    pub domain: Option<String>,
}

/// The E2B front's state, shared by the node's front threads.
pub struct Front {
    mgr: Arc<Manager>,
    config: E2bConfig,
    registry: state::Registry,
}

impl Front {
    pub fn new(mgr: Arc<Manager>, config: E2bConfig) -> Arc<Self> {
        Arc::new(Self {
            mgr,
            config,
            registry: state::Registry::default(),
        })
    }
}

/// Serves the E2B front on `listener` until `stop` (the node's shutdown; the sandboxes, and
/// the commands in them, end with the node).
pub async fn serve(listener: TcpListener, front: Arc<Front>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "e2b accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let service = service_fn(move |req| {
            let front = front.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&front, req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// A request's body as the routes see it: read whole before routing, or, for the streams that
/// must not be (file uploads, a process's input), as it arrives.
///
/// Read before routing so that a route that answers without the body (an unknown sandbox, a
/// bad token, an unserved call) still leaves the connection clean: hyper closes a keep-alive
/// connection whose request body was not read, without telling the client, and a client that
/// reuses it then sees "server disconnected" (E2B's older SDKs do not retry).
pub type ReqBody = Either<Full<Bytes>, Incoming>;

/// The largest body read before routing (the code interpreter's snippets are the largest).
const MAX_BUFFERED_BODY: usize = MAX_CODE_BYTES + MAX_JSON_BODY;

/// Whether a request's body is a stream to hand on as it comes.
fn streams_body(target: &Target, path: &str) -> bool {
    matches!(
        target,
        Target::Sandbox {
            port: ENVD_PORT,
            ..
        }
    ) && (path == "/files" || path == "/process.Process/StreamInput")
}

async fn buffered(target: &Target, req: Request<Incoming>) -> Result<Request<ReqBody>, ApiError> {
    let (parts, body) = req.into_parts();
    let body = if streams_body(target, parts.uri.path()) {
        Either::Right(body)
    } else {
        Either::Left(Full::new(http::read_body(body, MAX_BUFFERED_BODY).await?))
    };
    Ok(Request::from_parts(parts, body))
}

/// Where a request goes, read as E2B's proxy reads it.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    ControlPlane,
    Sandbox { id: String, port: u16 },
}

fn target<B>(req: &Request<B>) -> Target {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // SDKs 2.7 to 2.26 send the routing headers on `connect` too: the control plane's own
    // paths are its, whatever the headers say (no envd or interpreter path starts so).
    let path = req.uri().path();
    if path.starts_with("/sandboxes") || path.starts_with("/v2/sandboxes") {
        return Target::ControlPlane;
    }
    if let Some(id) = header("e2b-sandbox-id") {
        let port = header("e2b-sandbox-port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(ENVD_PORT);
        return Target::Sandbox { id, port };
    }
    let host = header("host").unwrap_or_default();
    let first = host.split('.').next().unwrap_or_default();
    if host.contains('.')
        && let Some((port, id)) = first.split_once('-')
        && let Ok(port) = port.parse()
    {
        return Target::Sandbox {
            id: id.to_string(),
            port,
        };
    }
    Target::ControlPlane
}

async fn handle(front: &Arc<Front>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let span = tracing::info_span!("e2b", method = %req.method(), path = %req.uri().path());
    let target = target(&req);
    let (label, response) = match buffered(&target, req).await {
        Err(e) => ("/e2b:body", http::error(e)),
        Ok(req) => match target {
            Target::ControlPlane => control::route(front, req).instrument(span.clone()).await,
            Target::Sandbox { id, port } => {
                envd::route(front, &id, port, req)
                    .instrument(span.clone())
                    .await
            }
        },
    };
    let status = response.status();
    front
        .mgr
        .metrics
        .http_seconds
        .with_label_values(&[label, status.as_str()])
        .observe(started.elapsed().as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "done"
        )
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/health");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn routes_by_headers_then_host_like_the_e2b_proxy() {
        assert_eq!(
            target(&req(&[
                ("e2b-sandbox-id", "abc"),
                ("e2b-sandbox-port", "49999")
            ])),
            Target::Sandbox {
                id: "abc".into(),
                port: 49999
            }
        );
        assert_eq!(
            target(&req(&[("host", "49983-abc.arl.example:8443")])),
            Target::Sandbox {
                id: "abc".into(),
                port: 49983
            }
        );
        let connect = Request::builder()
            .uri("/sandboxes/abc/connect")
            .header("e2b-sandbox-id", "abc")
            .header("e2b-sandbox-port", "49983")
            .body(())
            .expect("request");
        assert_eq!(target(&connect), Target::ControlPlane, "SDK 2.7's connect");
        assert_eq!(
            target(&req(&[("host", "127.0.0.1:3000")])),
            Target::ControlPlane
        );
        assert_eq!(
            target(&req(&[("host", "api.arl.example")])),
            Target::ControlPlane
        );
    }
}
