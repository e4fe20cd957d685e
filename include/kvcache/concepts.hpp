// One concept per policy axis. A policy is a small struct: an opt-in tag, a
// name, a few constants and static functions (the model is std::mdspan's
// accessor and layout policies). The library's own policies satisfy these
// concepts exactly as a user's would; each is followed by a static_assert.
// docs/policies.md has the same requirements as tables.
#pragma once

#include <concepts>
#include <cstddef>
#include <string_view>

#include "config.hpp"

namespace kvcache {
inline namespace v0 {

struct grouping_tag {};
struct storage_tag {};
struct eviction_tag {};
struct precision_tag {};
struct backend_tag {};

//! grouping_policy<G>: how many K/V vectors a token stores and which query
//! heads read them.
//!  1. G::axis is grouping_tag.
//!  2. G::name converts to std::string_view.
//!  3. G::head_dim is a std::size_t: the head dimension, or `dynamic` to take
//!     it from the cache's configuration.
//!  4. G::kv_heads(q_heads, kv_heads) returns the number of KV heads stored,
//!     given the configured counts, and throws kvcache::error for counts the
//!     grouping cannot serve. Query head h reads KV head h / (q_heads / kv_heads).
template <class G>
concept grouping_policy = requires(std::size_t n) {
  requires std::same_as<typename G::axis, grouping_tag>;
  { G::name } -> std::convertible_to<std::string_view>;
  { G::head_dim } -> std::convertible_to<std::size_t>;
  { G::kv_heads(n, n) } -> std::same_as<std::size_t>;
};

//! precision_policy<P>: the stored form of one head's K or V vector (a "row").
//!  1. P::axis is precision_tag.
//!  2. P::name converts to std::string_view.
//!  3. P::row_bytes(dim) is constexpr and gives the bytes of one row of `dim`
//!     elements, metadata (scales, zero points) included.
//!  4. P::check_dim(dim) throws kvcache::error if rows of `dim` elements cannot
//!     be stored (for example a block size that does not divide it).
//!  5. P::encode(const float* src, std::byte* dst, dim) stores a row.
//!  6. P::decode(const std::byte* src, float* dst, dim) reads it back.
//!  7. P::tolerance is the relative L2 error of attention outputs, against a
//!     float64 reference on unit-normal data, that the tests hold it to.
//! Optional: P::element names float, half or bfloat16 when a row is a plain
//! array of that type; the kernels then read it with vector loads instead of
//! calling decode. Optional too: the block hooks of block_precision below.
template <class P>
concept precision_policy = requires(const float* src, float* dst, std::byte* out,
                                    const std::byte* in, std::size_t n) {
  requires std::same_as<typename P::axis, precision_tag>;
  { P::name } -> std::convertible_to<std::string_view>;
  { P::row_bytes(n) } -> std::same_as<std::size_t>;
  P::check_dim(n);
  P::encode(src, out, n);
  P::decode(in, dst, n);
  { P::tolerance } -> std::convertible_to<double>;
};

//! block_precision<P>: optional hooks of a precision_policy that let the
//! kernels read its rows in place, block by block, instead of decoding each
//! row into float scratch (kernels/cpu/decode_quant.hpp). A precision with
//! only encode/decode stays a valid precision_policy and uses the decoding
//! path.
//!  B1. P::group is a std::size_t: a row is head_dim / group blocks of group
//!      consecutive elements (check_dim rejects other head_dims).
//!  B2. Block functions, KVCACHE_HOST_DEVICE so CPU and CUDA kernels share
//!      them, on block b of a row of `dim` elements:
//!        P::encode_block(const float* x, std::byte* row, b, dim)
//!        P::decode_block(const std::byte* row, b, dim, float* out)
//!        P::dot_block(const float* q, const std::byte* row, b, dim) -> float
//!                                   sum of q[i] x element i of the block
//!        P::accumulate_block(float w, const std::byte* row, b, dim, float* out)
//!                                   out[i] += w x element i of the block
//!      q and out point at the block's own `group` elements.
//! Optional on top:
//!  B3. P::format names a detail::block_format; the CPU kernels then use their
//!      vectorised readers of that format instead of the block functions.
//!  B4. P::transform_query(float* q, dim) and P::transform_output(float* o, dim):
//!      an orthogonal change of basis the block functions work in (a rotation):
//!      queries are transformed before dot_block, outputs after accumulate_block.
//!  B5. P::finite_only is a bool constant: when true the cache rejects NaN and
//!      Inf in K/V with a kvcache::error before anything is stored.
template <class P>
concept block_precision = precision_policy<P> &&
    requires(const float* x, float* out, float w, std::byte* row, const std::byte* in,
             std::size_t n) {
  { P::group } -> std::convertible_to<std::size_t>;
  P::encode_block(x, row, n, n);
  P::decode_block(in, n, n, out);
  { P::dot_block(x, in, n, n) } -> std::convertible_to<float>;
  P::accumulate_block(w, in, n, n, out);
};

//! eviction_policy<E>: which tokens stay in the cache.
//!  1. E::axis is eviction_tag.
//!  2. E::name converts to std::string_view.
//!  3. E::evicts is a bool constant: false when every appended token stays until
//!     its sequence is truncated or removed.
//!  4. E::keep(position, length) says whether the token at `position` is still
//!     kept once its sequence holds `length` tokens. It must be monotone: a
//!     token dropped at one length stays dropped at every greater length.
template <class E>
concept eviction_policy = requires(std::size_t n) {
  requires std::same_as<typename E::axis, eviction_tag>;
  { E::name } -> std::convertible_to<std::string_view>;
  { E::evicts } -> std::convertible_to<bool>;
  { E::keep(n, n) } -> std::same_as<bool>;
};

//! backend_policy<B>: where the cache's memory lives and which kernels run.
//!  1. B::axis is backend_tag.
//!  2. B::name converts to std::string_view.
//!  3. B::allocate(bytes) returns memory aligned to 64 bytes, or throws;
//!     B::deallocate(p, bytes) returns it.
//!  4. B::context is constructible from a thread count (0: the machine's) and
//!     holds what the kernels need between calls (a thread pool, a stream).
template <class B>
concept backend_policy = requires(std::size_t n, void* p) {
  requires std::same_as<typename B::axis, backend_tag>;
  { B::name } -> std::convertible_to<std::string_view>;
  { B::allocate(n) } -> std::same_as<void*>;
  B::deallocate(p, n);
  requires std::constructible_from<typename B::context, std::size_t>;
};

//! storage_policy<S>: where a token's slot is and how sequences grow.
//!  1. S::axis is storage_tag.
//!  2. S::name converts to std::string_view.
//!  3. S::page_tokens is a std::size_t: slots per page, or `dynamic`. Contiguous
//!     storage is one page per sequence, sized to its capacity.
//!  4. S::supports_eviction is a bool constant: whether slots can be reused by
//!     an evicting policy.
//!  5. S::template state<B> is the bookkeeping type for backend B (see
//!     storage/contiguous.hpp for the members the cache calls).
template <class S>
concept storage_policy = requires {
  requires std::same_as<typename S::axis, storage_tag>;
  { S::name } -> std::convertible_to<std::string_view>;
  { S::page_tokens } -> std::convertible_to<std::size_t>;
  { S::supports_eviction } -> std::convertible_to<bool>;
};

}  // namespace v0
}  // namespace kvcache
