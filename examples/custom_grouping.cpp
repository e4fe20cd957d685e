// A custom head grouping written only against the grouping_policy concept:
// exactly two query heads per KV head, and any other configuration rejected
// with a kvcache::error that names the values.
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <string>
#include <vector>

template <std::size_t HeadDim = kvcache::dynamic>
struct paired_heads {
  using axis = kvcache::grouping_tag;
  static constexpr std::string_view name = "paired_heads";
  static constexpr std::size_t head_dim = HeadDim;
  static std::size_t kv_heads(std::size_t q_heads, std::size_t kv) {
    if (q_heads == 0 || q_heads % 2 != 0)
      throw kvcache::error("paired_heads needs an even, non-zero q_heads; got " +
                           std::to_string(q_heads));
    if (kv != 0 && kv != q_heads / 2)
      throw kvcache::error("paired_heads stores q_heads / 2 = " + std::to_string(q_heads / 2) +
                           " KV heads; kv_heads is " + std::to_string(kv));
    return q_heads / 2;
  }
};
static_assert(kvcache::grouping_policy<paired_heads<128>>);

int main() {
  using namespace kvcache;
  cache<paired_heads<128>, contiguous, full, bf16> kv(
      {.layers = 2, .q_heads = 6, .max_tokens = 64, .threads = 1});
  std::printf("paired_heads: %zu query heads read %zu KV heads\n", kv.layout().q_heads,
              kv.layout().kv_heads);
  const std::size_t d = 128, n = 5;
  std::vector<float> k(n * 3 * d, 0.5f), q(n * 6 * d, 0.25f), out(n * 6 * d);
  auto s = kv.add_sequence();
  auto st = kv.begin_step({{s, n}});
  for (std::size_t l = 0; l < 2; ++l) {
    kv.write(l, st, make_view<const float>(k.data(), n, 3, d),
             make_view<const float>(k.data(), n, 3, d));
    kv.attend(l, st, make_view<const float>(q.data(), n, 6, d), make_view(out.data(), n, 6, d));
  }
  try {
    cache<paired_heads<128>, contiguous, full, bf16> bad(
        {.layers = 1, .q_heads = 5, .max_tokens = 8});
    return 1;
  } catch (const kvcache::error& e) {
    std::printf("rejected as expected: %s\n", e.what());
  }
  return out[0] == 0.5f ? 0 : 1;  // equal values attend to themselves exactly
}
