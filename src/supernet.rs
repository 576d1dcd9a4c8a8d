//! The search supernet: MixedOp, search cell and search network (the original `model_search.py`).
//!
//! The architecture parameters ([`Alphas`]) live apart from the network weights: the weights are in a
//! `VarStore`, the alphas are two plain leaf tensors, so each optimiser sees only its own parameters.

use crate::ops::{Op, Preprocess, ReluConvBn, Stem};
use crate::space::{DataShape, SearchSpace};
use tch::nn;
use tch::{Device, Kind, Tensor};

/// The architecture parameters: one row per edge, one column per candidate op.
#[derive(Debug)]
pub struct Alphas {
    /// alpha for the normal cells, `[edges, ops]`.
    pub normal: Tensor,
    /// alpha for the reduction cells, `[edges, ops]`.
    pub reduce: Tensor,
}

impl Alphas {
    /// `1e-3 * N(0, 1)`, as the original (draws from libtorch's generator: seed it first).
    pub fn random(space: &SearchSpace, device: Device) -> Alphas {
        let shape = [space.edges() as i64, space.ops.len() as i64];
        let make = || (Tensor::randn(shape, (Kind::Float, device)) * 1e-3).set_requires_grad(true);
        Alphas { normal: make(), reduce: make() }
    }

    /// Both alpha matrices, normal first (the order of the optimiser state).
    pub fn tensors(&self) -> [&Tensor; 2] {
        [&self.normal, &self.reduce]
    }

    /// softmax(alpha) per edge, as plain nested vectors: (normal, reduce).
    pub fn softmax(&self) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        (softmax_rows(&self.normal), softmax_rows(&self.reduce))
    }
}

/// Row-wise softmax of a 2-d tensor, copied to the host.
pub fn softmax_rows(t: &Tensor) -> Vec<Vec<f64>> {
    let s = t.detach().softmax(-1, Kind::Double).to_device(Device::Cpu);
    let (r, c) = (s.size()[0], s.size()[1]);
    (0..r).map(|i| (0..c).map(|j| s.double_value(&[i, j])).collect()).collect()
}

/// A continuous relaxation of one edge: sum over ops of softmax(alpha)_op * op(x).
#[derive(Debug)]
pub struct MixedOp {
    ops: Vec<Op>,
}

impl MixedOp {
    fn new(p: &nn::Path, space: &SearchSpace, c: i64, stride: i64) -> MixedOp {
        let ops_path = p / "_ops";
        let ops = space
            .ops
            .iter()
            .enumerate()
            .map(|(k, &kind)| Op::new(&(&ops_path / k), kind, c, stride, false, true, space.activation));
        MixedOp { ops: ops.collect() }
    }

    /// `weights` is this edge's row of softmax(alpha).
    pub fn forward_t(&self, x: &Tensor, weights: &Tensor, train: bool) -> Tensor {
        let mut out: Option<Tensor> = None;
        for (k, op) in self.ops.iter().enumerate() {
            // The zero op adds nothing to the sum and nothing to any gradient: skip its work.
            if op.is_zero() {
                continue;
            }
            let y = op.forward_t(x, train) * weights.get(k as i64);
            out = Some(match out {
                None => y,
                Some(acc) => acc + y,
            });
        }
        out.expect("the op set has an op besides none (validated)")
    }
}

/// A search cell: two preprocessed inputs, `nodes` intermediate nodes each summing MixedOps over all
/// predecessors, output = concat of the intermediate nodes.
#[derive(Debug)]
pub struct SearchCell {
    /// Whether this is a reduction cell.
    pub reduction: bool,
    preprocess0: Preprocess,
    preprocess1: ReluConvBn,
    edges: Vec<MixedOp>,
    nodes: usize,
}

impl SearchCell {
    fn new(
        p: &nn::Path,
        space: &SearchSpace,
        c_pp: i64,
        c_p: i64,
        c: i64,
        reduction: bool,
        reduction_prev: bool,
    ) -> Self {
        let preprocess0 = Preprocess::new(&(p / "preprocess0"), c_pp, c, reduction_prev, false, space.activation);
        let preprocess1 = ReluConvBn::new(&(p / "preprocess1"), c_p, c, 1, 1, 0, false, space.activation);
        let ops = p / "_ops";
        let mut edges = Vec::new();
        for i in 0..space.nodes {
            for j in 0..2 + i {
                let stride = if reduction && j < 2 { 2 } else { 1 };
                edges.push(MixedOp::new(&(&ops / edges.len()), space, c, stride));
            }
        }
        SearchCell { reduction, preprocess0, preprocess1, edges, nodes: space.nodes }
    }

    /// `weights` = softmax(alpha) for this cell type, `[edges, ops]`.
    pub fn forward_t(&self, s0: &Tensor, s1: &Tensor, weights: &Tensor, train: bool) -> Tensor {
        let s0 = self.preprocess0.forward_t(s0, train);
        let s1 = self.preprocess1.forward_t(s1, train);
        let mut states = vec![s0, s1];
        let mut offset = 0;
        for _ in 0..self.nodes {
            let mut sum: Option<Tensor> = None;
            for (j, h) in states.iter().enumerate() {
                let y = self.edges[offset + j].forward_t(h, &weights.get((offset + j) as i64), train);
                sum = Some(match sum {
                    None => y,
                    Some(acc) => acc + y,
                });
            }
            offset += states.len();
            states.push(sum.expect("a node has at least two inputs"));
        }
        Tensor::cat(&states[2..], 1)
    }
}

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
        SearchNetwork { space: space.clone(), shape: *shape, stem, cells, classifier, alphas, channels_last: false }
    }

    /// Logits for a batch `[n, c, h, w]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let w_normal = self.alphas.normal.softmax(-1, self.alphas.normal.kind());
        let w_reduce = self.alphas.reduce.softmax(-1, self.alphas.reduce.kind());
        let x = if self.channels_last { crate::channels_last(x) } else { x.shallow_clone() };
        let stem = self.stem.forward_t(&x, train);
        let (mut s0, mut s1) = (stem.shallow_clone(), stem);
        for cell in &self.cells {
            let w = if cell.reduction { &w_reduce } else { &w_normal };
            let out = cell.forward_t(&s0, &s1, w, train);
            (s0, s1) = (s1, out);
        }
        let pooled = s1.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        pooled.apply(&self.classifier)
    }

    /// Mean cross-entropy on a batch, in training mode (batch statistics in BN).
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        self.forward_t(x, true).cross_entropy_for_logits(y)
    }
}

/// Switches the network's kernels and activations to channels-last (`on`) or contiguous NCHW.
pub fn set_channels_last(net: &mut SearchNetwork, vs: &nn::VarStore, on: bool) {
    net.channels_last = on;
    crate::set_vars_channels_last(vs, on);
}

/// Total number of trainable weight parameters.
pub fn count_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}
