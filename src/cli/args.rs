//! Argument blocks shared by the commands: the data, a stage's optimiser and shape (plain for `darts search`
//! and `darts train`, prefixed `--search-*` / `--train-*` for `darts run`, which has both stages), and the
//! settings only a search or only a training has.
use anyhow::{Context, Result};
use darts::architect::Order;
use darts::data::DatasetKind;
use darts::optim::LrSchedule;
use darts::recipe::Recipe;
use darts::search::SearchConfig;
use darts::space::SearchSpace;
use darts::train::TrainConfig;
use std::path::PathBuf;

/// How a search or training runs now, not what it computes: when to stop and checkpoint (allowed with
/// `--resume`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunControl {
    /// Also write a checkpoint after every N steps inside an epoch (a kill then loses at most N steps; resume
    /// continues bit for bit).
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Also write a checkpoint inside an epoch when M minutes have passed since the last one.
    #[arg(long, value_name = "M")]
    pub checkpoint_minutes: Option<f64>,
    /// Run at most N epochs in this invocation, then stop with the checkpoint written (continue with --resume
    /// or the same command; results are as if it had not stopped).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<usize>,
}

/// Which data, for any command that reads a dataset.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Dataset (the built-in Fashion-MNIST subset needs no download).
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// Folder with the dataset's files (default: $DARTS_DATA, ~/.cache/darts/data, /usr/share/datasets).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training (and test) examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Image folders (--dataset folder): resize images to this square size (default 32).
    #[arg(long)]
    pub image_size: Option<usize>,
}

impl DataArgs {
    /// Sets the data given on the command line in a search's configuration.
    pub fn apply_search(&self, c: &mut SearchConfig) {
        c.dataset = self.dataset.unwrap_or(c.dataset);
        c.data_dir = self.data_dir.clone().or(c.data_dir.take());
        c.limit = self.limit.or(c.limit);
        c.image_size = self.image_size.or(c.image_size);
    }

    /// Sets the data given on the command line in a training's configuration.
    pub fn apply_train(&self, c: &mut TrainConfig) {
        c.dataset = self.dataset.unwrap_or(c.dataset);
        c.data_dir = self.data_dir.clone().or(c.data_dir.take());
        c.limit = self.limit.or(c.limit);
        c.image_size = self.image_size.or(c.image_size);
    }
}

/// One stage's length, optimiser and network size, whichever command line spelled them.
#[derive(Debug, Clone, Default)]
pub struct Stage {
    epochs: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    lr_min: Option<f64>,
    momentum: Option<f64>,
    weight_decay: Option<f64>,
    grad_clip: Option<f64>,
    channels: Option<usize>,
    layers: Option<usize>,
}

impl Stage {
    /// Sets the values given in a search's configuration.
    pub fn apply_search(&self, c: &mut SearchConfig) {
        c.epochs = self.epochs.unwrap_or(c.epochs);
        c.batch_size = self.batch_size.unwrap_or(c.batch_size);
        c.lr = self.lr.unwrap_or(c.lr);
        c.lr_min = self.lr_min.unwrap_or(c.lr_min);
        c.momentum = self.momentum.unwrap_or(c.momentum);
        c.weight_decay = self.weight_decay.unwrap_or(c.weight_decay);
        c.grad_clip = self.grad_clip.unwrap_or(c.grad_clip);
        c.space.channels = self.channels.unwrap_or(c.space.channels);
        c.space.layers = self.layers.unwrap_or(c.space.layers);
    }

    /// Sets the values given in a training's configuration.
    pub fn apply_train(&self, c: &mut TrainConfig) {
        c.epochs = self.epochs.unwrap_or(c.epochs);
        c.batch_size = self.batch_size.unwrap_or(c.batch_size);
        c.lr = self.lr.unwrap_or(c.lr);
        c.lr_min = self.lr_min.unwrap_or(c.lr_min);
        c.momentum = self.momentum.unwrap_or(c.momentum);
        c.weight_decay = self.weight_decay.unwrap_or(c.weight_decay);
        c.grad_clip = self.grad_clip.unwrap_or(c.grad_clip);
        c.network.channels = self.channels.unwrap_or(c.network.channels);
        c.network.layers = self.layers.unwrap_or(c.network.layers);
    }
}

