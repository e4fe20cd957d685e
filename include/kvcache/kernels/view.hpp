// The one view every kernel reads (DESIGN.md section 3). Storage policies turn
// their bookkeeping into it once per step; kernels never see a policy.
//
// A page holds `page_tokens` slots of every layer's K and V for its tokens:
//   page bytes = layers x 2 x kv_heads x page_tokens x row_bytes
//   layout     = (layer, K|V, kv_head, slot, row)      heads-major inside a page,
// so one KV head's tokens in a page are one contiguous run (what decode reads).
// Contiguous storage is one page per sequence, with page_tokens = its capacity.
#pragma once

#include <cstddef>

#include "../config.hpp"

namespace kvcache {
inline namespace v0 {

//! Shape facts fixed for a cache's lifetime.
struct kv_layout {
  std::size_t layers = 0;
  std::size_t q_heads = 0;
  std::size_t kv_heads = 0;
  std::size_t head_dim = 0;
  std::size_t row_bytes = 0;  // one head's K (or V) vector in the precision's format

  KVCACHE_HOST_DEVICE constexpr std::size_t group() const noexcept { return q_heads / kv_heads; }
  //! Bytes of one page of `page_tokens` slots.
  KVCACHE_HOST_DEVICE constexpr std::size_t page_bytes(std::size_t page_tokens) const noexcept {
    return layers * 2 * kv_heads * page_tokens * row_bytes;
  }
  //! Byte offset inside a page of slot 0 of (layer, kind: 0 = K / 1 = V, kv_head).
  KVCACHE_HOST_DEVICE constexpr std::size_t run_offset(std::size_t page_tokens, std::size_t layer,
                                                       std::size_t kind,
                                                       std::size_t head) const noexcept {
    return ((layer * 2 + kind) * kv_heads + head) * page_tokens * row_bytes;
  }
};

//! One sequence of a step, as kernels see it.
struct seq_view {
  std::byte* const* pages = nullptr;  // (pages)     base address of each page, logical order
  std::size_t page_tokens = 0;        // slots per page
  std::size_t kv_len = 0;             // tokens attended after this step's append
  std::size_t q_begin = 0;            // first row of this sequence in q, k, v, out
  std::size_t q_len = 0;              // tokens appended in this step
  std::size_t first_pos = 0;          // slot/position of the first appended token

  //! Address of the row of `token` in the run that starts at `run` bytes into each page.
  KVCACHE_HOST_DEVICE std::byte* row(std::size_t run, std::size_t token,
                                     std::size_t row_bytes) const noexcept {
    return pages[token / page_tokens] + run + (token % page_tokens) * row_bytes;
  }
};

}  // namespace v0
}  // namespace kvcache
