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

    /// The convolution a convolution chain begins with (after its activation) when it is a depthwise one without
    /// bias (the sep and dil convs'): the edges reading one state compute these together
    /// ([`crate::native::depthwise_convs`]); `None` for other ops.
    pub fn first_depthwise(&self) -> Option<&Conv> {
        match self {
            Op::Convs(_, blocks) => blocks.first()?.0.first().filter(|c| c.is_depthwise() && c.bias.is_none()),
            _ => None,
        }
    }

    /// [`Op::forward_activated`] of an op with a [`Op::first_depthwise`] from that convolution's output `first`,
    /// computed elsewhere; `None` for other ops.
    pub fn forward_from_first(&self, first: Tensor, train: bool) -> Option<Tensor> {
        self.first_depthwise()?;
        match self {
            Op::Convs(act, blocks) => Some(convs_forward(*act, blocks, first, train, true)),
            _ => None,
        }
    }
}

/// A chain of (activation, convolutions, BN) blocks on `y`, the first block's activation already applied (and
/// with `first_done` its first convolution too). A BN that the next block's ReLU follows is computed with it
/// ([`Bn::forward_relu_t`]).
fn convs_forward(act: Activation, blocks: &[(Vec<Conv>, Bn)], mut y: Tensor, train: bool, first_done: bool) -> Tensor {
    let mut activated = true;
    for (i, (convs, bn)) in blocks.iter().enumerate() {
        if !activated {
            y = act.apply(&y);
        }
        let skip = usize::from(first_done && i == 0);
        for conv in &convs[skip..] {
            y = conv.forward(&y);
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
