//! The optimiser's steps without per-tensor operators (`csrc/optim.cpp`): SGD, gradient clipping, and the
//! second-order architect's multi-tensor updates, snapshots and norms.

use super::{last_error, ptrs};
use std::ffi::{c_int, c_void};
use tch::Tensor;

extern "C" {
    // Tensors are tch's `C_tensor` pointers (libtorch's `at::Tensor*`), passed untyped.
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
