//! Progress reporting from the long library runs (build, sample, decode)
//! to their caller, which decides how to show it: `rae-cache` draws bars
//! from these calls, tests and benches pass [`NoProgress`]. Training
//! reports through `Trainer::run`'s `on_step` callback instead.

/// Where a long run reports how far it has got; every method defaults to
/// doing nothing.
pub trait Progress {
    /// The run will process `total` items (after a resume, those left).
    fn start(&mut self, total: u64) {
        let _ = total;
    }
    /// `n` more items are done (a build: images encoded or rejected, in
    /// key order; sampling: samples; decoding: images).
    fn advance(&mut self, n: u64) {
        let _ = n;
    }
    /// Every item is done (a build's statistics follow).
    fn finish(&mut self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
