//! The libtorch calls tch does not expose, through the C++ shim in `csrc/` (one file per idea): autocast (mixed
//! precision) with a chosen device type and dtype, the CUDA caching allocator's memory statistics, random
//! masks from a privately seeded generator, multi-tensor optimiser steps, and DARTS's relaxed node sum as one
//! fused autograd node ([`mixed_sum`]).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Tensor};

extern "C" {
    fn darts_last_error() -> *const c_char;
    fn darts_autocast_enter(device: c_int, dtype: c_int, prev_enabled: *mut c_int, prev_dtype: *mut c_int) -> c_int;
    fn darts_autocast_exit(device: c_int, prev_enabled: c_int, prev_dtype: c_int) -> c_int;
    fn darts_autocast_enabled(device: c_int) -> c_int;
    fn darts_cuda_memory(
        index: c_int,
        allocated: *mut i64,
        peak_allocated: *mut i64,
        reserved: *mut i64,
        peak_reserved: *mut i64,
    ) -> c_int;
    fn darts_cuda_reset_peak(index: c_int) -> c_int;
    // Tensors are tch's `C_tensor` pointers (libtorch's `at::Tensor*`), passed untyped.
    fn darts_bernoulli_mask(like: *const c_void, keep: f64, seed: u64, out: *mut *mut c_void) -> c_int;
    fn darts_sgd_step(
        params: *const *const c_void,
        grads: *const *const c_void,
        bufs: *const *const c_void,
        n: c_int,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> c_int;
    fn darts_clip_grad_norm(grads: *const *const c_void, n: c_int, max_norm: f64, total: *mut *mut c_void) -> c_int;
    fn darts_foreach_axpy(
        dst: *const *const c_void,
        base: *const *const c_void,
        dir: *const *const c_void,
        n: c_int,
        alpha: f64,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn darts_unrolled_step(
        weights: *const *const c_void,
        theta: *const *const c_void,
        grads: *const *const c_void,
        bufs: *const *const c_void,
        n: c_int,
        eta: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> c_int;
    fn darts_foreach_copy(dst: *const *const c_void, src: *const *const c_void, n: c_int) -> c_int;
    fn darts_snapshot(src: *const *const c_void, n: c_int, out: *mut *mut c_void) -> c_int;
    fn darts_global_norm(ts: *const *const c_void, n: c_int, out: *mut *mut c_void) -> c_int;
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
    fn darts_count_aten_start(by_name: c_int) -> c_int;
    fn darts_count_aten_stop() -> i64;
    fn darts_count_aten_names() -> *const c_char;
}

/// Runs `f` and returns its result with the number of ATen operator calls it made on every thread (libtorch's
/// RecordFunction hooks, the events torch.profiler records: `aten::` operators, nested calls included). Not
/// reentrant: one count at a time per process. With `DARTS_ATEN_NAMES=N` in the environment, the N most called
/// operators and their counts go to standard error (where a step's calls come from).
pub fn count_aten_calls<R>(f: impl FnOnce() -> R) -> Result<(R, u64)> {
    let names = std::env::var("DARTS_ATEN_NAMES").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    let (r, n, rows) = count_aten_calls_by_name(f)?;
    if let Some(top) = names {
        eprintln!("ATen calls: {n}, by operator:");
        for (count, name) in rows.iter().take(top) {
            eprintln!("{count:>8} {name}");
        }
    }
    Ok((r, n))
}

/// Calls per ATen operator name, most called first.
pub type CallsByName = Vec<(u64, String)>;

/// As [`count_aten_calls`], with the calls per operator name, most called first.
pub fn count_aten_calls_by_name<R>(f: impl FnOnce() -> R) -> Result<(R, u64, CallsByName)> {
    // SAFETY: a plain flag; the shim catches C++ exceptions.
    if unsafe { darts_count_aten_start(1) } != 0 {
        bail!("could not count ATen calls: {}", last_error());
    }
    let r = f();
    // SAFETY: no arguments; stops the counter started above.
    let n = unsafe { darts_count_aten_stop() };
    // SAFETY: the shim returns its own NUL-terminated text, valid until the next call, copied at once.
    let text = unsafe { CStr::from_ptr(darts_count_aten_names()) }.to_string_lossy().into_owned();
    let rows = text
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(c, name)| Some((c.parse().ok()?, name.to_string()))))
        .collect();
    Ok((r, n.max(0) as u64, rows))
}

/// The libtorch `at::Tensor*` behind each of `ts`, for the shim's list arguments (valid while `ts` lives).
pub(crate) fn ptrs<T: std::borrow::Borrow<Tensor>>(ts: &[T]) -> Vec<*const c_void> {
    ts.iter().map(|t| t.borrow().as_ptr().cast::<c_void>()).collect()
}

/// SGD's step on `params` in place with their `grads` and momentum `buffers` (the same length, all defined):
/// `buf = momentum * buf + (g + weight_decay * p)`, `p -= lr * buf`: on CUDA through PyTorch's fused SGD kernel
/// (one multi-tensor launch) wherever a parameter and its buffer share a layout; on the CPU one loop of the shim's
/// over each float32/float64 parameter whose gradient and buffer share its layout (no operator call), four
/// operators a tensor for any other (see `darts_sgd_step` in the shim).
pub fn sgd_step(params: &[&Tensor], grads: &[&Tensor], buffers: &[&Tensor], lr: f64, momentum: f64, weight_decay: f64) {
    assert!(params.len() == grads.len() && grads.len() == buffers.len(), "one gradient and buffer per parameter");
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(buffers));
    // SAFETY: live tensors (tch's C_tensor is libtorch's at::Tensor*), updated in place by libtorch's own
    // operators; the shim catches every C++ exception.
    let rc =
        unsafe { darts_sgd_step(p.as_ptr(), g.as_ptr(), b.as_ptr(), p.len() as c_int, lr, momentum, weight_decay) };
    // A libtorch failure here (out of memory) panics as tch's own operators do; the binary reports it.
    assert!(rc == 0, "SGD step failed: {}", last_error());
}

