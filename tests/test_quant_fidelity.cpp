// Fidelity of each format on realistic data (quant_support.hpp's outlier
// generator): context 4096, GQA group 4 (8 query heads, 2 KV heads, head_dim
// 128), several fresh seeds. Two checks per format:
//  (a) the kernels add no error beyond their bound: decode output against a
//      float64 attention over the format's own decoded K/V;
//  (b) the formats do what they are for: output error against float64
//      attention over the original K/V, held to the ratio bounds.
// The table it prints is the one in docs/quantization.md.
#include <algorithm>
#include <cstdio>

#include "quant_support.hpp"

using namespace kvcache;

namespace {

// Nine seeds: the ratio checks compare medians over seeds, and with five the
// median of FP8 / INT8 ranged 0.86 to 1.32 over 24 runs, too close to its 1.5
// bound for a test that draws fresh seeds every run.
constexpr std::size_t kContext = 4096, kQHeads = 8, kKVHeads = 2, kDim = 128, kSeeds = 9,
                      kDecodes = 8;

struct measured {
  std::string name, outliers;
  double bits, bound;
  std::vector<double> own, orig;  // per seed: worst decode step (own), RMS over steps (orig)
  double median(const std::vector<double>& v) const {
    auto s = v;
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
  }
  double max(const std::vector<double>& v) const { return *std::max_element(v.begin(), v.end()); }
};

//! Bits per element: the row's, plus per-channel keys' fp16 residual
//! amortised over the context (R x dim fp16 keys per context x dim x 2 elements).
template <class P>
double bits_per_element() {
  double b = 8.0 * P::row_bytes(kDim) / kDim;
  if constexpr (detail::channel_keys<P>) b += 8.0 * P::residual / kContext;
  return b;
}

template <class P>
measured measure(const char* outliers, std::uint64_t seed0) {
  measured m{std::string(P::name),
             outliers,
             bits_per_element<P>(),
             block_precision<P>        ? detail::decode_error_bound<P>()
             : detail::channel_keys<P> ? detail::kchan_error_bound<P>()
                                       : 1e-4,
             {},
             {}};
  for (std::size_t i = 0; i < kSeeds; ++i) {
    const std::uint64_t seed = seed0 + i;
    kvtest::dequant_driver<cache<gqa<kDim>, contiguous, full, P>> d(kQHeads, kKVHeads, kDim,
                                                                    kContext, seed);
    std::mt19937_64 data_rng(seed ^ 0x5eedull);
    const kvtest::outlier_data data(data_rng, kKVHeads, kDim);
    d.outliers = &data;
    auto s = d.add(kContext);
    d.fill(s, kContext - kDecodes);
    double own = 0, orig = 0;
    for (std::size_t t = 0; t < kDecodes; ++t) {
      d.worst_orig = 0;
      own = std::max(own, d.run({{s, 1}}));
      orig += d.worst_orig * d.worst_orig;
    }
    m.own.push_back(own);
    m.orig.push_back(std::sqrt(orig / kDecodes));
  }
  return m;
}

}  // namespace

TEST_CASE("fidelity on outlier keys: kernel bounds and format ratios", "[quant][fidelity]") {
  const auto seed = kvtest::test_seed();
  INFO("seeds " << seed << " .. " << seed + kSeeds - 1 << " (set KVCACHE_TEST_SEED to reproduce)");
  std::vector<measured> rows;
  rows.push_back(measure<fp16>("-", seed));
  rows.push_back(measure<int8_kv<>>("-", seed));
  rows.push_back(measure<int8_kv<128>>("-", seed));
  rows.push_back(measure<fp8_e4m3_kv<>>("-", seed));
  rows.push_back(measure<fp8_e4m3_kv<128>>("-", seed));
  rows.push_back(measure<int4_kv<>>("-", seed));
  rows.push_back(measure<int4_kv<true>>("-", seed));
  rows.push_back(measure<hadamard<int4_kv<>>>("Hadamard", seed));
  rows.push_back(measure<hadamard<int4_kv<true>>>("Hadamard", seed));
  rows.push_back(measure<per_channel_k<int4_kv<true>>>("per-channel K, residual 32", seed));
  rows.push_back(measure<int2_kv>("-", seed));
  rows.push_back(measure<hadamard<int2_kv>>("Hadamard", seed));
  rows.push_back(measure<per_channel_k<int2_kv, 32, 128>>("per-channel K, residual 128", seed));

  std::printf(
      "\n| format | outlier handling | bits/element | error vs original (median) | (max) "
      "| kernel error vs own rows (max) |\n| --- | --- | ---: | ---: | ---: | ---: |\n");
  for (const auto& m : rows)
    std::printf("| %s | %s | %.4g | %.4f | %.4f | %.1e |\n", m.name.c_str(), m.outliers.c_str(),
                m.bits, m.median(m.orig), m.max(m.orig), m.max(m.own));
  std::printf(
      "(context %zu, %zu query heads, %zu KV heads, head_dim %zu, %zu seeds from %llu, "
      "RMS over %zu decode steps per seed)\n",
      kContext, kQHeads, kKVHeads, kDim, kSeeds, static_cast<unsigned long long>(seed), kDecodes);

  auto find = [&](const char* name) -> const measured& {
    for (const auto& m : rows)
      if (m.name == name) return m;
    FAIL("no row " << name);
    return rows.front();
  };
  // (a) Every kernel within its stated bound of float64 over its own rows
  // (decode_error_bound: 1e-4 for float paths, 1e-3 for integer scores;
  // kchan_error_bound: 1e-3 with integer P.V).
  for (const auto& m : rows) {
    INFO(m.name);
    CHECK(m.max(m.own) <= m.bound);
  }
  // (b) The ratio bounds, on the medians over seeds (the same data for
  // every format). Per-token INT4 is int4_asym (the reference scheme).
  const auto &i8 = find("int8"), &fp8 = find("fp8_e4m3"), &i4 = find("int4_asym"),
             &h4 = find("hadamard_int4"), &h4a = find("hadamard_int4_asym"), &i2 = find("int2"),
             &h2 = find("hadamard_int2"), &c4 = find("int4_asym_kchan"),
             &c2 = find("int2_kchan_r128");
  const auto med = [](const measured& m) { return m.median(m.orig); };
  CHECK(med(i8) <= 0.2 * med(i4));
  CHECK(med(fp8) <= 1.5 * med(i8));
  // INT4 with per-channel keys (or rotation, whichever is better) <= 0.5 x
  // per-token INT4, at most 0.5 bits per element more (residual included).
  CHECK(std::min({med(c4), med(h4), med(h4a)}) <= 0.5 * med(i4));
  CHECK(c4.bits <= i4.bits + 0.5);
  CHECK(med(c4) <= 0.5 * med(i4));
  // INT2 with per-channel keys and a 128-token fp16 residual <= 0.5 x per-token INT2.
  CHECK(med(c2) <= 0.5 * med(i2));
  // Rotation alone must clearly help, though less than per-channel keys: over
  // 41 runs of five seeds it gave 0.47x to 0.67x per-token INT4 and 0.50x to
  // 0.78x per-token INT2. The bounds sit above that spread so that only a
  // real regression fails them.
  CHECK(std::min(med(h4), med(h4a)) <= 0.75 * med(i4));
  CHECK(med(h2) <= 0.9 * med(i2));
}
