// Q.K scores of integer block formats on the AMX tile unit (Intel AMX-INT8:
// one tdpbssd multiplies a 16 x 64 int8 tile by a 64 x 16 int8 tile into
// 16 x 16 int32 sums, 16 times the products of an AVX-512 VNNI instruction,
// and it runs beside the vector units).
//
// The key tile is the rows as stored (int8) or unpacked to one signed byte
// per element (int4, int2): A = 16 tokens x 64 dimensions, no transpose. The
// query side is prepared once per work item: each head's query is quantized
// per block to two bytes per element, q ~= sq (hi + lo / 256) as in vnni.hpp
// (same bound), and laid out as B tiles whose 16 columns are
//   lane l = 8 p + 2 h + j:   part p (hi, lo) of head h (of 4), segment j
// where a 64-dimension chunk holds two 32-dimension segments and each column
// is zero outside its segment. One tdpbssd per chunk so gives every head's
// integer dot product per segment and part for 16 tokens. The epilogue scales
// row t (a token) by the query factors and the token's block scales, adds
// asymmetric formats' min terms, and sums each head's four lanes with a
// shuffle tree that also turns tokens into lanes for the softmax.
//
// Used when the compiler targets AMX-TILE and AMX-INT8 and Linux grants the
// process the tile state at run time; the VNNI path (vnni.hpp) otherwise.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../../precision/block.hpp"
#include "prefetch.hpp"
#include "vnni.hpp"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && \
    defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__linux__) &&   \
    !defined(KVCACHE_NO_AMX)
#define KVCACHE_HAS_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define KVCACHE_HAS_AMX 0
#endif

#if KVCACHE_HAS_AMX
// Tile loads and stores go through these. GCC 12's intrinsics are asm
// statements that name only the address, so the compiler may move ordinary
// loads and stores of the same bytes across them: a tile load of rows the
// kernel has just unpacked, vector loads of a tile it has just stored. The
// empty asm's memory clobber orders them.
#define KVCACHE_TILE_LOAD(tile, base, stride) \
  do {                                        \
    __asm__ volatile("" ::: "memory");        \
    _tile_loadd(tile, base, stride);          \
  } while (0)
#define KVCACHE_TILE_STORE(tile, base, stride) \
  do {                                         \
    _tile_stored(tile, base, stride);          \
    __asm__ volatile("" ::: "memory");         \
  } while (0)
#endif

