// The few libtorch calls tch does not expose: autocast with a chosen device type and dtype (tch's autocast only
// switches CUDA's on, in float16), the CUDA caching allocator's statistics (peak bytes allocated/reserved), and
// random masks drawn from a private generator with a given seed (tch only offers the global generator), the
// optimiser's multi-tensor steps, c10d process groups, CUDA graphs, and DARTS's node sum as one custom autograd
// function (tch cannot define one). Every function catches C++ exceptions: nothing unwinds into Rust.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <mutex>

#ifdef DARTS_DIST
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef DARTS_CUDA
#include <c10/core/Event.h>
#include <c10/core/DeviceGuard.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif
#ifdef DARTS_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <cmath>
#include <optional>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <exception>
#include <string>
#include <unordered_map>
#include <vector>

// The fused kernels' inner loops, compiled twice (AVX2 + FMA, and the baseline x86-64 that the rest of the shim
// targets) and picked once at load time by the CPU (GCC's function multiversioning): libtorch does the same
// with its own kernels, and the baseline alone (SSE2) ran these loops at a quarter of the width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DARTS_SIMD __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DARTS_SIMD
#endif

namespace {
thread_local std::string last_error;

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

// Runs `f`, turning a C++ exception into -1 with its message kept for darts_last_error.
template <class F>
int guarded(F f) {
  try {
    return f();
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
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

// ---- The optimiser's step as few kernels: PyTorch's fused SGD and multi-tensor clipping ----

namespace {
std::vector<at::Tensor> tensor_list(const at::Tensor* const* ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}
}  // namespace

}  // extern "C"

namespace {
// One SGD step over n values in place: d = g + wd * p, b = m * b + d, p -= lr * b (PyTorch's order).
template <typename T>
DARTS_SIMD void simd_sgd(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ b, T lr, T m, T wd, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    const T d = g[i] + wd * p[i];
    const T bi = b[i] * m + d;
    b[i] = bi;
    p[i] = p[i] - lr * bi;
  }
}

// o = w * a.
template <typename T>
DARTS_SIMD void simd_scale(T* __restrict__ o, const T* __restrict__ a, T w, int64_t n) {
  for (int64_t i = 0; i < n; i++) o[i] = w * a[i];
}

// o += w * a.
template <typename T>
DARTS_SIMD void simd_axpy(T* __restrict__ o, const T* __restrict__ a, T w, int64_t n) {
  for (int64_t i = 0; i < n; i++) o[i] += w * a[i];
}

// <a, b> in float64, over 16 lanes added in a fixed order (the same bits wherever the loop runs).
template <typename T>
DARTS_SIMD double simd_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  double lane[16] = {0.0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; l++) lane[l] += static_cast<double>(a[i + l]) * static_cast<double>(b[i + l]);
  }
  double tail = 0.0;
  for (; i < n; i++) tail += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  double s = 0.0;
  for (int l = 0; l < 16; l++) s += lane[l];
  return s + tail;
}

// o *= w, in place.
template <typename T>
DARTS_SIMD void simd_scale_in_place(T* o, T w, int64_t n) {
  for (int64_t i = 0; i < n; i++) o[i] *= w;
}

// The sum of squares of n values in float64, over fixed blocks (in parallel) added in order: the same bits on
// any number of threads.
template <typename T>
double blocked_sum_of_squares(const T* a, int64_t n) {
  constexpr int64_t block = 16384;
  const int64_t blocks = (n + block - 1) / block;
  std::vector<double> part(blocks);
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) part[b] = simd_dot<T>(a + b * block, a + b * block, std::min(block, n - b * block));
  });
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

// Whether the shim's own loops take `t` together with `like` (read or written element by element alongside it):
// `t` on the CPU, float32 or float64, dense, and each of `like` on the CPU with its dtype, shape and strides
// (element j of each is the same entry).
bool own_loop_takes(const at::Tensor& t, std::initializer_list<const at::Tensor*> like) {
  if (!t.device().is_cpu() || (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)) return false;
  if (!t.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor* u : like) {
    if (!u->device().is_cpu() || u->scalar_type() != t.scalar_type()) return false;
    if (u->sizes() != t.sizes() || u->strides() != t.strides()) return false;
  }
  return true;
}

// Whether the multi-tensor updates' own loops take the lists: at every index, own_loop_takes of the first list's
// tensor with the others' (one list: each tensor on its own, as the norms and snapshots need).
bool lists_own_kernel(const std::vector<const std::vector<at::Tensor>*>& lists) {
  const auto& first = *lists[0];
  for (size_t i = 0; i < first.size(); i++) {
    for (const auto* l : lists) {
      if (!own_loop_takes(first[i], {&(*l)[i]})) return false;
    }
  }
  return true;
}

// f(begin, end) over the n values of one tensor, in parallel for large ones.
template <typename F>
void sweep(int64_t n, const F& f) {
  at::parallel_for(0, n, 1 << 16, f);
}

}  // namespace

extern "C" {

// SGD with momentum and L2 weight decay on `n` parameters in place: `buf = momentum * buf + (g + wd * p)`,
// `p -= lr * buf`. On CUDA, parameters whose buffer shares their memory layout go through PyTorch's fused
// kernel (`torch.optim.SGD(fused=True)`: one multi-tensor launch for all); on the CPU (where that kernel opens a
// parallel region per tensor and measured 3x slower than separate operators on DARTS's many small tensors) one
// loop of ours over each parameter's memory, no operator call (DARTS's supernet has ~900 weight tensors: that
// was 3,600 operator calls a step); for any other parameter, the three steps as operators with their scalar as
// `alpha` (four calls a tensor). Returns 0, or -1.
int darts_sgd_step(const at::Tensor* const* params, const at::Tensor* const* grads, const at::Tensor* const* bufs,
                   int n, double lr, double momentum, double weight_decay) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> p, g, b;
    for (int i = 0; i < n; i++) {
      const at::Tensor &P = *params[i], &B = *bufs[i];
      at::Tensor G = *grads[i];
      bool fused = P.is_cuda() && momentum != 0.0 && P.is_non_overlapping_and_dense() && B.strides() == P.strides() &&
                   G.scalar_type() == P.scalar_type() && B.scalar_type() == P.scalar_type() &&
                   G.device() == P.device() && B.device() == P.device();
      if (fused && G.strides() != P.strides()) {
        // A gradient laid out unlike its parameter (convolution_backward may return NCHW for a channels-last
        // kernel): one copy into the parameter's layout, so that the kernel's element i is the same entry in all.
        at::Tensor same = at::empty_like(P);
        same.copy_(G);
        G = same;
      }
      if (fused) {
        p.push_back(P);
        g.push_back(G);
        b.push_back(B);
      } else if (own_loop_takes(P, {&G, &B})) {
        AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "darts_sgd_step", [&] {
          scalar_t* p = P.mutable_data_ptr<scalar_t>();
          scalar_t* b = B.mutable_data_ptr<scalar_t>();
          const scalar_t* gp = G.const_data_ptr<scalar_t>();
          const scalar_t l = static_cast<scalar_t>(lr), m = static_cast<scalar_t>(momentum),
                         wd = static_cast<scalar_t>(weight_decay);
          sweep(P.numel(), [&](int64_t i0, int64_t i1) {
            simd_sgd<scalar_t>(p + i0, gp + i0, b + i0, l, m, wd, i1 - i0);
          });
        });
      } else {
        at::Tensor d = at::add(G, P, weight_decay);
        at::Tensor buf = B;
        buf.mul_(momentum).add_(d);
        at::Tensor param = P;
        param.sub_(buf, lr);
      }
    }
    if (!p.empty()) {
      at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, 0.0, false, false, false);
    }
    return 0;
  });
}

// Scales `n` gradients in place so that their global L2 norm is at most `max_norm`, as
// torch.nn.utils.clip_grad_norm_ (`max_norm / (norm + 1e-6)` clamped to 1), with multi-tensor operators: the
// norms in one call, the scaling in one. Writes the norm before clipping (a float32 0-d tensor) to `*total`.
int darts_clip_grad_norm(const at::Tensor* const* grads, int n, double max_norm, at::Tensor** total) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    auto gs = tensor_list(grads, n);
    if (lists_own_kernel({&gs})) {
      // Our own sweeps (no operator call; ~900 tensors in DARTS's supernet made ~4,000 calls a step): each
      // tensor's sum of squares in float64 over fixed blocks added in order (the same bits on any number of
      // threads), the norm sqrt of their sum, then the scaling in place where it is below 1.
      double sumsq = 0.0;
      for (const auto& g : gs) {
        AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "darts_clip_norm", [&] {
          sumsq += blocked_sum_of_squares<scalar_t>(g.const_data_ptr<scalar_t>(), g.numel());
        });
      }
      const double norm = std::sqrt(sumsq);
      const double coef = std::min(1.0, max_norm / (static_cast<double>(static_cast<float>(norm)) + 1e-6));
      if (coef < 1.0) {
        for (auto& g : gs) {
          AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "darts_clip_scale", [&] {
            scalar_t* d = g.mutable_data_ptr<scalar_t>();
            const scalar_t c = static_cast<scalar_t>(coef);
            sweep(g.numel(), [&](int64_t i0, int64_t i1) { simd_scale_in_place<scalar_t>(d + i0, c, i1 - i0); });
          });
        }
      }
      at::Tensor all = at::empty({}, at::dtype(at::kFloat));
      *all.mutable_data_ptr<float>() = static_cast<float>(norm);
      *total = new at::Tensor(std::move(all));
      return 0;
    }
    std::vector<at::Tensor> norms = at::_foreach_norm(gs, 2);
    for (auto& t : norms) {
      if (t.scalar_type() != at::kFloat) t = t.to(at::kFloat);
    }
    at::Tensor all = norms.size() == 1 ? norms[0] : at::stack(norms).norm();
    // As darts computed it one tensor at a time (tch's `max_norm / t` is `(t / max_norm)^-1`): the same bits.
    at::Tensor coef = at::pow((all + 1e-6) / max_norm, -1).clamp_max(1.0);
    at::_foreach_mul_(gs, coef);
    *total = new at::Tensor(std::move(all));
    return 0;
  });
}

