// Floating-point precisions: a row is head_dim elements of one type, no metadata.
//   fp32: row_bytes = 4 x dim   (the reference)
//   fp16: row_bytes = 2 x dim   (IEEE binary16, range +-65504)
//   bf16: row_bytes = 2 x dim   (float's range, 8 significant bits)
// Each names `element`, so kernels read rows with vector loads.
#pragma once

#include <cstddef>
#include <cstring>
#include <string_view>

#include "../concepts.hpp"
#include "../detail/simd.hpp"
#include "../error.hpp"
#include "../half.hpp"

namespace kvcache {
inline namespace v0 {

namespace detail {
template <class E>
struct floating_rows {
  using axis = precision_tag;
  using element = E;
  static constexpr std::size_t row_bytes(std::size_t dim) noexcept { return dim * sizeof(E); }
  static void check_dim(std::size_t dim) {
    require(dim > 0, "head_dim is 0; it must be at least 1");
  }
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    convert(src, reinterpret_cast<E*>(dst), dim);
  }
  static void decode(const std::byte* src, float* dst, std::size_t dim) noexcept {
    convert(reinterpret_cast<const E*>(src), dst, dim);
  }
};
}  // namespace detail

struct fp32 : detail::floating_rows<float> {
  static constexpr std::string_view name = "fp32";
  //! Only summation order differs from float64.
  static constexpr double tolerance = 1e-5;
};

struct fp16 : detail::floating_rows<half> {
  static constexpr std::string_view name = "fp16";
  //! Storing K and V rounds each to 11 significant bits (relative error
  //! <= 2^-11 = 4.9e-4 per element). The output is a weighted mean of V, whose
  //! rounding errors are independent and partly cancel; the score errors are
  //! bounded by |q| |k| 2^-11 and move the weights by a similar relative amount.
  //! 2e-3 leaves room for both at head_dim 256.
  static constexpr double tolerance = 2e-3;
};

struct bf16 : detail::floating_rows<bfloat16> {
  static constexpr std::string_view name = "bf16";
  //! As fp16 with 8 significant bits: per-element error <= 2^-8 = 3.9e-3, so
  //! the bound is 8x fp16's.
  static constexpr double tolerance = 1.6e-2;
};

static_assert(precision_policy<fp32>);
static_assert(precision_policy<fp16>);
static_assert(precision_policy<bf16>);

}  // namespace v0
}  // namespace kvcache
