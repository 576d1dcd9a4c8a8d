// The shim's common ground: libtorch's headers, the error convention of every extern "C" function (a C++
// exception becomes -1 and its message, darts_last_error), and the inner loops more than one kernel file uses.
// An include guard, not #pragma once: build.rs precompiles this header and force-includes it (-include), and
// the guard makes each file's own #include "shim.h" a no-op after it.
#ifndef DARTS_SHIM_H
#define DARTS_SHIM_H
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
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

namespace darts_shim {
// The message of the last failed call on this thread, for darts_last_error.
extern thread_local std::string last_error;

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

// The n tensors behind a C array of pointers, as a list for ATen's multi-tensor operators.
inline std::vector<at::Tensor> tensor_list(const at::Tensor* const* ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}
}  // namespace darts_shim

// Internal to each file that includes it (DARTS_SIMD's clones are made per file).
namespace {
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
}  // namespace

#endif  // DARTS_SHIM_H
