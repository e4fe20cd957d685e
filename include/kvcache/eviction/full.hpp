// Full eviction: every token stays until its sequence is truncated or removed.
// Memory grows linearly with context; appending past a sequence's capacity is
// an error, never a silent truncation.
#pragma once

#include <cstddef>
#include <string_view>

#include "../concepts.hpp"

namespace kvcache {
inline namespace v0 {

struct full {
  using axis = eviction_tag;
  static constexpr std::string_view name = "full";
  static constexpr bool evicts = false;
  static constexpr bool keep(std::size_t, std::size_t) noexcept { return true; }
};

static_assert(eviction_policy<full>);

}  // namespace v0
}  // namespace kvcache
