//! Issue 15 (idle auto-pause, snapshot and fork), process runtime, release build.
//!
//! * pause and resume of a leased sandbox, through the API (target: each <= 5 ms), against
//!   the same-run floor of `GET /v1/sandboxes/{id}` (an API round trip that does nothing);
//! * the first exec to an auto-paused sandbox against an exec to a running one (target: at
//!   most 2 ms more);
//! * a sandbox with a 100 MB writable layer: snapshot, fork one from the snapshot (target:
//!   p50 <= 30 ms), 16 forks in one request (target: <= 200 ms), fork straight from the live
//!   sandbox (snapshot + fork), against the same-run floor of creating a fresh sandbox (an
//!   acquire that misses the warm pool).

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use arl::api::{ExecResult, SandboxInfo, SandboxList, SnapshotInfo};
use common::*;
use serde::de::DeserializeOwned;

fn timed(mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    f();
    ms(started.elapsed())
}

/// A POST whose answer is a `T` (the request bodies are prebuilt bytes: nothing is encoded
/// inside a timed region).
fn post<T: DeserializeOwned>(c: &mut Client, path: &str, body: Option<&str>, want: u16) -> T {
    let r = c
        .request("POST", path, body.map(str::as_bytes))
        .expect("request");
    assert_eq!(r.status, want, "POST {path}: {}", r.text());
    r.json()
}

