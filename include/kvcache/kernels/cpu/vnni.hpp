// Integer Q.K scores and P.V sums for integer block formats with AVX-512 VNNI
// (vpdpbusd: 64 unsigned-byte x signed-byte products summed into 16 int32
// lanes per instruction, 4x the multiply-adds of an fp32 FMA; vpdpwssd: 32
// int16 products). Q.K first; P.V has its own section below.
//
// Lanes are tokens. Each 16-row half of a tile is unpacked to one unsigned byte per
// element (int8 codes + 128, int4 and int2 codes as stored) in a fixed order
// of elements per format, and transposed so that vector c holds 4 consecutive
// bytes ("column" c) of every row. Each query head is quantized once per item
// to the same column order, per block of the K format:
//   q ~= sq x (hi + lo / 256),  hi, lo int8,  sq = amax / 127
// (two bytes per element: the error, 2^-8 of int8's, is what keeps the
// scores within the stated bound; see below). Then for block b of head h
//   A = 256 x sum(u x hi) + sum(u x lo)       int32, u = code + offset
//   score += scale_b x sq / 256 x (A - offset x 256 x sum(hi) - offset x sum(lo))
//           + min_b x sq x (sum(hi) + sum(lo) / 256)
// with the offset terms folded into the accumulators' starting values.
// Bound: the query rounding is at most sq / 512 per element, 2^-16 of the
// block's largest |q|, so a score moves by at most 2^-16 x sum over blocks of
// amax_b(q) x sum |k|. Measured: within 1e-4 of float64 on unit-normal data,
// within 4e-4 on keys with x15 outlier channels; the tests hold this path to
// 1e-3 (decode_error_bound in decode_quant.hpp), half the 2e-3 an
// integer-dot kernel may add.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../../detail/simd.hpp"
#include "../../precision/block.hpp"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define KVCACHE_HAS_VNNI 1
#include <immintrin.h>
#else
#define KVCACHE_HAS_VNNI 0
#endif

