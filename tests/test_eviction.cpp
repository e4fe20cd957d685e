// Windowed eviction and RoPE positions: at every step of a stream, attention
// over the cache equals a float64 reference that recomputes attention over
// exactly the tokens the policy keeps, with RoPE at cache-relative positions
// (attention_sinks) or absolute positions (sliding_window), for contiguous
// (ring) and paged storage; memory stays bounded over 100,000 tokens; fork,
// truncate and prefix reuse under eviction; bad input.
#include "support.hpp"

using namespace kvcache;
using Catch::Matchers::Contains;

namespace {

//! RoPE frequencies written independently of rope.hpp (Meta's apply_scaling).
std::vector<double> ref_freqs(const rope_config& r) {
  std::vector<double> f;
  for (std::size_t i = 0; i < r.rotary_dim / 2; ++i) {
    double w = 1.0 / std::pow(r.theta, double(2 * i) / double(r.rotary_dim));
    if (r.scaling.factor > 0) {
      const auto& s = r.scaling;
      const double wl = 2 * M_PI / w, lo = s.original_max_position / s.low_freq_factor,
                   hi = s.original_max_position / s.high_freq_factor;
      if (wl < hi) {
      } else if (wl > lo) {
        w = w / s.factor;
      } else {
        const double sm = (s.original_max_position / wl - s.low_freq_factor) /
                          (s.high_freq_factor - s.low_freq_factor);
        w = (1 - sm) * w / s.factor + sm * w;
      }
    }
    f.push_back(w);
  }
  return f;
}

//! x (dim doubles) rotated at `pos` (by -pos when `inverse`), in double precision.
void ref_rotate(double* x, std::size_t pos, const rope_config& r, const std::vector<double>& f,
                bool inverse = false) {
  const std::size_t half = r.rotary_dim / 2;
  for (std::size_t i = 0; i < half; ++i) {
    const std::size_t a = r.interleaved ? 2 * i : i, b = r.interleaved ? 2 * i + 1 : i + half;
    const double ang = (inverse ? -double(pos) : double(pos)) * f[i], c = std::cos(ang),
                 s = std::sin(ang);
    const double x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
  }
}

//! Drives a windowed cache and the reference through the same steps.
template <class Cache>
struct window_model {
  using P = typename Cache::precision;
  static constexpr bool exact = std::is_same_v<P, fp32>;
  Cache kv;
  std::mt19937_64 rng;
  std::size_t layers, qh, kvh, dim, S = 0, W = 0;
  rope_config rope;
  std::vector<double> freqs;
  typename Cache::eviction policy;
  bool cache_positions;
  // Every appended token's raw K and V per sequence and layer: (tokens, kvh, dim).
  std::map<seq_id, std::vector<std::vector<float>>> K, V;
  // The rows the cache stores for the kept ones, decoded, at the same places
  // (unused for fp32, whose rows are the raw ones).
  std::map<seq_id, std::vector<std::vector<float>>> Kd, Vd;
  kvtest::error_sum orig;  // against the raw K/V, over every step and layer

  window_model(const cache_config& cfg, std::uint64_t seed)
      : kv(cfg),
        rng(seed),
        layers(cfg.layers),
        qh(kv.layout().q_heads),
        kvh(kv.layout().kv_heads),
        dim(kv.layout().head_dim),
        rope(cfg.rope),
        freqs(ref_freqs(cfg.rope)),
        policy(make_policy(cfg)),
        cache_positions(detail::positions_of<typename Cache::eviction>() == rope_positions::cache) {
    if constexpr (windowed_eviction<typename Cache::eviction>) {
      S = policy.sinks();
      W = policy.window();
    }
  }
  static typename Cache::eviction make_policy(const cache_config& c) {
    if constexpr (std::is_constructible_v<typename Cache::eviction, const eviction_config&>)
      return typename Cache::eviction(eviction_config{c.sinks, c.window, c.sparse});
    else
      return {};
  }
  //! The prefill mask beyond causality: windowed policies' sinks U (p - W, p];
  //! a scattered policy's queries see every token of the step's cache.
  bool visible(std::size_t key, std::size_t p) const {
    if constexpr (windowed_eviction<typename Cache::eviction>)
      return key < S || key + W > p;
    else if constexpr (sparse_selection<typename Cache::eviction>)
      return policy.visible(key, p);
    else
      return true;
  }

  seq_id add(std::size_t capacity = 0) {
    const seq_id s = kv.add_sequence(capacity);
    for (auto* m : {&K, &V, &Kd, &Vd}) (*m)[s].assign(layers, {});
    return s;
  }
  seq_id fork(seq_id s) {
    const seq_id c = kv.fork(s);
    for (auto* m : {&K, &V, &Kd, &Vd}) (*m)[c] = (*m)[s];
    return c;
  }

