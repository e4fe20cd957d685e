// Appends a step's K and V rows into their slots, encoding them into the
// precision's format once (history is never re-encoded); built-in block
// formats through the vector encoder (encode.hpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../detail/thread_pool.hpp"
#include "../../error.hpp"
#include "../../tensor.hpp"
#include "../view.hpp"
#include "encode.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! Precisions that cannot store NaN or Inf (every block-quantized one: one
//! non-finite element would poison its block's scale) set P::finite_only.
template <class P>
constexpr bool rejects_non_finite() noexcept {
  if constexpr (requires { P::finite_only; })
    return P::finite_only;
  else
    return false;
}

//! Whether x[0..n) are all finite: no element with every exponent bit set.
//! Tested on the bits, so the loop vectorises; the scalar search for the
//! element a message names runs only when a row fails (it had been 2% of
//! int8 prefill, on the calling thread while the pool waited).
inline bool all_finite(const float* x, std::size_t n) noexcept {
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    bad |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

//! Throws kvcache::error naming the first non-finite K or V element of the
//! step (sequence id, layer, token position, KV head, element), before any
//! row is stored, so a rejected write leaves the cache as it was.
//! `appends[i].seq` names sequence i of the step.
template <class Appends>
void check_finite(const kv_layout& L, std::size_t layer, const std::vector<seq_view>& seqs,
                  const Appends& appends, const tensor_view<const float, 3>& k,
                  const tensor_view<const float, 3>& v) {
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const seq_view& s = seqs[i];
    for (std::size_t t = 0; t < s.q_len; ++t)
      for (std::size_t h = 0; h < L.kv_heads; ++h)
        for (std::size_t kind = 0; kind < 2; ++kind) {
          const float* x = kind == 0 ? &k(s.q_begin + t, h, 0) : &v(s.q_begin + t, h, 0);
          if (all_finite(x, L.head_dim)) continue;  // rows only are contiguous
          for (std::size_t d = 0; d < L.head_dim; ++d)
            require(std::isfinite(x[d]), kind == 0 ? "K" : "V", " of sequence ",
                    static_cast<std::uint64_t>(appends[i].seq), ", layer ", layer, ", token ",
                    s.first_pos + t, " (kv_head ", h, ", element ", d, ") is ", x[d],
                    "; quantized precisions store only finite values, nothing was written");
        }
  }
}

template <class P>
void write_rows(thread_pool& pool, const kv_layout& L, std::size_t layer,
                const std::vector<seq_view>& seqs, const tensor_view<const float, 3>& k,
                const tensor_view<const float, 3>& v) {
  const std::size_t rb = L.row_bytes, dim = L.head_dim;
  pool.run(seqs.size() * L.kv_heads, [&](std::size_t task, std::size_t) {
    const seq_view& s = seqs[task / L.kv_heads];
    const std::size_t h = task % L.kv_heads;
    const std::size_t kr = L.run_offset(s.page_tokens, layer, 0, h);
    const std::size_t vr = L.run_offset(s.page_tokens, layer, 1, h);
    for (std::size_t t = 0; t < s.q_len; ++t) {
      const std::size_t slot = s.first_pos + t;
      encode_row<P>(&k(s.q_begin + t, h, 0), s.row(kr, slot, rb), dim);
      encode_row<P>(&v(s.q_begin + t, h, 0), s.row(vr, slot, rb), dim);
    }
  });
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
