// CPU decode attention over block-quantized rows (block_precision, see
// concepts.hpp), read in place: no dequantised copy of the cache and no
// per-token float rows. The loop structure is decode.hpp's (flash-decoding
// items, decode_streams items in lockstep per thread, 16-token tiles, every
// K/V element read once for all query heads of its group); what differs is
// how 16 elements of a row become a float vector:
//   - built-in formats (P::format): vectorised readers below, which apply
//     the block's fp16 scale (and min) while widening the codes;
//   - any other block_precision: its KVCACHE_HOST_DEVICE dot_block and
//     accumulate_block, one block at a time.
// Precisions with a change of basis (hadamard<P>) get their queries
// transformed once per item and their partial outputs transformed back before
// the log-sum-exp merge, which is linear, so the merge is unchanged.
// Scores and outputs are fp32: this path adds only fp32 rounding (the tests
// hold it to 1e-4 against a float64 attention over the dequantised rows).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../concepts.hpp"
#include "../../detail/simd.hpp"
#include "../../precision/block.hpp"
#include "../plan.hpp"
#include "../view.hpp"
#include "amx.hpp"
#include "amx_fp8.hpp"
#include "decode_stream.hpp"
#include "prefetch.hpp"
#include "vnni.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace kvcache {
inline namespace v0 {
namespace detail {

template <class P>
concept rotating_precision = requires(float* x, std::size_t n) {
  P::transform_query(x, n);
  P::transform_output(x, n);
};

template <class P>
concept formatted_precision = block_precision<P> && requires {
  typename P::format;
};

template <class P>
struct format_of {
  using type = void;
};
template <formatted_precision P>
struct format_of<P> {
  using type = typename P::format;
};

//! Whether this build scores P's blocks with integer dot products (vnni.hpp).
template <class P>
constexpr bool integer_scores() noexcept {
  if constexpr (formatted_precision<P>)
    return KVCACHE_HAS_VNNI && vnni::supported_format<typename P::format>();
  else
    return false;
}
//! The relative L2 error decode may add to float64 attention over P's own
//! decoded rows. Integer scores round the query to two bytes per element
//! (2^-16 of each block's largest |q|): on keys with x15 outlier channels
//! (scores spread over tens) that, with the weights' rounding in integer
//! P.V, moved outputs by up to 3.7e-4 (asymmetric formats; 1.2e-4 for int8),
//! so they are held to 1e-3: half the 2e-3 an integer-dot kernel may add,
//! and under 1/40 of every integer format's own error (docs/quantization.md).
//! The float paths add only fp32 rounding.
template <class P>
constexpr double decode_error_bound() noexcept;

//! Whether this build decodes P's fp8 rows on the tile unit in bf16
//! (amx_fp8.hpp; run-time shape and OS checks still apply).
template <class P>
constexpr bool fp8_tiles() noexcept {
  if constexpr (formatted_precision<P>)
    return amx_fp8::built && amx_fp8::supported_format<typename P::format>();
  else
    return false;
}

//! Whether it also accumulates P's value blocks with integer dot products.
template <class P>
constexpr bool integer_values() noexcept {
  if constexpr (formatted_precision<P>)
    return KVCACHE_HAS_VNNI && vnni::values_supported<typename P::format>();
  else
    return false;
}

namespace simd {

//! fp16 bits -> float for the scalar metadata of the inner loops: one F16C
//! instruction where available, else the portable conversion.
KVCACHE_ALWAYS_INLINE float half_scalar(std::uint16_t h) noexcept {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_bits_to_float(h);
#endif
}

//! Sixteen fp16 bit patterns (in 32-bit lanes) -> floats.
KVCACHE_ALWAYS_INLINE vf half_lanes_to_float(vu h) noexcept {
  const vh hv = __builtin_convertvector(h, vh);
#if defined(__AVX512F__)
  __m256i x;
  std::memcpy(&x, &hv, 32);
  return (vf)_mm512_cvtph_ps(x);
#else
  return half_to_float_portable(hv);
#endif
}

//! Sixteen bytes widened to 32-bit lanes, sign- or zero-extended. GCC
//! scalarises __builtin_convertvector between these sizes, so AVX-512 gets
//! the one instruction it has.
KVCACHE_ALWAYS_INLINE vi widen_signed(const std::uint8_t* p) noexcept {
#if defined(__AVX512F__)
  const __m512i x = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vi r;
  std::memcpy(&r, &x, 64);
  return r;
#else
  vi r;
  for (int i = 0; i < lanes; ++i) r[i] = static_cast<std::int8_t>(p[i]);
  return r;
#endif
}
KVCACHE_ALWAYS_INLINE vu widen_unsigned(const std::uint8_t* p) noexcept {
#if defined(__AVX512F__)
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vu r;
  std::memcpy(&r, &x, 64);
  return r;
#else
  vu r;
  for (int i = 0; i < lanes; ++i) r[i] = p[i];
  return r;
#endif
}
KVCACHE_ALWAYS_INLINE vf to_float(vi x) noexcept { return __builtin_convertvector(x, vf); }

//! Horizontal sum and maximum as shuffle trees (4 steps, not 15 scalar ones).
KVCACHE_ALWAYS_INLINE float tree_add(vf v) noexcept {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}
KVCACHE_ALWAYS_INLINE float tree_max(vf v) noexcept {
  v = max(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = max(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = max(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = max(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

}  // namespace simd

//! Codes [16 c, 16 c + 16) of a row of 2-bit codes (block.hpp's packing: 8
//! bytes per 32 elements, lane i of half h is byte i % 8 at bit 2 (2h + i / 8)).
//! The sub-block's two words are broadcast to the lanes and shifted per lane:
//! copying the bytes to a buffer and widening it stalled on store forwarding.
KVCACHE_ALWAYS_INLINE simd::vu int2_codes16(const std::uint8_t* p, std::size_t c) noexcept {
  using simd::vu;
  std::uint32_t w[2];
  std::memcpy(w, p + (c / 2) * 8, 8);
  const vu words = {w[0], w[0], w[0], w[0], w[1], w[1], w[1], w[1],
                    w[0], w[0], w[0], w[0], w[1], w[1], w[1], w[1]};
  const vu shift = vu{0, 8, 16, 24, 0, 8, 16, 24, 2, 10, 18, 26, 2, 10, 18, 26} +
                   static_cast<std::uint32_t>(4 * (c % 2));
  return (words >> shift) & 3u;
}

//! Elements [16 c, 16 c + 16) of a row of format F, decoded to floats. The
//! scalar block functions of block.hpp define the same values; a test compares.
template <class F>
KVCACHE_ALWAYS_INLINE simd::vf read16(const std::byte* row, std::size_t c,
                                      std::size_t dim) noexcept {
  using namespace simd;
  const auto* p = reinterpret_cast<const std::uint8_t*>(row);
  const std::size_t b = c * lanes / F::group;
  std::uint16_t sb;
  std::memcpy(&sb, row + F::scale_offset(dim) + 2 * b, 2);
  const float s = half_scalar(sb);
  if constexpr (F::kind == block_kind::int8_sym) {
    return to_float(widen_signed(p + c * lanes)) * s;
  } else if constexpr (F::kind == block_kind::fp8_e4m3) {
#if defined(__AVX512F__) && defined(__AVX2__)
    // In 16-bit lanes: y = code << 7 puts exponent and mantissa where fp16
    // has them and the sign one bit low; adding the sign bit to itself moves
    // it up. Four integer ops and one conversion per 16 elements (the
    // 32-bit route took ten: fp8 decode at 32k in L3, 62 -> 49.5 ns per
    // token and KV head per thread).
    const __m256i w =
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c * lanes)));
    const __m256i y = _mm256_slli_epi16(w, 7);
    const __m256i h = _mm256_add_epi16(y, _mm256_and_si256(y, _mm256_set1_epi16(0x4000)));
    vf r;
    const __m512 f = _mm512_cvtph_ps(h);
    std::memcpy(&r, &f, 64);
    return r * (s * 256.f);
#else
    const vu x = widen_unsigned(p + c * lanes);
    return half_lanes_to_float(((x & 0x80u) << 8) | ((x & 0x7fu) << 7)) * (s * 256.f);
#endif
  } else {
    float m;
    if constexpr (F::asymmetric) {
      std::uint16_t mb;
      std::memcpy(&mb, row + F::min_offset(dim) + 2 * b, 2);
      m = half_scalar(mb);
    } else {
      m = -8.f * s;
    }
    vu x;
    if constexpr (F::bits == 4) {
      // 32-element sub-block c / 2: low nibbles are its first 16 elements.
      x = (widen_unsigned(p + (c / 2) * 16) >> static_cast<std::uint32_t>(4 * (c % 2))) & 15u;
    } else {
      x = int2_codes16(p, c);
    }
    return to_float((vi)x) * s + m;
  }
}

//! Decoded 16 elements of a row of precision P (built-in format).
template <class P>
KVCACHE_ALWAYS_INLINE simd::vf read_row16(const std::byte* row, std::size_t c,
                                          std::size_t dim) noexcept {
  return read16<typename P::format>(row, c, dim);
}

template <class P>
constexpr double decode_error_bound() noexcept {
  return integer_scores<P>() ? 1e-3 : 1e-4;
}

//! Tokens of a tile on the VNNI path: 32 (two transposed 16-token halves),
//! halving the per-tile softmax, weight rounding and epilogue work against
//! 16; the tile unit takes amx::tile_tokens, the float paths decode_tile.
inline constexpr std::size_t quant_tile = 32;
//! Floats between two heads' rows of a tile's scores: room for any tile.
inline constexpr std::size_t score_stride = std::max(quant_tile, amx::tile_tokens);

//! The lines of a stream's next tile, from token t2 to at most `tile` rows
//! within its run (none at the item's end, `end`), kr and vr the K and V
//! runs' offsets: the rows after this tile's in memory need not be the next
//! tile's, as small pages put it elsewhere.
inline prefetch_cursor next_tile_prefetch(const seq_view& sv, std::size_t kr, std::size_t vr,
                                          std::size_t rb, std::size_t t2, std::size_t end,
                                          std::size_t tile) noexcept {
  if (t2 >= end) return {};
  return run_lines(sv.row(kr, t2, rb), sv.row(vr, t2, rb), rb,
                   std::min({tile, end - t2, sv.run(t2)}));
}

//! The quarters of a tile of `tile` slots on the tile unit from token t
//! (amx::tile_quarters): each at most 16 rows inside one run, up to the
//! item's end.
inline amx::tile_quarters tile_quarters_at(const seq_view& sv, std::size_t kr, std::size_t vr,
                                           std::size_t rb, std::size_t t, std::size_t end,
                                           std::size_t tile) noexcept {
  const std::size_t want = std::min(tile, end - t);
  if (sv.run(t) >= want)  // one run: contiguous storage, a large page
    return amx::dense_quarters(sv.row(kr, t, rb), sv.row(vr, t, rb), rb, want);
  amx::tile_quarters tq;
  for (; tq.count < tile / 16 && t < end; ++tq.count) {
    const std::size_t j = tq.count, n = std::min({std::size_t{16}, end - t, sv.run(t)});
    tq.k[j] = sv.row(kr, t, rb);
    tq.v[j] = sv.row(vr, t, rb);
    tq.n[j] = n;
    t += n;
  }
  return tq;
}

//! The lines of the next tile on the tile unit, from token t2: its
//! quarters' rows, as up to prefetch_cursor::max_runs runs (one for
//! contiguous rows).
inline prefetch_cursor next_quarters_prefetch(const seq_view& sv, std::size_t kr, std::size_t vr,
                                              std::size_t rb, std::size_t t2, std::size_t end,
                                              std::size_t tile) noexcept {
  if (t2 >= end) return {};
  if (sv.run(t2) >= std::min(tile, end - t2))
    return next_tile_prefetch(sv, kr, vr, rb, t2, end, tile);
  prefetch_cursor pf;
  const amx::tile_quarters tq = tile_quarters_at(sv, kr, vr, rb, t2, end, tile);
  // Quarters that continue each other in memory (a page of 24 tokens: 16,
  // then 8) make one run.
  std::size_t runs = 0;
  for (std::size_t j = 0, first = 0, rows = 0; j < tq.count; ++j) {
    rows += tq.n[j];
    const bool joined = j + 1 < tq.count && tq.k[j + 1] == tq.k[j] + tq.n[j] * rb &&
                        tq.v[j + 1] == tq.v[j] + tq.n[j] * rb;
    if (joined) continue;
    const prefetch_cursor r = run_lines(tq.k[first], tq.v[first], rb, rows);
    pf.k[runs] = r.k[0];
    pf.v[runs] = r.v[0];
    pf.lines[runs++] = r.lines[0];
    first = j + 1;
    rows = 0;
  }
  return pf;
}

//! Floats of per-worker scratch decode_quant_task needs beyond decode.hpp's.
inline std::size_t decode_quant_scratch_floats(const kv_layout& L) noexcept {
  const std::size_t g = L.group(), dim = L.head_dim, nb = dim / 32;
  const std::size_t integer = decode_streams * g * vnni::query_view::words(dim, 32) + dim / 4 * 16 +
                              2 * nb * 16 + 32 + decode_streams * g * nb * 16 + g * nb * 16 + 16;
  // The integer and fp8 tile paths' buffers (a precision uses one of them).
  const std::size_t tiles =
      std::max(decode_streams * amx::query_bytes(g, dim) + amx::tile_scratch::bytes(dim),
               decode_streams * amx_fp8::query_bytes(g, dim) + amx_fp8::tile_scratch::bytes(dim)) /
          sizeof(float) +
      16;
  return decode_streams * (2 * g + g * dim) + g * score_stride + 64 + integer + tiles;
}

//! Scores of up to 16 tokens x g heads into sc (g, score_stride), by formats'
//! vectorised readers, HB heads at a time.
template <class P, std::size_t D, std::size_t HB>
KVCACHE_ALWAYS_INLINE void quant_scores(const decode_stream& s, const std::byte* K, std::size_t rb,
                                        std::size_t n, std::size_t g, std::size_t dim_rt, float* sc,
                                        prefetch_cursor& pf) noexcept {
  using namespace simd;
  const std::size_t dim = D ? D : dim_rt, nc = dim / lanes;
  constexpr std::size_t TOK = lanes / HB;
  for (std::size_t hb = 0; hb < g; hb += HB) {
    const float* q = s.q + hb * dim;
    for (std::size_t j0 = 0; j0 < decode_tile; j0 += TOK) {
      pf.issue();
      vf acc[lanes] = {};
      const std::byte* k[TOK];
      for (std::size_t t = 0; t < TOK; ++t) k[t] = K + std::min(j0 + t, n - 1) * rb;
      for (std::size_t c = 0; c < nc; ++c) {
        vf qv[HB];
        for (std::size_t h = 0; h < HB; ++h) qv[h] = load(q + h * dim + c * lanes);
        for (std::size_t t = 0; t < TOK; ++t) {
          const vf kv = read_row16<P>(k[t], c, dim);
          for (std::size_t h = 0; h < HB; ++h) acc[h * TOK + t] += qv[h] * kv;
        }
      }
      const vf sums = reduce16(acc);
      for (std::size_t h = 0; h < HB; ++h)
        for (std::size_t t = 0; t < TOK; ++t)
          sc[(hb + h) * score_stride + j0 + t] = j0 + t < n ? sums[h * TOK + t] : -INFINITY;
    }
  }
}

//! Online softmax over one tile's scores: sc becomes the weights, corr the
//! rescaling of each head's running output.
KVCACHE_ALWAYS_INLINE void quant_softmax(decode_stream& s, std::size_t g, float* sc, float* corr,
                                         std::size_t tile) noexcept {
  using namespace simd;
  // Sixteen heads at a time: the maxima, the rescaling factors and the sums
  // are vectors over heads, so a tile costs a few tree reductions and one
  // vector exp per 16 scores, not scalar chains and libm calls. Rows are
  // score_stride apart; the first `tile` (a multiple of 16) slots are scores.
  const std::size_t nv = tile / lanes;
  for (std::size_t h0 = 0; h0 < g; h0 += lanes) {
    const std::size_t nh = std::min<std::size_t>(lanes, g - h0);
    vf mo = splat(-INFINITY), mx = splat(-INFINITY);
    for (std::size_t h = 0; h < nh; ++h) {
      const float* srow = sc + (h0 + h) * score_stride;
      vf m = load(srow);
      for (std::size_t k = 1; k < nv; ++k) m = max(m, load(srow + k * lanes));
      mo[h] = s.m[h0 + h];
      mx[h] = tree_max(m);
    }
    const vf mn = max(mo, mx);
    // e^(mo - mn): 0 on the first tile (mo = -inf), which exp_neg maps to 0.
    const vf c = exp_neg(select(mo == splat(-INFINITY), splat(-INFINITY), mo - mn));
    vf sums{};
    for (std::size_t h = 0; h < nh; ++h) {
      float* srow = sc + (h0 + h) * score_stride;
      vf acc{};
      for (std::size_t k = 0; k < nv; ++k) {
        const vf p = exp_neg(load(srow + k * lanes) - mn[h]);
        store(srow + k * lanes, p);
        acc += p;
      }
      sums[h] = tree_add(acc);
    }
    for (std::size_t h = 0; h < nh; ++h) {
      corr[h0 + h] = c[h];
      s.l[h0 + h] = s.l[h0 + h] * c[h] + sums[h];
      s.m[h0 + h] = mn[h];
    }
  }
}

//! o = o x corr + weights x V over a tile of n tokens, HB heads at a time.
template <class P, std::size_t D, std::size_t HB>
KVCACHE_ALWAYS_INLINE void quant_accumulate(decode_stream& s, const std::byte* V, std::size_t rb,
                                            std::size_t n, std::size_t g, std::size_t dim_rt,
                                            const float* sc, const float* corr) noexcept {
  using namespace simd;
  const std::size_t dim = D ? D : dim_rt, nc = dim / lanes, stride = dim + 1;
  for (std::size_t hb = 0; hb < g; hb += HB)
    for (std::size_t c = 0; c < nc; ++c) {
      vf ov[HB];
      for (std::size_t h = 0; h < HB; ++h)
        ov[h] = load(s.o + (hb + h) * stride + c * lanes) * corr[hb + h];
      for (std::size_t j = 0; j < n; ++j) {
        const vf vv = read_row16<P>(V + j * rb, c, dim);
        for (std::size_t h = 0; h < HB; ++h) ov[h] += sc[(hb + h) * score_stride + j] * vv;
      }
      for (std::size_t h = 0; h < HB; ++h) store(s.o + (hb + h) * stride + c * lanes, ov[h]);
    }
}

//! The same tile through the precision's block functions (a user's
//! block_precision without a built-in format).
template <class P>
void quant_tile_blocks(decode_stream& s, const std::byte* K, const std::byte* V, std::size_t rb,
                       std::size_t n, std::size_t g, std::size_t dim, float* sc, float* corr) {
  const std::size_t G = P::group, nb = dim / G, stride = dim + 1;
  for (std::size_t h = 0; h < g; ++h)
    for (std::size_t j = 0; j < decode_tile; ++j) {
      float acc = -INFINITY;
      if (j < n) {
        acc = 0.f;
        for (std::size_t b = 0; b < nb; ++b)
          acc += P::dot_block(s.q + h * dim + b * G, K + j * rb, b, dim);
      }
      sc[h * score_stride + j] = acc;
    }
  quant_softmax(s, g, sc, corr, decode_tile);
  for (std::size_t h = 0; h < g; ++h) {
    float* o = s.o + h * stride;
    for (std::size_t d = 0; d < dim; ++d) o[d] *= corr[h];
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t b = 0; b < nb; ++b)
        P::accumulate_block(sc[h * score_stride + j], V + j * rb, b, dim, o + b * G);
  }
}

//! Runs half(h) for each 16-token part of a tile of `tile` slots that holds
//! any of its n rows; empty parts get -inf scores (sc: g rows of
//! score_stride).
template <class Half>
KVCACHE_ALWAYS_INLINE void for_tile_halves(std::size_t n, std::size_t tile, std::size_t g,
                                           float* sc, Half&& half) noexcept {
  for (std::size_t hf = 0; hf * 16 < tile; ++hf) {
    if (hf * 16 >= n) {
      for (std::size_t h = 0; h < g; ++h)
        for (std::size_t t = 0; t < 16; ++t) sc[h * score_stride + hf * 16 + t] = -INFINITY;
      continue;
    }
    half(hf);
  }
}

//! Scores of one tile for all g heads by integer dot products (vnni.hpp),
//! 16 rows at a time.
template <class F, std::size_t HB>
KVCACHE_ALWAYS_INLINE void integer_tile_scores(
    const std::byte* K, std::size_t rb, std::size_t n, std::size_t g, std::size_t dim,
    const vnni::query_view* q, void* T, const std::uint16_t* col_of, const std::uint32_t* col_start,
    float* scales, float* mins, float* sc, prefetch_cursor& pf) noexcept {
#if KVCACHE_HAS_VNNI
  const std::size_t nb = dim / F::group;
  for_tile_halves(n, quant_tile, g, sc, [&](std::size_t half) {
    const std::byte* Kh = K + half * 16 * rb;
    const std::size_t nh = std::min<std::size_t>(16, n - half * 16);
    vnni::unpack_tile<F>(Kh, rb, nh, dim, static_cast<__m512i*>(T));
    const __m512i offs = vnni::tile_offsets(nh, rb);
    for (std::size_t b = 0; b < nb; ++b) {
      pf.issue();
      _mm512_storeu_ps(scales + b * 16, vnni::gather_half(Kh, offs, F::scale_offset(dim) + 2 * b));
      if constexpr (F::asymmetric)
        _mm512_storeu_ps(mins + b * 16, vnni::gather_half(Kh, offs, F::min_offset(dim) + 2 * b));
    }
    for (std::size_t hb = 0; hb < g; hb += HB)
      vnni::tile_scores<F, HB>(nh, dim, q + hb, static_cast<const __m512i*>(T), col_of, col_start,
                               scales, mins, sc + half * 16 + hb * score_stride, score_stride);
  });
#else
  (void)K, (void)rb, (void)n, (void)g, (void)dim, (void)q, (void)T, (void)col_of;
  (void)col_start, (void)scales, (void)mins, (void)sc, (void)pf;
#endif
}

//! Scores of one tile for all g heads on the AMX tile unit (amx.hpp); keys
//! from amx::unpack_keys.
template <class F>
KVCACHE_ALWAYS_INLINE void amx_tile_scores(const amx::tile_quarters& tq, std::size_t rb,
                                           std::size_t g, std::size_t dim,
                                           const amx::query_tiles& q, const amx::key_rows& keys,
                                           std::int32_t* cbuf, float* sc,
                                           prefetch_cursor& pf) noexcept {
#if KVCACHE_HAS_AMX
  if constexpr (amx::supported_format<F>())
    for_tile_halves(16 * tq.count, amx::tile_tokens, g, sc, [&](std::size_t j) {
      amx::half_scores<F>(tq.k[j], rb, tq.n[j], g, dim, q, keys.a[j], keys.stride[j], cbuf,
                          sc + j * 16, score_stride, pf);
    });
#else
  (void)tq, (void)rb, (void)g, (void)dim, (void)q, (void)keys, (void)cbuf, (void)sc, (void)pf;
#endif
}

//! o = o x corr + p V for one tile and all g heads by integer dot products.
template <class F, std::size_t HB>
KVCACHE_ALWAYS_INLINE void integer_tile_values(const std::byte* V, std::size_t rb, std::size_t n,
                                               std::size_t g, std::size_t dim, const float* sc,
                                               const float* corr, float* o, std::size_t stride,
                                               std::int16_t* W, float* bias) noexcept {
#if KVCACHE_HAS_VNNI
  const std::size_t nb = dim / F::group;
  for (std::size_t hb = 0; hb < g; hb += HB)
    vnni::tile_values<F, HB>(V, rb, n, dim, sc + hb * score_stride, score_stride, corr + hb,
                             o + hb * stride, stride, W, bias + hb * nb * 16);
#else
  (void)V, (void)rb, (void)n, (void)g, (void)dim, (void)sc, (void)corr, (void)o, (void)stride;
  (void)W, (void)bias;
#endif
}

#if KVCACHE_HAS_AMX
//! One fp16 field per block (vnni::part_block_field) of a tile's quarters,
//! tokens in lanes: out[parts b + k] for quarter k, 0 for quarters without
//! rows.
template <class F>
KVCACHE_ALWAYS_INLINE void quarter_block_fields(const amx::tile_quarters& tq, std::size_t rb,
                                                std::size_t dim, std::size_t field,
                                                std::size_t parts, __m512* out) noexcept {
  for (std::size_t k = 0; k < parts; ++k) {
    if (k < tq.count) {
      vnni::part_block_field<F>(tq.v[k], tq.n[k], rb, dim, field, parts, k, out);
    } else {
      for (std::size_t b = 0; b < dim / F::group; ++b) out[parts * b + k] = _mm512_setzero_ps();
    }
  }
}
#endif

//! The value tiles of one tile (amx::value_tiles), built before the scores so
//! that their stores reach the cache before the tile loads (amx.hpp).
template <class F>
KVCACHE_ALWAYS_INLINE void amx_value_tiles(const amx::tile_quarters& tq, std::size_t rb,
                                           std::size_t dim, const amx::tile_scratch& ts,
                                           prefetch_cursor& pf) noexcept {
#if KVCACHE_HAS_AMX
  if constexpr (amx::supported_format<F>()) amx::value_tiles<F>(tq, rb, dim, ts.values(), pf);
#else
  (void)tq, (void)rb, (void)dim, (void)ts, (void)pf;
#endif
}

//! o = o x corr + p V for one tile and all g heads on the AMX tile unit
//! (amx.hpp), from the value tiles amx_value_tiles made; o stays in
//! amx::unpermute_output's order until the item ends.
template <class F>
KVCACHE_ALWAYS_INLINE void amx_tile_values(const amx::tile_quarters& tq, std::size_t rb,
                                           std::size_t g, std::size_t dim, const float* sc,
                                           const float* corr, float* o, std::size_t stride,
                                           float* bias, const amx::tile_scratch& ts,
                                           prefetch_cursor& pf) noexcept {
#if KVCACHE_HAS_AMX
  if constexpr (amx::supported_format<F>()) {
    constexpr std::size_t Q = amx::tile_tokens / 16;
    const std::size_t nb = dim / F::group, n = tq.span();
    __m512 vs[Q * amx::max_dim / 32];  // block scales, tokens in lanes, (nb, tile_tokens)
    quarter_block_fields<F>(tq, rb, dim, F::scale_offset(dim), Q, vs);
    [[maybe_unused]] __m512 mins[F::asymmetric ? Q * amx::max_dim / 32 : 1];
    if constexpr (F::asymmetric) {
      quarter_block_fields<F>(tq, rb, dim, F::min_offset(dim), Q, mins);
      const __m512 centre = _mm512_set1_ps(static_cast<float>(amx::value_centre<F>()));
      for (std::size_t k = 0; k < Q * nb; ++k) mins[k] = _mm512_fmadd_ps(vs[k], centre, mins[k]);
    }
    for (std::size_t h0 = 0; h0 < g; h0 += 4) {
      amx::tile_values<F>(dim, n, sc + h0 * score_stride, score_stride,
                          reinterpret_cast<const float*>(vs), corr + h0, o + h0 * stride, stride,
                          ts.values(), ts.weights(), ts.c(), pf);
      if constexpr (F::asymmetric)
        for (std::size_t h = h0; h < h0 + 4; ++h)  // parts past n: not exponentiated
          vnni::value_min_terms(mins, nb, Q, sc + h * score_stride, tq.count, corr[h],
                                bias + h * nb * 16);
    }
  }
#else
  (void)tq, (void)rb, (void)g, (void)dim, (void)sc, (void)corr, (void)o, (void)stride;
  (void)bias, (void)ts, (void)pf;
#endif
}

//! One tile of fp8 rows on the tile unit in bf16 (amx_fp8.hpp), all g
//! heads: scores, the online softmax and P.V; o stays in
//! amx::unpermute_output's order until the item ends.
template <class F>
KVCACHE_ALWAYS_INLINE void amx_fp8_tile(decode_stream& s, const amx::tile_quarters& tq,
                                        std::size_t rb, std::size_t g, std::size_t dim,
                                        const amx_fp8::query_tiles& q,
                                        const amx_fp8::tile_scratch& ts, float* sc, float* corr,
                                        prefetch_cursor& pf) noexcept {
#if KVCACHE_HAS_AMX_FP8
  amx_fp8::unpack_keys(tq, rb, dim, ts.keys());
  amx_fp8::value_tiles(tq, rb, dim, ts.values(), pf);
  for_tile_halves(16 * tq.count, amx_fp8::tile_tokens, g, sc, [&](std::size_t j) {
    amx_fp8::half_scores<F>(tq.k[j], rb, tq.n[j], g, dim, q, ts.keys() + j * 16 * dim, ts.c(),
                            sc + j * 16, score_stride, pf);
  });
  quant_softmax(s, g, sc, corr, 16 * tq.count);
  constexpr std::size_t Q = amx_fp8::tile_tokens / 16;
  __m512 vs[Q * amx::max_dim / 32];  // block scales, tokens in lanes, (nb, tile_tokens)
  quarter_block_fields<F>(tq, rb, dim, F::scale_offset(dim), Q, vs);
  for (std::size_t h0 = 0; h0 < g; h0 += 4)
    amx_fp8::tile_values<F>(dim, tq.span(), sc + h0 * score_stride, score_stride,
                            reinterpret_cast<const float*>(vs), corr + h0, s.o + h0 * (dim + 1),
                            dim + 1, ts.values(), ts.weights(), ts.c(), pf);
#else
  (void)s, (void)tq, (void)rb, (void)g, (void)dim, (void)q, (void)ts, (void)sc, (void)corr;
  (void)pf;
#endif
}

//! Adds an asymmetric format's value mins to a stream's partial output o
//! (g, dim + 1): sum_t p_t min_tb, which integer P.V keeps per (head, block)
//! as 16 lanes of tokens in `bias` (g, dim / group, 16). Nothing for
//! symmetric formats.
template <class F>
void add_value_mins(const float* bias, std::size_t g, std::size_t dim, float* o) noexcept {
  if constexpr (F::asymmetric) {
    const std::size_t nb = dim / F::group;
    for (std::size_t h = 0; h < g; ++h)
      for (std::size_t b = 0; b < nb; ++b) {
        const float* acc = bias + (h * nb + b) * 16;
        float sum = 0.f;
        for (std::size_t t = 0; t < 16; ++t) sum += acc[t];
        float* ob = o + h * (dim + 1) + b * F::group;
        for (std::size_t d = 0; d < F::group; ++d) ob[d] += sum;
      }
  }
}

//! One thread task: up to decode_streams adjacent items in lockstep, as
//! decode.hpp's decode_task. qs: (decode group, g, dim) scaled queries;
//! partial: (item, g, dim + 1) normalised outputs and their lse.
template <class P, std::size_t D, std::size_t HB>
void decode_quant_task(const kv_layout& L, std::size_t layer, const seq_view* seqs,
                       const work_plan& plan, const float* qs, const float* qs_sink, float* partial,
                       std::size_t first, std::size_t count, float* scratch) {
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, rb = L.row_bytes;
  const std::size_t stride = dim + 1;
  decode_stream st[decode_streams];
  float* sc = scratch;                          // (g, score_stride)
  float* ml = sc + g * score_stride;            // (streams, 2, g)
  float* qt = ml + 2 * g * decode_streams;      // (streams, g, dim) transformed queries
  float* corr = qt + decode_streams * g * dim;  // (g)
  // Integer scores (vnni.hpp): quantized queries, the transposed tile, and the
  // tile's scales and mins with tokens in lanes.
  constexpr bool integer = integer_scores<P>();
  using F = typename format_of<P>::type;
  [[maybe_unused]] bool use_integer = false;
  [[maybe_unused]] vnni::query_view qv[decode_streams * 64];  // (streams, g) for g <= 64
  [[maybe_unused]] std::size_t qs_group[decode_streams];
  [[maybe_unused]] std::uint16_t col_of[512];
  [[maybe_unused]] std::uint32_t col_start[65];
  [[maybe_unused]] float *tile_scales = nullptr, *tile_mins = nullptr;
  [[maybe_unused]] void* tile_T = nullptr;
  [[maybe_unused]] float* value_bias = nullptr;      // (streams, g, nb, 16)
  [[maybe_unused]] std::int16_t* value_w = nullptr;  // (g, nb, 16)
  // Scores on the AMX tile unit (amx.hpp) where the build and the OS allow.
  [[maybe_unused]] bool use_amx = false;
  [[maybe_unused]] amx::query_tiles qtiles[decode_streams];
  [[maybe_unused]] std::byte* amx_q = nullptr;  // (streams) x amx::query_bytes
  [[maybe_unused]] amx::tile_scratch ts;
  constexpr bool integer_v = integer_values<P>();
  // fp8 rows on the tile unit in bf16 (amx_fp8.hpp).
  constexpr bool fp8_tile = fp8_tiles<P>();
  [[maybe_unused]] bool use_fp8 = false;
  [[maybe_unused]] amx_fp8::query_tiles fp8_q[decode_streams];
  [[maybe_unused]] amx_fp8::tile_scratch fp8_ts;
  if constexpr (fp8_tile) {
    use_fp8 = amx_fp8::supported_shape(dim, g) && amx::available();
    if (use_fp8) {
      auto a = reinterpret_cast<std::uintptr_t>(corr + g);
      a = (a + 63) & ~std::uintptr_t{63};
      amx_q = reinterpret_cast<std::byte*>(a);
      fp8_ts = {amx_q + decode_streams * amx_fp8::query_bytes(g, dim), dim};
      amx::configure();
    }
  }
  if constexpr (integer) {
    use_integer = vnni::supported_dim<F>(dim) && g <= 64 && dim <= 2048;
    if (use_integer) {
      const std::size_t words = vnni::query_view::words(dim, F::group), nb = dim / F::group;
      auto* qbase = reinterpret_cast<std::int32_t*>(corr + g);
      for (std::size_t i = 0; i < decode_streams * g; ++i) qv[i] = {qbase + i * words, dim / 4, nb};
      auto addr = reinterpret_cast<std::uintptr_t>(qbase + decode_streams * g * words);
      addr = (addr + 63) & ~std::uintptr_t{63};
      tile_T = reinterpret_cast<void*>(addr);
      tile_scales = reinterpret_cast<float*>(addr) + dim / 4 * 16;
      tile_mins = tile_scales + nb * 16;
      value_bias = tile_mins + nb * 16;
      value_w = reinterpret_cast<std::int16_t*>(value_bias + decode_streams * g * nb * 16);
      vnni::block_columns<F>(dim, col_of, col_start);
      if constexpr (amx::supported_format<F>())
        use_amx = amx::supported_shape<F>(dim, g) && amx::available();
      if (use_amx) {
        auto a = reinterpret_cast<std::uintptr_t>(value_w + g * nb * 32);
        a = (a + 63) & ~std::uintptr_t{63};
        amx_q = reinterpret_cast<std::byte*>(a);
        ts = {amx_q + decode_streams * amx::query_bytes(g, dim), dim};
        amx::configure();
      }
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    const auto [grp, sink] =
        start_stream(st[i], plan, seqs, first + i, qs, qs_sink, partial, ml + i * 2 * g, g, dim);
    if constexpr (rotating_precision<P>) {
      float* q = qt + i * g * dim;
      for (std::size_t h = 0; h < g; ++h) {
        std::memcpy(q + h * dim, st[i].q + h * dim, dim * sizeof(float));
        P::transform_query(q + h * dim, dim);
      }
      st[i].q = q;
    }
    // Adjacent items of one (sequence, KV head) share their quantized queries.
    [[maybe_unused]] const bool shared_query = i > 0 && qs_group[i - 1] == 2 * grp + sink;
    qs_group[i] = 2 * grp + sink;
    if constexpr (integer)
      if (use_integer) {
        if (shared_query) {
          for (std::size_t h = 0; h < g; ++h) qv[i * g + h] = qv[(i - 1) * g + h];
          qtiles[i] = qtiles[i - 1];
        } else if (use_amx) {
          if constexpr (amx::supported_format<F>())
            qtiles[i] =
                amx::prepare_query<F>(st[i].q, g, dim, amx_q + i * amx::query_bytes(g, dim));
        } else {
          for (std::size_t h = 0; h < g; ++h)
            vnni::quantize_query<F>(st[i].q + h * dim, dim, qv[i * g + h]);
        }
      }
    if constexpr (fp8_tile)
      if (use_fp8)
        fp8_q[i] = shared_query ? fp8_q[i - 1]
                                : amx_fp8::prepare_query(st[i].q, g, dim,
                                                         amx_q + i * amx_fp8::query_bytes(g, dim));
    if constexpr (integer)
      if (use_integer)
        for (std::size_t k = 0; k < g * (dim / F::group) * 16; ++k)
          value_bias[i * g * (dim / F::group) * 16 + k] = 0.f;
  }
  for (bool active = true; active;) {
    active = false;
    for (std::size_t i = 0; i < count; ++i) {
      decode_stream& s = st[i];
      const decode_item& it = *s.item;
      if (s.t >= it.end) continue;
      const seq_view& sv = seqs[it.seq];
      const std::size_t in_page = sv.run(s.t);  // contiguous rows from s.t
      std::size_t tile = decode_tile;
      if constexpr (integer)
        if (use_integer) tile = use_amx ? amx::tile_tokens : quant_tile;
      if constexpr (fp8_tile)
        if (use_fp8) tile = amx_fp8::tile_tokens;
      const std::size_t kr = L.run_offset(sv.page_tokens, layer, 0, it.head);
      const std::size_t vr = L.run_offset(sv.page_tokens, layer, 1, it.head);
      std::size_t n = std::min({tile, it.end - s.t, in_page});
      // The tile unit's tiles span pages, a quarter per page of 16 tokens or
      // more (amx::tile_quarters); the other paths' end at the page.
      [[maybe_unused]] amx::tile_quarters tq{};
      if (use_amx || use_fp8) {
        tq = tile_quarters_at(sv, kr, vr, rb, s.t, it.end, tile);
        n = tq.rows();
      }
      const std::byte* K = sv.row(kr, s.t, rb);
      const std::byte* V = sv.row(vr, s.t, rb);
      // The next tile of this stream, requested now: by the time the other
      // streams' tiles are done it is in cache. Quantized rows are read
      // faster than the prefetchers ramp up on 8 streams, and the first
      // touch would otherwise be a gather of scales that stalls on DRAM.
      prefetch_cursor pf = use_amx || use_fp8
                               ? next_quarters_prefetch(sv, kr, vr, rb, s.t + n, it.end, tile)
                               : next_tile_prefetch(sv, kr, vr, rb, s.t + n, it.end, tile);
      // Spread over the tile's steps on the tile unit (the whole tile: with
      // the requests only in the scores, int8 from DRAM ran 5% slower, the
      // fill buffers queueing them), over the scores' steps otherwise (2 x
      // blocks gathers on VNNI; 2 g query blocks on the float path): the
      // lines are requested while this tile's arithmetic runs. The
      // block-function path requests them at once.
      {
        std::size_t calls = 0;
        if (use_fp8)
          calls = amx_fp8::issue_steps(g, dim);
        else if (use_amx)
          calls = amx::issue_steps(g, dim);
        else if (use_integer)
          calls = 2 * (dim / P::group);
        else if constexpr (formatted_precision<P>)
          calls = 2 * g;
        pf.spread(calls);
        if (!calls) pf.issue();
      }
      if constexpr (integer) {
        if (use_amx) {
          // Unpacked keys and value tiles first: their stores reach the
          // cache while the other starts (see amx::unpack_keys).
          [[maybe_unused]] amx::key_rows keys{};
          if constexpr (amx::supported_format<F>())
            keys = amx::unpack_keys<F>(tq, rb, dim, ts.keys());
          amx_value_tiles<F>(tq, rb, dim, ts, pf);
          amx_tile_scores<F>(tq, rb, g, dim, qtiles[i], keys, ts.c(), sc, pf);
        } else if (use_integer)
          integer_tile_scores<F, HB>(K, rb, n, g, dim, qv + i * g, tile_T, col_of, col_start,
                                     tile_scales, tile_mins, sc, pf);
        else
          quant_scores<P, D, HB>(s, K, rb, n, g, dim, sc, pf);
        // The 16-token parts that hold rows (a short tile, a small page).
        quant_softmax(s, g, sc, corr, use_amx ? 16 * tq.count : std::min(tile, (n + 15) / 16 * 16));
        if (use_amx) {
          amx_tile_values<F>(tq, rb, g, dim, sc, corr, s.o, stride,
                             value_bias + i * g * (dim / F::group) * 16, ts, pf);
        } else if constexpr (integer_v) {
          if (use_integer) {
            integer_tile_values<F, HB>(V, rb, n, g, dim, sc, corr, s.o, stride, value_w,
                                       value_bias + i * g * (dim / F::group) * 16);
          } else {
            quant_accumulate<P, D, HB>(s, V, rb, n, g, dim, sc, corr);
          }
        } else {
          quant_accumulate<P, D, HB>(s, V, rb, n, g, dim, sc, corr);
        }
      } else if constexpr (formatted_precision<P>) {
        if (use_fp8) {
          if constexpr (fp8_tile)
            amx_fp8_tile<F>(s, tq, rb, g, dim, fp8_q[i], fp8_ts, sc, corr, pf);
        } else {
          quant_scores<P, D, HB>(s, K, rb, n, g, dim, sc, pf);
          quant_softmax(s, g, sc, corr, decode_tile);
          quant_accumulate<P, D, HB>(s, V, rb, n, g, dim, sc, corr);
        }
      } else {
        quant_tile_blocks<P>(s, K, V, rb, n, g, dim, sc, corr);
      }
      pf.finish();  // whatever the steps left (a short tile)
      s.t += n;
      active = active || s.t < it.end;
    }
  }
  if (use_amx || use_fp8) {
    amx::release();
    for (std::size_t i = 0; i < count; ++i)
      for (std::size_t h = 0; h < g; ++h) amx::unpermute_output(st[i].o + h * stride, dim);
  }
  if constexpr (integer)
    if (use_amx || (integer_v && use_integer))
      for (std::size_t i = 0; i < count; ++i)
        add_value_mins<F>(value_bias + i * g * (dim / F::group) * 16, g, dim, st[i].o);
  for (std::size_t i = 0; i < count; ++i) {
    finish_stream(st[i], g, dim);
    if constexpr (rotating_precision<P>)
      for (std::size_t h = 0; h < g; ++h) P::transform_output(st[i].o + h * stride, dim);
  }
}

//! decode_quant_task with the head blocking chosen from the group size.
template <class P, std::size_t D>
void decode_quant_items(const kv_layout& L, std::size_t layer, const seq_view* seqs,
                        const work_plan& plan, const float* qs, const float* qs_sink,
                        float* partial, std::size_t first, std::size_t count, float* scratch) {
  const std::size_t g = L.group();
  if (g % 4 == 0)
    decode_quant_task<P, D, 4>(L, layer, seqs, plan, qs, qs_sink, partial, first, count, scratch);
  else if (g % 2 == 0)
    decode_quant_task<P, D, 2>(L, layer, seqs, plan, qs, qs_sink, partial, first, count, scratch);
  else
    decode_quant_task<P, D, 1>(L, layer, seqs, plan, qs, qs_sink, partial, first, count, scratch);
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
