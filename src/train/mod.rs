//! Training a derived network from scratch (the original `train.py`) and evaluating it on the test set.

use crate::data::Split;
use crate::data::{self, Augment, Dataset};
use crate::evaluate::{evaluate, evaluate_sums, score_indices, EvalResult};
use crate::interrupt::{gather_positions, Interrupted, MidEpoch, Position, RankPositions};
use crate::native::{cuda_peak_mb, reset_cuda_peak, with_precision};
use crate::network::{count_parameters_without_auxiliary, drop_path_masks, loss_with_auxiliary, Network};
use crate::optim::{clip_grad_norm, Sgd};
use crate::params::{read_checkpoint, Params};
use crate::progress::peak_rss_mb;
use crate::progress::StepMeter;
use crate::rundir::CHECKPOINT;
use crate::rundir::{Best, TrainStats};
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

mod config;

pub use config::TrainConfig;

/// A training run in progress.
pub struct Trainer {
    /// Its configuration.
    pub config: TrainConfig,
    /// Where it runs.
    pub device: Device,
    vs: nn::VarStore,
    /// The network.
    pub net: Network,
    params: Params,
    sgd: Sgd,
    train: Dataset,
    test: Dataset,
    /// The training examples the weights learn on (all of them without a validation split).
    train_indices: Vec<usize>,
    /// The held-out validation examples (empty without a validation split).
    valid_indices: Vec<usize>,
    /// Next epoch to run.
    pub epoch: usize,
    /// The best epoch so far on the validation split (None without one): what `model-best` holds.
    pub best: Option<Best>,
    /// The process group of a data-parallel run.
    dist: Option<std::sync::Arc<crate::dist::Dist>>,
    /// Where inside the current epoch a resumed run continues (from a mid-epoch checkpoint).
    resume_at: Option<Position>,
    /// Every rank's place, from a checkpoint written inside an epoch of a data-parallel run.
    rank_resume: Option<RankPositions>,
    /// Checkpoints inside epochs, and the stop a signal asks for.
    pub mid_epoch: MidEpoch,
    /// The training step's forward and backward pass, replayed as a CUDA graph when asked for.
    graph: crate::graphs::Graphed,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    epoch: usize,
    // Checkpoints before the validation split held `best_acc` (a test accuracy); it is ignored.
    #[serde(default)]
    best: Option<Best>,
    config: TrainConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ranks: Option<RankPositions>,
}

impl Trainer {
    /// Loads the data and builds the network from `config.seed`.
    pub fn new(config: TrainConfig, device: Device) -> Result<Trainer> {
        config.validate()?;
        let (kind, dir, size) = (config.dataset, config.data_dir.as_deref(), config.image_size);
        let train = data::load_with(kind, dir, true, size)?.truncated(config.limit);
        let test = data::load_with(kind, dir, false, size)?.truncated(config.limit);
        let min = config.network.min_image_size();
        if train.shape.height < min || train.shape.width < min {
            bail!(
                "images of {}x{} are too small for this network (at least {min}x{min})",
                train.shape.height,
                train.shape.width
            );
        }
        // Drawn on the CPU from the seed and then moved, so that one seed starts the same training on any device.
        let (mut vs, net) = {
            let _rng = crate::torch_rng_lock();
            tch::manual_seed(config.seed as i64);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Network::new(&vs.root(), &config.genotype, &config.network, &train.shape);
            (vs, net)
        };
        vs.set_device(device);
        let params = Params::of(&vs);
        let sgd = Sgd::new(&params.weights, config.lr, config.momentum, config.weight_decay);
        let (train_indices, valid_indices) = if config.valid_portion > 0.0 {
            let split = Split::new(train.len(), 1.0 - config.valid_portion, config.seed)
                .map_err(|e| anyhow::anyhow!("--valid-portion {}: {e}", config.valid_portion))?;
            if split.train.len() < config.batch_size {
                bail!(
                    "holding out {} of {} training examples for validation leaves fewer than one batch of {}",
                    split.val.len(),
                    train.len(),
                    config.batch_size
                );
            }
            (split.train, split.val)
        } else {
            ((0..train.len()).collect(), Vec::new())
        };
        Ok(Trainer {
            config,
            device,
            vs,
            net,
            params,
            sgd,
            train,
            test,
            train_indices,
            valid_indices,
            epoch: 0,
            best: None,
            dist: None,
            resume_at: None,
            rank_resume: None,
            mid_epoch: MidEpoch::default(),
            graph: crate::graphs::Graphed::eager("the training step"),
        })
    }

    /// Uses channels-last kernels and activations (`on`) or NCHW; the maths is the same.
    pub fn set_channels_last(&mut self, on: bool) {
        crate::network::set_channels_last(&mut self.net, &self.vs, on);
    }

