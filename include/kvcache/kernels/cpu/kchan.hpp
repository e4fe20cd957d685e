// CPU kernels of per-channel keys (precision/per_channel.hpp): the append
// that fills the fp16 residual and quantizes it R tokens at a time, the
// decode kernel that reads quantized groups and residual rows in one pass,
// and the key reader of the prefill tiles and read_row.
//
// Decode reads keys in place: per (item, key group) it multiplies each query
// head by the group's channel scales once (head_dim multiplies) and takes
// q . min as the group's score bias, so a token's score is one dot product of
// that scaled query with the token's codes,
//   s_t = sum_c (q_c scale_c) code_tc + sum_c q_c min_c,
// and nothing is dequantised. Residual tokens (the newest, fp16) are scored
// in the same pass, values are P's rows read as decode_quant.hpp reads them,
// with the same online softmax. Only fp32 rounding is added (bound 1e-4).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../../detail/simd.hpp"
#include "../../detail/thread_pool.hpp"
#include "../../half.hpp"
#include "../../precision/per_channel.hpp"
#include "../../tensor.hpp"
#include "../plan.hpp"
#include "../view.hpp"
#include "decode_quant.hpp"
#include "decode_stream.hpp"
#include "encode.hpp"
#include "prefetch.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace kvcache {
inline namespace v0 {
namespace detail {

//! Position of cache index i (groups are aligned to positions).
KVCACHE_HOST_DEVICE std::size_t kchan_position(const seq_view& sv, std::size_t i) noexcept {
  return i < sv.sink_len ? i : i + sv.pos_offset;
}

//! Slot of the token `delta` places from cache index i (delta may reach
//! tokens the window has evicted but whose rows are still stored: the cache
//! keeps every row of a group with a kept token, see cache.hpp).
KVCACHE_HOST_DEVICE std::size_t kchan_slot(const seq_view& sv, std::size_t i,
                                           std::ptrdiff_t delta) noexcept {
  if (i < sv.sink_len) return static_cast<std::size_t>(static_cast<std::ptrdiff_t>(i) + delta);
  std::ptrdiff_t off = static_cast<std::ptrdiff_t>(sv.ring_start + (i - sv.sink_len)) + delta;
  const auto len = static_cast<std::ptrdiff_t>(sv.ring_len);
  if (off < 0)
    off += len;
  else if (off >= len)
    off -= len;
  return sv.ring_base + static_cast<std::size_t>(off);
}

KVCACHE_HOST_DEVICE std::byte* kchan_row(const seq_view& sv, std::size_t run, std::size_t i,
                                         std::ptrdiff_t delta, std::size_t rb) noexcept {
  const std::size_t s = kchan_slot(sv, i, delta);
  return sv.pages[s / sv.page_tokens] + run + (s % sv.page_tokens) * rb;
}

//! The fp16 residual rows of (layer, head): (residual_tokens, dim).
inline std::uint16_t* kchan_residual(const seq_view& sv, const kv_layout& L, std::size_t layer,
                                     std::size_t head) noexcept {
  return sv.residual + ((layer * L.kv_heads + head) * sv.residual_tokens) * L.head_dim;
}

//! Floats of per-worker scratch write_kchan needs: one group of keys.
template <class P>
std::size_t write_kchan_floats(const kv_layout& L) noexcept {
  return P::token_group * L.head_dim;
}

//! Appends the step's rows: V encoded per token now; K into the residual,
//! and every R tokens the residual (and the step's keys that complete it)
//! quantized per channel into their rows, group by group. `buf`: (worker,
//! write_kchan_floats). Call once per layer and step.
template <class P>
void write_kchan(thread_pool& pool, const kv_layout& L, std::size_t layer,
                 const std::vector<seq_view>& seqs, const tensor_view<const float, 3>& k,
                 const tensor_view<const float, 3>& v, float* buf) {
  using KF = typename P::key_format;
  using V = typename P::value_precision;
  constexpr std::size_t G = P::token_group, R = P::residual;
  const std::size_t rb = L.row_bytes, dim = L.head_dim;
  pool.run(seqs.size() * L.kv_heads, [&](std::size_t task, std::size_t worker) {
    const seq_view& s = seqs[task / L.kv_heads];
    const std::size_t h = task % L.kv_heads;
    const std::size_t kr = L.run_offset(s.page_tokens, layer, 0, h);
    const std::size_t vr = L.run_offset(s.page_tokens, layer, 1, h);
    for (std::size_t t = 0; t < s.q_len; ++t)
      encode_row<V>(&v(s.q_begin + t, h, 0), s.row(vr, s.first_pos + t, rb), dim);
    std::uint16_t* res = kchan_residual(s, L, layer, h);
    // Tokens u of [0, a + n): the residual's a, then the step's n.
    const std::size_t a = s.res_prev, total = a + s.q_len, flushed = total / R * R;
    float* x = buf + worker * G * dim;  // (G, dim)
    std::byte* rows[G];
    for (std::size_t g0 = 0; g0 < flushed; g0 += G) {
      for (std::size_t j = 0; j < G; ++j) {
        const std::size_t u = g0 + j;
        float* xr = x + j * dim;
        if (u < a) {
          for (std::size_t d = 0; d < dim; ++d) xr[d] = half_bits_to_float(res[u * dim + d]);
        } else {
          const float* src = &k(s.q_begin + u - a, h, 0);
          for (std::size_t d = 0; d < dim; ++d) xr[d] = fp16_round(src[d]);
        }
        // Token u is kept, at cache index first_pos - a + u (the residual
        // lies inside the window).
        rows[j] = s.row(kr, s.first_pos - a + u, rb);
      }
      KF::encode_group(x, rows, dim);
    }
    for (std::size_t u = std::max(flushed, a); u < total; ++u) {
      const float* src = &k(s.q_begin + u - a, h, 0);
      std::uint16_t* dst = res + (u - flushed) * dim;
      for (std::size_t d = 0; d < dim; ++d) dst[d] = float_to_half_bits(src[d]);
    }
  });
}

//! Decodes the key of cache index i into out[0], out[stride], ... (dim
//! floats; prefill passes a row of its K tile): from the residual for the
//! newest res_len tokens, else from its group's rows.
template <class P>
void kchan_key(const seq_view& sv, const kv_layout& L, std::size_t layer, std::size_t head,
               std::size_t i, float* out, std::size_t stride = 1) noexcept {
  using KF = typename P::key_format;
  constexpr std::size_t G = P::token_group;
  const std::size_t dim = L.head_dim, rb = L.row_bytes;
  if (i + sv.res_len >= sv.kv_len) {
    const std::uint16_t* r =
        kchan_residual(sv, L, layer, head) + (i + sv.res_len - sv.kv_len) * dim;
    for (std::size_t d = 0; d < dim; ++d) out[d * stride] = half_bits_to_float(r[d]);
    return;
  }
  const std::size_t kr = L.run_offset(sv.page_tokens, layer, 0, head);
  const auto ph = static_cast<std::ptrdiff_t>(kchan_position(sv, i) % G);
  const std::byte* rows[G];
  for (std::size_t r = 0; r < G; ++r)
    rows[r] = kchan_row(sv, kr, i, static_cast<std::ptrdiff_t>(r) - ph, rb);
  KF::decode_token(kchan_row(sv, kr, i, 0, rb), rows, dim, out, stride);
}

//! Sixteen codes (channels 16 c ..) of a K row, as floats.
template <class KF>
KVCACHE_ALWAYS_INLINE simd::vf kchan_codes16(const std::byte* row, std::size_t c) noexcept {
  using namespace simd;
  const auto* p = reinterpret_cast<const std::uint8_t*>(row);
  vu x;
  if constexpr (KF::bits == 4) {
    x = (widen_unsigned(p + (c / 2) * 16) >> static_cast<std::uint32_t>(4 * (c % 2))) & 15u;
  } else {
    x = int2_codes16(p, c);
  }
  return to_float((vi)x);
}

//! The channel scales and mins of the key group holding cache index i
//! (position phase ph in its group), gathered from the group's G rows: row r
//! holds those of channels [r x dim / G, (r + 1) x dim / G).
//! Decode and prefill gather them once per group, so this is on the hot
//! path: when the group's rows are one run of the storage (the usual case)
//! they are addressed from its first row, not through the slot map (a
//! division per row), and each fp16 value is one conversion. At head_dim 128
//! the gather had been a third of decode's time.
template <class P>
void kchan_group_scales(const seq_view& sv, std::size_t kr, std::size_t i, std::size_t ph,
                        std::size_t rb, std::size_t dim, float* scl, float* mins) noexcept {
  using KF = typename P::key_format;
  constexpr std::size_t G = P::token_group;
  const std::size_t pr = KF::per_row(dim), so = KF::scale_offset(dim), mo = KF::min_offset(dim);
  auto gather = [&](std::size_t r, const std::byte* prow) {
#if defined(__F16C__)
    // Four channels' scales and mins per conversion.
    if (pr % 4 == 0) {
      for (std::size_t j = 0; j < pr; j += 4) {
        const auto* sp = reinterpret_cast<const __m128i*>(prow + so + 2 * j);
        const auto* mp = reinterpret_cast<const __m128i*>(prow + mo + 2 * j);
        _mm_storeu_ps(scl + r * pr + j, _mm_cvtph_ps(_mm_loadl_epi64(sp)));
        _mm_storeu_ps(mins + r * pr + j, _mm_cvtph_ps(_mm_loadl_epi64(mp)));
      }
      return;
    }
#endif
    for (std::size_t j = 0; j < pr; ++j) {
      std::uint16_t s, m;
      std::memcpy(&s, prow + so + 2 * j, 2);
      std::memcpy(&m, prow + mo + 2 * j, 2);
      scl[r * pr + j] = simd::half_scalar(s);
      mins[r * pr + j] = simd::half_scalar(m);
    }
  };
  if (ph == 0 && sv.run(i) >= G) {
    const std::byte* first = kchan_row(sv, kr, i, 0, rb);
    for (std::size_t r = 0; r < G; ++r) gather(r, first + r * rb);
    return;
  }
  for (std::size_t r = 0; r < G; ++r)
    gather(r, kchan_row(sv, kr, i, static_cast<std::ptrdiff_t>(r) - static_cast<std::ptrdiff_t>(ph),
                        rb));
}

//! The channel scales and mins of one key group, kept by a reader that
//! decodes many keys of a group in turn (the prefill tiles): gathering them
//! from the group's G rows once per group instead of once per key.
struct kchan_group_params {
  float* scl;                         // (dim)
  float* mins;                        // (dim)
  std::size_t pos = ~std::size_t{0};  // first position of the group held
};

//! kchan_key, vectorised, with the group's scales and mins gathered once per
//! group into `gp`.
template <class P>
void kchan_key_grouped(const seq_view& sv, const kv_layout& L, std::size_t layer, std::size_t head,
                       std::size_t i, float* out, kchan_group_params& gp) noexcept {
  using namespace simd;
  using KF = typename P::key_format;
  constexpr std::size_t G = P::token_group;
  const std::size_t dim = L.head_dim, rb = L.row_bytes;
  if (i + sv.res_len >= sv.kv_len) {
    kchan_key<P>(sv, L, layer, head, i, out);
    return;
  }
  const std::size_t kr = L.run_offset(sv.page_tokens, layer, 0, head);
  const std::size_t pos = kchan_position(sv, i), ph = pos % G;
  if (pos - ph != gp.pos) {
    gp.pos = pos - ph;
    kchan_group_scales<P>(sv, kr, i, ph, rb, dim, gp.scl, gp.mins);
  }
  const std::byte* row = kchan_row(sv, kr, i, 0, rb);
  for (std::size_t c = 0; c < dim / lanes; ++c)
    store(out + c * lanes,
          kchan_codes16<KF>(row, c) * load(gp.scl + c * lanes) + load(gp.mins + c * lanes));
}

//! Scores of n <= quant_tile tokens x g heads into sc (g, score_stride): qk
//! (g, dim) against `read(j, c)` (16 elements of token j), plus bias[h].
template <std::size_t HB, class Read>
KVCACHE_ALWAYS_INLINE void kchan_scores(const float* qk, const float* bias, std::size_t n,
                                        std::size_t g, std::size_t dim, float* sc, Read&& read,
                                        prefetch_cursor& pf) noexcept {
  using namespace simd;
  constexpr std::size_t TOK = lanes / HB;
  const std::size_t nc = dim / lanes;
  for (std::size_t hb = 0; hb < g; hb += HB) {
    for (std::size_t j0 = 0; j0 < quant_tile; j0 += TOK) {
      pf.issue();
      if (j0 >= n) {
        for (std::size_t h = 0; h < HB; ++h)
          for (std::size_t t = 0; t < TOK; ++t) sc[(hb + h) * score_stride + j0 + t] = -INFINITY;
        continue;
      }
      vf acc[lanes] = {};
      for (std::size_t c = 0; c < nc; ++c) {
        vf qv[HB];
        for (std::size_t h = 0; h < HB; ++h) qv[h] = load(qk + (hb + h) * dim + c * lanes);
        for (std::size_t t = 0; t < TOK; ++t) {
          const vf kv = read(std::min(j0 + t, n - 1), c);
          for (std::size_t h = 0; h < HB; ++h) acc[h * TOK + t] += qv[h] * kv;
        }
      }
      const vf sums = reduce16(acc);
      for (std::size_t h = 0; h < HB; ++h)
        for (std::size_t t = 0; t < TOK; ++t)
          sc[(hb + h) * score_stride + j0 + t] =
              j0 + t < n ? sums[h * TOK + t] + (bias ? bias[hb + h] : 0.f) : -INFINITY;
    }
  }
}

// ---- keys on the tile unit --------------------------------------------------
//
// A group's scores are one integer product per token: the codes (0..15 or
// 0..3, which tdpbssd takes as they are) by the query times the group's
// channel scales, quantized once per group to three bytes per element with
// one factor per head (prepare). Every 64-dimension chunk adds into the same
// C lanes (four per head), so a token's score is its C row times a constant
// vector of lane factors, summed per head (amx::heads_by_token), plus the
// group's q . min. Per-token formats also scale each row by its own block
// scales; here nothing depends on the token but its codes.

//! Whether decode scores P's quantized keys on the tile unit (when the CPU
//! has one): packed codes whose values P.V's tile path also takes, groups of
//! whole 16-token quarters.
template <class P>
constexpr bool channel_tile_keys() noexcept {
  if constexpr (channel_keys<P>) {
    using FV = typename format_of<typename P::value_precision>::type;
    if constexpr (std::is_void_v<FV>)
      return false;
    else
      return KVCACHE_HAS_AMX && amx::supported_format<FV>() && FV::bits != 8 &&
             FV::bits == P::key_format::bits && P::token_group % 16 == 0;
  } else {
    return false;
  }
}

//! The relative L2 error decode may add to float64 attention over the
//! cache's own decoded rows: fp32 rounding on the float paths (1e-4); with
//! integer P.V (VNNI, P's values int8 or int4; the tile unit, int2 too),
//! the rounded softmax weights add up to ~3e-4 on the fidelity data, and
//! keys on the tile unit round the scaled query to three bytes: both held to
//! decode_quant.hpp's 1e-3.
template <class P>
constexpr double kchan_error_bound() noexcept {
  if constexpr (channel_keys<P>)
    return integer_values<typename P::value_precision>() || channel_tile_keys<P>() ? 1e-3 : 1e-4;
  else
    return 1e-4;
}

namespace kchan_tiles {

//! Codes as amx::unpack_keys reads them: the block formats' packing, nothing
//! subtracted.
template <std::size_t Bits>
struct codes {
  static constexpr std::size_t bits = Bits;
  static constexpr block_kind kind = Bits == 4 ? block_kind::int4_asym : block_kind::int2_asym;
};

#if KVCACHE_HAS_AMX
//! An item's query heads, four at a time, in rows of four dimensions: row R
//! of group grp (16 floats at qi + (grp dim / 4 + R) 16) holds dimensions
//! 4 R .. 4 R + 3 of heads 4 grp .. 4 grp + 3, head-major, which is the B
//! tiles' order (prepare). Once per item.
KVCACHE_ALWAYS_INLINE void interleave_query(const float* q, std::size_t g, std::size_t dim,
                                            float* qi) noexcept {
  for (std::size_t grp = 0; grp < g / 4; ++grp)
    for (std::size_t R = 0; R < dim / 4; ++R) {
      const float* h0 = q + 4 * grp * dim + 4 * R;
      __m512 x = _mm512_castps128_ps512(_mm_loadu_ps(h0));
      x = _mm512_insertf32x4(x, _mm_loadu_ps(h0 + dim), 1);
      x = _mm512_insertf32x4(x, _mm_loadu_ps(h0 + 2 * dim), 2);
      x = _mm512_insertf32x4(x, _mm_loadu_ps(h0 + 3 * dim), 3);
      _mm512_storeu_ps(qi + (grp * (dim / 4) + R) * 16, x);
    }
}

//! Writes the B tiles and lane factors of the query (interleave_query's qi)
//! times the group's channel scales into t, and each head's q . min into
//! bias. One factor per head and three bytes per element, qk ~= sq (hi +
//! mid / 256 + lo / 65536), sq = max |qk| / 127: the x15 outlier channels'
//! scales make their products the largest, and with two bytes the others'
//! rounding against them moved outputs by up to 1.5e-3 on the fidelity data.
//! Head h's parts go to lanes 2 h (hi), 2 h + 1 (mid) and 8 + 2 h (lo);
//! lane 9 + 2 h is zero, so amx::heads_by_token sums them. Working on qi's
//! rows, the products, maxima and sums of four heads share vectors, and four
//! rows' levels pack into one vector whose dword 4 h + m is row m's of head
//! h: two permutes place each tile row.
KVCACHE_ALWAYS_INLINE void prepare(const float* qi, const float* scl, const float* mins,
                                   std::size_t g, std::size_t dim, const amx::query_tiles& t,
                                   float* bias) noexcept {
  const std::size_t rows = dim / 4;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // 4 h for lane 2 h + j or 8 + 2 h + j: where head h's dwords and its
  // maximum are; lanes 2 h + 1 take theirs from the second source (+ 16).
  const __m512i head4 =
      _mm512_slli_epi32(_mm512_srli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 1), 2);
  const __m512i from =
      _mm512_add_epi32(head4, _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(1)), 4));
  const __m512 part = _mm512_setr_ps(1.f / 127, 1.f / (127 * 256.f), 1.f / 127, 1.f / (127 * 256.f),
                                     1.f / 127, 1.f / (127 * 256.f), 1.f / 127, 1.f / (127 * 256.f),
                                     1.f / (127 * 65536.f), 0.f, 1.f / (127 * 65536.f), 0.f,
                                     1.f / (127 * 65536.f), 0.f, 1.f / (127 * 65536.f), 0.f);
  const __m512 s256 = _mm512_set1_ps(256.f);
  for (std::size_t grp = 0; grp < g / 4; ++grp) {
    const float* Q = qi + grp * rows * 16;
    __m512 m = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (std::size_t R = 0; R < rows; ++R) {
      const __m512 qv = _mm512_loadu_ps(Q + 16 * R);
      const __m512 x = _mm512_mul_ps(qv, _mm512_broadcast_f32x4(_mm_loadu_ps(scl + 4 * R)));
      b = _mm512_fmadd_ps(qv, _mm512_broadcast_f32x4(_mm_loadu_ps(mins + 4 * R)), b);
      m = _mm512_max_ps(m, _mm512_abs_ps(x));
    }
    // Each head's four lanes: its maximum and its sum in all of them.
    m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xb1));
    m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4e));
    b = _mm512_add_ps(b, _mm512_permute_ps(b, 0xb1));
    b = _mm512_add_ps(b, _mm512_permute_ps(b, 0x4e));
    _mm_storeu_ps(bias + 4 * grp, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, b)));
    const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ),
                                           _mm512_set1_ps(127.f), m);
    _mm512_storeu_ps(const_cast<float*>(t.qf(grp, 0)),
                     _mm512_mul_ps(_mm512_permutexvar_ps(head4, m), part));
    for (std::size_t c = 0; c < dim / 64; ++c) {
      auto* B = const_cast<std::int8_t*>(t.b(grp, c));
      for (std::size_t r0 = 0; r0 < 16; r0 += 4) {
        // Each part the rounded remainder of the one before, times 256
        // (|v| <= 127; a remainder of exactly 128 saturates to 127).
        __m512i p32[3][4];
        for (std::size_t k = 0; k < 4; ++k) {
          const std::size_t R = 16 * c + r0 + k;
          __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(Q + 16 * R),
                                                 _mm512_broadcast_f32x4(_mm_loadu_ps(scl + 4 * R))),
                                   inv);
          for (std::size_t pt = 0; pt < 3; ++pt) {
            p32[pt][k] = _mm512_cvtps_epi32(v);
            v = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(p32[pt][k])), s256);
          }
        }
        __m512i lv[3];
        for (std::size_t pt = 0; pt < 3; ++pt)
          lv[pt] = _mm512_packs_epi16(_mm512_packs_epi32(p32[pt][0], p32[pt][1]),
                                      _mm512_packs_epi32(p32[pt][2], p32[pt][3]));
        for (std::size_t k = 0; k < 4; ++k) {
          const __m512i ix = _mm512_add_epi32(from, _mm512_set1_epi32(static_cast<int>(k)));
          __m512i row = _mm512_maskz_permutex2var_epi32(0x00ff, lv[0], ix, lv[1]);
          row = _mm512_mask_permutexvar_epi32(row, 0x5500, ix, lv[2]);
          _mm512_storeu_si512(B + 64 * (r0 + k), row);
        }
      }
    }
  }
}

