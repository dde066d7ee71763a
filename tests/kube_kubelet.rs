//! The real `arl node --kubernetes` against the test kubelet (`tests/kubelet/`): sandbox pods
//! are created through the API, their agents run as process sandboxes with their sockets in
//! the pods' emptyDirs, and acquire → exec → files → release run end to end over the
//! kubernetes runtime, with no API request on the hot path. A pod that dies or is deleted by
//! someone else is replaced. A SIGTERM hands every pod to the next daemon, leases and all; a
//! cordoned node lends nothing new and replaces nothing, while its leases run on. Over the TCP
//! transport (pods reached at their IPs with a token each) the same path runs end to end,
//! and a successor takes the pods back with their tokens.

mod common;
mod kubelet;

// ARL's API is read through the typed `arl::api` models; the pods and Secrets the test
// kubelet stores are Kubernetes' JSON, checked field by field as the API server holds them.
use arl::api::ErrorCode;
use common::{BIN, Daemon, Options, acquire, cmd};
use hyper::{Method, StatusCode};
use kubelet::TestKubelet;
use serde_json::json;

const POOL: &str = "[pools.pods]\nruntime = \"kubernetes\"\nimage = \"registry.example/task:1\"\nmin_idle = 2\nmax = 8\nreuse = \"reset\"\n";

/// The same pool held at its two pods: refilling never creates one in the background, so
/// whatever reaches the API server while a test runs came from the requests it made.
const FULL_POOL: &str = "[pools.pods]\nruntime = \"kubernetes\"\nimage = \"registry.example/task:1\"\nmin_idle = 2\nmax = 2\nreuse = \"reset\"\n";

async fn start() -> (kubelet::Running, Daemon) {
    start_with(POOL).await
}

async fn start_with(pool: &str) -> (kubelet::Running, Daemon) {
    let kubelet = TestKubelet::start(BIN).await;
    let daemon = Daemon::start(Options {
        config: Some(pool.into()),
        args: kubelet::node_args(&kubelet),
        ..Options::default()
    })
    .await;
    daemon.wait_status("pods", 60, |s| s.idle == 2).await;
    (kubelet, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_exec_files_release_through_pods_without_touching_the_api() {
    // An acquire of one of two idle pods would otherwise have the refill create a third,
    // racing the check below.
    let (kubelet, daemon) = start_with(FULL_POOL).await;
    // The pods the daemon made: pinned to the node, the agent injected, hardened.
    let pods = kubelet.running_pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    let pod = kubelet.pod(&pods[0]).expect("pod");
    assert_eq!(pod["spec"]["nodeName"], kubelet::NODE);
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(
        pod["spec"]["initContainers"][0]["command"][1],
        "install-agent"
    );
    assert_eq!(
        pod["metadata"]["labels"]["arl.infra.io/node"],
        kubelet::NODE
    );

    kubelet.wait_watching(30).await;
    let before = kubelet.requests();
    let id = daemon.acquire("pods").await;
    let out = daemon
        .run(&id, &cmd(&["sh", "-c", "echo hello from $$"]))
        .await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(out.stdout.starts_with("hello from "), "{out:?}");
    assert_eq!(
        daemon.put_file(&id, "notes/a.txt", b"pod data").await,
        StatusCode::OK
    );
    let (status, body) = daemon
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=notes/a.txt"),
            None,
            None,
        )
        .await
        .expect("get file");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"pod data"[..]));
    let out = daemon
        .run(&id, &cmd(&["cat", "/workspace/notes/a.txt"]))
        .await;
    assert_eq!(out.stdout, "pod data", "{out:?}");
    // Reuse `reset`: the release puts the pod back; nothing on the way asked the API server.
    assert_eq!(daemon.release(&id).await, StatusCode::NO_CONTENT);
    daemon.wait_status("pods", 30, |s| s.idle == 2).await;
    let during: Vec<_> = kubelet.seen().into_iter().skip(before).collect();
    assert!(
        during.is_empty(),
        "acquire, exec, files and release sent API requests: {during:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_deleted_pod_is_replaced_and_its_holder_told() {
    let (kubelet, daemon) = start().await;
    let id = daemon.acquire("pods").await;
    let held = format!("arl-{id}");
    let idle: Vec<String> = kubelet
        .running_pods()
        .into_iter()
        .filter(|p| *p != held)
        .collect();
    assert_eq!(idle.len(), 1, "one idle pod left: {idle:?}");
    daemon.wait_status("pods", 30, |s| s.idle == 2).await;

    // The held pod's agent dies: its holder hears why, and the pod is deleted.
    kubelet.kill_agent(&held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let err = loop {
        let reply = daemon
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(&cmd(&["true"])),
            )
            .await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply.error();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the death went unseen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("killed"), "{err:?}");
    kubelet
        .until("the dead pod deleted", 30, |k| k.pod(&held).is_none())
        .await;

    // An idle pod deleted by someone else: replaced, and the pool is whole again.
    kubelet.delete_pod(&idle[0]);
    kubelet
        .until("a replacement pod", 60, |k| {
            let running = k.running_pods();
            running.len() >= 2 && !running.contains(&idle[0])
        })
        .await;
    daemon.wait_status("pods", 60, |s| s.idle == 2).await;
    let metrics = daemon.metrics_text().await;
    assert!(
        metrics.contains("arl_sandbox_failures_total{pool=\"pods\",reason=\"deleted\"} 1"),
        "{metrics}"
    );
}