// The second-order architect's updates of the weights as multi-tensor operators (torch._foreach_*): a handful of
// operator calls for all weights instead of several per weight.

// `dst[i] = base[i] + alpha * dir[i]` for `n` tensors, in place in `dst` (the finite differences' w +- R v).
// Returns 0, or -1.
int darts_foreach_axpy(const at::Tensor* const* dst, const at::Tensor* const* base, const at::Tensor* const* dir,
                       int n, double alpha) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    auto d = tensor_list(dst, n);
    auto b = tensor_list(base, n), v = tensor_list(dir, n);
    if (lists_own_kernel({&d, &b, &v})) {
      for (int i = 0; i < n; i++) {
        AT_DISPATCH_FLOATING_TYPES(d[i].scalar_type(), "darts_foreach_axpy", [&] {
          scalar_t* dp = d[i].mutable_data_ptr<scalar_t>();
          const scalar_t* bp = b[i].const_data_ptr<scalar_t>();
          const scalar_t* vp = v[i].const_data_ptr<scalar_t>();
          const scalar_t a = static_cast<scalar_t>(alpha);
          sweep(d[i].numel(), [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; j++) dp[j] = bp[j] + a * vp[j];
          });
        });
      }
      return 0;
    }
    at::_foreach_copy_(d, b);
    at::_foreach_add_(d, v, alpha);
    return 0;
  });
}

// The unrolled weights of DARTS's second order, in place in `weights`: `w = theta - eta * (momentum * buf + g +
// weight_decay * theta)` for `n` tensors. Returns 0, or -1.
int darts_unrolled_step(const at::Tensor* const* weights, const at::Tensor* const* theta, const at::Tensor* const* grads,
                        const at::Tensor* const* bufs, int n, double eta, double momentum, double weight_decay) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    auto th = tensor_list(theta, n);
    {
      auto w = tensor_list(weights, n), g = tensor_list(grads, n), b = tensor_list(bufs, n);
      if (lists_own_kernel({&w, &th, &g, &b})) {
        for (int i = 0; i < n; i++) {
          AT_DISPATCH_FLOATING_TYPES(w[i].scalar_type(), "darts_unrolled_step", [&] {
            scalar_t* wp = w[i].mutable_data_ptr<scalar_t>();
            const scalar_t* tp = th[i].const_data_ptr<scalar_t>();
            const scalar_t* gp = g[i].const_data_ptr<scalar_t>();
            const scalar_t* bp = b[i].const_data_ptr<scalar_t>();
            const scalar_t e = static_cast<scalar_t>(eta), m = static_cast<scalar_t>(momentum),
                           wd = static_cast<scalar_t>(weight_decay);
            sweep(w[i].numel(), [&](int64_t j0, int64_t j1) {
              for (int64_t j = j0; j < j1; j++) wp[j] = tp[j] - e * (bp[j] * m + gp[j] + wd * tp[j]);
            });
          });
        }
        return 0;
      }
    }
    std::vector<at::Tensor> step = at::_foreach_mul(tensor_list(bufs, n), momentum);
    at::_foreach_add_(step, tensor_list(grads, n));
    at::_foreach_add_(step, th, weight_decay);
    auto w = tensor_list(weights, n);
    at::_foreach_copy_(w, th);
    at::_foreach_add_(w, step, -eta);
    return 0;
  });
}

// Copies `src[i]` into `dst[i]` for `n` tensors (restoring saved weights or statistics). Returns 0, or -1.
int darts_foreach_copy(const at::Tensor* const* dst, const at::Tensor* const* src, int n) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    auto d = tensor_list(dst, n), s = tensor_list(src, n);
    if (lists_own_kernel({&d, &s})) {
      for (int i = 0; i < n; i++) {
        const int64_t bytes = d[i].numel() * static_cast<int64_t>(d[i].element_size());
        std::memcpy(d[i].mutable_data_ptr(), s[i].const_data_ptr(), bytes);
      }
      return 0;
    }
    at::_foreach_copy_(d, s);
    return 0;
  });
}

// `out[i]` = a copy of `src[i]` (same shape, strides and dtype, no autograd history) for `n` tensors. On the CPU
// (float32/float64 dense, one dtype) the copies are views of one new buffer filled with memcpy: one allocation
// instead of two operator calls a tensor (the second-order architect snapshots ~900 weights three times a
// step); elsewhere each a `clone`. Returns 0, or -1.
int darts_snapshot(const at::Tensor* const* src, int n, at::Tensor** out) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    auto s = tensor_list(src, n);
    bool own = n > 0 && lists_own_kernel({&s});
    for (int i = 0; own && i < n; i++) own = s[i].scalar_type() == s[0].scalar_type();
    if (!own) {
      for (int i = 0; i < n; i++) out[i] = new at::Tensor(s[i].detach().clone());
      return 0;
    }
    // Each copy starts on a 64-byte boundary, as libtorch's own allocations do.
    const int64_t align = 64 / static_cast<int64_t>(s[0].element_size());
    std::vector<int64_t> offset(n);
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
      offset[i] = total;
      total += (s[i].numel() + align - 1) / align * align;
    }
    auto flat = std::make_shared<at::Tensor>(at::empty({std::max<int64_t>(total, 1)}, s[0].options()));
    char* base = static_cast<char*>(flat->mutable_data_ptr());
    const int64_t es = static_cast<int64_t>(s[0].element_size());
    for (int i = 0; i < n; i++) {
      char* d = base + offset[i] * es;
      std::memcpy(d, s[i].const_data_ptr(), s[i].numel() * es);
      // The view holds the buffer alive until its last view is freed.
      out[i] = new at::Tensor(at::from_blob(d, s[i].sizes(), s[i].strides(), [flat](void*) {}, s[0].options()));
    }
    return 0;
  });
}

// `*out` = the global L2 norm of `n` tensors, sqrt(sum of every value squared), as a float64 0-d tensor. On the
// CPU (float32/float64, dense) the sums of squares in float64 over fixed blocks (the same bits on any number of
// threads), no operator call but the result's allocation; elsewhere each tensor's norm in float64, then theirs.
int darts_global_norm(const at::Tensor* const* ts, int n, at::Tensor** out) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    auto t = tensor_list(ts, n);
    at::Tensor r;
    if (n > 0 && lists_own_kernel({&t})) {
      double sumsq = 0.0;
      for (const auto& g : t) {
        AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "darts_global_norm", [&] {
          sumsq += blocked_sum_of_squares<scalar_t>(g.const_data_ptr<scalar_t>(), g.numel());
        });
      }
      r = at::empty({}, at::dtype(at::kDouble));
      *r.mutable_data_ptr<double>() = std::sqrt(sumsq);
    } else {
      std::vector<at::Tensor> norms;
      for (const auto& g : t) norms.push_back(g.norm().to(at::kDouble));
      r = norms.empty() ? at::zeros({}, at::dtype(at::kDouble)) : at::stack(norms).norm();
    }
    *out = new at::Tensor(std::move(r));
    return 0;
  });
}

// ---- A node's sum of weighted op outputs in one pass (the MixedOp's relaxation, fused) ----
//
// DARTS's node is sum_m w[m] * y[m] over every candidate op of every incoming edge. As ATen operators that is a
// multiplication and an addition per op forward, and per op backward a multiplication for y's gradient plus a
// multiplication and a reduction for w's: five passes over a full activation and five parallel regions per op.
// Here it is one pass forward (all y read once, the output written once) and one backward (the output's gradient
// read once, each y's gradient written and each dot product with y taken in the same sweep), each one parallel
// region. Work is split into fixed blocks and w's gradient summed block by block in order, so the result does
// not depend on the number of threads. CPU, float32 or float64, every y of one shape and one dense layout;
// darts_mixed_sum answers 1 for anything else and darts computes the same sum with ATen operators.

}  // extern "C"

namespace {

// Over n values of period P (the constants qa, qb repeat every P values; the accumulators p1, p2 hold P):
// p1[j] += a[i] - qa[j] and p2[j] += (a[i] - qa[j]) * (b[i] - qb[j]) with j = i mod P, in float64. With a mask m
// (not null), a[i] counts only where m[i] > 0 (a ReLU's gradient: m is its output) and is 0 elsewhere.
template <typename T>
DARTS_SIMD void simd_shifted_sums(const T* __restrict__ a, const T* __restrict__ m, const T* __restrict__ b,
                                  const double* __restrict__ qa, const double* __restrict__ qb,
                                  double* __restrict__ p1, double* __restrict__ p2, int64_t period, int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += period) {
    const int64_t len = std::min(period, n - i0);
    const T* __restrict__ xa = a + i0;
    const T* __restrict__ xb = b + i0;
    if (m != nullptr) {
      // The masked values first, in T (a select in one width vectorises; mixed with the conversions it did not).
      const T* __restrict__ xm = m + i0;
      T av[256];
      for (int64_t s0 = 0; s0 < len; s0 += 256) {
        const int64_t sl = std::min<int64_t>(256, len - s0);
        for (int64_t j = 0; j < sl; j++) {
          const T va = xa[s0 + j], vm = xm[s0 + j];
          av[j] = vm > T(0) ? va : T(0);
        }
        for (int64_t j = 0; j < sl; j++) {
          const double da = static_cast<double>(av[j]) - qa[s0 + j];
          const double db = static_cast<double>(xb[s0 + j]) - qb[s0 + j];
          p1[s0 + j] += da;
          p2[s0 + j] += da * db;
        }
      }
    } else {
      for (int64_t j = 0; j < len; j++) {
        const double da = static_cast<double>(xa[j]) - qa[j];
        const double db = static_cast<double>(xb[j]) - qb[j];
        p1[j] += da;
        p2[j] += da * db;
      }
    }
  }
}

