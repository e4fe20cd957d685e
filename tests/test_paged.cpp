// Paged storage through the public API: attention at page sizes 1, 16, 64 and
// 256 against the float64 reference; fork with copy-on-write, truncate,
// remove, beam reordering; prefix reuse with LRU eviction and forced hash
// collisions; cascade attention; exact memory; errors with the strong
// guarantee.
#include "test_attention.hpp"

using namespace kvcache;
using Catch::Matchers::Contains;

namespace {

using dyn32 = cache<gqa<64>, paged<>, full, fp32>;   // runtime page size, tight tolerance
using pg16 = cache<gqa<64>, paged<16>, full, fp16>;  // the static page size of the benchmarks

cache_config config(std::size_t page_tokens, std::size_t max_tokens = 4096) {
  return {.layers = 2,
          .q_heads = 8,
          .kv_heads = 2,
          .max_tokens = max_tokens,
          .threads = 2,
          .page_tokens = page_tokens,
          .cascade_min_tokens = 16};
}

std::vector<token_id> random_ids(std::mt19937_64& rng, std::size_t n, int vocab = 50) {
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<token_id> v(n);
  for (auto& t : v) t = d(rng);
  return v;
}

//! Pages held by the live sequences: each distinct page table entry once.
template <class C>
std::size_t distinct_pages(const C& kv, const std::vector<seq_id>& ids) {
  std::set<const std::byte*> pages;
  for (seq_id s : ids)
    for (auto* p : kv.page_table(s)) pages.insert(p);
  return pages.size();
}

template <class C>
void check_accounting(const C& kv, const std::vector<seq_id>& ids) {
  std::unordered_map<const std::byte*, std::size_t> refs;
  for (seq_id s : ids)
    for (auto* p : kv.page_table(s)) ++refs[p];
  CHECK_NOTHROW(kv.store().check_pool(refs));
  CHECK(kv.store().pages_in_use() == refs.size());
  CHECK(kv.memory_in_use() == refs.size() * kv.store().page_bytes());
  CHECK(kv.store().pages_in_use() + kv.store().pages_cached() + kv.store().pages_free() ==
        kv.store().pages_total());
}

}  // namespace

TEST_CASE("paged attention matches the float64 reference at page sizes 1, 16, 64, 256",
          "[paged][attention]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << " (set KVCACHE_TEST_SEED to reproduce)");
  for (std::size_t pt : {1, 16, 64, 256}) {
    INFO("page_tokens " << pt);
    kvtest::harness<dyn32> h(config(pt), seed + pt);
    kvtest::attention_steps(h);
    CHECK(h.kv.store().page_tokens() == pt);
  }
  kvtest::harness<pg16> h(config(0), seed);
  kvtest::attention_steps(h);
}

TEST_CASE("fork shares every page and copies a shared partial page on first write",
          "[paged][fork]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  kvtest::harness<dyn32> h(config(16), seed);
  const std::size_t page = h.kv.store().page_bytes();
  auto a = h.add();
  h.run({{a, 40}});  // pages: 16 + 16 + 8
  CHECK(h.kv.memory_in_use() == 3 * page);
  auto b = h.fork(a);
  CHECK(h.kv.memory_in_use() == 3 * page);  // no K/V bytes
  CHECK(h.kv.length(b) == 40);
  auto ta = h.kv.page_table(a), tb = h.kv.page_table(b);
  CHECK(std::equal(ta.begin(), ta.end(), tb.begin(), tb.end()));
  CHECK(h.kv.store().page_refs(ta[2]) == 2);
  // b writes into the shared partial page: it gets its own copy.
  auto r = h.run({{b, 1}});
  CHECK(r.error() <= fp32::tolerance);
  CHECK(h.kv.memory_in_use() == 4 * page);
  tb = h.kv.page_table(b);
  CHECK(tb[0] == ta[0]);
  CHECK(tb[1] == ta[1]);
  CHECK(tb[2] != ta[2]);
  // a is the only holder of its page now and writes in place.
  r = h.run({{a, 1}, {b, 1}});
  CHECK(r.error() <= fp32::tolerance);
  CHECK(h.kv.memory_in_use() == 4 * page);
  CHECK(h.kv.page_table(a)[2] == ta[2]);
  // Both continue independently past the page boundary.
  for (int i = 0; i < 30; ++i) {
    r = h.run({{a, 1}, {b, 1}});
    REQUIRE(r.error() <= fp32::tolerance);
  }
  check_accounting(h.kv, {a, b});
  h.remove(a);
  CHECK(h.kv.memory_in_use() == 5 * page);  // b's 72 tokens, the two once-shared pages included
  h.remove(b);
  CHECK(h.kv.memory_in_use() == 0);
  check_accounting(h.kv, {});
  CHECK_THROWS_WITH(h.kv.remove_sequence(b), Contains("unknown or was removed"));
  CHECK_THROWS_WITH(h.kv.fork(b), Contains("unknown or was removed"));
}

