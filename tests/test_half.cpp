// half and bfloat16 conversions: every one of the 65,536 bit patterns to
// float, 10^7 random floats plus edge cases from float, checked against an
// independent oracle (nearest representable value, ties to even, in double),
// and the vectorised paths against the scalar path bit for bit.
#include <bit>
#include <cmath>
#include <cstring>
#include <kvcache/detail/simd.hpp>

#include "support.hpp"

using namespace kvcache;
namespace simd = kvcache::detail::simd;

namespace {

// Value of a binary16 pattern computed from its fields, in double.
double half_value(std::uint16_t b) {
  const int e = (b >> 10) & 0x1f, m = b & 0x3ff;
  const double s = (b & 0x8000) ? -1.0 : 1.0;
  if (e == 0x1f) return m ? std::nan("") : s * INFINITY;
  if (e == 0) return s * std::ldexp(m, -24);
  return s * std::ldexp(1024 + m, e - 25);
}

// Expected binary16 bits of float f: the nearest of all finite halves (ties to
// the even mantissa), Inf past the rounding boundary 65520.
std::uint16_t oracle_half(float f) {
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return 0;  // NaN is checked separately
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;
  // Halves are monotone in their bit pattern: binary search the lower neighbour.
  std::uint16_t lo = 0, hi = 0x7bff;
  while (lo < hi) {
    const std::uint16_t mid = static_cast<std::uint16_t>((lo + hi + 1) / 2);
    if (half_value(mid) <= a)
      lo = mid;
    else
      hi = static_cast<std::uint16_t>(mid - 1);
  }
  std::uint16_t best = lo;
  if (lo < 0x7bff || a > half_value(0x7bff)) {
    const std::uint16_t up = static_cast<std::uint16_t>(lo + 1);
    const double dl = a - half_value(lo), du = half_value(up) - a;
    if (du < dl || (du == dl && (up & 1) == 0)) best = up;
  }
  return sign | best;
}

std::uint16_t oracle_bf16(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const double a = static_cast<double>(f);
  const std::uint32_t lo = x & 0xffff0000u, up = lo + 0x10000u;
  const double vl = std::bit_cast<float>(lo);
  double vu = std::bit_cast<float>(up);
  // Past the largest finite bfloat16 the next value is Inf, which rounding
  // treats as 2^128 (one ulp further).
  if (std::isinf(vu)) vu = std::copysign(std::ldexp(1.0, 128), a);
  const double dl = std::fabs(a - vl), du = std::fabs(vu - a);
  if (du < dl || (du == dl && ((up >> 16) & 1) == 0)) return static_cast<std::uint16_t>(up >> 16);
  return static_cast<std::uint16_t>(lo >> 16);
}

std::vector<float> edge_floats() {
  std::vector<float> v = {0.f,
                          -0.f,
                          INFINITY,
                          -INFINITY,
                          NAN,
                          -NAN,
                          65504.f,
                          65519.99f,
                          65520.f,
                          65536.f,
                          -65520.f,
                          1e30f,
                          -1e30f,
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::max(),
                          -std::numeric_limits<float>::max(),
                          6.103515625e-05f,
                          6.0975552e-05f,
                          5.9604645e-08f,
                          2.9802322e-08f,
                          2.9802326e-08f,
                          8.940697e-08f,
                          1.0f,
                          1.0009765625f,
                          1.00048828125f,
                          1.000732421875f,
                          3.3895314e38f,
                          3.3961776e38f};
  for (std::uint32_t b :
       {0x7f800001u, 0x7fc00000u, 0xffbfffffu, 0x7f7fffffu, 0x00000001u, 0x807fffffu, 0x387fe000u,
        0x387ff000u, 0x33800000u, 0x33000000u, 0x33000001u, 0x477fefffu, 0x477ff000u})
    v.push_back(std::bit_cast<float>(b));
  return v;
}

void check_float_to_16(float f) {
  const std::uint16_t h = half(f).bits, b = bfloat16(f).bits;
  if (std::isnan(f)) {
    REQUIRE((h & 0x7c00) == 0x7c00);
    REQUIRE((h & 0x0200) != 0);  // quiet
    REQUIRE((b & 0x7f80) == 0x7f80);
    REQUIRE((b & 0x0040) != 0);
    return;
  }
  if (h != oracle_half(f))
    FAIL("half(" << f << " = 0x" << std::hex << std::bit_cast<std::uint32_t>(f) << ") = 0x" << h
                 << ", expected 0x" << oracle_half(f));
  if (b != oracle_bf16(f))
    FAIL("bfloat16(0x" << std::hex << std::bit_cast<std::uint32_t>(f) << ") = 0x" << b
                       << ", expected 0x" << oracle_bf16(f));
}

}  // namespace

