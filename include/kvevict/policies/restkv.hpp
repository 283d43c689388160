// ReST-KV keeps, per KV head, the observation window (the last w tokens)
// and the budget - w past tokens whose removal would change the layer's
// attention output most. The scores are smoothed over the window's queries
// (temporal) and over neighbouring tokens (spatial) before the selection.
//
// Paper: An et al., "ReST-KV: Robust KV Cache Eviction with Layer-wise Output
// Reconstruction and Spatial-Temporal Smoothing", ICLR 2026, arXiv
// 2605.08840. Reference code: an-yongqi/rest-kv at commit a8bb112
// (RestKVCluster in restkv/restkv_utils.py). The algorithm below follows the
// reference code, and the defaults are the values its LongBench scripts pass.
//
//   [ past: scored, best budget - w kept ......... | window: last w, kept ]
//     slots 0 .. n-w-1                               slots n-w .. n-1
//
// Score of past slot t for query head q (KV head j = q / g, g = n_heads /
// n_kv_heads), with A[q][i][t] the window attention of window query i:
//   after mode:  abar_t = sum_i weight_i A[q][i][t]  (EMA or mean weights)
//                o = sum_t abar_t v_t over past slots (output_scope past_only)
//                    or over all slots (output_scope full)
//                score = r(abar_t) * ||W_o^q (o - v_t)||^tau
//   before mode: score = sum_i weight_i r(A[q][i][t]) * ||W_o^q (o_i - v_t)||
//                [/ ||W_o^q o_i|| with use_norm], o_i = sum_t A[q][i][t] v_t
// with r(a) = a / max(1 - a, 1e-6) and ||.|| without W_o^q when use_wo is
// off. Removing token t alone and renormalising the rest changes one query's
// projected output by exactly r(a_t) * ||W_o^q (v_t - o)||, so the score is
// that change (for the aggregated row in after mode with output_scope full).
// Each query head's past scores are then pooled (none, avg, max, or adaptive:
// a right- or left-shifted replicate-padded average whose width and shift
// grow with how far the attended region drifts between the two halves of the
// window). The g pooled rows of a group are combined (gqa: kv_head = mean,
// max = elementwise maximum), and each KV head keeps its best budget - w past
// slots (ties: the later slot wins) plus the window.
//
// Parameters (RestKVConfig; tokens per KV head unless stated):
//   budget          required, >= window: tokens kept, window included (B)
//   window          32, >= 1 (>= 2 for adaptive pooling): observation window w
//   n_heads, n_kv_heads, head_dim   required: the layer's shape (GQA allowed)
//   use_ema, alpha  true, 0.3 in (0, 1]: EMA over window queries (oldest first)
//                   instead of the mean
//   metric_mode     after (or before): aggregate attention, then score once;
//                   or score per window query, then aggregate
//   use_wo          true: measure the change after W_o (else in value space)
//   tau             1.0, > 0: exponent on the projected distance; read only in
//                   after mode with use_wo, and must stay 1 elsewhere
//   use_norm        false: divide by ||W_o^q o_i|| (before mode only)
//   pooling         adaptive (or none, avg, max)
//   kernel_size     5, odd >= 1: pooling width; the minimum width for adaptive
//   drift_scale     2000 (positions per unit of width or shift; the
//                   reference's `scale`), > 0: adaptive width is
//                   max(kernel_size, 2 floor(|D| / drift_scale) + 1), the
//                   shift D / drift_scale rounded per shift_rounding (trunc
//                   or reference), D the drift in slot positions
//   output_scope    past_only (or full): which slots form o in after mode
//   gqa             kv_head (mean of the group) or max
//   use_pyramid     false; beta 20, >= 1; pyramid_rounding conserving (or
//                   reference); layer in [0, n_layers): per-layer budgets
//                   from budget.hpp, the adaptive kernel still using the
//                   global budget
//   slack           4 * window, >= 0: decode-time eviction fires once
//                   size() > layer budget + slack
//   softmax_scale   1/sqrt(head_dim): attention logit scale
//
// Observation: Observation::queries, the last w queries [n_heads, w,
// head_dim] of the last w cached slots, rotated as the cache stores keys.
// During decoding they come from a QueryWindow view. With use_wo, W_o
// [D, n_heads * head_dim] is given at construction. observe reads `appended`.
//
// State: with use_wo, g channels per KV head. Channel i of KV head j contains
// c[q][t] = v_t^T G_q v_t for query head q = j * g + i, with G_q = W_o^q^T W_o^q
// computed once at construction. Contract: observe computes c for every slot
// it has not seen before. Those are the slots appended since the previous
// observe, found by position, and at least the `appended` newest ones. On the
// first call and after reset() they are all slots, so a cache filled before
// the policy saw it is handled. With use_wo, select throws when the cache
// changed after the last observe. One policy object serves one cache, so call
// reset() before using it on another.
//
// Cost per compaction, per layer: window attention O(h w n d); temporal
// aggregation and drift O(h w n); scores O(h n d) after mode, O(h w n d)
// before mode (expanded Gram form with the cached c); pooling O(h n);
// selection O(h_kv n) plus O(h_kv B log B). observe costs O(g d^2) per new
// token and KV head. Memory: G is h d^2 floats, the cache state h n floats.
// Allocation: the policy's scratch buffers grow to the largest cache seen and
// are reused, but the window-attention buffers are reallocated when n changes
// between calls. The kernels it calls allocate temporaries of up to O(n d)
// per head, and observe allocates O(appended * d).
//
// Differences from the reference:
//  - Per sequence: the reference reads the adaptive drift of the first
//    sequence of a batch for all of them; kvevict has no batch axis.
//  - GQA: the reference repeats each KV head to its g query heads and keeps g
//    separately selected copies (g times the memory); kvevict keeps one
//    selection per KV head (gqa kv_head or max). select_query_heads returns
//    the reference's per-query-head lists for comparisons.
//  - Numerics: attention, EMA and scores in float with the odds ratio floored
//    (a / max(1 - a, 1e-6)); the reference casts attention to half, where a
//    weight above about 0.99976 rounds to 1 and the odds ratio divides by 0.
//    Ties break by position (later slot wins) instead of an unstable top-k,
//    also in the drift's top-m sets.
//  - output_scope: past_only (default) reproduces the reference, which forms
//    o from past slots only; full forms o from all slots, the output the
//    exact-removal argument assumes.
//  - Shift rounding: trunc (default) rounds D / drift_scale toward zero; the
//    reference (shift_rounding reference) gives +1 at D = 0 and -(m-1) at
//    D = -m * drift_scale. Shifts are clamped to |shift| <= width / 2.
//  - Odd windows: the two halves have w/2 and w - w/2 queries (the reference
//    fails on odd w). Even kernel sizes are rejected (the reference's output
//    is then one slot too long and can select a window slot).
//  - Pyramid budgets conserve the total (pyramid_rounding conserving); the
//    reference's rounded-down step keeps up to 15% more (reference rule
//    offered).
//  - Decoding: the reference compresses once at the end of the prompt; here
//    decode-time re-scoring with the last w queries runs once size() >
//    layer budget + slack (observe_and_evict).
//  - Validation: tau other than 1 where it is not read, and use_norm in after
//    mode, are rejected instead of ignored.
#pragma once

