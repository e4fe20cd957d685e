// hadamard<>'s transform on the CPU kernels' hot paths (rows on write,
// queries and outputs on attend), 16 elements per instruction with AVX-512.
// It computes detail::hadamard_transform's butterflies in the same order, so
// the results are bit for bit the same (test_quant_formats checks it); the
// scalar transform stays the definition that CUDA and users' code share.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../../precision/rotated.hpp"

#if defined(__AVX512F__) && !defined(KVCACHE_NO_SIMD_ENCODE)
#define KVCACHE_HAS_SIMD_HADAMARD 1
#include <immintrin.h>
#else
#define KVCACHE_HAS_SIMD_HADAMARD 0
#endif

namespace kvcache {
inline namespace v0 {
namespace detail {

//! hadamard_transform of each block of x (dim elements): stages of length 1
//! to 8 inside a vector (lane i meets lane i ^ len), longer ones between
//! vectors. Blocks under 16 elements, and builds without AVX-512, take the
//! scalar transform.
inline void hadamard_rows(float* x, std::size_t dim) noexcept {
#if KVCACHE_HAS_SIMD_HADAMARD
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
  hadamard_transform(x, dim);
}

//! P is hadamard<B> itself (not a user's type derived from it), so its
//! transforms are hadamard_transform.
template <class P>
constexpr bool builtin_rotation() noexcept {
  if constexpr (requires { typename P::rotated_precision; })
    return std::is_same_v<P, hadamard<typename P::rotated_precision>>;
  else
    return false;
}

//! P::transform_query and P::transform_output, through hadamard_rows for
//! the built-in rotation.
template <class P>
void rotate_query(float* q, std::size_t dim) noexcept {
  if constexpr (builtin_rotation<P>())
    hadamard_rows(q, dim);
  else
    P::transform_query(q, dim);
}
template <class P>
void rotate_output(float* o, std::size_t dim) noexcept {
  if constexpr (builtin_rotation<P>())
    hadamard_rows(o, dim);
  else
    P::transform_output(o, dim);
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
