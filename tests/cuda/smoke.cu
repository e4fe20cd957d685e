// Compiles every .cuh with nvcc (no GPU needed to build), and the host-device
// math they share with the CPU kernels.
#include <kvcache/kernels/cuda/merge.cuh>
#include <kvcache/kvcache.hpp>

namespace {
__global__ void smoke(float* o, float* lse, const float* ob, const float* lseb, int dim) {
  kvcache::detail::merge_partial(o, *lse, ob, *lseb, static_cast<std::size_t>(dim));
  o[0] += static_cast<float>(kvcache::half(1.0f)) + static_cast<float>(kvcache::bfloat16(1.0f));
}
}  // namespace

void kvcache_cuda_smoke(float* o, float* lse, const float* ob, const float* lseb, int dim) {
  smoke<<<1, 1>>>(o, lse, ob, lseb, dim);
}
