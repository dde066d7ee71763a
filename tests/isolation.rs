//! Sandboxes keep code in and host data out: files confined, host secrets unreadable, no
//! privilege from setuid, and resource hogs contained while everything else goes on.

mod common;

use std::time::{Duration, Instant};

use arl::api::files::Encoding;
use arl::api::{
    ErrorCode, ExecRequest, FileContent, FileInfo, PoolSpec, PoolView, SandboxInfo,
    WriteFilesRequest, WriteFilesResponse,
};
use bytes::Bytes;
use common::{Daemon, Options, Reply, Runtime, cmd, shell};
use hyper::{Method, StatusCode};

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

async fn files_round_trip_with_sha256(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sum = sha256_hex(&data);
    let url = format!("/v1/sandboxes/{id}/files?path=deep/dir/blob.bin&mode=600&sha256={sum}");
    let (status, body) = d
        .request_raw(Method::PUT, &url, Some(Bytes::from(data.clone())), None)
        .await
        .unwrap();
    let info: FileInfo = Reply { status, body }.expect(StatusCode::OK);
    assert_eq!(
        info,
        FileInfo {
            path: "/workspace/deep/dir/blob.bin".into(),
            size: data.len() as u64,
            sha256: sum.clone(),
        }
    );

    let (status, back) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=/workspace/deep/dir/blob.bin"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_hex(&back), sum);
    let r = d
        .shell(
            &id,
            "stat -c %a deep/dir/blob.bin; sha256sum deep/dir/blob.bin | cut -d' ' -f1",
        )
        .await;
    assert_eq!(r.stdout, format!("600\n{sum}\n"));

    // A wrong checksum is refused and leaves the old file alone.
    let (status, body) = d
        .request_raw(
            Method::PUT,
            &format!(
                "/v1/sandboxes/{id}/files?path=deep/dir/blob.bin&sha256={}",
                "0".repeat(64)
            ),
            Some(Bytes::from_static(b"other")),
            None,
        )
        .await
        .unwrap();
    let err = Reply { status, body }.expect_error(StatusCode::BAD_REQUEST);
    assert_eq!(err.code, ErrorCode::ChecksumMismatch);
    let r = d
        .shell(
            &id,
            "sha256sum deep/dir/blob.bin | cut -d' ' -f1; ls -A deep/dir",
        )
        .await;
    assert_eq!(
        r.stdout,
        format!("{sum}\nblob.bin\n"),
        "no temp file left behind"
    );

    // Several files in one call (hot code reload), text and base64, with a mode.
    let req = WriteFilesRequest {
        files: [
            (
                "app/main.sh".to_string(),
                FileContent::Text("echo hi from main\n".into()),
            ),
            (
                "app/run.sh".to_string(),
                FileContent::Detailed {
                    content: "IyEvYmluL3NoCmVjaG8gcnVuCg==".into(),
                    encoding: Encoding::Base64,
                    mode: Some(0o755),
                },
            ),
        ]
        .into(),
    };
    let written: WriteFilesResponse = d
        .post(&format!("/v1/sandboxes/{id}/files"), &req, StatusCode::OK)
        .await;
    assert_eq!(written.files.len(), 2, "{:?}", written.files);
    let r = d.shell(&id, "sh app/main.sh && ./app/run.sh").await;
    assert_eq!(r.stdout, "hi from main\nrun\n", "{r:?}");

    let (status, _) = d
        .request_raw(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/files?path=app/main.sh"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=app/main.sh"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "{}",
        String::from_utf8_lossy(&body)
    );
}

