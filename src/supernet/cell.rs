//! One search cell: the MixedOp on each edge (with partial channels, GDAS sampling, skip dropout and the
//! auxiliary skip), the weights a pass gives each cell type, and the pass's seeds.

use crate::ops::{Op, Preprocess, ReluConvBn};
use crate::shared::{copy_statistics, dense_like, EdgeInput};
use crate::space::{OpKind, SearchSpace};
use tch::nn;
use tch::{Device, Tensor};

/// PC-DARTS' channel shuffle: `[n, c, h, w]` viewed as `[n, groups, c / groups, h, w]`, groups and
/// channels-per-group swapped.
pub fn channel_shuffle(x: &Tensor, groups: i64) -> Tensor {
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    x.reshape([n, groups, c / groups, h, w]).transpose(1, 2).reshape([n, c, h, w])
}

/// One cell type's architecture weights for a forward pass.
#[derive(Debug)]
pub struct CellWeights {
    /// softmax(alpha) (DARTS), or GDAS's hard one-hot weights with the softmax's gradient, `[edges, ops]`.
    pub ops: Tensor,
    /// Edge normalisation: the per-node softmax of beta, `[edges]`.
    pub edges: Option<Tensor>,
    /// GDAS: the op each edge runs (the others only pass their weight's gradient).
    pub choices: Option<Vec<usize>>,
}

/// GDAS's sample for one cell type (Dong & Yang, CVPR 2019): per edge, the op maximising
/// `(log_softmax(alpha) + g) / tau` with Gumbel noise `g` drawn from `seed` (no noise without a seed: the
/// strongest op), and hard weights `one_hot - p.detach() + p` with `p = softmax((log_softmax(alpha) + g) / tau)`:
/// one-hot forward, the softmax's gradient backward. The noise is drawn on the CPU from the seed, so the sample
/// is the same on every device.
pub fn gumbel_hard(alpha: &Tensor, tau: f64, seed: Option<u64>) -> (Tensor, Vec<usize>) {
    use rand::{Rng, SeedableRng};
    let (rows, cols) = (alpha.size()[0], alpha.size()[1]);
    let noise: Vec<f32> = match seed {
        Some(seed) => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            // u in (0, 1): -ln(-ln u) is finite (GDAS redraws when its noise is infinite).
            (0..rows * cols)
                .map(|_| {
                    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                    -(-u.ln()).ln() as f32
                })
                .collect()
        }
        None => vec![0.0; (rows * cols) as usize],
    };
    let g = Tensor::from_slice(&noise).reshape([rows, cols]).to_kind(alpha.kind()).to_device(alpha.device());
    let probs = ((alpha.log_softmax(-1, alpha.kind()) + g) / tau).softmax(-1, alpha.kind());
    let index = probs.argmax(-1, false);
    let choices: Vec<usize> = Vec::<i64>::try_from(index.to_device(Device::Cpu))
        .expect("argmax indices")
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let one_hot = probs.zeros_like().scatter_value(-1, &index.unsqueeze(-1), 1.0);
    (one_hot - probs.detach() + probs, choices)
}

/// How a forward pass treats the supernet's edges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pass {
    /// Training mode (batch statistics in BN, dropout on).
    pub train: bool,
    /// P-DARTS: the dropout rate on the identity op's output (training mode only; 0: off).
    pub skip_dropout: f64,
    /// DARTS-: the weight of the auxiliary skip connection added to every edge (where the space has one).
    pub aux_skip: f64,
    /// The seed of the pass's random draws (skip dropout masks, GDAS samples); each cell and each edge in it
    /// derive their own ([`Pass::derive`]).
    pub seed: u64,
    /// Each node's weighted sum of its edges' op outputs in one pass ([`crate::native::mixed_sum`]; PC-DARTS:
    /// each edge's); off, a product and a sum per op as the original code.
    pub fused: bool,
    /// Batched edges: separable halves as one node each, and the first halves of the ops reading one state as one
    /// ([`SearchCell::forward_t`]; with shared edge inputs; under GDAS, where each edge runs one op, not across
    /// edges).
    pub batched: bool,
}

