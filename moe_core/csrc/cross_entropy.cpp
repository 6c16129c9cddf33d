// Softmax cross-entropy of the rows of an fp32 matrix on the CPU, a forward and a backward operator
// (moe_core/cpu_kernels.py builds them and wraps the pair for autograd).
//
// torch's cross_entropy exponentiates every logit twice per step, in log_softmax and again in its
// backward, at about 1 ns per value on our CPU: most of its 6 ms at 1,024 tokens x 2,048 classes.
// The forward here exponentiates once, with a polynomial that vectorises, and keeps the softmax; the
// backward is then one multiply: d loss_i / d logit_ij = g_i (p_ij - [j == target_i]).
//
// A NaN or +inf logit makes its row's loss NaN, as in torch; a -inf logit gets probability 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "softmax_row.h"
#include "vector_clones.h"

namespace {

// Rows [begin, end) of x [*, v]: probs = softmax(row), loss = logsumexp(row) - row[target].
VECTOR_CLONES void xent_forward_rows(const float* x, const int64_t* target, float* probs, float* loss,
                                     int64_t begin, int64_t end, int64_t v) {
  for (int64_t i = begin; i < end; ++i) {
    const auto [m, s] = softmax_row(x + i * v, probs + i * v, v);
    loss[i] = m + std::log(s) - x[i * v + target[i]];
  }
}

// Rows [begin, end) of the logits' gradient: g_i * (probs_i - one_hot(target_i)).
VECTOR_CLONES void xent_backward_rows(const float* __restrict__ probs, const int64_t* target, const float* grad_loss,
                                      float* __restrict__ grad, int64_t begin, int64_t end, int64_t v) {
  for (int64_t i = begin; i < end; ++i) {
    const float g = grad_loss[i];
    const float* __restrict__ p = probs + i * v;
    float* __restrict__ out = grad + i * v;
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) out[j] = g * p[j];
    out[target[i]] -= g;
  }
}

void check_targets(const at::Tensor& targets, int64_t n, int64_t v) {
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == n,
              "softmax_xent takes one int64 target per row, got ", targets.scalar_type(), " ", targets.sizes(),
              " for ", n, " rows");
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(0 <= t[i] && t[i] < v, "softmax_xent: target ", t[i], " of row ", i, " is not a class in [0, ", v, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_xent(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "softmax_xent takes 2-d fp32 CPU logits, got ", logits.scalar_type(), " ", logits.sizes());
  const int64_t n = logits.size(0), v = logits.size(1);
  const at::Tensor x = logits.contiguous(), t = targets.contiguous();
  check_targets(t, n, v);
  at::Tensor probs = at::empty({n, v}, x.options()), loss = at::empty({n}, x.options());
  const float* data = x.data_ptr<float>();
  const int64_t* target = t.data_ptr<int64_t>();
  float *p = probs.data_ptr<float>(), *l = loss.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) { xent_forward_rows(data, target, p, l, begin, end, v); });
  return {loss, probs};
}

at::Tensor softmax_xent_backward(const at::Tensor& probs, const at::Tensor& targets, const at::Tensor& grad_loss) {
  TORCH_CHECK(probs.device().is_cpu() && probs.scalar_type() == at::kFloat && probs.dim() == 2,
              "softmax_xent_backward takes 2-d fp32 CPU probabilities, got ", probs.scalar_type(), " ", probs.sizes());
  const int64_t n = probs.size(0), v = probs.size(1);
  const at::Tensor p = probs.contiguous(), t = targets.contiguous(), g = grad_loss.contiguous();
  check_targets(t, n, v);
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.dim() == 1 && g.size(0) == n,
              "softmax_xent_backward takes one fp32 gradient per row, got ", g.scalar_type(), " ", g.sizes());
  at::Tensor grad = at::empty({n, v}, p.options());
  const float *pd = p.data_ptr<float>(), *gd = g.data_ptr<float>();
  const int64_t* target = t.data_ptr<int64_t>();
  float* out = grad.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) { xent_backward_rows(pd, target, gd, out, begin, end, v); });
  return grad;
}

// torch.ops.moe_core.cpu_softmax_xent(logits [N, V], targets [N]) -> (loss per row [N], softmax [N, V]);
// torch.ops.moe_core.cpu_softmax_xent_backward(softmax, targets, d loss per row [N]) -> d logits [N, V]
TORCH_LIBRARY_FRAGMENT(moe_core, library) {
  library.def("cpu_softmax_xent(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  library.def("cpu_softmax_xent_backward(Tensor probs, Tensor targets, Tensor grad_loss) -> Tensor");
}
TORCH_LIBRARY_IMPL(moe_core, CPU, library) {
  library.impl("cpu_softmax_xent", &softmax_xent);
  library.impl("cpu_softmax_xent_backward", &softmax_xent_backward);
}