// Over n values of period P (p, q, r repeat every P values): o = a * p + r (with relu: max(0, a * p + r)), or
// with b: o = a * p + b * q + r, where with a mask m (not null) a[i] counts only where m[i] > 0. (The mask is
// read only with b, relu only without: the BN's backward and forward.)
template <typename T>
DARTS_SIMD void simd_affine(T* __restrict__ o, const T* __restrict__ a, const T* __restrict__ m,
                            const T* __restrict__ b, const T* __restrict__ p, const T* __restrict__ q,
                            const T* __restrict__ r, bool relu, int64_t period, int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += period) {
    const int64_t len = std::min(period, n - i0);
    T* __restrict__ oo = o + i0;
    const T* __restrict__ xa = a + i0;
    if (m != nullptr && b != nullptr) {
      const T* __restrict__ xm = m + i0;
      const T* __restrict__ xb = b + i0;
      for (int64_t j = 0; j < len; j++) {
        const T va = xa[j], vm = xm[j];
        oo[j] = (vm > T(0) ? va : T(0)) * p[j] + xb[j] * q[j] + r[j];
      }
    } else if (b != nullptr) {
      const T* __restrict__ xb = b + i0;
      for (int64_t j = 0; j < len; j++) oo[j] = xa[j] * p[j] + xb[j] * q[j] + r[j];
    } else if (relu) {
      for (int64_t j = 0; j < len; j++) oo[j] = std::max(T(0), xa[j] * p[j] + r[j]);
    } else {
      for (int64_t j = 0; j < len; j++) oo[j] = xa[j] * p[j] + r[j];
    }
  }
}

constexpr int64_t kMixedBlock = 16384;

bool mixed_sum_fusable(const at::Tensor& w, at::TensorList ys) {
  if (ys.empty() || !w.defined() || w.dim() != 1 || w.numel() != static_cast<int64_t>(ys.size())) return false;
  if (!w.device().is_cpu()) return false;
  auto kind = ys[0].scalar_type();
  if (kind != at::kFloat && kind != at::kDouble) return false;
  if (w.scalar_type() != kind) return false;
  for (const auto& y : ys) {
    if (!y.defined() || !y.device().is_cpu() || y.scalar_type() != kind || !y.is_non_overlapping_and_dense() ||
        y.sizes() != ys[0].sizes() || y.strides() != ys[0].strides())
      return false;
  }
  return true;
}

template <typename T>
void mixed_sum_forward(const T* w, const std::vector<const T*>& y, T* out, int64_t n) {
  const int64_t m = static_cast<int64_t>(y.size());
  const int64_t blocks = (n + kMixedBlock - 1) / kMixedBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int64_t lo = b * kMixedBlock, hi = std::min(n, lo + kMixedBlock);
      T* __restrict__ o = out + lo;
      const int64_t len = hi - lo;
      simd_scale<T>(o, y[0] + lo, w[0], len);
      for (int64_t k = 1; k < m; k++) simd_axpy<T>(o, y[k] + lo, w[k], len);
    }
  });
}

// gy[k] = w[k] * g where gy[k] is not null; dots[k] = <g, y[k]> where want_w.
template <typename T>
void mixed_sum_backward(const T* w, const std::vector<const T*>& y, const T* g, const std::vector<T*>& gy,
                        bool want_w, T* dots, int64_t n) {
  const int64_t m = static_cast<int64_t>(y.size());
  const int64_t blocks = (n + kMixedBlock - 1) / kMixedBlock;
  std::vector<double> partial(want_w ? blocks * m : 0, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int64_t lo = b * kMixedBlock, hi = std::min(n, lo + kMixedBlock);
      const int64_t len = hi - lo;
      const T* __restrict__ gg = g + lo;
      for (int64_t k = 0; k < m; k++) {
        if (gy[k] != nullptr) simd_scale<T>(gy[k] + lo, gg, w[k], len);
        if (want_w) partial[b * m + k] = simd_dot<T>(gg, y[k] + lo, len);
      }
    }
  });
  if (want_w) {
    for (int64_t k = 0; k < m; k++) {
      double s = 0.0;
      for (int64_t b = 0; b < blocks; b++) s += partial[b * m + k];
      dots[k] = static_cast<T>(s);
    }
  }
}

struct MixedSum : public torch::autograd::Function<MixedSum> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& w, at::TensorList ys) {
    at::Tensor wc = w.contiguous();
    at::Tensor out = at::empty_like(ys[0]);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "darts_mixed_sum", [&] {
      std::vector<const scalar_t*> y;
      for (const auto& t : ys) y.push_back(t.const_data_ptr<scalar_t>());
      mixed_sum_forward<scalar_t>(wc.const_data_ptr<scalar_t>(), y, out.mutable_data_ptr<scalar_t>(), out.numel());
    });
    std::vector<at::Tensor> saved{wc};
    saved.insert(saved.end(), ys.begin(), ys.end());
    ctx->save_for_backward(saved);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor w = saved[0];
    std::vector<at::Tensor> ys(saved.begin() + 1, saved.end());
    const size_t m = ys.size();
    torch::autograd::variable_list out(m + 1);
    at::Tensor g = grads[0];
    if (!g.defined()) return out;
    if (at::GradMode::is_enabled()) {
      // A graph of the backward pass is wanted (double backward): the same maths as differentiable operators.
      std::vector<at::Tensor> dots;
      for (size_t k = 0; k < m; k++) {
        if (ctx->needs_input_grad(k + 1)) out[k + 1] = g * w[k];
        if (ctx->needs_input_grad(0)) dots.push_back((g * ys[k]).sum());
      }
      if (ctx->needs_input_grad(0)) out[0] = at::stack(dots);
      return out;
    }
    if (g.strides() != ys[0].strides() || !g.is_non_overlapping_and_dense()) {
      g = at::empty_like(ys[0]).copy_(g);
    }
    const bool want_w = ctx->needs_input_grad(0);
    at::Tensor gw = at::empty({static_cast<int64_t>(m)}, w.options());
    std::vector<at::Tensor> gys(m);
    for (size_t k = 0; k < m; k++) {
      if (ctx->needs_input_grad(k + 1)) gys[k] = at::empty_like(ys[k]);
    }
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "darts_mixed_sum_backward", [&] {
      std::vector<const scalar_t*> y;
      std::vector<scalar_t*> gy;
      for (size_t k = 0; k < m; k++) {
        y.push_back(ys[k].const_data_ptr<scalar_t>());
        gy.push_back(gys[k].defined() ? gys[k].mutable_data_ptr<scalar_t>() : nullptr);
      }
      mixed_sum_backward<scalar_t>(w.const_data_ptr<scalar_t>(), y, g.const_data_ptr<scalar_t>(), gy, want_w,
                                   gw.mutable_data_ptr<scalar_t>(), g.numel());
    });
    if (want_w) out[0] = gw;
    for (size_t k = 0; k < m; k++) out[k + 1] = gys[k];
    return out;
  }
};
}  // namespace

extern "C" {

// `*out` = sum_k w[k] * ys[k] for `n` tensors ys of one shape and layout and a vector w of n weights, as one
// autograd node (gradients for w and every y). Returns 0, 1 where the fused kernel does not apply (not on the
// CPU, not float32/float64, shapes, layouts or dtypes that differ: *out untouched, compute it with operators),
// or -1.
int darts_mixed_sum(const at::Tensor* w, const at::Tensor* const* ys, int n, at::Tensor** out) {
  return guarded([&] {
    auto list = tensor_list(ys, n);
    if (!mixed_sum_fusable(*w, list)) return 1;
    *out = new at::Tensor(MixedSum::apply(*w, at::TensorList(list)));
    return 0;
  });
}

// ---- Training-mode BatchNorm (batch statistics) as one sweep for the statistics and one to normalise ----
//
// ATen's CPU kernels for a channels-last BatchNorm walk the N*H*W rows one by one and call a vectorised loop of
// C elements per row: with DARTS's narrow tensors (C = 8 to 64) that per-row call, not the arithmetic, is the
// cost, and BatchNorm's backward was the largest single kernel of a search step (18% of it). Here each sweep
// runs over groups of rows at least 64 values wide with the per-channel constants repeated across the group, so
// the inner loops are long and vectorise. Statistics and gradient sums accumulate in float64 per fixed block of
// rows (the statistics shifted by each channel's first value) and the blocks are summed in order: the result does
// not depend on the number of threads. CPU, float32 or float64, NCHW or channels-last dense; darts_batch_norm
// answers 1 for anything else and darts uses ATen's batch_norm.

}  // extern "C"

namespace {
constexpr int64_t kBnBlock = 16384;

// A 4-d tensor as BatchNorm sees it: channels-last as N*H*W rows of C values, NCHW as N*C planes of H*W.
struct BnView {
  int64_t n = 0, c = 0, hw = 0;
  bool channels_last = false;
  int64_t rows() const { return n * hw; }
  // Channels-last: rows per group (a group is at least 64 values), the group's width, rows per block.
  int64_t group() const { return c >= 64 ? 1 : (64 + c - 1) / c; }
  int64_t width() const { return group() * c; }
  int64_t block_rows() const { return std::max<int64_t>(1, kBnBlock / width()) * group(); }
  int64_t blocks() const { return (rows() + block_rows() - 1) / block_rows(); }
};

bool bn_view(const at::Tensor& x, BnView* v) {
  if (!x.defined() || !x.device().is_cpu() || x.dim() != 4) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  v->n = x.size(0);
  v->c = x.size(1);
  v->hw = x.size(2) * x.size(3);
  if (v->c < 1 || v->rows() < 2) return false;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    v->channels_last = true;
  } else if (x.is_contiguous()) {
    v->channels_last = false;
  } else {
    return false;
  }
  return true;
}

bool bn_vector_ok(const at::Tensor& t, const at::Tensor& x) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == x.scalar_type() && t.dim() == 1 &&
         t.numel() == x.size(1) && t.is_contiguous();
}

