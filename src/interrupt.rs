//! Stopping inside an epoch without losing it: checkpoints every N steps, and a stop asked by SIGTERM or SIGINT
//! (what SLURM and Kubernetes send before they kill), after which the loop writes where it is and ends. A
//! position inside an epoch is everything a resume needs to continue bit for bit: the step, the random streams'
//! word positions, the running sums of the epoch's metrics and its time so far.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where inside an epoch a checkpoint was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Steps of the epoch done.
    pub step: usize,
    /// The data loader's random stream: its word position after the last batch made for a done step (decimal).
    pub loader: String,
    /// The main thread's random stream (drop-path masks), its word position (decimal; empty where the loop
    /// draws none).
    #[serde(default)]
    pub masks: String,
    /// The network's stream of sample seeds (skip dropout, GDAS), where the next pass starts.
    #[serde(default)]
    pub sample_stream: Option<u64>,
    /// The epoch's running sums: loss times examples, correct predictions, examples.
    pub meter: [f64; 3],
    /// Seconds the epoch had run.
    pub seconds: f64,
    /// Seconds of those spent waiting for the data loader.
    pub waited: f64,
}

impl Position {
    /// A stream's word position as stored.
    pub fn word(pos: u128) -> String {
        pos.to_string()
    }

    /// A stored word position.
    pub fn parse_word(text: &str) -> anyhow::Result<u128> {
        use anyhow::Context;
        text.parse().with_context(|| format!("a checkpoint's stream position {text:?} is not a number"))
    }
}

/// A loop stopped by a signal after writing a checkpoint where it was: the command exits with
/// [`Interrupted::EXIT_CODE`], and the same command continues the run.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal in epoch {} after step {step}; the checkpoint holds that point: run the same command again (or --resume) to continue", epoch + 1)]
pub struct Interrupted {
    /// 0-based epoch.
    pub epoch: usize,
    /// Steps of it done.
    pub step: usize,
}

impl Interrupted {
    /// The exit code of a run stopped by a signal with its checkpoint written (EX_TEMPFAIL: try again).
    pub const EXIT_CODE: i32 = 75;
}

/// How a loop checkpoints inside its epochs.
#[derive(Clone, Debug, Default)]
pub struct MidEpoch {
    /// The run directory the checkpoints go to (None: this process does not write).
    pub dir: Option<PathBuf>,
    /// Write a checkpoint after every this many steps.
    pub every: Option<usize>,
    /// Write a checkpoint when this much time has passed since the last one (or since the loop began).
    pub every_seconds: Option<f64>,
    /// When the last checkpoint was written.
    pub last: Option<std::time::Instant>,
    /// Set (by a signal handler) to ask the loop to checkpoint and stop after its current step.
    pub stop: Option<Arc<AtomicBool>>,
}

impl MidEpoch {
    /// Whether a stop was asked.
    pub fn stop_asked(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Whether to write a checkpoint after `done` steps of `total` (not after the last: the epoch's own
    /// checkpoint follows). Counts the time from the first call when no checkpoint was written yet.
    pub fn due(&mut self, done: usize, total: usize) -> bool {
        let last = *self.last.get_or_insert_with(std::time::Instant::now);
        let timed = self.every_seconds.is_some_and(|s| last.elapsed().as_secs_f64() >= s);
        let due =
            done < total && (self.stop_asked() || timed || self.every.is_some_and(|n| n > 0 && done.is_multiple_of(n)));
        if due {
            self.last = Some(std::time::Instant::now());
        }
        due
    }
}

/// Asks every loop to stop at its next step on SIGTERM or SIGINT; a second signal ends the process at once
/// (exit code 130), as a user pressing Ctrl-C twice expects. Returns the flag to give the loops.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        // Registered first, the conditional shutdown sees the flag still unset on the first signal.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_fall_due_every_n_steps_and_on_a_stop_but_not_at_the_end() {
        let stop = Arc::new(AtomicBool::new(false));
        let mut m = MidEpoch { every: Some(3), stop: Some(stop.clone()), ..Default::default() };
        let due: Vec<usize> = (1..=10).filter(|&d| m.due(d, 10)).collect();
        assert_eq!(due, vec![3, 6, 9]);
        stop.store(true, Ordering::SeqCst);
        assert!(m.due(1, 10) && !m.due(10, 10) && m.stop_asked());
        assert!(!MidEpoch::default().due(1, 10));
        let mut timed = MidEpoch { every_seconds: Some(0.0), ..Default::default() };
        assert!(timed.due(1, 10) && timed.due(2, 10) && !timed.due(10, 10));
        let mut hourly = MidEpoch { every_seconds: Some(3600.0), ..Default::default() };
        assert!(!hourly.due(1, 10));
        assert_eq!(Position::parse_word(&Position::word(u128::MAX - 3)).unwrap(), u128::MAX - 3);
        assert!(Position::parse_word("x").is_err());
        let e = Interrupted { epoch: 1, step: 4 }.to_string();
        assert!(e.contains("epoch 2 after step 4") && e.contains("same command"), "{e}");
    }
}
