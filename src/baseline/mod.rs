//! The baselines DARTS measures itself against, on DARTS's own space: random search and reinforcement learning.
//!
//! Both sample discrete cells (per intermediate node: two distinct inputs and a real op for each, normal and
//! reduction cell alike, exactly the genotypes DARTS can derive), train each sampled network from scratch for a
//! short budget on the weight half of the split, and score it by its accuracy on the other, disjoint half. Random
//! search samples uniformly. The RL baseline (REINFORCE, Williams 1992, as NAS-Bench-201's REINFORCE baseline on
//! this kind of space) keeps a categorical policy per decision, updated by Adam on
//! `(reward - moving-average baseline) * grad log p(architecture)` plus an entropy bonus. Every sample is one
//! JSON line of `samples.jsonl` with its cost in seconds; the policy is saved after every sample, so a run
//! resumes where it stopped and ends as an uninterrupted one would.

use crate::data::{self, Augment, Dataset, DatasetKind, Split};
use crate::driver::{drive, Console, RunOptions, Stage};
use crate::genotype::Genotype;
use crate::network::{Network, NetworkConfig};
use crate::optim::{clip_grad_norm, cosine_lr, Sgd};
use crate::params::Params;
use crate::rundir::{self, SampleRecord};
use crate::space::SearchSpace;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Device, Tensor};

mod policy;

pub use policy::{input_pairs, Policy, PolicyAdam};

/// How architectures are proposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Uniformly at random.
    Random,
    /// REINFORCE on a categorical policy per decision.
    Rl,
}

impl Strategy {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::Rl => "rl",
        }
    }
}

/// Everything that determines a baseline search's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineConfig {
    /// Random or RL.
    pub strategy: Strategy,
    /// Which dataset.
    pub dataset: DatasetKind,
    /// Where its files are.
    pub data_dir: Option<std::path::PathBuf>,
    /// Use only the first `limit` training examples.
    pub limit: Option<usize>,
    /// Image folders: the square size images are resized to.
    #[serde(default)]
    pub image_size: Option<usize>,
    /// The space: its ops (`none` is never sampled) and intermediate nodes.
    pub space: SearchSpace,
    /// Architectures to sample and evaluate.
    pub samples: usize,
    /// The network each sample is trained as (no auxiliary head).
    pub network: NetworkConfig,
    /// Training epochs per sample.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Initial learning rate (cosine to 0 over `epochs`).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Gradient norm clip.
    pub grad_clip: f64,
    /// Fraction of the training set the samples train on; the rest scores them (as DARTS's split).
    pub train_portion: f64,
    /// RL: the policy's Adam learning rate.
    pub controller_lr: f64,
    /// RL: decay of the reward's moving average (the REINFORCE baseline).
    pub baseline_decay: f64,
    /// RL: weight of the policy's entropy in its objective.
    pub entropy_weight: f64,
    /// Seed.
    pub seed: u64,
    /// Stop sampling once the samples have taken this many seconds (a search budget equal to another method's
    /// cost); `samples` stays the upper bound. Results then depend on the machine's speed.
    #[serde(default)]
    pub budget_seconds: Option<f64>,
}

impl BaselineConfig {
    /// A baseline scoring samples like the quick DARTS preset searches: the built-in subset (800 images, split
    /// 400/400), the full op set, 4 nodes; each sample a C=8, 5-cell network trained 2 epochs at batch 32.
    pub fn quick(strategy: Strategy) -> BaselineConfig {
        BaselineConfig {
            strategy,
            dataset: DatasetKind::Builtin,
            data_dir: None,
            limit: Some(800),
            image_size: None,
            space: SearchSpace::default(),
            samples: 20,
            network: NetworkConfig { channels: 8, layers: 5, auxiliary: false, ..Default::default() },
            epochs: 2,
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 3e-4,
            grad_clip: 5.0,
            train_portion: 0.5,
            controller_lr: 0.05,
            baseline_decay: 0.9,
            entropy_weight: 1e-3,
            seed: 2,
            budget_seconds: None,
        }
    }

    /// Checks values no baseline can run with.
    pub fn validate(&self) -> Result<()> {
        self.space.validate()?;
        if self.samples == 0 || self.epochs == 0 {
            bail!("samples and epochs must be at least 1");
        }
        if self.batch_size < 2 {
            bail!("batch size {}: batch normalisation needs at least 2 examples", self.batch_size);
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.controller_lr.is_finite() && self.controller_lr > 0.0) {
            bail!("lr = {}, controller_lr = {}: both must be positive", self.lr, self.controller_lr);
        }
        if !(0.0..1.0).contains(&self.baseline_decay) || self.entropy_weight < 0.0 {
            bail!("baseline_decay must lie in [0, 1) and entropy_weight must not be negative");
        }
        let c = self.network.channels;
        if c < 2 || !c.is_multiple_of(2) || self.network.layers < 3 {
            bail!("network {c} channels, {} cells: channels must be even, cells at least 3", self.network.layers);
        }
        Ok(())
    }
}
/// The state saved after every sample.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    config: BaselineConfig,
    done: usize,
    policy: Policy,
    adam: PolicyAdam,
    baseline: Option<f64>,
    total_seconds: f64,
}