// Per channel c: sum_i (a_i - sa_c) and sum_i (a_i - sa_c) * (b_i - sb_c) over all N*H*W positions, in float64
// (with b = a: the shifted sum and sum of squares). Blocks of rows (channels-last) or planes (NCHW) in a fixed
// order.
template <typename T>
void bn_sums(const T* a, const T* mask, const T* b, const double* sa, const double* sb, const BnView& v, double* s1,
             double* s2) {
  const int64_t C = v.c;
  if (v.channels_last) {
    const int64_t P = v.width(), br = v.block_rows(), blocks = v.blocks(), rows = v.rows();
    std::vector<double> ra(P), rb(P);
    for (int64_t j = 0; j < P; j++) {
      ra[j] = sa[j % C];
      rb[j] = sb[j % C];
    }
    std::vector<double> part(blocks * 2 * C, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> acc1(P), acc2(P);
      for (int64_t blk = b0; blk < b1; blk++) {
        std::fill(acc1.begin(), acc1.end(), 0.0);
        std::fill(acc2.begin(), acc2.end(), 0.0);
        const int64_t r0 = blk * br, r1 = std::min(rows, r0 + br);
        double* __restrict__ p1 = acc1.data();
        double* __restrict__ p2 = acc2.data();
        const double* __restrict__ qa = ra.data();
        const double* __restrict__ qb = rb.data();
        simd_shifted_sums<T>(a + r0 * C, mask != nullptr ? mask + r0 * C : nullptr, b + r0 * C, qa, qb, p1, p2, P,
                             (r1 - r0) * C);
        double* out = part.data() + blk * 2 * C;
        for (int64_t j = 0; j < P; j++) {
          out[j % C] += p1[j];
          out[C + j % C] += p2[j];
        }
      }
    });
    for (int64_t c = 0; c < C; c++) {
      double t1 = 0.0, t2 = 0.0;
      for (int64_t blk = 0; blk < blocks; blk++) {
        t1 += part[blk * 2 * C + c];
        t2 += part[blk * 2 * C + C + c];
      }
      s1[c] = t1;
      s2[c] = t2;
    }
  } else {
    const int64_t planes = v.n * C, hw = v.hw;
    std::vector<double> part(planes * 2, 0.0);
    at::parallel_for(0, planes, std::max<int64_t>(1, kBnBlock / hw), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; q++) {
        const int64_t c = q % C;
        const double ca = sa[c], cb = sb[c];
        // 16 lanes of the plane, added in order.
        double qa[16], qb[16], p1[16] = {0.0}, p2[16] = {0.0};
        std::fill(qa, qa + 16, ca);
        std::fill(qb, qb + 16, cb);
        simd_shifted_sums<T>(a + q * hw, mask != nullptr ? mask + q * hw : nullptr, b + q * hw, qa, qb, p1, p2, 16, hw);
        double t1 = 0.0, t2 = 0.0;
        for (int l = 0; l < 16; l++) {
          t1 += p1[l];
          t2 += p2[l];
        }
        part[2 * q] = t1;
        part[2 * q + 1] = t2;
      }
    });
    for (int64_t c = 0; c < C; c++) {
      double t1 = 0.0, t2 = 0.0;
      for (int64_t i = 0; i < v.n; i++) {
        t1 += part[2 * (i * C + c)];
        t2 += part[2 * (i * C + c) + 1];
      }
      s1[c] = t1;
      s2[c] = t2;
    }
  }
}

// out = a * p[c] + b * q[c] + r[c] per channel, a masked by `mask` where given (see simd_affine); b may be
// null: then out = a * p[c] + r[c], or max(0, that) with relu.
template <typename T>
void bn_affine(const T* a, const T* mask, const T* b, const double* p, const double* q, const double* r, bool relu,
               const BnView& v, T* out) {
  const int64_t C = v.c;
  if (v.channels_last) {
    const int64_t k = v.group(), P = v.width(), rows = v.rows();
    std::vector<T> rp(P), rq(P), rr(P);
    for (int64_t j = 0; j < P; j++) {
      rp[j] = static_cast<T>(p[j % C]);
      rq[j] = static_cast<T>(b != nullptr ? q[j % C] : 0.0);
      rr[j] = static_cast<T>(r[j % C]);
    }
    const int64_t groups = (rows + k - 1) / k;
    at::parallel_for(0, groups, std::max<int64_t>(1, kBnBlock / P), [&](int64_t g0, int64_t g1) {
      const T* __restrict__ pp = rp.data();
      const T* __restrict__ pq = rq.data();
      const T* __restrict__ pr = rr.data();
      const int64_t len = std::min(rows, g1 * k) * C - g0 * P;
      simd_affine<T>(out + g0 * P, a + g0 * P, mask != nullptr ? mask + g0 * P : nullptr,
                     b != nullptr ? b + g0 * P : nullptr, pp, pq, pr, relu, P, len);
    });
  } else {
    const int64_t planes = v.n * C, hw = v.hw;
    at::parallel_for(0, planes, std::max<int64_t>(1, kBnBlock / hw), [&](int64_t q0, int64_t q1) {
      for (int64_t s = q0; s < q1; s++) {
        const int64_t c = s % C;
        T pc[16], qc[16], rc[16];
        std::fill(pc, pc + 16, static_cast<T>(p[c]));
        std::fill(qc, qc + 16, static_cast<T>(b != nullptr ? q[c] : 0.0));
        std::fill(rc, rc + 16, static_cast<T>(r[c]));
        simd_affine<T>(out + s * hw, a + s * hw, mask != nullptr ? mask + s * hw : nullptr,
                       b != nullptr ? b + s * hw : nullptr, pc, qc, rc, relu, 16, hw);
      }
    });
  }
}

// The first value of each channel (the shift that keeps the float64 sums of squares well conditioned).
template <typename T>
std::vector<double> bn_first(const T* x, const BnView& v) {
  std::vector<double> s(v.c);
  for (int64_t c = 0; c < v.c; c++) s[c] = static_cast<double>(v.channels_last ? x[c] : x[c * v.hw]);
  return s;
}

// y = (x - mean) * invstd * w + b from the batch statistics (mean, invstd: float64 [C], computed before and
// passed in without gradients; the backward accounts for their dependence on x).
struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  // weight and bias: both given or both absent (absent optional arguments are not autograd inputs, so the edge
  // indices of needs_input_grad are x 0, weight 1, bias 2 with them and x 0 without).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight_arg, const std::optional<at::Tensor>& bias_arg,
                            const at::Tensor& mean, const at::Tensor& invstd, double eps, bool relu) {
    const at::Tensor weight = weight_arg.value_or(at::Tensor());
    const at::Tensor bias = bias_arg.value_or(at::Tensor());
    BnView v;
    TORCH_CHECK(bn_view(x, &v), "darts_batch_norm: not a fusable input");
    const double* m = mean.const_data_ptr<double>();
    const double* is = invstd.const_data_ptr<double>();
    std::vector<double> scale(v.c), shift(v.c);
    at::Tensor out = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_batch_norm", [&] {
      const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      for (int64_t c = 0; c < v.c; c++) {
        scale[c] = is[c] * (w != nullptr ? static_cast<double>(w[c]) : 1.0);
        shift[c] = (b != nullptr ? static_cast<double>(b[c]) : 0.0) - m[c] * scale[c];
      }
      bn_affine<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, nullptr, scale.data(), nullptr, shift.data(), relu,
                          v, out.mutable_data_ptr<scalar_t>());
    });
    // With the ReLU, its output is the mask of the backward pass (the gradient passes where it is positive).
    ctx->save_for_backward({x, weight, mean, invstd, relu ? out : at::Tensor()});
    ctx->saved_data["eps"] = eps;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor& y = saved[4];  // the output, where the ReLU was fused; else undefined
    torch::autograd::variable_list out(7);
    at::Tensor g = grads[0];
    if (!g.defined()) return out;
    const bool want_x = ctx->needs_input_grad(0);
    const bool want_w = w.defined() && ctx->needs_input_grad(1);
    const bool want_b = w.defined() && ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled()) {
      // A graph of the backward pass is wanted (double backward): BatchNorm's gradient as differentiable
      // operators, the statistics recomputed from x so that their dependence on it is differentiated too.
      const double eps = ctx->saved_data["eps"].toDouble();
      const std::vector<int64_t> dims{0, 2, 3};
      if (y.defined()) g = g * (y > 0);
      at::Tensor xmu = x - x.mean(dims, true);
      at::Tensor inv = ((xmu * xmu).mean(dims, true) + eps).rsqrt();
      at::Tensor xhat = xmu * inv;
      at::Tensor gxhat = (g * xhat).sum(dims, true);
      at::Tensor gsum = g.sum(dims, true);
      if (want_x) {
        const double cnt = static_cast<double>(x.numel() / x.size(1));
        at::Tensor gx = (g - gsum / cnt - xhat * (gxhat / cnt)) * inv;
        out[0] = w.defined() ? gx * w.view({1, -1, 1, 1}) : gx;
      }
      if (want_w) out[1] = gxhat.view({-1});
      if (want_b) out[2] = gsum.view({-1});
      return out;
    }
    if (g.strides() != x.strides() || !g.is_non_overlapping_and_dense()) g = at::empty_like(x).copy_(g);
    BnView v;
    TORCH_CHECK(bn_view(x, &v), "darts_batch_norm: not a fusable input");
    const double* m = saved[2].const_data_ptr<double>();
    const double* is = saved[3].const_data_ptr<double>();
    const double cnt = static_cast<double>(v.rows());
    std::vector<double> zero(v.c, 0.0), sum_g(v.c), sum_gx(v.c);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_batch_norm_backward", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      // sum_g = sum(g), sum_gx = sum(g * (x - mean)).
      const scalar_t* mp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
      bn_sums<scalar_t>(gp, mp, xp, zero.data(), m, v, sum_g.data(), sum_gx.data());
      const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
      if (want_x) {
        // gx = (g - sum_g / n - (x - mean) * invstd^2 * sum_gx / n) * invstd * w = g * p + x * q + r.
        std::vector<double> p(v.c), q(v.c), r(v.c);
        for (int64_t c = 0; c < v.c; c++) {
          const double wc = wp != nullptr ? static_cast<double>(wp[c]) : 1.0;
          p[c] = is[c] * wc;
          q[c] = -p[c] * is[c] * is[c] * sum_gx[c] / cnt;
          r[c] = -p[c] * sum_g[c] / cnt - q[c] * m[c];
        }
        at::Tensor gx = at::empty_like(x);
        bn_affine<scalar_t>(gp, mp, xp, p.data(), q.data(), r.data(), false, v, gx.mutable_data_ptr<scalar_t>());
        out[0] = gx;
      }
      if (want_w) {
        at::Tensor gw = at::empty({v.c}, w.options());
        scalar_t* d = gw.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < v.c; c++) d[c] = static_cast<scalar_t>(sum_gx[c] * is[c]);
        out[1] = gw;
      }
      if (want_b) {
        at::Tensor gb = at::empty({v.c}, w.options());
        scalar_t* d = gb.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < v.c; c++) d[c] = static_cast<scalar_t>(sum_g[c]);
        out[2] = gb;
      }
    });
    return out;
  }
};
}  // namespace

