//! Issue 15 (idle auto-pause, snapshot and fork), process runtime, release build.
//!
//! * pause and resume of a leased sandbox, through the API (target: each <= 5 ms), against
//!   the same-run floor of `GET /v1/sandboxes/{id}` (an API round trip that does nothing);
//! * the first exec to an auto-paused sandbox against an exec to a running one (target: at
//!   most 2 ms more);
//! * a sandbox with a 100 MB writable layer: snapshot, fork one from the snapshot (target:
//!   p50 <= 30 ms), 16 forks in one request (target: <= 200 ms), fork straight from the live
//!   sandbox (snapshot + fork), against the same-run floors of creating a fresh sandbox (an
//!   acquire that misses the warm pool) and of copying a 100 MB file from a tmpfs (to the
//!   state directory's filesystem, to a plain tmpfs, to a tmpfs with huge pages). Two daemons,
//!   one per snapshot store (`--snapshot-store disk`, the default, and `memory`), measured in
//!   alternating rounds (and a third with another build, `ARL_BENCH_BEFORE_BIN`, if given);
//!   the split of a snapshot (freeze, copy, thaw) comes from each daemon's debug log
//!   (`ARL_BENCH_LOG=warn,arl::node=debug`).

#[path = "common.rs"]
mod common;

use std::fs::File;
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
    drop(c);
    d.stop();
    copy_floors();

    // Both stores at once, measured in alternating rounds so that the machine's load falls on
    // both alike.
    let mut stores: Vec<Store> = ["memory", "disk"]
        .into_iter()
        .map(|store| Store::start(store, arl_binary(), &["--snapshot-store", store]))
        .collect();
    // A build to compare with (`ARL_BENCH_BEFORE_BIN`), its snapshots where it keeps them.
    if let Some(before) = std::env::var_os("ARL_BENCH_BEFORE_BIN") {
        stores.push(Store::start(
            "before (ARL_BENCH_BEFORE_BIN)",
            before.into(),
            &[],
        ));
    }
    for s in &mut stores {
        s.snapshots();
    }
    for _ in 0..4 {
        for s in &mut stores {
            s.fork_one(5);
        }
    }
    for _ in 0..5 {
        for s in &mut stores {
            s.fork_sixteen();
        }
    }
    for _ in 0..5 {
        for s in &mut stores {
            s.live(4);
        }
    }
    for s in &mut stores {
        s.live_sixteen(3);
    }
    for s in &mut stores {
        s.report(&create);
    }
    for s in stores {
        s.stop();
    }
}

