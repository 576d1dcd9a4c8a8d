//! darts' own CPU kernels as autograd nodes: the node sum (`csrc/mixed_sum.cpp`), training-mode BatchNorm
//! (`csrc/batch_norm.cpp`), depthwise and 1x1 convolutions (`csrc/depthwise.cpp`, `csrc/pointwise.cpp`) and
//! separable halves (`csrc/sep_halves.cpp`); each answers `None` or falls back to ATen's operators where it does
//! not apply.

use super::{last_error, ptrs};
use std::ffi::{c_int, c_void};
use tch::Tensor;

extern "C" {
    // Tensors are tch's `C_tensor` pointers (libtorch's `at::Tensor*`), passed untyped.
    fn darts_mixed_sum(w: *const c_void, ys: *const *const c_void, n: c_int, out: *mut *mut c_void) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn darts_batch_norm(
        x: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        running_mean: *const c_void,
        running_var: *const c_void,
        momentum: f64,
        eps: f64,
        relu: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn darts_depthwise(
        x: *const c_void,
        w: *const c_void,
        sh: i64,
        sw: i64,
        ph: i64,
        pw: i64,
        dh: i64,
        dw: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn darts_pointwise(x: *const c_void, w: *const c_void, out: *mut *mut c_void) -> c_int;
    fn darts_sep_halves(
        x: *const c_void,
        dws: *const *const c_void,
        pws: *const *const c_void,
        n: c_int,
        spec: *const i64,
        outs: *mut *mut c_void,
    ) -> c_int;
}

/// DARTS's relaxed node, `sum_k w[k] * ys[k]`: the candidate ops' outputs of every edge into one node, each
/// weighted by its architecture weight. `w` is a vector of `ys.len()` weights (differentiable: softmax(alpha)
/// rows, times the edge weights with edge normalisation), every `ys[k]` of one shape.
///
/// On the CPU in float32 or float64, with every `ys[k]` in one dense layout, this is one autograd node of the
/// shim (`darts_mixed_sum`): one pass over the inputs forward, one over the output's gradient backward (each
/// `ys[k]`'s gradient `w[k] * g` written and `<g, ys[k]>` for `w`'s taken in the same sweep), instead of a
/// multiplication and an addition per op forward and three kernels per op backward. Its sums run in blocks in a
/// fixed order, so the result does not depend on the number of threads. Elsewhere (CUDA, other dtypes, mixed
/// layouts) the same sum as ATen operators, [`mixed_sum_ops`].
pub fn mixed_sum(w: &Tensor, ys: &[Tensor]) -> Tensor {
    assert_eq!(w.size(), [ys.len() as i64], "one weight per term");
    let p = ptrs(ys);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `w` and every `ys[k]` are live tensors (tch's C_tensor is libtorch's at::Tensor*); the shim only
    // reads them, writes a newly allocated tensor to `out` when it returns 0, and catches every C++ exception.
    let rc = unsafe { darts_mixed_sum(w.as_ptr().cast(), p.as_ptr(), p.len() as c_int, &mut out) };
    match rc {
        // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over (and frees with delete).
        0 if !out.is_null() => unsafe { Tensor::from_ptr(out.cast()) },
        1 => mixed_sum_ops(w, ys),
        _ => panic!("the fused mixed sum failed: {}", last_error()),
    }
}

/// [`mixed_sum`] as ATen operators, in the same order: `w[0] * ys[0] + w[1] * ys[1] + ...`.
pub fn mixed_sum_ops(w: &Tensor, ys: &[Tensor]) -> Tensor {
    let first = &ys[0] * w.get(0);
    ys.iter().enumerate().skip(1).fold(first, |acc, (k, y)| acc + y * w.get(k as i64))
}

/// Training-mode batch normalisation of the 4-d `x` (batch statistics; `weight` and `bias` both given or both
/// absent), updating `running_mean` and `running_var` in place as PyTorch's `BatchNorm2d` does with `momentum`
/// (the batch's unbiased variance). Same maths as ATen's `batch_norm(train=true)`.
///
/// On the CPU in float32 or float64, NCHW or channels-last dense, this is one autograd node of the shim
/// (`darts_batch_norm`): one sweep for the statistics and one to normalise forward, one for the gradient's two
/// sums and one for the input's gradient backward, over groups of rows at least 64 values wide (ATen's
/// channels-last kernels loop over one row of C values at a time, which dominates at DARTS's widths). Sums run in
/// float64 over fixed blocks in order, so the result does not depend on the number of threads. Elsewhere (CUDA,
/// other dtypes and layouts) ATen's `batch_norm`, [`batch_norm_ops`].
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Tensor {
    batch_norm_with(x, weight, bias, running_mean, running_var, momentum, eps, false)
}

/// `relu(`[`batch_norm`]`(...))` (the BN inside a separable convolution, which the next block's ReLU follows),
/// with the ReLU in the kernel's normalising sweep and its gradient's mask in the backward's two sweeps: one
/// activation and two sweeps fewer than the two operators. Elsewhere [`batch_norm_ops`] and `relu`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Tensor {
    batch_norm_with(x, weight, bias, running_mean, running_var, momentum, eps, true)
}

/// The depthwise convolution of `x` [N, C, H, W] with `w` [C, 1, kh, kw] (no bias) as the shim's own kernel
/// (`darts_depthwise`), one autograd node with gradients for both: on the CPU, float32 or float64, `x`
/// channels-last dense. Forward and input gradient sum every tap in registers for four pixels times a vector of
/// channels at a time, with dilation and stride read directly (no phase split); the weight's gradient is summed per example in
/// float64 and the examples added in order, so the result does not depend on the number of threads; double
/// backward goes through ATen's convolution_backward. `None` where the kernel does not apply (another device,
/// dtype or layout): call ATen's conv2d with `groups = C`.
pub fn depthwise_conv(
    x: &Tensor,
    w: &Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
    dilation: [i64; 2],
) -> Option<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live tensors (tch's C_tensor is libtorch's at::Tensor*), only read; the shim writes a newly
    // allocated tensor to `out` when it returns 0 and catches every C++ exception.
    let rc = unsafe {
        darts_depthwise(
            x.as_ptr().cast(),
            w.as_ptr().cast(),
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            dilation[0],
            dilation[1],
            &mut out,
        )
    };
    match rc {
        // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over (and frees with delete).
        0 if !out.is_null() => Some(unsafe { Tensor::from_ptr(out.cast()) }),
        1 => None,
        _ => panic!("the depthwise convolution failed: {}", last_error()),
    }
}