  //! Reads back the stored rows of a step appending to a sequence of L
  //! tokens: cache index c holds position list[c]. Rows before L never
  //! change, except per-channel keys since the last residual flush. Keys are
  //! stored rotated at their absolute positions (unless a scattered policy
  //! rotates them on read): the rotation is undone here, in double, so the
  //! reference rotates them as it does the raw ones.
  void decode_rows(std::size_t l, seq_id s, const std::vector<std::size_t>& list, std::size_t L) {
    const bool stored_rotated =
        rope.rotary_dim && !(Cache::eviction::evicts &&
                             !windowed_eviction<typename Cache::eviction> && cache_positions);
    REQUIRE(kv.kept(s) == list.size());
    auto &DK = Kd[s][l], &DV = Vd[s][l];
    DK.resize(K[s][l].size());
    DV.resize(V[s][l].size());
    std::size_t from = L;
    if constexpr (detail::channel_keys<P>) from -= L % P::residual;
    std::vector<double> x(dim);
    for (auto c = std::size_t(std::lower_bound(list.begin(), list.end(), from) - list.begin());
         c < list.size(); ++c)
      for (std::size_t kind = 0; kind < 2; ++kind)
        for (std::size_t h = 0; h < kvh; ++h) {
          float* dst = (kind == 0 ? DK : DV).data() + (list[c] * kvh + h) * dim;
          kv.read_row(l, s, c, kind, h, dst);
          if (kind == 0 && stored_rotated) {
            std::copy(dst, dst + dim, x.begin());
            ref_rotate(x.data(), list[c], rope, freqs, true);
            std::copy(x.begin(), x.end(), dst);
          }
        }
  }

  //! Kept positions at the start of a step appending to a sequence of L
  //! tokens, by the policy's definition: the step's first query, at L, sees
  //! the sinks and (L - W, L].
  std::vector<std::size_t> kept(std::size_t L) const {
    std::vector<std::size_t> p;
    for (std::size_t i = 0; i < L; ++i)
      if (policy.keep(i, L + 1)) p.push_back(i);
    return p;
  }

  //! One step; returns the kernels' worst relative error over layers and
  //! sequences, against float64 attention over the stored rows. The error
  //! against the raw K/V accumulates in `orig`.
  double run(const std::vector<append>& appends) {
    auto st = kv.begin_step(appends);
    const std::size_t n = st.tokens();
    double worst = 0;
    for (std::size_t l = 0; l < layers; ++l) {
      auto k = kvtest::normal(rng, n * kvh * dim), v = kvtest::normal(rng, n * kvh * dim);
      auto q = kvtest::normal(rng, n * qh * dim);
      auto out = kvtest::poisoned(n * qh * dim);
      kv.write(l, st, make_view<const float>(k.data(), n, kvh, dim),
               make_view<const float>(v.data(), n, kvh, dim));
      kv.attend(l, st, make_view<const float>(q.data(), n, qh, dim),
                make_view(out.data(), n, qh, dim));
      std::vector<double> ref(n * qh * dim), own(n * qh * dim);
      std::size_t row = 0;
      for (const append& a : appends) {
        auto& Ks = K[a.seq][l];
        auto& Vs = V[a.seq][l];
        const std::size_t L = Ks.size() / (kvh * dim);
        Ks.insert(Ks.end(), k.begin() + row * kvh * dim, k.begin() + (row + a.tokens) * kvh * dim);
        Vs.insert(Vs.end(), v.begin() + row * kvh * dim, v.begin() + (row + a.tokens) * kvh * dim);
        // The cache during the step: kept tokens, then the step's own.
        auto list = kept(L);
        const std::size_t held = list.size();
        for (std::size_t t = 0; t < a.tokens; ++t) list.push_back(L + t);
        reference(Ks, Vs, list, held, q.data() + row * qh * dim, a.tokens, L,
                  ref.data() + row * qh * dim);
        if constexpr (!exact) {
          decode_rows(l, a.seq, list, L);
          reference(Kd[a.seq][l], Vd[a.seq][l], list, held, q.data() + row * qh * dim, a.tokens, L,
                    own.data() + row * qh * dim);
        }
        row += a.tokens;
      }
      if constexpr (exact) own = ref;
      worst = std::max(worst, kvtest::rel_l2(out, own));
      orig.add(out, ref);
    }
    return worst;
  }

