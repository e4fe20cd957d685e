// CPU cascade attention: the shared prefix of a group of decode sequences is
// one non-causal multi-query pass of the prefill tile kernel (all members'
// query heads of a KV head's group are the tile's rows, so each K/V tile is
// converted once and used by every member), then merged into each member's
// suffix result by log-sum-exp. Decode has already written the suffix part
// (the tokens after the shared prefix) to `out` and `lse`.
#pragma once

#include <algorithm>
#include <cstddef>

#include "../../detail/thread_pool.hpp"
#include "../../tensor.hpp"
#include "../cascade.hpp"
#include "../merge.hpp"
#include "prefill.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

struct cascade_args {
  const kv_layout* layout;
  std::size_t layer;
  const seq_view* seqs;  // the step's sequences
  const cascade_plan* plan;
  tensor_view<const float, 3> q;  // (step tokens, q_heads, dim)
  float scale;
  tensor_view<float, 3> out;  // (step tokens, q_heads, dim) suffix results, merged in place
  tensor_view<float, 2> lse;  // (step tokens, q_heads)      suffix lse, merged in place
  float* qc;                  // (plan rows, q_heads, dim)   gathered queries
  float* oc;                  // (plan rows, q_heads, dim)   shared-prefix results
  float* lc;                  // (plan rows, q_heads)
  float* scratch;             // (worker, scratch_floats)
  std::size_t scratch_floats;
};

//! Floats of the gathered-query, output and lse buffers a plan needs.
inline std::size_t cascade_buffer_floats(const kv_layout& L, const cascade_plan& c) noexcept {
  return c.rows * L.q_heads * (2 * L.head_dim + 1);
}

template <class P, std::size_t D>
void cascade(thread_pool& pool, const cascade_args& a) {
  const cascade_plan& c = *a.plan;
  const kv_layout& L = *a.layout;
  const std::size_t qh = L.q_heads, dim = D ? D : L.head_dim;
  // Each chunk's rows are the group's members, in order; chunks of one group
  // read the same queries but write their own results.
  for (std::size_t g = 0; g + 1 < c.groups.size(); ++g)
    for (std::size_t ch = c.chunks[g]; ch < c.chunks[g + 1]; ++ch)
      for (std::size_t t = 0; t < c.views[ch].q_len; ++t) {
        const std::size_t row = a.seqs[c.members[c.groups[g] + t]].q_begin;
        float* dst = a.qc + (c.views[ch].q_begin + t) * qh * dim;
        for (std::size_t h = 0; h < qh; ++h) std::copy_n(&a.q(row, h, 0), dim, dst + h * dim);
      }
  prefill_args pa{a.layout,
                  a.layer,
                  c.views.data(),
                  &c.tiles,
                  make_view<const float>(a.qc, c.rows, qh, dim),
                  a.scale,
                  make_view(a.oc, c.rows, qh, dim),
                  make_view(a.lc, c.rows, qh),
                  a.scratch,
                  a.scratch_floats,
                  /*non_causal=*/true};
  prefill<P, D>(pool, pa);
  pool.run(c.members.size(), [&](std::size_t i, std::size_t) {
    const std::size_t g =
        std::upper_bound(c.groups.begin(), c.groups.end(), i) - c.groups.begin() - 1;
    const std::size_t t = i - c.groups[g], row = a.seqs[c.members[i]].q_begin;
    for (std::size_t h = 0; h < qh; ++h) {
      float* o = &a.out(row, h, 0);
      float& l = a.lse(row, h);
      for (std::size_t ch = c.chunks[g]; ch < c.chunks[g + 1]; ++ch) {
        const std::size_t r = c.views[ch].q_begin + t;
        merge_partial(o, l, a.oc + (r * qh + h) * dim, a.lc[r * qh + h], dim);
      }
    }
  });
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
