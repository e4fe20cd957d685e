// A custom storage written only against the storage concepts.
//
// zeroed_contiguous: contiguous storage whose regions are zero-filled when a
// sequence is added, so a slot read before it is written holds zeros rather
// than whatever the allocator returned (reproducible dumps of a cache, and
// no stale data from a previous tenant in a shared process). It reuses
// contiguous's bookkeeping and changes one step, create().
//   bytes in use = those of contiguous: the zeros are written, not stored twice
#include <cmath>
#include <cstdio>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <random>
#include <vector>

struct zeroed_contiguous {
  using axis = kvcache::storage_tag;
  static constexpr std::string_view name = "zeroed_contiguous";
  static constexpr std::size_t page_tokens = kvcache::dynamic;
  static constexpr bool supports_eviction = false;

  template <kvcache::backend_policy B>
  class state : public kvcache::contiguous::state<B> {
    using base = kvcache::contiguous::state<B>;

   public:
    using typename base::region;
    state(const kvcache::kv_layout& layout, const kvcache::storage_config& cfg)
        : base(layout, cfg), layout_(layout) {}
    region create(std::size_t capacity) {  // hides base::create; the cache calls this one
      region r = base::create(capacity);
      std::memset(r.base, 0, layout_.page_bytes(capacity));  // host memory: B is a host_backend
      return r;
    }

   private:
    kvcache::kv_layout layout_;
  };
};
static_assert(kvcache::storage_policy<zeroed_contiguous>);

// Runs a prefill of `prompt` tokens and `decode` single-token steps on a cache
// of type Cache and returns every output row.
template <class Cache>
std::vector<float> run(std::size_t& bytes) {
  using namespace kvcache;
  constexpr std::size_t layers = 2, qh = 8, kvh = 2, d = 64, prompt = 40, decode = 4;
  Cache kv({.layers = layers, .q_heads = qh, .kv_heads = kvh, .max_tokens = 64, .threads = 1});
  std::mt19937 rng(11);
  std::normal_distribution<float> n;
  const std::size_t total = prompt + decode;
  std::vector<float> q(total * qh * d), k(total * kvh * d), v(total * kvh * d),
      out(total * qh * d, NAN);
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = n(rng);
  const seq_id s = kv.add_sequence(total);
  for (std::size_t row = 0; row < total;) {
    const std::size_t t = row == 0 ? prompt : 1;
    const step st = kv.begin_step({{s, t}});
    for (std::size_t l = 0; l < layers; ++l) {
      kv.write(l, st, make_view<const float>(k.data() + row * kvh * d, t, kvh, d),
               make_view<const float>(v.data() + row * kvh * d, t, kvh, d));
      kv.attend(l, st, make_view<const float>(q.data() + row * qh * d, t, qh, d),
                make_view(out.data() + row * qh * d, t, qh, d));
    }
    row += t;
  }
  bytes = kv.memory_in_use();
  return out;
}

int main() {
  using namespace kvcache;
  std::size_t zeroed_bytes = 0, plain_bytes = 0;
  const auto zeroed = run<cache<gqa<64>, zeroed_contiguous, full, fp16>>(zeroed_bytes);
  const auto plain = run<cache<gqa<64>, contiguous, full, fp16>>(plain_bytes);
  // The kernels read the same view, so the results are the same bits.
  const bool same = std::memcmp(zeroed.data(), plain.data(), zeroed.size() * sizeof(float)) == 0;
  std::printf("%s: %zu bytes in use (contiguous: %zu); outputs identical to contiguous: %s\n",
              std::string(zeroed_contiguous::name).c_str(), zeroed_bytes, plain_bytes,
              same ? "yes" : "no");
  return same && zeroed_bytes == plain_bytes ? 0 : 1;
}
