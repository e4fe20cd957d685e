// tile/<impl>: the two products of one prefill tile (scores of 64 query rows
// against a 64-key tile, then O = O * corr + P V) at head_dim 128, on one
// thread, through the library's hand-vectorised loops (scores transposed,
// St = K Qt, with key rows read as stored), through Eigen's GEMM, and on the
// AMX tile unit in bf16 (amx_bf16.hpp: operands split into hi and lo, three
// tile products per product, the splits and the weights' transpose
// included). It settles which the prefill kernel uses; counter gflops (4 x
// 64 x 64 x 128 FLOPs per call / time).
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <kvcache/kernels/cpu/prefill.hpp>
#include <random>
#include <vector>

namespace {

constexpr std::size_t kRows = 64, kDim = 128, kKeys = kvcache::detail::prefill_kv_tile;

struct tile_operands {
  std::vector<float> q, kt, s, v, o, corr;
  std::vector<const float*> krows, vrows;
  tile_operands()
      : q(kRows * kDim),
        kt(kDim * kKeys),
        s(kRows * kKeys),
        v(kKeys * kDim),
        o(kRows * kDim),
        corr(kRows, 1.0f) {
    std::mt19937 rng(7);
    std::normal_distribution<float> n(0.f, 0.1f);
    for (auto* x : {&q, &kt, &v})
      for (float& e : *x) e = n(rng);
    // The hand loops read q as Qt (dim, rows) and K as rows (keys, dim); the
    // values are the same random numbers either way.
    for (std::size_t j = 0; j < kKeys; ++j) {
      krows.push_back(kt.data() + j * kDim);
      vrows.push_back(v.data() + j * kDim);
    }
  }
};

using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void report(benchmark::State& state) {
  state.counters["gflops"] =
      benchmark::Counter(4e-9 * double(kRows * kKeys * kDim) * double(state.iterations()),
                         benchmark::Counter::kIsRate);
}

void tile_hand(benchmark::State& state) {
  tile_operands t;
  for (auto _ : state) {
    kvcache::detail::tile_scores(t.q.data(), t.krows.data(), t.s.data(), kRows, kKeys, kDim);
    kvcache::detail::tile_accumulate(t.s.data(), t.vrows.data(), t.o.data(), t.corr.data(), kRows,
                                     kKeys, kDim);
    benchmark::DoNotOptimize(t.o.data());
    benchmark::ClobberMemory();
  }
  report(state);
}

void tile_eigen(benchmark::State& state) {
  tile_operands t;
  Eigen::Map<const row_major> q(t.q.data(), kRows, kDim), kt(t.kt.data(), kDim, kKeys),
      v(t.v.data(), kKeys, kDim);
  Eigen::Map<row_major> s(t.s.data(), kRows, kKeys), o(t.o.data(), kRows, kDim);
  for (auto _ : state) {
    s.noalias() = q * kt;
    o.noalias() += s * v;  // corr = 1: the rescale is a separate, cheap pass either way
    benchmark::DoNotOptimize(t.o.data());
    benchmark::ClobberMemory();
  }
  report(state);
}

void tile_amx_bf16(benchmark::State& state) {
#if KVCACHE_HAS_AMX_BF16
  namespace ab = kvcache::detail::amx_bf16;
  if (!ab::usable(kRows, kDim)) {
    state.SkipWithError("the AMX tile unit is not available to this process");
    return;
  }
  tile_operands t;
  // Qt (dim, rows) as the prefill kernel holds it.
  std::vector<float> qt(kDim * kRows);
  for (std::size_t r = 0; r < kRows; ++r)
    for (std::size_t d = 0; d < kDim; ++d) qt[d * kRows + r] = t.q[r * kDim + d];
  std::vector<float> scratch(ab::scratch_floats(kRows, kDim, kKeys));
  ab::buffers b(scratch.data(), kRows, kDim, kKeys);
  kvcache::detail::amx::configure();
  ab::prepare_queries(qt.data(), kRows, kDim, b.qh, b.ql);
  for (auto _ : state) {
    ab::split_keys(t.krows.data(), kKeys, kDim, b.kh, b.kl);
    ab::split_values(t.vrows.data(), kKeys, kDim, b.vh, b.vl);
    ab::scores(b.qh, b.ql, b.kh, b.kl, t.s.data(), kRows, kKeys, kDim);
    ab::split_weights(t.s.data(), kRows, kKeys, b.ph, b.pl);
    ab::accumulate(b.ph, b.pl, b.vh, b.vl, t.o.data(), kRows, kKeys, kDim);
    benchmark::DoNotOptimize(t.o.data());
    benchmark::ClobberMemory();
  }
  kvcache::detail::amx::release();
  report(state);
#else
  state.SkipWithError("built without AMX-BF16");
#endif
}

// The tile unit's bf16 rate on one thread: back-to-back tdpbf16ps into four
// accumulators from operands already in tile registers, no loads or stores.
// Counter gflops: 2 x 16 x 16 x 32 FLOPs per instruction / time. The prefill
// kernel does three such products per fp16 product (two for bf16 rows), so a
// third (a half) of this is its ceiling.
void amx_bf16_peak(benchmark::State& state) {
#if KVCACHE_HAS_AMX_BF16
  if (!kvcache::detail::amx_bf16::usable(32, 32)) {
    state.SkipWithError("the AMX tile unit is not available to this process");
    return;
  }
  alignas(64) static std::uint16_t ones[4][512];
  for (auto& t : ones)
    for (auto& x : t) x = 0x3f80;  // 1.0
  kvcache::detail::amx::configure();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  KVCACHE_TILE_LOAD(4, ones[0], 64);
  KVCACHE_TILE_LOAD(5, ones[1], 64);
  KVCACHE_TILE_LOAD(6, ones[2], 64);
  KVCACHE_TILE_LOAD(7, ones[3], 64);
  constexpr int kSteps = 1024;
  for (auto _ : state)
    for (int i = 0; i < kSteps; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  alignas(64) float sink[256];
  KVCACHE_TILE_STORE(0, sink, 64);
  benchmark::DoNotOptimize(sink);
  kvcache::detail::amx::release();
  state.counters["gflops"] = benchmark::Counter(
      2e-9 * 16 * 16 * 32 * 4 * kSteps * double(state.iterations()), benchmark::Counter::kIsRate);
#else
  state.SkipWithError("built without AMX-BF16");
#endif
}

BENCHMARK(tile_hand)->Name("tile/hand")->ReportAggregatesOnly(true);
BENCHMARK(tile_eigen)->Name("tile/eigen")->ReportAggregatesOnly(true);
BENCHMARK(tile_amx_bf16)->Name("tile/amx_bf16")->ReportAggregatesOnly(true);
BENCHMARK(amx_bf16_peak)->Name("tile/amx_bf16_peak")->ReportAggregatesOnly(true);

}  // namespace