/// Trains `genotype`'s network from seed `seed` on `split.train` and scores it on `split.val`: (accuracy, loss,
/// parameters). A loss that turns NaN scores 0 (an unusable architecture), with the loss reported as NaN.
pub fn evaluate_genotype(
    genotype: &Genotype,
    cfg: &BaselineConfig,
    data: &Dataset,
    split: &Split,
    seed: u64,
    device: Device,
    channels_last: bool,
) -> Result<(f64, f64, i64)> {
    let (vs, mut net) = {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), genotype, &cfg.network, &data.shape);
        (vs, net)
    };
    let mut vs = vs;
    vs.set_device(device);
    crate::network::set_channels_last(&mut net, &vs, channels_last);
    let params = Params::of(&vs);
    let parameters = crate::network::count_parameters_without_auxiliary(&vs);
    let mut sgd = Sgd::new(&params.weights, cfg.lr, cfg.momentum, cfg.weight_decay);
    let augment = Augment { cutout: 0, ..cfg.dataset.default_augment() };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for epoch in 0..cfg.epochs {
        sgd.lr = cosine_lr(cfg.lr, 0.0, epoch, cfg.epochs);
        for idx in data::shuffled_batches(&split.train, cfg.batch_size, &mut rng) {
            if idx.len() < 2 {
                continue;
            }
            let (x, y) = data.batch(&idx, Some((&augment, &mut rng)), device);
            let (logits, _) = net.forward_t(&x, true);
            let loss = logits.cross_entropy_for_logits(&y);
            if !loss.double_value(&[]).is_finite() {
                return Ok((0.0, f64::NAN, parameters));
            }
            let mut grads = Tensor::run_backward(&[&loss], &params.weights, false, false);
            let _ = clip_grad_norm(&mut grads, cfg.grad_clip);
            sgd.step(&params.weights, &grads);
        }
    }
    let (loss, acc) = crate::evaluate::score_indices(data, &split.val, 256, device, |x| net.forward_t(x, false).0);
    if !loss.is_finite() {
        return Ok((0.0, f64::NAN, parameters));
    }
    Ok((acc, loss, parameters))
}

/// What a baseline run leaves behind.
#[derive(Debug)]
pub struct BaselineOutcome {
    /// Every sample evaluated so far (earlier invocations included).
    pub samples: Vec<SampleRecord>,
    /// The best sample's genotype.
    pub best: Genotype,
    /// The best sample's score.
    pub best_acc: f64,
    /// Whether all samples are done.
    pub finished: bool,
    /// The final policy (uniform for random search).
    pub policy: Policy,
}

/// Starts a baseline search in `opts.out_dir`.
pub fn start(config: BaselineConfig, opts: &RunOptions) -> Result<BaselineOutcome> {
    config.validate()?;
    rundir::create(&opts.out_dir, "baseline search", rundir::BASELINE_STATE)?;
    let _lock = rundir::RunLock::acquire(&opts.out_dir)?;
    rundir::write_json(&opts.out_dir.join(rundir::BASELINE_CONFIG), &config)?;
    let _ = std::fs::remove_file(opts.out_dir.join(rundir::SAMPLES));
    let policy = Policy::uniform(&config.space);
    let adam = PolicyAdam::new(&policy, config.controller_lr);
    run(State { config, done: 0, policy, adam, baseline: None, total_seconds: 0.0 }, opts)
}

/// Continues the baseline search saved in `opts.out_dir`.
pub fn resume(opts: &RunOptions) -> Result<BaselineOutcome> {
    rundir::check_format(&opts.out_dir)?;
    let path = opts.out_dir.join(rundir::BASELINE_STATE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{} holds no baseline search to resume ({})", opts.out_dir.display(), path.display())
    })?;
    let state: State = serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    let _lock = rundir::RunLock::acquire(&opts.out_dir)?;
    run(state, opts)
}

/// A baseline search as the driver advances it: one sample per unit.
struct BaselineStage {
    state: State,
    data: Dataset,
    split: Split,
    samples: Vec<SampleRecord>,
    device: Device,
    channels_last: bool,
}

impl Stage for BaselineStage {
    type Record = SampleRecord;
    const UNIT: &'static str = "sample";
    const RECORDS: &'static str = rundir::SAMPLES;

    fn done(&self) -> usize {
        self.state.done
    }

    fn total(&self) -> usize {
        self.state.config.samples
    }

