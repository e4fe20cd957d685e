// kvcache::cache: the composed cache type. Four policies and a backend are
// template arguments; everything that depends on the model's size is a runtime
// value checked once, at construction.
//
//   using Cache = cache<gqa<128>, contiguous, full, fp16, cpu>;
//   Cache kv({.layers = 32, .q_heads = 32, .kv_heads = 8, .max_tokens = 1 << 16});
//   seq_id s = kv.add_sequence(4096);
//   step st = kv.begin_step({{s, prompt_len}});   // host-side plan for every layer
//   for (layer...) { kv.write(l, st, k, v); kv.attend(l, st, q, out); }
//
// Every public member either succeeds or throws kvcache::error leaving the
// cache exactly as it was (strong guarantee).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cpu.hpp"
#include "concepts.hpp"
#include "detail/dispatch.hpp"
#include "error.hpp"
#include "kernels/cascade.hpp"
#include "kernels/cpu/cascade.hpp"
#include "kernels/cpu/decode.hpp"
#include "kernels/cpu/prefill.hpp"
#include "kernels/cpu/write.hpp"
#include "kernels/plan.hpp"
#include "kernels/view.hpp"
#include "precision/block.hpp"
#include "precision/per_channel.hpp"
#include "rope.hpp"
#include "tensor.hpp"