namespace kvcache {
inline namespace v0 {
namespace detail::amx {

//! Formats this path computes: the VNNI path's integer formats, whose query
//! quantization and block layout it shares. Shapes are checked at run time:
//! head_dims of whole 64-byte chunks (128 for the packed formats, whose
//! unpacking works on 128 elements), at most 256 (the query tiles' scratch),
//! with query heads in groups of 4 (the B tiles' columns).
template <class F>
constexpr bool supported_format() noexcept {
  return vnni::supported_format<F>();
}
inline constexpr std::size_t max_dim = 256, max_group = 16;
template <class F>
constexpr bool supported_shape(std::size_t dim, std::size_t g) noexcept {
  return dim % (F::bits == 8 ? 64 : 128) == 0 && dim <= max_dim && g % 4 == 0 && g <= max_group;
}

//! Bytes of one item's prepared query: per group of 4 heads and chunk, a
//! 16 x 64 B tile, 16 lane factors and 16 min factors.
inline constexpr std::size_t query_bytes(std::size_t g, std::size_t dim) noexcept {
  return (g / 4) * (dim / 64) * (1024 + 128);
}
//! Tokens of a decode tile on the tile unit: weight rows of 64 tokens (the
//! whole 64-byte row of an A tile, so a value tile is 16 rows of 4 tokens),
//! scores in 16-token quarters. Larger tiles halve what P.V pays once per
//! tile (the C tiles' round trip and epilogue, the softmax's reductions).
inline constexpr std::size_t tile_tokens = 64;

//! The prefetch_cursor::issue() calls a full tile makes for g heads: value
//! tiles (16 per 64 tokens), scores (one per token), weights (per head,
//! block of 32 and 64 tokens) and epilogue (per head and chunk).
constexpr std::size_t issue_steps(std::size_t g, std::size_t dim) noexcept {
  return 16 * (tile_tokens / 64) + tile_tokens + g * (dim / 32) * (tile_tokens / 64) +
         g * (dim / 64);
}

//! The per-task scratch of the tile kernels, in one place: unpacked key rows
//! (tile_tokens x dim), C tiles (4 KiB), P.V's weight tiles (dim / 64 KiB)
//! and value tiles (dim / 64 x 4 KiB).
struct tile_scratch {
  std::byte* base = nullptr;
  std::size_t dim = 0;
  static constexpr std::size_t bytes(std::size_t dim) noexcept {
    return tile_tokens * dim + 4096 + dim / 64 * 1024 + dim / 64 * 4096;
  }
  std::int8_t* keys() const noexcept { return reinterpret_cast<std::int8_t*>(base); }
  std::int32_t* c() const noexcept {
    return reinterpret_cast<std::int32_t*>(base + tile_tokens * dim);
  }
  std::int8_t* weights() const noexcept {
    return reinterpret_cast<std::int8_t*>(base + tile_tokens * dim + 4096);
  }
  std::int8_t* values() const noexcept { return weights() + dim / 64 * 1024; }
};

//! The rows of a decode tile on the tile unit, by 16-token quarters (the
//! scores' A tiles): quarter j holds n[j] <= 16 consecutive rows at k[j]
//! and v[j], rb bytes apart, so that one tile spans pages of 16 tokens and
//! more (one page per quarter) and pays its softmax and P.V bookkeeping
//! once per 64 tokens, not per page. Slots n[j]..15 of a quarter are empty
//! (-inf scores; the quarter's last row stands in for them), and quarters
//! from `count` on hold no rows.
struct tile_quarters {
  static constexpr std::size_t max = tile_tokens / 16;
  const std::byte* k[max] = {};
  const std::byte* v[max] = {};
  std::size_t n[max] = {};
  std::size_t count = 0;
  std::size_t rows() const noexcept {
    std::size_t r = 0;
    for (std::size_t j = 0; j < count; ++j) r += n[j];
    return r;
  }
  //! The slots up to the last row: where the kernels' loops over 16-token
  //! parts stop (n of a dense tile).
  std::size_t span() const noexcept { return count ? 16 * (count - 1) + n[count - 1] : 0; }
};

//! The quarters of n <= tile_tokens rows in one run (rb bytes apart).
inline tile_quarters dense_quarters(const std::byte* K, const std::byte* V, std::size_t rb,
                                    std::size_t n) noexcept {
  tile_quarters tq;
  for (; 16 * tq.count < n; ++tq.count) {
    const std::size_t j = tq.count;
    tq.k[j] = K + 16 * j * rb;
    tq.v[j] = V + 16 * j * rb;
    tq.n[j] = std::min<std::size_t>(16, n - 16 * j);
  }
  return tq;
}

//! A tile's key rows as A tiles, per quarter: signed levels, stride[j]
//! bytes apart.
struct key_rows {
  const std::int8_t* a[tile_quarters::max] = {};
  std::size_t stride[tile_quarters::max] = {};
};

//! One item's query tiles in scratch (query_bytes).
struct query_tiles {
  std::byte* base = nullptr;
  std::size_t chunks = 0;
  const std::int8_t* b(std::size_t grp, std::size_t c) const noexcept {
    return reinterpret_cast<const std::int8_t*>(base + (grp * chunks + c) * (1024 + 128));
  }
  const float* qf(std::size_t grp, std::size_t c) const noexcept {
    return reinterpret_cast<const float*>(base + (grp * chunks + c) * (1024 + 128) + 1024);
  }
  const float* qm(std::size_t grp, std::size_t c) const noexcept { return qf(grp, c) + 16; }
};

//! Puts one head's output (dim floats) from tile_values' order into natural
//! order: stored 64 c + 16 j + 4 L + m holds dimension 64 c + 16 L + 4 j + m.
inline void unpermute_output(float* o, std::size_t dim) noexcept {
  for (std::size_t c = 0; c < dim; c += 64) {
    float t[64];
    for (std::size_t j = 0; j < 4; ++j)
      for (std::size_t L = 0; L < 4; ++L)
        for (std::size_t m = 0; m < 4; ++m) t[16 * L + 4 * j + m] = o[c + 16 * j + 4 * L + m];
    std::memcpy(o + c, t, sizeof t);
  }
}

#if KVCACHE_HAS_AMX

//! Whether kernels may use the tile unit where it is available (tests turn it
//! off to check the VNNI path on the same machine).
inline std::atomic<bool>& allowed() noexcept {
  static std::atomic<bool> on{true};
  return on;
}

//! Whether this process may use the tile registers: the CPU has AMX-INT8 and
//! Linux granted the tile state (it must be requested once per process).
inline bool available() noexcept {
  if (!allowed().load(std::memory_order_relaxed)) return false;
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;  // AMX-TILE, AMX-INT8
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return ok;
}

//! Quantizes g query heads (g x dim floats) into tiles at `base`, 16
//! elements per vector (once per work item: scalar rounding had taken ~3%
//! of int4 decode at 32k).
template <class F>
query_tiles prepare_query(const float* q, std::size_t g, std::size_t dim,
                          std::byte* base) noexcept {
  constexpr std::size_t G = F::group;
  const std::size_t chunks = dim / 64;
  query_tiles t{base, chunks};
  std::memset(base, 0, query_bytes(g, dim));
  for (std::size_t h = 0; h < g; ++h) {
    const float* qh = q + h * dim;
    const std::size_t grp = h / 4, hl = h % 4;
    for (std::size_t b0 = 0; b0 < dim; b0 += G) {
      __m512 mx = _mm512_setzero_ps();
      for (std::size_t i = 0; i < G; i += 16)
        mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(qh + b0 + i)));
      const float amax = _mm512_reduce_max_ps(mx);
      const float sq = amax / 127.f;
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      for (std::size_t s0 = b0; s0 < b0 + G; s0 += 32) {  // 32-dimension segments
        const std::size_t c = s0 / 64, j = (s0 % 64) / 32;
        auto* B = reinterpret_cast<std::int8_t*>(base + (grp * chunks + c) * (1024 + 128));
        auto* qf = reinterpret_cast<float*>(B + 1024);
        // q ~= sq (hi + lo / 256); the segment's sum of q as quantized.
        alignas(16) std::int8_t parts[2][32];
        __m512 sum = _mm512_setzero_ps();
        for (std::size_t k = 0; k < 2; ++k) {
          constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
          const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(qh + s0 + 16 * k), inv);
          const __m512 hi = _mm512_roundscale_ps(x, nearest);
          const __m512 lo = _mm512_min_ps(
              _mm512_set1_ps(127.f),
              _mm512_max_ps(
                  _mm512_set1_ps(-127.f),
                  _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(x, hi), _mm512_set1_ps(256.f)),
                                       nearest)));
          sum = _mm512_add_ps(sum, _mm512_fmadd_ps(lo, _mm512_set1_ps(1.f / 256.f), hi));
          _mm_store_si128(reinterpret_cast<__m128i*>(parts[0] + 16 * k),
                          _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(hi)));
          _mm_store_si128(reinterpret_cast<__m128i*>(parts[1] + 16 * k),
                          _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(lo)));
        }
        // Dimensions 4 r..4 r + 3 of the segment are row 8 j + r's dword in
        // column (part, head, segment).
        for (std::size_t r = 0; r < 8; ++r)
          for (std::size_t p = 0; p < 2; ++p)
            std::memcpy(B + (8 * j + r) * 64 + 4 * (8 * p + 2 * hl + j), parts[p] + 4 * r, 4);
        qf[0 * 8 + 2 * hl + j] = sq;
        qf[1 * 8 + 2 * hl + j] = sq / 256.f;
        qf[16 + 2 * hl + j] = _mm512_reduce_add_ps(sum) * sq;  // min factor, on the hi lane only
      }
    }
  }
  return t;
}

