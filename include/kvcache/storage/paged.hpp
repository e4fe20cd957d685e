// Paged storage (PagedAttention, Kwon et al., SOSP 2023): one pool of
// fixed-size pages per cache, a page table per sequence, reference counts, a
// free list, and a prefix index over full pages.
//
//   page bytes   = page_tokens x layers x 2 x kv_heads x row_bytes(head_dim)
//   bytes in use = (distinct pages referenced by live sequences) x page bytes
//                <= sum over sequences of ceil(length / page_tokens) x page bytes
// so a sequence wastes at most one partly filled page, and a page that several
// sequences share (forks, beams, a matched prefix) is counted once.
//
// A page holds its tokens' K and V for every layer, laid out
// (layer, K|V, kv_head, slot, row) as the kernels' view expects: one transfer
// per page moves a token range of the whole model, which is what offloading
// pages to host memory needs (vLLM measured cross-layer blocks ~10x faster to
// move than per-layer ones), and a fork, truncate or match touches one page
// table, not one per layer.
//
// Sharing rules:
//  - share() (fork) copies a page table and raises reference counts; no K/V
//    bytes move. A page is written in place only when one sequence holds it
//    and it is not in the prefix index; otherwise the first append into it
//    copies its valid slots to a fresh page (copy-on-write, at most one page
//    per sequence, done in the host plan so a failed step changes nothing).
//  - A page whose count drops to 0 returns to the free list, or, when the
//    prefix index holds it, to a least-recently-used list of cached pages that
//    the pool evicts from only when the free list is empty.
//  - The prefix index keys a full page by a chained hash of (the previous
//    page's hash, the page's token ids), and a lookup compares the token ids
//    and the identity of the previous page too, so a hash collision can never
//    return another prefix's K/V (the hash is a template argument so tests can
//    force collisions).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "../concepts.hpp"
#include "../error.hpp"
#include "../kernels/view.hpp"

