// kvcache_bench: CPU decode and prefill attention, each judged against a
// ceiling of this machine measured in the same run.
//
//   read_bandwidth   multi-stream read of 1 GiB on all hardware threads: the
//                    ceiling of decode, which reads every K/V byte once per token
//   eigen_gemm       fp32 1024^3 Eigen GEMM on all hardware threads (output
//                    columns split across std::threads): the ceiling of prefill
//   decode/<precision>/<storage>/<eviction>/<context>/<batch>
//                    one decoded token per sequence; counters
//                    kv_bytes_per_second (K+V bytes read / time) and
//                    read_bw_fraction (that / the best read_bandwidth pass)
//   prefill/<precision>/contiguous/full/<tokens>/1
//                    causal prefill of one prompt; counters gflops
//                    (4 x q_heads x head_dim x n(n+1)/2 FLOPs / time) and
//                    gemm_fraction (that / the best eigen_gemm pass)
//
// Shape: one Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128).
//
// Defaults (each overridable on the command line, later flags win):
// --benchmark_min_time=0.2 --benchmark_repetitions=5, aggregates only; the
// summary printed at the end quotes the medians. They are flags rather than
// MinTime()/Repetitions() so that the reported names stay the registered ones
// (the library appends "min_time:..."/"repeats:..." for per-benchmark
// settings); UseRealTime() still appends "/real_time", which the summary drops.
// Filters match the reported names: --benchmark_filter='decode/fp16/.*/32768/1/'.
//
// Cache residency: a decode step cycles through as many layers as it takes to
// touch 1 GiB of K/V (layers_for), more than any last-level cache here, so
// every layer is read from DRAM, as in a real model; one begin_step plans the
// step and each layer runs write + attend. The probe reads 1 GiB as well.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace kvcache;

// ---- shape and sizes --------------------------------------------------------

constexpr std::size_t kQHeads = 32, kKVHeads = 8, kHeadDim = 128;
constexpr std::size_t kContexts[] = {4096, 16384, 32768};
constexpr std::size_t kBatches[] = {1, 8};
constexpr std::size_t kPrefillTokens[] = {512, 2048};
constexpr std::size_t kMaxContext = 32768;
constexpr std::size_t kMaxPrefill = 2048;
// Decode sequences get this many free slots beyond their context: a fill lasts
// kDecodeMargin steps before it is redone outside the timing, so the context
// read drifts by at most 64 tokens (1.6% at 4096), and the byte counts below
// use the true lengths.
constexpr std::size_t kDecodeMargin = 64;
constexpr std::size_t kFillChunk = 512;
constexpr std::size_t kProbeBytes = std::size_t{1} << 30;
constexpr std::size_t kEvictBytes = std::size_t{1} << 30;  // K/V touched per decode step
constexpr std::size_t kMaxLayers = 64;
constexpr std::size_t kProbeStreams = 8;  // sequential read streams per thread
constexpr int kGemmN = 1024;

std::size_t hw_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