extern "C" {

// `*out` = the training-mode BatchNorm of the 4-d `x` over its batch statistics, `weight` and `bias` (both null
// for an affine-free BN), as one autograd node (gradients for x, weight and bias); `running_mean` and
// `running_var` are updated in place as PyTorch's BatchNorm2d does (`momentum` times the batch's mean and
// unbiased variance plus `1 - momentum` times the old value). With `relu`, `*out` is ReLU of that, in the same
// sweep (and the backward masks the gradient by it in its own sweeps). Returns 0, 1 where the fused kernel does not
// apply (not on the CPU, not float32/float64, not NCHW or channels-last dense, a single value per channel,
// parameters of another dtype: nothing touched, use ATen's batch_norm), or -1.
int darts_batch_norm(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                     const at::Tensor* running_mean, const at::Tensor* running_var, double momentum, double eps,
                     int relu, at::Tensor** out) {
  return guarded([&] {
    BnView v;
    if (!bn_view(*x, &v)) return 1;
    if ((weight == nullptr) != (bias == nullptr)) return 1;
    if (weight != nullptr && (!bn_vector_ok(*weight, *x) || !bn_vector_ok(*bias, *x))) return 1;
    if (!bn_vector_ok(*running_mean, *x) || !bn_vector_ok(*running_var, *x)) return 1;
    at::Tensor mean = at::empty({v.c}, x->options().dtype(at::kDouble));
    at::Tensor invstd = at::empty({v.c}, x->options().dtype(at::kDouble));
    const double cnt = static_cast<double>(v.rows());
    AT_DISPATCH_FLOATING_TYPES(x->scalar_type(), "darts_batch_norm_stats", [&] {
      const scalar_t* xp = x->const_data_ptr<scalar_t>();
      std::vector<double> first = bn_first<scalar_t>(xp, v), s1(v.c), s2(v.c);
      bn_sums<scalar_t>(xp, nullptr, xp, first.data(), first.data(), v, s1.data(), s2.data());
      double* m = mean.mutable_data_ptr<double>();
      double* is = invstd.mutable_data_ptr<double>();
      scalar_t* rm = running_mean->mutable_data_ptr<scalar_t>();
      scalar_t* rv = running_var->mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < v.c; c++) {
        const double d = s1[c] / cnt;
        const double m2 = std::max(0.0, s2[c] - s1[c] * d);  // sum of squared deviations from the mean
        m[c] = first[c] + d;
        is[c] = 1.0 / std::sqrt(m2 / cnt + eps);
        rm[c] = static_cast<scalar_t>(momentum * m[c] + (1.0 - momentum) * static_cast<double>(rm[c]));
        rv[c] = static_cast<scalar_t>(momentum * (m2 / (cnt - 1.0)) + (1.0 - momentum) * static_cast<double>(rv[c]));
      }
    });
    std::optional<at::Tensor> w, b;
    if (weight != nullptr) {
      w = *weight;
      b = *bias;
    }
    *out = new at::Tensor(BatchNormTrain::apply(*x, w, b, mean, invstd, eps, relu != 0));
    return 0;
  });
}

}  // extern "C"

// ---- Depthwise convolution (the sep and dil convs' per-channel k x k kernels) on channels-last tensors ----
//
// libtorch reaches a depthwise convolution through five operator entries each way (conv2d, convolution,
// _convolution, mkldnn_convolution, their allocations and a weight reorder in the backward), and a dilated one
// has no fast CPU backward at all (darts split it into four phase images, a dozen views and copies more). At
// DARTS's widths (8 to 144 channels) those entries and reorders, not the multiply-adds, are the cost. Here one
// autograd node: forward and (stride 1) input gradient by output rows, four pixels times a vector of channels at
// a time with the sums in registers across every tap (dilation and stride read directly); the weight gradient
// with each tap's sum in a register, per example in float64 and the examples added in order, so the result
// does not depend on the number of threads. CPU, float32 or float64, channels-last dense input, weight [C, 1, kh, kw], no bias; darts_depthwise
// answers 1 for anything else and darts calls ATen's conv2d.

namespace {
struct DwGeom {
  int64_t n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

// The output columns ow that tap column kx reads (input column ow * s + kx * d - p inside [0, w)): [lo, hi).
inline void dw_cols(int64_t out_w, int64_t in_w, int64_t s, int64_t off, int64_t* lo, int64_t* hi) {
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  int64_t b = in_w - 1 - off < 0 ? 0 : (in_w - 1 - off) / s + 1;
  *lo = std::min(a, out_w);
  *hi = std::min(out_w, b);
}

// For i < n: o[i * os + c] += w[c] * a[i * as + c], c < C.
template <typename T>
DARTS_SIMD void simd_tap(T* __restrict__ o, int64_t os, const T* __restrict__ a, int64_t as,
                         const T* __restrict__ w, int64_t C, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    T* oi = o + i * os;
    const T* ai = a + i * as;
    for (int64_t c = 0; c < C; c++) oi[c] += w[c] * ai[c];
  }
}

// The output columns [lo, hi) where every one of the nt taps (column offsets off[t]) reads inside [0, in_w);
// lo <= hi <= out_w.
inline void dw_interior(int64_t out_w, int64_t in_w, int64_t s, const int64_t* off, int64_t nt, int64_t* lo,
                        int64_t* hi) {
  *lo = 0;
  *hi = out_w;
  for (int64_t t = 0; t < nt; t++) {
    int64_t a, b;
    dw_cols(out_w, in_w, s, off[t], &a, &b);
    *lo = std::max(*lo, a);
    *hi = std::min(*hi, b);
  }
  if (*hi < *lo) *hi = *lo;  // no column where every tap is inside (lo <= out_w: dw_cols clamps it)
}

// Vectors of L lanes of T (GCC's vector extension: registers in either clone, AVX in the x86-64-v3 one) for the
// depthwise kernels, loaded and stored unaligned; L = 1 is T itself (the channels past the last whole vector).
template <typename T, int L>
struct Lanes {
  typedef T type __attribute__((vector_size(L * sizeof(T))));
};
template <typename T>
struct Lanes<T, 1> {
  typedef T type;
};
template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Channels [cb, cb + L) of one output row of a depthwise convolution: o[ow * C + c] = sum over the taps t < nt
// of w[t][c] * rows[t][(ow * s + off[t]) * C + c], the taps' input columns inside [0, in_w) for every ow in
// [lo, hi) (others: dw_row_edge). Four pixels at a time, their sums in registers across all taps.
template <typename T, int L>
inline void dw_row_lanes(T* o, const T* const* rows, const int64_t* off, const T* const* w, int64_t nt, int64_t C,
                         int64_t s, int64_t lo, int64_t hi, int64_t cb) {
  typedef typename Lanes<T, L>::type V;
  int64_t ow = lo;
  for (; ow + 4 <= hi; ow += 4) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t t = 0; t < nt; t++) {
      const V wv = vload<V>(w[t] + cb);
      const T* xp = rows[t] + (ow * s + off[t]) * C + cb;
      a0 += wv * vload<V>(xp);
      a1 += wv * vload<V>(xp + s * C);
      a2 += wv * vload<V>(xp + 2 * s * C);
      a3 += wv * vload<V>(xp + 3 * s * C);
    }
    vstore(o + ow * C + cb, a0);
    vstore(o + (ow + 1) * C + cb, a1);
    vstore(o + (ow + 2) * C + cb, a2);
    vstore(o + (ow + 3) * C + cb, a3);
  }
  for (; ow < hi; ow++) {
    V a = {};
    for (int64_t t = 0; t < nt; t++) a += vload<V>(w[t] + cb) * vload<V>(rows[t] + (ow * s + off[t]) * C + cb);
    vstore(o + ow * C + cb, a);
  }
}

// One output row of a depthwise convolution (see dw_row_lanes), every column: the interior by vectors of
// channels, the columns where some tap leaves the image one at a time with the check.
template <typename T>
DARTS_SIMD void dw_row(T* __restrict__ o, const T* const* rows, const int64_t* off, const T* const* w, int64_t nt,
                       int64_t C, int64_t out_w, int64_t s, int64_t in_w) {
  constexpr int VL = 32 / sizeof(T), VH = 16 / sizeof(T);
  int64_t lo, hi;
  dw_interior(out_w, in_w, s, off, nt, &lo, &hi);
  auto checked = [&](int64_t ow) {
    T* op = o + ow * C;
    for (int64_t c = 0; c < C; c++) op[c] = T(0);
    for (int64_t t = 0; t < nt; t++) {
      const int64_t ix = ow * s + off[t];
      if (ix < 0 || ix >= in_w) continue;
      const T* xp = rows[t] + ix * C;
      const T* wp = w[t];
      for (int64_t c = 0; c < C; c++) op[c] += wp[c] * xp[c];
    }
  };
  for (int64_t ow = 0; ow < lo; ow++) checked(ow);
  int64_t cb = 0;
  for (; cb + VL <= C; cb += VL) dw_row_lanes<T, VL>(o, rows, off, w, nt, C, s, lo, hi, cb);
  for (; cb + VH <= C; cb += VH) dw_row_lanes<T, VH>(o, rows, off, w, nt, C, s, lo, hi, cb);
  for (; cb < C; cb++) dw_row_lanes<T, 1>(o, rows, off, w, nt, C, s, lo, hi, cb);
  for (int64_t ow = hi; ow < out_w; ow++) checked(ow);
}

