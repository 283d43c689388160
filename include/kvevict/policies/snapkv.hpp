// SnapKV: the queries of the last `window` tokens vote for the earlier tokens
// they attend to. The votes are pooled so that neighbours of important tokens
// survive with them, and each KV head keeps its best past tokens plus the
// window.
//
// Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before
// Generation", NeurIPS 2024, arXiv 2404.14469. Reference: FasterDecoding/
// SnapKV (SnapKVCluster and init_snapkv in snapkv/monkeypatch/
// snapkv_utils.py); the GQA mean follows NVIDIA/kvpress (snapkv_press.py).
//
//   [ past: best budget - window slots by pooled vote | window ... window ]
//     slots 0 .. P-1, P = size() - window                 last `window` slots
//
//   A        = window attention of the last `window` queries (causal by
//              position), per query head
//   vote_q   = sum over the window queries i of A[q][i][t], t < P
//   pooled_q = pool(vote_q): avg (zero padding, divisor kernel_size),
//              max (outside ignored) or none
//   score_j  = mean or max over q in group(j) of pooled_q
//   keep_j   = select(past, score_j, budget - window) ∪ window
//
// Parameters (tokens per KV head unless stated):
//   budget           tokens kept, window included; required, >= window
//   window           observation window w; default 32, >= 1
//   kernel_size      pooling width; default 5, odd and >= 1 (checked even
//                    with pooling none)
//   pooling          avg (default, the reference code), max (the paper's
//                    listing) or none
//   gqa_aggregation  mean (default) or max over a group's pooled votes.
//                    expand is rejected, see the NOTE at the constructor.
//   scale            softmax scale; default 1/sqrt(head_dim), finite and > 0
//   slack            decode-time eviction fires once
//                    size() > budget + slack; default 4 * window. Prefill
//                    compression cuts at size() > budget.
//
// Observation: queries [n_heads, w_obs, head_dim] of the last w_obs cached
// slots, in the cache's rotation convention (rotated at their token
// positions in original mode, unrotated in cache_relative mode, where the
// kernel rotates query i at slot size() - w + i). The last `window` of them
// are used; select throws when fewer than `window` are given and the cache
// is over budget. At prefill, the prompt's last queries. During decoding,
// the last `window` queries the engine keeps in a QueryWindow; the window
// tokens are then the last `window` slots, which every compaction keeps.
// State: none.
// Cost per compaction: O(n_heads * window * size() * head_dim) for the
// window logits, O(n_heads * window * size()) for softmax and votes,
// O(n_heads * size()) for pooling and aggregation, O(n_kv_heads * size())
// average for the selection.
// Allocation: scratch lives in the policy object and is reused. The window
// attention workspace is made of Eigen matrices, which reallocate whenever
// their total size changes, so a call allocates unless size() equals that
// of the previous call. Single-token decoding compacts at the same size
// every time (budget + slack + 1) and then does not allocate.
// Differences from the reference: one kept set per KV head from the group's
// mean (the reference scores after repeat_kv and stores n_heads copies);
// budget == window is allowed and keeps only the window; even kernel sizes
// are rejected (they change the pooled length in the reference); equal
// scores keep the later slot.
// NOTE: equal scores means bitwise equal. The window attention's matrix
// product (and its vectorised exp) can give two identical keys probabilities
// that differ in the last bit, so votes that are equal in exact arithmetic
// may not tie.
#pragma once

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
#include <vector>

namespace kvevict {

enum class SnapKVPooling { avg, max, none };

// mean, max: one kept set per KV head. expand (one set per query head, the
// reference's behaviour) is not implemented; the constructor rejects it.
enum class SnapKVAggregation { mean, max, expand };

struct SnapKVConfig {
  std::int64_t budget = 0;
  std::int64_t window = 32;
  std::int64_t kernel_size = 5;
  SnapKVPooling pooling = SnapKVPooling::avg;
  SnapKVAggregation gqa_aggregation = SnapKVAggregation::mean;
  std::optional<float> scale{};          // unset: 1 / sqrt(head_dim)
  std::optional<std::int64_t> slack{};   // unset: 4 * window
};

template <class Scalar = float>
class SnapKV {
 public:
  using scalar_type = Scalar;

