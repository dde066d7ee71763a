//! envd's `/files`: downloads stream back from the agent; uploads (multipart, one part per
//! file named `file`, or a raw octet-stream body) stream through to the agent part by part,
//! never held whole in memory. Errors are envd's `{"code": <status>, "message": …}`.

use std::sync::Arc;
use std::time::Duration;

use super::ReqBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};

use super::envd::Addressed;
use crate::api::{ApiError, ErrorBody, ErrorCode, FileInfo};
use crate::http::{self, Body, ChannelBody, MAX_JSON_BODY};
use crate::node::agent_client::{AGENT_TIMEOUT, agent_request, passthrough};
use crate::node::sandbox::Sandbox;

/// How long one file's upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most files one multipart upload may carry.
const MAX_PARTS: usize = 1000;

/// envd's error body, with the status the SDK maps to its exceptions (404 → file not found,
/// 507 → not enough space, ...).
fn error(err: ApiError) -> Response<Body> {
    let status = match err.code {
        ErrorCode::PayloadTooLarge | ErrorCode::InsufficientStorage => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        code => StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    http::json(
        status,
        &serde_json::json!({"code": status.as_u16(), "message": err.message}),
    )
}

/// Reads an agent's error reply.
async fn agent_error(response: Response<Incoming>) -> ApiError {
    let status = response.status();
    match http::read_body(response.into_body(), MAX_JSON_BODY).await {
        Ok(bytes) => serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| ApiError::internal(format!("the agent answered {status}"))),
        Err(e) => e,
    }
}

fn agent_uri(path: &str) -> String {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("path", path)
        .finish();
    format!("/files?{query}")
}

pub async fn download(addressed: &Addressed, req: Request<ReqBody>) -> Response<Body> {
    let Some(path) = http::query_param(req.uri(), "path") else {
        return error(ApiError::bad_request("query parameter `path` is required"));
    };
    let request = match agent_request(Method::GET, &agent_uri(&path), http::empty()) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match addressed.sandbox.agent.stream(request, AGENT_TIMEOUT).await {
        Ok(r) if r.status().is_success() => passthrough(r),
        Ok(r) => error(agent_error(r).await),
        Err(e) => error(e),
    }
}

pub async fn upload(addressed: &Addressed, req: Request<ReqBody>) -> Response<Body> {
    match upload_inner(addressed, req).await {
        Ok(written) => {
            let entries: Vec<_> = written
                .iter()
                .map(|info| {
                    let name = info.path.rsplit('/').next().unwrap_or(&info.path);
                    serde_json::json!({"name": name, "type": "file", "path": info.path})
                })
                .collect();
            http::json(StatusCode::OK, &entries)
        }
        Err(e) => error(e),
    }
}

async fn upload_inner(
    addressed: &Addressed,
    req: Request<ReqBody>,
) -> Result<Vec<FileInfo>, ApiError> {
    let query_path = http::query_param(req.uri(), "path");
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let sb = addressed.sandbox.clone();
    let body = req.into_body().into_data_stream();
    if !content_type.starts_with("multipart/") {
        let path = query_path
            .ok_or_else(|| ApiError::bad_request("query parameter `path` is required"))?;
        let (tx, agent_body) = ChannelBody::channel(4);
        let put = tokio::spawn(put_file(sb, path, agent_body));
        let mut body = body;
        use futures_util::StreamExt;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?;
            if tx.send(Ok(chunk)).await.is_err() {
                break;
            }
        }
        drop(tx);
        return Ok(vec![joined(put.await)?]);
    }
    let boundary = multer::parse_boundary(&content_type)
        .map_err(|e| ApiError::bad_request(format!("multipart body: {e}")))?;
    let mut multipart = multer::Multipart::new(body, boundary);
    let mut written = Vec::new();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("multipart body: {e}")))?
    {
        if field.name() != Some("file") {
            continue;
        }
        if written.len() >= MAX_PARTS {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_PARTS} files per upload"
            )));
        }
        let path = match (&query_path, field.file_name()) {
            (Some(path), _) => path.clone(),
            (None, Some(name)) => name.to_string(),
            (None, None) => {
                return Err(ApiError::bad_request(
                    "a part names no file: give `path` or a filename",
                ));
            }
        };
        let (tx, agent_body) = ChannelBody::channel(4);
        let put = tokio::spawn(put_file(sb.clone(), path, agent_body));
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| ApiError::bad_request(format!("multipart body: {e}")))?
        {
            if tx.send(Ok(chunk)).await.is_err() {
                break;
            }
        }
        drop(tx);
        written.push(joined(put.await)?);
    }
    if written.is_empty() {
        return Err(ApiError::bad_request("the upload holds no `file` part"));
    }
    Ok(written)
}

fn joined(
    result: Result<Result<FileInfo, ApiError>, tokio::task::JoinError>,
) -> Result<FileInfo, ApiError> {
    result.map_err(|e| ApiError::internal(format!("upload task: {e}")))?
}

/// One file streamed to the agent's atomic write (parents are created).
async fn put_file(sb: Arc<Sandbox>, path: String, body: Body) -> Result<FileInfo, ApiError> {
    let request = agent_request(Method::PUT, &agent_uri(&path), body)?;
    let response = sb.agent.stream(request, UPLOAD_TIMEOUT).await?;
    if !response.status().is_success() {
        return Err(agent_error(response).await);
    }
    let bytes = http::read_body(response.into_body(), MAX_JSON_BODY).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("the agent's reply: {e}")))
}