  //! Float64 attention of `n` queries (positions L..L+n-1, cache indices
  //! held..held+n-1) over the tokens of `list` (absolute positions) under
  //! the mask sinks U (p - W, p], RoPE at cache indices or absolute positions.
  void reference(const std::vector<float>& Ks, const std::vector<float>& Vs,
                 const std::vector<std::size_t>& list, std::size_t held, const float* q,
                 std::size_t n, std::size_t L, double* out) const {
    const std::size_t g = qh / kvh;
    const double scale = 1.0 / std::sqrt(double(dim));
    for (std::size_t kh = 0; kh < kvh; ++kh) {
      Eigen::MatrixXd Km(list.size(), dim), Vm(list.size(), dim);
      for (std::size_t c = 0; c < list.size(); ++c) {
        std::vector<double> kr(dim);
        for (std::size_t d = 0; d < dim; ++d) {
          kr[d] = Ks[(list[c] * kvh + kh) * dim + d];
          Vm(c, d) = Vs[(list[c] * kvh + kh) * dim + d];
        }
        if (rope.rotary_dim) ref_rotate(kr.data(), cache_positions ? c : list[c], rope, freqs);
        for (std::size_t d = 0; d < dim; ++d) Km(c, d) = kr[d];
      }
      for (std::size_t t = 0; t < n; ++t) {
        const std::size_t p = L + t;
        for (std::size_t h = kh * g; h < (kh + 1) * g; ++h) {
          std::vector<double> qr(dim);
          for (std::size_t d = 0; d < dim; ++d) qr[d] = q[(t * qh + h) * dim + d];
          if (rope.rotary_dim) ref_rotate(qr.data(), cache_positions ? held + t : p, rope, freqs);
          Eigen::VectorXd qv = Eigen::Map<Eigen::VectorXd>(qr.data(), dim);
          Eigen::VectorXd s = Km * qv * scale;
          for (std::size_t c = 0; c < list.size(); ++c)
            if (!(list[c] <= p && visible(list[c], p)))
              s(c) = -std::numeric_limits<double>::infinity();
          const double m = s.maxCoeff();
          Eigen::VectorXd e = (s.array() - m).exp();
          Eigen::VectorXd o = Vm.transpose() * e / e.sum();
          for (std::size_t d = 0; d < dim; ++d) out[(t * qh + h) * dim + d] = o(d);
        }
      }
    }
  }
};

rope_config llama_rope(std::size_t rd, bool interleaved = false, bool scaled = false) {
  rope_config r;
  r.theta = 500000;
  r.rotary_dim = rd;
  r.interleaved = interleaved;
  if (scaled)
    r.scaling = {
        .factor = 8, .low_freq_factor = 1, .high_freq_factor = 4, .original_max_position = 64};
  return r;
}

//! A stream of prefill chunks (some longer than W, some crossing the sinks
//! and the window's edge) and decode steps over two sequences, checked at
//! every step.
template <class Cache>
void check_stream(const rope_config& rope, std::size_t sinks, std::size_t window, int steps,
                  std::size_t q_heads = 4, std::size_t head_dim = 64) {
  using P = typename Cache::precision;
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << " (set KVCACHE_TEST_SEED to reproduce)");
  INFO(Cache::eviction::name << " " << Cache::storage::name << " " << P::name << " rotary_dim "
                             << rope.rotary_dim);
  window_model<Cache> m({.layers = 2,
                         .q_heads = q_heads,
                         .kv_heads = 2,
                         .head_dim = head_dim,
                         .max_tokens = 4096,
                         .threads = 2,
                         .page_tokens = std::is_same_v<typename Cache::storage, paged<>> ? 8u : 0u,
                         .sinks = sinks,
                         .window = window,
                         .rope = rope},
                        seed);
  const std::size_t cap = std::min<std::size_t>(m.S + 3 * m.W, 2000);
  auto a = m.add(cap), b = m.add(cap);
  // Each step within the kernels' bound; the whole stream within the format's.
  const double tol = kvtest::kernel_bound<P>();
  std::uniform_int_distribution<std::size_t> chunk(2, std::min<std::size_t>(m.W + m.W / 2, 200));
  std::mt19937_64 pick(seed + 1);
  // Prefill longer than the window, then a mix.
  CHECK(m.run({{a, m.W + 5}, {b, 3}}) <= tol);
  for (int i = 0; i < steps; ++i) {
    const bool prefill = pick() % 5 == 0;
    const std::size_t na = prefill ? chunk(pick) : 1;
    INFO("step " << i << " lengths " << m.kv.length(a) << " " << m.kv.length(b) << " append "
                 << na);
    CHECK(m.run({{a, na}, {b, 1}}) <= tol);
    CHECK(m.kv.kept(a) <= m.S + m.W - 1 + na);
  }
  CHECK(m.orig.error() <= P::tolerance);
}

}  // namespace

TEST_CASE("attention_sinks equals the float64 reference at cache positions at every step",
          "[eviction][rope]") {
  check_stream<cache<gqa<64>, contiguous, attention_sinks<>, fp32>>(llama_rope(64), 4, 24, 120);
  check_stream<cache<gqa<64>, paged<>, attention_sinks<>, fp16>>(llama_rope(64), 4, 24, 120);
  // Sinks cut a page, window not a multiple of the page; partial rotation,
  // interleaved pairs, Llama-3 scaling.
  check_stream<cache<gqa<64>, paged<>, attention_sinks<>, fp32>>(llama_rope(32, true, true), 3, 21,
                                                                 120);
  check_stream<cache<gqa<64>, contiguous, attention_sinks<2, 17>, fp32>>(llama_rope(48), 0, 0, 80);
}

