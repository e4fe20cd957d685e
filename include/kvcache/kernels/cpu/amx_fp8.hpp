// FP8 (e4m3) decode on the AMX tile unit in bf16 (tdpbf16ps: 16 x 32 by
// 32 x 16 bf16 products into 16 x 16 fp32 sums).
//
// Every e4m3 value is a bf16 exactly (3 mantissa bits of bf16's 7, and
// e4m3's smallest subnormal, 2^-9, is a bf16 normal), so codes become bf16
// operands by two 128-entry table lookups (vpermi2b: low and high byte) and
// the sign bit. The fp32 operands (the query, each softmax weight times its
// token's block scale) are split in two bf16 parts, x = hi + lo, to within
// 2^-16 of x (amx_bf16.hpp), and both parts go into the same product: the
// tile unit sums them in fp32. That split is the kernel's own error (up to
// 1.3e-5 on the outlier data of docs/quantization.md, where the float path
// it replaces gives 1.1e-6); it is held to the same 1e-4.
//
// Layouts, for a 32-token tile (tile_tokens) and 4 heads:
//   scores: A = key rows as bf16, 16 tokens x 32 dimensions: each 64-code
//           chunk of a row gives two A tiles, its codes' low (s = 0) and high
//           (s = 1) halves of every 128-bit lane (the byte unpacks' order:
//           column k of tile 2 c + s holds dimension 64 c + 16 (k / 8) +
//           8 s + k % 8). B = the query in the same order, pairs of
//           dimensions by columns 8 p + 2 h + j (part p of head h, zero
//           outside the chunk's segment j), so each chunk's two products sum
//           into one C tile laid out as the integer path's (amx.hpp), whose
//           epilogue applies the block scales;
//   P.V:    A = weights, rows 8 sl + 2 h + p over 32 tokens, B = value rows
//           in pairs of tokens with columns in the integer path's order
//           (column n of tile j of chunk c is dimension 64 c + 16 (n / 4) +
//           4 j + n % 4), so amx::unpermute_output restores the outputs.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../../precision/block.hpp"
#include "amx.hpp"
#include "amx_bf16.hpp"
#include "prefetch.hpp"

// AMX-BF16 and AVX512-BF16 (amx_bf16.hpp), and AVX512-VBMI for the lookups.
#if KVCACHE_HAS_AMX_BF16 && defined(__AVX512VBMI__)
#define KVCACHE_HAS_AMX_FP8 1
#else
#define KVCACHE_HAS_AMX_FP8 0
#endif

