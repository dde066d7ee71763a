//! HTTP/1.1 to one sandbox's agent over its Unix socket (or, for pods reached by their IP,
//! over TCP with the sandbox's token on every request), with a few kept-alive connections.
//!
//! A connection is served by the runtime that opened it. Kept-alive connections are for the
//! request path (the HTTP front's thread); the manager's own calls (readiness and health pings)
//! open a connection each and close it, so they never leave one behind that would bounce every
//! later request between threads.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::sandbox::CachedReply;
use crate::api::ApiError;
use crate::http::{self, Body};
use crate::quiet_unix::QuietUnixStream;
use crate::runtime::AgentAddress;
use crate::util::MutexExt;

/// Idle connections kept per sandbox.
const MAX_IDLE: usize = 4;

pub struct AgentClient {
    address: AgentAddress,
    /// `Bearer <token>` for a TCP-reached agent (marked sensitive: never logged).
    authorization: Option<HeaderValue>,
    /// Kept-alive connections, each with the front thread whose runtime drives it: a request
    /// takes only its own thread's, so no exec wakes another thread.
    idle: Mutex<Vec<(ThreadId, SendRequest<Body>)>>,
}

/// A complete, bounded agent response.
pub struct AgentReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How long an agent may take to answer a request that runs no command.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A stuck agent must not hold a request (or its connection) forever.
async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(limit, work).await.map_err(|_| {
        ApiError::unavailable(format!(
            "the sandbox's agent did not answer within {} s",
            limit.as_secs()
        ))
    })?
}

fn busy() -> ApiError {
    ApiError::unavailable("the node is buffering too much command output right now; retry")
}

fn unreachable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("the sandbox's agent is unreachable: {e}"))
}

