// CPU decode attention: one new token per sequence, reading the whole cache.
// Memory bound, so each K/V element is read once for every query head of its
// group (never repeated per query head), tokens are split into chunks that
// threads take (flash-decoding, merged by log-sum-exp), and each thread walks
// `decode_streams` chunks in lockstep. The hardware prefetchers alone kept
// only ~0.4 of the read bandwidth busy (they stop at every 4 KiB page and a
// 16-token fp16 tile is exactly one page), so each stream prefetches its next
// tile in software while it computes the current one; with the cache on huge
// pages (backend/cpu.hpp) this reaches ~0.78 of the measured read bandwidth
// at 32k tokens (docs/performance.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../../detail/simd.hpp"
#include "../../detail/thread_pool.hpp"
#include "../../tensor.hpp"
#include "../merge.hpp"
#include "../plan.hpp"
#include "../view.hpp"
#include "decode_quant.hpp"
#include "decode_stream.hpp"
#include "kchan.hpp"
#include "prefetch.hpp"
#include "rows.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

struct decode_args {
  const kv_layout* layout;
  std::size_t layer;
  const seq_view* seqs;
  const work_plan* plan;
  const float* qs;  // (decode group, g, dim)   queries pre-multiplied by the scale
  //! (decode group, g, dim) the queries items over a sequence's sinks read
  //! (rotated at the query's cache position); null: qs.
  const float* qs_sink;
  float* partial;  // (decode item, g, dim + 1) normalised output, then lse
  float* scratch;  // (worker, scratch_floats)
  std::size_t scratch_floats;
};

//! Floats of per-worker scratch the decode kernel needs.
inline std::size_t decode_scratch_floats(const kv_layout& L) noexcept {
  const std::size_t g = L.group();
  return std::max({decode_streams * (2 * g + g * decode_tile + 2 * decode_tile * L.head_dim) + 64,
                   decode_quant_scratch_floats(L), decode_kchan_scratch_floats(L)});
}

//! Lines of the next tile of a stream, prefetched while this tile computes.
//! A tile is up to decode_subtiles runs of at most 16 consecutive tokens,
//! each inside one page, so a tile can span small pages (16 tokens: one run
//! per page) and still pay the softmax bookkeeping once per 32 tokens.
inline constexpr std::size_t decode_subtiles = decode_tile / simd::lanes;

//! The rows of one tile: run u holds n[u] rows at k[u] and v[u].
template <class R>
struct tile_rows {
  const R* k[decode_subtiles];
  const R* v[decode_subtiles];
  std::size_t n[decode_subtiles];
  std::size_t runs = 0;
};

static_assert(decode_subtiles <= prefetch_cursor::max_runs);

