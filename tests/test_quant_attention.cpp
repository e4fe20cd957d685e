// Attention over quantized caches equals float64 attention over the rows the
// cache stores (decoded back) within 1e-4: the fused decode kernel and the
// prefill kernel add only fp32 rounding to the format's own error. Covers
// prefill, chunked prefill, ragged decode, split decode, GQA group sizes, the
// rotated variants and a user's block precision read through its block
// functions. Built twice: for this machine and for baseline x86-64 (no
// AVX-512, no F16C), the portable path; on a machine with AMX the first build
// also runs the decode cases with the tile unit turned off (the VNNI path).
#include "quant_support.hpp"
#include "test_attention.hpp"

using namespace kvcache;

namespace {

//! A user's block precision without a built-in format: 8-bit codes with a
//! float scale per 32 elements, read by the fused kernel through its block
//! functions alone.
struct user_int8 {
  using axis = precision_tag;
  static constexpr std::string_view name = "user_int8";
  static constexpr double tolerance = 2e-2;
  static constexpr std::size_t group = 32;
  static constexpr std::size_t row_bytes(std::size_t dim) noexcept { return dim + dim / 8; }
  static void check_dim(std::size_t dim) {
    detail::require(dim % 32 == 0, "head_dim ", dim, " is not a multiple of 32");
  }
  static float* scales(std::byte* row, std::size_t dim) {
    return reinterpret_cast<float*>(row + dim);
  }
  static float scale(const std::byte* row, std::size_t b, std::size_t dim) {
    float s;
    std::memcpy(&s, row + dim + 4 * b, 4);
    return s;
  }
  static void encode_block(const float* x, std::byte* row, std::size_t b, std::size_t dim) {
    float amax = 0.f;
    for (std::size_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = amax / 127.f, inv = s > 0 ? 1.f / s : 0.f;
    std::memcpy(row + dim + 4 * b, &s, 4);
    for (std::size_t i = 0; i < 32; ++i)
      row[b * 32 + i] =
          static_cast<std::byte>(static_cast<std::int8_t>(std::nearbyint(x[i] * inv)));
  }
  static void decode_block(const std::byte* row, std::size_t b, std::size_t dim, float* out) {
    for (std::size_t i = 0; i < 32; ++i)
      out[i] = scale(row, b, dim) * static_cast<float>(static_cast<std::int8_t>(row[b * 32 + i]));
  }
  static float dot_block(const float* q, const std::byte* row, std::size_t b, std::size_t dim) {
    float out[32], acc = 0.f;
    decode_block(row, b, dim, out);
    for (std::size_t i = 0; i < 32; ++i) acc += q[i] * out[i];
    return acc;
  }
  static void accumulate_block(float w, const std::byte* row, std::size_t b, std::size_t dim,
                               float* o) {
    float out[32];
    decode_block(row, b, dim, out);
    for (std::size_t i = 0; i < 32; ++i) o[i] += w * out[i];
  }
  static void encode(const float* src, std::byte* dst, std::size_t dim) {
    for (std::size_t b = 0; b < dim / 32; ++b) encode_block(src + b * 32, dst, b, dim);
  }
  static void decode(const std::byte* src, float* dst, std::size_t dim) {
    for (std::size_t b = 0; b < dim / 32; ++b) decode_block(src, b, dim, dst + b * 32);
  }
};
static_assert(block_precision<user_int8>);

template <class P, class G, class S = contiguous>
void check_own(std::size_t qh, std::size_t kvh, std::size_t dim) {
  using C = cache<G, S, full, P>;
  if (!detail::whole_blocks<P>(dim)) return;  // e.g. int8_kv<128> at head_dim 64
  const auto seed = kvtest::test_seed();
  INFO("seed " << seed << " " << P::name << " q_heads " << qh << " kv_heads " << kvh << " dim "
               << dim);
  kvtest::dequant_driver<C> d(qh, kvh, dim, 4096, seed);
  auto a = d.add(1200), b = d.add(600), c = d.add(600);
  constexpr double tol = 1e-4;
  CHECK(d.run({{a, 70}, {b, 5}, {c, 1}}) <= tol);    // ragged prefill
  CHECK(d.run({{a, 33}, {b, 130}, {c, 1}}) <= tol);  // chunked prefill + decode
  for (int i = 0; i < 3; ++i) CHECK(d.run({{a, 1}, {b, 1}, {c, 1}}) <= tol);
  CHECK(d.run({{a, 900}}) <= tol);  // a long prefill, then a decode split into chunks
  CHECK(d.run({{a, 1}, {c, 1}}) <= tol);
}

}  // namespace

TEMPLATE_TEST_CASE("quantized attention equals float64 attention over the stored rows",
                   "[quant][attention]", int8_kv<>, int8_kv<128>, int4_kv<>, int4_kv<true>, int2_kv,
                   fp8_e4m3_kv<>, fp8_e4m3_kv<128>, hadamard<int4_kv<>>, hadamard<int2_kv>) {
  SECTION("static head_dim 128, group 4") { check_own<TestType, gqa<128>>(8, 2, 128); }
  SECTION("dynamic head_dim 64, group 1") { check_own<TestType, gqa<>>(3, 3, 64); }
  SECTION("dynamic head_dim 256, group 6") { check_own<TestType, gqa<>>(6, 1, 256); }
  SECTION("dynamic head_dim 256, group 8") { check_own<TestType, gqa<>>(16, 2, 256); }
  SECTION("dynamic head_dim 64, group 4") { check_own<TestType, gqa<>>(8, 2, 64); }
}

// Where the build and the CPU have AMX, decode scores and P.V run on the tile
// unit; the same cases through the VNNI kernels (fp8: the fp32 path), with
// the tile unit refused.
TEMPLATE_TEST_CASE("quantized decode without the tile unit", "[quant][attention]", int8_kv<>,
                   int8_kv<64>, int4_kv<>, int4_kv<true>, int2_kv, fp8_e4m3_kv<>,
                   hadamard<int4_kv<>>) {
  struct refuse {
    refuse() { detail::amx::allowed() = false; }
    ~refuse() { detail::amx::allowed() = true; }
  } guard;
  CHECK_FALSE(detail::amx::available());
  SECTION("static head_dim 128, group 4") { check_own<TestType, gqa<128>>(8, 2, 128); }
  SECTION("dynamic head_dim 256, group 8") { check_own<TestType, gqa<>>(16, 2, 256); }
  SECTION("paged 16") { check_own<TestType, gqa<128>, paged<16>>(8, 2, 128); }
}

TEST_CASE("a build for AMX uses the tile unit", "[quant][attention]") {
  // -march=native on a CPU with AMX-INT8 defines the macros; then only an
  // OS that refuses the tile state may turn the path off.
  if (KVCACHE_HAS_AMX) CHECK(detail::amx::available());
}

// Paged storage: a decode tile's runs end at every page, so the fused kernel
// walks 16-token pages (and 1-token pages, a run per token) like one region.
// On the tile unit (groups of 4) a tile takes a 16-token quarter per page:
// 24-token pages leave quarters of 16 and 8 rows, 8-token pages half-empty
// quarters, 1-token pages one row per quarter.
TEMPLATE_TEST_CASE("quantized attention on paged storage", "[quant][attention][paged]", int8_kv<>,
                   int4_kv<>, int4_kv<true>, int2_kv, fp8_e4m3_kv<>, hadamard<int4_kv<>>) {
  SECTION("page 16") { check_own<TestType, gqa<128>, paged<16>>(8, 2, 128); }
  SECTION("page 24") { check_own<TestType, gqa<128>, paged<24>>(8, 2, 128); }
  SECTION("page 8") { check_own<TestType, gqa<128>, paged<8>>(8, 2, 128); }
  SECTION("page 1, group 4") { check_own<TestType, gqa<128>, paged<1>>(8, 2, 128); }
  SECTION("page 1") { check_own<TestType, gqa<>, paged<1>>(4, 2, 64); }
}

TEST_CASE("a user's block precision runs through its block functions", "[quant][attention]") {
  check_own<user_int8, gqa<>>(8, 2, 128);
  check_own<user_int8, gqa<>>(6, 2, 96);
}

TEMPLATE_TEST_CASE("quantized attention stays within each precision's stated tolerance",
                   "[quant][attention]", int8_kv<>, int4_kv<>, int4_kv<true>, int2_kv,
                   fp8_e4m3_kv<>, hadamard<int4_kv<>>) {
  // Against the original K/V on unit-normal data: P::tolerance is the format's
  // own error bound (precision headers), checked through the shared harness.
  kvtest::check_attention<cache<gqa<128>, contiguous, full, TestType>>(8, 2, 128);
}
