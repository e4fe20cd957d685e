// The lines of a decode stream's next tile, requested a few at a time from
// inside the loops of the current tile (decode_quant.hpp, amx.hpp).
#pragma once

#include <algorithm>
#include <cstddef>

#include "../../config.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! The lines of a stream's next tile, prefetched a few at a time from inside
//! the loops of this tile: issued at once they stall the core on its line
//! fill buffers and leave memory idle while it computes; spread out, the
//! reads overlap the arithmetic. K and V lines alternate, so that both
//! operands of the next tile arrive together (int8 from DRAM on two
//! threads: 35 ns per token and KV head, 37 with all K lines first).
struct prefetch_cursor {
  const char* k = nullptr;
  const char* v = nullptr;
  std::size_t lines = 0;  // per operand
  std::size_t next = 0;
  std::size_t step = 0;
  KVCACHE_ALWAYS_INLINE void issue() noexcept {
    for (const std::size_t e = std::min(next + step, 2 * lines); next < e; ++next)
      __builtin_prefetch((next & 1 ? v : k) + 64 * (next >> 1), 0, 1);
  }
  void finish() noexcept {
    step = 2 * lines;
    issue();
  }
};

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
