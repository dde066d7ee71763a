//! E2B's control plane (REST + JSON): create (v1 and v2 shapes), connect, list, get, kill,
//! set timeout. Errors are `{"code": <status>, "message": …}`; what is not served answers 501.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ReqBody;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::Front;
use super::state::{self, E2bSandbox};
use crate::api::{AcquireRequest, ApiError, ErrorCode, SandboxInfo};
use crate::http::{self, Body, MAX_JSON_BODY};
use crate::node::auth::Owner;
use crate::util::{now_ms, random_id};

/// E2B's constant client id (its SDK requires the field).
const CLIENT_ID: &str = "6532622b";
/// The code interpreter SDK's default template.
const CODE_INTERPRETER_TEMPLATE: &str = "code-interpreter-v1";
/// Lease of a sandbox created without a timeout (the SDK models' default).
const DEFAULT_TIMEOUT_S: u64 = 300;
/// Longest lease a timeout may ask for (E2B's own cap is 24 h).
const MAX_TIMEOUT_S: u64 = 24 * 3600;

/// A control-plane error.
#[derive(Debug)]
struct ControlError {
    status: StatusCode,
    message: String,
}

impl ControlError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn response(&self) -> Response<Body> {
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        let mut response = http::json(self.status, &body);
        // A refusal is final: the SDK retries 502/503/504 unless told not to.
        if !matches!(self.status, StatusCode::SERVICE_UNAVAILABLE) {
            response
                .headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

/// The node's errors in E2B's terms. Another token's sandbox is "not found", as in E2B: its
/// existence is none of the caller's business.
impl From<ApiError> for ControlError {
    fn from(e: ApiError) -> Self {
        let status = match e.code {
            ErrorCode::Forbidden => {
                return Self::new(StatusCode::NOT_FOUND, "sandbox not found");
            }
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::BadRequest | ErrorCode::PathRefused | ErrorCode::ChecksumMismatch => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::PoolExhausted
            | ErrorCode::SandboxUnavailable
            | ErrorCode::Overloaded
            | ErrorCode::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NotSupported | ErrorCode::MethodNotAllowed => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.message)
    }
}

type Answer = Result<Response<Body>, ControlError>;

/// Serves one control-plane request; returns its metrics label and the response.
pub async fn route(front: &Arc<Front>, req: Request<ReqBody>) -> (&'static str, Response<Body>) {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let (label, answer) = match (&method, segments.as_slice()) {
        (&Method::POST, ["sandboxes"] | ["v2", "sandboxes"]) => {
            ("/e2b/sandboxes:create", create(front, req).await)
        }
        (&Method::GET, ["sandboxes"] | ["v2", "sandboxes"]) => {
            ("/e2b/sandboxes:list", list(front, &req))
        }
        (&Method::GET, ["sandboxes", id]) => ("/e2b/sandboxes/{id}", get(front, &req, id)),
        (&Method::DELETE, ["sandboxes", id]) => ("/e2b/sandboxes/{id}:kill", kill(front, &req, id)),
        (&Method::POST, ["sandboxes", id, "timeout"]) => {
            let id = id.to_string();
            (
                "/e2b/sandboxes/{id}/timeout",
                set_timeout(front, req, &id).await,
            )
        }
        (&Method::POST, ["sandboxes", id, "connect"] | ["v2", "sandboxes", id, "connect"]) => {
            let id = id.to_string();
            (
                "/e2b/sandboxes/{id}/connect",
                connect(front, req, &id).await,
            )
        }
        _ => (
            "/e2b/other",
            Err(ControlError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!("{method} {path} is not supported by this ARL node"),
            )),
        ),
    };
    (label, answer.unwrap_or_else(|e| e.response()))
}

fn authenticate<B>(front: &Front, req: &Request<B>) -> Result<Owner, ControlError> {
    let key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("Bearer {k}"));
    front
        .mgr
        .auth
        .check(key.as_deref())
        .map_err(|_| ControlError::new(StatusCode::UNAUTHORIZED, "invalid or missing API key"))
}

