//! Snapshot and fork with real sandboxes: forks start with the parent's files (workspace,
//! home, changes to system directories, deletions) and env but none of its processes, diverge
//! independently, and leave the parent alone; snapshots are bounded per node with clear
//! errors, cannot be deleted while forks stand on them, survive a restart, and leave nothing
//! behind (directories, mounts, cgroups).

mod common;

use std::time::{Duration, Instant};

use arl::api::{ForkRequest, SandboxList, SnapshotInfo, SnapshotList};
use common::{Daemon, Options, Reply, Runtime, acquire, map};
use hyper::{Method, StatusCode};

fn options(rt: Runtime, args: &[&str]) -> Options {
    Options {
        config: Some("[pools.default]\nmin_idle = 1\nmax = 8\n".into()),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Options::on(rt)
    }
}

async fn acquire_with_env(d: &Daemon) -> String {
    let mut sandboxes = d
        .acquire_with(&arl::api::AcquireRequest {
            env: map(&[("FROM_PARENT", "yes")]),
            ..acquire("default")
        })
        .await;
    sandboxes.remove(0).id
}

/// `POST /v1/sandboxes/{id}/snapshots`: the answer, whatever its status.
async fn snapshot(d: &Daemon, id: &str) -> Reply {
    d.send_empty(Method::POST, &format!("/v1/sandboxes/{id}/snapshots"))
        .await
}

/// A snapshot that must be taken (asserts 201).
async fn take_snapshot(d: &Daemon, id: &str) -> SnapshotInfo {
    snapshot(d, id).await.expect(StatusCode::CREATED)
}

async fn delete_snapshot(d: &Daemon, id: &str) -> Reply {
    d.send_empty(Method::DELETE, &format!("/v1/snapshots/{id}"))
        .await
}

async fn fork(d: &Daemon, path: &str, count: usize) -> Vec<String> {
    let request = ForkRequest {
        count: Some(count),
        ..ForkRequest::default()
    };
    let list: SandboxList = d.post(path, &request, StatusCode::CREATED).await;
    let ids: Vec<String> = list.sandboxes.into_iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), count, "{ids:?}");
    ids
}

async fn out(d: &Daemon, id: &str, script: &str) -> String {
    let r = d.shell(id, script).await;
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout
}

