// Block-quantized formats: golden bytes for fixed inputs, zero blocks, fp8
// conversion, the vectorised readers against the scalar block functions, and
// the bytes each format stores.
#include <array>
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
