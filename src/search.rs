//! The bilevel search loop: for each training batch, one alpha step on a validation batch, then one weight
//! step; per-epoch evaluation, metrics, atomic checkpoints and bit-exact resume.

use crate::architect::{Architect, Order};
use crate::data::{self, Dataset, DatasetKind, Split};
use crate::genotype::Genotype;
use crate::interrupt::{Interrupted, MidEpoch, Position};
use crate::native::{cuda_peak_mb, reset_cuda_peak};
use crate::optim::{clip_grad_norm, cosine_lr, Sgd};
use crate::params::{copy_checked, read_checkpoint, Params};
use crate::progress::StepMeter;
use crate::rundir::EpochStats;
use crate::space::SearchSpace;
use crate::supernet::{softmax_rows, Alphas, SearchNetwork};
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

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

/// A search in progress: data, supernet, both optimisers and the epoch counter.
pub struct Search {
    /// Its configuration.
    pub config: SearchConfig,
    /// Where it runs.
    pub device: Device,
    vs: nn::VarStore,
    /// The supernet (with the alphas).
    pub net: SearchNetwork,
    params: Params,
    sgd: Sgd,
    architect: Architect,
    data: Dataset,
    /// The disjoint weight/alpha split of the training set.
    pub split: Split,
    /// The next epoch to run (= epochs done).
    pub epoch: usize,
    /// Set when the early stop against skip-connection collapse ended the search (after epoch `epoch - 1`).
    pub stopped_early: bool,
    /// Where inside the current epoch a resumed search continues (from a mid-epoch checkpoint).
    resume_at: Option<Position>,
    /// Checkpoints inside epochs, and the stop a signal asks for.
    pub mid_epoch: MidEpoch,
}

const CHECKPOINT: &str = "checkpoint.safetensors";

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    epoch: usize,
    adam_steps: i64,
    config: SearchConfig,
    #[serde(default)]
    stopped_early: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<Position>,
}

impl Search {
    /// Loads the data, checks the split and builds the supernet and optimisers from `config.seed`.
    pub fn new(config: SearchConfig, device: Device) -> Result<Search> {
        config.validate()?;
        let data = data::load_with(config.dataset, config.data_dir.as_deref(), true, config.image_size)?
            .truncated(config.limit);
        config.space.validate_for(&data.shape)?;
        let split = if config.balanced_split {
            let labels = Vec::<i64>::try_from(&data.labels).map_err(|e| anyhow::anyhow!("reading the labels: {e}"))?;
            Split::balanced(&labels, config.train_portion, config.seed)
        } else {
            Split::new(data.len(), config.train_portion, config.seed)
        }
        .map_err(anyhow::Error::msg)?;
        split.check_disjoint(data.len()).map_err(anyhow::Error::msg)?;
        if split.train.len() < config.batch_size || split.val.len() < 2 {
            bail!(
                "the split leaves {} examples for the weights and {} for alpha: fewer than one batch of {}; \
                 use more data (--limit) or a smaller --batch-size",
                split.train.len(),
                split.val.len(),
                config.batch_size
            );
        }
        // Drawn on the CPU from the seed and then moved, so that one seed starts the same search on any device.
        let (mut vs, mut net) = {
            let _rng = crate::torch_rng_lock();
            tch::manual_seed(config.seed as i64);
            let vs = nn::VarStore::new(Device::Cpu);
            let alphas = Alphas::random(&config.space, Device::Cpu);
            let net = SearchNetwork::new(&vs.root(), &config.space, &data.shape, alphas);
            (vs, net)
        };
        if device != Device::Cpu {
            vs.set_device(device);
            net.alphas = net.alphas.to_device(device);
        }
        crate::supernet::set_checkpoint_cells(&mut net, &vs, config.checkpoint_cells);
        let params = Params::of(&vs);
        let sgd = Sgd::new(&params.weights, config.lr, config.momentum, config.weight_decay);
        let architect = Architect::new(&net, config.order, config.arch_lr, config.arch_betas, config.arch_weight_decay);
        Ok(Search {
            config,
            device,
            vs,
            net,
            params,
            sgd,
            architect,
            data,
            split,
            epoch: 0,
            stopped_early: false,
            resume_at: None,
            mid_epoch: MidEpoch::default(),
        })
    }

    /// Uses channels-last kernels and activations (`on`) or NCHW; the maths is the same.
    pub fn set_channels_last(&mut self, on: bool) {
        crate::supernet::set_channels_last(&mut self.net, &self.vs, on);
    }

    /// Gradient checkpointing of cells on or off (same results; recorded in the next checkpoint's config).
    pub fn set_checkpoint_cells(&mut self, on: bool) {
        self.config.checkpoint_cells = on;
        crate::supernet::set_checkpoint_cells(&mut self.net, &self.vs, on);
    }

