// How the CPU kernels read rows of a precision: precisions whose rows are a
// plain array of float, half or bfloat16 are read in place with vector loads;
// any other precision (a user's, or a quantized one) is decoded tile by tile
// into a float scratch buffer through its own decode().
#pragma once

#include <concepts>
#include <cstddef>

#include "../../concepts.hpp"
#include "../../half.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

template <class P>
concept direct_rows = requires {
  typename P::element;
}
&&(std::same_as<typename P::element, float> || std::same_as<typename P::element, half> ||
   std::same_as<typename P::element, bfloat16>);

template <class P>
struct row_type {
  using type = float;
};
template <direct_rows P>
struct row_type<P> {
  using type = typename P::element;
};
//! The element type kernels load rows as: the stored type, or float after decode.
template <class P>
using row_t = typename row_type<P>::type;

//! Returns `n` consecutive rows starting at `src` as an array of row_t<P>:
//! in place for direct precisions, else decoded into `scratch` (n x dim floats).
template <class P>
const row_t<P>* rows(const std::byte* src, std::size_t n, std::size_t dim, std::size_t row_bytes,
                     float* scratch) noexcept {
  if constexpr (direct_rows<P>) {
    (void)n, (void)dim, (void)row_bytes, (void)scratch;
    return reinterpret_cast<const row_t<P>*>(src);
  } else {
    for (std::size_t j = 0; j < n; ++j) P::decode(src + j * row_bytes, scratch + j * dim, dim);
    return scratch;
  }
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