TEST_CASE("truncate rolls back for speculative decoding", "[paged][truncate]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  SECTION("paged: pages past n are freed, shared pages stay") {
    kvtest::harness<dyn32> h(config(16), seed);
    const std::size_t page = h.kv.store().page_bytes();
    auto a = h.add();
    h.run({{a, 50}});  // 4 pages
    auto b = h.fork(a);
    h.run({{a, 30}});  // draft tokens: a now 80 tokens, 5 pages (its 4th copied)
    CHECK(h.kv.memory_in_use() == 6 * page);
    h.truncate(a, 33);  // reject most of the draft: a keeps 3 pages, all shared with b
    CHECK(h.kv.length(a) == 33);
    CHECK(h.kv.memory_in_use() == 4 * page);
    // a's next token goes into a page b also holds (full for b): a copies it.
    auto r = h.run({{a, 5}, {b, 1}});
    CHECK(r.error() <= fp32::tolerance);
    h.truncate(a, 32);  // onto a page boundary
    h.truncate(b, 0);
    CHECK(h.kv.memory_in_use() == 2 * page);
    r = h.run({{a, 1}, {b, 3}});
    CHECK(r.error() <= fp32::tolerance);
    check_accounting(h.kv, {a, b});
    CHECK_THROWS_WITH(h.kv.truncate(a, 34), Contains("to 34 tokens: it holds 33"));
  }
  SECTION("contiguous: only the length shrinks") {
    kvtest::harness<cache<gqa<64>, contiguous, full, fp32>> h(
        {.layers = 2, .q_heads = 8, .kv_heads = 2, .max_tokens = 1000, .threads = 2}, seed);
    auto a = h.add(200);
    h.run({{a, 60}});
    const std::size_t bytes = h.kv.memory_in_use();
    h.truncate(a, 21);
    CHECK(h.kv.length(a) == 21);
    CHECK(h.kv.memory_in_use() == bytes);
    auto r = h.run({{a, 1}});
    CHECK(r.error() <= fp32::tolerance);
    CHECK_THROWS_WITH(h.kv.truncate(a, 23), Contains("to 23 tokens: it holds 22"));
  }
}

