//! Pure OCI image parsing: references, media types, indexes and their platforms, manifests,
//! configs' diff ids and chain ids. No I/O: everything here is tested on bytes.

use std::collections::HashMap;

use oci_client::Reference;
use serde_json::Value;
use sha2::{Digest, Sha256};

use containerd_client::types::Descriptor;

use super::ContainerdError;

/// Media types of an index (a multi-platform image).
pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Media types of a single-platform manifest.
pub const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The full name of an image reference, as containerd's store keys it
/// (`python:3.12` is `docker.io/library/python:3.12`).
pub fn normalize(image: &str) -> Result<String, ContainerdError> {
    image
        .parse::<Reference>()
        .map(|r| r.whole())
        .map_err(|e| ContainerdError::Image {
            image: image.to_string(),
            reason: format!("not an image reference: {e}"),
        })
}

pub fn bad(image: &str, reason: impl Into<String>) -> ContainerdError {
    ContainerdError::Image {
        image: image.to_string(),
        reason: reason.into(),
    }
}

pub fn media_type(blob: &[u8]) -> String {
    serde_json::from_slice::<Value>(blob)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Whether a blob is an index (a multi-platform image); old indexes lack a media type.
pub fn is_index(media_type: &str, blob: &[u8]) -> bool {
    if !media_type.is_empty() {
        return INDEX_TYPES.contains(&media_type);
    }
    serde_json::from_slice::<Value>(blob).is_ok_and(|v| v.get("manifests").is_some())
}

/// The digest of this host's platform's manifest in an index.
pub fn pick_platform(image: &str, index: &[u8]) -> Result<String, ContainerdError> {
    let index: Value =
        serde_json::from_slice(index).map_err(|e| bad(image, format!("index: {e}")))?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    index["manifests"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
        })
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string)
        .ok_or_else(|| bad(image, format!("no linux/{arch} manifest")))
}

/// The config digest and layer descriptors of a manifest.
pub fn parse_manifest(
    image: &str,
    blob: &[u8],
) -> Result<(String, Vec<Descriptor>), ContainerdError> {
    let manifest: Value =
        serde_json::from_slice(blob).map_err(|e| bad(image, format!("manifest: {e}")))?;
    let config = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| bad(image, "manifest has no config"))?
        .to_string();
    let layers = manifest["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| Descriptor {
                    media_type: l["mediaType"].as_str().unwrap_or_default().to_string(),
                    digest: l["digest"].as_str().unwrap_or_default().to_string(),
                    size: l["size"].as_i64().unwrap_or_default(),
                    annotations: HashMap::new(),
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if layers.is_empty() || layers.iter().any(|l| l.digest.is_empty()) {
        return Err(bad(image, "manifest lists no usable layers"));
    }
    Ok((config, layers))
}

/// The uncompressed digests of the layers, from the image config.
pub fn parse_diff_ids(
    image: &str,
    blob: &[u8],
    layers: usize,
) -> Result<Vec<String>, ContainerdError> {
    let config: Value =
        serde_json::from_slice(blob).map_err(|e| bad(image, format!("config: {e}")))?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != layers {
        return Err(bad(
            image,
            format!(
                "config lists {} layers, the manifest {layers}",
                diff_ids.len()
            ),
        ));
    }
    Ok(diff_ids)
}

/// The OCI chain id of a list of layer diff ids.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    let mut chain = first.clone();
    for diff in rest {
        chain = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{chain} {diff}").as_bytes()))
        );
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id() {
        assert_eq!(
            chain_id(&["sha256:abc".into()]).as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(chain_id(&[]), None);
    }

    #[test]
    fn chain_id_hashes_parent_and_diff() {
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:a sha256:b"))
        );
        assert_eq!(
            chain_id(&["sha256:a".into(), "sha256:b".into()]),
            Some(expected)
        );
    }

    #[test]
    fn short_names_are_normalized_like_docker() {
        assert_eq!(
            normalize("busybox").ok().as_deref(),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(
            normalize("127.0.0.1:5000/a/b:1").ok().as_deref(),
            Some("127.0.0.1:5000/a/b:1")
        );
        assert!(normalize("Not A Reference").is_err());
    }

    #[test]
    fn an_index_is_recognised_with_or_without_media_type() {
        assert!(is_index(INDEX_TYPES[0], b"{}"));
        assert!(is_index("", br#"{"manifests": []}"#));
        assert!(!is_index("", br#"{"layers": []}"#));
    }
}
