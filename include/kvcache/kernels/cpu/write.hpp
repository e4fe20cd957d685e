// Appends a step's K and V rows into their slots, encoding them into the
// precision's format once (history is never re-encoded).
#pragma once

#include <cstddef>
#include <vector>

#include "../../detail/thread_pool.hpp"
#include "../../tensor.hpp"
#include "../view.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

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
      P::encode(&k(s.q_begin + t, h, 0), s.row(kr, slot, rb), dim);
      P::encode(&v(s.q_begin + t, h, 0), s.row(vr, slot, rb), dim);
    }
  });
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
