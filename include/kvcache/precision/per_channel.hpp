// per_channel_k<P, G, R>: KIVI's key layout (Liu et al., "KIVI: A Tuning-Free
// Asymmetric 2bit Quantization for KV Cache", ICML 2024). Keys are quantized
// per channel, in groups of G tokens along the sequence, so that an outlier
// channel gets its own scale and min instead of inflating every other
// channel's step; values stay per token in P's row format. The newest tokens
// of each (sequence, layer, KV head) wait in an fp16 residual until R of them
// (R a multiple of G) are there; write() then quantizes them, once, R / G
// groups at a time.
//
// K row of a token at position p (r = p mod G, the token's index in its group;
// groups start at positions that are multiples of G):
//   [codes: dim x bits / 8 bytes][scales: dim / G fp16][mins: dim / G fp16]
// The codes are the token's own, packed as P's rows pack them (block.hpp: in
// each 32-element sub-block byte j holds element j low, j + 16 (int4) or
// j + 8, j + 16, j + 24 (int2) above). The (scale, min) pairs are the group's,
// spread over its G rows: row r holds those of channels
// [r x dim / G, (r + 1) x dim / G). So a row has the bytes of a per-token
// asymmetric row with blocks of G elements, and one group spans G slots of
// one KV head, wherever the storage puts them (any page size, rings).
//   decoded K[p][c] = scale[group(p)][c] x code[p][c] + min[group(p)][c]
//   row_bytes      = max(dim x bits / 8 + 4 x dim / G, P::row_bytes(dim))
//   residual bytes = layers x kv_heads x R x dim x 2 per sequence
// (V rows are P's; K and V share one row size, the larger of the two: equal
// for int4_kv<true> and int2_kv at G = 32.)
//
// Keys are rounded to fp16 before quantizing (what the residual holds), so
// the stored bytes are the same however the tokens were split into steps.
// Scales and mins are rounded to fp16 before the codes are chosen, as in
// block.hpp; a channel that is constant over a group stores scale 0.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "block.hpp"
#include "int2.hpp"
#include "int4.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! P's name, then "_kchan", then "_r<R>" when the residual is longer than a group.
template <class P, std::size_t G, std::size_t R>
struct per_channel_name {
  static constexpr std::string_view mid = "_kchan";
  static constexpr std::size_t digits = [] {
    std::size_t n = 0;
    for (std::size_t r = R; r; r /= 10) ++n;
    return n;
  }();
  static constexpr std::size_t extra = R != G ? 2 + digits : 0;
  static constexpr auto chars = [] {
    std::array<char, P::name.size() + mid.size() + extra> a{};
    std::size_t k = 0;
    for (char c : P::name) a[k++] = c;
    for (char c : mid) a[k++] = c;
    if (R != G) {
      a[k++] = '_';
      a[k++] = 'r';
      for (std::size_t i = 0, r = R; i < digits; ++i, r /= 10) a[k + digits - 1 - i] = '0' + r % 10;
    }
    return a;
  }();
  static constexpr std::string_view value{chars.data(), chars.size()};
};

//! The per-channel key format of `Bits` bits with groups of G tokens.
template <std::size_t Bits, std::size_t G>
struct channel_format {
  static constexpr std::size_t bits = Bits;
  static constexpr std::size_t group = G;
  static constexpr float top = static_cast<float>((1u << Bits) - 1);

  static constexpr std::size_t code_bytes(std::size_t dim) noexcept { return dim * bits / 8; }
  static constexpr std::size_t row_bytes(std::size_t dim) noexcept {
    return code_bytes(dim) + 4 * (dim / G);
  }
  //! Channels whose (scale, min) one row holds.
  static constexpr std::size_t per_row(std::size_t dim) noexcept { return dim / G; }
  static constexpr std::size_t scale_offset(std::size_t dim) noexcept { return code_bytes(dim); }
  static constexpr std::size_t min_offset(std::size_t dim) noexcept {
    return code_bytes(dim) + 2 * (dim / G);
  }

  //! Byte and shift of channel c's code (block.hpp's packing).
  KVCACHE_HOST_DEVICE static constexpr std::size_t code_byte(std::size_t c) noexcept {
    const std::size_t sub = c / 32, j = c % 32;
    return bits == 4 ? sub * 16 + j % 16 : sub * 8 + j % 8;
  }
  KVCACHE_HOST_DEVICE static constexpr unsigned code_shift(std::size_t c) noexcept {
    const std::size_t j = c % 32;
    return static_cast<unsigned>(bits == 4 ? 4 * (j / 16) : 2 * (j / 8));
  }
  KVCACHE_HOST_DEVICE static unsigned code(const std::byte* row, std::size_t c) noexcept {
    const auto* p = reinterpret_cast<const std::uint8_t*>(row);
    return (p[code_byte(c)] >> code_shift(c)) & ((1u << bits) - 1);
  }

  //! Quantizes one group: x (G, dim) token-major, already fp16-exact; rows[t]
  //! is token t's K row. Writes every byte of the G rows' K format.
  static void encode_group(const float* x, std::byte* const* rows, std::size_t dim) noexcept {
    for (std::size_t t = 0; t < G; ++t) std::memset(rows[t], 0, code_bytes(dim));
    const std::size_t pr = per_row(dim);
    for (std::size_t c = 0; c < dim; ++c) {
      float lo = x[c], hi = x[c];
      for (std::size_t t = 1; t < G; ++t)
        lo = min_f(lo, x[t * dim + c]), hi = max_f(hi, x[t * dim + c]);
      const float m = fp16_round(lo);
      const float s = fp16_round(min_f((hi - m) / top, 65504.f));
      const float inv = s > 0.f ? 1.f / s : 0.f;
      for (std::size_t t = 0; t < G; ++t) {
        const float q = max_f(0.f, min_f(top, std::nearbyint((x[t * dim + c] - m) * inv)));
        auto* b = reinterpret_cast<std::uint8_t*>(rows[t]) + code_byte(c);
        *b = static_cast<std::uint8_t>(*b | (static_cast<unsigned>(q) << code_shift(c)));
      }
      std::byte* prow = rows[c / pr];
      block_format<block_kind::int8_sym, 32>::store16(prow + scale_offset(dim) + 2 * (c % pr), s);
      block_format<block_kind::int8_sym, 32>::store16(prow + min_offset(dim) + 2 * (c % pr), m);
    }
  }