TEST_CASE("quantized caches under sinks and windows, at every step", "[eviction][rope][quant]") {
  // The fused quantized decode walks the same slot map (ring pieces, pages)
  // and reads the sinks with their own rotated query: each step within the
  // kernels' bound over the stored rows, the stream within P::tolerance.
  check_stream<cache<gqa<64>, contiguous, attention_sinks<>, int8_kv<>>>(llama_rope(64), 4, 24, 80);
  check_stream<cache<gqa<64>, paged<>, attention_sinks<>, int4_kv<>>>(llama_rope(64), 3, 21, 80);
  check_stream<cache<gqa<64>, paged<>, sliding_window<>, int8_kv<>>>(llama_rope(64), 0, 33, 60);
  // A rotated format: prefill decodes its rows back through the transform
  // where RoPE is applied on read.
  check_stream<cache<gqa<64>, contiguous, attention_sinks<>, hadamard<int4_kv<>>>>(llama_rope(64),
                                                                                   4, 24, 80);
  // Groups of 4 query heads: the tile-unit kernels where the CPU has AMX
  // (partial tiles at ring pieces and pages, sinks' own queries).
  check_stream<cache<gqa<>, contiguous, attention_sinks<>, int8_kv<>>>(llama_rope(64), 4, 24, 60, 8,
                                                                       64);
  check_stream<cache<gqa<>, paged<>, sliding_window<>, int4_kv<true>>>(llama_rope(64), 0, 40, 60, 8,
                                                                       128);
  check_stream<cache<gqa<>, paged<>, attention_sinks<>, int2_kv>>(llama_rope(64), 3, 37, 60, 8,
                                                                  128);
  // fp8 on the tile unit in bf16 (32-token tiles).
  check_stream<cache<gqa<>, contiguous, attention_sinks<>, fp8_e4m3_kv<>>>(llama_rope(64), 4, 24,
                                                                           60, 8, 128);
  check_stream<cache<gqa<>, paged<>, sliding_window<>, fp8_e4m3_kv<>>>(llama_rope(64), 0, 40, 60, 8,
                                                                       64);
}

TEST_CASE("per-channel keys under sinks and windows, at every step",
          "[eviction][rope][quant][kchan]") {
  // Sinks of whole key groups, windows of whole residuals; prefill chunks
  // cross the residual's flushes and the window's edge (contiguous ring,
  // 8-token pages).
  check_stream<cache<gqa<64>, contiguous, attention_sinks<>, per_channel_k<int4_kv<true>>>>(
      llama_rope(64), 32, 64, 80);
  // A 64-token residual straddles 32 sinks and the window before the first flush.
  using paged_sinks = cache<gqa<64>, paged<>, attention_sinks<>, per_channel_k<int2_kv, 32, 64>>;
  check_stream<paged_sinks>(llama_rope(64), 32, 64, 60);
  check_stream<paged_sinks>(llama_rope(64), 0, 128, 40);
  // Head_dim 128 and groups of 4 and 8 query heads: with AMX, keys on the
  // tile unit, whose 64-token tiles span groups and stop at the sinks' end.
  check_stream<cache<gqa<>, contiguous, attention_sinks<>, per_channel_k<int4_kv<true>>>>(
      llama_rope(128), 32, 96, 40, 8, 128);
  check_stream<cache<gqa<>, paged<>, attention_sinks<>, per_channel_k<int2_kv, 32, 64>>>(
      llama_rope(128), 32, 64, 40, 16, 128);
}

TEST_CASE("per-channel keys: fork under sinks and a window on 8-token pages",
          "[eviction][paged][quant][kchan]") {
  // The fork shares pages whose keys are still in the residual; each
  // sequence's flush then copies the shared pages it writes into, after the
  // window has dropped pages (the page table's logical-to-held mapping).
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  using P = per_channel_k<int4_kv<true>>;
  using C = cache<gqa<64>, paged<8>, attention_sinks<32, 64>, P>;
  window_model<C> m({.layers = 1,
                     .q_heads = 2,
                     .kv_heads = 1,
                     .max_tokens = 2048,
                     .threads = 2,
                     .rope = llama_rope(64)},
                    seed);
  auto a = m.add(224);
  const kv_shape shape{.layers = 1, .kv_heads = 1, .head_dim = 64};
  const double tol = kvtest::kernel_bound<P>();
  CHECK(m.run({{a, 150}}) <= tol);
  CHECK(m.kv.memory_in_use() <= windowed_paged_bytes<P>(shape, 32, 64, 150, 8));
  for (int i = 0; i < 5; ++i) {
    CHECK(m.run({{a, 1}}) <= tol);
    CHECK(m.kv.memory_in_use() <= windowed_paged_bytes<P>(shape, 32, 64, 1, 8));
  }
  const std::size_t before = m.kv.memory_in_use();
  auto b = m.fork(a);
  CHECK(m.kv.memory_in_use() == before + P::residual_bytes(1, 1, 64));  // pages shared
  for (int i = 0; i < 60; ++i) CHECK(m.run({{a, 1}, {b, i % 7 == 0 ? std::size_t{5} : 1}}) <= tol);
  CHECK(m.orig.error() <= P::tolerance);
  CHECK(m.kv.page_table(a)[0] == m.kv.page_table(b)[0]);  // the sinks' pages stay shared
  std::unordered_map<const std::byte*, std::size_t> refs;
  for (seq_id s : {a, b})
    for (auto* p : m.kv.page_table(s)) ++refs[p];
  m.kv.store().check_pool(refs);
  m.kv.remove_sequence(a);
  m.kv.remove_sequence(b);
  CHECK(m.kv.memory_in_use() == 0);
}

TEST_CASE("sliding_window equals the float64 reference at absolute positions", "[eviction][rope]") {
  check_stream<cache<gqa<64>, contiguous, sliding_window<>, fp32>>(llama_rope(64), 0, 20, 100);
  check_stream<cache<gqa<64>, paged<>, sliding_window<>, fp16>>(llama_rope(64, true), 0, 33, 100);
  // Without RoPE (the caller's positions).
  check_stream<cache<gqa<64>, paged<>, sliding_window<16>, fp32>>(rope_config{}, 0, 0, 60);
  // Sinks with absolute positions.
  check_stream<cache<gqa<64>, contiguous, attention_sinks<4, 16, rope_positions::absolute>, fp32>>(
      llama_rope(64), 0, 0, 60);
}