impl Pass {
    /// The same pass for part `k` (a cell, an edge): its own seed, unrelated to its neighbours'.
    pub fn derive(self, k: usize) -> Pass {
        Pass { seed: splitmix64(self.seed ^ splitmix64(k as u64)), ..self }
    }
}

/// splitmix64's output function: consecutive inputs give unrelated outputs.
pub(super) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A continuous relaxation of one edge: sum over ops of softmax(alpha)_op * op(x). With partial channels
/// (K > 1, PC-DARTS) the ops see the first C/K channels only; the others bypass them (max-pooled 2x2 on a
/// reducing edge) and the two parts are concatenated and channel-shuffled. With DARTS-'s auxiliary skip
/// connection, `aux_skip * skip(x)` is added to the result (identity, or FactorizedReduce on a reducing edge).
#[derive(Debug)]
pub struct MixedOp {
    pub(super) ops: Vec<Op>,
    kinds: Vec<OpKind>,
    partial: i64,
    stride: i64,
    pub(super) aux: Option<Op>,
    /// The indices of the ops that run: all but the zero op, whose term is zero.
    running: Vec<i64>,
}

impl MixedOp {
    pub(super) fn new(p: &nn::Path, space: &SearchSpace, c: i64, stride: i64) -> MixedOp {
        let ops_path = p / "_ops";
        let partial = space.partial_channels as i64;
        let ops = space
            .ops
            .iter()
            .enumerate()
            .map(|(k, &kind)| Op::new(&(&ops_path / k), kind, c / partial, stride, false, true, space.activation));
        // DARTS- names it `auxiliary_op`: FactorizedReduce(C, C, affine=False) on a reducing edge, else Identity.
        let aux = space
            .auxiliary_skip
            .then(|| Op::new(&(p / "auxiliary_op"), OpKind::SkipConnect, c, stride, false, true, space.activation));
        let ops: Vec<Op> = ops.collect();
        let running = (0..ops.len()).filter(|&k| !ops[k].is_zero()).map(|k| k as i64).collect();
        MixedOp { ops, kinds: space.ops.clone(), partial, stride, aux, running }
    }

    /// `weights` is this edge's row of softmax(alpha); with `choice` (GDAS) its row of hard weights, and only
    /// that op runs: `w[k] * op_k(x) + sum of the other w[j]` (they are 0 forward, and carry their gradient).
    pub fn forward_t(&self, x: &Tensor, weights: &Tensor, pass: Pass, choice: Option<usize>) -> Tensor {
        let input = EdgeInput::new(x, true, self.partial, pass.train, choice.is_some());
        let y = self.forward_input(&input, weights, pass, choice);
        copy_statistics(std::slice::from_ref(&input));
        y
    }

    /// [`MixedOp::forward_t`] on a state shared with the other edges that read it ([`EdgeInput`]).
    pub fn forward_input(&self, input: &EdgeInput, weights: &Tensor, pass: Pass, choice: Option<usize>) -> Tensor {
        let y = self.relaxed(input, weights, pass, choice);
        match self.aux_term(input, pass) {
            Some(skip) => y + skip,
            None => y,
        }
    }

    /// DARTS-'s `aux_skip * skip(x)`, where the space has the auxiliary skip.
    fn aux_term(&self, input: &EdgeInput, pass: Pass) -> Option<Tensor> {
        let aux = self.aux.as_ref()?;
        let x = input.full();
        let skip = crate::profile::time("auxiliary_skip", None, self.stride, x, || input.apply_full(aux, pass.train));
        Some(skip * pass.aux_skip)
    }

    /// Whether a node can sum this edge's op outputs with the other edges' in one pass: every op of the edge sees
    /// the whole input (no partial channels) and every op runs (no GDAS sample).
    fn fusable(&self, pass: Pass, choice: Option<usize>) -> bool {
        pass.fused && self.partial == 1 && choice.is_none()
    }

