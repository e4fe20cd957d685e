// Bad input gets a kvcache::error naming the value and the limit, and the
// cache is left exactly as it was: same sequences, lengths, memory and bytes.
#include <limits>

#include "support.hpp"

using namespace kvcache;
using Catch::Matchers::Contains;

namespace {

using C = cache<gqa<>, contiguous, full, fp16>;

struct snapshot {
  std::vector<std::size_t> lengths;
  std::size_t sequences, memory;
  std::vector<float> rows;
  bool operator==(const snapshot&) const = default;
};

// Rows are compared only for the tokens written before the checks
// (`written` per sequence): slots planned but not yet written hold no value.
snapshot take(const C& kv, const std::vector<seq_id>& ids,
              const std::vector<std::size_t>& written) {
  snapshot s{{}, kv.sequences(), kv.memory_in_use(), {}};
  const auto& L = kv.layout();
  std::vector<float> row(L.head_dim);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const seq_id id = ids[i];
    if (!kv.contains(id)) continue;
    s.lengths.push_back(kv.length(id));
    for (std::size_t l = 0; l < L.layers; ++l)
      for (std::size_t t = 0; t < std::min(written[i], kv.length(id)); ++t)
        for (std::size_t kind = 0; kind < 2; ++kind)
          for (std::size_t h = 0; h < L.kv_heads; ++h) {
            kv.read_row(l, id, t, kind, h, row.data());
            s.rows.insert(s.rows.end(), row.begin(), row.end());
          }
  }
  return s;
}

}  // namespace

TEST_CASE("construction rejects impossible sizes", "[errors]") {
  auto make = [](cache_config c) { C kv(c); };
  CHECK_THROWS_WITH(
      make({.layers = 0, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .max_tokens = 10}),
      Contains("layers is 0"));
  CHECK_THROWS_WITH(
      make({.layers = 1, .q_heads = 8, .kv_heads = 3, .head_dim = 64, .max_tokens = 10}),
      Contains("q_heads 8 is not a multiple of kv_heads 3"));
  CHECK_THROWS_WITH(
      make({.layers = 1, .q_heads = 8, .kv_heads = 16, .head_dim = 64, .max_tokens = 10}),
      Contains("kv_heads 16 exceeds q_heads 8"));
  CHECK_THROWS_WITH(
      make({.layers = 1, .q_heads = 0, .kv_heads = 0, .head_dim = 64, .max_tokens = 10}),
      Contains("is 0"));
  CHECK_THROWS_WITH(
      make({.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 0, .max_tokens = 10}),
      Contains("head_dim is 0"));
  CHECK_THROWS_WITH(
      make({.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 72, .max_tokens = 10}),
      Contains("head_dim 72 is not a multiple of 16"));
  CHECK_THROWS_WITH(
      make({.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .max_tokens = 0}),
      Contains("max_tokens is 0"));
  CHECK_THROWS_AS((cache<mha<>, contiguous, full, fp16>(
                      {.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .max_tokens = 8})),
                  kvcache::error);
  CHECK_THROWS_AS((cache<mqa<>, contiguous, full, fp16>(
                      {.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .max_tokens = 8})),
                  kvcache::error);
  CHECK_THROWS_WITH(
      (cache<gqa<128>, contiguous, full, fp16>(
          {.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .max_tokens = 8})),
      Contains("static head_dim 128"));
  CHECK_THROWS_WITH(make({.layers = 1,
                          .q_heads = 8,
                          .kv_heads = 2,
                          .head_dim = 64,
                          .max_tokens = 10,
                          .softmax_scale = -1.f}),
                    Contains("softmax_scale -1"));
  CHECK_THROWS_WITH(make({.layers = 1,
                          .q_heads = 8,
                          .kv_heads = 2,
                          .head_dim = 64,
                          .max_tokens = 10,
                          .softmax_scale = std::numeric_limits<float>::quiet_NaN()}),
                    Contains("softmax_scale"));
}

namespace {
// A user's grouping that returns a KV head count the cache cannot serve.
struct zero_heads {
  using axis = grouping_tag;
  static constexpr std::string_view name = "zero_heads";
  static constexpr std::size_t head_dim = 64;
  static std::size_t kv_heads(std::size_t, std::size_t) { return 0; }
};
static_assert(grouping_policy<zero_heads>);
}  // namespace

TEST_CASE("a custom grouping's KV head count is checked", "[errors]") {
  CHECK_THROWS_WITH((cache<zero_heads, contiguous, full, fp16>(
                        {.layers = 1, .q_heads = 8, .kv_heads = 2, .max_tokens = 8})),
                    Contains("zero_heads gives 0 KV heads"));
}

