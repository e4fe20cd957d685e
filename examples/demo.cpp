// kvcache demo: a synthetic decode workload for named model presets. For each
// cache type it prints bytes per token, KV memory at 4k / 32k / 128k context
// (from the formula and from a live cache), the attention time per decoded
// token across all layers, and the attention error against an fp32 cache fed
// the same inputs; floating-point and quantized precisions side by side. Then a
// streaming run: attention_sinks<4, 1024> (StreamingLLM with RoPE at cache
// positions) on paged storage decodes --stream tokens, and memory_in_use()
// stays flat while a full cache would keep growing.
//
//   demo [--model NAME|all] [--context N] [--tokens N] [--threads N] [--stream N] [--quick]
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <random>
#include <string>
#include <vector>

using namespace kvcache;

namespace {

struct preset {
  const char* name;
  std::size_t layers, q_heads, kv_heads, head_dim;
  const char* note;
};

constexpr preset presets[] = {
    {"llama-2-7b", 32, 32, 32, 128, "MHA"},
    {"llama-3-8b", 32, 32, 8, 128, "GQA, group 4"},
    {"mistral-7b", 32, 32, 8, 128, "GQA, group 4 (its 4096 sliding window is not applied)"},
};

struct options {
  std::string model = "all";
  std::size_t context = 4096, tokens = 6, threads = 0, stream = 8000;
  bool quick = false;
};

struct row {
  std::string cache;
  std::size_t bytes_per_token;
  std::size_t formula[3], measured[3];
  double ms_per_token;
  double error;
};

constexpr std::size_t contexts[3] = {4096, 32768, 131072};

// Shared random inputs: a pool of unit-normal floats read at offsets, so every
// cache type sees identical K, V and Q without generating gigabytes.
struct inputs {
  std::vector<float> pool;
  explicit inputs(std::size_t n) : pool(n) {
    std::mt19937_64 rng(42);
    std::normal_distribution<float> d;
    for (auto& x : pool) x = d(rng);
  }
  const float* at(std::size_t offset, std::size_t len) const {
    return pool.data() + (offset * 7919) % (pool.size() - len);
  }
};

void progress(const std::string& what) { std::fprintf(stderr, "\r  %-70s", what.c_str()); }

template <class P>
row run(const preset& m, const options& o, const inputs& in, std::vector<float>& reference) {
  using Cache = cache<gqa<>, contiguous, full, P>;
  const std::size_t L = m.layers, Hq = m.q_heads, Hk = m.kv_heads, D = m.head_dim;
  row r;
  r.cache = fmt::format("gqa/contiguous/full/{}", P::name);
  const kv_shape shape{L, Hk, D};
  r.bytes_per_token = bytes_per_token<P>(shape);
  // Measured memory: a live one-layer cache per context (a full-size one
  // would need up to 64 GiB), times the layer count.
  for (int i = 0; i < 3; ++i) {
    r.formula[i] = kv_bytes<P>(shape, 1, contexts[i]);
    Cache one({.layers = 1,
               .q_heads = Hq,
               .kv_heads = Hk,
               .head_dim = D,
               .max_tokens = contexts[i],
               .threads = 1});
    one.add_sequence(contexts[i]);
    r.measured[i] = one.memory_in_use() * L;
  }

  // The decode workload: all layers, a prompt of `context` tokens written
  // without prefill attention, then `tokens` decode steps.
  Cache kv({.layers = L,
            .q_heads = Hq,
            .kv_heads = Hk,
            .head_dim = D,
            .max_tokens = o.context + o.tokens,
            .threads = o.threads});
  const seq_id s = kv.add_sequence();
  {
    auto st = kv.begin_step({{s, o.context}});
    for (std::size_t l = 0; l < L; ++l) {
      progress(fmt::format("{} {}: writing a {}-token prompt, layer {}/{}", m.name, P::name,
                           o.context, l + 1, L));
      const float* k = in.at(l, o.context * Hk * D);
      const float* v = in.at(l + 1000, o.context * Hk * D);
      kv.write(l, st, make_view(k, o.context, Hk, D), make_view(v, o.context, Hk, D));
    }
  }
  std::vector<float> out(Hq * D);
  std::vector<double> times;
  double err_num = 0, err_den = 0;
  const bool is_reference = std::is_same_v<P, fp32>;
  if (is_reference) reference.assign(o.tokens * L * Hq * D, 0.f);
  for (std::size_t t = 0; t < o.tokens; ++t) {
    progress(fmt::format("{} {}: decoding token {}/{}", m.name, P::name, t + 1, o.tokens));
    auto st = kv.begin_step({{s, 1}});
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t l = 0; l < L; ++l) {
      const std::size_t key = 5000 + t * L + l;
      kv.write(l, st, make_view(in.at(key, Hk * D), 1, Hk, D),
               make_view(in.at(key + 77, Hk * D), 1, Hk, D));
      kv.attend(l, st, make_view(in.at(key + 99, Hq * D), 1, Hq, D),
                make_view(out.data(), 1, Hq, D));
      float* ref = reference.data() + (t * L + l) * Hq * D;
      if (is_reference) {
        std::copy(out.begin(), out.end(), ref);
      } else {
        for (std::size_t i = 0; i < out.size(); ++i) {
          err_num += double(out[i] - ref[i]) * (out[i] - ref[i]);
          err_den += double(ref[i]) * ref[i];
        }
      }
    }
    times.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  r.ms_per_token = times[times.size() / 2];
  r.error = is_reference ? 0.0 : std::sqrt(err_num / err_den);
  return r;
}

std::string mib(std::size_t b) { return fmt::format("{:.1f}", b / 1048576.0); }

void print(const preset& m, const options& o, const std::vector<row>& rows) {
  std::fprintf(stderr, "\r%80s\r", "");
  fmt::print("\n{}: {} layers, {} query heads, {} KV heads, head_dim {} ({})\n", m.name, m.layers,
             m.q_heads, m.kv_heads, m.head_dim, m.note);
  fmt::print("decode: batch 1 at {} tokens of context, median of {} tokens, {} threads\n",
             o.context, o.tokens, o.threads);
  fmt::print("{:<34} {:>9} {:>9} {:>19} {:>19} {:>19} {:>10} {:>10}\n", "cache", "bits/elem",
             "B/token", "4k MiB form/meas", "32k MiB form/meas", "128k MiB form/meas", "ms/token",
             "err vs fp32");
  for (const row& r : rows) {
    const double bits =
        8.0 * double(r.bytes_per_token) / double(2 * m.layers * m.kv_heads * m.head_dim);
    fmt::print("{:<34} {:>9.3g} {:>9} {:>19} {:>19} {:>19} {:>10.2f} {:>10.2e}\n", r.cache, bits,
               r.bytes_per_token, mib(r.formula[0]) + " / " + mib(r.measured[0]),
               mib(r.formula[1]) + " / " + mib(r.measured[1]),
               mib(r.formula[2]) + " / " + mib(r.measured[2]), r.ms_per_token, r.error);
  }
}

//! Streams tokens through a StreamingLLM cache (Llama-3-8B head shape, two
//! layers to keep it quick), printing memory as the context grows.
void stream(const options& o, const inputs& in) {
  constexpr std::size_t L = 2, Hq = 32, Hk = 8, D = 128, S = 4, W = 1024;
  using Cache = cache<gqa<D>, paged<16>, attention_sinks<S, W>, fp16>;
  Cache kv({.layers = L,
            .q_heads = Hq,
            .kv_heads = Hk,
            .max_tokens = 4 * W,
            .threads = o.threads,
            .rope = {.theta = 500000, .rotary_dim = D}});
  const seq_id s = kv.add_sequence();
  const kv_shape shape{L, Hk, D};
  fmt::print(
      "\nstreaming: {} tokens through cache<gqa<128>, paged<16>, attention_sinks<4, 1024>, "
      "fp16>, {} layers, RoPE at cache positions\n",
      o.stream, L);
  fmt::print("{:>10} {:>8} {:>16} {:>20} {:>10}\n", "tokens", "kept", "memory_in_use MiB",
             "full cache would MiB", "ms/token");
  std::vector<float> out(Hq * D);
  const std::size_t every = std::max<std::size_t>(1, o.stream / 10);
  auto t0 = std::chrono::steady_clock::now();
  std::size_t peak = 0;
  for (std::size_t t = 0; t < o.stream; ++t) {
    auto st = kv.begin_step({{s, 1}});
    for (std::size_t l = 0; l < L; ++l) {
      const std::size_t key = t * L + l;
      kv.write(l, st, make_view(in.at(key, Hk * D), 1, Hk, D),
               make_view(in.at(key + 77, Hk * D), 1, Hk, D));
      kv.attend(l, st, make_view(in.at(key + 99, Hq * D), 1, Hq, D),
                make_view(out.data(), 1, Hq, D));
    }
    peak = std::max(peak, kv.memory_in_use());
    if ((t + 1) % every == 0) {
      const auto now = std::chrono::steady_clock::now();
      const double ms = std::chrono::duration<double, std::milli>(now - t0).count() / every;
      t0 = now;
      fmt::print("{:>10} {:>8} {:>16} {:>20} {:>10.3f}\n", kv.length(s), kv.kept(s),
                 mib(kv.memory_in_use()), mib(kv_bytes<fp16>(shape, 1, kv.length(s))), ms);
    }
  }
  fmt::print("peak memory_in_use over the stream: {} MiB (sinks + window + one page: {} MiB)\n",
             mib(peak), mib(paged_kv_bytes<fp16>(shape, 1, 16 + W + 16, 16)));
}

//! Reads the options into o. Returns -1 to run the demo, else the status to
//! exit with after printing the usage: 0 for --help, 2 for anything unknown.
int parse(int argc, char** argv, options& o) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--model")
      o.model = next();
    else if (a == "--context")
      o.context = std::stoul(next());
    else if (a == "--tokens")
      o.tokens = std::stoul(next());
    else if (a == "--threads")
      o.threads = std::stoul(next());
    else if (a == "--stream")
      o.stream = std::stoul(next());
    else if (a == "--quick")
      o.quick = true;
    else {
      fmt::print(
          "usage: demo [--model llama-2-7b|llama-3-8b|mistral-7b|all] [--context N]\n"
          "            [--tokens N] [--threads N] [--stream N] [--quick]\n");
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  if (o.quick) {
    o.context = std::min<std::size_t>(o.context, 512);
    o.tokens = 2;
    o.stream = std::min<std::size_t>(o.stream, 3000);
    if (o.model == "all") o.model = "llama-3-8b";
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) try {
  options o;
  if (const int status = parse(argc, argv, o); status >= 0) return status;
  if (o.context == 0 || o.tokens == 0)
    throw kvcache::error("--context and --tokens must be at least 1");
  if (o.threads == 0) o.threads = std::max(1u, std::thread::hardware_concurrency());
  fmt::print("kvcache demo: attention over the KV cache on the CPU, synthetic data\n");
  std::size_t pool = 0;
  for (const preset& m : presets)
    pool = std::max(pool, o.context * m.kv_heads * m.head_dim + (1 << 20));
  progress("generating inputs");
  const inputs in(pool);
  bool any = false;
  for (const preset& m : presets) {
    if (o.model != "all" && o.model != m.name) continue;
    any = true;
    std::vector<float> reference;
    std::vector<row> rows;
    rows.push_back(run<fp32>(m, o, in, reference));
    rows.push_back(run<fp16>(m, o, in, reference));
    rows.push_back(run<bf16>(m, o, in, reference));
    // Quantized: bits per element, memory, speed and error beside the floats.
    rows.push_back(run<int8_kv<>>(m, o, in, reference));
    rows.push_back(run<fp8_e4m3_kv<>>(m, o, in, reference));
    rows.push_back(run<int4_kv<>>(m, o, in, reference));
    rows.push_back(run<hadamard<int4_kv<>>>(m, o, in, reference));
    rows.push_back(run<int2_kv>(m, o, in, reference));
    print(m, o, rows);
  }
  if (!any) throw kvcache::error("unknown model '" + o.model + "'; see --help");
  fmt::print(
      "\nms/token: attention + K/V append for one decoded token across all layers.\n"
      "Measured memory: memory_in_use() of a live one-layer cache x layers.\n");
  if (o.stream) stream(o, in);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "\ndemo: %s\n", e.what());
  return 1;
}
