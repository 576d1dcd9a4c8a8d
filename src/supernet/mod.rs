//! The search supernet: MixedOp, search cell and search network (the original `model_search.py`).
//!
//! The architecture parameters ([`Alphas`]) live apart from the network weights: the weights are in a
//! `VarStore`, the alphas are two plain leaf tensors, so each optimiser sees only its own parameters.

mod alphas;
mod cell;

pub use alphas::*;
pub use cell::*;

use crate::ops::Stem;
use crate::shared::EdgeInput;
use crate::space::{DataShape, SearchSpace};
use std::rc::Rc;
use tch::nn;
use tch::{Kind, Tensor};

/// The search network: stem, `layers` search cells, global pooling, linear classifier.
#[derive(Debug)]
pub struct SearchNetwork {
    /// The space this network relaxes.
    pub space: SearchSpace,
    /// The data shape it was built for.
    pub shape: DataShape,
    stem: Stem,
    cells: Vec<SearchCell>,
    classifier: nn::Linear,
    /// The architecture parameters.
    pub alphas: Alphas,
    /// Feed the network channels-last activations (faster on CPU; same maths).
    pub channels_last: bool,
    /// Gradient checkpointing of cells (see [`SearchNetwork::loss_grads`]); set by [`set_checkpoint_cells`].
    pub checkpoint_cells: bool,
    /// P-DARTS's dropout rate on the identity op's output in training mode (0: off). Each edge's mask comes
    /// from a private generator whose seed derives from the pass's ([`SearchNetwork::set_sample_stream`]'s
    /// counter, one value per training-mode pass that draws), the cell and the edge: masks depend only on the
    /// stream and the number of passes before, whatever other threads draw, and a checkpointed cell's
    /// recomputation draws the masks of its first pass. GDAS's samples come from the same seeds.
    pub skip_dropout: f64,
    /// DARTS-: the weight of the auxiliary skip connections (where the space has them); a search decays it.
    pub aux_skip: f64,
    /// GDAS: the Gumbel-softmax temperature; `Some` makes every edge run one sampled op (see [`gumbel_hard`]).
    pub gdas_tau: Option<f64>,
    /// The edges reading one state share its activation, pooling and pooling BN ([`EdgeInput`]; the default);
    /// off, every edge computes its ops from scratch as the original code (the reference of the tests).
    pub share_edge_inputs: bool,
    /// Each node sums its edges' weighted op outputs in one pass ([`crate::native::mixed_sum`]; the default, with
    /// shared edge inputs); off, a product and a sum per op as the original code.
    pub fused_sums: bool,
    /// Batched edges: each separable half (depthwise then 1x1 convolution) as one node that keeps no depthwise
    /// output, the first halves of the ops reading one state as one ([`SearchCell::forward_t`]; the default, with
    /// shared edge inputs); off, every convolution on its own (the reference of the tests).
    pub batched_edges: bool,
    sample_stream: std::sync::atomic::AtomicU64,
    /// The BN running statistics, restored after the recomputation when checkpointing.
    buffers: Vec<Tensor>,
    /// CUDA graphs of [`SearchNetwork::loss_grads`], one for each list of tensors it differentiates
    /// ([`set_cuda_graphs`]); None: eager.
    graphs: Option<std::sync::Mutex<crate::graphs::ByIdentity>>,
}

