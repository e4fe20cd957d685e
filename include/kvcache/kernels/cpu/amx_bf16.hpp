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

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../detail/simd.hpp"
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
//! room to align the first to 64 bytes (on the shapes `usable` takes, every
//! buffer is a whole number of 64-byte lines, so the rest stay aligned).
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

//! 32 floats (a: elements 0-15, b: 16-31) split into bf16 hi and lo parts,
//! each 32 words in order: hi = a, b rounded to nearest in one instruction,
//! lo = the residues, rounded likewise.
KVCACHE_ALWAYS_INLINE void split32(__m512 a, __m512 b, __m512i& hi, __m512i& lo) noexcept {
  hi = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512 ha =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)), 16));
  const __m512 hb = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)), 16));
  lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
}

//! 32 words [x 0-15, y 0-15] -> pairs (x_i, y_i) in 32-bit lane i: the B
//! operands' layout, two rows of the contraction per lane.
KVCACHE_ALWAYS_INLINE __m512i pairs(__m512i w) noexcept {
  const __m512i index =
      _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                        0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001a000a, 0x001b000b,
                        0x001c000c, 0x001d000d, 0x001e000e, 0x001f000f);
  return _mm512_permutexvar_epi16(index, w);
}

//! Splits 32 consecutive elements (a, b) into hi and lo at h and l.
KVCACHE_ALWAYS_INLINE void store_split(__m512 a, __m512 b, std::uint16_t* h,
                                       std::uint16_t* l) noexcept {
  __m512i hi, lo;
  split32(a, b, hi, lo);
  _mm512_storeu_si512(h, hi);
  _mm512_storeu_si512(l, lo);
}
//! Splits 16 elements of two contraction rows (x, y) into pairs at h and l.
KVCACHE_ALWAYS_INLINE void store_split_pairs(__m512 x, __m512 y, std::uint16_t* h,
                                             std::uint16_t* l) noexcept {
  __m512i hi, lo;
  split32(x, y, hi, lo);
  _mm512_storeu_si512(h, pairs(hi));
  _mm512_storeu_si512(l, pairs(lo));
}

//! 16 elements at p as floats (float or fp16 rows).
KVCACHE_ALWAYS_INLINE __m512 load16(const float* p) noexcept { return _mm512_loadu_ps(p); }
KVCACHE_ALWAYS_INLINE __m512 load16(const half* p) noexcept {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

//! Qt (dim, R) fp32 -> B operands (dim / 2, R, 2), hi and lo.
inline void prepare_queries(const float* Qt, std::size_t R, std::size_t dim, std::uint16_t* qh,
                            std::uint16_t* ql) noexcept {
  for (std::size_t p = 0; p < dim / 2; ++p)
    for (std::size_t r = 0; r < R; r += 16)
      store_split_pairs(load16(Qt + 2 * p * R + r), load16(Qt + (2 * p + 1) * R + r),
                        qh + (p * R + r) * 2, ql + (p * R + r) * 2);
}

//! nk key rows of T (float, half or bfloat16) -> A operands (nk, dim) hi and
//! lo, row-major. A bfloat16 row is its own hi part (its lo is zero, neither
//! written nor multiplied).
//! next: the next tile's n_next key rows, requested into L2 a line per step
//! (the rows come from memory in a cascade's shared pass, and a burst of
//! requests at the start of a tile stalled more than it hid).
template <class T>
inline void split_keys(const T* const* rows, std::size_t nk, std::size_t dim, std::uint16_t* kh,
                       std::uint16_t* kl, const T* const* next = nullptr,
                       std::size_t n_next = 0) noexcept {
  constexpr std::size_t line = 64 / sizeof(T);  // elements per prefetched line
  for (std::size_t j = 0; j < nk; ++j)
    for (std::size_t d = 0; d < dim; d += 32) {
      for (std::size_t e = d; j < n_next && e < d + 32; e += line)
        _mm_prefetch(reinterpret_cast<const char*>(next[j] + e), _MM_HINT_T1);
      const T* p = rows[j] + d;
      if constexpr (std::is_same_v<T, bfloat16>)
        _mm512_storeu_si512(kh + j * dim + d, _mm512_loadu_si512(p));
      else
        store_split(load16(p), load16(p + 16), kh + j * dim + d, kl + j * dim + d);
    }
}

//! nk value rows of T (nk even) -> B operands (nk / 2, dim, 2) hi and lo;
//! next as for split_keys.
template <class T>
inline void split_values(const T* const* rows, std::size_t nk, std::size_t dim, std::uint16_t* vh,
                         std::uint16_t* vl, const T* const* next = nullptr,
                         std::size_t n_next = 0) noexcept {
  constexpr std::size_t line = 64 / sizeof(T);
  for (std::size_t p = 0; p < nk / 2; ++p)
    for (std::size_t d = 0; d < dim; d += 16) {
      if (d % line == 0)
        for (std::size_t i = 2 * p; i < std::min(2 * p + 2, n_next); ++i)
          _mm_prefetch(reinterpret_cast<const char*>(next[i] + d), _MM_HINT_T1);
      const T* x = rows[2 * p] + d;
      const T* y = rows[2 * p + 1] + d;
      std::uint16_t* h = vh + (p * dim + d) * 2;
      if constexpr (std::is_same_v<T, bfloat16>) {
        const __m512i w = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y)), 1);
        _mm512_storeu_si512(h, pairs(w));
      } else {
        store_split_pairs(load16(x), load16(y), h, vl + (p * dim + d) * 2);
      }
    }
}

