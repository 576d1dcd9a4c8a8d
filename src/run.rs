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

fn say(progress: Option<&MultiProgress>, line: String) {
    match progress {
        Some(mp) if !mp.is_hidden() => {
            let _ = mp.println(line);
        }
        _ => eprintln!("{line}"),
    }
}

/// Starts a new search in `opts.out_dir` (which must not hold one already).
pub fn start(config: SearchConfig, opts: &RunOptions) -> Result<RunOutcome> {
    if opts.out_dir.join("checkpoint.safetensors").exists() {
        bail!(
            "{} already holds a search; continue it with --resume {0}, or choose another --out",
            opts.out_dir.display()
        );
    }
    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let search = Search::new(config, opts.device)?;
    std::fs::write(opts.out_dir.join("config.json"), serde_json::to_string_pretty(&search.config)?)?;
    let _ = std::fs::remove_file(opts.out_dir.join("metrics.jsonl"));
    drive(search, opts)
}

/// Continues the search saved in `opts.out_dir`.
pub fn resume(opts: &RunOptions) -> Result<RunOutcome> {
    let search = Search::resume(&opts.out_dir, opts.device)?;
    // Keep only the metrics of epochs the checkpoint holds.
    let metrics = opts.out_dir.join("metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("epoch").and_then(|e| e.as_u64()))
                    .is_some_and(|e| (e as usize) < search.epoch)
            })
            .collect();
        std::fs::write(&metrics, kept.iter().map(|l| format!("{l}\n")).collect::<String>())?;
    }
    eprintln!("resuming {} at epoch {} of {}", opts.out_dir.display(), search.epoch + 1, search.config.epochs);
    drive(search, opts)
}

fn drive(mut search: Search, opts: &RunOptions) -> Result<RunOutcome> {
    let cfg = search.config.clone();
    let mp = opts.progress.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    say(
        mp.as_ref(),
        format!(
            "search: {} ({} examples), split {} for weights / {} for alpha, disjoint (checked: no example in both)",
            cfg.dataset.name(),
            search.split.train.len() + search.split.val.len(),
            search.split.train.len(),
            search.split.val.len()
        ),
    );
    say(
        mp.as_ref(),
        format!(
            "supernet: {} cells, {} nodes, C={}, {} ops, {} weight parameters, {:?}-order, device {:?}",
            cfg.space.layers,
            cfg.space.nodes,
            cfg.space.channels,
            cfg.space.ops.len(),
            search.parameter_count(),
            cfg.order,
            opts.device
        ),
    );
    let epoch_bar = mp.as_ref().map(|mp| {
        let b = mp.add(ProgressBar::new(cfg.epochs as u64));
        b.set_style(ProgressStyle::with_template("epoch {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}").unwrap());
        b.set_position(search.epoch as u64);
        b
    });
    let step_bar = mp.as_ref().map(|mp| {
        let b = mp.add(ProgressBar::new(0));
        b.set_style(
            ProgressStyle::with_template("step  {pos}/{len} [{bar:30}] {per_sec} {msg}").unwrap().progress_chars("=> "),
        );
        b
    });
    let mut done = Vec::new();
    let mut ran = 0;
    while search.epoch < cfg.epochs && opts.stop_after.is_none_or(|n| ran < n) {
        let stats = search.run_epoch(step_bar.as_ref())?;
        search.save_checkpoint(&opts.out_dir)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(opts.out_dir.join("metrics.jsonl"))?;
        writeln!(f, "{}", serde_json::to_string(&stats)?)?;
        say(
            mp.as_ref(),
            format!(
                "epoch {}/{}: lr {:.5} train loss {:.4} acc {:.2}% | alpha-split loss {:.4} acc {:.2}% | {:.1}s\n  genotype {}",
                stats.epoch + 1,
                cfg.epochs,
                stats.lr,
                stats.train_loss,
                100.0 * stats.train_acc,
                stats.val_loss,
                100.0 * stats.val_acc,
                stats.seconds,
                stats.genotype
            ),
        );
        if let Some(b) = &epoch_bar {
            b.set_position(search.epoch as u64);
        }
        done.push(stats);
        ran += 1;
    }
    if let Some(b) = &step_bar {
        b.finish_and_clear();
    }
    if let Some(b) = &epoch_bar {
        b.finish_and_clear();
    }
    let genotype = search.genotype();
    let finished = search.epoch >= cfg.epochs;
    if finished {
        write_genotype(&opts.out_dir, &genotype)?;
    }
    Ok(RunOutcome { epochs: done, genotype, finished, alphas: search.net.alphas.softmax() })
}

/// Writes `genotype.json` and `genotype.txt` (DARTS Python text) into `dir`.
pub fn write_genotype(dir: &Path, g: &Genotype) -> Result<()> {
    std::fs::write(dir.join("genotype.json"), g.to_json() + "\n")?;
    std::fs::write(dir.join("genotype.txt"), g.to_string() + "\n")?;
    Ok(())
}
