// Depthwise convolution (the sep and dil convs' per-channel k x k kernels) on channels-last tensors.
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

#include "shim.h"

using namespace darts_shim;

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

// Output rows [r0, r1) of the N * oh rows (example r / oh, row r % oh), row r at out + (r - r0) * ow * C.
template <typename T>
void dw_forward_rows(const T* x, const T* taps, const DwGeom& g, int64_t r0, int64_t r1, T* out) {
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
    dw_row<T, false>(out + (r - r0) * g.ow * g.c, rows.data(), off.data(), w.data(), nt, g.c, g.ow, g.sw, g.w);
  }
}

template <typename T>
void dw_forward(const T* x, const T* taps, const DwGeom& g, T* out) {
  const int64_t rows_n = g.n * g.oh;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.ow * g.c * g.kh * g.kw));
  at::parallel_for(0, rows_n, grain,
                   [&](int64_t r0, int64_t r1) { dw_forward_rows<T>(x, taps, g, r0, r1, out + r0 * g.ow * g.c); });
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
      dw_dot_row<T>(acc.data(), gn + oy * g.ow * g.c, rows.data(), off.data(), tap.data(), nt, g.c, g.ow, g.sw, g.w);
    }
    for (int64_t t = 0; t < g.kh * g.kw * g.c; t++) part[t] = static_cast<double>(acc[t]);
  }
}

// gx (optional) and the per-example weight gradient partials (optional, [n][kh * kw * C] float64), one example
// per task.
template <typename T>
void dw_backward(const T* x, const T* taps, const T* gout, const DwGeom& g, T* gx, double* gw_part) {
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      double* part = gw_part != nullptr ? gw_part + n * g.kh * g.kw * g.c : nullptr;
      dw_backward_example<T, false>(x, taps, gout + n * g.oh * g.ow * g.c, g, n, gx, part);
    }
  });
}

