// Per-channel keys with an fp16 residual (per_channel_k, KIVI): golden bytes,
// history that never changes, the fused decode and the prefill against
// float64 attention over the cache's own decoded rows, chunked against
// one-shot prefill, every page size, fork / reorder / truncate / prefix reuse,
// memory and bad input. Windows and sinks: test_eviction.cpp.
#include <cstring>

#include "quant_support.hpp"

using namespace kvcache;
using Catch::Matchers::Contains;

namespace {

using kc4 = per_channel_k<int4_kv<true>>;     // 5 bits, groups of 32, residual 32
using kc2 = per_channel_k<int2_kv, 32, 128>;  // 3 bits, groups of 32, residual 128

//! A group of 32 tokens x 32 channels: every channel over tokens is
//! test_quant_formats.cpp's golden block ((t - 16) / 4, plus 0.1 on every fifth).
std::vector<float> golden_group() {
  std::vector<float> x(32 * 32);
  for (int t = 0; t < 32; ++t)
    for (int c = 0; c < 32; ++c)
      x[t * 32 + c] = detail::fp16_round((t - 16) * 0.25f + (t % 5 == 0 ? 0.1f : 0.f));
  return x;
}

template <class KF>
std::vector<std::vector<std::byte>> encode_golden() {
  auto x = golden_group();
  std::vector<std::vector<std::byte>> rows(32, std::vector<std::byte>(KF::row_bytes(32)));
  std::byte* ptr[32];
  for (int t = 0; t < 32; ++t) ptr[t] = rows[t].data();
  KF::encode_group(x.data(), ptr, 32);
  return rows;
}

unsigned byte_at(const std::vector<std::byte>& r, std::size_t i) {
  return static_cast<unsigned>(r[i]);
}

//! Raw bytes of the K rows of tokens [0, n) of (layer 0, kv_head h) of a
//! full (unevicted) sequence, in token order.
template <class Cache>
std::vector<std::byte> key_bytes(const Cache& kv, seq_id s, std::size_t n, std::size_t h) {
  const auto& L = kv.layout();
  auto pages = kv.page_table(s);
  std::vector<std::byte> out;
  std::size_t page_tokens = 0;
  if constexpr (std::is_same_v<typename Cache::storage, contiguous>)
    page_tokens = kv.capacity(s);
  else
    page_tokens = kv.store().page_tokens();
  for (std::size_t t = 0; t < n; ++t) {
    const std::byte* row = pages[t / page_tokens] + L.run_offset(page_tokens, 0, 0, h) +
                           (t % page_tokens) * L.row_bytes;
    out.insert(out.end(), row, row + L.row_bytes);
  }
  return out;
}

//! Output of one attend over a sequence's whole cache for fixed queries.
template <class Cache>
std::vector<float> attend_once(Cache& kv, seq_id s, std::size_t n, const std::vector<float>& k,
                               const std::vector<float>& v, const std::vector<float>& q) {
  const auto& L = kv.layout();
  auto st = kv.begin_step({{s, n}});
  std::vector<float> out = kvtest::poisoned(n * L.q_heads * L.head_dim);
  kv.write(0, st, make_view<const float>(k.data(), n, L.kv_heads, L.head_dim),
           make_view<const float>(v.data(), n, L.kv_heads, L.head_dim));
  kv.attend(0, st, make_view<const float>(q.data(), n, L.q_heads, L.head_dim),
            make_view(out.data(), n, L.q_heads, L.head_dim));
  return out;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += double(a[i] - b[i]) * (a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("per-channel keys: golden bytes of a group", "[quant][kchan]") {
  // Each channel of the golden group holds block.hpp's golden block along
  // tokens, so its codes, scale and min are those the per-token asymmetric
  // formats store for that block (test_quant_formats.cpp): int4 scale
  // 0x3815, min 0xc3cd; int2 scale 0x411a, min 0xc3cd.
  using F4 = kc4::key_format;
  const auto r4 = encode_golden<F4>();
  REQUIRE(F4::row_bytes(32) == 16 + 4);
  // Row r holds channel r's (scale, min): dim / G = 1 pair per row.
  for (int r = 0; r < 32; ++r) {
    INFO("row " << r);
    CHECK(byte_at(r4[r], 16) == 0x15);
    CHECK(byte_at(r4[r], 17) == 0x38);
    CHECK(byte_at(r4[r], 18) == 0xcd);
    CHECK(byte_at(r4[r], 19) == 0xc3);
  }
  // Codes of channel 0 over tokens: q4_1's golden codes (byte j = code j | code j+16 << 4).
  const unsigned q41[16] = {0x80, 0x80, 0x91, 0x91, 0xa2, 0xa2, 0xb3, 0xb3,
                            0xc4, 0xc4, 0xd5, 0xd5, 0xe6, 0xe6, 0xf7, 0xf7};
  for (int t = 0; t < 32; ++t) {
    const unsigned want = t < 16 ? q41[t] & 15u : q41[t - 16] >> 4;
    INFO("token " << t);
    // Every channel of token t has the same code; channel 0 is byte 0's low nibble.
    CHECK((byte_at(r4[t], 0) & 15u) == want);
    CHECK(byte_at(r4[t], 0) == (want | want << 4));
  }
  using F2 = kc2::key_format;
  const auto r2 = encode_golden<F2>();
  REQUIRE(F2::row_bytes(32) == 8 + 4);
  CHECK(byte_at(r2[0], 8) == 0x1a);
  CHECK(byte_at(r2[0], 9) == 0x41);
  CHECK(byte_at(r2[0], 10) == 0xcd);
  CHECK(byte_at(r2[0], 11) == 0xc3);
  // int2 golden bytes: byte j = codes j, j+8, j+16, j+24 of the block.
  const unsigned q2[8] = {0xa4, 0xa4, 0xe4, 0xe4, 0xe4, 0xe4, 0xe5, 0xe5};
  for (int t = 0; t < 32; ++t) {
    const unsigned want = (q2[t % 8] >> (2 * (t / 8))) & 3u;
    CHECK(byte_at(r2[t], 0) == want * 0x55u);
  }
  // Decoding returns scale x code + min per channel.
  std::vector<float> out(32);
  const std::byte* rows[32];
  for (int t = 0; t < 32; ++t) rows[t] = r4[t].data();
  F4::decode_token(rows[31], rows, 32, out.data());
  CHECK(out[5] == Approx(3.75).margin(0.26));
}

TEST_CASE("per-channel keys: constant and zero groups, bytes per element", "[quant][kchan]") {
  using F = kc4::key_format;
  for (float c : {0.f, -2.5f, 3e4f}) {
    std::vector<float> x(32 * 64, detail::fp16_round(c));
    std::vector<std::vector<std::byte>> rows(32, std::vector<std::byte>(F::row_bytes(64)));
    std::byte* ptr[32];
    const std::byte* cptr[32];
    for (int t = 0; t < 32; ++t) ptr[t] = rows[t].data(), cptr[t] = rows[t].data();
    F::encode_group(x.data(), ptr, 64);
    std::vector<float> y(64, 1.f);
    for (int t = 0; t < 32; ++t) {
      F::decode_token(cptr[t], cptr, 64, y.data());
      for (float v : y) CHECK(v == detail::fp16_round(c));
    }
  }
  // Row bytes: int4 keys (64 + 16 at head_dim 128) equal int4_kv<true>'s 80;
  // int2 keys (32 + 16) equal int2_kv's 48.
  CHECK(kc4::row_bytes(128) == 80);
  CHECK(kc2::row_bytes(128) == 48);
  CHECK(kc4::name == "int4_asym_kchan");
  CHECK(kc2::name == "int2_kchan_r128");
}

//! Prefill and decode of two sequences against float64 over the cache's own
//! rows, q_heads / kv_heads query heads per KV head.
template <class P, class Heads>
void check_own(std::size_t q_heads, std::size_t kv_heads, std::size_t dim) {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  kvtest::dequant_driver<cache<Heads, contiguous, full, P>> d(q_heads, kv_heads, dim, 2048, seed);
  auto a = d.add(1024), b = d.add(1024);
  // Prefill chunks that end inside and on residual boundaries, then decodes
  // that cross several flushes, two sequences with different phases.
  // Prefill is fp32 throughout (1e-4); decode states its own bound.
  const double bound = detail::kchan_error_bound<P>();
  CHECK(d.run({{a, 45}, {b, 128}}) <= 1e-4);
  CHECK(d.run({{a, 83}, {b, 3}}) <= 1e-4);
  for (int i = 0; i < 140; ++i) CHECK(d.run({{a, 1}, {b, 1}}) <= bound);
  CHECK(d.run({{a, 200}, {b, 1}}) <= bound);
  // The format's error over the whole run (one decode step's few outputs
  // scatter too widely to hold each to it).
  CHECK(d.orig.error() <= P::tolerance);
}

TEMPLATE_TEST_CASE("per-channel keys: decode and prefill equal float64 over the cache's own rows",
                   "[quant][kchan]", kc4, kc2, per_channel_k<int4_kv<>>) {
  // With AMX, group 4 and 8 at head_dim 128 and 256 decode on the tile unit;
  // group 2 and head_dim 64 on the VNNI and float paths.
  SECTION("head_dim 128, group 4") { check_own<TestType, gqa<128>>(8, 2, 128); }
  SECTION("dynamic head_dim 256, group 8") { check_own<TestType, gqa<>>(16, 2, 256); }
  SECTION("dynamic head_dim 64, group 2") { check_own<TestType, gqa<>>(4, 2, 64); }
}

TEMPLATE_TEST_CASE("per-channel keys without the tile unit", "[quant][kchan]", kc4, kc2) {
  struct refuse {
    refuse() { detail::amx::allowed() = false; }
    ~refuse() { detail::amx::allowed() = true; }
  } guard;
  CHECK_FALSE(detail::amx::available());
  check_own<TestType, gqa<128>>(8, 2, 128);
}

TEST_CASE("per-channel keys: flushed groups never change; chunked equals one-shot",
          "[quant][kchan]") {
  using C = cache<gqa<128>, contiguous, full, kc2>;
  const cache_config cfg{
      .layers = 1, .q_heads = 4, .kv_heads = 2, .max_tokens = 2048, .threads = 2};
  C one(cfg), chunked(cfg);
  std::mt19937_64 rng(kvtest::test_seed());
  const std::size_t n = 700;
  auto k = kvtest::normal(rng, n * 2 * 128), v = kvtest::normal(rng, n * 2 * 128);
  auto s1 = one.add_sequence(1024), s2 = chunked.add_sequence(1024);
  {
    auto st = one.begin_step({{s1, n}});
    one.write(0, st, make_view<const float>(k.data(), n, 2, 128),
              make_view<const float>(v.data(), n, 2, 128));
  }
  std::vector<std::byte> before;
  std::size_t done = 0;
  for (std::size_t step : {7u, 121u, 1u, 1u, 128u, 300u, 142u}) {
    auto st = chunked.begin_step({{s2, step}});
    chunked.write(0, st, make_view<const float>(k.data() + done * 256, step, 2, 128),
                  make_view<const float>(v.data() + done * 256, step, 2, 128));
    // Rows quantized by earlier steps keep their bytes.
    const std::size_t flushed_before = done / 128 * 128;
    auto now = key_bytes(chunked, s2, flushed_before, 1);
    CHECK(std::memcmp(now.data(), before.data(), before.size()) == 0);
    before = key_bytes(chunked, s2, (done + step) / 128 * 128, 1);
    done += step;
  }
  REQUIRE(done == n);
  // Same bytes as the one-shot prefill, and the same decoded keys.
  for (std::size_t h = 0; h < 2; ++h)
    CHECK(key_bytes(one, s1, n / 128 * 128, h) == key_bytes(chunked, s2, n / 128 * 128, h));
  std::vector<float> x(128), y(128);
  for (std::size_t t = 0; t < n; t += 7) {
    one.read_row(0, s1, t, 0, 1, x.data());
    chunked.read_row(0, s2, t, 0, 1, y.data());
    CHECK(x == y);
  }
  // And the same attention afterwards.
  auto q = kvtest::normal(rng, 3 * 4 * 128), k3 = kvtest::normal(rng, 3 * 256),
       v3 = kvtest::normal(rng, 3 * 256);
  CHECK(rel(attend_once(one, s1, 3, k3, v3, q), attend_once(chunked, s2, 3, k3, v3, q)) <= 1e-6);
}

TEMPLATE_TEST_CASE("per-channel keys on paged storage of every page size", "[quant][kchan][paged]",
                   paged<>) {
  const auto seed = kvtest::test_seed();
  for (std::size_t pt : {1u, 16u, 64u, 256u}) {
    INFO("page_tokens " << pt);
    const cache_config base{
        .layers = 1, .q_heads = 8, .kv_heads = 2, .max_tokens = 4096, .threads = 2};
    cache_config pc = base;
    pc.page_tokens = pt;
    cache<gqa<128>, contiguous, full, kc4> ref(base);
    cache<gqa<128>, TestType, full, kc4> kv(pc);
    auto r = ref.add_sequence(1024), s = kv.add_sequence(1024);
    std::mt19937_64 rng(seed + pt);
    // Same bytes, different tiles: fp32 rounding alone (1e-5), or, with
    // integer P.V, two roundings of the int16 weights within the kernel's bound.
    const double tol =
        detail::kchan_error_bound<kc4>() > 1e-4 ? 2 * detail::kchan_error_bound<kc4>() : 1e-5;
    for (std::size_t step : {50u, 1u, 13u, 1u, 64u, 1u, 1u, 100u}) {
      auto k = kvtest::normal(rng, step * 256), v = kvtest::normal(rng, step * 256),
           q = kvtest::normal(rng, step * 8 * 128);
      CHECK(rel(attend_once(kv, s, step, k, v, q), attend_once(ref, r, step, k, v, q)) <= tol);
    }
    // Bytes of quantized keys equal the contiguous cache's.
    std::vector<float> x(128), y(128);
    for (std::size_t t = 0; t < kv.length(s); ++t) {
      ref.read_row(0, r, t, 0, 0, x.data());
      kv.read_row(0, s, t, 0, 0, y.data());
      REQUIRE(x == y);
    }
  }
}

TEST_CASE("per-channel keys: fork copies the residual; a flush copies shared pages first",
          "[quant][kchan][paged]") {
  using C = cache<gqa<128>, paged<16>, full, kc4>;
  const cache_config cfg{.layers = 2,
                         .q_heads = 4,
                         .kv_heads = 2,
                         .max_tokens = 4096,
                         .threads = 2,
                         .cascade_min_tokens = 0};
  C kv(cfg), solo(cfg);
  std::mt19937_64 rng(kvtest::test_seed());
  auto data = [&](std::size_t n) {
    return std::array<std::vector<float>, 3>{kvtest::normal(rng, n * 256),
                                             kvtest::normal(rng, n * 256),
                                             kvtest::normal(rng, n * 4 * 128)};
  };
  auto step = [](C& c, seq_id s, std::size_t n, const std::array<std::vector<float>, 3>& x) {
    auto st = c.begin_step({{s, n}});
    std::vector<float> out(n * 4 * 128);
    for (std::size_t l = 0; l < 2; ++l) {
      c.write(l, st, make_view<const float>(x[0].data(), n, 2, 128),
              make_view<const float>(x[1].data(), n, 2, 128));
      c.attend(l, st, make_view<const float>(x[2].data(), n, 4, 128),
               make_view(out.data(), n, 4, 128));
    }
    return out;
  };
  auto p = kv.add_sequence(), sp = solo.add_sequence();
  auto x0 = data(20);
  step(kv, p, 20, x0);
  step(solo, sp, 20, x0);
  const std::size_t before = kv.memory_in_use();
  auto c = kv.fork(p);
  // One more residual (layers x kv_heads x 32 x 128 x 2 bytes), no pages.
  CHECK(kv.memory_in_use() == before + 2 * 2 * 32 * 128 * 2);
  // The child completes the group (positions 0..31: its flush writes rows of
  // the two shared pages); then the parent does, with other keys.
  auto xc = data(12), xp = data(12);
  step(kv, c, 12, xc);
  auto got = step(kv, p, 12, xp);
  auto want = step(solo, sp, 12, xp);
  CHECK(rel(got, want) <= 1e-6);
  std::vector<float> a(128), b(128);
  for (std::size_t t = 0; t < 32; ++t) {
    kv.read_row(1, p, t, 0, 1, a.data());
    solo.read_row(1, sp, t, 0, 1, b.data());
    REQUIRE(a == b);
  }
  // reorder: beams [p, c] <- [c, c]: p now equals the child, residual included.
  auto x1 = data(5);
  const std::size_t from[] = {1, 1};
  const seq_id beams[] = {p, c};
  kv.reorder(beams, from);
  auto o1 = step(kv, p, 5, x1);
  auto o2 = step(kv, c, 5, x1);
  CHECK(rel(o1, o2) <= 1e-6);
}

TEST_CASE("per-channel keys: truncate keeps quantized groups; into one is an error",
          "[quant][kchan]") {
  using C = cache<gqa<128>, contiguous, full, kc2>;
  C kv({.layers = 1, .q_heads = 4, .kv_heads = 2, .max_tokens = 2048, .threads = 1});
  std::mt19937_64 rng(kvtest::test_seed());
  auto s = kv.add_sequence(1024);
  auto k = kvtest::normal(rng, 300 * 256), v = kvtest::normal(rng, 300 * 256);
  auto st = kv.begin_step({{s, 300}});
  kv.write(0, st, make_view<const float>(k.data(), 300, 2, 128),
           make_view<const float>(v.data(), 300, 2, 128));
  // 256 keys quantized, 44 in the residual.
  CHECK_THROWS_WITH(kv.truncate(s, 200),
                    Contains("quantized the keys of positions below 256 in groups of 128"));
  CHECK(kv.length(s) == 300);
  std::vector<float> a(128), b(128);
  kv.read_row(0, s, 250, 0, 0, a.data());
  kv.truncate(s, 280);  // inside the residual
  CHECK(kv.length(s) == 280);
  kv.truncate(s, 128);  // a whole residual length: an empty residual
  kv.read_row(0, s, 100, 0, 0, b.data());
  CHECK(std::isfinite(b[0]));
  // Appending again refills the residual from position 128.
  auto st2 = kv.begin_step({{s, 130}});
  kv.write(0, st2, make_view<const float>(k.data() + 128 * 256, 130, 2, 128),
           make_view<const float>(v.data() + 128 * 256, 130, 2, 128));
  kv.read_row(0, s, 250, 0, 0, b.data());
  CHECK(a == b);  // the same keys quantized in the same group
}

TEST_CASE("per-channel keys: prefix reuse matches whole residual lengths",
          "[quant][kchan][paged]") {
  using C = cache<gqa<128>, paged<16>, full, kc4>;
  C kv({.layers = 1, .q_heads = 4, .kv_heads = 2, .max_tokens = 4096, .threads = 1});
  std::mt19937_64 rng(kvtest::test_seed());
  std::vector<token_id> ids(200);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<token_id>(i * 7 + 1);
  auto s = kv.add_sequence();
  auto k = kvtest::normal(rng, 90 * 256), v = kvtest::normal(rng, 90 * 256);
  {
    auto st = kv.begin_step({{s, 90, std::span<const token_id>(ids.data(), 90)}});
    kv.write(0, st, make_view<const float>(k.data(), 90, 2, 128),
             make_view<const float>(v.data(), 90, 2, 128));
  }
  // 64 keys quantized (two groups): only their 4 pages are published.
  auto m = kv.match_prefix(ids);
  CHECK(m.tokens == 64);
  std::vector<float> a(128), b(128);
  for (std::size_t t = 0; t < 64; ++t) {
    kv.read_row(0, s, t, 0, 1, a.data());
    kv.read_row(0, m.seq, t, 0, 1, b.data());
    REQUIRE(a == b);
  }
}

TEST_CASE("per-channel keys: bad input", "[quant][kchan][errors]") {
  // head_dim 96 is whole int4 blocks but not a multiple of a 64-token group.
  using C64 = cache<gqa<dynamic>, contiguous, full, per_channel_k<int4_kv<true>, 64>>;
  CHECK_THROWS_WITH(
      C64({.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 96, .max_tokens = 64}),
      Contains("head_dim 96 is not a multiple of the key group of 64 tokens"));
  // NaN rejected before anything is stored.
  using C = cache<gqa<128>, contiguous, full, kc4>;
  C kv({.layers = 1, .q_heads = 2, .kv_heads = 1, .max_tokens = 256, .threads = 1});
  auto s = kv.add_sequence(256);
  std::vector<float> k(40 * 128, 0.5f), v(40 * 128, 0.5f);
  k[35 * 128 + 3] = std::numeric_limits<float>::quiet_NaN();
  auto st = kv.begin_step({{s, 40}});
  CHECK_THROWS_WITH(kv.write(0, st, make_view<const float>(k.data(), 40, 1, 128),
                             make_view<const float>(v.data(), 40, 1, 128)),
                    Contains("K of sequence 1, layer 0, token 35 (kv_head 0, element 3) is nan"));
  // Windows and sinks must keep groups and the residual whole.
  using W = cache<gqa<128>, contiguous, attention_sinks<>, kc2>;
  CHECK_THROWS_WITH(
      W({.layers = 1, .q_heads = 2, .kv_heads = 1, .max_tokens = 1024, .sinks = 4, .window = 256}),
      Contains("sinks 4 is not a multiple of per_channel_k's key group of 32"));
  CHECK_THROWS_WITH(
      W({.layers = 1, .q_heads = 2, .kv_heads = 1, .max_tokens = 1024, .sinks = 32, .window = 96}),
      Contains("window 96 is not a multiple of per_channel_k's residual of 128"));
}

TEST_CASE("per-channel keys: memory_in_use counts the residuals exactly",
          "[quant][kchan][memory]") {
  const kv_shape shape{.layers = 2, .kv_heads = 2, .head_dim = 128};
  cache<gqa<128>, paged<16>, full, kc2> kv(
      {.layers = 2, .q_heads = 4, .kv_heads = 2, .max_tokens = 4096, .threads = 1});
  auto a = kv.add_sequence(), b = kv.add_sequence();
  CHECK(kv.memory_in_use() == paged_kv_bytes<kc2>(shape, 2, 0, 16));
  CHECK(paged_kv_bytes<kc2>(shape, 2, 0, 16) == 2 * 2 * 2 * 128 * 128 * 2);
  std::mt19937_64 rng(1);
  auto k = kvtest::normal(rng, 100 * 256), v = kvtest::normal(rng, 100 * 256);
  auto st = kv.begin_step({{a, 100}, {b, 100}});
  std::vector<float> kk(200 * 256), vv(200 * 256);
  std::copy(k.begin(), k.end(), kk.begin());
  std::copy(k.begin(), k.end(), kk.begin() + 100 * 256);
  std::copy(v.begin(), v.end(), vv.begin());
  std::copy(v.begin(), v.end(), vv.begin() + 100 * 256);
  for (std::size_t l = 0; l < 2; ++l)
    kv.write(l, st, make_view<const float>(kk.data(), 200, 2, 128),
             make_view<const float>(vv.data(), 200, 2, 128));
  CHECK(kv.memory_in_use() == paged_kv_bytes<kc2>(shape, 2, 100, 16));
  cache<gqa<128>, contiguous, full, kc4> c(
      {.layers = 2, .q_heads = 4, .kv_heads = 2, .max_tokens = 4096, .threads = 1});
  c.add_sequence(1000);
  CHECK(c.memory_in_use() == contiguous_sequence_bytes<kc4>(shape, 1000));
  CHECK(c.memory_in_use() == 1000 * 2 * 2 * 2 * 80 + 2 * 2 * 32 * 128 * 2);
}
