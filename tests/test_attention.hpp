// Attention tests shared by every grouping x precision x head_dim: a cache is
// checked against the float64 reference on fresh random data through prefill,
// chunked prefill, decode and ragged batches.
#pragma once

#include "support.hpp"

namespace kvtest {

template <class Cache>
void check_attention(std::size_t q_heads, std::size_t kv_heads, std::size_t head_dim) {
  using P = typename Cache::precision;
  const auto seed = test_seed();
  INFO("seed " << seed << " (set KVCACHE_TEST_SEED to reproduce)");
  INFO(Cache::grouping::name << " " << P::name << " q_heads " << q_heads << " kv_heads " << kv_heads
                             << " head_dim " << head_dim);
  harness<Cache> h({.layers = 2,
                    .q_heads = q_heads,
                    .kv_heads = kv_heads,
                    .head_dim = head_dim,
                    .max_tokens = 4096,
                    .threads = 2},
                   seed);
  const double tol = P::tolerance;
  auto a = h.add(600), b = h.add(600), c = h.add(600);
  // Ragged prefill: three prompts of different lengths, one over a KV tile.
  auto r = h.run({{a, 70}, {b, 5}, {c, 1}});
  CHECK(r.error() <= tol);
  CHECK(r.lse_error() <= 1e-5 + tol / 10);
  // Chunked prefill onto non-empty caches, mixed with a decode.
  r = h.run({{a, 33}, {b, 130}, {c, 1}});
  CHECK(r.error() <= tol);
  // Decode steps: every sequence appends one token.
  for (int i = 0; i < 3; ++i) {
    r = h.run({{a, 1}, {b, 1}, {c, 1}});
    CHECK(r.error() <= tol);
    CHECK(r.lse_error() <= 1e-5 + tol / 10);
  }
  // A decode long enough to split into several chunks, and a custom scale.
  r = h.run({{c, 400}});
  CHECK(r.error() <= tol);
  r = h.run({{a, 1}, {c, 1}}, 0.05f);
  CHECK(r.error() <= tol);
}

}  // namespace kvtest
