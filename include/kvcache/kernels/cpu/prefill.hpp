// CPU prefill attention: causal flash attention over the same paged view that
// decode reads. One work item is a tile of up to 64 query rows (all query heads
// of one KV head's group for several new tokens); it walks the KV tiles up to
// its last position with an online softmax, so no N x N score matrix exists.
// A KV tile is converted to fp32 once and used by every row of the group
// (per-channel keys: each key from its group's rows or the fp16 residual).
// Tile products are hand-vectorised register-blocked loops (tile_scores,
// tile_accumulate) with the query rows in vector lanes; see below.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../../detail/simd.hpp"
#include "../../detail/thread_pool.hpp"
#include "../../tensor.hpp"
#include "../plan.hpp"
#include "../view.hpp"
#include "amx_bf16.hpp"
#include "kchan.hpp"
#include "rows.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

struct prefill_args {
  const kv_layout* layout;
  std::size_t layer;
  const seq_view* seqs;
  const work_plan* plan;
  tensor_view<const float, 3> q;
  float scale;
  tensor_view<float, 3> out;
  tensor_view<float, 2> lse;
  float* scratch;  // (worker, scratch_floats)
  std::size_t scratch_floats;
  //! Every row of a sequence attends to all its kv_len keys, without a causal
  //! mask: a cascade's shared prefix, which precedes every query.
  bool non_causal = false;
  //! (tokens, q_heads, dim) the queries that keys before a sequence's
  //! sink_len read (rotated at the query's cache position); empty: q.
  tensor_view<const float, 3> q_sink{};
};

//! Query rows are padded to whole vectors: the tile kernels hold rows in lanes.
inline std::size_t prefill_rows_padded(std::size_t rows) noexcept {
  return (rows + simd::lanes - 1) / simd::lanes * simd::lanes;
}

//! Floats of the FMA kernel's scratch for R padded rows; the tile unit's
//! buffers follow it.
inline constexpr std::size_t prefill_fma_scratch(std::size_t R, std::size_t D) noexcept {
  const std::size_t B = prefill_kv_tile;
  return 3 * R * D + R * B + 3 * D * B + 3 * R + D + 64;
}

//! Whether prefill of precision P may run its tile products on the AMX tile
//! unit in bf16 (amx_bf16.hpp): every precision but fp32 rows, the reference
//! (held to 1e-5 of float64). fp16 and bf16 rows split exactly; decoded rows
//! (block formats) to within 2^-17, far below their own rounding.
template <class P>
constexpr bool amx_bf16_prefill() noexcept {
  return !(direct_rows<P> && std::is_same_v<row_t<P>, float>);
}
//! Whether P's rows are bf16: their own hi parts, with no lo products.
template <class P>
constexpr bool bf16_rows() noexcept {
  return std::is_same_v<row_t<P>, bfloat16>;
}
//! Whether it splits P's stored rows directly, without a float copy.
template <class P>
constexpr bool amx_bf16_stored_rows() noexcept {
  return !channel_keys<P> && (std::is_same_v<row_t<P>, half> || bf16_rows<P>());
}

//! Floats of per-worker scratch the prefill kernel needs for tiles of `rows` rows.
inline std::size_t prefill_scratch_floats(const kv_layout& L, std::size_t rows) noexcept {
  const std::size_t R = prefill_rows_padded(rows), D = L.head_dim, B = prefill_kv_tile;
  return prefill_fma_scratch(R, D) + amx_bf16::scratch_floats(R, D, B);
}

// The tile products keep the query rows in vector lanes: scores are computed
// transposed, St = K Qt (keys by rows), from the queries transposed once per
// work item and each key row as it is stored. Nothing is transposed per KV
// tile (a per-tile K transpose cost as much as the products at 32-64 rows),
// the online softmax runs down columns of St, a vector of rows at a time, and
// P V reads St's weights as broadcast operands.

