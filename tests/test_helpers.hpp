// Helpers shared by the test programs: a seeded random source, double
// precision brute-force versions of the kernels' building blocks, rounding
// constants for tolerances, and a byte-level snapshot of a KVCache.
//
// Every brute force here is written from the defining formula, loop by loop,
// in double, so that it shares no code path with the kernel it checks.
#pragma once

#include "kvevict/common.hpp"
#include "kvevict/kv_cache.hpp"
#include "kvevict/rope.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

namespace kvevict::test {

using RowMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Unit roundoff (half the distance from 1 to the next representable value)
// of the storage types: float 2^-24, Eigen::half 2^-11, Eigen::bfloat16 2^-8.
inline constexpr double float_unit_roundoff = 0x1p-24;
inline constexpr double half_unit_roundoff = 0x1p-11;
inline constexpr double bfloat16_unit_roundoff = 0x1p-8;

template <class Scalar>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<Scalar, Eigen::half>) {
    return half_unit_roundoff;
  } else if constexpr (std::is_same_v<Scalar, Eigen::bfloat16>) {
    return bfloat16_unit_roundoff;
  } else {
    return float_unit_roundoff;
  }
}

// Seeded random source. The mapping from the 64-bit engine to doubles is
// written out so that a seed gives the same inputs with every standard
// library (std::uniform_real_distribution is implementation-defined).
class Random {
 public:
  explicit Random(std::uint64_t seed) : engine_(seed) {}

  // Uniform in [lo, hi).
  double uniform(double lo, double hi) {
    const double unit = static_cast<double>(engine_() >> 11) * 0x1p-53;
    return lo + (hi - lo) * unit;
  }

  // Uniform integer in [lo, hi], both ends included.
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {
    const auto span = static_cast<std::uint64_t>(hi - lo) + 1;
    return lo + static_cast<std::int64_t>(engine_() % span);
  }

  bool coin(double probability_true) { return uniform(0.0, 1.0) < probability_true; }

  RowMatrixXf matrix(std::int64_t rows, std::int64_t cols, double lo = -1.0, double hi = 1.0) {
    RowMatrixXf out(rows, cols);
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) out(r, c) = static_cast<float>(uniform(lo, hi));
    }
    return out;
  }

  std::vector<float> vector(std::int64_t n, double lo = -1.0, double hi = 1.0) {
    std::vector<float> out(static_cast<std::size_t>(n));
    for (auto& x : out) x = static_cast<float>(uniform(lo, hi));
    return out;
  }

  // Values drawn from {0, 1, ..., levels - 1} as floats, so that ties are
  // frequent. The values are exact in float.
  std::vector<float> quantized(std::int64_t n, std::int64_t levels) {
    std::vector<float> out(static_cast<std::size_t>(n));
    for (auto& x : out) x = static_cast<float>(integer(0, levels - 1));
    return out;
  }

  // n strictly increasing positions starting at `first`, consecutive ones
  // differing by 1 to max_gap (gaps stand for evicted tokens).
  std::vector<std::int64_t> increasing_positions(std::int64_t n, std::int64_t first, std::int64_t max_gap) {
    std::vector<std::int64_t> out(static_cast<std::size_t>(n));
    std::int64_t position = first;
    for (auto& p : out) {
      p = position;
      position += integer(1, max_gap);
    }
    return out;
  }

  // A probability row: the softmax (computed in double) of n logits drawn
  // from [-logit_range, logit_range), rounded to float.
  std::vector<float> attention_row(std::int64_t n, double logit_range) {
    std::vector<double> logits(static_cast<std::size_t>(n));
    for (auto& z : logits) z = uniform(-logit_range, logit_range);
    std::vector<float> out(static_cast<std::size_t>(n));
    const std::vector<double> p = softmax(logits);
    for (std::size_t t = 0; t < p.size(); ++t) out[t] = static_cast<float>(p[t]);
    return out;
  }

  static std::vector<double> softmax(std::span<const double> logits) {
    double max_logit = -std::numeric_limits<double>::infinity();
    for (const double z : logits) max_logit = std::max(max_logit, z);
    std::vector<double> out(logits.size());
    double total = 0.0;
    for (std::size_t t = 0; t < logits.size(); ++t) {
      out[t] = std::exp(logits[t] - max_logit);
      total += out[t];
    }
    for (auto& p : out) p /= total;
    return out;
  }

 private:
  std::mt19937_64 engine_;
};