    fn ended(&self) -> bool {
        self.state.config.budget_seconds.is_some_and(|b| self.state.total_seconds >= b)
    }

    fn has_steps(&self) -> bool {
        false
    }

    fn advance(&mut self, _: Option<&indicatif::ProgressBar>) -> Result<SampleRecord> {
        let cfg = self.state.config.clone();
        let state = &mut self.state;
        let index = state.done;
        let start = std::time::Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(index as u64 + 1);
        let choice = state.policy.sample(&mut rng);
        let genotype = state.policy.genotype(&choice);
        let seed = cfg.seed.wrapping_mul(0x9e37_79b9).wrapping_add(index as u64);
        let (val_acc, val_loss, parameters) =
            evaluate_genotype(&genotype, &cfg, &self.data, &self.split, seed, self.device, self.channels_last)?;
        let (baseline, entropy) = match cfg.strategy {
            Strategy::Random => (None, None),
            Strategy::Rl => {
                let entropy = state.policy.entropy();
                let b = state.baseline.unwrap_or(val_acc);
                let grad = state.policy.objective_gradient(&choice, val_acc - b, cfg.entropy_weight);
                state.adam.step(&mut state.policy, &grad);
                state.baseline = Some(cfg.baseline_decay * b + (1.0 - cfg.baseline_decay) * val_acc);
                (Some(b), Some(entropy))
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        state.total_seconds += seconds;
        state.done += 1;
        Ok(SampleRecord {
            index,
            genotype,
            val_acc,
            val_loss,
            parameters,
            seconds,
            total_seconds: state.total_seconds,
            baseline,
            entropy,
        })
    }

    fn save(&mut self, dir: Option<&Path>, record: &SampleRecord) -> Result<()> {
        self.samples.push(record.clone());
        let Some(dir) = dir else { return Ok(()) };
        rundir::write_atomically(&dir.join(rundir::BASELINE_STATE), serde_json::to_string(&self.state)?.as_bytes())
    }

    fn line(&self, r: &SampleRecord) -> String {
        let best = self.samples.iter().map(|s| s.val_acc).fold(r.val_acc, f64::max);
        format!(
            "sample {}/{}: score {:.2}% (best {:.2}%), {} parameters, {:.1}s{}",
            r.index + 1,
            self.state.config.samples,
            100.0 * r.val_acc,
            100.0 * best,
            r.parameters,
            r.seconds,
            r.entropy.map_or(String::new(), |h| format!(", policy entropy {h:.2}"))
        )
    }
}

fn run(state: State, opts: &RunOptions) -> Result<BaselineOutcome> {
    let cfg = state.config.clone();
    let data = data::load_with(cfg.dataset, cfg.data_dir.as_deref(), true, cfg.image_size)?.truncated(cfg.limit);
    let split = Split::new(data.len(), cfg.train_portion, cfg.seed).map_err(anyhow::Error::msg)?;
    split.check_disjoint(data.len()).map_err(anyhow::Error::msg)?;
    if split.train.len() < cfg.batch_size || split.val.is_empty() {
        bail!(
            "the split leaves {} examples for training and {} for scoring: use more data or a smaller --batch-size",
            split.train.len(),
            split.val.len()
        );
    }
    // A sample line written after the last saved state (interrupted in between) is dropped: that sample runs again.
    let samples_file = opts.out_dir.join(rundir::SAMPLES);
    rundir::keep_records(&samples_file, state.done)?;
    let samples: Vec<SampleRecord> = rundir::read_records(&samples_file)?;
    let console = Console::new(opts.progress);
    console.say(format!(
        "baseline {}: {} samples, each a {}-channel {}-cell network trained {} epochs on {} examples, scored on {} \
         others (disjoint)",
        cfg.strategy.name(),
        cfg.samples,
        cfg.network.channels,
        cfg.network.layers,
        cfg.epochs,
        split.train.len(),
        split.val.len()
    ));
    let channels_last = opts.layout.channels_last(opts.device);
    let mut stage = BaselineStage { state, data, split, samples, device: opts.device, channels_last };
    drive(&mut stage, opts, &console)?;
    let BaselineStage { state, samples, .. } = stage;
    let finished = state.done >= cfg.samples || cfg.budget_seconds.is_some_and(|b| state.total_seconds >= b);
    let best_rec = samples
        .iter()
        .max_by(|a, b| a.val_acc.partial_cmp(&b.val_acc).unwrap_or(std::cmp::Ordering::Equal))
        .context("no sample was evaluated")?;
    let best = best_rec.genotype.clone();
    let best_acc = best_rec.val_acc;
    if finished {
        rundir::write_genotype(&opts.out_dir, &best)?;
    }
    Ok(BaselineOutcome { samples, best, best_acc, finished, policy: state.policy })
}