#include "kvevict/budget.hpp"
#include "kvevict/kernels/reconstruction.hpp"
#include "kvevict/kernels/select.hpp"
#include "kvevict/kernels/spatial.hpp"
#include "kvevict/kernels/temporal.hpp"
#include "kvevict/kernels/window_attention.hpp"
#include "kvevict/policies/policy.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace kvevict {

enum class RestKVMetric { after, before };
enum class RestKVPooling { none, avg, max, adaptive };
enum class RestKVOutputScope { past_only, full };
// Aggregation of a group's g pooled score rows onto their KV head. kv_head
// averages them (the ranking equals that of their sum), and max takes their
// elementwise maximum.
enum class RestKVGqa { kv_head, max };

inline std::string_view to_string(RestKVMetric metric) { return metric == RestKVMetric::after ? "after" : "before"; }
inline std::string_view to_string(RestKVPooling pooling) {
  switch (pooling) {
    case RestKVPooling::none: return "none";
    case RestKVPooling::avg: return "avg";
    case RestKVPooling::max: return "max";
    case RestKVPooling::adaptive: return "adaptive";
  }
  return "unknown";
}
inline std::string_view to_string(RestKVOutputScope scope) {
  return scope == RestKVOutputScope::past_only ? "past_only" : "full";
}
inline std::string_view to_string(RestKVGqa gqa) { return gqa == RestKVGqa::kv_head ? "kv_head" : "max"; }