/// Snapshot directories this daemon keeps.
fn snapshot_dirs(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("snapshots"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Host mounts under the daemon's state directory but the snapshot store's own tmpfs (a
/// fork's snapshot mounts live only in its sandbox's mount namespace).
fn host_mounts(d: &Daemon) -> Vec<String> {
    let state = d.state_dir();
    let store = d.state_dir().join("snapshots");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(state.to_string_lossy().as_ref()))
        .filter(|l| l.split(' ').nth(4) != Some(store.to_string_lossy().as_ref()))
        .map(str::to_string)
        .collect()
}

/// The snapshot store's mount: its filesystem type and super options, if it is a mount.
fn store_mount(d: &Daemon) -> Option<(String, String)> {
    let store = d.state_dir().join("snapshots");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(store.to_string_lossy().as_ref()))
        .find_map(|l| {
            let (_, right) = l.split_once(" - ")?;
            let mut fields = right.split(' ');
            let fstype = fields.next()?.to_string();
            let options = fields.nth(1)?.to_string();
            Some((fstype, options))
        })
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_start_with_the_parents_files_and_diverge_alone() {
    // The in-memory store: its tmpfs outlives a crash of the daemon, as a disk would.
    let mut d = Daemon::start(options(Runtime::Process, &["--snapshot-store", "memory"])).await;
    let parent = acquire_with_env(&d).await;
    out(
        &d,
        &parent,
        "echo parent > /workspace/a.txt && mkdir -p /workspace/deep/er && echo x > /workspace/deep/er/f \
         && echo home > /root/r && ln -s a.txt /workspace/link \
         && (sleep 1000 >/dev/null 2>&1 &)",
    )
    .await;
    let snap = take_snapshot(&d, &parent).await;
    let snap_id = snap.id.clone();
    assert_eq!(snap.pool, "default");
    assert_eq!(snap.sandbox, parent);
    assert!(snap.bytes > 0, "{snap:?}");
    // The parent runs on after the snapshot, and its later changes are its own.
    out(&d, &parent, "echo later > /workspace/a.txt").await;

    let forks = fork(&d, &format!("/v1/snapshots/{snap_id}/fork"), 2).await;
    for f in &forks {
        assert_eq!(out(&d, f, "cat /workspace/a.txt").await, "parent\n");
        assert_eq!(out(&d, f, "cat /workspace/deep/er/f").await, "x\n");
        assert_eq!(out(&d, f, "cat /root/r").await, "home\n");
        assert_eq!(out(&d, f, "readlink /workspace/link").await, "a.txt\n");
        // Root inside owns them and can change them (copy-up into the fork's own layer).
        assert_eq!(out(&d, f, "stat -c %u:%g /workspace/a.txt").await, "0:0\n");
        assert_eq!(out(&d, f, "echo $FROM_PARENT").await, "yes\n");
        // No process comes along.
        assert_eq!(
            out(
                &d,
                f,
                "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -c 'slee[p] 1000' || true"
            )
            .await,
            "0\n"
        );
    }
    out(
        &d,
        &forks[0],
        "echo one > /workspace/a.txt && rm /workspace/deep/er/f",
    )
    .await;
    assert_eq!(out(&d, &forks[0], "cat /workspace/a.txt").await, "one\n");
    assert_eq!(out(&d, &forks[1], "cat /workspace/a.txt").await, "parent\n");
    assert_eq!(out(&d, &forks[1], "cat /workspace/deep/er/f").await, "x\n");
    assert_eq!(out(&d, &parent, "cat /workspace/a.txt").await, "later\n");
    assert_eq!(out(&d, &parent, "cat /workspace/deep/er/f").await, "x\n");

    // A fork of a fork stacks its own snapshot on its parent's.
    let second = take_snapshot(&d, &forks[0]).await;
    assert_eq!(second.parent.as_deref(), Some(snap_id.as_str()));
    let grandchild = fork(&d, &format!("/v1/snapshots/{}/fork", second.id), 1).await;
    assert_eq!(
        out(&d, &grandchild[0], "cat /workspace/a.txt").await,
        "one\n"
    );
    assert_eq!(
        out(
            &d,
            &grandchild[0],
            "test -e /workspace/deep/er/f || echo gone"
        )
        .await,
        "gone\n"
    );
    assert_eq!(out(&d, &grandchild[0], "cat /root/r").await, "home\n");

    // In use: neither snapshot can go while forks stand on them.
    delete_snapshot(&d, &snap_id)
        .await
        .expect_error(StatusCode::CONFLICT);
    let info: SnapshotInfo = d.get(&format!("/v1/snapshots/{snap_id}")).await;
    assert_eq!(info.forks, 3, "{info:?}");

    // Snapshots and their forks survive a restart of the daemon (the store's tmpfs stays).
    assert_eq!(store_mount(&d).map(|m| m.0).as_deref(), Some("tmpfs"));
    d.kill9();
    d.spawn().await;
    assert_eq!(out(&d, &forks[1], "cat /workspace/a.txt").await, "parent\n");
    let list: SnapshotList = d.get("/v1/snapshots").await;
    assert_eq!(list.snapshots.len(), 2, "{list:?}");
    delete_snapshot(&d, &snap_id)
        .await
        .expect_error(StatusCode::CONFLICT);

    // Released forks free the snapshots; deleting the pool removes what is left.
    for id in forks.iter().chain(&grandchild) {
        assert_eq!(d.release(id).await, StatusCode::NO_CONTENT);
    }
    let deleted = delete_snapshot(&d, &second.id).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted}");
    assert_eq!(snapshot_dirs(&d).len(), 1);
    assert_eq!(d.release(&parent).await, StatusCode::NO_CONTENT);
    let deleted = d.send_empty(Method::DELETE, "/v1/pools/default").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted}");
    wait_until("the pool's snapshots removed", || {
        snapshot_dirs(&d).is_empty()
    })
    .await;
    wait_until("every sandbox gone", || d.leftovers().is_empty()).await;
    assert!(host_mounts(&d).is_empty(), "{:?}", host_mounts(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forking_a_live_sandbox_leaves_no_snapshot_behind() {
    // A pool that reuses released sandboxes: a fork is destroyed all the same (it stands on
    // its parent's files), so its snapshot goes.
    let d = Daemon::start(Options {
        config: Some("[pools.default]\nmin_idle = 1\nmax = 8\nreuse = \"reset\"\n".into()),
        ..Options::on(Runtime::Process)
    })
    .await;
    let parent = acquire_with_env(&d).await;
    out(&d, &parent, "echo live > /workspace/f").await;
    let forks = fork(&d, &format!("/v1/sandboxes/{parent}/fork"), 3).await;
    for f in &forks {
        assert_eq!(out(&d, f, "cat /workspace/f").await, "live\n");
    }
    // The snapshot on the way is not listed, and goes with the last fork.
    let list: SnapshotList = d.get("/v1/snapshots").await;
    assert!(list.snapshots.is_empty(), "{list:?}");
    assert_eq!(snapshot_dirs(&d).len(), 1);
    for f in &forks {
        d.release(f).await;
    }
    wait_until("the fork's snapshot removed", || {
        snapshot_dirs(&d).is_empty()
    })
    .await;
    assert_eq!(out(&d, &parent, "cat /workspace/f").await, "live\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_limits_give_clear_errors() {
    let d = Daemon::start(options(
        Runtime::Process,
        &["--max-snapshots", "1", "--snapshot-mb", "1"],
    ))
    .await;
    let id = d.acquire("default").await;
    out(&d, &id, "echo small > /workspace/s").await;
    let first = take_snapshot(&d, &id).await;
    let refused = snapshot(&d, &id).await.expect_error(StatusCode::CONFLICT);
    assert!(
        refused.message.contains("at most 1 snapshots"),
        "{refused:?}"
    );
    let deleted = delete_snapshot(&d, &first.id).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted}");
    // Over the byte budget: refused, and nothing is left half-made.
    out(&d, &id, "head -c 2000000 /dev/zero > /workspace/big").await;
    let refused = snapshot(&d, &id)
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(refused.message.contains("bytes"), "{refused:?}");
    assert!(snapshot_dirs(&d).is_empty(), "{:?}", snapshot_dirs(&d));
    // The sandbox was thawed after the refused copy.
    assert_eq!(out(&d, &id, "cat /workspace/s").await, "small\n");
    assert_eq!(d.status("default").await.paused, 0);
    // Unknown ids and malformed requests are 4xx.
    d.send_empty(Method::GET, "/v1/snapshots/snap-nope")
        .await
        .expect_error(StatusCode::NOT_FOUND);
    let zero = ForkRequest {
        count: Some(0),
        ..ForkRequest::default()
    };
    d.send(
        Method::POST,
        &format!("/v1/sandboxes/{id}/fork"),
        Some(&zero),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST);
}

/// A container's fork carries its workspace and its changes to the image's root: a new file,
/// a deleted one (a whiteout) and a directory removed and made again (opaque: the image's
/// files in it stay hidden).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_forks_with_its_workspace_and_root_changes() {
    let d = Daemon::start(options(Runtime::Containerd, &[])).await;
    d.wait_status("default", 60, |s| s.idle == 1).await;
    let parent = acquire_with_env(&d).await;
    out(
        &d,
        &parent,
        "mkdir -p /workspace/d && echo c > /workspace/d/f && echo t > /tmp/t \
         && echo n > /new && rm /bin/wget && rm -rf /etc && mkdir /etc && echo e > /etc/only",
    )
    .await;
    let root_state = "cat /new; ls /etc; test -e /bin/wget || echo no-wget";
    let forks = fork(&d, &format!("/v1/sandboxes/{parent}/fork"), 2).await;
    for f in &forks {
        assert_eq!(out(&d, f, "cat /workspace/d/f /tmp/t").await, "c\nt\n");
        assert_eq!(out(&d, f, "echo $FROM_PARENT").await, "yes\n");
        assert_eq!(out(&d, f, root_state).await, "n\nonly\nno-wget\n");
    }
    out(
        &d,
        &forks[0],
        "echo changed > /workspace/d/f && echo m > /new",
    )
    .await;
    assert_eq!(
        out(&d, &forks[1], "cat /workspace/d/f /new").await,
        "c\nn\n"
    );
    assert_eq!(out(&d, &parent, "cat /workspace/d/f /new").await, "c\nn\n");
    // A fresh sandbox of the pool still has the image's root as it was.
    let fresh = d.acquire("default").await;
    assert_eq!(
        out(
            &d,
            &fresh,
            "cat /etc/passwd; test -e /bin/wget && echo wget"
        )
        .await,
        "root:x:0:0:root:/root:/bin/sh\nwget\n"
    );
    for f in &forks {
        d.release(f).await;
    }
    wait_until("the fork's snapshot removed", || {
        snapshot_dirs(&d).is_empty()
    })
    .await;
}

/// A fork straight from a live sandbox carries a large file whole (copied in pieces by
/// several threads), with the snapshots kept in memory (a tmpfs of the node's, huge pages for
/// large files) or on disk (the state directory, the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_fork_carries_a_large_file_from_either_store() {
    for store in ["memory", "disk"] {
        let d = Daemon::start(Options {
            config: Some(
                "[pools.default]\nmin_idle = 1\nmax = 4\ndisk_mb = 256\nmemory_mb = 512\n".into(),
            ),
            args: vec!["--snapshot-store".into(), store.into()],
            ..Options::on(Runtime::Process)
        })
        .await;
        let parent = d.acquire("default").await;
        let sum = out(
            &d,
            &parent,
            "head -c 40000003 /dev/urandom > /workspace/big && echo end >> /workspace/big && md5sum < /workspace/big",
        )
        .await;
        let forks = fork(&d, &format!("/v1/sandboxes/{parent}/fork"), 1).await;
        assert_eq!(
            out(&d, &forks[0], "md5sum < /workspace/big").await,
            sum,
            "{store}"
        );
        match (store, store_mount(&d)) {
            ("memory", Some((fstype, options))) => {
                assert_eq!(fstype, "tmpfs");
                assert!(options.contains("huge=within_size"), "{options}");
            }
            ("disk", None) => {}
            (store, mount) => panic!("the {store} store is mounted as {mount:?}"),
        }
        d.release(&forks[0]).await;
        wait_until("the fork's snapshot removed", || {
            snapshot_dirs(&d).is_empty()
        })
        .await;
    }
}
