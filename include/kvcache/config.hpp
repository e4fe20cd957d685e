// Compile-time configuration shared by every kvcache header: host/device
// annotations, the `dynamic` extent and the version.
#pragma once

#include <cstddef>
#include <limits>

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0

// One definition of the math for host and device (CUTLASS's CUTE_HOST_DEVICE).
// Host code never changes meaning under __CUDACC__; only the annotation does.
#if defined(__CUDACC__)
#define KVCACHE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVCACHE_HOST_DEVICE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define KVCACHE_ALWAYS_INLINE inline __attribute__((always_inline))
#define KVCACHE_RESTRICT __restrict__
#else
#define KVCACHE_ALWAYS_INLINE inline
#define KVCACHE_RESTRICT
#endif

namespace kvcache {
inline namespace v0 {

//! A size that is not known at compile time and is given at construction
//! instead, in the manner of std::dynamic_extent.
inline constexpr std::size_t dynamic = std::numeric_limits<std::size_t>::max();

//! Static extent `E`, or the runtime value `runtime` when E is `dynamic`.
constexpr std::size_t resolve_extent(std::size_t e, std::size_t runtime) noexcept {
  return e == dynamic ? runtime : e;
}

}  // namespace v0
}  // namespace kvcache
