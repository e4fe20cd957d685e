#include "test_attention.hpp"

using namespace kvcache;

TEMPLATE_TEST_CASE("gqa attention matches the float64 reference", "[attention][gqa]", fp32, fp16,
                   bf16) {
  SECTION("static head_dim 64") {
    kvtest::check_attention<cache<gqa<64>, contiguous, full, TestType>>(8, 2, 64);
  }
  SECTION("static head_dim 128") {
    kvtest::check_attention<cache<gqa<128>, contiguous, full, TestType>>(8, 2, 128);
  }
  SECTION("static head_dim 256") {
    kvtest::check_attention<cache<gqa<256>, contiguous, full, TestType>>(4, 1, 256);
  }
  SECTION("dynamic head_dim") {
    using C = cache<gqa<>, contiguous, full, TestType>;
    kvtest::check_attention<C>(12, 4, 96);   // group 3, a runtime-only head_dim
    kvtest::check_attention<C>(32, 8, 128);  // Llama-3-8B grouping
  }
}
