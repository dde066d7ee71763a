//! Request bodies, read so that every answer leaves a kept-alive connection usable.
//!
//! hyper can only reuse a connection whose request body was read to its end: when a route
//! answers without reading it (an unknown sandbox, a bad token, a route that takes no body),
//! hyper closes the connection after the answer without saying so, and a client that reuses
//! it sees "connection reset". So:
//!
//! * an answer decided from the head alone (no such route, 405, 401, draining) reads the body
//!   and drops it, within [`EARLY_BODY_LIMIT`] bytes and [`EARLY_BODY_TIMEOUT`];
//! * a routed request's body is read whole, within its route's bound, before the route runs;
//!   the routes see it as [`ReqBody`];
//! * file uploads stream through as they come ([`Streamed`]); one answered early is drained
//!   like a head-decided answer, and one whose answer comes before its end says so;
//! * wherever a body is left unread (past a bound, too slow, a client awaiting
//!   `100-continue`), the answer carries `Connection: close`, and the connection closes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, EXPECT, HeaderMap, HeaderValue};
use hyper::{Request, Response};

use crate::api::{ApiError, ErrorCode};
use crate::http::{self, Body};

/// The most of an unneeded body read (and dropped) to keep its connection usable.
pub const EARLY_BODY_LIMIT: usize = 1 << 20;
/// How long an unneeded body may take to arrive before its connection is closed instead.
pub const EARLY_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// A request's body as the routes see it: read whole before the route runs, or, for a file
/// upload, streamed as it comes.
pub type ReqBody = Either<Full<Bytes>, Streamed>;

/// Why a body was left unread: its connection is closed after the answer.
#[derive(Debug, thiserror::Error)]
pub enum Unread {
    #[error("the client awaits 100-continue before sending its body")]
    AwaitsContinue,
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive within {0:?}")]
    TooSlow(Duration),
    #[error("reading the body: {0}")]
    Broken(#[from] hyper::Error),
}

/// A streamed request body that tells whether it was read to its end.
pub struct Streamed {
    inner: Incoming,
    ended: Arc<AtomicBool>,
}

impl Streamed {
    pub fn new(inner: Incoming) -> Self {
        let ended = Arc::new(AtomicBool::new(inner.is_end_stream()));
        Self { inner, ended }
    }

    /// Set once the body was read to its end.
    pub fn ended(&self) -> Arc<AtomicBool> {
        self.ended.clone()
    }
}

impl HttpBody for Streamed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let ended = self.inner.is_end_stream();
        if ended {
            self.ended.store(true, Ordering::Release);
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer that closes its connection, saying so.
pub fn closing(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn awaits_continue(headers: &HeaderMap) -> bool {
    headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads a body nobody needs to its end and drops it, within the early bounds.
async fn discard<B>(mut body: B, headers: &HeaderMap) -> Result<(), Unread>
where
    B: HttpBody<Data = Bytes, Error = hyper::Error> + Unpin,
{
    if body.is_end_stream() {
        return Ok(());
    }
    // Reading would invite a body the answer does not need.
    if awaits_continue(headers) {
        return Err(Unread::AwaitsContinue);
    }
    if body.size_hint().lower() > EARLY_BODY_LIMIT as u64 {
        return Err(Unread::TooLarge(EARLY_BODY_LIMIT));
    }
    let read = async {
        let mut seen = 0;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                seen += data.len();
                if seen > EARLY_BODY_LIMIT {
                    return Err(Unread::TooLarge(EARLY_BODY_LIMIT));
                }
            }
        }
        Ok::<(), Unread>(())
    };
    tokio::time::timeout(EARLY_BODY_TIMEOUT, read)
        .await
        .map_err(|_| Unread::TooSlow(EARLY_BODY_TIMEOUT))?
}

/// `response`, given without the request's body: the body is read and dropped first, or, past
/// the early bounds, the answer closes the connection.
pub async fn early<B>(body: B, headers: &HeaderMap, response: Response<Body>) -> Response<Body>
where
    B: HttpBody<Data = Bytes, Error = hyper::Error> + Unpin,
{
    match discard(body, headers).await {
        Ok(()) => response,
        Err(why) => {
            tracing::debug!(%why, status = response.status().as_u16(), "answering early; the connection closes");
            closing(response)
        }
    }
}

/// [`early`] for a routed request: a streamed body is drained, a read one is already gone.
pub async fn early_routed(req: Request<ReqBody>, response: Response<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    match body {
        Either::Left(_) => response,
        Either::Right(streamed) => early(streamed, &parts.headers, response).await,
    }
}

/// The largest body declared over its route's bound that is still read (and dropped) before
/// the 413: a client busy writing it would otherwise see its connection reset (the node
/// closing with unread data) instead of the answer.
pub const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads and drops `body`, for [`EARLY_BODY_TIMEOUT`] at most.
async fn drain(mut body: Incoming) {
    let read = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(EARLY_BODY_TIMEOUT, read).await;
}

/// Reads a routed request's body whole, within `limit` bytes (413 past it; a body declared
/// larger is drained first up to [`DRAIN_LIMIT`], so that its sender gets the answer).
pub async fn read(body: Incoming, limit: usize) -> Result<Full<Bytes>, ApiError> {
    let declared = body.size_hint().lower();
    if declared > limit as u64 {
        if declared <= DRAIN_LIMIT {
            drain(body).await;
        }
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        ));
    }
    Ok(Full::new(http::read_body(body, limit).await?))
}
