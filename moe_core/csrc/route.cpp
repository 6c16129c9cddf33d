// A score router's decision on the CPU, a forward and a backward operator (moe_core/cpu_kernels.py builds
// them and wraps the pair for autograd; routing.select_top_k calls them).
//
// The forward takes logits [N, M] to the softmax over all M experts (for the balance loss), the ids of the
// k largest logits (topk.cpp) and their weights: the selected probabilities, renormalised over the k or
// not. Renormalised, weight s is e_s / sum of the k selected e, with e = exp(logit - row max) the same
// exponentials the softmax sums, since the row's max is always selected. In torch this is a softmax, a
// top-k, a gather and a second softmax, and backward their four backwards plus an add, each a pass over
// memory and a trip through autograd; at smoke shapes (1,024 x 64, k = 12) those small operations cost
// more than their arithmetic. The backward here is one pass per row:
//   d logit_j = p_j (gp_j - <p, gp>)  +  [j = id_s] w_s (gw_s - <w, gw>)      (renormalised)
//   d logit_j = p_j (gq_j - <p, gq>),  gq = gp + gw scattered to the ids       (not renormalised)
// where gp and gw are the gradients reaching the probabilities and the weights (either may be absent).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "softmax_row.h"
#include "vector_clones.h"

at::Tensor topk_indices(const at::Tensor& scores, int64_t k);  // topk.cpp

namespace {

// Rows [begin, end): probs = softmax(x), weights = the probabilities at ids, renormalised over them or not.
VECTOR_CLONES void route_forward_rows(const float* x, const int64_t* ids, float* probs, float* weights, int64_t begin,
                                      int64_t end, int64_t m, int64_t k, bool renormalize) {
  for (int64_t i = begin; i < end; ++i) {
    float* p = probs + i * m;
    const int64_t* id = ids + i * k;
    float* w = weights + i * k;
    const float total = exp_row(x + i * m, p, m).second;
    if (renormalize) {
      float selected = 0.0f;
      for (int64_t s = 0; s < k; ++s) selected += p[id[s]];
      const float inv = 1.0f / selected;
      for (int64_t s = 0; s < k; ++s) w[s] = p[id[s]] * inv;
    }
    scale_row(p, 1.0f / total, m);
    if (!renormalize)
      for (int64_t s = 0; s < k; ++s) w[s] = p[id[s]];
  }
}

// Rows [begin, end) of d logits; grad_probs and grad_weights may be null (no gradient reached them).
VECTOR_CLONES void route_backward_rows(const float* probs, const int64_t* ids, const float* weights,
                                       const float* grad_probs, const float* grad_weights, float* grad, int64_t begin,
                                       int64_t end, int64_t m, int64_t k, bool renormalize) {
  for (int64_t i = begin; i < end; ++i) {
    const float* __restrict__ p = probs + i * m;
    float* __restrict__ g = grad + i * m;
    const int64_t* id = ids + i * k;
    if (grad_probs != nullptr) {
      const float* gp = grad_probs + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] = gp[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] = 0.0f;
    }
    if (grad_weights != nullptr && !renormalize)  // the weights are probabilities: their gradient joins gp
      for (int64_t s = 0; s < k; ++s) g[id[s]] += grad_weights[i * k + s];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < m; ++j) dot += p[j] * g[j];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) g[j] = p[j] * (g[j] - dot);
    if (grad_weights != nullptr && renormalize) {  // the softmax over the k selected logits
      const float* w = weights + i * k;
      const float* gw = grad_weights + i * k;
      float wdot = 0.0f;
      for (int64_t s = 0; s < k; ++s) wdot += w[s] * gw[s];
      for (int64_t s = 0; s < k; ++s) g[id[s]] += w[s] * (gw[s] - wdot);
    }
  }
}

void check_rows(const at::Tensor& t, at::ScalarType dtype, int64_t n, int64_t width, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == n && t.size(1) == width,
              "route: ", what, " must be ", dtype, " [", n, ", ", width, "] on the CPU, got ", t.scalar_type(), " ",
              t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t k, bool renormalize) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "route takes 2-d fp32 CPU logits, got ", logits.scalar_type(), " ", logits.sizes());
  const int64_t n = logits.size(0), m = logits.size(1);
  const at::Tensor x = logits.contiguous();
  at::Tensor ids = topk_indices(x, k);  // checks 0 < k <= m
  at::Tensor probs = at::empty({n, m}, x.options()), weights = at::empty({n, k}, x.options());
  const float* data = x.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  float *p = probs.data_ptr<float>(), *w = weights.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    route_forward_rows(data, id, p, w, begin, end, m, k, renormalize);
  });
  return {probs, ids, weights};
}

at::Tensor route_backward(const at::Tensor& probs, const at::Tensor& ids, const at::Tensor& weights,
                          const c10::optional<at::Tensor>& grad_probs, const c10::optional<at::Tensor>& grad_weights,
                          bool renormalize) {
  TORCH_CHECK(probs.dim() == 2, "route_backward takes 2-d probabilities, got ", probs.sizes());
  const int64_t n = probs.size(0), m = probs.size(1), k = ids.dim() == 2 ? ids.size(1) : 0;
  check_rows(probs, at::kFloat, n, m, "probs");
  check_rows(ids, at::kLong, n, k, "ids");
  check_rows(weights, at::kFloat, n, k, "weights");
  const at::Tensor p = probs.contiguous(), id = ids.contiguous(), w = weights.contiguous();
  at::Tensor gp, gw;  // undefined where no gradient came
  if (grad_probs.has_value() && grad_probs->defined()) {
    check_rows(*grad_probs, at::kFloat, n, m, "grad_probs");
    gp = grad_probs->contiguous();  // the balance loss's gradient arrives broadcast (stride 0)
  }
  if (grad_weights.has_value() && grad_weights->defined()) {
    check_rows(*grad_weights, at::kFloat, n, k, "grad_weights");
    gw = grad_weights->contiguous();
  }
  at::Tensor grad = at::empty({n, m}, p.options());
  const float *pd = p.data_ptr<float>(), *wd = w.data_ptr<float>();
  const float* gpd = gp.defined() ? gp.data_ptr<float>() : nullptr;
  const float* gwd = gw.defined() ? gw.data_ptr<float>() : nullptr;
  const int64_t* idd = id.data_ptr<int64_t>();
  float* out = grad.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    route_backward_rows(pd, idd, wd, gpd, gwd, out, begin, end, m, k, renormalize);
  });
  return grad;
}

// torch.ops.moe_core.cpu_route(logits [N, M], k, renormalize) -> (softmax [N, M], ids [N, k], weights [N, k]);
// torch.ops.moe_core.cpu_route_backward(softmax, ids, weights, d softmax?, d weights?, renormalize) -> d logits
TORCH_LIBRARY_FRAGMENT(moe_core, library) {
  library.def("cpu_route(Tensor logits, int k, bool renormalize) -> (Tensor, Tensor, Tensor)");
  library.def(
      "cpu_route_backward(Tensor probs, Tensor ids, Tensor weights, Tensor? grad_probs, Tensor? grad_weights, "
      "bool renormalize) -> Tensor");
}
TORCH_LIBRARY_IMPL(moe_core, CPU, library) {
  library.impl("cpu_route", &route);
  library.impl("cpu_route_backward", &route_backward);
}
