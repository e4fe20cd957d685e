// Exact KV memory, in constexpr form, for any precision and shape:
//   bytes = sequences x tokens x 2 x layers x kv_heads x row_bytes(head_dim)
// where row_bytes includes a precision's metadata (scales, zero points); for
// fp16 it is 2 x head_dim. A live cache's memory_in_use() equals these
// formulas to the byte (tests/test_memory.cpp, tests/test_paged.cpp). Paged
// storage rounds each sequence up to whole pages and holds shared pages once.
// Per-channel keys (per_channel_k) add one fp16 residual per live sequence,
// allocated with it (add_sequence, fork, match_prefix):
//   sequence_bytes = layers x kv_heads x R x head_dim x 2
#pragma once

#include <cstddef>

#include "concepts.hpp"
#include "precision/per_channel.hpp"

namespace kvcache {
inline namespace v0 {

//! The parts of a model's shape that size its KV cache.
struct kv_shape {
  std::size_t layers = 0;
  std::size_t kv_heads = 0;
  std::size_t head_dim = 0;
};

//! Bytes one token occupies across all layers: its K and V rows for each KV head.
template <precision_policy P>
constexpr std::size_t bytes_per_token(const kv_shape& s) {
  return s.layers * 2 * s.kv_heads * P::row_bytes(s.head_dim);
}

//! Bytes each live sequence holds besides its tokens' rows: per-channel
//! keys' fp16 residual (0 for other precisions).
template <precision_policy P>
constexpr std::size_t sequence_bytes(const kv_shape& s) {
  return detail::residual_bytes<P>(s.layers, s.kv_heads, s.head_dim);
}

//! Bytes of `sequences` sequences of `tokens` tokens each, nothing shared.
template <precision_policy P>
constexpr std::size_t kv_bytes(const kv_shape& s, std::size_t sequences, std::size_t tokens) {
  return sequences * (tokens * bytes_per_token<P>(s) + sequence_bytes<P>(s));
}

//! Bytes when `sequences` sequences share one copy of a `shared_tokens` prefix
//! and each holds `private_tokens` of its own (beams, parallel samples,
//! multi-turn reuse): the prefix is stored once.
template <precision_policy P>
constexpr std::size_t shared_kv_bytes(const kv_shape& s, std::size_t sequences,
                                      std::size_t shared_tokens, std::size_t private_tokens) {
  return (shared_tokens + sequences * private_tokens) * bytes_per_token<P>(s) +
         sequences * sequence_bytes<P>(s);
}

//! Bytes a contiguous cache reserves for one sequence of `capacity` tokens.
template <precision_policy P>
constexpr std::size_t contiguous_sequence_bytes(const kv_shape& s, std::size_t capacity) {
  return capacity * bytes_per_token<P>(s) + sequence_bytes<P>(s);
}

//! Bytes of `sequences` unshared sequences of `tokens` tokens each in paged
//! storage: each sequence holds ceil(tokens / page_tokens) whole pages, so it
//! wastes less than one page.
template <precision_policy P>
constexpr std::size_t paged_kv_bytes(const kv_shape& s, std::size_t sequences, std::size_t tokens,
                                     std::size_t page_tokens) {
  return sequences *
         (((tokens + page_tokens - 1) / page_tokens) * page_tokens * bytes_per_token<P>(s) +
          sequence_bytes<P>(s));
}

//! Bytes in paged storage when `sequences` sequences forked from one of
//! `shared_tokens` tokens have each appended `private_tokens` more: the full
//! shared pages are held once; each sequence holds its own copy of the shared
//! partial page (copied on its first append) and its own pages after it.
//! Exact when private_tokens > 0 or shared_tokens is a multiple of page_tokens.
template <precision_policy P>
constexpr std::size_t paged_shared_kv_bytes(const kv_shape& s, std::size_t sequences,
                                            std::size_t shared_tokens, std::size_t private_tokens,
                                            std::size_t page_tokens) {
  const std::size_t own = shared_tokens % page_tokens + private_tokens;
  return (shared_tokens / page_tokens + sequences * ((own + page_tokens - 1) / page_tokens)) *
             page_tokens * bytes_per_token<P>(s) +
         sequences * sequence_bytes<P>(s);
}

//! Upper bound of the bytes one unshared sequence holds in paged storage under
//! a windowed eviction (attention_sinks<sinks, window>; sinks 0 for
//! sliding_window) during a step of `step_tokens` tokens: the sinks' pages,
//! the pages of the window's W - 1 older tokens plus the step's, and one page
//! the window cuts in the middle. Independent of the stream's length.
//! Per-channel keys keep the oldest kept token's whole key group (up to
//! G - 1 more tokens) and the residual.
template <precision_policy P>
constexpr std::size_t windowed_paged_bytes(const kv_shape& s, std::size_t sinks, std::size_t window,
                                           std::size_t step_tokens, std::size_t page_tokens) {
  const std::size_t pt = page_tokens, mates = detail::token_group_of<P>() - 1;
  return ((sinks + pt - 1) / pt + (window - 1 + mates + step_tokens + pt - 1) / pt + 1) * pt *
             bytes_per_token<P>(s) +
         sequence_bytes<P>(s);
}

}  // namespace v0
}  // namespace kvcache
