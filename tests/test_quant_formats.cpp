// Block-quantized formats: golden bytes for fixed inputs, zero blocks, fp8
// conversion, the vectorised readers and the write kernel's vector encoder
// against the scalar block functions, and the bytes each format stores.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#include "support.hpp"

using namespace kvcache;

namespace {

// One block of 32: (i - 16) / 4, plus 0.1 on every fifth element so that
// rounding ties are rare and the largest magnitude (-3.9) is unique.
std::array<float, 32> golden_input() {
  std::array<float, 32> x;
  for (int i = 0; i < 32; ++i) x[i] = (i - 16) * 0.25f + (i % 5 == 0 ? 0.1f : 0.f);
  return x;
}

template <class P>
std::vector<unsigned> encoded(const float* x, std::size_t dim) {
  std::vector<std::byte> b(P::row_bytes(dim));
  P::encode(x, b.data(), dim);
  return {reinterpret_cast<const std::uint8_t*>(b.data()),
          reinterpret_cast<const std::uint8_t*>(b.data()) + b.size()};
}

}  // namespace

TEST_CASE("golden bytes of every block format", "[quant][format]") {
  const auto x = golden_input();
  // int8: scale fp16(3.9 / 127) = 0x27dd, codes round(x / scale), -3.9 -> -127 (0x81).
  CHECK(encoded<int8_kv<>>(x.data(), 32) ==
        std::vector<unsigned>{0x81, 0x86, 0x8e, 0x96, 0x9e, 0xaa, 0xaf, 0xb7, 0xbf,
                              0xc7, 0xd2, 0xd7, 0xdf, 0xe8, 0xf0, 0xfb, 0x00, 0x08,
                              0x10, 0x18, 0x24, 0x29, 0x31, 0x39, 0x41, 0x4d, 0x51,
                              0x5a, 0x62, 0x6a, 0x75, 0x7a, 0xdd, 0x27});
  // int4 (q4_0): scale fp16(-3.9 / -8) = 0x37cd; byte j = code j | code j+16 << 4.
  CHECK(encoded<int4_kv<>>(x.data(), 32) ==
        std::vector<unsigned>{0x80, 0x90, 0x91, 0xa1, 0xa2, 0xb3, 0xb3, 0xc3, 0xc4, 0xd4, 0xd5,
                              0xe5, 0xe6, 0xf6, 0xf7, 0xf8, 0xcd, 0x37});
  // int4 asymmetric (q4_1): scale fp16(7.65 / 15) = 0x3815, min fp16(-3.9) = 0xc3cd.
  CHECK(encoded<int4_kv<true>>(x.data(), 32) ==
        std::vector<unsigned>{0x80, 0x80, 0x91, 0x91, 0xa2, 0xa2, 0xb3, 0xb3, 0xc4, 0xc4,
                              0xd5, 0xd5, 0xe6, 0xe6, 0xf7, 0xf7, 0x15, 0x38, 0xcd, 0xc3});
  // int2: scale fp16(7.65 / 3) = 0x411a, min 0xc3cd; byte j = codes j, j+8, j+16, j+24.
  CHECK(encoded<int2_kv>(x.data(), 32) == std::vector<unsigned>{0xa4, 0xa4, 0xe4, 0xe4, 0xe4, 0xe4,
                                                                0xe5, 0xe5, 0x1a, 0x41, 0xcd,
                                                                0xc3});
  // fp8 e4m3: scale fp16(3.9 / 448) = 0x2075; -3.9 / scale saturates to -448 (0xfe).
  CHECK(encoded<fp8_e4m3_kv<>>(x.data(), 32) ==
        std::vector<unsigned>{0xfe, 0xfd, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8, 0xf6,
                              0xf5, 0xf2, 0xf1, 0xee, 0xeb, 0xe6, 0xd9, 0x00, 0x5e,
                              0x66, 0x6b, 0x70, 0x71, 0x73, 0x75, 0x76, 0x78, 0x79,
                              0x7a, 0x7b, 0x7c, 0x7d, 0x7d, 0x75, 0x20});
}

