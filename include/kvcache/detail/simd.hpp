// A 16-lane float vector written with GCC/Clang vector extensions, so the same
// source becomes AVX-512, AVX2 or SSE code for whatever target the compiler is
// told. Intrinsics appear only for fp16 conversion (F16C / AVX-512F), and each
// has a portable twin that tests compare bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../config.hpp"
#include "../half.hpp"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "kvcache's CPU kernels need GCC or Clang vector extensions"
#endif

// The vector types only cross always-inline functions, so GCC's note that
// their ABI differs between targets does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace kvcache {
inline namespace v0 {
namespace detail::simd {

inline constexpr int lanes = 16;
using vf = float __attribute__((vector_size(64)));
using vu = std::uint32_t __attribute__((vector_size(64)));
using vi = std::int32_t __attribute__((vector_size(64)));
using vh = std::uint16_t __attribute__((vector_size(32)));

KVCACHE_ALWAYS_INLINE vf load(const float* p) noexcept {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
KVCACHE_ALWAYS_INLINE void store(float* p, vf v) noexcept { std::memcpy(p, &v, sizeof v); }
KVCACHE_ALWAYS_INLINE vf splat(float x) noexcept { return vf{} + x; }

//! 0, 1, ..., 15: lane numbers, for masks.
KVCACHE_ALWAYS_INLINE vi lane_index() noexcept {
  return vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

// Horizontal reductions by halving: four shuffle + op steps instead of a
// serial chain of 15 scalar operations.
KVCACHE_ALWAYS_INLINE float reduce_add(vf v) noexcept {
  using v8 = float __attribute__((vector_size(32)));
  using v4 = float __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
KVCACHE_ALWAYS_INLINE float reduce_max(vf v) noexcept {
  using v8 = float __attribute__((vector_size(32)));
  using v4 = float __attribute__((vector_size(16)));
  const v8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8 a = lo > hi ? lo : hi;
  const v4 a0 = __builtin_shufflevector(a, a, 0, 1, 2, 3),
           a1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4 b = a0 > a1 ? a0 : a1;
  const float c0 = b[0] > b[2] ? b[0] : b[2], c1 = b[1] > b[3] ? b[1] : b[3];
  return c0 > c1 ? c0 : c1;
}
//! Lane i of the result is the sum of the lanes of v[i]: sixteen horizontal
//! sums in 15 shuffle pairs instead of 16 scalar reductions.
KVCACHE_ALWAYS_INLINE vf reduce16(const vf* v) noexcept {
  vf w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                   20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                   27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19,
                                   24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                   23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21,
                                   24, 25, 28, 29) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22,
                                   23, 26, 27, 30, 31);
  return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                 31);
}

//! Lane j of round S's first output: a[j], or b[j - S] where bit S of j is
//! set; of its second: a[j + S], or b[j] where it is set (b's lanes are 16 +).
constexpr int swap_lo(int S, int j) noexcept { return j & S ? 16 + j - S : j; }
constexpr int swap_hi(int S, int j) noexcept { return j & S ? 16 + j : j + S; }

//! One round of transpose16: swaps the off-diagonal S x S blocks of each
//! pair of vectors S apart.
template <int S>
KVCACHE_ALWAYS_INLINE void swap_blocks(vf* v) noexcept {
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const vf a = v[i], b = v[i + S];
#define KVCACHE_LANES(f)                                                                    \
  f(S, 0), f(S, 1), f(S, 2), f(S, 3), f(S, 4), f(S, 5), f(S, 6), f(S, 7), f(S, 8), f(S, 9), \
      f(S, 10), f(S, 11), f(S, 12), f(S, 13), f(S, 14), f(S, 15)
    v[i] = __builtin_shufflevector(a, b, KVCACHE_LANES(swap_lo));
    v[i + S] = __builtin_shufflevector(a, b, KVCACHE_LANES(swap_hi));
#undef KVCACHE_LANES
  }
}

//! v[i][j] <-> v[j][i] for 16 vectors: four rounds that swap the
//! off-diagonal blocks of 1, 2, 4 and 8 lanes, one two-source shuffle per
//! vector per round (64 in all, against 256 strided scalar stores).
KVCACHE_ALWAYS_INLINE void transpose16(vf* v) noexcept {
  swap_blocks<1>(v);
  swap_blocks<2>(v);
  swap_blocks<4>(v);
  swap_blocks<8>(v);
}

KVCACHE_ALWAYS_INLINE vf max(vf a, vf b) noexcept {
  const vi m = a > b;
  return (vf)(((vi)a & m) | ((vi)b & ~m));
}
KVCACHE_ALWAYS_INLINE vf select(vi mask, vf a, vf b) noexcept {
  return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

//! e^x for x <= 0 (softmax arguments), relative error below 2e-7; inputs below
//! -87 give 0 (so -inf masks work).
KVCACHE_ALWAYS_INLINE vf exp_neg(vf x) noexcept {
  const vi keep = x > splat(-87.0f);
  x = max(x, splat(-87.0f));
  // x = n ln2 + r, |r| <= ln2/2, n rounded to nearest by the 1.5*2^23 trick
  const vf t = x * 1.44269504088896341f + 12582912.0f;
  const vf n = t - 12582912.0f;
  vf r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)((vi)(p * (vf)e) & keep);
}

// ---- fp16 / bf16 <-> fp32, 16 lanes at a time ------------------------------

//! Portable binary16 -> binary32, branch-free; agrees with half_bits_to_float.
KVCACHE_ALWAYS_INLINE vf half_to_float_portable(vh hv) noexcept {
  const vu h = __builtin_convertvector(hv, vu);
  const vu sign = (h & 0x8000u) << 16;
  const vu em = h & 0x7fffu;
  const vu e = em & 0x7c00u;
  const vu o = em << 13;
  const vu normal = o + (112u << 23);
  const vu special = (o + (224u << 23)) | (vu)((vi)(em > 0x7c00u) & 0x400000);
  const vu subn = (vu)((vf)(o + (113u << 23)) - (vf)(vu{} + (113u << 23)));
  const vu is_zero_e = (vu)(e == 0u), is_max_e = (vu)(e == 0x7c00u);
  const vu r = (subn & is_zero_e) | (special & is_max_e) | (normal & ~(is_zero_e | is_max_e));
  return (vf)(r | sign);
}

//! Portable binary32 -> binary16 with round to nearest even; agrees with
//! float_to_half_bits. Needs the default rounding mode for subnormals.
KVCACHE_ALWAYS_INLINE vh float_to_half_portable(vf f) noexcept {
  vu x = (vu)f;
  const vu sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  vu nrm = x - 0x38000000u;
  nrm = (nrm + 0xfffu + ((nrm >> 13) & 1u)) >> 13;
  // below 2^-14: adding 0.5f rounds to the half subnormal grid (ulp 2^-24)
  const vu sub = (vu)((vf)x + 0.5f) - 0x3f000000u;
  const vu nan = 0x7e00u | ((x >> 13) & 0x3ffu);
  const vu is_nan = (vu)(x > 0x7f800000u);
  const vu is_inf = (vu)(x >= 0x47800000u) & ~is_nan;
  const vu is_sub = (vu)(x < 0x38800000u);
  const vu is_nrm = ~(is_nan | is_inf | is_sub);
  const vu r = (nan & is_nan) | (0x7c00u & is_inf) | (sub & is_sub) | (nrm & is_nrm);
  return __builtin_convertvector(r | sign, vh);
}

KVCACHE_ALWAYS_INLINE vf load(const half* p) noexcept {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  vf v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  vh h;
  std::memcpy(&h, static_cast<const void*>(p), sizeof h);
  return half_to_float_portable(h);
#endif
}

KVCACHE_ALWAYS_INLINE void store(half* p, vf v) noexcept {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8),
                   _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
#else
  const vh h = float_to_half_portable(v);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
#endif
}

KVCACHE_ALWAYS_INLINE vf load(const bfloat16* p) noexcept {
  vh h;
  std::memcpy(&h, static_cast<const void*>(p), sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

KVCACHE_ALWAYS_INLINE void store(bfloat16* p, vf v) noexcept {
  const vu x = (vu)v;
  const vu rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const vu nan = (x >> 16) | 0x40u;
  const vu is_nan = (vu)((x & 0x7fffffffu) > 0x7f800000u);
  const vh h = __builtin_convertvector((nan & is_nan) | (rounded & ~is_nan), vh);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
}

}  // namespace detail::simd

namespace detail {

//! Converts n values between storage types, 16 lanes at a time with a scalar
//! tail. Float-to-float is a copy.
template <class From, class To>
inline void convert(const From* KVCACHE_RESTRICT src, To* KVCACHE_RESTRICT dst,
                    std::size_t n) noexcept {
  std::size_t i = 0;
  if constexpr (!std::is_same_v<From, To>) {
    for (; i + simd::lanes <= n; i += simd::lanes) simd::store(dst + i, simd::load(src + i));
  }
  for (; i < n; ++i) dst[i] = To(static_cast<float>(src[i]));
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
