//! The data plane survives the daemon: after a hand-over (SIGTERM with `--handover`) or a
//! `kill -9`, the next daemon on the same state directory takes every sandbox back — leased
//! ones to the same token under the same id, with their files and running commands — and a
//! command retried with the same `request_id` is not run twice. `arl node cleanup` removes
//! what a daemon left when no successor comes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use arl::api::{AcquireRequest, ErrorCode, ExecRequest, ExecResult, SandboxInfo, SandboxList};
use common::{BIN, Daemon, Options, Reply, Runtime, alive, cmd, map, shell};
use hyper::{Method, StatusCode};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

fn options(rt: Runtime, handover: bool) -> Options {
    Options {
        config: Some("[pools.default]\nmin_idle = 2\nmax = 8\n".into()),
        tokens: vec![ALICE.into(), BOB.into()],
        args: if handover {
            vec!["--handover".into()]
        } else {
            Vec::new()
        },
        ..Options::on(rt)
    }
}

async fn exec_as(d: &Daemon, token: &str, id: &str, body: &ExecRequest) -> Reply {
    d.send_as(
        Some(token),
        Method::POST,
        &format!("/v1/sandboxes/{id}/exec"),
        Some(body),
    )
    .await
}

/// One sandbox acquired with `token`: its id.
async fn acquire_as(d: &Daemon, token: &str, req: &AcquireRequest) -> String {
    let list: SandboxList = d
        .send_as(Some(token), Method::POST, "/v1/sandboxes", Some(req))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(list.sandboxes.len(), 1, "{list:?}");
    list.sandboxes[0].id.clone()
}

