//! Speed and memory of one search step, on random data of a chosen shape: forward, forward+backward+SGD,
//! first-order step and second-order step (alpha step + weight step), as the PyTorch reference measures them
//! (`bench/pytorch_darts.py`).
//! The per-op profile (`darts bench --profile`) is [`profile`]'s.

mod profile;

pub use profile::{profile_final, profile_search, ProfileRow};

use crate::architect::{Architect, Order};
use crate::native::{cuda_peak_mb, with_precision, Precision};
use crate::optim::{clip_grad_norm, Sgd};
use crate::params::Params;
use crate::progress::peak_rss_mb;
use crate::space::{DataShape, SearchSpace};
use crate::supernet::{set_channels_last, Alphas, SearchNetwork};
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

/// One row of the table.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct BenchRow {
    /// Which implementation.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// What was timed.
    pub name: String,
    /// Fastest repeat, ms.
    pub min_ms: f64,
    /// Median repeat, ms.
    pub median_ms: f64,
    /// Peak RSS of the process after this measurement, MiB.
    pub peak_rss_mb: f64,
    /// On CUDA: the caching allocator's peak of memory held by tensors, MiB (each measurement runs in its own
    /// process, so this is the measurement's own peak; PyTorch's `torch.cuda.max_memory_allocated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_cuda_mb: Option<f64>,
    /// Calls of ATen operators in one step (`aten::` RecordFunction events, as torch.profiler lists them; nested
    /// calls included): what a GPU would launch, and a number that does not drift with the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aten_calls: Option<u64>,
}

/// A measurement the bench can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Step {
    /// The supernet's forward pass.
    Forward,
    /// Forward, backward and an SGD step of the weights.
    ForwardBackwardSgd,
    /// A first-order alpha step and a weight step.
    FirstOrderStep,
    /// A second-order (unrolled) alpha step and a weight step.
    SecondOrderStep,
    /// One training step of the final network.
    FinalTrainStep,
}

impl Step {
    /// Every measurement, in table order.
    pub const ALL: [Step; 5] =
        [Step::Forward, Step::ForwardBackwardSgd, Step::FirstOrderStep, Step::SecondOrderStep, Step::FinalTrainStep];

    /// The name in tables, JSON rows and the PyTorch reference's `--only`.
    pub fn name(self) -> &'static str {
        match self {
            Step::Forward => "forward",
            Step::ForwardBackwardSgd => "forward_backward_sgd",
            Step::FirstOrderStep => "first_order_step",
            Step::SecondOrderStep => "second_order_step",
            Step::FinalTrainStep => "final_train_step",
        }
    }

    /// Whether it is a step of the search (else of the final network).
    pub fn of_search(self) -> bool {
        self != Step::FinalTrainStep
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Times `f` (after one warm-up call): (min, median) in ms.
pub fn time_ms(device: Device, repeats: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    sync(device);
    let mut ts: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            sync(device);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ts[0], ts[ts.len() / 2])
}

/// [`time_ms`], then one more run of `f` counting its ATen operator calls.
pub fn measure(device: Device, repeats: usize, f: impl FnMut()) -> (f64, f64, Option<u64>) {
    measure_after(device, 0, repeats, f)
}

/// [`measure`] after `warmups` more untimed runs (a CUDA graph is captured on the third call: warm-up twice,
/// capture, then replays).
pub fn measure_after(device: Device, warmups: usize, repeats: usize, mut f: impl FnMut()) -> (f64, f64, Option<u64>) {
    for _ in 0..warmups {
        f();
    }
    let (min_ms, median_ms) = time_ms(device, repeats, &mut f);
    let calls = crate::native::count_aten_calls(|| {
        f();
        sync(device);
    });
    (min_ms, median_ms, calls.ok().map(|(_, n)| n))
}

/// A configuration of ours by name (`darts bench --variants`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VariantKind {
    /// Contiguous NCHW activations and kernels.
    Nchw,
    /// Channels-last activations and kernels.
    ChannelsLast,
    /// Gradient checkpointing of cells (the device's best layout).
    Checkpoint,
    /// PC-DARTS: partial channels K=4 and edge normalisation.
    PcDarts,
    /// PC-DARTS with gradient checkpointing.
    PcDartsCheckpoint,
    /// The final network in bf16 mixed precision.
    Bf16,
    /// GDAS: one sampled op per edge.
    Gdas,
    /// Each pass replayed as a CUDA graph (`--cuda-graphs`; the device's best layout; CUDA only).
    CudaGraphs,
    /// The supernet and final network without batched edges (every convolution on its own; the device's best
    /// layout): what batching gives.
    Unbatched,
}

