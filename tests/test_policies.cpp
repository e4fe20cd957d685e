// The policy concepts accept the built-in policies, reject malformed ones, and
// dispatch covers every entry of the compiled head_dim table.
#include <kvcache/detail/dispatch.hpp>

#include "support.hpp"

using namespace kvcache;

namespace {
struct not_a_policy {};
struct wrong_tag {
  using axis = storage_tag;
  static constexpr std::string_view name = "wrong";
  static constexpr std::size_t head_dim = 64;
  static std::size_t kv_heads(std::size_t, std::size_t) { return 1; }
};
struct precision_without_decode {
  using axis = precision_tag;
  static constexpr std::string_view name = "half-done";
  static constexpr std::size_t row_bytes(std::size_t d) { return d; }
  static void check_dim(std::size_t) {}
  static void encode(const float*, std::byte*, std::size_t) {}
  static constexpr double tolerance = 0;
};
//! Has a storage policy's constants, but its state lacks what the cache calls.
struct storage_without_members {
  using axis = storage_tag;
  static constexpr std::string_view name = "constants only";
  static constexpr std::size_t page_tokens = 16;
  static constexpr bool supports_eviction = false;
  template <class B>
  struct state {
    struct region {};
    state(const kv_layout&, const storage_config&) {}
    region create(std::size_t) { return {}; }
  };
};
}  // namespace

TEST_CASE("concepts accept the built-in policies and reject others", "[policies]") {
  STATIC_REQUIRE(grouping_policy<gqa<128>>);
  STATIC_REQUIRE(grouping_policy<mqa<>>);
  STATIC_REQUIRE(precision_policy<fp16>);
  STATIC_REQUIRE(eviction_policy<full>);
  STATIC_REQUIRE(storage_policy<contiguous>);
  STATIC_REQUIRE(storage_policy<paged<16>>);
  STATIC_REQUIRE(storage_policy<paged<>>);
  STATIC_REQUIRE(sharing_storage<paged<64>>);
  STATIC_REQUIRE_FALSE(sharing_storage<contiguous>);
  STATIC_REQUIRE_FALSE(storage_policy<storage_without_members>);
  STATIC_REQUIRE(backend_policy<cpu>);
  STATIC_REQUIRE_FALSE(grouping_policy<not_a_policy>);
  STATIC_REQUIRE_FALSE(grouping_policy<wrong_tag>);
  STATIC_REQUIRE_FALSE(precision_policy<precision_without_decode>);
  STATIC_REQUIRE_FALSE(eviction_policy<fp16>);
  STATIC_REQUIRE_FALSE(storage_policy<full>);
}

TEST_CASE("head_dim dispatch visits every compiled entry and falls back to runtime", "[policies]") {
  for (std::size_t d : compiled_head_dims) {
    std::size_t got = 1;
    detail::dispatch_head_dim<dynamic>(d, [&](auto c) { got = decltype(c)::value; });
    CHECK(got == d);
    // Each entry also runs end to end.
    cache<gqa<>, contiguous, full, fp32> kv(
        {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = d, .max_tokens = 4, .threads = 1});
    auto s = kv.add_sequence();
    auto st = kv.begin_step({{s, 2}});
    std::vector<float> k(2 * d, 0.5f), q(4 * d, 0.25f), out(4 * d);
    kv.write(0, st, make_view<const float>(k.data(), 2, 1, d),
             make_view<const float>(k.data(), 2, 1, d));
    kv.attend(0, st, make_view<const float>(q.data(), 2, 2, d), make_view(out.data(), 2, 2, d));
    CHECK(out[0] == Approx(0.5f));
  }
  std::size_t got = 1;
  detail::dispatch_head_dim<dynamic>(96, [&](auto c) { got = decltype(c)::value; });
  CHECK(got == 0);
  detail::dispatch_head_dim<128>(128, [&](auto c) { got = decltype(c)::value; });
  CHECK(got == 128);
  detail::dispatch_head_dim<80>(80, [&](auto c) { got = decltype(c)::value; });
  CHECK(got == 0);
}
