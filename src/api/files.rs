//! File transfer types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest body of a batch file write (JSON, held in memory).
pub const MAX_BATCH_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFilesRequest {
    pub files: BTreeMap<String, FileContent>,
}

/// A file's content: plain UTF-8 text, or an object naming its encoding and mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FileContent {
    Text(String),
    Detailed {
        content: String,
        #[serde(default)]
        encoding: Encoding,
        #[serde(default)]
        mode: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteFilesResponse {
    pub files: Vec<FileInfo>,
}