//! Every tile 16 rows of 64 bytes. Scores: A in tmm0-1, B in tmm2-3, C in
//! tmm4-5. P.V: weights in tmm6, values in tmm0-3, C in tmm4, tmm5, tmm7
//! (distinct registers, so loads and products do not wait on each other).
inline void configure() noexcept {
  struct alignas(64) {
    std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
    std::uint16_t colsb[16] = {};
    std::uint8_t rows[16] = {};
  } cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  // Not _tile_loadconfig: GCC 12's names only the first 8 bytes as read, and
  // at -O2 the stores of the shapes were dropped (tileloadd then faulted).
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}
inline void release() noexcept { _tile_release(); }

//! Chunks [c, c + per) of a row as signed levels in natural element order,
//! 64 elements each: one chunk of int8 codes (levels already), two of the
//! packed formats, whose unpacking works on 128 elements (c even).
template <class F>
inline constexpr std::size_t chunks_per_unpack = F::bits == 8 ? 1 : 2;
//! What P.V subtracts from an asymmetric format's codes (the middle of their
//! range; value = scale (code - centre) + (min + centre scale)): the
//! weights' rounding error is multiplied by the levels, and centred levels
//! are about half the size of the codes. Symmetric formats' levels are
//! centred already.
template <class F>
constexpr int value_centre() noexcept {
  return F::kind == block_kind::int4_asym ? 8 : F::kind == block_kind::int2_asym ? 2 : 0;
}
//! (`centre` is subtracted from asymmetric codes: value_centre for values,
//! 0 for keys, whose min terms take the codes as stored.)
template <class F, int centre = 0>
KVCACHE_ALWAYS_INLINE void row_levels(const std::uint8_t* codes, std::size_t c,
                                      __m512i* out) noexcept {
  // Subtracted from every code: symmetric int4's zero point, else `centre`.
  constexpr int mid = F::kind == block_kind::int4_sym ? 8 : centre;
  if constexpr (F::bits == 8) {
    out[0] = _mm512_loadu_si512(codes + 64 * c);
  } else if constexpr (F::bits == 4) {
    // 16 bytes per block of 32: low nibbles are its elements 0-15, high 16-31.
    const __m512i x = _mm512_loadu_si512(codes + 32 * c);
    const __m512i m = _mm512_set1_epi8(0x0f);
    __m512i lo = _mm512_and_si512(x, m), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
    if constexpr (mid != 0) {
      lo = _mm512_sub_epi8(lo, _mm512_set1_epi8(mid));
      hi = _mm512_sub_epi8(hi, _mm512_set1_epi8(mid));
    }
    out[0] = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
    out[1] = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
  } else {
    // 8 bytes per block of 32: byte j holds elements j, j + 8, j + 16, j + 24.
    const __m512i x = _mm512_castsi256_si512(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * c)));
    const __m512i m = _mm512_set1_epi8(0x03);
    const __m512i shifts = _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6);
    const __m512i b01 = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1), x);
    const __m512i b23 = _mm512_permutexvar_epi64(_mm512_setr_epi64(2, 2, 2, 2, 3, 3, 3, 3), x);
    out[0] = _mm512_and_si512(_mm512_srlv_epi64(b01, shifts), m);
    out[1] = _mm512_and_si512(_mm512_srlv_epi64(b23, shifts), m);
    if constexpr (mid != 0) {
      out[0] = _mm512_sub_epi8(out[0], _mm512_set1_epi8(mid));
      out[1] = _mm512_sub_epi8(out[1], _mm512_set1_epi8(mid));
    }
  }
}

