//! `Task` objects whose Sandbox this node serves → their steps run, their results written.
//!
//! Tasks carry no node: a field selector cannot pick this node's, so the daemon watches the
//! namespace's Tasks and keeps those whose `sandboxRef` names a Sandbox it holds (a Task of a
//! Sandbox that is still being acquired waits for it). Steps run in order through the same
//! agent calls as the node API (exec; a batch file write for `FilePatch`), in-process. Status
//! writes are bounded: `Running` once, one write per finished step, the end once; each step's
//! stdout and stderr keep their last [`crate::crd::MAX_STEP_OUTPUT`] characters (`truncated` says so). A
//! finished Task is deleted `ttlSecondsAfterFinished` after its completion.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper::Method;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use super::sandboxes::{ObjectError, ReadySandbox, SandboxSync, not_found};
use crate::api::files::FileContent;
use crate::api::{ApiError, ErrorBody, ExecRequest, ExecResult, WriteFilesRequest};
use crate::crd::{StepResult, StepType, Task, TaskState, TaskStep, bound_output};
use crate::http;
use crate::node::agent_client::agent_request;
use crate::node::sandbox::Sandbox;
use crate::util::MutexExt;

/// A step's timeout when neither the step nor the Task sets one (seconds).
pub const DEFAULT_STEP_TIMEOUT: u64 = 600;
/// The longest step timeout honoured (seconds).
pub const MAX_STEP_TIMEOUT: u64 = 24 * 3600;
/// Output the agent captures per stream for a step, before the status keeps its tail.
const STEP_CAPTURE_BYTES: usize = 64 << 10;

pub struct TaskSync {
    sandboxes: Arc<SandboxSync>,
    api: Api<Task>,
    /// Pending Tasks not started yet, by name (their Sandbox is not ready here, or not here).
    waiting: Mutex<HashMap<String, Task>>,
    /// Uids of the Tasks this daemon runs or ran.
    claimed: Mutex<HashSet<String>>,
    /// Tasks running now, by Sandbox name.
    running: Mutex<HashMap<String, usize>>,
    /// Uids whose deletion after their TTL is scheduled.
    expiring: Mutex<HashSet<String>>,
    /// Status writes so far.
    pub writes: AtomicU64,
}

fn now() -> String {
    Timestamp::now().to_string()
}

impl TaskSync {
    pub fn new(sandboxes: Arc<SandboxSync>, api: Api<Task>) -> Arc<Self> {
        Arc::new(Self {
            sandboxes,
            api,
            waiting: Mutex::new(HashMap::new()),
            claimed: Mutex::new(HashSet::new()),
            running: Mutex::new(HashMap::new()),
            expiring: Mutex::new(HashSet::new()),
            writes: AtomicU64::new(0),
        })
    }

