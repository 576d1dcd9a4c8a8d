// Training-mode BatchNorm (batch statistics) as one sweep for the statistics and one to normalise.
//
// ATen's CPU kernels for a channels-last BatchNorm walk the N*H*W rows one by one and call a vectorised loop of
// C elements per row: with DARTS's narrow tensors (C = 8 to 64) that per-row call, not the arithmetic, is the
// cost, and BatchNorm's backward was the largest single kernel of a search step (18% of it). Here each sweep
// runs over groups of rows at least 64 values wide with the per-channel constants repeated across the group, so
// the inner loops are long and vectorise. Statistics and gradient sums accumulate in float64 per fixed block of
// rows (the statistics shifted by each channel's first value) and the blocks are summed in order: the result does
// not depend on the number of threads. CPU, float32 or float64, NCHW or channels-last dense; darts_batch_norm
// answers 1 for anything else and darts uses ATen's batch_norm.

#include "shim.h"

using namespace darts_shim;

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