impl SearchNetwork {
    /// Builds the network's weights under `p` (they are drawn from libtorch's generator).
    pub fn new(p: &nn::Path, space: &SearchSpace, shape: &DataShape, alphas: Alphas) -> SearchNetwork {
        let c = space.channels as i64;
        let mult = space.nodes as i64;
        let mut c_curr = space.stem_multiplier as i64 * c;
        let stem = Stem::new(&(p / "stem"), shape.channels as i64, c_curr);
        let (mut c_pp, mut c_p) = (c_curr, c_curr);
        c_curr = c;
        let mut cells = Vec::new();
        let mut reduction_prev = false;
        let cells_path = p / "cells";
        for layer in 0..space.layers {
            let reduction = space.is_reduction(layer);
            if reduction {
                c_curr *= 2;
            }
            cells.push(SearchCell::new(&(&cells_path / layer), space, c_pp, c_p, c_curr, reduction, reduction_prev));
            reduction_prev = reduction;
            (c_pp, c_p) = (c_p, mult * c_curr);
        }
        let bound = 1.0 / (c_p as f64).sqrt();
        let classifier = nn::linear(
            p / "classifier",
            c_p,
            shape.classes as i64,
            nn::LinearConfig {
                ws_init: nn::Init::Uniform { lo: -bound, up: bound },
                bs_init: Some(nn::Init::Uniform { lo: -bound, up: bound }),
                bias: true,
            },
        );
        SearchNetwork {
            space: space.clone(),
            shape: *shape,
            stem,
            cells,
            classifier,
            alphas,
            channels_last: false,
            checkpoint_cells: false,
            skip_dropout: 0.0,
            aux_skip: 1.0,
            gdas_tau: None,
            share_edge_inputs: true,
            fused_sums: true,
            batched_edges: true,
            sample_stream: std::sync::atomic::AtomicU64::new(0),
            buffers: Vec::new(),
            graphs: None,
        }
    }

