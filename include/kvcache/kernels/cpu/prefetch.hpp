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
//! reads overlap the arithmetic. A tile is one run of rows or, where it spans
//! small pages, up to max_runs runs; K and V lines alternate, so that both operands
//! arrive together (int8 from DRAM on two threads: 35 ns per token and KV
//! head, 37 with all K lines first). The runs alternate as well: each run's
//! first lines go out at the start of the tile, and the L2 streamer, which
//! follows a stream only within its 4 KiB page, then runs ahead in every
//! run's page at once (fp16 decode at 32k, 16-token runs of 4 KiB: paged
//! 48.3 -> 43.2 ms, contiguous 44.5 -> 42.2 ms).
struct prefetch_cursor {
  static constexpr std::size_t max_runs = 4;
  const char* k[max_runs] = {};
  const char* v[max_runs] = {};
  std::size_t lines[max_runs] = {};  // per run, the same for K and V
  std::size_t next = 0;              // lines requested, K and V counted apart
  std::size_t step = 0;              // lines per issue()
  std::size_t run = 0, at = 0;       // the next pair: line `at` of run `run`
  std::size_t limit = 0;             // 2 total(), set by spread()
  std::size_t total() const noexcept {
    std::size_t t = 0;
    for (std::size_t r = 0; r < max_runs; ++r) t += lines[r];
    return t;
  }
  //! Requests the next `step` lines (after spread()): pairs of (K, V)
  //! lines, the runs that still have lines taking turns.
  KVCACHE_ALWAYS_INLINE void issue() noexcept {
    for (const std::size_t e = std::min(next + step, limit); next < e;)
      __builtin_prefetch(pop(), 0, 1);
  }
  //! The next line to request (next < 2 total()), and the cursor past it.
  KVCACHE_ALWAYS_INLINE const char* pop() noexcept {
    const char* p = (next & 1 ? v[run] : k[run]) + at * 64;
    if (next++ & 1) advance();
    return p;
  }
  //! The pair after (run, at): the next run with a line `at`, else line
  //! at + 1 of the first run that has one.
  KVCACHE_ALWAYS_INLINE void advance() noexcept {
    if (lines[1] == 0) {  // one run: every tile of contiguous storage
      ++at;
      return;
    }
    for (std::size_t r = run + 1; r < max_runs; ++r)
      if (lines[r] > at) {
        run = r;
        return;
      }
    ++at;
    for (std::size_t r = 0; r < max_runs; ++r)
      if (lines[r] > at) {
        run = r;
        return;
      }
  }
  //! Spreads the lines over `calls` calls of issue() (all at once for 0).
  void spread(std::size_t calls) noexcept {
    limit = 2 * total();
    step = calls ? (limit + calls - 1) / calls : limit;
  }
  void finish() noexcept {
    limit = 2 * total();
    step = limit;
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
