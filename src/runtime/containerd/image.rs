//! A pool's image, made ready for sandboxes: found in containerd's store (namespace `arl`), or
//! pulled from its registry into containerd's content store when absent, and unpacked into the
//! overlayfs snapshotter. What sandboxes start from is the snapshot of the image's top layer.
//!
//! containerd 1.6 has no server-side pull, so the pull runs here as containerd's own client
//! does it: blobs are fetched with `oci-client` and streamed into the content store, layers are
//! applied by containerd's diff service, and the image record is created last. A lease protects
//! everything from containerd's garbage collector until the image references it.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, Info as ContentInfo, InfoRequest,
    ReadContentRequest, UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::{Code, Status};
use containerd_client::types::{Descriptor, Mount};
use futures_util::{Stream, StreamExt};
use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use serde_json::Value;
use tokio::sync::mpsc;

use super::oci::{
    INDEX_TYPES, MANIFEST_TYPES, bad, chain_id, is_index, media_type, parse_diff_ids,
    parse_manifest, pick_platform,
};
use super::{ContainerdError, SNAPSHOTTER, call, req};

pub use super::oci::normalize;

/// Blob bytes sent to containerd per write message (its gRPC limit is 16 MiB).
const WRITE_CHUNK: usize = 1 << 20;
/// Manifests, indexes and configs are small; a larger one is refused, not buffered.
const MAX_METADATA: usize = 4 << 20;
/// A pull's lease expires on its own if the daemon dies mid-pull.
const PULL_LEASE_TTL: Duration = Duration::from_secs(3600);

/// How the daemon reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Credentials by registry host, from a Docker-style `config.json` (`auths`).
    pub auths: HashMap<String, (String, String)>,
}

impl RegistryOptions {
    /// Reads the `auths` section of a Docker-style `config.json`: per registry, either `auth`
    /// (base64 of `user:password`) or `username` and `password`.
    pub fn read_auth_file(path: &Path) -> Result<HashMap<String, (String, String)>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut auths = HashMap::new();
        for (host, entry) in doc["auths"].as_object().into_iter().flatten() {
            let pair = if let Some(encoded) = entry["auth"].as_str() {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|e| format!("{}: auth of {host}: {e}", path.display()))?;
                let text = String::from_utf8_lossy(&decoded).into_owned();
                let (user, password) = text.split_once(':').ok_or_else(|| {
                    format!("{}: auth of {host} is not user:password", path.display())
                })?;
                (user.to_string(), password.to_string())
            } else {
                (
                    entry["username"].as_str().unwrap_or_default().to_string(),
                    entry["password"].as_str().unwrap_or_default().to_string(),
                )
            };
            // Docker writes Docker Hub as a URL; registries are matched by host.
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            auths.insert(host, pair);
        }
        Ok(auths)
    }
}

/// An image's manifest as far as sandboxes need it.
struct Resolved {
    config: String,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

impl Resolved {
    fn top_chain(&self) -> Result<String, String> {
        chain_id(&self.diff_ids).ok_or_else(|| "the image has no layers".to_string())
    }
}

pub struct Images {
    client: containerd_client::Client,
    registry: oci_client::Client,
    options: RegistryOptions,
    owner: String,
    /// Pulls and unpacks run one at a time: the second pool (or sandbox) asking for an image
    /// waits and then finds it.
    pulls: tokio::sync::Mutex<()>,
}

impl Images {
    pub fn new(client: containerd_client::Client, options: RegistryOptions, owner: String) -> Self {
        // reqwest's TLS needs a process-wide crypto provider; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(options.insecure.clone()),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        Self {
            client,
            registry,
            options,
            owner,
            pulls: tokio::sync::Mutex::new(()),
        }
    }

    /// The snapshot a new sandbox of `image` starts from (the chain id of its top layer),
    /// pulling and unpacking the image first when needed.
    pub async fn snapshot_parent(&self, image: &str) -> Result<String, ContainerdError> {
        let name = normalize(image)?;
        if let Some(chain) = self.ready(&name).await? {
            return Ok(chain);
        }
        let _one_at_a_time = self.pulls.lock().await;
        // Someone else may have finished it while this one waited.
        if let Some(chain) = self.ready(&name).await? {
            return Ok(chain);
        }
        let lease = self.pull_lease().await?;
        let result = self.fetch_and_unpack(&name, &lease).await;
        let _ = self
            .client
            .leases()
            .delete(req(
                DeleteLeaseRequest {
                    id: lease,
                    sync: false,
                },
                None,
            ))
            .await;
        result
    }