fn exec_true(c: &mut Client, id: &str) {
    let r: ExecResult = post(
        c,
        &format!("/v1/sandboxes/{id}/exec"),
        Some(r#"{"cmd":["true"]}"#),
        200,
    );
    assert_eq!(r.exit_code, 0);
}

fn release_all(c: &mut Client, forks: &SandboxList) {
    for s in &forks.sandboxes {
        c.release(&s.id);
    }
}

fn main() {
    print_header("fork (auto-pause, snapshot, fork)");
    let config = "[pools.default]\nmin_idle = 1\nmax = 40\ndisk_mb = 512\nmemory_mb = 256\n\
                  [pools.sleepy]\nmin_idle = 1\nmax = 4\nauto_pause_after_seconds = 1\n\
                  [pools.cold]\nmin_idle = 0\nmax = 4\n";
    let mut d = Daemon::start(config, &[]);
    let mut c = d.client();
    d.client().wait_idle("default", 1, Duration::from_secs(60));

    // -- pause and resume --------------------------------------------------------------------
    let id = c.acquire("default");
    let (mut floor, mut pause, mut resume) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..100 {
        floor.push(timed(|| {
            c.get_json::<SandboxInfo>(&format!("/v1/sandboxes/{id}"));
        }));
        pause.push(timed(|| {
            post::<SandboxInfo>(&mut c, &format!("/v1/sandboxes/{id}/pause"), None, 200);
        }));
        resume.push(timed(|| {
            post::<SandboxInfo>(&mut c, &format!("/v1/sandboxes/{id}/resume"), None, 200);
        }));
    }
    let (floor, pause, resume) = (stats(&floor), stats(&pause), stats(&resume));
    println!("floor GET /v1/sandboxes/{{id}}: {}", floor.line_ms());
    println!(
        "pause:  {}  -> {} (target p50 <= 5 ms)",
        pause.line_ms(),
        verdict(pause.p50 <= 5.0)
    );
    println!(
        "resume: {}  -> {} (target p50 <= 5 ms)",
        resume.line_ms(),
        verdict(resume.p50 <= 5.0)
    );
    c.release(&id);

    // -- the first request to an auto-paused sandbox -----------------------------------------
    d.client().wait_idle("sleepy", 1, Duration::from_secs(60));
    let sleepy = c.acquire("sleepy");
    let (mut running, mut woken) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        for _ in 0..5 {
            running.push(timed(|| exec_true(&mut c, &sleepy)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.pool_status("sleepy").paused != 1 {
            assert!(Instant::now() < deadline, "never auto-paused");
            std::thread::sleep(Duration::from_millis(20));
        }
        woken.push(timed(|| exec_true(&mut c, &sleepy)));
    }
    let (running, woken) = (stats(&running), stats(&woken));
    println!("exec `true`, running sandbox:     {}", running.line_ms());
    println!(
        "exec `true`, auto-paused sandbox: {}  -> +{:.3} ms at p50, {} (target <= +2 ms)",
        woken.line_ms(),
        woken.p50 - running.p50,
        verdict(woken.p50 - running.p50 <= 2.0)
    );
    c.release(&sleepy);

    // -- snapshot and fork of a sandbox with a 100 MB writable layer -------------------------
    let mut create = Vec::new();
    for _ in 0..10 {
        create.push(timed(|| {
            let id = c.acquire("cold");
            c.release(&id);
        }));
    }
    let create = stats(&create);
    println!(
        "floor: create a fresh sandbox (acquire, pool cold): {}",
        create.line_ms()
    );

    let parent = c.acquire("default");
    post::<ExecResult>(
        &mut c,
        &format!("/v1/sandboxes/{parent}/exec"),
        Some(r#"{"shell":"head -c 100000000 /dev/urandom > /workspace/big && sync"}"#),
        200,
    );
    let mut snap_ms = Vec::new();
    let mut snap_id = String::new();
    for i in 0..5 {
        let mut snap: Option<SnapshotInfo> = None;
        snap_ms.push(timed(|| {
            snap = Some(post(
                &mut c,
                &format!("/v1/sandboxes/{parent}/snapshots"),
                None,
                201,
            ));
        }));
        let snap = snap.expect("a snapshot");
        let id = snap.id.clone();
        if i < 4 {
            let r = c
                .request("DELETE", &format!("/v1/snapshots/{id}"), None)
                .expect("delete");
            assert_eq!(r.status, 204, "{}", r.text());
        } else {
            println!("snapshot bytes: {}", snap.bytes);
            snap_id = id;
        }
    }
    let snap_stats = stats(&snap_ms);
    println!("snapshot (100 MB, copy): {}", snap_stats.line_ms());

    let mut one = Vec::new();
    for _ in 0..20 {
        let mut forks = SandboxList { sandboxes: vec![] };
        one.push(timed(|| {
            forks = post(&mut c, &format!("/v1/snapshots/{snap_id}/fork"), None, 201);
        }));
        let fid = forks.sandboxes.first().expect("fork").id.clone();
        let r: ExecResult = post(
            &mut c,
            &format!("/v1/sandboxes/{fid}/exec"),
            Some(r#"{"shell":"stat -c %s /workspace/big"}"#),
            200,
        );
        assert_eq!(r.stdout, "100000000\n", "{r:?}");
        release_all(&mut c, &forks);
    }
    let one = stats(&one);
    println!(
        "fork 1 from the snapshot: {}  -> {} (target p50 <= 30 ms); {:.2}x the create floor",
        one.line_ms(),
        verdict(one.p50 <= 30.0),
        one.p50 / create.p50
    );

    let mut sixteen = Vec::new();
    for _ in 0..5 {
        let mut forks = SandboxList { sandboxes: vec![] };
        sixteen.push(timed(|| {
            forks = post(
                &mut c,
                &format!("/v1/snapshots/{snap_id}/fork"),
                Some(r#"{"count":16}"#),
                201,
            );
        }));
        release_all(&mut c, &forks);
    }
    let sixteen = stats(&sixteen);
    println!(
        "fork 16 at once from the snapshot: {}  -> {} (target p50 <= 200 ms)",
        sixteen.line_ms(),
        verdict(sixteen.p50 <= 200.0)
    );

    let mut live = Vec::new();
    for _ in 0..5 {
        let mut forks = SandboxList { sandboxes: vec![] };
        live.push(timed(|| {
            forks = post(&mut c, &format!("/v1/sandboxes/{parent}/fork"), None, 201);
        }));
        release_all(&mut c, &forks);
    }
    println!(
        "fork 1 straight from the live sandbox (snapshot + fork): {}",
        stats(&live).line_ms()
    );
    c.release(&parent);
    d.stop();
}
