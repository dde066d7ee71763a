//! Housekeeping: the death watch that replaces a sandbox whose agent dies, lease expiry
//! (lifetime and idleness), auto-pauses (`pause.rs`) and health checks of idle sandboxes.

use std::sync::Arc;
use std::time::Duration;

use super::manager::{Manager, snapshot};
use super::sandbox::Sandbox;
use crate::api::ReusePolicy;
use crate::util::now_ms;

/// Idle sandboxes are pinged every this many housekeeping rounds (of a second each).
const HEALTH_CHECK_ROUNDS: u64 = 10;
/// How long an idle sandbox may take to answer its health check.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl Manager {
    /// Replaces the sandbox when its agent dies on its own.
    pub(super) fn watch(self: &Arc<Self>, sb: Arc<Sandbox>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let reason = this.runtime.exited(&sb.id).await;
            // A shutting-down node leaves the dead to its shutdown (a stop destroys
            // everything; after a hand-over the successor finds it dead and says so).
            if this.is_draining() {
                return;
            }
            // Logged before the sandbox leaves the map: a holder's next request can then
            // already read the reason in the log as well as in its 503.
            let counted = || {
                tracing::warn!(sandbox = %sb.id, pool = %sb.pool, reason = reason.label(), "{reason}");
                this.metrics
                    .sandbox_failures_total
                    .with_label_values(&[sb.pool.as_str(), reason.label()])
                    .inc();
                sb.set_death(reason.to_string());
            };
            if this.forget_and_bury(&sb, &reason.to_string(), counted) {
                this.unaccount(&sb);
                this.spawn_destroy(sb.id.clone());
            }
        });
    }

    /// Expires leases every second and pings idle sandboxes every ten.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut round = 0u64;
        loop {
            tick.tick().await;
            round += 1;
            let now = now_ms();
            self.expire_leases(now);
            self.auto_pause_idle(now);
            // Removing a snapshot's files takes a while for a large one: not on a worker.
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.collect_snapshots()).await;
            if round.is_multiple_of(HEALTH_CHECK_ROUNDS) {
                self.check_idle();
            }
        }
    }

    /// Ends the leases that have run out at `now`; returns how many.
    pub(super) fn expire_leases(self: &Arc<Self>, now: u64) -> usize {
        let mut n = 0;
        for sb in snapshot(&self.sandboxes) {
            if sb.expired(now) {
                tracing::info!(sandbox = %sb.id, "lease expired");
                self.bury(&sb, "its lease expired (ttl or idle timeout)");
                self.release_sandbox(sb, ReusePolicy::Destroy);
                n += 1;
            }
        }
        n
    }

    /// Pings every idle sandbox; one that does not answer is replaced.
    fn check_idle(self: &Arc<Self>) {
        let idle = snapshot(&self.sandboxes)
            .into_iter()
            .filter(|sb| sb.lease().is_none());
        for sb in idle {
            let this = self.clone();
            self.tasks.spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(HEALTH_CHECK_TIMEOUT, sb.agent.ping()).await,
                    Ok(Ok(()))
                );
                if !ok && this.forget(&sb.id).is_some() {
                    tracing::warn!(sandbox = %sb.id, "idle sandbox failed its health check");
                    this.metrics
                        .sandbox_failures_total
                        .with_label_values(&[sb.pool.as_str(), "unhealthy"])
                        .inc();
                    this.unaccount(&sb);
                    this.spawn_destroy(sb.id.clone());
                }
            });
        }
    }
}