//! St[j, r0 + 0..16 RV) = sum_d K[j][d] Qt[d, r0 + ...] for keys j < nk (nk a
//! multiple of KB); Qt and St have row stride R.
template <std::size_t RV>
KVCACHE_ALWAYS_INLINE void tile_scores_block(const float* Qt, const float* const* K, float* St,
                                             std::size_t R, std::size_t r0, std::size_t nk,
                                             std::size_t dim) noexcept {
  using namespace simd;
  constexpr std::size_t KB = RV >= 3 ? 4 : 8;  // keys per pass: KB x RV accumulators
  for (std::size_t j = 0; j < nk; j += KB) {
    vf acc[KB][RV] = {};
    for (std::size_t d = 0; d < dim; ++d) {
      vf qv[RV];
      for (std::size_t v = 0; v < RV; ++v) qv[v] = load(Qt + d * R + r0 + v * lanes);
      for (std::size_t k = 0; k < KB; ++k) {
        const vf kb = splat(K[j + k][d]);
        for (std::size_t v = 0; v < RV; ++v) acc[k][v] += kb * qv[v];
      }
    }
    for (std::size_t k = 0; k < KB; ++k)
      for (std::size_t v = 0; v < RV; ++v) store(St + (j + k) * R + r0 + v * lanes, acc[k][v]);
  }
}

//! St (B, R) = K Qt for one tile: Qt (dim, R), K nk key rows (pointers; nk a
//! multiple of 8, rows past the tile's keys point at zeros), R a multiple of 16.
KVCACHE_ALWAYS_INLINE void tile_scores(const float* Qt, const float* const* K, float* St,
                                       std::size_t R, std::size_t nk, std::size_t dim) noexcept {
  constexpr std::size_t L = simd::lanes;
  std::size_t r0 = 0;
  for (; r0 + 4 * L <= R; r0 += 4 * L) tile_scores_block<4>(Qt, K, St, R, r0, nk, dim);
  switch ((R - r0) / L) {
    case 3:
      tile_scores_block<3>(Qt, K, St, R, r0, nk, dim);
      break;
    case 2:
      tile_scores_block<2>(Qt, K, St, R, r0, nk, dim);
      break;
    case 1:
      tile_scores_block<1>(Qt, K, St, R, r0, nk, dim);
      break;
    default:
      break;
  }
}

//! O[:, c0 .. c0 + CB vectors) = O * corr + P V, four rows at a time: each
//! value vector loaded feeds four rows, each weight broadcast CB vectors.
template <std::size_t CB>
KVCACHE_ALWAYS_INLINE void tile_accumulate_block(const float* Pt, const float* const* V, float* O,
                                                 const float* corr, std::size_t R, std::size_t nk,
                                                 std::size_t dim, std::size_t c0) noexcept {
  using namespace simd;
  for (std::size_t r = 0; r < R; r += 4) {
    vf acc[4][CB];
    for (std::size_t rr = 0; rr < 4; ++rr)
      for (std::size_t c = 0; c < CB; ++c)
        acc[rr][c] = load(O + (r + rr) * dim + (c0 + c) * lanes) * corr[r + rr];
    for (std::size_t j = 0; j < nk; ++j) {
      vf p[4];
      for (std::size_t rr = 0; rr < 4; ++rr) p[rr] = splat(Pt[j * R + r + rr]);
      const float* vj = V[j] + c0 * lanes;
      for (std::size_t c = 0; c < CB; ++c) {
        const vf vv = load(vj + c * lanes);
        for (std::size_t rr = 0; rr < 4; ++rr) acc[rr][c] += p[rr] * vv;
      }
    }
    for (std::size_t rr = 0; rr < 4; ++rr)
      for (std::size_t c = 0; c < CB; ++c) store(O + (r + rr) * dim + (c0 + c) * lanes, acc[rr][c]);
  }
}

