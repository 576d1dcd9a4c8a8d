//! What the readers of one state share within a forward pass: the edges of a search cell, the ops of a final cell,
//! the two cells (and the auxiliary head) that read a cell's output.
//!
//! In the original `model_search.py` every edge computes its ops from scratch, so a state read by four edges is
//! activated (ReLU) four times per convolution op and pooled four times per pooling op, and every pooling
//! output is normalised by four BNs that see the same batch. Here each state's [`EdgeInput`] computes these once,
//! when the first edge asks, and hands the same tensor to the others:
//!
//! - the activation `act(x)` that begins every sep/dil/7x1 convolution op and FactorizedReduce (of the ops'
//!   input, and separately of the whole state for DARTS-'s auxiliary skip when the ops see a channel slice);
//! - max and average pooling (the state's edges all have one stride: 2 from a reduction cell's inputs, else 1);
//! - PC-DARTS's dense channel slice the ops see and its pooled bypass;
//! - the affine-free BN after pooling, in training mode when every op runs (not GDAS): its output there is a
//!   function of the batch alone, the same for every edge. The first edge's BN computes it and updates its
//!   running statistics; the other edges' BNs receive a copy of those statistics, which is what their own update
//!   would have given: the BNs of one state's edges have seen the same batches since their initialisation, so
//!   their statistics are equal (a test runs passes both ways and compares them). In evaluation mode and under
//!   GDAS (where each edge's BN sees only the batches its sampled op ran on) every edge normalises with its own.
//!
//! - batched edges (issue 16): the first half (depthwise then 1x1 convolution) of every sep and dil conv op of
//!   every edge that reads the state (4 ops x up to `nodes` edges), registered by the cell ([`EdgeInput::batch`]),
//!   as one autograd node ([`crate::native::sep_halves`]) when the first of them runs: example by example, the
//!   state's activation read from the cache by every half, no depthwise output written or kept, the
//!   activation's gradient summed over the halves in one buffer. Only where a graph is recorded (the state
//!   requires its gradient): without one, computing them together would only keep their outputs alive at once.
//!
//! Forward values are the same bits as the unshared network's; gradients are the same sums, added in another
//! order (a ReLU's backward once on the sum of its consumers' gradients instead of once per consumer).
//! An [`EdgeInput`] made with `share` false computes everything per edge, as the original: the reference the tests
//! compare with.

use crate::ops::{Bn, Op};
use crate::space::Activation;
use std::cell::{OnceCell, RefCell};
use tch::Tensor;

/// A reader's first half to compute with the others': its activation, its depthwise weight (the key: the weight's
/// storage), its 1x1 weight, and the depthwise stride, padding and dilation.
type BatchedHalf = (Activation, Tensor, Tensor, [i64; 6]);

/// One state as its outgoing edges read it, with what they share.
#[derive(Debug)]
pub struct EdgeInput {
    x: Tensor,
    share: bool,
    share_bn: bool,
    partial: i64,
    seen: OnceCell<Tensor>,
    act_seen: OnceCell<(Activation, Tensor)>,
    act_full: OnceCell<(Activation, Tensor)>,
    /// [max, avg][stride - 1].
    pooled: [[OnceCell<Tensor>; 2]; 2],
    /// The normalised pooling: output, and the running mean and variance of the BN that computed it.
    normalised: [[OnceCell<(Tensor, Tensor, Tensor)>; 2]; 2],
    bypass: [OnceCell<Tensor>; 2],
    /// (destination, source) running statistics to copy once the cell's pass is done.
    copies: RefCell<Vec<(Tensor, Tensor)>>,
    /// The readers' first halves to compute together: their activation, and per half its depthwise weight (the
    /// key: the weight's storage), its 1x1 weight, and the depthwise stride, padding and dilation.
    batch: RefCell<Vec<BatchedHalf>>,
    /// Their outputs, in `batch`'s order, once the first reader asked (`None`: the kernel declined the input).
    batched: OnceCell<Option<Vec<Tensor>>>,
}

impl EdgeInput {
    /// State `x` read by edges that see its first C/`partial` channels (PC-DARTS; 1: all), in training mode
    /// (`train`), with `gdas` when each edge runs one sampled op. Without `share` nothing is shared: every edge
    /// computes its ops from scratch, as the original code.
    pub fn new(x: &Tensor, share: bool, partial: i64, train: bool, gdas: bool) -> EdgeInput {
        EdgeInput {
            x: x.shallow_clone(),
            share,
            share_bn: share && train && !gdas,
            partial,
            seen: OnceCell::new(),
            act_seen: OnceCell::new(),
            act_full: OnceCell::new(),
            pooled: Default::default(),
            normalised: Default::default(),
            bypass: Default::default(),
            copies: RefCell::new(Vec::new()),
            batch: RefCell::new(Vec::new()),
            batched: OnceCell::new(),
        }
    }

