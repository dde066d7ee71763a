//! Pausing: a paused sandbox's processes are frozen (no CPU; memory and files kept). A holder
//! pauses one explicitly, or its pool's `auto_pause_after_seconds` pauses a leased sandbox that
//! no request has touched for that long. Either way the next request that needs the agent
//! thaws it first, transparently ([`Manager::enter`]).
//!
//! A request and an auto-pause never miss each other: the request counts itself in use and
//! then looks at `pausing`/`paused`; the auto-pause sets `pausing` and then looks at the count
//! (all sequentially consistent). So either the auto-pause sees the request and gives up, or
//! the request sees the pause under way and waits on the pause lock to thaw after it.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use super::manager::{Manager, snapshot};
use super::sandbox::Sandbox;
use crate::api::ApiError;

/// Why a sandbox is frozen or thawed (the `cause` label of the pause metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its holder asked (`/pause`, `/resume`).
    Explicit,
    /// Idleness froze it, or a request thawed it.
    Auto,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Self::Explicit => "explicit",
            Self::Auto => "auto",
        }
    }
}

/// A request under way on a sandbox: while one lives, the sandbox is not auto-paused. Its end
/// counts as a use (the idle time starts there).
pub struct InUse(Arc<Sandbox>);

impl InUse {
    fn new(sb: &Arc<Sandbox>) -> Self {
        sb.in_use.fetch_add(1, SeqCst);
        sb.touch();
        Self(sb.clone())
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_use.fetch_sub(1, SeqCst);
    }
}

impl Manager {
    /// Readies a sandbox for a request that calls its agent: counts it in use and thaws it if
    /// it is paused. The guard is held until the request's work is done.
    pub async fn enter(&self, sb: &Arc<Sandbox>) -> Result<InUse, ApiError> {
        let guard = InUse::new(sb);
        if sb.paused.load(SeqCst) || sb.pausing.load(SeqCst) {
            let _lock = sb.pause_lock.lock().await;
            if sb.paused.load(SeqCst) {
                self.freeze(sb, false, Cause::Auto).await?;
            }
        }
        Ok(guard)
    }

    /// Pauses or resumes a sandbox on its holder's word.
    pub async fn set_paused(&self, sb: &Sandbox, paused: bool) -> Result<(), ApiError> {
        let _lock = sb.pause_lock.lock().await;
        if sb.paused.load(SeqCst) == paused {
            return Ok(());
        }
        self.freeze(sb, paused, Cause::Explicit).await
    }

    /// Freezes or thaws, with the pause lock held; records the state for a successor.
    async fn freeze(&self, sb: &Sandbox, paused: bool, cause: Cause) -> Result<(), ApiError> {
        let started = Instant::now();
        self.runtime.set_paused(&sb.id, paused).await?;
        sb.paused.store(paused, SeqCst);
        let action = if paused { "pause" } else { "resume" };
        self.metrics
            .pause_seconds
            .with_label_values(&[action, cause.label()])
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(sandbox = %sb.id, action, cause = cause.label(), "sandbox frozen or thawed");
        // A sandbox released meanwhile has no record to update (its removal came first).
        if sb.lease().is_some() && self.is_live(&sb.id) {
            self.records.save(sb);
        }
        Ok(())
    }

    /// Pauses the leased sandboxes that have been idle past their pool's
    /// `auto_pause_after_seconds` at `now` (ms); returns how many were started on.
    pub(super) fn auto_pause_idle(self: &Arc<Self>, now: u64) -> usize {
        let mut n = 0;
        for sb in snapshot(&self.sandboxes) {
            if self.due_for_pause(&sb, now) {
                let this = self.clone();
                self.tasks
                    .spawn(async move { this.auto_pause(&sb, now).await });
                n += 1;
            }
        }
        n
    }

    fn due_for_pause(&self, sb: &Sandbox, now: u64) -> bool {
        if sb.paused.load(SeqCst) || sb.in_use.load(SeqCst) > 0 || sb.lease().is_none() {
            return false;
        }
        let Ok(pool) = self.pool(&sb.pool) else {
            return false;
        };
        pool.spec().auto_pause_after_seconds.is_some_and(|after| {
            now.saturating_sub(sb.last_used_ms()) >= after.saturating_mul(1000)
        })
    }

    /// Freezes one idle sandbox, unless a request came in meanwhile.
    pub(super) async fn auto_pause(&self, sb: &Arc<Sandbox>, now: u64) {
        sb.pausing.store(true, SeqCst);
        let lock = sb.pause_lock.lock().await;
        let result = if self.due_for_pause(sb, now) && self.is_live(&sb.id) {
            self.freeze(sb, true, Cause::Auto).await
        } else {
            Ok(())
        };
        sb.pausing.store(false, SeqCst);
        drop(lock);
        if let Err(e) = result {
            tracing::warn!(sandbox = %sb.id, error = %e.message, "auto-pause failed");
        }
    }

    /// Paused sandboxes by pool.
    pub(super) fn paused_counts(&self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for sb in snapshot(&self.sandboxes) {
            if sb.paused.load(SeqCst) {
                *counts.entry(sb.pool.clone()).or_insert(0) += 1;
            }
        }
        counts
    }
}