TEST_CASE("beam reordering shares survivors' pages", "[paged][beams]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  kvtest::harness<dyn32> h(config(16), seed);
  const std::size_t page = h.kv.store().page_bytes();
  auto b0 = h.add();
  h.run({{b0, 64}});  // 4 full pages
  std::vector<seq_id> beams{b0, h.fork(b0), h.fork(b0), h.fork(b0)};
  auto step_all = [&] {
    std::vector<append> ap;
    for (auto b : beams) ap.push_back({b, 1});
    return h.run(ap);
  };
  for (int i = 0; i < 5; ++i) CHECK(step_all().error() <= fp32::tolerance);
  CHECK(h.kv.memory_in_use() == 8 * page);  // 4 shared + one own page per beam
  // Beams 1 and 3 survive, twice each.
  const std::vector<std::size_t> from{1, 1, 3, 3};
  auto keys = h.keys, values = h.values;
  h.kv.reorder(beams, from);
  for (std::size_t i = 0; i < beams.size(); ++i) {
    h.keys[beams[i]] = keys[beams[from[i]]];
    h.values[beams[i]] = values[beams[from[i]]];
  }
  CHECK(h.kv.memory_in_use() == 6 * page);  // no page copied; beams 0 and 2's own pages freed
  CHECK(h.kv.page_table(beams[0]).back() == h.kv.page_table(beams[1]).back());
  for (int i = 0; i < 20; ++i) CHECK(step_all().error() <= fp32::tolerance);
  check_accounting(h.kv, beams);
  CHECK_THROWS_WITH(h.kv.reorder(beams, std::vector<std::size_t>{0, 1, 2, 4}),
                    Contains("copies beam 4"));
  CHECK_THROWS_WITH(h.kv.reorder(std::vector<seq_id>{b0, b0}, std::vector<std::size_t>{0, 0}),
                    Contains("appears twice"));
}

TEST_CASE("prefix reuse matches cached pages and evicts the least recently used",
          "[paged][prefix]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  kvtest::harness<dyn32> h(config(16, 16 * 12), seed);  // a pool of 12 pages
  auto& kv = h.kv;
  const auto system = random_ids(rng, 70);  // 4 full pages and 6 tokens
  auto a = h.add();
  h.run({{a, 70, system}});
  // Nothing is published until the step is over: the next change publishes.
  auto turn2 = system;
  for (auto t : random_ids(rng, 20)) turn2.push_back(t);
  auto m = kv.match_prefix(turn2);
  CHECK(m.tokens == 64);
  CHECK(kv.length(m.seq) == 64);
  CHECK(kv.page_table(m.seq)[3] == kv.page_table(a)[3]);
  // The matched sequence reads a's K/V.
  for (auto* x : {&h.keys, &h.values}) {
    (*x)[m.seq] = (*x)[a];
    for (auto& layer : (*x)[m.seq]) layer.resize(64 * h.kv_heads * h.dim);
  }
  auto r = h.run({{m.seq, 26, std::span(turn2).subspan(64)}});
  CHECK(r.error() <= fp32::tolerance);
  r = h.run({{m.seq, 1}, {a, 1}});
  CHECK(r.error() <= fp32::tolerance);
  // Never more than ids.size() - 1 tokens, and a different token breaks the run.
  auto exact = std::vector<token_id>(system.begin(), system.begin() + 64);
  auto m2 = kv.match_prefix(exact);
  CHECK(m2.tokens == 48);
  auto other = system;
  other[20] += 1;  // inside page 1
  auto m3 = kv.match_prefix(other);
  CHECK(m3.tokens == 16);
  kv.remove_sequence(m2.seq);
  kv.remove_sequence(m3.seq);
  check_accounting(kv, {a, m.seq});

  // Removing the holders leaves their published pages cached, not free.
  h.remove(a);
  h.remove(m.seq);
  CHECK(kv.memory_in_use() == 0);
  CHECK(kv.store().pages_cached() >= 5);
  auto m4 = kv.match_prefix(turn2);
  CHECK(m4.tokens == 80);  // 64 from the first turn, 16 published by the second
  kv.remove_sequence(m4.seq);

  // A pool running short evicts cached pages, least recently released first.
  auto big = h.add();
  h.run({{big, 16 * 10, random_ids(rng, 160)}});  // needs 10 of 12 pages
  CHECK(kv.store().pages_cached() <= 2);
  auto m5 = kv.match_prefix(turn2);
  CHECK(m5.tokens <= 32);  // only the earliest pages may survive
  kv.remove_sequence(m5.seq);
  h.remove(big);
  check_accounting(kv, {});
  kv.store().clear_prefix_cache();
  CHECK(kv.store().pages_free() == kv.store().pages_total());
}

namespace {
//! Every page hashes alike, so every lookup meets collisions.
struct colliding_hash {
  std::uint64_t operator()(std::uint64_t, std::span<const token_id>) const noexcept { return 42; }
};
}  // namespace