  explicit SnapKV(const SnapKVConfig& config) : config_(config) {
    if (config.window < 1) detail::throw_invalid("SnapKV: window (", config.window, ") must be at least 1");
    if (config.budget < 1) detail::throw_invalid("SnapKV: budget (", config.budget, ") must be at least 1");
    if (config.budget < config.window) {
      detail::throw_invalid("SnapKV: budget (", config.budget, ") must be at least window (", config.window,
                            "), because the window is always kept");
    }
    if (config.kernel_size < 1 || config.kernel_size % 2 == 0) {
      detail::throw_invalid("SnapKV: kernel_size (", config.kernel_size, ") must be odd and at least 1");
    }
    if (config.scale && !(std::isfinite(*config.scale) && *config.scale > 0.0f)) {
      detail::throw_invalid("SnapKV: scale (", *config.scale, ") must be finite and > 0");
    }
    // NOTE: expand would store n_heads sets per layer, which a KVCache of
    // n_kv_heads heads cannot hold. The same result comes from a cache with
    // n_heads KV heads, each KV head appended once per query head of its
    // group (g = 1), and any aggregation.
    if (config.gqa_aggregation == SnapKVAggregation::expand) {
      detail::throw_invalid("SnapKV: gqa_aggregation expand (one kept set per query head) is not implemented; "
                            "use mean or max, or reproduce expand with a cache of n_heads KV heads in which "
                            "each KV head is repeated for every query head of its group");
    }
    slack_ = config.slack.value_or(4 * config.window);
    detail::validate_common("SnapKV", settings());
    ones_.assign(static_cast<std::size_t>(config.window), 1.0f);
  }

  const SnapKVConfig& config() const { return config_; }
  std::int64_t slack() const { return slack_; }
  std::string_view name() const { return "snapkv"; }
  int state_channels() const { return 0; }
  ObservationNeeds needs() const {
    return {.decode_attention = false, .prefill_attention_rows = 0, .window_queries = config_.window};
  }

  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    return detail::over_budget(settings(), cache.size(), trigger);
  }

  // Keeps no state; checks the queries when the observation carries any, so
  // a bad observation is reported even when no eviction follows.
  void observe(KVCache<Scalar>& cache, const Observation& observation) {
    validate_queries(cache, observation);
  }