/// Scales `grads` (all defined) in place so that their global L2 norm is at most `max_norm` (times
/// `max_norm / (norm + 1e-6)` where that is below 1, as `torch.nn.utils.clip_grad_norm_`); returns the norm before
/// clipping as a float32 0-d tensor. On the CPU (float32/float64, dense) the shim's own sweeps: the sum of squares
/// in float64 over fixed blocks (the same bits on any number of threads), no operator call; elsewhere
/// multi-tensor operators.
pub fn clip_grad_norm(grads: &[&Tensor], max_norm: f64) -> Tensor {
    let g = ptrs(grads);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live tensors; the shim writes a newly allocated tensor to `out` on success.
    let rc = unsafe { darts_clip_grad_norm(g.as_ptr(), g.len() as c_int, max_norm, &mut out) };
    assert!(rc == 0 && !out.is_null(), "gradient clipping failed: {}", last_error());
    // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over.
    unsafe { Tensor::from_ptr(out.cast()) }
}

/// `dst[i] = base[i] + alpha * dir[i]` in place for every `i` (the lists have one length): on the CPU, for
/// float32/float64 dense tensors of one layout, one loop of the shim's each, no operator call; elsewhere
/// multi-tensor operators.
pub fn foreach_axpy(dst: &[Tensor], base: &[Tensor], dir: &[Tensor], alpha: f64) {
    assert!(dst.len() == base.len() && base.len() == dir.len(), "lists of one length");
    let (d, b, v) = (ptrs(dst), ptrs(base), ptrs(dir));
    // SAFETY: live tensors, written in place by libtorch's operators; the shim catches C++ exceptions.
    let rc = unsafe { darts_foreach_axpy(d.as_ptr(), b.as_ptr(), v.as_ptr(), d.len() as c_int, alpha) };
    assert!(rc == 0, "a multi-tensor update failed: {}", last_error());
}

/// DARTS's unrolled weights in place: `weights[i] = theta[i] - eta * (momentum * bufs[i] + grads[i] +
/// weight_decay * theta[i])` for every `i` (on the CPU, for float32/float64 dense tensors of one layout, one loop
/// of the shim's each; elsewhere multi-tensor operators).
pub fn unrolled_step(
    weights: &[Tensor],
    theta: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    (eta, momentum, weight_decay): (f64, f64, f64),
) {
    let n = weights.len();
    assert!(theta.len() == n && grads.len() == n && bufs.len() == n, "lists of one length");
    let (w, t, g, b) = (ptrs(weights), ptrs(theta), ptrs(grads), ptrs(bufs));
    // SAFETY: as in foreach_axpy.
    let rc = unsafe {
        darts_unrolled_step(w.as_ptr(), t.as_ptr(), g.as_ptr(), b.as_ptr(), n as c_int, eta, momentum, weight_decay)
    };
    assert!(rc == 0, "the unrolled step failed: {}", last_error());
}

