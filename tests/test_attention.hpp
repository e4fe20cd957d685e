// Attention tests shared by every grouping x precision x head_dim: a cache is
// checked against the float64 reference on fresh random data through prefill,
// chunked prefill, decode and ragged batches.
#pragma once

#include "support.hpp"

namespace kvtest {

//! The steps every attention suite runs on a harness: ragged prefill,
//! chunked prefill onto non-empty caches (across page boundaries on paged
//! storage) mixed with a decode, decode steps, a decode long enough to split
//! into several chunks, and a custom scale. Each step: the kernels' own
//! error, against float64 attention over the rows the cache stores
//! (kernel_bound: 1e-4, or an integer-dot path's stated bound). The whole
//! run: the format's error against the original K/V, within P::tolerance.
template <class H>
void attention_steps(H& h) {
  using P = typename H::P;
  const double kb = kernel_bound<P>();
  const auto check = [&](const typename H::result& r) {
    CHECK(r.own_error() <= kb);
    CHECK(r.own_lse_error() <= kb / 10);
  };
  auto a = h.add(600), b = h.add(600), c = h.add(600);
  check(h.run({{a, 70}, {b, 5}, {c, 1}}));  // one prompt over a KV tile
  check(h.run({{a, 33}, {b, 130}, {c, 1}}));
  for (int i = 0; i < 3; ++i) check(h.run({{a, 1}, {b, 1}, {c, 1}}));
  check(h.run({{c, 400}}));
  check(h.run({{a, 1}, {c, 1}}, 0.05f));
  CHECK(h.orig.error() <= P::tolerance);
}

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
  attention_steps(h);
}

}  // namespace kvtest