async fn paths_that_leave_the_sandbox_are_refused(rt: Runtime) {
    let d = Daemon::start(Options::on(rt)).await;
    let id = d.acquire("default").await;
    d.shell(&id, "ln -s / /workspace/rootlink; ln -s /etc/shadow /workspace/shadow; ln -s ../etc /workspace/up").await;
    for path in [
        "../etc/passwd",
        "a/../../etc/passwd",
        "rootlink/etc/hostname",
        "up/passwd",
        "/workspace/../etc/passwd",
        "/proc/1/root/etc/hostname",
        "/proc/self/cwd/x",
    ] {
        let (status, body) = d
            .request_raw(
                Method::PUT,
                &format!("/v1/sandboxes/{id}/files?path={path}"),
                Some(Bytes::from_static(b"x")),
                None,
            )
            .await
            .unwrap();
        let err = Reply { status, body }.expect_error(StatusCode::BAD_REQUEST);
        assert_eq!(err.code, ErrorCode::PathRefused, "write {path}: {err:?}");
        let (status, body) = d
            .request_raw(
                Method::GET,
                &format!("/v1/sandboxes/{id}/files?path={path}"),
                None,
                None,
            )
            .await
            .unwrap();
        let err = Reply { status, body }.expect_error(StatusCode::BAD_REQUEST);
        assert_eq!(err.code, ErrorCode::PathRefused, "read {path}: {err:?}");
    }
    // The sandbox's own /etc/shadow (the host's, through the overlay) is not readable either:
    // root in a process sandbox is not the host's root.
    if rt == Runtime::Process {
        let (status, body) = d
            .request_raw(
                Method::GET,
                &format!("/v1/sandboxes/{id}/files?path=/etc/shadow"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=/etc/passwd"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "absolute paths inside the sandbox work"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_data_is_out_of_sight() {
    let d = Daemon::start(Options::default()).await;
    let secret = d.state_dir().join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    let id = d.acquire("default").await;
    let script = format!(
        "cat /etc/shadow 2>&1; ls -A /root /home; cat {} 2>&1; ls {} 2>&1; cat /proc/1/environ 2>&1 | head -c 0; ls /run; id -u",
        secret.display(),
        d.state_dir().display()
    );
    let r = d.shell(&id, &script).await;
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(!out.contains("host secret"), "{out}");
    assert!(out.contains("/etc/shadow: Permission denied"), "{out}");
    assert!(
        out.contains("No such file or directory"),
        "state dir must not exist inside: {out}"
    );
    assert!(
        out.contains("/home:\n\n/root:\n"),
        "/root and /home are the sandbox's own, empty: {out}"
    );

    // Root inside is an unprivileged uid outside.
    let pid = d.agent_pid(&id);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let host_uid: u32 = uid_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        host_uid >= 65536,
        "sandbox root maps to host uid {host_uid}"
    );
    assert!(status.contains("NoNewPrivs:\t1"));
    assert!(status.contains("Seccomp:\t2"));

    // Only loopback, and namespaces cannot be nested to undo the limits.
    let r = d.shell(&id, "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; unshare -U true 2>&1 || echo refused").await;
    assert_eq!(r.stdout.lines().next(), Some("lo"), "{r:?}");
    assert!(r.stdout.contains("refused"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setuid_binaries_give_no_privilege() {
    let d = Daemon::start(Options::default()).await;
    let id = d.acquire("default").await;
    let r = d
        .shell(&id, "cp /usr/bin/id /workspace/suid-id && chmod u+s /workspace/suid-id && ls -l /workspace/suid-id | cut -c1-10; setpriv --reuid 1000 --regid 1000 --clear-groups /workspace/suid-id -u; setpriv --reuid 1000 --regid 1000 --clear-groups su -c id root </dev/null 2>&1 | head -1 | grep -c uid=0")
        .await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"-rwsr-xr-x"), "{r:?}");
    assert_eq!(
        lines.get(1),
        Some(&"1000"),
        "setuid must not raise the uid: {r:?}"
    );
    assert_eq!(lines.get(2), Some(&"0"), "su must not become root: {r:?}");
}

async fn fork_bomb_is_held_by_the_pids_limit(rt: Runtime) {
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 2\npids = 64\n".into()),
        ..Options::on(rt)
    })
    .await;
    let bomb = d.acquire("default").await;
    let other = d.acquire("default").await;
    let started = Instant::now();
    let r = d
        .run(
            &bomb,
            &ExecRequest {
                timeout_ms: Some(4000),
                ..shell("bomb() { bomb | bomb & }; bomb; sleep 2")
            },
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(20), "{r:?}");
    assert_eq!(
        d.shell(&other, "echo other fine").await.stdout,
        "other fine\n"
    );
    let info: SandboxInfo = d.action(&bomb, "reset").await.expect(StatusCode::OK);
    assert_eq!(info.id, bomb);
    let r = d
        .shell(&bomb, "echo recovered; ls /proc | grep -c '^[0-9]'")
        .await;
    assert_eq!(r.stdout.lines().next(), Some("recovered"), "{r:?}");
    let procs: u32 = r.stdout.lines().nth(1).unwrap().parse().unwrap();
    assert!(procs <= 4, "reset left {procs} processes");
}

async fn memory_hog_dies_alone(rt: Runtime) {
    let d = Daemon::start(Options {
        // Files count as memory too (the disk is a tmpfs), so the limit is memory + disk.
        config: Some("[pools.default]\nmin_idle = 2\nmemory_mb = 96\ndisk_mb = 32\n".into()),
        ..Options::on(rt)
    })
    .await;
    let hog = d.acquire("default").await;
    let other = d.acquire("default").await;
    let r = d
        .run(
            &hog,
            &ExecRequest {
                timeout_ms: Some(30000),
                ..cmd(&["dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1"])
            },
        )
        .await;
    assert_eq!(
        r.signal,
        Some(9),
        "the hog (a 400 MiB buffer) is OOM-killed: {r:?}"
    );
    assert!(r.oom_killed, "{r:?}");
    assert_eq!(
        d.shell(&hog, "echo agent alive").await.stdout,
        "agent alive\n"
    );
    assert_eq!(
        d.shell(&other, "echo other fine").await.stdout,
        "other fine\n"
    );
    let (status, _) = d
        .request_raw(Method::GET, "/healthz", None, None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_rootfs_replaces_the_host_system() {
    // A minimal root filesystem with no C library at all (the agent is a static binary): the
    // host's static ldconfig as the only program, and a marker file.
    let rootfs = common::tempdir::TempDir::new("rootfs");
    std::fs::create_dir_all(rootfs.path().join("bin")).unwrap();
    std::fs::copy("/sbin/ldconfig", rootfs.path().join("bin/ldconfig")).unwrap();
    std::fs::write(rootfs.path().join("marker"), "from the pool's rootfs\n").unwrap();
    let d = Daemon::start(Options {
        config: Some(format!(
            "[pools.tiny]\nmin_idle = 1\nrootfs = \"{}\"\n",
            rootfs.path().display()
        )),
        ..Options::default()
    })
    .await;
    let id = d.acquire("tiny").await;
    let r = d.run(&id, &cmd(&["/bin/ldconfig", "--version"])).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.stdout.contains("ldconfig"), "{r:?}");
    let r = d.run(&id, &cmd(&["/bin/sh", "-c", "true"])).await;
    assert_eq!(r.exit_code, 127, "no host /bin/sh inside: {r:?}");
    let (status, body) = d
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=/marker"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"from the pool's rootfs\n");
    // Writes land in the sandbox's private layer, never in the pool's directory.
    assert_eq!(d.put_file(&id, "/marker", b"changed").await, StatusCode::OK);
    assert_eq!(
        std::fs::read_to_string(rootfs.path().join("marker")).unwrap(),
        "from the pool's rootfs\n"
    );

    // Even an empty directory hosts the agent: the sandbox works, with nothing to run in it.
    let bare = common::tempdir::TempDir::new("bare");
    let put_pool = |name: &str, rootfs: String| {
        let (d, path) = (&d, format!("/v1/pools/{name}"));
        let spec = PoolSpec {
            min_idle: 1,
            rootfs: Some(rootfs),
            ..PoolSpec::default()
        };
        async move {
            let view: PoolView = d
                .send(Method::PUT, &path, Some(&spec))
                .await
                .expect(StatusCode::OK);
            assert_eq!(view.spec, spec);
        }
    };
    put_pool("bare", bare.path().display().to_string()).await;
    let id = d.acquire("bare").await;
    let r = d.run(&id, &cmd(&["/bin/sh", "-c", "true"])).await;
    assert_eq!(r.exit_code, 127, "{r:?}");
    assert_eq!(d.put_file(&id, "hello.txt", b"hi").await, StatusCode::OK);
    assert!(
        std::fs::read_dir(bare.path()).unwrap().next().is_none(),
        "the pool's directory stays empty"
    );

    put_pool("gone", "/no/such/dir".into()).await;
    d.wait_status("gone", 20, |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("/no/such/dir"))
    })
    .await;
}

crate::on_every_runtime!(
    files_round_trip_with_sha256,
    paths_that_leave_the_sandbox_are_refused,
    fork_bomb_is_held_by_the_pids_limit,
    memory_hog_dies_alone,
);
