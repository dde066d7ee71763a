//! `containerd` pools pull images that containerd does not have, from a real registry
//! (Debian's `docker-registry`, the CNCF distribution server, started here on a free port and
//! filled over its HTTP API): multi-layer images, indexes, missing tags and unreachable
//! registries.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tempdir::TempDir;
use common::{Daemon, Options, ctr};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A registry on 127.0.0.1, stopped and wiped on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to 127.0.0.1:port; the response's status, Location header and body.
async fn http(
    port: u16,
    method: Method,
    uri: &str,
    content_type: &str,
    body: Bytes,
) -> (StatusCode, String, Bytes) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the registry");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("request");
    let response = sender
        .send_request(request)
        .await
        .expect("registry answers");
    let status = response.status();
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, location, body)
}

impl Registry {
    async fn start() -> Self {
        let dir = TempDir::new("registry");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry (scripts/containerd.sh installs it)");
        let registry = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the registry did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        registry
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let (status, location, body) = http(
            self.port,
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            "application/octet-stream",
            Bytes::new(),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body:?}");
        let path = location
            .strip_prefix(&format!("http://{}", self.host()))
            .unwrap_or(&location);
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, _, body) = http(
            self.port,
            Method::PUT,
            &format!("{path}{sep}digest={digest}"),
            "application/octet-stream",
            Bytes::copy_from_slice(data),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
        digest
    }

    async fn push_manifest(&self, repo: &str, tag: &str, media_type: &str, doc: &[u8]) {
        let (status, _, body) = http(
            self.port,
            Method::PUT,
            &format!("/v2/{repo}/manifests/{tag}"),
            media_type,
            Bytes::copy_from_slice(doc),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
    }
}

/// `tar` of a directory (numeric owners), optionally gzipped.
fn tar(dir: &std::path::Path, gzip: bool) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["--numeric-owner", "-c"])
        .args(if gzip { &["-z"][..] } else { &[][..] })
        .args(["-f", "-", "."])
        .output()
        .expect("run tar");
    assert!(out.status.success());
    out.stdout
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run gzip");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().ok();
    out.stdout
}

/// Pushes a two-layer image (busybox, gzipped; then an uncompressed layer with `/marker`
/// holding `marker`) under `repo:tag`, as an index with one linux manifest for this host.
async fn push_image(registry: &Registry, repo: &str, tag: &str, marker: &str) {
    let base = TempDir::new("layer-base");
    std::fs::create_dir_all(base.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", base.path().join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls", "true"] {
        std::os::unix::fs::symlink("busybox", base.path().join("bin").join(applet)).unwrap();
    }
    let top = TempDir::new("layer-top");
    std::fs::write(top.path().join("marker"), marker).unwrap();
    // 3 MiB that do not compress: the layer reaches containerd in several write messages.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..3 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(top.path().join("noise"), &noise).unwrap();

    let base_gz = tar(base.path(), true);
    let top_tar = tar(top.path(), false);
    let diff_ids = [sha256(&gunzip(&base_gz)), sha256(&top_tar)];
    let base_digest = registry.push_blob(repo, &base_gz).await;
    let top_digest = registry.push_blob(repo, &top_tar).await;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    // The OCI image documents the registry serves are raw JSON: they are no `arl::api` model.
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = registry.push_blob(repo, &config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             "digest": base_digest, "size": base_gz.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar",
             "digest": top_digest, "size": top_tar.len()},
        ],
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    registry
        .push_manifest(
            repo,
            &manifest_digest,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )
        .await;
    // Another platform's manifest, listed first: it lacks the marker layer.
    let other = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": base_digest, "size": base_gz.len()}],
    }))
    .unwrap();
    let other_digest = sha256(&other);
    registry
        .push_manifest(
            repo,
            &other_digest,
            "application/vnd.oci.image.manifest.v1+json",
            &other,
        )
        .await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": other_digest, "size": other.len(),
             "platform": {"os": "linux", "architecture": "s390x"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": manifest_digest, "size": manifest.len(),
             "platform": {"os": "linux", "architecture": arch}},
        ],
    }))
    .unwrap();
    registry
        .push_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index)
        .await;
}

fn unique() -> String {
    let mut bytes = [0u8; 6];
    common::tempdir::getrandom(&mut bytes);
    common::tempdir::hex(&bytes)
}