namespace kvcache {
inline namespace v0 {
namespace detail::amx_fp8 {

//! The formats this path computes: e4m3 with any block size.
template <class F>
constexpr bool supported_format() noexcept {
  return F::kind == block_kind::fp8_e4m3;
}
//! Whether this build has the path.
inline constexpr bool built = KVCACHE_HAS_AMX_FP8;
//! Shapes, checked at run time: whole 64-dimension chunks, at most 256 (the
//! epilogue's registers), query heads in groups of 4 (the B tiles' columns).
constexpr bool supported_shape(std::size_t dim, std::size_t g) noexcept {
  return dim % 64 == 0 && dim <= amx::max_dim && g % 4 == 0 && g <= amx::max_group;
}

//! The bf16 bits of the e4m3 magnitude code c (0..127; 127 is NaN, which
//! appends reject, so it never reaches a kernel).
constexpr std::uint16_t e4m3_bf16(unsigned c) noexcept {
  const unsigned e = c >> 3, m = c & 7u;
  if (c == 0x7fu) return 0x7fc0;
  if (e != 0) return static_cast<std::uint16_t>(((e + 120u) << 7) | (m << 4));
  if (m == 0) return 0;
  const unsigned k = m >= 4 ? 2 : m >= 2 ? 1 : 0;  // m 2^-9 = 2^(k - 9) (m / 2^k)
  return static_cast<std::uint16_t>(((118u + k) << 7) | ((m - (1u << k)) << (7 - k)));
}
//! A whole code's bf16 bits (the sign is bit 7 of the code, bit 15 of bf16).
constexpr std::uint16_t e4m3_bf16_bits(std::uint8_t code) noexcept {
  return static_cast<std::uint16_t>(e4m3_bf16(code & 0x7fu) | ((code & 0x80u) << 8));
}

//! The lookup tables: low and high bytes of e4m3_bf16 for the 128 magnitudes.
struct tables {
  alignas(64) std::array<std::uint8_t, 128> lo, hi;
};
inline constexpr tables bf16_tables = [] {
  tables t{};
  for (unsigned c = 0; c < 128; ++c) {
    t.lo[c] = static_cast<std::uint8_t>(e4m3_bf16(c) & 0xffu);
    t.hi[c] = static_cast<std::uint8_t>(e4m3_bf16(c) >> 8);
  }
  return t;
}();

//! Bytes of one item's query tiles: per group of 4 heads and 32 dimensions,
//! a 16 x 64-byte B tile.
constexpr std::size_t query_bytes(std::size_t g, std::size_t dim) noexcept {
  return (g / 4) * (dim / 32) * 1024;
}
//! Tokens of a decode tile: 32, one tdpbf16ps's depth in P.V. The bf16
//! buffers are twice the integer path's, and 64-token tiles (two P.V
//! products per C tile) pushed the rows being read out of L1: 32k from DRAM,
//! 42-44 against 36-37 ns per token and KV head per thread.
inline constexpr std::size_t tile_tokens = 32;

//! The prefetch_cursor::issue() calls a full tile makes for g heads: value
//! tiles (one per pair of tokens), scores (one per token), weights (per head
//! and 32 dimensions) and epilogue (per head and chunk).
constexpr std::size_t issue_steps(std::size_t g, std::size_t dim) noexcept {
  return tile_tokens / 2 + tile_tokens + g * (dim / 32) + g * (dim / 64);
}

//! The per-task scratch: key rows as bf16 (tile_tokens x dim), C tiles
//! (4 KiB), weight tiles (dim / 64 KiB) and value tiles (dim / 64 x 4 KiB).
struct tile_scratch {
  std::byte* base = nullptr;
  std::size_t dim = 0;
  static constexpr std::size_t bytes(std::size_t dim) noexcept {
    return 2 * tile_tokens * dim + 4096 + (dim / 64) * 5 * 1024;
  }
  std::uint16_t* keys() const noexcept { return reinterpret_cast<std::uint16_t*>(base); }
  std::int32_t* c() const noexcept {
    return reinterpret_cast<std::int32_t*>(base + 2 * tile_tokens * dim);
  }
  std::uint16_t* weights() const noexcept {
    return reinterpret_cast<std::uint16_t*>(base + 2 * tile_tokens * dim + 4096);
  }
  std::uint16_t* values() const noexcept { return weights() + (dim / 64) * 512; }
};

//! One item's query tiles (query_bytes at base).
struct query_tiles {
  std::byte* base = nullptr;
  std::size_t parts = 0;  // dim / 32 B tiles per group
  const std::uint16_t* b(std::size_t grp, std::size_t a) const noexcept {
    return reinterpret_cast<const std::uint16_t*>(base + (grp * parts + a) * 1024);
  }
};

#if KVCACHE_HAS_AMX_FP8

//! 64 e4m3 codes -> the low and high bytes of their bf16s (two lookups, the
//! sign bit or-ed into the high byte; vpermi2b ignores index bit 7).
KVCACHE_ALWAYS_INLINE void bf16_bytes(__m512i codes, __m512i& lo, __m512i& hi) noexcept {
  const __m512i lo0 = _mm512_load_si512(bf16_tables.lo.data());
  const __m512i lo1 = _mm512_load_si512(bf16_tables.lo.data() + 64);
  const __m512i hi0 = _mm512_load_si512(bf16_tables.hi.data());
  const __m512i hi1 = _mm512_load_si512(bf16_tables.hi.data() + 64);
  lo = _mm512_permutex2var_epi8(lo0, codes, lo1);
  // hi | (codes & 0x80)
  hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, codes, hi1), codes,
                                 _mm512_set1_epi8(static_cast<char>(0x80)), 0xf8);
}

//! Splits g query heads (g x dim floats) into B tiles at `base`, 16
//! elements per vector: x = hi + lo, hi and lo bf16s rounded to nearest.
inline query_tiles prepare_query(const float* q, std::size_t g, std::size_t dim,
                                 std::byte* base) noexcept {
  query_tiles t{base, dim / 32};
  std::memset(base, 0, query_bytes(g, dim));
  for (std::size_t h = 0; h < g; ++h) {
    const std::size_t grp = h / 4, hl = h % 4;
    for (std::size_t d0 = 0; d0 < dim; d0 += 16) {
      const __m512 x = _mm512_loadu_ps(q + h * dim + d0);
      const __m256i hi = (__m256i)_mm512_cvtneps_pbh(x);
      const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back));
      alignas(32) std::uint16_t parts[2][16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[0]), hi);
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[1]), lo);
      // Dimensions 64 c + 16 L + 8 s + i are column k = 8 L + i of tile
      // 2 c + s: pairs i, i + 1 share row k / 2, in column (part, head, segment).
      const std::size_t c = d0 / 64, L = (d0 % 64) / 16, j = L / 2;
      for (std::size_t s = 0; s < 2; ++s) {
        auto* B = reinterpret_cast<std::uint16_t*>(base + (grp * t.parts + 2 * c + s) * 1024);
        for (std::size_t i = 0; i < 8; i += 2)
          for (std::size_t p = 0; p < 2; ++p)
            std::memcpy(B + (4 * L + i / 2) * 32 + 2 * (8 * p + 2 * hl + j), parts[p] + 8 * s + i,
                        4);
      }
    }
  }
  return t;
}

