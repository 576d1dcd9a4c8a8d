//! `darts search`: run (or resume) a DARTS search and print the genotype it finds.
use anyhow::{Context, Result};
use darts::architect::Order;
use darts::data::DatasetKind;
use darts::run;
use darts::search::SearchConfig;
use darts::space::SearchSpace;
use std::path::PathBuf;

/// A named starting configuration; any flag given overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The paper's CIFAR-10 search: C=16, 8 cells, 4 nodes, 50 epochs, batch 64.
    Darts,
    /// 4.5 to 6.5 minutes on 2 CPU cores: the built-in data (800 images), C=8, 5 cells, 3 epochs, batch 32.
    Quick,
    /// PC-DARTS: partial channels (K=4), edge normalisation, batch 256, lr 0.1, 15 warm-up epochs.
    PcDarts,
}

/// Arguments of `darts search`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  darts search --preset quick\n  darts search --dataset fashion-mnist --epochs 50 --out runs/fmnist\n  darts search --resume runs/fmnist"
)]
pub struct SearchArgs {
    /// Starting configuration.
    #[arg(long, value_enum, default_value = "darts")]
    preset: Preset,
    /// Dataset (the built-in Fashion-MNIST subset needs no download).
    #[arg(long, value_enum)]
    dataset: Option<DatasetKind>,
    /// Folder with the dataset's files (default: $DARTS_DATA, ~/.cache/darts/data, /usr/share/datasets).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use only the first N training examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Search space as a TOML file (ops, nodes, layers, channels, stem_multiplier, activation, partial_channels,
    /// edge_normalization, auxiliary_skip); flags below override it.
    #[arg(long)]
    space: Option<PathBuf>,
    /// Candidate ops, comma-separated (e.g. none,max_pool_3x3,skip_connect,sep_conv_3x3).
    #[arg(long)]
    ops: Option<String>,
    /// Initial channels C.
    #[arg(long)]
    channels: Option<usize>,
    /// Number of cells.
    #[arg(long)]
    layers: Option<usize>,
    /// Intermediate nodes per cell.
    #[arg(long)]
    nodes: Option<usize>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Hypergradient: first (DARTS 1st order) or second (unrolled, DARTS 2nd order).
    #[arg(long, value_enum)]
    order: Option<Order>,
    /// Weights' initial learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Alpha's Adam learning rate.
    #[arg(long)]
    arch_lr: Option<f64>,
    /// Fraction of the training set for the weights (the rest trains alpha).
    #[arg(long)]
    train_portion: Option<f64>,
    /// PC-DARTS partial channel connections: each edge's ops see 1/K of the channels (1 = off).
    #[arg(long)]
    partial_channels: Option<usize>,
    /// PC-DARTS edge normalisation (per-edge weights beta): true or false.
    #[arg(long)]
    edge_normalization: Option<bool>,
    /// Epochs of weight training before alpha starts to learn.
    #[arg(long)]
    arch_warmup: Option<usize>,
    /// Image folders (--dataset folder): resize images to this square size (default 32).
    #[arg(long)]
    image_size: Option<usize>,
    /// Split the training set class by class (both halves keep the class proportions).
    #[arg(long)]
    balanced_split: bool,
    /// Gradient checkpointing of cells: much less memory for about one extra forward pass.
    #[arg(long)]
    checkpoint_cells: bool,
    #[command(flatten)]
    collapse: CollapseArgs,
    /// GDAS instead of DARTS's weighted sum: each edge runs one op per step, sampled by Gumbel-softmax from alpha
    /// (about |ops| times less work and memory per edge).
    #[arg(long)]
    gdas: bool,
    /// GDAS: the Gumbel-softmax temperature in the first epoch, annealed linearly to --tau-min (default 10).
    #[arg(long, requires = "gdas")]
    tau_max: Option<f64>,
    /// GDAS: the temperature in the last epoch (default 0.1).
    #[arg(long, requires = "gdas")]
    tau_min: Option<f64>,
    /// Seed: one seed reproduces a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Run directory (config, metrics, checkpoint, genotype); default runs/search-<date>-<time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint (other settings come from it, except
    /// --checkpoint-cells, which changes memory, not results).
    #[arg(long, conflicts_with_all = ["preset", "dataset", "epochs", "out"])]
    resume: Option<PathBuf>,
}