    /// Logits for a batch `[n, c, h, w]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let pass = self.pass(train);
        let (w_normal, w_reduce) = (self.cell_weights(false, pass), self.cell_weights(true, pass));
        let x = if self.channels_last { crate::channels_last(x) } else { x.shallow_clone() };
        let stem = crate::profile::time("stem", None, 1, &x, || self.stem_forward(&x, train));
        let share = self.share_edge_inputs;
        let stem = Rc::new(EdgeInput::plain(&stem, share));
        let (mut s0, mut s1) = (Rc::clone(&stem), stem);
        for (i, cell) in self.cells.iter().enumerate() {
            let w = if cell.reduction { &w_reduce } else { &w_normal };
            let out = cell.forward_t(&s0, &s1, w, pass.derive(i));
            (s0, s1) = (s1, Rc::new(EdgeInput::plain(&out, share)));
        }
        let s1 = s1.full();
        crate::profile::time("classifier", None, 1, s1, || {
            s1.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.classifier)
        })
    }

    /// The stem on `x`, its output channels-last when the network is: from a one-channel image (grayscale data)
    /// libtorch's convolution returns NCHW (a one-channel tensor is both layouts, and it picks NCHW), which
    /// would run the whole network NCHW.
    fn stem_forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.stem.forward_t(x, train);
        if self.channels_last {
            crate::channels_last(&y)
        } else {
            y
        }
    }

    /// Mean cross-entropy on a batch, in training mode (batch statistics in BN).
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        self.forward_t(x, true).cross_entropy_for_logits(y)
    }

    /// The position of the stream of seeds for training passes' random draws (skip dropout, GDAS): the next such
    /// pass takes this one.
    pub fn sample_stream(&self) -> u64 {
        self.sample_stream.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Restarts the stream of seeds at `seed` (a search does at every epoch, so that a resumed search draws the
    /// masks and samples the uninterrupted one did).
    pub fn set_sample_stream(&self, seed: u64) {
        self.sample_stream.store(seed, std::sync::atomic::Ordering::Relaxed);
    }

    /// A pass in this mode; a training pass that draws (skip dropout masks, GDAS samples) takes the next seed of
    /// the stream.
    fn pass(&self, train: bool) -> Pass {
        let (fused, batched) =
            (self.fused_sums && self.share_edge_inputs, self.batched_edges && self.share_edge_inputs);
        let pass = Pass { train, skip_dropout: self.skip_dropout, aux_skip: self.aux_skip, seed: 0, fused, batched };
        if !train {
            return Pass { skip_dropout: 0.0, ..pass };
        }
        if self.skip_dropout == 0.0 && self.gdas_tau.is_none() {
            return pass;
        }
        let n = self.sample_stream.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Pass { seed: splitmix64(n), ..pass }
    }

    /// One cell type's weights for `pass`, built afresh (each checkpointed segment has its own graph back to the
    /// leaves): softmax(alpha), or with GDAS the pass's sample (the same for every cell of the type, and again
    /// when a checkpointed cell is recomputed; the strongest ops in evaluation mode).
    fn cell_weights(&self, reduction: bool, pass: Pass) -> CellWeights {
        let a = if reduction { &self.alphas.reduce } else { &self.alphas.normal };
        let edges =
            self.alphas.betas.as_ref().map(|(n, r)| node_softmax(if reduction { r } else { n }, self.space.nodes));
        match self.gdas_tau {
            Some(tau) => {
                let seed = pass.train.then(|| pass.derive(usize::MAX - reduction as usize).seed);
                let (ops, choices) = gumbel_hard(a, tau, seed);
                CellWeights { ops, edges, choices: Some(choices) }
            }
            None => CellWeights { ops: a.softmax(-1, a.kind()), edges, choices: None },
        }
    }

    /// The training-mode loss on (x, y), its logits (both detached) and its gradients with respect to `wrt`
    /// (weights and/or architecture tensors; undefined for a tensor the loss does not reach). With
    /// [`SearchNetwork::checkpoint_cells`] the forward pass keeps only each cell's output; backward then walks
    /// the cells from last to first, recomputing each cell's forward from its saved inputs and back-propagating
    /// through it alone, so that at most one cell's activations are alive at a time. The BN running statistics end as after one forward pass, and the
    /// gradients are those of the plain pass (a test compares them).
    ///
    /// With [`set_cuda_graphs`] the pass is replayed as a CUDA graph, one per list `wrt` (the weights, the alphas,
    /// both), except where the host decides per pass (GDAS's samples, skip dropout's masks): eager there.
    pub fn loss_grads(&self, x: &Tensor, y: &Tensor, wrt: &[&Tensor]) -> (Tensor, Tensor, Vec<Tensor>) {
        match &self.graphs {
            Some(graphs) if self.skip_dropout == 0.0 && self.gdas_tau.is_none() => {
                let id: Vec<usize> = wrt.iter().map(|t| t.data_ptr() as usize).collect();
                let mut graphs = graphs.lock().unwrap_or_else(|e| e.into_inner());
                let graph = graphs.get(id, || {
                    let name = format!("the search's pass differentiating {} tensors", wrt.len());
                    crate::graphs::Graphed::on(&name, x.device())
                });
                // The host values a pass bakes in (DARTS-'s auxiliary skip weight decays by epoch).
                let key = self.aux_skip.to_bits();
                let mut pass = |t: &[Tensor]| {
                    let (loss, logits, grads) = self.loss_grads_eager(&t[0], &t[1], wrt);
                    Ok([loss, logits].into_iter().chain(grads).collect())
                };
                let out = graph.run(key, &[x, y], &mut pass).unwrap_or_else(|e| panic!("{e:#}"));
                // The next replay rewrites the graph's outputs, and callers keep results across passes (the finite
                // differences keep the first gradient while the same graph computes the second): copies.
                let mut out = crate::graphs::copies(&out);
                let grads = out.split_off(2);
                let logits = out.pop().expect("logits");
                let loss = out.pop().expect("loss");
                (loss, logits, grads)
            }
            _ => self.loss_grads_eager(x, y, wrt),
        }
    }

    /// [`SearchNetwork::loss_grads`] without graphs.
    fn loss_grads_eager(&self, x: &Tensor, y: &Tensor, wrt: &[&Tensor]) -> (Tensor, Tensor, Vec<Tensor>) {
        if !self.checkpoint_cells {
            let logits = self.forward_t(x, true);
            let loss = logits.cross_entropy_for_logits(y);
            let grads = Tensor::run_backward(&[&loss], wrt, false, false);
            return (loss.detach(), logits.detach(), grads);
        }
        let x = if self.channels_last { crate::channels_last(x) } else { x.shallow_clone() };
        // Forward without a graph: the cell boundaries are all that is kept.
        let pass = self.pass(true);
        let share = self.share_edge_inputs;
        let states = tch::no_grad(|| {
            let stem = Rc::new(EdgeInput::plain(&self.stem_forward(&x, true), share));
            let mut states = vec![Rc::clone(&stem), stem];
            for (i, cell) in self.cells.iter().enumerate() {
                let w = self.cell_weights(cell.reduction, pass);
                let n = states.len();
                let out = cell.forward_t(&states[n - 2], &states[n - 1], &w, pass.derive(i));
                states.push(Rc::new(EdgeInput::plain(&out, share)));
            }
            states.iter().map(|s| s.full().shallow_clone()).collect::<Vec<Tensor>>()
        });
        let stats: Vec<Tensor> = tch::no_grad(|| self.buffers.iter().map(|b| b.copy()).collect());
        let leaf = |t: &Tensor| t.detach().set_requires_grad(true);
        let add = |slot: &mut Option<Tensor>, g: &Tensor| {
            if g.defined() {
                *slot = Some(match slot.take() {
                    None => g.shallow_clone(),
                    Some(acc) => acc + g,
                })
            }
        };
        // Gradients with respect to `wrt`, summed over the segments (undefined where a segment does not
        // reach a tensor: libtorch's engine skips those, and computes nothing that `wrt` does not need).
        let mut acc: Vec<Option<Tensor>> = (0..wrt.len()).map(|_| None).collect();
        let mut backward = |root: Tensor, extra: &[&Tensor]| -> Vec<Tensor> {
            let mut inputs: Vec<&Tensor> = extra.to_vec();
            inputs.extend_from_slice(wrt);
            let mut gs = Tensor::run_backward(&[root], &inputs, false, false);
            let rest = gs.split_off(extra.len());
            for (slot, g) in acc.iter_mut().zip(&rest) {
                add(slot, g);
            }
            gs
        };
        let mut upstream: Vec<Option<Tensor>> = (0..states.len()).map(|_| None).collect();
        // The head.
        let last = leaf(states.last().expect("states"));
        let logits = last.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.classifier);
        let loss = logits.cross_entropy_for_logits(y);
        let g = backward(loss.shallow_clone(), &[&last]);
        add(&mut upstream[states.len() - 1], &g[0]);
        // The cells, last to first: recompute, then back-propagate the output's gradient through the cell.
        for (i, cell) in self.cells.iter().enumerate().rev() {
            let g_out = upstream[i + 2].take().expect("every cell output feeds a later cell or the head");
            let (a, b) = (leaf(&states[i]), leaf(&states[i + 1]));
            let w = self.cell_weights(cell.reduction, pass);
            let (sa, sb) = (EdgeInput::plain(&a, share), EdgeInput::plain(&b, share));
            let out = cell.forward_t(&sa, &sb, &w, pass.derive(i));
            let g = backward((out * g_out).sum(Kind::Float), &[&a, &b]);
            add(&mut upstream[i], &g[0]);
            add(&mut upstream[i + 1], &g[1]);
        }
        // states[0] and states[1] are both the stem's output.
        let g_stem = upstream[0].take().expect("cell 0") + upstream[1].take().expect("cell 0");
        let stem = self.stem.forward_t(&x, true);
        backward((stem * g_stem).sum(Kind::Float), &[]);
        tch::no_grad(|| {
            for (b, s) in self.buffers.iter().zip(&stats) {
                b.shallow_clone().copy_(s);
            }
        });
        // Never reached (GDAS's unsampled ops): undefined, as from the plain pass.
        let grads = acc.into_iter().map(|g| g.unwrap_or_else(Tensor::new)).collect();
        (loss.detach(), logits.detach(), grads)
    }
}