template <class Derived>
RowMatrixXd to_double(const Eigen::MatrixBase<Derived>& m) {
  RowMatrixXd out(m.rows(), m.cols());
  for (Eigen::Index r = 0; r < m.rows(); ++r) {
    for (Eigen::Index c = 0; c < m.cols(); ++c) out(r, c) = static_cast<double>(static_cast<float>(m(r, c)));
  }
  return out;
}

// Computes causal window attention from its definition, in double. Row r is
// the query at position query_positions[r % w]. It attends to the keys whose
// position is at most its own, with a softmax over those, and gives exactly
// 0 elsewhere. A query with no visible key gives a row of zeros.
inline RowMatrixXd brute_window_attention(const RowMatrixXd& queries, const RowMatrixXd& keys,
                                          std::span<const std::int64_t> key_positions,
                                          std::span<const std::int64_t> query_positions, double scale) {
  const Eigen::Index rows = queries.rows();
  const Eigen::Index n = keys.rows();
  const auto w = static_cast<Eigen::Index>(query_positions.size());
  RowMatrixXd out = RowMatrixXd::Zero(rows, n);
  for (Eigen::Index r = 0; r < rows; ++r) {
    const std::int64_t query_position = query_positions[static_cast<std::size_t>(r % w)];
    std::vector<double> logits;
    std::vector<Eigen::Index> visible;
    for (Eigen::Index t = 0; t < n; ++t) {
      if (key_positions[static_cast<std::size_t>(t)] > query_position) continue;
      double dot = 0.0;
      for (Eigen::Index k = 0; k < keys.cols(); ++k) dot += queries(r, k) * keys(t, k);
      logits.push_back(scale * dot);
      visible.push_back(t);
    }
    const std::vector<double> p = Random::softmax(logits);
    for (std::size_t i = 0; i < visible.size(); ++i) out(r, visible[i]) = p[i];
  }
  return out;
}

// Absolute error bound of the float window_attention kernel for one row,
// derived for a float evaluation with unit roundoff u = 2^-24:
//  - each logit is a dot product times scale. Its error is at most
//    gamma_terms * logit_magnitude, gamma_m = m u / (1 - m u), with
//    terms = head_dim + 1 for stored keys and queries (Higham, Accuracy and
//    Stability of Numerical Algorithms, 2nd ed., section 3.1). Callers whose
//    operands were rotated in float add the rotation error to `terms`;
//  - the maximum subtracted from every logit carries the same error, so each
//    exp argument is off by at most 2 delta_z, and exp adds u;
//  - the sum of n exponentials adds (n - 1) u and the division u.
// Probabilities are at most 1, so |p - p_ref| <= 2 delta_z + (n + 2) u to
// first order. The returned bound doubles it for second-order terms.
// `logit_magnitude` bounds scale * sum_k |q_k k_k| over the row's keys.
inline double window_attention_tolerance(double terms, std::int64_t n, double logit_magnitude) {
  const double u = float_unit_roundoff;
  const double gamma = terms * u / (1.0 - terms * u);
  const double delta_z = gamma * logit_magnitude;
  return 2.0 * (2.0 * delta_z + static_cast<double>(n + 2) * u);
}

// max over the rows of `keys` of scale * sum_k |query_k key_k|, the
// magnitude that scales the rounding error of a logit. `query` is [1 x d].
inline double logit_magnitude(const RowMatrixXd& query, const RowMatrixXd& keys, double scale) {
  double largest = 0.0;
  for (Eigen::Index t = 0; t < keys.rows(); ++t) {
    double sum = 0.0;
    for (Eigen::Index k = 0; k < keys.cols(); ++k) sum += std::abs(query(0, k) * keys(t, k));
    largest = std::max(largest, scale * sum);
  }
  return largest;
}

