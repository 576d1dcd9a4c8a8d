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

// BLAS (libtorch's own MKL), for the pointwise products.
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

// Internal to each file that includes it (DARTS_SIMD's clones are made per file).
namespace {
// MKL single-threaded on this thread while alive (products run inside libtorch's parallel region: the same
// sequential code whatever the number of threads, so the same bits).
struct SequentialBlas {
  int prev = MKL_Set_Num_Threads_Local(1);
  ~SequentialBlas() { MKL_Set_Num_Threads_Local(prev); }
};

// Column-major C (m x n, ldc) = op(A) op(B) (+ C with acc), BLAS's convention.
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float* c, int64_t ldc, bool acc = false) {
  const int im = m, in = n, ik = k, ia = lda, ib = ldb, ic = ldc;
  const float one = 1.0f, beta = acc ? 1.0f : 0.0f;
  sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
}
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                      const double* b, int64_t ldb, double* c, int64_t ldc, bool acc = false) {
  const int im = m, in = n, ik = k, ia = lda, ib = ldb, ic = ldc;
  const double one = 1.0, beta = acc ? 1.0 : 0.0;
  dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
}

// out[i] = the sum over p < parts of part[p * n + i], added in order in float64: partial sums of blocks or
// examples combined with the same bits whatever the number of threads that made them.
template <typename T>
void sum_in_order(const T* part, int64_t parts, int64_t n, T* out) {
  std::vector<double> sum(n, 0.0);
  for (int64_t p = 0; p < parts; p++) {
    const T* pp = part + p * n;
    for (int64_t i = 0; i < n; i++) sum[i] += static_cast<double>(pp[i]);
  }
  for (int64_t i = 0; i < n; i++) out[i] = static_cast<T>(sum[i]);
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
}  // namespace

#endif  // DARTS_SHIM_H
