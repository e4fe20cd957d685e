// A custom head grouping written only against the grouping_policy concept.
//
// paired_heads<D>: exactly two query heads per KV head. Pinning the ratio in
// the type makes a cache built from a mismatched model configuration fail at
// construction, with a kvcache::error naming the values, instead of running.
//   bytes per token per layer = 2 x (q_heads / 2) x row_bytes(head_dim)
// Query heads 2j and 2j + 1 read KV head j, which is the library's rule
// h / (q_heads / kv_heads) with a group of 2.
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <string>
#include <vector>

template <std::size_t HeadDim = kvcache::dynamic>
struct paired_heads {
  using axis = kvcache::grouping_tag;
  static constexpr std::string_view name = "paired_heads";
  static constexpr std::size_t head_dim = HeadDim;

  //! kv: the configured cache_config::kv_heads; 0 means "what the grouping implies".
  static std::size_t kv_heads(std::size_t q_heads, std::size_t kv) {
    if (q_heads == 0 || q_heads % 2 != 0)
      throw kvcache::error("kvcache: paired_heads needs an even, non-zero q_heads; q_heads is " +
                           std::to_string(q_heads));
    if (kv != 0 && kv != q_heads / 2)
      throw kvcache::error(
          "kvcache: paired_heads stores q_heads / 2 = " + std::to_string(q_heads / 2) +
          " KV heads; kv_heads is " + std::to_string(kv));
    return q_heads / 2;
  }
};

int main() {
  using namespace kvcache;
  constexpr std::size_t layers = 2, qh = 6, d = 128, prompt = 5, decode = 3;
  using Cache = cache<paired_heads<d>, contiguous, full, bf16>;
  Cache kv({.layers = layers, .q_heads = qh, .max_tokens = 64, .threads = 1});
  const std::size_t kvh = kv.layout().kv_heads;
  std::printf("paired_heads: %zu query heads read %zu KV heads\n", qh, kvh);

  // K and V rows all equal 0.5 (exact in bf16): every output element must be 0.5.
  std::vector<float> q(prompt * qh * d, 0.25f), k(prompt * kvh * d, 0.5f);
  std::vector<float> out(prompt * qh * d, -1.f);
  const seq_id s = kv.add_sequence(prompt + decode);
  bool exact = true;
  auto one_step = [&](std::size_t t) {
    const step st = kv.begin_step({{s, t}});
    for (std::size_t l = 0; l < layers; ++l) {
      kv.write(l, st, make_view(k.data(), t, kvh, d), make_view(k.data(), t, kvh, d));
      kv.attend(l, st, make_view(q.data(), t, qh, d), make_view(out.data(), t, qh, d));
    }
    for (std::size_t i = 0; i < t * qh * d; ++i) exact = exact && out[i] == 0.5f;
  };
  one_step(prompt);                                      // prefill
  for (std::size_t i = 0; i < decode; ++i) one_step(1);  // decode
  std::printf("%zu tokens attended, outputs exact: %s\n", kv.length(s), exact ? "yes" : "no");

  try {
    Cache bad({.layers = 1, .q_heads = 6, .kv_heads = 2, .max_tokens = 8});
    return 1;
  } catch (const kvcache::error& e) {
    std::printf("rejected: %s\n", e.what());
  }
  return exact ? 0 : 1;
}

static_assert(kvcache::grouping_policy<paired_heads<>> &&
              kvcache::grouping_policy<paired_heads<128>>);
