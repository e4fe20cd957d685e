// The running state of one decode work item (a "stream"), shared by the
// floating-point decode kernel (decode.hpp) and the quantized one
// (decode_quant.hpp): where its query, partial output and softmax state live,
// how it starts, and how it ends as a normalised (output, lse) pair for the
// log-sum-exp merge.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../plan.hpp"
#include "../view.hpp"

namespace kvcache {
inline namespace v0 {
namespace detail {

//! Running softmax state of one stream (one decode item).
struct decode_stream {
  const decode_item* item = nullptr;
  const float* q = nullptr;  // (g, dim)
  float* o = nullptr;        // (g, dim + 1)
  float* m = nullptr;        // (g)
  float* l = nullptr;        // (g)
  std::size_t t = 0;
};

//! Where stream `slot` of a task starts, and which query block it reads.
struct stream_start {
  std::size_t group;  // decode group: the item's (sequence, KV head)
  bool sink;          // the item covers only its sequence's sinks
};

//! Starts the stream for plan item `idx` in `s`: its query block, zeroed
//! partial output (g, dim + 1) in `partial`, and running max and sum in
//! `ml` (2, g). Items over a sequence's sinks read qs_sink when given: the
//! query rotated at its cache position (see decode_args::qs_sink).
inline stream_start start_stream(decode_stream& s, const work_plan& plan, const seq_view* seqs,
                                 std::size_t idx, const float* qs, const float* qs_sink,
                                 float* partial, float* ml, std::size_t g, std::size_t dim) {
  const auto& groups = plan.decode_groups;  // items of a group are adjacent
  const std::size_t grp = std::upper_bound(groups.begin(), groups.end(), idx) - groups.begin() - 1;
  const std::size_t stride = dim + 1;
  s.item = &plan.decode[idx];
  const bool sink = qs_sink && s.item->end <= seqs[s.item->seq].sink_len;
  s.q = (sink ? qs_sink : qs) + grp * g * dim;
  s.o = partial + idx * g * stride;
  s.m = ml;
  s.l = ml + g;
  s.t = s.item->begin;
  for (std::size_t h = 0; h < g; ++h) {
    s.m[h] = -INFINITY;
    s.l[h] = 0.f;
    for (std::size_t d = 0; d < dim; ++d) s.o[h * stride + d] = 0.f;
  }
  return {grp, sink};
}

//! Normalises the stream's output and stores its log-sum-exp after it.
inline void finish_stream(decode_stream& s, std::size_t g, std::size_t dim) {
  const std::size_t stride = dim + 1;
  for (std::size_t h = 0; h < g; ++h) {
    float* o = s.o + h * stride;
    const float inv = 1.0f / s.l[h];
    for (std::size_t d = 0; d < dim; ++d) o[d] *= inv;
    o[dim] = s.m[h] + std::log(s.l[h]);
  }
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
