// The shim: the libtorch calls tch does not expose, and darts' own CPU kernels. This file holds the small calls:
// autocast with a chosen device type and dtype (tch's autocast only switches CUDA's on, in float16), the CUDA
// caching allocator's statistics (peak bytes allocated/reserved), random masks drawn from a private generator with
// a given seed (tch only offers the global generator), and the last error's message. Beside it, one idea each:
// optim.cpp (the optimiser's steps), mixed_sum.cpp (DARTS's node sum), batch_norm.cpp, depthwise.cpp,
// sep_halves.cpp and pointwise.cpp (kernels; depthwise.h the two convolutions' shared blocks), aten_count.cpp
// (counting operator calls), dist.cpp (c10d process groups) and graphs.cpp (CUDA graphs); shim.h is what they
// share. Every function catches C++ exceptions: nothing unwinds into Rust.
#include "shim.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CachingDeviceAllocator.h>

using namespace darts_shim;

thread_local std::string darts_shim::last_error;

namespace {

bool device_type(int device, c10::DeviceType* out) {
  if (device == 0) {
    *out = c10::DeviceType::CPU;
  } else if (device == 1) {
    *out = c10::DeviceType::CUDA;
  } else {
    last_error = "unknown device type " + std::to_string(device);
    return false;
  }
  return true;
}
}  // namespace

extern "C" {

// The message of the last failed call on this thread ("" if none).
const char* darts_last_error() { return last_error.c_str(); }

// Enters an autocast region on device type `device` (0 CPU, 1 CUDA) computing in `dtype` (0 bfloat16, 1 float16).
// Writes the previous state to `prev_enabled` and `prev_dtype` for darts_autocast_exit. Returns 0, or -1 on error.
int darts_autocast_enter(int device, int dtype, int* prev_enabled, int* prev_dtype) {
  return guarded([&] {
    c10::DeviceType t;
    if (!device_type(device, &t)) return -1;
    const c10::ScalarType want = dtype == 0 ? c10::ScalarType::BFloat16 : c10::ScalarType::Half;
    *prev_enabled = at::autocast::is_autocast_enabled(t) ? 1 : 0;
    *prev_dtype = at::autocast::get_autocast_dtype(t) == c10::ScalarType::Half ? 1 : 0;
    at::autocast::set_autocast_enabled(t, true);
    at::autocast::set_autocast_dtype(t, want);
    at::autocast::increment_nesting();
    return 0;
  });
}

// Leaves the region entered by darts_autocast_enter, restoring the previous state; the cast-weight cache is
// cleared when the outermost region ends (as torch.autocast does).
int darts_autocast_exit(int device, int prev_enabled, int prev_dtype) {
  return guarded([&] {
    c10::DeviceType t;
    if (!device_type(device, &t)) return -1;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(t, prev_enabled != 0);
    at::autocast::set_autocast_dtype(t, prev_dtype == 0 ? c10::ScalarType::BFloat16 : c10::ScalarType::Half);
    return 0;
  });
}

// Whether autocast is on for device type `device` on this thread (1/0), -1 on error.
int darts_autocast_enabled(int device) {
  return guarded([&] {
    c10::DeviceType t;
    if (!device_type(device, &t)) return -1;
    return at::autocast::is_autocast_enabled(t) ? 1 : 0;
  });
}

// The CUDA caching allocator's statistics for GPU `index` (all pools): bytes allocated now and at peak, bytes
// reserved from the driver now and at peak. Returns 0, or -1 (no CUDA allocator, bad index: see darts_last_error).
int darts_cuda_memory(int index, int64_t* allocated, int64_t* peak_allocated, int64_t* reserved,
                      int64_t* peak_reserved) {
  return guarded([&] {
    auto* alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto stats = alloc->getDeviceStats(static_cast<c10::DeviceIndex>(index));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *peak_allocated = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].current;
    *peak_reserved = stats.reserved_bytes[all].peak;
    return 0;
  });
}

// Resets the peaks of darts_cuda_memory to the current values. Returns 0, or -1.
int darts_cuda_reset_peak(int index) {
  return guarded([&] {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(index));
    return 0;
  });
}

// A tensor shaped, laid out and placed like `*like`, of 1s with probability `keep` and 0s otherwise, drawn from a
// fresh generator of `like`'s device seeded with `seed` (the global generators are neither read nor advanced).
// Writes a new tensor (owned by the caller, as tch's own functions return them) to `*out`. Returns 0, or -1.
int darts_bernoulli_mask(const at::Tensor* like, double keep, uint64_t seed, at::Tensor** out) {
  return guarded([&] {
    at::Generator gen = like->is_cuda() ? at::detail::getCUDAHooks().getNewGenerator(like->device().index())
                                        : at::detail::createCPUGenerator(seed);
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_current_seed(seed);
    }
    at::Tensor mask = at::empty_like(*like, like->options().requires_grad(false));
    {
      at::NoGradGuard no_grad;
      mask.bernoulli_(keep, gen);
    }
    *out = new at::Tensor(std::move(mask));
    return 0;
  });
}

}  // extern "C"
