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
#include <cstdint>

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

//! A block-sparse read pattern (sparse_pattern) of one sequence of a step, in
//! cache indices (= positions: the cache is full). Prefill masks with
//! visible(); decode reads only `ranges`.
struct sparse_view {
  std::size_t globals = 0, window = 0, block = 1;
  const std::uint8_t* mask = nullptr;  // (query blocks, kblocks) 1: the key block is drawn
  std::size_t first_qblock = 0;        // query block of mask row 0
  std::size_t kblocks = 0;
  const std::size_t* ranges = nullptr;  // (nranges, 2) [begin, end) a decode query reads
  std::size_t nranges = 0;

  KVCACHE_HOST_DEVICE bool visible(std::size_t k, std::size_t p) const noexcept {
    if (k < globals || p < globals || k + window > p) return true;
    return mask[(p / block - first_qblock) * kblocks + k / block] != 0;
  }
};

//! One sequence of a step, as kernels see it. Kernels index a sequence's kept
//! tokens in cache order, 0..kv_len - 1 (oldest first); slot() maps a cache
//! index to a slot of the page table. Without eviction the map is the
//! identity. With a windowed eviction the first sink_len tokens sit in slots
//! 0..sink_len - 1 and the rest follow from slot ring_base + ring_start,
//! wrapping after ring_len slots: a ring over one page for contiguous
//! storage (two runs of the same page, no second copy of the kernels), the
//! kept pages after the dropped ones for paged storage (ring_len "infinite").
//! run() gives how many tokens from an index are adjacent in memory; kernels
//! never read a tile across a run.
struct seq_view {
  static constexpr std::size_t no_wrap = ~std::size_t{0} >> 1;

  std::byte* const* pages = nullptr;  // (pages)     base address of each page, logical order
  std::size_t page_tokens = 0;        // slots per page
  std::size_t kv_len = 0;             // tokens attended after this step's append
  std::size_t q_begin = 0;            // first row of this sequence in q, k, v, out
  std::size_t q_len = 0;              // tokens appended in this step
  std::size_t first_pos = 0;          // cache index of the first appended token (kv_len - q_len)
  std::size_t sink_len = 0;           // leading tokens always attended (attention sinks)
  std::size_t ring_base = 0;          // slot of ring position 0
  std::size_t ring_start = 0;         // ring position of cache index sink_len
  std::size_t ring_len = no_wrap;     // ring slots
  //! Prefill mask: key i is visible to the query at cache index j iff i <= j
  //! and (i < sink_len or i + window > j); 0: no window. (Cache indices of
  //! window tokens differ by their distance in the sequence.)
  std::size_t window = 0;
  //! Keys stored unrotated, rotated by the kernel as it reads them, at their
  //! cache index: (cache index, rotary_dim / 2, 2) cos, sin; null: keys are
  //! read as stored. Only a scattered eviction with cache positions sets it,
  //! and its sequences take the prefill kernel even to decode.
  const float* rope_cs = nullptr;
  std::size_t rotary_dim = 0;
  bool rope_interleaved = false;
  //! Block-sparse reads on a full cache; null: every token (causal).
  const sparse_view* sparse = nullptr;
  //! Per-channel keys (per_channel_k): the sequence's fp16 residual,
  //! (layers, kv_heads, residual_tokens, dim) fp16 bits; the newest res_len
  //! tokens (cache indices kv_len - res_len ..) read their K from its slots
  //! 0..res_len - 1, older tokens from their quantized groups. res_prev: the
  //! residual's tokens before this step's append. A window token at cache
  //! index i >= sink_len has position i + pos_offset (groups are positions).
  std::uint16_t* residual = nullptr;
  std::size_t residual_tokens = 0;
  std::size_t res_len = 0;
  std::size_t res_prev = 0;
  std::size_t pos_offset = 0;

  KVCACHE_HOST_DEVICE std::size_t slot(std::size_t token) const noexcept {
    if (token < sink_len) return token;
    std::size_t r = ring_start + (token - sink_len);
    if (r >= ring_len) r -= ring_len;
    return ring_base + r;
  }
  //! Tokens from `token` on that sit in adjacent slots of one page.
  KVCACHE_HOST_DEVICE std::size_t run(std::size_t token) const noexcept {
    const std::size_t n = page_tokens - slot(token) % page_tokens;
    return token < sink_len && sink_len - token < n ? sink_len - token : n;
  }
  //! Address of the row of cache index `token` in the run that starts at `run` bytes into each
  //! page.
  KVCACHE_HOST_DEVICE std::byte* row(std::size_t run, std::size_t token,
                                     std::size_t row_bytes) const noexcept {
    const std::size_t s = slot(token);
    return pages[s / page_tokens] + run + (s % page_tokens) * row_bytes;
  }
};

}  // namespace v0
}  // namespace kvcache