// Configuration of one layer's ReST-KV policy; the header comment lists every
// field with its unit, default and range.
struct RestKVConfig {
  std::int64_t budget = 0;
  std::int64_t window = 32;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  bool use_ema = true;
  float alpha = 0.3f;
  RestKVMetric metric_mode = RestKVMetric::after;
  bool use_wo = true;
  float tau = 1.0f;
  bool use_norm = false;
  RestKVPooling pooling = RestKVPooling::adaptive;
  std::int64_t kernel_size = 5;
  double drift_scale = 2000.0;
  kernels::ShiftRounding shift_rounding = kernels::ShiftRounding::trunc;
  RestKVOutputScope output_scope = RestKVOutputScope::past_only;
  RestKVGqa gqa = RestKVGqa::kv_head;
  bool use_pyramid = false;
  double beta = 20.0;
  PyramidRounding pyramid_rounding = PyramidRounding::conserving;
  int layer = 0;
  int n_layers = 1;
  std::optional<std::int64_t> slack = std::nullopt;   // unset: 4 * window
  std::optional<float> softmax_scale = std::nullopt;  // unset: 1 / sqrt(head_dim)
};

// A use_norm denominator below this is raised to it, so a zero attention
// output gives finite scores (the reference divides by zero there).
inline constexpr float restkv_min_output_norm = 1e-12f;

// Throws std::invalid_argument naming the first invalid field of `config`.
inline void validate_restkv_config(const RestKVConfig& config) {
  const auto fail = [](auto&&... parts) { detail::throw_invalid("ReST-KV: ", parts...); };
  if (config.n_heads < 1) fail("n_heads (", config.n_heads, ") must be at least 1");
  if (config.n_kv_heads < 1) fail("n_kv_heads (", config.n_kv_heads, ") must be at least 1");
  if (config.n_heads % config.n_kv_heads != 0) {
    fail("n_heads (", config.n_heads, ") must be a multiple of n_kv_heads (", config.n_kv_heads, ")");
  }
  if (config.head_dim < 1) fail("head_dim (", config.head_dim, ") must be at least 1");

  if (config.window < 1) fail("window (", config.window, ") must be at least 1");
  if (config.budget < config.window) {
    fail("budget (", config.budget, ") must be at least window (", config.window,
         "); the window is always kept");
  }
  if (config.pooling == RestKVPooling::adaptive && config.window < 2) {
    fail("window (", config.window, ") must be at least 2 for adaptive pooling, which compares its two halves");
  }
  if (config.kernel_size < 1 || config.kernel_size % 2 == 0) {
    fail("kernel_size (", config.kernel_size, ") must be odd and at least 1");
  }

  if (!(config.alpha > 0.0f && config.alpha <= 1.0f)) fail("alpha (", config.alpha, ") must be in (0, 1]");
  if (!(config.tau > 0.0f) || !std::isfinite(config.tau)) fail("tau (", config.tau, ") must be finite and > 0");
  const bool reads_tau = config.metric_mode == RestKVMetric::after && config.use_wo;
  if (!reads_tau && config.tau != 1.0f) {
    fail("tau (", config.tau, ") is read only in after mode with use_wo; leave it at 1");
  }
  if (config.use_norm && config.metric_mode != RestKVMetric::before) {
    fail("use_norm is read only in before mode; set metric_mode before or use_norm false");
  }
  if (!(config.drift_scale > 0.0) || !std::isfinite(config.drift_scale)) {
    fail("drift_scale (", config.drift_scale, ") must be finite and > 0");
  }

  if (!(config.beta >= 1.0) || !std::isfinite(config.beta)) fail("beta (", config.beta, ") must be finite and at least 1");
  if (config.slack && *config.slack < 0) fail("slack (", *config.slack, ") must be non-negative");
  if (config.softmax_scale && (!(*config.softmax_scale > 0.0f) || !std::isfinite(*config.softmax_scale))) {
    fail("softmax_scale (", *config.softmax_scale, ") must be finite and > 0");
  }
  if (config.use_pyramid) {
    if (config.n_layers < 1) fail("n_layers (", config.n_layers, ") must be at least 1 with use_pyramid");
    if (config.layer < 0 || config.layer >= config.n_layers) {
      fail("layer (", config.layer, ") must be in [0, n_layers = ", config.n_layers, ") with use_pyramid");
    }
  }
}

