// Window attention: causal softmax of the last w queries over every cached
// key, the observation that scorers (SnapKV, ReST-KV) read.
//
//   A[i][t] = exp(z[i][t] - m_i) / sum_u exp(z[i][u] - m_i)   for pos[t] <= qpos[i]
//   A[i][t] = 0                                              otherwise
//   z[i][t] = scale * dot(Q[i], K[t]),  m_i = max over visible u of z[i][u]
//
// The causal mask is by position, not by row index: every key whose position
// is at most the query's own is visible. Masked entries are excluded from
// the normaliser, never given a large negative logit.
#pragma once

#include "kvevict/common.hpp"
#include "kvevict/kv_cache.hpp"
#include "kvevict/observation.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

namespace kvevict::kernels {

// Softmax rows whose logits all lie within this distance below the row's
// maximum use Eigen's vectorised exp, which clamps its argument at about
// -88.7, a value such rows never reach. Other rows use std::exp.
inline constexpr float vector_exp_min_argument = -87.0f;

// Computes attention probabilities of `queries` over `keys`.
//   queries:         [rows, d] float, already rotated as attention rotates them
//   keys:            [n, d] float, already rotated
//   key_positions:   [n] strictly increasing positions used for the mask
//   query_positions: [w]; query row r has position query_positions[r % w], so
//                    the rows of g query heads can be stacked head-major
//   scale:           softmax scale, usually 1/sqrt(d)
//   out:             [rows, n] probabilities; rows sum to 1 over visible keys
// Throws std::invalid_argument on a shape mismatch or when a query sees no
// key (its position is below every key position). Cost O(rows * n * d).
inline void window_attention(const Eigen::Ref<const RowMatrixXf>& queries,
                             const Eigen::Ref<const RowMatrixXf>& keys,
                             std::span<const std::int64_t> key_positions,
                             std::span<const std::int64_t> query_positions, float scale,
                             Eigen::Ref<RowMatrixXf> out) {
  const std::int64_t rows = queries.rows();
  const std::int64_t n = keys.rows();
  const auto w = static_cast<std::int64_t>(query_positions.size());
  if (queries.cols() != keys.cols()) {
    detail::throw_invalid("window_attention: queries have head_dim ", queries.cols(), ", keys have ",
                          keys.cols());
  }
  if (static_cast<std::int64_t>(key_positions.size()) != n) {
    detail::throw_invalid("window_attention: key_positions has ", key_positions.size(),
                          " entries, expected one per key (", n, ")");
  }
  if (w <= 0 || rows % w != 0) {
    detail::throw_invalid("window_attention: ", rows, " query rows are not a multiple of the ", w,
                          " query positions");
  }
  if (out.rows() != rows || out.cols() != n) {
    detail::throw_invalid("window_attention: out is [", out.rows(), " x ", out.cols(), "], expected [",
                          rows, " x ", n, "]");
  }

  // scale * (Q K^T), not (Q K^T) * scale: Eigen folds a scalar on the left
  // into the GEMM, while on the right it evaluates the product into an
  // [rows x n] temporary first.
  out.noalias() = scale * (queries * keys.transpose());
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t query_position = query_positions[static_cast<std::size_t>(r % w)];
    const auto visible = static_cast<std::int64_t>(
        std::upper_bound(key_positions.begin(), key_positions.end(), query_position) -
        key_positions.begin());
    if (visible == 0) {
      detail::throw_invalid("window_attention: query row ", r, " at position ", query_position,
                            " sees no key (first key position ", n > 0 ? key_positions[0] : -1, ")");
    }
    auto row = out.row(r);
    const float max_logit = row.head(visible).maxCoeff();
    const float min_logit = row.head(visible).minCoeff();
    if (min_logit - max_logit >= vector_exp_min_argument) {
      // Eigen's vectorised exp: several times faster than a std::exp loop,
      // within a few float ulps of it.
      auto weights = row.head(visible).array();
      weights = (weights - max_logit).exp();
      weights /= weights.sum();
    } else {
      // Eigen's exp clamps arguments below about -88.7, where std::exp
      // gives denormals or 0; rows that reach that far keep std::exp.
      float total = 0.0f;
      for (std::int64_t t = 0; t < visible; ++t) {
        const float p = std::exp(row(t) - max_logit);
        row(t) = p;
        total += p;
      }
      row.head(visible) /= total;
    }
    row.tail(n - visible).setZero();
  }
}