//! A row as signed levels, natural element order, in `out` (dim bytes).
template <class F>
KVCACHE_ALWAYS_INLINE void unpack_row(const std::uint8_t* codes, std::size_t dim,
                                      std::int8_t* out) noexcept {
  constexpr std::size_t per = chunks_per_unpack<F>;
  for (std::size_t c = 0; c < dim / 64; c += per) {
    __m512i x[per];
    row_levels<F>(codes, c, x);
    for (std::size_t k = 0; k < per; ++k) _mm512_storeu_si512(out + 64 * (c + k), x[k]);
  }
}

//! A row's nb fp16 block values at byte `off`, as floats in lanes 0..nb-1
//! (masked load: nothing past the row is read).
KVCACHE_ALWAYS_INLINE __m512 row_halves(const std::byte* row, std::size_t off,
                                        std::size_t nb) noexcept {
  const __mmask16 m = static_cast<__mmask16>((1u << nb) - 1u);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + off));
}

//! Sums each head's four lanes of 16 token vectors y[t] (lane 8 p + 2 h + j)
//! into one vector per head with token t in lane t.
KVCACHE_ALWAYS_INLINE void heads_by_token(const __m512* y, __m512* out) noexcept {
  __m512 u[8], v[4];
  // Parts: 128-bit lanes (p, h pair) -> (token, h pair).
  for (int m = 0; m < 8; ++m)
    u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * m], y[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(y[2 * m], y[2 * m + 1], 0xee));
  // Segments: adjacent lanes.
  for (int n = 0; n < 4; ++n)
    v[n] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * n], u[2 * n + 1], 0x88),
                         _mm512_shuffle_ps(u[2 * n], u[2 * n + 1], 0xdd));
  // v[n] lane 4 q + r holds token 4 n + i of head h with
  // q = 2 (i & 1) + (h >> 1), r = 2 (i >> 1) + (h & 1).
  // Lane k of head h's index: token k's lane, from v[0]/v[2] (k % 8 < 4) or
  // v[1]/v[3] (16 + lane), for permutex2var.
  alignas(64) static constexpr auto index = [] {
    std::array<std::array<std::int32_t, 16>, 4> t{};
    for (int h = 0; h < 4; ++h)
      for (int k = 0; k < 16; ++k) {
        const int i = k % 4, lane = 4 * (2 * (i & 1) + (h >> 1)) + 2 * (i >> 1) + (h & 1);
        t[h][k] = (k % 8 < 4 ? 0 : 16) + lane;
      }
    return t;
  }();
  for (int h = 0; h < 4; ++h) {
    const __m512i ix = _mm512_load_si512(index[h].data());
    out[h] = _mm512_mask_blend_ps(0xff00, _mm512_permutex2var_ps(v[0], ix, v[1]),
                                  _mm512_permutex2var_ps(v[2], ix, v[3]));
  }
}

