// A custom eviction policy written only against the eviction_policy concept.
//
// capped<N>: a non-evicting policy for a model with a fixed context of N
// tokens. Every token stays (evicts = false, keep() is always true), and
// capped<N>::max_length is the capacity to give each sequence, so the
// (N + 1)-th token is refused with a kvcache::error instead of being dropped
// or silently truncated.
//
// The cache reads only `evicts` (a static_assert rejects an evicting policy on
// storage that cannot reuse slots) and `name` (in error messages). keep() is
// the rule an evicting storage will apply; for a non-evicting policy it must
// keep every token.
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <vector>

template <std::size_t N>
struct capped {
  static_assert(N > 0, "capped<N> needs N >= 1");
  using axis = kvcache::eviction_tag;
  static constexpr std::string_view name = "capped";
  static constexpr bool evicts = false;
  static constexpr std::size_t max_length = N;
  static constexpr bool keep(std::size_t /*position*/, std::size_t /*length*/) noexcept {
    return true;
  }
};

int main() {
  using namespace kvcache;
  using policy = capped<12>;
  constexpr std::size_t qh = 4, d = 64, prompt = 8;
  cache<mqa<d>, contiguous, policy, fp16> kv(
      {.layers = 1, .q_heads = qh, .max_tokens = 4 * policy::max_length, .threads = 1});
  const seq_id s = kv.add_sequence(policy::max_length);

  std::vector<float> k(prompt * d, 1.f), q(prompt * qh * d, 0.1f), out(prompt * qh * d);
  auto one_step = [&](std::size_t t) {
    const step st = kv.begin_step({{s, t}});
    kv.write(0, st, make_view(k.data(), t, 1, d), make_view(k.data(), t, 1, d));
    kv.attend(0, st, make_view(q.data(), t, qh, d), make_view(out.data(), t, qh, d));
  };
  one_step(prompt);                                       // prefill
  while (kv.length(s) < policy::max_length) one_step(1);  // decode up to the cap
  std::printf("%.*s<%zu>: %zu tokens kept, %zu bytes reserved\n",
              static_cast<int>(policy::name.size()), policy::name.data(), policy::max_length,
              kv.length(s), kv.memory_in_use());

  try {
    kv.begin_step({{s, 1}});
    return 1;
  } catch (const kvcache::error& e) {
    std::printf("token %zu refused: %s\n", policy::max_length + 1, e.what());
  }
  return kv.length(s) == policy::max_length ? 0 : 1;  // the failed step changed nothing
}

static_assert(kvcache::eviction_policy<capped<12>>);