  // Keeps, per KV head, the window and the best past slots by pooled vote;
  // all slots when size() <= budget.
  void select(const KVCache<Scalar>& cache, const Observation& observation, KeepPlan& plan) {
    const std::int64_t available = validate_queries(cache, observation);
    const std::int64_t n = cache.size();
    const std::int64_t keep = std::min(n, config_.budget);
    const std::int64_t w = config_.window;
    if (n > config_.budget && available < w) {
      detail::throw_invalid("SnapKV: the observation carries ", available, " window queries, window (", w,
                            ") needed; pass the queries of the last ", w,
                            " cached tokens, [n_heads, window, head_dim]");
    }
    plan.reset(cache.n_kv_heads(), keep);
    if (n <= config_.budget) {
      plan.fill_identity();
      return;
    }

    const Tensor3View queries = last_window_queries(observation.queries);
    const float scale = config_.scale.value_or(1.0f / std::sqrt(static_cast<float>(cache.head_dim())));
    const int groups = observation.n_heads / cache.n_kv_heads();
    const std::int64_t past = n - w;
    vote_.resize(static_cast<std::size_t>(past));
    pooled_.resize(static_cast<std::size_t>(past));
    scores_.resize(static_cast<std::size_t>(n));

    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      kernels::group_window_attention(cache, j, queries, scale, attention_, workspace_);
      // Window slots are protected, so their scores are never read.
      std::fill(scores_.begin(), scores_.end(), 0.0f);
      for (int member = 0; member < groups; ++member) {
        kernels::temporal_aggregate(attention_.middleRows(member * w, w), ones_, past, vote_);
        pool(member == 0);
      }
      if (config_.gqa_aggregation == SnapKVAggregation::mean) {
        for (std::int64_t t = 0; t < past; ++t) scores_[static_cast<std::size_t>(t)] /= static_cast<float>(groups);
      }
      kernels::select_keep(scores_, n, 0, w, keep, plan.head(j), select_scratch_);
    }
  }

 private:
  CommonSettings settings() const {
    return {.budget = config_.budget, .sinks = 0, .window = config_.window, .slack = slack_};
  }

  // Checks the observation's queries when present: heads, head_dim, at most
  // size() queries, finite values. Returns how many window queries it holds.
  std::int64_t validate_queries(const KVCache<Scalar>& cache, const Observation& observation) const {
    const Tensor3View& queries = observation.queries;
    if (queries.empty()) return 0;
    if (queries.d0 != observation.n_heads || observation.n_heads <= 0 ||
        observation.n_heads % cache.n_kv_heads() != 0) {
      detail::throw_invalid("SnapKV: queries have ", queries.d0, " heads and the observation n_heads is ",
                            observation.n_heads, "; both must be the same positive multiple of n_kv_heads (",
                            cache.n_kv_heads(), ")");
    }
    if (queries.d2 != cache.head_dim()) {
      detail::throw_invalid("SnapKV: queries have head_dim ", queries.d2, ", the cache has ", cache.head_dim());
    }
    if (queries.d1 > cache.size()) {
      detail::throw_invalid("SnapKV: the observation carries ", queries.d1, " queries for ", cache.size(),
                            " cached slots; the queries belong to the last cached tokens, so pass at most size()");
    }
    detail::require_finite(queries.data, queries.numel(), "SnapKV: queries");
    return queries.d1;
  }

  // The last `window` queries of `queries` [n_heads, w_obs, d]: the view
  // itself when w_obs == window, else a copy into window_queries_.
  Tensor3View last_window_queries(const Tensor3View& queries) {
    const std::int64_t w = config_.window;
    if (queries.d1 == w) return queries;
    const std::int64_t d = queries.d2;
    window_queries_.resize(static_cast<std::size_t>(queries.d0 * w * d));
    for (std::int64_t q = 0; q < queries.d0; ++q) {
      const float* first = queries.row(q, queries.d1 - w).data();
      std::copy_n(first, w * d, window_queries_.data() + q * w * d);
    }
    return {window_queries_.data(), queries.d0, w, d};
  }

  // Pools vote_ into pooled_ and folds it into scores_ (the first member of a
  // group initialises).
  void pool(bool first_member) {
    const std::span<const float> vote(vote_);
    std::span<const float> pooled = vote;
    if (config_.pooling == SnapKVPooling::avg) {
      kernels::avg_pool(vote, config_.kernel_size, pooled_);
      pooled = pooled_;
    } else if (config_.pooling == SnapKVPooling::max) {
      kernels::max_pool(vote, config_.kernel_size, pooled_, pool_scratch_);
      pooled = pooled_;
    }
    for (std::size_t t = 0; t < pooled.size(); ++t) {
      float& score = scores_[t];
      if (first_member) {
        score = pooled[t];
      } else if (config_.gqa_aggregation == SnapKVAggregation::max) {
        score = std::max(score, pooled[t]);
      } else {
        score += pooled[t];
      }
    }
  }

  SnapKVConfig config_;
  std::int64_t slack_ = 0;
  std::vector<float> ones_;            // [window] weights of the vote sum
  std::vector<float> window_queries_;  // [n_heads, window, head_dim] when w_obs > window
  RowMatrixXf attention_;              // [g * window, size()]
  kernels::WindowAttentionWorkspace workspace_;
  std::vector<float> vote_;            // [P] one query head's votes
  std::vector<float> pooled_;          // [P]
  std::vector<float> scores_;          // [size()] aggregated; window entries unread
  std::vector<std::int64_t> pool_scratch_;
  kernels::SelectScratch select_scratch_;
};

static_assert(EvictionPolicy<SnapKV<float>>);
static_assert(EvictionPolicy<SnapKV<Eigen::half>>);

}  // namespace kvevict
