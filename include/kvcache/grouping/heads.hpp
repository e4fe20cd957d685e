// Head grouping for standard attention: every token stores one K and one V
// vector per KV head.
//   bytes per token per layer = 2 x kv_heads x row_bytes(head_dim)
// mha: kv_heads == q_heads. gqa: q_heads a multiple of kv_heads (Llama-3-8B:
// 32 / 8). mqa: one KV head read by every query head (PaLM, Falcon).
#pragma once

#include <cstddef>
#include <string_view>

#include "../concepts.hpp"
#include "../error.hpp"

namespace kvcache {
inline namespace v0 {

namespace detail {
inline void check_grouping(std::size_t q_heads, std::size_t kv_heads) {
  require(q_heads > 0, "q_heads is 0; it must be at least 1");
  require(kv_heads > 0, "kv_heads is 0; it must be at least 1");
  require(kv_heads <= q_heads, "kv_heads ", kv_heads, " exceeds q_heads ", q_heads);
  require(q_heads % kv_heads == 0, "q_heads ", q_heads, " is not a multiple of kv_heads ",
          kv_heads);
}
}  // namespace detail

//! Multi-head attention: one KV head per query head.
template <std::size_t HeadDim = dynamic>
struct mha {
  using axis = grouping_tag;
  static constexpr std::string_view name = "mha";
  static constexpr std::size_t head_dim = HeadDim;
  static std::size_t kv_heads(std::size_t q_heads, std::size_t kv) {
    detail::require(kv == 0 || kv == q_heads, "mha stores one KV head per query head; kv_heads ",
                    kv, " differs from q_heads ", q_heads, " (use gqa)");
    detail::check_grouping(q_heads, q_heads);
    return q_heads;
  }
};

//! Grouped-query attention: query head h reads KV head h / (q_heads / kv_heads).
template <std::size_t HeadDim = dynamic>
struct gqa {
  using axis = grouping_tag;
  static constexpr std::string_view name = "gqa";
  static constexpr std::size_t head_dim = HeadDim;
  static std::size_t kv_heads(std::size_t q_heads, std::size_t kv) {
    detail::check_grouping(q_heads, kv);
    return kv;
  }
};

//! Multi-query attention: one KV head for all query heads.
template <std::size_t HeadDim = dynamic>
struct mqa {
  using axis = grouping_tag;
  static constexpr std::string_view name = "mqa";
  static constexpr std::size_t head_dim = HeadDim;
  static std::size_t kv_heads(std::size_t q_heads, std::size_t kv) {
    detail::require(kv == 0 || kv == 1, "mqa stores one KV head; kv_heads is ", kv);
    detail::check_grouping(q_heads, 1);
    return 1;
  }
};

static_assert(grouping_policy<mha<>> && grouping_policy<mha<128>>);
static_assert(grouping_policy<gqa<>> && grouping_policy<gqa<128>>);
static_assert(grouping_policy<mqa<>> && grouping_policy<mqa<128>>);

}  // namespace v0
}  // namespace kvcache