    /// Replays each training step's forward and backward pass as a CUDA graph (`--cuda-graphs`): captured again
    /// each epoch (its drop-path rate is baked in); a batch of another size (the last, short one) runs eagerly as
    /// that shape's warm-up. The SGD step, clipping and the metrics stay eager: a handful of multi-tensor kernels,
    /// which use the graph's outputs before the next replay rewrites them.
    /// Data-parallel runs stay eager (their gradient average goes through c10d between backward and SGD), with a
    /// message. Refused off a CUDA device.
    pub fn set_cuda_graphs(&mut self, on: bool) -> Result<()> {
        if !on {
            self.graph = crate::graphs::Graphed::eager("the training step");
            return Ok(());
        }
        crate::graphs::require(self.device)?;
        if self.dist.is_some() {
            eprintln!("--cuda-graphs: a data-parallel training runs eagerly (its gradients are averaged over c10d)");
            return Ok(());
        }
        self.graph = crate::graphs::Graphed::on("the training step", self.device);
        Ok(())
    }

    /// The training set (all of it, the validation split included).
    pub fn train_data(&self) -> &Dataset {
        &self.train
    }

    /// Parameters, auxiliary head excluded (as the original counts them).
    pub fn parameter_count(&self) -> i64 {
        count_parameters_without_auxiliary(&self.vs)
    }

    /// Parameter and multiply-accumulate counts of the network on this data's image shape.
    pub fn cost(&self) -> crate::network::NetworkCost {
        crate::network::network_cost(&self.net, &self.vs, &self.train.shape)
    }

    /// The trainable weights (shallow copies), in a fixed order.
    pub fn weights(&self) -> Vec<Tensor> {
        self.params.weights.iter().map(Tensor::shallow_clone).collect()
    }

