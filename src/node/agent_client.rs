//! HTTP/1.1 to one sandbox's agent over its Unix socket, with a few kept-alive connections.

use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::api::ApiError;
use crate::http::{self, Body};

/// Idle connections kept per sandbox.
const MAX_IDLE: usize = 4;

pub struct AgentClient {
    socket: PathBuf,
    idle: Mutex<Vec<SendRequest<Body>>>,
}

/// A complete, bounded agent response.
pub struct AgentReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

fn unreachable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("the sandbox's agent is unreachable: {e}"))
}

impl AgentClient {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, ApiError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(unreachable)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(unreachable)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE && sender.is_ready() {
            idle.push(sender);
        }
    }

    /// Sends a request and reads the whole response, refusing more than `limit` bytes.
    pub async fn call(&self, req: Request<Body>, limit: usize) -> Result<AgentReply, ApiError> {
        let mut sender = match self.take_idle() {
            Some(s) => s,
            None => self.connect().await?,
        };
        let response = sender.send_request(req).await.map_err(unreachable)?;
        let (parts, body) = response.into_parts();
        let body = http::read_body(body, limit).await.map_err(|e| {
            ApiError::unavailable(format!("reading the agent's reply: {}", e.message))
        })?;
        self.put_idle(sender);
        Ok(AgentReply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Sends a request on a connection of its own and hands back the streaming response.
    pub async fn stream(&self, req: Request<Body>) -> Result<Response<Incoming>, ApiError> {
        let mut sender = self.connect().await?;
        sender.send_request(req).await.map_err(unreachable)
    }

    /// One cheap round trip.
    pub async fn ping(&self) -> Result<(), ApiError> {
        let req = Request::get("/ping")
            .body(http::empty())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let reply = self.call(req, 4096).await?;
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
