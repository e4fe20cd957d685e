// CPU prefill attention: causal flash attention over the same paged view that
// decode reads. One work item is a tile of up to 64 query rows (all query heads
// of one KV head's group for several new tokens); it walks the KV tiles up to
// its last position with an online softmax, so no N x N score matrix exists.
// A KV tile is converted to fp32 once and used by every row of the group
// (per-channel keys: each key from its group's rows or the fp16 residual).
// Tile products are hand-vectorised register-blocked loops (tile_scores,
// tile_accumulate), as fast as Eigen's GEMM at these shapes.
#pragma once

#include <cmath>
#include <cstddef>

#include "../../detail/simd.hpp"
#include "../../detail/thread_pool.hpp"
#include "../../tensor.hpp"
#include "../plan.hpp"
#include "../view.hpp"
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

inline std::size_t prefill_rows_padded(std::size_t rows) noexcept { return (rows + 3) / 4 * 4; }

//! Floats of per-worker scratch the prefill kernel needs for tiles of `rows` rows.
inline std::size_t prefill_scratch_floats(const kv_layout& L, std::size_t rows) noexcept {
  const std::size_t R = prefill_rows_padded(rows), D = L.head_dim, B = prefill_kv_tile;
  return 3 * R * D + R * B + 3 * D * B + 3 * R + 64;
}

//! S = Q Kt for one tile: Q (R, dim), Kt (dim, prefill_kv_tile), S (R,
//! prefill_kv_tile); R a multiple of 4, dim of 16. Register-blocked four rows
//! at a time. The same shapes through Eigen's GEMM measured no faster
//! (benchmarks/tile_products.cpp), so the headers keep no Eigen dependency.
KVCACHE_ALWAYS_INLINE void tile_scores(const float* Q, const float* Kt, float* S, std::size_t R,
                                       std::size_t dim) noexcept {
  using namespace simd;
  constexpr std::size_t B = prefill_kv_tile, NB = B / lanes;
  for (std::size_t r = 0; r < R; r += 4) {
    vf acc[4][NB] = {};
    for (std::size_t d = 0; d < dim; ++d) {
      vf kt[NB];
      for (std::size_t b = 0; b < NB; ++b) kt[b] = load(Kt + d * B + b * lanes);
      for (std::size_t rr = 0; rr < 4; ++rr) {
        const vf qv = splat(Q[(r + rr) * dim + d]);
        for (std::size_t b = 0; b < NB; ++b) acc[rr][b] += qv * kt[b];
      }
    }
    for (std::size_t rr = 0; rr < 4; ++rr)
      for (std::size_t b = 0; b < NB; ++b) store(S + (r + rr) * B + b * lanes, acc[rr][b]);
  }
}