// Channels [cb, cb + L) of the weight gradient's sums over one output row, taps [t0, t1) (at most 12: their
// sums stay in registers): acc[t][c] += sum over ow in [lo, hi) of g[ow * C + c] * rows[t][(ow * s + off[t]) * C +
// c], each g vector loaded once for all the taps.
template <typename T, int L>
inline void dw_dot_lanes(T* acc, const T* g, const T* const* rows, const int64_t* off, const int64_t* tap,
                         int64_t t0, int64_t t1, int64_t C, int64_t s, int64_t lo, int64_t hi, int64_t cb) {
  typedef typename Lanes<T, L>::type V;
  V a[12];
  for (int64_t t = t0; t < t1; t++) a[t - t0] = V{};
  for (int64_t ow = lo; ow < hi; ow++) {
    const V gv = vload<V>(g + ow * C + cb);
    for (int64_t t = t0; t < t1; t++) a[t - t0] += gv * vload<V>(rows[t] + (ow * s + off[t]) * C + cb);
  }
  for (int64_t t = t0; t < t1; t++) {
    T* at = acc + tap[t] * C + cb;
    vstore(at, vload<V>(at) + a[t - t0]);
  }
}

// The weight gradient's sums over one output row, every tap of the row (tap[t]: its index in acc's [taps][C]).
template <typename T>
DARTS_SIMD void dw_dot_row(T* __restrict__ acc, const T* g, const T* const* rows, const int64_t* off,
                           const int64_t* tap, int64_t nt, int64_t C, int64_t out_w, int64_t s, int64_t in_w) {
  constexpr int VL = 32 / sizeof(T), VH = 16 / sizeof(T);
  int64_t lo, hi;
  dw_interior(out_w, in_w, s, off, nt, &lo, &hi);
  auto checked = [&](int64_t ow) {
    const T* gp = g + ow * C;
    for (int64_t t = 0; t < nt; t++) {
      const int64_t ix = ow * s + off[t];
      if (ix < 0 || ix >= in_w) continue;
      const T* xp = rows[t] + ix * C;
      T* at = acc + tap[t] * C;
      for (int64_t c = 0; c < C; c++) at[c] += gp[c] * xp[c];
    }
  };
  for (int64_t ow = 0; ow < lo; ow++) checked(ow);
  for (int64_t ow = hi; ow < out_w; ow++) checked(ow);
  for (int64_t t0 = 0; t0 < nt; t0 += 12) {
    const int64_t t1 = std::min(nt, t0 + 12);
    int64_t cb = 0;
    for (; cb + VL <= C; cb += VL) dw_dot_lanes<T, VL>(acc, g, rows, off, tap, t0, t1, C, s, lo, hi, cb);
    for (; cb + VH <= C; cb += VH) dw_dot_lanes<T, VH>(acc, g, rows, off, tap, t0, t1, C, s, lo, hi, cb);
    for (; cb < C; cb++) dw_dot_lanes<T, 1>(acc, g, rows, off, tap, t0, t1, C, s, lo, hi, cb);
  }
}

bool dw_geometry(const at::Tensor& x, const at::Tensor& w, const int64_t* s, const int64_t* p, const int64_t* d,
                 DwGeom* g) {
  if (!x.device().is_cpu() || x.dim() != 4 || w.dim() != 4 || !w.device().is_cpu()) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (w.scalar_type() != x.scalar_type()) return false;
  const int64_t c = x.size(1);
  if (c < 2 || w.size(0) != c || w.size(1) != 1) return false;
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.numel() == 0) return false;
  for (int i = 0; i < 2; i++) {
    if (s[i] < 1 || p[i] < 0 || d[i] < 1) return false;
  }
  *g = DwGeom{x.size(0), c, x.size(2), x.size(3), 0, 0, w.size(2), w.size(3), s[0], s[1], p[0], p[1], d[0], d[1]};
  g->oh = (g->h + 2 * g->ph - g->dh * (g->kh - 1) - 1) / g->sh + 1;
  g->ow = (g->w + 2 * g->pw - g->dw * (g->kw - 1) - 1) / g->sw + 1;
  return g->oh > 0 && g->ow > 0 && g->kh > 0 && g->kw > 0;
}

// The weight as [kh * kw, C]: each tap's C weights contiguous.
template <typename T>
std::vector<T> dw_taps(const at::Tensor& w, const DwGeom& g) {
  std::vector<T> t(g.kh * g.kw * g.c);
  const T* wp = w.const_data_ptr<T>();
  const auto st = w.strides();
  for (int64_t c = 0; c < g.c; c++)
    for (int64_t y = 0; y < g.kh; y++)
      for (int64_t x = 0; x < g.kw; x++) t[(y * g.kw + x) * g.c + c] = wp[c * st[0] + y * st[2] + x * st[3]];
  return t;
}

template <typename T>
void dw_forward(const T* x, const T* taps, const DwGeom& g, T* out) {
  const int64_t rows_n = g.n * g.oh;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.ow * g.c * g.kh * g.kw));
  at::parallel_for(0, rows_n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<const T*> rows(g.kh * g.kw), w(g.kh * g.kw);
    std::vector<int64_t> off(g.kh * g.kw);
    for (int64_t r = r0; r < r1; r++) {
      const int64_t n = r / g.oh, oy = r % g.oh;
      int64_t nt = 0;
      for (int64_t ky = 0; ky < g.kh; ky++) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; kx++, nt++) {
          rows[nt] = x + (n * g.h + iy) * g.w * g.c;
          off[nt] = kx * g.dw - g.pw;
          w[nt] = taps + (ky * g.kw + kx) * g.c;
        }
      }
      dw_row<T>(out + r * g.ow * g.c, rows.data(), off.data(), w.data(), nt, g.c, g.ow, g.sw, g.w);
    }
  });
}

// gx (optional) and the per-example weight gradient partials (optional, [n][kh * kw * C] float64), one example
// per task.
template <typename T>
void dw_backward(const T* x, const T* taps, const T* gout, const DwGeom& g, T* gx, double* gw_part) {
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> acc(g.kh * g.kw * g.c);  // one example's weight-gradient sums, per tap
    std::vector<const T*> rows(g.kh * g.kw), w(g.kh * g.kw);
    std::vector<int64_t> off(g.kh * g.kw), tap(g.kh * g.kw);
    for (int64_t n = n0; n < n1; n++) {
      const T* gn = gout + n * g.oh * g.ow * g.c;
      if (gx != nullptr && g.sh == 1 && g.sw == 1) {
        // Stride 1: gx[iy, ix] = sum over taps of w[ky, kx] * g[iy + ph - ky * dh, ix + pw - kx * dw], the
        // forward's row kernel over the output's gradient.
        for (int64_t iy = 0; iy < g.h; iy++) {
          int64_t nt = 0;
          for (int64_t ky = 0; ky < g.kh; ky++) {
            const int64_t oy = iy + g.ph - ky * g.dh;
            if (oy < 0 || oy >= g.oh) continue;
            for (int64_t kx = 0; kx < g.kw; kx++, nt++) {
              rows[nt] = gn + oy * g.ow * g.c;
              off[nt] = g.pw - kx * g.dw;
              w[nt] = taps + (ky * g.kw + kx) * g.c;
            }
          }
          dw_row<T>(gx + (n * g.h + iy) * g.w * g.c, rows.data(), off.data(), w.data(), nt, g.c, g.w, 1, g.ow);
        }
      } else if (gx != nullptr) {
        for (int64_t iy = 0; iy < g.h; iy++) {
          T* o = gx + (n * g.h + iy) * g.w * g.c;
          std::fill(o, o + g.w * g.c, T(0));
          for (int64_t ky = 0; ky < g.kh; ky++) {
            const int64_t num = iy + g.ph - ky * g.dh;
            if (num < 0 || num % g.sh != 0 || num / g.sh >= g.oh) continue;
            const T* gr = gn + (num / g.sh) * g.ow * g.c;
            for (int64_t kx = 0; kx < g.kw; kx++) {
              const int64_t off = kx * g.dw - g.pw;
              int64_t lo, hi;
              dw_cols(g.ow, g.w, g.sw, off, &lo, &hi);
              if (lo >= hi) continue;
              // Output column ow sends its gradient to input column ow * s + off.
              simd_tap<T>(o + (lo * g.sw + off) * g.c, g.sw * g.c, gr + lo * g.c, g.c, taps + (ky * g.kw + kx) * g.c,
                          g.c, hi - lo);
            }
          }
        }
      }
      if (gw_part != nullptr) {
        double* part = gw_part + n * g.kh * g.kw * g.c;
        std::fill(part, part + g.kh * g.kw * g.c, 0.0);
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t oy = 0; oy < g.oh; oy++) {
          int64_t nt = 0;
          for (int64_t ky = 0; ky < g.kh; ky++) {
            const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
            if (iy < 0 || iy >= g.h) continue;
            for (int64_t kx = 0; kx < g.kw; kx++, nt++) {
              rows[nt] = x + (n * g.h + iy) * g.w * g.c;
              off[nt] = kx * g.dw - g.pw;
              tap[nt] = ky * g.kw + kx;
            }
          }
          dw_dot_row<T>(acc.data(), gn + oy * g.ow * g.c, rows.data(), off.data(), tap.data(), nt, g.c, g.ow, g.sw,
                        g.w);
        }
        for (int64_t t = 0; t < g.kh * g.kw; t++) {
          for (int64_t c = 0; c < g.c; c++) part[t * g.c + c] = static_cast<double>(acc[t * g.c + c]);
        }
      }
    }
  });
}

