//! One warm pool: its spec and the counts and queue of its sandboxes.
//!
//! The counts change only through [`PoolState`]'s methods, one per event of a sandbox's life
//! (a creation reserved, finished or failed; a lease taken or ended; a sandbox lost or
//! adopted), so that `idle + starting + allocated` always counts every sandbox of the pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::sandbox::{Lease, Sandbox};
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
    idle: VecDeque<Arc<Sandbox>>,
    /// Being created or reset.
    starting: usize,
    allocated: usize,
    failures_in_row: u32,
    last_error: Option<String>,
    /// When the latest creation failed.
    last_failure: Option<Instant>,
    deleted: bool,
}

/// A lease asked for more sandboxes than the pool's `max` leaves room for.
#[derive(Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub idle: usize,
}

impl PoolState {
    pub fn total(&self) -> usize {
        self.idle.len() + self.starting + self.allocated
    }

    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    #[cfg(test)]
    pub fn idle_ids(&self) -> Vec<String> {
        self.idle.iter().map(|sb| sb.id.clone()).collect()
    }

    pub fn failures_in_row(&self) -> u32 {
        self.failures_in_row
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// Marks the pool deleted and hands over its idle sandboxes, which leave it.
    pub fn delete(&mut self) -> Vec<Arc<Sandbox>> {
        self.deleted = true;
        self.idle.drain(..).collect()
    }

    /// Reserves the creations that bring the pool back to `min_idle` warm sandboxes without
    /// exceeding `max`; returns how many.
    pub fn reserve_refill(&mut self, min_idle: usize, max: usize) -> usize {
        if self.deleted {
            return 0;
        }
        let have = self.idle.len() + self.starting;
        let room = max.saturating_sub(self.total());
        let n = min_idle.saturating_sub(have).min(room);
        self.starting += n;
        n
    }

    /// A creation or reset for the idle queue ended: the sandbox joins the queue, unless the
    /// pool was deleted meanwhile, when it is handed back for destruction.
    pub fn finish_start(&mut self, sb: Option<Arc<Sandbox>>) -> Option<Arc<Sandbox>> {
        self.starting = self.starting.saturating_sub(1);
        let sb = sb?;
        if self.deleted {
            return Some(sb);
        }
        self.idle.push_back(sb);
        None
    }

    /// Takes `count` sandboxes for `lease`: warm ones now (their lease begins under this
    /// lock), and the room for the missing ones, reserved as starting. Returns the warm ones
    /// and how many are missing.
    pub fn lease(
        &mut self,
        count: usize,
        max: usize,
        lease: &Lease,
    ) -> Result<(Vec<Arc<Sandbox>>, usize), Exhausted> {
        let warm = count.min(self.idle.len());
        let missing = count - warm;
        // Warm ones only change state; each missing one adds to the pool's total.
        if max.saturating_sub(self.total()) < missing {
            return Err(Exhausted {
                idle: self.idle.len(),
            });
        }
        let taken: Vec<Arc<Sandbox>> = self.idle.drain(..warm).collect();
        for sb in &taken {
            sb.set_lease(Some(lease.clone()));
        }
        self.allocated += taken.len();
        self.starting += missing;
        Ok((taken, missing))
    }

    /// Reserves room for `count` forks, created for a lease (ended by
    /// [`finish_lease_starts`](Self::finish_lease_starts)). `Exhausted::idle` says how many
    /// more the pool has room for.
    pub fn reserve_forks(&mut self, count: usize, max: usize) -> Result<(), Exhausted> {
        let room = if self.deleted {
            0
        } else {
            max.saturating_sub(self.total())
        };
        if room < count {
            return Err(Exhausted { idle: room });
        }
        self.starting += count;
        Ok(())
    }

    /// The creations reserved by [`lease`](Self::lease) ended: the `created` sandboxes (at
    /// most `reserved`) begin `lease` and are now allocated.
    pub fn finish_lease_starts(
        &mut self,
        reserved: usize,
        created: &[Arc<Sandbox>],
        lease: &Lease,
    ) {
        self.starting = self.starting.saturating_sub(reserved);
        for sb in created.iter().take(reserved) {
            sb.set_lease(Some(lease.clone()));
            self.allocated += 1;
        }
    }

    /// An allocated sandbox's lease ended: it is gone, or (`resetting`) being reset for reuse.
    pub fn end_lease(&mut self, resetting: bool) {
        self.allocated = self.allocated.saturating_sub(1);
        if resetting {
            self.starting += 1;
        }
    }

    /// A sandbox left the pool without a release (it died or failed a health check). Leases
    /// begin under this lock, so whether it was allocated is decided consistently.
    pub fn lose(&mut self, sb: &Sandbox) {
        if let Some(pos) = self.idle.iter().position(|s| s.id == sb.id) {
            self.idle.remove(pos);
        } else if sb.lease().is_some() {
            self.allocated = self.allocated.saturating_sub(1);
        }
    }

    /// A sandbox a predecessor daemon left, taken back: leased, or idle (then it joins the
    /// queue unless the pool was deleted, when it is handed back for destruction).
    pub fn adopt(&mut self, sb: Arc<Sandbox>, leased: bool) -> Option<Arc<Sandbox>> {
        if leased {
            self.allocated += 1;
            return None;
        }
        if self.deleted {
            return Some(sb);
        }
        self.idle.push_back(sb);
        None
    }

    pub fn creation_succeeded(&mut self) {
        self.failures_in_row = 0;
        self.last_error = None;
    }

    pub fn creation_failed(&mut self, message: String) {
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        self.last_failure = Some(Instant::now());
        self.last_error = Some(message);
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
            paused: 0,
            starting: st.starting,
            total: st.total(),
            ready: st.idle.len() >= spec.min_idle.min(spec.max.saturating_sub(st.allocated)),
            last_error: st.last_error.clone(),
            cluster_idle: None,
        }
    }