//! 64 codes as bf16 in the byte unpacks' order: out[0..31] the low 8 codes of
//! each 128-bit lane, out[32..63] the high 8 (a test checks every code).
KVCACHE_ALWAYS_INLINE void bf16_codes(const std::uint8_t* codes, std::uint16_t* out) noexcept {
  __m512i lo, hi;
  bf16_bytes(_mm512_loadu_si512(codes), lo, hi);
  _mm512_storeu_si512(out, _mm512_unpacklo_epi8(lo, hi));
  _mm512_storeu_si512(out + 32, _mm512_unpackhi_epi8(lo, hi));
}

//! A tile's key rows as bf16 A tiles in keys (slot t at t x dim; a
//! quarter's empty slots repeat its last row). Done before the value tiles so
//! that the stores reach the cache before the tile loads (amx::unpack_keys).
KVCACHE_ALWAYS_INLINE void unpack_keys(const amx::tile_quarters& tq, std::size_t rb,
                                       std::size_t dim, std::uint16_t* keys) noexcept {
  for (std::size_t j = 0; j < tq.count; ++j)
    for (std::size_t r = 0; r < 16; ++r) {
      const auto* row =
          reinterpret_cast<const std::uint8_t*>(tq.k[j] + std::min(r, tq.n[j] - 1) * rb);
      std::uint16_t* out = keys + (16 * j + r) * dim;
      for (std::size_t c = 0; c < dim / 64; ++c) bf16_codes(row + 64 * c, out + 64 * c);
    }
}

//! Value tiles of a tile's rows (empty slots repeat their quarter's last
//! row, or the tile's, so that every operand is finite: their weights are
//! 0) into bbuf: (dim / 64 chunks, 4 tiles of 16 rows of 64 bytes), row r
//! holding slots 2 r and 2 r + 1.
KVCACHE_ALWAYS_INLINE void value_tiles(const amx::tile_quarters& tq, std::size_t rb,
                                       std::size_t dim, std::uint16_t* bbuf,
                                       detail::prefetch_cursor& pf) noexcept {
  const std::size_t chunks = dim / 64;
  for (std::size_t r = 0; r < tile_tokens / 2; ++r) {
    pf.issue();
    // Slots 2 r and 2 r + 1, in quarter j; a quarter without rows takes the
    // tile's last row.
    const std::size_t j = r / 8, jq = std::min(j, tq.count - 1), last = tq.n[jq] - 1;
    const std::byte* base = j < tq.count ? tq.v[jq] : tq.v[jq] + last * rb;
    const std::size_t cap = j < tq.count ? last : 0, t = 2 * (r % 8);
    const auto* r0 = reinterpret_cast<const std::uint8_t*>(base + std::min(t, cap) * rb);
    const auto* r1 = reinterpret_cast<const std::uint8_t*>(base + std::min(t + 1, cap) * rb);
    for (std::size_t c = 0; c < chunks; ++c) {
      const __m512i x0 = _mm512_loadu_si512(r0 + 64 * c), x1 = _mm512_loadu_si512(r1 + 64 * c);
      // Codes of the two tokens interleaved, then each byte's bf16: the
      // words alternate tokens, as a B tile's pairs do.
      const __m512i pair[2] = {_mm512_unpacklo_epi8(x0, x1), _mm512_unpackhi_epi8(x0, x1)};
      std::uint16_t* out = bbuf + c * 2048 + r * 32;
      for (std::size_t k = 0; k < 2; ++k) {
        __m512i lo, hi;
        bf16_bytes(pair[k], lo, hi);
        _mm512_storeu_si512(out + (2 * k) * 512, _mm512_unpacklo_epi8(lo, hi));
        _mm512_storeu_si512(out + (2 * k + 1) * 512, _mm512_unpackhi_epi8(lo, hi));
      }
    }
  }
}

