//! The op table: each candidate operation as a tch module, exactly as the original DARTS `operations.py`.
//!
//! Parameters are named like the original PyTorch modules' state_dict keys (`op.1.weight`, ...), and
//! initialised like PyTorch's defaults (uniform in ±1/sqrt(fan_in) for convolutions, BN weight 1 and bias 0).
//!
//! The pieces the ops are made of live beside this file: the convolution ([`conv`]), BatchNorm ([`bn`]) and the
//! blocks around the ops, the cells' preprocessing and the stem ([`blocks`]).

mod blocks;
mod bn;
mod conv;

pub use blocks::{FactorizedReduce, Preprocess, ReluConvBn, Stem};
pub use bn::{batch_norm, fold_batch_norm, Bn, BN_EPS, BN_MOMENTUM};
pub use conv::{count_conv_macs, Conv, ConvSpec};

use crate::native::SepHalf;

use crate::space::{Activation, OpKind};
use tch::nn;
use tch::Tensor;

/// A candidate operation on one edge.
#[derive(Debug)]
pub enum Op {
    /// The zero op; its output is zero of the (strided) input's shape.
    Zero {
        /// 1 or 2.
        stride: i64,
    },
    /// 3x3 max pooling, with the search-time BN when present.
    MaxPool {
        /// 1 or 2.
        stride: i64,
        /// The BN (affine = false) that follows pooling during search.
        bn: Option<Bn>,
    },
    /// 3x3 average pooling (padding not counted), with the search-time BN when present.
    AvgPool {
        /// 1 or 2.
        stride: i64,
        /// The BN (affine = false) that follows pooling during search.
        bn: Option<Bn>,
    },
    /// Identity.
    Identity,
    /// FactorizedReduce (skip_connect on a reducing edge).
    Reduce(FactorizedReduce),
    /// A chain of (ReLU, convolutions, BN) blocks: sep, dil and 7x1-1x7 convolutions.
    Convs(Activation, Vec<(Vec<Conv>, Bn)>),
}

impl Op {
    /// Builds op `kind` on `c` channels with `stride`; `affine` for BN; `search` adds BN after pooling.
    pub fn new(p: &nn::Path, kind: OpKind, c: i64, stride: i64, affine: bool, search: bool, act: Activation) -> Op {
        // Pool ops are wrapped as nn.Sequential(pool, BN) during search: the BN is module "1".
        let pool_bn = || search.then(|| batch_norm(&(p / "1"), c, false));
        let sep = |k: i64| {
            let pad = k / 2;
            let op = p / "op";
            let dw =
                |i: &str, s: i64| Conv::new(&(&op / i), c, c, ConvSpec { groups: c, ..ConvSpec::square(k, s, pad) });
            Op::Convs(
                act,
                vec![
                    (
                        vec![dw("1", stride), Conv::new(&(&op / "2"), c, c, ConvSpec::square(1, 1, 0))],
                        batch_norm(&(&op / "3"), c, affine),
                    ),
                    (
                        vec![dw("5", 1), Conv::new(&(&op / "6"), c, c, ConvSpec::square(1, 1, 0))],
                        batch_norm(&(&op / "7"), c, affine),
                    ),
                ],
            )
        };
        let dil = |k: i64| {
            let op = p / "op";
            let spec = ConvSpec { dilation: [2, 2], groups: c, ..ConvSpec::square(k, stride, k - 1) };
            Op::Convs(
                act,
                vec![(
                    vec![Conv::new(&(&op / "1"), c, c, spec), Conv::new(&(&op / "2"), c, c, ConvSpec::square(1, 1, 0))],
                    batch_norm(&(&op / "3"), c, affine),
                )],
            )
        };
        match kind {
            OpKind::None => Op::Zero { stride },
            OpKind::MaxPool3x3 => Op::MaxPool { stride, bn: pool_bn() },
            OpKind::AvgPool3x3 => Op::AvgPool { stride, bn: pool_bn() },
            OpKind::SkipConnect if stride == 1 => Op::Identity,
            OpKind::SkipConnect => Op::Reduce(FactorizedReduce::new(p, c, c, affine, act)),
            OpKind::SepConv3x3 => sep(3),
            OpKind::SepConv5x5 => sep(5),
            OpKind::SepConv7x7 => sep(7),
            OpKind::DilConv3x3 => dil(3),
            OpKind::DilConv5x5 => dil(5),
            OpKind::Conv7x1_1x7 => {
                let op = p / "op";
                let a = ConvSpec { kernel: [1, 7], stride: [1, stride], padding: [0, 3], dilation: [1, 1], groups: 1 };
                let b = ConvSpec { kernel: [7, 1], stride: [stride, 1], padding: [3, 0], dilation: [1, 1], groups: 1 };
                Op::Convs(
                    act,
                    vec![(
                        vec![Conv::new(&(&op / "1"), c, c, a), Conv::new(&(&op / "2"), c, c, b)],
                        batch_norm(&(&op / "3"), c, affine),
                    )],
                )
            }
        }
    }

