//! `darts baseline`: random search or RL (REINFORCE) on DARTS's space, each sample trained briefly and scored.
use anyhow::Result;
use darts::baseline::{self, BaselineConfig, Strategy};
use darts::space::SearchSpace;
use std::path::PathBuf;

/// Arguments of `darts baseline`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  darts baseline --strategy random --samples 20\n  darts baseline --strategy rl --samples 50 --out runs/rl\n  darts baseline --resume runs/rl"
)]
pub struct BaselineArgs {
    /// random (uniform sampling) or rl (REINFORCE on a categorical policy per decision).
    #[arg(long, value_enum, required_unless_present = "resume")]
    strategy: Option<Strategy>,
    /// Architectures to sample, train and score.
    #[arg(long)]
    samples: Option<usize>,
    /// Stop once the samples have taken this many seconds (e.g. a DARTS search's cost).
    #[arg(long)]
    budget_seconds: Option<f64>,
    /// Training epochs per sample.
    #[arg(long)]
    epochs: Option<usize>,
    /// Channels of each sampled network.
    #[arg(long)]
    channels: Option<usize>,
    /// Cells of each sampled network.
    #[arg(long)]
    layers: Option<usize>,
    /// Intermediate nodes per cell.
    #[arg(long)]
    nodes: Option<usize>,
    /// Candidate ops, comma-separated (none is never sampled).
    #[arg(long)]
    ops: Option<String>,
    /// Batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    #[command(flatten)]
    data: super::args::DataArgs,
    /// RL: the policy's Adam learning rate.
    #[arg(long)]
    controller_lr: Option<f64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run directory; default runs/baseline-<strategy>-<date>-<time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the baseline search in this directory (its settings are fixed: flags that would change them are
    /// refused).
    #[arg(
        long,
        conflicts_with_all = [
            "strategy", "out", "samples", "budget_seconds", "epochs", "channels", "layers", "nodes", "ops",
            "batch_size", "DataArgs", "controller_lr", "seed"
        ]
    )]
    resume: Option<PathBuf>,
}

/// The configuration the arguments describe (on top of [`BaselineConfig::quick`]).
pub fn config(a: &BaselineArgs, strategy: Strategy) -> Result<BaselineConfig> {
    let mut c = BaselineConfig::quick(strategy);
    if let Some(ops) = &a.ops {
        c.space.ops = SearchSpace::parse_ops(ops)?;
    }
    c.space.nodes = a.nodes.unwrap_or(c.space.nodes);
    c.samples = a.samples.unwrap_or(c.samples);
    c.budget_seconds = a.budget_seconds.or(c.budget_seconds);
    c.epochs = a.epochs.unwrap_or(c.epochs);
    c.network.channels = a.channels.unwrap_or(c.network.channels);
    c.network.layers = a.layers.unwrap_or(c.network.layers);
    c.batch_size = a.batch_size.unwrap_or(c.batch_size);
    let d = &a.data;
    c.dataset = d.dataset.unwrap_or(c.dataset);
    c.data_dir = d.data_dir.clone().or(c.data_dir.take());
    c.limit = d.limit.or(c.limit);
    c.image_size = d.image_size.or(c.image_size);
    c.controller_lr = a.controller_lr.unwrap_or(c.controller_lr);
    c.seed = a.seed.unwrap_or(c.seed);
    c.validate()?;
    Ok(c)
}

pub fn run(a: BaselineArgs, rt: &super::Runtime) -> Result<()> {
    rt.single_process("baseline")?;
    let device = rt.device()?;
    let (outcome, dir) = match (&a.resume, a.strategy) {
        (Some(dir), _) => (baseline::resume(&rt.options(dir.clone(), device))?, dir.clone()),
        (None, Some(strategy)) => {
            let out =
                a.out.clone().unwrap_or_else(|| darts::rundir::default_dir(&format!("baseline-{}", strategy.name())));
            let opts = rt.options(out, device);
            let o = baseline::start(config(&a, strategy)?, &opts)?;
            if o.finished {
                eprintln!("wrote {0}/genotype.json and {0}/genotype.txt", opts.out_dir.display());
            }
            (o, opts.out_dir)
        }
        (None, None) => anyhow::bail!("give --strategy random|rl, or --resume DIR"),
    };
    super::write_report(&dir);
    let seconds = outcome.samples.last().map_or(0.0, |s| s.total_seconds);
    eprintln!(
        "best of {} samples: {:.2}% on the scoring split; {:.0} s of search",
        outcome.samples.len(),
        100.0 * outcome.best_acc,
        seconds
    );
    println!("{}", outcome.best);
    Ok(())
}