/// A depthwise convolution: the weight [C, 1, kh, kw], stride, padding and dilation.
#[derive(Clone, Copy, Debug)]
pub struct DepthwiseSpec<'a> {
    /// The kernel, `[C, 1, kh, kw]`.
    pub weight: &'a Tensor,
    /// Stride in each direction.
    pub stride: [i64; 2],
    /// Zero padding in each direction.
    pub padding: [i64; 2],
    /// Dilation in each direction.
    pub dilation: [i64; 2],
}

/// One half of a separable convolution for [`sep_halves`]: a depthwise convolution, then a 1x1 convolution
/// (stride 1, no bias) with `pointwise` (`[C_out, C, 1, 1]`).
#[derive(Clone, Copy, Debug)]
pub struct SepHalf<'a> {
    /// The depthwise convolution.
    pub depthwise: DepthwiseSpec<'a>,
    /// The 1x1 convolution's weight.
    pub pointwise: &'a Tensor,
}

/// `pointwise_k(depthwise_k(x))` for every half `k`, all reading one input `x` (the first ReLU-depthwise-1x1 of
/// every sep and dil conv op on the edges that read one state, or one sep conv's second half) as one autograd
/// node of the shim (`darts_sep_halves`), computed example by example: each example's depthwise output goes
/// through the cache straight into the 1x1 product, so it is never written out nor kept for the backward (which
/// recomputes it per example); `x`'s gradient is summed over the halves in one buffer. The same sums as
/// [`depthwise_conv`] then [`pointwise_conv`] (in another order: the 1x1 weight's gradient per example, not per
/// block of pixels); the result does not depend on the number of threads; double backward through ATen. `None`
/// where the kernel does not apply to one of them (see [`depthwise_conv`] and [`pointwise_conv`]).
pub fn sep_halves(x: &Tensor, halves: &[SepHalf]) -> Option<Vec<Tensor>> {
    if halves.is_empty() {
        return Some(Vec::new());
    }
    let dws: Vec<&Tensor> = halves.iter().map(|h| h.depthwise.weight).collect();
    let pws: Vec<&Tensor> = halves.iter().map(|h| h.pointwise).collect();
    let (dp, pp) = (ptrs(&dws), ptrs(&pws));
    let spec: Vec<i64> = halves
        .iter()
        .map(|h| h.depthwise)
        .flat_map(|d| [d.stride[0], d.stride[1], d.padding[0], d.padding[1], d.dilation[0], d.dilation[1]])
        .collect();
    let mut outs: Vec<*mut c_void> = vec![std::ptr::null_mut(); halves.len()];
    // SAFETY: live tensors (tch's C_tensor is libtorch's at::Tensor*), only read; `spec` holds six values per
    // half; when it returns 0 the shim has written a newly allocated tensor to each of `outs`' n slots, and it
    // catches every C++ exception.
    let rc = unsafe {
        darts_sep_halves(
            x.as_ptr().cast(),
            dp.as_ptr(),
            pp.as_ptr(),
            dp.len() as c_int,
            spec.as_ptr(),
            outs.as_mut_ptr(),
        )
    };
    match rc {
        // SAFETY: each is a tensor the shim allocated with `new`, which tch takes over (and frees with delete).
        0 if outs.iter().all(|o| !o.is_null()) => {
            Some(outs.into_iter().map(|o| unsafe { Tensor::from_ptr(o.cast()) }).collect())
        }
        1 => None,
        _ => panic!("the separable halves failed: {}", last_error()),
    }
}

