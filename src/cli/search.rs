//! `darts search`: run (or resume) a DARTS search and print the genotype it finds.
use super::args::{DataArgs, SearchOnlyArgs, StageArgs};
use anyhow::Result;
use darts::run;
use darts::search::SearchConfig;
use std::path::PathBuf;

/// A named starting configuration; any flag given overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The paper's CIFAR-10 search: C=16, 8 cells, 4 nodes, 50 epochs, batch 64.
    Darts,
    /// 4.5 to 6.5 minutes on 2 CPU cores: the built-in data (800 images), C=8, 5 cells, 3 epochs, batch 32, and
    /// alpha's learning rate scaled to its 39 alpha steps (3e-2 instead of 3e-4).
    Quick,
    /// PC-DARTS: partial channels (K=4), edge normalisation, batch 256, lr 0.1, 15 warm-up epochs.
    PcDarts,
}

impl Preset {
    /// The preset's configuration.
    pub fn config(self) -> SearchConfig {
        match self {
            Preset::Darts => SearchConfig::default(),
            Preset::Quick => SearchConfig::quick(),
            Preset::PcDarts => SearchConfig::pc_darts(),
        }
    }
}

/// Arguments of `darts search`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  darts search --preset quick\n  darts search --order second --epochs 50 --out runs/second\n  darts search --dataset fashion-mnist --epochs 50 --out runs/fmnist\n  darts search --resume runs/fmnist"
)]
pub struct SearchArgs {
    /// Starting configuration.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    search: SearchOnlyArgs,
    /// Seed: one seed reproduces a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Gradient checkpointing of cells: much less memory for about one extra forward pass (same results, so it
    /// may also be turned on when resuming).
    #[arg(long)]
    checkpoint_cells: bool,
    #[command(flatten)]
    control: super::args::RunControl,
    /// Run directory (config, metrics, checkpoint, genotype); default runs/search-<date>-<time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint. Its settings are fixed in its config.json:
    /// flags that would change them are refused (only --checkpoint-cells, which changes memory, not results).
    #[arg(
        long,
        conflicts_with_all = [
            "preset", "DataArgs", "StageArgs", "space", "ops", "nodes", "order", "arch_lr", "arch_weight_decay",
            "train_portion", "partial_channels", "edge_normalization", "arch_warmup", "balanced_split",
            "max_skip_connects", "early_stop_skip_connects", "skip_dropout", "auxiliary_skip", "gdas", "tau_max",
            "tau_min", "seed", "out"
        ]
    )]
    resume: Option<PathBuf>,
}

/// The search configuration the arguments describe, validated.
pub fn config(a: &SearchArgs) -> Result<SearchConfig> {
    let mut c = a.preset.unwrap_or(Preset::Darts).config();
    a.search.apply(&mut c)?;
    a.data.apply_search(&mut c);
    a.stage.stage().apply_search(&mut c);
    c.seed = a.seed.unwrap_or(c.seed);
    c.checkpoint_cells |= a.checkpoint_cells;
    c.validate()?;
    Ok(c)
}

pub fn run(a: SearchArgs, rt: &super::Runtime) -> Result<()> {
    let mut opts = rt.run_options(a.resume.as_ref().or(a.out.as_ref()), "search", &a.control)?;
    let outcome = match &a.resume {
        Some(dir) => {
            opts.out_dir = dir.clone();
            opts.checkpoint_cells = a.checkpoint_cells;
            run::resume(&opts)?
        }
        None => run::start_or_continue(config(&a)?, &opts)?,
    };
    if !opts.writes() {
        return Ok(());
    }
    super::write_report(&opts.out_dir);
    if outcome.finished {
        eprintln!("wrote {0}/genotype.json and {0}/genotype.txt", opts.out_dir.display());
    }
    println!("{}", outcome.genotype);
    Ok(())
}