//! Where a tile's key rows are read as A tiles: full int8 quarters in
//! place, any other quarter that holds rows unpacked (its empty slots
//! repeat its last row) in abuf (tile_tokens x dim bytes). Unpacking is a
//! separate step so that the kernel can do other work before the tile loads:
//! a tile load of bytes that vector stores have just written waits for them
//! to reach the cache (~80 cycles).
template <class F>
KVCACHE_ALWAYS_INLINE key_rows unpack_keys(const tile_quarters& tq, std::size_t rb, std::size_t dim,
                                           std::int8_t* abuf) noexcept {
  key_rows kr;
  for (std::size_t j = 0; j < tq.count; ++j) {
    if (F::bits == 8 && tq.n[j] == 16) {  // int8 codes are levels: read in place
      kr.a[j] = reinterpret_cast<const std::int8_t*>(tq.k[j]);
      kr.stride[j] = rb;
      continue;
    }
    std::int8_t* out = abuf + 16 * j * dim;
    for (std::size_t t = 0; t < 16; ++t)
      unpack_row<F>(reinterpret_cast<const std::uint8_t*>(tq.k[j] + std::min(t, tq.n[j] - 1) * rb),
                    dim, out + t * dim);
    kr.a[j] = out;
    kr.stride[j] = dim;
  }
  return kr;
}

//! Lane l's block in chunk c: (64 c + 32 j) / G with segment j = l & 1.
KVCACHE_ALWAYS_INLINE __m512i lane_blocks(std::size_t c, std::size_t G) noexcept {
  const __m512i lane_j =
      _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_epi32(1));
  return _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(64 * c)), _mm512_slli_epi32(lane_j, 5)),
      __builtin_ctz(static_cast<unsigned>(G)));
}

//! The epilogue of one group of 4 heads over 16 rows (n valid; rows past n
//! repeat row n - 1): C tiles of (dim / 64) chunks in cbuf, 1 KiB each, row
//! t a token, lane 8 p + 2 h + j. Scales each lane by the token's block
//! scale (and, for integer sums, group grp's query factors in q; asymmetric
//! formats add its min terms), sums each head's lanes, and stores the 4
//! heads' scores at sc (rows sc_stride apart), -inf past n. FloatC: the C
//! tiles hold fp32 sums of exact products (amx_fp8.hpp), with no query
//! factors (q is null).
template <class F, bool FloatC = false>
KVCACHE_ALWAYS_INLINE void group_scores(const std::byte* K, std::size_t rb, std::size_t n,
                                        std::size_t dim, const query_tiles* q, std::size_t grp,
                                        const std::int32_t* cbuf, float* sc, std::size_t sc_stride,
                                        detail::prefetch_cursor& pf) noexcept {
  constexpr std::size_t G = F::group;
  const std::size_t chunks = dim / 64, nb = dim / G;
  __m512i blk[max_dim / 64];
  [[maybe_unused]] __m512 qf[max_dim / 64], qm[max_dim / 64];
  for (std::size_t c = 0; c < chunks; ++c) {
    blk[c] = lane_blocks(c, G);
    if constexpr (!FloatC) qf[c] = _mm512_loadu_ps(q->qf(grp, c));
    if constexpr (F::asymmetric) qm[c] = _mm512_loadu_ps(q->qm(grp, c));
  }
  __m512 y[16];
  for (std::size_t t = 0; t < 16; ++t) {
    pf.issue();
    const std::byte* row = K + std::min(t, n - 1) * rb;
    const __m512 ks = row_halves(row, F::scale_offset(dim), nb);
    [[maybe_unused]] __m512 km;
    if constexpr (F::asymmetric) km = row_halves(row, F::min_offset(dim), nb);
    __m512 acc = _mm512_setzero_ps();
    for (std::size_t c = 0; c < chunks; ++c) {
      const std::int32_t* Ct = cbuf + 256 * c + 16 * t;
      if constexpr (FloatC) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(Ct)),
                              _mm512_permutexvar_ps(blk[c], ks), acc);
      } else {
        const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(blk[c], ks), qf[c]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(Ct)), s, acc);
      }
      if constexpr (F::asymmetric)
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(blk[c], km), qm[c], acc);
    }
    y[t] = acc;
  }
  __m512 out[4];
  heads_by_token(y, out);
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  for (std::size_t h = 0; h < 4; ++h)
    _mm512_storeu_ps(sc + h * sc_stride,
                     _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), out[h]));
}

