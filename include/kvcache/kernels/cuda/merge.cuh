// CUDA side of the log-sum-exp merge: the same host-device function the CPU
// kernels use, plus a kernel that merges split partial results per row. The
// full CUDA decode and prefill kernels build on this.
#pragma once

#include <cuda_runtime.h>

#include "../merge.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail::cuda {

//! Merges `splits` partials per row: o (rows, splits, dim), lse (rows, splits)
//! into out (rows, dim) and out_lse (rows). One thread per row.
__global__ void merge_splits(const float* o, const float* lse, float* out, float* out_lse, int rows,
                             int splits, int dim) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float acc_lse = -INFINITY;
  float* acc = out + static_cast<std::size_t>(r) * dim;
  for (int d = 0; d < dim; ++d) acc[d] = 0.f;
  for (int s = 0; s < splits; ++s)
    merge_partial(acc, acc_lse, o + (static_cast<std::size_t>(r) * splits + s) * dim,
                  lse[r * splits + s], static_cast<std::size_t>(dim));
  out_lse[r] = acc_lse;
}

}  // namespace detail::cuda
}  // namespace v0
}  // namespace kvcache