/// A stage's settings as `darts search` and `darts train` spell them.
#[derive(clap::Args, Debug, Clone)]
pub struct StageArgs {
    /// Epochs (default: the preset's or recipe's).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size (for a search: of both the weight and the alpha step).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Weights' initial SGD learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Weights' final learning rate of the cosine schedule.
    #[arg(long)]
    lr_min: Option<f64>,
    /// Weights' SGD momentum.
    #[arg(long)]
    momentum: Option<f64>,
    /// Weights' L2 weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the weights' gradient to this global L2 norm (DARTS: 5).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Initial channels C.
    #[arg(long)]
    channels: Option<usize>,
    /// Number of cells.
    #[arg(long)]
    layers: Option<usize>,
}

impl StageArgs {
    /// The values given.
    pub fn stage(&self) -> Stage {
        let a = self.clone();
        Stage {
            epochs: a.epochs,
            batch_size: a.batch_size,
            lr: a.lr,
            lr_min: a.lr_min,
            momentum: a.momentum,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
            channels: a.channels,
            layers: a.layers,
        }
    }
}

/// The search stage's settings in `darts run`.
#[derive(clap::Args, Debug, Clone)]
pub struct SearchStageArgs {
    /// Search: epochs.
    #[arg(long)]
    search_epochs: Option<usize>,
    /// Search: batch size of the weight and the alpha step.
    #[arg(long)]
    search_batch_size: Option<usize>,
    /// Search: weights' initial learning rate.
    #[arg(long)]
    search_lr: Option<f64>,
    /// Search: weights' final learning rate (cosine).
    #[arg(long)]
    search_lr_min: Option<f64>,
    /// Search: weights' SGD momentum.
    #[arg(long)]
    search_momentum: Option<f64>,
    /// Search: weights' weight decay.
    #[arg(long)]
    search_weight_decay: Option<f64>,
    /// Search: gradient norm clip of the weights.
    #[arg(long)]
    search_grad_clip: Option<f64>,
    /// Search: initial channels.
    #[arg(long)]
    search_channels: Option<usize>,
    /// Search: cells.
    #[arg(long)]
    search_layers: Option<usize>,
}

impl SearchStageArgs {
    /// The values given.
    pub fn stage(&self) -> Stage {
        let a = self.clone();
        Stage {
            epochs: a.search_epochs,
            batch_size: a.search_batch_size,
            lr: a.search_lr,
            lr_min: a.search_lr_min,
            momentum: a.search_momentum,
            weight_decay: a.search_weight_decay,
            grad_clip: a.search_grad_clip,
            channels: a.search_channels,
            layers: a.search_layers,
        }
    }
}

/// The training stage's settings in `darts run`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainStageArgs {
    /// Training: epochs.
    #[arg(long)]
    train_epochs: Option<usize>,
    /// Training: batch size.
    #[arg(long)]
    train_batch_size: Option<usize>,
    /// Training: initial learning rate.
    #[arg(long)]
    train_lr: Option<f64>,
    /// Training: final learning rate (cosine).
    #[arg(long)]
    train_lr_min: Option<f64>,
    /// Training: SGD momentum.
    #[arg(long)]
    train_momentum: Option<f64>,
    /// Training: weight decay.
    #[arg(long)]
    train_weight_decay: Option<f64>,
    /// Training: gradient norm clip.
    #[arg(long)]
    train_grad_clip: Option<f64>,
    /// Training: initial channels.
    #[arg(long)]
    train_channels: Option<usize>,
    /// Training: cells.
    #[arg(long)]
    train_layers: Option<usize>,
}

impl TrainStageArgs {
    /// The values given.
    pub fn stage(&self) -> Stage {
        let a = self.clone();
        Stage {
            epochs: a.train_epochs,
            batch_size: a.train_batch_size,
            lr: a.train_lr,
            lr_min: a.train_lr_min,
            momentum: a.train_momentum,
            weight_decay: a.train_weight_decay,
            grad_clip: a.train_grad_clip,
            channels: a.train_channels,
            layers: a.train_layers,
        }
    }
}