namespace kvcache {
inline namespace v0 {
namespace detail::vnni {

//! Formats with integer codes whose scores the VNNI path computes, and the
//! head_dims it handles (whole 64-byte unpacked chunks).
template <class F>
constexpr bool supported_format() noexcept {
  return F::kind == block_kind::int8_sym || F::kind == block_kind::int4_sym ||
         F::kind == block_kind::int4_asym || F::kind == block_kind::int2_asym;
}
template <class F>
constexpr bool values_supported() noexcept {
  return F::kind == block_kind::int8_sym || F::kind == block_kind::int4_sym ||
         F::kind == block_kind::int4_asym;
}

template <class F>
constexpr bool supported_dim(std::size_t dim) noexcept {
  return F::bits == 8 ? dim % 64 == 0 : dim % 128 == 0;
}
//! u = code + offset is what the kernel multiplies; value = scale (u - offset) + min.
template <class F>
constexpr int offset() noexcept {
  return F::kind == block_kind::int8_sym ? 128 : F::kind == block_kind::int4_sym ? 8 : 0;
}

//! The element index held by unpacked byte p of a row (see unpack_row).
template <class F>
constexpr std::size_t element_of(std::size_t p) noexcept {
  if constexpr (F::bits == 8) {
    return p;
  } else if constexpr (F::bits == 4) {
    // 64 code bytes (4 blocks of 32) unpack to low nibbles, then high nibbles;
    // 16-byte lane L is block L.
    const std::size_t k = p / 128, q = p % 128, half = q / 64, r = q % 64;
    return (4 * k + r / 16) * 32 + 16 * half + r % 16;
  } else {
    // 32 code bytes (4 blocks of 8) unpack to 4 shifts; shift s of block b's
    // byte j is element 8 s + j of block b.
    const std::size_t k = p / 128, q = p % 128, s = q / 32, r = q % 32;
    return (4 * k + r / 8) * 32 + 8 * s + r % 8;
  }
}

//! Per-head quantized query, in column order. Layout in scratch (int32 units):
//!   hi[cols], lo[cols]          4 int8 each
//!   init_hi[nb], init_lo[nb]    accumulator starting values (offset terms)
//!   sq[nb], qsum[nb]            floats: block scale / 256, and sum of q as quantized
struct query_view {
  std::int32_t* base;
  std::size_t cols, nb;
  std::int32_t* hi() const noexcept { return base; }
  std::int32_t* lo() const noexcept { return base + cols; }
  std::int32_t* init_hi() const noexcept { return base + 2 * cols; }
  std::int32_t* init_lo() const noexcept { return base + 2 * cols + nb; }
  float* sq() const noexcept { return reinterpret_cast<float*>(base + 2 * cols + 2 * nb); }
  float* qsum() const noexcept { return reinterpret_cast<float*>(base + 2 * cols + 3 * nb); }
  static std::size_t words(std::size_t dim, std::size_t group) noexcept {
    return 2 * (dim / 4) + 4 * (dim / group);
  }
};

template <class F>
void quantize_query(const float* q, std::size_t dim, const query_view& v) noexcept {
  constexpr std::size_t G = F::group;
  const std::size_t nb = dim / G;
  constexpr int off = offset<F>();
  float inv[64] = {}, sq[64] = {};  // nb <= 64 (dim <= 2048 at G = 32)
  for (std::size_t b = 0; b < nb; ++b) {
    float amax = 0.f;
    for (std::size_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(q[b * G + i]));
    sq[b] = amax / 127.f;
    inv[b] = amax > 0.f ? 127.f / amax : 0.f;
    v.init_hi()[b] = 0;
    v.init_lo()[b] = 0;
  }
  auto* hi = reinterpret_cast<std::int8_t*>(v.hi());
  auto* lo = reinterpret_cast<std::int8_t*>(v.lo());
  float qs[64] = {};  // per block: sum of 256 hi + lo
  for (std::size_t p = 0; p < dim; ++p) {
    const std::size_t e = element_of<F>(p), b = e / G;
    const float x = q[e] * inv[b];
    const float h = std::nearbyint(x);
    const float l = max_f(-127.f, min_f(127.f, std::nearbyint((x - h) * 256.f)));
    hi[p] = static_cast<std::int8_t>(h);
    lo[p] = static_cast<std::int8_t>(l);
    v.init_hi()[b] -= off * static_cast<int>(h);
    v.init_lo()[b] -= off * static_cast<int>(l);
    qs[b] += h * 256.f + l;
  }
  for (std::size_t b = 0; b < nb; ++b) {
    v.sq()[b] = sq[b] / 256.f;
    v.qsum()[b] = qs[b] * sq[b] / 256.f;  // the block's sum of q as quantized
  }
}

//! The columns of each block: col_of[start[b] .. start[b + 1]) are the
//! columns whose elements lie in block b. start: nb + 1 entries.
template <class F>
void block_columns(std::size_t dim, std::uint16_t* col_of, std::uint32_t* start) noexcept {
  constexpr std::size_t G = F::group;
  const std::size_t cols = dim / 4, nb = dim / G;
  for (std::size_t b = 0; b <= nb; ++b) start[b] = 0;
  for (std::size_t c = 0; c < cols; ++c) ++start[element_of<F>(4 * c) / G + 1];
  for (std::size_t b = 0; b < nb; ++b) start[b + 1] += start[b];
  for (std::size_t b = 0; b < nb; ++b)
    for (std::size_t c = 0, k = start[b]; c < cols; ++c)
      if (element_of<F>(4 * c) / G == b) col_of[k++] = static_cast<std::uint16_t>(c);
}

#if KVCACHE_HAS_VNNI

//! In-register 16 x 16 transpose of 32-bit elements: r[i] lane j -> r[j] lane i.
KVCACHE_ALWAYS_INLINE void transpose16(__m512i* r) noexcept {
  __m512i a[16], b[16];
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    b[4 * k + 0] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
    b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
  }
  // b[4k + j], 128-bit lane L: column 4L + j of rows 4k .. 4k + 3.
  for (int j = 0; j < 4; ++j) {
    const __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44);
    const __m512i c2 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xee);
    const __m512i d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
    const __m512i d2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xee);
    r[j] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(c1, d1, 0xdd);
    r[8 + j] = _mm512_shuffle_i32x4(c2, d2, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(c2, d2, 0xdd);
  }
}

