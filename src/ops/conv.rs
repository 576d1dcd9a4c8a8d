//! The convolution every op is made of, initialised as PyTorch's `nn.Conv2d`: darts' own depthwise and 1x1
//! kernels where they apply (CPU, channels-last), libtorch's elsewhere, dilated depthwise convolutions by phases
//! on NCHW input, and the count of multiply-accumulates.

use tch::nn;
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
        self.count_macs(&y);
        y
    }

    /// Adds this convolution's multiply-accumulates for its output `y` to [`count_conv_macs`]'s count, when one
    /// runs (also for an output computed elsewhere, as by [`crate::native::depthwise_convs`]).
    pub(crate) fn count_macs(&self, y: &Tensor) {
        self.count_macs_for(&y.size());
    }

    /// [`Conv::count_macs`] for an output of size `out`.
    pub(crate) fn count_macs_for(&self, out: &[i64]) {
        MACS.with(|m| {
            if let Some(n) = m.get() {
                // Per example: every output element takes c_in/groups * kh * kw multiply-adds.
                let w = self.weight.size();
                m.set(Some(n + (out[1] * out[2] * out[3] * w[1] * w[2] * w[3]) as u64));
            }
        });
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
    pub(crate) fn is_depthwise(&self) -> bool {
        let k = self.weight.size();
        self.bias.is_none() && self.groups > 1 && k[0] == self.groups && k[1] == 1
    }

    /// A 1x1 convolution with stride 1, no padding and no bias (the second convolution of a separable half).
    pub(crate) fn is_plain_pointwise(&self) -> bool {
        let k = self.weight.size();
        k[2] == 1
            && k[3] == 1
            && self.stride == [1, 1]
            && self.padding == [0, 0]
            && self.groups == 1
            && self.bias.is_none()
    }

    /// This convolution as the depthwise part of a [`crate::native::SepHalf`].
    pub(crate) fn depthwise_spec(&self) -> crate::native::DepthwiseSpec<'_> {
        crate::native::DepthwiseSpec {
            weight: &self.weight,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

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
}