TEST_CASE("RoPE on a full cache rotates at absolute positions", "[rope]") {
  // A full cache keeps everything: the reference's kept() with a window past
  // every length.
  check_stream<cache<gqa<64>, paged<>, sliding_window<>, fp32>>(llama_rope(64), 0, 1500, 20);
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  kvtest::harness<cache<gqa<64>, contiguous, full, fp32>> h(
      {.layers = 1, .q_heads = 2, .kv_heads = 1, .max_tokens = 256, .threads = 1}, seed);
  auto s = h.add();
  CHECK(h.run({{s, 40}}).error() <= 1e-5);  // rotary_dim 0: nothing rotated
}

TEST_CASE("rope frequencies and rotation match the definition", "[rope]") {
  for (bool scaled : {false, true})
    for (bool inter : {false, true}) {
      const rope_config r = llama_rope(48, inter, scaled);
      const auto f = detail::rope_frequencies(r), want = ref_freqs(r);
      REQUIRE(f.size() == 24);
      for (std::size_t i = 0; i < f.size(); ++i) CHECK(f[i] == Approx(want[i]).epsilon(1e-12));
      std::mt19937_64 rng(kvtest::test_seed());
      auto x = kvtest::normal(rng, 64);
      std::vector<double> xd(x.begin(), x.end());
      detail::rope_angles a;
      a.at(f, 123457);  // large positions keep their angle in double
      detail::rotate(x.data(), a.cs.data(), 48, inter);
      ref_rotate(xd.data(), 123457, r, want);
      for (std::size_t d = 0; d < 64; ++d) CHECK(x[d] == Approx(xd[d]).margin(1e-5));
      for (std::size_t d = 48; d < 64; ++d) CHECK(double(x[d]) == xd[d]);  // past rotary_dim
    }
}

TEST_CASE("memory stays bounded over a 100,000-token stream", "[eviction][memory]") {
  constexpr std::size_t S = 4, W = 64, pt = 16, steps = 100000;
  const kv_shape shape{1, 1, 64};
  {
    cache<mqa<64>, paged<pt>, attention_sinks<S, W>, fp16> kv(
        {.layers = 1, .q_heads = 2, .max_tokens = 1024, .threads = 1});
    auto s = kv.add_sequence();
    std::vector<float> k(64 * 8, 0.5f), q(2 * 64 * 8, 0.25f), out(2 * 64 * 8);
    const std::size_t max_step = 8;
    // sinks' pages + the window plus the step's tokens + a page the window cuts
    const std::size_t bound = windowed_paged_bytes<fp16>(shape, S, W, max_step, pt);
    std::size_t worst = 0;
    for (std::size_t i = 0; i < steps; ++i) {
      const std::size_t n = i % 997 == 0 ? max_step : 1;
      auto st = kv.begin_step({{s, n}});
      kv.write(0, st, make_view<const float>(k.data(), n, 1, 64),
               make_view<const float>(k.data(), n, 1, 64));
      kv.attend(0, st, make_view<const float>(q.data(), n, 2, 64), make_view(out.data(), n, 2, 64));
      worst = std::max(worst, kv.memory_in_use());
      if (kv.memory_in_use() > bound)
        FAIL("step " << i << ": " << kv.memory_in_use() << " > " << bound);
    }
    CHECK(kv.length(s) > steps);
    CHECK(kv.kept(s) == S + W - 1 + 1);
    CHECK(out[0] == Approx(0.5f));
    CHECK(worst <= bound);
    CHECK(kv.store().pages_in_use() * pt * bytes_per_token<fp16>(shape) == kv.memory_in_use());
  }
  {
    cache<mqa<64>, contiguous, sliding_window<W>, fp16> kv(
        {.layers = 1, .q_heads = 2, .max_tokens = 1024, .threads = 1});
    auto s = kv.add_sequence(W + 8);
    const std::size_t reserved = contiguous_sequence_bytes<fp16>(shape, W + 8);
    std::vector<float> k(64, 0.5f), q(2 * 64, 0.25f), out(2 * 64);
    for (std::size_t i = 0; i < steps; ++i) {
      auto st = kv.begin_step({{s, 1}});
      kv.write(0, st, make_view<const float>(k.data(), 1, 1, 64),
               make_view<const float>(k.data(), 1, 1, 64));
      kv.attend(0, st, make_view<const float>(q.data(), 1, 2, 64), make_view(out.data(), 1, 2, 64));
      if (kv.memory_in_use() != reserved) FAIL("step " << i << ": " << kv.memory_in_use());
    }
    CHECK(kv.kept(s) == W);
    CHECK(out[0] == Approx(0.5f));
  }
}