    /// Registers the ops that will read this state (its edges' ops, before the first of them runs): the first
    /// halves of those that begin with one ([`Op::first_half`]) are then computed together (see the module's
    /// notes). Nothing when the readers do not share, and nothing is computed until an op asks.
    pub fn batch<'a>(&self, ops: impl IntoIterator<Item = &'a Op>) {
        if !self.share {
            return;
        }
        let mut batch = self.batch.borrow_mut();
        for op in ops {
            if let (Some(act), Some(half)) = (op.activation(), op.first_half()) {
                let d = half.depthwise;
                let [s, p, dl] = [d.stride, d.padding, d.dilation];
                let spec = [s[0], s[1], p[0], p[1], dl[0], dl[1]];
                batch.push((act, d.weight.shallow_clone(), half.pointwise.shallow_clone(), spec));
            }
        }
    }

    /// The output of `op`'s first half from the batch, when it is in it and the batch applies.
    fn batched_half(&self, op: &Op, act: Activation) -> Option<Tensor> {
        let key = op.first_half()?.depthwise.weight.data_ptr();
        let index = self.batch.borrow().iter().position(|(_, w, _, _)| w.data_ptr() == key)?;
        let outputs = self.batched.get_or_init(|| {
            let a = self.activated_seen(act);
            let batch = self.batch.borrow();
            // The node works example by example (backward: one task per example): a batch smaller than the
            // thread count goes one by one.
            let small = a.size().first().is_some_and(|&n| n < tch::get_num_threads() as i64);
            if !a.requires_grad() || small || batch.iter().any(|(other, ..)| *other != act) {
                return None;
            }
            let halves: Vec<crate::native::SepHalf> = batch
                .iter()
                .map(|(_, weight, pointwise, v)| crate::native::SepHalf {
                    depthwise: crate::native::DepthwiseSpec {
                        weight,
                        stride: [v[0], v[1]],
                        padding: [v[2], v[3]],
                        dilation: [v[4], v[5]],
                    },
                    pointwise,
                })
                .collect();
            crate::native::sep_halves(&a, &halves)
        });
        let y = outputs.as_ref()?[index].shallow_clone();
        if let Op::Convs(_, blocks) = op {
            crate::ops::count_half_macs(&blocks[0].0, &y);
        }
        Some(y)
    }

    /// Of a final network's state or a cell's output: all ops see all of it, and no op has a BN to share.
    pub fn plain(x: &Tensor, share: bool) -> EdgeInput {
        EdgeInput::new(x, share, 1, false, false)
    }

    /// `act(x)` of the whole state, computed once for every reader that begins with it (the preprocessing of
    /// the two cells reading a cell's output, the auxiliary head).
    pub fn activated(&self, act: Activation) -> Tensor {
        match self.share {
            true => shared_activation(&self.act_full, act, &self.x),
            false => act.apply(&self.x),
        }
    }

    /// Whether its readers share what they compute alike ([`EdgeInput::new`]'s `share`).
    pub fn shares(&self) -> bool {
        self.share
    }

    /// The whole state.
    pub fn full(&self) -> &Tensor {
        &self.x
    }

    /// Whether the ops see a channel slice (PC-DARTS).
    fn is_partial(&self) -> bool {
        self.partial > 1
    }

    /// What the ops see: the state, or with PC-DARTS its first C/K channels, dense in the network's layout.
    pub fn seen(&self) -> &Tensor {
        self.seen.get_or_init(|| {
            if self.partial == 1 {
                return self.x.shallow_clone();
            }
            let c = self.x.size()[1];
            dense_like(&self.x, &self.x.narrow(1, 0, c / self.partial))
        })
    }

    /// PC-DARTS: the channels the ops do not see, max-pooled 2x2 on a reducing edge.
    pub fn bypass(&self, stride: i64) -> Tensor {
        let compute = || {
            let c = self.x.size()[1];
            let rest = self.x.narrow(1, c / self.partial, c - c / self.partial);
            // ceil_mode: odd sizes give the ops' ceil(h/2) too (the original code fails on odd sizes).
            if stride == 2 {
                rest.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], true)
            } else {
                rest
            }
        };
        match self.share {
            true => self.bypass[stride as usize - 1].get_or_init(compute).shallow_clone(),
            false => compute(),
        }
    }

    /// `op(seen)`, from what the state's edges share.
    pub fn apply(&self, op: &Op, train: bool) -> Tensor {
        if !self.share {
            return op.forward_t(self.seen(), train);
        }
        match op {
            Op::MaxPool { stride, bn } => self.pool(0, *stride, bn.as_ref(), train),
            Op::AvgPool { stride, bn } => self.pool(1, *stride, bn.as_ref(), train),
            _ => match op.activation() {
                Some(act) => {
                    if let Some(first) = self.batched_half(op, act) {
                        return op.forward_from_first(first, train).expect("an op with a first half");
                    }
                    let a = self.activated_seen(act);
                    op.forward_activated(&a, train).expect("an op with an activation starts from it")
                }
                None => op.forward_t(self.seen(), train),
            },
        }
    }

    /// `act(seen)`, shared (one tensor with [`EdgeInput::activated`] when the ops see the whole state).
    fn activated_seen(&self, act: Activation) -> Tensor {
        match self.partial {
            1 => shared_activation(&self.act_full, act, &self.x),
            _ => shared_activation(&self.act_seen, act, self.seen()),
        }
    }

    /// `op(x)` on the whole state (DARTS-'s auxiliary skip), from what the state's edges share.
    pub fn apply_full(&self, op: &Op, train: bool) -> Tensor {
        if !self.is_partial() {
            return self.apply(op, train);
        }
        match (self.share, op.activation()) {
            (true, Some(act)) => {
                let a = shared_activation(&self.act_full, act, &self.x);
                op.forward_activated(&a, train).expect("an op with an activation starts from it")
            }
            _ => op.forward_t(&self.x, train),
        }
    }

    fn pool(&self, kind: usize, stride: i64, bn: Option<&Bn>, train: bool) -> Tensor {
        let s = stride as usize - 1;
        let pooled = self.pooled[kind][s].get_or_init(|| {
            let x = self.seen();
            if kind == 0 {
                x.max_pool2d([3, 3], [stride, stride], [1, 1], [1, 1], false)
            } else {
                x.avg_pool2d([3, 3], [stride, stride], [1, 1], false, false, None)
            }
        });
        let Some(bn) = bn else { return pooled.shallow_clone() };
        if !self.share_bn {
            return bn.forward_t(pooled, train);
        }
        let cell = &self.normalised[kind][s];
        match cell.get() {
            Some((y, mean, var)) => {
                let mut copies = self.copies.borrow_mut();
                copies.push((bn.running_mean.shallow_clone(), mean.shallow_clone()));
                copies.push((bn.running_var.shallow_clone(), var.shallow_clone()));
                y.shallow_clone()
            }
            None => {
                let y = bn.forward_t(pooled, true);
                let _ = cell.set((y.shallow_clone(), bn.running_mean.shallow_clone(), bn.running_var.shallow_clone()));
                y
            }
        }
    }

    /// The running statistics to copy ((destination, source) pairs) for the BNs that took a shared output.
    fn take_copies(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.copies.borrow_mut())
    }
}

/// `act(x)`, computed once per activation kind.
fn shared_activation(cell: &OnceCell<(Activation, Tensor)>, act: Activation, x: &Tensor) -> Tensor {
    let (kind, a) = cell.get_or_init(|| (act, act.apply(x)));
    if *kind == act {
        a.shallow_clone()
    } else {
        act.apply(x)
    }
}

/// `t` (a channel slice of `like`) copied dense in `like`'s layout: a channel slice of a channels-last tensor is
/// dense in neither layout.
pub(crate) fn dense_like(like: &Tensor, t: &Tensor) -> Tensor {
    let nhwc = like.dim() == 4 && like.stride()[1] == 1 && like.size()[1] > 1;
    if nhwc {
        crate::channels_last(t)
    } else {
        t.contiguous()
    }
}

/// Copies the running statistics of BNs that took a shared output (one multi-tensor copy).
pub fn copy_statistics(inputs: &[EdgeInput]) {
    let (dst, src): (Vec<Tensor>, Vec<Tensor>) = inputs.iter().flat_map(|i| i.take_copies()).unzip();
    if !dst.is_empty() {
        tch::no_grad(|| crate::native::foreach_copy(&dst, &src));
    }
}
