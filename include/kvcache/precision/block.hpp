// Block-quantized rows: the one definition of the math that int8_kv, int4_kv,
// int2_kv and fp8_e4m3_kv share, written as KVCACHE_HOST_DEVICE block functions
// (encode a block, decode a block, dot a query with a block, accumulate a
// value block with a weight) that the CPU kernels and, later, the CUDA kernels
// loop around.
//
// A row (one head's K or V vector of `dim` elements) is dim / G blocks of G
// consecutive elements, stored as three arrays, codes first:
//   [codes: dim x bits / 8 bytes][scales: dim / G fp16][mins: dim / G fp16, asymmetric only]
//   row_bytes = dim x bits / 8 + 2 x (dim / G) x (asymmetric ? 2 : 1)
// Codes of a block are contiguous (G x bits / 8 bytes). Sub-byte codes pack
// like llama.cpp's q4_0: in each 32-element block, byte j holds element j in
// its low bits and element j + 16 (int4) or j + 8, j + 16, j + 24 (int2) above,
// so one 16-byte load unpacks into elements in order with shifts and masks.
//
// Decoded value of element i of block b:
//   int8 symmetric:   scale_b x code                 code in [-127, 127]
//   int4 symmetric:   scale_b x (code - 8)           code in [0, 15]   (q4_0)
//   int4 asymmetric:  scale_b x code + min_b         code in [0, 15]   (q4_1)
//   int2 asymmetric:  scale_b x code + min_b         code in [0, 3]    (KIVI)
//   fp8 e4m3:         scale_b x e4m3(code)           |e4m3| <= 448
// Scales and mins are rounded to fp16 before the codes are chosen, so the
// codes are the best for the stored metadata. A block of zeros stores scale 0
// and decodes to zeros (never 0/0). Non-finite inputs are rejected by the
// cache before encode is called (precision hook `finite_only`).
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../concepts.hpp"
#include "../error.hpp"
#include "../half.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

enum class block_kind { int8_sym, int4_sym, int4_asym, int2_asym, fp8_e4m3 };

constexpr std::size_t block_bits(block_kind k) noexcept {
  switch (k) {
    case block_kind::int4_sym:
    case block_kind::int4_asym:
      return 4;
    case block_kind::int2_asym:
      return 2;
    default:
      return 8;
  }
}

// ---- fp8 e4m3 (OCP FP8, bias 7, max 448, no infinities) ---------------------

//! Nearest e4m3 code (ties to even) of a finite x, saturating at +-448.
KVCACHE_HOST_DEVICE std::uint8_t float_to_e4m3(float x) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint8_t sign = static_cast<std::uint8_t>((bits >> 24) & 0x80u);
  const float a = std::fabs(x);
  if (!(a < 448.f)) return sign | 0x7e;
  if (a < 0.015625f) {  // below 2^-6: subnormal grid of 2^-9; 8 carries into the first normal
    return sign | static_cast<std::uint8_t>(std::nearbyint(a * 512.f));
  }
  const std::uint32_t ab = bits & 0x7fffffffu;
  int e = static_cast<int>(ab >> 23) - 127;  // -6..8
  std::uint32_t r = (ab >> 20) & 7u;
  const std::uint32_t rem = ab & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) ++r;
  if (r == 8) r = 0, ++e;
  const std::uint32_t code = (static_cast<std::uint32_t>(e + 7) << 3) | r;
  return sign | static_cast<std::uint8_t>(code > 0x7eu ? 0x7eu : code);
}

//! e4m3 -> float, exact: the code's bits placed in a binary16 (whose exponent
//! bias is 8 more) and scaled by 2^8. kernels/cpu/decode_quant.hpp vectorises
//! the same trick.
KVCACHE_HOST_DEVICE float e4m3_to_float(std::uint8_t c) noexcept {
  const std::uint16_t h = static_cast<std::uint16_t>(((c & 0x80u) << 8) | ((c & 0x7fu) << 7));
  return half_bits_to_float(h) * 256.f;
}

// Finite inputs only; std::fmax/fmin compile to library calls for their NaN rules.
KVCACHE_HOST_DEVICE constexpr float max_f(float a, float b) noexcept { return a > b ? a : b; }
KVCACHE_HOST_DEVICE constexpr float min_f(float a, float b) noexcept { return a < b ? a : b; }

KVCACHE_HOST_DEVICE float fp16_round(float x) noexcept {
  return half_bits_to_float(float_to_half_bits(x));
}

//! The byte layout and block math of one format; see the file comment.
template <block_kind K, std::size_t G>
struct block_format {
  static constexpr block_kind kind = K;
  static constexpr std::size_t group = G;
  static constexpr std::size_t bits = block_bits(K);
  static constexpr bool asymmetric = K == block_kind::int4_asym || K == block_kind::int2_asym;
  static_assert(G % 32 == 0, "Block formats use groups that are a multiple of 32 elements.");

