//! What the daemon knows of its pods, from one watch on the API server (its node's pods with
//! its owner labels): each pod's uid and state, kept current by the watch, and a signal when
//! anything changes, so creations wait for `Running` and deaths are seen without polling.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use crate::runtime::ExitReason;
use crate::util::MutexExt;

/// A pod's life as far as the sandbox is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not running yet; `problem` says why it cannot start, when the kubelet or the scheduler
    /// said so (image pulls, an unschedulable pod, a bad container config).
    Pending { problem: Option<Problem> },
    /// Its first container (the agent) runs.
    Running,
    /// It ended, with the cause.
    Finished(ExitReason, Option<Problem>),
    /// It was deleted (or is being deleted) by someone.
    Gone,
}

/// Why a pod cannot start or ended: the kubelet's machine-readable reason and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// Waiting reasons after which a container will not start without a change (the kubelet
/// retries image pulls with its own backoff, but the pool should hear of it now).
const STUCK_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// One pod as the daemon tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub state: PodState,
    /// The pod's IP, once it has one.
    pub ip: Option<std::net::IpAddr>,
    /// The port its agent listens on at that IP, for a pod made to be reached over TCP.
    pub agent_port: Option<u16>,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Self {
        Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            state: classify(pod),
            ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            agent_port: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(super::pod::AGENT_PORT_ANNOTATION))
                .and_then(|port| port.parse().ok()),
        }
    }
}

/// The state of a pod from its status.
pub fn classify(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Gone;
    }
    let Some(status) = &pod.status else {
        return PodState::Pending { problem: None };
    };
    let first = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.as_str());
    let agent = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| Some(c.name.as_str()) == first);
    match status.phase.as_deref() {
        Some("Running") => match agent.and_then(|c| c.state.as_ref()) {
            Some(state) if state.terminated.is_some() => finished(status.reason.as_deref(), agent),
            _ => PodState::Running,
        },
        Some("Failed") | Some("Succeeded") => {
            let mut state = finished(status.reason.as_deref(), agent);
            if let PodState::Finished(_, problem) = &mut state
                && problem.is_none()
            {
                *problem = status.reason.as_ref().map(|reason| Problem {
                    reason: reason.clone(),
                    message: status.message.clone().unwrap_or_default(),
                });
            }
            state
        }
        _ => {
            let waiting = status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                .find(|w| {
                    w.reason
                        .as_deref()
                        .is_some_and(|r| STUCK_REASONS.contains(&r))
                });
            let unschedulable = status.conditions.iter().flatten().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            });
            let problem = match (waiting, unschedulable) {
                (Some(w), _) => Some(Problem {
                    reason: w.reason.clone().unwrap_or_default(),
                    message: w.message.clone().unwrap_or_default(),
                }),
                (None, Some(c)) => Some(Problem {
                    reason: "Unschedulable".into(),
                    message: c.message.clone().unwrap_or_default(),
                }),
                (None, None) => None,
            };
            PodState::Pending { problem }
        }
    }
}

fn finished(pod_reason: Option<&str>, agent: Option<&ContainerStatus>) -> PodState {
    if pod_reason == Some("Evicted") {
        return PodState::Finished(ExitReason::Evicted, None);
    }
    let terminated = agent
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let reason = match terminated {
        Some(t) if t.reason.as_deref() == Some("OOMKilled") => ExitReason::OomKilled,
        Some(t) => ExitReason::from_exit_status(u32::try_from(t.exit_code).unwrap_or(0), None),
        None => ExitReason::Unknown,
    };
    PodState::Finished(reason, None)
}

/// The daemon's pods, kept by the watch.
pub struct PodTable {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    /// The first list has arrived.
    synced: bool,
    pods: HashMap<String, PodFacts>,
    /// Pods of a re-list in progress (after a watch expired, 410 Gone): what it lacks is gone.
    relist: Option<HashMap<String, PodFacts>>,
}

impl Default for PodTable {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl PodTable {
    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn get(&self, name: &str) -> Option<PodFacts> {
        self.inner.lock_or_recover().pods.get(name).cloned()
    }

    pub fn is_synced(&self) -> bool {
        self.inner.lock_or_recover().synced
    }

    /// Names of every pod the table holds that is not gone.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .lock_or_recover()
            .pods
            .iter()
            .filter(|(_, f)| f.state != PodState::Gone)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Forgets a pod the daemon has deleted.
    pub fn forget(&self, name: &str) {
        self.inner.lock_or_recover().pods.remove(name);
    }

    /// Applies one event of the watch.
    pub fn apply(&self, event: Event<Pod>) {
        {
            let mut inner = self.inner.lock_or_recover();
            match event {
                Event::Init => inner.relist = Some(HashMap::new()),
                Event::InitApply(pod) => {
                    let facts = PodFacts::of(&pod);
                    if let Some(relist) = inner.relist.as_mut() {
                        relist.insert(pod.name_any(), facts);
                    }
                }
                Event::InitDone => {
                    let listed = inner.relist.take().unwrap_or_default();
                    let Inner { pods, .. } = &mut *inner;
                    for (name, facts) in pods.iter_mut() {
                        if !listed.contains_key(name) {
                            facts.state = PodState::Gone;
                        }
                    }
                    pods.extend(listed);
                    inner.synced = true;
                }
                Event::Apply(pod) => {
                    inner.pods.insert(pod.name_any(), PodFacts::of(&pod));
                }
                Event::Delete(pod) => {
                    let name = pod.name_any();
                    if let Some(facts) = inner.pods.get_mut(&name) {
                        facts.state = PodState::Gone;
                    }
                }
            }
        }
        self.bump();
    }

    /// Notes a pod the daemon just created (before the watch reports it).
    pub fn created(&self, name: &str, pod: &Pod) {
        self.inner
            .lock_or_recover()
            .pods
            .entry(name.to_string())
            .or_insert_with(|| PodFacts::of(pod));
        self.bump();
    }

    /// Waits until `test` says something about pod `name`'s facts (or its absence).
    pub async fn wait_for<T>(
        &self,
        name: &str,
        test: impl Fn(Option<&PodFacts>) -> Option<T>,
    ) -> T {
        let mut rx = self.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(found) = test(self.inner.lock_or_recover().pods.get(name)) {
                return found;
            }
            if rx.changed().await.is_err() {
                // The table outlives every waiter; a closed channel cannot happen, but if it
                // did, waiting forever is the honest answer.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits for the first full list.
    pub async fn wait_synced(&self) {
        let mut rx = self.subscribe();
        loop {
            rx.borrow_and_update();
            if self.is_synced() {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Keeps `table` current from a watch of the pods `api` and `selector` name (restarting with
/// backoff on errors; an expired watch re-lists).
pub async fn run_watch(api: Api<Pod>, config: watcher::Config, table: std::sync::Arc<PodTable>) {
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => table.apply(event),
            Err(e) => tracing::warn!(error = %e, "watching sandbox pods failed; retrying"),
        }
    }
}
