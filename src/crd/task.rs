//! `Task`: steps run in a bound Sandbox by the daemon of the Sandbox's node. The operator
//! leaves Tasks alone; their results land in the status, each output bounded.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many characters of a step's stdout and of its stderr land in the status (the
/// tail is kept; the full output stays retrievable from the daemon).
pub const MAX_STEP_OUTPUT: usize = 4096;

/// A list of steps to run in a Sandbox.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "arl.infra.io",
    version = "v1alpha1",
    kind = "Task",
    doc = "Steps run in a bound Sandbox by the daemon of its node.",
    namespaced,
    cel,
    status = "TaskStatus",
    shortname = "arltask",
    category = "arl",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Sandbox", type_ = "string", json_path = ".spec.sandboxRef"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "ExitCode", type_ = "integer", json_path = ".status.exitCode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Task's spec is immutable"))]
pub struct TaskSpec {
    /// The Sandbox (same namespace) to run in.
    #[schemars(length(min = 1, max = 253))]
    pub sandbox_ref: String,
    /// The steps, run in order; the first failure stops the Task.
    #[schemars(length(min = 1, max = 64))]
    pub steps: Vec<TaskStep>,
    /// Default timeout of a step (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("timeoutSeconds must be positive"))]
    pub timeout_seconds: Option<i64>,
    /// Delete the Task this long after it finished (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("ttlSecondsAfterFinished must not be negative"))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// What a step does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StepType {
    /// Run `command` (argv).
    #[default]
    Command,
    /// Write `content` to `path`.
    FilePatch,
}

/// One step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.type != 'Command' || (has(self.command) && size(self.command) > 0)").message("a Command step needs a non-empty command"),
    validation = Rule::new("self.type != 'FilePatch' || (has(self.path) && has(self.content))").message("a FilePatch step needs path and content"),
)]
pub struct TaskStep {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(rename = "type")]
    pub type_: StepType,
    /// argv of a Command step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// File content of a FilePatch step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1048576))]
    pub content: Option<String>,
    /// File path of a FilePatch step (relative to `workDir`, or absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub path: Option<String>,
    /// Working directory (default: the sandbox's workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    /// Extra environment of a Command step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Timeout of this step (seconds; default: the Task's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("timeoutSeconds must be positive"))]
    pub timeout_seconds: Option<i64>,
}

/// Where a Task is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TaskState {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// Results so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    #[serde(default)]
    pub state: TaskState,
    /// Exit code of the last command run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// One entry per finished step, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepResult>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Why the Task failed outside its commands (sandbox lost, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The result of one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The tail of stdout, at most [`MAX_STEP_OUTPUT`] characters.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub stdout: String,
    /// The tail of stderr, at most [`MAX_STEP_OUTPUT`] characters.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub stderr: String,
    /// Output was cut to fit.
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub duration_ms: i64,
    /// Infrastructure error (the command did not run to an exit code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Keeps the last `MAX_STEP_OUTPUT` characters of `output`; says whether it cut anything.
pub fn bound_output(output: &str) -> (String, bool) {
    let count = output.chars().count();
    if count <= MAX_STEP_OUTPUT {
        return (output.to_string(), false);
    }
    (output.chars().skip(count - MAX_STEP_OUTPUT).collect(), true)
}
