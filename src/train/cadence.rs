//! When a run's periodic work is due: log lines and checkpoints, shared by
//! the DiT trainer and the decoder trainer so both keep the same rhythm.

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
