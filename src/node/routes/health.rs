//! `/healthz` (the process answers), `/readyz` (the node can serve new work) and `/metrics`.

use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};

use crate::api::{ApiError, ErrorCode};
use crate::http::{self, Body};
use crate::node::manager::Manager;

pub fn healthz() -> Response<Body> {
    http::json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// 503 with the reason while the node cannot serve: draining, or no pool able to make sandboxes.
pub fn readyz(mgr: &Manager) -> Response<Body> {
    match mgr.unready_reason() {
        None => http::json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Some(reason) if mgr.is_draining() || mgr.is_cordoned() => {
            http::error(ApiError::new(ErrorCode::Draining, reason))
        }
        Some(reason) => http::error(ApiError::unavailable(reason)),
    }
}

pub fn metrics(mgr: &Manager) -> Response<Body> {
    mgr.update_gauges();
    Response::builder()
        .header(CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(http::full(mgr.metrics.render()))
        .unwrap_or_else(|_| http::error(ApiError::internal("metrics")))
}
