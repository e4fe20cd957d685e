// CPU decode attention: one new token per sequence, reading the whole cache.
// Memory bound, so each K/V element is read once for every query head of its
// group (never repeated per query head), tokens are split into chunks that
// threads take (flash-decoding, merged by log-sum-exp), and each thread walks
// `decode_streams` chunks in lockstep so that 2 x decode_streams sequential
// read streams are in flight: one stream alone leaves the prefetchers idle at
// each 4 KiB page boundary.
#pragma once

#include <cmath>
#include <cstddef>

#include "../../detail/simd.hpp"
#include "../../detail/thread_pool.hpp"
#include "../../tensor.hpp"
#include "../merge.hpp"
#include "../plan.hpp"
#include "../view.hpp"
#include "decode_quant.hpp"
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
  float* partial;   // (decode item, g, dim + 1) normalised output, then lse
  float* scratch;   // (worker, scratch_floats)
  std::size_t scratch_floats;
};

//! Running softmax state of one stream (one decode item).
struct decode_stream {
  const decode_item* item = nullptr;
  const float* q = nullptr;  // (g, dim)
  float* o = nullptr;        // (g, dim + 1)
  float* m = nullptr;        // (g)
  float* l = nullptr;        // (g)
  std::size_t t = 0;
};

//! Floats of per-worker scratch the decode kernel needs.
inline std::size_t decode_scratch_floats(const kv_layout& L) noexcept {
  const std::size_t g = L.group();
  return std::max(decode_streams * (2 * g + g * decode_tile + 2 * decode_tile * L.head_dim) + 64,
                  decode_quant_scratch_floats(L));
}

//! Scores, softmax update and V accumulation for up to 16 tokens of one stream,
//! HB query heads at a time. Rows are contiguous (one page).
template <class P, std::size_t D, std::size_t HB>
KVCACHE_ALWAYS_INLINE void decode_tile_update(decode_stream& s, const row_t<P>* K,
                                              const row_t<P>* V, std::size_t n, std::size_t g,
                                              std::size_t dim_rt, float* sc) noexcept {
  using namespace simd;
  const std::size_t dim = D ? D : dim_rt;
  const std::size_t stride = dim + 1;
  const std::size_t nc = dim / lanes;
  for (std::size_t hb = 0; hb < g; hb += HB) {
    const float* q = s.q + hb * dim;
    // Scores of TOK tokens x HB heads = 16 dot products per pass, summed
    // horizontally together by reduce16 (lane h * TOK + t).
    constexpr std::size_t TOK = lanes / HB;
    for (std::size_t j0 = 0; j0 < decode_tile; j0 += TOK) {
      vf acc[lanes] = {};
      const row_t<P>* k[TOK];
      for (std::size_t t = 0; t < TOK; ++t) k[t] = K + std::min(j0 + t, n - 1) * dim;
      for (std::size_t c = 0; c < nc; ++c) {
        vf qv[HB];
        for (std::size_t h = 0; h < HB; ++h) qv[h] = load(q + h * dim + c * lanes);
        for (std::size_t t = 0; t < TOK; ++t) {
          const vf kv = load(k[t] + c * lanes);
          for (std::size_t h = 0; h < HB; ++h) acc[h * TOK + t] += qv[h] * kv;
        }
      }
      const vf sums = reduce16(acc);
      for (std::size_t h = 0; h < HB; ++h)
        for (std::size_t t = 0; t < TOK; ++t)
          sc[(hb + h) * decode_tile + j0 + t] = j0 + t < n ? sums[h * TOK + t] : -INFINITY;
    }
    float corr[HB];
    for (std::size_t h = 0; h < HB; ++h) {
      float* srow = sc + (hb + h) * decode_tile;
      const vf sv = load(srow);
      const float mo = s.m[hb + h];
      const float mn = std::max(mo, reduce_max(sv));
      const vf p = exp_neg(sv - mn);
      corr[h] = std::exp(mo - mn);  // 0 on the first tile (mo = -inf)
      s.l[hb + h] = s.l[hb + h] * corr[h] + reduce_add(p);
      s.m[hb + h] = mn;
      store(srow, p);
    }
    for (std::size_t c = 0; c < nc; ++c) {
      vf ov[HB];
      for (std::size_t h = 0; h < HB; ++h)
        ov[h] = load(s.o + (hb + h) * stride + c * lanes) * corr[h];
      for (std::size_t j = 0; j < n; ++j) {
        const vf vv = load(V + j * dim + c * lanes);
        for (std::size_t h = 0; h < HB; ++h) ov[h] += sc[(hb + h) * decode_tile + j] * vv;
      }
      for (std::size_t h = 0; h < HB; ++h) store(s.o + (hb + h) * stride + c * lanes, ov[h]);
    }
  }
}