/// The remedies against skip-connection collapse (`darts search` and `darts run`).
#[derive(clap::Args, Debug)]
pub struct CollapseArgs {
    /// Against skip-connection collapse (P-DARTS): at most M skip_connect edges in the derived normal cell
    /// (P-DARTS uses 2).
    #[arg(long, value_name = "M")]
    max_skip_connects: Option<usize>,
    /// Against skip-connection collapse (DARTS+): stop the search after the first epoch whose normal cell has
    /// N or more skip_connect edges (DARTS+ uses 2).
    #[arg(long, value_name = "N")]
    early_stop_skip_connects: Option<usize>,
    /// Against skip-connection collapse (P-DARTS): dropout on skip_connect's output during the search, at this
    /// rate in the first epoch, decaying linearly to 0 (P-DARTS uses 0.1 to 0.7; 0 = off).
    #[arg(long, value_name = "RATE")]
    skip_dropout: Option<f64>,
    /// Against skip-connection collapse (DARTS-): an auxiliary skip connection on every edge, its weight
    /// decaying linearly from 1 over the search.
    #[arg(long)]
    auxiliary_skip: bool,
}

impl CollapseArgs {
    /// Sets the remedies given on the command line in `c`.
    pub fn apply(&self, c: &mut SearchConfig) {
        if self.max_skip_connects.is_some() {
            c.max_skip_connects = self.max_skip_connects;
        }
        if self.early_stop_skip_connects.is_some() {
            c.early_stop_skip_connects = self.early_stop_skip_connects;
        }
        if let Some(r) = self.skip_dropout {
            c.skip_dropout = r;
        }
        c.space.auxiliary_skip |= self.auxiliary_skip;
    }
}

fn preset(p: Preset) -> SearchConfig {
    match p {
        Preset::Darts => SearchConfig::default(),
        Preset::Quick => SearchConfig::quick(),
        Preset::PcDarts => SearchConfig::pc_darts(),
    }
}

pub fn config(a: &SearchArgs) -> Result<SearchConfig> {
    let mut c = preset(a.preset);
    if let Some(path) = &a.space {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        c.space = SearchSpace::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    }
    if let Some(ops) = &a.ops {
        c.space.ops = SearchSpace::parse_ops(ops).context("--ops")?;
    }
    macro_rules! set {
        ($($field:ident).+ = $arg:expr) => {
            if let Some(v) = $arg.clone() {
                c.$($field).+ = v;
            }
        };
    }
    set!(dataset = a.dataset);
    set!(space.channels = a.channels);
    set!(space.layers = a.layers);
    set!(space.nodes = a.nodes);
    set!(epochs = a.epochs);
    set!(batch_size = a.batch_size);
    set!(order = a.order);
    set!(lr = a.lr);
    set!(arch_lr = a.arch_lr);
    set!(train_portion = a.train_portion);
    set!(seed = a.seed);
    set!(space.partial_channels = a.partial_channels);
    set!(space.edge_normalization = a.edge_normalization);
    set!(arch_warmup_epochs = a.arch_warmup);
    c.checkpoint_cells |= a.checkpoint_cells;
    c.balanced_split |= a.balanced_split;
    a.collapse.apply(&mut c);
    if a.gdas {
        let mut g = c.gdas.unwrap_or_default();
        g.tau_max = a.tau_max.unwrap_or(g.tau_max);
        g.tau_min = a.tau_min.unwrap_or(g.tau_min);
        c.gdas = Some(g);
    }
    if a.image_size.is_some() {
        c.image_size = a.image_size;
    }
    if a.data_dir.is_some() {
        c.data_dir = a.data_dir.clone();
    }
    if a.limit.is_some() {
        c.limit = a.limit;
    }
    c.validate()?;
    Ok(c)
}

pub fn run(a: SearchArgs, rt: &super::Runtime) -> Result<()> {
    let device = rt.device()?;
    let mut opts = rt.options(a.out.clone().unwrap_or_else(|| run::default_dir("search")), device);
    let outcome = match &a.resume {
        Some(dir) => {
            opts.out_dir = dir.clone();
            opts.checkpoint_cells = a.checkpoint_cells;
            run::resume(&opts)?
        }
        None => run::start(config(&a)?, &opts)?,
    };
    if outcome.finished {
        eprintln!("wrote {0}/genotype.json and {0}/genotype.txt", opts.out_dir.display());
    }
    println!("{}", outcome.genotype);
    Ok(())
}