  //! Scale and min of channel c, from the row of the group that holds them.
  KVCACHE_HOST_DEVICE static float scale(const std::byte* prow, std::size_t c,
                                         std::size_t dim) noexcept {
    std::uint16_t h;
    std::memcpy(&h, prow + scale_offset(dim) + 2 * (c % per_row(dim)), 2);
    return half_bits_to_float(h);
  }
  KVCACHE_HOST_DEVICE static float min(const std::byte* prow, std::size_t c,
                                       std::size_t dim) noexcept {
    std::uint16_t h;
    std::memcpy(&h, prow + min_offset(dim) + 2 * (c % per_row(dim)), 2);
    return half_bits_to_float(h);
  }

  //! Decodes token row `row` of a group whose rows are rows[0..G) into
  //! out[0], out[stride], ...
  static void decode_token(const std::byte* row, const std::byte* const* rows, std::size_t dim,
                           float* out, std::size_t stride = 1) noexcept {
    const std::size_t pr = per_row(dim);
    for (std::size_t c = 0; c < dim; ++c)
      out[c * stride] = scale(rows[c / pr], c, dim) * static_cast<float>(code(row, c)) +
                        min(rows[c / pr], c, dim);
  }
};

}  // namespace detail

//! Per-channel keys (groups of G tokens) with an fp16 residual of R tokens;
//! values in P's per-token rows. P is int4_kv<...> or int2_kv (their bits set
//! the keys' bits), or hadamard of neither.
template <class P, std::size_t G = 32, std::size_t R = G>
struct per_channel_k {
  static_assert(
      requires { typename P::format; } && !requires { P::transform_query; },
      "per_channel_k<P> takes an unrotated block-quantized precision (int4_kv or int2_kv) "
      "for its values and key bits.");
  static_assert(G >= 2 && R >= G && R % G == 0,
                "per_channel_k<P, G, R>: the residual R must be a positive multiple of the "
                "token group G (at least 2 tokens).");
  static_assert(P::format::bits == 4 || P::format::bits == 2,
                "per_channel_k quantizes keys to 4 or 2 bits: P must be int4_kv or int2_kv.");

  using axis = precision_tag;
  using value_precision = P;
  using key_format = detail::channel_format<P::format::bits, G>;
  static constexpr std::string_view name = detail::per_channel_name<P, G, R>::value;
  //! Tokens per key group (each channel's scale and min cover G tokens).
  static constexpr std::size_t token_group = G;
  //! Newest tokens kept in fp16 until R of them are quantized together.
  static constexpr std::size_t residual = R;
  static constexpr bool finite_only = true;
  static constexpr double tolerance = P::tolerance;

  static constexpr std::size_t row_bytes(std::size_t dim) noexcept {
    return std::max(key_format::row_bytes(dim), P::row_bytes(dim));
  }
  //! Bytes of one sequence's residual (per layer and KV head: R fp16 key rows).
  static constexpr std::size_t residual_bytes(std::size_t layers, std::size_t kv_heads,
                                              std::size_t dim) noexcept {
    return layers * kv_heads * R * dim * 2;
  }
  static void check_dim(std::size_t dim) {
    P::check_dim(dim);
    detail::require(dim % G == 0, "head_dim ", dim, " is not a multiple of the key group of ", G,
                    " tokens; per_channel_k spreads a group's ", dim,
                    " (scale, min) pairs over its ", G, " rows");
  }
  //! Row functions: a value row (P's). A key row alone cannot be decoded (its
  //! scales live in its group's rows); the cache reads keys through the group.
  static void encode(const float* src, std::byte* dst, std::size_t dim) noexcept {
    P::encode(src, dst, dim);
  }
  static void decode(const std::byte* src, float* dst, std::size_t dim) noexcept {
    P::decode(src, dst, dim);
  }
};

namespace detail {
//! Precisions that quantize keys per channel with a residual (per_channel_k).
template <class P>
concept channel_keys = precision_policy<P> && requires {
  typename P::key_format;
  typename P::value_precision;
  { P::residual } -> std::convertible_to<std::size_t>;
  { P::token_group } -> std::convertible_to<std::size_t>;
};

//! P's key group in tokens (1 for other precisions).
template <class P>
constexpr std::size_t token_group_of() noexcept {
  if constexpr (channel_keys<P>)
    return P::token_group;
  else
    return 1;
}

//! Residual bytes per sequence (0 for other precisions).
template <class P>
constexpr std::size_t residual_bytes(std::size_t layers, std::size_t kv_heads,
                                     std::size_t dim) noexcept {
  if constexpr (channel_keys<P>)
    return P::residual_bytes(layers, kv_heads, dim);
  else
    return 0;
}
}  // namespace detail

static_assert(precision_policy<per_channel_k<int4_kv<true>>>);
static_assert(precision_policy<per_channel_k<int2_kv, 32, 128>>);
static_assert(!block_precision<per_channel_k<int4_kv<true>>>);

}  // namespace v0
}  // namespace kvcache