//! Scores of 16 rows (n valid; rows past n repeat row n - 1) for g heads into
//! sc (g rows, sc_stride apart), -inf past n. A: the rows as signed levels
//! (astride apart); cbuf: (dim / 64) x 1 KiB.
template <class F>
KVCACHE_ALWAYS_INLINE void half_scores(const std::byte* K, std::size_t rb, std::size_t n,
                                       std::size_t g, std::size_t dim, const query_tiles& q,
                                       const std::int8_t* A, std::size_t astride,
                                       std::int32_t* cbuf, float* sc, std::size_t sc_stride,
                                       detail::prefetch_cursor& pf) noexcept {
  const std::size_t chunks = dim / 64;
  for (std::size_t grp = 0; grp < g / 4; ++grp) {
    for (std::size_t c = 0; c < chunks; c += 2) {
      KVCACHE_TILE_LOAD(0, A + 64 * c, static_cast<long>(astride));
      KVCACHE_TILE_LOAD(2, q.b(grp, c), 64);
      _tile_zero(4);
      _tile_dpbssd(4, 0, 2);
      KVCACHE_TILE_STORE(4, cbuf + 256 * c, 64);
      if (c + 1 < chunks) {
        KVCACHE_TILE_LOAD(1, A + 64 * (c + 1), static_cast<long>(astride));
        KVCACHE_TILE_LOAD(3, q.b(grp, c + 1), 64);
        _tile_zero(5);
        _tile_dpbssd(5, 1, 3);
        KVCACHE_TILE_STORE(5, cbuf + 256 * (c + 1), 64);
      }
    }
    group_scores<F>(K, rb, n, dim, &q, grp, cbuf, sc + 4 * grp * sc_stride, sc_stride, pf);
  }
}

//! P.V's products for chunk c of a tile: C tiles tmm0-3 (16 output columns
//! each) summed over `used` subtiles of the weights (A, tmm4; 1 KiB per
//! subtile and chunk from abuf) times the value tiles (B, tmm5-7, the fourth
//! reusing tmm5; 4 KiB per subtile and chunk from bbuf), stored to cbuf
//! (4 KiB). Int8 operands (tdpbssd) or, with Bf16, bf16 (tdpbf16ps,
//! amx_fp8.hpp): the same tile shapes.
template <bool Bf16>
KVCACHE_ALWAYS_INLINE void value_products(const void* abuf, const void* bbuf, std::size_t used,
                                          std::size_t chunks, std::size_t c,
                                          std::int32_t* cbuf) noexcept {
#define KVCACHE_TILE_DP(dst, a, b) \
  do {                             \
    if constexpr (Bf16)            \
      _tile_dpbf16ps(dst, a, b);   \
    else                           \
      _tile_dpbssd(dst, a, b);     \
  } while (0)
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (std::size_t u = 0; u < used; ++u) {
    const auto* A = static_cast<const std::byte*>(abuf) + (u * chunks + c) * 1024;
    const auto* B = static_cast<const std::byte*>(bbuf) + (u * chunks + c) * 4096;
    KVCACHE_TILE_LOAD(4, A, 64);
    KVCACHE_TILE_LOAD(5, B, 64);
    KVCACHE_TILE_LOAD(6, B + 1024, 64);
    KVCACHE_TILE_LOAD(7, B + 2048, 64);
    KVCACHE_TILE_DP(0, 4, 5);
    KVCACHE_TILE_DP(1, 4, 6);
    KVCACHE_TILE_DP(2, 4, 7);
    KVCACHE_TILE_LOAD(5, B + 3072, 64);
    KVCACHE_TILE_DP(3, 4, 5);
  }
#undef KVCACHE_TILE_DP
  KVCACHE_TILE_STORE(0, cbuf, 64);
  KVCACHE_TILE_STORE(1, cbuf + 256, 64);
  KVCACHE_TILE_STORE(2, cbuf + 512, 64);
  KVCACHE_TILE_STORE(3, cbuf + 768, 64);
}

