// Portable 16-bit floating-point storage types. `half` is IEEE 754 binary16 and
// `bfloat16` the upper half of a binary32. Both are 16 bits of storage with
// software conversions on the host (the model is cutlass::half_t), so a
// CPU-only user never needs cuda_fp16.h. Conversions round to nearest even and
// keep signed zeros, subnormals, infinities and NaN; a NaN stays a NaN and is
// returned quiet.
#pragma once

#include <bit>
#include <cstdint>

#include "config.hpp"

namespace kvcache {
inline namespace v0 {

namespace detail {

KVCACHE_HOST_DEVICE std::uint16_t float_to_half_bits(float f) noexcept {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u)  // NaN: keep the top payload bits, force quiet
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
  if (x >= 0x47800000u)  // >= 65536 (and Inf) overflows; [65520, 65536) carries below
    return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (x < 0x38800000u) {  // below 2^-14: a half subnormal or zero
    const std::uint32_t e = x >> 23;
    if (e < 102) return sign;  // below 2^-25, rounds to zero
    const std::uint32_t m = (x & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;
    std::uint32_t r = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t r = x - 0x38000000u;  // rebias the exponent from 127 to 15
  r += 0xfffu + ((r >> 13) & 1u);     // round to nearest even; a carry may reach Inf
  return static_cast<std::uint16_t>(sign | (r >> 13));
}

KVCACHE_HOST_DEVICE float half_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu;
  const std::uint32_t m = h & 0x3ffu;
  std::uint32_t bits;
  if (e == 0x1f) {
    bits = sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
  } else if (e == 0) {
    if (m == 0) return std::bit_cast<float>(sign);
    // subnormal: m * 2^-24 is exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  return std::bit_cast<float>(bits);
}

KVCACHE_HOST_DEVICE std::uint16_t float_to_bfloat16_bits(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u)  // NaN: truncate and force quiet
    return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

KVCACHE_HOST_DEVICE float bfloat16_bits_to_float(std::uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

//! IEEE 754 binary16 storage.
struct half {
  std::uint16_t bits = 0;

  half() = default;
  KVCACHE_HOST_DEVICE explicit half(float f) noexcept : bits(detail::float_to_half_bits(f)) {}
  KVCACHE_HOST_DEVICE explicit operator float() const noexcept {
    return detail::half_bits_to_float(bits);
  }
  KVCACHE_HOST_DEVICE static constexpr half from_bits(std::uint16_t b) noexcept {
    half h;
    h.bits = b;
    return h;
  }
  friend constexpr bool operator==(half, half) = default;  // bitwise
};

//! bfloat16 storage: the top 16 bits of a binary32.
struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  KVCACHE_HOST_DEVICE explicit bfloat16(float f) noexcept
      : bits(detail::float_to_bfloat16_bits(f)) {}
  KVCACHE_HOST_DEVICE explicit operator float() const noexcept {
    return detail::bfloat16_bits_to_float(bits);
  }
  KVCACHE_HOST_DEVICE static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  friend constexpr bool operator==(bfloat16, bfloat16) = default;  // bitwise
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2);

}  // namespace v0
}  // namespace kvcache
