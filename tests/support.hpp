// Test support: seeded random inputs, a float64 attention reference written
// with Eigen (independent of the kernels), and a harness that drives a cache
// and the reference through the same steps.
#pragma once

#include <Eigen/Dense>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <kvcache/kvcache.hpp>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace kvtest {

//! The seed of this test run: KVCACHE_TEST_SEED if set (to reproduce a
//! failure), else fresh. Tests print it with INFO so a failure shows it.
inline std::uint64_t test_seed() {
  if (const char* s = std::getenv("KVCACHE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  static const std::uint64_t fresh = std::random_device{}() * 0x9e3779b97f4a7c15ull + 1;
  return fresh;
}

//! Unit-normal values; a draw of exactly 0 is replaced so no input is zero.
inline std::vector<float> normal(std::mt19937_64& rng, std::size_t n, float sigma = 1.f) {
  std::normal_distribution<float> d(0.f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) {
    do x = d(rng);
    while (x == 0.f);
  }
  return v;
}

inline std::vector<float> poisoned(std::size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

//! Accumulates squared error and squared reference over many outputs: the
//! relative L2 error of a whole run. A format's error against the original
//! K/V is checked this way, over thousands of outputs, because one decode
//! step's few outputs scatter widely around it (a check per step would fail
//! by chance on some seed).
struct error_sum {
  double num = 0, den = 0;
  void add(const std::vector<float>& got, const std::vector<double>& want) {
    for (std::size_t i = 0; i < got.size(); ++i) {
      // NaN or Inf in `got` makes the error +inf.
      num += std::isfinite(got[i]) ? (got[i] - want[i]) * (got[i] - want[i])
                                   : std::numeric_limits<double>::infinity();
      den += want[i] * want[i];
    }
  }
  double error() const { return std::sqrt(num / den); }
};

//! Relative L2 error of one set of outputs; NaN anywhere in `got` gives +inf.
inline double rel_l2(const std::vector<float>& got, const std::vector<double>& want) {
  error_sum e;
  e.add(got, want);
  return e.error();
}

//! Float64 causal attention of one sequence. keys/values: (tokens, kv_heads, dim)
//! flattened; queries: (n, q_heads, dim) at positions first_pos..first_pos+n-1.
//! Writes out (n, q_heads, dim) and lse (n, q_heads).
inline void reference_attention(const std::vector<float>& keys, const std::vector<float>& values,
                                const float* queries, std::size_t n, std::size_t first_pos,
                                std::size_t q_heads, std::size_t kv_heads, std::size_t dim,
                                double scale, double* out, double* lse) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const std::size_t g = q_heads / kv_heads;
  for (std::size_t kh = 0; kh < kv_heads; ++kh) {
    const std::size_t len = first_pos + n;
    Mat K(len, dim), V(len, dim);
    for (std::size_t t = 0; t < len; ++t)
      for (std::size_t d = 0; d < dim; ++d) {
        K(t, d) = keys[(t * kv_heads + kh) * dim + d];
        V(t, d) = values[(t * kv_heads + kh) * dim + d];
      }
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t h = kh * g; h < (kh + 1) * g; ++h) {
        Eigen::VectorXd q(dim);
        for (std::size_t d = 0; d < dim; ++d) q(d) = queries[(i * q_heads + h) * dim + d];
        const std::size_t visible = first_pos + i + 1;  // causal
        Eigen::VectorXd s = K.topRows(visible) * q * scale;
        const double m = s.maxCoeff();
        Eigen::VectorXd p = (s.array() - m).exp();
        const double sum = p.sum();
        Eigen::VectorXd o = V.topRows(visible).transpose() * p / sum;
        for (std::size_t d = 0; d < dim; ++d) out[(i * q_heads + h) * dim + d] = o(d);
        lse[i * q_heads + h] = m + std::log(sum);
      }
  }
}

//! The error a precision's kernels may add to float64 attention over the
//! rows the cache stores (read back and decoded): fp32's 1e-5, 1e-4 on the
//! other float paths, the integer-dot paths' own stated bound
//! (decode_quant.hpp, kchan.hpp).
template <class P>
constexpr double kernel_bound() noexcept {
  if constexpr (kvcache::block_precision<P>)
    return std::max(1e-4, kvcache::detail::decode_error_bound<P>());
  else if constexpr (kvcache::detail::channel_keys<P>)
    return std::max(1e-4, kvcache::detail::kchan_error_bound<P>());
  else if constexpr (std::is_same_v<P, kvcache::fp32>)
    return P::tolerance;
  else
    return 1e-4;
}

//! Brings keys / values (tokens, kv_heads, dim), the decoded stored rows of
//! (layer, s) for its first `first` tokens, up to first + n: reads the new
//! tokens' rows back, and per-channel keys since the last residual flush
//! again (they stay fp16 until it flushes and are quantized then). Full
//! eviction: a token's cache index is its position.
template <class Cache>
void read_stored(const Cache& kv, std::size_t layer, kvcache::seq_id s, std::size_t first,
                 std::size_t n, std::vector<float>& keys, std::vector<float>& values) {
  using P = typename Cache::precision;
  const std::size_t kvh = kv.layout().kv_heads, dim = kv.layout().head_dim;
  std::size_t from = first;
  if constexpr (kvcache::detail::channel_keys<P>) from -= first % P::residual;
  keys.resize((first + n) * kvh * dim);
  values.resize((first + n) * kvh * dim);
  for (std::size_t t = from; t < first + n; ++t)
    for (std::size_t h = 0; h < kvh; ++h) {
      kv.read_row(layer, s, t, 0, h, keys.data() + (t * kvh + h) * dim);
      if (t >= first) kv.read_row(layer, s, t, 1, h, values.data() + (t * kvh + h) * dim);
    }
}

//! Drives a cache and the float64 reference through the same steps, keeping
//! full-precision copies of every appended K and V and the rows the cache
//! stores for them, decoded (equal to the copies for fp32).
template <class Cache>
struct harness {
  using P = typename Cache::precision;
  static constexpr bool exact = std::is_same_v<P, kvcache::fp32>;
  Cache kv;
  std::mt19937_64 rng;
  std::size_t layers, q_heads, kv_heads, dim;
  std::map<kvcache::seq_id, std::vector<std::vector<float>>> keys, values;  // per layer
  std::map<kvcache::seq_id, std::vector<std::vector<float>>> dkeys, dvalues;
  error_sum orig;  // against the original K/V, over every step and layer

  explicit harness(const kvcache::cache_config& cfg, std::uint64_t seed)
      : kv(cfg),
        rng(seed),
        layers(cfg.layers),
        q_heads(kv.layout().q_heads),
        kv_heads(kv.layout().kv_heads),
        dim(kv.layout().head_dim) {}

  kvcache::seq_id add(std::size_t capacity = 0) {
    auto s = kv.add_sequence(capacity);
    for (auto* m : {&keys, &values, &dkeys, &dvalues}) (*m)[s].assign(layers, {});
    return s;
  }

  //! Model side of the cache's sequence operations (paged storage).
  kvcache::seq_id fork(kvcache::seq_id s) {
    auto c = kv.fork(s);
    for (auto* m : {&keys, &values, &dkeys, &dvalues}) (*m)[c] = (*m)[s];
    return c;
  }
  void truncate(kvcache::seq_id s, std::size_t n) {
    kv.truncate(s, n);
    for (auto* m : {&keys, &values, &dkeys, &dvalues})
      for (auto& layer : (*m)[s]) layer.resize(n * kv_heads * dim);
  }
  void remove(kvcache::seq_id s) {
    kv.remove_sequence(s);
    for (auto* m : {&keys, &values, &dkeys, &dvalues}) m->erase(s);
  }

  struct result {
    std::vector<float> out, lse;  // (tokens, q_heads, dim), (tokens, q_heads)
    std::vector<double> ref, ref_lse;
    double worst = 0, worst_lse = 0;          // against the original K/V, over all layers
    double worst_own = 0, worst_own_lse = 0;  // against the stored rows
    double error() const { return worst; }
    double lse_error() const { return worst_lse; }
    //! The kernels' own error: against float64 attention over the stored rows.
    double own_error() const { return worst_own; }
    double own_lse_error() const { return worst_own_lse; }
  };

  //! Runs one step over every layer; returns the last layer's outputs and
  //! reference (original K/V). Inputs are fresh random values.
  result run(std::vector<kvcache::append> appends, float scale = 0.f) {
    auto st = kv.begin_step(appends);
    const std::size_t n = st.tokens();
    result r;
    for (std::size_t l = 0; l < layers; ++l) {
      auto k = normal(rng, n * kv_heads * dim), v = normal(rng, n * kv_heads * dim);
      auto q = normal(rng, n * q_heads * dim);
      r.out = poisoned(n * q_heads * dim);
      r.lse = poisoned(n * q_heads);
      kv.write(l, st, kvcache::make_view<const float>(k.data(), n, kv_heads, dim),
               kvcache::make_view<const float>(v.data(), n, kv_heads, dim));
      kv.attend(l, st, kvcache::make_view<const float>(q.data(), n, q_heads, dim),
                kvcache::make_view(r.out.data(), n, q_heads, dim),
                {.scale = scale, .lse = kvcache::make_view(r.lse.data(), n, q_heads)});
      r.ref.assign(n * q_heads * dim, 0);
      r.ref_lse.assign(n * q_heads, 0);
      std::vector<double> own(n * q_heads * dim), own_lse(n * q_heads);
      std::size_t row = 0;
      for (const auto& a : appends) {
        auto& K = keys[a.seq][l];
        auto& V = values[a.seq][l];
        const std::size_t first = K.size() / (kv_heads * dim);
        K.insert(K.end(), k.begin() + row * kv_heads * dim,
                 k.begin() + (row + a.tokens) * kv_heads * dim);
        V.insert(V.end(), v.begin() + row * kv_heads * dim,
                 v.begin() + (row + a.tokens) * kv_heads * dim);
        const double sc = scale > 0 ? scale : 1.0 / std::sqrt(double(dim));
        reference_attention(K, V, q.data() + row * q_heads * dim, a.tokens, first, q_heads,
                            kv_heads, dim, sc, r.ref.data() + row * q_heads * dim,
                            r.ref_lse.data() + row * q_heads);
        if constexpr (!exact) {
          auto& DK = dkeys[a.seq][l];
          auto& DV = dvalues[a.seq][l];
          read_stored(kv, l, a.seq, first, a.tokens, DK, DV);
          reference_attention(DK, DV, q.data() + row * q_heads * dim, a.tokens, first, q_heads,
                              kv_heads, dim, sc, own.data() + row * q_heads * dim,
                              own_lse.data() + row * q_heads);
        }
        row += a.tokens;
      }
      if constexpr (exact) own = r.ref, own_lse = r.ref_lse;
      r.worst = std::max(r.worst, rel_l2(r.out, r.ref));
      r.worst_lse = std::max(r.worst_lse, rel_l2(r.lse, r.ref_lse));
      r.worst_own = std::max(r.worst_own, rel_l2(r.out, own));
      r.worst_own_lse = std::max(r.worst_own_lse, rel_l2(r.lse, own_lse));
      orig.add(r.out, r.ref);
    }
    return r;
  }
};

}  // namespace kvtest
