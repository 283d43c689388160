// StreamingLLM: keeps the first `sinks` tokens, which act as attention sinks,
// and a sliding window of the most recent tokens. Nothing is scored.
//
// Paper: Xiao et al., "Efficient Streaming Language Models with Attention
// Sinks", ICLR 2024, arXiv 2309.17453. Reference: mit-han-lab/streaming-llm
// (StartRecentKVCache, start_size 4).
//
//   [ sink | sink | ... evicted ... | recent ... recent ]
//     0 .. sinks-1                   size-(budget-sinks) .. size-1
//
// Parameters (tokens per KV head):
//   budget  required, >= sinks + 1: tokens kept after an eviction
//   sinks   default 4: leading tokens kept
//   slack   default 0: decode-time eviction fires once size() > budget + slack
// The paper's method needs the cache in cache_relative position mode (keys
// stored before RoPE and rotated by slot index): sinks without the position
// shift give much worse perplexity. The policy works in both modes; engines
// choose the mode when they create the cache.
//
// Observation: none (no attention rows, no queries). State: none.
// Cost: O(1) to decide; the plan and compaction are O(budget) per head.
// Allocation: none once the plan has reached its size.
// Differences from the reference: a chunk of c tokens appended at once is
// attended in full and then cut back to exactly `budget` (the reference's
// evict_for_space cuts before the chunk and computes a negative slice when
// c >= budget - sinks).
#pragma once

#include "kvevict/policies/policy.hpp"

namespace kvevict {

struct StreamingLLMConfig {
  std::int64_t budget = 0;
  std::int64_t sinks = 4;
  std::int64_t slack = 0;
};

template <class Scalar = float>
class StreamingLLM {
 public:
  using scalar_type = Scalar;

  explicit StreamingLLM(const StreamingLLMConfig& config) : config_(config) {
    detail::validate_common("StreamingLLM", settings());
    if (config.budget < config.sinks + 1) {
      detail::throw_invalid("StreamingLLM: budget (", config.budget, ") must be at least sinks + 1 (",
                            config.sinks, " + 1), so the newest token is kept");
    }
  }

  const StreamingLLMConfig& config() const { return config_; }
  std::string_view name() const { return "streaming_llm"; }
  int state_channels() const { return 0; }
  ObservationNeeds needs() const { return {}; }

  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    return detail::over_budget(settings(), cache.size(), trigger);
  }

  void observe(KVCache<Scalar>&, const Observation&) {}

  // Keeps [0, sinks) and the last budget - sinks slots; all heads alike.
  void select(const KVCache<Scalar>& cache, const Observation&, KeepPlan& plan) {
    const std::int64_t n = cache.size();
    const std::int64_t keep = std::min(n, config_.budget);
    plan.reset(cache.n_kv_heads(), keep);
    const std::int64_t sinks = std::min(config_.sinks, keep);
    const std::int64_t recent = keep - sinks;
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      auto row = plan.head(j);
      std::size_t i = 0;
      for (std::int64_t s = 0; s < sinks; ++s) row[i++] = s;
      for (std::int64_t s = n - recent; s < n; ++s) row[i++] = s;
    }
  }

 private:
  CommonSettings settings() const {
    return {.budget = config_.budget, .sinks = config_.sinks, .window = 0, .slack = config_.slack};
  }

  StreamingLLMConfig config_;
};

static_assert(EvictionPolicy<StreamingLLM<float>>);
static_assert(EvictionPolicy<StreamingLLM<Eigen::half>>);

}  // namespace kvevict
