// Quantized caches as a whole: history is quantized exactly once, non-finite
// K/V is rejected with nothing stored, and head_dims that are not whole
// blocks are refused.
#include <cstring>

#include "support.hpp"

using namespace kvcache;
using Catch::Matchers::Contains;

namespace {

template <class Cache>
std::vector<float> stored_rows(const Cache& kv, seq_id s, std::size_t tokens) {
  const auto& L = kv.layout();
  std::vector<float> all, row(L.head_dim);
  for (std::size_t l = 0; l < L.layers; ++l)
    for (std::size_t t = 0; t < tokens; ++t)
      for (std::size_t kind = 0; kind < 2; ++kind)
        for (std::size_t h = 0; h < L.kv_heads; ++h) {
          kv.read_row(l, s, t, kind, h, row.data());
          all.insert(all.end(), row.begin(), row.end());
        }
  return all;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEMPLATE_TEST_CASE("history is quantized once: later appends leave stored rows bit-identical",
                   "[quant][cache]", int8_kv<>, int4_kv<>, int4_kv<true>, int2_kv, fp8_e4m3_kv<>,
                   hadamard<int4_kv<>>) {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  kvtest::harness<cache<gqa<>, contiguous, full, TestType>> h(
      {.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .max_tokens = 1024, .threads = 2},
      seed);
  auto s = h.add(512);
  h.run({{s, 100}});
  const auto before = stored_rows(h.kv, s, 100);
  h.run({{s, 37}});
  for (int i = 0; i < 5; ++i) h.run({{s, 1}});
  CHECK(same_bits(stored_rows(h.kv, s, 100), before));
}

TEMPLATE_TEST_CASE("NaN or Inf in K/V is rejected, naming sequence, layer and token",
                   "[quant][cache][errors]", int8_kv<>, int2_kv, fp8_e4m3_kv<>) {
  using C = cache<gqa<>, contiguous, full, TestType>;
  C kv({.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .max_tokens = 256, .threads = 1});
  std::mt19937_64 rng(kvtest::test_seed());
  auto a = kv.add_sequence(100), b = kv.add_sequence(100);
  auto st = kv.begin_step({{a, 5}, {b, 3}});
  auto k = kvtest::normal(rng, 8 * 2 * 64), v = kvtest::normal(rng, 8 * 2 * 64);
  for (std::size_t l = 0; l < 2; ++l)
    kv.write(l, st, make_view<const float>(k.data(), 8, 2, 64),
             make_view<const float>(v.data(), 8, 2, 64));
  const auto rows_a = stored_rows(kv, a, 5), rows_b = stored_rows(kv, b, 3);

  auto st2 = kv.begin_step({{a, 2}, {b, 2}});
  auto k2 = kvtest::normal(rng, 4 * 2 * 64), v2 = kvtest::normal(rng, 4 * 2 * 64);
  kv.write(0, st2, make_view<const float>(k2.data(), 4, 2, 64),
           make_view<const float>(v2.data(), 4, 2, 64));
  const auto next_a = stored_rows(kv, a, 5);
  // Row 3 of the step is b's second new token: position 4 of sequence b.
  v2[(3 * 2 + 1) * 64 + 7] = std::numeric_limits<float>::quiet_NaN();
  const std::string id_b = std::to_string(static_cast<std::uint64_t>(b));
  CHECK_THROWS_WITH(
      kv.write(1, st2, make_view<const float>(k2.data(), 4, 2, 64),
               make_view<const float>(v2.data(), 4, 2, 64)),
      Contains("V of sequence " + id_b + ", layer 1, token 4") && Contains("nothing was written"));
  k2[(0 * 2 + 0) * 64 + 3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(kv.write(1, st2, make_view<const float>(k2.data(), 4, 2, 64),
                             make_view<const float>(v2.data(), 4, 2, 64)),
                    Contains("K of sequence " + std::to_string(static_cast<std::uint64_t>(a)) +
                             ", layer 1, token 5") &&
                        Contains("inf"));
  // Nothing of layer 1 was stored, and earlier rows are untouched.
  CHECK(same_bits(stored_rows(kv, a, 5), next_a));
  CHECK(same_bits(stored_rows(kv, a, 5), rows_a));
  CHECK(same_bits(stored_rows(kv, b, 3), rows_b));
  CHECK(kv.length(a) == 7);
  CHECK(kv.memory_in_use() == 200 * kv.layout().page_bytes(1));
}

TEST_CASE("head_dim that is not whole blocks is refused", "[quant][cache][errors]") {
  // Dynamic head_dim: a kvcache::error naming both numbers.
  using C64 = cache<gqa<>, contiguous, full, int8_kv<64>>;
  CHECK_THROWS_WITH(
      C64({.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 96, .max_tokens = 16}),
      Contains("head_dim 96 is not a multiple of the group size 64"));
  using C32 = cache<gqa<>, contiguous, full, int4_kv<>>;
  CHECK_THROWS_WITH(
      C32({.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 48, .max_tokens = 16}),
      Contains("head_dim 48 is not a multiple of the group size 32"));
  CHECK_NOTHROW(C32({.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 96, .max_tokens = 16}));
  // A static head_dim is checked at compile time (cache.hpp's static_assert):
  // cache<gqa<48>, contiguous, full, int4_kv<>> does not compile.
  static_assert(!detail::whole_blocks<int4_kv<>>(48));
  static_assert(detail::whole_blocks<int4_kv<>>(96));
}