impl AgentClient {
    pub fn new(address: AgentAddress) -> Self {
        let authorization = match &address {
            AgentAddress::Unix(_) => None,
            AgentAddress::Tcp { token, .. } => {
                // 64 hex digits always make a valid header value.
                HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .ok()
                    .map(|mut value| {
                        value.set_sensitive(true);
                        value
                    })
            }
        };
        Self {
            address,
            authorization,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Adds the sandbox's token to a request for a TCP-reached agent.
    fn authorize(&self, req: &mut Request<Body>) {
        if let Some(value) = &self.authorization {
            req.headers_mut().insert(AUTHORIZATION, value.clone());
        }
    }

    /// A new HTTP/1.1 connection to the agent, driven by a task of its own (`upgrades` keeps
    /// it able to be taken over, for the PTY).
    async fn connect_with(&self, upgrades: bool) -> Result<SendRequest<Body>, ApiError> {
        match &self.address {
            AgentAddress::Unix(socket) => {
                let stream = UnixStream::connect(socket)
                    .await
                    .and_then(|s| QuietUnixStream::new(s.into_std()?))
                    .map_err(unreachable)?;
                handshake(stream, upgrades).await
            }
            AgentAddress::Tcp { addr, .. } => {
                let stream = TcpStream::connect(addr).await.map_err(unreachable)?;
                stream.set_nodelay(true).map_err(unreachable)?;
                handshake(stream, upgrades).await
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, ApiError> {
        self.connect_with(false).await
    }

    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let me = std::thread::current().id();
        let mut idle = self.idle.lock_or_recover();
        // Closed connections go whoever finds them.
        idle.retain(|(_, sender)| !sender.is_closed());
        let mine = idle
            .iter()
            .rposition(|(thread, sender)| *thread == me && sender.is_ready())?;
        Some(idle.swap_remove(mine).1)
    }

    fn put_idle(&self, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock_or_recover();
        if idle.len() < MAX_IDLE && sender.is_ready() {
            idle.push((std::thread::current().id(), sender));
        }
    }

    /// Sends a request and reads the whole response, refusing more than `limit` bytes.
    pub async fn call(&self, req: Request<Body>, limit: usize) -> Result<AgentReply, ApiError> {
        within(AGENT_TIMEOUT, self.call_inner(req, limit, true)).await
    }

    /// Like [`call`](Self::call), on a connection of its own that is closed afterwards (for
    /// the manager's calls, see the module's comment).
    pub async fn call_unpooled(
        &self,
        req: Request<Body>,
        limit: usize,
    ) -> Result<AgentReply, ApiError> {
        within(AGENT_TIMEOUT, self.call_inner(req, limit, false)).await
    }

    async fn call_inner(
        &self,
        req: Request<Body>,
        limit: usize,
        pooled: bool,
    ) -> Result<AgentReply, ApiError> {
        let mut req = req;
        self.authorize(&mut req);
        let idle = if pooled { self.take_idle() } else { None };
        let mut sender = match idle {
            Some(s) => s,
            None => self.connect().await?,
        };
        let response = sender.send_request(req).await.map_err(unreachable)?;
        let (parts, body) = response.into_parts();
        let body = http::read_body(body, limit).await.map_err(|e| {
            ApiError::unavailable(format!("reading the agent's reply: {}", e.message))
        })?;
        if pooled {
            self.put_idle(sender);
        }
        Ok(AgentReply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Like [`call`](Self::call), but every byte buffered is first taken from the node-wide
    /// `budget` (in KiB): when many large replies are in flight at once, the next one is
    /// refused with a retryable error instead of growing the daemon without bound.
    pub async fn call_budgeted(
        &self,
        req: Request<Body>,
        limit: usize,
        budget: &Arc<Semaphore>,
        deadline: Duration,
    ) -> Result<(AgentReply, OwnedSemaphorePermit), ApiError> {
        within(deadline, self.call_budgeted_inner(req, limit, budget)).await
    }

    async fn call_budgeted_inner(
        &self,
        req: Request<Body>,
        limit: usize,
        budget: &Arc<Semaphore>,
    ) -> Result<(AgentReply, OwnedSemaphorePermit), ApiError> {
        let mut req = req;
        self.authorize(&mut req);
        let mut sender = match self.take_idle() {
            Some(s) => s,
            None => self.connect().await?,
        };
        let response = sender.send_request(req).await.map_err(unreachable)?;
        let (parts, mut body) = response.into_parts();
        let mut buf = BytesMut::new();
        let mut held = budget
            .clone()
            .try_acquire_many_owned(1)
            .map_err(|_| busy())?;
        let mut held_kib = 1u32;
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError::unavailable(format!("reading the agent's reply: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let size = buf.len() + data.len();
            if size > limit {
                return Err(ApiError::unavailable("the agent's reply exceeds its bound"));
            }
            let kib = u32::try_from(size.div_ceil(1024)).map_err(|_| busy())?;
            if kib > held_kib {
                held.merge(
                    budget
                        .clone()
                        .try_acquire_many_owned(kib - held_kib)
                        .map_err(|_| busy())?,
                );
                held_kib = kib;
            }
            buf.extend_from_slice(&data);
        }
        self.put_idle(sender);
        Ok((
            AgentReply {
                status: parts.status,
                headers: parts.headers,
                body: buf.freeze(),
            },
            held,
        ))
    }

    /// Sends a request on a connection of its own and hands back the streaming response once
    /// its head arrives (within `head_timeout`).
    pub async fn stream(
        &self,
        req: Request<Body>,
        head_timeout: Duration,
    ) -> Result<Response<Incoming>, ApiError> {
        let mut req = req;
        self.authorize(&mut req);
        within(head_timeout, async {
            let mut sender = self.connect().await?;
            sender.send_request(req).await.map_err(unreachable)
        })
        .await
    }

    /// Sends an upgrade request (the PTY's WebSocket) on a connection of its own that can be
    /// taken over, and hands back the agent's answer once its head arrives.
    pub async fn upgrade(&self, req: Request<Body>) -> Result<Response<Incoming>, ApiError> {
        let mut req = req;
        self.authorize(&mut req);
        within(AGENT_TIMEOUT, async {
            let mut sender = self.connect_with(true).await?;
            sender.send_request(req).await.map_err(unreachable)
        })
        .await
    }

    /// One cheap round trip.
    pub async fn ping(&self) -> Result<(), ApiError> {
        let req = Request::get("/ping")
            .body(http::empty())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let reply = self.call_unpooled(req, 4096).await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(ApiError::unavailable(format!(
                "agent ping answered {}",
                reply.status
            )))
        }
    }
}

/// The HTTP/1.1 handshake on a new connection, the connection driven by a task of its own.
async fn handshake<S>(stream: S, upgrades: bool) -> Result<SendRequest<Body>, ApiError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(unreachable)?;
    tokio::spawn(async move {
        let _ = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
    });
    Ok(sender)
}

/// A request for an agent, with a JSON content type.
pub fn agent_request(method: Method, uri: &str, body: Body) -> Result<Request<Body>, ApiError> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| ApiError::bad_request(format!("bad request line: {e}")))
}

/// A buffered agent reply, handed to the client as it is.
pub fn reply(reply: CachedReply) -> Response<Body> {
    Response::builder()
        .status(reply.status)
        .header(CONTENT_TYPE, "application/json")
        .body(http::full(reply.body))
        .unwrap_or_else(|_| http::error(ApiError::internal("response")))
}

/// Hands an agent's streaming response to the client as it comes.
pub fn passthrough(response: Response<Incoming>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as http::BoxError).boxed(),
    )
}