TEMPLATE_TEST_CASE("all-zero and constant blocks decode without NaN", "[quant][format]", int8_kv<>,
                   int8_kv<128>, int4_kv<>, int4_kv<true>, int2_kv, fp8_e4m3_kv<>, fp8_e4m3_kv<128>,
                   hadamard<int4_kv<>>) {
  constexpr std::size_t dim = 128;
  std::vector<std::byte> row(TestType::row_bytes(dim));
  std::vector<float> x(dim, 0.f), y(dim, 1.f);
  TestType::encode(x.data(), row.data(), dim);
  TestType::decode(row.data(), y.data(), dim);
  for (float v : y) CHECK(v == 0.f);
  // Constant and tiny values: the scale rounds to fp16's smallest or to 0.
  for (float c : {1e-30f, -2.5f, 3e4f}) {
    std::fill(x.begin(), x.end(), c);
    TestType::encode(x.data(), row.data(), dim);
    TestType::decode(row.data(), y.data(), dim);
    for (float v : y) REQUIRE(std::isfinite(v));
    for (float v : y) CHECK(std::fabs(v - c) <= 0.02f * std::fabs(c) + 1e-6f);
  }
}

TEST_CASE("e4m3 conversion is exact and rounds to nearest even", "[quant][format]") {
  for (unsigned c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN codes are never produced
    const float f = detail::e4m3_to_float(static_cast<std::uint8_t>(c));
    if (c == 0x80) continue;  // -0 encodes as +0's sign-carrying twin; both decode to 0
    CHECK(detail::float_to_e4m3(f) == c);
  }
  CHECK(detail::e4m3_to_float(0x7e) == 448.f);
  CHECK(detail::e4m3_to_float(0x01) == std::ldexp(1.f, -9));
  CHECK(detail::e4m3_to_float(0x08) == std::ldexp(1.f, -6));
  CHECK(detail::float_to_e4m3(1e9f) == 0x7e);
  CHECK(detail::float_to_e4m3(-1e9f) == 0xfe);
  CHECK(detail::float_to_e4m3(1.0625f) == 0x38);  // tie between 1 and 1.125: even (1)
  CHECK(detail::float_to_e4m3(1.1875f) == 0x3a);  // tie between 1.125 and 1.25: even (1.25)
}

TEMPLATE_TEST_CASE("vectorised readers and block functions agree with decode", "[quant][format]",
                   int8_kv<>, int8_kv<64>, int8_kv<128>, int4_kv<>, int4_kv<true>, int2_kv,
                   fp8_e4m3_kv<>, fp8_e4m3_kv<128>) {
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (std::size_t dim : {128, 256}) {
    auto x = kvtest::normal(rng, dim, 3.f), q = kvtest::normal(rng, dim);
    std::vector<std::byte> row(TestType::row_bytes(dim));
    TestType::encode(x.data(), row.data(), dim);
    std::vector<float> y(dim);
    TestType::decode(row.data(), y.data(), dim);
    for (std::size_t c = 0; c < dim / 16; ++c) {
      const auto v = detail::read_row16<TestType>(row.data(), c, dim);
      for (std::size_t i = 0; i < 16; ++i) CHECK(v[i] == y[c * 16 + i]);
    }
    const std::size_t G = TestType::group;
    double dot = 0, want = 0;
    std::vector<float> acc(dim, 1.f);
    for (std::size_t b = 0; b < dim / G; ++b) {
      dot += TestType::dot_block(q.data() + b * G, row.data(), b, dim);
      TestType::accumulate_block(0.5f, row.data(), b, dim, acc.data() + b * G);
    }
    for (std::size_t d = 0; d < dim; ++d) {
      want += double(q[d]) * y[d];
      CHECK(acc[d] == Approx(1.f + 0.5f * y[d]).margin(1e-5));
    }
    CHECK(dot == Approx(want).epsilon(1e-4).margin(1e-4));
  }
}