// Fills `weights` [w] with the temporal weights of `config`: EMA with alpha
// (query 0 weighs (1-alpha)^(w-1), query i >= 1 alpha (1-alpha)^(w-1-i)) or
// the mean 1/w.
inline void restkv_temporal_weights(const RestKVConfig& config, std::span<float> weights) {
  kernels::temporal_weights(config.use_ema ? kernels::TemporalMode::ema : kernels::TemporalMode::mean, config.alpha,
                            weights);
}

// Scratch of restkv_head_scores, reused across calls.
struct RestKVHeadScratch {
  std::vector<float> aggregated;  // [n] temporally aggregated attention (after mode)
  std::vector<float> per_query;   // [P] scores of one window query (before mode)
  Eigen::VectorXf output;         // [d] attention output o
};

// Computes the unsmoothed scores of one query head's past slots.
//   rows:    [w, n] window attention of the head (row i: window query i)
//   values:  [n, d] values of its KV head (any storage scalar)
//   gram:    G_q [d x d], or nullptr when use_wo is off
//   cached:  [>= P] c[q][t] = v_t^T G_q v_t (expanded Gram form), or empty for
//            the direct form (O(d^2) per slot)
//   weights: [w] temporal weights (restkv_temporal_weights)
//   out:     [P], P = n - w
// Preconditions (checked by the policy): shapes match, inputs finite.
template <class ValueDerived>
void restkv_head_scores(const RestKVConfig& config, const Eigen::Ref<const RowMatrixXf>& rows,
                        const Eigen::MatrixBase<ValueDerived>& values, const Eigen::MatrixXf* gram,
                        std::span<const float> cached, std::span<const float> weights, std::span<float> out,
                        RestKVHeadScratch& scratch) {
  const std::int64_t w = rows.rows();
  const std::int64_t n = rows.cols();
  const std::int64_t past = n - w;
  if (w < 1 || past < 0 || values.rows() != n || static_cast<std::int64_t>(out.size()) != past ||
      static_cast<std::int64_t>(weights.size()) != w) {
    detail::throw_invalid("restkv_head_scores: rows [", w, " x ", n, "], values [", values.rows(), " x ",
                          values.cols(), "], weights ", weights.size(), " and out ", out.size(),
                          " do not match (out must have n - w entries)");
  }
  scratch.output.resize(values.cols());

  if (config.metric_mode == RestKVMetric::after) {
    const std::int64_t columns = config.output_scope == RestKVOutputScope::full ? n : past;
    scratch.aggregated.resize(static_cast<std::size_t>(n));
    const std::span<float> aggregated(scratch.aggregated.data(), static_cast<std::size_t>(columns));
    kernels::temporal_aggregate(rows, weights, columns, aggregated);
    kernels::weighted_output(std::span<const float>(aggregated), values, scratch.output);
    const float tau = config.use_wo ? config.tau : 1.0f;
    kernels::reconstruction_scores(std::span<const float>(aggregated.data(), static_cast<std::size_t>(past)), values,
                                   scratch.output, gram, cached, tau, out);
    return;
  }

  // Before mode: score each window query against its own output o_i (all
  // visible slots, window included; masked columns are 0), then aggregate.
  std::fill(out.begin(), out.end(), 0.0f);
  scratch.per_query.resize(static_cast<std::size_t>(past));
  const std::span<float> per_query(scratch.per_query.data(), static_cast<std::size_t>(past));
  for (std::int64_t i = 0; i < w; ++i) {
    const std::span<const float> row(rows.row(i).data(), static_cast<std::size_t>(n));
    kernels::weighted_output(row, values, scratch.output);
    kernels::reconstruction_scores(row.first(static_cast<std::size_t>(past)), values, scratch.output, gram, cached,
                                   1.0f, per_query);
    float factor = weights[static_cast<std::size_t>(i)];
    if (config.use_norm) {
      const float squared = gram != nullptr ? scratch.output.dot(*gram * scratch.output)
                                            : scratch.output.squaredNorm();
      factor /= std::max(std::sqrt(std::max(squared, 0.0f)), restkv_min_output_norm);
    }
    for (std::int64_t t = 0; t < past; ++t) {
      out[static_cast<std::size_t>(t)] += factor * per_query[static_cast<std::size_t>(t)];
    }
  }
}

