// A custom eviction policy written only against the eviction_policy concept.
//
// strided<K, W>: keeps every K-th token of the past (a coarse summary of a
// long history) plus the newest W tokens. The kept tokens are not one
// window, so this is a "scattered" policy: at the start of each step the
// cache asks keep(position, length + 1) of every kept token, drops the
// others and compacts the survivors (contiguous storage). With
// `positions = rope_positions::cache` the cache stores keys unrotated and
// rotates each one, as the kernel reads it, at its index among the kept
// tokens, so no key keeps a stale rotation when older tokens leave.
//
// Memory: a sequence of n tokens keeps about n / K + W of them; its capacity
// (add_sequence) bounds that, and a step that would exceed it is refused
// with a kvcache::error.
#include <cmath>
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <vector>

template <std::size_t K, std::size_t W>
struct strided {
  static_assert(K > 0 && W > 0, "strided<K, W> needs K >= 1 and W >= 1");
  using axis = kvcache::eviction_tag;
  static constexpr std::string_view name = "strided";
  static constexpr bool evicts = true;
  static constexpr kvcache::rope_positions positions = kvcache::rope_positions::cache;
  //! Monotone, as the concept requires: once a token is neither a multiple of
  //! K nor among the newest W, a longer sequence never keeps it again.
  static constexpr bool keep(std::size_t position, std::size_t length) noexcept {
    return position % K == 0 || position + W >= length;
  }
};

static_assert(kvcache::eviction_policy<strided<8, 32>>);

int main() {
  using namespace kvcache;
  using policy = strided<8, 32>;
  constexpr std::size_t qh = 4, d = 64, prompt = 40, steps = 400;
  cache<mqa<d>, contiguous, policy, fp32> kv({.layers = 1,
                                              .q_heads = qh,
                                              .max_tokens = 1024,
                                              .threads = 1,
                                              .rope = {.theta = 10000, .rotary_dim = d}});
  const seq_id s = kv.add_sequence(256);

  std::vector<float> k(prompt * d), v(prompt * d), q(prompt * qh * d), out(prompt * qh * d);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = v[i] = std::sin(0.1f * float(i));
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::cos(0.07f * float(i));
  auto one_step = [&](std::size_t t) {
    const step st = kv.begin_step({{s, t}});
    kv.write(0, st, make_view<const float>(k.data(), t, 1, d),
             make_view<const float>(v.data(), t, 1, d));
    kv.attend(0, st, make_view<const float>(q.data(), t, qh, d), make_view(out.data(), t, qh, d));
  };
  one_step(prompt);
  for (std::size_t i = 0; i < steps; ++i) one_step(1);

  // Kept: multiples of 8 before the window, and the newest 32 (the last
  // step's own token included).
  const std::size_t n = kv.length(s);
  std::size_t expect = 0;
  for (std::size_t p = 0; p < n; ++p) expect += policy::keep(p, n);
  std::printf("%.*s<8, 32>: %zu tokens appended, %zu kept (%zu expected), %zu bytes reserved\n",
              static_cast<int>(policy::name.size()), policy::name.data(), n, kv.kept(s), expect,
              kv.memory_in_use());
  return kv.kept(s) == expect && std::isfinite(out[0]) ? 0 : 1;
}
