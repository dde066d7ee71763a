//! One warm pool: its spec and the counts and queue of its sandboxes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

use super::sandbox::Sandbox;
use crate::api::{PoolSpec, PoolStatus};
use crate::util::{MutexExt, RwLockExt};

pub struct Pool {
    pub name: String,
    spec: RwLock<PoolSpec>,
    state: Mutex<PoolState>,
    /// Wakes the pool's refill loop.
    pub refill: Notify,
    /// When the last acquire took sandboxes (ms since the epoch).
    last_acquire_ms: AtomicU64,
}

#[derive(Default)]
pub struct PoolState {
    pub idle: VecDeque<Arc<Sandbox>>,
    /// Being created or reset.
    pub starting: usize,
    pub allocated: usize,
    pub failures_in_row: u32,
    pub last_error: Option<String>,
    pub deleted: bool,
}

impl PoolState {
    pub fn total(&self) -> usize {
        self.idle.len() + self.starting + self.allocated
    }
}

impl Pool {
    pub fn new(name: String, spec: PoolSpec) -> Self {
        Self {
            name,
            spec: RwLock::new(spec),
            state: Mutex::new(PoolState::default()),
            refill: Notify::new(),
            last_acquire_ms: AtomicU64::new(0),
        }
    }

    pub fn note_acquire(&self) {
        self.last_acquire_ms
            .store(crate::util::now_ms(), Ordering::Relaxed);
    }

    pub fn last_acquire_ms(&self) -> u64 {
        self.last_acquire_ms.load(Ordering::Relaxed)
    }

    pub fn spec(&self) -> PoolSpec {
        self.spec.read_or_recover().clone()
    }

    pub fn set_spec(&self, spec: PoolSpec) {
        *self.spec.write_or_recover() = spec;
        self.refill.notify_one();
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock_or_recover()
    }

    pub fn status(&self) -> PoolStatus {
        let spec = self.spec();
        let st = self.state();
        PoolStatus {
            idle: st.idle.len(),
            allocated: st.allocated,
            starting: st.starting,
            total: st.total(),
            ready: st.idle.len() >= spec.min_idle.min(spec.max.saturating_sub(st.allocated)),
            last_error: st.last_error.clone(),
        }
    }

    /// How long to wait before retrying after consecutive create failures.
    pub fn backoff(&self) -> Option<Duration> {
        let failures = self.state().failures_in_row;
        (failures > 0).then(|| Duration::from_millis((50u64 << failures.min(8)).min(10_000)))
    }
}
