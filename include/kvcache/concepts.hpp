// One concept per policy axis. A policy is a small struct: an opt-in tag, a
// name, a few constants and static functions (the model is std::mdspan's
// accessor and layout policies). The library's own policies satisfy these
// concepts exactly as a user's would; each is followed by a static_assert.
// docs/policies.md has the same requirements as tables.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "kernels/view.hpp"

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

//! Which positions the cache rotates kept keys to (when it applies RoPE).
//!  absolute: each token's position in its sequence (0, 1, 2, ... as appended);
//!            what sliding-window models were trained with.
//!  cache:    each kept token's index among the kept tokens, 0..kept - 1;
//!            what StreamingLLM needs once tokens between the sinks and the
//!            window are gone.
enum class rope_positions { absolute, cache };

//! Block-sparse reads (Longformer / BigBird) on a full cache: sparse_pattern.
struct sparse_config {
  std::size_t globals = 0;  // positions 0..globals - 1 are global tokens
  std::size_t window = 0;   // local window: positions (p - window, p]
  std::size_t block = 64;   // random blocks' size, in tokens
  std::size_t random = 0;   // random blocks per query block
  std::uint64_t seed = 0;
};

//! Runtime sizes of an eviction policy (from cache_config): what a `dynamic`
//! sink count or window takes, and a sparse pattern's sizes.
struct eviction_config {
  std::size_t sinks = 0;
  std::size_t window = 0;
  sparse_config sparse{};
};

//! eviction_policy<E>: which tokens stay in the cache.
//!  1. E::axis is eviction_tag.
//!  2. E::name converts to std::string_view.
//!  3. E::evicts is a bool constant: false when every appended token stays until
//!     its sequence is truncated or removed.
//!  4. e.keep(position, length) (static or not) says whether the token at
//!     `position` is still kept once its sequence holds `length` tokens. It
//!     must be monotone: a token dropped at one length stays dropped at every
//!     greater length. The cache asks it at the start of each step with
//!     length = (tokens so far) + 1, so that a step's first query still sees
//!     every key it needs; tokens leave then, never mid-step.
//!  5. E is default constructible, or constructible from eviction_config
//!     (the cache then builds it from cache_config::sinks and ::window and
//!     the constructor throws kvcache::error for values it cannot serve).
//! Optional: E::positions (a rope_positions) says where the cache rotates
//! kept keys; absolute when absent.
template <class E>
concept eviction_policy = requires(const E& e, std::size_t n) {
  requires std::same_as<typename E::axis, eviction_tag>;
  { E::name } -> std::convertible_to<std::string_view>;
  { E::evicts } -> std::convertible_to<bool>;
  { e.keep(n, n) } -> std::same_as<bool>;
  requires std::default_initializable<E> || std::constructible_from<E, const eviction_config&>;
};

//! windowed_eviction<E>: an eviction policy whose kept tokens are always the
//! first e.sinks() tokens and the newest e.window() (keep(p, n) is exactly
//! p < sinks || p + window >= n). Storage then keeps the window as a ring
//! (contiguous) or drops whole pages (paged), and kernels read it with no
//! per-token bookkeeping.
template <class E>
concept windowed_eviction = eviction_policy<E> && requires(const E& e) {
  { e.sinks() } -> std::same_as<std::size_t>;
  { e.window() } -> std::same_as<std::size_t>;
};

//! sparse_selection<E>: a non-evicting policy whose queries read a
//! block-sparse selection of the cache (sparse.hpp): global tokens, a local
//! window, and random_blocks(query block) of block() tokens each.
template <class E>
concept sparse_selection = eviction_policy<E> && !E::evicts && requires(const E& e, std::size_t n) {
  { e.globals() } -> std::same_as<std::size_t>;
  { e.local_window() } -> std::same_as<std::size_t>;
  { e.block() } -> std::same_as<std::size_t>;
  { e.random_blocks(n) } -> std::convertible_to<std::vector<std::size_t>>;
};

namespace detail {
template <class E>
constexpr rope_positions positions_of() noexcept {
  if constexpr (requires { E::positions; })
    return E::positions;
  else
    return rope_positions::absolute;
}
}  // namespace detail

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

//! A token's id in the model's vocabulary: what prefix reuse keys pages by.
using token_id = std::int32_t;

//! What a storage state is built from (the cache fills it from cache_config).
struct storage_config {
  std::size_t max_tokens = 0;   // token slots across all sequences
  std::size_t page_tokens = 0;  // runtime page size for a `dynamic` page size; else 0
};

