//! Small HTTP helpers shared by the daemon, the agent and the CLI: one body type, JSON in and
//! out with bounded reads, the error envelope, and a channel-fed streaming body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::{Request, Response, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::api::{ApiError, ErrorCode};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Largest JSON request body outside file transfers.
pub const MAX_JSON_BODY: usize = 1 << 20;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(bytes))
            .unwrap_or_else(|_| internal_error()),
        Err(e) => error(ApiError::internal(format!("encoding response: {e}"))),
    }
}

fn internal_error() -> Response<Body> {
    let mut response = Response::new(full(
        r#"{"error":{"code":"internal","message":"response build failed","retryable":false}}"#,
    ));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

pub fn error(err: ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json(status, &err.into_body());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

pub fn no_content() -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// Reads a whole body, refusing more than `limit` bytes with 413.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!("reading request body: {e}"))),
    }
}

/// Parses a bounded JSON request body; malformed input is a 400 naming the problem.
pub async fn read_json<T: DeserializeOwned, B>(req: Request<B>, limit: usize) -> Result<T, ApiError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let bytes = read_body(req.into_body(), limit).await?;
    parse_json(&bytes)
}

/// Parses a JSON request body. A whole number written with a fraction (`5.0`: an integer to JSON
/// Schema, and what some clients send) is taken as that integer, by a second pass that runs only
/// when the first fails, so well-formed requests pay nothing for it.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = match serde_json::from_slice(bytes) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|mut value| whole_floats_to_integers(&mut value).then_some(value))
        .and_then(|value| serde_json::from_value(value).ok())
        .ok_or_else(|| ApiError::bad_request(format!("invalid JSON body: {first}")))
}

/// Rewrites every float with no fractional part that fits an integer as that integer; says
/// whether anything changed.
fn whole_floats_to_integers(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let whole = f.fract() == 0.0;
            if whole && (0.0..=u64::MAX as f64).contains(&f) && f < u64::MAX as f64 {
                *value = Value::from(f as u64);
                true
            } else if whole && (i64::MIN as f64..0.0).contains(&f) {
                *value = Value::from(f as i64);
                true
            } else {
                false
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| whole_floats_to_integers(v) | changed),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |changed, v| whole_floats_to_integers(v) | changed),
        _ => false,
    }
}

/// The decoded value of one query parameter.
pub fn query_param(uri: &hyper::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// True when the client asked for NDJSON.
pub fn wants_ndjson<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(crate::api::NDJSON))
}

/// A response body fed from a bounded channel: the producer waits when the client is slow.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl ChannelBody {
    pub fn channel(capacity: usize) -> (mpsc::Sender<Result<Bytes, BoxError>>, Body) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, ChannelBody { rx }.boxed())
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Appends one JSON value and a newline: a line of an NDJSON stream.
pub fn ndjson_line<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    Bytes::from(line)
}

/// Complete lines out of a stream read in chunks (an NDJSON body), none longer than a bound.
pub struct Lines {
    pending: Vec<u8>,
    max: usize,
}

/// A line outgrew its bound: the stream cannot be read on.
#[derive(Debug, thiserror::Error)]
#[error("a line of the stream is longer than {0} bytes")]
pub struct LineTooLong(pub usize);

impl Lines {
    pub fn new(max: usize) -> Self {
        Self {
            pending: Vec::new(),
            max,
        }
    }

    /// Takes a chunk.
    pub fn push(&mut self, data: &[u8]) -> Result<(), LineTooLong> {
        self.pending.extend_from_slice(data);
        if self.pending.len() > self.max && !self.pending.contains(&b'\n') {
            return Err(LineTooLong(self.max));
        }
        Ok(())
    }

    /// The next complete line, without its newline.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        let end = self.pending.iter().position(|&b| b == b'\n')?;
        let rest = self.pending.split_off(end + 1);
        let mut line = std::mem::replace(&mut self.pending, rest);
        line.pop();
        Some(line)
    }
}

/// A finished exec replayed as the NDJSON stream it would have been: its output as one
/// `stdout` and one `stderr` event, then the result without the output (for retries).
pub fn ndjson_replay(result: &crate::api::ExecResult) -> Response<Body> {
    use crate::api::{ExecEvent, ExecResult, NDJSON};
    let mut lines = Vec::new();
    if !result.stdout.is_empty() {
        lines.extend_from_slice(&ndjson_line(&ExecEvent::Stdout {
            data: result.stdout.clone(),
        }));
    }
    if !result.stderr.is_empty() {
        lines.extend_from_slice(&ndjson_line(&ExecEvent::Stderr {
            data: result.stderr.clone(),
        }));
    }
    let done = ExecResult {
        stdout: String::new(),
        stderr: String::new(),
        ..result.clone()
    };
    lines.extend_from_slice(&ndjson_line(&ExecEvent::Result(done)));
    Response::builder()
        .header(header::CONTENT_TYPE, NDJSON)
        .body(full(lines))
        .unwrap_or_else(|_| error(ApiError::internal("response")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Counts {
        n: u64,
        m: Option<i64>,
    }

    #[test]
    fn lines_come_whole_across_chunks_and_are_bounded() {
        let mut lines = Lines::new(8);
        lines.push(b"{\"a\":").expect("push");
        assert_eq!(lines.next_line(), None);
        lines.push(b"1}\n{}\n{").expect("push");
        assert_eq!(lines.next_line().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(lines.next_line().as_deref(), Some(&b"{}"[..]));
        assert_eq!(lines.next_line(), None);
        assert!(
            lines.push(b"12345678").is_err(),
            "past the bound with no newline"
        );
    }

    #[test]
    fn whole_floats_read_as_integers_and_fractions_are_refused() {
        let c: Counts = parse_json(br#"{"n": 5216222.0, "m": -3.0}"#).expect("whole floats");
        assert_eq!(
            c,
            Counts {
                n: 5216222,
                m: Some(-3)
            }
        );
        let c: Counts = parse_json(br#"{"n": 7}"#).expect("plain");
        assert_eq!(c, Counts { n: 7, m: None });
        let err = parse_json::<Counts>(br#"{"n": 1.5}"#).expect_err("a fraction");
        assert!(err.message.contains("invalid JSON body"), "{}", err.message);
        let err = parse_json::<Counts>(br#"{"n": 1e30}"#).expect_err("too large");
        assert_eq!(err.code, ErrorCode::BadRequest);
        parse_json::<Counts>(b"{").expect_err("malformed");
    }
}