    /// Folds every BN that follows a convolution into it (inference only); a pooling op's search-time BN stays.
    pub fn fold_batch_norm(&mut self) {
        match self {
            Op::Reduce(fr) => fr.fold_batch_norm(),
            Op::Convs(_, blocks) => {
                for (convs, bn) in blocks {
                    if let Some(last) = convs.last_mut() {
                        fold_batch_norm(&mut [last], bn);
                    }
                }
            }
            Op::Zero { .. } | Op::MaxPool { .. } | Op::AvgPool { .. } | Op::Identity => {}
        }
    }

    /// Whether the op's output is identically zero (so a weighted sum may skip it).
    pub fn is_zero(&self) -> bool {
        matches!(self, Op::Zero { .. })
    }

    /// Whether the op is the identity (drop path leaves it alone in the final network).
    pub fn is_identity(&self) -> bool {
        matches!(self, Op::Identity)
    }

    /// Applies the op.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Op::Zero { stride } => {
                if *stride == 1 {
                    x.zeros_like()
                } else {
                    x.slice(2, 0, None, *stride).slice(3, 0, None, *stride).zeros_like()
                }
            }
            Op::MaxPool { stride, bn } => {
                let y = x.max_pool2d([3, 3], [*stride, *stride], [1, 1], [1, 1], false);
                match bn {
                    Some(bn) => bn.forward_t(&y, train),
                    None => y,
                }
            }
            Op::AvgPool { stride, bn } => {
                let y = x.avg_pool2d([3, 3], [*stride, *stride], [1, 1], false, false, None);
                match bn {
                    Some(bn) => bn.forward_t(&y, train),
                    None => y,
                }
            }
            Op::Identity => x.shallow_clone(),
            Op::Reduce(fr) => fr.forward_t(x, train),
            Op::Convs(act, blocks) => convs_forward(*act, blocks, act.apply(x), train, false),
        }
    }

    /// The activation the op begins with: the convolution chains' and FactorizedReduce's.
    pub fn activation(&self) -> Option<Activation> {
        match self {
            Op::Convs(act, _) => Some(*act),
            Op::Reduce(fr) => Some(fr.act),
            _ => None,
        }
    }

    /// [`Op::forward_t`] of an op that begins with its activation ([`Op::activation`]) from `act(x)` already
    /// computed, so that the edges reading one state can share it; `None` for the other ops.
    pub fn forward_activated(&self, activated: &Tensor, train: bool) -> Option<Tensor> {
        match self {
            Op::Convs(act, blocks) => Some(convs_forward(*act, blocks, activated.shallow_clone(), train, false)),
            Op::Reduce(fr) => Some(fr.forward_activated(activated, train)),
            _ => None,
        }
    }

    /// The depthwise and 1x1 convolutions a convolution chain begins with (after its activation), the sep and
    /// dil convs' first half: the readers of one state compute these together ([`crate::native::sep_halves`]);
    /// `None` for other ops.
    pub fn first_half(&self) -> Option<SepHalf<'_>> {
        match self {
            Op::Convs(_, blocks) => half(&blocks.first()?.0),
            _ => None,
        }
    }

    /// [`Op::forward_activated`] of an op with a [`Op::first_half`] from that half's output `first`, computed
    /// elsewhere; `None` for other ops.
    pub fn forward_from_first(&self, first: Tensor, train: bool) -> Option<Tensor> {
        self.first_half()?;
        match self {
            Op::Convs(act, blocks) => Some(convs_forward(*act, blocks, first, train, true)),
            _ => None,
        }
    }
}

thread_local! {
    static SEPARATE_HALVES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every separable half (a depthwise convolution and the 1x1 one after it) computed as two
/// convolutions (`separate`) or, where the kernel applies, as one node that keeps no depthwise output
/// ([`crate::native::sep_halves`], the default): the networks' switch between batched edges and the reference.
pub fn with_separate_halves<R>(separate: bool, f: impl FnOnce() -> R) -> R {
    let before = SEPARATE_HALVES.with(|s| s.replace(separate));
    let r = f();
    SEPARATE_HALVES.with(|s| s.set(before));
    r
}

/// Whether separable halves run as two convolutions on this thread ([`with_separate_halves`]).
pub fn separate_halves() -> bool {
    SEPARATE_HALVES.with(|s| s.get())
}

/// The block's convolutions as a separable half: a depthwise convolution then a 1x1 one (stride 1, no padding,
/// no bias).
fn half(convs: &[Conv]) -> Option<SepHalf<'_>> {
    match convs {
        [dw, pw] if dw.is_depthwise() && pw.is_plain_pointwise() => {
            Some(SepHalf { depthwise: dw.depthwise_spec(), pointwise: &pw.weight })
        }
        _ => None,
    }
}

