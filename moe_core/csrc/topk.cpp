// Top-k column ids of every row of an fp32 matrix on the CPU (moe_core/cpu_kernels.py builds and loads it).
//
// torch.topk spends most of its time on mispredicted branches when it selects 12 of 64 random
// scores. This kernel is branch-free: k rounds per row, each a max over the row's remaining keys and
// a min over the columns holding that max (both loops vectorise), then the winner is knocked out.
// One round is a chain of dependent steps, so GROUP rows run their rounds side by side and the CPU
// overlaps their chains (in a prototype at 1,024 x 64, k = 12: 0.08 ms for eight rows at a time, 0.27 one).
//
// Keys are order-preserving int32 images of the floats. Ties go to the lower column; NaN ranks above
// every number, as in torch.topk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vector_clones.h"

namespace {

constexpr int GROUP = 8;
constexpr int32_t TAKEN = INT_MIN;  // below every key: no float maps to it

ALWAYS_INLINE int32_t ordered_key(float value) {
  if (value != value) return INT_MAX;  // NaN first
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);  // negative floats: magnitude bits flipped
}

// Rows [begin, end) of x [*, m] into out [*, k]; M > 0 fixes the row length at compile time.
template <int M>
VECTOR_CLONES void select_rows(const float* x, int64_t* out, int64_t begin, int64_t end, int32_t m,
                               int32_t k, int32_t* key /* [GROUP * m] scratch */) {
  if (M > 0) m = M;
  for (int64_t first = begin; first < end; first += GROUP) {
    const int rows = static_cast<int>(std::min<int64_t>(GROUP, end - first));
    for (int q = 0; q < GROUP; ++q) {  // a short last group repeats its first row in the spare slots
      const float* row = x + (first + (q < rows ? q : 0)) * m;
      for (int32_t j = 0; j < m; ++j) key[q * m + j] = ordered_key(row[j]);
    }
    for (int32_t s = 0; s < k; ++s) {
      int32_t best[GROUP], column[GROUP];
      for (int q = 0; q < GROUP; ++q) {
        const int32_t* kq = key + q * m;
        int32_t b = TAKEN;
        for (int32_t j = 0; j < m; ++j) b = kq[j] > b ? kq[j] : b;
        best[q] = b;
      }
      for (int q = 0; q < GROUP; ++q) {
        const int32_t* kq = key + q * m;
        int32_t c = m;
        for (int32_t j = 0; j < m; ++j) {
          const int32_t here = kq[j] == best[q] ? j : m;
          c = here < c ? here : c;
        }
        column[q] = c;
      }
      for (int q = 0; q < GROUP; ++q) {
        key[q * m + column[q]] = TAKEN;
        if (q < rows) out[(first + q) * k + s] = column[q];
      }
    }
  }
}

using RowsFn = void (*)(const float*, int64_t*, int64_t, int64_t, int32_t, int32_t, int32_t*);

RowsFn rows_fn(int64_t m) {
  switch (m) {
    case 16: return select_rows<16>;
    case 32: return select_rows<32>;
    case 64: return select_rows<64>;
    case 128: return select_rows<128>;
    default: return select_rows<0>;
  }
}

}  // namespace

at::Tensor topk_indices(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2,
              "topk_indices takes a 2-d fp32 CPU tensor, got ", scores.scalar_type(), " ", scores.sizes());
  const int64_t n = scores.size(0), m = scores.size(1);
  TORCH_CHECK(0 < k && k <= m, "topk_indices needs 0 < k <= columns, got k=", k, ", columns=", m);
  TORCH_CHECK(m <= INT_MAX / GROUP, "topk_indices takes at most ", INT_MAX / GROUP, " columns, got ", m);
  const at::Tensor x = scores.contiguous();
  at::Tensor idx = at::empty({n, k}, scores.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* out = idx.data_ptr<int64_t>();
  const RowsFn fn = rows_fn(m);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> key(GROUP * m);
    fn(data, out, begin, end, static_cast<int32_t>(m), static_cast<int32_t>(k), key.data());
  });
  return idx;
}

// torch.ops.moe_core.cpu_topk_indices: a torch operator, so torch.compile can call it (its shape rule is
// registered in cpu_kernels.py)
TORCH_LIBRARY_FRAGMENT(moe_core, library) { library.def("cpu_topk_indices(Tensor scores, int k) -> Tensor"); }
TORCH_LIBRARY_IMPL(moe_core, CPU, library) { library.impl("cpu_topk_indices", &topk_indices); }
