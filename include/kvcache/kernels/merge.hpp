// Partial attention results are (output, log-sum-exp) pairs. A split of the
// tokens (flash-decoding), a shared prefix (cascade) and a cold page range
// (offload) all combine through this one function.
#pragma once

#include <cmath>
#include <cstddef>

#include "../config.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! Folds the partial (o_b, lse_b) into the running (o_a, lse_a); both outputs
//! are normalised (sum of weights 1). An empty part has lse = -inf.
KVCACHE_HOST_DEVICE void merge_partial(float* o_a, float& lse_a, const float* o_b, float lse_b,
                                       std::size_t dim) noexcept {
  if (lse_b == -INFINITY) return;
  if (lse_a == -INFINITY) {
    for (std::size_t i = 0; i < dim; ++i) o_a[i] = o_b[i];
    lse_a = lse_b;
    return;
  }
  const float m = lse_a > lse_b ? lse_a : lse_b;
  const float wa = std::exp(lse_a - m), wb = std::exp(lse_b - m);
  const float inv = 1.0f / (wa + wb);
  for (std::size_t i = 0; i < dim; ++i) o_a[i] = (o_a[i] * wa + o_b[i] * wb) * inv;
  lse_a = m + std::log(wa + wb);
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