  static constexpr std::size_t code_bytes(std::size_t dim) noexcept { return dim * bits / 8; }
  static constexpr std::size_t row_bytes(std::size_t dim) noexcept {
    return code_bytes(dim) + 2 * (dim / G) * (asymmetric ? 2 : 1);
  }
  static constexpr std::size_t scale_offset(std::size_t dim) noexcept { return code_bytes(dim); }
  static constexpr std::size_t min_offset(std::size_t dim) noexcept {
    return code_bytes(dim) + 2 * (dim / G);
  }

  KVCACHE_HOST_DEVICE static std::uint16_t load16(const std::byte* p) noexcept {
    std::uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
  KVCACHE_HOST_DEVICE static void store16(std::byte* p, float x) noexcept {
    const std::uint16_t v = float_to_half_bits(x);
    std::memcpy(p, &v, 2);
  }
  KVCACHE_HOST_DEVICE static float scale(const std::byte* row, std::size_t b,
                                         std::size_t dim) noexcept {
    return half_bits_to_float(load16(row + scale_offset(dim) + 2 * b));
  }
  KVCACHE_HOST_DEVICE static float min(const std::byte* row, std::size_t b,
                                       std::size_t dim) noexcept {
    if constexpr (asymmetric)
      return half_bits_to_float(load16(row + min_offset(dim) + 2 * b));
    else
      return 0.f;
  }

  //! Code of element i (0 <= i < G) of block b, as stored.
  KVCACHE_HOST_DEVICE static unsigned code(const std::byte* row, std::size_t b,
                                           std::size_t i) noexcept {
    const auto* c = reinterpret_cast<const std::uint8_t*>(row) + b * G * bits / 8;
    if constexpr (bits == 8) {
      return c[i];
    } else if constexpr (bits == 4) {
      const std::size_t sub = i / 32, j = i % 32;
      return (c[sub * 16 + j % 16] >> (4 * (j / 16))) & 15u;
    } else {
      const std::size_t sub = i / 32, j = i % 32;
      return (c[sub * 8 + j % 8] >> (2 * (j / 8))) & 3u;
    }
  }
  //! The code as a number before scale and min.
  KVCACHE_HOST_DEVICE static float level(unsigned c) noexcept {
    if constexpr (K == block_kind::int8_sym)
      return static_cast<float>(static_cast<std::int8_t>(c));
    else if constexpr (K == block_kind::int4_sym)
      return static_cast<float>(static_cast<int>(c) - 8);
    else if constexpr (K == block_kind::fp8_e4m3)
      return e4m3_to_float(static_cast<std::uint8_t>(c));
    else
      return static_cast<float>(c);
  }

  //! Quantizes x[0..G) (finite) into block b of the row.
  KVCACHE_HOST_DEVICE static void encode_block(const float* x, std::byte* row, std::size_t b,
                                               std::size_t dim) noexcept {
    std::uint8_t q[G];
    float s = 0.f, m = 0.f;
    if constexpr (K == block_kind::int8_sym || K == block_kind::fp8_e4m3) {
      float amax = 0.f;
      for (std::size_t i = 0; i < G; ++i) amax = max_f(amax, std::fabs(x[i]));
      constexpr float top = K == block_kind::int8_sym ? 127.f : 448.f;
      s = fp16_round(min_f(amax / top, 65504.f));
      const float inv = s > 0.f ? 1.f / s : 0.f;
      for (std::size_t i = 0; i < G; ++i) {
        if constexpr (K == block_kind::int8_sym) {
          const float r = max_f(-127.f, min_f(127.f, std::nearbyint(x[i] * inv)));
          q[i] = static_cast<std::uint8_t>(static_cast<std::int8_t>(r));
        } else {
          q[i] = float_to_e4m3(x[i] * inv);
        }
      }
    } else if constexpr (K == block_kind::int4_sym) {
      // q4_0: the signed value of largest magnitude maps to code 0 (-8).
      float amax = 0.f, mx = 0.f;
      for (std::size_t i = 0; i < G; ++i)
        if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), mx = x[i];
      s = fp16_round(max_f(-65504.f, min_f(65504.f, mx / -8.f)));
      const float inv = s != 0.f ? 1.f / s : 0.f;
      for (std::size_t i = 0; i < G; ++i)
        q[i] = static_cast<std::uint8_t>(max_f(0.f, min_f(15.f, std::nearbyint(x[i] * inv) + 8.f)));
    } else {
      constexpr float top = static_cast<float>((1u << bits) - 1);
      float lo = x[0], hi = x[0];
      for (std::size_t i = 1; i < G; ++i) lo = min_f(lo, x[i]), hi = max_f(hi, x[i]);
      m = fp16_round(lo);
      s = fp16_round(min_f((hi - m) / top, 65504.f));
      const float inv = s > 0.f ? 1.f / s : 0.f;
      for (std::size_t i = 0; i < G; ++i)
        q[i] = static_cast<std::uint8_t>(max_f(0.f, min_f(top, std::nearbyint((x[i] - m) * inv))));
    }
    auto* c = reinterpret_cast<std::uint8_t*>(row) + b * G * bits / 8;
    if constexpr (bits == 8) {
      for (std::size_t i = 0; i < G; ++i) c[i] = q[i];
    } else if constexpr (bits == 4) {
      for (std::size_t sub = 0; sub < G / 32; ++sub)
        for (std::size_t j = 0; j < 16; ++j)
          c[sub * 16 + j] =
              static_cast<std::uint8_t>(q[sub * 32 + j] | (q[sub * 32 + j + 16] << 4));
    } else {
      for (std::size_t sub = 0; sub < G / 32; ++sub)
        for (std::size_t j = 0; j < 8; ++j) {
          const std::uint8_t* e = q + sub * 32 + j;
          c[sub * 8 + j] =
              static_cast<std::uint8_t>(e[0] | (e[8] << 2) | (e[16] << 4) | (e[24] << 6));
        }
    }
    store16(row + scale_offset(dim) + 2 * b, s);
    if constexpr (asymmetric) store16(row + min_offset(dim) + 2 * b, m);
  }

