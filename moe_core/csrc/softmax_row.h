// Row softmax helpers shared by the CPU kernels (cross_entropy.cpp, route.cpp): a vectorisable exponential
// and the max / exp-and-sum / scale passes over one row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
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

// out = exp(row - max(row)) over v values; returns the row's max and the sum of out.
ALWAYS_INLINE std::pair<float, float> exp_row(const float* __restrict__ row, float* __restrict__ out, int64_t v) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = row[j] > m ? row[j] : m;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    out[j] = exp_nonpositive(row[j] - m);
    s += out[j];
  }
  return {m, s};
}

ALWAYS_INLINE void scale_row(float* __restrict__ out, float factor, int64_t v) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] *= factor;
}

// out = softmax(row) over v values; returns the row's max and sum of exp(row - max), whose log plus the
// max is the row's logsumexp. A max pass, an exp-and-sum pass, and a scaling pass on a row still in cache.
ALWAYS_INLINE std::pair<float, float> softmax_row(const float* __restrict__ row, float* __restrict__ out, int64_t v) {
  const auto [m, s] = exp_row(row, out, v);
  scale_row(out, 1.0f / s, v);
  return {m, s};
}

}  // namespace