// Smooths one query head's past scores `raw` [P] into `out` [P] per
// config.pooling. Adaptive pooling reads the head's window attention `rows`
// [w, n] over all n slots, with top-m sets of m = min(budget - window, n),
// budget being the global config.budget also under use_pyramid (reference
// behaviour). Returns the kernel applied: width and shift (0 for none, avg
// and max; width 1 for none) and, for adaptive, the drift.
inline kernels::AdaptiveKernel restkv_smooth(const RestKVConfig& config, const Eigen::Ref<const RowMatrixXf>& rows,
                                             std::span<const float> raw, std::span<float> out,
                                             std::vector<std::int64_t>& scratch) {
  kernels::AdaptiveKernel kernel;
  switch (config.pooling) {
    case RestKVPooling::none:
      if (out.size() != raw.size()) {
        detail::throw_invalid("restkv_smooth: out has ", out.size(), " entries, expected ", raw.size());
      }
      std::copy(raw.begin(), raw.end(), out.begin());
      return kernel;
    case RestKVPooling::avg:
      kernel.size = config.kernel_size;
      kernels::avg_pool(raw, config.kernel_size, out);
      return kernel;
    case RestKVPooling::max:
      kernel.size = config.kernel_size;
      kernels::max_pool(raw, config.kernel_size, out, scratch);
      return kernel;
    case RestKVPooling::adaptive: {
      const std::int64_t m = std::min(config.budget - config.window, static_cast<std::int64_t>(rows.cols()));
      kernel = kernels::adaptive_kernel(rows, m, config.kernel_size, config.drift_scale, config.shift_rounding,
                                        scratch);
      kernels::shifted_avg_pool(raw, kernel.size, kernel.shift, out);
      return kernel;
    }
  }
  return kernel;
}

template <class Scalar = float>
class RestKV {
 public:
  using scalar_type = Scalar;

  // Without W_o: requires use_wo false.
  explicit RestKV(const RestKVConfig& config) : config_(config) {
    validate_restkv_config(config);
    if (config.use_wo) {
      detail::throw_invalid("ReST-KV: use_wo is true but no W_o was given; pass W_o [D, n_heads * head_dim] "
                            "to the constructor or set use_wo false");
    }
    init_derived();
  }

  // w_o: [D, n_heads * head_dim], PyTorch nn.Linear layout (column q * d + k
  // multiplies component k of head q). Its Gram matrices are computed here
  // once; W_o itself is not kept. Read only when use_wo is true, but checked
  // for shape and finite values either way.
  RestKV(const RestKVConfig& config, const Eigen::Ref<const RowMatrixXf>& w_o) : config_(config) {
    validate_restkv_config(config);
    if (w_o.rows() < 1 || w_o.cols() != static_cast<Eigen::Index>(config.n_heads) * config.head_dim) {
      detail::throw_invalid("ReST-KV: W_o is [", w_o.rows(), " x ", w_o.cols(),
                            "], expected [D x n_heads * head_dim] with D >= 1 and n_heads * head_dim = ",
                            config.n_heads, " * ", config.head_dim);
    }
    // Element access, not a flat scan of data(): W_o may be a block of a
    // wider matrix whose rows sit an outer stride apart.
    for (Eigen::Index r = 0; r < w_o.rows(); ++r) {
      for (Eigen::Index c = 0; c < w_o.cols(); ++c) {
        if (!std::isfinite(w_o(r, c))) {
          detail::throw_invalid("ReST-KV: W_o(", r, ", ", c, ") is ", w_o(r, c), "; W_o must be finite");
        }
      }
    }
    if (config.use_wo) grams_ = kernels::gram_matrices(w_o, config.n_heads, config.head_dim);
    init_derived();
  }

  const RestKVConfig& config() const { return config_; }
  std::string_view name() const { return "restkv"; }
  // g channels per KV head (the cached quadratic forms) with use_wo, else 0.
  int state_channels() const { return config_.use_wo ? group_size() : 0; }
  ObservationNeeds needs() const { return {.window_queries = config_.window}; }
  int group_size() const { return config_.n_heads / config_.n_kv_heads; }
  std::int64_t slack() const { return slack_; }
  float softmax_scale() const { return softmax_scale_; }
  // G_q = W_o^q^T W_o^q for every query head; empty without use_wo.
  const std::vector<Eigen::MatrixXf>& gram_matrices() const { return grams_; }

