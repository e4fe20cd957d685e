// The host-side plan of cascade attention (FlashInfer's cascade, Ye et al.
// 2024; Hydragen, Juravsky et al. 2024): decode sequences of one step that
// hold the same leading pages attend to that shared prefix once, together, as
// one multi-query pass, and each sequence's own suffix separately; the two
// (output, log-sum-exp) partial results are merged (merge.hpp). The shared
// pages are then read once per step instead of once per sequence.
//
// Made in begin_step from the step's views; backend independent. Splits depend
// only on the step's shape and page identities, never on the thread count.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "plan.hpp"
#include "view.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

struct cascade_plan {
  std::vector<std::uint32_t> members;     // (members)    step sequences, group by group
  std::vector<std::size_t> groups;        // (groups + 1) offsets into members
  std::vector<std::size_t> chunks;        // (groups + 1) offsets into views
  std::vector<seq_view> views;            // (chunks)     a slice of a group's shared pages;
                                          //              q rows [q_begin, q_begin + members)
  std::vector<std::size_t> decode_begin;  // (step sequences) first token decode reads
  work_plan tiles;                        // non-causal prefill items over `views`
  std::size_t rows = 0;                   // query rows over all views

  bool empty() const noexcept { return members.empty(); }
};

//! Shared prefixes are split into chunks of about this many tokens (whole
//! pages), so that a single group still gives every thread work.
inline constexpr std::size_t cascade_chunk_tokens = 1024;

//! Groups the step's decode sequences by their first page and plans a cascade
//! for each group of 2 or more that shares at least `min_tokens` tokens of
//! whole pages. `seqs[i].pages` must list at least first_pos / page_tokens
//! full pages that the step leaves unchanged. min_tokens 0: no cascade.
inline cascade_plan make_cascade_plan(const kv_layout& layout, const std::vector<seq_view>& seqs,
                                      std::size_t min_tokens) {
  cascade_plan c;
  if (min_tokens == 0) return c;
  std::vector<std::uint32_t> cand;
  for (std::uint32_t i = 0; i < seqs.size(); ++i) {
    const seq_view& s = seqs[i];
    if (s.q_len == 1 && s.first_pos >= s.page_tokens && s.first_pos >= min_tokens)
      cand.push_back(i);
  }
  if (cand.size() < 2) return c;
  std::stable_sort(cand.begin(), cand.end(), [&](std::uint32_t a, std::uint32_t b) {
    return std::less<const std::byte*>{}(seqs[a].pages[0], seqs[b].pages[0]);
  });
  c.decode_begin.assign(seqs.size(), 0);
  c.groups.push_back(0);
  c.chunks.push_back(0);
  for (std::size_t b = 0, e; b < cand.size(); b = e) {
    const seq_view& first = seqs[cand[b]];
    const std::size_t pt = first.page_tokens;
    std::size_t shared = first.first_pos / pt;  // full pages
    for (e = b + 1; e < cand.size() && seqs[cand[e]].pages[0] == first.pages[0]; ++e) {
      const seq_view& s = seqs[cand[e]];
      std::size_t n = 0;
      const std::size_t limit = std::min(shared, s.first_pos / s.page_tokens);
      while (n < limit && s.pages[n] == first.pages[n]) ++n;
      shared = n;
    }
    const std::size_t m = e - b, tokens = shared * pt;
    if (m < 2 || tokens < min_tokens) continue;
    for (std::size_t i = b; i < e; ++i) {
      c.members.push_back(cand[i]);
      c.decode_begin[cand[i]] = tokens;
    }
    c.groups.push_back(c.members.size());
    const std::size_t chunk_pages = std::max<std::size_t>(1, cascade_chunk_tokens / pt);
    for (std::size_t p = 0; p < shared; p += chunk_pages) {
      seq_view v;
      v.pages = first.pages + p;
      v.page_tokens = pt;
      v.kv_len = std::min(chunk_pages, shared - p) * pt;
      v.q_begin = c.rows;
      v.q_len = m;
      c.views.push_back(v);
      c.rows += m;
    }
    c.chunks.push_back(c.views.size());
  }
  if (c.empty()) return cascade_plan{};
  c.tiles = make_plan(layout, c.views);
  return c;
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