// ---- P.V -------------------------------------------------------------------
//
// out[h][d] = sum_t p[h][t] (scale[t][b(d)] level[t][d] + min[t][b(d)]).
// The contraction runs over tokens, so the weights are the A tile: each
// softmax weight times its token's block scale, rounded against the head's
// largest such product to two bytes, w ~= ws (hi + lo / 256) (relative error
// near 2^-16, as the VNNI path's int16 weights). A row m = 8 sl + 2 h + p holds
// part p of head h for segment sl of a 64-dimension chunk, over 64 tokens
// (one subtile) in weight_token's order. The values are the B tile: four
// tokens' bytes interleaved per dimension (unpacklo/hi of bytes, then of
// words), which leaves column n of B tile j of chunk c holding dimension
// 64 c + 16 (n / 4) + 4 j + n % 4: columns 0-7 lie in the chunk's first
// segment and 8-15 in its second, so one C tile serves both segments (rows
// of the other segment are unused), and the outputs are kept in this order
// until the item ends (unpermute_output). Asymmetric formats' levels are
// centred (value_centre), and their mins, with the centre's share, are
// summed by the caller (vnni.hpp's running min terms).

//! The first of the four tokens (of a 64-token subtile) whose weights dword
//! k of a weight row holds: tile_values packs four 16-token vectors per
//! 128-bit lane, so dword k is token 16 (k % 4) + 4 (k / 4) and the three
//! after it. Row k of a value tile holds the same tokens.
constexpr std::size_t weight_token(std::size_t k) noexcept { return 16 * (k % 4) + 4 * (k / 4); }

//! Value tiles of a tile's rows (empty slots repeat their quarter's last
//! row) into bbuf: (subtile, dim / 64 chunks, 4 tiles of 16 rows of 64
//! bytes). Rows whose four slots are all empty are left as they are: their
//! weights are 0.
template <class F>
KVCACHE_ALWAYS_INLINE void value_tiles(const tile_quarters& tq, std::size_t rb, std::size_t dim,
                                       std::int8_t* bbuf, detail::prefetch_cursor& pf) noexcept {
  const std::size_t chunks = dim / 64;
  for (std::size_t u = 0; 64 * u < tile_tokens; ++u)
    for (std::size_t q = 0; q < 16; ++q) {
      pf.issue();
      // Four consecutive slots, never across quarters (weight_token is a
      // multiple of 4).
      const std::size_t t0 = 64 * u + weight_token(q), j = t0 / 16, r0 = t0 % 16;
      if (j >= tq.count || r0 >= tq.n[j]) continue;
      const std::uint8_t* r[4];
      for (std::size_t i = 0; i < 4; ++i)
        r[i] = reinterpret_cast<const std::uint8_t*>(tq.v[j] + std::min(r0 + i, tq.n[j] - 1) * rb);
      constexpr std::size_t per = chunks_per_unpack<F>;
      for (std::size_t c0 = 0; c0 < chunks; c0 += per) {
        __m512i x[4][per];
        for (std::size_t i = 0; i < 4; ++i) row_levels<F, value_centre<F>()>(r[i], c0, x[i]);
        for (std::size_t k = 0; k < per; ++k) {
          const __m512i a0 = _mm512_unpacklo_epi8(x[0][k], x[1][k]);
          const __m512i a1 = _mm512_unpackhi_epi8(x[0][k], x[1][k]);
          const __m512i b0 = _mm512_unpacklo_epi8(x[2][k], x[3][k]);
          const __m512i b1 = _mm512_unpackhi_epi8(x[2][k], x[3][k]);
          std::int8_t* out = bbuf + (u * chunks + c0 + k) * 4096 + q * 64;
          _mm512_storeu_si512(out, _mm512_unpacklo_epi16(a0, b0));
          _mm512_storeu_si512(out + 1024, _mm512_unpackhi_epi16(a0, b0));
          _mm512_storeu_si512(out + 2048, _mm512_unpacklo_epi16(a1, b1));
          _mm512_storeu_si512(out + 3072, _mm512_unpackhi_epi16(a1, b1));
        }
      }
    }
}