TEST_CASE("hash collisions never return another prefix's pages", "[paged][prefix]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  using C = cache<gqa<64>, paged<16, colliding_hash>, full, fp32>;
  kvtest::harness<C> h(config(0), seed);
  auto& kv = h.kv;
  const auto p1 = random_ids(rng, 65), p2 = random_ids(rng, 65);
  auto shared = p1;
  std::copy(p2.begin() + 32, p2.end(), shared.begin() + 32);  // p1's first 2 pages, then p2's
  auto a = h.add(), b = h.add();
  h.run({{a, 65, p1}, {b, 65, p2}});
  auto m1 = kv.match_prefix(p1), m2 = kv.match_prefix(p2), m3 = kv.match_prefix(shared);
  CHECK(m1.tokens == 64);
  CHECK(m2.tokens == 64);
  CHECK(m3.tokens == 32);  // page 2 of `shared` equals p2's page 2 but follows another prefix
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(kv.page_table(m1.seq)[i] == kv.page_table(a)[i]);
    CHECK(kv.page_table(m2.seq)[i] == kv.page_table(b)[i]);
  }
  // Pages read back the K/V of their own prefix.
  std::vector<float> row(64);
  for (std::size_t t = 0; t < 64; t += 7) {
    kv.read_row(1, m2.seq, t, 1, 1, row.data());
    for (std::size_t d = 0; d < 64; ++d)
      REQUIRE(row[d] == h.values[b][1][(t * h.kv_heads + 1) * 64 + d]);
  }
}

TEST_CASE("cascade attention equals plain attention", "[paged][cascade]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  for (std::size_t pt : {1, 16, 64}) {
    INFO("page_tokens " << pt);
    kvtest::harness<dyn32> h(config(pt), seed + pt);
    auto root = h.add();
    h.run({{root, 1100}});  // more than one cascade chunk of 1024 tokens
    std::vector<seq_id> seqs{root};
    for (int i = 0; i < 4; ++i) seqs.push_back(h.fork(root));
    auto other = h.add();
    h.run({{other, 300}});
    // Private suffixes of different lengths, then decode steps mixing the
    // sharing group, a lone sequence and a prefill.
    std::vector<append> ap;
    for (std::size_t i = 0; i < seqs.size(); ++i) ap.push_back({seqs[i], 1 + 7 * i});
    h.run(ap);
    auto lone = h.add();
    for (int step = 0; step < 3; ++step) {
      ap.clear();
      for (auto s : seqs) ap.push_back({s, 1});
      ap.push_back({other, 1});
      ap.push_back({lone, step == 0 ? 40u : 1u});
      auto st_probe = h.kv.begin_step(ap);
      CHECK(st_probe.cascaded() == seqs.size());
      h.kv.truncate(seqs[0], h.kv.length(seqs[0]) - 1);  // undo the probe
      for (std::size_t i = 1; i < seqs.size(); ++i)
        h.kv.truncate(seqs[i], h.kv.length(seqs[i]) - 1);
      h.kv.truncate(other, h.kv.length(other) - 1);
      h.kv.truncate(lone, h.kv.length(lone) - (step == 0 ? 40 : 1));
      auto r = h.run(ap);
      CHECK(r.error() <= fp32::tolerance);
      CHECK(r.lse_error() <= 1e-5);
    }
  }
  // fp16 holds its own bound too, with the benchmark's static page size.
  kvtest::harness<pg16> h(config(0), seed);
  auto root = h.add();
  h.run({{root, 500}});
  std::vector<append> ap{{root, 1}};
  for (int i = 0; i < 3; ++i) ap.push_back({h.fork(root), 1});
  for (int step = 0; step < 3; ++step) CHECK(h.run(ap).own_error() <= kvtest::kernel_bound<fp16>());
  CHECK(h.orig.error() <= fp16::tolerance);
}