impl VariantKind {
    /// The name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            VariantKind::Nchw => "nchw",
            VariantKind::ChannelsLast => "channels-last",
            VariantKind::Checkpoint => "checkpoint",
            VariantKind::PcDarts => "pc-darts",
            VariantKind::PcDartsCheckpoint => "pc-darts-checkpoint",
            VariantKind::Bf16 => "bf16",
            VariantKind::Gdas => "gdas",
            VariantKind::CudaGraphs => "cuda-graphs",
            VariantKind::Unbatched => "unbatched",
        }
    }
}

/// One configuration of ours to measure: memory layout, gradient checkpointing, PC-DARTS, GDAS.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// Which one.
    pub kind: VariantKind,
    /// The name on the command line and in the table.
    pub name: String,
    /// Channels-last activations and kernels.
    pub channels_last: bool,
    /// Gradient checkpointing of cells.
    pub checkpoint_cells: bool,
    /// PC-DARTS partial channels (1 = off).
    pub partial_channels: usize,
    /// The final network's forward-pass arithmetic (bf16: mixed precision; the search steps are not measured).
    pub precision: Precision,
    /// PC-DARTS edge normalisation.
    pub edge_normalization: bool,
    /// GDAS (one sampled op per edge) at this temperature.
    pub gdas_tau: Option<f64>,
    /// Each pass replayed as a CUDA graph.
    pub cuda_graphs: bool,
    /// Batched edges ([`SearchNetwork::batched_edges`]).
    pub batched_edges: bool,
}

impl Variant {
    /// The variant `kind`; "checkpoint" and the PC-DARTS ones use channels-last when `best_channels_last` (the
    /// `--layout` option's choice for the device).
    pub fn of(kind: VariantKind, best_channels_last: bool) -> Variant {
        let best = best_channels_last;
        let v = |channels_last, checkpoint_cells, partial_channels| Variant {
            kind,
            name: kind.name().to_string(),
            channels_last,
            checkpoint_cells,
            partial_channels,
            edge_normalization: partial_channels > 1,
            precision: Precision::Fp32,
            gdas_tau: None,
            cuda_graphs: false,
            batched_edges: true,
        };
        match kind {
            VariantKind::Nchw => v(false, false, 1),
            VariantKind::ChannelsLast => v(true, false, 1),
            VariantKind::Checkpoint => v(best, true, 1),
            VariantKind::PcDarts => v(best, false, 4),
            VariantKind::PcDartsCheckpoint => v(best, true, 4),
            VariantKind::Bf16 => Variant { precision: Precision::Bf16, ..v(best, false, 1) },
            VariantKind::Gdas => Variant { gdas_tau: Some(1.0), ..v(best, false, 1) },
            VariantKind::CudaGraphs => Variant { cuda_graphs: true, ..v(best, false, 1) },
            VariantKind::Unbatched => Variant { batched_edges: false, ..v(best, false, 1) },
        }
    }

    /// The column label: `darts-rs (<name>)`.
    pub fn label(&self) -> String {
        format!("darts-rs ({})", self.name)
    }

    /// The supernet of `space` as this variant changes it (partial channels, edge normalisation, layout,
    /// checkpointing), drawn from seed 0 on `device`: the space, its weights and the network.
    fn supernet(
        &self,
        space: &SearchSpace,
        shape: &DataShape,
        device: Device,
    ) -> (SearchSpace, nn::VarStore, SearchNetwork) {
        tch::manual_seed(0);
        let space = SearchSpace {
            partial_channels: self.partial_channels,
            edge_normalization: self.edge_normalization,
            ..space.clone()
        };
        let vs = nn::VarStore::new(device);
        let mut net = SearchNetwork::new(&vs.root(), &space, shape, Alphas::random(&space, device));
        set_channels_last(&mut net, &vs, self.channels_last);
        crate::supernet::set_checkpoint_cells(&mut net, &vs, self.checkpoint_cells);
        net.gdas_tau = self.gdas_tau;
        net.batched_edges = self.batched_edges;
        crate::supernet::set_cuda_graphs(&mut net, self.cuda_graphs);
        (space, vs, net)
    }