  // Tokens this layer keeps from a cache of n_tokens tokens: the budget, or
  // the pyramid schedule's layer budget (n_tokens itself when n_tokens <=
  // budget).
  std::int64_t layer_budget(std::int64_t n_tokens) const {
    if (!config_.use_pyramid) return config_.budget;
    return pyramid_budget(pyramid_config(), config_.layer, n_tokens);
  }

  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    const std::int64_t n = cache.size();
    const std::int64_t limit = layer_budget(n) + (trigger == Trigger::decode ? slack_ : 0);
    return n > limit;
  }

  // Computes the cached quadratic forms of slots not seen before (see the
  // state contract above). When the cache is over its layer budget, a select
  // may follow, so the window queries are required and validated before
  // anything is written. During decoding, pass them on every such step.
  void observe(KVCache<Scalar>& cache, const Observation& observation) {
    validate_cache(cache);
    validate_heads(observation);
    const std::int64_t n = cache.size();
    if (observation.appended < 0 || observation.appended > n) {
      detail::throw_invalid("ReST-KV: Observation::appended (", observation.appended, ") must be in [0, size() = ",
                            n, "]");
    }
    if (n > layer_budget(n)) validate_queries(cache, observation);
    if (!config_.use_wo) return;

    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      const std::int64_t first = first_unseen_slot(cache, j, observation.appended);
      if (first == n) continue;
      const auto new_values = cache.values(j).middleRows(first, n - first);
      for (int i = 0; i < group_size(); ++i) {
        const std::span<float> channel = cache.state(j, i).subspan(static_cast<std::size_t>(first));
        kernels::quadratic_forms(new_values, grams_[static_cast<std::size_t>(j * group_size() + i)], channel);
      }
    }
    observed_ = true;
    seen_position_ = cache.next_position();
  }

  // Writes the kept slots per KV head: every slot when size() <= layer
  // budget, else the best layer budget - window past slots by the group's
  // pooled score plus the window. Throws std::invalid_argument on a bad
  // observation or a cache changed since the last observe.
  void select(const KVCache<Scalar>& cache, const Observation& observation, KeepPlan& plan) {
    validate_cache(cache);
    validate_heads(observation);
    const std::int64_t n = cache.size();
    const std::int64_t keep = std::min(n, layer_budget(n));
    if (keep == n) {
      plan.reset(cache.n_kv_heads(), n);
      plan.fill_identity();
      return;
    }
    validate_queries(cache, observation);
    require_observed(cache);

    const std::int64_t scored = keep - config_.window;
    plan.reset(cache.n_kv_heads(), keep);
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      if (scored > 0) {
        score_group(cache, j, observation, true);
        aggregate_group(n);
      } else {
        group_scores_.assign(static_cast<std::size_t>(n), 0.0f);  // only the window is kept
      }
      kernels::select_keep(group_scores_, n, 0, config_.window, keep, plan.head(j), select_scratch_);
    }
  }

  // The reference's selection for comparisons: one kept list per QUERY head
  // (plan rows 0..n_heads-1), each from that head's own pooled scores. The
  // plan has n_heads rows, so KVCache::keep rejects it on a cache with fewer
  // KV heads; it matches the reference's cache of n_heads copies.
  void select_query_heads(const KVCache<Scalar>& cache, const Observation& observation, KeepPlan& plan) {
    validate_cache(cache);
    validate_heads(observation);
    const std::int64_t n = cache.size();
    const std::int64_t keep = std::min(n, layer_budget(n));
    if (keep == n) {
      plan.reset(config_.n_heads, n);
      plan.fill_identity();
      return;
    }
    validate_queries(cache, observation);
    require_observed(cache);

    plan.reset(config_.n_heads, keep);
    const int g = group_size();
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      score_group(cache, j, observation, true);
      for (int i = 0; i < g; ++i) {
        kernels::select_keep(group_row(smoothed_, i, n), n, 0, config_.window, keep, plan.head(j * g + i),
                             select_scratch_);
      }
    }
  }

  // Writes the unsmoothed scores of every query head's past slots into `out`
  // [n_heads, size() - window]. Requires size() >= window and, with use_wo,
  // an observe after the last append.
  void raw_scores(const KVCache<Scalar>& cache, const Observation& observation, RowMatrixXf& out) {
    scores(cache, observation, out, false);
  }

  // Same as raw_scores after the spatial pooling of each query head.
  void smoothed_scores(const KVCache<Scalar>& cache, const Observation& observation, RowMatrixXf& out) {
    scores(cache, observation, out, true);
  }

  // Forgets which slots have cached quadratic forms, so the next observe
  // computes them for every slot. Call it before using the policy on another
  // cache.
  void reset() {
    observed_ = false;
    seen_position_ = 0;
  }

 private:
  void init_derived() {
    slack_ = config_.slack.value_or(4 * config_.window);
    softmax_scale_ = config_.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(config_.head_dim)));
    if (config_.use_pyramid) validate_pyramid(pyramid_config());
  }

  PyramidConfig pyramid_config() const {
    return {.budget = config_.budget,
            .protected_tokens = config_.window,
            .n_layers = config_.n_layers,
            .beta = config_.beta,
            .rounding = config_.pyramid_rounding};
  }

  void validate_cache(const KVCache<Scalar>& cache) const {
    if (cache.n_kv_heads() != config_.n_kv_heads || cache.head_dim() != config_.head_dim) {
      detail::throw_invalid("ReST-KV: the cache has n_kv_heads ", cache.n_kv_heads(), " and head_dim ",
                            cache.head_dim(), ", the policy was configured with ", config_.n_kv_heads, " and ",
                            config_.head_dim);
    }
    detail::require_state_channels("ReST-KV", cache, state_channels());
  }

  void validate_heads(const Observation& observation) const {
    if (observation.n_heads != config_.n_heads) {
      detail::throw_invalid("ReST-KV: Observation::n_heads (", observation.n_heads,
                            ") must equal the policy's n_heads (", config_.n_heads, ")");
    }
  }

  void validate_queries(const KVCache<Scalar>& cache, const Observation& observation) const {
    const Tensor3View& queries = observation.queries;
    if (queries.empty()) {
      detail::throw_invalid("ReST-KV: the observation has no window queries; pass the last window (",
                            config_.window, ") queries, [n_heads, window, head_dim] (a QueryWindow view "
                            "during decoding)");
    }
    if (queries.d0 != config_.n_heads || queries.d1 != config_.window || queries.d2 != config_.head_dim) {
      detail::throw_invalid("ReST-KV: window queries are [", queries.d0, ", ", queries.d1, ", ", queries.d2,
                            "], expected [n_heads, window, head_dim] = [", config_.n_heads, ", ", config_.window,
                            ", ", config_.head_dim, "]");
    }
    if (cache.size() < config_.window) {
      detail::throw_invalid("ReST-KV: the cache holds ", cache.size(), " slots, fewer than the window (",
                            config_.window, ")");
    }
    detail::require_finite(queries.data, queries.numel(), "ReST-KV: window queries");
  }

  void require_observed(const KVCache<Scalar>& cache) const {
    if (config_.use_wo && (!observed_ || cache.next_position() != seen_position_)) {
      detail::throw_invalid("ReST-KV: the cache has slots whose cached quadratic forms were not computed; call "
                            "observe(cache, observation) after every append and before select");
    }
  }

  // Returns the first slot of head j without a cached quadratic form. Those
  // are the slots at or after the next position seen by the previous observe,
  // and at least the `appended` newest ones. Before the first observe, and on
  // a cache whose next position went backwards (another cache), every slot is.
  std::int64_t first_unseen_slot(const KVCache<Scalar>& cache, int j, std::int64_t appended) const {
    const std::int64_t n = cache.size();
    if (!observed_ || cache.next_position() < seen_position_) return 0;
    const auto positions = cache.positions(j);
    const auto first = static_cast<std::int64_t>(
        std::lower_bound(positions.begin(), positions.end(), seen_position_) - positions.begin());
    return std::min(first, n - appended);
  }

  void scores(const KVCache<Scalar>& cache, const Observation& observation, RowMatrixXf& out, bool smooth) {
    validate_cache(cache);
    validate_heads(observation);
    validate_queries(cache, observation);
    require_observed(cache);
    const std::int64_t n = cache.size();
    const std::int64_t past = n - config_.window;
    out.resize(config_.n_heads, past);
    const int g = group_size();
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      score_group(cache, j, observation, smooth);
      const std::vector<float>& source = smooth ? smoothed_ : raw_;
      for (int i = 0; i < g; ++i) {
        const auto row = group_row(source, i, n);
        for (std::int64_t t = 0; t < past; ++t) out(j * g + i, t) = row[static_cast<std::size_t>(t)];
      }
    }
  }

  // Fills raw_ (and smoothed_ when `smooth`) with the group of KV head j:
  // g rows of stride n, the first size() - window entries of each set.
  void score_group(const KVCache<Scalar>& cache, int j, const Observation& observation, bool smooth) {
    const std::int64_t n = cache.size();
    const std::int64_t w = config_.window;
    const std::int64_t past = n - w;
    const int g = group_size();
    kernels::group_window_attention(cache, j, observation.queries, softmax_scale_, attention_, workspace_);
    weights_.resize(static_cast<std::size_t>(w));
    restkv_temporal_weights(config_, weights_);
    raw_.assign(static_cast<std::size_t>(g) * static_cast<std::size_t>(n), 0.0f);
    if (smooth) smoothed_.assign(static_cast<std::size_t>(g) * static_cast<std::size_t>(n), 0.0f);

    const auto values = cache.values(j);
    for (int i = 0; i < g; ++i) {
      const int q = j * g + i;
      const auto rows = attention_.middleRows(static_cast<Eigen::Index>(i) * w, w);
      const Eigen::MatrixXf* gram = config_.use_wo ? &grams_[static_cast<std::size_t>(q)] : nullptr;
      std::span<const float> cached;
      if (config_.use_wo) cached = cache.state(j, i).first(static_cast<std::size_t>(past));
      const std::span<float> raw = group_row(raw_, i, n).first(static_cast<std::size_t>(past));
      restkv_head_scores(config_, rows, values, gram, cached, weights_, raw, head_scratch_);
      if (smooth) {
        const std::span<float> pooled = group_row(smoothed_, i, n).first(static_cast<std::size_t>(past));
        restkv_smooth(config_, rows, raw, pooled, index_scratch_);
      }
    }
  }

  // Combines the g pooled rows of smoothed_ into group_scores_ [n] (past
  // entries; the window entries stay 0 and are never read).
  void aggregate_group(std::int64_t n) {
    const std::int64_t past = n - config_.window;
    const int g = group_size();
    group_scores_.assign(static_cast<std::size_t>(n), 0.0f);
    for (std::int64_t t = 0; t < past; ++t) {
      float combined = group_row(smoothed_, 0, n)[static_cast<std::size_t>(t)];
      for (int i = 1; i < g; ++i) {
        const float value = group_row(smoothed_, i, n)[static_cast<std::size_t>(t)];
        combined = config_.gqa == RestKVGqa::max ? std::max(combined, value) : combined + value;
      }
      if (config_.gqa == RestKVGqa::kv_head) combined /= static_cast<float>(g);
      group_scores_[static_cast<std::size_t>(t)] = combined;
    }
  }

  static std::span<float> group_row(std::vector<float>& rows, int i, std::int64_t n) {
    return {rows.data() + static_cast<std::size_t>(i) * static_cast<std::size_t>(n), static_cast<std::size_t>(n)};
  }
  static std::span<const float> group_row(const std::vector<float>& rows, int i, std::int64_t n) {
    return {rows.data() + static_cast<std::size_t>(i) * static_cast<std::size_t>(n), static_cast<std::size_t>(n)};
  }

  RestKVConfig config_;
  std::vector<Eigen::MatrixXf> grams_;  // [n_heads] G_q, use_wo only
  std::int64_t slack_ = 0;
  float softmax_scale_ = 1.0f;
  bool observed_ = false;           // observe has run since construction or reset()
  std::int64_t seen_position_ = 0;  // cache.next_position() at the last observe

  // Scratch, reused across calls.
  RowMatrixXf attention_;  // [g * w, n] window attention of one group
  kernels::WindowAttentionWorkspace workspace_;
  std::vector<float> weights_;       // [w] temporal weights
  std::vector<float> raw_;           // [g, n] raw scores of one group
  std::vector<float> smoothed_;      // [g, n] pooled scores of one group
  std::vector<float> group_scores_;  // [n] scores of one KV head
  RestKVHeadScratch head_scratch_;
  std::vector<std::int64_t> index_scratch_;
  kernels::SelectScratch select_scratch_;
};

static_assert(EvictionPolicy<RestKV<float>>);
static_assert(EvictionPolicy<RestKV<Eigen::half>>);

}  // namespace kvevict