//! O = O * corr + P V for one tile: weights Pt (B, R) transposed like St, of
//! which the first nk keys count, V nk value rows (pointers), O (R, dim),
//! corr (R); R a multiple of 4. Four rows by four vectors of dims at a time
//! (16 accumulators): 1.2x the rate of two rows by eight, whose value loads
//! outran L1 (benchmarks/tile_products.cpp).
KVCACHE_ALWAYS_INLINE void tile_accumulate(const float* Pt, const float* const* V, float* O,
                                           const float* corr, std::size_t R, std::size_t nk,
                                           std::size_t dim) noexcept {
  const std::size_t nc = dim / simd::lanes;
  std::size_t c0 = 0;
  for (; c0 + 4 <= nc; c0 += 4) tile_accumulate_block<4>(Pt, V, O, corr, R, nk, dim, c0);
  switch (nc - c0) {
    case 3:
      tile_accumulate_block<3>(Pt, V, O, corr, R, nk, dim, c0);
      break;
    case 2:
      tile_accumulate_block<2>(Pt, V, O, corr, R, nk, dim, c0);
      break;
    case 1:
      tile_accumulate_block<1>(Pt, V, O, corr, R, nk, dim, c0);
      break;
    default:
      break;
  }
}

//! Rotates a key row in place (rope.hpp's pairing, angles precomputed).
inline void rope_row(float* x, const float* cs, std::size_t rotary_dim, bool interleaved) noexcept {
  const std::size_t half = rotary_dim / 2;
  for (std::size_t i = 0; i < half; ++i) {
    const std::size_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float c = cs[2 * i], s = cs[2 * i + 1], x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
  }
}

//! A row of the tile as floats: the stored row itself for fp32, else decoded
//! (or copied, to be rotated) into `buf`. Built-in block formats decode 16
//! elements at a time through the decode kernels' readers (decode_quant.hpp;
//! a test holds them to the scalar block functions): int4 prefill attention
//! at 2048 tokens 2.4 times faster than decoding element by element.
//! stored_basis: a rotating precision's row as stored (rotated), not decoded
//! back (prefill then works in the rotated basis, see prefill_item_run).
template <class P>
KVCACHE_ALWAYS_INLINE const float* float_row(const std::byte* src, std::size_t dim, std::size_t rb,
                                             float* buf, bool stored_basis = false) noexcept {
  using namespace simd;
  if constexpr (formatted_precision<P> && !channel_keys<P>) {
    if (!rotating_precision<P> || stored_basis) {
      for (std::size_t c = 0; c < dim / lanes; ++c)
        store(buf + c * lanes, read_row16<P>(src, c, dim));
      return buf;
    }
  }
  const auto* r = rows<P>(src, 1, dim, rb, buf);
  if constexpr (std::is_same_v<row_t<P>, float>) {
    return r;
  } else {
    for (std::size_t c = 0; c < dim / lanes; ++c) store(buf + c * lanes, load(r + c * lanes));
    return buf;
  }
}