//! o (4 heads, ostride apart, in unpermute_output's order) = o x corr + p V
//! over a tile of n <= tile_tokens rows, for 4 heads: p (4, pstride)
//! weights (read up to n, rounded up to 16), vs (nb, tile_tokens) the rows' block scales (0 past
//! n), bbuf from value_tiles. abuf: (dim / 64) KiB per subtile; cbuf: 4 KiB
//! (tile_scratch). Requests a line group of pf per head and block of
//! weights and per head and chunk of the epilogue.
template <class F>
KVCACHE_ALWAYS_INLINE void tile_values(std::size_t dim, std::size_t n, const float* p,
                                       std::size_t pstride, const float* vs, const float* corr,
                                       float* o, std::size_t ostride, const std::int8_t* bbuf,
                                       std::int8_t* abuf, std::int32_t* cbuf,
                                       detail::prefetch_cursor& pf) noexcept {
  constexpr std::size_t G = F::group, T = tile_tokens;
  const std::size_t chunks = dim / 64, used = (n + 63) / 64;
  float wscale[4];
  for (std::size_t h = 0; h < 4; ++h) {
    // |products|: q4_0-style scales are negative when a block's extreme is
    // positive. Rounding against the products' own maximum, not a bound on
    // it, matters for the asymmetric formats, whose level sums and min
    // terms cancel in the output.
    __m512 q[T / 16], mx = _mm512_setzero_ps();
    for (std::size_t k = 0; k < 4 * used; ++k) {
      // Parts past n: their scores are -inf and were not exponentiated.
      q[k] = 16 * k < n ? _mm512_loadu_ps(p + h * pstride + 16 * k) : _mm512_setzero_ps();
      for (std::size_t b = 0; b < dim / G; ++b)
        mx = _mm512_max_ps(
            mx, _mm512_abs_ps(_mm512_mul_ps(q[k], _mm512_loadu_ps(vs + T * b + 16 * k))));
    }
    const float wmax = _mm512_reduce_max_ps(mx);
    // w = round(p x scale x 32639 / wmax), |w| <= 127 x 257, split into
    // bytes w = 256 hi + lo with hi = (w + 128) >> 8 in [-127, 127] and lo in
    // [-128, 127], on int16 lanes (32 weights per instruction).
    wscale[h] = wmax / 32639.f;
    const __m512 inv = _mm512_set1_ps(wmax > 0.f ? 32639.f / wmax : 0.f);
    for (std::size_t k = 0; k < 4 * used; ++k) q[k] = _mm512_mul_ps(q[k], inv);
    for (std::size_t u = 0; u < used; ++u)
      for (std::size_t sg = 0; sg < dim / 32; ++sg) {
        pf.issue();
        const float* sb = vs + T * (32 * sg / G) + 64 * u;
        __m512i w[4], hi[2], lo[2];
        for (std::size_t k = 0; k < 4; ++k)
          w[k] = _mm512_cvtps_epi32(_mm512_mul_ps(q[4 * u + k], _mm512_loadu_ps(sb + 16 * k)));
        for (std::size_t k = 0; k < 2; ++k) {
          const __m512i x = _mm512_packs_epi32(w[2 * k], w[2 * k + 1]);
          hi[k] = _mm512_srai_epi16(_mm512_add_epi16(x, _mm512_set1_epi16(128)), 8);
          lo[k] = _mm512_sub_epi16(x, _mm512_slli_epi16(hi[k], 8));
        }
        std::int8_t* row = abuf + ((u * chunks + sg / 2) * 16 + 8 * (sg % 2) + 2 * h) * 64;
        _mm512_storeu_si512(row, _mm512_packs_epi16(hi[0], hi[1]));
        _mm512_storeu_si512(row + 64, _mm512_packs_epi16(lo[0], lo[1]));
      }
  }
  // C tiles in tmm0-3, the weights in tmm4, values in tmm5-7 (the fourth
  // reuses tmm5): each chunk's sums run over every subtile before they are
  // stored.
  for (std::size_t c = 0; c < chunks; ++c) {
    value_products<false>(abuf, bbuf, used, chunks, c, cbuf);
    for (std::size_t h = 0; h < 4; ++h) {
      pf.issue();
      const __m512 cr = _mm512_set1_ps(corr[h]), ws = _mm512_set1_ps(wscale[h]);
      for (std::size_t j = 0; j < 4; ++j) {
        const std::int32_t* C = cbuf + 256 * j;
        const __m512i hi = _mm512_mask_loadu_epi32(_mm512_loadu_si512(C + 16 * (2 * h)), 0xff00,
                                                   C + 16 * (8 + 2 * h));
        const __m512i lo = _mm512_mask_loadu_epi32(_mm512_loadu_si512(C + 16 * (2 * h + 1)), 0xff00,
                                                   C + 16 * (8 + 2 * h + 1));
        const __m512 x = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo));
        float* dst = o + h * ostride + 64 * c + 16 * j;
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(x, ws, _mm512_mul_ps(_mm512_loadu_ps(dst), cr)));
      }
    }
  }
}

#else

inline std::atomic<bool>& allowed() noexcept {
  static std::atomic<bool> on{true};
  return on;
}
inline bool available() noexcept { return false; }
inline void configure() noexcept {}
inline void release() noexcept {}
template <class F>
key_rows unpack_keys(const tile_quarters&, std::size_t, std::size_t, std::int8_t*) noexcept {
  return {};
}
template <class F>
query_tiles prepare_query(const float*, std::size_t, std::size_t, std::byte*) noexcept {
  return {};
}

#endif  // KVCACHE_HAS_AMX

}  // namespace detail::amx
}  // namespace v0
}  // namespace kvcache
