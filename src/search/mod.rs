//! The bilevel search loop: for each training batch, one alpha step on a validation batch, then one weight
//! step; per-epoch evaluation, metrics, atomic checkpoints and bit-exact resume.

use crate::architect::Architect;
use crate::data::{self, Dataset, Split};
use crate::genotype::Genotype;
use crate::interrupt::{gather_positions, Interrupted, MidEpoch, Position, RankPositions};
use crate::native::{cuda_peak_mb, reset_cuda_peak};
use crate::optim::{clip_grad_norm, cosine_lr, Sgd};
use crate::params::{copy_checked, read_checkpoint, Params};
use crate::progress::StepMeter;
use crate::rundir::EpochStats;
use crate::rundir::CHECKPOINT;
use crate::supernet::{softmax_rows, Alphas, SearchNetwork};
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Device, Tensor};

mod config;

pub use config::{Gdas, SearchConfig};

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
    /// Every rank's place, from a checkpoint written inside an epoch of a data-parallel run.
    rank_resume: Option<RankPositions>,
    /// Checkpoints inside epochs, and the stop a signal asks for.
    pub mid_epoch: MidEpoch,
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    epoch: usize,
    adam_steps: i64,
    config: SearchConfig,
    #[serde(default)]
    stopped_early: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ranks: Option<RankPositions>,
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
            rank_resume: None,
            mid_epoch: MidEpoch::default(),
        })
    }

    /// Uses channels-last kernels and activations (`on`) or NCHW; the maths is the same.
    pub fn set_channels_last(&mut self, on: bool) {
        crate::supernet::set_channels_last(&mut self.net, &self.vs, on);
    }

    /// Replays the passes of each step as CUDA graphs (`--cuda-graphs`; see [`crate::supernet::set_cuda_graphs`]):
    /// the same computation launched as one graph per pass. Passes whose samples or masks the host draws (GDAS,
    /// skip dropout) and data-parallel searches stay eager, with a message. Refused off a CUDA device.
    pub fn set_cuda_graphs(&mut self, on: bool) -> Result<()> {
        if on {
            crate::graphs::require(self.device)?;
            if self.architect.dist.is_some() {
                eprintln!("--cuda-graphs: a data-parallel search runs eagerly (its gradients are averaged over c10d)");
                return Ok(());
            }
            if self.config.gdas.is_some() || self.config.skip_dropout > 0.0 {
                eprintln!(
                    "--cuda-graphs: GDAS's samples and skip dropout's masks are drawn on the host each pass: the \
                     passes that draw them run eagerly"
                );
            }
        }
        crate::supernet::set_cuda_graphs(&mut self.net, on);
        Ok(())
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
        // Each rank of a data-parallel search draws its own dropout masks (rank 0 those of one process); with GDAS
        // every rank must sample the same ops (their gradients are averaged), so the stream is shared.
        let rank = match (&self.architect.dist, self.config.gdas) {
            (Some(d), None) => d.rank() as u64,
            _ => 0,
        };
        self.net.set_sample_stream(masks.next_u64() ^ rank.wrapping_mul(0x9e37_79b9_7f4a_7c15));
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
        if let Some(r) = self.rank_resume.take() {
            self.resume_at = Some(r.take(dist.as_deref())?);
        }
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
        let comm_before = dist.as_ref().map_or(0.0, |d| d.seconds_in_collectives());
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
            let (due, stop) = self.mid_epoch.decide(steps, n, dist.as_deref())?;
            if due {
                let position = Position {
                    step: steps,
                    loader: Position::word(loader_pos),
                    masks: String::new(),
                    sample_stream: Some(self.net.sample_stream()),
                    meter: meter.sums(),
                    seconds: before_s + start.elapsed().as_secs_f64(),
                    waited: before_wait + batches.waited().as_secs_f64(),
                };
                let ranks = gather_positions(dist.as_deref(), &position)?;
                if let Some(dir) = self.mid_epoch.dir.clone() {
                    self.save_checkpoint_at(&dir, Some(position), ranks)?;
                }
                if stop {
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
            comm_seconds: dist.as_ref().map(|d| d.seconds_in_collectives() - comm_before),
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
        self.save_checkpoint_at(dir, None, None)
    }

    /// [`Search::save_checkpoint`] inside the epoch, at `position` (and every rank's, in a data-parallel run).
    fn save_checkpoint_at(&self, dir: &Path, position: Option<Position>, ranks: Option<RankPositions>) -> Result<()> {
        let meta = CheckpointMeta {
            epoch: self.epoch,
            adam_steps: self.architect.adam.step_count,
            config: self.config.clone(),
            stopped_early: self.stopped_early,
            position,
            ranks,
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
        s.rank_resume = meta.ranks;
        Ok(s)
    }
}
