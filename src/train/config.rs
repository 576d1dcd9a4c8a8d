//! What determines a training's result: the configuration, built from a published recipe, its learning-rate and
//! drop-path schedules, and the checks of impossible settings.

use crate::data::DatasetKind;
use crate::genotype::Genotype;
use crate::native::Precision;
use crate::network::NetworkConfig;
use crate::optim::{warmup_factor, LrSchedule};
use crate::recipe::Recipe;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that determines a training run's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Which dataset.
    pub dataset: DatasetKind,
    /// Where its files are.
    pub data_dir: Option<PathBuf>,
    /// Use only the first `limit` training (and test) examples.
    pub limit: Option<usize>,
    /// The cell.
    pub genotype: Genotype,
    /// The macro shape.
    pub network: NetworkConfig,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub lr_min: f64,
    /// How the learning rate changes over the epochs (cosine for CIFAR, StepLR for DARTS's ImageNet).
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Epochs of linear learning-rate warm-up, `(e + 1) / warmup` of the scheduled rate (PC-DARTS's ImageNet: 5).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Gradient norm clip.
    pub grad_clip: f64,
    /// Weight of the auxiliary head's loss.
    pub aux_weight: f64,
    /// Drop-path probability reached at the last epoch (ramped linearly from 0).
    pub drop_path: f64,
    /// Cutout side in pixels (0 = none).
    pub cutout: i64,
    /// Label smoothing of the cross-entropy (0.1 in DARTS' ImageNet training).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Seed.
    pub seed: u64,
    /// Fraction of the training set held out as a validation split that chooses `model-best` (0: none, as the
    /// original, which reports the last epoch). The test set is evaluated, never selected on.
    #[serde(default)]
    pub valid_portion: f64,
    /// The published recipe these settings started from (values given on the command line override it).
    #[serde(default)]
    pub recipe: Option<Recipe>,
    /// Image folders: the square size images are resized to (default 32).
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Arithmetic of the forward passes: fp32, or bf16 mixed precision (autocast; weights, gradients and SGD stay
    /// float32). Meant for GPUs with bfloat16 units (NVIDIA Ampere and later); CPUs without them run it slower.
    #[serde(default)]
    pub precision: Precision,
}

impl TrainConfig {
    /// The DARTS CIFAR-10 evaluation settings for `genotype` (the recipe darts-cifar).
    pub fn darts(genotype: Genotype) -> TrainConfig {
        TrainConfig::from_recipe(Recipe::DartsCifar, genotype)
    }

    /// The published `recipe` for `genotype`, on the built-in data with seed 0 until they are set.
    pub fn from_recipe(recipe: Recipe, genotype: Genotype) -> TrainConfig {
        let h = recipe.hyper();
        TrainConfig {
            dataset: DatasetKind::Builtin,
            data_dir: None,
            limit: None,
            genotype,
            network: h.network,
            epochs: h.epochs,
            batch_size: h.batch_size,
            lr: h.lr,
            lr_min: h.lr_min,
            lr_schedule: h.lr_schedule,
            warmup_epochs: h.warmup_epochs,
            momentum: h.momentum,
            weight_decay: h.weight_decay,
            grad_clip: h.grad_clip,
            aux_weight: h.aux_weight,
            drop_path: h.drop_path,
            cutout: h.cutout,
            label_smoothing: h.label_smoothing,
            image_size: None,
            precision: Precision::Fp32,
            seed: 0,
            valid_portion: 0.0,
            recipe: Some(recipe),
        }
    }

    /// The learning rate of `epoch` (0-based): the schedule's value for that epoch, times the warm-up factor.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr_schedule.at(self.lr, self.lr_min, epoch, self.epochs) * warmup_factor(epoch, self.warmup_epochs)
    }

    /// The drop-path probability of `epoch`: the original's linear ramp `drop_path * e / E`.
    pub fn drop_path_at(&self, epoch: usize) -> f64 {
        self.drop_path * epoch as f64 / self.epochs as f64
    }

    /// Checks values no training can run with.
    pub fn validate(&self) -> Result<()> {
        self.genotype.validate()?;
        self.validate_settings()
    }

    /// Checks every value but the genotype (so that `darts run` can check its training before searching).
    pub fn validate_settings(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("epochs = 0: training needs at least one epoch");
        }
        if self.batch_size < 2 {
            bail!("batch size {}: batch normalisation needs at least 2 examples", self.batch_size);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr = {}: it must be a positive number", self.lr);
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            bail!("drop_path = {}: it must lie in [0, 1)", self.drop_path);
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!("label_smoothing = {}: it must lie in [0, 1)", self.label_smoothing);
        }
        if self.cutout < 0 || self.aux_weight < 0.0 {
            bail!("cutout and aux_weight must not be negative");
        }
        if !(self.grad_clip.is_finite() && self.grad_clip > 0.0) {
            bail!("grad_clip = {}: it must be a positive number (the original clips at 5)", self.grad_clip);
        }
        if !(0.0..1.0).contains(&self.momentum) || self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            bail!(
                "momentum = {}, weight_decay = {}: momentum lies in [0, 1), decay is not negative",
                self.momentum,
                self.weight_decay
            );
        }
        if !(0.0..1.0).contains(&self.valid_portion) {
            bail!(
                "valid_portion = {}: the held-out validation fraction lies in [0, 1) (0: none; 0.1 holds out a tenth)",
                self.valid_portion
            );
        }
        if self.warmup_epochs >= self.epochs {
            bail!(
                "warmup_epochs = {} with {} epochs: the warm-up must end before training does",
                self.warmup_epochs,
                self.epochs
            );
        }
        match self.lr_schedule {
            LrSchedule::Step { gamma, period } if !(gamma > 0.0 && gamma <= 1.0) || period == 0 => bail!(
                "step schedule gamma = {gamma}, period = {period}: gamma lies in (0, 1] and the period is at least 1 \
                 epoch (DARTS's ImageNet: 0.97 every epoch)"
            ),
            LrSchedule::PcDartsLinear if self.epochs <= 5 => {
                bail!("PC-DARTS's linear schedule needs more than 5 epochs (its last 5 have their own slope)")
            }
            LrSchedule::Cosine if !(self.lr_min >= 0.0 && self.lr_min <= self.lr) => {
                bail!("lr_min = {}: it must lie between 0 and lr = {}", self.lr_min, self.lr)
            }
            _ => {}
        }
        let c = self.network.channels;
        if c < 2 || !c.is_multiple_of(2) {
            bail!("channels = {c}: initial channels must be even (FactorizedReduce halves them)");
        }
        if self.network.layers < 3 {
            bail!("layers = {}: the network needs at least 3 cells (two are reductions)", self.network.layers);
        }
        Ok(())
    }
}