TEST_CASE("fork under eviction: both sequences stay exact, shared pages held once",
          "[eviction][paged]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  using C = cache<gqa<64>, paged<8>, attention_sinks<4, 20>, fp32>;
  window_model<C> m({.layers = 1,
                     .q_heads = 2,
                     .kv_heads = 1,
                     .max_tokens = 2048,
                     .threads = 2,
                     .rope = llama_rope(64)},
                    seed);
  auto a = m.add(100);
  CHECK(m.run({{a, 50}}) <= 1e-5);
  for (int i = 0; i < 5; ++i) CHECK(m.run({{a, 1}}) <= 1e-5);
  const std::size_t before = m.kv.memory_in_use();
  auto b = m.fork(a);
  CHECK(m.kv.memory_in_use() == before);  // nothing copied
  CHECK(m.kv.kept(b) == m.kv.kept(a));
  for (int i = 0; i < 40; ++i) {
    CHECK(m.run({{a, 1}, {b, i % 7 == 0 ? std::size_t{5} : 1}}) <= 1e-5);
  }
  // The sink page stays shared; window pages left the window and were freed.
  CHECK(m.kv.page_table(a)[0] == m.kv.page_table(b)[0]);
  std::unordered_map<const std::byte*, std::size_t> refs;
  for (seq_id s : {a, b})
    for (auto* p : m.kv.page_table(s)) ++refs[p];
  m.kv.store().check_pool(refs);
  m.kv.remove_sequence(a);
  m.kv.remove_sequence(b);
  CHECK(m.kv.memory_in_use() == 0);
}

TEST_CASE("truncate under eviction: into the evicted region is an error; rollback works",
          "[eviction][errors]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  using C = cache<gqa<64>, paged<8>, attention_sinks<4, 16>, fp32>;
  window_model<C> m({.layers = 1, .q_heads = 2, .kv_heads = 1, .max_tokens = 1024, .threads = 1},
                    seed);
  auto a = m.add(64);
  m.run({{a, 30}});
  for (int i = 0; i < 10; ++i) m.run({{a, 1}});
  const std::size_t len = m.kv.length(a), kept = m.kv.kept(a), mem = m.kv.memory_in_use();
  const auto table = std::vector<std::byte*>(m.kv.page_table(a).begin(), m.kv.page_table(a).end());
  CHECK_THROWS_WITH(m.kv.truncate(a, 20),
                    Contains("eviction dropped positions 4..") && Contains("to 20 tokens"));
  CHECK(m.kv.length(a) == len);
  CHECK(m.kv.kept(a) == kept);
  CHECK(m.kv.memory_in_use() == mem);
  CHECK(
      std::equal(table.begin(), table.end(), m.kv.page_table(a).begin(), m.kv.page_table(a).end()));
  // Rolling back the last step (speculative decoding) works and stays exact.
  m.kv.truncate(a, len - 1);
  for (auto* M : {&m.K, &m.V}) (*M)[a][0].resize((len - 1) * 1 * 64);
  CHECK(m.run({{a, 1}}) <= 1e-5);
  CHECK(m.run({{a, 3}}) <= 1e-5);
  // Back to the sinks: the window restarts.
  m.kv.truncate(a, 3);
  for (auto* M : {&m.K, &m.V}) (*M)[a][0].resize(3 * 64);
  CHECK(m.kv.kept(a) == 3);
  CHECK(m.run({{a, 25}}) <= 1e-5);
  CHECK(m.run({{a, 1}}) <= 1e-5);
}

TEST_CASE("prefix reuse is refused under eviction", "[eviction][paged]") {
  cache<gqa<64>, paged<8>, sliding_window<16>, fp16> kv(
      {.layers = 1, .q_heads = 2, .kv_heads = 1, .max_tokens = 256, .threads = 1});
  std::vector<token_id> ids(40, 7);
  CHECK_THROWS_WITH(kv.match_prefix(ids), Contains("sliding_window eviction keeps only a window"));
  CHECK(kv.sequences() == 0);
  CHECK(kv.memory_in_use() == 0);
}

TEST_CASE("bad eviction and RoPE parameters name the value", "[eviction][errors]") {
  using D = cache<gqa<64>, contiguous, attention_sinks<>, fp16>;
  const cache_config base{.layers = 1,
                          .q_heads = 2,
                          .kv_heads = 1,
                          .max_tokens = 256,
                          .threads = 1,
                          .sinks = 4,
                          .window = 16};
  auto with = [&](auto f) {
    cache_config c = base;
    f(c);
    return c;
  };
  CHECK_THROWS_WITH(D(with([](auto& c) { c.window = 0; })), Contains("window is 0"));
  CHECK_THROWS_WITH(D(with([](auto& c) { c.sinks = 300; })),
                    Contains("sinks 300 must be below max_tokens 256"));
  CHECK_THROWS_WITH(D(with([](auto& c) { c.rope = llama_rope(63); })),
                    Contains("rotary_dim 63 is odd"));
  CHECK_THROWS_WITH(D(with([](auto& c) { c.rope = llama_rope(80); })),
                    Contains("rotary_dim 80 exceeds head_dim 64"));
  CHECK_THROWS_WITH(D(with([](auto& c) {
                      c.rope = llama_rope(64);
                      c.rope.theta = 0;
                    })),
                    Contains("theta 0 must be finite and > 0"));
  CHECK_THROWS_WITH(D(with([](auto& c) {
                      c.rope = llama_rope(64);
                      c.rope.theta = -5;
                    })),
                    Contains("theta -5"));
  using St = cache<gqa<64>, contiguous, attention_sinks<4, 16>, fp16>;
  CHECK_THROWS_WITH(St(with([](auto& c) { c.window = 8; })),
                    Contains("window 8 differs from the policy's static value 16"));
  CHECK_THROWS_WITH(
      (cache<gqa<64>, contiguous, sliding_window<>, fp16>(with([](auto& c) { c.sinks = 2; }))),
      Contains("sinks 2 is set; sliding_window keeps no sinks"));
  D kv(base);
  auto s = kv.add_sequence(40);
  const std::size_t mem = kv.memory_in_use();
  CHECK_THROWS_WITH(kv.add_sequence(4), Contains("sinks 4 must be below the sequence capacity 4"));
  CHECK_THROWS_WITH(kv.add_sequence(10),
                    Contains("sequence capacity 10 is below sinks 4 + window 16"));
  CHECK(kv.sequences() == 1);
  CHECK(kv.memory_in_use() == mem);
  // A step larger than the ring's free slots.
  CHECK_THROWS_WITH(kv.begin_step({{s, 41}}), Contains("exceed its capacity of 40"));
  CHECK(kv.length(s) == 0);
}