    /// Watches the namespace's Tasks until the node shuts down.
    pub async fn run(self: Arc<Self>) {
        let mut stream = watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut ready = self.sandboxes.ready.subscribe();
        let shutdown = self.sandboxes.mgr.shutdown.clone();
        loop {
            let event = tokio::select! {
                // Shutdown first: a ready event must not be served after it.
                biased;
                () = shutdown.cancelled() => break,
                changed = ready.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.retry_waiting();
                    continue;
                }
                event = stream.next() => event,
            };
            let Some(event) = event else { break };
            match event {
                Ok(Event::Init | Event::InitDone) => {}
                Ok(Event::InitApply(task) | Event::Apply(task)) => self.apply(task),
                Ok(Event::Delete(task)) => {
                    self.waiting.lock_or_recover().remove(&task.name_any());
                }
                Err(e) => tracing::warn!(error = %e, "watching Tasks failed; retrying"),
            }
        }
    }

    fn retry_waiting(self: &Arc<Self>) {
        let tasks: Vec<Task> = self.waiting.lock_or_recover().values().cloned().collect();
        for task in tasks {
            self.apply(task);
        }
    }

    /// Handles one observed state of a Task.
    pub fn apply(self: &Arc<Self>, task: Task) {
        let name = task.name_any();
        let uid = task.uid().unwrap_or_default();
        if task.meta().deletion_timestamp.is_some() {
            self.waiting.lock_or_recover().remove(&name);
            return;
        }
        let status = task.status.clone().unwrap_or_default();
        let sandbox_ref = task.spec.sandbox_ref.clone();
        let span = tracing::info_span!("task_object", task = %name, sandbox = %sandbox_ref);
        match status.state {
            TaskState::Succeeded | TaskState::Failed => {
                self.waiting.lock_or_recover().remove(&name);
                let ours = self.claimed.lock_or_recover().contains(&uid)
                    || self.sandboxes.serves(&sandbox_ref);
                if ours {
                    self.expire_later(&task);
                }
            }
            TaskState::Running => {
                if !self.sandboxes.serves(&sandbox_ref) {
                    // Another node's, or a Sandbox this daemon has not adopted yet.
                    self.waiting.lock_or_recover().insert(name, task);
                    return;
                }
                self.waiting.lock_or_recover().remove(&name);
                // Running but not run by this daemon: its predecessor was cut off mid-Task.
                if self.claimed.lock_or_recover().insert(uid) {
                    let this = self.clone();
                    tokio::spawn(
                        async move {
                            let message = "the node's daemon restarted while the Task ran";
                            this.write_end(&task, Vec::new(), TaskState::Failed, None, message)
                                .await;
                        }
                        .instrument(span),
                    );
                }
            }
            TaskState::Pending => {
                if self.claimed.lock_or_recover().contains(&uid) {
                    return;
                }
                let Some(sandbox) = self.sandboxes.ready_sandbox(&sandbox_ref) else {
                    self.waiting.lock_or_recover().insert(name, task);
                    return;
                };
                self.waiting.lock_or_recover().remove(&name);
                if !self.claimed.lock_or_recover().insert(uid) {
                    return;
                }
                *self
                    .running
                    .lock_or_recover()
                    .entry(sandbox_ref)
                    .or_default() += 1;
                tokio::spawn(self.clone().run_task(task, sandbox).instrument(span));
            }
        }
    }

    /// Runs the Task's steps in order and writes their results; then, for a Sandbox without
    /// `keepAlive` that has no other Task here, releases its sandbox.
    async fn run_task(self: Arc<Self>, task: Task, sandbox: ReadySandbox) {
        let sandbox_ref = task.spec.sandbox_ref.clone();
        self.run_steps(&task, &sandbox).await;
        let last = {
            let mut running = self.running.lock_or_recover();
            let left = running.get_mut(&sandbox_ref).map_or(0, |n| {
                *n = n.saturating_sub(1);
                *n
            });
            if left == 0 {
                running.remove(&sandbox_ref);
            }
            left == 0
        };
        if !sandbox.keep_alive && last && !self.has_waiting(&sandbox_ref) {
            self.sandboxes.release_after_tasks(&sandbox_ref).await;
        }
    }

    async fn run_steps(self: &Arc<Self>, task: &Task, sandbox: &ReadySandbox) {
        let name = task.name_any();
        let started = now();
        let running = json!({"status": {
            "state": TaskState::Running, "startTime": started, "steps": [],
            "message": null, "exitCode": null, "completionTime": null,
        }});
        if let Err(e) = self.patch(&name, running).await {
            tracing::warn!(error = %e, "writing Running failed; the Task is not run");
            self.claimed
                .lock_or_recover()
                .remove(&task.uid().unwrap_or_default());
            return;
        }
        tracing::info!(steps = task.spec.steps.len(), "Task running");
        let mut results: Vec<StepResult> = Vec::new();
        let mut exit_code = None;
        let mut failure: Option<String> = None;
        let count = task.spec.steps.len();
        for (i, step) in task.spec.steps.iter().enumerate() {
            let sb = match self.sandboxes.mgr.sandbox(&sandbox.id, &sandbox.owner) {
                Ok(sb) => sb,
                Err(e) => {
                    failure = Some(format!("the sandbox is gone: {}", e.message));
                    break;
                }
            };
            let result = self.run_step(&sb, task, step).await;
            if step.type_ == StepType::Command && result.exit_code.is_some() {
                exit_code = result.exit_code;
            }
            let failed = result.error.is_some() || result.exit_code.is_some_and(|c| c != 0);
            if failed {
                failure = Some(format!("step {:?} failed", step.name));
            }
            results.push(result);
            if failed {
                break;
            }
            if i + 1 < count {
                let progress = json!({"status": {"steps": results, "exitCode": exit_code}});
                if let Err(e) = self.patch(&name, progress).await {
                    if not_found(&e) {
                        tracing::info!("Task deleted while it ran; stopping");
                        return;
                    }
                    tracing::warn!(error = %e, "writing a step's result failed");
                }
            }
        }
        let state = if failure.is_some() {
            TaskState::Failed
        } else {
            TaskState::Succeeded
        };
        let message = failure.unwrap_or_default();
        self.write_end(task, results, state, exit_code, &message)
            .await;
    }

    /// Whether a Task of `sandbox` waits to run.
    fn has_waiting(&self, sandbox: &str) -> bool {
        self.waiting.lock_or_recover().values().any(|t| {
            t.spec.sandbox_ref == sandbox
                && t.status
                    .as_ref()
                    .is_none_or(|s| s.state == TaskState::Pending)
        })
    }

    async fn write_end(
        self: &Arc<Self>,
        task: &Task,
        steps: Vec<StepResult>,
        state: TaskState,
        exit_code: Option<i32>,
        message: &str,
    ) {
        let name = task.name_any();
        let completion = now();
        let mut status = json!({
            "state": state, "exitCode": exit_code, "completionTime": completion,
            "message": if message.is_empty() { None } else { Some(message) },
        });
        if !steps.is_empty() {
            status["steps"] = json!(steps);
        }
        let body = json!({ "status": status });
        let written = self
            .sandboxes
            .retrying("writing the Task's end", || self.patch(&name, body.clone()))
            .await;
        match written {
            Ok(()) => {
                tracing::info!(?state, "Task finished");
                let mut done = task.clone();
                let status = done.status.get_or_insert_with(Default::default);
                status.state = state;
                status.completion_time = Some(completion);
                self.expire_later(&done);
            }
            Err(ObjectError::Kube(e)) if not_found(&e) => {}
            Err(e) => tracing::warn!(error = %e, "writing the Task's end failed"),
        }
    }

    async fn patch(&self, name: &str, body: serde_json::Value) -> Result<(), kube::Error> {
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(body))
            .await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs one step; a failure to run it at all lands in the result's `error`.
    async fn run_step(&self, sb: &Arc<Sandbox>, task: &Task, step: &TaskStep) -> StepResult {
        let started = Instant::now();
        let mut result = StepResult {
            name: step.name.clone(),
            ..StepResult::default()
        };
        let outcome = match step.type_ {
            StepType::Command => self.run_command(sb, task, step, &mut result).await,
            StepType::FilePatch => self.write_file(sb, step).await,
        };
        if let Err(e) = outcome {
            result.error = Some(e.message.chars().take(1024).collect());
        }
        result.duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        result
    }

    async fn run_command(
        &self,
        sb: &Arc<Sandbox>,
        task: &Task,
        step: &TaskStep,
        result: &mut StepResult,
    ) -> Result<(), ApiError> {
        let timeout = step
            .timeout_seconds
            .or(task.spec.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(DEFAULT_STEP_TIMEOUT)
            .clamp(1, MAX_STEP_TIMEOUT);
        // Late binding, as for the node API's execs: the lease's env under the step's own.
        let mut env: BTreeMap<String, String> = sb.lease().map(|l| l.env).unwrap_or_default();
        env.extend(step.env.clone());
        let request = ExecRequest {
            cmd: step.command.clone(),
            env,
            cwd: step.work_dir.clone(),
            timeout_ms: Some(timeout * 1000),
            max_output_bytes: Some(STEP_CAPTURE_BYTES),
            ..ExecRequest::default()
        };
        request.validate().map_err(ApiError::bad_request)?;
        let body = serde_json::to_vec(&request).map_err(|e| ApiError::internal(e.to_string()))?;
        let mgr = &self.sandboxes.mgr;
        let _in_use = mgr.enter(sb).await?;
        let started = Instant::now();
        let call = agent_request(Method::POST, "/exec", http::full(body))?;
        let limit = STEP_CAPTURE_BYTES * 12 + (1 << 20);
        let deadline = Duration::from_secs(timeout + 5);
        let (reply, _permit) = sb
            .agent
            .call_budgeted(call, limit, &mgr.reply_budget, deadline)
            .await?;
        sb.touch();
        if !reply.status.is_success() {
            return Err(agent_error(reply.status, &reply.body));
        }
        let exec: ExecResult = serde_json::from_slice(&reply.body)
            .map_err(|e| ApiError::internal(format!("the agent's exec result: {e}")))?;
        mgr.metrics
            .execs_total
            .with_label_values(&[sb.pool.as_str(), exec.outcome().as_str()])
            .inc();
        mgr.metrics
            .exec_seconds
            .with_label_values(&[sb.pool.as_str()])
            .observe(started.elapsed().as_secs_f64());
        let (stdout, cut_out) = bound_output(&exec.stdout);
        let (stderr, cut_err) = bound_output(&exec.stderr);
        result.stdout = stdout;
        result.stderr = stderr;
        result.truncated = exec.truncated || cut_out || cut_err;
        result.exit_code = Some(exec.exit_code);
        if exec.timed_out {
            result.error = Some(format!("timed out after {timeout} s"));
        }
        Ok(())
    }

    async fn write_file(&self, sb: &Arc<Sandbox>, step: &TaskStep) -> Result<(), ApiError> {
        let (Some(path), Some(content)) = (&step.path, &step.content) else {
            return Err(ApiError::bad_request(
                "a FilePatch step needs path and content",
            ));
        };
        let path = match &step.work_dir {
            Some(dir) if !path.starts_with('/') => format!("{}/{path}", dir.trim_end_matches('/')),
            _ => path.clone(),
        };
        let request = WriteFilesRequest {
            files: BTreeMap::from([(path, FileContent::Text(content.clone()))]),
        };
        let body = serde_json::to_vec(&request).map_err(|e| ApiError::internal(e.to_string()))?;
        let _in_use = self.sandboxes.mgr.enter(sb).await?;
        let call = agent_request(Method::POST, "/files", http::full(body))?;
        let reply = sb.agent.call(call, 1 << 20).await?;
        sb.touch();
        if !reply.status.is_success() {
            return Err(agent_error(reply.status, &reply.body));
        }
        Ok(())
    }

    /// Deletes a finished Task once `ttlSecondsAfterFinished` has passed since it finished.
    fn expire_later(self: &Arc<Self>, task: &Task) {
        let Some(ttl) = task
            .spec
            .ttl_seconds_after_finished
            .and_then(|s| u64::try_from(s).ok())
        else {
            return;
        };
        let uid = task.uid().unwrap_or_default();
        if !self.expiring.lock_or_recover().insert(uid.clone()) {
            return;
        }
        let finished = task
            .status
            .as_ref()
            .and_then(|s| s.completion_time.as_deref())
            .and_then(|t| t.parse::<Timestamp>().ok())
            .unwrap_or_else(Timestamp::now);
        let elapsed = Timestamp::now().duration_since(finished).as_millis().max(0);
        let wait = Duration::from_secs(ttl)
            .saturating_sub(Duration::from_millis(u64::try_from(elapsed).unwrap_or(0)));
        let this = self.clone();
        let name = task.name_any();
        let shutdown = self.sandboxes.mgr.shutdown.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                match this.api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => tracing::info!("finished Task deleted after its TTL"),
                    Err(e) if not_found(&e) => {}
                    Err(e) => tracing::warn!(error = %e, "deleting the finished Task failed"),
                }
                this.expiring.lock_or_recover().remove(&uid);
            }
            .instrument(tracing::info_span!("task_ttl", task = %task.name_any())),
        );
    }
}

/// The agent's error reply as the node API's error.
fn agent_error(status: hyper::StatusCode, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => body.error,
        Err(_) => ApiError::internal(format!("the agent answered {status}")),
    }
}