/// A block's convolutions on `y`: one separable half node where it applies (and the batch gives every thread an
/// example: the node works example by example), else one by one.
fn block_convs(convs: &[Conv], y: Tensor) -> Tensor {
    if !separate_halves() && y.size().first().is_some_and(|&n| n >= tch::get_num_threads() as i64) {
        if let Some(h) = half(convs) {
            if let Some(mut out) = crate::native::sep_halves(&y, &[h]) {
                let out = out.pop().expect("one output");
                count_half_macs(convs, &out);
                return out;
            }
        }
    }
    convs.iter().fold(y, |y, conv| conv.forward(&y))
}

/// [`count_conv_macs`]'s count for a separable half computed as one node (`out`: the 1x1 convolution's output):
/// the depthwise output has the 1x1 input's channels and the output's size.
pub(crate) fn count_half_macs(convs: &[Conv], out: &Tensor) {
    let (dw, pw) = (&convs[0], &convs[1]);
    let s = out.size();
    dw.count_macs_for(&[s[0], pw.weight.size()[1], s[2], s[3]]);
    pw.count_macs_for(&s);
}

/// A chain of (activation, convolutions, BN) blocks on `y`, the first block's activation already applied (and
/// with `first_done` its convolutions too). A BN that the next block's ReLU follows is computed with it
/// ([`Bn::forward_relu_t`]).
fn convs_forward(act: Activation, blocks: &[(Vec<Conv>, Bn)], mut y: Tensor, train: bool, first_done: bool) -> Tensor {
    let mut activated = true;
    for (i, (convs, bn)) in blocks.iter().enumerate() {
        if !activated {
            y = act.apply(&y);
        }
        if !(first_done && i == 0) {
            y = block_convs(convs, y);
        }
        let relu_next = act == Activation::Relu && i + 1 < blocks.len();
        y = if relu_next { bn.forward_relu_t(&y, train) } else { bn.forward_t(&y, train) };
        activated = relu_next;
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn count(vs: &nn::VarStore) -> i64 {
        vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn op_parameter_counts_match_the_original_modules() {
        // Hand-computed from operations.py with C = 16, affine BN (2 * C per BN).
        let c = 16i64;
        let cases = [
            (OpKind::SepConv3x3, 2 * (c * 9 + c * c + 2 * c)),
            (OpKind::SepConv5x5, 2 * (c * 25 + c * c + 2 * c)),
            (OpKind::DilConv3x3, c * 9 + c * c + 2 * c),
            (OpKind::DilConv5x5, c * 25 + c * c + 2 * c),
            (OpKind::Conv7x1_1x7, 2 * 7 * c * c + 2 * c),
            (OpKind::MaxPool3x3, 0),
            (OpKind::SkipConnect, 0),
        ];
        for (kind, want) in cases {
            let vs = nn::VarStore::new(Device::Cpu);
            let _op = Op::new(&vs.root(), kind, c, 1, true, false, Activation::Relu);
            assert_eq!(count(&vs), want, "{kind}");
        }
        let vs = nn::VarStore::new(Device::Cpu);
        let _op = Op::new(&vs.root(), OpKind::SkipConnect, c, 2, true, false, Activation::Relu);
        assert_eq!(count(&vs), 2 * (c * c / 2) + 2 * c);
    }

    #[test]
    fn strided_ops_agree_on_output_shape_for_even_and_odd_sizes() {
        let vs = nn::VarStore::new(Device::Cpu);
        for size in [8i64, 7] {
            let x = Tensor::randn([2, 4, size, size], (Kind::Float, Device::Cpu));
            for kind in OpKind::ALL {
                let op = Op::new(&(vs.root() / kind.name() / size), kind, 4, 2, false, true, Activation::Relu);
                let y = op.forward_t(&x, true);
                assert_eq!(y.size(), vec![2, 4, (size + 1) / 2, (size + 1) / 2], "{kind} on {size}");
            }
        }
    }

    #[test]
    fn avg_pool_does_not_count_padding() {
        let vs = nn::VarStore::new(Device::Cpu);
        let op = Op::new(&vs.root(), OpKind::AvgPool3x3, 1, 1, false, false, Activation::Relu);
        let x = Tensor::ones([1, 1, 3, 3], (Kind::Float, Device::Cpu));
        // With padding counted the corner would be 4/9; the original excludes padding, so it stays 1.
        let y = op.forward_t(&x, false);
        assert!((y.double_value(&[0, 0, 0, 0]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn zero_op_is_zero_and_identity_is_identity() {
        let vs = nn::VarStore::new(Device::Cpu);
        let x = Tensor::randn([1, 2, 4, 4], (Kind::Float, Device::Cpu));
        let z = Op::new(&vs.root(), OpKind::None, 2, 1, false, true, Activation::Relu).forward_t(&x, true);
        assert_eq!(z.abs().sum(Kind::Float).double_value(&[]), 0.0);
        let i = Op::new(&vs.root(), OpKind::SkipConnect, 2, 1, false, true, Activation::Relu).forward_t(&x, true);
        assert_eq!((&i - &x).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
