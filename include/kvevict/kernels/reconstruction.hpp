// Output-reconstruction score (ReST-KV): how much one query head's attention
// output, projected by W_o, changes when token t alone is removed and the
// other weights renormalise.
//
// With weights a_u summing to 1 and output o = sum_u a_u v_u, removing t gives
// o' = (o - a_t v_t) / (1 - a_t), so exactly
//   o - o' = (a_t / (1 - a_t)) * (v_t - o)
// and the projected change has norm r_t * ||W_o^q (v_t - o)||, r_t the odds
// ratio. The score is r_t * e_t^tau with e_t = ||W_o^q (o - v_t)||.
//
// e_t is computed through the Gram matrix G = W_o^q^T W_o^q (d x d), never by
// materialising W_o^q v for every token:
//   e_t^2 = (o - v_t)^T G (o - v_t) = o^T G o - 2 (G o)^T v_t + v_t^T G v_t
// where v_t^T G v_t can be cached per slot when the token is appended.
// Numerics: the odds ratio is a / max(1 - a, eps_odds), eps_odds = 1e-6, so
// a weight that rounds to 1 gives a finite score (its value equals o, e is
// about 0); the expanded quadratic form is clamped at 0 before the root.
#pragma once

#include "kvevict/common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict::kernels {

inline constexpr float eps_odds = 1e-6f;

// Smallest e_t^2, as a fraction of o^T G o + v_t^T G v_t, that the cached
// expanded form may return. Below it the direct form is used, so the rounding
// error relative to e_t^2 stays below about (2d + 6) u / 1e-2, with u the
// float unit roundoff (0.16% at d = 128).
inline constexpr float expanded_form_min_ratio = 1e-2f;

// Odds ratio a / (1 - a) with the denominator floored at eps_odds.
inline float odds_ratio(float a) { return a / std::max(1.0f - a, eps_odds); }

// Gram matrices of W_o's column blocks: G_q = W_o^q^T W_o^q, d x d each.
//   w_o: [D, n_heads * head_dim], column q*d + k multiplies component k of
//        head q (the layout of PyTorch's nn.Linear weight).
// Returns n_heads matrices [head_dim x head_dim]. Cost O(n_heads D d^2);
// computed once per layer and reused by every compression.
inline std::vector<Eigen::MatrixXf> gram_matrices(const Eigen::Ref<const RowMatrixXf>& w_o, int n_heads,
                                                  int head_dim) {
  if (n_heads <= 0 || head_dim <= 0 || w_o.cols() != static_cast<Eigen::Index>(n_heads) * head_dim) {
    detail::throw_invalid("gram_matrices: W_o has ", w_o.cols(), " columns, expected n_heads * head_dim = ",
                          n_heads, " * ", head_dim);
  }
  // Element access, not a flat scan of data(): a block of a wider matrix
  // has rows an outer stride apart.
  for (Eigen::Index r = 0; r < w_o.rows(); ++r) {
    for (Eigen::Index c = 0; c < w_o.cols(); ++c) {
      if (!std::isfinite(w_o(r, c))) {
        detail::throw_invalid("gram_matrices: W_o(", r, ", ", c, ") is ", w_o(r, c), "; W_o must be finite");
      }
    }
  }
  std::vector<Eigen::MatrixXf> grams(static_cast<std::size_t>(n_heads));
  for (int q = 0; q < n_heads; ++q) {
    const auto block = w_o.middleCols(static_cast<Eigen::Index>(q) * head_dim, head_dim);
    grams[static_cast<std::size_t>(q)].noalias() = block.transpose() * block;
  }
  return grams;
}

// Attention output o = sum_{t < m} weights[t] * values[t].
//   weights: [m], m <= n;  values: [n, d] (any storage scalar);  o: [d].
template <class ValueDerived>
void weighted_output(std::span<const float> weights, const Eigen::MatrixBase<ValueDerived>& values,
                     Eigen::Ref<Eigen::VectorXf> o) {
  const auto m = static_cast<Eigen::Index>(weights.size());
  if (m > values.rows() || o.size() != values.cols()) {
    detail::throw_invalid("weighted_output: ", m, " weights for ", values.rows(), " values; o has ",
                          o.size(), " entries for head_dim ", values.cols());
  }
  const Eigen::Map<const Eigen::RowVectorXf> weight_row(weights.data(), m);
  o.noalias() = (weight_row * values.topRows(m).template cast<float>()).transpose();
}

// v_t^T G v_t for every row of `values` [n, d]: the per-slot cache of the
// expanded form. out: [n]. Cost O(n d^2).
template <class ValueDerived>
void quadratic_forms(const Eigen::MatrixBase<ValueDerived>& values, const Eigen::MatrixXf& gram,
                     std::span<float> out) {
  if (static_cast<Eigen::Index>(out.size()) != values.rows() || gram.rows() != values.cols() ||
      gram.cols() != values.cols()) {
    detail::throw_invalid("quadratic_forms: shapes do not match (values [", values.rows(), " x ",
                          values.cols(), "], G [", gram.rows(), " x ", gram.cols(), "], out ", out.size(), ")");
  }
  const RowMatrixXf v = values.template cast<float>();
  const RowMatrixXf vg = v * gram;
  Eigen::Map<Eigen::VectorXf>(out.data(), static_cast<Eigen::Index>(out.size())) =
      vg.cwiseProduct(v).rowwise().sum();
}

