// Spatial smoothing of a score row [P] along the token axis, so neighbours of
// important tokens survive with them.
//
//   avg:      sm[t] = (1/k) * sum_{u=t-k/2}^{t+k/2} s[u], s = 0 outside [0, P);
//             the divisor is always k (zero padding counted), so the first
//             and last k/2 tokens are damped (PyTorch avg_pool1d default).
//   max:      sm[t] = max over u in [t-k/2, t+k/2] intersected with [0, P).
//   shifted:  sm[t] = (1/K) * sum_{u=t-K/2+sh}^{t+K/2+sh} s[clamp(u, 0, P-1)],
//             edge values repeated ("replicate" padding); a positive shift
//             centres the average to the right of t.
//
// Adaptive pooling (ReST-KV) picks K and sh per query head from how far the
// attended region drifts between the two halves of the observation window.
#pragma once

#include "kvevict/common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict::kernels {

namespace detail_spatial {
inline void check_pool_args(const char* name, std::span<const float> in, std::int64_t k, std::span<float> out) {
  if (k < 1 || k % 2 == 0) {
    detail::throw_invalid(name, ": kernel size (", k, ") must be odd and at least 1");
  }
  if (out.size() != in.size()) {
    detail::throw_invalid(name, ": out has ", out.size(), " entries, expected ", in.size());
  }
  if (out.data() == in.data() && !in.empty()) {
    detail::throw_invalid(name, ": in and out must not alias");
  }
}
}  // namespace detail_spatial

// Symmetric average pooling with zero padding, divisor k. O(P) with a
// running sum in double.
inline void avg_pool(std::span<const float> in, std::int64_t k, std::span<float> out) {
  detail_spatial::check_pool_args("avg_pool", in, k, out);
  const auto p = static_cast<std::int64_t>(in.size());
  const std::int64_t half = k / 2;
  double sum = 0.0;
  for (std::int64_t u = 0; u < std::min(half, p); ++u) sum += in[static_cast<std::size_t>(u)];
  for (std::int64_t t = 0; t < p; ++t) {
    const std::int64_t enter = t + half;
    const std::int64_t leave = t - half - 1;
    if (enter < p) sum += in[static_cast<std::size_t>(enter)];
    if (leave >= 0) sum -= in[static_cast<std::size_t>(leave)];
    out[static_cast<std::size_t>(t)] = static_cast<float>(sum / static_cast<double>(k));
  }
}

// Symmetric max pooling; positions outside [0, P) are ignored. O(P) with a
// monotonic deque kept in `scratch` (reused, no allocation at steady state).
inline void max_pool(std::span<const float> in, std::int64_t k, std::span<float> out,
                     std::vector<std::int64_t>& scratch) {
  detail_spatial::check_pool_args("max_pool", in, k, out);
  const auto p = static_cast<std::int64_t>(in.size());
  const std::int64_t half = k / 2;
  scratch.resize(static_cast<std::size_t>(p));
  std::int64_t head = 0;  // deque = scratch[head, tail): indices with decreasing values
  std::int64_t tail = 0;
  std::int64_t next = 0;  // next index to enter the window
  for (std::int64_t t = 0; t < p; ++t) {
    const std::int64_t right = std::min(p - 1, t + half);
    for (; next <= right; ++next) {
      const float value = in[static_cast<std::size_t>(next)];
      while (tail > head && in[static_cast<std::size_t>(scratch[static_cast<std::size_t>(tail - 1)])] <= value) --tail;
      scratch[static_cast<std::size_t>(tail++)] = next;
    }
    while (scratch[static_cast<std::size_t>(head)] < t - half) ++head;
    out[static_cast<std::size_t>(t)] = in[static_cast<std::size_t>(scratch[static_cast<std::size_t>(head)])];
  }
}

