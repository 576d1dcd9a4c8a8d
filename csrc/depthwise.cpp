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

#include "depthwise.h"

using namespace darts_shim;

namespace {
template <typename T>
void dw_forward(const T* x, const T* taps, const DwGeom& g, T* out) {
  const int64_t rows_n = g.n * g.oh;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.ow * g.c * g.kh * g.kw));
  at::parallel_for(0, rows_n, grain,
                   [&](int64_t r0, int64_t r1) { dw_forward_rows<T>(x, taps, g, r0, r1, out + r0 * g.ow * g.c); });
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