    /// Whether the final-network measurement applies (layout variants only).
    pub fn has_final(&self) -> bool {
        !self.checkpoint_cells && self.partial_channels == 1 && self.gdas_tau.is_none()
    }

    /// Whether this variant measures step `name` (GDAS is first order only).
    pub fn has_step(&self, step: Step) -> bool {
        !(self.gdas_tau.is_some() && step == Step::SecondOrderStep)
    }

    /// Whether this variant measures the search steps (the search stays float32: bf16 is a final-network option).
    pub fn has_search(&self) -> bool {
        self.precision == Precision::Fp32
    }
}

/// Measures the search steps named in `only` for a supernet of `space` (modified by `variant`) on `batch`
/// random images of `shape`.
#[allow(clippy::too_many_arguments)]
pub fn bench_search(
    space: &SearchSpace,
    shape: &DataShape,
    batch: i64,
    repeats: usize,
    device: Device,
    only: &[Step],
    variant: &Variant,
    mut report: impl FnMut(&BenchRow),
) -> Vec<BenchRow> {
    let (_, vs, net) = variant.supernet(space, shape, device);
    let label = variant.label();
    let Params { weights, buffers, .. } = Params::of(&vs);
    // DARTS's own settings (the preset `darts search` starts from), which the PyTorch reference uses too.
    let c = crate::search::SearchConfig::default();
    let mut sgd = Sgd::new(&weights, c.lr, c.momentum, c.weight_decay);
    let (ch, h, w) = (shape.channels as i64, shape.height as i64, shape.width as i64);
    let opts = (Kind::Float, device);
    let x = Tensor::randn([batch, ch, h, w], opts);
    let y = Tensor::randint(shape.classes as i64, [batch], (Kind::Int64, device));
    let xv = Tensor::randn([batch, ch, h, w], opts);
    let yv = Tensor::randint(shape.classes as i64, [batch], (Kind::Int64, device));
    let mut rows = Vec::new();
    let warm = if variant.cuda_graphs { 3 } else { 0 };
    for &step in only.iter().filter(|s| variant.has_step(**s)) {
        let weight_step = |sgd: &mut Sgd| {
            let w: Vec<&Tensor> = weights.iter().collect();
            let (_, _, mut g) = net.loss_grads(&x, &y, &w);
            let _ = clip_grad_norm(&mut g, c.grad_clip);
            sgd.step(&weights, &g);
        };
        let (min_ms, median_ms, aten_calls) = match step {
            Step::Forward => measure_after(device, warm, repeats, || {
                let _ = tch::no_grad(|| net.forward_t(&x, true));
            }),
            Step::ForwardBackwardSgd => measure_after(device, warm, repeats, || weight_step(&mut sgd)),
            Step::FirstOrderStep | Step::SecondOrderStep => {
                let order = if step == Step::FirstOrderStep { Order::First } else { Order::Second };
                let mut arch = Architect::new(&net, order, c.arch_lr, c.arch_betas, c.arch_weight_decay);
                measure_after(device, warm, repeats, || {
                    arch.step(&net, &weights, &buffers, &sgd, (&x, &y), (&xv, &yv), c.lr)
                        .expect("a process alone cannot fail to reduce");
                    weight_step(&mut sgd);
                })
            }
            Step::FinalTrainStep => continue,
        };
        let row = BenchRow {
            implementation: label.clone(),
            name: step.name().into(),
            min_ms,
            median_ms,
            peak_rss_mb: peak_rss_mb(),
            peak_cuda_mb: cuda_peak_mb(device),
            aten_calls,
        };
        report(&row);
        rows.push(row);
    }
    rows
}

/// One training step of the final network as the trainer runs it, on random images: DARTS's CIFAR recipe (what
/// `darts train` starts from, which the PyTorch reference uses too), drop path at its final rate, the auxiliary
/// head; forward and loss in a chosen precision, backward outside autocast.
struct FinalStep {
    _vs: nn::VarStore,
    net: crate::network::Network,
    weights: Vec<Tensor>,
    sgd: Sgd,
    x: Tensor,
    y: Tensor,
    rng: rand_chacha::ChaCha8Rng,
    hyper: crate::recipe::Hyper,
    device: Device,
    graph: crate::graphs::Graphed,
}

