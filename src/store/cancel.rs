//! Cancelling a thread's store reads from outside it: a loader that is dropped while its
//! threads wait on network requests must not wait for those requests (or their timeouts and
//! retries) before the threads can be joined.
//!
//! A loader makes one [`CancelToken`], has each of its threads [`CancelToken::enter`] it, and
//! cancels it before joining them. A store whose reads can block for long (an object store)
//! looks up the calling thread's token ([`current`]) and gives up a read as soon as it is
//! cancelled, with an error. The token travels by thread rather than as an argument of every
//! read so that the storage seam keeps its shape for every caller; a thread without a token
//! reads as before.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Cancels the store reads of the threads that entered it.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

thread_local! {
    static CURRENT: RefCell<Option<CancelToken>> = const { RefCell::new(None) };
}

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads of every thread that entered this token end (with an error) as soon as they
    /// notice, and later ones fail at once.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Makes this the calling thread's token until the guard is dropped.
    pub fn enter(&self) -> CancelGuard {
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        CancelGuard { previous }
    }
}

/// Restores the thread's previous token when dropped.
#[must_use = "the token is the thread's only while the guard lives"]
pub struct CancelGuard {
    previous: Option<CancelToken>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// The calling thread's token, if it entered one.
pub fn current() -> Option<CancelToken> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_the_threads_while_entered() {
        assert!(current().is_none());
        let t = CancelToken::new();
        {
            let _g = t.enter();
            t.cancel();
            assert!(current().is_some_and(|c| c.is_cancelled()));
            std::thread::spawn(|| assert!(current().is_none()))
                .join()
                .unwrap();
        }
        assert!(current().is_none());
    }
}