//! Runs f(t) for t in [0, hw_threads()), t = 0 on the calling thread, and
//! waits for all. Spawning costs tens of microseconds, against passes of tens
//! of milliseconds, so the ceilings need no persistent pool.
template <class F>
void on_all_threads(F&& f) {
  std::vector<std::jthread> workers;
  for (std::size_t t = 1; t < hw_threads(); ++t) workers.emplace_back([&f, t] { f(t); });
  f(0);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- random inputs ----------------------------------------------------------

std::vector<float> random_normals(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Generated once and shared by every benchmark: 2 x 128 MiB of normals take
// about a second, too long to redo per repetition. Their values do not change
// the kernels' speed; non-zero, non-constant data only keeps them honest.
const std::vector<float>& source_k() {
  static const auto v = random_normals(kMaxContext * kKVHeads * kHeadDim, 1);
  return v;
}
const std::vector<float>& source_v() {
  static const auto v = random_normals(kMaxContext * kKVHeads * kHeadDim, 2);
  return v;
}
const std::vector<float>& source_q() {
  static const auto v =
      random_normals(std::max<std::size_t>(kMaxPrefill, 8) * kQHeads * kHeadDim, 3);
  return v;
}

// ---- ceilings ---------------------------------------------------------------

// Every pass of the ceilings is recorded. The fractions divide by the best
// pass: on a shared VM the median swings with the neighbours' load while the
// best pass is what the machine demonstrably sustains, and it varies less
// from run to run. The summary quotes both.
std::vector<double> g_read_bw;     // bytes/s of each read_bandwidth pass
std::vector<double> g_gemm_flops;  // FLOP/s of each eigen_gemm pass

double best_of(const std::vector<double>& v) {
  return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
}
double median_of(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The probe's 1 GiB, allocated on first use and freed when decode starts (the
// largest decode cache needs 2 GiB of its own).
// It comes from the cpu backend's allocator, as the caches' memory does, so
// that both get the same page size (transparent huge pages where the system
// grants them): a ceiling measured on smaller pages would flatter the kernels.
struct probe_buffer {
  float* data = nullptr;
  bool empty() const { return data == nullptr; }
  void allocate() {
    data = static_cast<float*>(cpu::allocate(kProbeBytes));
    std::fill(data, data + kProbeBytes / sizeof(float), 1.0f);
  }
  void release() {
    if (data) cpu::deallocate(data, kProbeBytes);
    data = nullptr;
  }
};
probe_buffer g_probe_buffer;

void release_probe_buffer() { g_probe_buffer.release(); }

// Vectors of 16 floats: one zmm register with AVX-512, two ymm with AVX2.
using probe_vec = float __attribute__((vector_size(64)));
constexpr std::size_t kProbeLanes = sizeof(probe_vec) / sizeof(float);

//! Floats of one thread's slice; of one of its streams; bytes one pass reads.
std::size_t probe_slice() { return kProbeBytes / sizeof(float) / hw_threads(); }
std::size_t probe_stream() { return probe_slice() / kProbeStreams / kProbeLanes * kProbeLanes; }
double probe_pass_bytes() {
  return double(hw_threads() * kProbeStreams * probe_stream() * sizeof(float));
}

//! One pass of the read probe; records and returns its bytes/s. Each thread
//! reads its slice of the buffer as kProbeStreams interleaved sequential
//! streams (one stream per thread leaves the hardware prefetchers idle at each
//! page boundary, as the decode kernel's comments note), adding 64-byte
//! vectors into independent accumulators so the loop is bound by the loads,
//! not by the latency of the adds.
double read_pass() {
  using vf = probe_vec;
  constexpr std::size_t lanes = kProbeLanes;
  if (g_probe_buffer.empty()) g_probe_buffer.allocate();
  const float* data = g_probe_buffer.data;
  const std::size_t slice = probe_slice(), stream = probe_stream();
  std::vector<float> sums(hw_threads());
  const auto t0 = std::chrono::steady_clock::now();
  on_all_threads([&](std::size_t t) {
    const float* p = data + t * slice;
    vf acc[kProbeStreams] = {};
    for (std::size_t i = 0; i < stream; i += lanes)
      for (std::size_t s = 0; s < kProbeStreams; ++s) {
        vf x;
        std::memcpy(&x, p + s * stream + i, sizeof x);
        acc[s] += x;
      }
    // Every lane feeds the result, so the compiler cannot drop any load.
    float r = 0.f;
    for (const vf& a : acc)
      for (std::size_t l = 0; l < lanes; ++l) r += a[l];
    sums[t] = r;
  });
  const double sec = seconds_since(t0);
  benchmark::DoNotOptimize(sums.data());
  benchmark::ClobberMemory();
  const double bw = probe_pass_bytes() / sec;
  g_read_bw.push_back(bw);
  return bw;
}

void read_bandwidth(benchmark::State& state) {
  // The first pass allocates and first-touches the buffer: page faults, not
  // reads. Run it untimed and forget its rate.
  if (g_probe_buffer.empty()) {
    read_pass();
    g_read_bw.pop_back();
  }
  for (auto _ : state) read_pass();
  state.SetBytesProcessed(
      static_cast<std::int64_t>(probe_pass_bytes() * double(state.iterations())));
}

//! The read ceiling for read_bw_fraction: the best probe pass. When a filter
//! left read_bandwidth out, three passes are measured here, untimed.
double read_ceiling() {
  if (g_read_bw.empty()) {
    std::fprintf(stderr,
                 "kvcache_bench: read_bandwidth did not run; measuring it for "
                 "read_bw_fraction\n");
    read_pass();  // first touch
    g_read_bw.clear();
    for (int i = 0; i < 3; ++i) read_pass();
  }
  return best_of(g_read_bw);
}

struct gemm_operands {
  Eigen::MatrixXf a, b, c;
};

gemm_operands& gemm_data() {
  static gemm_operands g = [] {
    const auto n = static_cast<std::size_t>(kGemmN) * kGemmN;
    const auto a = random_normals(n, 4), b = random_normals(n, 5);
    return gemm_operands{Eigen::Map<const Eigen::MatrixXf>(a.data(), kGemmN, kGemmN),
                         Eigen::Map<const Eigen::MatrixXf>(b.data(), kGemmN, kGemmN),
                         Eigen::MatrixXf(kGemmN, kGemmN)};
  }();
  return g;
}

//! One all-core fp32 GEMM, C = A B; records and returns its FLOP/s. Eigen is
//! single-threaded without OpenMP, so each thread computes its own block of
//! C's columns: the same all-core setting the cache's kernels run in.
double gemm_pass() {
  auto& g = gemm_data();
  const std::size_t T = hw_threads();
  const auto t0 = std::chrono::steady_clock::now();
  on_all_threads([&](std::size_t t) {
    const auto c0 = static_cast<Eigen::Index>(t * kGemmN / T);
    const auto c1 = static_cast<Eigen::Index>((t + 1) * kGemmN / T);
    g.c.middleCols(c0, c1 - c0).noalias() = g.a * g.b.middleCols(c0, c1 - c0);
  });
  const double sec = seconds_since(t0);
  benchmark::DoNotOptimize(g.c.data());
  benchmark::ClobberMemory();
  const double flops = 2.0 * kGemmN * kGemmN * kGemmN / sec;
  g_gemm_flops.push_back(flops);
  return flops;
}

void eigen_gemm(benchmark::State& state) {
  // Warm-up, forgotten: pages in C and runs Eigen's one-time cache-size query.
  if (g_gemm_flops.empty()) {
    gemm_pass();
    g_gemm_flops.pop_back();
  }
  for (auto _ : state) gemm_pass();
  state.counters["gflops"] = benchmark::Counter(
      2e-9 * kGemmN * kGemmN * kGemmN * double(state.iterations()), benchmark::Counter::kIsRate);
}

//! The GEMM ceiling for gemm_fraction, measured here when filtered out.
double gemm_ceiling() {
  if (g_gemm_flops.empty()) {
    std::fprintf(stderr,
                 "kvcache_bench: eigen_gemm did not run; measuring it for "
                 "gemm_fraction\n");
    gemm_pass();
    g_gemm_flops.clear();
    for (int i = 0; i < 5; ++i) gemm_pass();
  }
  return best_of(g_gemm_flops);
}

// ---- timing helper ----------------------------------------------------------

//! Wall time of a benchmark loop without its paused stretches, mirroring
//! State::PauseTiming/ResumeTiming. The decode and prefill counters are
//! computed from it rather than as kIsRate counters so that the console shows
//! read_bw_fraction as a plain ratio (a rate counter prints "0.31/s").
class timed_region {
 public:
  void pause(benchmark::State& state) {
    state.PauseTiming();
    paused_at_ = std::chrono::steady_clock::now();
  }
  void resume(benchmark::State& state) {
    paused_ += seconds_since(paused_at_);
    state.ResumeTiming();
  }
  double seconds() const { return seconds_since(start_) - paused_; }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), paused_at_;
  double paused_ = 0;
};

// ---- decode -----------------------------------------------------------------

// Google Benchmark calls a benchmark's function once to size the iteration
// count and once per repetition. Filling a 32768-token batch of 8 writes 2 GiB,
// so the filled cache is kept across those calls: one fixture lives at a time
// and is rebuilt when another benchmark starts.
struct fixture {
  virtual ~fixture() = default;
};
std::unique_ptr<fixture> g_fixture;
std::string g_fixture_key;

template <class F, class... A>
F& fixture_for(const std::string& key, A... args) {
  if (g_fixture_key != key || !g_fixture) {
    g_fixture.reset();  // free the previous cache before allocating the next
    g_fixture_key.clear();
    g_fixture = std::make_unique<F>(args...);
    g_fixture_key = key;
  }
  return static_cast<F&>(*g_fixture);
}

//! Layers a decode fixture cycles through so that one step touches at least
//! kEvictBytes: each layer's K/V is then evicted from the last-level cache
//! before the next step reads it again, as in a real model, where the other
//! layers' caches stand between two reads of one layer. With one layer, a
//! 32k-token fp16 cache (128 MiB) stays resident in a large L3 (480 MiB on
//! the development machine) and would be timed at L3 rather than DRAM speed.
std::size_t layers_for(std::size_t context, std::size_t batch, std::size_t row_bytes) {
  const std::size_t per_layer = batch * context * 2 * kKVHeads * row_bytes;
  return std::clamp<std::size_t>((kEvictBytes + per_layer - 1) / per_layer, 1, kMaxLayers);
}

//! The decode benchmarks' cache: one Llama-3-8B layer shape, `layers` deep.
template <class Cache>
cache_config decode_config(std::size_t layers, std::size_t max_tokens) {
  return {.layers = layers,
          .q_heads = kQHeads,
          .kv_heads = kKVHeads,
          .max_tokens = max_tokens,
          .threads = 0};
}

template <class Cache>
struct decode_fixture : fixture {
  using cache_t = Cache;
  using P = typename Cache::precision;

  decode_fixture(std::size_t context_, std::size_t batch_)
      : context(context_),
        batch(batch_),
        layers(layers_for(context_, batch_, P::row_bytes(kHeadDim))),
        kv(decode_config<Cache>(layers, batch_ * (context_ + kDecodeMargin))),
        out(batch_ * kQHeads * kHeadDim) {
    fill();
  }

  //! (Re)fills every sequence with context - 1 tokens through write() alone:
  //! the cache holds what a prefill would have left, without paying for
  //! prefill attention. The first decode step then reads exactly `context`.
  //! The batch is filled round-robin in kFillChunk-token steps, so that paged
  //! storage interleaves the sequences' pages in its pool as serving would.
  void fill() {
    for (seq_id s : seqs) kv.remove_sequence(s);
    seqs.clear();
    appends.clear();
    for (std::size_t b = 0; b < batch; ++b) {
      seqs.push_back(kv.add_sequence(context + kDecodeMargin));
      appends.push_back({seqs.back(), 1});
    }
    std::vector<append> chunk;
    for (std::size_t done = 0; done < context - 1; done += kFillChunk) {
      const std::size_t n = std::min(kFillChunk, context - 1 - done);
      chunk.clear();
      for (seq_id s : seqs) chunk.push_back({s, n});
      const step st = kv.begin_step(chunk);
      const std::size_t rows = n * batch;  // sources are reused cyclically
      const std::size_t src = done * batch % (kMaxContext - rows + 1) * kKVHeads * kHeadDim;
      for (std::size_t l = 0; l < layers; ++l)
        kv.write(l, st, make_view(source_k().data() + src, rows, kKVHeads, kHeadDim),
                 make_view(source_v().data() + src, rows, kKVHeads, kHeadDim));
    }
    decoded = 0;
  }

  //! One decode step: a new token for every sequence of the batch, planned,
  //! written and attended in one step.
  void decode_step() {
    const step st = kv.begin_step(appends);
    for (std::size_t l = 0; l < layers; ++l) {
      kv.write(l, st, make_view(source_k().data(), batch, kKVHeads, kHeadDim),
               make_view(source_v().data(), batch, kKVHeads, kHeadDim));
      kv.attend(l, st, make_view(source_q().data(), batch, kQHeads, kHeadDim),
                make_view(out.data(), batch, kQHeads, kHeadDim));
    }
    ++decoded;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }

  std::size_t context, batch, layers;
  cache_t kv;
  std::vector<seq_id> seqs;
  std::vector<append> appends;
  std::vector<float> out;
  std::size_t decoded = 0;  // steps since the last fill
};

//! Times begin_step + write + attend of one decoded token per sequence.
template <class Cache>
void decode(benchmark::State& state, const std::string& name, std::size_t context,
            std::size_t batch) {
  using P = typename Cache::precision;
  const double ceiling = read_ceiling();
  release_probe_buffer();
  auto& fx = fixture_for<decode_fixture<Cache>>(name, context, batch);
  // K and V bytes of one token, all KV heads (row_bytes includes any per-row
  // metadata of the precision; the float formats have none).
  const double token_bytes = 2.0 * kKVHeads * double(P::row_bytes(kHeadDim));
  double bytes = 0;
  timed_region timer;
  for (auto _ : state) {
    if (fx.decoded == kDecodeMargin) {
      timer.pause(state);
      fx.fill();
      timer.resume(state);
    }
    // Each sequence reads its context + the tokens decoded since the fill.
    bytes += double(fx.layers * batch) * double(context + fx.decoded) * token_bytes;
    fx.decode_step();
  }
  const double rate = bytes / timer.seconds();
  state.counters["kv_bytes_per_second"] = rate;
  state.counters["read_bw_fraction"] = rate / ceiling;
}

// ---- prefill ----------------------------------------------------------------

//! Causal prefill of `tokens` new tokens on an empty sequence: begin_step,
//! write and attend are timed; the sequence is replaced by an empty one
//! outside the timing.
template <class P>
void prefill(benchmark::State& state, std::size_t tokens) {
  const double ceiling = gemm_ceiling();
  g_fixture.reset();  // free the last decode cache
  g_fixture_key.clear();
  cache<gqa<kHeadDim>, contiguous, full, P> kv(
      {.layers = 1, .q_heads = kQHeads, .kv_heads = kKVHeads, .max_tokens = tokens, .threads = 0});
  const auto k = make_view(source_k().data(), tokens, kKVHeads, kHeadDim);
  const auto v = make_view(source_v().data(), tokens, kKVHeads, kHeadDim);
  const auto q = make_view(source_q().data(), tokens, kQHeads, kHeadDim);
  std::vector<float> out_buf(tokens * kQHeads * kHeadDim);
  const auto out = make_view(out_buf.data(), tokens, kQHeads, kHeadDim);
  seq_id s = kv.add_sequence(tokens);
  timed_region timer;
  for (auto _ : state) {
    const step st = kv.begin_step({{s, tokens}});
    kv.write(0, st, k, v);
    kv.attend(0, st, q, out);
    benchmark::DoNotOptimize(out_buf.data());
    benchmark::ClobberMemory();
    timer.pause(state);
    kv.remove_sequence(s);
    s = kv.add_sequence(tokens);
    timer.resume(state);
  }
  // QK^T and PV over the causal triangle: 2 FLOPs per multiply-add, 2 GEMMs.
  const double n = double(tokens);
  const double flops = 4.0 * kQHeads * kHeadDim * (n * (n + 1) / 2) * double(state.iterations());
  const double rate = flops / timer.seconds();
  state.counters["gflops"] = rate * 1e-9;
  state.counters["gemm_fraction"] = rate / ceiling;
}

// ---- paged storage ------------------------------------------------------------
//
//   decode/fp16/paged16/full/<context>/<batch>
//                    as decode/fp16/contiguous/..., on paged<16> storage; a batch
//                    is filled round-robin in 512-token chunks so that the
//                    sequences' pages interleave in the pool
//   cascade/fp16/paged16/full/4096+64/8, cascade_off/...
//                    8 sequences forked from one 4096-token prefix, each with
//                    64 private tokens, decoding one token each; with and
//                    without cascade attention; 64 layers, so the shared
//                    prefix alone is 1 GiB per step. kv_bytes_per_second counts the
//                    bytes attended (as if unshared); bytes_read_ratio is what
//                    plain decode reads over what the cascade reads;
//                    time_ratio (on the cascade row) is cascade_off's mean
//                    step time over the cascade's, from the same run
//   ops/fp16/paged16/<op>/32768
//                    fork, truncate (of 8 and of 16384 tokens) and match_prefix
//                    of a 32768-token sequence (2048 pages); manual timing of
//                    the call alone, the undo outside it

using paged16_cache = cache<gqa<kHeadDim>, paged<16>, full, fp16>;
constexpr std::size_t kSharedPrefix = 4096, kPrivateSuffix = 64, kSharingBatch = 8;
constexpr std::size_t kOpsContext = 32768;

cache_config paged_config(std::size_t max_tokens, std::size_t cascade_min_tokens = 256,
                          std::size_t layers = 1) {
  return {.layers = layers,
          .q_heads = kQHeads,
          .kv_heads = kKVHeads,
          .max_tokens = max_tokens,
          .threads = 0,
          .cascade_min_tokens = cascade_min_tokens};
}

//! Appends `n` tokens to every sequence of `seqs` in one step and writes them.
void append_written(paged16_cache& kv, const std::vector<seq_id>& seqs, std::size_t n,
                    std::size_t source_offset = 0) {
  std::vector<append> ap;
  for (seq_id s : seqs) ap.push_back({s, n});
  const step st = kv.begin_step(ap);
  const std::size_t rows = n * seqs.size(), row = kKVHeads * kHeadDim;
  // Sources are reused cyclically: their values do not change the timing.
  std::vector<float> k(rows * row), v(rows * row);
  for (std::size_t r = 0; r < rows; ++r) {
    const std::size_t src = (source_offset + r) % kMaxContext * row;
    std::copy_n(source_k().data() + src, row, k.data() + r * row);
    std::copy_n(source_v().data() + src, row, v.data() + r * row);
  }
  for (std::size_t l = 0; l < kv.layout().layers; ++l)
    kv.write(l, st, make_view<const float>(k.data(), rows, kKVHeads, kHeadDim),
             make_view<const float>(v.data(), rows, kKVHeads, kHeadDim));
}

//! 8 sequences sharing a 4096-token prefix, each with 64 private tokens, in
//! as many layers as put the shared prefix alone over kEvictBytes: each
//! layer's pages come from memory, as in a model, not from the last-level cache.
struct sharing_fixture : fixture {
  explicit sharing_fixture(bool cascade_)
      : kv(paged_config(kSharedPrefix + kSharingBatch * (kPrivateSuffix + kDecodeMargin + 16),
                        cascade_ ? 256 : 0,
                        layers_for(kSharedPrefix, 1, fp16::row_bytes(kHeadDim)))),
        out(kSharingBatch * kQHeads * kHeadDim) {
    const seq_id root = kv.add_sequence(kSharedPrefix + kPrivateSuffix + kDecodeMargin);
    for (std::size_t done = 0; done < kSharedPrefix; done += kFillChunk)
      append_written(kv, {root}, kFillChunk, done);
    seqs.push_back(root);
    for (std::size_t b = 1; b < kSharingBatch; ++b) seqs.push_back(kv.fork(root));
    append_written(kv, seqs, kPrivateSuffix - 1, kSharedPrefix);
    for (seq_id s : seqs) appends.push_back({s, 1});
  }
  //! Drops the decoded tokens: the next step reads 4096 + 64 tokens again.
  void rewind() {
    for (seq_id s : seqs) kv.truncate(s, kSharedPrefix + kPrivateSuffix - 1);
    decoded = 0;
  }
  bool step_is_cascaded() {
    const step st = kv.begin_step(appends);
    const bool c = st.cascaded() == kSharingBatch;
    rewind();
    return c;
  }
  void decode_step() {
    const step st = kv.begin_step(appends);
    for (std::size_t l = 0; l < kv.layout().layers; ++l) {
      kv.write(l, st, make_view(source_k().data(), kSharingBatch, kKVHeads, kHeadDim),
               make_view(source_v().data(), kSharingBatch, kKVHeads, kHeadDim));
      kv.attend(l, st, make_view(source_q().data(), kSharingBatch, kQHeads, kHeadDim),
                make_view(out.data(), kSharingBatch, kQHeads, kHeadDim));
    }
    ++decoded;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  paged16_cache kv;
  std::vector<seq_id> seqs;
  std::vector<append> appends;
  std::vector<float> out;
  std::size_t decoded = 0;
};

double g_cascade_off_step = 0;  // mean seconds per step of the last cascade_off run

void shared_decode(benchmark::State& state, const std::string& name, bool cascade) {
  release_probe_buffer();
  auto& fx = fixture_for<sharing_fixture>(name, cascade);
  if (fx.step_is_cascaded() != cascade) {
    state.SkipWithError("the step was not planned as expected");
    return;
  }
  // Bytes of one token's K and V over all the fixture's layers.
  const double token_bytes =
      2.0 * kKVHeads * double(fp16::row_bytes(kHeadDim)) * double(fx.kv.layout().layers);
  double attended = 0, read = 0;
  timed_region timer;
  for (auto _ : state) {
    if (fx.decoded == kDecodeMargin) {
      timer.pause(state);
      fx.rewind();
      timer.resume(state);
    }
    const double own = double(kPrivateSuffix + fx.decoded);
    attended += double(kSharingBatch) * (double(kSharedPrefix) + own) * token_bytes;
    read += (double(kSharedPrefix) + double(kSharingBatch) * own) * token_bytes;
    fx.decode_step();
  }
  const double sec = timer.seconds();
  state.counters["kv_bytes_per_second"] = attended / sec;
  state.counters["bytes_read_ratio"] = attended / read;
  const double per_step = sec / double(state.iterations());
  if (!cascade)
    g_cascade_off_step = per_step;
  else if (g_cascade_off_step > 0)
    state.counters["time_ratio"] = g_cascade_off_step / per_step;
}

//! One 32768-token sequence whose pages are published (prompt ids given).
struct ops_fixture : fixture {
  ops_fixture() : kv(paged_config(4 * kOpsContext)) {
    for (std::size_t i = 0; i <= kOpsContext; ++i)
      ids.push_back(static_cast<token_id>(mix(i) % 32000));
    s = kv.add_sequence(2 * kOpsContext);
    for (std::size_t done = 0; done < kOpsContext; done += kFillChunk) {
      const step st = kv.begin_step(
          {{s, kFillChunk, std::span<const token_id>(ids).subspan(done, kFillChunk)}});
      (void)st;  // K/V values do not change the cost of these operations
    }
    kv.truncate(s, kOpsContext);  // a change: publishes the last step's pages
  }
  static std::uint64_t mix(std::uint64_t x) {
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    return x ^ (x >> 27);
  }
  paged16_cache kv;
  std::vector<token_id> ids;
  seq_id s{};
};

template <class Op, class Undo>
void timed_op(benchmark::State& state, Op op, Undo undo) {
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    op();
    state.SetIterationTime(seconds_since(t0));
    undo();
  }
}

void paged_op(benchmark::State& state, const std::string& name, const std::string& op) {
  release_probe_buffer();
  auto& fx = fixture_for<ops_fixture>(name);
  auto& kv = fx.kv;
  seq_id other{};
  if (op == "fork") {
    timed_op(
        state, [&] { other = kv.fork(fx.s); }, [&] { kv.remove_sequence(other); });
  } else if (op == "truncate8" || op == "truncate16384") {
    const std::size_t n = op == "truncate8" ? 8 : 16384;
    timed_op(
        state, [&] { kv.truncate(fx.s, kOpsContext - n); },
        [&] {
          kv.begin_step({{fx.s, n}});
        });
  } else if (op == "match_prefix") {
    std::size_t got = 0;
    timed_op(
        state,
        [&] {
          auto m = kv.match_prefix(fx.ids);
          other = m.seq, got = m.tokens;
        },
        [&] { kv.remove_sequence(other); });
    if (got != kOpsContext) state.SkipWithError("match_prefix did not find the whole prefix");
  }
  state.counters["pages"] = double(kOpsContext / 16);
}

void register_paged() {
  for (bool cascade : {false, true}) {
    const std::string name =
        std::string(cascade ? "cascade" : "cascade_off") + "/fp16/paged16/full/4096+64/8";
    benchmark::RegisterBenchmark(name.c_str(),
                                 [=](benchmark::State& s) { shared_decode(s, name, cascade); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->ReportAggregatesOnly(true);
  }
  for (const char* op : {"fork", "truncate8", "truncate16384", "match_prefix"}) {
    const std::string name = std::string("ops/fp16/paged16/") + op + "/32768";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { paged_op(s, name, op); })
        ->Unit(benchmark::kMicrosecond)
        ->UseManualTime()
        ->ReportAggregatesOnly(true);
  }
}

// ---- end of paged storage -------------------------------------------------------

// ---- windowed eviction ----------------------------------------------------------
//
//   decode/fp16/<storage>/window<W>/<context>/1
//                    sliding_window<W>, no RoPE: once the context passes the
//                    window, every step reads the same W tokens, so time per
//                    token must stay flat with context (contiguous is a ring,
//                    paged16 returns pages that leave the window)
//   decode/fp16/contiguous/window<W>_rope_write/<context>/1
//                    sliding_window<W> with RoPE at absolute positions: keys
//                    rotated on write, queries before attention
//   decode/fp16/contiguous/sinks4_window<W>_rope_read/<context>/1
//                    attention_sinks<4, W> with RoPE at cache positions
//                    (StreamingLLM), the sinks scored against a second query
//
// A fixture fills context - 1 tokens through write() alone, in chunks, so the
// window has slid past evicted tokens, and then decodes; the cache never
// needs a refill (its size does not grow). Layers as for full decode, for the
// tokens the window keeps.

constexpr std::size_t kWindowChunk = 512;

template <class S, class E>
struct window_fixture : fixture {
  using cache_t = cache<gqa<kHeadDim>, S, E, fp16>;

  window_fixture(std::size_t sinks_, std::size_t window_, std::size_t context_, bool rope)
      : context(context_),
        kept(std::min(context_, sinks_ + window_)),
        layers(layers_for(kept, 1, fp16::row_bytes(kHeadDim))),
        kv({.layers = layers,
            .q_heads = kQHeads,
            .kv_heads = kKVHeads,
            .max_tokens = sinks_ + window_ + kWindowChunk + 64,
            .threads = 0,
            .sinks = sinks_,
            .window = window_,
            .rope = rope ? rope_config{.theta = 500000, .rotary_dim = kHeadDim} : rope_config{}}),
        out(kQHeads * kHeadDim) {
    s = kv.add_sequence(sinks_ + window_ + kWindowChunk);
    for (std::size_t done = 0; done + 1 < context;) {
      const std::size_t n = std::min(kWindowChunk, context - 1 - done);
      const step st = kv.begin_step({{s, n}});
      for (std::size_t l = 0; l < layers; ++l)
        kv.write(l, st, make_view(source_k().data(), n, kKVHeads, kHeadDim),
                 make_view(source_v().data(), n, kKVHeads, kHeadDim));
      done += n;
    }
  }

  void decode_step() {
    const step st = kv.begin_step({{s, 1}});
    for (std::size_t l = 0; l < layers; ++l) {
      kv.write(l, st, make_view(source_k().data(), 1, kKVHeads, kHeadDim),
               make_view(source_v().data(), 1, kKVHeads, kHeadDim));
      kv.attend(l, st, make_view(source_q().data(), 1, kQHeads, kHeadDim),
                make_view(out.data(), 1, kQHeads, kHeadDim));
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }

  std::size_t context, kept, layers;
  cache_t kv;
  seq_id s{};
  std::vector<float> out;
};

template <class S, class E>
void decode_window(benchmark::State& state, const std::string& name, std::size_t sinks,
                   std::size_t window, std::size_t context, bool rope) {
  const double ceiling = read_ceiling();
  release_probe_buffer();
  auto& fx = fixture_for<window_fixture<S, E>>(name, sinks, window, context, rope);
  const double token_bytes = 2.0 * kKVHeads * double(fp16::row_bytes(kHeadDim));
  double bytes = 0;
  timed_region timer;
  for (auto _ : state) {
    bytes += double(fx.layers) * double(fx.kv.kept(fx.s) + 1) * token_bytes;
    fx.decode_step();
  }
  const double rate = bytes / timer.seconds();
  state.counters["kv_bytes_per_second"] = rate;
  state.counters["read_bw_fraction"] = rate / ceiling;
}

template <class S, class E>
void register_window(const std::string& storage, const std::string& eviction, std::size_t sinks,
                     std::size_t window, std::size_t context, bool rope) {
  const std::string name =
      "decode/fp16/" + storage + "/" + eviction + "/" + std::to_string(context) + "/1";
  benchmark::RegisterBenchmark(
      name.c_str(),
      [=](benchmark::State& st) { decode_window<S, E>(st, name, sinks, window, context, rope); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->ReportAggregatesOnly(true);
}

void register_eviction() {
  using window_abs = sliding_window<dynamic, rope_positions::absolute>;
  using sinks_cache = attention_sinks<dynamic, dynamic, rope_positions::cache>;
  for (std::size_t context : {4096, 16384, 65536})
    register_window<contiguous, window_abs>("contiguous", "window4096", 0, 4096, context, false);
  for (std::size_t context : {4096, 65536})
    register_window<paged<16>, window_abs>("paged16", "window4096", 0, 4096, context, false);
  for (std::size_t w : {4096, 32768}) {
    const std::string ws = std::to_string(w);
    register_window<contiguous, window_abs>("contiguous", "window" + ws + "_rope_write", 0, w,
                                            2 * w, true);
    register_window<contiguous, sinks_cache>("contiguous", "sinks4_window" + ws + "_rope_read", 4,
                                             w, 2 * w, true);
  }
}

// ---- end of windowed eviction ---------------------------------------------------

// ---- registration -----------------------------------------------------------

//! decode/<precision>/<storage>/full/<context>/<batch> for one cache type;
//! `storage` is the name's storage part (paged<16> reads "paged16").
template <class Cache>
void register_decode(const std::string& storage) {
  using P = typename Cache::precision;
  for (std::size_t batch : kBatches)
    for (std::size_t context : kContexts) {
      const std::string name = "decode/" + std::string(P::name) + "/" + storage + "/" +
                               std::string(full::name) + "/" + std::to_string(context) + "/" +
                               std::to_string(batch);
      benchmark::RegisterBenchmark(
          name.c_str(), [=](benchmark::State& s) { decode<Cache>(s, name, context, batch); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->ReportAggregatesOnly(true);
    }
}

template <class P>
void register_prefill() {
  for (std::size_t tokens : kPrefillTokens) {
    const std::string name = "prefill/" + std::string(P::name) + "/" +
                             std::string(contiguous::name) + "/" + std::string(full::name) + "/" +
                             std::to_string(tokens) + "/1";
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { prefill<P>(s, tokens); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->ReportAggregatesOnly(true);
  }
}

// ---- quantized precisions (issue 5) -------------------------------------------
// Decode at every context and batch, and prefill, for each block-quantized
// precision; names as the float ones, e.g. decode/int8/contiguous/full/32768/1,
// decode/int4_asym_kchan/... and decode/int2_kchan_r128/... for per-channel keys
// (their fp16 residual is not counted in kv_bytes_per_second: at most R tokens).
// kv_bytes_per_second counts the bytes the quantized rows occupy (codes and
// fp16 metadata), so read_bw_fraction compares like with like; the speed-up
// over fp16 is the ratio of the medians (docs/performance.md).

template <class... P>
void register_quantized() {
  (register_decode<cache<gqa<kHeadDim>, contiguous, full, P>>("contiguous"), ...);
  (register_prefill<P>(), ...);
}

// ---- all --------------------------------------------------------------------

void register_all() {
  // The ceilings first: the fractions of everything after divide by them.
  benchmark::RegisterBenchmark("read_bandwidth", read_bandwidth)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->ReportAggregatesOnly(true);
  benchmark::RegisterBenchmark("eigen_gemm", eigen_gemm)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->ReportAggregatesOnly(true);
  register_decode<cache<gqa<kHeadDim>, contiguous, full, fp32>>("contiguous");
  register_decode<cache<gqa<kHeadDim>, contiguous, full, fp16>>("contiguous");
  register_decode<cache<gqa<kHeadDim>, contiguous, full, bf16>>("contiguous");
  register_decode<paged16_cache>("paged16");
  register_prefill<fp32>();
  register_prefill<fp16>();
  register_prefill<bf16>();
  register_paged();
  register_quantized<int8_kv<>, int4_kv<>, int4_kv<true>, int2_kv, fp8_e4m3_kv<>,
                     hadamard<int4_kv<>>, per_channel_k<int4_kv<true>>,
                     per_channel_k<int2_kv, 32, 128>>();
  register_eviction();
}

// ---- summary ----------------------------------------------------------------

//! Passes everything to the usual display reporter and keeps each benchmark's
//! median (or its only run, with --benchmark_repetitions=1) for the summary.
class summary_reporter : public benchmark::BenchmarkReporter {
 public:
  explicit summary_reporter(benchmark::BenchmarkReporter* display) : display_(display) {}

  bool ReportContext(const Context& context) override { return display_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      const bool single = r.run_type == Run::RT_Iteration && r.repetitions <= 1;
      if (median || single) rows_.push_back(r);
    }
    display_->ReportRuns(runs);
  }
  void Finalize() override { display_->Finalize(); }

  //! A Markdown table, so that docs can quote it as printed.
  void print(std::FILE* f, double total_seconds) const {
    std::fprintf(f, "\nkvcache_bench summary: medians, %zu threads, total %.0f s\n", hw_threads(),
                 total_seconds);
    std::fprintf(f,
                 "ceilings (per pass): read %.1f GB/s median, %.1f GB/s best; eigen_gemm %.1f "
                 "GFLOP/s median, %.1f best. Fractions divide by the best.\n\n",
                 median_of(g_read_bw) * 1e-9, best_of(g_read_bw) * 1e-9,
                 median_of(g_gemm_flops) * 1e-9, best_of(g_gemm_flops) * 1e-9);
    std::fprintf(f, "| benchmark | median | rate | fraction |\n| --- | ---: | ---: | ---: |\n");
    for (const Run& r : rows_) {
      const std::string& name = r.run_name.function_name;  // without "/real_time"
      std::string rate, fraction;
      if (const double c = counter(r, "kv_bytes_per_second"); c >= 0)
        rate = fmt("%.1f GB/s", c * 1e-9);
      if (const double c = counter(r, "bytes_per_second"); c >= 0)
        rate = fmt("%.1f GB/s", c * 1e-9);
      if (const double c = counter(r, "gflops"); c >= 0) rate = fmt("%.1f GFLOP/s", c);
      if (const double c = counter(r, "read_bw_fraction"); c >= 0) fraction = fmt("%.2f", c);
      if (const double c = counter(r, "gemm_fraction"); c >= 0) fraction = fmt("%.2f", c);
      std::fprintf(f, "| %s | %s %s | %s | %s |\n", name.c_str(),
                   fmt("%.3g", r.GetAdjustedRealTime()).c_str(),
                   benchmark::GetTimeUnitString(r.time_unit), rate.c_str(), fraction.c_str());
    }
    std::fflush(f);
  }

 private:
  static double counter(const Run& r, const char* name) {
    auto it = r.counters.find(name);
    return it == r.counters.end() ? -1.0 : it->second.value;
  }
  template <class... A>
  static std::string fmt(const char* format, A... args) {
    char buf[64];
    std::snprintf(buf, sizeof buf, format, args...);
    return buf;
  }

  benchmark::BenchmarkReporter* display_;
  std::vector<Run> rows_;
};

}  // namespace

int main(int argc, char** argv) {
  // Defaults that keep the whole run near a minute on two cores, given before
  // the user's arguments so that theirs win.
  std::vector<char*> args{argv[0]};
  char min_time[] = "--benchmark_min_time=0.2";
  char repetitions[] = "--benchmark_repetitions=5";
  args.push_back(min_time);
  args.push_back(repetitions);
  args.insert(args.end(), argv + 1, argv + argc);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;

  // The summary goes to stdout after the console table, and to stderr when
  // stdout carries JSON or CSV, which it would otherwise corrupt.
  bool console = true;
  for (int i = 1; i < argc; ++i)
    if (const std::string a = argv[i]; a.rfind("--benchmark_format=", 0) == 0)
      console = a == "--benchmark_format=console";

  register_all();
  summary_reporter reporter(benchmark::CreateDefaultDisplayReporter());
  const auto t0 = std::chrono::steady_clock::now();
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print(console ? stdout : stderr, seconds_since(t0));
  g_fixture.reset();
  benchmark::Shutdown();
  return 0;
}