/// Turns gradient checkpointing of cells on or off for `net`, whose weights and BN statistics are in `vs`.
pub fn set_checkpoint_cells(net: &mut SearchNetwork, vs: &nn::VarStore, on: bool) {
    net.checkpoint_cells = on;
    net.graphs = net.graphs.take().map(|_| Default::default());
    net.buffers = if on { crate::params::Params::of(vs).buffers } else { Vec::new() };
}

/// Switches the network's kernels and activations to channels-last (`on`) or contiguous NCHW.
pub fn set_channels_last(net: &mut SearchNetwork, vs: &nn::VarStore, on: bool) {
    net.channels_last = on;
    crate::set_vars_channels_last(vs, on);
    // The graphs read the tensors they were captured with: the next passes capture afresh.
    net.graphs = net.graphs.take().map(|_| Default::default());
}

/// Replays [`SearchNetwork::loss_grads`] as CUDA graphs (`on`) or runs it eagerly. Each pass is captured again
/// when its batch's shape or the auxiliary skip weight changes; each graph keeps its own activation memory
/// (about one eager pass's worth: two graphs in a first-order search, three in a second-order one).
pub fn set_cuda_graphs(net: &mut SearchNetwork, on: bool) {
    net.graphs = on.then(Default::default);
}

/// Total number of trainable weight parameters.
pub fn count_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::OpKind;
    use tch::Device;

    #[test]
    fn channel_shuffle_interleaves_the_groups() {
        let x = Tensor::arange(8, (Kind::Float, Device::Cpu)).reshape([1, 8, 1, 1]);
        let y = Vec::<f32>::try_from(channel_shuffle(&x, 4).flatten(0, -1)).unwrap();
        // groups of 2: [0 1][2 3][4 5][6 7] -> first of each group, then second of each group.
        assert_eq!(y, vec![0., 2., 4., 6., 1., 3., 5., 7.]);
    }

    /// P-DARTS's skip dropout: in training mode the identity's term is dropped element by element (zero, or
    /// scaled by 1/(1-p)), in evaluation mode and at rate 0 it is the plain weighted identity, and a reducing
    /// edge's skip_connect (a convolution, FactorizedReduce) is left alone.
    #[test]
    fn skip_dropout_drops_the_identity_term_only_in_training() {
        let space = SearchSpace { ops: vec![OpKind::None, OpKind::SkipConnect], ..Default::default() };
        let vs = nn::VarStore::new(Device::Cpu);
        let op = MixedOp::new(&vs.root(), &space, 4, 1);
        let x = Tensor::rand([2, 4, 5, 5], (Kind::Float, Device::Cpu)) + 1.0;
        let w = Tensor::from_slice(&[0.3f32, 0.7]);
        let plain = &x * 0.7;
        let pass =
            |train, skip_dropout| Pass { train, skip_dropout, aux_skip: 1.0, seed: 3, fused: false, batched: false };
        assert!(op.forward_t(&x, &w, pass(true, 0.0), None).allclose(&plain, 1e-6, 1e-6, false));
        assert!(op.forward_t(&x, &w, pass(false, 0.5), None).allclose(&plain, 1e-6, 1e-6, false));
        let y = op.forward_t(&x, &w, pass(true, 0.5), None);
        let dropped = y.eq(0.0);
        let kept = (&y - &plain * 2.0).abs().le(1e-5);
        assert!(dropped.logical_or(&kept).all().int64_value(&[]) == 1, "every element is dropped or scaled by 2");
        let frac = dropped.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((0.35..0.65).contains(&frac), "{frac} of 200 elements dropped at p = 0.5");
        let reducing = MixedOp::new(&(vs.root() / "r"), &space, 4, 2);
        let (a, b) =
            (reducing.forward_t(&x, &w, pass(true, 0.9), None), reducing.forward_t(&x, &w, pass(true, 0.0), None));
        assert!(a.allclose(&b, 1e-6, 1e-6, false), "FactorizedReduce is not dropped");
    }

    /// DARTS-'s auxiliary skip connection adds `aux_skip * x` to a plain edge and `aux_skip *
    /// FactorizedReduce(x)` (its own weights, not the skip_connect op's) to a reducing one; without it in the
    /// space the edge is the plain relaxation whatever the weight.
    #[test]
    fn the_auxiliary_skip_adds_the_weighted_skip_connection() {
        let ops = vec![OpKind::None, OpKind::SkipConnect, OpKind::SepConv3x3];
        let with = SearchSpace { ops: ops.clone(), auxiliary_skip: true, ..Default::default() };
        let without = SearchSpace { ops, ..Default::default() };
        let vs = nn::VarStore::new(Device::Cpu);
        let x = Tensor::randn([2, 4, 6, 6], (Kind::Float, Device::Cpu));
        let w = Tensor::from_slice(&[0.2f32, 0.5, 0.3]);
        let eval = |aux_skip| Pass { train: false, skip_dropout: 0.0, aux_skip, seed: 0, fused: false, batched: false };
        let plain = MixedOp::new(&(vs.root() / "plain"), &with, 4, 1);
        let (a, b) = (plain.forward_t(&x, &w, eval(0.75), None), plain.forward_t(&x, &w, eval(0.0), None));
        assert!((a - b).allclose(&(&x * 0.75), 1e-5, 1e-6, false));
        let reducing = MixedOp::new(&(vs.root() / "red"), &with, 4, 2);
        let (a, b) = (reducing.forward_t(&x, &w, eval(0.4), None), reducing.forward_t(&x, &w, eval(0.0), None));
        let aux = reducing.aux.as_ref().unwrap().forward_t(&x, false);
        assert_eq!(aux.size(), vec![2, 4, 3, 3]);
        assert!((a - b).allclose(&(aux * 0.4), 1e-5, 1e-6, false));
        let names: Vec<String> = vs.variables().into_keys().filter(|n| n.starts_with("red.auxiliary_op")).collect();
        assert!(names.iter().any(|n| n == "red.auxiliary_op.conv_1.weight"), "{names:?}");
        let none = MixedOp::new(&(vs.root() / "none"), &without, 4, 1);
        assert!(none.forward_t(&x, &w, eval(0.75), None).equal(&none.forward_t(&x, &w, eval(0.0), None)));
    }

    /// GDAS's sample: one-hot rows forward, the op of each row's 1 is the choice, the gradient is the tempered
    /// softmax's (straight-through; checked without noise, where that softmax is known), one seed gives one
    /// sample, and at temperature 1 the Gumbel-max choices follow softmax(alpha) (2,000 draws).
    #[test]
    fn gumbel_samples_are_one_hot_straight_through_and_follow_softmax_alpha() {
        let alpha = Tensor::from_slice(&[0.5f32, -0.3, 1.2, 0.0, 0.2, -1.0, 0.4, 0.9]).reshape([2, 4]);
        let (hard, choices) = gumbel_hard(&alpha, 1.0, Some(3));
        assert_eq!(hard.size(), vec![2, 4]);
        for (r, &c) in choices.iter().enumerate() {
            for j in 0..4i64 {
                let want = if j as usize == c { 1.0 } else { 0.0 };
                assert!((hard.double_value(&[r as i64, j]) - want).abs() < 1e-6, "row {r}: {hard}");
            }
        }
        assert_eq!(gumbel_hard(&alpha, 1.0, Some(3)).1, choices);
        assert!((4..40).any(|seed| gumbel_hard(&alpha, 1.0, Some(seed)).1 != choices), "the seed changes nothing");
        // Without noise: the strongest op, and the gradient of softmax(log_softmax(alpha) / tau).
        let a = alpha.copy().set_requires_grad(true);
        let tau = 0.7;
        let (hard, choices) = gumbel_hard(&a, tau, None);
        assert_eq!(choices, vec![2, 3]);
        let c = Tensor::from_slice(&[0.3f32, -1.0, 2.0, 0.5, 1.5, 0.1, -0.7, 0.2]).reshape([2, 4]);
        let g = Tensor::run_backward(&[(&hard * &c).sum(Kind::Float)], &[&a], false, false);
        let soft = (a.log_softmax(-1, Kind::Float) / tau).softmax(-1, Kind::Float);
        let want = Tensor::run_backward(&[(soft * &c).sum(Kind::Float)], &[&a], false, false);
        assert!(g[0].allclose(&want[0], 1e-5, 1e-6, false), "{} vs {}", g[0], want[0]);
        // Gumbel-max: P(choice = k) = softmax(alpha)_k.
        let p = softmax_rows(&alpha);
        let mut counts = [[0usize; 4]; 2];
        let n = 2000;
        for seed in 0..n {
            for (r, &k) in gumbel_hard(&alpha, 1.0, Some(1000 + seed)).1.iter().enumerate() {
                counts[r][k] += 1;
            }
        }
        for r in 0..2 {
            for k in 0..4 {
                let f = counts[r][k] as f64 / n as f64;
                assert!((f - p[r][k]).abs() < 0.035, "row {r} op {k}: drawn {f}, softmax {}", p[r][k]);
            }
        }
    }

    /// A GDAS edge runs only its chosen op: the output is that op's, and the gradient reaches every weight of
    /// the row (`sum(op_k(x) * r)` for the chosen one, `sum(r)` for the others, by hand).
    #[test]
    fn a_gdas_edge_runs_the_chosen_op_and_passes_every_weight_its_gradient() {
        let ops = vec![OpKind::None, OpKind::AvgPool3x3, OpKind::SkipConnect, OpKind::SepConv3x3];
        let space = SearchSpace { ops, ..Default::default() };
        let vs = nn::VarStore::new(Device::Cpu);
        let edge = MixedOp::new(&vs.root(), &space, 4, 1);
        let x = Tensor::randn([2, 4, 6, 6], (Kind::Float, Device::Cpu));
        let r = Tensor::randn([2, 4, 6, 6], (Kind::Float, Device::Cpu));
        let pass = Pass { train: false, skip_dropout: 0.0, aux_skip: 1.0, seed: 0, fused: false, batched: false };
        let w = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 1.0]).set_requires_grad(true);
        let y = edge.forward_t(&x, &w, pass, Some(3));
        let alone = edge.ops[3].forward_t(&x, false);
        assert!(y.allclose(&alone, 1e-6, 1e-6, false));
        let g = Tensor::run_backward(&[(&y * &r).sum(Kind::Float)], &[&w], false, false);
        let others = r.sum(Kind::Float).double_value(&[]);
        let chosen = (alone * &r).sum(Kind::Float).double_value(&[]);
        for (k, want) in [(0, others), (1, others), (2, others), (3, chosen)] {
            assert!((g[0].double_value(&[k]) - want).abs() < 1e-3, "weight {k}: {} vs {want}", g[0]);
        }
    }

    #[test]
    fn edge_weights_are_a_softmax_per_node_and_scale_derivation() {
        let space = SearchSpace { nodes: 2, edge_normalization: true, ..Default::default() };
        let a = Alphas::random(&space, Device::Cpu);
        let (bn, _) = a.betas.as_ref().unwrap();
        tch::no_grad(|| {
            bn.shallow_clone().copy_(&Tensor::from_slice(&[0.0f32, 0.0, 0.0, 3.0f32.ln(), 0.0]));
        });
        let (wn, _) = a.edge_weights_vec().unwrap();
        // node 0: edges 0,1 equal; node 1: edges 2,3,4 with exp weights 1,3,1.
        let want = [0.5, 0.5, 0.2, 0.6, 0.2];
        for (w, t) in wn.iter().zip(want) {
            assert!((w - t).abs() < 1e-6, "{wn:?}");
        }
        let (soft, _) = a.softmax();
        let (scaled, _) = a.derivation_weights();
        for e in 0..5 {
            for o in 0..soft[e].len() {
                assert!((scaled[e][o] - soft[e][o] * wn[e]).abs() < 1e-12);
            }
        }
    }
}