TEST_CASE("windowed policies' keep() is the mask the cache applies", "[eviction][policies]") {
  STATIC_REQUIRE(windowed_eviction<attention_sinks<4, 8>>);
  STATIC_REQUIRE(windowed_eviction<sliding_window<>>);
  STATIC_REQUIRE_FALSE(windowed_eviction<full>);
  attention_sinks<4, 8> e;
  for (std::size_t len = 0; len < 40; ++len)
    for (std::size_t p = 0; p < len; ++p) CHECK(e.keep(p, len) == (p < 4 || p + 8 >= len));
  sliding_window<> w(eviction_config{0, 5});
  CHECK(w.window() == 5);
  CHECK(w.sinks() == 0);
  CHECK_FALSE(w.keep(0, 6));
  CHECK(w.keep(1, 6));
}

namespace {
//! Keeps every K-th token plus the newest W (a scattered eviction: the kept
//! tokens are not one window, so keys' cache positions shift as tokens leave).
template <std::size_t K, std::size_t W, rope_positions Pos>
struct strided_window {
  using axis = eviction_tag;
  static constexpr std::string_view name = "strided_window";
  static constexpr bool evicts = true;
  static constexpr rope_positions positions = Pos;
  static constexpr bool keep(std::size_t p, std::size_t length) noexcept {
    return p % K == 0 || p + W >= length;
  }
};

template <class Cache>
void check_scattered(const rope_config& rope) {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << " (set KVCACHE_TEST_SEED to reproduce)");
  window_model<Cache> m(
      {.layers = 2, .q_heads = 4, .kv_heads = 2, .max_tokens = 1024, .threads = 2, .rope = rope},
      seed);
  auto a = m.add(400), b = m.add(400);
  CHECK(m.run({{a, 40}, {b, 3}}) <= 1e-5);
  std::mt19937_64 pick(seed);
  for (int i = 0; i < 150; ++i) {
    const std::size_t n = pick() % 6 == 0 ? 1 + pick() % 30 : 1;
    INFO("step " << i << " length " << m.kv.length(a) << " append " << n);
    CHECK(m.run({{a, n}, {b, 1}}) <= 1e-5);
  }
  for (int i = 0; i < 20; ++i) CHECK(m.run({{a, 1}}) <= 1e-5);
  CHECK(m.kv.kept(a) < m.kv.length(a));
  // Truncating below a dropped token the shorter sequence would keep fails.
  const std::size_t len = m.kv.length(a);
  CHECK_THROWS_WITH(m.kv.truncate(a, len - 12), Contains("strided_window eviction dropped"));
  CHECK(m.kv.length(a) == len);
}
}  // namespace

TEST_CASE("a scattered custom eviction is exact with RoPE read at cache positions",
          "[eviction][rope]") {
  check_scattered<cache<gqa<64>, contiguous, strided_window<5, 12, rope_positions::cache>, fp32>>(
      llama_rope(64));
  check_scattered<cache<gqa<64>, contiguous, strided_window<5, 12, rope_positions::cache>, fp32>>(
      llama_rope(32, true));
  check_scattered<cache<gqa<64>, contiguous, strided_window<3, 9, rope_positions::absolute>, fp32>>(
      llama_rope(64));
  check_scattered<cache<gqa<64>, contiguous, strided_window<4, 16, rope_positions::cache>, fp32>>(
      rope_config{});
}

