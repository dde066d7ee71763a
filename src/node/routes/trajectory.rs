//! `GET /v1/sandboxes/{id}/trajectory`: the sandbox's recorded actions as JSON lines
//! (see [`crate::node::trajectory`]).

use hyper::Response;
use hyper::header::CONTENT_TYPE;

use crate::api::{ApiError, NDJSON};
use crate::http::{self, Body};
use crate::node::sandbox::Sandbox;

pub fn export(sb: &Sandbox) -> Response<Body> {
    Response::builder()
        .header(CONTENT_TYPE, NDJSON)
        .body(http::full(sb.trajectory.jsonl()))
        .unwrap_or_else(|_| http::error(ApiError::internal("response")))
}
