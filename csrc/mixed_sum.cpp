// A node's sum of weighted op outputs in one pass (the MixedOp's relaxation, fused).
//
// DARTS's node is sum_m w[m] * y[m] over every candidate op of every incoming edge. As ATen operators that is a
// multiplication and an addition per op forward, and per op backward a multiplication for y's gradient plus a
// multiplication and a reduction for w's: five passes over a full activation and five parallel regions per op.
// Here it is one pass forward (all y read once, the output written once) and one backward (the output's gradient
// read once, each y's gradient written and each dot product with y taken in the same sweep), each one parallel
// region. Work is split into fixed blocks and w's gradient summed block by block in order, so the result does
// not depend on the number of threads. CPU, float32 or float64, every y of one shape and one dense layout;
// darts_mixed_sum answers 1 for anything else and darts computes the same sum with ATen operators.

#include "shim.h"

using namespace darts_shim;

namespace {

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

}  // extern "C"