    /// How much longer to wait before retrying after consecutive create failures: the
    /// back-off counts from the latest failure, so a failure that comes in while the refill
    /// waits out an earlier one's back-off extends the wait.
    pub fn backoff(&self) -> Option<Duration> {
        let st = self.state();
        let wait = backoff(st.failures_in_row)?;
        let since = st.last_failure.map_or(wait, |at| at.elapsed());
        wait.checked_sub(since).filter(|left| !left.is_zero())
    }
}

/// 100 ms after one failure, doubling up to 10 s.
fn backoff(failures: u32) -> Option<Duration> {
    (failures > 0).then(|| Duration::from_millis((50u64 << failures.min(8)).min(10_000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_reserves_up_to_min_idle_within_max() {
        let mut st = PoolState::default();
        assert_eq!(st.reserve_refill(3, 10), 3);
        assert_eq!(st.reserve_refill(3, 10), 0, "already starting");
        for _ in 0..3 {
            assert!(st.finish_start(None).is_none());
        }
        st.allocated = 9;
        assert_eq!(st.reserve_refill(3, 10), 1, "max leaves room for one");
        assert_eq!(st.total(), 10);
    }

    #[test]
    fn a_lease_beyond_max_takes_nothing() {
        let mut st = PoolState {
            allocated: 2,
            ..PoolState::default()
        };
        let lease = Lease {
            owner: None,
            env: Default::default(),
            labels: Default::default(),
            acquired_at_ms: 0,
            expires_at_ms: None,
            idle_timeout_ms: None,
            request_id: None,
        };
        assert_eq!(st.lease(2, 3, &lease).err(), Some(Exhausted { idle: 0 }));
        assert_eq!((st.starting, st.allocated), (0, 2));
        let (taken, missing) = st.lease(1, 3, &lease).expect("room for one");
        assert!(taken.is_empty());
        assert_eq!(missing, 1);
        st.finish_lease_starts(1, &[], &lease);
        assert_eq!((st.starting, st.allocated), (0, 2));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), None);
        assert_eq!(backoff(1), Some(Duration::from_millis(100)));
        assert_eq!(backoff(2), Some(Duration::from_millis(200)));
        assert_eq!(backoff(30), Some(Duration::from_secs(10)));
    }

    #[test]
    fn the_backoff_counts_from_the_latest_failure() {
        let pool = Pool::new("p".into(), PoolSpec::default());
        assert_eq!(pool.backoff(), None);
        pool.state().creation_failed("one".into());
        pool.state().creation_failed("two".into());
        let left = pool.backoff().expect("waiting");
        assert!(left <= Duration::from_millis(200), "{left:?}");
        // Waited out: none left. A new failure starts a longer wait from now.
        pool.state().last_failure = Instant::now().checked_sub(Duration::from_secs(1));
        assert_eq!(pool.backoff(), None);
        pool.state().creation_failed("three".into());
        assert!(pool.backoff().is_some());
        pool.state().creation_succeeded();
        assert_eq!(pool.backoff(), None);
    }
}