TEST_CASE("every entry point validates and keeps the strong guarantee", "[errors]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t qh = 4, kvh = 2, d = 32;
  C kv({.layers = 2,
        .q_heads = qh,
        .kv_heads = kvh,
        .head_dim = d,
        .max_tokens = 100,
        .threads = 2});
  auto a = kv.add_sequence(40), b = kv.add_sequence(20);
  // Some history to protect.
  {
    auto st = kv.begin_step({{a, 10}, {b, 3}});
    auto k = kvtest::normal(rng, 13 * kvh * d), v = kvtest::normal(rng, 13 * kvh * d);
    for (std::size_t l = 0; l < 2; ++l)
      kv.write(l, st, make_view<const float>(k.data(), 13, kvh, d),
               make_view<const float>(v.data(), 13, kvh, d));
  }
  const std::vector<seq_id> ids{a, b};
  const snapshot before = take(kv, ids, {10, 3});
  auto unchanged = [&] { CHECK(take(kv, ids, {10, 3}) == before); };

  SECTION("unknown and removed sequences") {
    CHECK_THROWS_WITH(kv.begin_step({{seq_id{999}, 1}}), Contains("sequence 999 is unknown"));
    CHECK_THROWS_WITH(kv.remove_sequence(seq_id{999}), Contains("unknown or was removed"));
    CHECK_THROWS_WITH(kv.length(seq_id{999}), Contains("unknown"));
    unchanged();
    auto c = kv.add_sequence(5);
    kv.remove_sequence(c);
    CHECK_THROWS_WITH(kv.remove_sequence(c), Contains("unknown or was removed"));
    CHECK_THROWS_AS(kv.begin_step({{c, 1}}), kvcache::error);
    unchanged();
  }
  SECTION("appends beyond capacity, of zero tokens, or twice in a step") {
    CHECK_THROWS_WITH(kv.begin_step({{a, 1}, {b, 18}}),
                      Contains("holds 3 tokens; 18 more exceed its capacity of 20"));
    CHECK_THROWS_WITH(kv.begin_step({{a, 0}}), Contains("appends 0 tokens"));
    CHECK_THROWS_WITH(kv.begin_step({{a, 1}, {a, 1}}), Contains("appears twice"));
    CHECK_THROWS_WITH(kv.begin_step(std::span<const append>{}), Contains("at least one"));
    unchanged();
  }
  SECTION("the pool cannot reserve more than max_tokens") {
    CHECK_THROWS_WITH(kv.add_sequence(41),
                      Contains("cannot reserve 41 more tokens: 40 of max_tokens 100 are free"));
    unchanged();
  }
  SECTION("shape and stride mismatches") {
    auto st = kv.begin_step({{a, 2}, {b, 1}});
    const snapshot planned = take(kv, ids, {10, 3});
    auto k = kvtest::normal(rng, 3 * kvh * d), v = k, q = kvtest::normal(rng, 3 * qh * d);
    std::vector<float> out(3 * qh * d), big(3 * qh * d * 2);
    CHECK_THROWS_WITH(kv.write(0, st, make_view<const float>(k.data(), 3, kvh, d),
                               make_view<const float>(v.data(), 2, kvh, d)),
                      Contains("v has extent 2 on axis 0; this step and cache need 3"));
    CHECK_THROWS_WITH(kv.write(0, st, make_view<const float>(k.data(), 3, 1, 2 * d),
                               make_view<const float>(v.data(), 3, kvh, d)),
                      Contains("k has extent 1 on axis 1"));
    CHECK_THROWS_WITH(kv.write(2, st, make_view<const float>(k.data(), 3, kvh, d),
                               make_view<const float>(v.data(), 3, kvh, d)),
                      Contains("layer 2 is out of range"));
    auto strided = tensor_view<const float, 3>{big.data(), {3, qh, d}, {2 * qh * d, 2 * d, 2}};
    CHECK_THROWS_WITH(kv.attend(0, st, strided, make_view(out.data(), 3, qh, d)),
                      Contains("stride 2 on its last axis"));
    CHECK_THROWS_WITH(kv.attend(0, st, make_view<const float>(q.data(), 3, qh, d),
                                make_view(out.data(), 3, qh, d), {.scale = -1.f}),
                      Contains("softmax scale -1"));
    CHECK_THROWS_WITH(
        kv.attend(0, st, make_view<const float>(q.data(), 3, qh, d),
                  make_view(out.data(), 3, qh, d), {.lse = make_view(out.data(), 3, qh + 1)}),
        Contains("lse has extent 5 on axis 1"));
    CHECK(take(kv, ids, {10, 3}) == planned);
    // Row strides other than packed are accepted.
    auto wide = tensor_view<const float, 3>{big.data(), {3, qh, d}, {2 * qh * d, d, 1}};
    kv.write(0, st, make_view<const float>(k.data(), 3, kvh, d),
             make_view<const float>(v.data(), 3, kvh, d));
    CHECK_NOTHROW(kv.attend(0, st, wide, make_view(out.data(), 3, qh, d)));
  }
  SECTION("stale steps and steps of another cache") {
    auto st = kv.begin_step({{a, 1}});
    auto st2 = kv.begin_step({{b, 1}});
    auto k = kvtest::normal(rng, kvh * d);
    const snapshot planned = take(kv, ids, {10, 3});
    CHECK_THROWS_WITH(kv.write(0, st, make_view<const float>(k.data(), 1, kvh, d),
                               make_view<const float>(k.data(), 1, kvh, d)),
                      Contains("stale"));
    C other({.layers = 2, .q_heads = qh, .kv_heads = kvh, .head_dim = d, .max_tokens = 10});
    CHECK_THROWS_WITH(other.write(0, st2, make_view<const float>(k.data(), 1, kvh, d),
                                  make_view<const float>(k.data(), 1, kvh, d)),
                      Contains("another cache"));
    CHECK(take(kv, ids, {10, 3}) == planned);
  }
}
