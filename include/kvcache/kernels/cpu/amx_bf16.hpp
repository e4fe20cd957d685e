// The two tile products of prefill (prefill.hpp) on the AMX tile unit in
// bf16 (tdpbf16ps: 16 x 32 by 32 x 16 bf16 products into 16 x 16 fp32 sums,
// 16 times the products of an AVX-512 FMA per instruction).
//
// bf16 keeps 8 significant bits, so every operand is split in two, x = hi +
// lo, each a bf16 rounded to nearest: hi within 2^-9 of x, hi + lo within
// 2^-17. An fp16 or bf16 cache row splits exactly (the residue of an fp16
// is at most 4 bits); a query or a softmax weight (fp32) to within 2^-17. A
// product a.b is then three tile products, ah.bh + ah.bl + al.bh (al.bl is
// below 2^-18 of a.b), summed in fp32 by the tile unit: a few times fp32
// rounding (the kernels tests hold prefill on the tile unit to 1e-5
// relative L2 of the FMA kernel), at a third of the tile unit's rate. fp32
// caches keep the FMA path (their bound against float64 is 1e-5).
//
// Layouts (R query rows, a KV tile of up to 64 keys, padded to 32):
//   scores  St (keys, R) = K Qt: A = key rows as stored (16 keys x 32 dims),
//           B = the queries in pairs of dimensions (dim / 2, R, 2), prepared
//           once per work item, C = a 16 x 16 block of St, which is the
//           prefill kernel's transposed score layout, so its masks and
//           softmax run unchanged;
//   values  O (R, dim) += P V: A = the weights, rows by keys (St transposed
//           once per tile, 16 x 16 blocks), B = value rows in pairs of keys
//           (keys / 2, dim, 2), C = a 16 x 16 block of O.
// Two by two C blocks per pass, so each operand tile loaded feeds two
// products. The tile unit's throughput here is set by the operand traffic
// from L2 (the operands of one tile exceed L1), not by its multipliers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../half.hpp"
#include "amx.hpp"

#if KVCACHE_HAS_AMX && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    !defined(KVCACHE_NO_AMX_BF16)
#define KVCACHE_HAS_AMX_BF16 1
#else
#define KVCACHE_HAS_AMX_BF16 0
#endif

namespace kvcache {
inline namespace v0 {
namespace detail::amx_bf16 {

//! Keys per tile product: KV tiles are padded to whole pairs of 16-key blocks.
inline constexpr std::size_t key_block = 32;

//! Whether a prefill item of R rows and head_dim dim can run here: whole
//! pairs of 16-row and 16-dimension blocks, and the process may use the tiles.
inline bool usable(std::size_t R, std::size_t dim) noexcept {
#if KVCACHE_HAS_AMX_BF16
  return R % 32 == 0 && dim % 32 == 0 && amx::available();
#else
  (void)R, (void)dim;
  return false;
#endif
}

//! Scratch of one item, in floats: queries (hi and lo, twice for the sinks'
//! own queries), keys and values (hi and lo) and weights (hi and lo), with
//! room to align each to 64 bytes.
inline constexpr std::size_t scratch_floats(std::size_t R, std::size_t dim,
                                            std::size_t kv_tile) noexcept {
  return 2 * R * dim + 2 * kv_tile * dim + R * kv_tile + 5 * 16;
}

//! The item's bf16 buffers, carved from scratch_floats of scratch.
struct buffers {
  std::uint16_t *qh, *ql, *qsh, *qsl, *kh, *kl, *vh, *vl, *ph, *pl;
  buffers(float* scratch, std::size_t R, std::size_t dim, std::size_t kv_tile) noexcept {
    auto at = [&](std::size_t words) {
      auto a = (reinterpret_cast<std::uintptr_t>(scratch) + 63) & ~std::uintptr_t{63};
      auto* p = reinterpret_cast<std::uint16_t*>(a);
      scratch = reinterpret_cast<float*>(p + words);
      return p;
    };
    qh = at(R * dim), ql = at(R * dim), qsh = at(R * dim), qsl = at(R * dim);
    kh = at(kv_tile * dim), kl = at(kv_tile * dim), vh = at(kv_tile * dim), vl = at(kv_tile * dim);
    ph = at(R * kv_tile), pl = at(R * kv_tile);
  }
};

#if KVCACHE_HAS_AMX_BF16

//! 16 floats rounded to bf16 (to nearest), as floats whose low halves are zero.
KVCACHE_ALWAYS_INLINE __m512 rounded_bf16(__m512 x) noexcept {
  return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x));
}

//! Word 2i <- a's element i, word 2i + 1 <- b's element i (both as the high
//! halves of fp32 lanes): one pair of dimensions or keys per 32-bit lane.
KVCACHE_ALWAYS_INLINE __m512i interleave_high(__m512 a, __m512 b) noexcept {
  const __m512i index =
      _mm512_setr_epi32(0x00210001, 0x00230003, 0x00250005, 0x00270007, 0x00290009, 0x002b000b,
                        0x002d000d, 0x002f000f, 0x00310011, 0x00330013, 0x00350015, 0x00370017,
                        0x00390019, 0x003b001b, 0x003d001d, 0x003f001f);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), index, _mm512_castps_si512(b));
}
//! Words 0-15 <- a's high halves, 16-31 <- b's: 32 consecutive elements.
KVCACHE_ALWAYS_INLINE __m512i concat_high(__m512 a, __m512 b) noexcept {
  const __m512i index =
      _mm512_setr_epi32(0x00030001, 0x00070005, 0x000b0009, 0x000f000d, 0x00130011, 0x00170015,
                        0x001b0019, 0x001f001d, 0x00230021, 0x00270025, 0x002b0029, 0x002f002d,
                        0x00330031, 0x00370035, 0x003b0039, 0x003f003d);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), index, _mm512_castps_si512(b));
}