//! Scores of 16 unpacked key rows (A, astride apart; nv of them valid) of
//! one group for g heads into sc (g rows, score_stride apart), -inf past nv.
KVCACHE_ALWAYS_INLINE void quarter(const std::int8_t* A, std::size_t astride, std::size_t g,
                                   std::size_t dim, const amx::query_tiles& q, const float* bias,
                                   std::int32_t* cbuf, float* sc, std::size_t nv,
                                   prefetch_cursor& pf) noexcept {
  const __mmask16 valid = static_cast<__mmask16>((1u << nv) - 1u);
  for (std::size_t grp = 0; grp < g / 4; ++grp) {
    // Even and odd chunks in their own registers, operands and sums: a load
    // into a register a product still reads, or a product into the sum of
    // the one before, would wait for it (integer sums add exactly after).
    _tile_zero(4);
    _tile_zero(5);
    for (std::size_t c = 0; c < dim / 64; c += 2) {
      KVCACHE_TILE_LOAD(0, A + 64 * c, static_cast<long>(astride));
      KVCACHE_TILE_LOAD(2, q.b(grp, c), 64);
      if (c + 1 < dim / 64) {
        KVCACHE_TILE_LOAD(1, A + 64 * (c + 1), static_cast<long>(astride));
        KVCACHE_TILE_LOAD(3, q.b(grp, c + 1), 64);
      }
      _tile_dpbssd(4, 0, 2);
      if (c + 1 < dim / 64) _tile_dpbssd(5, 1, 3);
    }
    KVCACHE_TILE_STORE(4, cbuf, 64);
    KVCACHE_TILE_STORE(5, cbuf + 256, 64);
    const __m512 qf = _mm512_loadu_ps(q.qf(grp, 0));
    __m512 y[16];
    for (std::size_t t = 0; t < 16; ++t) {
      pf.issue();
      const __m512i sum = _mm512_add_epi32(_mm512_loadu_si512(cbuf + 16 * t),
                                           _mm512_loadu_si512(cbuf + 256 + 16 * t));
      y[t] = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), qf);
    }
    __m512 out[4];
    amx::heads_by_token(y, out);
    for (std::size_t h = 0; h < 4; ++h)
      _mm512_storeu_ps(
          sc + (4 * grp + h) * score_stride,
          _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY),
                               _mm512_add_ps(out[h], _mm512_set1_ps(bias[4 * grp + h]))));
  }
}
#endif

}  // namespace kchan_tiles