TEST_CASE("paged memory is exact: shared pages count once", "[paged][memory]") {
  constexpr kv_shape small{.layers = 1, .kv_heads = 16, .head_dim = 64};
  using C = cache<mha<64>, paged<16>, full, fp16>;
  const cache_config cfg{.layers = 1, .q_heads = 16, .max_tokens = 4 * 2048, .threads = 1};
  SECTION("batch 4 x 2048 tokens, unshared: 33,554,432 bytes") {
    C kv(cfg);
    std::vector<seq_id> ids;
    for (int i = 0; i < 4; ++i) ids.push_back(kv.add_sequence(2048));
    CHECK(kv.memory_in_use() == 0);  // paged storage takes pages as tokens arrive
    for (auto s : ids) kv.begin_step({{s, 2048}});
    CHECK(kv.memory_in_use() == 33'554'432);
    CHECK(kv.memory_in_use() == paged_kv_bytes<fp16>(small, 4, 2048, 16));
    CHECK(kv.memory_in_use() == kv_bytes<fp16>(small, 4, 2048));
  }
  SECTION("the four share the prefix: 8,388,608 bytes") {
    C kv(cfg);
    auto s = kv.add_sequence(4096);
    kv.begin_step({{s, 2048}});
    for (int i = 0; i < 3; ++i) kv.fork(s);
    CHECK(kv.sequences() == 4);
    CHECK(kv.memory_in_use() == 8'388'608);
    CHECK(kv.memory_in_use() == shared_kv_bytes<fp16>(small, 4, 2048, 0));
    CHECK(kv.memory_in_use() == paged_shared_kv_bytes<fp16>(small, 4, 2048, 0, 16));
  }
  SECTION("partial pages: at most one per sequence") {
    C kv(cfg);
    auto s = kv.add_sequence();
    kv.begin_step({{s, 1000}});  // 62 full pages + 8 tokens
    std::vector<append> ap;
    for (int i = 0; i < 3; ++i) ap.push_back({kv.fork(s), 5});
    ap.push_back({s, 5});
    kv.begin_step(ap);  // every sequence copies the shared partial page once
    CHECK(kv.memory_in_use() == paged_shared_kv_bytes<fp16>(small, 4, 1000, 5, 16));
    CHECK(kv.memory_in_use() == (62 + 4) * 16 * bytes_per_token<fp16>(small));
    CHECK(paged_kv_bytes<fp16>(small, 4, 1005, 16) - kv_bytes<fp16>(small, 4, 1005) <
          4 * 16 * bytes_per_token<fp16>(small));
  }
}

TEST_CASE("paged errors name the value and the limit and change nothing", "[paged][errors]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  CHECK_THROWS_WITH([] { dyn32 kv(config(0)); }(), Contains("page_tokens is 0"));
  CHECK_THROWS_WITH([] { pg16 kv(config(32)); }(),
                    Contains("page_tokens 32 differs from the storage's static"));
  kvtest::harness<dyn32> h(config(16, 16 * 8), seed);  // 8 pages
  auto& kv = h.kv;
  auto a = h.add(), b = h.add();
  h.run({{a, 40}, {b, 20}});  // 3 + 2 pages
  auto c = h.fork(a);
  const std::size_t bytes = kv.memory_in_use();
  auto rows = [&] {  // every stored K and V row of the three sequences
    std::vector<float> all, row(h.dim);
    for (seq_id s : {a, b, c})
      for (std::size_t l = 0; l < 2; ++l)
        for (std::size_t t = 0; t < kv.length(s); ++t)
          for (std::size_t kind = 0; kind < 2; ++kind)
            for (std::size_t hd = 0; hd < h.kv_heads; ++hd) {
              kv.read_row(l, s, t, kind, hd, row.data());
              all.insert(all.end(), row.begin(), row.end());
            }
    return all;
  };
  const std::vector<float> stored = rows();
  auto same = [&] {
    CHECK(kv.memory_in_use() == bytes);
    CHECK(rows() == stored);
    CHECK(kv.length(a) == 40);
    CHECK(kv.length(b) == 20);
    CHECK(kv.length(c) == 40);
    check_accounting(kv, {a, b, c});
  };
  // c needs a copy of the shared page and 3 more; b needs 2: 6 > 3 free.
  // b needs 2 new pages; c a copy of the shared partial page and 2 more.
  CHECK_THROWS_WITH(kv.begin_step({{b, 40}, {c, 40}}),
                    Contains("needs 5 new pages of 16 tokens; 3 of the pool's 8 are free"));
  same();
  CHECK_THROWS_WITH(kv.add_sequence(16 * 8 + 1), Contains("exceeds the pool's 128 tokens"));
  CHECK_THROWS_WITH(kv.truncate(b, 21), Contains("it holds 20"));
  CHECK_THROWS_WITH(kv.begin_step({{a, 2, std::vector<token_id>{1}}}),
                    Contains("appends 2 tokens with 1 token ids"));
  CHECK_THROWS_WITH(kv.truncate(seq_id{999}, 0), Contains("sequence 999 is unknown"));
  same();
  // Exactly the free pages: succeeds, and attention is right.
  auto r = h.run({{b, 12}, {c, 30}});  // b: no new page; c: a copy and 2 more
  CHECK(r.error() <= fp32::tolerance);
  check_accounting(kv, {a, b, c});
}

