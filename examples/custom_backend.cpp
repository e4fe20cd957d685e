// A custom backend written only against the backend concepts.
//
// counting_cpu: host memory from the cpu backend, counted. Serving stacks
// that budget memory per tenant, or check a cache's footprint against its
// formula, want every byte the cache holds to pass through one place. The
// context is cpu::context, so the CPU kernels run unchanged (host_backend).
#include <atomic>
#include <cmath>
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <vector>

struct counting_cpu {
  using axis = kvcache::backend_tag;
  static constexpr std::string_view name = "counting_cpu";
  static inline std::atomic<std::size_t> live{0}, peak{0}, calls{0};

  static void* allocate(std::size_t bytes) {
    void* p = kvcache::cpu::allocate(bytes);  // throws std::bad_alloc, counts nothing then
    const std::size_t now = live += bytes;
    for (std::size_t old = peak; now > old && !peak.compare_exchange_weak(old, now);) {
    }
    ++calls;
    return p;
  }
  static void deallocate(void* p, std::size_t bytes) noexcept {
    live -= bytes;
    kvcache::cpu::deallocate(p, bytes);
  }
  using context = kvcache::cpu::context;  // the thread pool the CPU kernels split work over
};
static_assert(kvcache::host_backend<counting_cpu>);

int main() {
  using namespace kvcache;
  constexpr std::size_t layers = 2, qh = 8, kvh = 2, d = 64, tokens = 96;
  bool ok = true;
  {
    using Cache = cache<gqa<d>, paged<16>, full, fp16, counting_cpu>;
    Cache kv({.layers = layers, .q_heads = qh, .kv_heads = kvh, .max_tokens = 256, .threads = 1});
    std::vector<float> q(tokens * qh * d, 0.25f), k(tokens * kvh * d, 0.5f),
        out(tokens * qh * d, -1.f);
    const seq_id s = kv.add_sequence();
    const step st = kv.begin_step({{s, tokens}});
    for (std::size_t l = 0; l < layers; ++l) {
      kv.write(l, st, make_view<const float>(k.data(), tokens, kvh, d),
               make_view<const float>(k.data(), tokens, kvh, d));
      kv.attend(l, st, make_view<const float>(q.data(), tokens, qh, d),
                make_view(out.data(), tokens, qh, d));
    }
    // Every V row is 0.5 (exact in fp16), so every output is 0.5 up to the
    // rounding of log-sum-exp merges between pages.
    for (float x : out) ok = ok && std::fabs(x - 0.5f) <= 1e-6f;
    std::printf("%s: %zu allocations, %zu bytes live; the cache's pages hold %zu of them\n",
                std::string(counting_cpu::name).c_str(), counting_cpu::calls.load(),
                counting_cpu::live.load(), kv.memory_in_use());
    // Every byte in use passed through the backend; the pool may hold more.
    ok = ok && counting_cpu::live >= kv.memory_in_use() && kv.memory_in_use() > 0;
  }
  std::printf("after the cache is gone: %zu bytes live (peak %zu)\n", counting_cpu::live.load(),
              counting_cpu::peak.load());
  ok = ok && counting_cpu::live == 0;
  std::printf("outputs right and memory returned: %s\n", ok ? "yes" : "no");
  return ok ? 0 : 1;
}
