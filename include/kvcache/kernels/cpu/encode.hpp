// Encodes K/V rows into the built-in block formats 16 elements per
// instruction (AVX-512), byte for byte what the block functions in
// precision/block.hpp produce. Those stay the definition: the CUDA kernels,
// the portable build and users' precisions use them, and test_quant_formats
// compares the two on every format, ties, signed zeros and saturation
// included. The arithmetic is the block functions' own, step for step: a
// block's extremes are exact in any order, its scale and min are computed
// by the same scalar expressions, and the rounding to nearest even is
// roundscale under the default rounding mode, as nearbyint is.
//
// `encode_row<P>` is what the cache's write kernel calls: the vector path
// for a built-in block precision (and hadamard<> of one, whose transform is
// vectorised in rotated.hpp), P::encode for everything else.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../precision/block.hpp"
#include "../../precision/rotated.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(KVCACHE_NO_SIMD_ENCODE)
#define KVCACHE_HAS_SIMD_ENCODE 1
#include <immintrin.h>
#else
#define KVCACHE_HAS_SIMD_ENCODE 0
#endif

namespace kvcache {
inline namespace v0 {
namespace detail {

//! P's encode is block_rows' own (not a user's override), so the vector
//! encoder of P's format writes the same bytes.
template <class P>
constexpr bool plain_block_encode() noexcept {
  if constexpr (requires { typename P::format; }) {
    using F = typename P::format;
    if constexpr (std::is_base_of_v<block_rows<F>, P>)
      return &P::encode == &block_rows<F>::encode;
    else
      return false;
  } else {
    return false;
  }
}

//! P is hadamard<B> itself (not a type derived from it), with B's encode
//! block_rows' own.
template <class P>
constexpr bool rotated_block_encode() noexcept {
  if constexpr (requires { typename P::rotated_precision; })
    return std::is_same_v<P, hadamard<typename P::rotated_precision>> &&
           plain_block_encode<typename P::rotated_precision>();
  else
    return false;
}

#if KVCACHE_HAS_SIMD_ENCODE

namespace simd_encode {

KVCACHE_ALWAYS_INLINE __m512 round_even(__m512 x) noexcept {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

//! float_to_e4m3 on 16 finite lanes, codes in the low byte of each lane.
KVCACHE_ALWAYS_INLINE __m512i e4m3(__m512 y) noexcept {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
  const __m512i ab = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  // Normal range: the top three mantissa bits under the exponent, rebiased,
  // plus one when the 20 bits below are over half or half with an odd code
  // (a carry into the exponent is the scalar code's r == 8 case).
  const __m512i top = _mm512_srli_epi32(ab, 20);
  const __m512i odd = _mm512_and_si512(top, _mm512_set1_epi32(1));
  const __m512i up = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(_mm512_and_si512(ab, _mm512_set1_epi32(0xfffff)), odd),
                       _mm512_set1_epi32(0x7ffff)),
      20);
  const __m512i normal =
      _mm512_min_epi32(_mm512_add_epi32(_mm512_sub_epi32(top, _mm512_set1_epi32(120 << 3)), up),
                       _mm512_set1_epi32(0x7e));
  // Below 2^-6: the subnormal grid of 2^-9.
  const __m512 a = _mm512_castsi512_ps(ab);
  const __m512i sub = _mm512_cvtps_epi32(round_even(_mm512_mul_ps(a, _mm512_set1_ps(512.f))));
  const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.015625f), _CMP_LT_OQ);
  return _mm512_or_si512(_mm512_mask_blend_epi32(small, normal, sub), sign);
}

//! The value the scalar loop `v = x[0]; v = pick(v, x[i])` ends with, where
//! pick returns x[i] on ties: the extreme e, or for e == 0 the last zero
//! (its sign is the only thing the order decides).
KVCACHE_ALWAYS_INLINE float last_zero(const float* x, std::size_t n, float e) noexcept {
  if (e != 0.f) return e;
  for (std::size_t i = n; i-- > 0;)
    if (x[i] == 0.f) return x[i];
  return e;
}

//! One block of format F (G elements at x) into block b of the row.
template <class F>
KVCACHE_ALWAYS_INLINE void encode_block(const float* x, std::byte* row, std::size_t b,
                                        std::size_t dim) noexcept {
  constexpr std::size_t G = F::group, V = G / 16;
  constexpr block_kind K = F::kind;
  __m512 v[V];
  for (std::size_t k = 0; k < V; ++k) v[k] = _mm512_loadu_ps(x + 16 * k);
  __m512i q[V];
  float s = 0.f, m = 0.f;
  if constexpr (K == block_kind::int8_sym || K == block_kind::fp8_e4m3) {
    __m512 mx = _mm512_abs_ps(v[0]);
    for (std::size_t k = 1; k < V; ++k) mx = _mm512_max_ps(mx, _mm512_abs_ps(v[k]));
    const float amax = _mm512_reduce_max_ps(mx);
    constexpr float top = K == block_kind::int8_sym ? 127.f : 448.f;
    s = fp16_round(min_f(amax / top, 65504.f));
    const __m512 inv = _mm512_set1_ps(s > 0.f ? 1.f / s : 0.f);
    for (std::size_t k = 0; k < V; ++k) {
      const __m512 y = _mm512_mul_ps(v[k], inv);
      if constexpr (K == block_kind::int8_sym)
        q[k] = _mm512_cvtps_epi32(_mm512_max_ps(
            _mm512_set1_ps(-127.f), _mm512_min_ps(_mm512_set1_ps(127.f), round_even(y))));
      else
        q[k] = e4m3(y);
    }
  } else if constexpr (K == block_kind::int4_sym) {
    // q4_0: the first element of largest magnitude, with its sign.
    __m512 mx = _mm512_abs_ps(v[0]);
    for (std::size_t k = 1; k < V; ++k) mx = _mm512_max_ps(mx, _mm512_abs_ps(v[k]));
    const float amax = _mm512_reduce_max_ps(mx);
    float big = 0.f;
    if (amax > 0.f)
      for (std::size_t k = 0; k < V; ++k) {
        const __mmask16 at =
            _mm512_cmp_ps_mask(_mm512_abs_ps(v[k]), _mm512_set1_ps(amax), _CMP_EQ_OQ);
        if (at) {
          big = x[16 * k + static_cast<std::size_t>(__builtin_ctz(at))];
          break;
        }
      }
    s = fp16_round(max_f(-65504.f, min_f(65504.f, big / -8.f)));
    const __m512 inv = _mm512_set1_ps(s != 0.f ? 1.f / s : 0.f);
    for (std::size_t k = 0; k < V; ++k)
      q[k] = _mm512_cvtps_epi32(_mm512_max_ps(
          _mm512_setzero_ps(),
          _mm512_min_ps(_mm512_set1_ps(15.f),
                        _mm512_add_ps(round_even(_mm512_mul_ps(v[k], inv)), _mm512_set1_ps(8.f)))));
  } else {
    constexpr float top = static_cast<float>((1u << F::bits) - 1);
    __m512 lo = v[0], hi = v[0];
    for (std::size_t k = 1; k < V; ++k) lo = _mm512_min_ps(lo, v[k]), hi = _mm512_max_ps(hi, v[k]);
    const float l = last_zero(x, G, _mm512_reduce_min_ps(lo));
    const float h = last_zero(x, G, _mm512_reduce_max_ps(hi));
    m = fp16_round(l);
    s = fp16_round(min_f((h - m) / top, 65504.f));
    const __m512 inv = _mm512_set1_ps(s > 0.f ? 1.f / s : 0.f), vm = _mm512_set1_ps(m);
    for (std::size_t k = 0; k < V; ++k)
      q[k] = _mm512_cvtps_epi32(
          _mm512_max_ps(_mm512_setzero_ps(),
                        _mm512_min_ps(_mm512_set1_ps(top),
                                      round_even(_mm512_mul_ps(_mm512_sub_ps(v[k], vm), inv)))));
  }
  auto* c = reinterpret_cast<std::uint8_t*>(row) + b * G * F::bits / 8;
  if constexpr (F::bits == 8) {
    for (std::size_t k = 0; k < V; ++k)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 16 * k), _mm512_cvtepi32_epi8(q[k]));
  } else if constexpr (F::bits == 4) {
    // Byte j of a 32-element block: element j low, j + 16 high.
    for (std::size_t k = 0; k < V; k += 2) {
      const __m128i l = _mm512_cvtepi32_epi8(q[k]), h = _mm512_cvtepi32_epi8(q[k + 1]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 8 * k),
                       _mm_or_si128(l, _mm_slli_epi16(h, 4)));
    }
  } else {
    // Byte j of a 32-element block: elements j, j + 8, j + 16, j + 24.
    for (std::size_t k = 0; k < V; k += 2) {
      const __m128i l = _mm512_cvtepi32_epi8(q[k]), h = _mm512_cvtepi32_epi8(q[k + 1]);
      const __m128i e =
          _mm_or_si128(_mm_or_si128(l, _mm_slli_epi64(_mm_srli_si128(l, 8), 2)),
                       _mm_or_si128(_mm_slli_epi64(h, 4), _mm_slli_epi64(_mm_srli_si128(h, 8), 6)));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(c + 4 * k), e);
    }
  }
  F::store16(row + F::scale_offset(dim) + 2 * b, s);
  if constexpr (F::asymmetric) F::store16(row + F::min_offset(dim) + 2 * b, m);
}

template <class F>
void encode_row(const float* x, std::byte* row, std::size_t dim) noexcept {
  for (std::size_t b = 0; b < dim / F::group; ++b) encode_block<F>(x + b * F::group, row, b, dim);
}

}  // namespace simd_encode

#endif  // KVCACHE_HAS_SIMD_ENCODE

//! Encodes one K or V row of P (dim elements) into dst.
template <class P>
void encode_row(const float* src, std::byte* dst, std::size_t dim) noexcept {
#if KVCACHE_HAS_SIMD_ENCODE
  if constexpr (plain_block_encode<P>()) {
    simd_encode::encode_row<typename P::format>(src, dst, dim);
    return;
  } else if constexpr (rotated_block_encode<P>()) {
    float x[P::max_dim];
    std::memcpy(x, src, dim * sizeof(float));
    hadamard_transform(x, dim);
    simd_encode::encode_row<typename P::format>(x, dst, dim);
    return;
  }
#endif
  P::encode(src, dst, dim);
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
