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
#include <cstring>
#include <tuple>
#include <utility>

#include "vector_clones.h"

namespace {

ALWAYS_INLINE int32_t float_bits(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

ALWAYS_INLINE float bits_float(int32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// e^x for x <= 0 to about 1 ulp, in the manner of Cephes' expf: x = n ln2 + r with n = round(x / ln2)
// and ln2 split in two so that r is exact; e^r = 1 + r + r^2 P(r) for |r| <= ln2 / 2; e^x = 2^n e^r.
// Below e^-87.34 (2^-126) it returns 0; NaN stays NaN. (x > 0 never comes: x is logit - row max.)
ALWAYS_INLINE float exp_nonpositive(float x) {
  const float low = -87.33654f;
  const float xc = x < low ? low : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float rounded = xc * 1.44269504088896341f + shifter;
  const int32_t n = float_bits(rounded) - float_bits(shifter);
  const float nf = rounded - shifter;
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float result = (p * (r * r) + r + 1.0f) * bits_float((n + 127) << 23);
  return x < low ? 0.0f : result;
}

// out = softmax(row) over v values; returns the row's max and sum of exp(row - max), whose log plus the
// max is the row's logsumexp. A max pass, an exp-and-sum pass, and a scaling pass on a row still in cache.
ALWAYS_INLINE std::pair<float, float> softmax_row(const float* __restrict__ row, float* __restrict__ out, int64_t v) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = row[j] > m ? row[j] : m;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    out[j] = exp_nonpositive(row[j] - m);
    s += out[j];
  }
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] *= inv;
  return {m, s};
}

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