/// Copies of `ts` (same shapes, strides and dtype, no autograd history): on the CPU (float32/float64, dense, one
/// dtype) views of one new buffer filled by the shim with memcpy, one allocation for all; elsewhere a `clone`
/// each.
pub fn snapshot(ts: &[Tensor]) -> Vec<Tensor> {
    let p = ptrs(ts);
    let mut out: Vec<*mut c_void> = vec![std::ptr::null_mut(); ts.len()];
    // SAFETY: live tensors, only read; the shim writes `ts.len()` newly allocated tensors to `out` on success and
    // catches every C++ exception.
    let rc = unsafe { darts_snapshot(p.as_ptr(), p.len() as c_int, out.as_mut_ptr()) };
    assert!(rc == 0 && out.iter().all(|t| !t.is_null()), "a snapshot of the weights failed: {}", last_error());
    // SAFETY: each is a tensor the shim allocated with `new`, which tch takes over.
    out.into_iter().map(|t| unsafe { Tensor::from_ptr(t.cast()) }).collect()
}

/// The global L2 norm of `ts`, `sqrt(sum of every value squared)`, as a float64 0-d tensor: on the CPU
/// (float32/float64, dense) summed by the shim in float64 over fixed blocks (the same bits on any number of
/// threads); elsewhere each tensor's norm in float64, then theirs.
pub fn global_norm(ts: &[Tensor]) -> Tensor {
    let p = ptrs(ts);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live tensors, only read; the shim writes a newly allocated tensor to `out` on success.
    let rc = unsafe { darts_global_norm(p.as_ptr(), p.len() as c_int, &mut out) };
    assert!(rc == 0 && !out.is_null(), "a global norm failed: {}", last_error());
    // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over.
    unsafe { Tensor::from_ptr(out.cast()) }
}

/// Copies `src[i]` into `dst[i]` for every `i` (on the CPU, float32/float64 dense tensors of one layout: memcpy;
/// elsewhere multi-tensor operators).
pub fn foreach_copy(dst: &[Tensor], src: &[Tensor]) {
    assert_eq!(dst.len(), src.len(), "lists of one length");
    let (d, s) = (ptrs(dst), ptrs(src));
    // SAFETY: as in foreach_axpy.
    let rc = unsafe { darts_foreach_copy(d.as_ptr(), s.as_ptr(), d.len() as c_int) };
    assert!(rc == 0, "a multi-tensor copy failed: {}", last_error());
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

/// A tensor shaped, laid out and placed like `like`, of 1s with probability `keep` and 0s otherwise (libtorch's
/// `bernoulli_`), drawn from a private generator seeded with `seed`: the same seed gives the same mask on the
/// same device, whatever other threads draw, and libtorch's global generators are left alone.
pub fn bernoulli_mask(like: &Tensor, keep: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&keep) {
        bail!("keep probability {keep} outside [0, 1]");
    }
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `like` is a live tensor (tch's C_tensor is libtorch's at::Tensor*); the shim only reads it, writes a
    // newly allocated tensor to `out` on success and catches every C++ exception.
    if unsafe { darts_bernoulli_mask(like.as_ptr().cast(), keep, seed, &mut out) } != 0 || out.is_null() {
        bail!("could not draw a dropout mask on {:?}: {}", like.device(), last_error());
    }
    // SAFETY: `out` is a tensor the shim allocated with `new`, which tch takes over (and frees with delete).
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated string, valid until the next call.
    unsafe { CStr::from_ptr(darts_last_error()) }.to_string_lossy().into_owned()
}

/// The arithmetic a network's forward pass runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// float32 throughout.
    #[default]
    Fp32,
    /// Mixed precision: libtorch's autocast runs convolutions and matrix products in bfloat16 and keeps
    /// reductions, batch normalisation statistics and the loss in float32; weights, gradients and the optimiser
    /// stay float32 (no loss scaling needed: bfloat16 has float32's exponent range).
    Bf16,
}