    /// Sizes of the training split the weights learn on, the held-out validation split and the test set.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.train_indices.len(), self.valid_indices.len(), self.test.len())
    }

    /// One epoch over the full training set, then evaluation on the test set.
    pub fn run_epoch(&mut self, bar: Option<&ProgressBar>) -> Result<TrainStats> {
        let start = std::time::Instant::now();
        reset_cuda_peak(self.device);
        let cfg = self.config.clone();
        let epoch = self.epoch;
        let lr = cfg.lr_at(epoch);
        self.sgd.lr = lr;
        self.net.drop_path_prob = cfg.drop_path_at(epoch);
        // A head whose loss weighs 0 is not run (its weights get zero gradients, as 0 times its loss gave them).
        self.net.auxiliary_in_training = cfg.aux_weight > 0.0;
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(epoch as u64));
        let mut batches = data::shuffled_batches(&self.train_indices, cfg.batch_size, &mut rng);
        let dist = self.dist.clone();
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world()));
        if world > 1 {
            // Every rank draws the same global batches and takes its shard of each; ranks other than 0 augment
            // and drop paths from their own streams, so that their examples are not treated alike.
            batches = batches.into_iter().map(|b| b[crate::dist::shard(b.len(), rank, world)].to_vec()).collect();
            if rank > 0 {
                rng.set_stream(2 * rank as u64 + 2);
            }
        }
        let augment = Augment { cutout: cfg.cutout, ..cfg.dataset.default_augment() };
        let mut meter = StepMeter::new(self.device, batches.len(), bar);
        if let Some(r) = self.rank_resume.take() {
            self.resume_at = Some(r.take(dist.as_deref())?);
        }
        let resume_at = self.resume_at.take();
        let nan_hint = format!(
            "the last checkpoint (end of epoch {epoch}) is intact, but a run's settings are fixed: start a new run \
             (another --out) with a lower --lr or a smaller --grad-clip"
        );
        // Batches are made on a loader thread from `rng`; drop-path masks come from a second stream of it.
        let mut mask_rng = rng.clone();
        mask_rng.set_stream(if rank == 0 { 1 } else { 2 * rank as u64 + 3 });
        // Inside an epoch (a checkpoint written mid-epoch): the streams and sums where it stopped.
        let (first, before_s, before_wait) = match &resume_at {
            Some(p) => {
                rng.set_word_pos(Position::parse_word(&p.loader)?);
                mask_rng.set_word_pos(Position::parse_word(&p.masks)?);
                meter.restore(p.meter);
                (p.step, p.seconds, p.waited)
            }
            None => (0, 0.0, 0.0),
        };
        let (data, device, n) = (self.train.shallow_clone(), self.device, batches.len());
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        let mut loader = data::prefetch::Prefetch::new(n - first, 3, move |i| {
            let batch = data.batch(&batches[first + i], Some((&augment, &mut rng)), device);
            (batch, rng.get_word_pos())
        });
        let mut steps = first;
        let comm_before = dist.as_ref().map_or(0.0, |d| d.seconds_in_collectives());
        while let Some(item) = loader.next() {
            let step = steps;
            let ((x, y), loader_pos) = item.map_err(anyhow::Error::msg)?;
            if sizes[step] < 2 && dist.is_some() {
                // A shard too small for batch normalisation (the last, short batch) sits this step out but takes
                // part in the gradient average with weight 0, so that every rank takes every step.
                let mut grads: Vec<Tensor> = self.params.weights.iter().map(Tensor::zeros_like).collect();
                self.step(&mut grads, 0.0)?;
                steps += 1;
                continue;
            }
            let masks = (self.net.drop_path_prob > 0.0).then(|| {
                drop_path_masks(self.net.drop_sites(), sizes[step], self.net.drop_path_prob, &mut mask_rng)
                    .to_device(self.device)
            });
            // The forward pass and the loss in the configured precision; backward outside the autocast region, as
            // torch.autocast prescribes (its casts are recorded in the graph, so gradients reach float32 weights).
            let (net, weights, device) = (&self.net, &self.params.weights, self.device);
            let mut pass = |t: &[Tensor]| -> Result<Vec<Tensor>> {
                let (x, y, masks) = (&t[0], &t[1], t.get(2));
                let (logits, loss) = with_precision(device, cfg.precision, || {
                    let (logits, aux) = net.forward_masked(x, true, masks);
                    let loss = loss_with_auxiliary(&logits, aux.as_ref(), y, cfg.aux_weight, cfg.label_smoothing);
                    (logits.to_kind(Kind::Float), loss)
                })?;
                let mut out = vec![logits.detach()];
                for (g, w) in Tensor::run_backward(&[&loss], weights, false, false).into_iter().zip(weights) {
                    out.push(if g.defined() { g } else { w.zeros_like() });
                }
                Ok(out)
            };
            let mut inputs = vec![&x, &y];
            inputs.extend(masks.as_ref());
            // The host values the pass bakes in: the drop-path rate (per epoch) and whether the head runs.
            let key = {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                (self.net.drop_path_prob.to_bits(), self.net.auxiliary_in_training).hash(&mut h);
                h.finish()
            };
            let mut out = self.graph.run(key, &inputs, &mut pass)?;
            let mut grads = out.split_off(1);
            let logits = out.pop().expect("the logits");
            self.step(&mut grads, sizes[step] as f64)?;
            let main_loss = logits.detach().cross_entropy_for_logits(&y);
            meter.record(step, &main_loss, &logits, &y, bar, &nan_hint)?;
            steps += 1;
            let (due, stop) = self.mid_epoch.decide(steps, n, dist.as_deref())?;
            if due {
                let position = Position {
                    step: steps,
                    loader: Position::word(loader_pos),
                    masks: Position::word(mask_rng.get_word_pos()),
                    sample_stream: None,
                    meter: meter.sums(),
                    seconds: before_s + start.elapsed().as_secs_f64(),
                    waited: before_wait + loader.waited().as_secs_f64(),
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
        let data_wait_seconds = before_wait + loader.waited().as_secs_f64();
        let (mut train_loss, mut train_acc) = meter.means();
        let mut valid = None;
        if let Some(d) = &dist {
            // Batch normalisation keeps per-rank statistics while training (as DDP); evaluation and the saved
            // model use rank 0's, which every rank takes now (as DDP's broadcast_buffers).
            let buffers: Vec<&Tensor> = self.params.buffers.iter().collect();
            d.broadcast(&buffers, 0)?;
            let mut state: Vec<Tensor> = self.weights();
            state.extend(self.sgd.buffers.iter().map(Tensor::shallow_clone));
            d.check_identical(&format!("the weights after epoch {}", epoch + 1), &state)?;
            let [loss, correct, seen] = <[f64; 3]>::try_from(d.sum_f64(&meter.sums())?).expect("three sums");
            (train_loss, train_acc) = (loss / seen.max(1.0), correct / seen.max(1.0));
            if !self.valid_indices.is_empty() {
                let v = self.sharded_eval(&self.valid_indices, &self.train)?;
                valid = Some((v.loss, v.top1));
            }
        } else if !self.valid_indices.is_empty() {
            let net = &self.net;
            valid =
                Some(score_indices(&self.train, &self.valid_indices, 256, self.device, |x| net.forward_t(x, false).0));
        }
        let test = self.evaluate()?;
        self.epoch += 1;
        Ok(TrainStats {
            epoch,
            lr,
            drop_path: self.net.drop_path_prob,
            train_loss,
            train_acc,
            valid_loss: valid.map(|v| v.0),
            valid_acc: valid.map(|v| v.1),
            test_loss: test.loss,
            test_acc: test.top1,
            test_top5: test.top5,
            seconds: before_s + start.elapsed().as_secs_f64(),
            peak_rss_mb: peak_rss_mb(),
            data_wait_seconds,
            peak_gpu_mb: cuda_peak_mb(self.device),
            comm_seconds: dist.as_ref().map(|d| d.seconds_in_collectives() - comm_before),
        })
    }

    /// Averages the gradients over the processes (when data-parallel), clips them and takes the SGD step;
    /// `examples`: this process's examples in the step.
    fn step(&mut self, grads: &mut [Tensor], examples: f64) -> Result<()> {
        if let Some(d) = &self.dist {
            d.average_gradients(grads, examples)?;
        }
        let _ = clip_grad_norm(grads, self.config.grad_clip);
        self.sgd.step(&self.params.weights, grads);
        Ok(())
    }

    /// Evaluates the examples `indices` of `data`, each process its shard, the sums added over processes.
    fn sharded_eval(&self, indices: &[usize], data: &Dataset) -> Result<EvalResult> {
        let d = self.dist.as_ref().expect("a process group");
        let part = &indices[crate::dist::shard(indices.len(), d.rank(), d.world())];
        let sums = evaluate_sums(&self.net, data, part, 256, self.device, self.config.precision)?;
        let total = <[f64; 4]>::try_from(d.sum_f64(&sums)?).expect("four sums");
        Ok(EvalResult::from_sums(total, data.shape.classes))
    }

    /// Takes part in a data-parallel run through `dist` (every rank must call every collective in step).
    pub fn set_dist(&mut self, dist: std::sync::Arc<crate::dist::Dist>) {
        self.dist = Some(dist);
    }

    /// Evaluates on the test set (sharded over the processes of a data-parallel run).
    pub fn evaluate(&self) -> Result<EvalResult> {
        if self.dist.is_some() {
            let all: Vec<usize> = (0..self.test.len()).collect();
            return self.sharded_eval(&all, &self.test);
        }
        evaluate(&self.net, &self.test, 256, self.device, self.config.precision)
    }

    /// Writes the model's weights and BN statistics to `path` atomically. Names follow the original PyTorch
    /// state_dict keys, and each BN also gets PyTorch's `num_batches_tracked` (the training batches seen), so
    /// that `load_state_dict(strict=True)` of the original model accepts the file.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let mut named = self.params.named();
        let batches = (self.epoch * self.train_indices.len().div_ceil(self.config.batch_size.max(1))) as f64;
        let tracked: Vec<(String, Tensor)> = named
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".running_mean"))
            .map(|bn| (format!("{bn}.num_batches_tracked"), Tensor::scalar_tensor(batches, (Kind::Int64, Device::Cpu))))
            .collect();
        named.extend(tracked);
        crate::rundir::write_tensors_atomically(&named, path)
    }

    /// Writes the training state (model, optimiser, epoch, best epoch) to `dir/checkpoint.safetensors`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_checkpoint_at(dir, None, None)
    }

    /// [`Trainer::save_checkpoint`] inside the epoch, at `position` (and every rank's, in a data-parallel run).
    fn save_checkpoint_at(&self, dir: &Path, position: Option<Position>, ranks: Option<RankPositions>) -> Result<()> {
        let meta = Meta { epoch: self.epoch, best: self.best, config: self.config.clone(), position, ranks };
        let meta = serde_json::to_vec(&meta)?;
        let mut named = self.params.named();
        named.push(("meta".into(), Tensor::from_slice(&meta)));
        let sgd = self.params.names.iter().zip(&self.sgd.buffers);
        named.extend(sgd.map(|(n, t)| (format!("sgd/{n}"), t.shallow_clone())));
        crate::rundir::write_tensors_atomically(&named, &dir.join(CHECKPOINT))
    }

    /// Restores the run saved in `dir`.
    pub fn resume(dir: &Path, device: Device) -> Result<Trainer> {
        let (path, map, meta): (_, _, Meta) = read_checkpoint(dir, CHECKPOINT, "training")?;
        let mut t = Trainer::new(meta.config, device)?;
        t.params.load(&map, &path)?;
        t.params.load_per_weight(&map, "sgd/", &t.sgd.buffers, &path)?;
        t.epoch = meta.epoch;
        t.best = meta.best;
        t.resume_at = meta.position;
        t.rank_resume = meta.ranks;
        Ok(t)
    }

    /// Loads model weights from a map read from `path`, checking names and shapes and listing every difference.
    pub fn load_model(&mut self, map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        self.params.load(map, path)
    }
}
