//! A search run in a directory: config.json, metrics.jsonl (one JSON line per epoch), an atomic checkpoint
//! per epoch, and genotype.json / genotype.txt at the end. Resuming continues from the last checkpoint.

use crate::genotype::Genotype;
use crate::search::{EpochStats, Search, SearchConfig};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Device;

/// How to run (not part of the result).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run directory.
    pub out_dir: PathBuf,
    /// Where to compute.
    pub device: Device,
    /// Show progress bars and per-epoch lines on stderr.
    pub progress: bool,
    /// Stop after this many epochs in this invocation (the run can be resumed later).
    pub stop_after: Option<usize>,
    /// Memory layout (use the same one to resume bit for bit).
    pub layout: crate::Layout,
    /// Turn on gradient checkpointing of cells when resuming a search (starting one, the config decides).
    pub checkpoint_cells: bool,
}

impl RunOptions {
    /// Options for `out_dir` on `device` with progress shown, all epochs, the automatic layout.
    pub fn new(out_dir: PathBuf, device: Device) -> RunOptions {
        RunOptions {
            out_dir,
            device,
            progress: true,
            stop_after: None,
            layout: crate::Layout::Auto,
            checkpoint_cells: false,
        }
    }
}

/// What a run leaves behind.
#[derive(Debug)]
pub struct RunOutcome {
    /// Per-epoch statistics of the epochs run in this invocation.
    pub epochs: Vec<EpochStats>,
    /// The genotype at the end of the last epoch run.
    pub genotype: Genotype,
    /// Whether all configured epochs are done.
    pub finished: bool,
    /// The final softmax(alpha) (normal, reduce).
    pub alphas: (Vec<Vec<f64>>, Vec<Vec<f64>>),
}

/// The checkpoint file of search and training runs.
const CHECKPOINT: &str = "checkpoint.safetensors";

/// A fresh run directory name under `runs/`: `runs/<kind>-YYYYMMDD-HHMMSS` (UTC).
pub fn default_dir(kind: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from(format!("runs/{kind}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
}

fn say(progress: Option<&MultiProgress>, line: String) {
    match progress {
        Some(mp) if !mp.is_hidden() => {
            let _ = mp.println(line);
        }
        _ => eprintln!("{line}"),
    }
}

/// Creates `opts.out_dir` for a new `kind`, refusing a directory that already holds one (its `marker` file, the
/// state a resume reads, is there).
pub(crate) fn new_run_dir(opts: &RunOptions, kind: &str, marker: &str) -> Result<()> {
    if opts.out_dir.join(marker).exists() {
        bail!(
            "{} already holds a {kind}; continue it with --resume {0}, or choose another --out",
            opts.out_dir.display()
        );
    }
    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))
}

/// Starts a new search in `opts.out_dir` (which must not hold one already).
pub fn start(config: SearchConfig, opts: &RunOptions) -> Result<RunOutcome> {
    new_run_dir(opts, "search", CHECKPOINT)?;
    let mut search = Search::new(config, opts.device)?;
    search.set_channels_last(opts.layout.channels_last(opts.device));
    std::fs::write(opts.out_dir.join("config.json"), serde_json::to_string_pretty(&search.config)?)?;
    let _ = std::fs::remove_file(opts.out_dir.join("metrics.jsonl"));
    drive(search, opts)
}

/// Continues the search saved in `opts.out_dir`.
pub fn resume(opts: &RunOptions) -> Result<RunOutcome> {
    let mut search = Search::resume(&opts.out_dir, opts.device)?;
    search.set_channels_last(opts.layout.channels_last(opts.device));
    if opts.checkpoint_cells {
        search.set_checkpoint_cells(true);
    }
    truncate_metrics(&opts.out_dir, search.epoch)?;
    eprintln!("resuming {} at epoch {} of {}", opts.out_dir.display(), search.epoch + 1, search.config.epochs);
    drive(search, opts)
}

