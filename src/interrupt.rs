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

/// Every rank's position inside an epoch, in a checkpoint written inside an epoch of a data-parallel run (rank
/// 0's is also the checkpoint's own `position`). The ranks' BatchNorm statistics are not in it: every rank takes
/// rank 0's at the end of each epoch (as DDP's broadcast_buffers), before anything reads them, so the other
/// ranks' statistics inside an epoch never reach a result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankPositions {
    /// The number of processes that wrote it.
    pub world: usize,
    /// Each rank's position, by rank.
    pub positions: Vec<Position>,
}

/// Values of a position that travel in a collective: float64s, integers split into exact 32-bit parts.
const POSITION_F64S: usize = 18;

fn split_u128(v: u128) -> [f64; 4] {
    [0, 32, 64, 96].map(|s| ((v >> s) & 0xffff_ffff) as f64)
}

fn join_u128(p: &[f64]) -> u128 {
    p.iter().enumerate().fold(0u128, |acc, (i, &v)| acc | ((v as u128) << (32 * i)))
}

impl Position {
    fn to_f64s(&self) -> anyhow::Result<Vec<f64>> {
        let mut v = vec![self.step as f64];
        v.extend(split_u128(Position::parse_word(&self.loader)?));
        let masks = if self.masks.is_empty() { None } else { Some(Position::parse_word(&self.masks)?) };
        v.push(masks.is_some() as u8 as f64);
        v.extend(split_u128(masks.unwrap_or(0)));
        v.push(self.sample_stream.is_some() as u8 as f64);
        v.extend(split_u128(self.sample_stream.unwrap_or(0) as u128)[..2].iter().copied());
        v.extend(self.meter);
        v.extend([self.seconds, self.waited]);
        debug_assert_eq!(v.len(), POSITION_F64S);
        Ok(v)
    }

    fn from_f64s(v: &[f64]) -> Position {
        Position {
            step: v[0] as usize,
            loader: Position::word(join_u128(&v[1..5])),
            masks: if v[5] > 0.0 { Position::word(join_u128(&v[6..10])) } else { String::new() },
            sample_stream: (v[10] > 0.0).then(|| join_u128(&v[11..13]) as u64),
            meter: [v[13], v[14], v[15]],
            seconds: v[16],
            waited: v[17],
        }
    }
}

/// Gathers every rank's `own` position for a checkpoint inside an epoch of a data-parallel run (`dist`; None for
/// one process): every rank calls it at the same step; rank 0 writes the result.
pub fn gather_positions(dist: Option<&crate::dist::Dist>, own: &Position) -> anyhow::Result<Option<RankPositions>> {
    let Some(d) = dist else { return Ok(None) };
    let (rank, world) = (d.rank(), d.world());
    let mut rows = vec![0.0; world * POSITION_F64S];
    rows[rank * POSITION_F64S..(rank + 1) * POSITION_F64S].copy_from_slice(&own.to_f64s()?);
    // Every other row is zero: the sum is each rank's own values, exactly.
    let all = d.sum_f64(&rows)?;
    Ok(Some(RankPositions { world, positions: all.chunks(POSITION_F64S).map(Position::from_f64s).collect() }))
}

impl RankPositions {
    /// This process's position in the run of `dist` (None: one process); an error when the run now has another
    /// number of processes.
    pub fn take(self, dist: Option<&crate::dist::Dist>) -> anyhow::Result<Position> {
        let (rank, world) = dist.map_or((0, 1), |d| (d.rank(), d.world()));
        let w = self.world;
        anyhow::ensure!(
            w == world,
            "the checkpoint was written inside an epoch by {w} processes, and each one's place in the data is in it: \
             continue it with {w} processes (torchrun --nproc-per-node {w}, the same command as before){}",
            if world == 1 { "; one process cannot take it over" } else { "" }
        );
        Ok(self.positions[rank].clone())
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

    /// Whether to write a checkpoint after `done` steps of `total`, and whether to stop after it. In a
    /// data-parallel run (`dist`) the ranks agree (one small all-reduce per step, when a time limit or a stop
    /// signal can make a rank's answer its own): any rank's clock or signal makes every rank checkpoint, and a
    /// signal to any rank stops them all at the same step.
    pub fn decide(
        &mut self,
        done: usize,
        total: usize,
        dist: Option<&crate::dist::Dist>,
    ) -> anyhow::Result<(bool, bool)> {
        let Some(d) = dist else {
            let due = self.due(done, total);
            return Ok((due, due && self.stop_asked()));
        };
        if done >= total {
            return Ok((false, false));
        }
        let last = *self.last.get_or_insert_with(std::time::Instant::now);
        let counted = self.every.is_some_and(|n| n > 0 && done.is_multiple_of(n));
        let (mut timed, mut stop) = (false, false);
        if self.every_seconds.is_some() || self.stop.is_some() {
            let local_timed = self.every_seconds.is_some_and(|s| last.elapsed().as_secs_f64() >= s);
            let v = d.sum_f64(&[local_timed as u8 as f64, self.stop_asked() as u8 as f64])?;
            (timed, stop) = (v[0] > 0.0, v[1] > 0.0);
        }
        let due = counted || timed || stop;
        if due {
            self.last = Some(std::time::Instant::now());
        }
        Ok((due, stop))
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
        let p = Position {
            step: 7,
            loader: Position::word(u128::MAX - 5),
            masks: Position::word(1 << 70),
            sample_stream: Some(u64::MAX - 1),
            meter: [1.5, 3.0, 64.0],
            seconds: 2.25,
            waited: 0.5,
        };
        assert_eq!(Position::from_f64s(&p.to_f64s().unwrap()), p);
        let q = Position { masks: String::new(), sample_stream: None, ..p };
        assert_eq!(Position::from_f64s(&q.to_f64s().unwrap()), q);
        let e = Interrupted { epoch: 1, step: 4 }.to_string();
        assert!(e.contains("epoch 2 after step 4") && e.contains("same command"), "{e}");
    }
}