namespace {
template <class Cache>
void check_sparse(const rope_config& rope) {
  using P = typename Cache::precision;
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << " (set KVCACHE_TEST_SEED to reproduce)");
  INFO(Cache::storage::name << " " << P::name);
  window_model<Cache> m(
      {.layers = 2,
       .q_heads = 4,
       .kv_heads = 2,
       .max_tokens = 3200,
       .threads = 2,
       .page_tokens = std::is_same_v<typename Cache::storage, paged<>> ? 8u : 0u,
       .sparse = {.globals = 3, .window = 10, .block = 8, .random = 2, .seed = seed},
       .rope = rope},
      seed);
  auto a = m.add(1500), b = m.add(1500);
  // Prefill as a mask (a long prompt, then chunks), decode as a selection.
  const double tol = kvtest::kernel_bound<P>();
  CHECK(m.run({{a, 150}, {b, 2}}) <= tol);
  std::mt19937_64 pick(seed);
  for (int i = 0; i < 120; ++i) {
    const std::size_t n = pick() % 5 == 0 ? 2 + pick() % 40 : 1;
    INFO("step " << i << " length " << m.kv.length(a) << " append " << n);
    CHECK(m.run({{a, n}, {b, 1}}) <= tol);
  }
  CHECK(m.orig.error() <= P::tolerance);
  CHECK(m.kv.kept(a) == m.kv.length(a));  // every token kept: only reads are sparse
}
}  // namespace

TEST_CASE("sparse_pattern matches the masked float64 reference in prefill and decode", "[sparse]") {
  check_sparse<cache<gqa<64>, contiguous, sparse_pattern, fp32>>(rope_config{});
  check_sparse<cache<gqa<64>, paged<>, sparse_pattern, fp16>>(llama_rope(64));
  // Per-channel keys: decode ranges start and end inside key groups and the residual.
  check_sparse<cache<gqa<64>, paged<>, sparse_pattern, per_channel_k<int4_kv<true>>>>(
      llama_rope(64));
  CHECK_THROWS_WITH(
      (cache<gqa<64>, contiguous, sparse_pattern, fp32>({.layers = 1,
                                                         .q_heads = 2,
                                                         .kv_heads = 1,
                                                         .max_tokens = 64,
                                                         .sparse = {.globals = 1, .window = 0}})),
      Contains("sparse window is 0"));
  sparse_pattern p(eviction_config{.sparse = {.window = 4, .block = 16, .random = 3, .seed = 9}});
  for (std::size_t qb = 0; qb < 40; ++qb) {
    const auto r = p.random_blocks(qb);
    CHECK(r.size() == std::min<std::size_t>(3, qb));
    CHECK(r == p.random_blocks(qb));  // seeded: the same every time
    for (std::size_t b : r) CHECK(b < qb);
  }
}

TEST_CASE("a windowed step the pool cannot serve changes nothing; evicted pages serve the next",
          "[eviction][paged][errors]") {
  // 5 pages of 8 tokens, window 16: one sequence needs at most 3 pages (a
  // page boundary: 2 kept and 1 new, taken as its oldest leaves), two need
  // up to 6, so the shared pool runs out.
  using C = cache<mqa<64>, paged<8>, sliding_window<16>, fp16>;
  C kv({.layers = 1, .q_heads = 2, .max_tokens = 40, .threads = 1});
  auto a = kv.add_sequence(), b = kv.add_sequence();
  std::vector<float> k(64 * 24, 0.5f), q(2 * 64 * 24, 0.25f), out(2 * 64 * 24);
  auto step_of = [&](std::initializer_list<append> ap) {
    auto st = kv.begin_step(ap);
    const std::size_t n = st.tokens();
    kv.write(0, st, make_view<const float>(k.data(), n, 1, 64),
             make_view<const float>(k.data(), n, 1, 64));
    kv.attend(0, st, make_view<const float>(q.data(), n, 2, 64), make_view(out.data(), n, 2, 64));
  };
  // One sequence streams through the whole pool many times over.
  for (int i = 0; i < 300; ++i) step_of({{a, 1}});
  CHECK(kv.store().pages_in_use() <= 3);
  // The other fills what is left, then a step that needs more fails whole.
  bool failed = false;
  for (int i = 0; i < 40 && !failed; ++i) {
    const std::size_t la = kv.length(a), lb = kv.length(b), mem = kv.memory_in_use();
    try {
      step_of({{a, 1}, {b, 8}});
    } catch (const kvcache::error& e) {
      failed = true;
      CHECK_THAT(e.what(), Contains("new pages of 8 tokens"));
      CHECK(kv.length(a) == la);
      CHECK(kv.length(b) == lb);
      CHECK(kv.memory_in_use() == mem);
    }
  }
  CHECK(failed);
  kv.remove_sequence(b);
  for (int i = 0; i < 50; ++i) step_of({{a, 1}});
  CHECK(kv.store().pages_in_use() <= 3);
  CHECK(out[0] == Approx(0.5f));
  // Window 9 on 8-token pages in a pool of 2: at every page boundary the
  // step needs a page that only its own eviction frees.
  cache<mqa<64>, paged<8>, sliding_window<9>, fp16> tight(
      {.layers = 1, .q_heads = 2, .max_tokens = 16, .threads = 1});
  auto t = tight.add_sequence();
  for (int i = 0; i < 100; ++i) {
    auto st = tight.begin_step({{t, 1}});
    tight.write(0, st, make_view<const float>(k.data(), 1, 1, 64),
                make_view<const float>(k.data(), 1, 1, 64));
    tight.attend(0, st, make_view<const float>(q.data(), 1, 2, 64),
                 make_view(out.data(), 1, 2, 64));
  }
  CHECK(tight.length(t) == 100);
  CHECK(out[0] == Approx(0.5f));
}