// Tile registers of both products: a 2 x 2 block of C tiles in tmm0-3
// ((0, 0), (0, 1), (1, 0), (1, 1)), its two A operands in tmm4-5 and its two
// B operands in tmm6-7, each 16 rows of 64 bytes.
KVCACHE_ALWAYS_INLINE void load_a(const void* a0, const void* a1, long stride) noexcept {
  KVCACHE_TILE_LOAD(4, a0, stride);
  KVCACHE_TILE_LOAD(5, a1, stride);
}
KVCACHE_ALWAYS_INLINE void load_b(const void* b0, const void* b1, long stride) noexcept {
  KVCACHE_TILE_LOAD(6, b0, stride);
  KVCACHE_TILE_LOAD(7, b1, stride);
}
//! C(i, j) += A(i) B(j) for the block's four tiles.
KVCACHE_ALWAYS_INLINE void products() noexcept {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}
//! The block's C tiles at c: `right` floats to (0, 1), `down` to (1, 0).
KVCACHE_ALWAYS_INLINE void load_c(const float* c, long stride, std::size_t right,
                                  std::size_t down) noexcept {
  KVCACHE_TILE_LOAD(0, c, stride);
  KVCACHE_TILE_LOAD(1, c + right, stride);
  KVCACHE_TILE_LOAD(2, c + down, stride);
  KVCACHE_TILE_LOAD(3, c + down + right, stride);
}
KVCACHE_ALWAYS_INLINE void store_c(float* c, long stride, std::size_t right,
                                   std::size_t down) noexcept {
  KVCACHE_TILE_STORE(0, c, stride);
  KVCACHE_TILE_STORE(1, c + right, stride);
  KVCACHE_TILE_STORE(2, c + down, stride);
  KVCACHE_TILE_STORE(3, c + down + right, stride);
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
        load_a(kh + j0 * dim + d0, kh + (j0 + 16) * dim + d0, ks);
        load_b(h, h + 32, qs);
        products();  // kh qh
        load_b(l, l + 32, qs);
        products();  // kh ql
        if (!kl) continue;
        load_a(kl + j0 * dim + d0, kl + (j0 + 16) * dim + d0, ks);
        load_b(h, h + 32, qs);
        products();  // kl qh
      }
      store_c(St + j0 * R + r0, qs, 16, 16 * R);
    }
}

//! Weights Pt (nk, R) fp32 (nk a multiple of 32) -> A operands (R, nk) hi
//! and lo, transposed 16 x 16 at a time through a small buffer.
inline void split_weights(const float* Pt, std::size_t R, std::size_t nk, std::uint16_t* ph,
                          std::uint16_t* pl) noexcept {
  alignas(64) float t[16][32];
  for (std::size_t r0 = 0; r0 < R; r0 += 16)
    for (std::size_t j0 = 0; j0 < nk; j0 += 32) {
      // 32 keys x 16 rows -> 16 rows x 32 keys, in two 16 x 16 transposes.
      for (std::size_t half = 0; half < 2; ++half) {
        simd::vf v[16];
        for (std::size_t k = 0; k < 16; ++k) v[k] = simd::load(Pt + (j0 + 16 * half + k) * R + r0);
        simd::transpose16(v);
        for (std::size_t r = 0; r < 16; ++r) simd::store(&t[r][16 * half], v[r]);
      }
      for (std::size_t r = 0; r < 16; ++r)
        store_split(_mm512_load_ps(t[r]), _mm512_load_ps(t[r] + 16), ph + (r0 + r) * nk + j0,
                    pl + (r0 + r) * nk + j0);
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
      load_c(o, os, 16, 16 * dim);
      for (std::size_t k0 = 0; k0 < nk; k0 += 32) {
        const std::uint16_t* h = vh + (k0 / 2 * dim + d0) * 2;
        load_a(ph + r0 * nk + k0, ph + (r0 + 16) * nk + k0, ps);
        load_b(h, h + 32, vs);
        products();  // ph vh
        if (vl) {
          const std::uint16_t* l = vl + (k0 / 2 * dim + d0) * 2;
          load_b(l, l + 32, vs);
          products();  // ph vl
          load_b(h, h + 32, vs);
        }
        load_a(pl + r0 * nk + k0, pl + (r0 + 16) * nk + k0, ps);
        products();  // pl vh
      }
      store_c(o, os, 16, 16 * dim);
    }
}

#endif  // KVCACHE_HAS_AMX_BF16

}  // namespace detail::amx_bf16
}  // namespace v0
}  // namespace kvcache
