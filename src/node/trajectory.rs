//! Each sandbox's trajectory: an ordered, bounded record of what was done in it (execs,
//! session commands, file writes) with timings, exit codes and output previews, exported as
//! JSONL for training data and debugging.
//!
//! Off the hot path's critical section: a step is built (previews cut, strings copied) before
//! the lock is taken, and the lock only pushes it into a ring of [`MAX_STEPS`]; the oldest step
//! gives way. Sequence numbers keep counting, so a reader sees how many fell out.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::util::MutexExt;

/// Steps kept per sandbox.
pub const MAX_STEPS: usize = 256;
/// Longest preview of an input or an output, in bytes.
pub const PREVIEW_BYTES: usize = 512;

/// One action in a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// Position in the sandbox's history, from 1; gaps at the start are steps that fell out.
    pub seq: u64,
    /// When the action started (ms since the epoch).
    pub at_ms: u64,
    /// `exec`, `session_open`, `session_run`, `session_close`, `file_write`, `file_delete`.
    pub action: String,
    /// The HTTP status the action was answered with.
    pub status: u16,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The command, snippet or path (a preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// A Python snippet's final value (repr preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A Python snippet's exception, `Name: message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes written (file writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Default)]
pub struct Trajectory {
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    steps: VecDeque<Step>,
    next_seq: u64,
}

impl Trajectory {
    /// Appends a step (its `seq` is assigned here); the oldest gives way when full.
    pub fn record(&self, mut step: Step) {
        let mut ring = self.ring.lock_or_recover();
        ring.next_seq += 1;
        step.seq = ring.next_seq;
        if ring.steps.len() >= MAX_STEPS {
            ring.steps.pop_front();
        }
        ring.steps.push_back(step);
    }

    /// The steps kept, oldest first, as JSON lines.
    pub fn jsonl(&self) -> Vec<u8> {
        let steps: Vec<Step> = self.ring.lock_or_recover().steps.iter().cloned().collect();
        let mut out = Vec::with_capacity(steps.len() * 256);
        for step in &steps {
            if serde_json::to_writer(&mut out, step).is_ok() {
                out.push(b'\n');
            }
        }
        out
    }

    /// Forgets every step (the sandbox starts a new lease).
    pub fn clear(&self) {
        let mut ring = self.ring.lock_or_recover();
        ring.steps.clear();
        ring.next_seq = 0;
    }
}

/// At most [`PREVIEW_BYTES`] of `text`, cut at a character boundary, `…` marking a cut.
pub fn preview(text: &str) -> String {
    if text.len() <= PREVIEW_BYTES {
        return text.to_string();
    }
    let mut end = PREVIEW_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 3);
    out.push_str(&text[..end]);
    out.push('…');
    out
}

/// Like [`preview`], `None` for empty text.
pub fn preview_opt(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| preview(text))
}

/// The fields of an exec or session result a step keeps, read without copying the output.
#[derive(Deserialize)]
pub struct Outcome<'a> {
    #[serde(borrow, default)]
    pub stdout: Cow<'a, str>,
    #[serde(borrow, default)]
    pub stderr: Cow<'a, str>,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub duration_ms: f64,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub error: Option<OutcomeError>,
}

#[derive(Deserialize)]
pub struct OutcomeError {
    pub ename: String,
    pub evalue: String,
}

impl Outcome<'_> {
    /// Fills a step's result fields.
    pub fn fill(&self, step: &mut Step) {
        step.exit_code = Some(self.exit_code);
        step.timed_out = Some(self.timed_out);
        step.duration_ms = self.duration_ms;
        step.stdout = preview_opt(&self.stdout);
        step.stderr = preview_opt(&self.stderr);
        step.value = self.value.as_deref().map(preview);
        step.error = self
            .error
            .as_ref()
            .map(|e| preview(&format!("{}: {}", e.ename, e.evalue)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_latest_steps_in_order() {
        let t = Trajectory::default();
        for i in 0..(MAX_STEPS + 10) {
            t.record(Step {
                action: "exec".into(),
                input: Some(format!("step {i}")),
                ..Step::default()
            });
        }
        let text = String::from_utf8(t.jsonl()).expect("utf-8");
        let steps: Vec<Step> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(steps.len(), MAX_STEPS);
        assert_eq!(steps[0].seq, 11, "the ten oldest fell out");
        assert!(steps.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(
            steps.last().and_then(|s| s.input.clone()),
            Some(format!("step {}", MAX_STEPS + 9))
        );
        t.clear();
        assert!(t.jsonl().is_empty());
    }

    #[test]
    fn previews_cut_at_character_boundaries() {
        let long = "é".repeat(PREVIEW_BYTES);
        let p = preview(&long);
        assert!(p.ends_with('…'));
        assert!(p.len() <= PREVIEW_BYTES + '…'.len_utf8());
        assert_eq!(preview("short"), "short");
        assert_eq!(preview_opt(""), None);
    }
}
