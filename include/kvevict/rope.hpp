// Rotary position embedding (RoPE) helpers for both position modes.
//
// RoPE at position p rotates coordinate pair k (0 <= k < d/2) by the angle
// p * theta_k, theta_k = frequency_scale * base^(-2k/d). Rotations compose,
// so a key rotated at p_old becomes a key rotated at p_new by rotating every
// pair by (p_new - p_old) * theta_k (see `RotaryEmbedding::rotate`).
#pragma once

#include "kvevict/common.hpp"

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict {

// Which coordinates form a rotated pair. llama2.c and Meta's reference rotate
// adjacent pairs (2k, 2k+1); Hugging Face Llama rotates (k, k + d/2).
enum class RopePairing { adjacent, half_split };

struct RopeConfig {
  double base = 10000.0;          // theta base of the model
  double frequency_scale = 1.0;   // fixed scaling of every frequency
  RopePairing pairing = RopePairing::adjacent;
};

// Rotates vectors of one head dimension. Angles are computed in double so
// positions up to millions keep their accuracy; the rotation itself is float.
class RotaryEmbedding {
 public:
  RotaryEmbedding() = default;

  RotaryEmbedding(int head_dim, RopeConfig config) : head_dim_(head_dim), config_(config) {
    if (head_dim <= 0 || head_dim % 2 != 0) {
      detail::throw_invalid("RotaryEmbedding: head_dim (", head_dim,
                            ") must be positive and even, because RoPE rotates pairs");
    }
    if (!(config.base > 1.0) || !std::isfinite(config.base)) {
      detail::throw_invalid("RotaryEmbedding: base (", config.base, ") must be finite and > 1");
    }
    if (!(config.frequency_scale > 0.0) || !std::isfinite(config.frequency_scale)) {
      detail::throw_invalid("RotaryEmbedding: frequency_scale (", config.frequency_scale,
                            ") must be finite and > 0");
    }
    inverse_frequency_.resize(static_cast<std::size_t>(head_dim / 2));
    for (int k = 0; k < head_dim / 2; ++k) {
      inverse_frequency_[static_cast<std::size_t>(k)] =
          config.frequency_scale * std::pow(config.base, -2.0 * k / head_dim);
    }
  }

  int head_dim() const { return head_dim_; }
  const RopeConfig& config() const { return config_; }

  // Rotates `x` [head_dim] in place as if it moved by `delta` positions.
  // Rotating at position p from the unrotated vector is rotate(x, p).
  void rotate(std::span<float> x, double delta) const {
    const int half = head_dim_ / 2;
    for (int k = 0; k < half; ++k) {
      const double angle = delta * inverse_frequency_[static_cast<std::size_t>(k)];
      const float c = static_cast<float>(std::cos(angle));
      const float s = static_cast<float>(std::sin(angle));
      const std::size_t a = pair_first(k);
      const std::size_t b = pair_second(k);
      const float x0 = x[a];
      const float x1 = x[b];
      x[a] = x0 * c - x1 * s;
      x[b] = x0 * s + x1 * c;
    }
  }

  // Rotates with precomputed cos and sin [head_dim/2] of one position.
  void rotate(std::span<float> x, std::span<const float> cos_row,
              std::span<const float> sin_row) const {
    const int half = head_dim_ / 2;
    for (int k = 0; k < half; ++k) {
      const std::size_t a = pair_first(k);
      const std::size_t b = pair_second(k);
      const float c = cos_row[static_cast<std::size_t>(k)];
      const float s = sin_row[static_cast<std::size_t>(k)];
      const float x0 = x[a];
      const float x1 = x[b];
      x[a] = x0 * c - x1 * s;
      x[b] = x0 * s + x1 * c;
    }
  }

  // Fills cos and sin tables [positions x head_dim/2] for positions 0..n-1.
  void fill_tables(std::int64_t positions, std::vector<float>& cos_table,
                   std::vector<float>& sin_table) const {
    const std::size_t half = static_cast<std::size_t>(head_dim_ / 2);
    cos_table.resize(static_cast<std::size_t>(positions) * half);
    sin_table.resize(static_cast<std::size_t>(positions) * half);
    for (std::int64_t p = 0; p < positions; ++p) {
      for (std::size_t k = 0; k < half; ++k) {
        const double angle = static_cast<double>(p) * inverse_frequency_[k];
        cos_table[static_cast<std::size_t>(p) * half + k] = static_cast<float>(std::cos(angle));
        sin_table[static_cast<std::size_t>(p) * half + k] = static_cast<float>(std::sin(angle));
      }
    }
  }

 private:
  std::size_t pair_first(int k) const {
    return config_.pairing == RopePairing::adjacent ? static_cast<std::size_t>(2 * k)
                                                    : static_cast<std::size_t>(k);
  }
  std::size_t pair_second(int k) const {
    return config_.pairing == RopePairing::adjacent ? static_cast<std::size_t>(2 * k + 1)
                                                    : static_cast<std::size_t>(k + head_dim_ / 2);
  }

  int head_dim_ = 0;
  RopeConfig config_{};
  std::vector<double> inverse_frequency_;
};

}  // namespace kvevict
