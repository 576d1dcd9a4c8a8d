//! What determines a search's result: the configuration, its presets (DARTS, quick, PC-DARTS), the schedules
//! of the collapse remedies and GDAS, and the checks of impossible settings.

use crate::architect::Order;
use crate::data::DatasetKind;
use crate::space::SearchSpace;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that determines a search's result (runtime choices such as threads or device are apart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Which dataset.
    pub dataset: DatasetKind,
    /// Where its files are (None: the built-in data or the default places).
    pub data_dir: Option<PathBuf>,
    /// Use only the first `limit` training examples (quick runs); None uses all.
    pub limit: Option<usize>,
    /// The search space.
    pub space: SearchSpace,
    /// Epochs.
    pub epochs: usize,
    /// Batch size for both the weight and the alpha step.
    pub batch_size: usize,
    /// Fraction of the training set the weights learn on; alpha learns on the rest.
    pub train_portion: f64,
    /// Weights: initial learning rate.
    pub lr: f64,
    /// Weights: final learning rate of the cosine schedule.
    pub lr_min: f64,
    /// Weights: SGD momentum.
    pub momentum: f64,
    /// Weights: weight decay.
    pub weight_decay: f64,
    /// Weights: gradient norm clip.
    pub grad_clip: f64,
    /// Alpha: Adam learning rate.
    pub arch_lr: f64,
    /// Alpha: Adam betas.
    pub arch_betas: (f64, f64),
    /// Alpha: weight decay.
    pub arch_weight_decay: f64,
    /// First- or second-order hypergradient.
    pub order: Order,
    /// Seed for weights, alpha, split, shuffling and augmentation.
    pub seed: u64,
    /// Epochs at the start during which alpha stays fixed and only the weights train (PC-DARTS: 15).
    #[serde(default)]
    pub arch_warmup_epochs: usize,
    /// Image folders: the square size images are resized to (default 32).
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Split the training set class by class, so that both halves keep the class proportions.
    #[serde(default)]
    pub balanced_split: bool,
    /// Gradient checkpointing: keep only each cell's output during the forward pass and recompute the cell
    /// during backward. Same gradients, much less memory, about one more forward pass of time.
    #[serde(default)]
    pub checkpoint_cells: bool,
    /// Against skip-connection collapse (P-DARTS): derive the normal cell with at most this many
    /// `skip_connect` edges, striking the weakest kept one and deriving again while there are more.
    #[serde(default)]
    pub max_skip_connects: Option<usize>,
    /// Against skip-connection collapse (DARTS+, criterion 1): end the search after the first epoch (past the
    /// alpha warm-up) whose derived normal cell has at least this many `skip_connect` edges; its genotype is the
    /// result.
    #[serde(default)]
    pub early_stop_skip_connects: Option<usize>,
    /// Against skip-connection collapse (P-DARTS): dropout on the identity op's output during the search at this
    /// rate, decaying as P-DARTS's `train_search.py`: `rate * (E - e - 1) / E` in the weight-only warm-up epochs
    /// (`arch_warmup_epochs`), `rate * exp(-0.2 * (e - warmup))` after them. 0: off.
    #[serde(default)]
    pub skip_dropout: f64,
    /// GDAS (Dong & Yang, CVPR 2019) instead of DARTS's weighted sum: every edge runs one op per step, sampled
    /// by Gumbel-softmax from alpha (straight-through gradient), with the temperature annealed linearly.
    #[serde(default)]
    pub gdas: Option<Gdas>,
}

/// GDAS's temperature schedule: `tau_max - (tau_max - tau_min) * e / (E - 1)` in epoch e of E.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gdas {
    /// The temperature in the first epoch (GDAS: 10).
    pub tau_max: f64,
    /// The temperature in the last epoch (GDAS: 0.1).
    pub tau_min: f64,
}

impl Default for Gdas {
    fn default() -> Self {
        Gdas { tau_max: 10.0, tau_min: 0.1 }
    }
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            dataset: DatasetKind::Builtin,
            data_dir: None,
            limit: None,
            space: SearchSpace::default(),
            epochs: 50,
            batch_size: 64,
            train_portion: 0.5,
            lr: 0.025,
            lr_min: 0.001,
            momentum: 0.9,
            weight_decay: 3e-4,
            grad_clip: 5.0,
            arch_lr: 3e-4,
            arch_betas: (0.5, 0.999),
            arch_weight_decay: 1e-3,
            order: Order::First,
            seed: 2,
            arch_warmup_epochs: 0,
            balanced_split: false,
            image_size: None,
            checkpoint_cells: false,
            max_skip_connects: None,
            early_stop_skip_connects: None,
            skip_dropout: 0.0,
            gdas: None,
        }
    }
}

impl SearchConfig {
    /// A real but small search that takes 4.5 to 6.5 minutes on 2 CPU cores: the built-in Fashion-MNIST subset
    /// (800 images, split 400/400), C=8, 5 cells, 4 nodes, the full DARTS op set, batch 32, 3 epochs. Its 39 alpha
    /// steps are 1/500 of DARTS's (50 epochs of 391); at DARTS's 3e-4 they move softmax(alpha) less than 1% from
    /// uniform, so alpha's learning rate is scaled up 100x to 3e-2 (Adam moves each alpha by about its learning
    /// rate per step) and the cell it derives is decided by the data rather than by the initial noise.
    pub fn quick() -> SearchConfig {
        SearchConfig {
            dataset: DatasetKind::Builtin,
            limit: Some(800),
            space: SearchSpace { channels: 8, layers: 5, ..Default::default() },
            epochs: 3,
            batch_size: 32,
            arch_lr: 3e-2,
            ..Default::default()
        }
    }

