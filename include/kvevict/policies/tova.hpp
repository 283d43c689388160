// TOVA (token omission via attention): keeps the tokens the current query
// attends to most. No history, no recent window, no sinks by default: only
// the attention row of the newest query decides.
//
// Paper: Oren, Hassid et al., "Transformers are Multi-State RNNs", EMNLP
// 2024, arXiv 2401.06104. Reference: schwartz-lab-NLP/TOVA
// (TOVACache.reduce in src/tova_cache.py); the NVIDIA/kvpress port
// (tova_press.py) protects the newest token.
//
//   layer: s[t]   = (1/n_heads) * sum over all query heads q of P[q][last][t]
//   head:  s_j[t] = (1/g) * sum over q in group(j) of P[q][last][t]
//   keep  = protected ∪ the best budget - |protected| other slots by s
// `protected` is the first `sinks` slots and, with protect_newest, the last
// slot. Ties rank the later slot first, so single-token steps drop the
// earliest of the lowest-scored tokens.
//
// Parameters (tokens per KV head unless stated):
//   budget          tokens kept after an eviction; required, >= 1 and
//                   >= sinks + (1 if protect_newest)
//   granularity     layer (default): one set for the layer, the same on every
//                   KV head; head: one set per KV head from its group's mean
//   sinks           default 0: leading tokens always kept (the paper's
//                   "+1 / +4" variants)
//   protect_newest  default false: true never evicts the newest token (the
//                   kvpress port's choice); false can drop it when it receives
//                   the least attention, as the paper's method does
//   slack           default 0: decode-time eviction fires once
//                   size() > budget + slack; prefill cuts at > budget
//
// Observation: attention rows [n_heads, r, size()] with r >= 1; only the
// last row (the newest query) is read. At prefill the last prompt row
// suffices. State: none.
// Cost: O(n_heads * size()) for the mean, O(size()) average for the
// selection per set (one set in layer mode, n_kv_heads in head mode).
// Allocation: one score row in the policy object, grown to the largest
// size() seen; steps at a steady size do not allocate.
// Differences from the reference: kept slots are in position order (the
// reference's topk reorders the cache by score); ties are deterministic;
// batch size is not limited to 1; head granularity is offered for
// comparison (the paper's ablation prefers layer averaging).
#pragma once

#include "kvevict/kernels/select.hpp"
#include "kvevict/policies/policy.hpp"

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict {

// layer: one kept set per layer from the mean over all query heads.
// head: one kept set per KV head from the mean over its group.
enum class TOVAGranularity { layer, head };

struct TOVAConfig {
  std::int64_t budget = 0;
  TOVAGranularity granularity = TOVAGranularity::layer;
  std::int64_t sinks = 0;
  bool protect_newest = false;
  std::int64_t slack = 0;
};

template <class Scalar = float>
class TOVA {
 public:
  using scalar_type = Scalar;

  explicit TOVA(const TOVAConfig& config) : config_(config) {
    detail::validate_common("TOVA", settings());
    if (config.protect_newest && config.budget < config.sinks + 1) {
      detail::throw_invalid("TOVA: budget (", config.budget, ") must be at least sinks + 1 (", config.sinks,
                            " + 1) when protect_newest is set");
    }
  }

  const TOVAConfig& config() const { return config_; }
  std::string_view name() const { return "tova"; }
  int state_channels() const { return 0; }
  ObservationNeeds needs() const {
    return {.decode_attention = true, .prefill_attention_rows = 1, .window_queries = 0};
  }

  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    return detail::over_budget(settings(), cache.size(), trigger);
  }

  // Keeps no state; checks the observation so that a bad row is reported at
  // the step it arrives, even when no eviction follows.
  void observe(KVCache<Scalar>& cache, const Observation& observation) {
    detail::require_attention("TOVA", cache, observation, 1);
  }

  // Keeps the protected slots and the best-scored others by the newest row;
  // all slots when size() <= budget. Rows are required only to cut, because
  // an empty cache has none to give. Rows that are given are checked anyway.
  void select(const KVCache<Scalar>& cache, const Observation& observation, KeepPlan& plan) {
    const std::int64_t n = cache.size();
    detail::require_attention("TOVA", cache, observation, n > config_.budget ? 1 : 0);
    const std::int64_t keep = std::min(n, config_.budget);
    plan.reset(cache.n_kv_heads(), keep);
    if (n <= config_.budget) {
      plan.fill_identity();
      return;
    }

    const int h_kv = cache.n_kv_heads();
    const int groups = observation.n_heads / h_kv;
    const std::int64_t recent = config_.protect_newest ? 1 : 0;
    if (config_.granularity == TOVAGranularity::layer) {
      mean_last_row(observation, 0, observation.n_heads, n);
      kernels::select_keep(scores_, n, config_.sinks, recent, keep, plan.head(0), select_scratch_);
      for (int j = 1; j < h_kv; ++j) std::ranges::copy(plan.head(0), plan.head(j).begin());
      return;
    }
    for (int j = 0; j < h_kv; ++j) {
      mean_last_row(observation, j * groups, groups, n);
      kernels::select_keep(scores_, n, config_.sinks, recent, keep, plan.head(j), select_scratch_);
    }
  }

 private:
  CommonSettings settings() const {
    return {.budget = config_.budget, .sinks = config_.sinks, .window = 0, .slack = config_.slack};
  }

  // scores_ [n] = mean of the last attention row over query heads
  // [first, first + count).
  void mean_last_row(const Observation& observation, int first, int count, std::int64_t n) {
    const Tensor3View& rows = observation.attention;
    const std::int64_t last = rows.d1 - 1;
    scores_.resize(static_cast<std::size_t>(n));
    Eigen::Map<Eigen::RowVectorXf> mean(scores_.data(), n);
    mean.setZero();
    for (int q = first; q < first + count; ++q) {
      mean += Eigen::Map<const Eigen::RowVectorXf>(rows.row(q, last).data(), n);
    }
    mean /= static_cast<float>(count);
  }

  TOVAConfig config_;
  std::vector<float> scores_;  // [size()]
  kernels::SelectScratch select_scratch_;
};

static_assert(EvictionPolicy<TOVA<float>>);
static_assert(EvictionPolicy<TOVA<Eigen::half>>);

}  // namespace kvevict