TEST_CASE("the vectorised fp8 reader decodes every code", "[quant][format][fp8]") {
  // Random rows rarely hold subnormal or extreme codes; this row holds each
  // code but the two NaNs (never stored), under a scale of 3.
  using P = fp8_e4m3_kv<>;
  constexpr std::size_t dim = 256;
  std::vector<std::byte> row(P::row_bytes(dim));
  for (std::size_t i = 0; i < dim; ++i)
    row[i] = std::byte(static_cast<std::uint8_t>((i & 0x7f) == 0x7f ? 0 : i));
  const std::uint16_t three = 0x4200;  // fp16 3.0
  for (std::size_t b = 0; b < dim / P::group; ++b)
    std::memcpy(row.data() + P::format::scale_offset(dim) + 2 * b, &three, 2);
  for (std::size_t c = 0; c < dim / 16; ++c) {
    const auto v = detail::read_row16<P>(row.data(), c, dim);
    for (std::size_t i = 0; i < 16; ++i) {
      const auto code = static_cast<std::uint8_t>(row[c * 16 + i]);
      INFO("code " << int(code));
      CHECK(v[i] == 3.f * detail::e4m3_to_float(code));
    }
  }
}

TEST_CASE("the fp8 tile path's bf16 operands are every code exactly", "[quant][format][fp8]") {
  // The tile unit reads e4m3 codes as bf16 (amx_fp8.hpp): each of the 254
  // finite codes, subnormals and both zeros included, must be its value.
  namespace f8 = detail::amx_fp8;
  for (unsigned c = 0; c < 256; ++c) {
    if ((c & 0x7fu) == 0x7fu) continue;  // NaN: never stored
    INFO("code " << c);
    const auto code = static_cast<std::uint8_t>(c);
    const auto bits = static_cast<std::uint32_t>(f8::e4m3_bf16_bits(code)) << 16;
    CHECK(std::bit_cast<float>(bits) == detail::e4m3_to_float(code));
  }
#if KVCACHE_HAS_AMX_FP8
  // The vector lookups, in the byte unpacks' order: word k of the first
  // half is code 16 (k / 8) + k % 8, of the second 16 (k / 8) + 8 + k % 8.
  for (unsigned base = 0; base < 256; base += 64) {
    std::uint8_t codes[64];
    std::uint16_t out[64];
    for (unsigned i = 0; i < 64; ++i) codes[i] = static_cast<std::uint8_t>(base + i);
    f8::bf16_codes(codes, out);
    for (unsigned s = 0; s < 2; ++s)
      for (unsigned k = 0; k < 32; ++k) {
        const std::uint8_t code = codes[16 * (k / 8) + 8 * s + k % 8];
        INFO("code " << int(code));
        CHECK(out[32 * s + k] == f8::e4m3_bf16_bits(code));
      }
  }
#endif
}