impl Precision {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

fn device_code(device: Device) -> c_int {
    if device.is_cuda() {
        1
    } else {
        0
    }
}

/// An autocast region: entered by [`Autocast::enter`], left (previous state restored) when dropped. Autocast
/// state is per thread: the region covers work done on this thread.
#[must_use = "autocast ends when the guard is dropped"]
pub struct Autocast {
    device: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Autocast {
    /// Turns on bfloat16 autocast for `device`'s type (CPU or CUDA) on this thread.
    pub fn enter(device: Device) -> Result<Autocast> {
        let code = device_code(device);
        let (mut prev_enabled, mut prev_dtype) = (0, 0);
        // SAFETY: plain values and two out-pointers to locals; the shim catches every C++ exception.
        if unsafe { darts_autocast_enter(code, 0, &mut prev_enabled, &mut prev_dtype) } != 0 {
            bail!("could not turn on bfloat16 autocast on {device:?}: {}", last_error());
        }
        Ok(Autocast { device: code, prev_enabled, prev_dtype })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; a failure here (it has none in practice) leaves autocast as it was set.
        unsafe { darts_autocast_exit(self.device, self.prev_enabled, self.prev_dtype) };
    }
}

/// Runs `f` in `precision`: inside a bfloat16 autocast region for [`Precision::Bf16`], as is for fp32.
pub fn with_precision<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> Result<T> {
    let _guard = match precision {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(Autocast::enter(device)?),
    };
    Ok(f())
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: a plain value; the shim catches every C++ exception (and then answers -1).
    unsafe { darts_autocast_enabled(device_code(device)) == 1 }
}

/// The CUDA caching allocator's statistics for one GPU, in bytes (all memory pools together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaMemory {
    /// Held by tensors now.
    pub allocated: i64,
    /// Most ever held by tensors at once (since the process started or the last [`reset_cuda_peak`]).
    pub peak_allocated: i64,
    /// Reserved from the driver now (tensors plus the allocator's cache).
    pub reserved: i64,
    /// Most ever reserved.
    pub peak_reserved: i64,
}

/// The allocator statistics of `device` if it is a CUDA device, else `None` (also if CUDA is unusable).
pub fn cuda_memory(device: Device) -> Option<CudaMemory> {
    let Device::Cuda(index) = device else { return None };
    let mut m = CudaMemory { allocated: 0, peak_allocated: 0, reserved: 0, peak_reserved: 0 };
    // SAFETY: four out-pointers to the fields of a local; the shim catches every C++ exception.
    let rc = unsafe {
        darts_cuda_memory(
            index as c_int,
            &mut m.allocated,
            &mut m.peak_allocated,
            &mut m.reserved,
            &mut m.peak_reserved,
        )
    };
    (rc == 0).then_some(m)
}

/// Peak bytes held by tensors on `device` (CUDA) in MiB, `None` on the CPU.
pub fn cuda_peak_mb(device: Device) -> Option<f64> {
    cuda_memory(device).map(|m| m.peak_allocated as f64 / (1024.0 * 1024.0))
}

/// Starts the peaks of [`cuda_memory`] anew from the current values (no-op on the CPU).
pub fn reset_cuda_peak(device: Device) {
    if let Device::Cuda(index) = device {
        // SAFETY: a plain value; the shim catches every C++ exception.
        unsafe { darts_cuda_reset_peak(index as c_int) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// A seeded mask: the same seed gives the same mask, another seed another; about `keep` of it is 1, the
    /// rest 0; it has the input's shape and memory layout; libtorch's global generator is not advanced.
    #[test]
    fn bf16_autocast_runs_convolutions_in_bfloat16_and_restores_the_previous_state() {
        let dev = Device::Cpu;
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, dev));
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, dev));
        assert!(!autocast_enabled(dev));
        let (y16, nested) = with_precision(dev, Precision::Bf16, || {
            let y = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
            // A nested region leaves autocast on when it ends.
            let inner = with_precision(dev, Precision::Bf16, || autocast_enabled(dev)).unwrap();
            (y, inner && autocast_enabled(dev))
        })
        .unwrap();
        assert!(nested);
        assert!(!autocast_enabled(dev), "autocast is off again after the region");
        assert_eq!(y16.kind(), Kind::BFloat16);
        let y32 =
            with_precision(dev, Precision::Fp32, || x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)).unwrap();
        assert_eq!(y32.kind(), Kind::Float);
        // bfloat16 keeps 8 significant bits: the results agree to about 1%.
        let err = (y16.to_kind(Kind::Float) - &y32).abs().max().double_value(&[]);
        let scale = y32.abs().max().double_value(&[]);
        assert!(err < 0.02 * scale, "bf16 error {err} of {scale}");
        assert!(err > 0.0, "bf16 results equal to float32 ones: the convolution did not run in bfloat16");
    }

    #[test]
    fn no_cuda_statistics_on_the_cpu() {
        assert!(cuda_memory(Device::Cpu).is_none());
        assert!(cuda_peak_mb(Device::Cpu).is_none());
        reset_cuda_peak(Device::Cpu);
    }
}
