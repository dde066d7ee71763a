//! `/v1/sandboxes/{id}/files`: uploads stream through to the agent, downloads stream back,
//! batches (hot code reload in one call) are read whole within their bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request, Response};

use super::ReqBody;
use crate::api::files::MAX_BATCH_BYTES;
use crate::api::{ApiError, WriteFilesResponse};
use crate::http::{self, Body};
use crate::node::agent_client::{AGENT_TIMEOUT, AgentReply, agent_request, passthrough, reply};
use crate::node::sandbox::{CachedReply, Sandbox};
use crate::node::trajectory::{Step, preview};
use crate::util::now_ms;

/// How long a streamed file upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

pub async fn files(sb: Arc<Sandbox>, req: Request<ReqBody>) -> Result<Response<Body>, ApiError> {
    let uri = match req.uri().query() {
        Some(q) => format!("/files?{q}"),
        None => "/files".to_string(),
    };
    sb.touch();
    let method = req.method().clone();
    let started = (now_ms(), Instant::now());
    let path = http::query_param(req.uri(), "path");
    match method {
        Method::POST => {
            let body = http::read_body(req.into_body(), MAX_BATCH_BYTES).await?;
            let request = agent_request(Method::POST, &uri, http::full(body))?;
            let result = sb.agent.call(request, 1 << 20).await;
            record_batch(&sb, started, &result);
            let r = result?;
            Ok(reply(CachedReply {
                status: r.status,
                body: r.body,
            }))
        }
        Method::PUT => {
            let length = req.headers().get(CONTENT_LENGTH).cloned();
            let body = req.into_body().boxed();
            let mut agent_req = agent_request(Method::PUT, &uri, body)?;
            if let Some(length) = length.clone() {
                agent_req.headers_mut().insert(CONTENT_LENGTH, length);
            }
            // Its answer comes after the whole upload: allow for a large, slow one.
            let result = sb.agent.stream(agent_req, UPLOAD_TIMEOUT).await;
            let bytes = length
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            record(&sb, "file_write", started, path, bytes, &result);
            Ok(passthrough(result?))
        }
        _ => {
            let request = agent_request(method.clone(), &uri, http::empty())?;
            let result = sb.agent.stream(request, AGENT_TIMEOUT).await;
            if method == Method::DELETE {
                record(&sb, "file_delete", started, path, None, &result);
            }
            Ok(passthrough(result?))
        }
    }
}

/// A single file's write or removal in the trajectory.
fn record<T>(
    sb: &Sandbox,
    action: &str,
    started: (u64, Instant),
    path: Option<String>,
    bytes: Option<u64>,
    result: &Result<Response<T>, ApiError>,
) {
    sb.trajectory.record(Step {
        action: action.into(),
        at_ms: started.0,
        status: match result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status(),
        },
        duration_ms: started.1.elapsed().as_secs_f64() * 1000.0,
        input: path.as_deref().map(preview),
        bytes,
        ..Step::default()
    });
}

/// A batch write in the trajectory: its paths and total size.
fn record_batch(sb: &Sandbox, started: (u64, Instant), result: &Result<AgentReply, ApiError>) {
    let mut step = Step {
        action: "file_write".into(),
        at_ms: started.0,
        status: match result {
            Ok(r) => r.status.as_u16(),
            Err(e) => e.status(),
        },
        duration_ms: started.1.elapsed().as_secs_f64() * 1000.0,
        ..Step::default()
    };
    if let Ok(r) = result
        && r.status.is_success()
        && let Ok(written) = serde_json::from_slice::<WriteFilesResponse>(&r.body)
    {
        let paths: Vec<&str> = written.files.iter().map(|f| f.path.as_str()).collect();
        step.input = Some(preview(&paths.join(" ")));
        step.bytes = Some(written.files.iter().map(|f| f.size).sum());
    }
    sb.trajectory.record(step);
}
