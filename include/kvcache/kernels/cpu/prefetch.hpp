// The lines of a decode stream's next tile, requested a few at a time from
// inside the loops of the current tile (decode.hpp, decode_quant.hpp,
// amx.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../../config.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! The lines of a stream's next tile, prefetched a few at a time from inside
//! the loops of this tile: issued at once they stall the core on its line
//! fill buffers and leave memory idle while it computes; spread out, the
//! reads overlap the arithmetic. A tile is one or two runs of rows (two when
//! it spans small pages); K and V lines alternate, so that both operands
//! arrive together (int8 from DRAM on two threads: 35 ns per token and KV
//! head, 37 with all K lines first). The runs alternate as well: each run's
//! first lines go out at the start of the tile, and the L2 streamer, which
//! follows a stream only within its 4 KiB page, then runs ahead in every
//! run's page at once (fp16 decode at 32k, 16-token runs of 4 KiB: paged
//! 48.3 -> 43.2 ms, contiguous 44.5 -> 42.2 ms).
struct prefetch_cursor {
  static constexpr std::size_t max_runs = 2;
  const char* k[max_runs] = {};
  const char* v[max_runs] = {};
  std::size_t lines[max_runs] = {};  // per run, the same for K and V
  std::size_t next = 0;              // lines requested, K and V counted apart
  std::size_t step = 0;              // lines per issue()
  std::size_t total() const noexcept { return lines[0] + lines[1]; }
  //! The address of the i-th line requested, i < 2 total(): pairs of (K, V)
  //! lines, the runs alternating while both have lines left.
  KVCACHE_ALWAYS_INLINE const char* line(std::size_t i) const noexcept {
    // One run (every tile of contiguous storage): K and V lines in turn, a
    // short path for the common case.
    if (lines[1] == 0) return (i & 1 ? v[0] : k[0]) + (i >> 1) * 64;
    const std::size_t pair = i >> 1, both = 2 * std::min(lines[0], lines[1]);
    const std::size_t r = pair < both ? pair & 1 : lines[1] > lines[0];
    const std::size_t n = pair < both ? pair >> 1 : both / 2 + (pair - both);
    return (i & 1 ? v[r] : k[r]) + n * 64;
  }
  KVCACHE_ALWAYS_INLINE void issue() noexcept {
    for (const std::size_t e = std::min(next + step, 2 * total()); next < e; ++next)
      __builtin_prefetch(line(next), 0, 1);
  }
  //! Spreads the lines over `calls` calls of issue() (all at once for 0).
  void spread(std::size_t calls) noexcept {
    step = calls ? (2 * total() + calls - 1) / calls : 2 * total();
  }
  void finish() noexcept {
    step = 2 * total();
    issue();
  }
};

//! The cursor over the lines of `rows` rows (row_bytes apart) from the ones
//! at K and V. Rows need not start on a line (136 bytes for int8): from the
//! line holding the first byte, one line more than the rows' size, or the
//! line holding the last byte would be left to a demand miss. (A prefetch
//! past a page or an item is harmless: it never faults.)
inline prefetch_cursor run_lines(const std::byte* K, const std::byte* V, std::size_t row_bytes,
                                 std::size_t rows) noexcept {
  auto line_of = [](const std::byte* p) {
    return reinterpret_cast<const char*>(p) - reinterpret_cast<std::uintptr_t>(p) % 64;
  };
  return {{line_of(K)}, {line_of(V)}, {rows ? (rows * row_bytes + 63) / 64 + 1 : 0}};
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
