//! The libtorch calls tch does not expose, through the C++ shim in `csrc/` (one file per idea): autocast (mixed
//! precision) with a chosen device type and dtype, the CUDA caching allocator's memory statistics, random
//! masks from a privately seeded generator, multi-tensor optimiser steps, and DARTS's relaxed node sum as one
//! fused autograd node ([`mixed_sum`]).
//!
//! By idea, as the shim's files: [`count_aten_calls`] (operator counts), the optimiser's steps ([`sgd_step`],
//! ...), the kernels ([`mixed_sum`], [`batch_norm`], [`depthwise_conv`], [`pointwise_conv`]); here autocast,
//! the CUDA allocator's statistics and seeded masks.

mod count;
mod kernels;
mod optim;

pub use count::{count_aten_calls, count_aten_calls_by_name, CallsByName};
pub use kernels::{
    batch_norm, batch_norm_ops, batch_norm_relu, depthwise_conv, mixed_sum, mixed_sum_ops, pointwise_conv, sep_halves,
    DepthwiseSpec, SepHalf,
};
pub use optim::{clip_grad_norm, foreach_axpy, foreach_copy, global_norm, sgd_step, snapshot, unrolled_step};

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
}

/// The libtorch `at::Tensor*` behind each of `ts`, for the shim's list arguments (valid while `ts` lives).
pub(crate) fn ptrs<T: std::borrow::Borrow<Tensor>>(ts: &[T]) -> Vec<*const c_void> {
    ts.iter().map(|t| t.borrow().as_ptr().cast::<c_void>()).collect()
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

    /// A convolution inside a bf16 region runs in bfloat16 (close to float32's result, not equal to it), a nested
    /// region leaves autocast on when it ends, and autocast is off again after the outer one.
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
