//! The Connect protocol with the JSON codec, as envd speaks it: unary calls (a JSON body in,
//! a JSON body out, errors as `{"code":"not_found","message":…}` with the status of the
//! code) and server streams (`application/connect+json` envelopes: one flag byte, a 4-byte
//! big-endian length, the JSON; the last envelope has flag 0x02 and carries `{}` or the error).

use bytes::{BufMut, Bytes, BytesMut};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ApiError, ErrorCode};
use crate::http::{self, Body};

pub const CONNECT_JSON: &str = "application/connect+json";
/// Flag of the envelope that ends a stream.
const END_STREAM: u8 = 0x02;
/// Flag of a compressed envelope: never negotiated, so refused.
const COMPRESSED: u8 = 0x01;

/// A Connect error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    Unimplemented,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unimplemented => "unimplemented",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status of a unary error with this code (Connect's table).
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidArgument => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists => StatusCode::CONFLICT,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error on the envd side of the front.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn unimplemented(what: impl std::fmt::Display) -> Self {
        Self::new(
            Code::Unimplemented,
            format!("{what} is not supported by this ARL node"),
        )
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    fn body(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }

    /// A unary error response.
    pub fn response(&self) -> Response<Body> {
        http::json(self.code.status(), &self.body())
    }

    /// The end-of-stream envelope that carries this error.
    pub fn end_frame(&self) -> Bytes {
        envelope(END_STREAM, &serde_json::json!({"error": self.body()}))
    }
}

/// The node's own errors, in Connect's terms.
impl From<ApiError> for RpcError {
    fn from(e: ApiError) -> Self {
        let code = match e.code {
            ErrorCode::BadRequest | ErrorCode::PathRefused | ErrorCode::ChecksumMismatch => {
                Code::InvalidArgument
            }
            ErrorCode::Unauthorized => Code::Unauthenticated,
            ErrorCode::Forbidden => Code::PermissionDenied,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::Conflict => Code::AlreadyExists,
            ErrorCode::PayloadTooLarge | ErrorCode::InsufficientStorage => Code::ResourceExhausted,
            ErrorCode::NotSupported | ErrorCode::MethodNotAllowed => Code::Unimplemented,
            ErrorCode::Released
            | ErrorCode::PoolExhausted
            | ErrorCode::SandboxUnavailable
            | ErrorCode::Overloaded
            | ErrorCode::Draining => Code::Unavailable,
            ErrorCode::Internal => Code::Internal,
        };
        Self::new(code, e.message)
    }
}

fn envelope<T: Serialize>(flags: u8, value: &T) -> Bytes {
    let json = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = BytesMut::with_capacity(5 + json.len());
    out.put_u8(flags);
    out.put_u32(json.len() as u32);
    out.extend_from_slice(&json);
    out.freeze()
}

/// A message envelope of a stream.
pub fn frame<T: Serialize>(value: &T) -> Bytes {
    envelope(0, value)
}

/// The envelope that ends a stream successfully.
pub fn end_ok() -> Bytes {
    envelope(END_STREAM, &serde_json::json!({}))
}

/// Parses a unary request body.
pub fn unary_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let body = if body.is_empty() {
        b"{}" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| RpcError::invalid(format!("invalid request: {e}")))
}

/// Parses the one message envelope of a server-streaming request.
pub fn stream_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let (flags, message) = match body {
        [flags, a, b, c, d, rest @ ..] => {
            let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
            (*flags, rest.get(..len))
        }
        _ => (0, None),
    };
    if flags & COMPRESSED != 0 {
        return Err(RpcError::invalid("compressed messages are not accepted"));
    }
    let message =
        message.ok_or_else(|| RpcError::invalid("the request is not one Connect envelope"))?;
    unary_request(message)
}

/// A unary success response.
pub fn unary_ok<T: Serialize>(value: &T) -> Response<Body> {
    http::json(StatusCode::OK, value)
}

/// The head of a streaming response whose envelopes come from `body`.
pub fn stream_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONNECT_JSON));
    response
}

/// A stream that holds only an error.
pub fn stream_error(err: &RpcError) -> Response<Body> {
    stream_response(http::full(err.end_frame()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_end_with_the_error() {
        let f = frame(&serde_json::json!({"pid": 7}));
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
        let back: serde_json::Value = stream_request(&f).expect("parse");
        assert_eq!(back["pid"], 7);
        let end = RpcError::unimplemented("PTY").end_frame();
        assert_eq!(end[0], END_STREAM);
        let body: serde_json::Value = serde_json::from_slice(&end[5..]).expect("json");
        assert_eq!(body["error"]["code"], "unimplemented");
        stream_request::<serde_json::Value>(b"\x00\x00\x00").expect_err("short");
        stream_request::<serde_json::Value>(b"\x01\x00\x00\x00\x02{}").expect_err("compressed");
        assert_eq!(Code::Unimplemented.status(), 501);
    }
}