//! Scores of 16 rows (n valid) for g heads into sc (g rows, sc_stride apart),
//! -inf past n; A: the rows as bf16 (dim apart), cbuf: (dim / 64) x 1 KiB.
template <class F>
KVCACHE_ALWAYS_INLINE void half_scores(const std::byte* K, std::size_t rb, std::size_t n,
                                       std::size_t g, std::size_t dim, const query_tiles& q,
                                       const std::uint16_t* A, std::int32_t* cbuf, float* sc,
                                       std::size_t sc_stride,
                                       detail::prefetch_cursor& pf) noexcept {
  const long stride = static_cast<long>(2 * dim);
  for (std::size_t grp = 0; grp < g / 4; ++grp) {
    // A chunk's two products into one C tile; loads alternate registers, so
    // a load does not wait for the product that read the register before.
    for (std::size_t c = 0; c < dim / 64; ++c) {
      KVCACHE_TILE_LOAD(0, A + 64 * c, stride);
      KVCACHE_TILE_LOAD(2, q.b(grp, 2 * c), 64);
      KVCACHE_TILE_LOAD(1, A + 64 * c + 32, stride);
      KVCACHE_TILE_LOAD(3, q.b(grp, 2 * c + 1), 64);
      if (c % 2 == 0) {
        _tile_zero(4);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(4, 1, 3);
        KVCACHE_TILE_STORE(4, cbuf + 256 * c, 64);
      } else {
        _tile_zero(5);
        _tile_dpbf16ps(5, 0, 2);
        _tile_dpbf16ps(5, 1, 3);
        KVCACHE_TILE_STORE(5, cbuf + 256 * c, 64);
      }
    }
    amx::group_scores<F, true>(K, rb, n, dim, nullptr, grp, cbuf, sc + 4 * grp * sc_stride,
                               sc_stride, pf);
  }
}

//! o = o x corr + p V over a tile of n <= tile_tokens rows for 4 heads: p (4,
//! pstride) weights (read up to n, rounded up to 16), vs (dim / G,
//! tile_tokens) the rows' block scales (0 past n), bbuf from value_tiles, o
//! in amx::unpermute_output's order. abuf: the weight tiles, cbuf 4 KiB.
template <class F>
KVCACHE_ALWAYS_INLINE void tile_values(std::size_t dim, std::size_t n, const float* p,
                                       std::size_t pstride, const float* vs, const float* corr,
                                       float* o, std::size_t ostride, const std::uint16_t* bbuf,
                                       std::uint16_t* abuf, std::int32_t* cbuf,
                                       detail::prefetch_cursor& pf) noexcept {
  constexpr std::size_t G = F::group, T = tile_tokens;
  const std::size_t chunks = dim / 64;
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (std::size_t h = 0; h < 4; ++h) {
    // Parts past n: their scores are -inf and were not exponentiated.
    __m512 w[2];
    for (std::size_t k = 0; k < 2; ++k)
      w[k] = 16 * k < n ? _mm512_loadu_ps(p + h * pstride + 16 * k) : _mm512_setzero_ps();
    for (std::size_t sg = 0; sg < dim / 32; ++sg) {
      pf.issue();
      // x = w scale = hi + lo: hi its top 16 bits (a bf16 exactly), lo the
      // rest rounded to bf16.
      __m512 hi[2], lo[2];
      for (std::size_t k = 0; k < 2; ++k) {
        const __m512 x = _mm512_mul_ps(w[k], _mm512_loadu_ps(vs + T * (32 * sg / G) + 16 * k));
        hi[k] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top));
        lo[k] = _mm512_sub_ps(x, hi[k]);
      }
      std::uint16_t* row = abuf + ((sg / 2) * 16 + 8 * (sg % 2) + 2 * h) * 32;
      _mm512_storeu_si512(row, (__m512i)_mm512_cvtne2ps_pbh(hi[1], hi[0]));
      _mm512_storeu_si512(row + 32, (__m512i)_mm512_cvtne2ps_pbh(lo[1], lo[0]));
    }
  }
  for (std::size_t c = 0; c < chunks; ++c) {
    amx::value_products<true>(abuf, bbuf, 1, chunks, c, cbuf);
    const float* C = reinterpret_cast<const float*>(cbuf);
    for (std::size_t h = 0; h < 4; ++h) {
      pf.issue();
      const __m512 cr = _mm512_set1_ps(corr[h]);
      for (std::size_t j = 0; j < 4; ++j) {
        // Columns 0-7 lie in the chunk's first segment (rows 2 h + p), 8-15
        // in its second (rows 8 + 2 h + p); the parts sum.
        const float* Cj = C + 256 * j;
        const __m512 hi =
            _mm512_mask_loadu_ps(_mm512_loadu_ps(Cj + 16 * (2 * h)), 0xff00, Cj + 16 * (8 + 2 * h));
        const __m512 lo = _mm512_mask_loadu_ps(_mm512_loadu_ps(Cj + 16 * (2 * h + 1)), 0xff00,
                                               Cj + 16 * (8 + 2 * h + 1));
        float* dst = o + h * ostride + 64 * c + 16 * j;
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_loadu_ps(dst), cr, _mm512_add_ps(hi, lo)));
      }
    }
  }
}

#else

inline query_tiles prepare_query(const float*, std::size_t, std::size_t, std::byte*) noexcept {
  return {};
}

#endif  // KVCACHE_HAS_AMX_FP8

}  // namespace detail::amx_fp8
}  // namespace v0
}  // namespace kvcache
