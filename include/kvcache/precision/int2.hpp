// int2_kv: KIVI-style asymmetric 2-bit integers in blocks of 32 along head_dim,
// one fp16 scale and one fp16 min per block (4 levels: min + scale x {0..3}).
//   row_bytes = dim / 4 + 4 x dim / 32     (3 bits per element)
// KIVI groups keys per channel along tokens; this row format groups along
// head_dim (per token), the layout values use in KIVI. docs/quantization.md
// gives the measured errors of both.
#pragma once

#include <cstddef>
#include <string_view>

#include "block.hpp"

namespace kvcache {
inline namespace v0 {

struct int2_kv : detail::block_rows<detail::block_format<detail::block_kind::int2_asym, 32>> {
  static constexpr std::string_view name = "int2";
  //! Four levels per block: a coarse format, about 0.5 relative error on
  //! unit-normal data; the bound only catches broken kernels.
  static constexpr double tolerance = 1.0;
};

static_assert(precision_policy<int2_kv>);

}  // namespace v0
}  // namespace kvcache
