#include "test_attention.hpp"

using namespace kvcache;

TEMPLATE_TEST_CASE("mha attention matches the float64 reference", "[attention][mha]", fp32, fp16,
                   bf16) {
  using C = cache<mha<>, contiguous, full, TestType>;
  for (std::size_t d : {64, 128, 256}) kvtest::check_attention<C>(4, 4, d);
  kvtest::check_attention<C>(3, 0, 48);
  kvtest::check_attention<cache<mha<128>, contiguous, full, TestType>>(2, 2, 128);
}

TEMPLATE_TEST_CASE("mqa attention matches the float64 reference", "[attention][mqa]", fp32, fp16,
                   bf16) {
  using C = cache<mqa<>, contiguous, full, TestType>;
  for (std::size_t d : {64, 128, 256}) kvtest::check_attention<C>(8, 1, d);
  kvtest::check_attention<C>(5, 1, 32);  // odd group
  kvtest::check_attention<cache<mqa<64>, contiguous, full, TestType>>(16, 1, 64);
}
