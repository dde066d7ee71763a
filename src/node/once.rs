//! At-most-once execution by request id: the first caller of a key runs the work and publishes
//! its result; concurrent callers wait for it; later callers get it back. Bounded: the oldest
//! keys are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::api::ApiError;
use crate::util::MutexExt;

pub enum Claim<V> {
    /// Run the work and publish its result through the sender.
    Run(watch::Sender<Option<V>>),
    /// Another caller is running it: wait for its result.
    Wait(watch::Receiver<Option<V>>),
    /// Already done.
    Done(V),
}

pub struct OnceMap<K, V> {
    capacity: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    by_key: HashMap<K, watch::Receiver<Option<V>>>,
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V: Clone> OnceMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner {
                by_key: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        self.inner.lock_or_recover()
    }

    pub fn claim(&self, key: &K) -> Claim<V> {
        let mut inner = self.lock();
        if let Some(rx) = inner.by_key.get(key) {
            match rx.borrow().clone() {
                Some(value) => return Claim::Done(value),
                // A runner that went away without a result: this caller runs it anew.
                None if rx.has_changed().is_err() => {}
                None => return Claim::Wait(rx.clone()),
            }
        }
        let (tx, rx) = watch::channel(None);
        self.insert(&mut inner, key.clone(), rx);
        Claim::Run(tx)
    }

    fn insert(&self, inner: &mut Inner<K, V>, key: K, rx: watch::Receiver<Option<V>>) {
        if inner.by_key.insert(key.clone(), rx).is_none() {
            inner.order.push_back(key);
        }
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.by_key.remove(&old);
            }
        }
    }

    /// Records a result obtained elsewhere (a predecessor's, after a restart) as done.
    pub fn remember(&self, key: K, value: V) {
        let (_, rx) = watch::channel(Some(value));
        let mut inner = self.lock();
        self.insert(&mut inner, key, rx);
    }

    /// Forgets a key whose work failed without effect, so a retry runs it.
    pub fn forget(&self, key: &K) {
        let mut inner = self.lock();
        inner.by_key.remove(key);
        inner.order.retain(|k| k != key);
    }

    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.by_key.clear();
        inner.order.clear();
    }
}

/// Waits for the first caller's result.
pub async fn wait<V: Clone>(mut rx: watch::Receiver<Option<V>>) -> Result<V, ApiError> {
    loop {
        if let Some(value) = rx.borrow().clone() {
            return Ok(value);
        }
        if rx.changed().await.is_err() {
            return Err(ApiError::unavailable(
                "the first attempt of this request failed; retry",
            ));
        }
    }
}
