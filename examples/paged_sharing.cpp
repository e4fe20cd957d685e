// Paged storage and shared KV in one small program: a system prompt reused
// across requests (prefix reuse), parallel samples forked from one prompt
// (copy-on-write), a speculative draft rolled back (truncate), and a decode
// step whose shared prefix is attended once for every sample (cascade).
//
// K, V and Q are random here; a model would compute them from its layers.
#include <cstdio>
#include <kvcache/kvcache.hpp>
#include <random>
#include <vector>

using namespace kvcache;
using Cache = cache<gqa<64>, paged<16>, full, fp16>;
constexpr std::size_t q_heads = 8, kv_heads = 2, dim = 64;

std::mt19937 rng(7);
std::vector<float> random(std::size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

//! One step on the cache's single layer: write this step's K/V, then attend.
void run(Cache& kv, const step& st) {
  const std::size_t n = st.tokens();
  auto k = random(n * kv_heads * dim), v = random(n * kv_heads * dim);
  auto q = random(n * q_heads * dim);
  std::vector<float> out(n * q_heads * dim);
  kv.write(0, st, make_view<const float>(k.data(), n, kv_heads, dim),
           make_view<const float>(v.data(), n, kv_heads, dim));
  kv.attend(0, st, make_view<const float>(q.data(), n, q_heads, dim),
            make_view(out.data(), n, q_heads, dim));
}

void report(const Cache& kv, const char* what) {
  std::printf("%-44s %3zu pages in use, %3zu cached, %7zu bytes\n", what, kv.store().pages_in_use(),
              kv.store().pages_cached(), kv.memory_in_use());
}

int main() {
  Cache kv({.layers = 1,
            .q_heads = q_heads,
            .kv_heads = kv_heads,
            .max_tokens = 4096,
            .cascade_min_tokens = 64});

  // Request 1: a 300-token system prompt and a question, given with token ids
  // so that the pages they fill are published to the prefix index.
  std::vector<token_id> prompt(300);
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = token_id(i % 97);
  std::vector<token_id> question1{5, 6, 7}, question2{8, 9};
  std::vector<token_id> first = prompt;
  first.insert(first.end(), question1.begin(), question1.end());
  const seq_id r1 = kv.add_sequence();
  run(kv, kv.begin_step({{r1, first.size(), first}}));
  kv.remove_sequence(r1);  // its published pages stay cached
  report(kv, "request 1 done");

  // Request 2: same system prompt, another question. 288 of its tokens (18
  // full pages) are found in the cache; only the rest is computed.
  std::vector<token_id> second = prompt;
  second.insert(second.end(), question2.begin(), question2.end());
  const prefix_match m = kv.match_prefix(second);
  std::printf("request 2 reuses %zu of %zu prompt tokens\n", m.tokens, second.size());
  run(kv, kv.begin_step({{m.seq, second.size() - m.tokens,
                          std::span<const token_id>(second).subspan(m.tokens)}}));
  report(kv, "request 2 prompt done");

  // Four samples of the answer: forks share every page, no K/V bytes copied.
  std::vector<seq_id> samples{m.seq};
  for (int i = 0; i < 3; ++i) samples.push_back(kv.fork(m.seq));
  report(kv, "3 forks");

  // A decode step: each sample copies the shared partial page once, and the
  // 18 shared full pages are attended once for all four (cascade).
  std::vector<append> decode;
  for (seq_id s : samples) decode.push_back({s, 1});
  const step st = kv.begin_step(decode);
  std::printf("decode step: %zu of %zu sequences read the shared prefix together\n", st.cascaded(),
              samples.size());
  run(kv, st);
  report(kv, "after one decoded token each");

  // Speculative decoding on sample 0: 5 draft tokens, 2 accepted.
  const std::size_t before = kv.length(samples[0]);
  run(kv, kv.begin_step({{samples[0], 5}}));
  kv.truncate(samples[0], before + 2);
  std::printf("sample 0 holds %zu tokens after rolling back 3 rejected drafts\n",
              kv.length(samples[0]));

  for (seq_id s : samples) kv.remove_sequence(s);
  report(kv, "all removed");
  return kv.memory_in_use() == 0 && m.tokens == 288 && st.cascaded() == 4 ? 0 : 1;
}
