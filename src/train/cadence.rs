//! When a run's periodic work is due: log lines and checkpoints, and the
//! run loop itself ([`run_steps`]), shared by the DiT trainer and the
//! decoder trainer so both keep the same rhythm.

/// Every `every` optimizer steps (0: never), counted on `step` (steps done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// The period in steps; 0 turns it off.
    pub every: u64,
    /// The run's last step.
    pub total: u64,
}

impl Cadence {
    /// A log line: every `every` steps and at the last step.
    pub fn log_due(self, step: u64) -> bool {
        self.every > 0 && (step % self.every == 0 || step == self.total)
    }

    /// A periodic checkpoint: every `every` steps before the last (the run
    /// always checkpoints at its end).
    pub fn checkpoint_due(self, step: u64) -> bool {
        self.every > 0 && step % self.every == 0 && step < self.total
    }
}

/// A trainer [`run_steps`] drives.
pub trait RunSteps {
    /// What one step reports.
    type Stats;
    /// The trainer's error.
    type Error;
    /// Optimizer steps done and the run's last step.
    fn steps(&self) -> (u64, u64);
    /// A log line every N steps (and at the last), a checkpoint every M
    /// (and always at the end): `(N, M)`.
    fn periods(&self) -> (u64, u64);
    /// One optimizer step: the steps done after it and its stats.
    fn one_step(&mut self) -> Result<(u64, Self::Stats), Self::Error>;
    /// Append a `log.jsonl` line.
    fn write_log(&mut self, stats: &Self::Stats) -> Result<(), Self::Error>;
    /// Write a checkpoint.
    fn checkpoint(&mut self) -> Result<(), Self::Error>;
}

/// Train to the last step: log lines and checkpoints on their cadence, a
/// checkpoint at the end (when any step ran); `on_step` sees every step
/// (progress display). Returns the last step's stats.
pub fn run_steps<T: RunSteps>(
    t: &mut T,
    mut on_step: impl FnMut(&T::Stats),
) -> Result<Option<T::Stats>, T::Error> {
    run_steps_with(t, |_, s| {
        on_step(s);
        Ok(())
    })
}

/// [`run_steps`] whose per-step hook also sees the trainer (after the log
/// line, before the checkpoint), e.g. to score its EMA weights; an error
/// from the hook stops the run.
pub fn run_steps_with<T: RunSteps>(
    t: &mut T,
    mut after_step: impl FnMut(&T, &T::Stats) -> Result<(), T::Error>,
) -> Result<Option<T::Stats>, T::Error> {
    let mut last = None;
    while t.steps().0 < t.steps().1 {
        let (step, stats) = t.one_step()?;
        let total = t.steps().1;
        let (log_every, ckpt_every) = t.periods();
        let cadence = |every| Cadence { every, total };
        if cadence(log_every).log_due(step) {
            t.write_log(&stats)?;
        }
        after_step(t, &stats)?;
        if cadence(ckpt_every).checkpoint_due(step) {
            t.checkpoint()?;
        }
        last = Some(stats);
    }
    if last.is_some() {
        t.checkpoint()?;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_steps() {
        let c = Cadence { every: 3, total: 7 };
        let log: Vec<u64> = (1..=7).filter(|&s| c.log_due(s)).collect();
        let ck: Vec<u64> = (1..=7).filter(|&s| c.checkpoint_due(s)).collect();
        assert_eq!((log, ck), (vec![3, 6, 7], vec![3, 6]));
        let off = Cadence { every: 0, total: 7 };
        assert!(!(1..=7).any(|s| off.log_due(s) || off.checkpoint_due(s)));
    }
}
