// int8_kv<G>: symmetric 8-bit integers in blocks of G elements along head_dim,
// one fp16 scale per block (llama.cpp's q8_0 at G = 32).
//   row_bytes = dim + 2 x dim / G          (8.5 bits per element at G = 32,
//                                           8.25 at 64, 8.125 at 128)
// scale = fp16(amax / 127), code = round(x / scale) in [-127, 127].
#pragma once

#include <cstddef>
#include <string_view>

#include "block.hpp"

namespace kvcache {
inline namespace v0 {

template <std::size_t G = 32>
struct int8_kv : detail::block_rows<detail::block_format<detail::block_kind::int8_sym, G>> {
  static_assert(G == 32 || G == 64 || G == 128, "int8_kv groups are 32, 64 or 128 elements.");
  static constexpr std::string_view name = G == 32 ? "int8" : G == 64 ? "int8_g64" : "int8_g128";
  //! Per element error <= scale / 2 = amax / 254: on unit-normal data about
  //! 0.4% of an element's size; the attention output averages it further.
  static constexpr double tolerance = 2e-2;
};

static_assert(precision_policy<int8_kv<32>>);
static_assert(precision_policy<int8_kv<64>>);
static_assert(precision_policy<int8_kv<128>>);

}  // namespace v0
}  // namespace kvcache