// Scratch storage for group_window_attention, reused across calls. Its Eigen
// matrices reallocate whenever their size changes, so repeated scoring stops
// allocating only when every call scores the same cache size (as decode-time
// re-scoring does, at budget + slack + 1 slots).
struct WindowAttentionWorkspace {
  RowMatrixXf keys;                        // [n, d] rotated keys of one KV head (unused for
                                           // float keys in original mode, read in place)
  RowMatrixXf queries;                     // [g * w, d] rotated queries of one group
  std::vector<std::int64_t> key_positions; // [n]
  std::vector<std::int64_t> query_positions; // [w]
};

// Window attention of the g query heads that read KV head j (query head q
// reads KV head q / g, g = n_heads / n_kv_heads), over the whole cache.
//   queries: [n_heads, w, d] in the cache's rotation convention (rotated at
//            token positions in original mode, unrotated in cache_relative
//            mode); query i belongs to slot size() - w + i.
//   out:     [g * w, size()], rows q' * w + i for the q'-th head of the group.
// In cache_relative mode keys are rotated at their slot index and window
// query i at slot size() - w + i, so scores see the positions attention sees.
template <class Scalar>
void group_window_attention(const KVCache<Scalar>& cache, int j, const Tensor3View& queries, float scale,
                            RowMatrixXf& out, WindowAttentionWorkspace& workspace) {
  const std::int64_t n = cache.size();
  const int d = cache.head_dim();
  const std::int64_t n_heads = queries.d0;
  const std::int64_t w = queries.d1;
  if (n_heads <= 0 || n_heads % cache.n_kv_heads() != 0) {
    detail::throw_invalid("group_window_attention: n_heads (", n_heads,
                          ") must be a positive multiple of n_kv_heads (", cache.n_kv_heads(), ")");
  }
  if (queries.d2 != d) {
    detail::throw_invalid("group_window_attention: queries have head_dim ", queries.d2,
                          ", the cache has ", d);
  }
  if (w < 1 || w > n) {
    detail::throw_invalid("group_window_attention: window (", w, ") must be in [1, size() = ", n, "]");
  }
  const std::int64_t groups = n_heads / cache.n_kv_heads();

  // Float keys stored rotated (original mode) are what attention reads, so
  // they are read in place; other caches are converted (and rotated) into
  // the workspace.
  constexpr bool float_storage = std::is_same_v<Scalar, float>;
  const bool read_in_place = float_storage && cache.position_mode() == PositionMode::original;
  if (!read_in_place) {
    workspace.keys.resize(n, d);
    cache.rotated_keys(j, workspace.keys);
  }
  workspace.key_positions.resize(static_cast<std::size_t>(n));
  workspace.query_positions.resize(static_cast<std::size_t>(w));
  for (std::int64_t t = 0; t < n; ++t) {
    workspace.key_positions[static_cast<std::size_t>(t)] = cache.attention_position(j, t);
  }
  for (std::int64_t i = 0; i < w; ++i) {
    workspace.query_positions[static_cast<std::size_t>(i)] = cache.attention_position(j, n - w + i);
  }

  workspace.queries.resize(groups * w, d);
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t q = static_cast<std::int64_t>(j) * groups + g;
    for (std::int64_t i = 0; i < w; ++i) {
      auto row = workspace.queries.row(g * w + i);
      const auto source = queries.row(q, i);
      std::copy(source.begin(), source.end(), row.data());
      cache.rotate_at_slot(std::span<float>(row.data(), static_cast<std::size_t>(d)), n - w + i);
    }
  }
  out.resize(groups * w, n);
  if constexpr (float_storage) {
    if (read_in_place) {
      window_attention(workspace.queries, cache.keys(j), workspace.key_positions, workspace.query_positions, scale,
                       out);
      return;
    }
  }
  window_attention(workspace.queries, workspace.keys, workspace.key_positions, workspace.query_positions,
                   scale, out);
}

}  // namespace kvevict::kernels
