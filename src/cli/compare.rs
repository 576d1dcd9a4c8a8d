//! `darts compare`: DARTS against random search and RL on the same space, data, budget and final training.
use anyhow::Result;
use darts::compare::{self, CompareConfig};
use std::path::PathBuf;

/// Arguments of `darts compare` (on top of the quick comparison, `CompareConfig::quick`).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  darts compare --out runs/compare            # about 30 minutes on 2 CPU cores\n  darts compare --out runs/compare            # again: continues where it stopped"
)]
pub struct CompareArgs {
    /// DARTS search epochs.
    #[arg(long)]
    search_epochs: Option<usize>,
    /// At most this many samples per baseline.
    #[arg(long)]
    samples: Option<usize>,
    /// The baselines' budget in seconds (default: what the DARTS search took).
    #[arg(long)]
    budget_seconds: Option<f64>,
    /// Training epochs of each found cell's network.
    #[arg(long)]
    train_epochs: Option<usize>,
    /// Seed for every stage.
    #[arg(long)]
    seed: Option<u64>,
    /// Root directory; default runs/compare-<date>-<time>. An existing one is continued.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: CompareArgs, rt: &super::Runtime) -> Result<()> {
    rt.single_process("compare")?;
    let device = rt.device()?;
    let mut c = CompareConfig::quick();
    if let Some(e) = a.search_epochs {
        c.search.epochs = e;
    }
    if let Some(n) = a.samples {
        c.baseline.samples = n;
    }
    if let Some(b) = a.budget_seconds {
        c.equal_budget = false;
        c.baseline.budget_seconds = Some(b);
    }
    if let Some(e) = a.train_epochs {
        c.train.epochs = e;
    }
    if let Some(s) = a.seed {
        (c.search.seed, c.baseline.seed, c.train.seed) = (s, s, s);
    }
    c.search.validate()?;
    c.baseline.validate()?;
    c.train.validate()?;
    let root = a.out.clone().unwrap_or_else(|| darts::rundir::default_dir("compare"));
    eprintln!("comparison in {}", root.display());
    let out = compare::compare(&c, &root, &rt.options(root.clone(), device))?;
    for dir in compare::stage_dirs(&root).into_iter().chain([root.clone()]) {
        super::write_report(&dir);
    }
    print!("{}", compare::table(&out));
    Ok(())
}
