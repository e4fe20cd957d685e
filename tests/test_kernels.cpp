// Properties of the kernels beyond agreement with the reference: decode equals
// a one-token prefill, chunked prefill equals one-shot prefill, 1 and 2
// threads give identical bits, and the log-sum-exp merge is exact.
#include <array>
#include <cstring>
#include <kvcache/kernels/merge.hpp>
#include <kvcache/merge.hpp>
#include <set>

#include "support.hpp"

using namespace kvcache;

namespace {

struct inputs {
  std::vector<float> q, k, v;
};

inputs make_inputs(std::mt19937_64& rng, std::size_t n, std::size_t qh, std::size_t kvh,
                   std::size_t d) {
  return {kvtest::normal(rng, n * qh * d), kvtest::normal(rng, n * kvh * d),
          kvtest::normal(rng, n * kvh * d)};
}

// Runs `chunks` steps on a fresh single-sequence cache and returns every row's output.
template <class Cache>
std::vector<float> run_chunks(const inputs& in, const std::vector<std::size_t>& chunks,
                              std::size_t qh, std::size_t kvh, std::size_t d, std::size_t threads) {
  Cache kv({.layers = 1,
            .q_heads = qh,
            .kv_heads = kvh,
            .head_dim = d,
            .max_tokens = 8192,
            .threads = threads});
  auto s = kv.add_sequence();
  std::size_t total = 0;
  for (auto c : chunks) total += c;
  std::vector<float> out = kvtest::poisoned(total * qh * d);
  std::size_t row = 0;
  for (auto c : chunks) {
    auto st = kv.begin_step({{s, c}});
    kv.write(0, st, make_view<const float>(in.k.data() + row * kvh * d, c, kvh, d),
             make_view<const float>(in.v.data() + row * kvh * d, c, kvh, d));
    kv.attend(0, st, make_view<const float>(in.q.data() + row * qh * d, c, qh, d),
              make_view(out.data() + row * qh * d, c, qh, d));
    row += c;
  }
  return out;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<double> bd(b.begin(), b.end());
  return kvtest::rel_l2(a, bd);
}

}  // namespace

TEMPLATE_TEST_CASE("decode equals a one-token prefill, chunked equals one-shot", "[kernels]", fp32,
                   fp16, bf16) {
  using C = cache<gqa<>, contiguous, full, TestType>;
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t qh = 8, kvh = 2, d = 128, n = 700;
  const auto in = make_inputs(rng, n, qh, kvh, d);
  const auto one_shot = run_chunks<C>(in, {n}, qh, kvh, d, 2);
  // Decode: a prompt of n - 5 then five single tokens.
  const auto decoded = run_chunks<C>(in, {n - 5, 1, 1, 1, 1, 1}, qh, kvh, d, 2);
  // Chunked prefill with chunks that straddle KV tiles.
  const auto chunked = run_chunks<C>(in, {100, 37, 263, 300}, qh, kvh, d, 2);
  // The same math in another order: fp32 rounding only, for every precision
  // (the stored rows are identical).
  CHECK(rel(decoded, one_shot) < 1e-5);
  CHECK(rel(chunked, one_shot) < 1e-5);
}

// Where the build and the CPU have AMX-BF16, fp16 and bf16 prefill run their
// tile products on the tile unit (amx_bf16.hpp); the FMA loops otherwise.
// The two agree to fp32 rounding, causal and windowed, over rows that take
// either path (a 64-row item and a 1-token tail's 16).
TEMPLATE_TEST_CASE("prefill on the tile unit equals the FMA kernel", "[kernels][amx]", fp16, bf16) {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t qh = 8, kvh = 2, d = 128, n = 700;
  const auto in = make_inputs(rng, n, qh, kvh, d);
  const std::vector<std::size_t> chunks{300, 1, 200};
  using C = cache<gqa<>, contiguous, full, TestType>;
  using W = cache<gqa<>, paged<16>, sliding_window<256>, TestType>;
  const auto tiles = run_chunks<C>(in, chunks, qh, kvh, d, 2);
  const auto tiles_w = run_chunks<W>(in, chunks, qh, kvh, d, 2);
  struct refuse {
    refuse() { detail::amx::allowed() = false; }
    ~refuse() { detail::amx::allowed() = true; }
  } guard;
  CHECK_FALSE(detail::amx_bf16::usable(64, d));
  CHECK(rel(tiles, run_chunks<C>(in, chunks, qh, kvh, d, 2)) < 1e-5);
  CHECK(rel(tiles_w, run_chunks<W>(in, chunks, qh, kvh, d, 2)) < 1e-5);
}