namespace kvcache {
inline namespace v0 {

//! The prefix index's hash of a full page: a function of the previous page's
//! hash (0 for the first page) and the page's token ids.
struct page_hash {
  std::uint64_t operator()(std::uint64_t parent, std::span<const token_id> ids) const noexcept {
    // Two ids per multiply (the chain's latency bounds match_prefix), then
    // splitmix64's finaliser so every bit of the page reaches every bit of
    // the key.
    constexpr std::uint64_t k = 0x9fb21c651e98df25ull;
    std::uint64_t h = parent ^ (0x9e3779b97f4a7c15ull + ids.size());
    std::size_t i = 0;
    for (; i + 1 < ids.size(); i += 2) {
      const std::uint64_t pair = static_cast<std::uint32_t>(ids[i]) |
                                 std::uint64_t{static_cast<std::uint32_t>(ids[i + 1])} << 32;
      h = (h ^ pair) * k;
      h ^= h >> 29;
    }
    if (i < ids.size()) h = ((h ^ static_cast<std::uint32_t>(ids[i])) * k) ^ (h >> 29);
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    return h ^ (h >> 31);
  }
};

//! paged<page_tokens, Hash>: page_tokens slots per page, a compile-time
//! constant or `dynamic` (cache_config::page_tokens then gives it).
template <std::size_t PageTokens = dynamic, class Hash = page_hash>
struct paged {
  static_assert(PageTokens > 0, "paged<0>: a page holds at least one token");
  using axis = storage_tag;
  static constexpr std::string_view name = "paged";
  static constexpr std::size_t page_tokens = PageTokens;
  // A windowed eviction returns the pages that leave the window (evict()).
  static constexpr bool supports_eviction = true;

  template <backend_policy B>
  class state {
    static constexpr std::uint32_t none = std::numeric_limits<std::uint32_t>::max();

   public:
    //! Hash and identity of an indexed page a region holds (or an equal one).
    struct link {
      std::uint64_t hash = 0;
      std::uint64_t serial = 0;  // the index entry's serial; 0: the empty prefix
    };

    struct region {
      std::vector<std::byte*> table;   // (pages)        base addresses, logical order
      std::vector<std::uint32_t> ids;  // (pages)        page numbers in the pool
      std::vector<link> chain;         // (hashed pages) leading pages in the index
      std::vector<token_id> tail;      // (tokens)       ids past the hashed pages
      std::size_t capacity = 0;
      bool has_ids = true;  // every token past the hashed pages came with its id
      //! Windowed eviction: pages dropped after the sink pages. The table
      //! then holds logical pages [0, sink pages) and [sink pages + dropped, ...).
      std::size_t dropped = 0;
      std::size_t sink_pages = 0;
    };

    state(const kv_layout& layout, const storage_config& cfg) : layout_(layout) {
      if constexpr (PageTokens == dynamic) {
        detail::require(cfg.page_tokens > 0,
                        "page_tokens is 0; paged<dynamic> needs cache_config::page_tokens >= 1");
        page_tokens_ = cfg.page_tokens;
      } else {
        detail::require(cfg.page_tokens == 0 || cfg.page_tokens == PageTokens, "page_tokens ",
                        cfg.page_tokens, " differs from the storage's static page size ",
                        PageTokens);
        page_tokens_ = PageTokens;
      }
      detail::require(cfg.max_tokens > 0, "max_tokens is 0; it must be at least 1");
      const std::size_t pages = (cfg.max_tokens + page_tokens_ - 1) / page_tokens_;
      detail::require(pages < none, "max_tokens ", cfg.max_tokens, " needs ", pages,
                      " pages; the pool holds at most ", none - 1);
      total_ = pages;
      page_bytes_ = layout_.page_bytes(page_tokens_);
      // Slabs of ~8 MiB: memory is taken as pages are first needed, not for
      // max_tokens up front, and stays until the cache is destroyed.
      slab_pages_ = std::clamp<std::size_t>((std::size_t{8} << 20) / page_bytes_, 1, total_);
      meta_.resize(total_);
      tokens_.resize(total_ * page_tokens_);
      free_.reserve(total_);
      slabs_.reserve((total_ + slab_pages_ - 1) / slab_pages_);
    }
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      for (std::size_t s = 0; s < slabs_.size(); ++s)
        B::deallocate(slabs_[s], slab_pages(s) * page_bytes_);
    }

    // ---- storage_state ------------------------------------------------------

    region create(std::size_t capacity) {
      detail::require(capacity > 0, "sequence capacity is 0; it must be at least 1 token");
      detail::require(capacity <= total_ * page_tokens_, "sequence capacity ", capacity,
                      " exceeds the pool's ", total_ * page_tokens_, " tokens (", total_,
                      " pages of ", page_tokens_, ")");
      region r;
      r.capacity = capacity;
      r.tail.reserve(page_tokens_);  // truncate refills at most one page of ids, without allocating
      return r;
    }

    void destroy(region& r) noexcept {
      // Last page first: the least recently used cached pages are then a
      // prefix's tail, which is what eviction should give up first.
      for (std::size_t i = r.ids.size(); i-- > 0;) release(r.ids[i]);
      r = region{};
    }

    static std::size_t capacity(const region& r) noexcept { return r.capacity; }
    static std::byte* const* pages(const region& r) noexcept { return r.table.data(); }
    std::size_t page_tokens(const region&) const noexcept { return page_tokens_; }

    //! `write_from` (<= length): the first slot the append writes. Shared
    //! pages holding slots in [write_from, length) are copied first (a
    //! per-channel key precision writes the rows of its residual's tokens
    //! when it quantizes them; others write from `length`).
    std::size_t prepare(region& r, std::size_t length, std::size_t tokens) {
      return prepare(r, length, tokens, length);
    }
    std::size_t prepare(region& r, std::size_t length, std::size_t tokens, std::size_t write_from) {
      const std::size_t pages = (length + tokens + page_tokens_ - 1) / page_tokens_ - r.dropped;
      r.table.reserve(pages);
      r.ids.reserve(pages);
      r.chain.reserve(pages);
      r.tail.reserve(r.tail.size() + tokens);
      std::size_t cow = 0;
      for_written(r, length, write_from, [&](std::size_t i) { cow += !writable(r.ids[i]); });
      return pages - r.ids.size() + cow;
    }

    void reserve(std::size_t pages) {
      while (free_.size() < pages && allocated_ < total_) add_slab();
      detail::require(pages <= free_.size() + cached_, "the step needs ", pages, " new pages of ",
                      page_tokens_, " tokens; ", free_.size() + cached_ + (total_ - allocated_),
                      " of the pool's ", total_, " are free (", cached_,
                      " of them hold cached prefixes)");
    }

    void grow(region& r, std::size_t length, std::size_t tokens,
              std::span<const token_id> ids) noexcept {
      grow(r, length, tokens, ids, length);
    }
    void grow(region& r, std::size_t length, std::size_t tokens, std::span<const token_id> ids,
              std::size_t write_from) noexcept {
      for_written(r, length, write_from, [&](std::size_t i) {
        if (writable(r.ids[i])) return;
        const std::size_t k = i < r.sink_pages || !r.dropped ? i : i + r.dropped;  // logical page
        const std::size_t used = std::min(page_tokens_, length - k * page_tokens_);
        const std::uint32_t from = r.ids[i], to = take();
        copy_slots(to, from, used);
        r.ids[i] = to;
        r.table[i] = address(to);
        release(from);
      });
      const std::size_t pages = (length + tokens + page_tokens_ - 1) / page_tokens_ - r.dropped;
      while (r.ids.size() < pages) {
        const std::uint32_t p = take();
        r.ids.push_back(p);
        r.table.push_back(address(p));
      }
      if (!r.has_ids) return;
      if (ids.size() == tokens) {
        r.tail.insert(r.tail.end(), ids.begin(), ids.end());
      } else {
        r.has_ids = false;
        r.tail.clear();
      }
    }

    void truncate(region& r, std::size_t length, std::size_t n) noexcept {
      (void)length;
      // Under eviction the cache truncates only to n <= sinks (every dropped
      // page goes, with the pages after them) or to n at or past the window's
      // first kept token (past the dropped pages).
      const std::size_t logical = (n + page_tokens_ - 1) / page_tokens_;
      std::size_t keep = logical - std::min(logical, r.dropped);
      if (r.dropped && logical < r.sink_pages + r.dropped) {
        keep = logical;
        r.dropped = 0;
      }
      while (r.ids.size() > keep) {
        release(r.ids.back());
        r.ids.pop_back();
        r.table.pop_back();
      }
      const std::size_t hashed = r.chain.size() * page_tokens_;
      if (n >= hashed) {
        if (r.has_ids) r.tail.resize(n - hashed);
        return;
      }
      // n falls inside the hashed pages: every kept token's id is known again,
      // those of a partly kept page from its index entry.
      const std::size_t k = n / page_tokens_, rem = n % page_tokens_;
      r.tail.clear();
      r.has_ids = true;
      if (rem != 0) {
        const std::uint32_t p = find_serial(r.chain[k]);
        if (p == none) {
          r.has_ids = false;
        } else {
          const token_id* src = tokens_.data() + std::size_t{p} * page_tokens_;
          r.tail.assign(src, src + rem);
        }
      }
      r.chain.resize(k);
    }

    std::size_t bytes_in_use() const noexcept { return in_use_ * page_bytes_; }

    // ---- sharing_storage ------------------------------------------------------

    region share(const region& r) {
      region c;
      c.table = r.table;
      c.ids = r.ids;
      c.chain = r.chain;
      c.tail.reserve(std::max(page_tokens_, r.tail.size()));
      c.tail = r.tail;
      c.capacity = r.capacity;
      c.has_ids = r.has_ids;
      c.dropped = r.dropped;
      c.sink_pages = r.sink_pages;
      for (std::uint32_t p : c.ids) acquire(p);
      return c;
    }

    void publish(region& r, std::size_t length) noexcept {
      if (!r.has_ids) return;
      const std::size_t full = std::min(length / page_tokens_, r.ids.size());
      while (r.chain.size() < full && r.tail.size() >= page_tokens_) {
        const std::size_t i = r.chain.size();
        const link parent = i ? r.chain[i - 1] : link{};
        const std::span<const token_id> ids(r.tail.data(), page_tokens_);
        link l{Hash{}(parent.hash, ids), 0};
        if (const std::uint32_t q = lookup(l.hash, parent.serial, ids); q != none) {
          l.serial = meta_[q].serial;  // an equal page is cached: chain through it
        } else {
          const std::uint32_t p = r.ids[i];
          page_meta& m = meta_[p];
          if (m.serial != 0) return;  // indexed under another prefix: stop here
          try {
            index_.emplace(l.hash, p);
          } catch (...) {
            return;  // publishing is an optimisation; without memory it is skipped
          }
          m.hash = l.hash;
          m.serial = l.serial = ++serial_;
          m.parent = parent.serial;
          std::copy(ids.begin(), ids.end(), tokens_.begin() + std::size_t{p} * page_tokens_);
        }
        if (r.chain.size() == r.chain.capacity()) return;  // no allocation here
        r.chain.push_back(l);
        r.tail.erase(r.tail.begin(), r.tail.begin() + static_cast<std::ptrdiff_t>(page_tokens_));
      }
    }

    std::size_t match(region& r, std::span<const token_id> ids) {
      // At most ids.size() - 1 tokens, so the caller still computes the last
      // prompt token's output (the logits it samples from).
      const std::size_t limit = ids.empty() ? 0 : (ids.size() - 1) / page_tokens_;
      r.table.reserve(limit);
      r.ids.reserve(limit);
      r.chain.reserve(limit);
      std::vector<std::uint32_t> found;
      found.reserve(limit);
      link parent{};
      std::vector<link> chain;
      chain.reserve(limit);
      for (std::size_t i = 0; i < limit; ++i) {
        const auto page_ids = ids.subspan(i * page_tokens_, page_tokens_);
        const std::uint64_t h = Hash{}(parent.hash, page_ids);
        const std::uint32_t p = lookup(h, parent.serial, page_ids);
        if (p == none) break;
        found.push_back(p);
        parent = {h, meta_[p].serial};
        chain.push_back(parent);
      }
      // Commit: nothing below allocates.
      for (std::size_t i = 0; i < found.size(); ++i) {
        acquire(found[i]);
        r.ids.push_back(found[i]);
        r.table.push_back(address(found[i]));
        r.chain.push_back(chain[i]);
      }
      r.tail.clear();
      r.has_ids = true;
      return found.size() * page_tokens_;
    }

    // ---- windowed eviction ---------------------------------------------------------

    //! Pages that evict(r, sinks, to) would return to the pool (or the
    //! prefix cache): dropped pages no other sequence holds.
    std::size_t evicted_pages(const region& r, std::size_t sinks, std::size_t to) const noexcept {
      std::size_t n = 0;
      for_dropped(r, sinks, to, [&](std::uint32_t p) { n += meta_[p].refs == 1; });
      return n;
    }
    //! Releases the pages after the sink pages that hold only positions
    //! before `to` (a page the window cuts in the middle stays whole).
    void evict(region& r, std::size_t sinks, std::size_t to) noexcept {
      const std::size_t ns = (sinks + page_tokens_ - 1) / page_tokens_;
      std::size_t n = 0;
      for_dropped(r, sinks, to, [&](std::uint32_t p) {
        release(p);
        ++n;
      });
      if (n == 0) return;
      const auto b = static_cast<std::ptrdiff_t>(ns), e = static_cast<std::ptrdiff_t>(ns + n);
      r.ids.erase(r.ids.begin() + b, r.ids.begin() + e);
      r.table.erase(r.table.begin() + b, r.table.begin() + e);
      r.dropped += n;
      r.sink_pages = ns;
      r.has_ids = false;  // the prefix index holds whole prefixes only
      r.tail.clear();
      r.chain.clear();
    }
    static std::size_t page_count(const region& r) noexcept { return r.ids.size(); }
    void window_view(const region& r, std::size_t S, std::size_t sink_len, std::size_t w0,
                     seq_view& v) const noexcept {
      (void)S;
      v.sink_len = sink_len;
      v.ring_base = 0;
      v.ring_len = seq_view::no_wrap;
      v.ring_start = w0 - r.dropped * page_tokens_;
    }

    // ---- inspection -------------------------------------------------------------

    std::size_t page_tokens() const noexcept { return page_tokens_; }
    std::size_t page_bytes() const noexcept { return page_bytes_; }
    //! Pages of the pool: held by sequences, cached (unreferenced, in the
    //! prefix index, evicted least recently used first), or free. The three
    //! add up to pages_total().
    std::size_t pages_total() const noexcept { return total_; }
    std::size_t pages_in_use() const noexcept { return in_use_; }
    std::size_t pages_cached() const noexcept { return cached_; }
    std::size_t pages_free() const noexcept { return total_ - in_use_ - cached_; }
    //! Bytes of pool memory taken from the backend so far (whole slabs).
    std::size_t bytes_reserved() const noexcept { return allocated_ * page_bytes_; }
    //! How many sequences hold the page at `base` (a page table entry).
    //! 0 for an address that is not a page of this pool.
    std::size_t page_refs(const std::byte* base) const noexcept {
      const std::uint32_t p = number(base);
      return p == none ? 0 : meta_[p].refs;
    }

    //! Drops every cached, unreferenced page from the prefix index.
    void clear_prefix_cache() noexcept {
      while (lru_head_ != none) {
        const std::uint32_t p = lru_head_;
        lru_unlink(p);
        unindex(p);
        free_.push_back(p);
      }
    }

    //! Checks that every page is accounted for exactly once: a held page has
    //! its count, a free page is listed once, a cached page is indexed.
    //! `refs` is each page's count as the live page tables give it.
    void check_pool(const std::unordered_map<const std::byte*, std::size_t>& refs) const {
      std::vector<char> seen(total_, 0);
      for (std::uint32_t p : free_) {
        detail::require(p < allocated_ && !seen[p], "page ", p,
                        " is listed free twice or unallocated");
        seen[p] = 1;
        detail::require(meta_[p].refs == 0 && meta_[p].serial == 0, "free page ", p,
                        " is held or indexed");
      }
      std::size_t cached = 0;
      for (std::uint32_t p = lru_head_; p != none; p = meta_[p].next, ++cached) {
        detail::require(!seen[p], "cached page ", p, " is also free");
        seen[p] = 2;
        detail::require(meta_[p].refs == 0 && meta_[p].serial != 0, "cached page ", p,
                        " is held or not indexed");
      }
      detail::require(cached == cached_, "the cached list has ", cached, " pages, counted ",
                      cached_);
      std::size_t held = 0;
      for (std::uint32_t p = 0; p < allocated_; ++p) {
        auto it = refs.find(address(p));
        const std::size_t want = it == refs.end() ? 0 : it->second;
        detail::require(meta_[p].refs == want, "page ", p, " has count ", meta_[p].refs, "; ", want,
                        " page tables hold it");
        if (want) {
          detail::require(!seen[p], "held page ", p, " is also free or cached");
          ++held;
        } else {
          detail::require(seen[p], "page ", p, " is neither held, free nor cached (leaked)");
        }
      }
      detail::require(held == in_use_, "held pages ", held, ", counted ", in_use_);
      std::size_t indexed = 0;
      for (std::uint32_t p = 0; p < allocated_; ++p) indexed += meta_[p].serial != 0;
      detail::require(indexed == index_.size(), "the index has ", index_.size(), " entries for ",
                      indexed, " indexed pages");
    }

   private:
    struct page_meta {
      std::uint32_t refs = 0;
      std::uint32_t prev = none, next = none;          // cached-page list, when refs == 0
      std::uint64_t hash = 0, serial = 0, parent = 0;  // serial 0: not indexed
    };

    std::size_t slab_pages(std::size_t s) const noexcept {
      return std::min(slab_pages_, total_ - s * slab_pages_);
    }
    std::byte* address(std::uint32_t p) const noexcept {
      return slabs_[p / slab_pages_] + (p % slab_pages_) * page_bytes_;
    }
    std::uint32_t number(const std::byte* base) const noexcept {
      for (std::size_t s = 0; s < slabs_.size(); ++s)
        if (base >= slabs_[s] && base < slabs_[s] + slab_pages(s) * page_bytes_)
          return static_cast<std::uint32_t>(s * slab_pages_ + (base - slabs_[s]) / page_bytes_);
      return none;
    }

    void add_slab() {
      const std::size_t s = slabs_.size(), n = slab_pages(s);
      slabs_.push_back(static_cast<std::byte*>(B::allocate(n * page_bytes_)));
      // Pushed in reverse so pages are taken in address order.
      for (std::size_t i = n; i-- > 0;) free_.push_back(static_cast<std::uint32_t>(allocated_ + i));
      allocated_ += n;
    }

    template <class F>
    void for_dropped(const region& r, std::size_t sinks, std::size_t to, F&& f) const noexcept {
      const std::size_t ns = (sinks + page_tokens_ - 1) / page_tokens_;
      for (std::size_t k = ns + r.dropped; (k + 1) * page_tokens_ <= to; ++k) {
        const std::size_t i = k - r.dropped;
        if (i >= r.ids.size()) break;
        f(r.ids[i]);
      }
    }

    //! Calls f(table index) for each held page with written slots in
    //! [from, length), or that slot `length` falls in (the append's first).
    template <class F>
    void for_written(const region& r, std::size_t length, std::size_t from, F&& f) const noexcept {
      for (std::size_t k = from / page_tokens_; k * page_tokens_ < length; ++k) {
        if (r.dropped && k >= r.sink_pages && k < r.sink_pages + r.dropped) continue;
        const std::size_t i = k < r.sink_pages || !r.dropped ? k : k - r.dropped;
        if (i < r.ids.size()) f(i);
      }
    }

    bool writable(std::uint32_t p) const noexcept {
      return meta_[p].refs == 1 && meta_[p].serial == 0;
    }

    //! A page for one sequence: a free one, else the least recently used cached
    //! one. reserve() made sure there is one.
    std::uint32_t take() noexcept {
      std::uint32_t p;
      if (!free_.empty()) {
        p = free_.back();
        free_.pop_back();
      } else {
        p = lru_head_;
        lru_unlink(p);
        unindex(p);
      }
      meta_[p].refs = 1;
      ++in_use_;
      return p;
    }
    void acquire(std::uint32_t p) noexcept {
      if (meta_[p].refs++ == 0) {
        lru_unlink(p);
        ++in_use_;
      }
    }
    void release(std::uint32_t p) noexcept {
      if (--meta_[p].refs != 0) return;
      --in_use_;
      if (meta_[p].serial != 0)
        lru_push(p);
      else
        free_.push_back(p);  // capacity for every page was reserved
    }

    void copy_slots(std::uint32_t to, std::uint32_t from, std::size_t slots) noexcept {
      const std::size_t runs = layout_.layers * 2 * layout_.kv_heads;
      const std::size_t run = page_tokens_ * layout_.row_bytes;
      std::byte* dst = address(to);
      const std::byte* src = address(from);
      for (std::size_t i = 0; i < runs; ++i)
        std::memcpy(dst + i * run, src + i * run, slots * layout_.row_bytes);
    }

    std::uint32_t lookup(std::uint64_t h, std::uint64_t parent,
                         std::span<const token_id> ids) const noexcept {
      auto [b, e] = index_.equal_range(h);
      for (; b != e; ++b) {
        const std::uint32_t p = b->second;
        const token_id* t = tokens_.data() + std::size_t{p} * page_tokens_;
        if (meta_[p].parent == parent && std::equal(ids.begin(), ids.end(), t)) return p;
      }
      return none;
    }
    std::uint32_t find_serial(const link& l) const noexcept {
      auto [b, e] = index_.equal_range(l.hash);
      for (; b != e; ++b)
        if (meta_[b->second].serial == l.serial) return b->second;
      return none;
    }
    void unindex(std::uint32_t p) noexcept {
      page_meta& m = meta_[p];
      auto [b, e] = index_.equal_range(m.hash);
      for (; b != e; ++b)
        if (b->second == p) {
          index_.erase(b);
          break;
        }
      m.hash = m.serial = m.parent = 0;
    }

    void lru_push(std::uint32_t p) noexcept {
      meta_[p].prev = lru_tail_;
      meta_[p].next = none;
      (lru_tail_ == none ? lru_head_ : meta_[lru_tail_].next) = p;
      lru_tail_ = p;
      ++cached_;
    }
    void lru_unlink(std::uint32_t p) noexcept {
      page_meta& m = meta_[p];
      (m.prev == none ? lru_head_ : meta_[m.prev].next) = m.next;
      (m.next == none ? lru_tail_ : meta_[m.next].prev) = m.prev;
      m.prev = m.next = none;
      --cached_;
    }

    kv_layout layout_;
    std::size_t page_tokens_ = 0, page_bytes_ = 0;
    std::size_t total_ = 0, allocated_ = 0, slab_pages_ = 1;
    std::size_t in_use_ = 0, cached_ = 0;
    std::vector<std::byte*> slabs_;    // (slabs) slab_pages_ pages each, the last maybe fewer
    std::vector<page_meta> meta_;      // (pages)
    std::vector<token_id> tokens_;     // (pages, page_tokens) ids of indexed pages
    std::vector<std::uint32_t> free_;  // (free pages) a stack
    std::uint32_t lru_head_ = none, lru_tail_ = none;
    std::unordered_multimap<std::uint64_t, std::uint32_t> index_;  // hash -> page
    std::uint64_t serial_ = 0;
  };
};

static_assert(storage_policy<paged<16>>);
static_assert(storage_policy<paged<>>);
static_assert(sharing_storage<paged<>>);

}  // namespace v0
}  // namespace kvcache