template <class P, std::size_t D>
void prefill_item_run(const prefill_args& a, const prefill_item& it, float* scratch) {
  using namespace simd;
  constexpr std::size_t B = prefill_kv_tile;
  const kv_layout& L = *a.layout;
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, rb = L.row_bytes;
  const seq_view& sv = a.seqs[it.seq];
  const std::size_t nrows = (it.row_end - it.row_begin) * g, R = prefill_rows_padded(nrows);
  const std::size_t RV = R / lanes;

  float* Qt = scratch;         // (dim, R)  scaled queries, transposed
  float* Qst = Qt + R * dim;   // (dim, R)  the same for the sinks, if they differ
  float* O = Qst + R * dim;    // (R, dim)  unnormalised output
  float* St = O + R * dim;     // (B, R)    scores, then weights, transposed
  float* Kf = St + R * B;      // (B, dim)  K rows as floats, when not stored so
  float* Vf = Kf + B * dim;    // (B, dim)  V rows as floats, when not stored so
  float* zero = Vf + B * dim;  // (dim)     the row that pads a tile to whole key blocks
  float* m = zero + dim;       // (R)
  float* l = m + R;            // (R)
  float* corr = l + R;         // (R)
  // Past corr, of the scratch's third D x B block (RoPE rotates rows in Kf
  // itself): per-channel keys' group scales and mins, 2 x dim floats.
  [[maybe_unused]] kchan_group_params kgp{corr + R, corr + R + dim};

  const std::size_t last_pos = a.non_causal ? sv.kv_len - 1 : sv.first_pos + it.row_end - 1;
  const bool own_sink_q = !a.q_sink.empty() && sv.sink_len > 0;
  for (std::size_t d = 0; d < dim; ++d) zero[d] = 0.f;
  for (std::size_t r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    for (std::size_t d = 0; d < dim; ++d) O[r * dim + d] = 0.f;
  }
  // A rotating precision (hadamard<P>) is attended in its stored basis, as
  // decode does: queries rotated once here, rows read as stored, outputs
  // rotated back at the end (the transform is orthonormal and its own
  // inverse). Not with RoPE on read, which must rotate the keys as decoded.
  [[maybe_unused]] const bool rotated =
      rotating_precision<P> && formatted_precision<P> && !channel_keys<P> && !sv.rope_cs;
  // Qt[d][r] = q[r][d] x scale, 16 x 16 blocks at a time; padding rows are 0.
  auto transpose_queries = [&](const tensor_view<const float, 3>& q, float* dst) {
    for (std::size_t r0 = 0; r0 < R; r0 += lanes) {
      const float* src[lanes];
      for (std::size_t i = 0; i < lanes; ++i) {
        const std::size_t r = r0 + i, tok = it.row_begin + r / g, h = it.head * g + r % g;
        src[i] = r < nrows ? &q(sv.q_begin + tok, h, 0) : zero;
        if constexpr (rotating_precision<P>)
          if (rotated && r < nrows) {  // Kf is free until the first KV tile
            std::copy_n(src[i], dim, Kf + i * dim);
            P::transform_query(Kf + i * dim, dim);
            src[i] = Kf + i * dim;
          }
      }
      for (std::size_t d0 = 0; d0 < dim; d0 += lanes) {
        vf v[lanes];
        for (std::size_t i = 0; i < lanes; ++i) v[i] = load(src[i] + d0) * a.scale;
        transpose16(v);
        for (std::size_t k = 0; k < lanes; ++k) store(dst + (d0 + k) * R + r0, v[k]);
      }
    }
  };
  transpose_queries(a.q, Qt);
  if (own_sink_q) transpose_queries(a.q_sink, Qst);
  // Tile products on the tile unit where the precision, the shape and the
  // process allow (amx_bf16.hpp); the queries are split once per item.
  [[maybe_unused]] const bool use_amx = amx_bf16_prefill<P>() && amx_bf16::usable(R, dim);
  [[maybe_unused]] amx_bf16::buffers ab(scratch + prefill_fma_scratch(R, dim), R, dim, B);
#if KVCACHE_HAS_AMX_BF16
  if (use_amx) {
    amx::configure();
    amx_bf16::prepare_queries(Qt, R, dim, ab.qh, ab.ql);
    if (own_sink_q) amx_bf16::prepare_queries(Qst, R, dim, ab.qsh, ab.qsl);
  }
#endif
  auto row_pos = [&](std::size_t r) {
    return r < nrows && !a.non_causal ? sv.first_pos + it.row_begin + r / g : last_pos;
  };
  // Each row's position, a vector of rows at a time, for the masks.
  vi posv[4 * 16];  // R <= 64 x 16 rows
  const std::size_t nposv = std::min<std::size_t>(RV, 64);
  for (std::size_t v = 0; v < nposv; ++v)
    for (std::size_t i = 0; i < lanes; ++i)
      posv[v][i] = static_cast<std::int32_t>(row_pos(v * lanes + i));
  const bool vector_mask = RV <= 64 && last_pos < (std::size_t{1} << 30);

  const std::size_t kr = L.run_offset(sv.page_tokens, a.layer, 0, it.head);
  const std::size_t vr = L.run_offset(sv.page_tokens, a.layer, 1, it.head);
  const std::size_t window = a.non_causal ? 0 : sv.window;
  // Keys in two ranges: the sinks [0, sink_len), then the window from the
  // first key the item's first row can see. A tile never spans both, so the
  // sinks can be scored against their own queries.
  const std::size_t sinks = std::min(sv.sink_len, last_pos + 1);
  const std::size_t first_row = row_pos(0);
  const std::size_t lo =
      std::max(sinks, window && first_row + 1 > window ? first_row + 1 - window : 0);

  const float* kp[B];
  const float* vp[B];
  for (std::size_t k0 = 0; k0 <= last_pos;) {
    if (k0 == sinks && k0 < lo) k0 = lo;
    if (k0 > last_pos) break;
    const bool in_sinks = k0 < sinks;
    const std::size_t nk = std::min(B, (in_sinks ? sinks : last_pos + 1) - k0);
    const std::size_t nk8 = (nk + 7) / 8 * 8;
    const float* Qtile = in_sinks && own_sink_q ? Qst : Qt;
    // The tile unit splits stored rows itself unless RoPE on read rewrites them.
    const bool direct = amx_bf16_stored_rows<P>() && use_amx && !sv.rope_cs;
    for (std::size_t j = 0; j < (direct ? 0 : nk); ++j) {
      const std::byte* ks = sv.row(kr, k0 + j, rb);
      if constexpr (channel_keys<P>) {
        // From the key's group rows or the residual; values from P's rows.
        // (No RoPE on read: that needs a scattered eviction, which
        // per-channel keys do not take.)
        kchan_key_grouped<P>(sv, L, a.layer, it.head, k0 + j, Kf + j * dim, kgp);
        kp[j] = Kf + j * dim;
        vp[j] = float_row<P>(sv.row(vr, k0 + j, rb), dim, rb, Vf + j * dim, rotated);
        continue;
      }
      kp[j] = float_row<P>(ks, dim, rb, Kf + j * dim, rotated);
      if (sv.rope_cs) {  // RoPE on read, at the key's cache index, on a copy
        float* kf = Kf + j * dim;
        if (kp[j] != kf) std::copy_n(kp[j], dim, kf);
        rope_row(kf, sv.rope_cs + (k0 + j) * sv.rotary_dim, sv.rotary_dim, sv.rope_interleaved);
        kp[j] = kf;
      }
      vp[j] = float_row<P>(sv.row(vr, k0 + j, rb), dim, rb, Vf + j * dim, rotated);
    }
    for (std::size_t j = nk; j < nk8; ++j) kp[j] = zero;
    [[maybe_unused]] const std::size_t nk32 =
        (nk + amx_bf16::key_block - 1) / amx_bf16::key_block * amx_bf16::key_block;
#if KVCACHE_HAS_AMX_BF16
    if (use_amx) {
      if constexpr (amx_bf16_stored_rows<P>())
        if (direct) {
          // This tile's rows (padded with zero rows) and the next tile's,
          // requested while this one is split.
          using T = row_t<P>;
          const T* krow[2 * B];
          const T* vrow[2 * B];
          const std::size_t n_next = std::min(B, last_pos + 1 - std::min(last_pos + 1, k0 + nk));
          for (std::size_t j = 0; j < nk32 + n_next; ++j) {
            if (j >= nk && j < nk32) {
              krow[j] = vrow[j] = reinterpret_cast<const T*>(zero);
              continue;
            }
            const std::size_t pos = j < nk ? k0 + j : k0 + nk + (j - nk32);
            krow[j] = reinterpret_cast<const T*>(sv.row(kr, pos, rb));
            vrow[j] = reinterpret_cast<const T*>(sv.row(vr, pos, rb));
          }
          amx_bf16::split_keys(krow, nk32, dim, ab.kh, ab.kl, krow + nk32, n_next);
          amx_bf16::split_values(vrow, nk32, dim, ab.vh, ab.vl, vrow + nk32, n_next);
        }
      if (!direct) {
        for (std::size_t j = nk; j < nk32; ++j) kp[j] = vp[j] = zero;
        amx_bf16::split_keys(kp, nk32, dim, ab.kh, ab.kl);
        amx_bf16::split_values(vp, nk32, dim, ab.vh, ab.vl);
      }
      const bool sq = in_sinks && own_sink_q;
      amx_bf16::scores(sq ? ab.qsh : ab.qh, sq ? ab.qsl : ab.ql, ab.kh,
                       direct && bf16_rows<P>() ? nullptr : ab.kl, St, R, nk32, dim);
    } else
#endif
      tile_scores(Qtile, kp, St, R, nk8, dim);
    // Masks (causal, window, sparse) and the online softmax, down St's
    // columns a vector of rows at a time.
    const bool windowed = !in_sinks && window;
    for (std::size_t v = 0; v < RV; ++v) {
      const std::size_t r0 = v * lanes;
      float* col = St + r0;
      if (vector_mask) {
        for (std::size_t j = 0; j < nk; ++j) {
          const std::int32_t key = static_cast<std::int32_t>(k0 + j);
          vi hidden = posv[v] < key;
          if (windowed) hidden |= posv[v] >= key + static_cast<std::int32_t>(window);
          store(col + j * R, select(hidden, splat(-INFINITY), load(col + j * R)));
        }
      } else {
        for (std::size_t j = 0; j < nk; ++j)
          for (std::size_t i = 0; i < lanes; ++i) {
            const std::size_t pos = row_pos(r0 + i);
            if (k0 + j > pos || (windowed && k0 + j + window <= pos)) col[j * R + i] = -INFINITY;
          }
      }
      if (sv.sparse && !a.non_causal)
        for (std::size_t j = 0; j < nk; ++j)
          for (std::size_t i = 0; i < lanes; ++i)
            if (!sv.sparse->visible(k0 + j, row_pos(r0 + i))) col[j * R + i] = -INFINITY;
      vf mx = splat(-INFINITY);
      for (std::size_t j = 0; j < nk; ++j) mx = max(mx, load(col + j * R));
      const vf mo = load(m + r0);
      const vf mn = max(mo, mx);
      // A row that sees no key yet keeps m = -inf; its weights are 0, not NaN.
      const vf base = select(mn == splat(-INFINITY), vf{}, mn);
      vf sum{};
      for (std::size_t j = 0; j < nk; ++j) {
        const vf p = exp_neg(load(col + j * R) - base);
        sum += p;
        store(col + j * R, p);
      }
      const vf c = exp_neg(mo - base);
      store(corr + r0, c);
      store(l + r0, load(l + r0) * c + sum);
      store(m + r0, mn);
    }
#if KVCACHE_HAS_AMX_BF16
    if (use_amx) {
      // Keys past nk (padding to 32) get weight 0; O is rescaled here, as
      // tile_accumulate does in its loop.
      for (std::size_t j = nk; j < nk32; ++j) std::fill_n(St + j * R, R, 0.f);
      for (std::size_t r = 0; r < R; ++r) {
        const vf c = splat(corr[r]);
        for (std::size_t d = 0; d < dim; d += lanes)
          store(O + r * dim + d, load(O + r * dim + d) * c);
      }
      amx_bf16::split_weights(St, R, nk32, ab.ph, ab.pl);
      amx_bf16::accumulate(ab.ph, ab.pl, ab.vh, bf16_rows<P>() ? nullptr : ab.vl, O, R, nk32, dim);
    } else
#endif
      tile_accumulate(St, vp, O, corr, R, nk, dim);
    k0 += nk;
  }
#if KVCACHE_HAS_AMX_BF16
  if (use_amx) amx::release();
#endif
  for (std::size_t r = 0; r < nrows; ++r) {
    const std::size_t tok = it.row_begin + r / g, h = it.head * g + r % g;
    float* dst = &a.out(sv.q_begin + tok, h, 0);
    const float inv = 1.0f / l[r];
    if constexpr (rotating_precision<P>)
      if (rotated) P::transform_output(O + r * dim, dim);
    for (std::size_t d = 0; d < dim; ++d) dst[d] = O[r * dim + d] * inv;
    if (!a.lse.empty()) a.lse(sv.q_begin + tok, h) = m[r] + std::log(l[r]);
  }
}

template <class P, std::size_t D>
void prefill(thread_pool& pool, const prefill_args& a) {
  const auto& items = a.plan->prefill;
  pool.run(items.size(), [&](std::size_t i, std::size_t worker) {
    prefill_item_run<P, D>(a, items[i], a.scratch + worker * a.scratch_floats);
  });
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