/// Pod creations the API server has seen.
fn creations(kubelet: &TestKubelet) -> usize {
    kubelet
        .seen()
        .iter()
        .filter(|s| s.method == Method::POST && s.path.ends_with("/pods"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_hands_the_pods_over_and_the_successor_keeps_their_leases() {
    let (kubelet, mut daemon) = start().await;
    let id = daemon.acquire("pods").await;
    assert_eq!(
        daemon.put_file(&id, "kept.txt", b"still here").await,
        StatusCode::OK
    );
    daemon.wait_status("pods", 30, |s| s.idle == 2).await;
    let pods = kubelet.running_pods();
    assert_eq!(pods.len(), 3, "{pods:?}");

    // A rolling upgrade: SIGTERM leaves every pod running; the next daemon takes them back.
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log());
    assert_eq!(kubelet.running_pods(), pods, "pods were touched on SIGTERM");
    let made = creations(&kubelet);
    daemon.spawn().await;
    daemon
        .wait_status("pods", 30, |s| s.idle == 2 && s.allocated == 1)
        .await;
    let out = daemon.run(&id, &cmd(&["cat", "/workspace/kept.txt"])).await;
    assert_eq!(out.stdout, "still here", "{out:?}");
    assert_eq!(kubelet.running_pods(), pods, "the successor replaced pods");
    assert_eq!(creations(&kubelet), made, "the successor created pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_refuses_new_leases_and_replaces_no_evicted_pod_but_leases_run_on() {
    let (kubelet, daemon) = start().await;
    let id = daemon.acquire("pods").await;
    daemon.wait_status("pods", 30, |s| s.idle == 2).await;
    let made = creations(&kubelet);

    kubelet.set_unschedulable(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let ready = loop {
        let reply = daemon.send_empty(Method::GET, "/readyz").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply.error();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed {reply}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(ready.code, ErrorCode::Draining, "{ready:?}");
    let refused = daemon
        .send(Method::POST, "/v1/sandboxes", Some(&acquire("pods")))
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.retryable, "{refused:?}");
    // `kubectl drain` evicts the idle pods: none is replaced; the lease runs on.
    let held = format!("arl-{id}");
    for pod in kubelet.running_pods() {
        if pod != held {
            kubelet.delete_pod(&pod);
        }
    }
    daemon.wait_status("pods", 30, |s| s.idle == 0).await;
    let out = daemon.run(&id, &cmd(&["true"])).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(creations(&kubelet), made, "a cordoned node created pods");
    assert_eq!(kubelet.running_pods(), vec![held]);

    // Uncordoned: warm and ready again.
    kubelet.set_unschedulable(false);
    daemon.wait_status("pods", 60, |s| s.idle == 2).await;
    let ready = daemon.send_empty(Method::GET, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_pods_are_reached_at_their_ips_with_their_tokens_end_to_end() {
    let kubelet = TestKubelet::start_tcp(BIN).await;
    let mut daemon = Daemon::start(Options {
        config: Some(FULL_POOL.into()),
        args: kubelet::node_args_tcp(&kubelet),
        ..Options::default()
    })
    .await;
    daemon.wait_status("pods", 60, |s| s.idle == 2).await;
    let pods = kubelet.running_pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    let port = kubelet.agent_port.expect("a TCP kubelet");
    // Each pod: an IP of its own, the agent told to listen there, its token in an owned Secret.
    for name in &pods {
        let pod = kubelet.pod(name).expect("pod");
        assert!(
            pod["status"]["podIP"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("127.0.0.")),
            "{pod}"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["arl.infra.io/agent-port"],
            port.to_string()
        );
        let agent = &pod["spec"]["containers"][0];
        assert_eq!(
            agent["command"],
            json!([
                "/.arl/bin/arl",
                "agent",
                "--listen-tcp",
                format!("$(ARL_POD_IP):{port}")
            ])
        );
        let secret = kubelet.secret(name).expect("the pod's Secret");
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["uid"],
            pod["metadata"]["uid"]
        );
        let token = secret["data"]["token"].as_str().expect("token");
        assert!(
            !pod.to_string().contains(token),
            "the token is in the pod spec"
        );
    }

    // The hot path over TCP, and still no API request on it.
    let before = kubelet.requests();
    let id = daemon.acquire("pods").await;
    let out = daemon
        .run(&id, &cmd(&["sh", "-c", "echo hello over tcp; env"]))
        .await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(out.stdout.starts_with("hello over tcp"), "{out:?}");
    assert!(
        !out.stdout.contains("ARL_AGENT_TOKEN"),
        "commands see the token: {out:?}"
    );
    assert_eq!(
        daemon.put_file(&id, "notes/a.txt", b"pod data").await,
        StatusCode::OK
    );
    let (status, body) = daemon
        .request_raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=notes/a.txt"),
            None,
            None,
        )
        .await
        .expect("get file");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"pod data"[..]));
    let during: Vec<_> = kubelet.seen().into_iter().skip(before).collect();
    assert!(
        during.is_empty(),
        "acquire, exec and files sent API requests: {during:?}"
    );

    // A successor takes the pods back, reading each token from its Secret.
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log());
    let made = creations(&kubelet);
    daemon.spawn().await;
    daemon
        .wait_status("pods", 30, |s| s.idle == 1 && s.allocated == 1)
        .await;
    let out = daemon
        .run(&id, &cmd(&["cat", "/workspace/notes/a.txt"]))
        .await;
    assert_eq!(out.stdout, "pod data", "{out:?}");
    assert_eq!(creations(&kubelet), made, "the successor created pods");
    assert_eq!(daemon.release(&id).await, StatusCode::NO_CONTENT);
    daemon.wait_status("pods", 30, |s| s.idle == 2).await;

    // A pod deleted by someone else takes its Secret with it (its owner), and is replaced.
    let gone = kubelet.running_pods()[0].clone();
    kubelet.delete_pod(&gone);
    assert!(kubelet.secret(&gone).is_none());
    kubelet
        .until("a replacement pod", 60, |k| {
            let running = k.running_pods();
            running.len() >= 2 && !running.contains(&gone)
        })
        .await;
    daemon.wait_status("pods", 60, |s| s.idle == 2).await;
    let mut secrets = kubelet.secrets();
    secrets.sort();
    let mut running = kubelet.running_pods();
    running.sort();
    assert_eq!(secrets, running, "one Secret per pod, no more");
}
