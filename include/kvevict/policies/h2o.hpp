// H2O (heavy-hitter oracle): keeps the tokens that have received the most
// attention so far ("heavy hitters") and the most recent tokens.
//
// Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
// Inference of Large Language Models", NeurIPS 2023, arXiv 2306.14048.
// Reference: FMInference/H2O (H2OKVCache_LayerWise in
// h2o_hf/utils_real_drop/modify_llama.py). The normalised variant follows
// NVIDIA/kvpress (observed_attention_press.py).
//
//   [ heavy ... candidates ranked by acc ... | recent ... recent ]
//     best `heavy` of slots [0, size - recent)  size-recent .. size-1
//
// Every pass adds, per KV head j and slot t, the attention the pass's query
// rows paid to t, summed over the rows and aggregated over the query heads
// of j's group:
//   acc[j][t] += aggregate over q in group(j) of sum over rows i of P[q][i][t]
// New slots start at 0 and first receive the attention of the pass that
// appended them. An eviction keeps the `heavy` best candidates by acc (ties:
// the later slot wins) plus the last `recent` slots. acc lives in a cache
// state channel, so a kept token keeps its sum.
//
// Parameters (tokens per KV head unless stated):
//   budget              tokens kept after an eviction; required (>= 1)
//                       unless both heavy and recent are given, then
//                       heavy + recent. budget = heavy + recent always holds.
//   heavy               heavy-hitter slots, >= 0; default floor(budget / 2),
//                       or budget - recent when only recent is given
//   recent              recent slots, >= 1 (0 would let a token be evicted in
//                       the step it arrives); default budget - heavy
//   gqa_aggregation     how a group's query heads combine: mean (default),
//                       sum or max of their per-head row sums
//   normalize_by_count  false (default): rank by acc. true: rank by
//                       acc / cnt, where cnt counts the query rows that could
//                       see the token; this removes the bias toward early
//                       tokens. Needs a second state channel.
//   slack               default 0: decode-time eviction fires once
//                       size() > budget + slack; prefill cuts at > budget
// There are no attention sinks; early tokens survive only by their sums.
//
// Observation: attention rows [n_heads, r, size()] of every pass: all prompt
// rows at prefill, the new query's row at each decode step. Row i belongs to
// the query of slot size() - r + i, because the pass's tokens are the last
// ones appended. The count of normalize_by_count relies on that.
// State: 1 channel (acc), 2 with normalize_by_count (acc, cnt).
// Cost: observe O(n_heads * r * size()); select O(n_kv_heads * size())
// average (std::nth_element) plus the sort of the kept slots.
// Allocation: scratch rows live in the policy object and grow to the largest
// size() seen; decode steps at a steady size do not allocate.
// Differences from the reference: one score per KV head (the reference keeps
// one per query head and only works when n_heads == n_kv_heads); ties are
// deterministic; a prompt longer than the budget is cut once after prefill
// with the same rule (the paper assumes one eviction per step). The
// reference's ratio form (heavy_ratio, recent_ratio of the prompt length) is
// left to the engine: compute heavy and recent from the prompt length and
// construct the policy with them.
#pragma once

#include "kvevict/kernels/select.hpp"
#include "kvevict/policies/policy.hpp"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace kvevict {

// Reduction of the per-query-head sums of a group onto its KV head.
enum class H2OAggregation { mean, sum, max };

struct H2OConfig {
  std::int64_t budget = 0;
  std::optional<std::int64_t> heavy{};
  std::optional<std::int64_t> recent{};
  H2OAggregation gqa_aggregation = H2OAggregation::mean;
  bool normalize_by_count = false;
  std::int64_t slack = 0;
};

template <class Scalar = float>
class H2O {
 public:
  using scalar_type = Scalar;

  // State channel indices in the cache.
  static constexpr int acc_channel = 0;
  static constexpr int count_channel = 1;

  explicit H2O(const H2OConfig& config) : config_(config) {
    resolve_split();
    detail::validate_common("H2O", settings());
  }

  const H2OConfig& config() const { return config_; }
  std::int64_t budget() const { return budget_; }
  std::int64_t heavy() const { return heavy_; }
  std::int64_t recent() const { return recent_; }

