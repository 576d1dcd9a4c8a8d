// The optimiser's steps without per-tensor operators: SGD, gradient clipping, the second-order architect's
// multi-tensor updates, snapshots and norms (the shim's own loops on the CPU; PyTorch's fused and foreach kernels
// elsewhere).

#include "shim.h"

using namespace darts_shim;

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

}  // extern "C"
