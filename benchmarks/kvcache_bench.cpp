// kvcache_bench: decode and prefill attention on the CPU, judged against the
// machine's own ceilings measured in the same run:
//   read_bandwidth  multi-stream read of 1 GiB on all threads (decode's ceiling)
//   eigen_gemm      fp32 GEMM on all threads, column blocks per thread (prefill's)
// Decode: decode/<precision>/<storage>/<eviction>/<context>/<batch>, counters
// kv_bytes_per_second (K+V bytes read / time) and read_bw_fraction.
// Prefill: prefill/<precision>/contiguous/full/<tokens>/1, counters gflops and
// gemm_fraction. Shape: Llama-3-8B layer, 32 query heads, 8 KV heads, dim 128.
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace kvcache;
constexpr std::size_t QH = 32, KVH = 8, D = 128;
double g_read_bw = 0;     // bytes/s, best of the probe's repetitions
double g_gemm_flops = 0;  // FLOP/s

std::size_t hw_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

std::vector<float> random_floats(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

void read_bandwidth(benchmark::State& state) {
  using vf = float __attribute__((vector_size(64)));
  const std::size_t bytes = std::size_t(1) << 30, n = bytes / sizeof(float);
  std::vector<float> a(n, 1.0f);
  const std::size_t T = hw_threads();
  constexpr std::size_t S = 8;  // sequential streams per thread
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> th;
    std::vector<float> sums(T);
    for (std::size_t t = 0; t < T; ++t)
      th.emplace_back([&, t] {
        const std::size_t per = n / T, ps = per / S / 16 * 16;
        const float* p = a.data() + t * per;
        vf acc[S] = {};
        for (std::size_t i = 0; i < ps; i += 16)
          for (std::size_t s = 0; s < S; ++s) {
            vf v;
            std::memcpy(&v, p + s * ps + i, sizeof v);
            acc[s] += v;
          }
        float r = 0;
        for (auto& x : acc) r += x[0];
        sums[t] = r;
      });
    for (auto& x : th) x.join();
    benchmark::DoNotOptimize(sums.data());
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    g_read_bw = std::max(g_read_bw, bytes / sec);
  }
  state.SetBytesProcessed(state.iterations() * bytes);
}

