// Contiguous storage: each sequence owns one region sized to its capacity,
// reserved when the sequence is added (a static cache, like HF's StaticCache).
//   bytes per sequence = capacity x layers x 2 x kv_heads x row_bytes
// In the kernels' view the region is a single page of `capacity` slots, so
// contiguous and paged storage share every kernel. Under a windowed eviction
// the region is a ring: sinks in slots 0..S - 1, the window cycling through
// slots S..capacity - 1 (position p >= S in slot S + (p - S) mod (capacity - S)),
// so an evicted token's slot is simply overwritten and nothing moves.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "../concepts.hpp"
#include "../error.hpp"
#include "../kernels/view.hpp"

namespace kvcache {
inline namespace v0 {

struct contiguous {
  using axis = storage_tag;
  static constexpr std::string_view name = "contiguous";
  static constexpr std::size_t page_tokens = dynamic;
  static constexpr bool supports_eviction = true;

  //! The storage bookkeeping for backend B (the members storage_state lists).
  //! A region is reserved whole by create(), so appends take no pages and
  //! truncate only shortens the length the cache keeps.
  template <backend_policy B>
  class state {
   public:
    struct region {
      std::byte* base = nullptr;  // (layer, K|V, kv_head, slot, row)
      std::size_t capacity = 0;
    };

    state(const kv_layout& layout, const storage_config& cfg)
        : layout_(layout), max_tokens_(cfg.max_tokens) {
      detail::require(
          cfg.page_tokens == 0, "page_tokens ", cfg.page_tokens,
          " is set; contiguous storage has one page per sequence, sized to its capacity");
    }

    region create(std::size_t capacity) {
      detail::require(capacity > 0, "sequence capacity is 0; it must be at least 1 token");
      detail::require(capacity <= max_tokens_ - slots_, "the cache cannot reserve ", capacity,
                      " more tokens: ", max_tokens_ - slots_, " of max_tokens ", max_tokens_,
                      " are free");
      region r{static_cast<std::byte*>(B::allocate(layout_.page_bytes(capacity))), capacity};
      slots_ += capacity;
      return r;
    }
    void destroy(region& r) noexcept {
      if (!r.base) return;
      B::deallocate(r.base, layout_.page_bytes(r.capacity));
      slots_ -= r.capacity;
      r = {};
    }
    static std::size_t capacity(const region& r) noexcept { return r.capacity; }
    static std::byte* const* pages(const region& r) noexcept { return &r.base; }
    static std::size_t page_tokens(const region& r) noexcept { return r.capacity; }
    static std::size_t prepare(region&, std::size_t, std::size_t, std::size_t = 0) noexcept {
      return 0;
    }
    static void reserve(std::size_t) noexcept {}
    static void grow(region&, std::size_t, std::size_t, std::span<const token_id>,
                     std::size_t = 0) noexcept {}
    static void truncate(region&, std::size_t, std::size_t) noexcept {}
    // ---- windowed eviction -------------------------------------------------

    //! Pages that evicting positions before `to` returns to the pool: none,
    //! the region is reserved whole.
    static std::size_t evicted_pages(const region&, std::size_t, std::size_t) noexcept { return 0; }
    static void evict(region&, std::size_t, std::size_t) noexcept {}
    static std::size_t page_count(const region&) noexcept { return 1; }
    //! Fills v's slot map for `sinks` kept sinks (all of positions < S that
    //! exist) and the window from position w0 >= S.
    static void window_view(const region& r, std::size_t S, std::size_t sink_len, std::size_t w0,
                            seq_view& v) noexcept {
      v.sink_len = sink_len;
      v.ring_base = S;
      v.ring_len = r.capacity - S;
      v.ring_start = (w0 - S) % v.ring_len;
    }

    std::size_t slots_in_use() const noexcept { return slots_; }
    std::size_t bytes_in_use() const noexcept { return layout_.page_bytes(slots_); }

   private:
    kv_layout layout_;
    std::size_t max_tokens_;
    std::size_t slots_ = 0;
  };
};

static_assert(storage_policy<contiguous>);

}  // namespace v0
}  // namespace kvcache