    /// The outputs of the ops that run (all but the zero op), unweighted, with the skip dropout on the identity.
    fn outputs(&self, input: &EdgeInput, pass: Pass) -> Vec<Tensor> {
        self.running.iter().map(|&k| self.op_output(k as usize, input, pass)).collect()
    }

    fn relaxed(&self, input: &EdgeInput, weights: &Tensor, pass: Pass, choice: Option<usize>) -> Tensor {
        if self.partial == 1 {
            return self.mix(input, weights, pass, choice);
        }
        let mixed = self.mix(input, weights, pass, choice);
        // The shuffle's reshape returns NCHW: copied dense in the layout the rest of the network uses.
        let x = input.full();
        dense_like(x, &channel_shuffle(&Tensor::cat(&[mixed, input.bypass(self.stride)], 1), self.partial))
    }

    fn mix(&self, input: &EdgeInput, weights: &Tensor, pass: Pass, choice: Option<usize>) -> Tensor {
        if let Some(k) = choice {
            let rest = weights.sum(weights.kind()) - weights.get(k as i64);
            return self.weighted_op(k, input, weights, pass) + rest;
        }
        if pass.fused {
            let index = Tensor::from_slice(&self.running).to_device(weights.device());
            return crate::native::mixed_sum(&weights.index_select(0, &index), &self.outputs(input, pass));
        }
        let mut out: Option<Tensor> = None;
        for (k, op) in self.ops.iter().enumerate() {
            // The zero op adds nothing to the sum and nothing to any gradient: skip its work.
            if op.is_zero() {
                continue;
            }
            let y = self.weighted_op(k, input, weights, pass);
            out = Some(match out {
                None => y,
                Some(acc) => acc + y,
            });
        }
        out.expect("the op set has an op besides none (validated)")
    }

    /// `weights[k] * op_k(x)`, with the skip dropout on the identity.
    fn weighted_op(&self, k: usize, input: &EdgeInput, weights: &Tensor, pass: Pass) -> Tensor {
        self.op_output(k, input, pass) * weights.get(k as i64)
    }