fn drive(mut search: Search, opts: &RunOptions) -> Result<RunOutcome> {
    let cfg = search.config.clone();
    let mp = opts.progress.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    say(
        mp.as_ref(),
        format!(
            "search: {} ({} examples), split {} for weights / {} for alpha, disjoint (checked: no example in \
             both){}",
            cfg.dataset.name(),
            search.split.train.len() + search.split.val.len(),
            search.split.train.len(),
            search.split.val.len(),
            if cfg.balanced_split { ", class-balanced" } else { "" }
        ),
    );
    say(
        mp.as_ref(),
        format!(
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
            if search.config.checkpoint_cells { ", checkpointed cells" } else { "" }
        ),
    );
    let (epoch_bar, step_bar) = bars(mp.as_ref(), cfg.epochs, search.epoch);
    let mut done = Vec::new();
    let mut ran = 0;
    while search.epoch < cfg.epochs && !search.stopped_early && opts.stop_after.is_none_or(|n| ran < n) {
        let stats = search.run_epoch(step_bar.as_ref())?;
        let stop = search.check_early_stop();
        search.save_checkpoint(&opts.out_dir)?;
        append_metrics(&opts.out_dir, &stats)?;
        say(
            mp.as_ref(),
            format!(
                "epoch {}/{}: lr {:.5} train loss {:.4} acc {:.2}% | alpha-split loss {:.4} acc {:.2}% | {:.1}s \
                 (waited {:.1}% for data)\n  genotype {}",
                stats.epoch + 1,
                cfg.epochs,
                stats.lr,
                stats.train_loss,
                100.0 * stats.train_acc,
                stats.val_loss,
                100.0 * stats.val_acc,
                stats.seconds,
                100.0 * stats.data_wait_seconds / stats.seconds.max(1e-9),
                stats.genotype
            ),
        );
        if let Some(b) = &epoch_bar {
            b.set_position(search.epoch as u64);
        }
        done.push(stats);
        ran += 1;
        if stop {
            say(
                mp.as_ref(),
                format!(
                    "early stop after epoch {}: the normal cell has {} skip connections (--early-stop-skip-connects \
                     {}), the sign of skip-connection collapse (DARTS+); this epoch's genotype is the result",
                    search.epoch,
                    crate::genotype::skip_connects(&search.unrestricted_genotype().normal),
                    cfg.early_stop_skip_connects.unwrap_or_default()
                ),
            );
        }
    }
    for b in [&step_bar, &epoch_bar].into_iter().flatten() {
        b.finish_and_clear();
    }
    let genotype = search.genotype();
    let finished = search.epoch >= cfg.epochs || search.stopped_early;
    let skips = crate::genotype::skip_connects(&search.unrestricted_genotype().normal);
    if finished && cfg.max_skip_connects.is_none() && skips >= 3 {
        say(
            mp.as_ref(),
            format!(
                "warning: the normal cell has {skips} skip connections: DARTS's known skip-connection collapse \
                 (parameter-free cells train poorly). --max-skip-connects 2 derives at most 2 (P-DARTS), \
                 --early-stop-skip-connects 2 stops the search when they appear (DARTS+), --skip-dropout 0.4 \
                 handicaps skip connections while the weights train (P-DARTS), --auxiliary-skip gives every edge a \
                 decaying skip connection so that alpha need not (DARTS-)"
            ),
        );
    }
    if finished {
        write_genotype(&opts.out_dir, &genotype)?;
        let metrics = std::fs::read_to_string(opts.out_dir.join("metrics.jsonl")).unwrap_or_default();
        let epochs: Vec<EpochStats> = metrics.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if let Some(d) = crate::search::decision(&cfg.space, &epochs) {
            say(
                mp.as_ref(),
                format!(
                    "how decided the cell is (a choice is within noise when its margin over the runner-up is not \
                     larger than the weights moved in the last epoch):\n  normal: {}\n  reduce: {}{}",
                    d.normal.summary(),
                    d.reduce.summary(),
                    if d.settled() {
                        String::new()
                    } else {
                        "\n  choices within noise could flip with more epochs: search longer (--epochs) or compare \
                         seeds (--seed) before trusting them"
                            .to_string()
                    }
                ),
            );
        }
    }
    write_report(&opts.out_dir);
    Ok(RunOutcome { epochs: done, genotype, finished, alphas: search.net.alphas.softmax() })
}

