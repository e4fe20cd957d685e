// hadamard<P>: stores each K and V vector rotated by a normalised Hadamard
// transform before P quantizes it (QuaRot, and llama.cpp's rotated q4_0 K).
// An outlier channel's energy is spread over every element of the rotation
// block, so per-token block scales no longer have to cover it. The transform
// H / sqrt(R) is orthogonal and its own inverse: q.k is unchanged when the
// query is rotated the same way, and an attention output over rotated values
// is rotated back once per output.
//   row_bytes = P::row_bytes(dim)          (the rotation costs no bytes)
// R is the largest power of two dividing head_dim (128 for head_dim 128,
// 32 for 96), at most 1024.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <string_view>

#include "block.hpp"

#if defined(__AVX512F__) && !defined(KVCACHE_NO_SIMD_ENCODE)
#define KVCACHE_HAS_SIMD_HADAMARD 1
#include <immintrin.h>
#else
#define KVCACHE_HAS_SIMD_HADAMARD 0
#endif

namespace kvcache {
inline namespace v0 {
namespace detail {

//! Largest power of two dividing dim, capped at 1024.
constexpr std::size_t hadamard_block(std::size_t dim) noexcept {
  std::size_t r = 1;
  while (r < 1024 && dim % (2 * r) == 0) r *= 2;
  return r;
}

//! In-place normalised fast Walsh-Hadamard transform of each R-block of x:
//! the definition, one butterfly at a time.
KVCACHE_HOST_DEVICE void hadamard_butterflies(float* x, std::size_t dim) noexcept {
  const std::size_t r = hadamard_block(dim);
  const float norm = 1.0f / std::sqrt(static_cast<float>(r));
  for (std::size_t base = 0; base < dim; base += r) {
    float* y = x + base;
    for (std::size_t len = 1; len < r; len *= 2)
      for (std::size_t i = 0; i < r; i += 2 * len)
        for (std::size_t j = i; j < i + len; ++j) {
          const float a = y[j], b = y[j + len];
          y[j] = a + b;
          y[j + len] = a - b;
        }
    for (std::size_t i = 0; i < r; ++i) y[i] *= norm;
  }
}

//! hadamard_butterflies, and on a host built for AVX-512 the same
//! butterflies in the same order 16 at a time (bit for bit the same; a test
//! compares them): stages of length 1 to 8 inside a vector (lane i meets lane
//! i ^ len), longer ones between vectors. Every user of the transform (write,
//! decode and prefill queries and outputs, decoded rows) runs it.
KVCACHE_HOST_DEVICE void hadamard_transform(float* x, std::size_t dim) noexcept {
#if KVCACHE_HAS_SIMD_HADAMARD && !defined(__CUDA_ARCH__)
  const std::size_t r = hadamard_block(dim);
  if (r >= 16) {
    const __m512 norm = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(r)));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (std::size_t base = 0; base < dim; base += r) {
      float* y = x + base;
      for (std::size_t i = 0; i < r; i += 16) {
        __m512 a = _mm512_loadu_ps(y + i);
        for (int len = 1; len < 16; len *= 2) {
          const __m512i bit = _mm512_set1_epi32(len);
          const __m512 p = _mm512_permutexvar_ps(_mm512_xor_si512(lane, bit), a);
          a = _mm512_mask_blend_ps(_mm512_test_epi32_mask(lane, bit), _mm512_add_ps(a, p),
                                   _mm512_sub_ps(p, a));
        }
        _mm512_storeu_ps(y + i, a);
      }
      for (std::size_t len = 16; len < r; len *= 2)
        for (std::size_t i = 0; i < r; i += 2 * len)
          for (std::size_t j = i; j < i + len; j += 16) {
            const __m512 a = _mm512_loadu_ps(y + j), b = _mm512_loadu_ps(y + j + len);
            _mm512_storeu_ps(y + j, _mm512_add_ps(a, b));
            _mm512_storeu_ps(y + j + len, _mm512_sub_ps(a, b));
          }
      for (std::size_t i = 0; i < r; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), norm));
    }
    return;
  }
#endif
  hadamard_butterflies(x, dim);
}

//! "hadamard_" followed by P's name, as a constant string.
template <class P>
struct hadamard_name {
  static constexpr std::string_view prefix = "hadamard_";
  static constexpr auto chars = [] {
    std::array<char, prefix.size() + P::name.size()> a{};
    for (std::size_t i = 0; i < prefix.size(); ++i) a[i] = prefix[i];
    for (std::size_t i = 0; i < P::name.size(); ++i) a[prefix.size() + i] = P::name[i];
    return a;
  }();
  static constexpr std::string_view value{chars.data(), chars.size()};
};

}  // namespace detail

template <class P>
struct hadamard : P {
  static_assert(
      requires { typename P::format; },
      "hadamard<P> wraps one of the block-quantized precisions (int8_kv, int4_kv, "
      "int2_kv, fp8_e4m3_kv).");
  using rotated_precision = P;  //!< the precision that stores the rotated rows
  static constexpr std::size_t max_dim = 1024;
  static constexpr std::string_view name = detail::hadamard_name<P>::value;

  static void check_dim(std::size_t dim) {
    P::check_dim(dim);
    detail::require(dim <= max_dim, "head_dim ", dim, " exceeds ", max_dim,
                    ", the largest hadamard<> rotates");
  }
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    float x[max_dim];
    for (std::size_t i = 0; i < dim; ++i) x[i] = src[i];
    detail::hadamard_transform(x, dim);
    P::encode(x, dst, dim);
  }
  static void decode(const std::byte* src, float* dst, std::size_t dim) noexcept {
    P::decode(src, dst, dim);
    detail::hadamard_transform(dst, dim);
  }
  //! Fused-kernel hooks: the block functions work in the rotated basis, so a
  //! query is rotated before dot_block and an output after accumulate_block.
  KVCACHE_HOST_DEVICE static void transform_query(float* q, std::size_t dim) noexcept {
    detail::hadamard_transform(q, dim);
  }
  KVCACHE_HOST_DEVICE static void transform_output(float* o, std::size_t dim) noexcept {
    detail::hadamard_transform(o, dim);
  }
};

}  // namespace v0
}  // namespace kvcache