    /// `op_k(x)`, with the skip dropout on the identity.
    fn op_output(&self, k: usize, input: &EdgeInput, pass: Pass) -> Tensor {
        let (op, kind) = (&self.ops[k], self.kinds[k]);
        let x = input.seen();
        let y = crate::profile::time(kind.name(), Some(kind), self.stride, x, || input.apply(op, pass.train));
        // P-DARTS: dropout after the parameter-free identity, so that it cannot win by training fastest.
        let y = if pass.train && pass.skip_dropout > 0.0 && op.is_identity() {
            // As `Tensor::dropout`, with the mask from this edge's own seed.
            let keep = 1.0 - pass.skip_dropout;
            let mask = crate::native::bernoulli_mask(&y, keep, pass.seed).unwrap_or_else(|e| panic!("{e:#}"));
            y * (mask / keep)
        } else {
            y
        };
        y
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
    pub(super) fn new(
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

    /// The ops that read state `i` (0, 1: the preprocessed inputs; then the nodes): every running op of the
    /// state's outgoing edges, node by node.
    fn readers(&self, i: usize) -> impl Iterator<Item = &Op> {
        let mut edges = Vec::new();
        let mut offset = 0;
        for n in 0..self.nodes {
            if i < n + 2 {
                edges.push(&self.edges[offset + i]);
            }
            offset += n + 2;
        }
        edges.into_iter().flat_map(|e| e.running.iter().map(move |&k| &e.ops[k as usize]))
    }

    /// `weights`: this cell type's architecture weights for the pass. `s0` and `s1` share their activation with the
    /// other cell that reads them ([`EdgeInput::activated`]); when they share ([`EdgeInput::shares`]) the edges
    /// reading one state share its activation, pooling and (in training mode) pooling BN; when not, every edge
    /// computes its ops from scratch as the original code (the reference the tests compare with).
    ///
    /// With [`Pass::batched`] each separable half (a sep or dil conv's depthwise and 1x1 convolutions) runs as one
    /// node that keeps no depthwise output, and the first halves of the ops reading one state as one
    /// ([`EdgeInput::batch`]); without, every convolution on its own (the reference of the tests).
    pub fn forward_t(&self, s0: &EdgeInput, s1: &EdgeInput, weights: &CellWeights, pass: Pass) -> Tensor {
        crate::ops::with_separate_halves(!pass.batched, || self.forward_halves(s0, s1, weights, pass))
    }

    fn forward_halves(&self, s0: &EdgeInput, s1: &EdgeInput, weights: &CellWeights, pass: Pass) -> Tensor {
        let (train, share) = (pass.train, s1.shares());
        let (p0, p1) = (&self.preprocess0, &self.preprocess1);
        let s0 = crate::profile::time("preprocess", None, 1, s0.full(), || {
            p0.forward_activated(&s0.activated(p0.activation()), train)
        });
        let s1 = crate::profile::time("preprocess", None, 1, s1.full(), || {
            p1.forward_activated(&s1.activated(p1.act), train)
        });
        let partial = self.edges[0].partial;
        let gdas = weights.choices.is_some();
        let batched = pass.batched && !gdas;
        // State i, and with batched edges the ops that will read it.
        let input = |x: &Tensor, i: usize| {
            let state = EdgeInput::new(x, share, partial, train, gdas);
            if batched {
                state.batch(self.readers(i));
            }
            state
        };
        let mut states = vec![input(&s0, 0), input(&s1, 1)];
        let mut offset = 0;
        // The fused node: every running op of every incoming edge weighted in one pass, with weights
        // softmax(alpha) (times the edge's beta with edge normalisation), then DARTS-'s auxiliary skips.
        let fused = self.edges[0].fusable(pass, weights.choices.as_ref().map(|c| c[0]));
        let scaled = fused.then(|| {
            let running = Tensor::from_slice(&self.edges[0].running).to_device(weights.ops.device());
            let scaled = match &weights.edges {
                Some(b) => &weights.ops * b.unsqueeze(1),
                None => weights.ops.shallow_clone(),
            };
            scaled.index_select(1, &running)
        });
        for _ in 0..self.nodes {
            if let Some(scaled) = &scaled {
                let n = states.len();
                let mut terms = Vec::new();
                for (j, h) in states.iter().enumerate() {
                    terms.extend(self.edges[offset + j].outputs(h, pass.derive(offset + j)));
                }
                let w = scaled.narrow(0, offset as i64, n as i64).reshape([-1]);
                let mut sum = crate::native::mixed_sum(&w, &terms);
                for (j, h) in states.iter().enumerate() {
                    if let Some(skip) = self.edges[offset + j].aux_term(h, pass.derive(offset + j)) {
                        sum = match &weights.edges {
                            Some(b) => sum + skip * b.get((offset + j) as i64),
                            None => sum + skip,
                        };
                    }
                }
                offset += n;
                states.push(input(&sum, n));
                continue;
            }
            let mut sum: Option<Tensor> = None;
            for (j, h) in states.iter().enumerate() {
                let e = (offset + j) as i64;
                let choice = weights.choices.as_ref().map(|c| c[offset + j]);
                let edge = &self.edges[offset + j];
                let y = edge.forward_input(h, &weights.ops.get(e), pass.derive(offset + j), choice);
                let y = match &weights.edges {
                    Some(b) => y * b.get(e),
                    None => y,
                };
                sum = Some(match sum {
                    None => y,
                    Some(acc) => acc + y,
                });
            }
            offset += states.len();
            let n = states.len();
            states.push(input(&sum.expect("a node has at least two inputs"), n));
        }
        copy_statistics(&states);
        let nodes: Vec<&Tensor> = states[2..].iter().map(|s| s.full()).collect();
        Tensor::cat(&nodes, 1)
    }
}