//! Qt (dim, R) fp32 -> B operands (dim / 2, R, 2): hi rounded to nearest, lo
//! the rest rounded to nearest.
inline void prepare_queries(const float* Qt, std::size_t R, std::size_t dim, std::uint16_t* qh,
                            std::uint16_t* ql) noexcept {
  for (std::size_t p = 0; p < dim / 2; ++p)
    for (std::size_t r = 0; r < R; r += 16) {
      const __m512 a = _mm512_loadu_ps(Qt + 2 * p * R + r);
      const __m512 b = _mm512_loadu_ps(Qt + (2 * p + 1) * R + r);
      const __m512 ah = rounded_bf16(a), bh = rounded_bf16(b);
      _mm512_storeu_si512(qh + (p * R + r) * 2, interleave_high(ah, bh));
      _mm512_storeu_si512(
          ql + (p * R + r) * 2,
          interleave_high(rounded_bf16(_mm512_sub_ps(a, ah)), rounded_bf16(_mm512_sub_ps(b, bh))));
    }
}

//! nk float key rows -> A operands (nk, dim) hi and lo, row-major.
inline void split_keys(const float* const* rows, std::size_t nk, std::size_t dim, std::uint16_t* kh,
                       std::uint16_t* kl) noexcept {
  for (std::size_t j = 0; j < nk; ++j)
    for (std::size_t d = 0; d < dim; d += 32) {
      const __m512 a = _mm512_loadu_ps(rows[j] + d), b = _mm512_loadu_ps(rows[j] + d + 16);
      const __m512 ah = rounded_bf16(a), bh = rounded_bf16(b);
      _mm512_storeu_si512(kh + j * dim + d, concat_high(ah, bh));
      _mm512_storeu_si512(kl + j * dim + d, concat_high(rounded_bf16(_mm512_sub_ps(a, ah)),
                                                        rounded_bf16(_mm512_sub_ps(b, bh))));
    }
}

//! nk float value rows (nk even) -> B operands (nk / 2, dim, 2) hi and lo.
inline void split_values(const float* const* rows, std::size_t nk, std::size_t dim,
                         std::uint16_t* vh, std::uint16_t* vl) noexcept {
  for (std::size_t p = 0; p < nk / 2; ++p)
    for (std::size_t d = 0; d < dim; d += 16) {
      const __m512 a = _mm512_loadu_ps(rows[2 * p] + d), b = _mm512_loadu_ps(rows[2 * p + 1] + d);
      const __m512 ah = rounded_bf16(a), bh = rounded_bf16(b);
      _mm512_storeu_si512(vh + (p * dim + d) * 2, interleave_high(ah, bh));
      _mm512_storeu_si512(
          vl + (p * dim + d) * 2,
          interleave_high(rounded_bf16(_mm512_sub_ps(a, ah)), rounded_bf16(_mm512_sub_ps(b, bh))));
    }
}

//! 32 elements of a stored row as two float vectors (fp16 rows).
KVCACHE_ALWAYS_INLINE void half32(const std::byte* p, __m512& a, __m512& b) noexcept {
  const __m512i x = _mm512_loadu_si512(p);
  a = _mm512_cvtph_ps(_mm512_castsi512_si256(x));
  b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(x, 1));
}

