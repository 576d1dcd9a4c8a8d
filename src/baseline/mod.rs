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
use crate::genotype::Genotype;
use crate::network::{Network, NetworkConfig};
use crate::optim::{clip_grad_norm, cosine_lr, Sgd};
use crate::params::Params;
use crate::space::SearchSpace;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
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
/// One evaluated architecture: a line of `samples.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleRecord {
    /// 0-based sample index.
    pub index: usize,
    /// The genotype, in DARTS Python text.
    pub genotype: String,
    /// Accuracy on the scoring split after training: the reward.
    pub val_acc: f64,
    /// Loss on the scoring split.
    pub val_loss: f64,
    /// Parameters of the sampled network.
    pub parameters: i64,
    /// Seconds spent on this sample (training and scoring).
    pub seconds: f64,
    /// Seconds since the run started, this sample included (interruptions excluded).
    pub total_seconds: f64,
    /// RL: the moving-average baseline before this sample's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// RL: the policy's entropy before this sample's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
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
    let (loss, acc) = crate::train::score_indices(data, &split.val, 256, device, |x| net.forward_t(x, false).0);
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

const STATE: &str = "baseline-state.json";

/// Starts a baseline search in `opts.out_dir`.
pub fn start(config: BaselineConfig, opts: &crate::run::RunOptions) -> Result<BaselineOutcome> {
    config.validate()?;
    crate::run::new_run_dir(opts, "baseline search", STATE)?;
    std::fs::write(opts.out_dir.join("baseline-config.json"), serde_json::to_string_pretty(&config)?)?;
    let _ = std::fs::remove_file(opts.out_dir.join("samples.jsonl"));
    let policy = Policy::uniform(&config.space);
    let adam = PolicyAdam::new(&policy, config.controller_lr);
    drive(State { config, done: 0, policy, adam, baseline: None, total_seconds: 0.0 }, opts)
}

/// Continues the baseline search saved in `opts.out_dir`.
pub fn resume(opts: &crate::run::RunOptions) -> Result<BaselineOutcome> {
    let path = opts.out_dir.join(STATE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{} holds no baseline search to resume ({})", opts.out_dir.display(), path.display())
    })?;
    let state: State = serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    drive(state, opts)
}

/// The lines of `dir/samples.jsonl` (none if there is no such file).
fn parse_samples(dir: &Path) -> Result<Vec<SampleRecord>> {
    let path = dir.join("samples.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("in {}", path.display()))
}

fn read_samples(dir: &Path, done: usize) -> Result<Vec<SampleRecord>> {
    let mut v = parse_samples(dir)?;
    // A line written after the last saved state (interrupted in between) is dropped: that sample runs again.
    v.truncate(done);
    Ok(v)
}

fn drive(mut state: State, opts: &crate::run::RunOptions) -> Result<BaselineOutcome> {
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
    let mut samples = read_samples(&opts.out_dir, state.done)?;
    // Rewrite the sample file to match the state (drops a line past it).
    {
        let mut f = std::fs::File::create(opts.out_dir.join("samples.jsonl"))?;
        for s in &samples {
            writeln!(f, "{}", serde_json::to_string(s)?)?;
        }
    }
    if opts.progress {
        eprintln!(
            "baseline {}: {} samples, each a {}-channel {}-cell network trained {} epochs on {} examples, scored on \
             {} others (disjoint)",
            cfg.strategy.name(),
            cfg.samples,
            cfg.network.channels,
            cfg.network.layers,
            cfg.epochs,
            split.train.len(),
            split.val.len()
        );
    }
    let bar = opts.progress.then(|| {
        let b = indicatif::ProgressBar::new(cfg.samples as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("sample {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(state.done as u64);
        b
    });
    let channels_last = opts.layout.channels_last(opts.device);
    let mut ran = 0;
    let in_budget = |s: &State| cfg.budget_seconds.is_none_or(|b| s.total_seconds < b);
    while state.done < cfg.samples && in_budget(&state) && opts.stop_after.is_none_or(|n| ran < n) {
        let index = state.done;
        let start = std::time::Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(index as u64 + 1);
        let choice = state.policy.sample(&mut rng);
        let genotype = state.policy.genotype(&choice);
        let seed = cfg.seed.wrapping_mul(0x9e37_79b9).wrapping_add(index as u64);
        let (val_acc, val_loss, parameters) =
            evaluate_genotype(&genotype, &cfg, &data, &split, seed, opts.device, channels_last)?;
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
        let rec = SampleRecord {
            index,
            genotype: genotype.to_string(),
            val_acc,
            val_loss,
            parameters,
            seconds,
            total_seconds: state.total_seconds,
            baseline,
            entropy,
        };
        state.done += 1;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(opts.out_dir.join("samples.jsonl"))?;
        writeln!(f, "{}", serde_json::to_string(&rec)?)?;
        let tmp = opts.out_dir.join(format!("{STATE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string(&state)?)?;
        std::fs::rename(&tmp, opts.out_dir.join(STATE))?;
        let best = samples.iter().map(|s| s.val_acc).fold(val_acc, f64::max);
        let line = format!(
            "sample {}/{}: score {:.2}% (best {:.2}%), {} parameters, {:.1}s{}",
            index + 1,
            cfg.samples,
            100.0 * val_acc,
            100.0 * best,
            parameters,
            seconds,
            entropy.map_or(String::new(), |h| format!(", policy entropy {h:.2}"))
        );
        match &bar {
            Some(b) if !b.is_hidden() => {
                b.println(line);
                b.set_position(state.done as u64);
            }
            _ if opts.progress => eprintln!("{line}"),
            _ => {}
        }
        samples.push(rec);
        ran += 1;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let finished = state.done >= cfg.samples || !in_budget(&state);
    let best_rec = samples
        .iter()
        .max_by(|a, b| a.val_acc.partial_cmp(&b.val_acc).unwrap_or(std::cmp::Ordering::Equal))
        .context("no sample was evaluated")?;
    let best = Genotype::parse(&best_rec.genotype)?;
    let best_acc = best_rec.val_acc;
    if finished {
        crate::run::write_genotype(&opts.out_dir, &best)?;
    }
    crate::run::write_report(&opts.out_dir);
    Ok(BaselineOutcome { samples, best, best_acc, finished, policy: state.policy })
}

/// The samples' scores and the best so far, as an SVG chart.
pub fn samples_figure(samples: &[SampleRecord], strategy: Strategy) -> Result<String> {
    use crate::viz::plot::{curves_over, Panel, Series};
    let mut best = f64::NEG_INFINITY;
    let best_so_far: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| {
            best = best.max(s.val_acc);
            ((s.index + 1) as f64, 100.0 * best)
        })
        .collect();
    let score: Vec<(f64, f64)> = samples.iter().map(|s| ((s.index + 1) as f64, 100.0 * s.val_acc)).collect();
    let panel = Panel {
        title: "score of each sample (accuracy on the scoring split)".into(),
        y_label: "accuracy %".into(),
        series: vec![
            Series { name: "sample".into(), points: score },
            Series { name: "best so far".into(), points: best_so_far },
        ],
    };
    curves_over(&format!("{} search: {} samples", strategy.name(), samples.len()), "sample", &[panel])
}

/// Reads a baseline run directory: its configuration and the samples evaluated so far.
pub fn load_run(dir: &Path) -> Result<(BaselineConfig, Vec<SampleRecord>)> {
    let path = dir.join("baseline-config.json");
    let config: BaselineConfig =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("in {}", path.display()))?;
    Ok((config, parse_samples(dir)?))
}