/// `arl node cleanup` on the daemon's state directory; returns its stdout.
fn cleanup(d: &Daemon) -> String {
    let out = Command::new(BIN)
        .args(["node", "cleanup", "--state-dir"])
        .arg(d.state_dir())
        .args(["--cgroup-parent", &d.cgroup_parent])
        .env("ARL_LOG", "warn")
        .output()
        .expect("run arl node cleanup");
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the sandbox's agent has started the command that creates `path`.
async fn wait_for_file(d: &Daemon, id: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r: ExecResult = exec_as(d, ALICE, id, &cmd(&["test", "-e", path]))
            .await
            .expect(StatusCode::OK);
        if r.exit_code == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agents' pids of every sandbox the daemon has.
fn agent_pids(d: &Daemon, rt: Runtime) -> Vec<i32> {
    let dir = match rt {
        Runtime::Process => "sandboxes",
        Runtime::Containerd => "containerd",
    };
    std::fs::read_dir(d.state_dir().join(dir))
        .expect("sandbox dirs")
        .flatten()
        .map(|e| d.agent_pid(&e.file_name().to_string_lossy()))
        .collect()
}

/// One restart, after a hand-over or a kill: the lease, its files and its running command
/// survive; only its owner reaches it; the pool is whole again without duplicates.
async fn restart_keeps_leases(rt: Runtime, handover: bool) {
    let mut d = Daemon::start(options(rt, handover)).await;
    d.wait_status("default", 30, |s| s.idle == 2).await;
    let acquire = AcquireRequest {
        env: map(&[("EPISODE", "7")]),
        labels: map(&[("run", "r1")]),
        request_id: Some("acquire-1".into()),
        ..common::acquire("default")
    };
    let id = acquire_as(&d, ALICE, &acquire).await;
    let reply = exec_as(&d, ALICE, &id, &shell("echo kept > /workspace/state")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply}");
    d.wait_status("default", 30, |s| s.idle == 2 && s.starting == 0)
        .await;
    let pids = agent_pids(&d, rt);
    assert_eq!(pids.len(), 3);

    // A long command with a request id, under way while the daemon goes.
    let long = ExecRequest {
        request_id: Some("long-1".into()),
        ..shell("echo run >> /workspace/runs; sleep 1.5; echo done")
    };
    let first = {
        let mut client = Daemon::attach(d.port);
        client.token = Some(ALICE.into());
        let path = format!("/v1/sandboxes/{id}/exec");
        let body = long.clone();
        tokio::spawn(async move {
            let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("json"));
            client
                .request_raw(Method::POST, &path, Some(body), Some(ALICE))
                .await
        })
    };
    wait_for_file(&d, &id, "/workspace/runs").await;
    if handover {
        // The running exec finishes before the daemon exits, leaving every sandbox.
        assert_eq!(d.terminate(), Some(0), "{}", d.log());
        let (status, body) = first.await.expect("client").expect("answered before exit");
        let r: ExecResult = Reply { status, body }.expect(StatusCode::OK);
        assert_eq!(r.stdout, "done\n", "{r:?}");
    } else {
        d.kill9();
        assert!(first.await.expect("client").is_err(), "the answer is lost");
    }
    assert!(
        pids.iter().all(|&p| alive(p)),
        "sandboxes outlive the daemon"
    );

    d.spawn().await;
    d.wait_status("default", 30, |s| s.idle == 2 && s.starting == 0)
        .await;
    let status = d.status("default").await;
    assert_eq!((status.allocated, status.total), (1, 3), "{status:?}");
    assert!(pids.iter().all(|&p| alive(p)), "every sandbox taken back");
    assert_eq!(agent_pids(&d, rt).len(), 3, "no duplicates");

    // Same id, same owner, same files, same late-bound env and labels.
    let r: ExecResult = exec_as(
        &d,
        ALICE,
        &id,
        &shell("cat /workspace/state; echo $EPISODE"),
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(r.stdout, "kept\n7\n");
    let info: SandboxInfo = d
        .send_as::<()>(
            Some(ALICE),
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            None,
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(info.labels, map(&[("run", "r1")]));
    let err = exec_as(&d, BOB, &id, &cmd(&["true"]))
        .await
        .expect_error(StatusCode::FORBIDDEN);
    assert_eq!(err.code, ErrorCode::Forbidden);

    // The acquire retried with its request id gets the same sandbox, not a second one.
    assert_eq!(acquire_as(&d, ALICE, &acquire).await, id);
    assert_eq!(d.status("default").await.allocated, 1);

    // The retried command gets the first run's result; it ran once.
    let r: ExecResult = exec_as(&d, ALICE, &id, &long).await.expect(StatusCode::OK);
    assert_eq!(r.stdout, "done\n");
    let r: ExecResult = exec_as(&d, ALICE, &id, &shell("wc -l < /workspace/runs"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(r.stdout, "1\n", "the command ran twice");

    let metrics = d.metrics_text().await;
    let runtime = match rt {
        Runtime::Process => "process",
        Runtime::Containerd => "containerd",
    };
    for (state, n) in [("allocated", 1), ("idle", 2)] {
        let line =
            format!(r#"arl_sandboxes_adopted_total{{runtime="{runtime}",state="{state}"}} {n}"#);
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // A plain stop now destroys everything, adopted or not.
    if !handover {
        assert_eq!(d.terminate(), Some(0));
        assert!(pids.iter().all(|&p| !alive(p)));
        assert_eq!(d.leftovers(), Vec::<String>::new());
        return;
    }
    // Handed over again, with no successor: `arl node cleanup` removes it all.
    assert_eq!(d.terminate(), Some(0));
    assert!(pids.iter().all(|&p| alive(p)));
    assert_eq!(cleanup(&d).trim(), "removed 3 sandboxes");
    assert!(pids.iter().all(|&p| !alive(p)));
    assert_eq!(d.leftovers(), Vec::<String>::new());
    let records = std::fs::read_dir(d.state_dir().join("records"))
        .map(|dir| dir.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0);
    assert_eq!(records, 0, "records left");
}

async fn sigterm_hand_over_keeps_every_sandbox(rt: Runtime) {
    restart_keeps_leases(rt, true).await;
}

async fn kill9_then_restart_takes_every_sandbox_back(rt: Runtime) {
    restart_keeps_leases(rt, false).await;
}

/// 64 clients keep executing (each command appends a line to its own file, with a request
/// id, retried on infrastructure errors) while the daemon hands over to a successor: every
/// command runs exactly once and no sandbox is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_64_clients_loses_nothing_and_runs_nothing_twice() {
    const SANDBOXES: usize = 8;
    const CLIENTS: usize = 64;
    const ROUNDS: usize = 12;
    let mut d = Daemon::start(Options {
        config: Some(format!(
            "[pools.default]\nmin_idle = {SANDBOXES}\nmax = {SANDBOXES}\n"
        )),
        tokens: vec![ALICE.into()],
        args: vec!["--handover".into()],
        ..Options::default()
    })
    .await;
    d.wait_status("default", 30, |s| s.idle == SANDBOXES).await;
    let ids: Vec<String> = d
        .acquire_with(&AcquireRequest {
            count: Some(SANDBOXES),
            ..common::acquire("default")
        })
        .await
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids.len(), SANDBOXES);
    let (progress_tx, mut progress) = tokio::sync::mpsc::channel::<()>(CLIENTS * ROUNDS);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut client = Daemon::attach(d.port);
            client.token = Some(ALICE.into());
            let id = ids[c % SANDBOXES].clone();
            let progress = progress_tx.clone();
            tokio::spawn(async move {
                for n in 0..ROUNDS {
                    let body = ExecRequest {
                        request_id: Some(format!("c{c}-{n}")),
                        ..shell(&format!("echo {n} >> /workspace/c{c}; echo {n}"))
                    };
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let sent = client
                            .request_raw(
                                Method::POST,
                                &format!("/v1/sandboxes/{id}/exec"),
                                Some(bytes::Bytes::from(serde_json::to_vec(&body).expect("json"))),
                                Some(ALICE),
                            )
                            .await;
                        match sent {
                            Ok((StatusCode::OK, reply)) => {
                                let reply: ExecResult =
                                    serde_json::from_slice(&reply).expect("an exec result");
                                assert_eq!(reply.stdout, format!("{n}\n"));
                                break;
                            }
                            // Draining (503), or no daemon listening: retry the same id.
                            Ok((StatusCode::SERVICE_UNAVAILABLE, _)) | Err(_) => {}
                            Ok((status, reply)) => panic!(
                                "client {c} round {n}: {status} {}",
                                String::from_utf8_lossy(&reply)
                            ),
                        }
                        assert!(Instant::now() < deadline, "client {c} stuck at round {n}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let _ = progress.send(()).await;
                }
            })
        })
        .collect();
    drop(progress_tx);
    // Restart once the clients are well under way.
    for _ in 0..CLIENTS * 2 {
        progress.recv().await.expect("progress");
    }
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    d.spawn().await;
    for client in clients {
        client.await.expect("client");
    }
    let status = d.status("default").await;
    assert_eq!(status.allocated, SANDBOXES, "{status:?}");
    for c in 0..CLIENTS {
        let id = &ids[c % SANDBOXES];
        let r = d.shell(id, &format!("cat /workspace/c{c}")).await;
        let expected: String = (0..ROUNDS).map(|n| format!("{n}\n")).collect();
        assert_eq!(r.stdout, expected, "client {c}");
    }
    // Handed over: clean up what is left.
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(cleanup(&d).trim(), format!("removed {SANDBOXES} sandboxes"));
    assert_eq!(d.leftovers(), Vec::<String>::new());
}

crate::on_every_runtime!(
    sigterm_hand_over_keeps_every_sandbox,
    kill9_then_restart_takes_every_sandbox_back,
);
