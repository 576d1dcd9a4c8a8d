//! Search and training runs in their run directories: start one, resume one, or in a pipeline either as the
//! directory requires; each run advances through [`crate::driver::drive`], and a trained model is evaluated
//! from its directory.

use crate::driver::{drive, Console, Stage};
use crate::evaluate::EvalResult;
use crate::genotype::Genotype;
use crate::rundir::{self, Best, EpochStats, TrainStats};
use crate::search::{Search, SearchConfig};
use crate::train::{TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use std::path::Path;
use tch::Device;

pub use crate::driver::RunOptions;

/// What a search leaves behind.
#[derive(Debug)]
pub struct RunOutcome {
    /// Per-epoch statistics of the epochs run in this invocation.
    pub epochs: Vec<EpochStats>,
    /// The genotype at the end of the last epoch run.
    pub genotype: Genotype,
    /// Whether all configured epochs are done (or the early stop ended the search).
    pub finished: bool,
    /// The final softmax(alpha) (normal, reduce).
    pub alphas: (Vec<Vec<f64>>, Vec<Vec<f64>>),
}

/// A search as the driver advances it.
struct SearchStage {
    search: Search,
    stopped_now: bool,
}

impl Stage for SearchStage {
    type Record = EpochStats;
    const UNIT: &'static str = "epoch";
    const RECORDS: &'static str = rundir::METRICS;

    fn done(&self) -> usize {
        self.search.epoch
    }

    fn total(&self) -> usize {
        self.search.config.epochs
    }

    fn ended(&self) -> bool {
        self.search.stopped_early
    }

    fn advance(&mut self, steps: Option<&ProgressBar>) -> Result<EpochStats> {
        let stats = self.search.run_epoch(steps)?;
        self.stopped_now = self.search.check_early_stop();
        Ok(stats)
    }

    fn save(&mut self, dir: Option<&Path>, _: &EpochStats) -> Result<()> {
        dir.map_or(Ok(()), |d| self.search.save_checkpoint(d))
    }

    fn line(&self, s: &EpochStats) -> String {
        format!(
            "epoch {}/{}: lr {:.5} train loss {:.4} acc {:.2}% | alpha-split loss {:.4} acc {:.2}% | {:.1}s (waited \
             {:.1}% for data)\n  genotype {}",
            s.epoch + 1,
            self.search.config.epochs,
            s.lr,
            s.train_loss,
            100.0 * s.train_acc,
            s.val_loss,
            100.0 * s.val_acc,
            s.seconds,
            100.0 * s.data_wait_seconds / s.seconds.max(1e-9),
            s.genotype
        )
    }

    fn note(&self) -> Option<String> {
        self.stopped_now.then(|| {
            format!(
                "early stop after epoch {}: the normal cell has {} skip connections (--early-stop-skip-connects {}), \
                 the sign of skip-connection collapse (DARTS+); this epoch's genotype is the result",
                self.search.epoch,
                crate::genotype::skip_connects(&self.search.unrestricted_genotype().normal),
                self.search.config.early_stop_skip_connects.unwrap_or_default()
            )
        })
    }
}

/// Starts a new search in `opts.out_dir` (which must not hold one already).
pub fn start(config: SearchConfig, opts: &RunOptions) -> Result<RunOutcome> {
    if let Some(d) = &opts.dist {
        d.check_same_settings(&serde_json::to_value(&config)?)?;
    }
    let _lock = if opts.writes() {
        rundir::create(&opts.out_dir, "search", rundir::CHECKPOINT)?;
        Some(rundir::RunLock::acquire(&opts.out_dir)?)
    } else if opts.out_dir.join(rundir::CHECKPOINT).exists() {
        // Every rank refuses an occupied directory itself, so that none waits for a rank 0 that stopped.
        bail!("{} already holds a search; continue it with --resume, or choose another --out", opts.out_dir.display());
    } else {
        None
    };
    let mut search = Search::new(config, opts.device)?;
    search.set_channels_last(opts.layout.channels_last(opts.device));
    if let Some(d) = &opts.dist {
        search.set_dist(d.clone())?;
    }
    search.set_cuda_graphs(opts.cuda_graphs)?;
    if opts.writes() {
        rundir::write_json(&opts.out_dir.join(rundir::CONFIG), &search.config)?;
        let _ = std::fs::remove_file(opts.out_dir.join(rundir::METRICS));
    }
    run_search(search, opts)
}

/// Starts the search in `opts.out_dir`, or continues the one there when it has the same settings (the same
/// command again: from its checkpoint, or afresh when it stopped before its first); other settings are refused
/// with what differs.
pub fn start_or_continue(config: SearchConfig, opts: &RunOptions) -> Result<RunOutcome> {
    let file = opts.out_dir.join(rundir::CONFIG);
    if file.is_file() {
        same_settings(&file, &config, "search")?;
        return resume(opts);
    }
    start(config, opts)
}

/// Continues the search saved in `opts.out_dir`; one stopped before its first checkpoint starts again from its
/// `config.json`, as its first start did.
pub fn resume(opts: &RunOptions) -> Result<RunOutcome> {
    rundir::check_format(&opts.out_dir)?;
    if !opts.out_dir.join(rundir::CHECKPOINT).is_file() && opts.out_dir.join(rundir::CONFIG).is_file() {
        let config: SearchConfig = rundir::read_json(&opts.out_dir.join(rundir::CONFIG))?;
        if opts.writes() {
            eprintln!("{} stopped before its first checkpoint: starting it again", opts.out_dir.display());
        }
        return start(config, opts);
    }
    let mut search = Search::resume(&opts.out_dir, opts.device)?;
    let _lock = opts.writes().then(|| rundir::RunLock::acquire(&opts.out_dir)).transpose()?;
    search.set_channels_last(opts.layout.channels_last(opts.device));
    if opts.checkpoint_cells {
        search.set_checkpoint_cells(true);
    }
    if let Some(d) = &opts.dist {
        search.set_dist(d.clone())?;
    }
    search.set_cuda_graphs(opts.cuda_graphs)?;
    if opts.writes() {
        rundir::keep_records(&opts.out_dir.join(rundir::METRICS), search.epoch)?;
        eprintln!("resuming {} at epoch {} of {}", opts.out_dir.display(), search.epoch + 1, search.config.epochs);
    }
    run_search(search, opts)
}

fn run_search(mut search: Search, opts: &RunOptions) -> Result<RunOutcome> {
    let cfg = search.config.clone();
    let console = Console::of(opts);
    console.say(format!(
        "search: {} ({} examples), split {} for weights / {} for alpha, disjoint (checked: no example in both){}",
        cfg.dataset.name(),
        search.split.train.len() + search.split.val.len(),
        search.split.train.len(),
        search.split.val.len(),
        if cfg.balanced_split { ", class-balanced" } else { "" }
    ));
    console.say(format!(
        "supernet: {} cells, {} nodes, C={}, {} ops, {} weight parameters, {:?}-order, device {:?}{}{}{}",
        cfg.space.layers,
        cfg.space.nodes,
        cfg.space.channels,
        cfg.space.ops.len(),
        search.parameter_count(),
        cfg.order,
        opts.device,
        if cfg.space.partial_channels > 1 {
            format!(", partial channels 1/{}", cfg.space.partial_channels)
        } else {
            String::new()
        },
        if cfg.space.edge_normalization { ", edge normalisation" } else { "" },
        if cfg.checkpoint_cells { ", checkpointed cells" } else { "" }
    ));
    search.mid_epoch = opts.mid_epoch()?;
    let mut stage = SearchStage { search, stopped_now: false };
    let epochs = drive(&mut stage, opts, &console)?;
    let search = stage.search;
    let genotype = search.genotype();
    let finished = search.epoch >= cfg.epochs || search.stopped_early;
    let skips = crate::genotype::skip_connects(&search.unrestricted_genotype().normal);
    if finished && cfg.max_skip_connects.is_none() && skips >= 3 {
        console.say(format!(
            "warning: the normal cell has {skips} skip connections: DARTS's known skip-connection collapse \
             (parameter-free cells train poorly). --max-skip-connects 2 derives at most 2 (P-DARTS), \
             --early-stop-skip-connects 2 stops the search when they appear (DARTS+), --skip-dropout 0.4 handicaps \
             skip connections while the weights train (P-DARTS), --auxiliary-skip gives every edge a decaying skip \
             connection so that alpha need not (DARTS-)"
        ));
    }
    if finished && opts.writes() {
        rundir::write_genotype(&opts.out_dir, &genotype)?;
        let all: Vec<EpochStats> = rundir::read_records(&opts.out_dir.join(rundir::METRICS))?;
        if let Some(d) = rundir::decision(&cfg.space, &all) {
            console.say(format!(
                "how decided the cell is (a choice is within noise when its margin over the runner-up is not larger \
                 than the weights moved in the last epoch):\n  normal: {}\n  reduce: {}{}",
                d.normal.summary(),
                d.reduce.summary(),
                if d.settled() {
                    ""
                } else {
                    "\n  choices within noise could flip with more epochs: search longer (--epochs) or compare seeds \
                     (--seed) before trusting them"
                }
            ));
        }
    }
    Ok(RunOutcome { epochs, genotype, finished, alphas: search.net.alphas.softmax() })
}

/// The search stage of a pipeline in `opts.out_dir`: the genotype of a finished search there, else the search
/// resumed from its checkpoint, else a new search with `config`. Returns the genotype and whether it is final.
pub fn search_or_resume(config: SearchConfig, opts: &RunOptions) -> Result<(Genotype, bool)> {
    let started = opts.out_dir.join(rundir::CONFIG).is_file();
    if started {
        same_settings(&opts.out_dir.join(rundir::CONFIG), &config, "search")?;
    }
    if let Some(g) = rundir::read_genotype(&opts.out_dir)? {
        if opts.writes() {
            eprintln!("search already finished in {}", opts.out_dir.display());
        }
        return Ok((g, true));
    }
    let out = if started { resume(opts)? } else { start(config, opts)? };
    Ok((out.genotype, out.finished))
}

/// Refuses to continue the run whose settings are in `file` with other settings than `new`, naming each
/// setting that differs (gradient checkpointing aside: it changes memory, not results).
pub fn same_settings<T: serde::Serialize>(file: &Path, new: &T, stage: &str) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let old: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", file.display()))?;
    let new = serde_json::to_value(new)?;
    let mut diffs = Vec::new();
    if let (Some(o), Some(n)) = (old.as_object(), new.as_object()) {
        for (key, nv) in n {
            let ov = o.get(key).unwrap_or(&serde_json::Value::Null);
            if key != "checkpoint_cells" && ov != nv {
                diffs.push(format!("{key}: {ov} in the run, {nv} now"));
            }
        }
    }
    if !diffs.is_empty() {
        bail!(
            "{} holds a {stage} with other settings, and a run's settings are fixed:\n  {}\nRun the command that \
             started it to continue it, or choose another --out for a new run",
            file.parent().map_or(file, |p| p).display(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

/// What a training run leaves behind.
#[derive(Debug)]
pub struct TrainOutcome {
    /// Per-epoch statistics of the epochs run in this invocation.
    pub epochs: Vec<TrainStats>,
    /// Whether all configured epochs are done.
    pub finished: bool,
    /// Test-set results of the last weights (what darts reports, as the original does).
    pub last: EvalResult,
    /// With a validation split: the epoch `model-best` holds, chosen on validation accuracy.
    pub best: Option<Best>,
}

/// A training as the driver advances it.
struct TrainStage {
    trainer: Trainer,
}

impl Stage for TrainStage {
    type Record = TrainStats;
    const UNIT: &'static str = "epoch";
    const RECORDS: &'static str = rundir::METRICS;

    fn done(&self) -> usize {
        self.trainer.epoch
    }

    fn total(&self) -> usize {
        self.trainer.config.epochs
    }

    fn advance(&mut self, steps: Option<&ProgressBar>) -> Result<TrainStats> {
        self.trainer.run_epoch(steps)
    }

    fn save(&mut self, dir: Option<&Path>, stats: &TrainStats) -> Result<()> {
        let t = &mut self.trainer;
        if let Some(dir) = dir {
            t.save_weights(&dir.join(rundir::MODEL_LAST))?;
        }
        if let Some(acc) = stats.valid_acc {
            if t.best.is_none_or(|b| acc > b.valid_acc) {
                if let Some(dir) = dir {
                    t.save_weights(&dir.join(rundir::MODEL_BEST))?;
                }
                t.best = Some(Best { epoch: stats.epoch, valid_acc: acc });
            }
        }
        dir.map_or(Ok(()), |d| t.save_checkpoint(d))
    }

    fn line(&self, s: &TrainStats) -> String {
        format!(
            "epoch {}/{}: lr {:.5} drop path {:.3} train loss {:.4} acc {:.2}%{} | test loss {:.4} acc {:.2}%{} | \
             {:.1}s (waited {:.1}% for data)",
            s.epoch + 1,
            self.trainer.config.epochs,
            s.lr,
            s.drop_path,
            s.train_loss,
            100.0 * s.train_acc,
            s.valid_acc.map_or(String::new(), |v| format!(" | validation acc {:.2}%", 100.0 * v)),
            s.test_loss,
            100.0 * s.test_acc,
            s.test_top5.map_or(String::new(), |t5| format!(" top-5 {:.2}%", 100.0 * t5)),
            s.seconds,
            100.0 * s.data_wait_seconds / s.seconds.max(1e-9)
        )
    }
}

/// Starts training in `opts.out_dir`: `train-config.json`, `genotype.json/.txt`, `metrics.jsonl`, a checkpoint
/// per epoch, `model-last.safetensors`, and with a validation split `model-best.safetensors` (the epoch of best
/// validation accuracy; the test set is never used to choose).
pub fn start_training(config: TrainConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    if let Some(d) = &opts.dist {
        d.check_same_settings(&serde_json::to_value(&config)?)?;
    }
    let _lock = if opts.writes() {
        rundir::create(&opts.out_dir, "run", rundir::CHECKPOINT)?;
        Some(rundir::RunLock::acquire(&opts.out_dir)?)
    } else if opts.out_dir.join(rundir::CHECKPOINT).exists() {
        // Every rank refuses an occupied directory itself, so that none waits for a rank 0 that stopped.
        bail!("{} already holds a run; continue it with --resume, or choose another --out", opts.out_dir.display());
    } else {
        None
    };
    let mut trainer = Trainer::new(config, opts.device)?;
    trainer.set_channels_last(opts.layout.channels_last(opts.device));
    if let Some(d) = &opts.dist {
        trainer.set_dist(d.clone());
    }
    trainer.set_cuda_graphs(opts.cuda_graphs)?;
    if opts.writes() {
        rundir::write_json(&opts.out_dir.join(rundir::TRAIN_CONFIG), &trainer.config)?;
        rundir::write_genotype(&opts.out_dir, &trainer.config.genotype)?;
        rundir::write_json(&opts.out_dir.join(rundir::NETWORK), &trainer.cost())?;
        let card = crate::deploy::ModelCard::of_training(&trainer.config, trainer.train_data())?;
        rundir::write_json(&opts.out_dir.join(rundir::MODEL_CARD), &card)?;
        let _ = std::fs::remove_file(opts.out_dir.join(rundir::METRICS));
    }
    run_training(trainer, opts)
}

/// Starts the training in `opts.out_dir`, or continues the one there when it has the same settings (the same
/// command again); other settings are refused with what differs.
pub fn start_or_continue_training(config: TrainConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    let file = opts.out_dir.join(rundir::TRAIN_CONFIG);
    if file.is_file() {
        same_settings(&file, &config, "training")?;
        return resume_training(opts);
    }
    start_training(config, opts)
}

/// Continues the training run saved in `opts.out_dir`; one stopped before its first checkpoint starts again
/// from its `train-config.json`, as its first start did.
pub fn resume_training(opts: &RunOptions) -> Result<TrainOutcome> {
    rundir::check_format(&opts.out_dir)?;
    if !opts.out_dir.join(rundir::CHECKPOINT).is_file() && opts.out_dir.join(rundir::TRAIN_CONFIG).is_file() {
        let config: TrainConfig = rundir::read_json(&opts.out_dir.join(rundir::TRAIN_CONFIG))?;
        if opts.writes() {
            eprintln!("{} stopped before its first checkpoint: starting it again", opts.out_dir.display());
        }
        return start_training(config, opts);
    }
    let mut trainer = Trainer::resume(&opts.out_dir, opts.device)?;
    let _lock = opts.writes().then(|| rundir::RunLock::acquire(&opts.out_dir)).transpose()?;
    trainer.set_channels_last(opts.layout.channels_last(opts.device));
    if let Some(d) = &opts.dist {
        trainer.set_dist(d.clone());
    }
    trainer.set_cuda_graphs(opts.cuda_graphs)?;
    if opts.writes() {
        rundir::keep_records(&opts.out_dir.join(rundir::METRICS), trainer.epoch)?;
        eprintln!("resuming {} at epoch {} of {}", opts.out_dir.display(), trainer.epoch + 1, trainer.config.epochs);
    }
    run_training(trainer, opts)
}

/// The training stage of a pipeline in `opts.out_dir`: resumed from its checkpoint if there is one (a finished
/// training returns at once), else a new training with `config`.
pub fn train_or_resume(config: TrainConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    start_or_continue_training(config, opts)
}

fn run_training(mut trainer: Trainer, opts: &RunOptions) -> Result<TrainOutcome> {
    let cfg = trainer.config.clone();
    let console = Console::of(opts);
    let (n_train, n_valid, n_test) = trainer.sizes();
    let valid =
        if n_valid > 0 { format!(" / {n_valid} held-out validation (chooses model-best)") } else { String::new() };
    console.say(format!(
        "train: {} ({n_train} training{valid} / {n_test} test examples), C={}, {} cells, auxiliary {}, {} parameters \
         (auxiliary head excluded), device {:?}\n  genotype {}",
        cfg.dataset.name(),
        cfg.network.channels,
        cfg.network.layers,
        cfg.network.auxiliary,
        trainer.parameter_count(),
        opts.device,
        cfg.genotype
    ));
    trainer.mid_epoch = opts.mid_epoch()?;
    let mut stage = TrainStage { trainer };
    let epochs = drive(&mut stage, opts, &console)?;
    let t = stage.trainer;
    let last = t.evaluate()?;
    Ok(TrainOutcome { epochs, finished: t.epoch >= cfg.epochs, last, best: t.best })
}

pub use crate::rundir::Which;

/// Loads a trained model from a training run directory and evaluates it on the test set.
pub fn evaluate_model(
    dir: &Path,
    which: Which,
    device: Device,
    layout: crate::Layout,
) -> Result<crate::evaluate::EvalResult> {
    evaluate_model_in(dir, which, device, layout, None)
}

/// [`evaluate_model`], the test set shared out over the processes of `dist` when given.
pub fn evaluate_model_in(
    dir: &Path,
    which: Which,
    device: Device,
    layout: crate::Layout,
    dist: Option<std::sync::Arc<crate::dist::Dist>>,
) -> Result<crate::evaluate::EvalResult> {
    let dir = &rundir::training_dir(dir);
    let cfg_path = dir.join(rundir::TRAIN_CONFIG);
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{} is not a training run directory (no train-config.json)", dir.display()))?;
    let cfg: crate::train::TrainConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", cfg_path.display()))?;
    if which == Which::Best && cfg.valid_portion <= 0.0 {
        bail!(
            "{} has no validation split, so there is no best model to evaluate: a best model is chosen on a \
             held-out part of the training set (darts train --valid-portion 0.1), never on the test set (the \
             model-best.safetensors of earlier darts versions was chosen on the test set). Use --which last",
            dir.display()
        );
    }
    let mut t = crate::train::Trainer::new(cfg, device)?;
    let weights = dir.join(which.file_name());
    let map = crate::params::read_tensors(&weights)?;
    t.set_channels_last(layout.channels_last(device));
    t.load_model(&map, &weights)?;
    if let Some(d) = dist {
        t.set_dist(d);
    }
    t.evaluate()
}
