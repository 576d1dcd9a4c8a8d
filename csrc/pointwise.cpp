// Pointwise (1x1) convolution on channels-last tensors as one matrix product each way.
//
// In channels-last memory a 1x1 convolution is the product of the [N*H*W, Cin] pixels and the [Cout, Cin]
// weight's transpose. libtorch reaches it through the same five operator entries as any convolution (and
// reorders the weight's gradient), which at DARTS's sizes costs about what the product does. Here one autograd
// node: forward one BLAS sgemm/dgemm per block of pixels (the MKL that libtorch itself calls, single-threaded
// inside libtorch's parallel region), backward two (the input's gradient G W, the weight's G^T X). CPU, float32
// or float64, channels-last dense input, weight [Cout, Cin, 1, 1] dense, stride 1, no padding, no bias;
// darts_pointwise answers 1 for anything else.

#include "shim.h"

using namespace darts_shim;

namespace {
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
  if (gw != nullptr) sum_in_order(part, blocks, cin * cout, gw);
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

}  // extern "C"
