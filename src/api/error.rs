//! The one error shape every HTTP endpoint returns.

use serde::{Deserialize, Serialize};

/// Machine-readable error codes; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    PathRefused,
    ChecksumMismatch,
    Unauthorized,
    Forbidden,
    NotFound,
    /// The path exists but does not take this method (the `Allow` header lists those it takes).
    MethodNotAllowed,
    Conflict,
    /// The sandbox was released (by its holder, or its lease ran out) while the request ran.
    Released,
    PayloadTooLarge,
    /// The sandbox's disk (its writable layer) is full.
    InsufficientStorage,
    /// The sandbox's runtime has no such operation (e.g. pause).
    NotSupported,
    PoolExhausted,
    SandboxUnavailable,
    /// The node has too many open connections.
    Overloaded,
    Draining,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest | Self::PathRefused | Self::ChecksumMismatch => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::Released => 410,
            Self::PayloadTooLarge => 413,
            Self::InsufficientStorage => 507,
            Self::NotSupported => 501,
            Self::PoolExhausted | Self::SandboxUnavailable | Self::Overloaded | Self::Draining => {
                503
            }
            Self::Internal => 500,
        }
    }

    /// Infrastructure failures a trainer may retry (and mask out of its statistics).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::PoolExhausted | Self::SandboxUnavailable | Self::Overloaded | Self::Draining
        )
    }
}

/// `{"error": {...}}` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    /// Other node endpoints that may have capacity (only on `pool_exhausted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: code.retryable(),
            alternatives: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SandboxUnavailable, message)
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn into_body(self) -> ErrorBody {
        ErrorBody { error: self }
    }
}

/// Two errors are the same error when they say the same thing.
impl PartialEq for ApiError {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code && self.message == other.message
    }
}
