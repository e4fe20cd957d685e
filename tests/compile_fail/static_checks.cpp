// Combinations that must not compile, one per KVCACHE_CASE; ctest compiles
// each and passes when the compiler prints the static_assert's sentence
// (tests/CMakeLists.txt). Each case is otherwise a valid program.
#include <kvcache/kvcache.hpp>

using namespace kvcache;

#if KVCACHE_CASE == 1  // a static head_dim that is not whole quantization blocks
using C = cache<gqa<80>, contiguous, full, int8_kv<32>>;
#elif KVCACHE_CASE == 2  // a static head_dim that per-channel keys cannot spread scales over
using C = cache<gqa<48>, contiguous, full, per_channel_k<int4_kv<true>, 32>>;
#elif KVCACHE_CASE == 3  // a backend whose context is not the CPU kernels'
struct device_only {
  using axis = backend_tag;
  static constexpr std::string_view name = "device_only";
  static void* allocate(std::size_t n) { return cpu::allocate(n); }
  static void deallocate(void* p, std::size_t n) noexcept { cpu::deallocate(p, n); }
  struct context {
    explicit context(std::size_t) {}
  };
};
using C = cache<gqa<128>, contiguous, full, fp16, device_only>;
#elif KVCACHE_CASE == 4  // an eviction that drops tokens on storage that cannot reuse slots
struct no_reuse : contiguous {
  static constexpr bool supports_eviction = false;
};
using C = cache<gqa<128>, no_reuse, sliding_window<1024>, fp16>;
#elif KVCACHE_CASE == 5  // a static head_dim that is not a multiple of 16
using C = cache<gqa<72>, contiguous, full, fp32>;
#endif

int main() {
  C kv({.layers = 1, .q_heads = 8, .kv_heads = 2, .max_tokens = 64});
  return kv.memory_in_use() == 0 ? 0 : 1;
}