/// The domain clients should build sandbox URLs from: never E2B's, so that envd traffic
/// stays with this node.
fn domain<B>(front: &Front, req: &Request<B>) -> String {
    front.config.domain.clone().unwrap_or_else(|| {
        req.headers()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("localhost")
            .to_string()
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

/// The `Sandbox` model (create and connect).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxModel {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    envd_version: &'static str,
    envd_access_token: String,
    domain: String,
}

fn sandbox_model(arl_id: &str, sb: &E2bSandbox, domain: String) -> SandboxModel {
    SandboxModel {
        template_id: sb.template.clone(),
        sandbox_id: state::e2b_id(arl_id),
        client_id: CLIENT_ID,
        envd_version: super::ENVD_VERSION,
        envd_access_token: sb.access_token.clone(),
        domain,
    }
}

/// `SandboxDetail` and `ListedSandbox` (the same required fields).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxDetail {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    started_at: String,
    end_at: String,
    envd_version: &'static str,
    cpu_count: u64,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<String>,
}

fn detail(front: &Front, info: &SandboxInfo, full: Option<String>) -> SandboxDetail {
    let spec = front.mgr.pool_view(&info.pool).ok().map(|v| v.spec);
    let e2b = front.registry.get(&info.id);
    let started = info.acquired_at_ms.unwrap_or(info.created_at_ms);
    SandboxDetail {
        template_id: e2b
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_else(|| info.pool.clone()),
        sandbox_id: state::e2b_id(&info.id),
        client_id: CLIENT_ID,
        started_at: rfc3339(started),
        end_at: rfc3339(info.expires_at_ms.unwrap_or(started + MAX_TIMEOUT_S * 1000)),
        envd_version: super::ENVD_VERSION,
        cpu_count: spec
            .as_ref()
            .map(|s| s.cpu_millis.div_ceil(1000).max(1))
            .unwrap_or(1),
        memory_mb: spec.as_ref().map(|s| s.memory_mb).unwrap_or(0),
        disk_size_mb: spec.as_ref().map(|s| s.disk_mb).unwrap_or(0),
        state: "running",
        metadata: info.labels.clone(),
        envd_access_token: full
            .as_ref()
            .and(e2b.as_ref().map(|s| s.access_token.clone())),
        domain: full,
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn timeout_seconds(requested: Option<u64>) -> Result<u64, ControlError> {
    match requested.unwrap_or(DEFAULT_TIMEOUT_S) {
        0 => Err(ControlError::new(
            StatusCode::BAD_REQUEST,
            "timeout must be at least 1 second",
        )),
        t => Ok(t.min(MAX_TIMEOUT_S)),
    }
}

async fn create(front: &Arc<Front>, req: Request<ReqBody>) -> Answer {
    let owner = authenticate(front, &req)?;
    if front.mgr.is_draining() {
        return Err(ApiError::new(ErrorCode::Draining, "the node is shutting down").into());
    }
    let domain = domain(front, &req);
    let request_id = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: NewSandbox = http::read_json(req, MAX_JSON_BODY).await?;
    let pool = pool_of_template(front, &body.template_id);
    if front.mgr.pool_view(&pool).is_err() {
        return Err(ControlError::new(
            StatusCode::NOT_FOUND,
            format!(
                "template {:?} not found: no pool of that name on this node",
                body.template_id
            ),
        ));
    }
    let acquire = AcquireRequest {
        pool,
        count: None,
        env: body.env_vars.unwrap_or_default(),
        labels: body.metadata.unwrap_or_default(),
        ttl_seconds: Some(timeout_seconds(body.timeout)?),
        idle_timeout_seconds: None,
        request_id,
    };
    acquire.validate().map_err(ApiError::bad_request)?;
    let infos = front.mgr.acquire(owner, acquire).await?;
    let info = infos
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("acquire returned no sandbox"))?;
    // Forget the sandboxes that went away meanwhile (expired, released through the node API),
    // so the front's own records stay as many as the live sandboxes.
    front
        .registry
        .retain(|id, owner| front.mgr.sandbox(id, owner).is_ok());
    // A retried create (same idempotency key) gets the first one's token back.
    let sandbox = match front.registry.get(&info.id) {
        Some(existing) => existing,
        None => front.registry.insert(
            info.id.clone(),
            E2bSandbox {
                owner,
                template: body.template_id,
                access_token: random_id(""),
                processes: Default::default(),
                contexts: Default::default(),
            },
        ),
    };
    Ok(http::json(
        StatusCode::CREATED,
        &sandbox_model(&info.id, &sandbox, domain),
    ))
}

/// The caller's sandbox by E2B id (another token's is "not found").
fn lookup<B>(
    front: &Front,
    req: &Request<B>,
    e2b_id: &str,
) -> Result<(Owner, String), ControlError> {
    let owner = authenticate(front, req)?;
    let arl_id = state::arl_id(e2b_id)
        .ok_or_else(|| ControlError::new(StatusCode::NOT_FOUND, "sandbox not found"))?;
    front.mgr.sandbox(&arl_id, &owner)?;
    Ok((owner, arl_id))
}

fn list(front: &Arc<Front>, req: &Request<ReqBody>) -> Answer {
    let owner = authenticate(front, req)?;
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    if let Some(query) = http::query_param(req.uri(), "metadata") {
        wanted.extend(form_urlencoded::parse(query.as_bytes()).into_owned());
    }
    let running_wanted = http::query_param(req.uri(), "state")
        .is_none_or(|s| s.split(',').any(|s| s.trim() == "running"));
    front
        .registry
        .retain(|id, owner| front.mgr.sandbox(id, owner).is_ok());
    let listed: Vec<SandboxDetail> = front
        .mgr
        .list(&owner)
        .iter()
        .filter(|_| running_wanted)
        .filter(|info| wanted.iter().all(|(k, v)| info.labels.get(k) == Some(v)))
        .map(|info| detail(front, info, None))
        .collect();
    Ok(http::json(StatusCode::OK, &listed))
}

fn get(front: &Arc<Front>, req: &Request<ReqBody>, e2b_id: &str) -> Answer {
    let (owner, arl_id) = lookup(front, req, e2b_id)?;
    let info = front
        .mgr
        .list(&owner)
        .into_iter()
        .find(|i| i.id == arl_id)
        .ok_or_else(|| ControlError::new(StatusCode::NOT_FOUND, "sandbox not found"))?;
    Ok(http::json(
        StatusCode::OK,
        &detail(front, &info, Some(domain(front, req))),
    ))
}

fn kill(front: &Arc<Front>, req: &Request<ReqBody>, e2b_id: &str) -> Answer {
    let (owner, arl_id) = lookup(front, req, e2b_id)?;
    front.mgr.release(&arl_id, &owner)?;
    front.registry.remove(&arl_id);
    Ok(http::no_content())
}

#[derive(Debug, Deserialize)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

/// Sets the lease to end `timeout` seconds from now.
fn extend(
    front: &Front,
    arl_id: &str,
    owner: &Owner,
    timeout: Option<u64>,
) -> Result<(), ControlError> {
    let seconds = timeout_seconds(timeout)?;
    let sb = front.mgr.sandbox(arl_id, owner)?;
    let mut lease = sb
        .lease()
        .ok_or_else(|| ControlError::new(StatusCode::NOT_FOUND, "sandbox not found"))?;
    lease.expires_at_ms = Some(now_ms() + seconds * 1000);
    sb.set_lease(Some(lease));
    sb.touch();
    Ok(())
}

async fn set_timeout(front: &Arc<Front>, req: Request<ReqBody>, e2b_id: &str) -> Answer {
    let (owner, arl_id) = lookup(front, &req, e2b_id)?;
    let body: TimeoutBody = http::read_json(req, MAX_JSON_BODY).await?;
    if body.timeout.is_none() {
        return Err(ControlError::new(
            StatusCode::BAD_REQUEST,
            "`timeout` is required",
        ));
    }
    extend(front, &arl_id, &owner, body.timeout)?;
    Ok(http::no_content())
}

/// The pool a template names: E2B's defaults (`base`, and the code interpreter's
/// `code-interpreter-v1` unless a pool has that name) are the default pool.
fn pool_of_template(front: &Front, template: &str) -> String {
    let default = template == "base"
        || (template == CODE_INTERPRETER_TEMPLATE && front.mgr.pool_view(template).is_err());
    if default {
        front.config.default_pool.clone()
    } else {
        template.to_string()
    }
}

/// Connecting to a running sandbox: its lease is extended as asked and its model returned.
/// A sandbox that auto-paused is thawed by its next sandbox request, so there is nothing to
/// resume here.
async fn connect(front: &Arc<Front>, req: Request<ReqBody>, e2b_id: &str) -> Answer {
    let (owner, arl_id) = lookup(front, &req, e2b_id)?;
    let domain = domain(front, &req);
    let body: TimeoutBody = http::read_json(req, MAX_JSON_BODY).await?;
    extend(front, &arl_id, &owner, body.timeout)?;
    // A sandbox acquired through the node API gets an access token on first connect.
    let sandbox = match front.registry.get(&arl_id) {
        Some(sb) => sb,
        None => {
            let pool = front.mgr.sandbox(&arl_id, &owner)?.pool.clone();
            front.registry.insert(
                arl_id.clone(),
                E2bSandbox {
                    owner,
                    template: pool,
                    access_token: random_id(""),
                    processes: Default::default(),
                    contexts: Default::default(),
                },
            )
        }
    };
    Ok(http::json(
        StatusCode::OK,
        &sandbox_model(&arl_id, &sandbox, domain),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn timeouts_default_and_are_capped() {
        assert_eq!(timeout_seconds(None).expect("default"), DEFAULT_TIMEOUT_S);
        assert_eq!(
            timeout_seconds(Some(10 * MAX_TIMEOUT_S)).expect("cap"),
            MAX_TIMEOUT_S
        );
        timeout_seconds(Some(0)).expect_err("zero");
    }
}
