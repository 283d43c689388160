// The selection kvevict-select runs: fills a cache with one layer's keys and
// values, builds the observation the policy needs, and compresses the
// prefill once.
#pragma once

#include "select_arguments.hpp"
#include "select_inputs.hpp"

#include <kvevict/registry.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace kvevict::tools {

// Observation of a prompt of n tokens, [n_heads, rows, n] attention rows and
// [n_heads, w, head_dim] window queries, with the buffers it points into.
// Not copyable or movable, so the views stay valid.
class PrefillObservation {
 public:
  PrefillObservation(const SelectInputs& inputs, const ObservationNeeds& needs)
      : n_heads_(inputs.n_heads), n_tokens_(inputs.n_tokens) {
    const std::int64_t n = inputs.n_tokens;
    const std::int64_t d = inputs.head_dim;
    const std::int64_t heads = inputs.n_heads;

    // Window queries: the last w query rows of every head. A prompt shorter
    // than the window gives all its rows; the policy keeps everything then.
    const std::int64_t w = std::min(needs.window_queries, n);
    if (w > 0) {
      queries_.resize(static_cast<std::size_t>(heads * w * d));
      for (std::int64_t h = 0; h < heads; ++h) {
        const float* first = inputs.queries.data.data() + (h * n + n - w) * d;
        std::copy_n(first, w * d, queries_.data() + h * w * d);
      }
      query_view_ = {queries_.data(), heads, w, d};
    }

    const std::int64_t rows = needs.prefill_attention_rows < 0 ? n : std::min(needs.prefill_attention_rows, n);
    if (rows > 0) {
      // heads * rows * n can exceed int64 for absurd shapes; report it as the
      // allocation failure it would be.
      const double bytes =
          static_cast<double>(heads) * static_cast<double>(rows) * static_cast<double>(n) * sizeof(float);
      if (bytes > static_cast<double>(std::numeric_limits<std::ptrdiff_t>::max())) throw std::bad_alloc();
      attention_.resize(static_cast<std::size_t>(heads * rows * n));
      causal_attention_rows(inputs, rows, attention_);
      attention_view_ = {attention_.data(), heads, rows, n};
    }
  }

  PrefillObservation(const PrefillObservation&) = delete;
  PrefillObservation& operator=(const PrefillObservation&) = delete;

  Observation view() const {
    return {.n_heads = n_heads_,
            .attention = attention_view_,
            .queries = query_view_,
            .appended = n_tokens_,
            .prefill = true};
  }

  // Writes the causal softmax rows of the last `rows` queries of every head
  // into `out` [n_heads, rows, n]: row i belongs to the query at position
  // n - rows + i and attends to keys 0 .. n - rows + i. Scale 1/sqrt(head_dim),
  // max-subtracted, accumulated in float; masked entries are exactly 0.
  static void causal_attention_rows(const SelectInputs& inputs, std::int64_t rows, std::span<float> out) {
    const std::int64_t n = inputs.n_tokens;
    const std::int64_t d = inputs.head_dim;
    const int group = inputs.n_heads / inputs.n_kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int h = 0; h < inputs.n_heads; ++h) {
      const int j = h / group;
      const Eigen::Map<const RowMatrixXf> queries(inputs.queries.data.data() + (h * n + n - rows) * d, rows, d);
      const Eigen::Map<const RowMatrixXf> keys(inputs.keys.data.data() + j * n * d, n, d);
      Eigen::Map<RowMatrixXf> logits(out.data() + h * rows * n, rows, n);
      logits.noalias() = (queries * keys.transpose()) * scale;
      for (std::int64_t i = 0; i < rows; ++i) {
        const std::int64_t visible = n - rows + i + 1;
        auto row = logits.row(i);
        const float max_logit = row.head(visible).maxCoeff();
        float total = 0.0f;
        for (std::int64_t t = 0; t < visible; ++t) {
          row(t) = std::exp(row(t) - max_logit);
          total += row(t);
        }
        row.head(visible) /= total;
        row.tail(n - visible).setZero();
      }
    }
  }

 private:
  int n_heads_ = 0;
  std::int64_t n_tokens_ = 0;
  std::vector<float> queries_;
  std::vector<float> attention_;
  Tensor3View query_view_;
  Tensor3View attention_view_;
};

// Repeats every KV head to the query heads of its group, so keys and values
// become [n_heads, n, head_dim] and query head h reads KV head h.
inline void repeat_kv_heads(SelectInputs& inputs) {
  const int group = inputs.n_heads / inputs.n_kv_heads;
  const std::int64_t block = inputs.n_tokens * inputs.head_dim;
  const auto repeat = [&](NpyArray<float>& array) {
    std::vector<float> repeated(static_cast<std::size_t>(inputs.n_heads * block));
    for (int h = 0; h < inputs.n_heads; ++h) {
      std::copy_n(array.data.data() + (h / group) * block, block, repeated.data() + h * block);
    }
    array.data = std::move(repeated);
    array.shape[0] = inputs.n_heads;
  };
  repeat(inputs.keys);
  repeat(inputs.values);
  inputs.n_kv_heads = inputs.n_heads;
}

// Fills a cache in original position mode (the keys are already rotated)
// with positions 0 .. n-1 of every KV head.
inline KVCache<float> fill_cache(const SelectInputs& inputs, int state_channels) {
  KVCache<float> cache({.n_kv_heads = inputs.n_kv_heads,
                        .head_dim = inputs.head_dim,
                        .positions = PositionMode::original,
                        .state_channels = state_channels,
                        .capacity = inputs.n_tokens});
  const std::int64_t rows = static_cast<std::int64_t>(inputs.n_kv_heads) * inputs.n_tokens;
  // [kv_heads, n, d] in C order is the head-major [kv_heads * n, d] that
  // append expects.
  const Eigen::Map<const RowMatrixXf> keys(inputs.keys.data.data(), rows, inputs.head_dim);
  const Eigen::Map<const RowMatrixXf> values(inputs.values.data.data(), rows, inputs.head_dim);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(inputs.n_tokens));
  std::iota(positions.begin(), positions.end(), std::int64_t{0});
  cache.append(keys, values, positions);
  return cache;
}

// Runs one prefill compression of `policy` on `cache`: observe, then select
// and keep when the cache is over the policy's budget. Writes the kept slots
// into `plan`: every slot when nothing is evicted. With `per_query_head` the
// policy must be ReST-KV and the plan gets one row per query head. The cache
// is then not compacted, because it has fewer KV heads than the plan has rows.
inline void compress_once(AnyPolicy<float>& policy, KVCache<float>& cache, const Observation& observation,
                          bool per_query_head, KeepPlan& plan) {
  if (per_query_head) {
    auto& restkv = std::get<RestKV<float>>(policy.variant());
    restkv.observe(cache, observation);
    restkv.select_query_heads(cache, observation, plan);
    return;
  }
  if (!compress_prefill(policy, cache, observation, plan)) {
    plan.reset(cache.n_kv_heads(), cache.size());
    plan.fill_identity();
  }
}

// Median of `samples`, which must not be empty; the mean of the two middle
// values for an even count.
inline double median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  const std::size_t middle = samples.size() / 2;
  return samples.size() % 2 == 1 ? samples[middle] : 0.5 * (samples[middle - 1] + samples[middle]);
}

}  // namespace kvevict::tools
