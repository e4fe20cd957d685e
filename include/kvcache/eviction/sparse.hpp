// Block-sparse attention on a full cache (Longformer, Beltagy et al. 2020;
// BigBird, Zaheer et al. 2020): a query at position p reads
//   - the global tokens, positions 0..globals - 1 (and a global token's own
//     query reads every earlier token),
//   - its local window, positions (p - window, p],
//   - `random` blocks of `block` tokens drawn, with a seed, for its query
//     block p / block from the blocks before it.
// Every token is kept (evicts = false): memory is that of `full`,
//   bytes per sequence = tokens x layers x 2 x kv_heads x row_bytes,
// and only the reads are sparse. Prefill applies the pattern as a mask;
// decode reads only the selected token ranges (fewer bytes per token).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "../concepts.hpp"
#include "../error.hpp"

namespace kvcache {
inline namespace v0 {

//! sparse_pattern: runtime sizes from cache_config::sparse.
class sparse_pattern {
 public:
  using axis = eviction_tag;
  static constexpr std::string_view name = "sparse_pattern";
  static constexpr bool evicts = false;
  static constexpr rope_positions positions = rope_positions::absolute;

  explicit sparse_pattern(const eviction_config& c) : cfg_(c.sparse) {
    detail::require(cfg_.window > 0, "sparse window is 0; the local window holds at least 1 token");
    detail::require(cfg_.block > 0, "sparse block is 0; random blocks hold at least 1 token");
  }

  static constexpr bool keep(std::size_t, std::size_t) noexcept { return true; }

  std::size_t globals() const noexcept { return cfg_.globals; }
  std::size_t local_window() const noexcept { return cfg_.window; }
  std::size_t block() const noexcept { return cfg_.block; }

  //! The random key blocks of query block qb: min(random, qb) distinct blocks
  //! among 0..qb - 1, a function of (seed, qb) only, sorted.
  std::vector<std::size_t> random_blocks(std::size_t qb) const {
    std::vector<std::size_t> r;
    const std::size_t n = std::min(cfg_.random, qb);
    r.reserve(n);
    if (n == qb) {
      for (std::size_t b = 0; b < qb; ++b) r.push_back(b);
      return r;
    }
    std::uint64_t x = cfg_.seed ^ (0x9e3779b97f4a7c15ull * (qb + 1));
    while (r.size() < n) {
      // splitmix64
      std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      const std::size_t b = static_cast<std::size_t>(z % qb);
      if (std::find(r.begin(), r.end(), b) == r.end()) r.push_back(b);
    }
    std::sort(r.begin(), r.end());
    return r;
  }

  //! Whether the query at position p reads the key at position k <= p.
  bool visible(std::size_t k, std::size_t p) const {
    if (k < cfg_.globals || p < cfg_.globals || k + cfg_.window > p) return true;
    const auto r = random_blocks(p / cfg_.block);
    return std::binary_search(r.begin(), r.end(), k / cfg_.block);
  }

 private:
  sparse_config cfg_;
};

static_assert(eviction_policy<sparse_pattern>);
static_assert(sparse_selection<sparse_pattern>);

}  // namespace v0
}  // namespace kvcache
