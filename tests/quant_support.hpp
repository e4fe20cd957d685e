// Support for the quantized-precision tests: the fidelity data generator and
// a driver that checks a cache against float64 attention over the rows the
// cache actually stores (read back and decoded), so that the kernels' own
// error is measured apart from the format's.
#pragma once

#include "support.hpp"

namespace kvtest {

//! Fidelity data (docs/quantization.md). Keys: standard normal, except 4 of
//! every 128 channels (fixed per KV head, drawn once) that are scaled x15 and
//! shifted by a constant offset drawn from [-10, 10], as outlier channels
//! appear in real models' keys. Values and queries: standard normal.
struct outlier_data {
  std::size_t kv_heads, dim;
  std::vector<std::size_t> channel;  // (kv_heads, 4 x dim / 128)   outlier channels
  std::vector<float> offset;         // (kv_heads, 4 x dim / 128)

  outlier_data(std::mt19937_64& rng, std::size_t kv_heads_, std::size_t dim_)
      : kv_heads(kv_heads_), dim(dim_) {
    const std::size_t per = 4 * dim / 128;
    std::uniform_real_distribution<float> off(-10.f, 10.f);
    for (std::size_t h = 0; h < kv_heads; ++h) {
      std::vector<std::size_t> all(dim);
      for (std::size_t d = 0; d < dim; ++d) all[d] = d;
      std::shuffle(all.begin(), all.end(), rng);
      for (std::size_t i = 0; i < per; ++i) {
        channel.push_back(all[i]);
        offset.push_back(off(rng));
      }
    }
  }
  //! Keys of n tokens: (n, kv_heads, dim).
  std::vector<float> keys(std::mt19937_64& rng, std::size_t n) const {
    auto k = normal(rng, n * kv_heads * dim);
    const std::size_t per = channel.size() / kv_heads;
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t h = 0; h < kv_heads; ++h)
        for (std::size_t i = 0; i < per; ++i) {
          float& x = k[(t * kv_heads + h) * dim + channel[h * per + i]];
          x = 15.f * x + offset[h * per + i];
        }
    return k;
  }
};

//! Drives a one-layer cache through steps of `appends` and compares each
//! step's output with float64 attention over (a) the cache's own decoded rows
//! and (b) the original K/V. Keys come from `outliers` when given, else unit
//! normal.
template <class Cache>
struct dequant_driver {
  Cache kv;
  std::mt19937_64 rng;
  std::size_t q_heads, kv_heads, dim;
  const outlier_data* outliers = nullptr;
  std::map<kvcache::seq_id, std::vector<float>> k_orig, v_orig, k_deq, v_deq;
  double worst_own = 0, worst_orig = 0;  // over all steps
  error_sum orig;                        // against the original K/V, whole run

  dequant_driver(std::size_t qh, std::size_t kvh, std::size_t d, std::size_t max_tokens,
                 std::uint64_t seed, std::size_t threads = 2)
      : kv({.layers = 1,
            .q_heads = qh,
            .kv_heads = kvh,
            .head_dim = d,
            .max_tokens = max_tokens,
            .threads = threads}),
        rng(seed),
        q_heads(qh),
        kv_heads(kvh),
        dim(d) {}

  kvcache::seq_id add(std::size_t capacity) { return kv.add_sequence(capacity); }

  //! Appends n tokens through write() alone (what a prefill leaves in the
  //! cache, without paying for its attention).
  void fill(kvcache::seq_id s, std::size_t n) {
    auto st = kv.begin_step({{s, n}});
    auto k = outliers ? outliers->keys(rng, n) : normal(rng, n * kv_heads * dim);
    auto v = normal(rng, n * kv_heads * dim);
    kv.write(0, st, kvcache::make_view<const float>(k.data(), n, kv_heads, dim),
             kvcache::make_view<const float>(v.data(), n, kv_heads, dim));
    auto &KO = k_orig[s], &VO = v_orig[s], &KD = k_deq[s], &VD = v_deq[s];
    const std::size_t first = KO.size() / (kv_heads * dim);
    KO.insert(KO.end(), k.begin(), k.end());
    VO.insert(VO.end(), v.begin(), v.end());
    read_stored(kv, 0, s, first, n, KD, VD);
  }

  //! One step; returns the relative L2 error against the decoded rows.
  double run(const std::vector<kvcache::append>& appends) {
    auto st = kv.begin_step(appends);
    const std::size_t n = st.tokens();
    auto k = outliers ? outliers->keys(rng, n) : normal(rng, n * kv_heads * dim);
    auto v = normal(rng, n * kv_heads * dim), q = normal(rng, n * q_heads * dim);
    std::vector<float> out = poisoned(n * q_heads * dim);
    kv.write(0, st, kvcache::make_view<const float>(k.data(), n, kv_heads, dim),
             kvcache::make_view<const float>(v.data(), n, kv_heads, dim));
    kv.attend(0, st, kvcache::make_view<const float>(q.data(), n, q_heads, dim),
              kvcache::make_view(out.data(), n, q_heads, dim));
    std::vector<double> own(n * q_heads * dim), raw(n * q_heads * dim), lse(n * q_heads);
    std::size_t row = 0;
    for (const auto& a : appends) {
      auto &KO = k_orig[a.seq], &VO = v_orig[a.seq], &KD = k_deq[a.seq], &VD = v_deq[a.seq];
      const std::size_t first = KO.size() / (kv_heads * dim);
      KO.insert(KO.end(), k.begin() + row * kv_heads * dim,
                k.begin() + (row + a.tokens) * kv_heads * dim);
      VO.insert(VO.end(), v.begin() + row * kv_heads * dim,
                v.begin() + (row + a.tokens) * kv_heads * dim);
      read_stored(kv, 0, a.seq, first, a.tokens, KD, VD);
      const double sc = 1.0 / std::sqrt(double(dim));
      reference_attention(KD, VD, q.data() + row * q_heads * dim, a.tokens, first, q_heads,
                          kv_heads, dim, sc, own.data() + row * q_heads * dim,
                          lse.data() + row * q_heads);
      reference_attention(KO, VO, q.data() + row * q_heads * dim, a.tokens, first, q_heads,
                          kv_heads, dim, sc, raw.data() + row * q_heads * dim,
                          lse.data() + row * q_heads);
      row += a.tokens;
    }
    const double e = rel_l2(out, own);
    worst_own = std::max(worst_own, e);
    worst_orig = std::max(worst_orig, rel_l2(out, raw));
    orig.add(out, raw);
    return e;
  }
};

}  // namespace kvtest