    /// Number of weight parameters of the supernet (alphas excluded).
    pub fn parameter_count(&self) -> i64 {
        crate::supernet::count_parameters(&self.vs)
    }

    /// The genotype derived from the current alphas (and betas: PC-DARTS ranks edges by alpha times beta).
    pub fn genotype(&self) -> Genotype {
        let (n, r) = self.net.alphas.derivation_weights();
        Genotype::derive_limited(&n, &r, &self.config.space, self.config.max_skip_connects)
    }

    /// The genotype as plain DARTS derives it, without the skip-connect limit.
    pub fn unrestricted_genotype(&self) -> Genotype {
        let (n, r) = self.net.alphas.derivation_weights();
        Genotype::derive(&n, &r, &self.config.space)
    }

    /// Applies the early stop against skip-connection collapse after an epoch: true (and `stopped_early` set)
    /// when the epochs run are past the alpha warm-up and the unrestricted normal cell has at least
    /// `early_stop_skip_connects` skip connections.
    pub fn check_early_stop(&mut self) -> bool {
        if let Some(n) = self.config.early_stop_skip_connects {
            let past_warmup = self.epoch > self.config.arch_warmup_epochs;
            if past_warmup && crate::genotype::skip_connects(&self.unrestricted_genotype().normal) >= n {
                self.stopped_early = true;
            }
        }
        self.stopped_early
    }