// Rotates `x` [d] by RoPE at `position` from the definition, in double:
// pair k is (2k, 2k+1) for adjacent pairing and (k, k + d/2) for half_split,
// rotated by the angle position * frequency_scale * base^(-2k/d).
inline std::vector<double> rope_reference(std::span<const float> x, double position, const RopeConfig& config) {
  const std::size_t d = x.size();
  std::vector<double> out(x.begin(), x.end());
  for (std::size_t k = 0; k < d / 2; ++k) {
    const double theta =
        config.frequency_scale * std::pow(config.base, -2.0 * static_cast<double>(k) / static_cast<double>(d));
    const double angle = position * theta;
    const std::size_t a = config.pairing == RopePairing::adjacent ? 2 * k : k;
    const std::size_t b = config.pairing == RopePairing::adjacent ? 2 * k + 1 : k + d / 2;
    const double x0 = x[a];
    const double x1 = x[b];
    out[a] = x0 * std::cos(angle) - x1 * std::sin(angle);
    out[b] = x0 * std::sin(angle) + x1 * std::cos(angle);
  }
  return out;
}

// Largest |x^p - reference^p| over every x >= 0 with |x - reference| <= delta,
// for p > 0. x^p is monotone, so the extremes sit at the two ends of the
// interval. Turns an error bound on a base into one on its power.
inline double power_difference_bound(double reference, double delta, double exponent) {
  const double at = std::pow(reference, exponent);
  const double above = std::pow(reference + delta, exponent) - at;
  const double below = at - std::pow(std::max(reference - delta, 0.0), exponent);
  return std::max(above, below);
}

// Deterministic top-k by full sort: ranks `candidates` by score, higher
// first, the larger slot first on equal scores, and returns the best k
// sorted by slot (all candidates when k exceeds their number).
inline std::vector<std::int64_t> brute_force_top_k(std::span<const float> scores,
                                                   std::vector<std::int64_t> candidates, std::int64_t k) {
  std::sort(candidates.begin(), candidates.end(), [&](std::int64_t a, std::int64_t b) {
    const float sa = scores[static_cast<std::size_t>(a)];
    const float sb = scores[static_cast<std::size_t>(b)];
    if (sa != sb) return sa > sb;
    return a > b;
  });
  const auto count = std::clamp<std::int64_t>(k, 0, static_cast<std::int64_t>(candidates.size()));
  candidates.resize(static_cast<std::size_t>(count));
  std::sort(candidates.begin(), candidates.end());
  return candidates;
}

// The raw bytes of everything a KVCache exposes: size, capacity, next
// position and, per KV head, keys, values, positions and every state
// channel. Two snapshots compare equal only when the cache is byte-identical.
struct CacheSnapshot {
  std::int64_t size = 0;
  std::int64_t capacity = 0;
  std::int64_t next_position = 0;
  std::vector<std::vector<unsigned char>> heads;

  template <class Scalar>
  static CacheSnapshot take(const KVCache<Scalar>& cache) {
    CacheSnapshot snapshot;
    snapshot.size = cache.size();
    snapshot.capacity = cache.capacity();
    snapshot.next_position = cache.next_position();
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      std::vector<unsigned char> bytes;
      append_bytes(bytes, cache.keys(j).data(), static_cast<std::size_t>(cache.keys(j).size()));
      append_bytes(bytes, cache.values(j).data(), static_cast<std::size_t>(cache.values(j).size()));
      append_bytes(bytes, cache.positions(j).data(), cache.positions(j).size());
      for (int channel = 0; channel < cache.state_channels(); ++channel) {
        append_bytes(bytes, cache.state(j, channel).data(), cache.state(j, channel).size());
      }
      snapshot.heads.push_back(std::move(bytes));
    }
    return snapshot;
  }

  friend bool operator==(const CacheSnapshot&, const CacheSnapshot&) = default;

 private:
  template <class T>
  static void append_bytes(std::vector<unsigned char>& bytes, const T* data, std::size_t count) {
    if (count == 0) return;
    const auto* first = reinterpret_cast<const unsigned char*>(data);
    bytes.insert(bytes.end(), first, first + count * sizeof(T));
  }
};

}  // namespace kvevict::test