TEST_CASE("a build for AMX-BF16 runs prefill on the tile unit", "[kernels][amx]") {
  if (KVCACHE_HAS_AMX_BF16) CHECK(detail::amx_bf16::usable(64, 128));
  CHECK_FALSE(detail::amx_bf16::usable(48, 128));  // rows in pairs of 16
}

TEST_CASE("a tile's prefetches request every line once, each run's first lines first",
          "[kernels][prefetch]") {
  // Addresses only: pop() names the lines without requesting them.
  constexpr std::size_t R = detail::prefetch_cursor::max_runs;
  std::vector<char> buf(2 * R * 100 * 64);
  const auto k = [&](std::size_t r) { return buf.data() + r * 100 * 64; };
  const auto v = [&](std::size_t r) { return buf.data() + (R + r) * 100 * 64; };
  using runs = std::array<std::size_t, R>;
  for (const runs& n : std::vector<runs>{{64, 64},
                                         {64},
                                         {64, 10},
                                         {10, 64},
                                         {1, 1},
                                         {3},
                                         {},
                                         {16, 16, 16, 16},
                                         {17, 17, 17, 9},
                                         {1, 1, 1, 1},
                                         {5, 40, 2, 9},
                                         {30, 0, 0, 0}}) {
    INFO("runs of " << n[0] << ", " << n[1] << ", " << n[2] << " and " << n[3] << " lines");
    detail::prefetch_cursor c;
    for (std::size_t r = 0; r < R; ++r) c.k[r] = k(r), c.v[r] = v(r), c.lines[r] = n[r];
    std::multiset<const char*> want, got;
    for (std::size_t r = 0; r < R; ++r)
      for (std::size_t j = 0; j < n[r]; ++j) want.insert({k(r) + j * 64, v(r) + j * 64});
    std::vector<const char*> order;
    for (std::size_t i = 0; i < 2 * c.total(); ++i) order.push_back(c.pop());
    got.insert(order.begin(), order.end());
    CHECK(got == want);
    // Each run's first pair before any run's second, in run order.
    std::size_t i = 0;
    for (std::size_t r = 0; r < R; ++r) {
      if (n[r] == 0) continue;
      CHECK(order[i++] == k(r));
      CHECK(order[i++] == v(r));
    }
  }
}