// ---- property test ------------------------------------------------------------

namespace {

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

//! A plain model of one sequence: token ids and full copies of its K and V,
//! which are a function of the token's whole prefix (as a model's would be),
//! so a page reused through the prefix index must hold exactly them.
struct model_seq {
  std::vector<token_id> ids;
  std::vector<std::uint64_t> prefix;  // (tokens) chained hash of ids[0..t]
  std::vector<float> k, v;            // (tokens, kv_heads, dim)
};

struct property_run {
  static constexpr std::size_t kvh = 2, qh = 4, dim = 64, max_len = 300;
  using C = dyn32;
  C kv;
  std::mt19937_64 rng;
  std::size_t page_tokens;
  std::map<seq_id, model_seq> model;
  std::vector<std::vector<token_id>> prompts;  // shared beginnings of requests
  std::size_t attends = 0, matched_tokens = 0, refused = 0, cascaded = 0;

  property_run(std::size_t pt, std::uint64_t seed)
      : kv({.layers = 1,
            .q_heads = qh,
            .kv_heads = kvh,
            .max_tokens = 1536,
            .threads = 2,
            .page_tokens = pt,
            .cascade_min_tokens = 8}),
        rng(seed),
        page_tokens(pt) {
    for (int i = 0; i < 3; ++i) prompts.push_back(random_ids(rng, 40 + 30 * i, 4));
  }

  std::size_t pick(std::size_t n) {
    return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng);
  }
  seq_id any() {
    auto it = model.begin();
    std::advance(it, pick(model.size()));
    return it->first;
  }
  std::vector<seq_id> live() const {
    std::vector<seq_id> v;
    for (auto& [s, m] : model) v.push_back(s);
    return v;
  }

  void extend(model_seq& m, std::span<const token_id> ids) {
    for (token_id t : ids) {
      const std::uint64_t h = mix((m.prefix.empty() ? 7 : m.prefix.back()) * 31 + std::uint64_t(t));
      m.ids.push_back(t);
      m.prefix.push_back(h);
      for (std::size_t kind = 0; kind < 2; ++kind)
        for (std::size_t i = 0; i < kvh * dim; ++i) {
          const std::uint64_t r = mix(h ^ (kind * 0x1000003 + i * 0x9e37));
          (kind ? m.v : m.k).push_back(float(double(r >> 11) * 0x1p-53 * 4.0 - 2.0));
        }
    }
  }
  void cut(model_seq& m, std::size_t n) {
    m.ids.resize(n);
    m.prefix.resize(n);
    m.k.resize(n * kvh * dim);
    m.v.resize(n * kvh * dim);
  }