/// The 1x1 convolution of `x` [N, Cin, H, W] with `w` [Cout, Cin, 1, 1] (stride 1, no padding, no bias) as the
/// shim's own autograd node (`darts_pointwise`): in channels-last memory the product of the [N*H*W, Cin] pixels
/// and the weight's transpose, one BLAS call forward (libtorch's own MKL, on its threads) and two backward,
/// instead of libtorch's convolution entry points. On the CPU, float32 or float64, `x` channels-last dense;
/// double backward through ATen's convolution_backward. `None` where it does not apply: call ATen's conv2d.
pub fn pointwise_conv(x: &Tensor, w: &Tensor) -> Option<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live tensors, only read; the shim writes a newly allocated tensor to `out` when it returns 0 and
    // catches every C++ exception.
    let rc = unsafe { darts_pointwise(x.as_ptr().cast(), w.as_ptr().cast(), &mut out) };
    match rc {
        // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over (and frees with delete).
        0 if !out.is_null() => Some(unsafe { Tensor::from_ptr(out.cast()) }),
        1 => None,
        _ => panic!("the pointwise convolution failed: {}", last_error()),
    }
}

#[allow(clippy::too_many_arguments)]
fn batch_norm_with(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
    relu: bool,
) -> Tensor {
    let ptr = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr().cast::<c_void>());
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: every pointer is a live tensor or null (tch's C_tensor is libtorch's at::Tensor*); the shim reads
    // them, writes only the running statistics' elements (after its checks) and a newly allocated tensor to `out`
    // when it returns 0, and catches every C++ exception.
    let rc = unsafe {
        darts_batch_norm(
            x.as_ptr().cast(),
            ptr(weight),
            ptr(bias),
            running_mean.as_ptr().cast(),
            running_var.as_ptr().cast(),
            momentum,
            eps,
            c_int::from(relu),
            &mut out,
        )
    };
    match rc {
        // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over (and frees with delete).
        0 if !out.is_null() => unsafe { Tensor::from_ptr(out.cast()) },
        1 => {
            let y = batch_norm_ops(x, weight, bias, running_mean, running_var, momentum, eps);
            if relu {
                y.relu()
            } else {
                y
            }
        }
        _ => panic!("the fused batch norm failed: {}", last_error()),
    }
}

/// [`batch_norm`] as ATen's `batch_norm` (training mode).
pub fn batch_norm_ops(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Tensor {
    Tensor::batch_norm(x, weight, bias, Some(running_mean), Some(running_var), true, momentum, eps, true)
}