TEST_CASE("1 and 2 threads give identical results", "[kernels][threads]") {
  using C = cache<gqa<>, contiguous, full, fp16>;
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t qh = 8, kvh = 2, d = 64, n = 3000;
  const auto in = make_inputs(rng, n, qh, kvh, d);
  for (const std::vector<std::size_t>& chunks :
       {std::vector<std::size_t>{n}, std::vector<std::size_t>{n - 2, 1, 1}}) {
    const auto a = run_chunks<C>(in, chunks, qh, kvh, d, 1);
    const auto b = run_chunks<C>(in, chunks, qh, kvh, d, 2);
    REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("log-sum-exp merge of two halves equals attention over the whole", "[kernels][merge]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t n = 300, d = 32;
  auto s = kvtest::normal(rng, n, 3.f);
  auto v = kvtest::normal(rng, n * d);
  auto attend = [&](std::size_t b, std::size_t e, std::vector<float>& o, float& lse) {
    double m = -INFINITY, sum = 0;
    for (std::size_t i = b; i < e; ++i) m = std::max<double>(m, s[i]);
    std::vector<double> acc(d, 0);
    for (std::size_t i = b; i < e; ++i) {
      const double w = std::exp(s[i] - m);
      sum += w;
      for (std::size_t j = 0; j < d; ++j) acc[j] += w * v[i * d + j];
    }
    o.resize(d);
    for (std::size_t j = 0; j < d; ++j) o[j] = float(acc[j] / sum);
    lse = float(m + std::log(sum));
  };
  std::vector<float> whole, a, b;
  float lw, la, lb;
  attend(0, n, whole, lw);
  attend(0, 111, a, la);
  attend(111, n, b, lb);
  detail::merge_partial(a.data(), la, b.data(), lb, d);
  CHECK(rel(a, whole) < 1e-6);
  CHECK(std::fabs(la - lw) < 1e-5);
  // An empty part (lse = -inf) changes nothing, on either side.
  std::vector<float> e(d, 0.f), copy = whole;
  float le = -INFINITY, lc = lw;
  detail::merge_partial(copy.data(), lc, e.data(), le, d);
  CHECK(copy == whole);
  detail::merge_partial(e.data(), le, whole.data(), lw, d);
  CHECK(e == whole);
}

TEST_CASE("merge_attention joins two caches holding halves of a context", "[kernels][merge]") {
  // Tokens [0, n1) live in one cache and [n1, n) in another. The last query
  // row of each one-shot prefill attends its whole cache, so with the same
  // query in both, their merge is that query's attention over all n tokens.
  using C = cache<gqa<>, contiguous, full, fp32>;
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::size_t qh = 8, kvh = 2, d = 64, n1 = 700, n = 1200;
  const inputs in = make_inputs(rng, n, qh, kvh, d);
  const float* q_last = in.q.data() + (n - 1) * qh * d;
  // Runs rows [b, e) as one prefill whose last row's query is q_last.
  auto last_row = [&](std::size_t b, std::size_t e, std::vector<float>& o,
                      std::vector<float>& lse) {
    C kv({.layers = 1, .q_heads = qh, .kv_heads = kvh, .head_dim = d, .max_tokens = n});
    const std::size_t c = e - b;
    std::vector<float> q(in.q.begin() + b * qh * d, in.q.begin() + e * qh * d);
    std::copy(q_last, q_last + qh * d, q.end() - qh * d);
    std::vector<float> out = kvtest::poisoned(c * qh * d), l = kvtest::poisoned(c * qh);
    auto st = kv.begin_step({{kv.add_sequence(), c}});
    kv.write(0, st, make_view<const float>(in.k.data() + b * kvh * d, c, kvh, d),
             make_view<const float>(in.v.data() + b * kvh * d, c, kvh, d));
    kv.attend(0, st, make_view<const float>(q.data(), c, qh, d), make_view(out.data(), c, qh, d),
              {.lse = make_view(l.data(), c, qh)});
    o.assign(out.end() - qh * d, out.end());
    lse.assign(l.end() - qh, l.end());
  };
  std::vector<float> whole, lw, a, la, b, lb;
  last_row(0, n, whole, lw);
  last_row(0, n1, a, la);
  last_row(n1, n, b, lb);
  merge_attention(make_view(a.data(), 1, qh, d), make_view(la.data(), 1, qh),
                  make_view<const float>(b.data(), 1, qh, d),
                  make_view<const float>(lb.data(), 1, qh));
  CHECK(rel(a, whole) < 1e-5);
  for (std::size_t h = 0; h < qh; ++h) CHECK(std::fabs(la[h] - lw[h]) < 1e-4);

  // A shape mismatch names the tensor and writes nothing.
  const std::vector<float> before = a;
  CHECK_THROWS_WITH(merge_attention(make_view(a.data(), 1, qh, d), make_view(la.data(), 1, qh),
                                    make_view<const float>(b.data(), 1, qh / 2, d),
                                    make_view<const float>(lb.data(), 1, qh)),
                    Catch::Contains("part has extent 4 on axis 1"));
  CHECK(a == before);
}