//! Unpacked bytes [64 u, 64 u + 64) of a row (u-th chunk), in element_of order.
template <class F>
KVCACHE_ALWAYS_INLINE __m512i unpack_chunk(const std::uint8_t* codes, std::size_t u) noexcept {
  if constexpr (F::bits == 8) {
    const __m512i x = _mm512_loadu_si512(codes + 64 * u);
    return _mm512_xor_si512(x, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (F::bits == 4) {
    const __m512i x = _mm512_loadu_si512(codes + 64 * (u / 2));
    const __m512i m = _mm512_set1_epi8(0x0f);
    return u % 2 == 0 ? _mm512_and_si512(x, m) : _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
  } else {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * (u / 2)));
    const __m256i m = _mm256_set1_epi8(0x03);
    const int s = 4 * static_cast<int>(u % 2);  // shifts 2s/2 and 2s/2 + 1: bits s, s + 2
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(x, s), m);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, s + 2), m);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

//! Unpacks and transposes a tile of up to 16 rows (stride rb; rows past n
//! repeat row n - 1) into T: (dim / 4) vectors, vector c = column c of every row.
template <class F>
KVCACHE_ALWAYS_INLINE void unpack_tile(const std::byte* K, std::size_t rb, std::size_t n,
                                       std::size_t dim, __m512i* T) noexcept {
  for (std::size_t u = 0; u < dim / 64; ++u) {
    __m512i r[16];
    for (std::size_t t = 0; t < 16; ++t)
      r[t] = unpack_chunk<F>(reinterpret_cast<const std::uint8_t*>(K + std::min(t, n - 1) * rb), u);
    transpose16(r);
    for (std::size_t j = 0; j < 16; ++j) _mm512_store_si512(T + 16 * u + j, r[j]);
  }
}

//! Scores of the tile in T for HB heads; lanes are tokens. scales, mins:
//! (nb, 16) floats of the tile's rows. sc: (HB, 16) floats, -inf past n.
template <class F, std::size_t HB>
KVCACHE_ALWAYS_INLINE void tile_scores(std::size_t n, std::size_t dim, const query_view* q,
                                       const __m512i* T, const std::uint16_t* col_of,
                                       const std::uint32_t* start, const float* scales,
                                       const float* mins, float* sc,
                                       std::size_t sc_stride) noexcept {
  constexpr std::size_t G = F::group;
  const std::size_t nb = dim / G;
  (void)mins;
  __m512 score[HB];
  for (std::size_t h = 0; h < HB; ++h) score[h] = _mm512_setzero_ps();
  for (std::size_t b = 0; b < nb; ++b) {
    __m512i ah[HB], al[HB];
    for (std::size_t h = 0; h < HB; ++h) {
      ah[h] = _mm512_set1_epi32(q[h].init_hi()[b]);
      al[h] = _mm512_set1_epi32(q[h].init_lo()[b]);
    }
    for (std::size_t k = start[b]; k < start[b + 1]; ++k) {
      const std::size_t c = col_of[k];
      const __m512i t = _mm512_load_si512(T + c);
      for (std::size_t h = 0; h < HB; ++h) {
        ah[h] = _mm512_dpbusd_epi32(ah[h], t, _mm512_set1_epi32(q[h].hi()[c]));
        al[h] = _mm512_dpbusd_epi32(al[h], t, _mm512_set1_epi32(q[h].lo()[c]));
      }
    }
    const __m512 s = _mm512_loadu_ps(scales + 16 * b);
    for (std::size_t h = 0; h < HB; ++h) {
      const __m512i a = _mm512_add_epi32(_mm512_slli_epi32(ah[h], 8), al[h]);
      score[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a),
                                 _mm512_mul_ps(s, _mm512_set1_ps(q[h].sq()[b])), score[h]);
      if constexpr (F::asymmetric)
        score[h] = _mm512_fmadd_ps(_mm512_loadu_ps(mins + 16 * b), _mm512_set1_ps(q[h].qsum()[b]),
                                   score[h]);
    }
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  for (std::size_t h = 0; h < HB; ++h)
    _mm512_storeu_ps(sc + h * sc_stride,
                     _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), score[h]));
}

