// Rotary position embeddings (RoPE, Su et al. 2021), applied by the cache when
// cache_config::rope.rotary_dim > 0.
//
// Pairs: element i with i + rotary_dim / 2 (Llama / Hugging Face rotate_half)
// by default, or (2i, 2i + 1) when `interleaved` (GPT-J, Meta's reference
// code). Pair i turns by position x theta^(-2i / rotary_dim); elements past
// rotary_dim are not rotated. Llama-3 frequency scaling (Meta's
// apply_scaling: wavelengths beyond original_max_position / low_freq_factor
// divided by `factor`, below original_max_position / high_freq_factor kept,
// smoothly blended between) is on when factor > 0.
//
// Angles are computed in double precision: positions reach 10^5 and more,
// where position x frequency in float loses the low bits of the angle (an
// error of ~0.01 rad at 10^5 in float).
#pragma once

#include <cmath>
#include <cstddef>
#include <numbers>
#include <vector>

#include "error.hpp"

namespace kvcache {
inline namespace v0 {

//! Llama-3 frequency scaling; off when factor is 0.
struct rope_scaling {
  double factor = 0;
  double low_freq_factor = 1;
  double high_freq_factor = 4;
  double original_max_position = 8192;
};

//! Rotary embedding parameters. rotary_dim 0: the cache applies no RoPE (the
//! caller rotates q and k itself; then the cache cannot rotate keys to
//! their positions inside the cache, see docs/eviction.md).
struct rope_config {
  double theta = 10000;
  std::size_t rotary_dim = 0;
  bool interleaved = false;
  rope_scaling scaling{};
};

namespace detail {

//! Throws kvcache::error naming the bad value; nothing else is checked here.
inline void check_rope(const rope_config& r, std::size_t head_dim) {
  if (r.rotary_dim == 0) return;
  require(r.rotary_dim % 2 == 0, "rotary_dim ", r.rotary_dim,
          " is odd; RoPE rotates pairs of elements");
  require(r.rotary_dim <= head_dim, "rotary_dim ", r.rotary_dim, " exceeds head_dim ", head_dim);
  require(std::isfinite(r.theta) && r.theta > 0, "RoPE theta ", r.theta, " must be finite and > 0");
  if (r.scaling.factor != 0)
    require(r.scaling.factor > 0 && r.scaling.high_freq_factor > r.scaling.low_freq_factor &&
                r.scaling.original_max_position > 0,
            "Llama-3 RoPE scaling (factor ", r.scaling.factor, ", low_freq_factor ",
            r.scaling.low_freq_factor, ", high_freq_factor ", r.scaling.high_freq_factor,
            ", original_max_position ", r.scaling.original_max_position,
            ") needs factor > 0, high > low and a positive original length");
}

//! The rotary_dim / 2 angular frequencies, scaled as configured.
inline std::vector<double> rope_frequencies(const rope_config& r) {
  const std::size_t half = r.rotary_dim / 2;
  std::vector<double> f(half);
  for (std::size_t i = 0; i < half; ++i) {
    double w = std::pow(r.theta, -2.0 * static_cast<double>(i) / static_cast<double>(r.rotary_dim));
    if (r.scaling.factor > 0) {
      const rope_scaling& s = r.scaling;
      const double wavelen = 2 * std::numbers::pi / w;
      const double low_wavelen = s.original_max_position / s.low_freq_factor;
      const double high_wavelen = s.original_max_position / s.high_freq_factor;
      if (wavelen > low_wavelen) {
        w /= s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                              (s.high_freq_factor - s.low_freq_factor);
        w = (1 - smooth) * w / s.factor + smooth * w;
      }
    }
    f[i] = w;
  }
  return f;
}

//! Per-position cosines and sines, shared by every head of a token.
struct rope_angles {
  std::vector<float> cs;  // (rotary_dim / 2, 2)   cos, sin

  void at(const std::vector<double>& freqs, std::size_t pos) {
    cs.resize(2 * freqs.size());
    const double p = static_cast<double>(pos);
    for (std::size_t i = 0; i < freqs.size(); ++i) {
      const double a = p * freqs[i];
      cs[2 * i] = static_cast<float>(std::cos(a));
      cs[2 * i + 1] = static_cast<float>(std::sin(a));
    }
  }
};

//! Rotates one head vector x in place by the angles of one position.
inline void rotate(float* x, const float* cs, std::size_t rotary_dim, bool interleaved) noexcept {
  const std::size_t half = rotary_dim / 2;
  for (std::size_t i = 0; i < half; ++i) {
    const std::size_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float c = cs[2 * i], s = cs[2 * i + 1];
    const float x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
  }
}

}  // namespace detail
}  // namespace v0
}  // namespace kvcache