struct DepthwiseConv : public torch::autograd::Function<DepthwiseConv> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
    DwGeom g;
    TORCH_CHECK(dw_geometry(x, w, stride.data(), padding.data(), dilation.data(), &g),
                "darts_depthwise: not a fusable input");
    at::Tensor out = at::empty({g.n, g.c, g.oh, g.ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_depthwise", [&] {
      std::vector<scalar_t> taps = dw_taps<scalar_t>(w, g);
      dw_forward<scalar_t>(x.const_data_ptr<scalar_t>(), taps.data(), g, out.mutable_data_ptr<scalar_t>());
    });
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const std::vector<int64_t> s = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> p = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> d = ctx->saved_data["dilation"].toIntVector();
    torch::autograd::variable_list out(5);
    at::Tensor g = grads[0];
    if (!g.defined()) return out;
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    if (!want_x && !want_w) return out;
    if (at::GradMode::is_enabled()) {
      // A graph of the backward pass is wanted (double backward): ATen's differentiable convolution_backward.
      auto r = at::convolution_backward(g, x, w, std::nullopt, s, p, d, false, {0, 0}, x.size(1),
                                        {want_x, want_w, false});
      out[0] = std::get<0>(r);
      out[1] = std::get<1>(r);
      return out;
    }
    DwGeom geo;
    TORCH_CHECK(dw_geometry(x, w, s.data(), p.data(), d.data(), &geo), "darts_depthwise: not a fusable input");
    if (!g.is_contiguous(at::MemoryFormat::ChannelsLast)) g = g.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor gx = want_x ? at::empty_like(x) : at::Tensor();
    std::vector<double> part(want_w ? geo.n * geo.kh * geo.kw * geo.c : 0);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_depthwise_backward", [&] {
      std::vector<scalar_t> taps = dw_taps<scalar_t>(w, geo);
      dw_backward<scalar_t>(x.const_data_ptr<scalar_t>(), taps.data(), g.const_data_ptr<scalar_t>(), geo,
                            want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr, want_w ? part.data() : nullptr);
      if (want_w) {
        at::Tensor gw = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
        scalar_t* gp = gw.mutable_data_ptr<scalar_t>();
        const int64_t taps_n = geo.kh * geo.kw;
        for (int64_t t = 0; t < taps_n; t++) {
          for (int64_t c = 0; c < geo.c; c++) {
            double sum = 0.0;
            for (int64_t n = 0; n < geo.n; n++) sum += part[(n * taps_n + t) * geo.c + c];
            gp[c * taps_n + t] = static_cast<scalar_t>(sum);
          }
        }
        out[1] = gw;
      }
    });
    out[0] = gx;
    return out;
  }
};
}  // namespace

extern "C" {

// `*out` = the depthwise convolution of the channels-last `x` [N, C, H, W] with `w` [C, 1, kh, kw] (no bias),
// stride (sh, sw), zero padding (ph, pw) and dilation (dh, dw), channels-last, as one autograd node (gradients for
// x and w). Returns 0, 1 where the kernel does not apply (not on the CPU, not float32/float64, not channels-last
// dense, not depthwise, an empty output: nothing touched, use ATen's conv2d with groups = C), or -1.
int darts_depthwise(const at::Tensor* x, const at::Tensor* w, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    int64_t dh, int64_t dw, at::Tensor** out) {
  return guarded([&] {
    const int64_t s[2] = {sh, sw}, p[2] = {ph, pw}, d[2] = {dh, dw};
    DwGeom g;
    if (!dw_geometry(*x, *w, s, p, d, &g)) return 1;
    *out = new at::Tensor(DepthwiseConv::apply(*x, *w, at::IntArrayRef(s, 2), at::IntArrayRef(p, 2),
                                               at::IntArrayRef(d, 2)));
    return 0;
  });
}

}  // extern "C"

// ---- Pointwise (1x1) convolution on channels-last tensors as one matrix product each way ----
//
// In channels-last memory a 1x1 convolution is the product of the [N*H*W, Cin] pixels and the [Cout, Cin]
// weight's transpose. libtorch reaches it through the same five operator entries as any convolution (and
// reorders the weight's gradient), which at DARTS's sizes costs about what the product does. Here one autograd
// node: forward one BLAS sgemm/dgemm per block of pixels (the MKL that libtorch itself calls, single-threaded
// inside libtorch's parallel region), backward two (the input's gradient G W, the weight's G^T X). CPU, float32
// or float64, channels-last dense input, weight [Cout, Cin, 1, 1] dense, stride 1, no padding, no bias;
// darts_pointwise answers 1 for anything else.

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's thread count for calls from this thread (0: the global setting); returns the previous one.
int MKL_Set_Num_Threads_Local(int nt);  // the C entry (the lower-case names are Fortran's, by pointer)
}

namespace {
// MKL single-threaded on this thread while alive (the blocks' products run inside libtorch's parallel region:
// the same sequential code whatever the number of threads, so the same bits).
struct SequentialBlas {
  int prev = MKL_Set_Num_Threads_Local(1);
  ~SequentialBlas() { MKL_Set_Num_Threads_Local(prev); }
};

// Column-major C (m x n, ldc) = op(A) op(B), BLAS's convention.
void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
               int64_t ldb, float* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ia = lda, ib = ldb, ic = ldc;
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &zero, c, &ic);
}
void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
               int64_t ldb, double* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ia = lda, ib = ldb, ic = ldc;
  const double one = 1.0, zero = 0.0;
  dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &zero, c, &ic);
}

// Pixels per block of the pointwise products: each block one single-threaded BLAS call inside libtorch's
// parallel region (BLAS's own threading opened a region per call and kept per-thread packing buffers of the
// whole [N*H*W, C] operands, +70 to +150 MiB of peak memory on two threads), and the weight's gradient summed
// over the blocks in order, so the result does not depend on the number of threads.
constexpr int64_t kPwBlock = 2048;

// Y (m x cout, row-major) = X (m x cin, row-major) W^T (W: cout x cin, row-major), by blocks of pixels.
template <typename T>
void pw_forward(const T* x, const T* w, int64_t m, int64_t cin, int64_t cout, T* y) {
  const int64_t blocks = (m + kPwBlock - 1) / kPwBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    SequentialBlas sequential;
    for (int64_t b = b0; b < b1; b++) {
      const int64_t r0 = b * kPwBlock, rows = std::min(kPwBlock, m - r0);
      // Column-major: Y^T (cout x rows) = W (cout x cin, stored as its transpose) X^T (cin x rows).
      blas_gemm('T', 'N', cout, rows, cin, w, cin, x + r0 * cin, cin, y + r0 * cout, cout);
    }
  });
}

// gX (m x cin) = G (m x cout) W (cout x cin), and gW (cout x cin) = G^T X summed over the blocks in order
// (either may be null: not wanted).
template <typename T>
void pw_backward(const T* x, const T* w, const T* g, int64_t m, int64_t cin, int64_t cout, T* gx, T* gw) {
  const int64_t blocks = (m + kPwBlock - 1) / kPwBlock;
  std::vector<T> part_v(gw != nullptr ? blocks * cin * cout : 0);
  T* part = part_v.data();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    SequentialBlas sequential;
    for (int64_t b = b0; b < b1; b++) {
      const int64_t r0 = b * kPwBlock, rows = std::min(kPwBlock, m - r0);
      // gX^T (cin x rows) = W^T (cin x cout, as stored) G^T (cout x rows).
      if (gx != nullptr) blas_gemm('N', 'N', cin, rows, cout, w, cin, g + r0 * cout, cout, gx + r0 * cin, cin);
      // gW^T (cin x cout) = X^T (cin x rows) G (rows x cout, stored as its transpose).
      if (gw != nullptr) {
        blas_gemm('N', 'T', cin, cout, rows, x + r0 * cin, cin, g + r0 * cout, cout, part + b * cin * cout, cin);
      }
    }
  });
  if (gw != nullptr) {
    const int64_t n = cin * cout;
    std::vector<double> sum(n, 0.0);
    for (int64_t b = 0; b < blocks; b++) {
      const T* pb = part + b * n;
      for (int64_t i = 0; i < n; i++) sum[i] += static_cast<double>(pb[i]);
    }
    for (int64_t i = 0; i < n; i++) gw[i] = static_cast<T>(sum[i]);
  }
}

bool pw_fusable(const at::Tensor& x, const at::Tensor& w) {
  if (!x.device().is_cpu() || !w.device().is_cpu() || x.dim() != 4 || w.dim() != 4) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  if (w.scalar_type() != x.scalar_type() || x.numel() == 0) return false;
  const int64_t cin = x.size(1), cout = w.size(0);
  if (w.size(1) != cin || w.size(2) != 1 || w.size(3) != 1 || cout < 1) return false;
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  if ((cout > 1 && w.stride(0) != cin) || (cin > 1 && w.stride(1) != 1)) return false;
  const int64_t limit = std::numeric_limits<int>::max();
  // BLAS takes 32-bit sizes: the channels (the blocks' pixel counts are at most kPwBlock).
  return cin <= limit && cout <= limit && cin * cout <= limit;
}

struct PointwiseConv : public torch::autograd::Function<PointwiseConv> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    TORCH_CHECK(pw_fusable(x, w), "darts_pointwise: not a fusable input");
    const int64_t cin = x.size(1), cout = w.size(0), m = x.numel() / cin;
    at::Tensor out = at::empty({x.size(0), cout, x.size(2), x.size(3)},
                               x.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_pointwise", [&] {
      pw_forward<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), m, cin, cout,
                           out.mutable_data_ptr<scalar_t>());
    });
    ctx->save_for_backward({x, w});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    torch::autograd::variable_list out(2);
    at::Tensor g = grads[0];
    if (!g.defined()) return out;
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    if (at::GradMode::is_enabled()) {
      // A graph of the backward pass is wanted (double backward): ATen's differentiable convolution_backward.
      auto r = at::convolution_backward(g, x, w, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                        {want_x, want_w, false});
      out[0] = std::get<0>(r);
      out[1] = std::get<1>(r);
      return out;
    }
    if (!g.is_contiguous(at::MemoryFormat::ChannelsLast)) g = g.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t cin = x.size(1), cout = w.size(0), m = x.numel() / cin;
    at::Tensor gx = want_x ? at::empty_like(x) : at::Tensor();
    at::Tensor gw = want_w ? at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_pointwise_backward", [&] {
      pw_backward<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), m,
                            cin, cout, want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                            want_w ? gw.mutable_data_ptr<scalar_t>() : nullptr);
    });
    out[0] = gx;
    out[1] = gw;
    return out;
  }
};
}  // namespace