namespace kvcache {
inline namespace v0 {

//! Names a sequence of a cache; never reused within one cache.
enum class seq_id : std::uint64_t {};

//! Runtime sizes of a cache, checked at construction.
struct cache_config {
  std::size_t layers = 0;
  std::size_t q_heads = 0;
  std::size_t kv_heads = 0;     // 0: what the grouping implies (mha: q_heads, mqa: 1)
  std::size_t head_dim = 0;     // needed when the grouping's head_dim is dynamic
  std::size_t max_tokens = 0;   // token slots across all sequences
  std::size_t max_seq_len = 0;  // default capacity of add_sequence(); 0: max_tokens
  std::size_t threads = 0;      // CPU threads for the kernels; 0: all hardware threads
  float softmax_scale = 0.f;    // 0: 1 / sqrt(head_dim)
  std::size_t page_tokens = 0;  // paged<dynamic>: slots per page; a static page size: 0 or it
  //! Decode sequences of one step that share at least this many prefix tokens
  //! (whole pages) attend to them once, together (cascade attention); 0: never.
  std::size_t cascade_min_tokens = 256;
  //! attention_sinks / sliding_window with a `dynamic` sink count or window.
  std::size_t sinks = 0;
  std::size_t window = 0;
  //! sparse_pattern's global tokens, local window, random blocks and seed.
  sparse_config sparse{};
  //! Rotary embeddings the cache applies to q and k (rotary_dim 0: none; the
  //! caller then passes rotated q and k). Where keys are rotated to is the
  //! eviction policy's `positions` (docs/eviction.md).
  rope_config rope{};
};

//! One sequence's share of a step: it appends `tokens` new tokens. `ids`,
//! when given, holds their token ids (tokens of them): storage with a prefix
//! index publishes the pages they fill, so that match_prefix() of a later
//! request finds them. A sequence appended once without ids publishes nothing
//! past that point (until truncated back before it).
struct append {
  seq_id seq;
  std::size_t tokens;
  std::span<const token_id> ids = {};
};

//! What match_prefix() found: a new sequence holding the first `tokens`
//! tokens of the prompt, read from cached pages.
struct prefix_match {
  seq_id seq;
  std::size_t tokens;
};

//! Per-call options of attend().
struct attend_options {
  float scale = 0.f;            // 0: the cache's softmax scale
  tensor_view<float, 2> lse{};  // (tokens, q_heads) natural-log log-sum-exp, if given
};

//! The host-side plan of one step, made by begin_step() and read by every
//! layer's write() and attend(). The step's rows are its appends' tokens,
//! concatenated in the order given. A step is valid until the cache's next
//! begin_step or change to its sequences (add, remove, fork, truncate, ...).
class step {
 public:
  std::size_t tokens() const noexcept { return tokens_; }
  std::span<const append> appends() const noexcept { return appends_; }
  //! True when every sequence appends exactly one token.
  bool is_decode() const noexcept { return plan_.prefill.empty(); }
  //! Decode sequences of this step that attend to a prefix they share with
  //! others once, together (cascade attention); 0 when none do.
  std::size_t cascaded() const noexcept { return cascade_.members.size(); }

 private:
  template <grouping_policy, storage_policy, eviction_policy, precision_policy, backend_policy>
  friend class cache;
  std::vector<append> appends_;
  std::vector<seq_view> seqs_;
  detail::work_plan plan_;
  detail::cascade_plan cascade_;
  std::vector<float> angles_;        // (tokens, rotary_dim / 2, 2) RoPE at each row's position
  std::vector<float> sink_angles_;   // (tokens, rotary_dim / 2, 2) ... at its cache position
  std::vector<sparse_view> sparse_;  // (sequences) sparse reads, when the policy is sparse
  std::vector<std::uint8_t> sparse_mask_;   // the sparse views' masks
  std::vector<std::size_t> sparse_ranges_;  // the sparse views' decode ranges
  std::size_t tokens_ = 0;
  std::uint64_t epoch_ = 0;
  const void* owner_ = nullptr;
};

template <grouping_policy G, storage_policy S, eviction_policy E, precision_policy P,
          backend_policy B = cpu>
class cache {
  static_assert(!E::evicts || S::supports_eviction,
                "This eviction policy drops tokens, and this storage policy cannot reuse the "
                "slots of dropped tokens.");
  static_assert(!E::evicts || windowed_eviction<E> || !sharing_storage<S>,
                "An evicting policy that keeps scattered tokens (not windowed_eviction) needs "
                "storage without shared pages (contiguous): the cache compacts the kept tokens "
                "in place.");
  static_assert(G::head_dim == dynamic || (G::head_dim > 0 && G::head_dim % 16 == 0),
                "A static head_dim must be a positive multiple of 16: the kernels read rows "
                "in 16-lane vectors.");
  static_assert(G::head_dim == dynamic || detail::whole_blocks<P>(G::head_dim),
                "The static head_dim is not a multiple of the precision's group size: "
                "quantized rows are made of whole blocks along head_dim.");
  static_assert(!detail::channel_keys<P> || !(E::evicts && !windowed_eviction<E>),
                "Per-channel keys (per_channel_k) need every row of a key group in its slots; "
                "an eviction that compacts scattered tokens would split groups. Use full, "
                "sliding_window or attention_sinks.");
  static_assert(G::head_dim == dynamic || !detail::channel_keys<P> ||
                    G::head_dim % detail::token_group_of<P>() == 0,
                "The static head_dim is not a multiple of per_channel_k's token group: a "
                "group's head_dim (scale, min) pairs are spread evenly over its rows.");
  static_assert(host_backend<B>,
                "cache<> runs the CPU kernels, which need a host_backend: host memory and a "
                "context that is, or derives from, cpu::context (see backend/cpu.hpp).");
  static_assert(storage_state<typename S::template state<B>>,
                "The storage policy's state<B> lacks a member the cache calls (see "
                "storage_state in concepts.hpp).");

 public:
  using grouping = G;
  using storage = S;
  using eviction = E;
  using precision = P;
  using backend = B;
  using storage_state_type = typename S::template state<B>;

  explicit cache(const cache_config& cfg)
      : cfg_(cfg),
        evict_(make_eviction(cfg_)),
        layout_(make_layout(cfg_)),
        store_(layout_, storage_config{cfg_.max_tokens, cfg_.page_tokens}),
        ctx_(cfg_.threads) {
    detail::check_rope(cfg_.rope, layout_.head_dim);
    if constexpr (windowed) {
      detail::require(sinks() < cfg_.max_tokens, "sinks ", sinks(), " must be below max_tokens ",
                      cfg_.max_tokens);
      if constexpr (kchan) {
        detail::require(sinks() % P::token_group == 0, "sinks ", sinks(),
                        " is not a multiple of per_channel_k's key group of ", P::token_group,
                        " tokens; key groups must not straddle the sinks and the window");
        detail::require(evict_.window() % P::residual == 0, "window ", evict_.window(),
                        " is not a multiple of per_channel_k's residual of ", P::residual,
                        " tokens; the fp16 residual must stay inside the window");
      }
      if (cfg_.max_seq_len == 0)
        cfg_.max_seq_len = std::min(cfg_.max_tokens, sinks() + 2 * evict_.window());
    }
    if (cfg_.rope.rotary_dim) freqs_ = detail::rope_frequencies(cfg_.rope);
    if (cfg_.max_seq_len == 0) cfg_.max_seq_len = cfg_.max_tokens;
    if (cfg_.softmax_scale == 0.f)
      cfg_.softmax_scale = 1.0f / std::sqrt(static_cast<float>(layout_.head_dim));
  }
  cache(const cache&) = delete;
  cache& operator=(const cache&) = delete;
  ~cache() {
    for (auto& [id, s] : seqs_) store_.destroy(s.region);
  }

  // ---- sequences ----------------------------------------------------------

  //! Adds an empty sequence able to hold `capacity` tokens (0: max_seq_len).
  //! Contiguous storage reserves the capacity now; paged storage takes pages
  //! as tokens arrive.
  seq_id add_sequence(std::size_t capacity = 0) {
    if (capacity == 0) capacity = cfg_.max_seq_len;
    check_window_capacity(capacity);
    if (keys_rotated_on_read() && rope_table_.size() < capacity * cfg_.rope.rotary_dim) {
      // cos, sin of every cache position a sequence can reach, for the kernels.
      std::vector<float> t(capacity * cfg_.rope.rotary_dim);
      detail::rope_angles a;
      for (std::size_t p = 0; p < capacity; ++p) {
        a.at(freqs_, p);
        std::copy(a.cs.begin(), a.cs.end(), t.begin() + p * cfg_.rope.rotary_dim);
      }
      rope_table_.swap(t);
    }
    seqs_.reserve(seqs_.size() + 1);  // the only allocation that could throw after create
    auto res = new_residual();
    publish_pending();
    return insert({store_.create(capacity), 0, sinks(), {}, std::move(res)});
  }

  //! Frees a sequence's slots: pages no other sequence holds return to the
  //! pool (or to the prefix cache). An unknown or already removed id is an error.
  void remove_sequence(seq_id id) {
    auto it = find(id);
    publish_pending();
    store_.destroy(it->second.region);
    seqs_.erase(it);
    ++epoch_;
  }

  //! Rolls a sequence back to its first `n` tokens (speculative decoding:
  //! drop rejected draft tokens). Paged storage frees the pages past n.
  //! Under a windowed eviction, n must leave every token the next step needs:
  //! n <= sinks, or no token of the last W before n evicted (rolling back the
  //! last step's tokens always works); else an error and nothing changes.
  void truncate(seq_id id, std::size_t n) {
    sequence& s = find(id)->second;
    detail::require(n <= s.length, "cannot truncate sequence ", static_cast<std::uint64_t>(id),
                    " to ", n, " tokens: it holds ", s.length);
    if constexpr (windowed) {
      const std::size_t ns = sinks(), W = evict_.window();
      const std::size_t need = std::max(ns, n + 1 > W ? n + 1 - W : 0);
      detail::require(n <= ns || s.w0 <= need, "cannot truncate sequence ",
                      static_cast<std::uint64_t>(id), " to ", n, " tokens: ", E::name,
                      " eviction dropped positions ", ns, "..", s.w0 - 1, " and ", n,
                      " tokens need every position from ", need);
    }
    std::size_t keep_n = 0;  // scattered: kept tokens below n
    if constexpr (scattered) {
      keep_n =
          static_cast<std::size_t>(std::lower_bound(s.pos.begin(), s.pos.end(), n) - s.pos.begin());
      for (std::size_t p = 0, i = 0; p < n; ++p) {
        const bool here = i < keep_n && s.pos[i] == p;
        i += here;
        detail::require(here || !evict_.keep(p, n + 1), "cannot truncate sequence ",
                        static_cast<std::uint64_t>(id), " to ", n, " tokens: ", E::name,
                        " eviction dropped position ", p, ", which ", n, " tokens keep");
      }
    }
    if constexpr (kchan) {
      constexpr std::size_t R = P::residual;
      detail::require(n >= s.length / R * R || n % R == 0, "cannot truncate sequence ",
                      static_cast<std::uint64_t>(id), " to ", n, " tokens: ", P::name,
                      " quantized the keys of positions below ", s.length / R * R, " in groups of ",
                      R, " and never re-quantizes; keep at least that many, or a multiple of ", R);
    }
    publish_pending();
    store_.truncate(s.region, s.length, n);
    if constexpr (scattered) s.pos.resize(keep_n);
    s.length = n;
    if constexpr (windowed)
      if (n <= sinks()) s.w0 = sinks();
    ++epoch_;
  }

  //! A new sequence sharing every page of `id` (beams, parallel samples): no
  //! K/V bytes are copied; the first append into a shared, partly filled page
  //! copies that page.
  seq_id fork(seq_id id) requires sharing_storage<S> {
    seqs_.reserve(seqs_.size() + 1);
    const sequence& s = find(id)->second;
    auto res = s.residual;  // the child's own copy of the fp16 residual
    publish_pending();
    return insert({store_.share(s.region), s.length, s.w0, {}, std::move(res)});
  }

  //! Beam search reordering: beams[i] becomes what beams[from[i]] was before
  //! the call (each survivor's pages shared, never copied; a beam not
  //! selected releases its pages). from[i] indexes `beams`.
  void reorder(std::span<const seq_id> beams,
               std::span<const std::size_t> from) requires sharing_storage<S> {
    detail::require(beams.size() == from.size(), "reorder got ", beams.size(), " beams and ",
                    from.size(), " sources; it needs one source per beam");
    std::vector<sequence*> seq;
    seq.reserve(beams.size());
    for (std::size_t i = 0; i < beams.size(); ++i) {
      seq.push_back(&find(beams[i])->second);
      for (std::size_t j = 0; j < i; ++j)
        detail::require(seq[j] != seq[i], "sequence ", static_cast<std::uint64_t>(beams[i]),
                        " appears twice among the beams");
      detail::require(from[i] < beams.size(), "beam ", i, " copies beam ", from[i], "; there are ",
                      beams.size());
    }
    std::vector<std::vector<std::uint16_t>> fresh_res(beams.size());
    if constexpr (kchan)
      for (std::size_t i = 0; i < beams.size(); ++i)
        if (from[i] != i) fresh_res[i] = seq[from[i]]->residual;
    publish_pending();
    std::vector<region_t> fresh(beams.size());
    try {
      for (std::size_t i = 0; i < beams.size(); ++i)
        if (from[i] != i) fresh[i] = store_.share(seq[from[i]]->region);
    } catch (...) {
      for (auto& r : fresh) store_.destroy(r);
      throw;
    }
    std::vector<std::size_t> lengths(beams.size()), w0(beams.size());
    for (std::size_t i = 0; i < beams.size(); ++i) {
      lengths[i] = seq[from[i]]->length;
      w0[i] = seq[from[i]]->w0;
    }
    // Commit: nothing below throws.
    for (std::size_t i = 0; i < beams.size(); ++i) {
      if (from[i] == i) continue;
      store_.destroy(seq[i]->region);
      seq[i]->region = std::move(fresh[i]);
      seq[i]->length = lengths[i];
      seq[i]->w0 = w0[i];
      seq[i]->residual.swap(fresh_res[i]);
    }
    ++epoch_;
  }

  //! Prefix reuse across requests: a new sequence holding the longest run of
  //! cached full pages that starts `ids` (at most ids.size() - 1 tokens, so the
  //! last prompt token is still computed). Append ids[tokens..] next, with
  //! their ids. Pages are cached as sequences that were given token ids fill
  //! them, once the step that filled them is over (the cache's next change).
  //! Not under an evicting policy: its pages hold a window, not a prefix.
  prefix_match match_prefix(std::span<const token_id> ids,
                            std::size_t capacity = 0) requires sharing_storage<S> {
    detail::require(!E::evicts, "match_prefix: prefix reuse needs whole prefixes, and ", E::name,
                    " eviction keeps only a window of each sequence");
    if (capacity == 0) capacity = cfg_.max_seq_len;
    seqs_.reserve(seqs_.size() + 1);
    auto res = new_residual();
    publish_pending();
    region_t r = store_.create(capacity);
    std::size_t n = 0;
    try {
      n = store_.match(r, ids);
    } catch (...) {
      store_.destroy(r);
      throw;
    }
    if (n > capacity) {
      store_.truncate(r, n, capacity);
      n = capacity;
    }
    if constexpr (kchan) {
      // Whole residual lengths only: the match then starts with an empty
      // residual, every matched key quantized in complete groups.
      if (const std::size_t whole = n / P::residual * P::residual; whole < n) {
        store_.truncate(r, n, whole);
        n = whole;
      }
    }
    return {insert({std::move(r), n, sinks(), {}, std::move(res)}), n};
  }

  bool contains(seq_id id) const noexcept { return seqs_.count(id) != 0; }
  std::size_t sequences() const noexcept { return seqs_.size(); }
  //! Tokens appended so far (the next token's position).
  std::size_t length(seq_id id) const { return find(id)->second.length; }
  //! Tokens kept (what the next step attends besides its own); length() without eviction.
  std::size_t kept(seq_id id) const { return kept_of(find(id)->second); }
  std::size_t capacity(seq_id id) const { return store_.capacity(find(id)->second.region); }

  //! The page base addresses a sequence reads, in logical order (one page for
  //! contiguous storage). Sequences sharing a page list the same address.
  std::span<std::byte* const> page_table(seq_id id) const {
    const sequence& s = find(id)->second;
    if constexpr (E::evicts) {
      return {store_.pages(s.region), s.length ? store_.page_count(s.region) : 0};
    } else {
      const std::size_t pt = store_.page_tokens(s.region);
      return {store_.pages(s.region), (s.length + pt - 1) / pt};
    }
  }

  // ---- steps ----------------------------------------------------------------

  step begin_step(std::initializer_list<append> appends) {
    return begin_step(std::span<const append>(appends.begin(), appends.size()));
  }

  //! Plans one step: every listed sequence appends `tokens` >= 1 tokens (a
  //! prompt, a chunk of one, or one decoded token). Checks everything and
  //! takes the pages it needs (copying shared pages it will write into)
  //! before changing anything; on success the sequences' lengths include the
  //! new tokens, whose K/V each layer's write() then stores.
  step begin_step(std::span<const append> appends) {
    detail::require(!appends.empty(), "begin_step needs at least one sequence");
    step st;
    st.appends_.assign(appends.begin(), appends.end());
    st.seqs_.reserve(appends.size());
    std::vector<sequence*> seen;
    seen.reserve(appends.size());
    for (const append& a : appends) {
      sequence& s = find(a.seq)->second;
      const auto id = static_cast<std::uint64_t>(a.seq);
      for (const sequence* p : seen)
        detail::require(p != &s, "sequence ", id, " appears twice in one step");
      seen.push_back(&s);
      detail::require(a.tokens > 0, "sequence ", id,
                      " appends 0 tokens; a step appends at least 1");
      const std::size_t cap = store_.capacity(s.region);
      // scattered: every kept token, for now. Per-channel keys under a window
      // also keep the slots of the oldest kept token's group-mates.
      const std::size_t held = kept_of(s, evict_to(s)) + group_mates(s);
      detail::require(a.tokens <= cap - held, "sequence ", id, " holds ", held, " tokens; ",
                      a.tokens, " more exceed its capacity of ", cap, " under ", E::name,
                      " eviction");
      detail::require(a.ids.empty() || a.ids.size() == a.tokens, "sequence ", id, " appends ",
                      a.tokens, " tokens with ", a.ids.size(),
                      " token ids; give one id per token or none");
    }
    // Scattered eviction: the positions each sequence keeps once this step's
    // first query is at its length (allocated before anything changes).
    std::vector<std::vector<std::size_t>> survivors;
    if constexpr (scattered) {
      survivors.resize(appends.size());
      for (std::size_t i = 0; i < appends.size(); ++i) {
        const sequence& s = *seen[i];
        survivors[i].reserve(s.pos.size() + appends[i].tokens);
        for (std::size_t p : s.pos)
          if (evict_.keep(p, s.length + 1)) survivors[i].push_back(p);
        const std::size_t cap = store_.capacity(s.region);
        detail::require(appends[i].tokens <= cap - survivors[i].size(), "sequence ",
                        static_cast<std::uint64_t>(appends[i].seq), " holds ", survivors[i].size(),
                        " tokens; ", appends[i].tokens, " more exceed its capacity of ", cap,
                        " under ", E::name, " eviction");
        for (std::size_t t = 0; t < appends[i].tokens; ++t) survivors[i].push_back(s.length + t);
      }
    }
    publish_pending();
    std::size_t pages = 0;
    std::size_t freed = 0;
    for (std::size_t i = 0; i < appends.size(); ++i) {
      if constexpr (kchan)
        pages +=
            store_.prepare(seen[i]->region, seen[i]->length, appends[i].tokens, flushed(*seen[i]));
      else
        pages += store_.prepare(seen[i]->region, seen[i]->length, appends[i].tokens);
      if constexpr (windowed)
        freed += store_.evicted_pages(seen[i]->region, sinks(), drop_to(*seen[i]));
    }
    // Pages the step's evictions return are free again before it takes any.
    store_.reserve(pages - std::min(pages, freed));
    bool sink_q = false;
    for (std::size_t i = 0; i < appends.size(); ++i) {
      const sequence& s = *seen[i];
      const std::size_t w0 = evict_to(s);
      std::size_t held = kept_of(s, w0);
      if constexpr (scattered) held = survivors[i].size() - appends[i].tokens;
      seq_view v;
      v.pages = store_.pages(s.region);  // final after prepare: grow keeps the table's storage
      v.page_tokens = store_.page_tokens(s.region);
      v.first_pos = held;
      v.kv_len = held + appends[i].tokens;
      v.q_begin = st.tokens_;
      v.q_len = appends[i].tokens;
      if constexpr (windowed) {
        v.sink_len = std::min(sinks(), s.length + appends[i].tokens);
        v.window = evict_.window();
        sink_q = sink_q || (w0 > sinks() && v.sink_len > 0);
      }
      if constexpr (kchan) {
        v.residual = seen[i]->residual.data();
        v.residual_tokens = P::residual;
        v.res_prev = s.length % P::residual;
        v.res_len = (s.length + appends[i].tokens) % P::residual;
        v.pos_offset = s.length - held;
      }
      if (keys_rotated_on_read()) {
        v.rope_cs = rope_table_.data();
        v.rotary_dim = cfg_.rope.rotary_dim;
        v.rope_interleaved = cfg_.rope.interleaved;
      }
      st.seqs_.push_back(v);
      st.tokens_ += appends[i].tokens;
    }
    if constexpr (sparse_selection<E>) plan_sparse(st);
    if constexpr (sharing_storage<S> && !E::evicts && !sparse_selection<E> && !kchan)
      st.cascade_ = detail::make_cascade_plan(layout_, st.seqs_, cfg_.cascade_min_tokens);
    if (cfg_.rope.rotary_dim) plan_rope(st, seen, sink_q);
    st.plan_ = detail::make_plan(layout_, st.seqs_, st.cascade_.decode_begin);
    reserve_workspace(st);
    pending_.reserve(appends.size());
    // Commit: nothing below throws.
    pending_.clear();
    for (std::size_t i = 0; i < appends.size(); ++i) {
      sequence& s = *seen[i];
      if constexpr (windowed) {
        const std::size_t drop = drop_to(s);
        s.w0 = evict_to(s);
        store_.evict(s.region, sinks(), drop);
        if constexpr (kchan)  // evicting pages are never published
          store_.grow(s.region, s.length, appends[i].tokens, {}, flushed(s));
        else
          store_.grow(s.region, s.length, appends[i].tokens, {});
        store_.window_view(s.region, sinks(), st.seqs_[i].sink_len, s.w0, st.seqs_[i]);
      } else if constexpr (scattered) {
        compact(s, survivors[i]);
      } else if constexpr (kchan) {
        store_.grow(s.region, s.length, appends[i].tokens, appends[i].ids, flushed(s));
      } else {
        store_.grow(s.region, s.length, appends[i].tokens, appends[i].ids);
      }
      st.seqs_[i].pages = store_.pages(s.region);
      s.length += appends[i].tokens;
      pending_.push_back(appends[i].seq);
    }
    st.epoch_ = ++epoch_;
    st.owner_ = this;
    return st;
  }

  //! Stores this step's K and V for one layer. k, v: (step tokens, kv_heads, head_dim).
  void write(std::size_t layer, const step& st, tensor_view<const float, 3> k,
             tensor_view<const float, 3> v) {
    check_step(layer, st);
    detail::check_view(k, "k", {st.tokens_, layout_.kv_heads, layout_.head_dim});
    detail::check_view(v, "v", {st.tokens_, layout_.kv_heads, layout_.head_dim});
    if constexpr (detail::rejects_non_finite<P>()) {
      detail::check_finite(layout_, layer, st.seqs_, st.appends_, k, v);
    }
    if (cfg_.rope.rotary_dim && !keys_rotated_on_read()) {
      // Keys are stored rotated at their absolute positions in both position
      // modes; rope_positions::cache then rotates the sinks' queries instead
      // (see plan_rope).
      rotated(k, st.angles_, krot_, layout_.kv_heads);
      k = make_view<const float>(krot_.data(), st.tokens_, layout_.kv_heads, layout_.head_dim);
    }
    if constexpr (kchan) {
      const std::size_t need = ctx_.pool.size() * detail::write_kchan_floats<P>(layout_);
      if (kchan_buf_.size() < need) kchan_buf_.resize(need);
      detail::write_kchan<P>(ctx_.pool, layout_, layer, st.seqs_, k, v, kchan_buf_.data());
    } else {
      detail::write_rows<P>(ctx_.pool, layout_, layer, st.seqs_, k, v);
    }
  }

  //! Causal attention of this step's queries over each sequence's cache (its
  //! earlier tokens and this step's, which write() must have stored).
  //! q, out: (step tokens, q_heads, head_dim). A sequence appending one token
  //! takes the decode kernel, others the prefill kernel; decode sequences
  //! sharing a prefix attend to it once, together (cascade).
  void attend(std::size_t layer, const step& st, tensor_view<const float, 3> q,
              tensor_view<float, 3> out, const attend_options& opt = {}) {
    check_step(layer, st);
    detail::check_view(q, "q", {st.tokens_, layout_.q_heads, layout_.head_dim});
    detail::check_view(out, "out", {st.tokens_, layout_.q_heads, layout_.head_dim});
    if (!opt.lse.empty()) detail::check_view(opt.lse, "lse", {st.tokens_, layout_.q_heads});
    detail::require(std::isfinite(opt.scale) && opt.scale >= 0.f, "softmax scale ", opt.scale,
                    " must be finite and positive");
    const float scale = opt.scale > 0.f ? opt.scale : cfg_.softmax_scale;
    const bool cascade = !st.cascade_.empty();
    tensor_view<const float, 3> q_sink{};
    if (cfg_.rope.rotary_dim) {
      const std::size_t qh = layout_.q_heads, dim = layout_.head_dim;
      if (!st.sink_angles_.empty()) {
        rotated(q, st.sink_angles_, qsink_, qh);
        q_sink = make_view<const float>(qsink_.data(), st.tokens_, qh, dim);
      }
      rotated(q, st.angles_, qrot_, qh);
      q = make_view<const float>(qrot_.data(), st.tokens_, qh, dim);
    }
    // A cascade merges by the suffix's lse, so decode writes it here first.
    const tensor_view<float, 2> lse =
        cascade ? make_view(lse_.data(), st.tokens_, layout_.q_heads) : opt.lse;
    detail::dispatch_head_dim<G::head_dim>(layout_.head_dim, [&](auto d) {
      constexpr std::size_t D = decltype(d)::value;
      run_decode<D>(layer, st, q, q_sink, out, lse, scale);
      detail::prefill_args pa{&layout_, layer, st.seqs_.data(), &st.plan_,      q, scale,
                              out,      lse,   scratch_.data(), scratch_floats_};
      pa.q_sink = q_sink;
      detail::prefill<P, D>(ctx_.pool, pa);
      if (cascade) {
        float* qc = cascade_.data();
        float* oc = qc + st.cascade_.rows * layout_.q_heads * layout_.head_dim;
        float* lc = oc + st.cascade_.rows * layout_.q_heads * layout_.head_dim;
        detail::cascade_args ca{
            &layout_, layer, st.seqs_.data(), &st.cascade_,   q, scale, out, lse, qc,
            oc,       lc,    scratch_.data(), scratch_floats_};
        detail::cascade<P, D>(ctx_.pool, ca);
      }
    });
    if (cascade && !opt.lse.empty())
      for (std::size_t t = 0; t < st.tokens_; ++t)
        for (std::size_t h = 0; h < layout_.q_heads; ++h) opt.lse(t, h) = lse(t, h);
  }

  // ---- inspection -----------------------------------------------------------

  //! Bytes of K/V storage held by live sequences, each shared page once (each
  //! sequence's reserved capacity for contiguous storage); equals the
  //! formulas of memory.hpp.
  //! Per-channel keys add each sequence's fp16 residual (allocated with the
  //! sequence: layers x kv_heads x R x head_dim x 2 bytes).
  std::size_t memory_in_use() const noexcept {
    return store_.bytes_in_use() + seqs_.size() * detail::residual_bytes<P>(layout_.layers,
                                                                            layout_.kv_heads,
                                                                            layout_.head_dim);
  }
  const kv_layout& layout() const noexcept { return layout_; }
  const cache_config& config() const noexcept { return cfg_; }
  std::size_t threads() const noexcept { return ctx_.pool.size(); }
  //! The storage's bookkeeping, for its own statistics (paged: pages in use,
  //! cached and free; clear_prefix_cache()).
  const storage_state_type& store() const noexcept { return store_; }
  storage_state_type& store() noexcept { return store_; }

  //! Decodes one stored row back to float: K (kind 0) or V (kind 1) of
  //! `kv_head` for token `token` of sequence `id` at `layer`. dst: head_dim floats.
  void read_row(std::size_t layer, seq_id id, std::size_t token, std::size_t kind,
                std::size_t kv_head, float* dst) const {
    const sequence& s = find(id)->second;
    detail::require(layer < layout_.layers, "layer ", layer, " is out of range; the cache has ",
                    layout_.layers);
    const std::size_t held = kept_of(s);
    detail::require(token < held, "token ", token, " is out of range; sequence ",
                    static_cast<std::uint64_t>(id), " keeps ", held);
    detail::require(kind < 2 && kv_head < layout_.kv_heads, "kind ", kind, " / kv_head ", kv_head,
                    " is out of range (kinds 2, kv_heads ", layout_.kv_heads, ")");
    seq_view v;
    v.pages = store_.pages(s.region);
    v.page_tokens = store_.page_tokens(s.region);
    if constexpr (windowed)
      store_.window_view(s.region, sinks(), std::min(sinks(), s.length), s.w0, v);
    if constexpr (kchan) {
      if (kind == 0) {  // from its group's rows, or the residual
        v.kv_len = held;
        v.residual = const_cast<std::uint16_t*>(s.residual.data());
        v.residual_tokens = P::residual;
        v.res_len = s.length % P::residual;
        v.pos_offset = s.length - held;
        detail::kchan_key<P>(v, layout_, layer, kv_head, token, dst);
        return;
      }
    }
    const std::size_t run = layout_.run_offset(v.page_tokens, layer, kind, kv_head);
    P::decode(v.row(run, token, layout_.row_bytes), dst, layout_.head_dim);
  }

 private:
  using region_t = typename storage_state_type::region;
  static constexpr bool windowed = windowed_eviction<E>;
  static constexpr bool scattered = E::evicts && !windowed;
  static constexpr bool kchan = detail::channel_keys<P>;
  struct sequence {
    region_t region;
    std::size_t length = 0;          // tokens appended (absolute positions 0..length - 1)
    std::size_t w0 = 0;              // windowed: first kept position past the sinks (>= sinks)
    std::vector<std::size_t> pos{};  // scattered: kept tokens' positions, in cache order
    //! Per-channel keys: (layers, kv_heads, R, head_dim) fp16 bits, the keys
    //! of positions [length - length % R, length) in slots 0.. (view.hpp).
    std::vector<std::uint16_t> residual{};
  };

  std::vector<std::uint16_t> new_residual() const {
    if constexpr (kchan)
      return std::vector<std::uint16_t>(
          detail::residual_bytes<P>(layout_.layers, layout_.kv_heads, layout_.head_dim) / 2);
    else
      return {};
  }
  //! Per-channel keys: the first position whose key is not quantized yet
  //! (the append quantizes and writes rows from there); else the length.
  std::size_t flushed(const sequence& s) const noexcept {
    if constexpr (kchan)
      return s.length / P::residual * P::residual;
    else
      return s.length;
  }
  //! Where storage may drop a window's pages up to: per-channel keys keep
  //! the whole group of the oldest kept token (its rows hold the group's
  //! scales).
  std::size_t drop_to(const sequence& s) const noexcept {
    const std::size_t to = evict_to(s);
    if constexpr (kchan)
      return to / P::token_group * P::token_group;
    else
      return to;
  }
  //! Slots a windowed sequence keeps besides its kept tokens: the evicted
  //! group-mates of its oldest kept token (per-channel keys).
  std::size_t group_mates(const sequence& s) const noexcept {
    if constexpr (kchan && windowed) {
      const std::size_t to = evict_to(s);
      return s.length > to ? to % P::token_group : 0;
    } else {
      return 0;
    }
  }

  //! Scattered eviction with cache positions: keys are stored unrotated and
  //! the kernels rotate each key at its cache index as they read it (their
  //! cache indices change whenever an older token leaves).
  bool keys_rotated_on_read() const noexcept {
    return scattered && cfg_.rope.rotary_dim && detail::positions_of<E>() == rope_positions::cache;
  }

  //! Moves the kept rows down over the evicted ones (slot = cache index),
  //! oldest first so that no row is overwritten before it moves.
  void compact(sequence& s, std::vector<std::size_t>& next) noexcept {
    std::size_t j = 0, first_gap = s.pos.size();
    for (std::size_t i = 0; i < s.pos.size(); ++i) {
      if (j < next.size() && next[j] == s.pos[i]) {
        ++j;
      } else {
        first_gap = i;
        break;
      }
    }
    if (first_gap < s.pos.size()) {
      seq_view v;  // identity map: slot = cache index
      v.pages = store_.pages(s.region);
      v.page_tokens = store_.page_tokens(s.region);
      const std::size_t rb = layout_.row_bytes;
      for (std::size_t l = 0; l < layout_.layers; ++l)
        for (std::size_t kind = 0; kind < 2; ++kind)
          for (std::size_t h = 0; h < layout_.kv_heads; ++h) {
            const std::size_t run = layout_.run_offset(v.page_tokens, l, kind, h);
            std::size_t to = first_gap, k = first_gap;
            for (std::size_t i = first_gap; i < s.pos.size(); ++i) {
              while (k < next.size() && next[k] < s.pos[i]) ++k;
              if (k < next.size() && next[k] == s.pos[i]) {
                if (to != i) std::memmove(v.row(run, to, rb), v.row(run, i, rb), rb);
                ++to;
              }
            }
          }
    }
    s.pos.swap(next);
  }

  static E make_eviction(const cache_config& c) {
    if constexpr (std::is_constructible_v<E, const eviction_config&>)
      return E(eviction_config{c.sinks, c.window, c.sparse});
    else
      return E{};
  }
  std::size_t sinks() const noexcept {
    if constexpr (windowed)
      return evict_.sinks();
    else
      return 0;
  }
  //! Where the window starts once the step about to append to s has evicted:
  //! what the step's first query, at position s.length, no longer sees.
  std::size_t evict_to(const sequence& s) const noexcept {
    if constexpr (windowed) {
      const std::size_t W = evict_.window();
      return std::max(s.w0, s.length + 1 > W ? s.length + 1 - W : 0);
    } else {
      return 0;
    }
  }
  std::size_t kept_of(const sequence& s, std::size_t w0) const noexcept {
    if constexpr (scattered)
      return s.pos.size();
    else if constexpr (windowed)
      return std::min(s.length, sinks()) + (s.length > w0 ? s.length - w0 : 0);
    else
      return s.length;
  }
  std::size_t kept_of(const sequence& s) const noexcept { return kept_of(s, s.w0); }

  void check_window_capacity(std::size_t capacity) const {
    if constexpr (windowed) {
      detail::require(sinks() < capacity, "sinks ", sinks(),
                      " must be below the sequence capacity ", capacity);
      detail::require(capacity >= sinks() + evict_.window(), "sequence capacity ", capacity,
                      " is below sinks ", sinks(), " + window ", evict_.window());
    }
  }

  //! Angles of each step row's RoPE position: its absolute position; and,
  //! when the policy's positions are cache positions and a sequence has
  //! dropped tokens, its cache index too. Keys are stored rotated at absolute
  //! positions, so a window key's score depends on (query - key) distance,
  //! which cache positions leave unchanged inside one contiguous window; a
  //! sink at position s < S is at cache position s too, so its query must be
  //! rotated at the query's cache position instead. Scores then equal those
  //! of keys and queries rotated at their cache positions.
  void plan_rope(step& st, const std::vector<sequence*>& seen, bool sink_q) {
    const std::size_t half = cfg_.rope.rotary_dim / 2;
    st.angles_.resize(st.tokens_ * 2 * half);
    const bool by_cache = sink_q && detail::positions_of<E>() == rope_positions::cache;
    if (by_cache) st.sink_angles_.resize(st.tokens_ * 2 * half);
    detail::rope_angles a;
    for (std::size_t i = 0; i < st.seqs_.size(); ++i)
      for (std::size_t t = 0; t < st.seqs_[i].q_len; ++t) {
        const std::size_t row = st.seqs_[i].q_begin + t;
        a.at(freqs_, keys_rotated_on_read() ? st.seqs_[i].first_pos + t : seen[i]->length + t);
        std::copy(a.cs.begin(), a.cs.end(), st.angles_.begin() + row * 2 * half);
        if (by_cache) {
          a.at(freqs_, st.seqs_[i].first_pos + t);
          std::copy(a.cs.begin(), a.cs.end(), st.sink_angles_.begin() + row * 2 * half);
        }
      }
  }

  //! Block-sparse reads of each sequence of the step: the random-block mask
  //! of every query block the step's rows fall in, and for a decode row the
  //! token ranges it reads (globals, random blocks, local window; merged).
  void plan_sparse(step& st) const {
    const std::size_t ng = evict_.globals(), wl = evict_.local_window(), bs = evict_.block();
    const std::size_t n = st.seqs_.size();
    st.sparse_.resize(n);
    std::vector<std::size_t> mask_off(n), range_off(n);
    std::vector<std::pair<std::size_t, std::size_t>> iv;
    for (std::size_t i = 0; i < n; ++i) {
      const seq_view& v = st.seqs_[i];
      const std::size_t last = v.kv_len - 1, qb0 = v.first_pos / bs, qb1 = last / bs;
      sparse_view& sp = st.sparse_[i];
      sp.globals = ng;
      sp.window = wl;
      sp.block = bs;
      sp.first_qblock = qb0;
      sp.kblocks = qb1 + 1;
      mask_off[i] = st.sparse_mask_.size();
      st.sparse_mask_.resize(mask_off[i] + (qb1 - qb0 + 1) * sp.kblocks, 0);
      for (std::size_t qb = qb0; qb <= qb1; ++qb)
        for (std::size_t kb : evict_.random_blocks(qb))
          st.sparse_mask_[mask_off[i] + (qb - qb0) * sp.kblocks + kb] = 1;
      range_off[i] = st.sparse_ranges_.size();
      if (v.q_len != 1) continue;
      iv.clear();
      if (last < ng) {
        iv.push_back({0, last + 1});
      } else {
        if (ng) iv.push_back({0, ng});
        for (std::size_t kb : evict_.random_blocks(qb1)) iv.push_back({kb * bs, kb * bs + bs});
        iv.push_back({last + 1 > wl ? last + 1 - wl : 0, last + 1});
      }
      std::sort(iv.begin(), iv.end());
      for (std::size_t j = 0; j < iv.size(); ++j) {
        const std::size_t m = st.sparse_ranges_.size();
        if (m > range_off[i] && iv[j].first <= st.sparse_ranges_[m - 1])
          st.sparse_ranges_[m - 1] = std::max(st.sparse_ranges_[m - 1], iv[j].second);
        else
          st.sparse_ranges_.insert(st.sparse_ranges_.end(), {iv[j].first, iv[j].second});
      }
      sp.nranges = (st.sparse_ranges_.size() - range_off[i]) / 2;
    }
    for (std::size_t i = 0; i < n; ++i) {
      st.sparse_[i].mask = st.sparse_mask_.data() + mask_off[i];
      st.sparse_[i].ranges = st.sparse_ranges_.data() + range_off[i];
      st.seqs_[i].sparse = &st.sparse_[i];
    }
  }

  //! x rotated row by row at the step's angles, into buf: (tokens, heads, dim).
  void rotated(const tensor_view<const float, 3>& x, const std::vector<float>& angles,
               std::vector<float>& buf, std::size_t heads) {
    const std::size_t n = x.extent(0), dim = layout_.head_dim, rd = cfg_.rope.rotary_dim;
    buf.resize(n * heads * dim);
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t h = 0; h < heads; ++h) {
        float* dst = buf.data() + (t * heads + h) * dim;
        for (std::size_t d = 0; d < dim; ++d) dst[d] = x(t, h, d);
        detail::rotate(dst, angles.data() + t * rd, rd, cfg_.rope.interleaved);
      }
  }

  static kv_layout make_layout(const cache_config& c) {
    detail::require(c.layers > 0, "layers is 0; it must be at least 1");
    detail::require(c.max_tokens > 0, "max_tokens is 0; it must be at least 1");
    kv_layout L;
    L.layers = c.layers;
    L.q_heads = c.q_heads;
    L.kv_heads = G::kv_heads(c.q_heads, c.kv_heads);
    // A user's grouping is checked here too: the kernels divide by kv_heads.
    detail::require(L.kv_heads > 0 && c.q_heads % L.kv_heads == 0, G::name, " gives ", L.kv_heads,
                    " KV heads for ", c.q_heads,
                    " query heads; it must give at least 1 and divide them");
    detail::require(std::isfinite(c.softmax_scale) && c.softmax_scale >= 0.f, "softmax_scale ",
                    c.softmax_scale, " must be finite and not negative (0: 1 / sqrt(head_dim))");
    if constexpr (G::head_dim == dynamic) {
      detail::require(c.head_dim > 0, "head_dim is 0; ", G::name,
                      "<dynamic> needs cache_config::head_dim");
      L.head_dim = c.head_dim;
    } else {
      detail::require(c.head_dim == 0 || c.head_dim == G::head_dim, "head_dim ", c.head_dim,
                      " differs from the grouping's static head_dim ", G::head_dim);
      L.head_dim = G::head_dim;
    }
    detail::require(L.head_dim % 16 == 0, "head_dim ", L.head_dim,
                    " is not a multiple of 16; the kernels read rows in 16-lane vectors");
    P::check_dim(L.head_dim);
    L.row_bytes = P::row_bytes(L.head_dim);
    return L;
  }

  // One lookup for the const and non-const members.
  template <class Self>
  static auto find_in(Self& self, seq_id id) {
    auto it = self.seqs_.find(id);
    detail::require(it != self.seqs_.end(), "sequence ", static_cast<std::uint64_t>(id),
                    " is unknown or was removed");
    return it;
  }
  auto find(seq_id id) { return find_in(*this, id); }
  auto find(seq_id id) const { return find_in(*this, id); }

  //! Registers a region as a new sequence; seqs_ has room for it.
  seq_id insert(sequence&& s) {
    const seq_id id{next_id_};
    try {
      seqs_.emplace(id, std::move(s));  // a node allocation that fails leaves s whole
    } catch (...) {
      store_.destroy(s.region);
      throw;
    }
    ++next_id_;
    ++epoch_;
    return id;
  }

  //! Enters the pages the last step filled into the prefix index. Deferred
  //! to the cache's next change so that only pages whose K/V every layer's
  //! write() has stored are ever matched. Changes nothing else observable.
  void publish_pending() noexcept {
    if constexpr (sharing_storage<S>)
      for (seq_id id : pending_)
        if (auto it = seqs_.find(id); it != seqs_.end())
          store_.publish(it->second.region, flushed(it->second));  // keys quantized: final bytes
    pending_.clear();
  }

  void check_step(std::size_t layer, const step& st) const {
    detail::require(st.owner_ == this, "the step was planned by another cache");
    detail::require(st.epoch_ == epoch_,
                    "the step is stale: the cache planned another step or changed its "
                    "sequences since");
    detail::require(layer < layout_.layers, "layer ", layer, " is out of range; the cache has ",
                    layout_.layers, " layers");
  }

  void reserve_workspace(const step& st) {
    const detail::work_plan& plan = st.plan_;
    const std::size_t g = layout_.group(), dim = layout_.head_dim;
    std::size_t groups = plan.decode_groups.size() - 1;
    const std::size_t max_rows = std::max(plan.max_rows, st.cascade_.tiles.max_rows);
    const std::size_t per_worker = std::max(detail::decode_scratch_floats(layout_),
                                            detail::prefill_scratch_floats(layout_, max_rows));
    const std::size_t need_scratch = per_worker * ctx_.pool.size();
    const std::size_t need_partial = plan.decode.size() * g * (dim + 1);
    const std::size_t need_q = groups * g * dim;
    if (scratch_.size() < need_scratch) scratch_.resize(need_scratch);
    if (partial_.size() < need_partial) partial_.resize(need_partial);
    if (qs_.size() < need_q) qs_.resize(need_q);
    if (!st.sink_angles_.empty() && qs_sink_.size() < need_q) qs_sink_.resize(need_q);
    if (!st.cascade_.empty()) {
      const std::size_t need_cascade = detail::cascade_buffer_floats(layout_, st.cascade_);
      const std::size_t need_lse = st.tokens_ * layout_.q_heads;
      if (cascade_.size() < need_cascade) cascade_.resize(need_cascade);
      if (lse_.size() < need_lse) lse_.resize(need_lse);
    }
    scratch_floats_ = per_worker;
  }

  template <std::size_t D>
  void run_decode(std::size_t layer, const step& st, const tensor_view<const float, 3>& q,
                  const tensor_view<const float, 3>& q_sink, const tensor_view<float, 3>& out,
                  const tensor_view<float, 2>& lse, float scale) {
    const auto& plan = st.plan_;
    if (plan.decode.empty()) return;
    const std::size_t g = layout_.group(), dim = layout_.head_dim;
    // Scaled queries, one (g, dim) block per decode group, in the plan's order.
    for (std::size_t grp = 0; grp + 1 < plan.decode_groups.size(); ++grp) {
      const detail::decode_item& it = plan.decode[plan.decode_groups[grp]];
      const std::size_t row = st.seqs_[it.seq].q_begin;
      for (std::size_t h = 0; h < g; ++h) {
        const float* src = &q(row, it.head * g + h, 0);
        float* dst = qs_.data() + (grp * g + h) * dim;
        for (std::size_t d = 0; d < dim; ++d) dst[d] = src[d] * scale;
        if (!q_sink.empty()) {
          const float* ss = &q_sink(row, it.head * g + h, 0);
          float* sd = qs_sink_.data() + (grp * g + h) * dim;
          for (std::size_t d = 0; d < dim; ++d) sd[d] = ss[d] * scale;
        }
      }
    }
    detail::decode_args da{
        &layout_,        layer,           st.seqs_.data(),
        &plan,           qs_.data(),      q_sink.empty() ? nullptr : qs_sink_.data(),
        partial_.data(), scratch_.data(), scratch_floats_};
    detail::decode<P, D>(ctx_.pool, da, out, lse);
  }

  cache_config cfg_;
  E evict_;
  kv_layout layout_;
  storage_state_type store_;
  typename B::context ctx_;
  std::unordered_map<seq_id, sequence> seqs_;
  std::vector<seq_id> pending_;  // sequences the last step appended to, to publish
  std::uint64_t next_id_ = 1;
  std::uint64_t epoch_ = 0;
  std::vector<float> scratch_, partial_, qs_, qs_sink_, cascade_, lse_;
  std::vector<float> krot_, qrot_, qsink_;  // RoPE-rotated copies of this step's k and q
  std::vector<double> freqs_;               // (rotary_dim / 2) RoPE frequencies
  std::vector<float> rope_table_;  // (cache positions, rotary_dim / 2, 2) keys read rotated
  std::size_t scratch_floats_ = 0;
  std::vector<float> kchan_buf_;  // (threads, G, head_dim) a key group being quantized
};

}  // namespace v0
}  // namespace kvcache
