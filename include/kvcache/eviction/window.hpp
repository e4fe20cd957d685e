// Sliding-window and attention-sink eviction.
//
// sliding_window<W> (Mistral 7B, Jiang et al. 2023): a token attends to itself
// and the W - 1 tokens before it; older tokens leave the cache.
// attention_sinks<S, W> (StreamingLLM, Xiao et al. 2024): the first S tokens
// (the "sinks" that soak up attention mass) stay for good, plus the window.
// The equivalent mask of a query at position p is sinks U (p - W, p].
//
// Tokens leave at the start of the next step, never before the current step's
// queries have attended, so a step of n tokens holds at most
//   kept tokens <= S + W - 1 + n
//   contiguous bytes per sequence = capacity x layers x 2 x kv_heads x row_bytes,
//     capacity >= S + W - 1 + (largest step), a ring over the window's slots
//   paged bytes per sequence <= (ceil(S / page) + ceil((W - 1 + n) / page) + 1)
//     x page x layers x 2 x kv_heads x row_bytes
// S and W are compile-time constants or `dynamic` (cache_config::sinks and
// ::window then give them).
//
// Positions: sliding_window rotates keys at their absolute positions
// (rope_positions::absolute, what Mistral-style models were trained with);
// attention_sinks at their positions inside the cache, 0..kept - 1
// (rope_positions::cache, what StreamingLLM needs). docs/eviction.md.
#pragma once

#include <cstddef>
#include <string_view>

#include "../concepts.hpp"
#include "../error.hpp"

namespace kvcache {
inline namespace v0 {

namespace detail {
inline std::size_t resolve_window(std::size_t stat, std::size_t runtime, const char* what,
                                  bool may_be_zero) {
  if (stat != dynamic) {
    require(runtime == 0 || runtime == stat, what, " ", runtime,
            " differs from the policy's static value ", stat);
    return stat;
  }
  require(may_be_zero || runtime > 0, what, " is 0; a dynamic ", what,
          " needs cache_config::", what, " >= 1");
  return runtime;
}
}  // namespace detail

//! attention_sinks<S, W, Positions>: keeps the first S tokens and the newest W.
template <std::size_t S = dynamic, std::size_t W = dynamic,
          rope_positions Positions = rope_positions::cache>
class attention_sinks {
  static_assert(W > 0, "attention_sinks<S, 0>: the window holds at least one token");

 public:
  using axis = eviction_tag;
  static constexpr std::string_view name = "attention_sinks";
  static constexpr bool evicts = true;
  static constexpr rope_positions positions = Positions;

  attention_sinks() requires(S != dynamic && W != dynamic) = default;
  explicit attention_sinks(const eviction_config& c)
      : sinks_(detail::resolve_window(S, c.sinks, "sinks", true)),
        window_(detail::resolve_window(W, c.window, "window", false)) {}

  std::size_t sinks() const noexcept { return sinks_; }
  std::size_t window() const noexcept { return window_; }
  //! Kept once the sequence holds `length` tokens: a sink, or one of the newest W.
  bool keep(std::size_t position, std::size_t length) const noexcept {
    return position < sinks_ || position + window_ >= length;
  }

 private:
  std::size_t sinks_ = S == dynamic ? 0 : S;
  std::size_t window_ = W == dynamic ? 1 : W;
};

//! sliding_window<W, Positions>: keeps the newest W tokens.
template <std::size_t W = dynamic, rope_positions Positions = rope_positions::absolute>
class sliding_window : public attention_sinks<0, W, Positions> {
 public:
  static constexpr std::string_view name = "sliding_window";
  sliding_window() requires(W != dynamic) = default;
  explicit sliding_window(const eviction_config& c) : attention_sinks<0, W, Positions>(check(c)) {}

 private:
  static const eviction_config& check(const eviction_config& c) {
    detail::require(c.sinks == 0, "sinks ", c.sinks,
                    " is set; sliding_window keeps no sinks (use attention_sinks)");
    return c;
  }
};

static_assert(eviction_policy<attention_sinks<4, 4096>>);
static_assert(eviction_policy<attention_sinks<>>);
static_assert(eviction_policy<sliding_window<4096>>);
static_assert(eviction_policy<sliding_window<>>);
static_assert(windowed_eviction<attention_sinks<>>);
static_assert(windowed_eviction<sliding_window<>>);

}  // namespace v0
}  // namespace kvcache