namespace detail {
//! A backend with no behaviour: the storage concepts instantiate a state with
//! it to check member signatures without naming a real backend.
struct archetype_backend {
  using axis = backend_tag;
  static constexpr std::string_view name = "archetype";
  static void* allocate(std::size_t);
  static void deallocate(void*, std::size_t) noexcept;
  struct context {
    explicit context(std::size_t);
  };
};
}  // namespace detail

//! storage_state<St>: the bookkeeping of one storage policy for one backend;
//! exactly the members the cache calls. A region is one sequence's share.
//!  1. St(const kv_layout&, const storage_config&) builds the state; it
//!     throws kvcache::error for a configuration it cannot serve.
//!  2. St::region is default constructible and movable.
//!  3. create(capacity) returns an empty region able to hold `capacity`
//!     tokens, or throws changing nothing; destroy(region&) is noexcept and
//!     returns everything the region held.
//!  4. capacity(r), page_tokens(r) and pages(r) describe a region as the
//!     kernels' view sees it (kernels/view.hpp): page_tokens slots per page,
//!     page base addresses in logical order.
//!  5. Appending `tokens` to a region of `length` tokens is three calls:
//!     prepare(r, length, tokens) returns how many pages the append takes from
//!     the pool and may allocate (page tables), changing nothing observable;
//!     reserve(pages) throws kvcache::error naming the pages needed and free
//!     when the pool cannot supply them; grow(r, length, tokens, ids) is
//!     noexcept after both succeeded. `ids` holds the tokens' ids, or is empty.
//!  6. truncate(r, length, n) is noexcept and keeps the first n tokens.
//!  7. bytes_in_use() is the K/V bytes held, each shared page counted once.
template <class St>
concept storage_state = std::default_initializable<typename St::region> &&
    std::movable<typename St::region> &&
    std::constructible_from<St, const kv_layout&, const storage_config&> &&
    requires(St& st, const St& cst, typename St::region& r, const typename St::region& cr,
             std::size_t n, std::span<const token_id> ids) {
  { st.create(n) } -> std::same_as<typename St::region>;
  { st.destroy(r) }
  noexcept;
  { cst.capacity(cr) } -> std::same_as<std::size_t>;
  { cst.page_tokens(cr) } -> std::same_as<std::size_t>;
  { cst.pages(cr) } -> std::same_as<std::byte* const*>;
  { st.prepare(r, n, n) } -> std::same_as<std::size_t>;
  st.reserve(n);
  { st.grow(r, n, n, ids) }
  noexcept;
  { st.truncate(r, n, n) }
  noexcept;
  { cst.bytes_in_use() } -> std::same_as<std::size_t>;
};

//! storage_policy<S>: where a token's slot is and how sequences grow.
//!  1. S::axis is storage_tag.
//!  2. S::name converts to std::string_view.
//!  3. S::page_tokens is a std::size_t: slots per page, or `dynamic`. Contiguous
//!     storage is one page per sequence, sized to its capacity.
//!  4. S::supports_eviction is a bool constant: whether slots can be reused by
//!     an evicting policy.
//!  5. S::template state<B> satisfies storage_state for every backend B.
template <class S>
concept storage_policy = requires {
  requires std::same_as<typename S::axis, storage_tag>;
  { S::name } -> std::convertible_to<std::string_view>;
  { S::page_tokens } -> std::convertible_to<std::size_t>;
  { S::supports_eviction } -> std::convertible_to<bool>;
  requires storage_state<typename S::template state<detail::archetype_backend>>;
};

//! sharing_storage<S>: a storage whose sequences can share pages, which the
//! cache's fork, reorder and match_prefix need.
//!  1. share(r) returns a region holding the same pages as r (no K/V bytes
//!     copied); a later append into a shared page copies it first.
//!  2. publish(r, length) is noexcept and enters r's full pages, whose tokens'
//!     ids r was given, into the prefix index.
//!  3. match(r, ids) attaches to the empty region r the longest run of cached
//!     pages that hold a prefix of `ids`, and returns its tokens.
template <class S>
concept sharing_storage = storage_policy<S> &&
    requires(typename S::template state<detail::archetype_backend>& st,
             typename S::template state<detail::archetype_backend>::region& r,
             std::span<const token_id> ids, std::size_t n) {
  { st.share(r) } -> std::same_as<std::remove_reference_t<decltype(r)>>;
  { st.publish(r, n) }
  noexcept;
  { st.match(r, ids) } -> std::same_as<std::size_t>;
};

}  // namespace v0
}  // namespace kvcache