impl FinalStep {
    fn new(
        genotype: &crate::genotype::Genotype,
        cfg: &crate::network::NetworkConfig,
        shape: &DataShape,
        batch: i64,
        device: Device,
        variant: &Variant,
    ) -> FinalStep {
        use rand::SeedableRng;
        tch::manual_seed(0);
        let vs = nn::VarStore::new(device);
        let mut net = crate::network::Network::new(&vs.root(), genotype, cfg, shape);
        crate::network::set_channels_last(&mut net, &vs, variant.channels_last);
        net.batched_convs = variant.batched_edges;
        let hyper = crate::recipe::Recipe::DartsCifar.hyper();
        net.drop_path_prob = hyper.drop_path;
        let weights = Params::of(&vs).weights;
        let sgd = Sgd::new(&weights, hyper.lr, hyper.momentum, hyper.weight_decay);
        let (c, h, w) = (shape.channels as i64, shape.height as i64, shape.width as i64);
        let x = Tensor::randn([batch, c, h, w], (Kind::Float, device));
        let y = Tensor::randint(shape.classes as i64, [batch], (Kind::Int64, device));
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let graph = match variant.cuda_graphs {
            true => crate::graphs::Graphed::on("the final network's training pass", device),
            false => crate::graphs::Graphed::eager("the final network's training pass"),
        };
        FinalStep { _vs: vs, net, weights, sgd, x, y, rng, hyper, device, graph }
    }

    /// The next step's drop-path masks.
    fn masks(&mut self) -> Tensor {
        let n = self.x.size()[0] as usize;
        crate::network::drop_path_masks(self.net.drop_sites(), n, self.hyper.drop_path, &mut self.rng)
            .to_device(self.device)
    }

    fn step(&mut self, precision: Precision) -> anyhow::Result<()> {
        let masks = self.masks();
        let (r, net, weights, device) = (&self.hyper, &self.net, &self.weights, self.device);
        // As the trainer runs it: the forward and backward pass (a CUDA graph in the cuda-graphs variant), then
        // clipping and SGD.
        let mut pass = |t: &[Tensor]| -> anyhow::Result<Vec<Tensor>> {
            let loss = with_precision(device, precision, || {
                let (logits, aux) = net.forward_masked(&t[0], true, Some(&t[2]));
                crate::network::loss_with_auxiliary(&logits, aux.as_ref(), &t[1], r.aux_weight, r.label_smoothing)
            })?;
            Ok(Tensor::run_backward(&[loss], weights, false, false))
        };
        let mut g = self.graph.run(precision as u64, &[&self.x, &self.y, &masks], &mut pass)?;
        let _ = clip_grad_norm(&mut g, self.hyper.grad_clip);
        self.sgd.step(&self.weights, &g);
        Ok(())
    }

    /// `timer` applied to the step (in `precision`); the first failing step's error instead, if one failed.
    fn timed<T>(&mut self, precision: Precision, timer: impl FnOnce(&mut dyn FnMut()) -> T) -> anyhow::Result<T> {
        let mut failed = None;
        let t = timer(&mut || {
            if let Err(e) = self.step(precision) {
                failed.get_or_insert(e);
            }
        });
        failed.map_or(Ok(t), Err)
    }
}

/// Measures one training step of the final network for `genotype` (see `FinalStep`) in `variant`'s layout and
/// precision.
pub fn bench_final(
    genotype: &crate::genotype::Genotype,
    cfg: &crate::network::NetworkConfig,
    shape: &DataShape,
    (batch, repeats): (i64, usize),
    device: Device,
    variant: &Variant,
) -> anyhow::Result<BenchRow> {
    let mut s = FinalStep::new(genotype, cfg, shape, batch, device, variant);
    let warm = if variant.cuda_graphs { 3 } else { 0 };
    let (min_ms, median_ms, aten_calls) = s.timed(variant.precision, |f| measure_after(device, warm, repeats, f))?;
    Ok(BenchRow {
        implementation: variant.label(),
        name: Step::FinalTrainStep.name().into(),
        min_ms,
        median_ms,
        peak_rss_mb: peak_rss_mb(),
        peak_cuda_mb: cuda_peak_mb(device),
        aten_calls,
    })
}
