//! How far a run is: the caller's [`Progress`] hears it (the CLI draws a bar, Python calls
//! its callback). Nothing is global: two runs at once each tell their own listener.

/// Receives a run's progress. Every method but [`Progress::advance`] has a default that
/// ignores it; a closure `FnMut(done, total)` is a `Progress`.
///
/// ```
/// let mut seen = Vec::new();
/// {
///     let mut p = |done: u64, total: Option<u64>| seen.push((done, total));
///     hook_extract::Progress::advance(&mut p, 3, Some(10));
/// }
/// assert_eq!(seen, vec![(3, Some(10))]);
/// ```
pub trait Progress {
    /// The run starts: `resumed` examples were already in the output (a resumed chunk
    /// directory); `total` examples in all, when known.
    fn start(&mut self, resumed: u64, total: Option<u64>) {
        let _ = (resumed, total);
    }
    /// `done` examples of `total` are processed (counting resumed ones).
    fn advance(&mut self, done: u64, total: Option<u64>);
    /// A chunk directory now holds `chunks` chunks.
    fn chunk_written(&mut self, chunks: usize) {
        let _ = chunks;
    }
}

impl<F: FnMut(u64, Option<u64>)> Progress for F {
    fn advance(&mut self, done: u64, total: Option<u64>) {
        self(done, total)
    }
}

/// A [`Progress`] that ignores everything.
///
/// ```
/// hook_extract::Progress::advance(&mut hook_extract::Silent, 1, None);
/// ```
pub struct Silent;

impl Progress for Silent {
    fn advance(&mut self, _: u64, _: Option<u64>) {}
}
