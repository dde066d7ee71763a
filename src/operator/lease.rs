//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! only one writes.
//!
//! As in client-go, expiry is judged by the local clock from when this replica last saw the
//! lease *change* (holder or renew time), never by comparing another machine's timestamps, so
//! clock skew between replicas does not matter. Every write carries the resource version it
//! read: two candidates racing for an expired lease cannot both win (the loser gets a 409).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tokio::time::Instant;
use tracing::{debug, info};

/// Who we are and which lease we compete for.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How often to try to acquire or renew.
    pub fn retry_period(&self) -> Duration {
        self.duration / 3
    }
}

/// The election state of one replica.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The lease record last seen (holder, renew time) and when it was first seen so.
    observed: Option<(Option<String>, Option<MicroTime>)>,
    observed_at: Instant,
    /// When this replica last renewed successfully.
    renewed_at: Option<Instant>,
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            observed_at: Instant::now(),
            renewed_at: None,
        }
    }

    /// Whether this replica may write now: it renewed within the lease duration.
    pub fn is_leader(&self) -> bool {
        self.renewed_at
            .is_some_and(|t| t.elapsed() < self.config.duration)
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: i32::try_from(self.config.duration.as_secs()).ok(),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: read the lease; create it, renew it, take it over once expired, or stand
    /// by. Returns whether this replica leads afterwards.
    pub async fn tick(&mut self) -> Result<bool, kube::Error> {
        let lease = match self.api.get(&self.config.name).await {
            Ok(lease) => lease,
            Err(e) if code(&e) == Some(404) => return self.create().await,
            Err(e) => return Err(e),
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        if self.observed.as_ref() != Some(&record) {
            self.observed = Some(record);
            self.observed_at = Instant::now();
        }
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(self.config.identity.as_str());
        let expired = holder.is_none() || self.observed_at.elapsed() >= self.config.duration;
        if !mine && !expired {
            self.renewed_at = None;
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut next = lease.clone();
        next.spec = Some(self.spec(transitions, acquired));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(updated) => {
                if !mine {
                    info!(identity = %self.config.identity, "acquired the lease; leading");
                }
                self.observed = updated
                    .spec
                    .as_ref()
                    .map(|s| (s.holder_identity.clone(), s.renew_time.clone()));
                self.observed_at = Instant::now();
                self.renewed_at = Some(Instant::now());
                Ok(true)
            }
            Err(e) if code(&e) == Some(409) => {
                debug!("lost the race for the lease");
                self.renewed_at = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn create(&mut self) -> Result<bool, kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(self.spec(0, None)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                info!(identity = %self.config.identity, lease = %created.name_any(), "created the lease; leading");
                self.renewed_at = Some(Instant::now());
                self.observed_at = Instant::now();
                self.observed = created
                    .spec
                    .as_ref()
                    .map(|s| (s.holder_identity.clone(), s.renew_time.clone()));
                Ok(true)
            }
            Err(e) if code(&e) == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown) so that another replica need not wait for expiry.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if !self.is_leader() {
            return Ok(());
        }
        let mut lease = self.api.get(&self.config.name).await?;
        if let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.config.identity.as_str())
        {
            spec.holder_identity = None;
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await?;
        }
        self.renewed_at = None;
        Ok(())
    }
}
