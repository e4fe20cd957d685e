// The work split of one step, made on the host once per step (begin_step) and
// reused by every layer's kernels. Splits depend only on the step's shape,
// never on the thread count, so results are bitwise identical for any number
// of threads.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "view.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! A decode work item: one KV head of one single-token sequence, over a token
//! range. Items of one (sequence, head) are adjacent; their partial results
//! are merged by log-sum-exp.
struct decode_item {
  std::uint32_t seq, head;
  std::size_t begin, end;  // token range [begin, end)
};

//! A prefill work item: all query heads of one KV head's group, for a tile of
//! a sequence's new tokens.
struct prefill_item {
  std::uint32_t seq, head;
  std::size_t row_begin, row_end;  // new-token range inside the sequence
};

struct work_plan {
  std::vector<decode_item> decode;
  std::vector<std::size_t>
      decode_groups;  // (pairs + 1) offsets into decode, one group per (seq, head)
  std::vector<prefill_item> prefill;
  std::size_t max_rows = 0;  // largest prefill tile, in query rows
};

inline constexpr std::size_t decode_tile = 32;    // tokens per softmax update (two 16-lane passes)
inline constexpr std::size_t decode_streams = 4;  // items interleaved per thread task
inline constexpr std::size_t prefill_kv_tile = 64;
inline constexpr std::size_t paged_run_bytes = 16 * 1024;  // see make_plan
inline constexpr std::size_t paged_min_pairs = 2 * decode_streams;

//! Token chunk for decode splits: ~256 items per step, each 256..4096 tokens.
inline std::size_t decode_chunk(std::size_t total_tokens) noexcept {
  std::size_t c = std::clamp<std::size_t>(total_tokens / 256, 256, 4096);
  return (c + decode_tile - 1) / decode_tile * decode_tile;
}

//! `decode_begin`, if not empty, gives each sequence's first token for decode
//! to read (a cascade computes the shared prefix before it separately).
inline work_plan make_plan(const kv_layout& layout, const std::vector<seq_view>& seqs,
                           const std::vector<std::size_t>& decode_begin = {}) {
  work_plan plan;
  const std::size_t g = layout.group();
  auto begin = [&](std::size_t i) { return decode_begin.empty() ? 0 : decode_begin[i]; };
  std::size_t decode_tokens = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i)
    if (seqs[i].q_len == 1 && !seqs[i].rope_cs)
      decode_tokens += (seqs[i].kv_len - begin(i)) * layout.kv_heads;
  // Small pages: a KV head's run in a page is at most paged_run_bytes and the
  // next page's run is elsewhere, so a stream walking one head across pages
  // restarts the hardware prefetchers at every page (measured 25% slower at
  // 16 tokens x 256 bytes). With one item per (sequence, head), a task's
  // decode_streams items are adjacent heads, whose runs in a page are
  // adjacent: one sequential read per page. It needs enough (sequence, head)
  // pairs to keep threads busy without token splits.
  std::size_t decode_pairs = 0;
  bool small_pages = true;
  for (const auto& s : seqs)
    if (s.q_len == 1 && !s.rope_cs) {
      decode_pairs += layout.kv_heads;
      small_pages = small_pages && s.page_tokens * layout.row_bytes <= paged_run_bytes;
    }
  const std::size_t chunk = small_pages && decode_pairs >= paged_min_pairs
                                ? std::size_t{1} << 48  // one item; b += chunk cannot wrap
                                : decode_chunk(decode_tokens);
  // A prefill tile covers ~64 query rows of one KV head's group.
  const std::size_t tile_tokens = std::max<std::size_t>(1, 64 / g);
  plan.decode_groups.push_back(0);
  for (std::uint32_t i = 0; i < seqs.size(); ++i) {
    const auto& s = seqs[i];
    for (std::uint32_t h = 0; h < layout.kv_heads; ++h) {
      if (s.q_len == 1 && !s.rope_cs) {
        if (s.sparse) {  // only the selected ranges, each split into chunks
          for (std::size_t r = 0; r < s.sparse->nranges; ++r)
            for (std::size_t b = s.sparse->ranges[2 * r], e = s.sparse->ranges[2 * r + 1]; b < e;
                 b += chunk)
              plan.decode.push_back({i, h, b, std::min(e, b + chunk)});
          plan.decode_groups.push_back(plan.decode.size());
          continue;
        }
        // Sinks are an item of their own: they may read another query (cache.hpp).
        std::size_t b = begin(i);
        if (b < s.sink_len && s.sink_len < s.kv_len) {
          plan.decode.push_back({i, h, b, s.sink_len});
          b = s.sink_len;
        }
        for (; b < s.kv_len; b += chunk)
          plan.decode.push_back({i, h, b, std::min(s.kv_len, b + chunk)});
        plan.decode_groups.push_back(plan.decode.size());
      } else {
        for (std::size_t r = 0; r < s.q_len; r += tile_tokens) {
          const std::size_t e = std::min(s.q_len, r + tile_tokens);
          plan.prefill.push_back({i, h, r, e});
          plan.max_rows = std::max(plan.max_rows, (e - r) * g);
        }
      }
    }
  }
  return plan;
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