    /// The top snapshot when the image is in the store and unpacked.
    async fn ready(&self, name: &str) -> Result<Option<String>, ContainerdError> {
        let Some(resolved) = self.resolve_local(name).await? else {
            return Ok(None);
        };
        let chain = resolved.top_chain().map_err(|reason| bad(name, reason))?;
        Ok(self.snapshot_exists(&chain).await?.then_some(chain))
    }

    async fn fetch_and_unpack(&self, name: &str, lease: &str) -> Result<String, ContainerdError> {
        let resolved = match self.resolve_local(name).await? {
            Some(resolved) => resolved,
            None => self.pull(name, lease).await?,
        };
        self.unpack(name, &resolved, lease).await
    }

    async fn pull_lease(&self) -> Result<String, ContainerdError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let id = format!("arl-pull-{}-{nanos}", std::process::id());
        let expire = prost_types::Timestamp::from(SystemTime::now() + PULL_LEASE_TTL);
        self.client
            .leases()
            .create(req(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels: HashMap::from([
                        (super::OWNER_LABEL.to_string(), self.owner.clone()),
                        ("containerd.io/gc.expire".to_string(), expire.to_string()),
                    ]),
                },
                None,
            ))
            .await
            .map_err(call("Leases.Create"))?;
        Ok(id)
    }

    // ---------------------------------------------------------------------------------------
    // The local store

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, Status> {
        let mut stream = self
            .client
            .content()
            .read(req(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if data.len() + chunk.data.len() > MAX_METADATA {
                return Err(Status::out_of_range(format!(
                    "{digest} is larger than {MAX_METADATA} bytes"
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    async fn blob_exists(&self, digest: &str) -> Result<bool, ContainerdError> {
        match self
            .client
            .content()
            .info(req(
                InfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(call("Content.Info")(s)),
        }
    }

    pub(super) async fn snapshot_exists(&self, key: &str) -> Result<bool, ContainerdError> {
        match self
            .client
            .snapshots()
            .stat(req(
                StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(call("Snapshots.Stat")(s)),
        }
    }

    /// The image's layers from the store, or None when the store has no such image.
    async fn resolve_local(&self, name: &str) -> Result<Option<Resolved>, ContainerdError> {
        let got = self
            .client
            .images()
            .get(req(
                GetImageRequest {
                    name: name.to_string(),
                },
                None,
            ))
            .await;
        let target = match got {
            Ok(r) => r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .ok_or_else(|| bad(name, "no target descriptor"))?,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(call("Images.Get")(s)),
        };
        let mut digest = target.digest;
        let mut blob = self
            .read_blob(&digest)
            .await
            .map_err(call("Content.Read"))?;
        if is_index(&target.media_type, &blob) {
            digest = pick_platform(name, &blob)?;
            blob = self
                .read_blob(&digest)
                .await
                .map_err(call("Content.Read"))?;
        }
        let (config, layers) = parse_manifest(name, &blob)?;
        let config_blob = self
            .read_blob(&config)
            .await
            .map_err(call("Content.Read"))?;
        let diff_ids = parse_diff_ids(name, &config_blob, layers.len())?;
        Ok(Some(Resolved {
            config,
            layers,
            diff_ids,
        }))
    }

    // ---------------------------------------------------------------------------------------
    // Pull

    fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        let auths = &self.options.auths;
        let found = auths
            .get(reference.registry())
            .or_else(|| auths.get(reference.resolve_registry()));
        match found {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Fetches the image's manifest, config and layers into the content store and records the
    /// image; returns its layers.
    #[tracing::instrument(skip(self, lease))]
    async fn pull(&self, name: &str, lease: &str) -> Result<Resolved, ContainerdError> {
        let started = std::time::Instant::now();
        let failed = |e: oci_client::errors::OciDistributionError| ContainerdError::Pull {
            image: name.to_string(),
            reason: crate::util::error_chain(&e),
        };
        let reference: Reference = name.parse().map_err(|e| bad(name, format!("{e}")))?;
        let auth = self.auth_for(&reference);
        let accepted: Vec<&str> = INDEX_TYPES.iter().chain(&MANIFEST_TYPES).copied().collect();
        let (root, root_digest) = self
            .registry
            .pull_manifest_raw(&reference, &auth, &accepted)
            .await
            .map_err(failed)?;
        let root_type = media_type(&root);
        let (manifest, manifest_digest, manifest_type) = if is_index(&root_type, &root) {
            let digest = pick_platform(name, &root)?;
            let platform_ref = reference.clone_with_digest(digest.clone());
            let (manifest, _) = self
                .registry
                .pull_manifest_raw(&platform_ref, &auth, &MANIFEST_TYPES)
                .await
                .map_err(failed)?;
            let labels =
                HashMap::from([("containerd.io/gc.ref.content.m.0".into(), digest.clone())]);
            self.write_bytes(lease, &root_digest, root.clone(), labels)
                .await?;
            let manifest_type = media_type(&manifest);
            (manifest, digest, manifest_type)
        } else {
            (root.clone(), root_digest.clone(), root_type.clone())
        };
        let (config, layers) = parse_manifest(name, &manifest)?;

        let config_blob = self.fetch_small(&reference, &config).await?;
        let diff_ids = parse_diff_ids(name, &config_blob, layers.len())?;
        self.write_bytes(lease, &config, config_blob, HashMap::new())
            .await?;
        for layer in &layers {
            if self.blob_exists(&layer.digest).await? {
                continue;
            }
            let stream = self
                .registry
                .pull_blob_stream(&reference, layer.digest.as_str())
                .await
                .map_err(failed)?;
            self.write_stream(lease, layer, HashMap::new(), stream.stream)
                .await?;
        }
        let mut labels =
            HashMap::from([("containerd.io/gc.ref.content.config".into(), config.clone())]);
        for (i, layer) in layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        self.write_bytes(lease, &manifest_digest, manifest.clone(), labels)
            .await?;

        let now = prost_types::Timestamp::from(SystemTime::now());
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: if root_digest == manifest_digest {
                    manifest_type
                } else {
                    root_type
                },
                digest: root_digest,
                size: root.len() as i64,
                annotations: HashMap::new(),
            }),
            created_at: Some(now),
            updated_at: Some(now),
        };
        match self
            .client
            .images()
            .create(req(
                CreateImageRequest {
                    image: Some(image),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => {}
            // Imported or pulled by someone else meanwhile: theirs is as good.
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(call("Images.Create")(s)),
        }
        tracing::info!(
            image = name,
            layers = layers.len(),
            ms = started.elapsed().as_millis() as u64,
            "pulled"
        );
        Ok(Resolved {
            config,
            layers,
            diff_ids,
        })
    }

    /// A small blob (a config) from the registry, bounded.
    async fn fetch_small(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<Bytes, ContainerdError> {
        let failed = |reason: String| ContainerdError::Pull {
            image: reference.whole(),
            reason,
        };
        let mut stream = self
            .registry
            .pull_blob_stream(reference, digest)
            .await
            .map_err(|e| failed(crate::util::error_chain(&e)))?
            .stream;
        let mut data = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| failed(e.to_string()))?;
            if data.len() + chunk.len() > MAX_METADATA {
                return Err(failed(format!(
                    "{digest} is larger than {MAX_METADATA} bytes"
                )));
            }
            data.extend_from_slice(&chunk);
        }
        Ok(data.freeze())
    }

    async fn write_bytes(
        &self,
        lease: &str,
        digest: &str,
        data: Bytes,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let descriptor = Descriptor {
            digest: digest.to_string(),
            size: data.len() as i64,
            ..Default::default()
        };
        let once = futures_util::stream::once(async move { Ok::<_, std::io::Error>(data) });
        self.write_stream(lease, &descriptor, labels, once.boxed())
            .await
    }

    /// Streams a blob into containerd's content store, which checks its size and digest.
    async fn write_stream(
        &self,
        lease: &str,
        blob: &Descriptor,
        labels: HashMap<String, String>,
        mut data: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    ) -> Result<(), ContainerdError> {
        if self.blob_exists(&blob.digest).await? {
            return Ok(());
        }
        let fail = |reason: String| ContainerdError::Pull {
            image: blob.digest.clone(),
            reason,
        };
        let reference = format!("arl-pull-{}", blob.digest);
        let message = |action: WriteAction, offset: i64, data: Bytes| WriteContentRequest {
            action: action as i32,
            r#ref: reference.clone(),
            total: blob.size,
            expected: blob.digest.clone(),
            offset,
            data: data.to_vec(),
            labels: HashMap::new(),
        };
        // containerd answers every message: the stream goes one message at a time, and the
        // first message is queued before the call so that the server has something to answer.
        let (tx, mut rx) = mpsc::channel::<WriteContentRequest>(1);
        let mut requests = Some(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let mut responses = None;
        let mut buffered = BytesMut::new();
        let mut offset = 0i64;
        let mut ended = false;
        let written: Result<(), Status> = async {
            while !ended {
                while buffered.len() < WRITE_CHUNK {
                    match data.next().await {
                        Some(Ok(chunk)) => buffered.extend_from_slice(&chunk),
                        Some(Err(e)) => return Err(Status::aborted(format!("download: {e}"))),
                        None => {
                            ended = true;
                            break;
                        }
                    }
                }
                let chunk = buffered.split().freeze();
                let len = chunk.len() as i64;
                let action = if ended {
                    WriteAction::Commit
                } else {
                    WriteAction::Write
                };
                let mut msg = message(action, offset, chunk);
                if ended {
                    msg.labels = labels.clone();
                }
                tx.send(msg)
                    .await
                    .map_err(|_| Status::aborted("containerd closed the write"))?;
                if let Some(requests) = requests.take() {
                    let mut content = self.client.content();
                    let call = content.write(req(requests, Some(lease)));
                    responses = Some(call.await?.into_inner());
                }
                if let Some(responses) = responses.as_mut() {
                    responses.message().await?;
                }
                offset += len;
            }
            Ok(())
        }
        .await;
        match written {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(fail(format!("writing to containerd: {}", s.message()))),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Unpack

    /// Applies the layers missing from the snapshotter, bottom up; returns the top snapshot.
    #[tracing::instrument(skip(self, resolved, lease))]
    async fn unpack(
        &self,
        name: &str,
        resolved: &Resolved,
        lease: &str,
    ) -> Result<String, ContainerdError> {
        let mut parent = String::new();
        for (i, layer) in resolved.layers.iter().enumerate() {
            let chain = chain_id(&resolved.diff_ids[..=i]).unwrap_or_default();
            if !self.snapshot_exists(&chain).await? {
                self.apply_layer(name, layer, &resolved.diff_ids[i], &parent, &chain, lease)
                    .await?;
            }
            parent = chain;
        }
        // The image's config keeps the unpacked snapshots from containerd's garbage collector.
        let gc_label = format!("labels.containerd.io/gc.ref.snapshot.{SNAPSHOTTER}");
        self.client
            .content()
            .update(req(
                UpdateContentRequest {
                    info: Some(ContentInfo {
                        digest: resolved.config.clone(),
                        labels: HashMap::from([(
                            format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                            parent.clone(),
                        )]),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![gc_label],
                    }),
                },
                Some(lease),
            ))
            .await
            .map_err(call("Content.Update"))?;
        Ok(parent)
    }

    async fn apply_layer(
        &self,
        name: &str,
        layer: &Descriptor,
        diff_id: &str,
        parent: &str,
        chain: &str,
        lease: &str,
    ) -> Result<(), ContainerdError> {
        let key = format!("arl-unpack-{chain}");
        // A half-done unpack of a daemon that died is in the way: start over.
        let _ = self.remove_snapshot(&key).await;
        let mounts = self
            .prepare_snapshot(&key, parent, HashMap::new(), Some(lease))
            .await?;
        let applied = self
            .client
            .diff()
            .apply(req(
                ApplyRequest {
                    diff: Some(layer.clone()),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                Some(lease),
            ))
            .await;
        let applied = match applied {
            Ok(r) => r.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
            Err(s) => {
                let _ = self.remove_snapshot(&key).await;
                return Err(call("Diff.Apply")(s));
            }
        };
        if applied != diff_id {
            let _ = self.remove_snapshot(&key).await;
            return Err(bad(
                name,
                format!(
                    "layer {} unpacks to {applied}, its config says {diff_id}",
                    layer.digest
                ),
            ));
        }
        match self
            .client
            .snapshots()
            .commit(req(
                CommitSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    name: chain.to_string(),
                    key: key.clone(),
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let _ = self.remove_snapshot(&key).await;
                Ok(())
            }
            Err(s) => {
                let _ = self.remove_snapshot(&key).await;
                Err(call("Snapshots.Commit")(s))
            }
        }
    }

    /// A new active snapshot `key` on `parent`, under `lease` when given: its mounts.
    pub(super) async fn prepare_snapshot(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        lease: Option<&str>,
    ) -> Result<Vec<Mount>, ContainerdError> {
        Ok(self
            .client
            .snapshots()
            .prepare(req(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.to_string(),
                    parent: parent.to_string(),
                    labels,
                },
                lease,
            ))
            .await
            .map_err(call("Snapshots.Prepare"))?
            .into_inner()
            .mounts)
    }

    pub(super) async fn remove_snapshot(&self, key: &str) -> Result<(), Status> {
        self.client
            .snapshots()
            .remove(req(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.to_string(),
                },
                None,
            ))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_entries_are_keyed_by_host() {
        let dir = std::env::temp_dir().join(format!("arl-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let path = dir.join("config.json");
        let encoded = base64::engine::general_purpose::STANDARD.encode("me:secret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{encoded}"}},
                    "reg.example:5000": {{"username": "u", "password": "p"}}}}}}"#
            ),
        )
        .unwrap_or_default();
        let auths = RegistryOptions::read_auth_file(&path).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            auths.get("index.docker.io"),
            Some(&("me".into(), "secret".into()))
        );
        assert_eq!(
            auths.get("reg.example:5000"),
            Some(&("u".into(), "p".into()))
        );
    }
}