void eigen_gemm(benchmark::State& state) {
  const int N = 1024;
  const std::size_t T = hw_threads();
  Eigen::MatrixXf A = Eigen::MatrixXf::Random(N, N), B = Eigen::MatrixXf::Random(N, N), C(N, N);
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> th;
    for (std::size_t t = 0; t < T; ++t)
      th.emplace_back([&, t] {
        const int c0 = int(t * N / T), c1 = int((t + 1) * N / T);
        C.middleCols(c0, c1 - c0).noalias() = A * B.middleCols(c0, c1 - c0);
      });
    for (auto& x : th) x.join();
    benchmark::DoNotOptimize(C.data());
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    g_gemm_flops = std::max(g_gemm_flops, 2.0 * N * N * N / sec);
  }
  state.counters["gflops"] =
      benchmark::Counter(2.0 * N * N * N * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// One decoded token per sequence per iteration, over a cache filled with
// `context` tokens by write() alone (no prefill attention in the setup). The
// timed region is write + attend of one layer. Sequences are refilled outside
// the timing when they reach capacity.
template <class P>
void decode(benchmark::State& state, std::size_t context, std::size_t batch) {
  constexpr std::size_t margin = 512;
  cache<gqa<D>, contiguous, full, P> kv(
      {.layers = 1, .q_heads = QH, .kv_heads = KVH, .max_tokens = batch * (context + margin)});
  const auto kvals = random_floats(context * KVH * D, 1);
  const auto q = random_floats(batch * QH * D, 2), knew = random_floats(batch * KVH * D, 3);
  std::vector<float> out(batch * QH * D);
  std::vector<seq_id> seqs;
  auto fill = [&] {
    for (auto s : seqs) kv.remove_sequence(s);
    seqs.clear();
    std::vector<append> a;
    for (std::size_t b = 0; b < batch; ++b) {
      seqs.push_back(kv.add_sequence(context + margin));
      auto st = kv.begin_step({{seqs.back(), context - 1}});
      kv.write(0, st, make_view(kvals.data(), context - 1, KVH, D),
               make_view(kvals.data(), context - 1, KVH, D));
    }
  };
  fill();
  std::vector<append> step_appends;
  for (auto s : seqs) step_appends.push_back({s, 1});
  std::size_t used = 0;
  for (auto _ : state) {
    if (used == margin - 1) {
      state.PauseTiming();
      fill();
      step_appends.clear();
      for (auto s : seqs) step_appends.push_back({s, 1});
      used = 0;
      state.ResumeTiming();
    }
    auto st = kv.begin_step(step_appends);
    kv.write(0, st, make_view(knew.data(), batch, KVH, D), make_view(knew.data(), batch, KVH, D));
    kv.attend(0, st, make_view(q.data(), batch, QH, D), make_view(out.data(), batch, QH, D));
    ++used;
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = double(batch) * context * 2 * KVH * P::row_bytes(D);
  state.counters["kv_bytes_per_second"] =
      benchmark::Counter(bytes * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["read_bw_fraction"] = benchmark::Counter(
      g_read_bw > 0 ? bytes * state.iterations() / g_read_bw : 0, benchmark::Counter::kIsRate);
}

// Causal prefill of `tokens` tokens on an empty sequence; the sequence is
// removed outside the timing.
template <class P>
void prefill(benchmark::State& state, std::size_t tokens) {
  cache<gqa<D>, contiguous, full, P> kv(
      {.layers = 1, .q_heads = QH, .kv_heads = KVH, .max_tokens = tokens});
  const auto k = random_floats(tokens * KVH * D, 4), q = random_floats(tokens * QH * D, 5);
  std::vector<float> out(tokens * QH * D);
  for (auto _ : state) {
    const seq_id s = kv.add_sequence();
    auto st = kv.begin_step({{s, tokens}});
    kv.write(0, st, make_view(k.data(), tokens, KVH, D), make_view(k.data(), tokens, KVH, D));
    kv.attend(0, st, make_view(q.data(), tokens, QH, D), make_view(out.data(), tokens, QH, D));
    benchmark::DoNotOptimize(out.data());
    state.PauseTiming();
    kv.remove_sequence(s);
    state.ResumeTiming();
  }
  const double flops = 4.0 * QH * D * (double(tokens) * (tokens + 1) / 2);
  state.counters["gflops"] =
      benchmark::Counter(flops * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.counters["gemm_fraction"] =
      benchmark::Counter(g_gemm_flops > 0 ? flops * state.iterations() / g_gemm_flops : 0,
                         benchmark::Counter::kIsRate);
}

template <class P>
void register_precision() {
  const std::string p(P::name);
  for (std::size_t batch : {1, 8})
    for (std::size_t ctx : {4096, 16384, 32768})
      benchmark::RegisterBenchmark(
          ("decode/" + p + "/contiguous/full/" + std::to_string(ctx) + "/" + std::to_string(batch))
              .c_str(),
          [=](benchmark::State& s) { decode<P>(s, ctx, batch); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->MinTime(0.3)
          ->Repetitions(5)
          ->ReportAggregatesOnly(true);
  for (std::size_t tokens : {512, 2048})
    benchmark::RegisterBenchmark(
        ("prefill/" + p + "/contiguous/full/" + std::to_string(tokens) + "/1").c_str(),
        [=](benchmark::State& s) { prefill<P>(s, tokens); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->Iterations(tokens > 1000 ? 2 : 5)
        ->Repetitions(3)
        ->ReportAggregatesOnly(true);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  // The ceilings first: their results scale the fractions reported below.
  benchmark::RegisterBenchmark("read_bandwidth", read_bandwidth)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(3)
      ->Repetitions(3);
  benchmark::RegisterBenchmark("eigen_gemm", eigen_gemm)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(5)
      ->Repetitions(3);
  register_precision<fp32>();
  register_precision<fp16>();
  register_precision<bf16>();
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
