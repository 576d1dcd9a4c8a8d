//! The building blocks around the candidate ops: the cells' preprocessing (ReLU-conv1x1-BN, FactorizedReduce)
//! and the stem.

use super::{batch_norm, fold_batch_norm, Bn, Conv, ConvSpec};
use crate::space::Activation;
use tch::nn;
use tch::Tensor;

/// ReLU, convolution, BN (the original `ReLUConvBN`; the cells' preprocessing).
#[derive(Debug)]
pub struct ReluConvBn {
    pub(crate) act: Activation,
    pub(crate) conv: Conv,
    pub(crate) bn: Bn,
}

impl ReluConvBn {
    /// `c_in -> c_out` with a square kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &nn::Path,
        c_in: i64,
        c_out: i64,
        k: i64,
        stride: i64,
        padding: i64,
        affine: bool,
        act: Activation,
    ) -> Self {
        let op = p / "op";
        ReluConvBn {
            act,
            conv: Conv::new(&(&op / "1"), c_in, c_out, ConvSpec::square(k, stride, padding)),
            bn: batch_norm(&(&op / "2"), c_out, affine),
        }
    }
    /// Applies ReLU, conv, BN.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_activated(&self.act.apply(x), train)
    }

    /// [`ReluConvBn::forward_t`] from `act(x)` already computed (the two cells reading a cell's output share it).
    pub fn forward_activated(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(x), train)
    }

    /// Folds the BN into the convolution (inference only).
    pub fn fold_batch_norm(&mut self) {
        fold_batch_norm(&mut [&mut self.conv], &mut self.bn);
    }
}

/// Halves the spatial size with two offset stride-2 1x1 convolutions (the original `FactorizedReduce`).
#[derive(Debug)]
pub struct FactorizedReduce {
    pub(crate) act: Activation,
    pub(crate) conv_1: Conv,
    pub(crate) conv_2: Conv,
    pub(crate) bn: Bn,
}

impl FactorizedReduce {
    /// `c_in -> c_out` channels (`c_out` even), half the height and width.
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, affine: bool, act: Activation) -> Self {
        FactorizedReduce {
            act,
            conv_1: Conv::new(&(p / "conv_1"), c_in, c_out / 2, ConvSpec::square(1, 2, 0)),
            conv_2: Conv::new(&(p / "conv_2"), c_in, c_out / 2, ConvSpec::square(1, 2, 0)),
            bn: batch_norm(&(p / "bn"), c_out, affine),
        }
    }
    /// Applies the op. On an odd height or width the shifted branch is zero-padded at the end so that both
    /// branches give ceil(size / 2), the size every other strided op gives (the original fails there).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_activated(&self.act.apply(x), train)
    }

    /// [`FactorizedReduce::forward_t`] from `act(x)` already computed (edges reading one state share it).
    pub fn forward_activated(&self, x: &Tensor, train: bool) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        let shifted = x.narrow(2, 1, h - 1).narrow(3, 1, w - 1);
        let shifted = if h % 2 == 1 || w % 2 == 1 { shifted.constant_pad_nd([0, w % 2, 0, h % 2]) } else { shifted };
        let out = Tensor::cat(&[self.conv_1.forward(x), self.conv_2.forward(&shifted)], 1);
        self.bn.forward_t(&out, train)
    }

    /// Folds the BN into both convolutions, each taking its half of the channels (inference only).
    pub fn fold_batch_norm(&mut self) {
        fold_batch_norm(&mut [&mut self.conv_1, &mut self.conv_2], &mut self.bn);
    }
}

/// A cell's preprocessing of its first input: FactorizedReduce when the previous cell reduced (so both inputs
/// have the same size), else ReLU-conv1x1-BN.
#[derive(Debug)]
pub enum Preprocess {
    /// After a reduction cell.
    Reduce(FactorizedReduce),
    /// Otherwise.
    Conv(ReluConvBn),
}

impl Preprocess {
    /// `c_in -> c` channels under `p`.
    pub fn new(p: &nn::Path, c_in: i64, c: i64, reduction_prev: bool, affine: bool, act: Activation) -> Preprocess {
        if reduction_prev {
            Preprocess::Reduce(FactorizedReduce::new(p, c_in, c, affine, act))
        } else {
            Preprocess::Conv(ReluConvBn::new(p, c_in, c, 1, 1, 0, affine, act))
        }
    }

    /// Applies it.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_activated(&self.activation().apply(x), train)
    }

    /// The activation it begins with.
    pub fn activation(&self) -> Activation {
        match self {
            Preprocess::Reduce(fr) => fr.act,
            Preprocess::Conv(c) => c.act,
        }
    }

    /// [`Preprocess::forward_t`] from `act(x)` already computed (the two cells reading a cell's output share it).
    pub fn forward_activated(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Preprocess::Reduce(fr) => fr.forward_activated(x, train),
            Preprocess::Conv(c) => c.forward_activated(x, train),
        }
    }

    /// Folds its BN into its convolution(s) (inference only).
    pub fn fold_batch_norm(&mut self) {
        match self {
            Preprocess::Reduce(fr) => fr.fold_batch_norm(),
            Preprocess::Conv(c) => c.fold_batch_norm(),
        }
    }
}

/// The stem: a 3x3 convolution from the image channels to `c` channels, then BN (affine).
#[derive(Debug)]
pub struct Stem {
    pub(crate) conv: Conv,
    pub(crate) bn: Bn,
}

impl Stem {
    /// Parameters named `stem.0.weight`, `stem.1.*` as the original `nn.Sequential`.
    pub fn new(p: &nn::Path, c_in: i64, c: i64) -> Stem {
        Stem { conv: Conv::new(&(p / "0"), c_in, c, ConvSpec::square(3, 1, 1)), bn: batch_norm(&(p / "1"), c, true) }
    }

    /// Applies it.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(x), train)
    }

    /// Folds the BN into the convolution (inference only).
    pub fn fold_batch_norm(&mut self) {
        fold_batch_norm(&mut [&mut self.conv], &mut self.bn);
    }
}