  //! Lengths, page tables and memory_in_use against the model and the pages
  //! the live page tables name.
  void check_state() {
    REQUIRE(kv.sequences() == model.size());
    std::set<const std::byte*> pages;
    for (auto& [s, m] : model) {
      REQUIRE(kv.length(s) == m.ids.size());
      auto t = kv.page_table(s);
      REQUIRE(t.size() == (m.ids.size() + page_tokens - 1) / page_tokens);
      pages.insert(t.begin(), t.end());
    }
    REQUIRE(kv.memory_in_use() == pages.size() * kv.store().page_bytes());
  }

  //! One step: every chosen sequence appends new tokens; K/V written, outputs
  //! checked against the float64 reference on the model's full copies.
  bool step(std::vector<seq_id> seqs, std::vector<std::vector<token_id>> ids, bool give_ids) {
    std::vector<append> ap;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      ap.push_back({seqs[i], ids[i].size(),
                    give_ids ? std::span<const token_id>(ids[i]) : std::span<const token_id>()});
    const std::size_t before = kv.memory_in_use();
    step_handle st;
    try {
      st.s = kv.begin_step(ap);
    } catch (const kvcache::error& e) {
      // Only a full pool may refuse a step of sequences under capacity.
      REQUIRE(std::string(e.what()).find("new pages") != std::string::npos);
      REQUIRE(kv.memory_in_use() == before);
      ++refused;
      check_state();
      return false;
    }
    cascaded += st.s->cascaded();
    std::size_t n = 0;
    std::vector<std::size_t> first;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      first.push_back(model[seqs[i]].ids.size());
      extend(model[seqs[i]], ids[i]);
      n += ids[i].size();
    }
    std::vector<float> k, v;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const auto& m = model[seqs[i]];
      k.insert(k.end(), m.k.begin() + first[i] * kvh * dim, m.k.end());
      v.insert(v.end(), m.v.begin() + first[i] * kvh * dim, m.v.end());
    }
    auto q = kvtest::normal(rng, n * qh * dim);
    auto out = kvtest::poisoned(n * qh * dim);
    kv.write(0, *st.s, make_view<const float>(k.data(), n, kvh, dim),
             make_view<const float>(v.data(), n, kvh, dim));
    kv.attend(0, *st.s, make_view<const float>(q.data(), n, qh, dim),
              make_view(out.data(), n, qh, dim));
    std::vector<double> ref(n * qh * dim), lse(n * qh);
    std::size_t row = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const auto& m = model[seqs[i]];
      kvtest::reference_attention(m.k, m.v, q.data() + row * qh * dim, ids[i].size(), first[i], qh,
                                  kvh, dim, 1.0 / 8.0, ref.data() + row * qh * dim,
                                  lse.data() + row * qh);
      row += ids[i].size();
    }
    REQUIRE(kvtest::rel_l2(out, ref) <= fp32::tolerance);
    ++attends;
    return true;
  }
  struct step_handle {
    std::optional<kvcache::step> s;
  };

  void add_request() {
    // A request: one of the shared beginnings (or nothing) and its own tokens.
    std::vector<token_id> prompt;
    if (pick(4) != 0) prompt = prompts[pick(prompts.size())];
    const auto own = random_ids(rng, 1 + pick(60), 4);
    prompt.insert(prompt.end(), own.begin(), own.end());
    seq_id s;
    std::size_t have = 0;
    if (pick(2) == 0) {
      auto m = kv.match_prefix(prompt, max_len);
      REQUIRE(m.tokens % page_tokens == 0);
      REQUIRE(m.tokens < prompt.size());
      s = m.seq;
      have = m.tokens;
      matched_tokens += have;
      extend(model[s], std::span(prompt).first(have));
      // The attached pages hold exactly this prefix's K/V.
      std::vector<float> row(dim);
      for (std::size_t t = 0; t < have; t += 1 + pick(9)) {
        const std::size_t kind = pick(2), h = pick(kvh);
        kv.read_row(0, s, t, kind, h, row.data());
        const auto& src = kind ? model[s].v : model[s].k;
        for (std::size_t d = 0; d < dim; ++d) REQUIRE(row[d] == src[(t * kvh + h) * dim + d]);
      }
    } else {
      s = kv.add_sequence(max_len);
      model[s];
    }
    if (!step({s}, {std::vector<token_id>(prompt.begin() + have, prompt.end())}, pick(5) != 0)) {
      kv.remove_sequence(s);
      model.erase(s);
    }
  }

  void decode_some() {
    std::vector<seq_id> seqs;
    std::vector<std::vector<token_id>> ids;
    for (auto& [s, m] : model) {
      if (pick(3) == 0) continue;
      const std::size_t room = max_len - m.ids.size();
      if (room == 0) continue;
      const std::size_t n = pick(6) == 0 ? 1 + pick(std::min<std::size_t>(room, 20)) : 1;
      seqs.push_back(s);
      ids.push_back(random_ids(rng, n, 4));
    }
    if (!seqs.empty()) step(seqs, ids, pick(4) != 0);
  }

  void run(std::size_t ops) {
    for (std::size_t op = 0; op < ops; ++op) {
      const std::size_t r = model.empty() ? 0 : pick(20);
      if (r < 3) {
        add_request();
      } else if (r < 5 && model.size() < 12) {
        const seq_id s = any();
        const std::size_t before = kv.memory_in_use();
        const seq_id c = kv.fork(s);
        REQUIRE(kv.memory_in_use() == before);
        model[c] = model[s];
      } else if (r < 7) {
        const seq_id s = any();
        const std::size_t n = pick(model[s].ids.size() + 1);
        kv.truncate(s, n);
        cut(model[s], n);
      } else if (r < 9) {
        const seq_id s = any();
        kv.remove_sequence(s);
        model.erase(s);
        CHECK_THROWS_AS(kv.remove_sequence(s), kvcache::error);
      } else if (r < 10) {
        auto beams = live();
        std::vector<std::size_t> from;
        for (std::size_t i = 0; i < beams.size(); ++i) from.push_back(pick(beams.size()));
        kv.reorder(beams, from);
        std::vector<model_seq> copy;
        for (auto b : beams) copy.push_back(model[b]);
        for (std::size_t i = 0; i < beams.size(); ++i) model[beams[i]] = copy[from[i]];
      } else {
        decode_some();
      }
      check_state();
      if (op % 50 == 0) check_pool();
    }
    for (auto s : live()) kv.remove_sequence(s);
    model.clear();
    check_pool();
    REQUIRE(kv.store().pages_in_use() == 0);
    REQUIRE(kv.memory_in_use() == 0);
    kv.store().clear_prefix_cache();
    REQUIRE(kv.store().pages_free() == kv.store().pages_total());
    check_pool();
  }

  void check_pool() {
    std::unordered_map<const std::byte*, std::size_t> refs;
    for (auto& [s, m] : model)
      for (auto* p : kv.page_table(s)) ++refs[p];
    REQUIRE_NOTHROW(kv.store().check_pool(refs));
  }
};

}  // namespace

TEST_CASE("random operations agree with a model keeping full copies", "[paged][property]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << " (set KVCACHE_TEST_SEED to reproduce)");
  for (std::size_t pt : {1, 16, 64}) {
    INFO("page_tokens " << pt);
    property_run p(pt, seed + pt);
    p.run(1500);
    // Some seeds keep the pool full and see most steps refused; run on, from
    // an empty cache each time, until the property has been exercised.
    for (int more = 0; more < 10 && (p.attends <= 300 || p.matched_tokens == 0 || p.cascaded == 0);
         ++more)
      p.run(300);
    // The runs exercised what they are meant to.
    CHECK(p.attends > 300);
    CHECK(p.matched_tokens > 0);
    CHECK(p.cascaded > 0);
    WARN("page_tokens " << pt << ": " << p.attends << " steps, " << p.refused
                        << " refused by a full pool, " << p.matched_tokens << " tokens matched, "
                        << p.cascaded << " cascaded decodes");
  }
}
