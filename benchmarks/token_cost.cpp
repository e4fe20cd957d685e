// kvcache_token_cost: the cost of decode per token and KV head per thread,
// for A/B comparisons of one kernel change, where kvcache_bench's per-layer
// medians move too little to see it.
//
//   kvcache_token_cost <precision> [context=32768] [layers=auto] [steps=7] [--page=N]
//                      [--no-tile-unit]
//
// One sequence of `context` tokens in a Llama-3-8B layer shape (32 query
// heads, 8 KV heads, head_dim 128), `layers` deep; each step decodes one
// token (write + attend on every layer) and the median step is reported.
// By default the layers are as many as it takes to touch 1 GiB per step, so
// that every layer comes from DRAM, as in kvcache_bench's decode; one layer of
// 32k tokens stays in a large L3 (layers=1). The figure
// is step time x threads / (context x KV heads x layers): what one thread
// spends on one token of one KV head, all of its query heads together.
// --page=N stores the rows in N-token pages (paged<>) instead of one region;
// --no-tile-unit runs the paths used where there is no AMX.
//
// Precisions: fp16 bf16 int8 int4 int4_asym int2 fp8_e4m3 hadamard_int4
// int4_asym_kchan int2_kchan_r128 (kvcache_bench's names).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kvcache;

constexpr std::size_t kQHeads = 32, kKVHeads = 8, kHeadDim = 128;

struct options {
  std::size_t context = 32768, layers = 0, steps = 7;  // layers 0: auto
  std::size_t page = 0;                                // 0: contiguous storage
};

template <class S, class P>
int run_on(const char* name, options opt) {
  if (opt.layers == 0) {
    const std::size_t layer_bytes = opt.context * kKVHeads * 2 * P::row_bytes(kHeadDim);
    opt.layers =
        std::clamp<std::size_t>(((std::size_t{1} << 30) + layer_bytes - 1) / layer_bytes, 1, 64);
  }
  using cache_t = cache<gqa<kHeadDim>, S, full, P>;
  const std::size_t capacity = opt.context + opt.steps;
  cache_t kv(cache_config{.layers = opt.layers,
                          .q_heads = kQHeads,
                          .kv_heads = kKVHeads,
                          .max_tokens = capacity,
                          .threads = 0,
                          .page_tokens = opt.page});
  constexpr std::size_t chunk = 512;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> k(chunk * kKVHeads * kHeadDim), v(k.size()), q(kQHeads * kHeadDim),
      out(q.size());
  for (auto* x : {&k, &v, &q})
    for (float& e : *x) e = normal(rng);
  const seq_id s = kv.add_sequence(capacity);
  // context - 1 tokens by write() alone: the first step then reads `context`.
  for (std::size_t done = 0; done + 1 < opt.context; done += chunk) {
    const std::size_t n = std::min(chunk, opt.context - 1 - done);
    const step st = kv.begin_step(std::vector<append>{{s, n}});
    for (std::size_t l = 0; l < opt.layers; ++l)
      kv.write(l, st, make_view(k.data(), n, kKVHeads, kHeadDim),
               make_view(v.data(), n, kKVHeads, kHeadDim));
  }
  std::vector<double> seconds;
  for (std::size_t r = 0; r < opt.steps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const step st = kv.begin_step(std::vector<append>{{s, 1}});
    for (std::size_t l = 0; l < opt.layers; ++l) {
      kv.write(l, st, make_view(k.data(), 1, kKVHeads, kHeadDim),
               make_view(v.data(), 1, kKVHeads, kHeadDim));
      kv.attend(l, st, make_view(q.data(), 1, kQHeads, kHeadDim),
                make_view(out.data(), 1, kQHeads, kHeadDim));
    }
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  const double token_heads = double(opt.context) * double(kKVHeads) * double(opt.layers);
  const double bytes = token_heads * 2.0 * double(P::row_bytes(kHeadDim));
  const std::string storage = opt.page ? " page " + std::to_string(opt.page) : "";
  std::printf(
      "%s%s context %zu layers %zu threads %zu: %.3f ms per layer, %.2f ns per token and KV "
      "head per thread, %.1f GB/s of K+V\n",
      name, storage.c_str(), opt.context, opt.layers, kv.threads(),
      median * 1e3 / double(opt.layers), median * 1e9 * double(kv.threads()) / token_heads,
      bytes / median * 1e-9);
  return 0;
}

template <class P>
int run(const char* name, const options& opt) {
  return opt.page ? run_on<paged<>, P>(name, opt) : run_on<contiguous, P>(name, opt);
}

int usage() {
  std::fprintf(
      stderr,
      "usage: kvcache_token_cost <precision> [context=32768] [layers=auto] [steps=7] "
      "[--page=N] [--no-tile-unit]\nprecisions: fp16 bf16 int8 int4 int4_asym int2 fp8_e4m3 "
      "hadamard_int4 int4_asym_kchan int2_kchan_r128\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--no-tile-unit") == 0) {
      detail::amx::allowed() = false;
    } else if (std::strncmp(argv[i], "--page=", 7) == 0) {
      char* end = nullptr;
      opt.page = std::strtoull(argv[i] + 7, &end, 10);
      if (*end != '\0' || opt.page == 0) return usage();
    } else {
      args.emplace_back(argv[i]);
    }
  }
  if (args.empty() || args.size() > 4) return usage();
  std::size_t* fields[] = {&opt.context, &opt.layers, &opt.steps};
  for (std::size_t i = 1; i < args.size(); ++i) {
    char* end = nullptr;
    const unsigned long long x = std::strtoull(args[i].c_str(), &end, 10);
    if (*end != '\0' || x == 0) return usage();
    *fields[i - 1] = static_cast<std::size_t>(x);
  }
  if (opt.context < 2) return usage();
  try {
    const std::string& p = args[0];
    if (p == "fp16") return run<fp16>("fp16", opt);
    if (p == "bf16") return run<bf16>("bf16", opt);
    if (p == "int8") return run<int8_kv<>>("int8", opt);
    if (p == "int4") return run<int4_kv<>>("int4", opt);
    if (p == "int4_asym") return run<int4_kv<true>>("int4_asym", opt);
    if (p == "int2") return run<int2_kv>("int2", opt);
    if (p == "fp8_e4m3") return run<fp8_e4m3_kv<>>("fp8_e4m3", opt);
    if (p == "hadamard_int4") return run<hadamard<int4_kv<>>>("hadamard_int4", opt);
    if (p == "int4_asym_kchan") return run<per_channel_k<int4_kv<true>>>("int4_asym_kchan", opt);
    if (p == "int2_kchan_r128") return run<per_channel_k<int2_kv, 32, 128>>("int2_kchan_r128", opt);
  } catch (const kvcache::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return usage();
}