/// The search stage of a pipeline in `opts.out_dir`: the genotype of a finished search there, else the search
/// resumed from its checkpoint, else a new search with `config`. Returns the genotype and whether it is final.
pub fn search_or_resume(config: SearchConfig, opts: &RunOptions) -> Result<(Genotype, bool)> {
    let genotype_file = opts.out_dir.join("genotype.json");
    if opts.out_dir.join(CHECKPOINT).is_file() {
        same_settings(&opts.out_dir.join("config.json"), &config, "search")?;
    }
    if genotype_file.is_file() {
        eprintln!("search already finished in {}", opts.out_dir.display());
        return Ok((Genotype::from_json(&std::fs::read_to_string(&genotype_file)?)?, true));
    }
    let out = if opts.out_dir.join(CHECKPOINT).is_file() { resume(opts)? } else { start(config, opts)? };
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

/// The training stage of a pipeline in `opts.out_dir`: resumed from its checkpoint if there is one (a finished
/// training returns at once), else a new training with `config`.
pub fn train_or_resume(config: crate::train::TrainConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    if opts.out_dir.join(CHECKPOINT).is_file() {
        same_settings(&opts.out_dir.join("train-config.json"), &config, "training")?;
        resume_training(opts)
    } else {
        start_training(config, opts)
    }
}

/// Seconds a search or training run directory's epochs took, from its `metrics.jsonl` (all invocations).
pub fn metrics_seconds(dir: &Path) -> f64 {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .sum()
}

/// Writes `report.html` and `figures/` for the run directory `dir` and says where. A failure is only a
/// warning: the run's results are saved already, and `darts report DIR` tries again.
pub fn write_report(dir: &Path) {
    match crate::report::write_report(dir) {
        Ok(path) => eprintln!("report: {}", path.display()),
        Err(e) => {
            eprintln!("warning: could not write the report ({e:#}); `darts report {}` tries again", dir.display())
        }
    }
}

/// Writes `genotype.json` and `genotype.txt` (DARTS Python text) into `dir`.
pub fn write_genotype(dir: &Path, g: &Genotype) -> Result<()> {
    std::fs::write(dir.join("genotype.json"), g.to_json() + "\n")?;
    std::fs::write(dir.join("genotype.txt"), g.to_string() + "\n")?;
    Ok(())
}

/// What a training run leaves behind.
#[derive(Debug)]
pub struct TrainOutcome {
    /// Per-epoch statistics of the epochs run in this invocation.
    pub epochs: Vec<crate::train::TrainStats>,
    /// Whether all configured epochs are done.
    pub finished: bool,
    /// Test-set results of the last weights (what darts reports, as the original does).
    pub last: crate::train::EvalResult,
    /// With a validation split: the epoch `model-best` holds, chosen on validation accuracy.
    pub best: Option<crate::train::Best>,
}

/// Starts training in `opts.out_dir`: `train-config.json`, `genotype.json/.txt`, `metrics.jsonl`, a checkpoint
/// per epoch, `model-last.safetensors`, and with a validation split `model-best.safetensors` (the epoch of best
/// validation accuracy; the test set is never used to choose).
pub fn start_training(config: crate::train::TrainConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    new_run_dir(opts, "run", CHECKPOINT)?;
    let mut trainer = crate::train::Trainer::new(config, opts.device)?;
    trainer.set_channels_last(opts.layout.channels_last(opts.device));
    std::fs::write(opts.out_dir.join("train-config.json"), serde_json::to_string_pretty(&trainer.config)?)?;
    write_genotype(&opts.out_dir, &trainer.config.genotype)?;
    std::fs::write(opts.out_dir.join("network.json"), serde_json::to_string_pretty(&trainer.cost())?)?;
    let _ = std::fs::remove_file(opts.out_dir.join("metrics.jsonl"));
    drive_training(trainer, opts)
}

/// Continues the training run saved in `opts.out_dir`.
pub fn resume_training(opts: &RunOptions) -> Result<TrainOutcome> {
    let mut trainer = crate::train::Trainer::resume(&opts.out_dir, opts.device)?;
    trainer.set_channels_last(opts.layout.channels_last(opts.device));
    truncate_metrics(&opts.out_dir, trainer.epoch)?;
    eprintln!("resuming {} at epoch {} of {}", opts.out_dir.display(), trainer.epoch + 1, trainer.config.epochs);
    drive_training(trainer, opts)
}

/// Keeps only the metrics lines of epochs below `epoch`.
fn truncate_metrics(dir: &Path, epoch: usize) -> Result<()> {
    let metrics = dir.join("metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("epoch").and_then(|e| e.as_u64()))
                    .is_some_and(|e| (e as usize) < epoch)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&metrics, kept)?;
    }
    Ok(())
}

fn bars(mp: Option<&MultiProgress>, epochs: usize, done: usize) -> (Option<ProgressBar>, Option<ProgressBar>) {
    let epoch_bar = mp.map(|mp| {
        let b = mp.add(ProgressBar::new(epochs as u64));
        b.set_style(ProgressStyle::with_template("epoch {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}").unwrap());
        b.set_position(done as u64);
        b
    });
    let step_bar = mp.map(|mp| {
        let b = mp.add(ProgressBar::new(0));
        b.set_style(
            ProgressStyle::with_template("step  {pos}/{len} [{bar:30}] {per_sec} {msg}").unwrap().progress_chars("=> "),
        );
        b
    });
    (epoch_bar, step_bar)
}