/// Settings only a search has (`darts search` and `darts run`).
#[derive(clap::Args, Debug, Clone)]
pub struct SearchOnlyArgs {
    /// Search space as a TOML file (ops, nodes, layers, channels, stem_multiplier, activation, partial_channels,
    /// edge_normalization, auxiliary_skip); flags override it.
    #[arg(long)]
    space: Option<PathBuf>,
    /// Candidate ops, comma-separated (e.g. none,max_pool_3x3,skip_connect,sep_conv_3x3).
    #[arg(long)]
    ops: Option<String>,
    /// Intermediate nodes per cell.
    #[arg(long)]
    nodes: Option<usize>,
    /// Hypergradient: first (DARTS 1st order) or second (unrolled, DARTS 2nd order).
    #[arg(long, value_enum)]
    order: Option<Order>,
    /// Alpha's Adam learning rate.
    #[arg(long)]
    arch_lr: Option<f64>,
    /// Alpha's weight decay.
    #[arg(long)]
    arch_weight_decay: Option<f64>,
    /// Fraction of the training set for the weights (the rest trains alpha).
    #[arg(long)]
    train_portion: Option<f64>,
    /// PC-DARTS partial channel connections: each edge's ops see 1/K of the channels (1 = off).
    #[arg(long)]
    partial_channels: Option<usize>,
    /// PC-DARTS edge normalisation (per-edge weights beta): true or false.
    #[arg(long)]
    edge_normalization: Option<bool>,
    /// Epochs of weight training before alpha starts to learn (PC-DARTS 15, P-DARTS 10).
    #[arg(long)]
    arch_warmup: Option<usize>,
    /// Split the training set class by class (both halves keep the class proportions).
    #[arg(long)]
    balanced_split: bool,
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
}

impl SearchOnlyArgs {
    /// Sets the values given in `c`.
    pub fn apply(&self, c: &mut SearchConfig) -> Result<()> {
        if let Some(path) = &self.space {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            c.space = SearchSpace::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
        }
        if let Some(ops) = &self.ops {
            c.space.ops = SearchSpace::parse_ops(ops).context("--ops")?;
        }
        c.space.nodes = self.nodes.unwrap_or(c.space.nodes);
        c.order = self.order.unwrap_or(c.order);
        c.arch_lr = self.arch_lr.unwrap_or(c.arch_lr);
        c.arch_weight_decay = self.arch_weight_decay.unwrap_or(c.arch_weight_decay);
        c.train_portion = self.train_portion.unwrap_or(c.train_portion);
        c.space.partial_channels = self.partial_channels.unwrap_or(c.space.partial_channels);
        c.space.edge_normalization = self.edge_normalization.unwrap_or(c.space.edge_normalization);
        c.arch_warmup_epochs = self.arch_warmup.unwrap_or(c.arch_warmup_epochs);
        c.balanced_split |= self.balanced_split;
        self.collapse.apply(c);
        if self.gdas {
            let mut g = c.gdas.unwrap_or_default();
            g.tau_max = self.tau_max.unwrap_or(g.tau_max);
            g.tau_min = self.tau_min.unwrap_or(g.tau_min);
            c.gdas = Some(g);
        }
        Ok(())
    }
}

/// The remedies against skip-connection collapse (`darts search` and `darts run`).
#[derive(clap::Args, Debug, Clone)]
pub struct CollapseArgs {
    /// Against skip-connection collapse (P-DARTS): at most M skip_connect edges in the derived normal cell
    /// (P-DARTS uses 2).
    #[arg(long, value_name = "M")]
    max_skip_connects: Option<usize>,
    /// Against skip-connection collapse (DARTS+): stop the search after the first epoch whose normal cell has
    /// N or more skip_connect edges (DARTS+ uses 2).
    #[arg(long, value_name = "N")]
    early_stop_skip_connects: Option<usize>,
    /// Against skip-connection collapse (P-DARTS): dropout on skip_connect's output during the search at RATE,
    /// decaying as P-DARTS's code: linearly during the weight-only warm-up (--arch-warmup), exponentially
    /// (exp(-0.2 per epoch)) after it (P-DARTS uses 0.1 to 0.7 with a 10-epoch warm-up; 0 = off).
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
        c.max_skip_connects = self.max_skip_connects.or(c.max_skip_connects);
        c.early_stop_skip_connects = self.early_stop_skip_connects.or(c.early_stop_skip_connects);
        c.skip_dropout = self.skip_dropout.unwrap_or(c.skip_dropout);
        c.space.auxiliary_skip |= self.auxiliary_skip;
    }
}

