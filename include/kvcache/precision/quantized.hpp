// Every block-quantized precision, and the rotated variants the fidelity
// tests and docs/quantization.md measure. Bytes per element (fp16 metadata
// included), group 32 unless named:
//   int8_kv<>           8.5     int8_kv<64> 8.25, int8_kv<128> 8.125
//   fp8_e4m3_kv<>       8.5     fp8_e4m3_kv<128> 8.125 (one scale per head vector)
//   int4_kv<>           4.5     (llama.cpp q4_0)
//   int4_kv<true>       5       (llama.cpp q4_1, KIVI 4-bit)
//   int2_kv             3       (KIVI 2-bit)
//   hadamard<P>         as P    (rotated before quantizing)
//   per_channel_k<P, G, R>  keys per channel in groups of G tokens (KIVI), values
//                       as P; 5 (int4_kv<true>) or 3 (int2_kv) at G = 32, plus an
//                       fp16 residual of R keys per sequence, layer and KV head
#pragma once

#include "fp8.hpp"
#include "int2.hpp"
#include "int4.hpp"
#include "int8.hpp"
#include "per_channel.hpp"
#include "rotated.hpp"

namespace kvcache {
inline namespace v0 {

static_assert(precision_policy<hadamard<int4_kv<>>>);
static_assert(precision_policy<hadamard<int4_kv<true>>>);
static_assert(precision_policy<hadamard<int2_kv>>);
static_assert(block_precision<int8_kv<>>);
static_assert(block_precision<int4_kv<>>);
static_assert(block_precision<int2_kv>);
static_assert(block_precision<fp8_e4m3_kv<>>);
static_assert(block_precision<hadamard<int4_kv<>>>);

}  // namespace v0
}  // namespace kvcache
