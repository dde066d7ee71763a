//! `/v1/sandboxes/{id}/files`: uploads stream through to the agent, downloads stream back,
//! batches (hot code reload in one call) are read whole within their bound.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request, Response};

use crate::api::ApiError;
use crate::api::files::MAX_BATCH_BYTES;
use crate::http::{self, Body};
use crate::node::agent_client::{AGENT_TIMEOUT, agent_request, passthrough, reply};
use crate::node::sandbox::{CachedReply, Sandbox};

/// How long a streamed file upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

pub async fn files(sb: Arc<Sandbox>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let uri = match req.uri().query() {
        Some(q) => format!("/files?{q}"),
        None => "/files".to_string(),
    };
    sb.touch();
    let method = req.method().clone();
    match method {
        Method::POST => {
            let body = http::read_body(req.into_body(), MAX_BATCH_BYTES).await?;
            let request = agent_request(Method::POST, &uri, http::full(body))?;
            let r = sb.agent.call(request, 1 << 20).await?;
            Ok(reply(CachedReply {
                status: r.status,
                body: r.body,
            }))
        }
        Method::PUT => {
            let length = req.headers().get(CONTENT_LENGTH).cloned();
            let body = req
                .into_body()
                .map_err(|e| Box::new(e) as http::BoxError)
                .boxed();
            let mut agent_req = agent_request(Method::PUT, &uri, body)?;
            if let Some(length) = length {
                agent_req.headers_mut().insert(CONTENT_LENGTH, length);
            }
            // Its answer comes after the whole upload: allow for a large, slow one.
            Ok(passthrough(
                sb.agent.stream(agent_req, UPLOAD_TIMEOUT).await?,
            ))
        }
        _ => {
            let request = agent_request(method, &uri, http::empty())?;
            Ok(passthrough(sb.agent.stream(request, AGENT_TIMEOUT).await?))
        }
    }
}
