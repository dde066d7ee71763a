//! The data plane survives the daemon: after a hand-over (SIGTERM with `--handover`) or a
//! `kill -9`, the next daemon on the same state directory takes every sandbox back — leased
//! ones to the same token under the same id, with their files and running commands — and a
//! command retried with the same `request_id` is not run twice. `arl node cleanup` removes
//! what a daemon left when no successor comes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Daemon, Options, Runtime, alive};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

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

async fn exec_as(d: &Daemon, token: &str, id: &str, body: Value) -> (StatusCode, Value) {
    d.call_as(
        Some(token),
        Method::POST,
        &format!("/v1/sandboxes/{id}/exec"),
        Some(body),
    )
    .await
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
        let (status, body) = exec_as(d, ALICE, id, json!({"cmd": ["test", "-e", path]})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["exit_code"] == 0 {
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
    d.wait_pool("default", 30, |s| s["idle"] == 2).await;
    let acquire = json!({
        "pool": "default",
        "env": {"EPISODE": "7"},
        "labels": {"run": "r1"},
        "request_id": "acquire-1",
    });
    let (status, body) = d
        .call_as(
            Some(ALICE),
            Method::POST,
            "/v1/sandboxes",
            Some(acquire.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["sandboxes"][0]["id"].as_str().expect("id").to_string();
    let (status, _) = exec_as(
        &d,
        ALICE,
        &id,
        json!({"shell": "echo kept > /workspace/state"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    d.wait_pool("default", 30, |s| s["idle"] == 2 && s["starting"] == 0)
        .await;
    let pids = agent_pids(&d, rt);
    assert_eq!(pids.len(), 3);

    // A long command with a request id, under way while the daemon goes.
    let long = json!({
        "shell": "echo run >> /workspace/runs; sleep 1.5; echo done",
        "request_id": "long-1",
    });
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
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("done"));
    } else {
        d.kill9();
        assert!(first.await.expect("client").is_err(), "the answer is lost");
    }
    assert!(
        pids.iter().all(|&p| alive(p)),
        "sandboxes outlive the daemon"
    );

    d.spawn().await;
    d.wait_pool("default", 30, |s| s["idle"] == 2 && s["starting"] == 0)
        .await;
    let status = d.pool_status("default").await;
    assert_eq!(
        (status["allocated"].clone(), status["total"].clone()),
        (json!(1), json!(3)),
        "{status}"
    );
    assert!(pids.iter().all(|&p| alive(p)), "every sandbox taken back");
    assert_eq!(agent_pids(&d, rt).len(), 3, "no duplicates");

    // Same id, same owner, same files, same late-bound env and labels.
    let (status, body) = exec_as(
        &d,
        ALICE,
        &id,
        json!({"shell": "cat /workspace/state; echo $EPISODE"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdout"], "kept\n7\n");
    let (status, body) = d
        .call_as(
            Some(ALICE),
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["labels"]["run"], "r1");
    let (status, _) = exec_as(&d, BOB, &id, json!({"cmd": ["true"]})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The acquire retried with its request id gets the same sandbox, not a second one.
    let (status, body) = d
        .call_as(Some(ALICE), Method::POST, "/v1/sandboxes", Some(acquire))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["sandboxes"][0]["id"], id.as_str(), "{body}");
    assert_eq!(d.pool_status("default").await["allocated"], 1);

    // The retried command gets the first run's result; it ran once.
    let (status, body) = exec_as(&d, ALICE, &id, long).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdout"], "done\n");
    let (_, body) = exec_as(&d, ALICE, &id, json!({"shell": "wc -l < /workspace/runs"})).await;
    assert_eq!(body["stdout"], "1\n", "the command ran twice");

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
    d.wait_pool("default", 30, |s| s["idle"] == SANDBOXES).await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"pool": "default", "count": SANDBOXES})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ids: Vec<String> = body["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    let (progress_tx, mut progress) = tokio::sync::mpsc::channel::<()>(CLIENTS * ROUNDS);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut client = Daemon::attach(d.port);
            client.token = Some(ALICE.into());
            let id = ids[c % SANDBOXES].clone();
            let progress = progress_tx.clone();
            tokio::spawn(async move {
                for n in 0..ROUNDS {
                    let body = json!({
                        "shell": format!("echo {n} >> /workspace/c{c}; echo {n}"),
                        "request_id": format!("c{c}-{n}"),
                    });
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
                                let reply: Value = serde_json::from_slice(&reply).expect("json");
                                assert_eq!(reply["stdout"], format!("{n}\n"));
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
    let status = d.pool_status("default").await;
    assert_eq!(status["allocated"], SANDBOXES, "{status}");
    for c in 0..CLIENTS {
        let id = &ids[c % SANDBOXES];
        let body = d.sh(id, &format!("cat /workspace/c{c}")).await;
        let expected: String = (0..ROUNDS).map(|n| format!("{n}\n")).collect();
        assert_eq!(body["stdout"], expected, "client {c}");
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
