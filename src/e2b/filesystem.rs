//! `filesystem.Filesystem`: Stat, ListDir (with depth), MakeDir, Move, Remove, through the
//! agent's file-system operations. Watching directories is refused.

use super::ReqBody;
use hyper::{Method, Request, Response};
use serde::Deserialize;

use super::connect::{self, Code, RpcError};
use super::control::rfc3339;
use super::envd::Addressed;
use crate::api::ErrorBody;
use crate::api::fs::{Entry, EntryKind, EntryList, MoveRequest, PathRequest};
use crate::http::{self, Body, MAX_JSON_BODY};
use crate::node::agent_client::agent_request;

/// Largest listing read back from the agent.
const MAX_LISTING: usize = 64 << 20;

#[derive(Debug, Deserialize)]
struct PathArgs {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct MoveArgs {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

pub async fn route(addressed: &Addressed, req: Request<ReqBody>) -> (&'static str, Response<Body>) {
    let method = req
        .uri()
        .path()
        .trim_start_matches("/filesystem.Filesystem/")
        .to_string();
    let label = match method.as_str() {
        "Stat" => "/e2b/filesystem/Stat",
        "ListDir" => "/e2b/filesystem/ListDir",
        "MakeDir" => "/e2b/filesystem/MakeDir",
        "Move" => "/e2b/filesystem/Move",
        "Remove" => "/e2b/filesystem/Remove",
        _ => "/e2b/filesystem:unimplemented",
    };
    let answer = call(addressed, &method, req).await;
    (label, answer.unwrap_or_else(|e| e.response()))
}

async fn call(
    addressed: &Addressed,
    method: &str,
    req: Request<ReqBody>,
) -> Result<Response<Body>, RpcError> {
    let body = http::read_body(req.into_body(), MAX_JSON_BODY).await?;
    match method {
        "Stat" | "MakeDir" | "Remove" | "ListDir" => {
            let args: PathArgs = connect::unary_request(&body)?;
            let op = match method {
                "Stat" => "stat",
                "MakeDir" => "mkdir",
                "Remove" => "remove",
                _ => "list",
            };
            let request = PathRequest {
                path: args.path,
                depth: args.depth,
            };
            let reply = agent(addressed, op, &request).await?;
            match method {
                "Remove" => Ok(connect::unary_ok(&serde_json::json!({}))),
                "ListDir" => {
                    let list: EntryList = parse(&reply)?;
                    let entries: Vec<_> = list.entries.iter().map(entry_info).collect();
                    Ok(connect::unary_ok(&serde_json::json!({"entries": entries})))
                }
                _ => {
                    let entry: Entry = parse(&reply)?;
                    Ok(connect::unary_ok(
                        &serde_json::json!({"entry": entry_info(&entry)}),
                    ))
                }
            }
        }
        "Move" => {
            let args: MoveArgs = connect::unary_request(&body)?;
            let request = MoveRequest {
                source: args.source,
                destination: args.destination,
            };
            let entry: Entry = parse(&agent(addressed, "move", &request).await?)?;
            Ok(connect::unary_ok(
                &serde_json::json!({"entry": entry_info(&entry)}),
            ))
        }
        other => Err(RpcError::unimplemented(format!(
            "filesystem.Filesystem/{other} (watching directories)"
        ))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    serde_json::from_slice(body)
        .map_err(|e| RpcError::new(Code::Internal, format!("the agent's reply: {e}")))
}

/// One agent file-system call; its errors become Connect errors (`not_found`,
/// `already_exists`, ...), which the SDK maps to its exceptions.
async fn agent<T: serde::Serialize>(
    addressed: &Addressed,
    op: &str,
    request: &T,
) -> Result<bytes::Bytes, RpcError> {
    let body =
        serde_json::to_vec(request).map_err(|e| RpcError::new(Code::Internal, e.to_string()))?;
    let request = agent_request(Method::POST, &format!("/fs/{op}"), http::full(body))?;
    let reply = addressed.sandbox.agent.call(request, MAX_LISTING).await?;
    if reply.status.is_success() {
        return Ok(reply.body);
    }
    Err(match serde_json::from_slice::<ErrorBody>(&reply.body) {
        Ok(body) => body.error.into(),
        Err(_) => RpcError::new(
            Code::Internal,
            format!("the agent answered {}", reply.status),
        ),
    })
}

/// envd's `EntryInfo`.
fn entry_info(entry: &Entry) -> serde_json::Value {
    let kind = match entry.kind {
        EntryKind::File => "FILE_TYPE_FILE",
        EntryKind::Dir => "FILE_TYPE_DIRECTORY",
        EntryKind::Symlink | EntryKind::Other => "FILE_TYPE_UNSPECIFIED",
    };
    let mut info = serde_json::json!({
        "name": entry.name,
        "type": kind,
        "path": entry.path,
        "size": entry.size,
        "mode": entry.mode & 0o7777,
        "permissions": permissions(entry),
        "owner": user_name(entry.uid),
        "group": user_name(entry.gid),
        "modifiedTime": rfc3339(u64::try_from(entry.modified_ms).unwrap_or(0)),
    });
    if let Some(target) = &entry.symlink_target {
        info["symlinkTarget"] = target.clone().into();
    }
    info
}

fn user_name(id: u32) -> String {
    if id == 0 {
        "root".into()
    } else {
        id.to_string()
    }
}

/// `ls -l`'s mode string (as Go's `FileMode.String()` prints it for files and directories).
fn permissions(entry: &Entry) -> String {
    let mut out = String::with_capacity(10);
    out.push(match entry.kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'L',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (entry.mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_as_envd_writes_them() {
        let entry = Entry {
            name: "a".into(),
            path: "/workspace/a".into(),
            kind: EntryKind::Dir,
            size: 4096,
            mode: 0o40755,
            uid: 0,
            gid: 0,
            modified_ms: 0,
            symlink_target: None,
        };
        let info = entry_info(&entry);
        assert_eq!(info["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(info["permissions"], "drwxr-xr-x");
        assert_eq!(info["mode"], 0o755);
        assert_eq!(info["owner"], "root");
    }
}
