// Temporal smoothing: one weight per window query, so that a window of
// attention rows [w, n] becomes one row [n].
//
// Mean: every query weighs 1/w. EMA (exponential moving average, oldest query
// first, started at the oldest query): acc = A[0]; acc = alpha * A[i] +
// (1 - alpha) * acc for i = 1..w-1. Its closed form gives query 0 the weight
// (1-alpha)^(w-1) and query i >= 1 the weight alpha * (1-alpha)^(w-1-i); the
// weights sum to 1 and the newest query weighs alpha. The start value is not
// discounted by alpha, so for alpha < 0.5 the oldest query outweighs the
// second oldest (ReST-KV reference behaviour).
#pragma once

#include "kvevict/common.hpp"

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict::kernels {

enum class TemporalMode { mean, ema };

// Fills `weights` [w] with the per-query weights of `mode`. alpha is read
// only by ema and must be in (0, 1].
inline void temporal_weights(TemporalMode mode, float alpha, std::span<float> weights) {
  const auto w = static_cast<std::int64_t>(weights.size());
  if (w < 1) detail::throw_invalid("temporal_weights: window (", w, ") must be at least 1");
  if (mode == TemporalMode::mean) {
    for (auto& weight : weights) weight = 1.0f / static_cast<float>(w);
    return;
  }
  if (!(alpha > 0.0f && alpha <= 1.0f)) {
    detail::throw_invalid("temporal_weights: alpha (", alpha, ") must be in (0, 1]");
  }
  const double keep = 1.0 - static_cast<double>(alpha);
  weights[0] = static_cast<float>(std::pow(keep, static_cast<double>(w - 1)));
  for (std::int64_t i = 1; i < w; ++i) {
    weights[static_cast<std::size_t>(i)] =
        static_cast<float>(static_cast<double>(alpha) * std::pow(keep, static_cast<double>(w - 1 - i)));
  }
}

// Aggregates the first `columns` columns of `rows` [w, n] with `weights` [w]:
//   out[t] = sum_i weights[i] * rows(i, t),  0 <= t < columns.
// Cost O(w * columns).
inline void temporal_aggregate(const Eigen::Ref<const RowMatrixXf>& rows, std::span<const float> weights,
                               std::int64_t columns, std::span<float> out) {
  if (static_cast<std::int64_t>(weights.size()) != rows.rows()) {
    detail::throw_invalid("temporal_aggregate: ", weights.size(), " weights for ", rows.rows(), " rows");
  }
  if (columns < 0 || columns > rows.cols() || static_cast<std::int64_t>(out.size()) < columns) {
    detail::throw_invalid("temporal_aggregate: columns (", columns, ") must be in [0, ", rows.cols(),
                          "] and fit out (", out.size(), ")");
  }
  Eigen::Map<Eigen::RowVectorXf> result(out.data(), columns);
  const Eigen::Map<const Eigen::RowVectorXf> weight_row(weights.data(), rows.rows());
  result.noalias() = weight_row * rows.leftCols(columns);
}

// Mean over the window queries of the first `columns` columns.
inline void temporal_mean(const Eigen::Ref<const RowMatrixXf>& rows, std::int64_t columns,
                          std::span<float> out, std::vector<float>& weights) {
  weights.resize(static_cast<std::size_t>(rows.rows()));
  temporal_weights(TemporalMode::mean, 1.0f, weights);
  temporal_aggregate(rows, weights, columns, out);
}

// EMA over the window queries (oldest first) of the first `columns` columns.
inline void temporal_ema(const Eigen::Ref<const RowMatrixXf>& rows, std::int64_t columns, float alpha,
                         std::span<float> out, std::vector<float>& weights) {
  weights.resize(static_cast<std::size_t>(rows.rows()));
  temporal_weights(TemporalMode::ema, alpha, weights);
  temporal_aggregate(rows, weights, columns, out);
}

}  // namespace kvevict::kernels
