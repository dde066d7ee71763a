//! Tiny helpers with no better home.

use std::time::{SystemTime, UNIX_EPOCH};

/// Fills `buf` from the kernel's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom(2) writes at most the given length into our buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
}

/// A fresh random identifier: `prefix` followed by 16 hex digits.
pub fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    random_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An error with its causes, `outer: inner: root` (HTTP clients hide the root cause, such as
/// a refused connection or an unknown host, in the source chain).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Locks that outlive a panic. What ARL keeps under a lock (counts, queues and maps of handles)
/// stays usable after a panic in another holder, and a poisoned lock must not take every later
/// request down with it.
pub trait MutexExt<T: ?Sized> {
    fn lock_or_recover(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for std::sync::Mutex<T> {
    fn lock_or_recover(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// [`MutexExt`] for read-write locks.
pub trait RwLockExt<T: ?Sized> {
    fn read_or_recover(&self) -> std::sync::RwLockReadGuard<'_, T>;
    fn write_or_recover(&self) -> std::sync::RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for std::sync::RwLock<T> {
    fn read_or_recover(&self) -> std::sync::RwLockReadGuard<'_, T> {
        self.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_or_recover(&self) -> std::sync::RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
