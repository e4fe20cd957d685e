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

//! The relative L2 error decode may add to float64 attention over the
//! cache's own decoded rows: fp32 rounding on the float paths (1e-4); with
//! integer P.V (VNNI, P's values int8 or int4), the int16 softmax weights
//! add up to ~3e-4 on the fidelity data, held to decode_quant.hpp's 1e-3.
template <class P>
constexpr double kchan_error_bound() noexcept {
  if constexpr (channel_keys<P>)
    return integer_values<typename P::value_precision>() ? 1e-3 : 1e-4;
  else
    return 1e-4;
}

//! Floats of per-worker scratch decode_kchan_task needs.
inline std::size_t decode_kchan_scratch_floats(const kv_layout& L) noexcept {
  const std::size_t g = L.group(), dim = L.head_dim;
  // + integer P.V's int16 weights and per-(head, block) min sums.
  return g * score_stride + 4 * g + g * dim + 2 * dim + g * dim + 128;
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
  float* qk = bias + g;               // (g, dim) queries times the group's scales
  float* scl = qk + g * dim;          // (dim)
  float* mins = scl + dim;            // (dim)
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
    if constexpr (int_v)
      if (use_int_v)
        for (std::size_t k = 0; k < g * (dim / FV::group) * 16; ++k) vbias[k] = 0.f;
    while (s.t < it.end) {
      const std::size_t t = s.t;
      std::size_t n = std::min({quant_tile, it.end - t, sv.run(t)});
      // The next tile's K and V rows, requested over this tile's score steps
      // (decode_quant.hpp's cursor): the group's scales are gathered from
      // all of its rows when the tile starts, which otherwise waits on DRAM
      // for each row.
      prefetch_cursor pf = next_tile_lines(sv.row(kr, t, rb), sv.row(vr, t, rb), rb);
      pf.spread((g / HB) * (quant_tile / (lanes / HB)));
      if (t >= res0) {
        const std::uint16_t* K = res + (t - res0) * dim;
        kchan_scores<HB>(
            s.q, nullptr, n, g, dim, sc,
            [&](std::size_t j, std::size_t c) {
              return load(reinterpret_cast<const half*>(K + j * dim) + c * lanes);
            },
            pf);
      } else {
        const std::size_t pos = kchan_position(sv, t), ph = pos % G;
        n = std::min({n, res0 - t, G - ph});
        if (pos - ph != group_pos) {
          group_pos = pos - ph;
          kchan_group_scales<P>(sv, kr, t, ph, rb, dim, scl, mins);
          for (std::size_t h = 0; h < g; ++h) {
            vf b{};
            for (std::size_t c = 0; c < nc; ++c) {
              const vf q = load(s.q + h * dim + c * lanes);
              store(qk + h * dim + c * lanes, q * load(scl + c * lanes));
              b += q * load(mins + c * lanes);
            }
            bias[h] = tree_add(b);
          }
        }
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
    if constexpr (int_v)
      if (use_int_v) add_value_mins<FV>(vbias, g, dim, s.o);
    finish_stream(s, g, dim);
  }
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
