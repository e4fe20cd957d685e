// fp8_e4m3_kv<G>: OCP FP8 E4M3 values (4 exponent bits, 3 mantissa bits,
// max 448) with one fp16 scale per block of G elements along head_dim.
// G = 32 is a per-block scale; G = head_dim (fp8_e4m3_kv<128> for head_dim
// 128) is one scale per head vector.
//   row_bytes = dim + 2 x dim / G          (8.5 bits per element at G = 32,
//                                           8.125 at G = 128)
// scale = fp16(amax / 448), code = e4m3(x / scale) rounded to nearest even.
#pragma once

#include <cstddef>
#include <string_view>

#include "block.hpp"

namespace kvcache {
inline namespace v0 {

template <std::size_t G = 32>
struct fp8_e4m3_kv : detail::block_rows<detail::block_format<detail::block_kind::fp8_e4m3, G>> {
  static_assert(G == 32 || G == 64 || G == 128 || G == 256,
                "fp8_e4m3_kv groups are 32, 64, 128 or 256 elements.");
  static constexpr std::string_view name = G == 32    ? "fp8_e4m3"
                                           : G == 64  ? "fp8_e4m3_g64"
                                           : G == 128 ? "fp8_e4m3_g128"
                                                      : "fp8_e4m3_g256";
  //! 3 mantissa bits: per element relative error <= 2^-4, a little above int8's
  //! on normal data.
  static constexpr double tolerance = 4e-2;
};

static_assert(precision_policy<fp8_e4m3_kv<32>>);
static_assert(precision_policy<fp8_e4m3_kv<128>>);

}  // namespace v0
}  // namespace kvcache
