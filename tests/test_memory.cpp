// Memory formulas reproduce the published figures exactly, and a live cache's
// memory_in_use() equals them to the byte.
#include "support.hpp"

using namespace kvcache;

TEST_CASE("memory formulas reproduce the reference figures", "[memory]") {
  // Llama-2-7B: 32 layers, 32 heads x 128 (4096 hidden), fp16, 4096 tokens, batch 1.
  constexpr kv_shape llama2{.layers = 32, .kv_heads = 32, .head_dim = 128};
  static_assert(kv_bytes<fp16>(llama2, 1, 4096) == 2'147'483'648ull);
  static_assert(bytes_per_token<fp16>(llama2) == 524'288);
  // Batch 4, 16 heads x 64 dims, 2048 tokens, fp16, one layer; then shared.
  constexpr kv_shape small{.layers = 1, .kv_heads = 16, .head_dim = 64};
  static_assert(kv_bytes<fp16>(small, 4, 2048) == 33'554'432);
  static_assert(shared_kv_bytes<fp16>(small, 4, 2048, 0) == 8'388'608);
  static_assert(kv_bytes<fp32>(small, 1, 1) == 2 * 16 * 64 * 4);
  static_assert(kv_bytes<bf16>(small, 1, 1) == 2 * 16 * 64 * 2);
  SUCCEED();
}

TEST_CASE("memory_in_use equals the formula for live caches", "[memory]") {
  SECTION("batch 4 x 2048 tokens, 16 heads x 64, fp16, one layer") {
    cache<mha<64>, contiguous, full, fp16> kv(
        {.layers = 1, .q_heads = 16, .max_tokens = 4 * 2048, .threads = 1});
    CHECK(kv.memory_in_use() == 0);
    std::vector<seq_id> ids;
    for (int i = 0; i < 4; ++i) ids.push_back(kv.add_sequence(2048));
    constexpr kv_shape small{.layers = 1, .kv_heads = 16, .head_dim = 64};
    CHECK(kv.memory_in_use() == kv_bytes<fp16>(small, 4, 2048));
    CHECK(kv.memory_in_use() == 33'554'432);
    kv.remove_sequence(ids[1]);
    CHECK(kv.memory_in_use() == kv_bytes<fp16>(small, 3, 2048));
  }
  SECTION("Llama-2-7B shape, 4096 tokens: 2 GiB") {
    cache<mha<128>, contiguous, full, fp16> kv(
        {.layers = 32, .q_heads = 32, .max_tokens = 4096, .threads = 1});
    auto s = kv.add_sequence(4096);
    CHECK(kv.memory_in_use() == 2'147'483'648ull);
    // Appending tokens does not change a contiguous reservation.
    auto st = kv.begin_step({{s, 3}});
    CHECK(kv.memory_in_use() == 2'147'483'648ull);
    CHECK(kv.length(s) == 3);
  }
  SECTION("GQA fp32 with mixed capacities") {
    cache<gqa<>, contiguous, full, fp32> kv({.layers = 3,
                                             .q_heads = 8,
                                             .kv_heads = 2,
                                             .head_dim = 80,
                                             .max_tokens = 1000,
                                             .threads = 1});
    kv.add_sequence(100);
    kv.add_sequence(250);
    constexpr kv_shape shape{.layers = 3, .kv_heads = 2, .head_dim = 80};
    CHECK(kv.memory_in_use() == contiguous_sequence_bytes<fp32>(shape, 350));
    CHECK(kv.memory_in_use() == 350ull * 3 * 2 * 2 * 80 * 4);
  }
}
