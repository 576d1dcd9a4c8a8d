// Separable halves: a depthwise convolution and the 1x1 convolution after it (a sep or dil conv's half) as one
// autograd node computed example by example, several reading one input as one node (darts::native::sep_halves).
// The depthwise building blocks are depthwise.h's, the BLAS calls shim.h's.

#include "depthwise.h"

using namespace darts_shim;

namespace {
// Whether w is a dense [cout, C, 1, 1] weight of x's dtype on the CPU (the 1x1 half of SepHalves), with sizes
// BLAS's 32-bit ints take.
bool pw_takes(const at::Tensor& w, const at::Tensor& x) {
  if (!w.device().is_cpu() || w.dim() != 4 || w.scalar_type() != x.scalar_type()) return false;
  const int64_t cin = x.size(1), cout = w.size(0);
  if (w.size(1) != cin || w.size(2) != 1 || w.size(3) != 1 || cout < 1 || !w.is_contiguous()) return false;
  const int64_t limit = std::numeric_limits<int>::max();
  return cin * cout <= limit && x.size(2) * x.size(3) <= limit;
}

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
