// What a policy sees at an eviction point, and the ring buffer of recent
// queries an engine keeps for scorers that re-score during decoding.
#pragma once

#include "kvevict/common.hpp"

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict {

// A read-only view of a dense row-major tensor [d0, d1, d2] of floats.
struct Tensor3View {
  const float* data = nullptr;
  std::int64_t d0 = 0;
  std::int64_t d1 = 0;
  std::int64_t d2 = 0;

  bool empty() const { return data == nullptr || d0 * d1 * d2 == 0; }
  std::int64_t numel() const { return d0 * d1 * d2; }

  // Block i of the first axis: [d1 x d2].
  Eigen::Map<const RowMatrixXf> block(std::int64_t i) const { return {data + i * d1 * d2, d1, d2}; }
  std::span<const float> row(std::int64_t i, std::int64_t r) const {
    return {data + (i * d1 + r) * d2, static_cast<std::size_t>(d2)};
  }
};

// The input of one observe/select call for one layer.
//
// Which fields a policy reads is stated in its header:
//   - attention: probabilities of this pass's queries over every cached slot,
//     [n_heads, rows, size()], each row summing to 1 over the slots its query
//     may see and exactly 0 elsewhere. Decode steps pass one row (the newest
//     query); prefill passes the rows the policy asks for (all prompt rows for
//     H2O, the last `w_obs` for SinkCLIP, the last one for TOVA).
//   - queries: the last `w` queries, [n_heads, w, head_dim], belonging to the
//     last w cached slots, rotated the way the cache stores keys: rotated at
//     their token positions in original mode, unrotated in cache_relative
//     mode (the scorer rotates query i at slot size() - w + i).
struct Observation {
  int n_heads = 0;           // query heads of the layer
  Tensor3View attention;     // [n_heads, rows, size()]
  Tensor3View queries;       // [n_heads, w, head_dim]
  std::int64_t appended = 0; // tokens appended since the previous observe call
  bool prefill = false;      // true when this pass is the prompt (prefill compression)
};

// Ring buffer of the last `window` queries of one layer, [n_heads, window,
// head_dim]. `push` is O(n_heads * head_dim) and never allocates; `view`
// linearises the buffer oldest-first into preallocated storage.
class QueryWindow {
 public:
  QueryWindow() = default;
  QueryWindow(int n_heads, int window, int head_dim)
      : n_heads_(n_heads), window_(window), head_dim_(head_dim) {
    if (n_heads <= 0 || window <= 0 || head_dim <= 0) {
      detail::throw_invalid("QueryWindow: n_heads (", n_heads, "), window (", window,
                            ") and head_dim (", head_dim, ") must be at least 1");
    }
    const auto total = static_cast<std::size_t>(n_heads) * static_cast<std::size_t>(window) *
                       static_cast<std::size_t>(head_dim);
    ring_.assign(total, 0.0f);
    linear_.assign(total, 0.0f);
  }

  int n_heads() const { return n_heads_; }
  int window() const { return window_; }
  int head_dim() const { return head_dim_; }
  // Number of queries held, at most window().
  int size() const { return count_; }

  // Appends one query per head: `query` is [n_heads x head_dim].
  void push(std::span<const float> query) {
    const auto per_query = static_cast<std::size_t>(n_heads_) * static_cast<std::size_t>(head_dim_);
    if (query.size() != per_query) {
      detail::throw_invalid("QueryWindow::push: query has ", query.size(),
                            " values, expected n_heads * head_dim = ", per_query);
    }
    detail::require_finite(query.data(), static_cast<std::int64_t>(query.size()), "QueryWindow::push: query");
    for (int h = 0; h < n_heads_; ++h) {
      std::copy_n(query.data() + static_cast<std::size_t>(h) * static_cast<std::size_t>(head_dim_),
                  head_dim_, ring_.data() + offset(h, next_));
    }
    next_ = (next_ + 1) % window_;
    count_ = std::min(count_ + 1, window_);
  }

  void clear() {
    next_ = 0;
    count_ = 0;
  }

  // The held queries, oldest first: [n_heads, size(), head_dim].
  Tensor3View view() {
    const int oldest = (next_ - count_ + window_) % window_;
    for (int h = 0; h < n_heads_; ++h) {
      for (int i = 0; i < count_; ++i) {
        const int from = (oldest + i) % window_;
        std::copy_n(ring_.data() + offset(h, from), head_dim_,
                    linear_.data() + (static_cast<std::size_t>(h) * static_cast<std::size_t>(count_) +
                                      static_cast<std::size_t>(i)) *
                                         static_cast<std::size_t>(head_dim_));
      }
    }
    return {linear_.data(), n_heads_, count_, head_dim_};
  }

 private:
  std::size_t offset(int h, int i) const {
    return (static_cast<std::size_t>(h) * static_cast<std::size_t>(window_) + static_cast<std::size_t>(i)) *
           static_cast<std::size_t>(head_dim_);
  }

  int n_heads_ = 0;
  int window_ = 0;
  int head_dim_ = 0;
  int next_ = 0;
  int count_ = 0;
  std::vector<float> ring_;
  std::vector<float> linear_;
};

}  // namespace kvevict
