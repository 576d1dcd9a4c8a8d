//! The one loop that searches, trainings and baselines share: advance one unit (an epoch, a sample), write its
//! record, save the state a resume continues from, say what happened, show progress, and stop when the run is
//! done, ended early, or asked to stop after some units.

use crate::rundir;
use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use tch::Device;

/// How to run (not part of the result).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run directory.
    pub out_dir: PathBuf,
    /// Where to compute.
    pub device: Device,
    /// Show progress bars on stderr (the per-unit lines are printed either way).
    pub progress: bool,
    /// Stop after this many units in this invocation (the run can be resumed later).
    pub stop_after: Option<usize>,
    /// Memory layout (use the same one to resume bit for bit).
    pub layout: crate::Layout,
    /// Turn on gradient checkpointing of cells when resuming a search (starting one, the config decides).
    pub checkpoint_cells: bool,
    /// Replay each step's passes as CUDA graphs (`--cuda-graphs`; same results, fewer launches).
    pub cuda_graphs: bool,
    /// The process group of a data-parallel run (rank 0 writes the run directory, every rank computes).
    pub dist: Option<std::sync::Arc<crate::dist::Dist>>,
    /// Also write a checkpoint after every this many steps inside an epoch (one process only).
    pub checkpoint_every: Option<usize>,
    /// Also write a checkpoint inside an epoch when this many minutes have passed since the last (one process).
    pub checkpoint_minutes: Option<f64>,
    /// Set by a signal handler: checkpoint where the loop is and stop (in a data-parallel run, all ranks at once).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RunOptions {
    /// Options for `out_dir` on `device` with progress shown, all units, the automatic layout.
    pub fn new(out_dir: PathBuf, device: Device) -> RunOptions {
        RunOptions {
            out_dir,
            device,
            progress: true,
            stop_after: None,
            layout: crate::Layout::Auto,
            checkpoint_cells: false,
            cuda_graphs: false,
            dist: None,
            checkpoint_every: None,
            checkpoint_minutes: None,
            stop: None,
        }
    }

    /// How the loops checkpoint inside epochs (in a data-parallel run every rank takes part, rank 0 writes).
    pub fn mid_epoch(&self) -> Result<crate::interrupt::MidEpoch> {
        if let Some(m) = self.checkpoint_minutes {
            anyhow::ensure!(m.is_finite() && m > 0.0, "--checkpoint-minutes {m}: give a positive number of minutes");
        }
        if let Some(0) = self.checkpoint_every {
            anyhow::bail!("--checkpoint-every 0: give a number of steps of at least 1");
        }
        Ok(crate::interrupt::MidEpoch {
            dir: self.writes().then(|| self.out_dir.clone()),
            every: self.checkpoint_every,
            every_seconds: self.checkpoint_minutes.map(|m| m * 60.0),
            last: None,
            stop: self.stop.clone(),
        })
    }

    /// Whether this process writes the run directory: always alone, rank 0 of a data-parallel run.
    pub fn writes(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.is_writer())
    }
}

/// A run that advances one unit at a time.
pub trait Stage {
    /// What one unit leaves: a line of the run's records file.
    type Record: serde::Serialize;
    /// The unit's name: "epoch" or "sample".
    const UNIT: &'static str;
    /// The records file in the run directory.
    const RECORDS: &'static str;
    /// Units done so far (earlier invocations included).
    fn done(&self) -> usize;
    /// Units the run has.
    fn total(&self) -> usize;
    /// Whether the run ended before its last unit (an early stop, a spent time budget).
    fn ended(&self) -> bool {
        false
    }
    /// Whether a unit has steps worth a second progress bar.
    fn has_steps(&self) -> bool {
        true
    }
    /// Runs the next unit.
    fn advance(&mut self, steps: Option<&ProgressBar>) -> Result<Self::Record>;
    /// Saves the state a resume continues from into `dir` (after the unit's record was written, so that a resume
    /// drops any record past the state it finds); `dir` is None in the processes of a data-parallel run that do
    /// not write, which keep their state in step all the same.
    fn save(&mut self, dir: Option<&Path>, record: &Self::Record) -> Result<()>;
    /// The line said after a unit.
    fn line(&self, record: &Self::Record) -> String;
    /// A note said after the line, if the unit calls for one.
    fn note(&self) -> Option<String> {
        None
    }
}

/// Where lines go: above the progress bars when they are shown, else to stderr.
pub struct Console {
    bars: Option<MultiProgress>,
    silent: bool,
}

impl Console {
    /// A console with progress bars (`progress`) or without.
    pub fn new(progress: bool) -> Console {
        Console { bars: progress.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())), silent: false }
    }

    /// The console of a run: silent in the processes of a data-parallel run other than rank 0.
    pub fn of(opts: &RunOptions) -> Console {
        if opts.writes() {
            Console::new(opts.progress)
        } else {
            Console { bars: None, silent: true }
        }
    }

    /// Says `line` without disturbing the bars.
    pub fn say(&self, line: impl AsRef<str>) {
        if self.silent {
            return;
        }
        match &self.bars {
            Some(mp) if !mp.is_hidden() => {
                let _ = mp.println(line.as_ref());
            }
            _ => eprintln!("{}", line.as_ref()),
        }
    }

    fn bars(&self, unit: &str, total: usize, done: usize, steps: bool) -> (Option<ProgressBar>, Option<ProgressBar>) {
        let Some(mp) = &self.bars else { return (None, None) };
        let unit_bar = mp.add(ProgressBar::new(total as u64));
        let template = format!("{unit} {{pos}}/{{len}} [{{bar:30}}] {{elapsed_precise}} eta {{eta}}");
        unit_bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        unit_bar.set_position(done as u64);
        let step_bar = steps.then(|| {
            let b = mp.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template("step  {pos}/{len} [{bar:30}] {per_sec} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        });
        (Some(unit_bar), step_bar)
    }
}

/// Runs `stage` in `opts.out_dir` until it is done, ends early, or has run `opts.stop_after` units in this
/// invocation; returns the records of the units run now.
pub fn drive<S: Stage>(stage: &mut S, opts: &RunOptions, console: &Console) -> Result<Vec<S::Record>> {
    let (unit_bar, step_bar) = console.bars(S::UNIT, stage.total(), stage.done(), stage.has_steps());
    let records = opts.out_dir.join(S::RECORDS);
    let mut ran = Vec::new();
    while stage.done() < stage.total() && !stage.ended() && opts.stop_after.is_none_or(|n| ran.len() < n) {
        let record = stage.advance(step_bar.as_ref())?;
        let dir = opts.writes().then_some(opts.out_dir.as_path());
        if dir.is_some() {
            rundir::append_record(&records, &record)?;
        }
        stage.save(dir, &record)?;
        console.say(stage.line(&record));
        if let Some(note) = stage.note() {
            console.say(note);
        }
        if let Some(b) = &unit_bar {
            b.set_position(stage.done() as u64);
        }
        ran.push(record);
    }
    for b in [&step_bar, &unit_bar].into_iter().flatten() {
        b.finish_and_clear();
    }
    Ok(ran)
}