    fn epoch_rng(&self, epoch: usize) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(epoch as u64))
    }

    /// Runs one epoch: per training batch an alpha step on a validation batch then a weight step; then
    /// evaluates on the alpha split. `bar`, when given, shows the steps.
    pub fn run_epoch(&mut self, bar: Option<&ProgressBar>) -> Result<EpochStats> {
        let start = std::time::Instant::now();
        reset_cuda_peak(self.device);
        let epoch = self.epoch;
        let lr = cosine_lr(self.config.lr, self.config.lr_min, epoch, self.config.epochs);
        self.sgd.lr = lr;
        let mut rng = self.epoch_rng(epoch);
        self.net.skip_dropout = self.config.skip_dropout_at(epoch);
        self.net.aux_skip = self.config.aux_skip_at(epoch);
        self.net.gdas_tau = self.config.gdas_tau_at(epoch);
        // The stream of dropout masks and GDAS samples starts afresh each epoch, so a resumed search draws the
        // same ones.
        let mut masks = self.epoch_rng(epoch);
        masks.set_stream(1);
        self.net.set_sample_stream(masks.next_u64());
        let bs = self.config.batch_size;
        let mut train_batches = data::shuffled_batches(&self.split.train, bs, &mut rng);
        let mut val_batches = data::shuffled_batches(&self.split.val, bs, &mut rng);
        let dist = self.architect.dist.clone();
        if let Some(d) = &dist {
            // Every rank draws the same global batches and takes its shard of each (a short last batch that
            // would leave a rank fewer than 2 examples for batch normalisation is left out on every rank); ranks
            // other than 0 augment from their own stream.
            let (rank, world) = (d.rank(), d.world());
            let shard = |batches: Vec<Vec<usize>>| -> Vec<Vec<usize>> {
                batches
                    .into_iter()
                    .filter(|b| b.len() >= 2 * world)
                    .map(|b| b[crate::dist::shard(b.len(), rank, world)].to_vec())
                    .collect()
            };
            (train_batches, val_batches) = (shard(train_batches), shard(val_batches));
            if rank > 0 {
                rng.set_stream(2 * rank as u64 + 2);
            }
        }
        let augment = self.config.dataset.default_augment();
        let mut meter = StepMeter::new(self.device, train_batches.len(), bar);
        let nan_hint = format!(
            "the last checkpoint (end of epoch {epoch}) is intact, but a run's settings are fixed: start a new run \
             (another --out) with a lower --lr or --arch-lr, or a smaller --grad-clip"
        );
        // Batches (and the alpha step's batches) are made on a loader thread, in the same order and from the
        // same random stream as they would be here.
        // Inside an epoch (a checkpoint written mid-epoch): the streams and sums where it stopped.
        let resume_at = self.resume_at.take();
        let (first, before_s, before_wait) = match &resume_at {
            Some(p) => {
                rng.set_word_pos(Position::parse_word(&p.loader)?);
                if let Some(seed) = p.sample_stream {
                    self.net.set_sample_stream(seed);
                }
                meter.restore(p.meter);
                (p.step, p.seconds, p.waited)
            }
            None => (0, 0.0, 0.0),
        };
        let (data, device, n) = (self.data.shallow_clone(), self.device, train_batches.len());
        let alpha_steps = epoch >= self.config.arch_warmup_epochs;
        let mut batches = data::prefetch::Prefetch::new(n - first, 3, move |i| {
            let step = first + i;
            let (xt, yt) = data.batch(&train_batches[step], Some((&augment, &mut rng)), device);
            let val = alpha_steps.then(|| {
                let vidx = &val_batches[step % val_batches.len()];
                data.batch(vidx, Some((&augment, &mut rng)), device)
            });
            (xt, yt, val, rng.get_word_pos())
        });
        let mut steps = first;
        self.architect.last_eta = None;
        while let Some(item) = batches.next() {
            let step = steps;
            let (xt, yt, val, loader_pos) = item.map_err(anyhow::Error::msg)?;
            if let Some((xv, yv)) = val {
                let p = &self.params;
                self.architect.step(&self.net, &p.weights, &p.buffers, &self.sgd, (&xt, &yt), (&xv, &yv), lr)?;
            }

            let weights: Vec<&Tensor> = self.params.weights.iter().collect();
            let (loss, logits, mut grads) = self.net.loss_grads(&xt, &yt, &weights);
            if let Some(d) = &dist {
                d.average_gradients(&mut grads, xt.size()[0] as f64)?;
            }
            let _ = clip_grad_norm(&mut grads, self.config.grad_clip);
            self.sgd.step(&self.params.weights, &grads);
            meter.record(step, &loss, &logits, &yt, bar, &nan_hint)?;
            steps += 1;
            if self.mid_epoch.due(steps, n) {
                let position = Position {
                    step: steps,
                    loader: Position::word(loader_pos),
                    masks: String::new(),
                    sample_stream: Some(self.net.sample_stream()),
                    meter: meter.sums(),
                    seconds: before_s + start.elapsed().as_secs_f64(),
                    waited: before_wait + batches.waited().as_secs_f64(),
                };
                if let Some(dir) = self.mid_epoch.dir.clone() {
                    self.save_checkpoint_at(&dir, Some(position))?;
                }
                if self.mid_epoch.stop_asked() {
                    return Err(Interrupted { epoch, step: steps }.into());
                }
            }
        }
        anyhow::ensure!(steps == n, "the data loader stopped after {steps} of {n} batches");
        let data_wait_seconds = before_wait + batches.waited().as_secs_f64();
        let (mut train_loss, mut train_acc) = meter.means();
        let (val_loss, val_acc) = match &dist {
            None => self.evaluate(&self.split.val.clone()),
            Some(d) => {
                // Batch normalisation keeps per-rank statistics while searching (as DDP); evaluation and the
                // checkpoint use rank 0's, which every rank takes now (as DDP's broadcast_buffers).
                let buffers: Vec<&Tensor> = self.params.buffers.iter().collect();
                d.broadcast(&buffers, 0)?;
                d.check_identical(&format!("the weights and alphas after epoch {}", epoch + 1), &self.state())?;
                let [loss, correct, seen] = <[f64; 3]>::try_from(d.sum_f64(&meter.sums())?).expect("three sums");
                (train_loss, train_acc) = (loss / seen.max(1.0), correct / seen.max(1.0));
                let part = &self.split.val[crate::dist::shard(self.split.val.len(), d.rank(), d.world())];
                let (l, a) = self.evaluate(part);
                let n = part.len() as f64;
                let [l, a, n] = <[f64; 3]>::try_from(d.sum_f64(&[l * n, a * n, n])?).expect("three sums");
                (l / n, a / n)
            }
        };
        self.epoch += 1;
        let betas = self.net.alphas.edge_weights_vec();
        Ok(EpochStats {
            epoch,
            lr,
            train_loss,
            train_acc,
            val_loss,
            val_acc,
            alpha_normal: softmax_rows(&self.net.alphas.normal),
            alpha_reduce: softmax_rows(&self.net.alphas.reduce),
            beta_normal: betas.as_ref().map(|b| b.0.clone()),
            beta_reduce: betas.map(|b| b.1),
            genotype: self.genotype(),
            seconds: before_s + start.elapsed().as_secs_f64(),
            peak_rss_mb: crate::progress::peak_rss_mb(),
            data_wait_seconds,
            peak_gpu_mb: cuda_peak_mb(self.device),
            skip_dropout: (self.config.skip_dropout > 0.0).then_some(self.net.skip_dropout),
            aux_skip: self.config.space.auxiliary_skip.then_some(self.net.aux_skip),
            gdas_tau: self.net.gdas_tau,
            unrolled_lr: self.architect.last_eta,
        })
    }

    /// Everything every rank of a data-parallel search must hold alike: weights, SGD momentum, alphas (and
    /// betas) and Adam's moments.
    fn state(&self) -> Vec<Tensor> {
        let mut all: Vec<Tensor> = self.params.weights.iter().map(Tensor::shallow_clone).collect();
        all.extend(self.sgd.buffers.iter().map(Tensor::shallow_clone));
        all.extend(self.net.alphas.tensors().into_iter().map(|t| t.detach()));
        all.extend(
            self.architect.adam.exp_avg.iter().chain(&self.architect.adam.exp_avg_sq).map(Tensor::shallow_clone),
        );
        all
    }

    /// Takes part in a data-parallel search through `dist` (every rank must call every collective in step).
    pub fn set_dist(&mut self, dist: std::sync::Arc<crate::dist::Dist>) -> Result<()> {
        if self.config.gdas.is_some() {
            bail!("GDAS does not run data-parallel yet (its unsampled ops have no gradient to average): one process");
        }
        if self.config.batch_size < 2 * dist.world() {
            bail!(
                "batch size {} over {} processes leaves fewer than 2 examples per process for batch normalisation: \
                 --batch-size is the global batch; use at least {}",
                self.config.batch_size,
                dist.world(),
                2 * dist.world()
            );
        }
        self.architect.dist = Some(dist);
        Ok(())
    }

    /// Loss and accuracy on `indices` in evaluation mode (BN running statistics), without gradients.
    pub fn evaluate(&self, indices: &[usize]) -> (f64, f64) {
        let chunk = self.config.batch_size.max(256);
        crate::evaluate::score_indices(&self.data, indices, chunk, self.device, |x| self.net.forward_t(x, false))
    }

    /// Writes weights, BN statistics, alphas, both optimisers' state and the epoch to `dir/checkpoint.safetensors`
    /// atomically (a temporary file renamed over the old one).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_checkpoint_at(dir, None)
    }

    /// [`Search::save_checkpoint`] inside the epoch, at `position`.
    fn save_checkpoint_at(&self, dir: &Path, position: Option<Position>) -> Result<()> {
        let meta = CheckpointMeta {
            epoch: self.epoch,
            adam_steps: self.architect.adam.step_count,
            config: self.config.clone(),
            stopped_early: self.stopped_early,
            position,
        };
        let meta = serde_json::to_vec(&meta)?;
        let mut named: Vec<(String, Tensor)> = vec![("meta".into(), Tensor::from_slice(&meta))];
        named.extend(self.params.named());
        let sgd = self.params.names.iter().zip(&self.sgd.buffers);
        named.extend(sgd.map(|(n, t)| (format!("sgd/{n}"), t.shallow_clone())));
        let arch = self.net.alphas.tensors();
        for (name, t) in self.net.alphas.names().into_iter().zip(&arch) {
            named.push((name.into(), t.detach()));
        }
        for i in 0..arch.len() {
            named.push((format!("adam/m/{i}"), self.architect.adam.exp_avg[i].shallow_clone()));
            named.push((format!("adam/v/{i}"), self.architect.adam.exp_avg_sq[i].shallow_clone()));
        }
        // Host copies, dense: channels-last kernels (3-channel stems) and CUDA tensors cannot be written as
        // they are.
        crate::rundir::write_tensors_atomically(&named, &dir.join(CHECKPOINT))
    }

    /// Rebuilds the search saved in `dir` and restores its exact state.
    pub fn resume(dir: &Path, device: Device) -> Result<Search> {
        let (path, map, meta): (_, _, CheckpointMeta) = read_checkpoint(dir, CHECKPOINT, "search")?;
        let mut s = Search::new(meta.config, device)?;
        s.params.load(&map, &path)?;
        s.params.load_per_weight(&map, "sgd/", &s.sgd.buffers, &path)?;
        let arch = s.net.alphas.tensors();
        let alphas: Vec<(&str, &Tensor)> = s.net.alphas.names().into_iter().zip(arch.iter().copied()).collect();
        let adam = (0..arch.len()).flat_map(|i| {
            [
                (format!("adam/m/{i}"), &s.architect.adam.exp_avg[i]),
                (format!("adam/v/{i}"), &s.architect.adam.exp_avg_sq[i]),
            ]
        });
        for (key, dst) in alphas.into_iter().map(|(k, t)| (k.to_string(), t)).chain(adam) {
            copy_checked(&map, &key, dst, &path)?;
        }
        s.architect.adam.step_count = meta.adam_steps;
        s.epoch = meta.epoch;
        s.stopped_early = meta.stopped_early;
        s.resume_at = meta.position;
        Ok(s)
    }
}