async fn daemon(registry: &Registry, pools: &str) -> Daemon {
    Daemon::start(Options {
        config: Some(pools.to_string()),
        args: vec!["--insecure-registry".into(), registry.host()],
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_image_is_pulled_unpacked_and_runs() {
    let registry = Registry::start().await;
    let tag = unique();
    let marker = format!("pulled {tag}");
    push_image(&registry, "arl/pulled", &tag, &marker).await;
    let image = format!("{}/arl/pulled:{tag}", registry.host());
    assert!(
        !ctr(&["images", "ls", "-q"]).contains(&image),
        "the image starts absent"
    );

    // Two pools of the same image: one pull serves both.
    let d = daemon(
        &registry,
        &format!(
            "[pools.a]\nruntime = \"containerd\"\nimage = \"{image}\"\nmin_idle = 2\nmemory_mb = 128\n\
             [pools.b]\nruntime = \"containerd\"\nimage = \"{image}\"\nmin_idle = 1\nmemory_mb = 128\n"
        ),
    )
    .await;
    d.wait_status("a", 60, |s| s.idle == 2).await;
    d.wait_status("b", 60, |s| s.idle == 1).await;
    let id = d.acquire("a").await;
    let r = d
        .shell(&id, "cat /marker; ls /bin/busybox; wc -c < /noise")
        .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!("{marker}/bin/busybox\n{}\n", 3 << 20),
        "{r:?}"
    );

    // containerd now holds the image, unpacked, and no pull lease is left.
    assert!(ctr(&["images", "ls", "-q"]).lines().any(|l| l == image));
    let leases = ctr(&["leases", "ls", "-q"]);
    assert!(!leases.contains("arl-pull-"), "{leases}");

    // A second daemon finds it in the store: no registry needed any more.
    drop(d);
    drop(registry);
    let offline = Daemon::start(Options {
        config: Some(format!(
            "[pools.a]\nruntime = \"containerd\"\nimage = \"{image}\"\nmin_idle = 1\nmemory_mb = 128\n"
        )),
        ..Options::default()
    })
    .await;
    offline.wait_status("a", 30, |s| s.idle == 1).await;
    let id = offline.acquire("a").await;
    let r = offline.shell(&id, "cat /marker").await;
    assert_eq!(r.stdout, marker, "{r:?}");
    drop(offline);
    ctr(&["images", "rm", &image]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_or_registry_is_a_clear_pool_error() {
    let registry = Registry::start().await;
    let missing = format!("{}/arl/nothing:{}", registry.host(), unique());
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let unreachable = format!("127.0.0.1:{closed}/arl/nothing:1");
    let d = Daemon::start(Options {
        config: Some(format!(
            "[pools.missing]\nruntime = \"containerd\"\nimage = \"{missing}\"\nmin_idle = 1\n\
             [pools.unreachable]\nruntime = \"containerd\"\nimage = \"{unreachable}\"\nmin_idle = 1\n"
        )),
        args: vec![
            "--insecure-registry".into(),
            format!("{},127.0.0.1:{closed}", registry.host()),
        ],
        ..Options::default()
    })
    .await;
    for (pool, image) in [("missing", &missing), ("unreachable", &unreachable)] {
        let s = d.wait_status(pool, 30, |s| s.last_error.is_some()).await;
        let err = s.last_error.unwrap_or_default();
        // The runtime that failed, then what it was doing.
        assert!(
            err.starts_with(&format!("containerd: pull {image}:")),
            "{err}"
        );
        let err = d
            .send(Method::POST, "/v1/sandboxes", Some(&common::acquire(pool)))
            .await
            .expect_error(StatusCode::SERVICE_UNAVAILABLE);
        assert!(err.message.contains(image.as_str()), "{err:?}");
    }
    let s = d.status("missing").await;
    let err = s.last_error.as_deref().unwrap_or_default();
    assert!(
        err.contains("unknown") || err.contains("not found"),
        "{s:?}"
    );
    let leases = ctr(&["leases", "ls", "-q"]);
    assert!(!leases.contains("arl-pull-"), "{leases}");
    // The daemon keeps serving (backoff, not a crash loop).
    let reply = d.send_empty(Method::GET, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply}");
}