//! O = O * corr + P V for one tile: P (R, prefill_kv_tile) of which the first
//! nk columns count, V (nk, dim), O (R, dim), corr (R); R even. Two rows and
//! up to 8 vectors of dims at a time.
KVCACHE_ALWAYS_INLINE void tile_accumulate(const float* P, const float* V, float* O,
                                           const float* corr, std::size_t R, std::size_t nk,
                                           std::size_t dim) noexcept {
  using namespace simd;
  constexpr std::size_t B = prefill_kv_tile;
  const std::size_t nc = dim / lanes;
  for (std::size_t c0 = 0; c0 < nc; c0 += 8) {
    const std::size_t cn = std::min<std::size_t>(8, nc - c0);
    for (std::size_t r = 0; r < R; r += 2) {
      vf acc[2][8];
      for (std::size_t rr = 0; rr < 2; ++rr)
        for (std::size_t c = 0; c < cn; ++c)
          acc[rr][c] = load(O + (r + rr) * dim + (c0 + c) * lanes) * corr[r + rr];
      for (std::size_t j = 0; j < nk; ++j) {
        const vf p0 = splat(P[r * B + j]), p1 = splat(P[(r + 1) * B + j]);
        for (std::size_t c = 0; c < cn; ++c) {
          const vf vv = load(V + j * dim + (c0 + c) * lanes);
          acc[0][c] += p0 * vv;
          acc[1][c] += p1 * vv;
        }
      }
      for (std::size_t rr = 0; rr < 2; ++rr)
        for (std::size_t c = 0; c < cn; ++c)
          store(O + (r + rr) * dim + (c0 + c) * lanes, acc[rr][c]);
    }
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

template <class P, std::size_t D>
void prefill_item_run(const prefill_args& a, const prefill_item& it, float* scratch) {
  using namespace simd;
  constexpr std::size_t B = prefill_kv_tile, NB = B / lanes;
  const kv_layout& L = *a.layout;
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, nc = dim / lanes, rb = L.row_bytes;
  const seq_view& sv = a.seqs[it.seq];
  const std::size_t nrows = (it.row_end - it.row_begin) * g, R = prefill_rows_padded(nrows);

  float* Q = scratch;          // (R, dim)  scaled queries
  float* O = Q + R * dim;      // (R, dim)  unnormalised output
  float* S = O + R * dim;      // (R, B)    scores, then weights
  float* Kt = S + R * B;       // (dim, B)  K tile, transposed
  float* Vf = Kt + dim * B;    // (B, dim)  V tile
  float* conv = Vf + B * dim;  // (B, dim) decoded rows for non-direct precisions
  float* Qs = conv + B * dim;  // (R, dim)  scaled queries for the sinks, if they differ
  float* m = Qs + R * dim;     // (R)
  float* l = m + R;            // (R)
  float* corr = l + R;         // (R)

  const std::size_t last_pos = a.non_causal ? sv.kv_len - 1 : sv.first_pos + it.row_end - 1;
  const bool own_sink_q = !a.q_sink.empty() && sv.sink_len > 0;
  for (std::size_t r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    for (std::size_t d = 0; d < dim; ++d) O[r * dim + d] = 0.f;
    if (r >= nrows) {
      for (std::size_t d = 0; d < dim; ++d) Q[r * dim + d] = Qs[r * dim + d] = 0.f;
      continue;
    }
    const std::size_t tok = it.row_begin + r / g, h = it.head * g + r % g;
    const float* src = &a.q(sv.q_begin + tok, h, 0);
    for (std::size_t d = 0; d < dim; ++d) Q[r * dim + d] = src[d] * a.scale;
    if (own_sink_q) {
      const float* ss = &a.q_sink(sv.q_begin + tok, h, 0);
      for (std::size_t d = 0; d < dim; ++d) Qs[r * dim + d] = ss[d] * a.scale;
    }
  }
  auto row_pos = [&](std::size_t r) {
    return r < nrows && !a.non_causal ? sv.first_pos + it.row_begin + r / g : last_pos;
  };
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

  for (std::size_t k0 = 0; k0 <= last_pos;) {
    if (k0 == sinks && k0 < lo) k0 = lo;
    if (k0 > last_pos) break;
    const bool in_sinks = k0 < sinks;
    const std::size_t nk = std::min(B, (in_sinks ? sinks : last_pos + 1) - k0);
    const float* Qt = in_sinks && own_sink_q ? Qs : Q;
    // Tiles of K (transposed) and V in fp32; rows past nk are zero.
    for (std::size_t j = 0; j < B; ++j) {
      if (j >= nk) {
        for (std::size_t d = 0; d < dim; ++d) Kt[d * B + j] = 0.f;
        for (std::size_t d = 0; d < dim; ++d) Vf[j * dim + d] = 0.f;
        continue;
      }
      if constexpr (channel_keys<P>) {
        // Straight into the tile's column, from the key's group rows or the
        // residual; values from P's rows. (No RoPE on read: that needs a
        // scattered eviction, which per-channel keys do not take.)
        kchan_key<P>(sv, L, a.layer, it.head, k0 + j, Kt + j, B);
        const auto* v = rows<P>(sv.row(vr, k0 + j, rb), 1, dim, rb, conv + dim);
        for (std::size_t c = 0; c < nc; ++c) store(Vf + j * dim + c * lanes, load(v + c * lanes));
        continue;
      }
      const auto* k = rows<P>(sv.row(kr, k0 + j, rb), 1, dim, rb, conv);
      const auto* v = rows<P>(sv.row(vr, k0 + j, rb), 1, dim, rb, conv + dim);
      if (sv.rope_cs) {  // RoPE on read, at the key's cache index
        float* kf = conv + 2 * dim;
        for (std::size_t c = 0; c < nc; ++c) store(kf + c * lanes, load(k + c * lanes));
        rope_row(kf, sv.rope_cs + (k0 + j) * sv.rotary_dim, sv.rotary_dim, sv.rope_interleaved);
        for (std::size_t c = 0; c < nc; ++c) {
          const vf kv = load(kf + c * lanes);
          for (std::size_t i = 0; i < lanes; ++i) Kt[(c * lanes + i) * B + j] = kv[i];
          store(Vf + j * dim + c * lanes, load(v + c * lanes));
        }
        continue;
      }
      for (std::size_t c = 0; c < nc; ++c) {
        const vf kv = load(k + c * lanes);
        for (std::size_t i = 0; i < lanes; ++i) Kt[(c * lanes + i) * B + j] = kv[i];
        store(Vf + j * dim + c * lanes, load(v + c * lanes));
      }
    }
    tile_scores(Qt, Kt, S, R, dim);
    // Causal (and window) mask and online softmax per row.
    for (std::size_t r = 0; r < R; ++r) {
      float* s = S + r * B;
      const std::size_t pos = row_pos(r);
      for (std::size_t j = 0; j < B; ++j)
        if (j >= nk || k0 + j > pos || (!in_sinks && window && k0 + j + window <= pos) ||
            (sv.sparse && !a.non_causal && !sv.sparse->visible(k0 + j, pos)))
          s[j] = -INFINITY;
      vf mx = load(s);
      for (std::size_t b = 1; b < NB; ++b) mx = max(mx, load(s + b * lanes));
      const float mn = std::max(m[r], reduce_max(mx));
      if (mn == -INFINITY) {  // every key of this tile is hidden from the row: no update
        corr[r] = 1.f;
        for (std::size_t b = 0; b < NB; ++b) store(s + b * lanes, vf{});
        continue;
      }
      vf sum{};
      for (std::size_t b = 0; b < NB; ++b) {
        const vf p = exp_neg(load(s + b * lanes) - mn);
        sum += p;
        store(s + b * lanes, p);
      }
      corr[r] = std::exp(m[r] - mn);
      l[r] = l[r] * corr[r] + reduce_add(sum);
      m[r] = mn;
    }
    tile_accumulate(S, Vf, O, corr, R, nk, dim);
    k0 += nk;
  }
  for (std::size_t r = 0; r < nrows; ++r) {
    const std::size_t tok = it.row_begin + r / g, h = it.head * g + r % g;
    float* dst = &a.out(sv.q_begin + tok, h, 0);
    const float inv = 1.0f / l[r];
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