// Reconstruction scores of the first P = weights.size() slots.
//   weights: [P] attention weights a_t (aggregated or of one query)
//   values:  [n, d], n >= P
//   o:       [d] the attention output the scores compare against
//   gram:    G = W_o^q^T W_o^q [d x d], or nullptr for the unprojected
//            distance ||o - v_t|| (use_wo off)
//   cached:  [>= P] v_t^T G v_t per slot (expanded form, O(d) per token, and
//            O(d^2) for the tokens where it cancels), or empty for the direct
//            form (O(d^2) per token, no cancellation)
//   tau:     exponent on e_t (> 0)
//   out:     [P]
template <class ValueDerived>
void reconstruction_scores(std::span<const float> weights, const Eigen::MatrixBase<ValueDerived>& values,
                           const Eigen::Ref<const Eigen::VectorXf>& o, const Eigen::MatrixXf* gram,
                           std::span<const float> cached, float tau, std::span<float> out) {
  const auto p = static_cast<Eigen::Index>(weights.size());
  const Eigen::Index d = values.cols();
  if (p > values.rows() || static_cast<Eigen::Index>(out.size()) != p || o.size() != d) {
    detail::throw_invalid("reconstruction_scores: ", p, " weights, ", values.rows(), " values, out ",
                          out.size(), ", o ", o.size(), " for head_dim ", d);
  }
  if (gram != nullptr && (gram->rows() != d || gram->cols() != d)) {
    detail::throw_invalid("reconstruction_scores: G is [", gram->rows(), " x ", gram->cols(), "], expected [",
                          d, " x ", d, "]");
  }
  if (!cached.empty() && static_cast<Eigen::Index>(cached.size()) < p) {
    detail::throw_invalid("reconstruction_scores: cached quadratic forms have ", cached.size(),
                          " entries, need ", p);
  }
  if (!(tau > 0.0f) || !std::isfinite(tau)) {
    detail::throw_invalid("reconstruction_scores: tau (", tau, ") must be finite and > 0");
  }
  Eigen::Map<Eigen::VectorXf> squared(out.data(), p);
  const auto v = values.topRows(p).template cast<float>();
  if (gram == nullptr) {
    // ||o - v||^2 = o.o - 2 o.v + v.v, evaluated directly per row.
    squared = (v.rowwise() - o.transpose()).rowwise().squaredNorm();
  } else if (cached.empty()) {
    const RowMatrixXf diff = v.rowwise() - o.transpose();
    squared = (diff * (*gram)).cwiseProduct(diff).rowwise().sum();
  } else {
    const Eigen::VectorXf u = (*gram) * o;
    const float base = o.dot(u);
    squared = (-2.0f * (v * u)).array() + base;
    squared += Eigen::Map<const Eigen::VectorXf>(cached.data(), p);
    // Cancellation: where e_t^2 is below expanded_form_min_ratio times
    // o^T G o + v_t^T G v_t, the expansion has lost most of its digits. A
    // token holding almost all the attention has v_t close to o and would
    // score 0 there, so such tokens are recomputed in the direct form,
    // O(d^2) each.
    Eigen::VectorXf diff(d);
    Eigen::VectorXf projected(d);
    for (Eigen::Index t = 0; t < p; ++t) {
      if (squared(t) >= expanded_form_min_ratio * (base + cached[static_cast<std::size_t>(t)])) continue;
      diff = v.row(t).transpose() - o;
      projected.noalias() = (*gram) * diff;
      squared(t) = diff.dot(projected);
    }
  }
  const bool square_root = tau == 1.0f;
  const float half_tau = 0.5f * tau;
  for (Eigen::Index t = 0; t < p; ++t) {
    const float e2 = std::max(squared(t), 0.0f);
    const float e = square_root ? std::sqrt(e2) : std::pow(e2, half_tau);
    out[static_cast<std::size_t>(t)] = odds_ratio(weights[static_cast<std::size_t>(t)]) * e;
  }
}

// Reference form that materialises W_o^q v_t for every token, O(n d D):
// the cost the Gram form avoids. Same contract as reconstruction_scores with
// w_o_head = W_o^q [D, d].
template <class ValueDerived>
void reconstruction_scores_naive(std::span<const float> weights, const Eigen::MatrixBase<ValueDerived>& values,
                                 const Eigen::Ref<const Eigen::VectorXf>& o,
                                 const Eigen::Ref<const RowMatrixXf>& w_o_head, float tau, std::span<float> out) {
  const auto p = static_cast<Eigen::Index>(weights.size());
  if (p > values.rows() || static_cast<Eigen::Index>(out.size()) != p || w_o_head.cols() != values.cols()) {
    detail::throw_invalid("reconstruction_scores_naive: shapes do not match");
  }
  const RowMatrixXf projected = values.topRows(p).template cast<float>() * w_o_head.transpose();  // [P, D]
  const Eigen::VectorXf projected_o = w_o_head * o;                                                 // [D]
  for (Eigen::Index t = 0; t < p; ++t) {
    const float e = (projected.row(t).transpose() - projected_o).norm();
    out[static_cast<std::size_t>(t)] = odds_ratio(weights[static_cast<std::size_t>(t)]) * std::pow(e, tau);
  }
}

}  // namespace kvevict::kernels
