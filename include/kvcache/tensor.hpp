// tensor_view: a pointer, a shape and element strides, in the manner of
// std::mdspan with layout_stride (which GCC 12 lacks). Users hand their own
// buffers to the cache through it, without copies.
//
// Layouts the cache expects (row-major defaults; any strides work):
//   q, out : (tokens, q_heads,  head_dim)   tokens of the step's sequences, concatenated
//   k, v   : (tokens, kv_heads, head_dim)   in the order the step lists them
//   lse    : (tokens, q_heads)              natural-log log-sum-exp of each row's scores
#pragma once

#include <array>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "error.hpp"

namespace kvcache {
inline namespace v0 {

template <class T, std::size_t Rank>
struct tensor_view {
  T* data = nullptr;
  std::array<std::size_t, Rank> shape{};
  std::array<std::ptrdiff_t, Rank> strides{};  // in elements

  //! A densely packed row-major view of `shape`.
  static constexpr tensor_view packed(T* data, std::array<std::size_t, Rank> shape) noexcept {
    tensor_view v{data, shape, {}};
    std::ptrdiff_t s = 1;
    for (std::size_t i = Rank; i-- > 0;) {
      v.strides[i] = s;
      s *= static_cast<std::ptrdiff_t>(shape[i]);
    }
    return v;
  }

  constexpr std::size_t extent(std::size_t i) const noexcept { return shape[i]; }
  constexpr bool empty() const noexcept { return data == nullptr; }

  template <class... I>
  constexpr T& operator()(I... idx) const noexcept {
    static_assert(sizeof...(I) == Rank);
    std::ptrdiff_t off = 0;
    std::size_t d = 0;
    ((off += static_cast<std::ptrdiff_t>(idx) * strides[d++]), ...);
    return data[off];
  }

  //! Views of non-const data convert to views of const data.
  constexpr operator tensor_view<const T, Rank>() const noexcept requires(!std::is_const_v<T>) {
    return {data, shape, strides};
  }
};

//! Row-major view over user memory: packed<3>(p, {tokens, heads, dim}).
template <class T, class... N>
constexpr tensor_view<T, sizeof...(N)> make_view(T* data, N... extents) noexcept {
  return tensor_view<T, sizeof...(N)>::packed(data, {static_cast<std::size_t>(extents)...});
}

namespace detail {

//! Checks a view's shape against what the step and the cache expect; the last
//! axis must be unit-stride so rows can be read as vectors.
template <class T, std::size_t Rank>
void check_view(const tensor_view<T, Rank>& v, std::string_view name,
                const std::array<std::size_t, Rank>& expect) {
  require(v.data != nullptr, name, " is a null tensor");
  for (std::size_t i = 0; i < Rank; ++i)
    require(v.shape[i] == expect[i], name, " has extent ", v.shape[i], " on axis ", i,
            "; this step and cache need ", expect[i]);
  require(v.strides[Rank - 1] == 1, name, " has stride ", v.strides[Rank - 1],
          " on its last axis; it must be 1");
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
