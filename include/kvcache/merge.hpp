// merge_attention: combines two attention results over disjoint sets of
// tokens into the result over their union. Each result is a normalised output
// and the log-sum-exp of its rows' scores (attend_options::lse), so
//   lse   = log(exp(lse_a) + exp(lse_b))
//   out   = (exp(lse_a) out_a + exp(lse_b) out_b) / exp(lse)
// This is how a split of the tokens, a shared prefix (cascade) or a range held
// elsewhere (another cache, a cold tier) joins the rest; the kernels use the
// same fold (kernels/merge.hpp). A row whose lse is -inf attended no token and
// leaves the other side unchanged.
//
// Layouts (any strides, last axis unit-stride):
//   out, part       : (tokens, q_heads, head_dim)
//   lse, part_lse   : (tokens, q_heads)
#pragma once

#include <cstddef>
#include <vector>

#include "error.hpp"
#include "kernels/merge.hpp"
#include "tensor.hpp"

namespace kvcache {
inline namespace v0 {

//! Folds (part, part_lse) into (out, lse) in place. Shapes must agree; an
//! error names the first that does not, and nothing is written.
inline void merge_attention(tensor_view<float, 3> out, tensor_view<float, 2> lse,
                            tensor_view<const float, 3> part,
                            tensor_view<const float, 2> part_lse) {
  const std::size_t tokens = out.extent(0), heads = out.extent(1), dim = out.extent(2);
  detail::require(tokens > 0 && heads > 0 && dim > 0, "out has an empty extent (", tokens, ", ",
                  heads, ", ", dim, ")");
  detail::check_view(out, "out", {tokens, heads, dim});
  detail::check_view(lse, "lse", {tokens, heads});
  detail::check_view(part, "part", {tokens, heads, dim});
  detail::check_view(part_lse, "part_lse", {tokens, heads});
  std::vector<float> row(dim);
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t h = 0; h < heads; ++h) {
      // Copy the part's row so out and part may alias any way the caller likes.
      for (std::size_t i = 0; i < dim; ++i) row[i] = part(t, h, i);
      detail::merge_partial(&out(t, h, 0), lse(t, h), row.data(), part_lse(t, h), dim);
    }
}

}  // namespace v0
}  // namespace kvcache