// ---- P.V: weights x values with vpdpwssd ----------------------------------
//
// Lanes are dimensions. Each softmax weight is multiplied by its token's
// block scale and rounded to int16 against the tile's largest product
//   W = round(p x scale_b x 32767 / wmax),      wmax = max |p x scale_b|
// and a vector holds 16 dimensions of two tokens as int16 pairs, so one
// vpdpwssd adds 32 products per head. Integer codes carry no rounding; the
// int16 weights add a relative error near 2^-16 per weight (tests: 1e-4).
// Asymmetric formats' mins add sum_t p x min_b to every element of block b,
// kept as a per-(head, block) vector over tokens and added at the end.

//! Row indices of a tile (rows past n repeat row n - 1) times the row stride.
KVCACHE_ALWAYS_INLINE __m512i tile_offsets(std::size_t n, std::size_t rb) noexcept {
  // The zero-masked form: GCC 12 warns that the plain one's undefined
  // pass-through operand is used uninitialized.
  const __m512i t = _mm512_maskz_min_epu32(
      0xffff, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(n - 1)));
  return _mm512_mullo_epi32(t, _mm512_set1_epi32(static_cast<int>(rb)));
}

//! fp16 metadata at byte `off` of each row of the tile, as 16 floats. Reads
//! the dword that ends there (off >= 2: codes precede all metadata), so no
//! byte past a row's end is touched.
KVCACHE_ALWAYS_INLINE __m512 gather_half(const std::byte* rows, __m512i offsets,
                                         std::size_t off) noexcept {
  const __m512i g = _mm512_i32gather_epi32(offsets, rows + off - 2, 1);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
}

//! Dimensions [16 z, 16 z + 16) of rows a and b as int16 pairs (a_d, b_d),
//! codes centred on zero (int4 symmetric: code - 8). Two vectors for int4
//! (z and z + 1, the low and high nibbles of one block).
template <class F>
KVCACHE_ALWAYS_INLINE void value_pairs(const std::uint8_t* a, const std::uint8_t* b, std::size_t z,
                                       __m512i* out) noexcept {
  const __m512i inter = _mm512_setr_epi32(
      0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005, 0x00160006,
      0x00170007, 0x00180008, 0x00190009, 0x001a000a, 0x001b000b, 0x001c000c, 0x001d000d,
      0x001e000e, 0x001f000f);  // word 2i <- i, word 2i + 1 <- 16 + i
  if constexpr (F::bits == 8) {
    const __m256i x = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16 * z))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * z)), 1);
    out[0] = _mm512_permutexvar_epi16(inter, _mm512_cvtepi8_epi16(x));
  } else {
    const std::size_t blk = z / 2;
    const __m256i x = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16 * blk))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * blk)), 1);
    const __m256i m = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(x, m), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m);
    out[0] = _mm512_permutexvar_epi16(inter, _mm512_cvtepu8_epi16(lo));
    out[1] = _mm512_permutexvar_epi16(inter, _mm512_cvtepu8_epi16(hi));
    if constexpr (F::kind == block_kind::int4_sym) {
      out[0] = _mm512_sub_epi16(out[0], _mm512_set1_epi16(8));
      out[1] = _mm512_sub_epi16(out[1], _mm512_set1_epi16(8));
    }
  }
}

