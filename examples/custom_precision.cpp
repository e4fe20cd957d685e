// A custom precision written only against the precision_policy concept:
// fp16 rows with one float scale per row, so rows of large magnitude keep
// their relative precision (fp16 alone overflows past 65504).
//   row_bytes = 4 + 2 x head_dim
// It names no `element` type, so the kernels decode its rows tile by tile
// through decode().
#include <cmath>
#include <cstdio>
#include <cstring>
#include <kvcache/kvcache.hpp>
#include <vector>

struct scaled_fp16 {
  using axis = kvcache::precision_tag;
  static constexpr std::string_view name = "scaled_fp16";
  static constexpr double tolerance = 2e-3;
  static constexpr std::size_t row_bytes(std::size_t dim) noexcept { return 4 + 2 * dim; }
  static void check_dim(std::size_t dim) {
    if (dim == 0) throw kvcache::error("scaled_fp16: head_dim is 0; it must be at least 1");
  }
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    float amax = 0.f;
    for (std::size_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(src[i]));
    const float scale = amax > 0.f ? amax : 1.f;  // an all-zero row stays zero
    std::memcpy(dst, &scale, 4);
    for (std::size_t i = 0; i < dim; ++i) {
      const kvcache::half h(src[i] / scale);
      std::memcpy(dst + 4 + 2 * i, &h.bits, 2);
    }
  }
  static void decode(const std::byte* src, float* dst, std::size_t dim) noexcept {
    float scale;
    std::memcpy(&scale, src, 4);
    for (std::size_t i = 0; i < dim; ++i) {
      std::uint16_t b;
      std::memcpy(&b, src + 4 + 2 * i, 2);
      dst[i] = static_cast<float>(kvcache::half::from_bits(b)) * scale;
    }
  }
};
static_assert(kvcache::precision_policy<scaled_fp16>);

int main() {
  using namespace kvcache;
  const std::size_t qh = 8, kvh = 2, d = 64, n = 40;
  cache<gqa<64>, contiguous, full, scaled_fp16> kv(
      {.layers = 1, .q_heads = qh, .kv_heads = kvh, .max_tokens = 128, .threads = 1});
  cache<gqa<64>, contiguous, full, fp32> ref(
      {.layers = 1, .q_heads = qh, .kv_heads = kvh, .max_tokens = 128, .threads = 1});
  // Values up to 1e6: plain fp16 would overflow to Inf, the scaled rows do not.
  std::vector<float> k(n * kvh * d), v(n * kvh * d), q(n * qh * d);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.37f * i) * 1e-3f;
    v[i] = std::cos(0.11f * i) * 1e6f;
  }
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::cos(0.23f * i);
  std::vector<float> out(q.size()), want(q.size());
  auto run = [&](auto& c, std::vector<float>& o) {
    auto s = c.add_sequence();
    auto st = c.begin_step({{s, n}});
    c.write(0, st, make_view<const float>(k.data(), n, kvh, d),
            make_view<const float>(v.data(), n, kvh, d));
    c.attend(0, st, make_view<const float>(q.data(), n, qh, d), make_view(o.data(), n, qh, d));
  };
  run(kv, out);
  run(ref, want);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - want[i]) * double(out[i] - want[i]);
    den += double(want[i]) * want[i];
  }
  const double err = std::sqrt(num / den);
  std::printf("scaled_fp16: %zu bytes per row of %zu, relative error vs fp32 %.2e\n",
              scaled_fp16::row_bytes(d), d, err);
  return err < scaled_fp16::tolerance ? 0 : 1;
}
