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
#include "kernels/cpu/decode.hpp"
#include "kernels/cpu/prefill.hpp"
#include "kernels/cpu/write.hpp"
#include "kernels/plan.hpp"
#include "kernels/view.hpp"
#include "precision/block.hpp"
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
};

//! One sequence's share of a step: it appends `tokens` new tokens.
struct append {
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
//! begin_step, add_sequence or remove_sequence.
class step {
 public:
  std::size_t tokens() const noexcept { return tokens_; }
  std::span<const append> appends() const noexcept { return appends_; }
  //! True when every sequence appends exactly one token.
  bool is_decode() const noexcept { return plan_.prefill.empty(); }

 private:
  template <grouping_policy, storage_policy, eviction_policy, precision_policy, backend_policy>
  friend class cache;
  std::vector<append> appends_;
  std::vector<seq_view> seqs_;
  detail::work_plan plan_;
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
  static_assert(G::head_dim == dynamic || (G::head_dim > 0 && G::head_dim % 16 == 0),
                "A static head_dim must be a positive multiple of 16: the kernels read rows "
                "in 16-lane vectors.");
  static_assert(G::head_dim == dynamic || detail::whole_blocks<P>(G::head_dim),
                "The static head_dim is not a multiple of the precision's group size: "
                "quantized rows are made of whole blocks along head_dim.");
  static_assert(std::is_same_v<B, cpu>,
                "Only the cpu backend has kernels so far; the cuda backend comes with the "
                "CUDA kernels.");

 public:
  using grouping = G;
  using storage = S;
  using eviction = E;
  using precision = P;
  using backend = B;

  explicit cache(const cache_config& cfg)
      : cfg_(cfg),
        layout_(make_layout(cfg_)),
        store_(layout_, cfg_.max_tokens),
        ctx_(cfg_.threads) {
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
  seq_id add_sequence(std::size_t capacity = 0) {
    if (capacity == 0) capacity = cfg_.max_seq_len;
    seqs_.reserve(seqs_.size() + 1);  // the only allocation that could throw after create
    auto region = store_.create(capacity);
    const seq_id id{next_id_++};
    seqs_.emplace(id, sequence{region, 0});
    ++epoch_;
    return id;
  }

  //! Frees a sequence's slots. An unknown or already removed id is an error.
  void remove_sequence(seq_id id) {
    auto it = find(id);
    store_.destroy(it->second.region);
    seqs_.erase(it);
    ++epoch_;
  }

  bool contains(seq_id id) const noexcept { return seqs_.count(id) != 0; }
  std::size_t sequences() const noexcept { return seqs_.size(); }
  std::size_t length(seq_id id) const { return find(id)->second.length; }
  std::size_t capacity(seq_id id) const {
    return S::template state<B>::capacity(find(id)->second.region);
  }

  // ---- steps ----------------------------------------------------------------

  step begin_step(std::initializer_list<append> appends) {
    return begin_step(std::span<const append>(appends.begin(), appends.size()));
  }

  //! Plans one step: every listed sequence appends `tokens` >= 1 tokens (a
  //! prompt, a chunk of one, or one decoded token). Checks everything before
  //! changing anything; on success the sequences' lengths include the new
  //! tokens, whose K/V each layer's write() then stores.
  step begin_step(std::span<const append> appends) {
    detail::require(!appends.empty(), "begin_step needs at least one sequence");
    step st;
    st.appends_.assign(appends.begin(), appends.end());
    st.seqs_.reserve(appends.size());
    std::vector<const sequence*> seen;
    for (const append& a : appends) {
      const sequence& s = find(a.seq)->second;
      for (const sequence* p : seen)
        detail::require(p != &s, "sequence ", static_cast<std::uint64_t>(a.seq),
                        " appears twice in one step");
      seen.push_back(&s);
      detail::require(a.tokens > 0, "sequence ", static_cast<std::uint64_t>(a.seq),
                      " appends 0 tokens; a step appends at least 1");
      const std::size_t cap = state_t::capacity(s.region);
      detail::require(a.tokens <= cap - s.length, "sequence ", static_cast<std::uint64_t>(a.seq),
                      " holds ", s.length, " tokens; ", a.tokens, " more exceed its capacity of ",
                      cap, " under ", E::name, " eviction");
      seq_view v;
      v.pages = state_t::pages(s.region);
      v.page_tokens = state_t::page_tokens(s.region);
      v.first_pos = s.length;
      v.kv_len = s.length + a.tokens;
      v.q_begin = st.tokens_;
      v.q_len = a.tokens;
      st.seqs_.push_back(v);
      st.tokens_ += a.tokens;
    }
    st.plan_ = detail::make_plan(layout_, st.seqs_);
    reserve_workspace(st.plan_);
    // Commit: nothing below throws.
    for (const append& a : appends) seqs_.find(a.seq)->second.length += a.tokens;
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
      std::vector<std::uint64_t> ids;
      for (const append& a : st.appends_) ids.push_back(static_cast<std::uint64_t>(a.seq));
      detail::check_finite(layout_, layer, st.seqs_, ids.data(), k, v);
    }
    detail::write_rows<P>(ctx_.pool, layout_, layer, st.seqs_, k, v);
  }