/// The same-run floor of a snapshot's copy: a 100 MB file on a tmpfs copied (`sendfile`,
/// the destination sized first) to the state directory's filesystem, to another plain tmpfs
/// and to a tmpfs with `huge=within_size` (the memory store).
fn copy_floors() {
    let dir = temp_dir("copy");
    let mounts = ["src", "plain", "huge"].map(|m| dir.join(m));
    for (m, opts) in mounts
        .iter()
        .zip(["size=256m", "size=256m", "size=256m,huge=within_size"])
    {
        std::fs::create_dir(m).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(m)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount tmpfs on {}", m.display());
    }
    let src = mounts[0].join("big");
    let mut f = File::create(&src).expect("create");
    let mut rng = File::open("/dev/urandom").expect("urandom");
    std::io::copy(&mut std::io::Read::take(&mut rng, 100_000_000), &mut f).expect("fill");
    drop(f);
    let disk = dir.join("disk");
    std::fs::create_dir(&disk).expect("mkdir");
    let targets = [
        ("the state directory's filesystem", disk.as_path()),
        ("a plain tmpfs", mounts[1].as_path()),
        ("a tmpfs with huge pages", mounts[2].as_path()),
    ];
    let mut samples = vec![Vec::new(); targets.len()];
    for _ in 0..10 {
        for (i, (_, to)) in targets.iter().enumerate() {
            let out = to.join("copy");
            samples[i].push(timed(|| {
                let mut from = File::open(&src).expect("open");
                let mut to = File::create_new(&out).expect("create");
                to.set_len(100_000_000).expect("size");
                std::io::copy(&mut from, &mut to).expect("copy");
            }));
            std::fs::remove_file(&out).expect("remove");
        }
    }
    for ((what, _), samples) in targets.iter().zip(&samples) {
        println!(
            "floor: copy 100 MB from a tmpfs to {what}: {}",
            stats(samples).line_ms()
        );
    }
    unmount_under(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon keeping its snapshots in one store, with a leased sandbox holding 100 MB.
struct Store {
    name: &'static str,
    d: Daemon,
    c: Client,
    parent: String,
    snap_id: String,
    snapshot: Vec<f64>,
    one: Vec<f64>,
    sixteen: Vec<f64>,
    live: Vec<f64>,
    live_sixteen: Vec<f64>,
}

impl Store {
    fn start(name: &'static str, bin: std::path::PathBuf, args: &[&str]) -> Store {
        let config = "[pools.default]\nmin_idle = 1\nmax = 40\ndisk_mb = 512\nmemory_mb = 256\n";
        let d = Daemon::start_bin(bin, config, args);
        let mut c = d.client();
        c.wait_idle("default", 1, Duration::from_secs(60));
        let parent = c.acquire("default");
        post::<ExecResult>(
            &mut c,
            &format!("/v1/sandboxes/{parent}/exec"),
            Some(r#"{"shell":"head -c 100000000 /dev/urandom > /workspace/big && sync"}"#),
            200,
        );
        Store {
            name,
            d,
            c,
            parent,
            snap_id: String::new(),
            snapshot: Vec::new(),
            one: Vec::new(),
            sixteen: Vec::new(),
            live: Vec::new(),
            live_sixteen: Vec::new(),
        }
    }

    fn snapshots(&mut self) {
        let c = &mut self.c;
        for i in 0..5 {
            let mut snap: Option<SnapshotInfo> = None;
            self.snapshot.push(timed(|| {
                snap = Some(post(
                    c,
                    &format!("/v1/sandboxes/{}/snapshots", self.parent),
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
                assert_eq!(snap.bytes, 100_000_000, "{snap:?}");
                self.snap_id = id;
            }
        }
    }

    fn fork_one(&mut self, n: usize) {
        for _ in 0..n {
            let mut forks = SandboxList { sandboxes: vec![] };
            let c = &mut self.c;
            self.one.push(timed(|| {
                forks = post(
                    c,
                    &format!("/v1/snapshots/{}/fork", self.snap_id),
                    None,
                    201,
                );
            }));
            check_fork(c, &forks);
            release_all(c, &forks);
        }
    }

    fn fork_sixteen(&mut self) {
        let mut forks = SandboxList { sandboxes: vec![] };
        let c = &mut self.c;
        self.sixteen.push(timed(|| {
            forks = post(
                c,
                &format!("/v1/snapshots/{}/fork", self.snap_id),
                Some(r#"{"count":16}"#),
                201,
            );
        }));
        release_all(c, &forks);
    }

    fn live(&mut self, n: usize) {
        for _ in 0..n {
            let mut forks = SandboxList { sandboxes: vec![] };
            let c = &mut self.c;
            self.live.push(timed(|| {
                forks = post(c, &format!("/v1/sandboxes/{}/fork", self.parent), None, 201);
            }));
            check_fork(c, &forks);
            release_all(c, &forks);
        }
    }

    fn live_sixteen(&mut self, n: usize) {
        for _ in 0..n {
            let mut forks = SandboxList { sandboxes: vec![] };
            let c = &mut self.c;
            self.live_sixteen.push(timed(|| {
                forks = post(
                    c,
                    &format!("/v1/sandboxes/{}/fork", self.parent),
                    Some(r#"{"count":16}"#),
                    201,
                );
            }));
            release_all(c, &forks);
        }
    }

    fn report(&self, create: &Stats) {
        println!("--- snapshot store: {} ---", self.name);
        println!(
            "snapshot (100 MB, copy): {}",
            stats(&self.snapshot).line_ms()
        );
        let one = stats(&self.one);
        println!(
            "fork 1 from the snapshot: {}  -> {} (target p50 <= 30 ms); {:.2}x the create floor",
            one.line_ms(),
            verdict(one.p50 <= 30.0),
            one.p50 / create.p50
        );
        let sixteen = stats(&self.sixteen);
        println!(
            "fork 16 at once from the snapshot: {}  -> {} (target p50 <= 200 ms)",
            sixteen.line_ms(),
            verdict(sixteen.p50 <= 200.0)
        );
        let live = stats(&self.live);
        println!(
            "fork 1 straight from the live sandbox (snapshot + fork): {}  -> {} (target p50 <= 30 ms)",
            live.line_ms(),
            verdict(live.p50 <= 30.0)
        );
        println!(
            "fork 16 at once straight from the live sandbox: {}",
            stats(&self.live_sixteen).line_ms()
        );
        let log = std::fs::read_to_string(self.d.dir.join("node.log")).unwrap_or_default();
        for (line, fields) in [
            ("snapshot copied", &["freeze_ms", "copy_ms", "thaw_ms"][..]),
            ("forked a live sandbox", &["snapshot_ms", "fork_ms"][..]),
        ] {
            let split: Vec<String> = fields
                .iter()
                .filter_map(|f| {
                    let v = log_values(&log, line, f);
                    (!v.is_empty()).then(|| format!("{f} p50 {:.2}", stats(&v).p50))
                })
                .collect();
            if !split.is_empty() {
                println!(
                    "  {line} (daemon log, n = {}): {}",
                    log_values(&log, line, fields[0]).len(),
                    split.join(", ")
                );
            }
        }
    }

    fn stop(mut self) {
        let parent = self.parent.clone();
        self.c.release(&parent);
        self.d.stop();
    }
}

/// The fork has the parent's 100 MB file.
fn check_fork(c: &mut Client, forks: &SandboxList) {
    let fid = &forks.sandboxes.first().expect("fork").id;
    let r: ExecResult = post(
        c,
        &format!("/v1/sandboxes/{fid}/exec"),
        Some(r#"{"shell":"stat -c %s /workspace/big"}"#),
        200,
    );
    assert_eq!(r.stdout, "100000000\n", "{r:?}");
}

/// The values of `field=` on the log lines that say `message` (the daemon's debug log, when
/// `ARL_BENCH_LOG` turns it on).
fn log_values(log: &str, message: &str, field: &str) -> Vec<f64> {
    let key = format!("{field}=");
    log.lines()
        .map(strip_ansi)
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            l[at..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The line without its colours (the daemon's log is coloured).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