// Average of width K centred at t + shift with replicate padding. Requires
// odd K >= 1 and |shift| <= K/2. O(P) with a running sum in double.
inline void shifted_avg_pool(std::span<const float> in, std::int64_t k, std::int64_t shift,
                             std::span<float> out) {
  detail_spatial::check_pool_args("shifted_avg_pool", in, k, out);
  if (shift < -(k / 2) || shift > k / 2) {
    detail::throw_invalid("shifted_avg_pool: shift (", shift, ") must be in [-", k / 2, ", ", k / 2,
                          "] for kernel size ", k);
  }
  const auto p = static_cast<std::int64_t>(in.size());
  if (p == 0) return;
  const std::int64_t half = k / 2;
  const auto at = [&](std::int64_t u) { return static_cast<double>(in[static_cast<std::size_t>(std::clamp<std::int64_t>(u, 0, p - 1))]); };
  double sum = 0.0;
  for (std::int64_t u = -half + shift; u <= half + shift; ++u) sum += at(u);
  for (std::int64_t t = 0; t < p; ++t) {
    if (t > 0) sum += at(t + half + shift) - at(t - 1 - half + shift);
    out[static_cast<std::size_t>(t)] = static_cast<float>(sum / static_cast<double>(k));
  }
}

// Rounding rule of ReST-KV's adaptive shift sh = D / S_a.
//  - trunc: toward zero (kvevict's default).
//  - reference: floor(D / S_a) if D > 0, else floor(D / S_a) + 1, as the
//    reference code computes it. It agrees with trunc for negative non-integer
//    ratios but gives +1 at D = 0 and -(m-1) at D = -m * S_a.
enum class ShiftRounding { trunc, reference };

struct AdaptiveKernel {
  std::int64_t size = 1;   // K, odd
  std::int64_t shift = 0;  // sh, |sh| <= K/2
  double drift = 0.0;      // D
};

// Sum of the slot indices of the m largest entries of `row` [n] (m clamped
// to [0, n]); ties rank the later slot first. O(n) with a partial selection
// over `scratch`.
//
// When m is small next to n, a strided sample of the row gives a bound that
// about 2m entries reach, and only those candidates are ranked. If fewer
// than m reach it, the bound was too high and the whole row is ranked. The
// top m entries are unique under the ranking (ties broken by slot), so both
// paths return the same sum; the sampled one reads the row once and ranks a
// few thousand candidates instead of n.
inline std::int64_t top_m_index_sum(std::span<const float> row, std::int64_t m,
                                    std::vector<std::int64_t>& scratch) {
  const auto n = static_cast<std::int64_t>(row.size());
  m = std::clamp<std::int64_t>(m, 0, n);
  if (m == 0) return 0;
  scratch.resize(static_cast<std::size_t>(n));
  const auto ranks_before = [&](std::int64_t a, std::int64_t b) {
    const float sa = row[static_cast<std::size_t>(a)];
    const float sb = row[static_cast<std::size_t>(b)];
    return sa > sb || (sa == sb && a > b);
  };
  const auto sum_of_first = [&](std::int64_t count) {
    std::int64_t sum = 0;
    for (std::int64_t i = 0; i < count; ++i) sum += scratch[static_cast<std::size_t>(i)];
    return sum;
  };

  constexpr std::int64_t sample_size = 1024;
  if (m < n && 8 * m <= n && n >= 4 * sample_size) {
    const std::int64_t stride = n / sample_size;
    for (std::int64_t k = 0; k < sample_size; ++k) scratch[static_cast<std::size_t>(k)] = k * stride;
    // Sample rank whose value about 2m entries of the row reach, plus margin.
    const std::int64_t rank = std::min(sample_size - 1, (2 * m * sample_size + n - 1) / n + 8);
    std::nth_element(scratch.begin(), scratch.begin() + rank, scratch.begin() + sample_size, ranks_before);
    const float bound = row[static_cast<std::size_t>(scratch[static_cast<std::size_t>(rank)])];
    std::int64_t candidates = 0;
    for (std::int64_t t = 0; t < n; ++t) {
      scratch[static_cast<std::size_t>(candidates)] = t;
      candidates += row[static_cast<std::size_t>(t)] >= bound ? 1 : 0;
    }
    if (candidates >= m) {
      // Every entry ranked in the top m is at least the m-th largest value,
      // which is at least `bound`, so all of them are candidates.
      std::nth_element(scratch.begin(), scratch.begin() + (m - 1), scratch.begin() + candidates, ranks_before);
      return sum_of_first(m);
    }
  }

  for (std::int64_t t = 0; t < n; ++t) scratch[static_cast<std::size_t>(t)] = t;
  if (m < n) {
    std::nth_element(scratch.begin(), scratch.begin() + (m - 1), scratch.end(), ranks_before);
  }
  return sum_of_first(m);
}