// Whether w is a dense [cout, C, 1, 1] weight of x's dtype on the CPU (the 1x1 half of SepHalves), with sizes
// BLAS's 32-bit ints take.
bool pw_takes(const at::Tensor& w, const at::Tensor& x) {
  if (!w.device().is_cpu() || w.dim() != 4 || w.scalar_type() != x.scalar_type()) return false;
  const int64_t cin = x.size(1), cout = w.size(0);
  if (w.size(1) != cin || w.size(2) != 1 || w.size(3) != 1 || cout < 1 || !w.is_contiguous()) return false;
  const int64_t limit = std::numeric_limits<int>::max();
  return cin * cout <= limit && x.size(2) * x.size(3) <= limit;
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
      if (want_w) out[1] = dw_weight_grad<scalar_t>(part, geo, w);
    });
    out[0] = gx;
    return out;
  }
};
// Separable halves: depthwise convolutions of one input x, each followed by a 1x1 convolution (stride 1, no
// bias): the first ReLU-depthwise-1x1 of every sep and dil conv op reading one state, and the second half of a
// sep conv (m = 1). One autograd node, computed example by example: the example's depthwise output goes into a
// per-task buffer ([oh * ow, C], in the cache) and straight into the 1x1 product (one single-threaded BLAS call),
// so the depthwise output is never written to memory nor kept for the backward, which recomputes it per example.
// Backward per example: the depthwise output again, the 1x1 weight's gradient partial (BLAS, per example, the
// examples added in order in float64), the depthwise output's gradient (BLAS, in the buffer), then the depthwise
// backward from it: x's gradient summed over the m convolutions in one buffer in their order, the depthwise
// weights' gradients per example in float64. Results do not depend on the number of threads.
// spec: (sh, sw, ph, pw, dh, dw) per convolution.
struct SepHalves : public torch::autograd::Function<SepHalves> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                at::TensorList dws, at::TensorList pws, at::IntArrayRef spec) {
    const int64_t m = static_cast<int64_t>(dws.size());
    ctx->set_materialize_grads(false);  // an output outside the loss: no gradient, not a zero one
    std::vector<DwGeom> geo(m);
    torch::autograd::variable_list outs;
    for (int64_t k = 0; k < m; k++) {
      const int64_t* sp = spec.data() + 6 * k;
      TORCH_CHECK(dw_geometry(x, dws[k], sp, sp + 2, sp + 4, &geo[k]) && pw_takes(pws[k], x),
                  "darts_sep_halves: not a fusable input");
      outs.push_back(at::empty({geo[k].n, pws[k].size(0), geo[k].oh, geo[k].ow},
                               x.options().memory_format(at::MemoryFormat::ChannelsLast)));
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_sep_halves", [&] {
      std::vector<std::vector<scalar_t>> taps;
      std::vector<scalar_t*> out_p;
      for (int64_t k = 0; k < m; k++) {
        taps.push_back(dw_taps<scalar_t>(dws[k], geo[k]));
        out_p.push_back(outs[k].mutable_data_ptr<scalar_t>());
      }
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      at::parallel_for(0, x.size(0) * m, 1, [&](int64_t i0, int64_t i1) {
        SequentialBlas sequential;
        std::vector<scalar_t> buf;
        for (int64_t i = i0; i < i1; i++) {
          const int64_t n = i / m, k = i % m;
          const DwGeom& g = geo[k];
          const int64_t px = g.oh * g.ow, cout = pws[k].size(0);
          buf.resize(px * g.c);
          dw_forward_rows<scalar_t>(xp, taps[k].data(), g, n * g.oh, (n + 1) * g.oh, buf.data());
          // Column-major: Y^T (cout x px) = W (cout x C, stored as its transpose) D^T (C x px).
          blas_gemm('T', 'N', cout, px, g.c, pws[k].const_data_ptr<scalar_t>(), g.c, buf.data(), g.c,
                    out_p[k] + n * px * cout, cout);
        }
      });
    });
    std::vector<at::Tensor> saved{x};
    for (const auto& w : dws) saved.push_back(w);
    for (const auto& w : pws) saved.push_back(w);
    ctx->save_for_backward(saved);
    ctx->saved_data["spec"] = spec.vec();
    return outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const int64_t m = (static_cast<int64_t>(saved.size()) - 1) / 2;
    auto dw_w = [&](int64_t k) -> const at::Tensor& { return saved[1 + k]; };
    auto pw_w = [&](int64_t k) -> const at::Tensor& { return saved[1 + m + k]; };
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    torch::autograd::variable_list out(2 * m + 2);
    // Asked here, on the engine's thread: needs_input_grad reads the graph task's thread-local state, which
    // libtorch's parallel region's other threads do not have.
    const bool want_x = ctx->needs_input_grad(0);
    std::vector<char> wants_dw(m), wants_pw(m);
    for (int64_t k = 0; k < m; k++) {
      wants_dw[k] = ctx->needs_input_grad(1 + k);
      wants_pw[k] = ctx->needs_input_grad(1 + m + k);
    }
    auto want_dw = [&](int64_t k) { return wants_dw[k] != 0; };
    auto want_pw = [&](int64_t k) { return wants_pw[k] != 0; };
    std::vector<int64_t> live;  // the convolutions with a gradient to pass on
    for (int64_t k = 0; k < m; k++) {
      if (grads[k].defined() && (want_x || want_dw(k) || want_pw(k))) live.push_back(k);
    }
    if (live.empty()) return out;
    if (at::GradMode::is_enabled()) {
      // Double backward: ATen's differentiable convolutions, recomputed, and their convolution_backward.
      at::Tensor gx;
      for (int64_t k : live) {
        const int64_t* sp = spec.data() + 6 * k;
        at::Tensor d = at::conv2d(x, dw_w(k), {}, {sp[0], sp[1]}, {sp[2], sp[3]}, {sp[4], sp[5]}, x.size(1));
        auto r1 = at::convolution_backward(grads[k], d, pw_w(k), std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0},
                                           1, {true, want_pw(k), false});
        auto r0 = at::convolution_backward(std::get<0>(r1), x, dw_w(k), std::nullopt, {sp[0], sp[1]}, {sp[2], sp[3]},
                                           {sp[4], sp[5]}, false, {0, 0}, x.size(1), {want_x, want_dw(k), false});
        if (want_x) gx = gx.defined() ? gx + std::get<0>(r0) : std::get<0>(r0);
        if (want_dw(k)) out[1 + k] = std::get<1>(r0);
        if (want_pw(k)) out[1 + m + k] = std::get<1>(r1);
      }
      out[0] = gx;
      return out;
    }
    std::vector<DwGeom> geo(m);
    std::vector<at::Tensor> g(m);
    for (int64_t k : live) {
      const int64_t* sp = spec.data() + 6 * k;
      TORCH_CHECK(dw_geometry(x, dw_w(k), sp, sp + 2, sp + 4, &geo[k]), "darts_sep_halves: not a fusable input");
      g[k] = grads[k].is_contiguous(at::MemoryFormat::ChannelsLast) ? grads[k]
                                                                      : grads[k].contiguous(at::MemoryFormat::ChannelsLast);
    }
    const int64_t batch = x.size(0);
    at::Tensor gx = want_x ? at::empty_like(x) : at::Tensor();
    std::vector<std::vector<double>> dpart(m);
    std::vector<at::Tensor> ppart(m);  // per example [cin, cout] column-major partials of the 1x1 weights' gradients
    for (int64_t k : live) {
      if (want_dw(k)) dpart[k].resize(batch * geo[k].kh * geo[k].kw * geo[k].c);
      if (want_pw(k)) ppart[k] = at::empty({batch, geo[k].c * pw_w(k).size(0)}, x.options());
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "darts_sep_halves_backward", [&] {
      std::vector<std::vector<scalar_t>> taps(m);
      for (int64_t k : live) taps[k] = dw_taps<scalar_t>(dw_w(k), geo[k]);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* gxp = want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, batch, 1, [&](int64_t n0, int64_t n1) {
        SequentialBlas sequential;
        std::vector<scalar_t> d, gd;
        for (int64_t n = n0; n < n1; n++) {
          bool first = true;
          for (int64_t k : live) {
            const DwGeom& gk = geo[k];
            const int64_t px = gk.oh * gk.ow, cout = pw_w(k).size(0);
            const scalar_t* pw = pw_w(k).const_data_ptr<scalar_t>();
            const scalar_t* gn = g[k].const_data_ptr<scalar_t>() + n * px * cout;
            d.resize(px * gk.c);
            gd.resize(px * gk.c);
            if (want_pw(k)) {
              dw_forward_rows<scalar_t>(xp, taps[k].data(), gk, n * gk.oh, (n + 1) * gk.oh, d.data());
              // gW^T (C x cout) = D^T (C x px) G (px x cout, stored as its transpose).
              blas_gemm('N', 'T', gk.c, cout, px, d.data(), gk.c, gn, cout,
                        ppart[k].mutable_data_ptr<scalar_t>() + n * gk.c * cout, gk.c);
            }
            if (!want_x && !want_dw(k)) continue;
            // gD^T (C x px) = W^T (C x cout, as stored) G^T (cout x px).
            blas_gemm('N', 'N', gk.c, px, cout, pw, gk.c, gn, cout, gd.data(), gk.c);
            double* pk = want_dw(k) ? dpart[k].data() + n * gk.kh * gk.kw * gk.c : nullptr;
            if (first) {
              dw_backward_example<scalar_t, false>(xp, taps[k].data(), gd.data(), gk, n, gxp, pk);
            } else {
              dw_backward_example<scalar_t, true>(xp, taps[k].data(), gd.data(), gk, n, gxp, pk);
            }
            first = first && gxp == nullptr;
          }
          if (first && gxp != nullptr) {
            // No convolution reached x's gradient for this example (none live wants it): zero.
            std::fill(gxp + n * x.size(1) * x.size(2) * x.size(3), gxp + (n + 1) * x.size(1) * x.size(2) * x.size(3),
                      scalar_t(0));
          }
        }
      });
      for (int64_t k : live) {
        if (want_dw(k)) out[1 + k] = dw_weight_grad<scalar_t>(dpart[k], geo[k], dw_w(k));
        if (want_pw(k)) {
          // The examples' partials added in order in float64; [cin, cout] column-major is W's [cout, cin] row-major.
          at::Tensor gw = at::empty(pw_w(k).sizes(), pw_w(k).options().memory_format(at::MemoryFormat::Contiguous));
          sum_in_order(ppart[k].const_data_ptr<scalar_t>(), batch, geo[k].c * pw_w(k).size(0),
                       gw.mutable_data_ptr<scalar_t>());
          out[1 + m + k] = gw;
        }
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

// outs[k] = the 1x1 convolution with pws[k] ([Cout_k, C, 1, 1]) of the depthwise convolution of the
// channels-last `x` with dws[k] ([C, 1, kh, kw]), stride, padding and dilation spec[6k..6k+6) = (sh, sw, ph, pw,
// dh, dw), for k < n, channels-last, as one autograd node (gradients for x, the sum of every convolution's, and
// every weight) that keeps no depthwise output. Returns 0, 1 where the kernel does not apply to one of them
// (nothing touched: convolve one by one), or -1.
int darts_sep_halves(const at::Tensor* x, const at::Tensor* const* dws, const at::Tensor* const* pws, int n,
                     const int64_t* spec, at::Tensor** outs) {
  return guarded([&] {
    if (n < 1) return 1;
    for (int k = 0; k < n; k++) {
      DwGeom g;
      const int64_t* sp = spec + 6 * k;
      if (!dw_geometry(*x, *dws[k], sp, sp + 2, sp + 4, &g) || !pw_takes(*pws[k], *x)) return 1;
    }
    std::vector<at::Tensor> dl = tensor_list(dws, n), pl = tensor_list(pws, n);
    auto r = SepHalves::apply(*x, at::TensorList(dl), at::TensorList(pl), at::IntArrayRef(spec, 6 * n));
    for (int k = 0; k < n; k++) outs[k] = new at::Tensor(r[k]);
    return 0;
  });
}

}  // extern "C"