/// Settings only a final training has (`darts train` and `darts run`).
#[derive(clap::Args, Debug, Clone)]
pub struct TrainOnlyArgs {
    /// The published recipe to start from (every hyper-parameter of the paper's final training; flags override
    /// it): darts-cifar, darts-imagenet or pc-darts-imagenet.
    #[arg(long, value_enum)]
    pub recipe: Option<Recipe>,
    /// The ImageNet network and recipe: the same as --recipe darts-imagenet.
    #[arg(long, conflicts_with = "recipe")]
    pub imagenet: bool,
    /// Hold out this fraction of the training set as a validation split; its best epoch is saved as
    /// model-best (default 0: no selection, the last epoch is the result, as in the original).
    #[arg(long)]
    pub valid_portion: Option<f64>,
    /// No auxiliary head.
    #[arg(long)]
    pub no_auxiliary: bool,
    /// Auxiliary loss weight (recipes: 0.4).
    #[arg(long)]
    pub aux_weight: Option<f64>,
    /// Final drop-path probability, ramped linearly from 0 (darts-cifar 0.2, ImageNet recipes 0).
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// Cutout side in pixels (darts-cifar 16; 0 = off).
    #[arg(long)]
    pub cutout: Option<i64>,
    /// Label smoothing (ImageNet recipes 0.1).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Learning-rate schedule: cosine, step (StepLR: times --lr-gamma every --lr-period epochs) or
    /// pc-darts-linear.
    #[arg(long, value_enum)]
    pub lr_schedule: Option<ScheduleName>,
    /// Step schedule: factor per period (darts-imagenet 0.97).
    #[arg(long)]
    pub lr_gamma: Option<f64>,
    /// Step schedule: epochs per period (darts-imagenet 1).
    #[arg(long)]
    pub lr_period: Option<usize>,
    /// Epochs of linear learning-rate warm-up (pc-darts-imagenet 5).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Forward-pass arithmetic: fp32, or bf16 mixed precision (autocast: convolutions and matrix products in
    /// bfloat16, weights, gradients and SGD in float32); for GPUs with bfloat16 units (NVIDIA Ampere and later).
    #[arg(long, value_enum, alias = "train-precision")]
    pub precision: Option<darts::native::Precision>,
}

/// A learning-rate schedule's name on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleName {
    /// Cosine annealing to --lr-min.
    Cosine,
    /// StepLR.
    Step,
    /// PC-DARTS's ImageNet linear decay.
    PcDartsLinear,
}

impl TrainOnlyArgs {
    /// The recipe chosen (darts-cifar unless --recipe or --imagenet says otherwise).
    pub fn recipe(&self) -> Recipe {
        match (self.recipe, self.imagenet) {
            (Some(r), _) => r,
            (None, true) => Recipe::DartsImagenet,
            (None, false) => Recipe::DartsCifar,
        }
    }

    /// Sets the values given in `c` (which starts from [`TrainOnlyArgs::recipe`]).
    pub fn apply(&self, c: &mut TrainConfig) -> Result<()> {
        c.valid_portion = self.valid_portion.unwrap_or(c.valid_portion);
        c.network.auxiliary &= !self.no_auxiliary;
        c.aux_weight = self.aux_weight.unwrap_or(c.aux_weight);
        c.drop_path = self.drop_path.unwrap_or(c.drop_path);
        c.cutout = self.cutout.unwrap_or(c.cutout);
        c.label_smoothing = self.label_smoothing.unwrap_or(c.label_smoothing);
        c.warmup_epochs = self.warmup_epochs.unwrap_or(c.warmup_epochs);
        c.precision = self.precision.unwrap_or(c.precision);
        let (gamma, period) = match c.lr_schedule {
            LrSchedule::Step { gamma, period } => (gamma, period),
            _ => (0.97, 1),
        };
        c.lr_schedule = match self.lr_schedule {
            Some(ScheduleName::Cosine) => LrSchedule::Cosine,
            Some(ScheduleName::PcDartsLinear) => LrSchedule::PcDartsLinear,
            Some(ScheduleName::Step) => LrSchedule::Step { gamma, period },
            None => c.lr_schedule,
        };
        match &mut c.lr_schedule {
            LrSchedule::Step { gamma, period } => {
                *gamma = self.lr_gamma.unwrap_or(*gamma);
                *period = self.lr_period.unwrap_or(*period);
            }
            _ if self.lr_gamma.is_some() || self.lr_period.is_some() => {
                anyhow::bail!("--lr-gamma and --lr-period belong to the step schedule: add --lr-schedule step")
            }
            _ => {}
        }
        Ok(())
    }
}
