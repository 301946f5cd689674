//! How far a running command is, for callers that run it in-process ([`crate::run`]): the
//! Python package's `hookrs.extract` shows a progress bar with it. The binary draws its own
//! bar on a terminal; this is the same count.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let s = seen.clone();
//! hookrs_cli::progress::set(Some(Box::new(move |done, total| s.lock().unwrap().push((done, total)))));
//! hookrs_cli::progress::report(3, Some(10));
//! hookrs_cli::progress::set(None);
//! hookrs_cli::progress::report(4, Some(10)); // nobody listens
//! assert_eq!(*seen.lock().unwrap(), vec![(3, Some(10))]);
//! ```

use std::sync::Mutex;

/// Called with (examples done, examples in total when known).
pub type Listener = Box<dyn Fn(u64, Option<u64>) + Send>;

static LISTENER: Mutex<Option<Listener>> = Mutex::new(None);

/// Sets (or with `None` removes) the listener; returns the previous one.
pub fn set(listener: Option<Listener>) -> Option<Listener> {
    std::mem::replace(&mut *LISTENER.lock().unwrap_or_else(|p| p.into_inner()), listener)
}

/// Tells the listener, if any, that `done` examples of `total` are processed.
pub fn report(done: u64, total: Option<u64>) {
    if let Some(l) = LISTENER.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        l(done, total);
    }
}
