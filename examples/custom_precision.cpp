// A custom precision written only against the precision_policy concept.
//
// scaled_fp16: each row is stored as fp16 values with one float scale, so rows
// of any magnitude keep fp16's 11 significant bits (plain fp16 overflows past
// 65504 and loses bits below 2^-14).
//   row_bytes = 4 + 2 x head_dim        (float scale, then head_dim halves)
// The scale is the power of two just above the row's largest magnitude, so
// dividing by it and multiplying back are exact: the only rounding is fp16's.
// The policy names no `element` type, so the kernels decode its rows tile by
// tile into float scratch through decode().
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <vector>

struct scaled_fp16 {
  using axis = kvcache::precision_tag;
  static constexpr std::string_view name = "scaled_fp16";
  //! The stored values are fp16 roundings of the row over a power of two, so
  //! the per-element relative error is fp16's (2^-11) and so is the bound.
  static constexpr double tolerance = 2e-3;

  static constexpr std::size_t row_bytes(std::size_t dim) noexcept { return 4 + 2 * dim; }

  static void check_dim(std::size_t dim) {
    if (dim == 0)
      throw kvcache::error("kvcache: scaled_fp16: head_dim is 0; it must be at least 1");
  }

  // Called inside the kernels' thread pool: must not throw.
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    float amax = 0.f;
    for (std::size_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(src[i]));
    int e = 0;
    if (amax > 0.f && std::isfinite(amax)) std::frexp(amax, &e);  // amax = m 2^e, m in [0.5, 1)
    const float scale = std::ldexp(1.f, e);                       // |src / scale| < 1
    std::memcpy(dst, &scale, 4);
    for (std::size_t i = 0; i < dim; ++i) {
      const kvcache::half h(src[i] / scale);
      std::memcpy(dst + 4 + 2 * i, &h.bits, 2);
    }
  }

  static void decode(const std::byte* src, float* dst, std::size_t dim) noexcept {
    float scale;
    std::memcpy(&scale, src, 4);  // a row starts at any multiple of row_bytes
    for (std::size_t i = 0; i < dim; ++i) {
      std::uint16_t b;
      std::memcpy(&b, src + 4 + 2 * i, 2);
      dst[i] = static_cast<float>(kvcache::half::from_bits(b)) * scale;
    }
  }
};

namespace {

// Runs a prompt of `prompt` tokens then `decode` single tokens through one
// layer of cache `Cache`; returns every row's output.
template <class Cache>
std::vector<float> run(std::size_t prompt, std::size_t decode, const std::vector<float>& q,
                       const std::vector<float>& k, const std::vector<float>& v) {
  using namespace kvcache;
  constexpr std::size_t qh = 8, kvh = 2, d = 64;
  Cache kv({.layers = 1, .q_heads = qh, .kv_heads = kvh, .max_tokens = 256, .threads = 1});
  const seq_id s = kv.add_sequence(prompt + decode);
  std::vector<float> out(q.size());
  std::size_t row = 0;
  auto one_step = [&](std::size_t t) {  // t new tokens: K, V, Q rows [row, row + t)
    const step st = kv.begin_step({{s, t}});
    kv.write(0, st, make_view(k.data() + row * kvh * d, t, kvh, d),
             make_view(v.data() + row * kvh * d, t, kvh, d));
    kv.attend(0, st, make_view(q.data() + row * qh * d, t, qh, d),
              make_view(out.data() + row * qh * d, t, qh, d));
    row += t;
  };
  one_step(prompt);                                      // prefill
  for (std::size_t i = 0; i < decode; ++i) one_step(1);  // decode
  return out;
}

}  // namespace

int main() {
  using namespace kvcache;
  constexpr std::size_t qh = 8, kvh = 2, d = 64, prompt = 40, decode = 4, n = prompt + decode;
  // V up to 1e6: plain fp16 would store Inf; K tiny: plain fp16 would lose bits.
  std::vector<float> q(n * qh * d), k(n * kvh * d), v(n * kvh * d);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.37f * static_cast<float>(i)) * 1e-3f;
    v[i] = std::cos(0.11f * static_cast<float>(i)) * 1e6f;
  }
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = 500.f * std::cos(0.23f * static_cast<float>(i));

  const auto got = run<cache<gqa<d>, contiguous, full, scaled_fp16>>(prompt, decode, q, k, v);
  const auto want = run<cache<gqa<d>, contiguous, full, fp32>>(prompt, decode, q, k, v);
  const auto plain = run<cache<gqa<d>, contiguous, full, fp16>>(prompt, decode, q, k, v);
  const auto non_finite =
      std::count_if(plain.begin(), plain.end(), [](float x) { return !std::isfinite(x); });
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  const double err = std::sqrt(num / den);
  std::printf(
      "scaled_fp16: %zu bytes per row of %zu (fp16: %zu); %zu tokens, "
      "relative L2 error against fp32 %.2e (tolerance %.0e)\n",
      scaled_fp16::row_bytes(d), d, fp16::row_bytes(d), n, err, scaled_fp16::tolerance);
  std::printf("plain fp16 on the same inputs: %td of %zu outputs are not finite\n", non_finite,
              plain.size());
  return err < scaled_fp16::tolerance ? 0 : 1;
}

static_assert(kvcache::precision_policy<scaled_fp16>);