//! One thread task: up to decode_streams adjacent items, advanced tile by tile
//! in lockstep.
template <class P, std::size_t D, std::size_t HB>
void decode_task(const decode_args& a, std::size_t first, std::size_t count, float* scratch) {
  const kv_layout& L = *a.layout;
  const std::size_t g = L.group(), dim = D ? D : L.head_dim, rb = L.row_bytes;
  const std::size_t stride = dim + 1;
  decode_stream st[decode_streams];
  float* sc = scratch;                        // (g, decode_tile)
  float* ml = sc + g * decode_tile;           // (streams, 2, g)
  float* conv = ml + 2 * g * decode_streams;  // (2, decode_tile, dim) for decoded rows
  // Group index of each item: items of a group are adjacent, found by search.
  const auto& groups = a.plan->decode_groups;
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t idx = first + i;
    const std::size_t grp =
        std::upper_bound(groups.begin(), groups.end(), idx) - groups.begin() - 1;
    st[i].item = &a.plan->decode[idx];
    st[i].q = a.qs + grp * g * dim;
    st[i].o = a.partial + idx * g * stride;
    st[i].m = ml + i * 2 * g;
    st[i].l = st[i].m + g;
    st[i].t = st[i].item->begin;
    for (std::size_t h = 0; h < g; ++h) {
      st[i].m[h] = -INFINITY;
      st[i].l[h] = 0.f;
      for (std::size_t d = 0; d < dim; ++d) st[i].o[h * stride + d] = 0.f;
    }
  }
  for (bool active = true; active;) {
    active = false;
    for (std::size_t i = 0; i < count; ++i) {
      decode_stream& s = st[i];
      const decode_item& it = *s.item;
      if (s.t >= it.end) continue;
      const seq_view& sv = a.seqs[it.seq];
      const std::size_t in_page = sv.page_tokens - s.t % sv.page_tokens;
      const std::size_t n = std::min({decode_tile, it.end - s.t, in_page});
      const std::size_t kr = L.run_offset(sv.page_tokens, a.layer, 0, it.head);
      const std::size_t vr = L.run_offset(sv.page_tokens, a.layer, 1, it.head);
      const auto* K = rows<P>(sv.row(kr, s.t, rb), n, dim, rb, conv);
      const auto* V = rows<P>(sv.row(vr, s.t, rb), n, dim, rb, conv + decode_tile * dim);
      decode_tile_update<P, D, HB>(s, K, V, n, g, dim, sc);
      s.t += n;
      active = active || s.t < it.end;
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    for (std::size_t h = 0; h < g; ++h) {
      float* o = st[i].o + h * stride;
      const float inv = 1.0f / st[i].l[h];
      for (std::size_t d = 0; d < dim; ++d) o[d] *= inv;
      o[dim] = st[i].m[h] + std::log(st[i].l[h]);
    }
  }
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
    if constexpr (block_precision<P>) {  // quantized rows, read in place
      decode_quant_items<P, D>(L, a.layer, a.seqs, *a.plan, a.qs, a.partial, first, count, scratch);
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
