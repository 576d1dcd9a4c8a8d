//! The op table: each candidate operation as a tch module, exactly as the original DARTS `operations.py`.
//!
//! Parameters are named like the original PyTorch modules' state_dict keys (`op.1.weight`, ...), and
//! initialised like PyTorch's defaults (uniform in ±1/sqrt(fan_in) for convolutions, BN weight 1 and bias 0).

use crate::space::{Activation, OpKind};
use tch::nn::{self, ModuleT};
use tch::Tensor;

thread_local! {
    static MACS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` and returns the multiply-accumulates per example of every [`Conv`] it applied (convolutions
/// only; feed one example and add linear layers by hand).
pub fn count_conv_macs(f: impl FnOnce()) -> u64 {
    MACS.with(|m| m.set(Some(0)));
    f();
    MACS.with(|m| m.replace(None)).unwrap_or(0)
}

/// A 2-d convolution without bias, initialised as PyTorch's `nn.Conv2d`.
#[derive(Debug)]
pub struct Conv {
    /// The kernel, `[c_out, c_in / groups, kh, kw]`.
    pub weight: Tensor,
    /// A bias, only where a BatchNorm was folded into the convolution for inference ([`fold_batch_norm`]).
    pub(crate) bias: Option<Tensor>,
    pub(crate) stride: [i64; 2],
    pub(crate) padding: [i64; 2],
    pub(crate) dilation: [i64; 2],
    pub(crate) groups: i64,
}

/// Geometry of a convolution: kernel, stride, padding, dilation and groups.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    /// Kernel height and width.
    pub kernel: [i64; 2],
    /// Stride in each direction.
    pub stride: [i64; 2],
    /// Zero padding in each direction.
    pub padding: [i64; 2],
    /// Dilation in each direction.
    pub dilation: [i64; 2],
    /// Groups (c_in for a depthwise convolution).
    pub groups: i64,
}

impl ConvSpec {
    /// A square kernel `k` with `stride`, `padding`, dilation 1 and one group.
    pub fn square(k: i64, stride: i64, padding: i64) -> Self {
        ConvSpec { kernel: [k, k], stride: [stride; 2], padding: [padding; 2], dilation: [1, 1], groups: 1 }
    }
}

impl Conv {
    /// A convolution from `c_in` to `c_out` channels.
    pub fn new(p: &nn::Path, c_in: i64, c_out: i64, s: ConvSpec) -> Conv {
        let fan_in = (c_in / s.groups) * s.kernel[0] * s.kernel[1];
        let bound = 1.0 / (fan_in as f64).sqrt();
        let weight = p.var(
            "weight",
            &[c_out, c_in / s.groups, s.kernel[0], s.kernel[1]],
            nn::Init::Uniform { lo: -bound, up: bound },
        );
        Conv { weight, bias: None, stride: s.stride, padding: s.padding, dilation: s.dilation, groups: s.groups }
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.forward_own(x).unwrap_or_else(|| self.forward_aten(x));
        MACS.with(|m| {
            if let Some(n) = m.get() {
                // Per example: every output element takes c_in/groups * kh * kw multiply-adds.
                let w = self.weight.size();
                let out = y.size();
                m.set(Some(n + (out[1] * out[2] * out[3] * w[1] * w[2] * w[3]) as u64));
            }
        });
        y
    }
}

/// Every second pixel of `x` in each direction (rows and columns 0, 2, 4, ...), channels-last dense: the input
/// of a 1x1 convolution with stride 2 computed as one with stride 1.
fn every_second_pixel(x: &Tensor) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    crate::channels_last(&x.slice(2, 0, h, 2).slice(3, 0, w, 2))
}

impl Conv {
    /// The shim's own kernels on the CPU: a depthwise convolution ([`crate::native::depthwise_conv`]) or a 1x1
    /// one with stride 1 or 2 ([`crate::native::pointwise_conv`], stride 2 on every second pixel), both without
    /// bias; `None` for any other convolution or input (another device, dtype or layout).
    fn forward_own(&self, x: &Tensor) -> Option<Tensor> {
        if x.device() != tch::Device::Cpu || self.bias.is_some() {
            return None;
        }
        if self.is_depthwise() {
            return crate::native::depthwise_conv(x, &self.weight, self.stride, self.padding, self.dilation);
        }
        let k = self.weight.size();
        if k[2] != 1 || k[3] != 1 || self.groups != 1 || self.padding != [0, 0] || self.dilation != [1, 1] {
            return None;
        }
        match self.stride {
            [1, 1] => crate::native::pointwise_conv(x, &self.weight),
            [2, 2] if x.stride()[1] == 1 => crate::native::pointwise_conv(&every_second_pixel(x), &self.weight),
            _ => None,
        }
    }

    /// The convolution as libtorch's conv2d (a dilated depthwise one on the CPU by phases, a strided 1x1 one on
    /// every second pixel).
    fn forward_aten(&self, x: &Tensor) -> Tensor {
        if self.is_dilated_depthwise() && x.device() == tch::Device::Cpu {
            self.dilated_depthwise_by_phases(x)
        } else if self.is_strided_pointwise() && x.device() == tch::Device::Cpu && x.stride()[1] == 1 {
            // libtorch 2.11's CPU kernel for a channels-last 1x1 convolution with stride 2 corrupts the heap
            // for small channel counts (seen with 2 to 6 input channels, also from Python). The same maths:
            // take every second pixel, then a 1x1 convolution with stride 1.
            every_second_pixel(x).conv2d(&self.weight, self.bias.as_ref(), [1, 1], [0, 0], [1, 1], 1)
        } else {
            x.conv2d(&self.weight, self.bias.as_ref(), self.stride, self.padding, self.dilation, self.groups)
        }
    }

    /// A 1x1 convolution with stride 2 and no padding (FactorizedReduce's).
    fn is_strided_pointwise(&self) -> bool {
        let k = self.weight.size();
        k[2] == 1 && k[3] == 1 && self.stride == [2, 2] && self.padding == [0, 0] && self.groups == 1
    }

    /// A depthwise convolution without bias (one k x k kernel per channel), which the shim's own kernel
    /// computes on the CPU ([`crate::native::depthwise_conv`]).
    fn is_depthwise(&self) -> bool {
        let k = self.weight.size();
        self.bias.is_none() && self.groups > 1 && k[0] == self.groups && k[1] == 1
    }

    /// A depthwise convolution with dilation 2 and "same" padding (the dil_conv ops).
    fn is_dilated_depthwise(&self) -> bool {
        let k = self.weight.size();
        self.dilation == [2, 2]
            && self.groups > 1
            && k[1] == 1
            && k[2] == k[3]
            && k[2] % 2 == 1
            && self.padding == [k[2] - 1, k[2] - 1]
            && self.stride[0] == self.stride[1]
            && self.stride[0] <= 2
    }

    /// The same convolution computed without dilation: with dilation 2 and padding k - 1, output pixel (y, x)
    /// reads only input pixels of its own parity (y mod 2, x mod 2), so the image splits into four phase
    /// images, each convolved with the undilated kernel (padding (k - 1) / 2), and interleaved back; with
    /// stride 2 only the even phase is read. Same sums, and libtorch's CPU backward for undilated depthwise
    /// kernels is many times faster than its dilated one (NCHW). The phases are gathered into one
    /// channels-last batch `[4n, c, h/2, w/2]` with a single copy from either layout, and the output is
    /// interleaved back into the input's layout with a single copy (an NCHW phase batch from a channels-last
    /// input cost two more copies each way and made this op 2-4x slower).
    fn dilated_depthwise_by_phases(&self, x: &Tensor) -> Tensor {
        let k = self.weight.size()[2];
        let pad = [(k - 1) / 2, (k - 1) / 2];
        let (n, c, h, w) = (x.size()[0], x.size()[1], x.size()[2], x.size()[3]);
        // Each output pixel comes from exactly one phase: the bias is added once.
        let conv = |t: &Tensor| t.conv2d(&self.weight, self.bias.as_ref(), [1, 1], pad, [1, 1], self.groups);
        if self.stride[0] == 2 {
            return conv(&x.slice(2, 0, None, 2).slice(3, 0, None, 2));
        }
        let nhwc = x.stride()[1] == 1 && c > 1;
        // Zero rows/columns past the end equal the convolution's own zero padding there.
        let (he, we) = (h + h % 2, w + w % 2);
        let xe = if he != h || we != w { x.constant_pad_nd([0, we - w, 0, he - h]) } else { x.shallow_clone() };
        let (h2, w2) = (he / 2, we / 2);
        // [n, 2 (row phase), 2 (column phase), h/2, w/2, c], a view of either layout.
        let split = if nhwc {
            xe.permute([0, 2, 3, 1]).reshape([n, h2, 2, w2, 2, c]).permute([0, 2, 4, 1, 3, 5])
        } else {
            xe.reshape([n, c, h2, 2, w2, 2]).permute([0, 3, 5, 2, 4, 1])
        };
        let phases = split.reshape([n * 4, h2, w2, c]).permute([0, 3, 1, 2]);
        // The convolution keeps the channels-last layout: [4n, h/2, w/2, c] in memory.
        let y = conv(&phases).permute([0, 2, 3, 1]).reshape([n, 2, 2, h2, w2, c]);
        let y = if nhwc {
            y.permute([0, 3, 1, 4, 2, 5]).reshape([n, he, we, c]).permute([0, 3, 1, 2])
        } else {
            y.permute([0, 5, 3, 1, 4, 2]).reshape([n, c, he, we])
        };
        if he != h || we != w {
            y.narrow(2, 0, h).narrow(3, 0, w)
        } else {
            y
        }
    }
}

/// Batch normalisation as PyTorch's `nn.BatchNorm2d(c, affine=affine)`.
pub fn batch_norm(p: &nn::Path, c: i64, affine: bool) -> Bn {
    let bn = nn::batch_norm2d(
        p,
        c,
        nn::BatchNormConfig {
            affine,
            ws_init: nn::Init::Const(1.0),
            bs_init: nn::Init::Const(0.0),
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
            ..Default::default()
        },
    );
    Bn { bn, folded: false }
}

/// BatchNorm's epsilon in every darts network (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;

/// BatchNorm's running-statistics momentum in every darts network (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// The signature of the shim's training-mode BNs ([`crate::native::batch_norm`], [`crate::native::batch_norm_relu`]).
type BnKernel = fn(&Tensor, Option<&Tensor>, Option<&Tensor>, &Tensor, &Tensor, f64, f64) -> Tensor;

/// A BatchNorm (tch's, whose fields it derefs to) that inference may fold into the convolution before it: then it
/// is the identity, and the convolution carries its scale and shift.
#[derive(Debug)]
pub struct Bn {
    bn: nn::BatchNorm,
    folded: bool,
}

impl std::ops::Deref for Bn {
    type Target = nn::BatchNorm;
    fn deref(&self) -> &nn::BatchNorm {
        &self.bn
    }
}

impl Bn {
    /// Applies it (the identity once folded). Training mode on 4-d inputs goes through the shim's fused
    /// kernel ([`crate::native::batch_norm`]: same maths, ATen's where it does not apply).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if self.folded {
            x.shallow_clone()
        } else if train && x.dim() == 4 {
            self.fused(x, crate::native::batch_norm)
        } else {
            self.bn.forward_t(x, train)
        }
    }

    /// `relu(self.forward_t(x, train))`, the ReLU fused into the BN's kernel in training mode on 4-d inputs
    /// ([`crate::native::batch_norm_relu`]).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Tensor {
        if !self.folded && train && x.dim() == 4 {
            self.fused(x, crate::native::batch_norm_relu)
        } else {
            self.forward_t(x, train).relu()
        }
    }

    /// `kernel` (one of the shim's training-mode BNs) with this BN's parameters and running statistics.
    fn fused(&self, x: &Tensor, kernel: BnKernel) -> Tensor {
        let bn = &self.bn;
        kernel(x, bn.ws.as_ref(), bn.bs.as_ref(), &bn.running_mean, &bn.running_var, BN_MOMENTUM, BN_EPS)
    }

    /// Whether it was folded into a convolution.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// The evaluation-mode BN as `y = scale * x + shift` per channel, computed in double precision (so that
    /// folded weights round once); float64 tensors on the BN's device.
    pub fn scale_shift(&self) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let f64 = |t: &Tensor| t.to_kind(tch::Kind::Double);
            let scale = (f64(&self.bn.running_var) + BN_EPS).rsqrt();
            let scale = match &self.bn.ws {
                Some(w) => f64(w) * scale,
                None => scale,
            };
            let shift = -f64(&self.bn.running_mean) * &scale;
            let shift = match &self.bn.bs {
                Some(b) => shift + f64(b),
                None => shift,
            };
            (scale, shift)
        })
    }
}

/// Folds `bn` (evaluation mode: its running statistics) into the convolutions whose concatenated outputs it
/// normalises: each kernel scaled per output channel, the shift as a bias; `bn` becomes the identity. For
/// inference only: the network no longer trains as before.
pub fn fold_batch_norm(convs: &mut [&mut Conv], bn: &mut Bn) {
    if bn.folded {
        return;
    }
    let (scale, shift) = bn.scale_shift();
    let mut offset = 0;
    tch::no_grad(|| {
        for conv in convs.iter_mut() {
            let c = conv.weight.size()[0];
            let s = scale.narrow(0, offset, c).to_kind(conv.weight.kind());
            let scaled = &conv.weight * s.view([-1, 1, 1, 1]);
            conv.weight.copy_(&scaled);
            let b = shift.narrow(0, offset, c).to_kind(conv.weight.kind());
            conv.bias = Some(match conv.bias.take() {
                Some(old) => old * &s + b,
                None => b,
            });
            offset += c;
        }
    });
    bn.folded = true;
}

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
            Op::Convs(act, blocks) => convs_forward(*act, blocks, act.apply(x), train),
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
            Op::Convs(act, blocks) => Some(convs_forward(*act, blocks, activated.shallow_clone(), train)),
            Op::Reduce(fr) => Some(fr.forward_activated(activated, train)),
            _ => None,
        }
    }
}

/// A chain of (activation, convolutions, BN) blocks on `y`, the first block's activation already applied.
/// A BN that the next block's ReLU follows is computed with it ([`Bn::forward_relu_t`]).
fn convs_forward(act: Activation, blocks: &[(Vec<Conv>, Bn)], mut y: Tensor, train: bool) -> Tensor {
    let mut activated = true;
    for (i, (convs, bn)) in blocks.iter().enumerate() {
        if !activated {
            y = act.apply(&y);
        }
        for conv in convs {
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

    /// FactorizedReduce's 1x1 stride-2 convolution on channels-last input goes around a libtorch kernel that
    /// corrupts the heap for small channel counts (this test crashed the process before): same values and
    /// gradients as the direct NCHW convolution.
    #[test]
    fn channels_last_strided_pointwise_equals_the_direct_convolution_and_survives() {
        for c in [2i64, 4, 6, 8] {
            let vs = nn::VarStore::new(Device::Cpu);
            let conv = Conv::new(&vs.root(), c, c / 2, ConvSpec::square(1, 2, 0));
            crate::set_vars_channels_last(&vs, true);
            for size in [8i64, 7] {
                for _ in 0..10 {
                    let x = Tensor::randn([4, c, size, size], (Kind::Float, Device::Cpu)).set_requires_grad(true);
                    let y = conv.forward(&crate::channels_last(&x));
                    let direct = x.conv2d(&conv.weight.contiguous(), None::<Tensor>, [2, 2], [0, 0], [1, 1], 1);
                    assert!(y.allclose(&direct, 1e-5, 1e-6, false), "C={c} size {size}");
                    let g = Tensor::run_backward(&[(&y * &y).sum(Kind::Float)], &[&x, &conv.weight], false, false);
                    let gd = Tensor::run_backward(
                        &[(&direct * &direct).sum(Kind::Float)],
                        &[&x, &conv.weight],
                        false,
                        false,
                    );
                    for (a, b) in g.iter().zip(&gd) {
                        assert!(a.allclose(b, 1e-4, 1e-5, false), "C={c}: gradient");
                    }
                }
            }
        }
    }

    /// Every convolution of DARTS's ops (depthwise 3x3/5x5, dilated or not, stride 1 or 2; 1x1 stride 1 or 2)
    /// through `Conv::forward` on a channels-last float32 input (the shim's own kernels) equals libtorch's conv2d
    /// on the NCHW input, output and gradients.
    #[test]
    fn own_kernels_equal_the_direct_convolution() {
        let mut specs = vec![(1i64, 6i64, ConvSpec::square(1, 1, 0)), (6, 3, ConvSpec::square(1, 2, 0))];
        for (k, d) in [(3i64, 1i64), (5, 1), (3, 2), (5, 2)] {
            for stride in [1, 2] {
                let spec = ConvSpec { dilation: [d, d], groups: 6, ..ConvSpec::square(k, stride, d * (k - 1) / 2) };
                specs.push((1, 6, spec));
            }
        }
        for (i, (mult, c_out, spec)) in specs.into_iter().enumerate() {
            let vs = nn::VarStore::new(Device::Cpu);
            let conv = Conv::new(&vs.root(), 6 * mult, c_out, spec);
            crate::set_vars_channels_last(&vs, true);
            let x = Tensor::randn([3, 6 * mult, 9, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let ours = conv.forward(&crate::channels_last(&x));
            let w = conv.weight.contiguous();
            let direct = x.conv2d(&w, None::<Tensor>, conv.stride, conv.padding, conv.dilation, conv.groups);
            assert_eq!(ours.size(), direct.size(), "{i}: {spec:?}");
            assert!(ours.allclose(&direct, 1e-5, 1e-5, false), "{i}: {spec:?}");
            let c = direct.randn_like();
            let go = Tensor::run_backward(&[(&ours * &c).sum(Kind::Float)], &[&x, &conv.weight], false, false);
            let gd = Tensor::run_backward(&[(&direct * &c).sum(Kind::Float)], &[&x, &conv.weight], false, false);
            for (a, b) in go.iter().zip(&gd) {
                assert!(a.allclose(b, 1e-4, 1e-4, false), "{i}: {spec:?}: gradient");
            }
        }
    }

    #[test]
    fn dilated_depthwise_by_phases_equals_the_direct_convolution_and_its_gradients() {
        let cases = [(3i64, 1i64, 8i64), (5, 1, 8), (3, 1, 7), (5, 1, 9), (3, 2, 8), (5, 2, 7)];
        for ((k, stride, size), nhwc) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let vs = nn::VarStore::new(Device::Cpu);
            let spec = ConvSpec { dilation: [2, 2], groups: 3, ..ConvSpec::square(k, stride, k - 1) };
            let conv = Conv::new(&vs.root(), 3, 3, spec);
            assert!(conv.is_dilated_depthwise());
            let x = Tensor::randn([2, 3, size, size + 1], (Kind::Double, Device::Cpu)).set_requires_grad(true);
            let w = conv.weight.to_kind(Kind::Double).detach().set_requires_grad(true);
            let direct = x.conv2d(&w, None::<Tensor>, [stride, stride], [k - 1, k - 1], [2, 2], 3);
            // Either layout in, the same layout out.
            let input = if nhwc { crate::channels_last(&x) } else { x.shallow_clone() };
            let phased = Conv { weight: w.shallow_clone(), ..conv }.dilated_depthwise_by_phases(&input);
            let case = format!("k={k} stride={stride} size={size} channels-last={nhwc}");
            assert_eq!(direct.size(), phased.size(), "{case}");
            if stride == 1 {
                assert_eq!(phased.stride()[1] == 1, nhwc, "{case}: layout");
            }
            assert!((&direct - &phased).abs().max().double_value(&[]) < 1e-12, "{case}");
            let g = direct.randn_like();
            let gd = Tensor::run_backward(&[(&direct * &g).sum(Kind::Double)], &[&x, &w], false, false);
            let gp = Tensor::run_backward(&[(&phased * &g).sum(Kind::Double)], &[&x, &w], false, false);
            for (a, b) in gd.iter().zip(&gp) {
                assert!((a - b).abs().max().double_value(&[]) < 1e-10, "{case}");
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