//! Regroups HB score vectors of TOK = 16 / HB tokens x HB heads (lane
//! h * TOK + t of vector p holds token p * TOK + t of head h) into one vector
//! of 16 tokens per head, with shuffles instead of a round trip to memory.
template <std::size_t HB>
KVCACHE_ALWAYS_INLINE void scores_by_head(const simd::vf* s, simd::vf* by_head) noexcept {
  if constexpr (HB == 1) {
    by_head[0] = s[0];
  } else if constexpr (HB == 2) {
    by_head[0] =
        __builtin_shufflevector(s[0], s[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    by_head[1] = __builtin_shufflevector(s[0], s[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                         28, 29, 30, 31);
  } else {
    static_assert(HB == 4);
    // 4 x 4 transpose of 4-lane blocks: B(p, h) -> B(h, p).
    const simd::vf u0 =
        __builtin_shufflevector(s[0], s[1], 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const simd::vf u1 = __builtin_shufflevector(s[0], s[1], 8, 9, 10, 11, 24, 25, 26, 27, 12, 13,
                                                14, 15, 28, 29, 30, 31);
    const simd::vf u2 =
        __builtin_shufflevector(s[2], s[3], 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const simd::vf u3 = __builtin_shufflevector(s[2], s[3], 8, 9, 10, 11, 24, 25, 26, 27, 12, 13,
                                                14, 15, 28, 29, 30, 31);
    by_head[0] =
        __builtin_shufflevector(u0, u2, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    by_head[1] = __builtin_shufflevector(u0, u2, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                         29, 30, 31);
    by_head[2] =
        __builtin_shufflevector(u1, u3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    by_head[3] = __builtin_shufflevector(u1, u3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                         29, 30, 31);
  }
}

//! Scores, softmax update and V accumulation for up to decode_tile tokens of
//! one stream, HB query heads at a time. Rows are contiguous (one page).
//! Scores stay in registers from the dot products to the weights; only the
//! weights go to memory, where the V pass reads them as broadcast operands.
//! The next tile's lines are prefetched a few at a time between the dot
//! products and the V accumulations: issued all at once they queue behind
//! the core's few line-fill buffers and stall it, spread out they overlap
//! with the arithmetic.
template <class P, std::size_t D, std::size_t HB>
KVCACHE_ALWAYS_INLINE void decode_tile_update(decode_stream& s, const tile_rows<row_t<P>>& tr,
                                              std::size_t g, std::size_t dim_rt, float* sc,
                                              prefetch_cursor& pf) noexcept {
  using namespace simd;
  constexpr std::size_t TOK = lanes / HB, SUB = decode_subtiles;
  const std::size_t dim = D ? D : dim_rt;
  const std::size_t stride = dim + 1;
  const std::size_t nc = dim / lanes;
  const std::size_t subs = tr.runs;
  // Spread over the first head block's score and value loops (subs x HB x
  // nc score steps, one value step per token and block of CB dims): over the
  // scores alone, memory idled while P.V ran (32k from DRAM: 48 ns per token
  // and KV head and thread then, 41 now).
  constexpr std::size_t CB = 16 / HB < 8 ? 16 / HB : 8;
  std::size_t tokens = 0;
  for (std::size_t u = 0; u < subs; ++u) tokens += tr.n[u];
  pf.spread(subs * HB * nc + (nc + CB - 1) / CB * tokens);
  for (std::size_t hb = 0; hb < g; hb += HB) {
    const float* q = s.q + hb * dim;
    vf sh[SUB][HB];
    for (std::size_t u = 0; u < subs; ++u) {
      const row_t<P>* Ku = tr.k[u];
      const std::size_t nu = tr.n[u];
      vf part[HB];
      for (std::size_t p = 0; p < HB; ++p) {
        vf acc[lanes] = {};
        // Lanes past nu read the last row again and are masked to -inf below.
        const row_t<P>* k[TOK];
        for (std::size_t t = 0; t < TOK; ++t) k[t] = Ku + std::min(p * TOK + t, nu - 1) * dim;
        for (std::size_t c = 0; c < nc; ++c) {
          if (hb == 0) pf.issue();
          vf qv[HB];
          for (std::size_t h = 0; h < HB; ++h) qv[h] = load(q + h * dim + c * lanes);
          for (std::size_t t = 0; t < TOK; ++t) {
            const vf kv = load(k[t] + c * lanes);
            for (std::size_t h = 0; h < HB; ++h) acc[h * TOK + t] += qv[h] * kv;
          }
        }
        part[p] = reduce16(acc);
      }
      scores_by_head<HB>(part, sh[u]);
      const vi valid = lane_index() < static_cast<std::int32_t>(nu);
      for (std::size_t h = 0; h < HB; ++h) sh[u][h] = select(valid, sh[u][h], splat(-INFINITY));
    }
    vf mo{}, mn{}, lo{};
    for (std::size_t h = 0; h < HB; ++h) {
      vf mx = sh[0][h];
      for (std::size_t u = 1; u < subs; ++u) mx = max(mx, sh[u][h]);
      mo[h] = s.m[hb + h];
      lo[h] = s.l[hb + h];
      mn[h] = std::max(mo[h], reduce_max(mx));
    }
    // One vector exp for every head's rescale factor; 0 on the first tile
    // (mo = -inf).
    const vf corr = exp_neg(mo - mn);
    for (std::size_t h = 0; h < HB; ++h) {
      vf sum{};
      for (std::size_t u = 0; u < subs; ++u) {
        const vf p = exp_neg(sh[u][h] - mn[h]);
        sum += p;
        store(sc + h * decode_tile + u * lanes, p);
      }
      s.l[hb + h] = lo[h] * corr[h] + reduce_add(sum);
      s.m[hb + h] = mn[h];
    }
    // O = O * corr + P V, token by token so that V is read in address order,
    // in blocks of dims that keep HB x CB accumulators in registers.
    for (std::size_t c0 = 0; c0 < nc; c0 += CB) {
      const std::size_t cn = std::min(CB, nc - c0);
      vf ov[HB][CB];
      for (std::size_t h = 0; h < HB; ++h)
        for (std::size_t c = 0; c < cn; ++c)
          ov[h][c] = load(s.o + (hb + h) * stride + (c0 + c) * lanes) * corr[h];
      for (std::size_t u = 0; u < subs; ++u) {
        const row_t<P>* Vu = tr.v[u];
        const float* w = sc + u * lanes;
        for (std::size_t j = 0; j < tr.n[u]; ++j) {
          if (hb == 0) pf.issue();
          for (std::size_t c = 0; c < cn; ++c) {
            const vf vv = load(Vu + j * dim + (c0 + c) * lanes);
            for (std::size_t h = 0; h < HB; ++h) ov[h][c] += w[h * decode_tile + j] * vv;
          }
        }
      }
      for (std::size_t h = 0; h < HB; ++h)
        for (std::size_t c = 0; c < cn; ++c)
          store(s.o + (hb + h) * stride + (c0 + c) * lanes, ov[h][c]);
    }
  }
}

//! One thread task: up to decode_streams adjacent items, advanced tile by tile
//! in lockstep.
template <class P, std::size_t D, std::size_t HB>
void decode_task(const decode_args& a, std::size_t first, std::size_t count, float* scratch) {
  const kv_layout& L = *a.layout;
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, rb = L.row_bytes;
  decode_stream st[decode_streams];
  float* sc = scratch;                        // (g, decode_tile)
  float* ml = sc + g * decode_tile;           // (streams, 2, g)
  float* conv = ml + 2 * g * decode_streams;  // (2, decode_tile, dim) for decoded rows
  for (std::size_t i = 0; i < count; ++i)
    start_stream(st[i], *a.plan, a.seqs, first + i, a.qs, a.qs_sink, a.partial, ml + i * 2 * g, g,
                 dim);
  for (bool active = true; active;) {
    active = false;
    for (std::size_t i = 0; i < count; ++i) {
      decode_stream& s = st[i];
      const decode_item& it = *s.item;
      if (s.t >= it.end) continue;
      const seq_view& sv = a.seqs[it.seq];
      const std::size_t kr = L.run_offset(sv.page_tokens, a.layer, 0, it.head);
      const std::size_t vr = L.run_offset(sv.page_tokens, a.layer, 1, it.head);
      // Runs of at most 16 tokens, each contiguous in memory (inside one page
      // and one piece of a ring).
      auto run_length = [&](std::size_t t) {
        return std::min({std::size_t{simd::lanes}, it.end - t, sv.run(t)});
      };
      tile_rows<row_t<P>> tr;
      std::size_t t = s.t;
      for (; tr.runs < decode_subtiles && t < it.end; ++tr.runs) {
        const std::size_t u = tr.runs, n = run_length(t);
        tr.k[u] = rows<P>(sv.row(kr, t, rb), n, dim, rb, conv + u * simd::lanes * dim);
        tr.v[u] = rows<P>(sv.row(vr, t, rb), n, dim, rb,
                          conv + (decode_subtiles + u) * simd::lanes * dim);
        tr.n[u] = n;
        t += n;
      }
      prefetch_cursor pf;
      for (std::size_t u = 0, pt = t; u < decode_subtiles && pt < it.end; ++u) {
        const std::size_t n = run_length(pt);
        pf.k[u] = reinterpret_cast<const char*>(sv.row(kr, pt, rb));
        pf.v[u] = reinterpret_cast<const char*>(sv.row(vr, pt, rb));
        pf.lines[u] = (n * rb + 63) / 64;
        pt += n;
      }
      decode_tile_update<P, D, HB>(s, tr, g, dim, sc, pf);
      s.t = t;
      active = active || s.t < it.end;
    }
  }
  for (std::size_t i = 0; i < count; ++i) finish_stream(st[i], g, dim);
}

//! Decode attention for the step's single-token sequences: every plan item,
//! then one merge per (sequence, KV head) into `out` and `lse`.
template <class P, std::size_t D>
void decode(thread_pool& pool, const decode_args& a, const tensor_view<float, 3>& out,
            const tensor_view<float, 2>& lse) {
  const kv_layout& L = *a.layout;
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, stride = dim + 1;
  const auto& items = a.plan->decode;
  const std::size_t tasks = (items.size() + decode_streams - 1) / decode_streams;
  pool.run(tasks, [&](std::size_t task, std::size_t worker) {
    const std::size_t first = task * decode_streams;
    const std::size_t count = std::min(decode_streams, items.size() - first);
    float* scratch = a.scratch + worker * a.scratch_floats;
    if constexpr (channel_keys<P>) {  // per-channel key groups and residual, read in place
      decode_kchan_items<P, D>(L, a.layer, a.seqs, *a.plan, a.qs, a.qs_sink, a.partial, first,
                               count, scratch);
    } else if constexpr (block_precision<P>) {  // quantized rows, read in place
      decode_quant_items<P, D>(L, a.layer, a.seqs, *a.plan, a.qs, a.qs_sink, a.partial, first,
                               count, scratch);
    } else if (g % 4 == 0) {
      decode_task<P, D, 4>(a, first, count, scratch);
    } else if (g % 2 == 0) {
      decode_task<P, D, 2>(a, first, count, scratch);
    } else {
      decode_task<P, D, 1>(a, first, count, scratch);
    }
  });
  const auto& groups = a.plan->decode_groups;
  pool.run(groups.size() - 1, [&](std::size_t grp, std::size_t) {
    const decode_item& first = items[groups[grp]];
    float* acc = a.partial + groups[grp] * g * stride;
    for (std::size_t i = groups[grp] + 1; i < groups[grp + 1]; ++i) {
      const float* part = a.partial + i * g * stride;
      for (std::size_t h = 0; h < g; ++h)
        merge_partial(acc + h * stride, acc[h * stride + dim], part + h * stride,
                      part[h * stride + dim], dim);
    }
    const std::size_t row = a.seqs[first.seq].q_begin;
    for (std::size_t h = 0; h < g; ++h) {
      const std::size_t qh = first.head * g + h;
      float* o = &out(row, qh, 0);
      for (std::size_t d = 0; d < dim; ++d) o[d] = acc[h * stride + d];
      if (!lse.empty()) lse(row, qh) = acc[h * stride + dim];
    }
  });
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
