//! Keeping pools warm: each pool's refill loop creates sandboxes until `min_idle` are idle
//! (within `max` and the node's create concurrency), backing off after failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::agent_client::AgentClient;
use super::manager::Manager;
use super::pool::Pool;
use super::sandbox::Sandbox;
use crate::api::{ApiError, ErrorCode};
use crate::util::{now_ms, random_id};

/// Refills wait for this long without an acquire before they start (unless the pool is low).
const BURST_QUIET_MS: u64 = 25;
/// How long a new sandbox may take to answer its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Manager {
    pub(super) async fn refill_loop(self: Arc<Self>, pool: Arc<Pool>) {
        loop {
            let spec = pool.spec();
            // Creating sandboxes costs CPU that a burst of acquires needs: wait until the
            // burst is over, unless the pool is running low.
            loop {
                let since = now_ms().saturating_sub(pool.last_acquire_ms());
                let idle = pool.state().idle();
                if since >= BURST_QUIET_MS || idle <= spec.min_idle / 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(BURST_QUIET_MS - since)).await;
            }
            // After failures, wait before trying again.
            while let Some(delay) = pool.backoff() {
                tokio::time::sleep(delay).await;
            }
            if self.is_draining() || pool.state().is_deleted() {
                return;
            }
            // A cordoned node makes nothing new; an uncordon wakes the loop.
            if self.is_cordoned() {
                pool.refill.notified().await;
                continue;
            }
            let wanted = pool.state().reserve_refill(spec.min_idle, spec.max);
            for _ in 0..wanted {
                let this = self.clone();
                let pool = pool.clone();
                self.spawn_tracked(async move {
                    let created = this.create(&pool).await.ok();
                    let _ = this.add_idle(&pool, created, true);
                    pool.refill.notify_one();
                });
            }
            pool.refill.notified().await;
        }
    }

    /// Ends a creation (or reset) reserved in the pool's counts: the sandbox, if any, joins
    /// the idle queue and is registered (and watched, when `new`: a reset one is watched
    /// already); a pool deleted meanwhile destroys it.
    pub(super) fn add_idle(
        self: &Arc<Self>,
        pool: &Pool,
        sb: Option<Arc<Sandbox>>,
        new: bool,
    ) -> bool {
        let (joined, unwanted) = {
            let mut st = pool.state();
            match sb {
                Some(sb) => match st.finish_start(Some(sb.clone())) {
                    None => {
                        self.register(&sb);
                        (Some(sb), None)
                    }
                    unwanted => (None, unwanted),
                },
                None => (None, st.finish_start(None)),
            }
        };
        if let Some(sb) = unwanted {
            self.spawn_destroy(sb.id.clone());
        }
        match joined {
            Some(sb) if new => {
                self.watch(sb);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Creates one sandbox for `pool` and waits until its agent answers. The caller accounts
    /// for it in the pool, registers it under the pool's lock, then watches it: a death
    /// before that is still seen, as the watch resolves at once for a dead sandbox.
    pub(super) async fn create(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
    ) -> Result<Arc<Sandbox>, ApiError> {
        let spec = pool.spec();
        let permit = self
            .create_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::new(ErrorCode::Draining, "the node is shutting down"))?;
        let started = Instant::now();
        let id = random_id("sb-");
        let result = async {
            let created = self
                .runtime
                .create(&id, &spec)
                .await
                .map_err(|e| e.to_string())?;
            let sb = Arc::new(Sandbox::new(
                id.clone(),
                pool.name.clone(),
                spec.runtime,
                AgentClient::new(created.agent),
            ));
            match tokio::time::timeout(READY_TIMEOUT, sb.agent.ping()).await {
                Ok(Ok(())) => Ok(sb),
                Ok(Err(e)) => Err(format!("agent did not start: {}", e.message)),
                Err(_) => Err("agent did not answer within 30 s".to_string()),
            }
        }
        .await;
        drop(permit);
        match result {
            Ok(sb) => {
                self.metrics
                    .create_seconds
                    .with_label_values(&[pool.name.as_str(), spec.runtime.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                pool.state().creation_succeeded();
                self.records.save(&sb);
                Ok(sb)
            }
            Err(message) => {
                tracing::warn!(pool = %pool.name, error = %message, "sandbox create failed");
                self.metrics
                    .sandbox_failures_total
                    .with_label_values(&[pool.name.as_str(), "create"])
                    .inc();
                pool.state().creation_failed(message.clone());
                let _ = self.runtime.destroy(&id).await;
                Err(ApiError::unavailable(format!(
                    "creating a sandbox failed: {message}"
                )))
            }
        }
    }
}
