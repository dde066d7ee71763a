//! Why a sandbox died: what a runtime tells the daemon when a sandbox's agent is gone, so the
//! log, the failure metric and the lease holder's error can say it.

use std::fmt;

/// The cause of a sandbox's death, as far as its runtime can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The kernel's OOM killer ended the agent.
    OomKilled,
    /// The agent exited by itself with this status.
    AgentExited { code: i32 },
    /// A signal from outside ended the agent (an operator, a cgroup kill, the node).
    Killed { signal: i32 },
    /// The daemon tore the sandbox down itself.
    Destroyed,
    /// The node evicted the sandbox's pod (memory or disk pressure, a drain).
    Evicted,
    /// Someone else deleted the sandbox's pod.
    Deleted,
    /// The sandbox is gone and its runtime cannot say why.
    Unknown,
}

impl ExitReason {
    /// From the agent's wait status parts and whether its memory cgroup counted an OOM kill.
    pub fn classify(code: Option<i32>, signal: Option<i32>, oom_kills: Option<u64>) -> Self {
        match (signal, code) {
            (Some(libc::SIGKILL), _) if oom_kills.unwrap_or(0) > 0 => Self::OomKilled,
            (Some(signal), _) => Self::Killed { signal },
            (None, Some(code)) => Self::AgentExited { code },
            (None, None) => Self::Unknown,
        }
    }

    /// From an OCI runtime's exit status, where a signal shows as `128 + signal`.
    pub fn from_exit_status(status: u32, oom_kills: Option<u64>) -> Self {
        match status {
            129..=192 => Self::classify(None, Some(status as i32 - 128), oom_kills),
            _ => Self::classify(i32::try_from(status).ok(), None, oom_kills),
        }
    }

    /// The bounded `reason` label of `arl_sandbox_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::OomKilled => "oom",
            Self::AgentExited { .. } => "agent_exited",
            Self::Killed { .. } => "killed",
            Self::Destroyed => "destroyed",
            Self::Evicted => "evicted",
            Self::Deleted => "deleted",
            Self::Unknown => "died",
        }
    }
}

/// Says it to a person: "the sandbox was OOM-killed".
impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OomKilled => write!(
                f,
                "the sandbox was OOM-killed (its memory limit was reached and the kernel killed its agent)"
            ),
            Self::AgentExited { code } => {
                write!(f, "the sandbox died: its agent exited with status {code}")
            }
            Self::Killed { signal } => write!(
                f,
                "the sandbox died: it was killed from outside (signal {signal}{})",
                signal_name(*signal)
                    .map(|n| format!(", {n}"))
                    .unwrap_or_default()
            ),
            Self::Destroyed => write!(f, "the sandbox was destroyed by the node"),
            Self::Evicted => write!(f, "the sandbox died: the node evicted its pod"),
            Self::Deleted => write!(
                f,
                "the sandbox died: its pod was deleted by someone other than this node's daemon"
            ),
            Self::Unknown => write!(f, "the sandbox died (its agent is gone; cause unknown)"),
        }
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::ExitReason;

    #[test]
    fn sigkill_is_oom_only_when_the_cgroup_counted_one() {
        assert_eq!(
            ExitReason::classify(None, Some(9), Some(1)),
            ExitReason::OomKilled
        );
        assert_eq!(
            ExitReason::classify(None, Some(9), Some(0)),
            ExitReason::Killed { signal: 9 }
        );
        assert_eq!(
            ExitReason::classify(None, Some(9), None),
            ExitReason::Killed { signal: 9 }
        );
        // Another signal is never the OOM killer's.
        assert_eq!(
            ExitReason::classify(None, Some(15), Some(2)),
            ExitReason::Killed { signal: 15 }
        );
        assert_eq!(
            ExitReason::classify(Some(1), None, Some(2)),
            ExitReason::AgentExited { code: 1 }
        );
        assert_eq!(ExitReason::classify(None, None, None), ExitReason::Unknown);
    }

    #[test]
    fn oci_statuses_carry_signals_above_128() {
        assert_eq!(
            ExitReason::from_exit_status(137, Some(1)),
            ExitReason::OomKilled
        );
        assert_eq!(
            ExitReason::from_exit_status(137, Some(0)),
            ExitReason::Killed { signal: 9 }
        );
        assert_eq!(
            ExitReason::from_exit_status(2, None),
            ExitReason::AgentExited { code: 2 }
        );
    }

    #[test]
    fn labels_are_few_and_messages_name_the_cause() {
        assert_eq!(ExitReason::OomKilled.label(), "oom");
        assert!(ExitReason::OomKilled.to_string().contains("OOM-killed"));
        assert!(
            ExitReason::Killed { signal: 9 }
                .to_string()
                .contains("SIGKILL")
        );
    }
}