  //! Causal attention of this step's queries over each sequence's cache (its
  //! earlier tokens and this step's, which write() must have stored).
  //! q, out: (step tokens, q_heads, head_dim). A sequence appending one token
  //! takes the decode kernel, others the prefill kernel.
  void attend(std::size_t layer, const step& st, tensor_view<const float, 3> q,
              tensor_view<float, 3> out, const attend_options& opt = {}) {
    check_step(layer, st);
    detail::check_view(q, "q", {st.tokens_, layout_.q_heads, layout_.head_dim});
    detail::check_view(out, "out", {st.tokens_, layout_.q_heads, layout_.head_dim});
    if (!opt.lse.empty()) detail::check_view(opt.lse, "lse", {st.tokens_, layout_.q_heads});
    detail::require(std::isfinite(opt.scale) && opt.scale >= 0.f, "softmax scale ", opt.scale,
                    " must be finite and positive");
    const float scale = opt.scale > 0.f ? opt.scale : cfg_.softmax_scale;
    detail::dispatch_head_dim<G::head_dim>(layout_.head_dim, [&](auto d) {
      constexpr std::size_t D = decltype(d)::value;
      run_decode<D>(layer, st, q, out, opt.lse, scale);
      detail::prefill_args pa{&layout_, layer, st.seqs_.data(), &st.plan_,       q,
                              scale,    out,   opt.lse,         scratch_.data(), scratch_floats_};
      detail::prefill<P, D>(ctx_.pool, pa);
    });
  }

  // ---- inspection -----------------------------------------------------------

  //! Bytes of K/V storage held by live sequences (each sequence's reserved
  //! capacity for contiguous storage); equals the formulas of memory.hpp.
  std::size_t memory_in_use() const noexcept { return store_.bytes_in_use(); }
  const kv_layout& layout() const noexcept { return layout_; }
  const cache_config& config() const noexcept { return cfg_; }
  std::size_t threads() const noexcept { return ctx_.pool.size(); }

  //! Decodes one stored row back to float: K (kind 0) or V (kind 1) of
  //! `kv_head` for token `token` of sequence `id` at `layer`. dst: head_dim floats.
  void read_row(std::size_t layer, seq_id id, std::size_t token, std::size_t kind,
                std::size_t kv_head, float* dst) const {
    const sequence& s = find(id)->second;
    detail::require(layer < layout_.layers, "layer ", layer, " is out of range; the cache has ",
                    layout_.layers);
    detail::require(token < s.length, "token ", token, " is out of range; sequence ",
                    static_cast<std::uint64_t>(id), " holds ", s.length);
    detail::require(kind < 2 && kv_head < layout_.kv_heads, "kind ", kind, " / kv_head ", kv_head,
                    " is out of range (kinds 2, kv_heads ", layout_.kv_heads, ")");
    seq_view v;
    v.pages = state_t::pages(s.region);
    v.page_tokens = state_t::page_tokens(s.region);
    const std::size_t run = layout_.run_offset(v.page_tokens, layer, kind, kv_head);
    P::decode(v.row(run, token, layout_.row_bytes), dst, layout_.head_dim);
  }

 private:
  using state_t = typename S::template state<B>;
  struct sequence {
    typename state_t::region region;
    std::size_t length = 0;
  };

  static kv_layout make_layout(const cache_config& c) {
    detail::require(c.layers > 0, "layers is 0; it must be at least 1");
    detail::require(c.max_tokens > 0, "max_tokens is 0; it must be at least 1");
    kv_layout L;
    L.layers = c.layers;
    L.q_heads = c.q_heads;
    L.kv_heads = G::kv_heads(c.q_heads, c.kv_heads);
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

  void check_step(std::size_t layer, const step& st) const {
    detail::require(st.owner_ == this, "the step was planned by another cache");
    detail::require(st.epoch_ == epoch_,
                    "the step is stale: the cache planned another step or changed its "
                    "sequences since");
    detail::require(layer < layout_.layers, "layer ", layer, " is out of range; the cache has ",
                    layout_.layers, " layers");
  }

  void reserve_workspace(const detail::work_plan& plan) {
    const std::size_t g = layout_.group(), dim = layout_.head_dim;
    std::size_t groups = plan.decode_groups.size() - 1;
    const std::size_t per_worker = std::max(detail::decode_scratch_floats(layout_),
                                            detail::prefill_scratch_floats(layout_, plan.max_rows));
    const std::size_t need_scratch = per_worker * ctx_.pool.size();
    const std::size_t need_partial = plan.decode.size() * g * (dim + 1);
    const std::size_t need_q = groups * g * dim;
    if (scratch_.size() < need_scratch) scratch_.resize(need_scratch);
    if (partial_.size() < need_partial) partial_.resize(need_partial);
    if (qs_.size() < need_q) qs_.resize(need_q);
    scratch_floats_ = per_worker;
  }

  template <std::size_t D>
  void run_decode(std::size_t layer, const step& st, const tensor_view<const float, 3>& q,
                  const tensor_view<float, 3>& out, const tensor_view<float, 2>& lse, float scale) {
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
      }
    }
    detail::decode_args da{&layout_,   layer,           st.seqs_.data(), &plan,
                           qs_.data(), partial_.data(), scratch_.data(), scratch_floats_};
    detail::decode<P, D>(ctx_.pool, da, out, lse);
  }

  cache_config cfg_;
  kv_layout layout_;
  state_t store_;
  typename B::context ctx_;
  std::unordered_map<seq_id, sequence> seqs_;
  std::uint64_t next_id_ = 1;
  std::uint64_t epoch_ = 0;
  std::vector<float> scratch_, partial_, qs_;
  std::size_t scratch_floats_ = 0;
};

}  // namespace v0
}  // namespace kvcache