  std::string_view name() const { return "h2o"; }
  int state_channels() const { return config_.normalize_by_count ? 2 : 1; }
  ObservationNeeds needs() const {
    return {.decode_attention = true, .prefill_attention_rows = -1, .window_queries = 0};
  }

  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    return detail::over_budget(settings(), cache.size(), trigger);
  }

  // Adds this pass's attention to acc (and the visible-row counts to cnt).
  // Throws std::invalid_argument, before writing anything, when the cache
  // lacks the state channels or the rows are missing, misshapen, more than
  // size() or non-finite.
  void observe(KVCache<Scalar>& cache, const Observation& observation) {
    validate(cache, observation);
    const Tensor3View& rows = observation.attention;
    const std::int64_t n = cache.size();
    const std::int64_t r = rows.d1;
    const int groups = observation.n_heads / cache.n_kv_heads();
    column_sum_.resize(static_cast<std::size_t>(n));
    group_sum_.resize(static_cast<std::size_t>(n));
    Eigen::Map<Eigen::RowVectorXf> column_sum(column_sum_.data(), n);
    Eigen::Map<Eigen::RowVectorXf> group_sum(group_sum_.data(), n);

    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      for (int member = 0; member < groups; ++member) {
        const std::int64_t q = static_cast<std::int64_t>(j) * groups + member;
        column_sum.noalias() = rows.block(q).colwise().sum();
        if (member == 0) {
          group_sum = column_sum;
        } else if (config_.gqa_aggregation == H2OAggregation::max) {
          group_sum = group_sum.cwiseMax(column_sum);
        } else {
          group_sum += column_sum;
        }
      }
      if (config_.gqa_aggregation == H2OAggregation::mean) group_sum /= static_cast<float>(groups);

      const std::span<float> acc = cache.state(j, acc_channel);
      for (std::int64_t t = 0; t < n; ++t) acc[static_cast<std::size_t>(t)] += group_sum_[static_cast<std::size_t>(t)];

      if (config_.normalize_by_count) {
        // Row i is the query of slot n - r + i and sees slots 0 .. n - r + i,
        // so min(r, n - t) of this pass's rows see slot t.
        const std::span<float> count = cache.state(j, count_channel);
        for (std::int64_t t = 0; t < n; ++t) {
          count[static_cast<std::size_t>(t)] += static_cast<float>(std::min(r, n - t));
        }
      }
    }
  }

  // Keeps, per KV head, the `heavy` best slots of [0, size - recent) by acc
  // (or acc / cnt) and the last `recent` slots; all slots when
  // size() <= budget. Reads only the state; the observation is unused.
  void select(const KVCache<Scalar>& cache, const Observation&, KeepPlan& plan) {
    detail::require_state_channels("H2O", cache, state_channels());
    const std::int64_t n = cache.size();
    const std::int64_t keep = std::min(n, budget_);
    plan.reset(cache.n_kv_heads(), keep);
    if (n <= budget_) {
      plan.fill_identity();
      return;
    }
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      const std::span<const float> scores = ranking_scores(cache, j);
      kernels::select_keep(scores, n, 0, recent_, keep, plan.head(j), select_scratch_);
    }
  }

 private:
  CommonSettings settings() const {
    return {.budget = budget_, .sinks = 0, .window = recent_, .slack = config_.slack};
  }

  // Derives budget, heavy and recent from the given fields and checks that
  // they agree: budget = heavy + recent, heavy >= 0, recent >= 1.
  void resolve_split() {
    const auto& heavy = config_.heavy;
    const auto& recent = config_.recent;
    if (heavy && *heavy < 0) detail::throw_invalid("H2O: heavy (", *heavy, ") must be non-negative");
    if (recent && *recent < 1) {
      detail::throw_invalid("H2O: recent (", *recent,
                            ") must be at least 1, so the newest token is never evicted in the step it arrives");
    }
    if (heavy && recent) {
      if (config_.budget != 0 && config_.budget != *heavy + *recent) {
        detail::throw_invalid("H2O: budget (", config_.budget, ") must equal heavy + recent (", *heavy, " + ",
                              *recent, "); give the budget alone, or heavy and recent");
      }
      budget_ = *heavy + *recent;
      heavy_ = *heavy;
      recent_ = *recent;
      return;
    }
    if (config_.budget < 1) {
      detail::throw_invalid("H2O: budget (", config_.budget, ") must be at least 1");
    }
    budget_ = config_.budget;
    if (heavy) {
      heavy_ = *heavy;
      recent_ = budget_ - heavy_;
      if (recent_ < 1) {
        detail::throw_invalid("H2O: heavy (", heavy_, ") must be below budget (", budget_,
                              "), so recent = budget - heavy is at least 1");
      }
    } else if (recent) {
      recent_ = *recent;
      heavy_ = budget_ - recent_;
      if (heavy_ < 0) {
        detail::throw_invalid("H2O: recent (", recent_, ") must be at most budget (", budget_, ")");
      }
    } else {
      heavy_ = budget_ / 2;
      recent_ = budget_ - heavy_;
    }
  }

  void validate(const KVCache<Scalar>& cache, const Observation& observation) const {
    detail::require_state_channels("H2O", cache, state_channels());
    detail::require_attention("H2O", cache, observation, 1);
    if (observation.attention.d1 > cache.size()) {
      detail::throw_invalid("H2O: attention has ", observation.attention.d1, " rows for ", cache.size(),
                            " cached slots; row i belongs to the query of slot size() - rows + i, so pass at "
                            "most size() rows");
    }
  }

  // acc, or acc / cnt with normalize_by_count (0 for a slot no row has seen).
  std::span<const float> ranking_scores(const KVCache<Scalar>& cache, int j) {
    const std::span<const float> acc = cache.state(j, acc_channel);
    if (!config_.normalize_by_count) return acc;
    const std::span<const float> count = cache.state(j, count_channel);
    normalized_.resize(acc.size());
    for (std::size_t t = 0; t < acc.size(); ++t) {
      normalized_[t] = count[t] > 0.0f ? acc[t] / count[t] : 0.0f;
    }
    return normalized_;
  }

  H2OConfig config_;
  std::int64_t budget_ = 0;
  std::int64_t heavy_ = 0;
  std::int64_t recent_ = 0;
  std::vector<float> column_sum_;  // [size()] one query head's column sums
  std::vector<float> group_sum_;   // [size()] aggregated over the group
  std::vector<float> normalized_;  // [size()] acc / cnt
  kernels::SelectScratch select_scratch_;
};

static_assert(EvictionPolicy<H2O<float>>);
static_assert(EvictionPolicy<H2O<Eigen::half>>);

}  // namespace kvevict
