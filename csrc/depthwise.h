// The depthwise convolution's building blocks (on channels-last tensors), shared by darts' depthwise kernel
// (depthwise.cpp) and the separable halves (sep_halves.cpp): the geometry, the row kernels (forward and, stride
// 1, the input's gradient, sums in registers across every tap), the weight gradient's row sums, one example's
// backward, and the weight gradient from per-example partials. Internal to each file that includes it, as shim.h's
// helpers (DARTS_SIMD's clones are made per file).

#ifndef DARTS_DEPTHWISE_H
#define DARTS_DEPTHWISE_H

#include "shim.h"

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
template <typename T, int L, bool ACC>
inline void dw_row_lanes(T* o, const T* const* rows, const int64_t* off, const T* const* w, int64_t nt, int64_t C,
                         int64_t s, int64_t lo, int64_t hi, int64_t cb) {
  typedef typename Lanes<T, L>::type V;
  int64_t ow = lo;
  for (; ow + 4 <= hi; ow += 4) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    if (ACC) {
      a0 = vload<V>(o + ow * C + cb);
      a1 = vload<V>(o + (ow + 1) * C + cb);
      a2 = vload<V>(o + (ow + 2) * C + cb);
      a3 = vload<V>(o + (ow + 3) * C + cb);
    }
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
    if (ACC) a = vload<V>(o + ow * C + cb);
    for (int64_t t = 0; t < nt; t++) a += vload<V>(w[t] + cb) * vload<V>(rows[t] + (ow * s + off[t]) * C + cb);
    vstore(o + ow * C + cb, a);
  }
}

// One output row of a depthwise convolution (see dw_row_lanes), every column: the interior by vectors of
// channels, the columns where some tap leaves the image one at a time with the check. ACC: added to what o
// holds (the sum over several convolutions reading one input) instead of written.
template <typename T, bool ACC>
DARTS_SIMD void dw_row(T* __restrict__ o, const T* const* rows, const int64_t* off, const T* const* w, int64_t nt,
                       int64_t C, int64_t out_w, int64_t s, int64_t in_w) {
  constexpr int VL = 32 / sizeof(T), VH = 16 / sizeof(T);
  int64_t lo, hi;
  dw_interior(out_w, in_w, s, off, nt, &lo, &hi);
  auto checked = [&](int64_t ow) {
    T* op = o + ow * C;
    if (!ACC) {
      for (int64_t c = 0; c < C; c++) op[c] = T(0);
    }
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
  for (; cb + VL <= C; cb += VL) dw_row_lanes<T, VL, ACC>(o, rows, off, w, nt, C, s, lo, hi, cb);
  for (; cb + VH <= C; cb += VH) dw_row_lanes<T, VH, ACC>(o, rows, off, w, nt, C, s, lo, hi, cb);
  for (; cb < C; cb++) dw_row_lanes<T, 1, ACC>(o, rows, off, w, nt, C, s, lo, hi, cb);
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

// The taps that output row oy of example n reads inside the image (rows outside it are zero): for each, the
// input row, the column offset and the tap's index ky * kw + kx. Returns their number.
template <typename T>
int64_t dw_input_taps(const T* x, const DwGeom& g, int64_t n, int64_t oy, const T** rows, int64_t* off,
                      int64_t* tap) {
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
  return nt;
}

// Output rows [r0, r1) of the N * oh rows (example r / oh, row r % oh), row r at out + (r - r0) * ow * C.
template <typename T>
void dw_forward_rows(const T* x, const T* taps, const DwGeom& g, int64_t r0, int64_t r1, T* out) {
  std::vector<const T*> rows(g.kh * g.kw), w(g.kh * g.kw);
  std::vector<int64_t> off(g.kh * g.kw), tap(g.kh * g.kw);
  for (int64_t r = r0; r < r1; r++) {
    const int64_t nt = dw_input_taps(x, g, r / g.oh, r % g.oh, rows.data(), off.data(), tap.data());
    for (int64_t t = 0; t < nt; t++) w[t] = taps + tap[t] * g.c;
    dw_row<T, false>(out + (r - r0) * g.ow * g.c, rows.data(), off.data(), w.data(), nt, g.c, g.ow, g.sw, g.w);
  }
}

// Example n's part of the backward from its output's gradient gn ([oh, ow, C]): its input gradient gx_n
// (optional; ACC: added to what gx_n holds, the sum over several convolutions reading one input) and its weight
// gradient's partial sums part (optional, [kh * kw * C] float64).
template <typename T, bool ACC>
void dw_backward_example(const T* x, const T* taps, const T* gn, const DwGeom& g, int64_t n, T* gx, double* part) {
  std::vector<const T*> rows(g.kh * g.kw), w(g.kh * g.kw);
  std::vector<int64_t> off(g.kh * g.kw), tap(g.kh * g.kw);
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
      dw_row<T, ACC>(gx + (n * g.h + iy) * g.w * g.c, rows.data(), off.data(), w.data(), nt, g.c, g.w, 1, g.ow);
    }
  } else if (gx != nullptr) {
    for (int64_t iy = 0; iy < g.h; iy++) {
      T* o = gx + (n * g.h + iy) * g.w * g.c;
      if (!ACC) std::fill(o, o + g.w * g.c, T(0));
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
          simd_tap<T>(o + (lo * g.sw + off) * g.c, g.sw * g.c, gr + lo * g.c, g.c, taps + (ky * g.kw + kx) * g.c, g.c,
                      hi - lo);
        }
      }
    }
  }
  if (part != nullptr) {
    std::vector<T> acc(g.kh * g.kw * g.c, T(0));  // the example's weight-gradient sums, per tap
    for (int64_t oy = 0; oy < g.oh; oy++) {
      const int64_t nt = dw_input_taps(x, g, n, oy, rows.data(), off.data(), tap.data());
      dw_dot_row<T>(acc.data(), gn + oy * g.ow * g.c, rows.data(), off.data(), tap.data(), nt, g.c, g.ow, g.sw, g.w);
    }
    for (int64_t t = 0; t < g.kh * g.kw * g.c; t++) part[t] = static_cast<double>(acc[t]);
  }
}

// The weight gradient [C, 1, kh, kw] from the per-example partials, the examples added in order.
template <typename T>
at::Tensor dw_weight_grad(const std::vector<double>& part, const DwGeom& geo, const at::Tensor& w) {
  at::Tensor gw = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  T* gp = gw.mutable_data_ptr<T>();
  const int64_t taps_n = geo.kh * geo.kw;
  for (int64_t t = 0; t < taps_n; t++) {
    for (int64_t c = 0; c < geo.c; c++) {
      double sum = 0.0;
      for (int64_t n = 0; n < geo.n; n++) sum += part[(n * taps_n + t) * geo.c + c];
      gp[c * taps_n + t] = static_cast<T>(sum);
    }
  }
  return gw;
}
}  // namespace

#endif  // DARTS_DEPTHWISE_H