//! Floats of per-worker scratch decode_kchan_task needs.
inline std::size_t decode_kchan_scratch_floats(const kv_layout& L) noexcept {
  const std::size_t g = L.group(), dim = L.head_dim;
  // + integer P.V's int16 weights and per-(head, block) min sums, and the
  // tile unit's query tiles and scratch (64-byte aligned).
  const std::size_t sets = amx::tile_tokens / 16;  // a tile's groups at most
  const std::size_t tiles =
      sets * (amx::query_bytes(g, dim) + g * sizeof(float)) + amx::tile_scratch::bytes(dim) + 64;
  return g * score_stride + 4 * g + g * dim + 2 * dim + g * dim + 128 + tiles / sizeof(float) + 1;
}

//! Decode items [first, first + count), one after another.
template <class P, std::size_t D, std::size_t HB>
void decode_kchan_task(const kv_layout& L, std::size_t layer, const seq_view* seqs,
                       const work_plan& plan, const float* qs, const float* qs_sink, float* partial,
                       std::size_t first, std::size_t count, float* scratch) {
  using namespace simd;
  using KF = typename P::key_format;
  using V = typename P::value_precision;
  constexpr std::size_t G = P::token_group;
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, rb = L.row_bytes;
  const std::size_t nc = dim / lanes;
  float* sc = scratch;                // (g, score_stride)
  float* ml = sc + g * score_stride;  // (2, g)
  float* corr = ml + 2 * g;           // (g)
  float* bias = corr + g;             // (g)
  float* qk = bias + g;  // (g, dim) queries times the group's scales, or interleave_query's rows
  float* scl = qk + g * dim;  // (dim)
  float* mins = scl + dim;    // (dim)
  // Values are P's rows: with VNNI, P.V takes the integer path of
  // decode_quant.hpp (int16 weights, vpdpwssd) where P has one.
  using FV = typename format_of<V>::type;
  constexpr bool int_v = integer_values<V>();
  [[maybe_unused]] bool use_int_v = false;
  [[maybe_unused]] float* vbias = mins + dim;   // (g, dim / group, 16) running min sums
  [[maybe_unused]] std::int16_t* vw = nullptr;  // (g, dim / group, 32) weights
  if constexpr (int_v) {
    use_int_v = vnni::supported_dim<FV>(dim) && g <= 64 && dim <= 2048;
    vw = reinterpret_cast<std::int16_t*>(vbias + g * (dim / FV::group) * 16);
  }
  // Keys (and values) on the tile unit where it is available.
  [[maybe_unused]] bool use_tiles = false;
  // One set of query tiles and score biases per group of a tile: all are
  // written before the tile's other work, which gives the stores time to
  // reach the cache before the tile loads read them (loaded at once, the
  // first product waited ~15% of decode's time).
  constexpr std::size_t sets = amx::tile_tokens / 16;
  [[maybe_unused]] amx::query_tiles qt[sets] = {};
  [[maybe_unused]] float* tbias = nullptr;  // (sets, g)
  [[maybe_unused]] amx::tile_scratch ts{};
  if constexpr (channel_tile_keys<P>()) {
    use_tiles = amx::supported_shape<FV>(dim, g) && amx::available();
    if (use_tiles) {
      auto a = reinterpret_cast<std::uintptr_t>(vbias + g * dim);  // past vbias and vw
      a = (a + 63) & ~std::uintptr_t{63};
      for (std::size_t k = 0; k < sets; ++k)
        qt[k] = {reinterpret_cast<std::byte*>(a) + k * amx::query_bytes(g, dim), dim / 64};
      ts = {qt[0].base + sets * amx::query_bytes(g, dim), dim};
      tbias = reinterpret_cast<float*>(ts.base + amx::tile_scratch::bytes(dim));
      amx::configure();
    }
  }
  for (std::size_t idx = first; idx < first + count; ++idx) {
    decode_stream s;
    start_stream(s, plan, seqs, idx, qs, qs_sink, partial, ml, g, dim);
    const decode_item& it = *s.item;
    const seq_view& sv = seqs[it.seq];
    const std::size_t kr = L.run_offset(sv.page_tokens, layer, 0, it.head);
    const std::size_t vr = L.run_offset(sv.page_tokens, layer, 1, it.head);
    const std::size_t res0 = sv.kv_len - sv.res_len;
    const std::uint16_t* res = kchan_residual(sv, L, layer, it.head);
    std::size_t group_pos = ~std::size_t{0};  // position of the group qk holds
    if constexpr (int_v || channel_tile_keys<P>())
      if (use_int_v || use_tiles)
        for (std::size_t k = 0; k < g * (dim / FV::group) * 16; ++k) vbias[k] = 0.f;
    // Per group, from cache index i at position pos: the query times its
    // channel scales and q . min.
    auto prepare_group = [&](std::size_t i, std::size_t pos) {
      const std::size_t ph = pos % G;
      group_pos = pos - ph;
      kchan_group_scales<P>(sv, kr, i, ph, rb, dim, scl, mins);
      for (std::size_t h = 0; h < g; ++h) {
        vf b{};
        for (std::size_t c = 0; c < nc; ++c) {
          const vf q = load(s.q + h * dim + c * lanes);
          store(qk + h * dim + c * lanes, q * load(scl + c * lanes));
          b += q * load(mins + c * lanes);
        }
        bias[h] = tree_add(b);
      }
    };
    // Residual keys (fp16 rows) [t, t + n), scored in fp32 on every path.
    auto residual_scores = [&](std::size_t t, std::size_t n, prefetch_cursor& pf) {
      const std::uint16_t* R = res + (t - res0) * dim;
      kchan_scores<HB>(
          s.q, nullptr, n, g, dim, sc,
          [&](std::size_t j, std::size_t c) {
            return load(reinterpret_cast<const half*>(R + j * dim) + c * lanes);
          },
          pf);
    };
#if KVCACHE_HAS_AMX
    if constexpr (channel_tile_keys<P>())
      if (use_tiles) kchan_tiles::interleave_query(s.q, g, dim, qk);
#endif
    [[maybe_unused]] std::size_t set_group[sets];
    for (auto& x : set_group) x = ~std::size_t{0};
    while (s.t < it.end) {
      const std::size_t t = s.t;
#if KVCACHE_HAS_AMX
      if constexpr (channel_tile_keys<P>())
        if (use_tiles) {
          // Tiles of 64 tokens (the residual's of 32, scored in fp32). A
          // quantized tile is one or more groups' segments; a segment that
          // ends off a 16-token quarter ends the tile (a window's first
          // group), so that every quarter lies in one group. (Sinks are whole
          // groups: cache.hpp requires it.)
          const bool residual = t >= res0;
          std::size_t n = std::min({amx::tile_tokens, it.end - t, sv.run(t)});
          struct segment {
            std::size_t start, len, pos;  // pos: the position of its first token
          } seg[amx::tile_tokens / 16];
          std::size_t nseg = 0;
          if (residual) {
            n = std::min(n, quant_tile);
          } else {
            n = std::min(n, res0 - t);
            for (std::size_t m = 0; m < n;) {
              const std::size_t pos = kchan_position(sv, t + m), ph = pos % G;
              std::size_t len = std::min(n - m, G - ph);
              seg[nseg++] = {m, len, pos};
              m += len;
              if (m % 16 != 0) n = m;
            }
          }
          const std::byte* K = sv.row(kr, t, rb);
          const std::byte* Vt = sv.row(vr, t, rb);
          prefetch_cursor pf = next_tile_prefetch(sv, kr, vr, rb, t + n, it.end, amx::tile_tokens);
          pf.spread(amx::issue_steps(g, dim));
          for (std::size_t k = 0; k < nseg; ++k)
            if (const std::size_t ph = seg[k].pos % G; seg[k].pos - ph != set_group[k]) {
              set_group[k] = seg[k].pos - ph;
              kchan_group_scales<P>(sv, kr, t + seg[k].start, ph, rb, dim, scl, mins);
              kchan_tiles::prepare(qk, scl, mins, g, dim, qt[k], tbias + k * g);
            }
          const amx::tile_quarters tq = amx::dense_quarters(K, Vt, rb, n);
          amx::key_rows keys{};
          if (!residual)
            keys = amx::unpack_keys<kchan_tiles::codes<KF::bits>>(tq, rb, dim, ts.keys());
          amx_value_tiles<FV>(tq, rb, dim, ts, pf);
          if (residual) {
            residual_scores(t, n, pf);
          } else {
            for (std::size_t k = 0; k < nseg; ++k) {
              for (std::size_t r = seg[k].start; r < seg[k].start + seg[k].len; r += 16)
                kchan_tiles::quarter(keys.a[r / 16], keys.stride[r / 16], g, dim, qt[k],
                                     tbias + k * g, ts.c(), sc + r,
                                     std::min<std::size_t>(16, seg[k].start + seg[k].len - r), pf);
            }
          }
          quant_softmax(s, g, sc, corr, std::min(amx::tile_tokens, (n + 15) / 16 * 16));
          amx_tile_values<FV>(tq, rb, g, dim, sc, corr, s.o, dim + 1, vbias, ts, pf);
          pf.finish();
          s.t += n;
          continue;
        }
#endif
      std::size_t n = std::min({quant_tile, it.end - t, sv.run(t)});
      const std::size_t pos = t < res0 ? kchan_position(sv, t) : 0;
      if (t < res0) n = std::min({n, res0 - t, G - pos % G});
      // The next tile's K and V rows, requested over this tile's score steps
      // (decode_quant.hpp's cursor): the group's scales are gathered from
      // all of its rows when the tile starts, which otherwise waits on DRAM
      // for each row.
      prefetch_cursor pf = next_tile_prefetch(sv, kr, vr, rb, t + n, it.end, quant_tile);
      pf.spread((g / HB) * (quant_tile / (lanes / HB)));
      if (t >= res0) {
        residual_scores(t, n, pf);
      } else {
        if (pos - pos % G != group_pos) prepare_group(t, pos);
        const std::byte* K = sv.row(kr, t, rb);
        kchan_scores<HB>(
            qk, bias, n, g, dim, sc,
            [&](std::size_t j, std::size_t c) { return kchan_codes16<KF>(K + j * rb, c); }, pf);
      }
      quant_softmax(s, g, sc, corr, quant_tile);
      bool done = false;
      if constexpr (int_v)
        if (use_int_v) {
          integer_tile_values<FV, HB>(sv.row(vr, t, rb), rb, n, g, dim, sc, corr, s.o, dim + 1, vw,
                                      vbias);
          done = true;
        }
      if (!done) quant_accumulate<V, D, HB>(s, sv.row(vr, t, rb), rb, n, g, dim, sc, corr);
      pf.finish();
      s.t += n;
    }
    if constexpr (channel_tile_keys<P>())
      if (use_tiles)
        for (std::size_t h = 0; h < g; ++h) amx::unpermute_output(s.o + h * (dim + 1), dim);
    if constexpr (int_v || channel_tile_keys<P>())
      if (use_int_v || use_tiles) add_value_mins<FV>(vbias, g, dim, s.o);
    finish_stream(s, g, dim);
  }
  if constexpr (channel_tile_keys<P>())
    if (use_tiles) amx::release();
}

template <class P, std::size_t D>
void decode_kchan_items(const kv_layout& L, std::size_t layer, const seq_view* seqs,
                        const work_plan& plan, const float* qs, const float* qs_sink,
                        float* partial, std::size_t first, std::size_t count, float* scratch) {
  const std::size_t g = L.group();
  if (g % 4 == 0)
    decode_kchan_task<P, D, 4>(L, layer, seqs, plan, qs, qs_sink, partial, first, count, scratch);
  else if (g % 2 == 0)
    decode_kchan_task<P, D, 2>(L, layer, seqs, plan, qs, qs_sink, partial, first, count, scratch);
  else
    decode_kchan_task<P, D, 1>(L, layer, seqs, plan, qs, qs_sink, partial, first, count, scratch);
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