TEST_CASE("every half and bfloat16 bit pattern converts to the exact float", "[half]") {
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto b = static_cast<std::uint16_t>(i);
    const float hf = static_cast<float>(half::from_bits(b));
    const double want = half_value(b);
    if (std::isnan(want)) {
      REQUIRE(std::isnan(hf));
      REQUIRE(std::signbit(hf) == bool(b & 0x8000));
    } else {
      REQUIRE(static_cast<double>(hf) == want);
      REQUIRE(std::signbit(hf) == bool(b & 0x8000));
      REQUIRE(half(hf).bits == b);  // round trip
    }
    const float bf = static_cast<float>(bfloat16::from_bits(b));
    REQUIRE(std::bit_cast<std::uint32_t>(bf) == i << 16);
  }
}

TEST_CASE("float to half and bfloat16 rounds to nearest even", "[half]") {
  for (float f : edge_floats()) check_float_to_16(f);
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint32_t> bits;
  std::uniform_real_distribution<float> near(-70000.f, 70000.f);
  std::uniform_int_distribution<int> exps(-30, 17);
  for (int i = 0; i < 10'000'000; ++i) {
    float f;
    switch (i % 3) {
      case 0:
        f = std::bit_cast<float>(bits(rng));
        break;  // any pattern
      case 1:
        f = near(rng);
        break;  // the half range
      default:
        f = std::ldexp(near(rng) / 70000.f, exps(rng));  // subnormals to overflow
    }
    check_float_to_16(f);
  }
}

TEST_CASE("vectorised conversions agree with the scalar path bit for bit", "[half][simd]") {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint32_t> bits;
  // 16-bit -> float: all patterns through the target's path and the portable one.
  for (std::uint32_t base = 0; base < 65536; base += simd::lanes) {
    half h[simd::lanes];
    bfloat16 b[simd::lanes];
    for (int i = 0; i < simd::lanes; ++i) {
      h[i] = half::from_bits(static_cast<std::uint16_t>(base + i));
      b[i] = bfloat16::from_bits(static_cast<std::uint16_t>(base + i));
    }
    simd::vh raw;
    std::memcpy(&raw, static_cast<const void*>(h), sizeof raw);
    const simd::vf target = simd::load(h), portable = simd::half_to_float_portable(raw);
    const simd::vf bt = simd::load(b);
    for (int i = 0; i < simd::lanes; ++i) {
      const auto want = std::bit_cast<std::uint32_t>(static_cast<float>(h[i]));
      REQUIRE(std::bit_cast<std::uint32_t>(float(target[i])) == want);
      REQUIRE(std::bit_cast<std::uint32_t>(float(portable[i])) == want);
      REQUIRE(std::bit_cast<std::uint32_t>(float(bt[i])) ==
              std::bit_cast<std::uint32_t>(static_cast<float>(b[i])));
    }
  }
  // float -> 16-bit: edge cases and random patterns.
  std::vector<float> in = edge_floats();
  while (in.size() % simd::lanes) in.push_back(1.f);
  for (int i = 0; i < 2'000'000; ++i) in.push_back(std::bit_cast<float>(bits(rng)));
  for (std::size_t base = 0; base + simd::lanes <= in.size(); base += simd::lanes) {
    const simd::vf v = simd::load(in.data() + base);
    half h[simd::lanes];
    bfloat16 b[simd::lanes];
    simd::store(h, v);
    simd::store(b, v);
    const simd::vh portable = simd::float_to_half_portable(v);
    for (int i = 0; i < simd::lanes; ++i) {
      const float f = in[base + i];
      REQUIRE(h[i].bits == half(f).bits);
      REQUIRE(portable[i] == half(f).bits);
      REQUIRE(b[i].bits == bfloat16(f).bits);
    }
  }
  // The bulk converter's vector body and scalar tail agree too.
  std::vector<float> src(1000);
  for (auto& x : src) x = std::bit_cast<float>(bits(rng));
  std::vector<half> dst(src.size());
  kvcache::detail::convert(src.data(), dst.data(), src.size());
  for (std::size_t i = 0; i < src.size(); ++i) REQUIRE(dst[i].bits == half(src[i]).bits);
}
