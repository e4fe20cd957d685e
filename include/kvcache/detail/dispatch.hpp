// Runtime -> compile-time dispatch of head_dim. One table drives the kernel
// instantiations, the runtime dispatch and the test that visits every entry.
#pragma once

#include <array>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"

namespace kvcache {
inline namespace v0 {

//! head_dims with kernels unrolled at compile time; any other multiple of 16
//! runs the same kernels with a runtime bound.
inline constexpr std::array<std::size_t, 3> compiled_head_dims = {64, 128, 256};

namespace detail {

//! Calls f(std::integral_constant<std::size_t, D>) with D = dim when dim is in
//! compiled_head_dims, else with D = 0 (runtime head_dim). A static head_dim
//! (Static != dynamic) instantiates only its own entry.
template <std::size_t Static, class F>
void dispatch_head_dim(std::size_t dim, F&& f) {
  if constexpr (Static != dynamic) {
    constexpr bool compiled = [] {
      for (std::size_t d : compiled_head_dims)
        if (d == Static) return true;
      return false;
    }();
    f(std::integral_constant < std::size_t, compiled ? Static : 0 > {});
  } else {
    bool done = false;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      ((!done && dim == compiled_head_dims[I]
            ? (f(std::integral_constant<std::size_t, compiled_head_dims[I]>{}), done = true)
            : false),
       ...);
    }
    (std::make_index_sequence<compiled_head_dims.size()>{});
    if (!done) f(std::integral_constant<std::size_t, 0>{});
  }
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