TEST_CASE("bytes per element of each format", "[quant][format][memory]") {
  // dim 128: codes + fp16 metadata per block.
  static_assert(int8_kv<>::row_bytes(128) == 128 + 8);      // 8.5 bits
  static_assert(int8_kv<64>::row_bytes(128) == 128 + 4);    // 8.25
  static_assert(int8_kv<128>::row_bytes(128) == 128 + 2);   // 8.125
  static_assert(int4_kv<>::row_bytes(128) == 64 + 8);       // 4.5
  static_assert(int4_kv<true>::row_bytes(128) == 64 + 16);  // 5
  static_assert(int2_kv::row_bytes(128) == 32 + 16);        // 3
  static_assert(fp8_e4m3_kv<>::row_bytes(128) == 128 + 8);  // 8.5
  static_assert(hadamard<int4_kv<>>::row_bytes(128) == int4_kv<>::row_bytes(128));
  // Llama-3-8B, 32 layers x 8 KV heads x 128, 32k tokens: int8 is 17/32 of fp16.
  constexpr kv_shape llama3{.layers = 32, .kv_heads = 8, .head_dim = 128};
  static_assert(kv_bytes<fp16>(llama3, 1, 32768) == 4'294'967'296ull);
  static_assert(kv_bytes<int8_kv<>>(llama3, 1, 32768) == 2'281'701'376ull);
  static_assert(kv_bytes<int4_kv<>>(llama3, 1, 32768) == 1'207'959'552ull);
  static_assert(kv_bytes<int2_kv>(llama3, 1, 32768) == 805'306'368ull);
  cache<gqa<>, contiguous, full, int4_kv<true>> kv(
      {.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 96, .max_tokens = 500, .threads = 1});
  kv.add_sequence(300);
  kv.add_sequence(200);
  constexpr kv_shape shape{.layers = 2, .kv_heads = 2, .head_dim = 96};
  CHECK(kv.memory_in_use() == contiguous_sequence_bytes<int4_kv<true>>(shape, 500));
  CHECK(kv.memory_in_use() == 500ull * 2 * 2 * 2 * (48 + 12));
}

namespace {

// Blocks that exercise the encoders' corner cases, one 32-element chunk at a
// time: magnitudes from 1e-30 to 1e30, signed zeros, a lone non-zero, the
// largest magnitude twice with either sign, and values that land exactly on
// a rounding tie (a power-of-two scale and codes of k + 1/2, or e4m3
// midpoints for fp8).
template <class F>
void corner_chunk(std::mt19937_64& rng, int mode, float* x) {
  std::uniform_int_distribution<int> pos(0, 31), sign(0, 1), e(0, 6);
  auto sgn = [&] { return sign(rng) ? -1.f : 1.f; };
  const auto n = kvtest::normal(rng, 32);
  switch (mode) {
    case 0: {  // normal at a random magnitude
      const float m = std::pow(10.f, std::uniform_real_distribution<float>(-30.f, 30.f)(rng));
      for (int i = 0; i < 32; ++i) x[i] = n[i] * m;
      break;
    }
    case 1:  // signed zeros, maybe one non-zero
      for (int i = 0; i < 32; ++i) x[i] = sgn() * 0.f;
      if (sign(rng)) x[pos(rng)] = n[0];
      break;
    case 2: {  // the largest magnitude twice, either sign
      for (int i = 0; i < 32; ++i) x[i] = std::clamp(n[i], -2.f, 2.f);
      x[pos(rng)] = 3.f * sgn();
      x[pos(rng)] = 3.f * sgn();
      break;
    }
    default: {  // exact ties under a power-of-two scale
      const float step = std::ldexp(1.f, -e(rng));
      if constexpr (F::kind == detail::block_kind::int8_sym) {
        std::uniform_int_distribution<int> k(-127, 126);
        for (int i = 0; i < 32; ++i) x[i] = (k(rng) + 0.5f) * step;
        x[pos(rng)] = 127.f * step * sgn();
      } else if constexpr (F::kind == detail::block_kind::int4_sym) {
        std::uniform_int_distribution<int> k(-8, 7);
        for (int i = 0; i < 32; ++i) x[i] = (k(rng) + 0.5f) * step;
        x[pos(rng)] = -8.f * step;
      } else if constexpr (F::kind == detail::block_kind::fp8_e4m3) {
        std::uniform_int_distribution<unsigned> c(0, 0x7c);
        for (int i = 0; i < 32; ++i) {
          const auto code = static_cast<std::uint8_t>(c(rng));
          x[i] =
              sgn() * step * (detail::e4m3_to_float(code) + detail::e4m3_to_float(code + 1)) / 2.f;
        }
        x[pos(rng)] = 448.f * step * sgn();
      } else {
        const int top = (1 << F::bits) - 1;
        std::uniform_int_distribution<int> k(0, top - 1);
        const float lo = -8.f * step;
        for (int i = 0; i < 32; ++i) x[i] = lo + (k(rng) + 0.5f) * step;
        x[pos(rng)] = lo;
        x[pos(rng)] = lo + top * step;
      }
    }
  }
}

//! A user's precision that keeps int8_kv's layout but encodes its own way:
//! the write kernel must call its encode, not the vector encoder.
struct own_encode_int8 : int8_kv<> {
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    int8_kv<>::encode(src, dst, dim);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("the write kernel's vector encoder stores the block functions' bytes",
                   "[quant][format]", int8_kv<>, int8_kv<64>, int8_kv<128>, int4_kv<>,
                   int4_kv<true>, int2_kv, fp8_e4m3_kv<>, fp8_e4m3_kv<128>, hadamard<int8_kv<>>,
                   hadamard<int4_kv<>>, hadamard<int2_kv>) {
  using F = typename TestType::format;
  STATIC_REQUIRE(detail::plain_block_encode<TestType>() ||
                 detail::rotated_block_encode<TestType>());
  STATIC_REQUIRE(!detail::plain_block_encode<own_encode_int8>());
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << (KVCACHE_HAS_SIMD_ENCODE ? " (AVX-512 encoder)" : " (portable build)"));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> mode(0, 3);
  for (std::size_t dim : {96, 128, 256}) {
    if (!detail::whole_blocks<TestType>(dim)) continue;
    std::vector<float> x(dim);
    std::vector<std::byte> want(TestType::row_bytes(dim)), got(want.size());
    for (int row = 0; row < 400; ++row) {
      const int m = row % 5 == 4 ? -1 : row % 4;  // one mode per row, or mixed
      for (std::size_t c = 0; c < dim; c += 32) corner_chunk<F>(rng, m < 0 ? mode(rng) : m, &x[c]);
      TestType::encode(x.data(), want.data(), dim);
      detail::encode_row<TestType>(x.data(), got.data(), dim);
      INFO("dim " << dim << ", row " << row);
      REQUIRE(std::memcmp(want.data(), got.data(), want.size()) == 0);
    }
  }
}

#if KVCACHE_HAS_SIMD_ENCODE
TEST_CASE("the vector e4m3 conversion equals the scalar one", "[quant][format]") {
  // Every 61st float from 0 to 2^10 (past saturation), both signs: the
  // subnormal grid, every binade of the normal range and the rounding ties.
  alignas(64) float y[16];
  alignas(64) std::int32_t got[16];
  std::size_t mismatches = 0;
  for (std::uint32_t b = 0; b < 0x44800000u; b += 16 * 61) {
    for (int i = 0; i < 16; ++i)
      y[i] = std::bit_cast<float>((b + 61u * i) | (i % 2 ? 0x80000000u : 0u));
    _mm512_store_si512(got, detail::simd_encode::e4m3(_mm512_load_ps(y)));
    for (int i = 0; i < 16; ++i) mismatches += got[i] != detail::float_to_e4m3(y[i]);
  }
  // Every tie between neighbouring codes, and the floats on either side of it.
  for (unsigned c = 0; c < 0x7e; ++c) {
    const float mid = (detail::e4m3_to_float(static_cast<std::uint8_t>(c)) +
                       detail::e4m3_to_float(static_cast<std::uint8_t>(c + 1))) /
                      2.f;
    const float pts[4] = {mid, -mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)};
    for (int i = 0; i < 16; ++i) y[i] = pts[i % 4];
    _mm512_store_si512(got, detail::simd_encode::e4m3(_mm512_load_ps(y)));
    for (int i = 0; i < 16; ++i) mismatches += got[i] != detail::float_to_e4m3(y[i]);
  }
  CHECK(mismatches == 0);
}
#endif

TEST_CASE("the vector Hadamard transform equals the scalar butterflies bit for bit",
          "[quant][format]") {
  STATIC_REQUIRE(detail::rotated_block_encode<hadamard<int4_kv<>>>());
  STATIC_REQUIRE(!detail::rotated_block_encode<int4_kv<>>());
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Rotation blocks of 8 (scalar), 16, 32, 128, 256 and 1024 elements.
  for (std::size_t dim : {40, 48, 96, 128, 256, 384, 1024}) {
    INFO("dim " << dim);
    auto x = kvtest::normal(rng, dim, 3.f), y = x;
    detail::hadamard_butterflies(x.data(), dim);
    detail::hadamard_transform(y.data(), dim);
    CHECK(std::memcmp(x.data(), y.data(), dim * sizeof(float)) == 0);
  }
}