//! nk stored key rows of T (half or bfloat16) -> A operands, as split_keys
//! without the float copy: a bfloat16 row is its own hi (its lo is zero and
//! is neither written nor multiplied).
template <class T>
inline void split_key_rows(const std::byte* const* rows, std::size_t nk, std::size_t dim,
                           std::uint16_t* kh, std::uint16_t* kl) noexcept {
  for (std::size_t j = 0; j < nk; ++j)
    for (std::size_t d = 0; d < dim; d += 32) {
      const std::byte* p = rows[j] + 2 * d;
      if constexpr (std::is_same_v<T, bfloat16>) {
        _mm512_storeu_si512(kh + j * dim + d, _mm512_loadu_si512(p));
      } else {
        __m512 a, b;
        half32(p, a, b);
        const __m512 ah = rounded_bf16(a), bh = rounded_bf16(b);
        _mm512_storeu_si512(kh + j * dim + d, concat_high(ah, bh));
        _mm512_storeu_si512(kl + j * dim + d, concat_high(rounded_bf16(_mm512_sub_ps(a, ah)),
                                                          rounded_bf16(_mm512_sub_ps(b, bh))));
      }
    }
}

//! nk stored value rows of T (nk even) -> B operands, as split_values.
template <class T>
inline void split_value_rows(const std::byte* const* rows, std::size_t nk, std::size_t dim,
                             std::uint16_t* vh, std::uint16_t* vl) noexcept {
  for (std::size_t p = 0; p < nk / 2; ++p)
    for (std::size_t d = 0; d < dim; d += 32) {
      const std::byte* x = rows[2 * p] + 2 * d;
      const std::byte* y = rows[2 * p + 1] + 2 * d;
      std::uint16_t* h = vh + (p * dim + d) * 2;
      if constexpr (std::is_same_v<T, bfloat16>) {
        // Words of the two rows interleaved: dims d..d+15, then d+16..d+31.
        const __m512i lo = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003,
                                             0x00240004, 0x00250005, 0x00260006, 0x00270007,
                                             0x00280008, 0x00290009, 0x002a000a, 0x002b000b,
                                             0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        const __m512i a = _mm512_loadu_si512(x), b = _mm512_loadu_si512(y);
        _mm512_storeu_si512(h, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(h + 32, _mm512_permutex2var_epi16(a, hi, b));
      } else {
        __m512 a[2], b[2];
        half32(x, a[0], a[1]);
        half32(y, b[0], b[1]);
        for (std::size_t k = 0; k < 2; ++k) {
          const __m512 ah = rounded_bf16(a[k]), bh = rounded_bf16(b[k]);
          _mm512_storeu_si512(h + 32 * k, interleave_high(ah, bh));
          _mm512_storeu_si512(vl + (p * dim + d) * 2 + 32 * k,
                              interleave_high(rounded_bf16(_mm512_sub_ps(a[k], ah)),
                                              rounded_bf16(_mm512_sub_ps(b[k], bh))));
        }
      }
    }
}

//! St (nk, R) = K Qt for nk keys (a multiple of 32), rows R (a multiple of 32).
//! kl null: the keys' lo parts are zero (bf16 rows), two products per pair.
inline void scores(const std::uint16_t* qh, const std::uint16_t* ql, const std::uint16_t* kh,
                   const std::uint16_t* kl, float* St, std::size_t R, std::size_t nk,
                   std::size_t dim) noexcept {
  const long qs = static_cast<long>(R * 4), ks = static_cast<long>(dim * 2);
  for (std::size_t j0 = 0; j0 < nk; j0 += 32)
    for (std::size_t r0 = 0; r0 < R; r0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (std::size_t d0 = 0; d0 < dim; d0 += 32) {
        const std::uint16_t* h = qh + (d0 / 2 * R + r0) * 2;
        const std::uint16_t* l = ql + (d0 / 2 * R + r0) * 2;
        _tile_loadd(4, kh + j0 * dim + d0, ks);
        _tile_loadd(5, kh + (j0 + 16) * dim + d0, ks);
        _tile_loadd(6, h, qs);
        _tile_loadd(7, h + 32, qs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, l, qs);
        _tile_loadd(7, l + 32, qs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        if (!kl) continue;
        _tile_loadd(4, kl + j0 * dim + d0, ks);
        _tile_loadd(5, kl + (j0 + 16) * dim + d0, ks);
        _tile_loadd(6, h, qs);
        _tile_loadd(7, h + 32, qs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, St + j0 * R + r0, qs);
      _tile_stored(1, St + j0 * R + r0 + 16, qs);
      _tile_stored(2, St + (j0 + 16) * R + r0, qs);
      _tile_stored(3, St + (j0 + 16) * R + r0 + 16, qs);
    }
}

//! Weights Pt (nk, R) fp32 (nk a multiple of 32) -> A operands (R, nk) hi
//! and lo, 16 x 16 blocks transposed through a small buffer.
inline void split_weights(const float* Pt, std::size_t R, std::size_t nk, std::uint16_t* ph,
                          std::uint16_t* pl) noexcept {
  alignas(64) float t[16][32];
  for (std::size_t r0 = 0; r0 < R; r0 += 16)
    for (std::size_t j0 = 0; j0 < nk; j0 += 32) {
      // 32 keys x 16 rows -> 16 rows x 32 keys: scalar stores from each
      // vector would cost more than the 16 x 16 shuffle network below.
      for (std::size_t half = 0; half < 2; ++half) {
        __m512 v[16];
        for (std::size_t k = 0; k < 16; ++k)
          v[k] = _mm512_loadu_ps(Pt + (j0 + 16 * half + k) * R + r0);
        // 16 x 16 transpose: 4 rounds of 2 x 2 block swaps.
        __m512 w[16];
        for (std::size_t k = 0; k < 16; k += 2) {
          w[k] = _mm512_unpacklo_ps(v[k], v[k + 1]);
          w[k + 1] = _mm512_unpackhi_ps(v[k], v[k + 1]);
        }
        for (std::size_t k = 0; k < 16; k += 4)
          for (std::size_t i = 0; i < 2; ++i) {
            const __m512d a = _mm512_castps_pd(w[k + i]), b = _mm512_castps_pd(w[k + 2 + i]);
            v[k + i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            v[k + 2 + i] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
          }
        for (std::size_t k = 0; k < 16; k += 8)
          for (std::size_t i = 0; i < 4; ++i) {
            w[k + i] = _mm512_shuffle_f32x4(v[k + i], v[k + 4 + i], 0x88);
            w[k + 4 + i] = _mm512_shuffle_f32x4(v[k + i], v[k + 4 + i], 0xdd);
          }
        for (std::size_t i = 0; i < 8; ++i) {
          v[i] = _mm512_shuffle_f32x4(w[i], w[i + 8], 0x88);
          v[i + 8] = _mm512_shuffle_f32x4(w[i], w[i + 8], 0xdd);
        }
        // v[i] now holds row r0 + perm(i): rows in the order the rounds left.
        static constexpr std::size_t row_of[16] = {0, 2,  1, 3,  4,  6,  5,  7,
                                                   8, 10, 9, 11, 12, 14, 13, 15};
        for (std::size_t i = 0; i < 16; ++i) _mm512_store_ps(&t[row_of[i]][16 * half], v[i]);
      }
      for (std::size_t r = 0; r < 16; ++r) {
        const __m512 a = _mm512_load_ps(t[r]), b = _mm512_load_ps(t[r] + 16);
        const __m512 ah = rounded_bf16(a), bh = rounded_bf16(b);
        _mm512_storeu_si512(ph + (r0 + r) * nk + j0, concat_high(ah, bh));
        _mm512_storeu_si512(
            pl + (r0 + r) * nk + j0,
            concat_high(rounded_bf16(_mm512_sub_ps(a, ah)), rounded_bf16(_mm512_sub_ps(b, bh))));
      }
    }
}

//! O (R, dim) += P V: weights (R, nk) from split_weights, values (nk / 2,
//! dim, 2) from split_values; nk a multiple of 32. vl null: the values' lo
//! parts are zero.
inline void accumulate(const std::uint16_t* ph, const std::uint16_t* pl, const std::uint16_t* vh,
                       const std::uint16_t* vl, float* O, std::size_t R, std::size_t nk,
                       std::size_t dim) noexcept {
  const long os = static_cast<long>(dim * 4), ps = static_cast<long>(nk * 2), vs = os;
  for (std::size_t r0 = 0; r0 < R; r0 += 32)
    for (std::size_t d0 = 0; d0 < dim; d0 += 32) {
      float* o = O + r0 * dim + d0;
      _tile_loadd(0, o, os);
      _tile_loadd(1, o + 16, os);
      _tile_loadd(2, o + 16 * dim, os);
      _tile_loadd(3, o + 16 * dim + 16, os);
      for (std::size_t k0 = 0; k0 < nk; k0 += 32) {
        const std::uint16_t* h = vh + (k0 / 2 * dim + d0) * 2;
        const std::uint16_t* l = vl ? vl + (k0 / 2 * dim + d0) * 2 : nullptr;
        _tile_loadd(4, ph + r0 * nk + k0, ps);
        _tile_loadd(5, ph + (r0 + 16) * nk + k0, ps);
        _tile_loadd(6, h, vs);
        _tile_loadd(7, h + 32, vs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        if (vl) {
          _tile_loadd(6, l, vs);
          _tile_loadd(7, l + 32, vs);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
          _tile_loadd(6, h, vs);
          _tile_loadd(7, h + 32, vs);
        }
        _tile_loadd(4, pl + r0 * nk + k0, ps);
        _tile_loadd(5, pl + (r0 + 16) * nk + k0, ps);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, o, os);
      _tile_stored(1, o + 16, os);
      _tile_stored(2, o + 16 * dim, os);
      _tile_stored(3, o + 16 * dim + 16, os);
    }
}

#endif  // KVCACHE_HAS_AMX_BF16

}  // namespace detail::amx_bf16
}  // namespace v0
}  // namespace kvcache