extern "C" {

// `*out` = the 1x1 convolution (stride 1, no padding, no bias) of the channels-last `x` [N, Cin, H, W] with `w`
// [Cout, Cin, 1, 1], channels-last, as one autograd node (gradients for x and w). Returns 0, 1 where it does not
// apply (not on the CPU, not float32/float64, not channels-last dense, sizes past BLAS's 32-bit ints: nothing
// touched, use ATen's conv2d), or -1.
int darts_pointwise(const at::Tensor* x, const at::Tensor* w, at::Tensor** out) {
  return guarded([&] {
    if (!pw_fusable(*x, *w)) return 1;
    *out = new at::Tensor(PointwiseConv::apply(*x, *w));
    return 0;
  });
}

// ---- Counting ATen operator calls: the events torch.profiler records, through the same RecordFunction hooks ----

namespace {
std::atomic<int64_t> aten_calls{0};
at::CallbackHandle aten_counter = 0;
// Calls per operator name, kept only when counting was started with names (darts_count_aten_start(1)).
std::atomic<bool> aten_by_name{false};
std::mutex aten_names_mutex;
std::unordered_map<std::string, int64_t> aten_names;
std::string aten_names_text;
}  // namespace

// Starts counting calls of aten:: operators on every thread (nested calls of composite operators included, the
// autograd engine's backward nodes not: they are not aten:: operators), as torch.profiler lists them. Returns 0 or -1.
// With `by_name`, also counts each operator's calls (darts_count_aten_names lists them).
int darts_count_aten_start(int by_name) {
  return guarded([&] {
    if (aten_counter != 0) {
      at::removeCallback(aten_counter);
    }
    aten_calls = 0;
    {
      std::lock_guard<std::mutex> lock(aten_names_mutex);
      aten_names.clear();
    }
    aten_by_name = by_name != 0;
    auto cb = at::RecordFunctionCallback(
                  [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
                    if (std::strncmp(fn.name(), "aten::", 6) == 0) {
                      aten_calls.fetch_add(1, std::memory_order_relaxed);
                      if (aten_by_name.load(std::memory_order_relaxed)) {
                        std::lock_guard<std::mutex> lock(aten_names_mutex);
                        aten_names[fn.name()] += 1;
                      }
                    }
                    return nullptr;
                  })
                  .scopes({at::RecordScope::FUNCTION});
    aten_counter = at::addGlobalCallback(std::move(cb));
    return 0;
  });
}

// Stops counting and returns the number of calls since darts_count_aten_start.
int64_t darts_count_aten_stop() {
  if (aten_counter != 0) {
    at::removeCallback(aten_counter);
    aten_counter = 0;
  }
  return aten_calls.load();
}

// The calls per operator name of the last count started with names, as lines "count name", most called first.
// The text stays valid until the next call.
const char* darts_count_aten_names() {
  std::lock_guard<std::mutex> lock(aten_names_mutex);
  std::vector<std::pair<int64_t, std::string>> rows;
  for (const auto& kv : aten_names) rows.emplace_back(kv.second, kv.first);
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  aten_names_text.clear();
  for (const auto& r : rows) aten_names_text += std::to_string(r.first) + " " + r.second + "\n";
  return aten_names_text.c_str();
}

// ---- torch.distributed (c10d): a process group over a TCPStore, and the collectives darts uses ----

#ifdef DARTS_DIST
namespace {
struct ProcessGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};
}  // namespace
#endif

// Whether this build has c10d (1) or not (0).
int darts_dist_available() {
#ifdef DARTS_DIST
  return 1;
#else
  return 0;
#endif
}

// Whether this build has c10d's NCCL backend (1) or not (0).
int darts_nccl_available() {
#ifdef DARTS_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the process group of `world` processes as `rank`: a TCPStore at host:port (served by this process when
// `is_server`, else by rank 0 or torchrun's agent), its keys under `prefix`, and a backend: Gloo (`backend` 0),
// whose device binds to `bind` (an address or host name), or to interface `iface` when that is not empty; or
// NCCL (`backend` 1) on CUDA device `cuda_device`, which becomes this thread's current device. Waits up to
// `timeout_ms` for the others. Writes the group to `*out`. Returns 0, or -1 (see darts_last_error).
int darts_pg_new(const char* host, int port, int is_server, int rank, int world, const char* bind, const char* iface,
                 const char* prefix, int64_t timeout_ms, int backend, int cuda_device, void** out) {
#ifdef DARTS_DIST
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    if (backend == 1) {
#ifdef DARTS_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = std::chrono::milliseconds(timeout_ms);
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
      // Bound to its GPU, as torch.distributed's device_id: communicators are made for it, barriers use it.
      nccl->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device)));
      *out = new ProcessGroup{tcp, nccl};
      return 0;
#else
      last_error = "this darts was built without NCCL (nccl.h and CUDA's headers were missing at build time)";
      return -1;
#endif
    }
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    if (iface != nullptr && iface[0] != 0) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind));
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new ProcessGroup{tcp, gloo};
    return 0;
  });
#else
  last_error = "this darts was built without c10d (install libgloo-dev, then rebuild)";
  return -1;
#endif
}

// Sums `n` tensors over all processes of `pg`, in place, and waits. Returns 0, or -1.
int darts_pg_allreduce_sum(void* pg, const at::Tensor* const* tensors, int n) {
#ifdef DARTS_DIST
  return guarded([&] {
    auto ts = tensor_list(tensors, n);
    auto work = static_cast<ProcessGroup*>(pg)->backend->allreduce(ts);
    work->wait();
    return 0;
  });
#else
  last_error = "this darts was built without c10d";
  return -1;
#endif
}

// Copies `n` tensors of process `root` to every process of `pg`, in place, and waits. Returns 0, or -1.
int darts_pg_broadcast(void* pg, const at::Tensor* const* tensors, int n, int root) {
#ifdef DARTS_DIST
  return guarded([&] {
    auto ts = tensor_list(tensors, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    auto work = static_cast<ProcessGroup*>(pg)->backend->broadcast(ts, o);
    work->wait();
    return 0;
  });
#else
  last_error = "this darts was built without c10d";
  return -1;
#endif
}

// Waits until every process of `pg` has called it. Returns 0, or -1.
int darts_pg_barrier(void* pg) {
#ifdef DARTS_DIST
  return guarded([&] {
    static_cast<ProcessGroup*>(pg)->backend->barrier()->wait();
    return 0;
  });
#else
  last_error = "this darts was built without c10d";
  return -1;
#endif
}

// Leaves and frees the process group.
void darts_pg_free(void* pg) {
#ifdef DARTS_DIST
  delete static_cast<ProcessGroup*>(pg);
#endif
}
}

// ---- CUDA graphs: a step captured once on a side stream and replayed (at::cuda::CUDAGraph) ----

#ifdef DARTS_CUDA
namespace {
struct Graph {
  explicit Graph(c10::DeviceIndex d) : device(d), side(c10::cuda::getStreamFromPool(false, d)), prev(side) {}
  c10::DeviceIndex device;
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  c10::cuda::CUDAStream prev;
  bool entered = false;
  bool capturing = false;
};

// Makes `to` wait for the work queued on `from` so far.
// (c10's device-generic event, through libc10_cuda: darts does not link CUDA's runtime itself.)
void wait_for(const c10::cuda::CUDAStream& from, const c10::cuda::CUDAStream& to) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(from.unwrap());
  ev.block(to.unwrap());
}
}  // namespace
#endif

extern "C" {

// Whether this build has CUDA graphs (1) or not (0).
int darts_cuda_graphs_available() {
#ifdef DARTS_CUDA
  return 1;
#else
  return 0;
#endif
}

// A new graph for GPU `index` with a side stream of its own from the pool: written to `*out`. Returns 0, or -1.
int darts_graph_new(int index, void** out) {
#ifdef DARTS_CUDA
  return guarded([&] {
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    *out = new Graph(static_cast<c10::DeviceIndex>(index));
    return 0;
  });
#else
  last_error = "this darts was built without CUDA's headers";
  return -1;
#endif
}

// Makes the graph's side stream this thread's current stream on its device, after the work queued so far on
// the stream that was current (as torch.cuda.graph and its warm-up on a side stream do). Returns 0, or -1.
int darts_graph_enter(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (gr->entered) throw std::runtime_error("the graph's side stream is current already");
    gr->prev = c10::cuda::getCurrentCUDAStream(gr->device);
    wait_for(gr->prev, gr->side);
    c10::cuda::setCurrentCUDAStream(gr->side);
    gr->entered = true;
    return 0;
  });
#else
  return -1;
#endif
}

// Makes the stream current before darts_graph_enter current again; it waits for the side stream's work.
int darts_graph_exit(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (!gr->entered) return 0;
    c10::cuda::setCurrentCUDAStream(gr->prev);
    wait_for(gr->side, gr->prev);
    gr->entered = false;
    return 0;
  });
#else
  return -1;
#endif
}

// Begins capturing the side stream (entered: darts_graph_enter) into the graph, after synchronising the device
// (torch.cuda.graph synchronises first too). Thread-local capture: only this thread is kept from calls that cannot
// be captured, so darts' data loader thread may go on copying the next batches to the GPU meanwhile (the global
// mode torch.cuda.graph defaults to would fail those copies); the autograd engine's thread launches the backward
// kernels onto the captured stream all the same. Returns 0, or -1.
int darts_graph_capture_begin(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (!gr->entered) throw std::runtime_error("capture begins on the graph's side stream: enter it first");
    c10::cuda::device_synchronize();
    gr->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    gr->capturing = true;
    return 0;
  });
#else
  return -1;
#endif
}

// Ends the capture and instantiates the graph. On a failed capture (an operation that cannot be captured ran
// inside it) this returns -1 with CUDA's reason, and the capture is over all the same. Returns 0, or -1.
int darts_graph_capture_end(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    auto* gr = static_cast<Graph*>(g);
    if (!gr->capturing) throw std::runtime_error("no capture to end");
    gr->capturing = false;
    gr->graph.capture_end();
    return 0;
  });
#else
  return -1;
#endif
}

// Replays the captured graph on the current stream. Returns 0, or -1.
int darts_graph_replay(void* g) {
#ifdef DARTS_CUDA
  return guarded([&] {
    static_cast<Graph*>(g)->graph.replay();
    return 0;
  });
#else
  return -1;
#endif
}

// Frees a graph of darts_graph_new (its memory pool goes back to the caching allocator).
void darts_graph_free(void* g) {
#ifdef DARTS_CUDA
  auto* gr = static_cast<Graph*>(g);
  try {
    if (gr->capturing) gr->graph.capture_end();
  } catch (...) {
  }
  try {
    if (gr->entered) c10::cuda::setCurrentCUDAStream(gr->prev);
  } catch (...) {
  }
  delete gr;
#endif
}
}  // extern "C"