// Mean slot index of the m largest entries of `row` [n]; ties rank the later
// slot first. 0 when m or n is 0.
inline double top_m_centroid(std::span<const float> row, std::int64_t m, std::vector<std::int64_t>& scratch) {
  const std::int64_t count = std::clamp<std::int64_t>(m, 0, static_cast<std::int64_t>(row.size()));
  if (count == 0) return 0.0;
  return static_cast<double>(top_m_index_sum(row, count, scratch)) / static_cast<double>(count);
}

// Derives ReST-KV's adaptive kernel of one query head from its window
// attention `rows` [w, n] (w >= 2):
//  1. c_i = mean slot index of the m largest weights of row i (all n slots);
//  2. D = mean of c_i over the first half (rows 0..w/2-1) minus the mean over
//     the second half (rows w/2..w-1); a positive D means later queries look
//     further back;
//  3. K = max(k_min, 2 * floor(|D| / scale) + 1);
//  4. sh = D / scale rounded per `rounding`, clamped to |sh| <= K/2.
// Odd w is allowed: the halves then have w/2 and w - w/2 rows.
inline AdaptiveKernel adaptive_kernel(const Eigen::Ref<const RowMatrixXf>& rows, std::int64_t m,
                                      std::int64_t k_min, double scale, ShiftRounding rounding,
                                      std::vector<std::int64_t>& scratch) {
  const std::int64_t w = rows.rows();
  if (w < 2) detail::throw_invalid("adaptive_kernel: window (", w, ") must be at least 2");
  if (k_min < 1 || k_min % 2 == 0) {
    detail::throw_invalid("adaptive_kernel: minimum kernel size (", k_min, ") must be odd and at least 1");
  }
  if (!(scale > 0.0) || !std::isfinite(scale)) {
    detail::throw_invalid("adaptive_kernel: scale (", scale, ") must be finite and > 0");
  }
  // D = (A * h2 - B * h1) / (m * h1 * h2), with A and B the halves' integer
  // sums of top-m slot indices. One rounding at the final division makes D
  // exact whenever it is representable, so D = 0 and D = -m * scale hit the
  // rounding rules exactly (summing rounded centroids can give -1e-16 or
  // 3.9999999999999996 there, which changes K and the shift).
  const std::int64_t first_half = w / 2;
  const std::int64_t second_half = w - first_half;
  const std::int64_t used = std::clamp<std::int64_t>(m, 0, rows.cols());
  std::int64_t first = 0;
  std::int64_t second = 0;
  for (std::int64_t i = 0; i < w; ++i) {
    const std::span<const float> row(rows.row(i).data(), static_cast<std::size_t>(rows.cols()));
    (i < first_half ? first : second) += top_m_index_sum(row, used, scratch);
  }
  AdaptiveKernel kernel;
  if (used > 0) {
    kernel.drift = static_cast<double>(first * second_half - second * first_half) /
                   static_cast<double>(used * first_half * second_half);
  }
  const double ratio = kernel.drift / scale;
  kernel.size = std::max<std::int64_t>(k_min, 2 * static_cast<std::int64_t>(std::floor(std::abs(ratio))) + 1);
  if (rounding == ShiftRounding::trunc) {
    kernel.shift = static_cast<std::int64_t>(std::trunc(ratio));
  } else {
    kernel.shift = static_cast<std::int64_t>(std::floor(ratio)) + (kernel.drift > 0.0 ? 0 : 1);
  }
  kernel.shift = std::clamp<std::int64_t>(kernel.shift, -(kernel.size / 2), kernel.size / 2);
  return kernel;
}

}  // namespace kvevict::kernels
