// A custom eviction policy written only against the eviction_policy concept.
// `never_evict` documents a cache that must keep every token of a prompt for
// exact prefix reuse: it evicts nothing, like `full`, and the cache enforces
// capacity instead of dropping tokens. (Evicting policies need a storage that
// reuses slots; the combination is rejected at compile time otherwise.)
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <vector>

struct never_evict {
  using axis = kvcache::eviction_tag;
  static constexpr std::string_view name = "never_evict";
  static constexpr bool evicts = false;
  static constexpr bool keep(std::size_t, std::size_t) noexcept { return true; }
};
static_assert(kvcache::eviction_policy<never_evict>);

// A policy that would drop old tokens: it satisfies the concept, and
// cache<..., contiguous, sliding_keep_last, ...> is rejected by a static_assert
// because contiguous storage cannot reuse slots (see docs/policies.md).
struct sliding_keep_last {
  using axis = kvcache::eviction_tag;
  static constexpr std::string_view name = "sliding_keep_last";
  static constexpr bool evicts = true;
  static constexpr bool keep(std::size_t pos, std::size_t len) noexcept { return pos + 8 >= len; }
};
static_assert(kvcache::eviction_policy<sliding_keep_last>);

int main() {
  using namespace kvcache;
  cache<mqa<64>, contiguous, never_evict, fp16> kv(
      {.layers = 1, .q_heads = 4, .max_tokens = 16, .threads = 1});
  auto s = kv.add_sequence(10);
  std::vector<float> k(10 * 64, 1.f), q(10 * 4 * 64, 0.1f), out(10 * 4 * 64);
  auto st = kv.begin_step({{s, 10}});
  kv.write(0, st, make_view<const float>(k.data(), 10, 1, 64),
           make_view<const float>(k.data(), 10, 1, 64));
  kv.attend(0, st, make_view<const float>(q.data(), 10, 4, 64), make_view(out.data(), 10, 4, 64));
  try {
    kv.begin_step({{s, 1}});  // the 11th token does not fit and is not silently dropped
    return 1;
  } catch (const kvcache::error& e) {
    std::printf("never_evict keeps all %zu tokens; appending more: %s\n", kv.length(s), e.what());
  }
  return kv.length(s) == 10 ? 0 : 1;
}