    /// PC-DARTS (Xu et al., ICLR 2020) as its authors' code searches on CIFAR-10: partial channels K=4, edge
    /// normalisation, batch 256, SGD lr 0.1 (cosine to 0), Adam 6e-4 on alpha and beta after 15 warm-up
    /// epochs of weights only, 50 epochs, C=16, 8 cells.
    pub fn pc_darts() -> SearchConfig {
        SearchConfig {
            space: SearchSpace { partial_channels: 4, edge_normalization: true, ..Default::default() },
            batch_size: 256,
            lr: 0.1,
            lr_min: 0.0,
            arch_lr: 6e-4,
            arch_warmup_epochs: 15,
            ..Default::default()
        }
    }

    /// The skip dropout rate in `epoch` (0-based), as P-DARTS's `train_search.py` sets it: during the
    /// weight-only warm-up linearly, `p * (E - e - 1) / E`; once alpha learns exponentially from `p` again,
    /// `p * exp(-0.2 * (e - warmup))`, so that the dropout is strongest while alpha starts to learn.
    pub fn skip_dropout_at(&self, epoch: usize) -> f64 {
        let (e, n, warmup) = (epoch as f64, self.epochs as f64, self.arch_warmup_epochs);
        if epoch < warmup {
            self.skip_dropout * (n - e - 1.0).max(0.0) / n
        } else {
            self.skip_dropout * (-0.2 * (e - warmup as f64)).exp()
        }
    }

    /// The weight of DARTS-'s auxiliary skip connections in `epoch` (0-based): DARTS-'s linear decay,
    /// `(E - e) / E`, from 1 in the first epoch to 1/E in the last.
    pub fn aux_skip_at(&self, epoch: usize) -> f64 {
        let e = self.epochs as f64;
        (e - epoch as f64).max(0.0) / e
    }

    /// GDAS's temperature in `epoch` (0-based); None without GDAS.
    pub fn gdas_tau_at(&self, epoch: usize) -> Option<f64> {
        self.gdas.map(|g| {
            let span = self.epochs.saturating_sub(1).max(1) as f64;
            g.tau_max - (g.tau_max - g.tau_min) * (epoch as f64 / span).min(1.0)
        })
    }

    /// Checks values that no search can run with.
    pub fn validate(&self) -> Result<()> {
        self.space.validate()?;
        let pos = |v: f64, name: &str| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} = {v}: it must be a positive number");
            }
            Ok(())
        };
        if self.epochs == 0 {
            bail!("epochs = 0: a search needs at least one epoch");
        }
        if self.batch_size < 2 {
            bail!("batch size {}: batch normalisation needs at least 2 examples per batch", self.batch_size);
        }
        pos(self.lr, "lr")?;
        pos(self.arch_lr, "arch_lr")?;
        pos(self.grad_clip, "grad_clip")?;
        if !(self.lr_min >= 0.0 && self.lr_min <= self.lr) {
            bail!("lr_min = {}: it must lie between 0 and lr = {}", self.lr_min, self.lr);
        }
        for (v, n) in [(self.momentum, "momentum"), (self.arch_betas.0, "beta1"), (self.arch_betas.1, "beta2")] {
            if !(0.0..1.0).contains(&v) {
                bail!("{n} = {v}: it must lie in [0, 1)");
            }
        }
        if self.weight_decay < 0.0 || self.arch_weight_decay < 0.0 {
            bail!("weight decay must not be negative");
        }
        if self.arch_warmup_epochs >= self.epochs {
            bail!(
                "arch_warmup_epochs = {} with {} epochs: alpha would never train; use fewer warm-up epochs",
                self.arch_warmup_epochs,
                self.epochs
            );
        }
        if !(0.0..1.0).contains(&self.skip_dropout) {
            bail!("skip_dropout = {}: a dropout rate lies in [0, 1) (P-DARTS uses 0.1 to 0.7)", self.skip_dropout);
        }
        if self.gdas.is_some() && self.order == Order::Second {
            bail!("GDAS with --order second: GDAS is first order (a sampled step leaves most weights without a gradient for the unrolled step); use --order first");
        }
        if let Some(g) = self.gdas {
            if !(g.tau_min.is_finite() && g.tau_min > 0.0 && g.tau_max.is_finite() && g.tau_max >= g.tau_min) {
                bail!(
                    "GDAS temperatures tau_max = {}, tau_min = {}: they must be finite, positive, tau_max >= tau_min \
                     (GDAS anneals 10 -> 0.1)",
                    g.tau_max,
                    g.tau_min
                );
            }
        }
        if let Some(0) = self.early_stop_skip_connects {
            bail!("early_stop_skip_connects = 0 would stop before the first epoch; DARTS+ uses 2");
        }
        if let Some(0) = self.limit {
            bail!("limit = 0: use at least a few examples, or leave the limit out");
        }
        Ok(())
    }
}