fn append_metrics<T: serde::Serialize>(dir: &Path, stats: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("metrics.jsonl"))?;
    writeln!(f, "{}", serde_json::to_string(stats)?)?;
    Ok(())
}

fn drive_training(mut t: crate::train::Trainer, opts: &RunOptions) -> Result<TrainOutcome> {
    let cfg = t.config.clone();
    let mp = opts.progress.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let (n_train, n_valid, n_test) = t.sizes();
    let valid =
        if n_valid > 0 { format!(" / {n_valid} held-out validation (chooses model-best)") } else { String::new() };
    say(
        mp.as_ref(),
        format!(
            "train: {} ({n_train} training{valid} / {n_test} test examples), C={}, {} cells, auxiliary {}, {} \
             parameters (auxiliary head excluded), device {:?}\n  genotype {}",
            cfg.dataset.name(),
            cfg.network.channels,
            cfg.network.layers,
            cfg.network.auxiliary,
            t.parameter_count(),
            opts.device,
            cfg.genotype
        ),
    );
    let (epoch_bar, step_bar) = bars(mp.as_ref(), cfg.epochs, t.epoch);
    let mut done = Vec::new();
    while t.epoch < cfg.epochs && opts.stop_after.is_none_or(|n| done.len() < n) {
        let stats = t.run_epoch(step_bar.as_ref())?;
        t.save_weights(&opts.out_dir.join("model-last.safetensors"))?;
        if let Some(acc) = stats.valid_acc {
            if t.best.is_none_or(|b| acc > b.valid_acc) {
                t.save_weights(&opts.out_dir.join("model-best.safetensors"))?;
                t.best = Some(crate::train::Best { epoch: stats.epoch, valid_acc: acc });
            }
        }
        t.save_checkpoint(&opts.out_dir)?;
        append_metrics(&opts.out_dir, &stats)?;
        say(
            mp.as_ref(),
            format!(
                "epoch {}/{}: lr {:.5} drop path {:.3} train loss {:.4} acc {:.2}%{} | test loss {:.4} acc {:.2}%{} | \
                 {:.1}s (waited {:.1}% for data)",
                stats.epoch + 1,
                cfg.epochs,
                stats.lr,
                stats.drop_path,
                stats.train_loss,
                100.0 * stats.train_acc,
                stats.valid_acc.map_or(String::new(), |v| format!(" | validation acc {:.2}%", 100.0 * v)),
                stats.test_loss,
                100.0 * stats.test_acc,
                stats.test_top5.map_or(String::new(), |t5| format!(" top-5 {:.2}%", 100.0 * t5)),
                stats.seconds,
                100.0 * stats.data_wait_seconds / stats.seconds.max(1e-9)
            ),
        );
        if let Some(b) = &epoch_bar {
            b.set_position(t.epoch as u64);
        }
        done.push(stats);
    }
    for b in [&step_bar, &epoch_bar].into_iter().flatten() {
        b.finish_and_clear();
    }
    let last = t.evaluate()?;
    write_report(&opts.out_dir);
    Ok(TrainOutcome { epochs: done, finished: t.epoch >= cfg.epochs, last, best: t.best })
}

/// Which trained weights of a training run directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The weights after the last epoch run (what the original reports).
    #[default]
    Last,
    /// The epoch of best accuracy on the held-out validation split (runs with `--valid-portion` only).
    Best,
}

/// Loads a trained model from a training run directory and evaluates it on the test set.
pub fn evaluate_model(
    dir: &Path,
    which: Which,
    device: Device,
    layout: crate::Layout,
) -> Result<crate::train::EvalResult> {
    let cfg_path = dir.join("train-config.json");
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
    let name = match which {
        Which::Last => "last",
        Which::Best => "best",
    };
    let weights = dir.join(format!("model-{name}.safetensors"));
    let map = crate::params::read_tensors(&weights)?;
    t.set_channels_last(layout.channels_last(device));
    t.load_model(&map, &weights)?;
    t.evaluate()
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_dir_has_a_plausible_utc_timestamp() {
        let d = super::default_dir("search").display().to_string();
        assert!(d.starts_with("runs/search-20"), "{d}");
        let stamp = &d["runs/search-".len()..];
        assert_eq!(stamp.len(), 15);
        let month: u32 = stamp[4..6].parse().unwrap();
        let day: u32 = stamp[6..8].parse().unwrap();
        assert!((1..=12).contains(&month) && (1..=31).contains(&day), "{d}");
    }
}