//! One fp16 field per block (the scales at scale_offset, the mins at
//! min_offset) of n <= 16 rows (rb bytes apart; slots past n repeat row
//! n - 1), tokens in lanes: out[parts b + k] for block b.
template <class F>
KVCACHE_ALWAYS_INLINE void part_block_field(const std::byte* rows, std::size_t n, std::size_t rb,
                                            std::size_t dim, std::size_t field, std::size_t parts,
                                            std::size_t k, __m512* out) noexcept {
  const std::size_t nb = dim / F::group;
  const __m512i offs = tile_offsets(n, rb);
  if (nb % 4 == 0) {
    // Four blocks' fields per row in one qword: two 8-row gathers, then
    // one word permute per block (a quarter of the dword gathers' loads).
    const __m256i lo = _mm512_castsi512_si256(offs), hi = _mm512_extracti64x4_epi64(offs, 1);
    for (std::size_t b0 = 0; b0 < nb; b0 += 4) {
      const std::byte* base = rows + field + 2 * b0;
      const __m512i a = _mm512_i32gather_epi64(lo, base, 1);
      const __m512i c = _mm512_i32gather_epi64(hi, base, 1);
      // Word 4 t + j of (a, c): row t's field of block b0 + j.
      alignas(64) static constexpr std::int16_t rows4[32] = {0,  4,  8,  12, 16, 20, 24, 28,
                                                             32, 36, 40, 44, 48, 52, 56, 60};
      for (std::size_t j = 0; j < 4; ++j) {
        const __m512i idx =
            _mm512_add_epi16(_mm512_load_si512(rows4), _mm512_set1_epi16(static_cast<short>(j)));
        out[parts * (b0 + j) + k] =
            _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(a, idx, c)));
      }
    }
    return;
  }
  for (std::size_t b = 0; b < nb; ++b) out[parts * b + k] = gather_half(rows, offs, field + 2 * b);
}

//! part_block_field for each 16-row part of a tile's n rows, gathered once
//! for all heads: out[parts b + k] holds rows 16 k .. 16 k + 15 of block b
//! (0 past n).
template <class F>
KVCACHE_ALWAYS_INLINE void tile_block_field(const std::byte* V, std::size_t rb, std::size_t n,
                                            std::size_t dim, std::size_t field, std::size_t parts,
                                            __m512* out) noexcept {
  const std::size_t nb = dim / F::group;
  for (std::size_t k = 0; k < parts; ++k) {
    if (16 * k >= n) {  // never gather past row n - 1
      for (std::size_t b = 0; b < nb; ++b) out[parts * b + k] = _mm512_setzero_ps();
      continue;
    }
    part_block_field<F>(V + 16 * k * rb, std::min<std::size_t>(16, n - 16 * k), rb, dim, field,
                        parts, k, out);
  }
}

//! An asymmetric format's running min terms for one head: bias (nb, 16) =
//! bias x corr + sum over parts k < used of p[16 k ..] x mins[parts b + k],
//! per block, tokens in lanes; mins from tile_block_field.
KVCACHE_ALWAYS_INLINE void value_min_terms(const __m512* mins, std::size_t nb, std::size_t parts,
                                           const float* p, std::size_t used, float corr,
                                           float* bias) noexcept {
  for (std::size_t b = 0; b < nb; ++b) {
    float* acc = bias + b * 16;
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(corr));
    for (std::size_t k = 0; k < used; ++k)
      a = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16 * k), mins[parts * b + k], a);
    _mm512_storeu_ps(acc, a);
  }
}

