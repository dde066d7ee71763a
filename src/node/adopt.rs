//! Start-up: the pools come back, then every sandbox an earlier daemon on this state
//! directory recorded is taken back if its runtime vouches for it and its agent answers —
//! leased ones to the same owner under the same id, idle ones into their pool — and the
//! rest is destroyed; only then do the pools refill, so they are not warmed twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::agent_client::AgentClient;
use super::manager::Manager;
use super::records::Record;
use super::sandbox::Sandbox;
use crate::api::{ApiError, PoolSpec};

/// How long an adopted sandbox's agent may take to answer its first ping.
const ADOPT_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What start-up did with the sandboxes it found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    pub allocated: usize,
    pub idle: usize,
    /// Recorded but not taken back (dead, unverifiable, or of a pool that is gone): destroyed.
    pub lost: usize,
    /// Left by an earlier daemon without a record: destroyed by the runtime's sweep.
    pub swept: usize,
}

enum Outcome {
    Allocated(Arc<Sandbox>),
    Idle,
    Lost,
}

impl Manager {
    /// Creates the configured pools, takes back what the predecessor left, sweeps the rest
    /// and starts the refills.
    pub async fn start(
        self: &Arc<Self>,
        pools: &BTreeMap<String, PoolSpec>,
    ) -> Result<Adopted, StartError> {
        let mut new_pools = Vec::new();
        for (name, spec) in pools {
            let pool = self
                .insert_pool(name, spec.clone())
                .map_err(|source| StartError::Pool {
                    name: name.clone(),
                    source,
                })?;
            new_pools.extend(pool);
        }
        // Then the pools created through the API before the restart (the config wins).
        for (name, spec) in self.records.load_pools() {
            if pools.contains_key(&name) {
                continue;
            }
            match self.insert_pool(&name, spec) {
                Ok(pool) => new_pools.extend(pool),
                Err(e) => {
                    tracing::warn!(pool = %name, error = %e.message, "kept pool dropped");
                    self.records.remove_pool(&name);
                }
            }
        }
        let records = self.records.load();
        let outcomes = join_all(records.into_iter().map(|r| self.adopt(r))).await;
        let mut adopted = Adopted::default();
        let mut acquisitions: BTreeMap<_, Vec<(u64, String)>> = BTreeMap::new();
        for outcome in outcomes {
            match outcome {
                Outcome::Allocated(sb) => {
                    adopted.allocated += 1;
                    if let Some(lease) = sb.lease()
                        && let Some(request_id) = lease.request_id
                    {
                        acquisitions
                            .entry((lease.owner, request_id))
                            .or_default()
                            .push((lease.acquired_at_ms, sb.id.clone()));
                    }
                }
                Outcome::Idle => adopted.idle += 1,
                Outcome::Lost => adopted.lost += 1,
            }
        }
        // An acquire retried with its request id after the restart gets the same sandboxes.
        for (key, mut taken) in acquisitions {
            taken.sort();
            self.acquisitions
                .remember(key, taken.into_iter().map(|(_, id)| id).collect());
        }
        adopted.swept = self.runtime.reclaim().await.map_err(StartError::Sweep)?;
        for pool in new_pools {
            self.start_refill(pool);
        }
        Ok(adopted)
    }

    async fn adopt(self: &Arc<Self>, record: Record) -> Outcome {
        let leased = record.lease.is_some();
        let runtime = record.runtime.as_str();
        match self.try_adopt(&record).await {
            Ok(sb) => {
                let state = if leased { "allocated" } else { "idle" };
                tracing::info!(sandbox = %sb.id, pool = %sb.pool, runtime, state, "sandbox taken back");
                self.metrics
                    .sandboxes_adopted_total
                    .with_label_values(&[runtime, state])
                    .inc();
                self.watch(sb.clone());
                if leased {
                    Outcome::Allocated(sb)
                } else {
                    Outcome::Idle
                }
            }
            Err(reason) => {
                tracing::warn!(sandbox = %record.id, pool = %record.pool, runtime, %reason, "sandbox not taken back; destroying it");
                self.metrics
                    .sandboxes_adopted_total
                    .with_label_values(&[runtime, "lost"])
                    .inc();
                if let Some(owner) = record.lease.as_ref().and_then(|l| l.to_lease()) {
                    self.bury_id(
                        &record.id,
                        owner.owner,
                        &format!("the node restarted and could not take it back ({reason})"),
                    );
                }
                self.records.remove(&record.id);
                if let Err(e) = self.runtime.destroy(&record.id).await {
                    tracing::warn!(sandbox = %record.id, error = %e, "destroy failed");
                }
                Outcome::Lost
            }
        }
    }

    /// Takes one recorded sandbox back, or says why not.
    async fn try_adopt(self: &Arc<Self>, record: &Record) -> Result<Arc<Sandbox>, String> {
        let pool = self
            .pool(&record.pool)
            .map_err(|_| format!("its pool {:?} is gone", record.pool))?;
        let lease = match &record.lease {
            Some(stored) => Some(stored.to_lease().ok_or("its lease record is malformed")?),
            None => None,
        };
        // The runtime thaws a paused sandbox to vouch for it; frozen again below.
        let created = self
            .runtime
            .adopt(&record.id, record.runtime)
            .await
            .map_err(|e| e.to_string())?;
        let sb = Arc::new(Sandbox::with_creation_time(
            record.id.clone(),
            record.pool.clone(),
            record.runtime,
            AgentClient::new(created.agent),
            record.created_at_ms,
        ));
        match tokio::time::timeout(ADOPT_PING_TIMEOUT, sb.agent.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("its agent does not answer: {}", e.message)),
            Err(_) => return Err("its agent does not answer".into()),
        }
        sb.set_base(record.base.clone());
        if record.paused && lease.is_some() {
            self.runtime
                .set_paused(&record.id, true)
                .await
                .map_err(|e| format!("it cannot be paused again: {e}"))?;
            sb.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // The idle deadline starts again now: uses while no daemon was there went unseen.
        let leased = lease.is_some();
        sb.set_lease(lease);
        let unwanted = {
            let mut st = pool.state();
            let unwanted = st.adopt(sb.clone(), leased);
            if unwanted.is_none() {
                self.register(&sb);
            }
            unwanted
        };
        match unwanted {
            Some(_) => Err(format!("its pool {:?} is being deleted", record.pool)),
            None => Ok(sb),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("pool {name}: {}", source.message)]
    Pool { name: String, source: ApiError },
    #[error("sweeping what an earlier daemon left: {0}")]
    Sweep(#[source] crate::runtime::RuntimeError),
}