  KVCACHE_HOST_DEVICE static void decode_block(const std::byte* row, std::size_t b, std::size_t dim,
                                               float* out) noexcept {
    const float s = scale(row, b, dim), m = min(row, b, dim);
    for (std::size_t i = 0; i < G; ++i) out[i] = s * level(code(row, b, i)) + m;
  }

  //! Sum over the block of q[i] x decoded[i]; q points at the block's G query elements.
  KVCACHE_HOST_DEVICE static float dot_block(const float* q, const std::byte* row, std::size_t b,
                                             std::size_t dim) noexcept {
    float acc = 0.f, qsum = 0.f;
    for (std::size_t i = 0; i < G; ++i) {
      acc += q[i] * level(code(row, b, i));
      if constexpr (asymmetric) qsum += q[i];
    }
    return scale(row, b, dim) * acc + min(row, b, dim) * qsum;
  }

  //! out[i] += w x decoded[i] over the block; out points at the block's G outputs.
  KVCACHE_HOST_DEVICE static void accumulate_block(float w, const std::byte* row, std::size_t b,
                                                   std::size_t dim, float* out) noexcept {
    const float ws = w * scale(row, b, dim), wm = w * min(row, b, dim);
    for (std::size_t i = 0; i < G; ++i) out[i] += ws * level(code(row, b, i)) + wm;
  }
};

//! Whether rows of `dim` elements are whole blocks of P (true for precisions
//! without blocks).
template <class P>
constexpr bool whole_blocks(std::size_t dim) noexcept {
  if constexpr (requires { P::group; })
    return P::group > 0 && dim % P::group == 0;
  else
    return true;
}

//! A precision policy made of one block format: the row functions the
//! precision_policy concept asks for, plus the block hooks of block_precision.
template <class F>
struct block_rows {
  using axis = precision_tag;
  using format = F;
  static constexpr std::size_t group = F::group;
  static constexpr bool finite_only = true;

  static constexpr std::size_t row_bytes(std::size_t dim) noexcept { return F::row_bytes(dim); }
  static void check_dim(std::size_t dim) {
    require(dim > 0 && dim % F::group == 0, "head_dim ", dim,
            " is not a multiple of the group size ", F::group,
            "; quantized rows are made of whole blocks along head_dim");
  }
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    for (std::size_t b = 0; b < dim / F::group; ++b)
      F::encode_block(src + b * F::group, dst, b, dim);
  }
  static void decode(const std::byte* src, float* dst, std::size_t dim) noexcept {
    for (std::size_t b = 0; b < dim / F::group; ++b)
      F::decode_block(src, b, dim, dst + b * F::group);
  }
  KVCACHE_HOST_DEVICE static void encode_block(const float* x, std::byte* row, std::size_t b,
                                               std::size_t dim) noexcept {
    F::encode_block(x, row, b, dim);
  }
  KVCACHE_HOST_DEVICE static void decode_block(const std::byte* row, std::size_t b, std::size_t dim,
                                               float* out) noexcept {
    F::decode_block(row, b, dim, out);
  }
  KVCACHE_HOST_DEVICE static float dot_block(const float* q, const std::byte* row, std::size_t b,
                                             std::size_t dim) noexcept {
    return F::dot_block(q, row, b, dim);
  }
  KVCACHE_HOST_DEVICE static void accumulate_block(float w, const std::byte* row, std::size_t b,
                                                   std::size_t dim, float* out) noexcept {
    F::accumulate_block(w, row, b, dim, out);
  }
};

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
