// int4_kv<Asymmetric>: 4-bit integers in blocks of 32 along head_dim.
//   symmetric  (int4_kv<>):     fp16 scale per block, code - 8 in [-8, 7], the
//                               same scheme and block bytes as llama.cpp's q4_0
//     row_bytes = dim / 2 + 2 x dim / 32    (4.5 bits per element)
//   asymmetric (int4_kv<true>): fp16 scale and fp16 min per block, code in
//                               [0, 15], as llama.cpp's q4_1 and KIVI's 4-bit
//     row_bytes = dim / 2 + 4 x dim / 32    (5 bits per element)
#pragma once

#include <cstddef>
#include <string_view>

#include "block.hpp"

namespace kvcache {
inline namespace v0 {

template <bool Asymmetric = false>
struct int4_kv
    : detail::block_rows<detail::block_format<
          Asymmetric ? detail::block_kind::int4_asym : detail::block_kind::int4_sym, 32>> {
  static constexpr std::string_view name = Asymmetric ? "int4_asym" : "int4";
  //! 16 levels over a block's range: per element error up to amax / 16 (q4_0)
  //! or range / 30; on unit-normal data the output error is about 0.12.
  static constexpr double tolerance = 0.25;
};

static_assert(precision_policy<int4_kv<false>>);
static_assert(precision_policy<int4_kv<true>>);

}  // namespace v0
}  // namespace kvcache