//! o = o x corr + p V over a tile of n <= 32 rows of V (stride rb), for HB
//! heads. p: (HB, pstride) weights, 32 per head (0 past n), o: (HB, ostride)
//! outputs. W: (HB, nb, 32) int16 scratch. bias: (HB, nb, 16) running min
//! terms (asymmetric formats only).
template <class F, std::size_t HB>
KVCACHE_ALWAYS_INLINE void tile_values(const std::byte* V, std::size_t rb, std::size_t n,
                                       std::size_t dim, const float* p, std::size_t pstride,
                                       const float* corr, float* o, std::size_t ostride,
                                       std::int16_t* W, float* bias) noexcept {
  constexpr std::size_t G = F::group;
  const std::size_t nb = dim / G;
  const bool two = n > 16;  // rows 16.. exist: never gather past row n - 1
  float wscale[HB];
  __m512 sv[128];  // nb <= 64: scales of rows 0-15 and 16-31 per block
  tile_block_field<F>(V, rb, n, dim, F::scale_offset(dim), 2, sv);
  [[maybe_unused]] __m512 mins[F::asymmetric ? 128 : 1];
  if constexpr (F::asymmetric) tile_block_field<F>(V, rb, n, dim, F::min_offset(dim), 2, mins);
  for (std::size_t h = 0; h < HB; ++h) {
    const __m512 p0 = _mm512_loadu_ps(p + h * pstride);
    const __m512 p1 = two ? _mm512_loadu_ps(p + h * pstride + 16) : _mm512_setzero_ps();
    // |products|: q4_0-style scales are negative when a block's extreme is positive.
    __m512 mx = _mm512_setzero_ps();
    for (std::size_t b = 0; b < nb; ++b) {
      mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_mul_ps(p0, sv[2 * b])));
      mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_mul_ps(p1, sv[2 * b + 1])));
    }
    const float wmax = _mm512_reduce_max_ps(mx);
    wscale[h] = wmax / 32767.f;
    const __m512 inv = _mm512_set1_ps(wmax > 0.f ? 32767.f / wmax : 0.f);
    for (std::size_t b = 0; b < nb; ++b) {
      std::int16_t* w = W + (h * nb + b) * 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w),
                          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
                              _mm512_mul_ps(_mm512_mul_ps(p0, sv[2 * b]), inv))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 16),
                          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
                              _mm512_mul_ps(_mm512_mul_ps(p1, sv[2 * b + 1]), inv))));
    }
    if constexpr (F::asymmetric)
      value_min_terms(mins, nb, 2, p + h * pstride, two ? 2 : 1, corr[h], bias + h * nb * 16);
  }
  const auto* W32 = reinterpret_cast<const std::int32_t*>(W);
  const std::size_t pairs = (n + 1) / 2;
  for (std::size_t c = 0; c < dim / 64; ++c) {
    __m512i acc[HB][4];
    for (std::size_t h = 0; h < HB; ++h)
      for (std::size_t z = 0; z < 4; ++z) acc[h][z] = _mm512_setzero_si512();
    for (std::size_t i = 0; i < pairs; ++i) {
      const auto* a = reinterpret_cast<const std::uint8_t*>(V + 2 * i * rb);
      const auto* b = reinterpret_cast<const std::uint8_t*>(V + std::min(2 * i + 1, n - 1) * rb);
      __m512i v[4];
      if constexpr (F::bits == 8) {
        for (std::size_t z = 0; z < 4; ++z) value_pairs<F>(a, b, 4 * c + z, v + z);
      } else {
        value_pairs<F>(a, b, 4 * c, v);
        value_pairs<F>(a, b, 4 * c + 2, v + 2);
      }
      for (std::size_t z = 0; z < 4; ++z) {
        const std::size_t blk = (64 * c + 16 * z) / G;
        for (std::size_t h = 0; h < HB; ++h)
          acc[h][z] =
              _mm512_dpwssd_epi32(acc[h][z], v[z], _mm512_set1_epi32(W32[(h * nb + blk) * 16 + i]));
      }
    }
    for (std::size_t h = 0; h < HB; ++h)
      for (std::size_t z = 0; z < 4; ++z) {
        float* dst = o + h * ostride + 64 * c + 16 * z;
        const __m512 prev = _mm512_mul_ps(_mm512_loadu_ps(dst), _mm512_set1_ps(corr[h]));
        _mm512_storeu_ps(
            dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h][z]), _mm512_set1_ps(wscale[h]), prev));
      }
  }
}

#endif  // KVCACHE_HAS_VNNI

}  // namespace detail::vnni
}  // namespace v0
}  // namespace kvcache
