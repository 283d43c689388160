// The EvictionPolicy concept, the settings every policy shares, and the two
// calling patterns an engine uses.
//
// A policy is a class template on the cache's storage scalar. It never
// mutates keys, values or positions: `observe` updates the per-slot state it
// owns (stored in the cache, so it moves with `keep`), and `select` writes
// its decision into a KeepPlan. `KVCache::keep` is the only mutation.
//
// One policy object serves one layer's cache (per-layer budgets and the
// layer index are part of its configuration). Objects hold scratch buffers
// reused across calls, so they are not thread-safe; use one per thread.
#pragma once

#include "kvevict/common.hpp"
#include "kvevict/kv_cache.hpp"
#include "kvevict/observation.hpp"

#include <concepts>
#include <cstdint>
#include <string_view>

namespace kvevict {

// What a policy reads from the engine at each call.
struct ObservationNeeds {
  bool decode_attention = false;            // the newest query's attention row, every decode step
  std::int64_t prefill_attention_rows = 0;  // prompt attention rows at prefill: 0 none, -1 all, k the last k
  std::int64_t window_queries = 0;          // the last w queries (scorers that use window attention)
};

// When an eviction fires: a prefill compression cuts whenever the cache is
// over budget; decode-time eviction waits until it exceeds budget + slack.
enum class Trigger { prefill, decode };

template <class P>
concept EvictionPolicy = requires(P& policy, const P& const_policy, KVCache<typename P::scalar_type>& cache,
                                  const KVCache<typename P::scalar_type>& const_cache,
                                  const Observation& observation, KeepPlan& plan, Trigger trigger) {
  typename P::scalar_type;
  { const_policy.name() } -> std::convertible_to<std::string_view>;
  { const_policy.state_channels() } -> std::convertible_to<int>;
  { const_policy.needs() } -> std::same_as<ObservationNeeds>;
  // True when the cache must be compacted now.
  { const_policy.should_evict(const_cache, trigger) } -> std::same_as<bool>;
  // Updates the policy's per-slot state from this pass; validates first, so a
  // throw leaves the cache (state included) unchanged.
  { policy.observe(cache, observation) } -> std::same_as<void>;
  // Writes the kept slots per KV head into `plan`.
  { policy.select(const_cache, observation, plan) } -> std::same_as<void>;
};

// Budget, protected ranges and slack shared by most policies. Units: tokens
// per KV head. Each policy states which fields it reads.
struct CommonSettings {
  std::int64_t budget = 0;  // tokens a KV head keeps after an eviction, protected ones included
  std::int64_t sinks = 0;   // leading tokens always kept
  std::int64_t window = 0;  // trailing tokens always kept (recent or observation window)
  std::int64_t slack = 0;   // decode-time eviction fires once size() > budget + slack
};

namespace detail {

// Checks the shared settings; `policy` names the policy in messages.
inline void validate_common(std::string_view policy, const CommonSettings& settings) {
  if (settings.budget < 1) {
    throw_invalid(policy, ": budget (", settings.budget, ") must be at least 1");
  }
  if (settings.sinks < 0) throw_invalid(policy, ": sinks (", settings.sinks, ") must be non-negative");
  if (settings.window < 0) throw_invalid(policy, ": window (", settings.window, ") must be non-negative");
  if (settings.slack < 0) throw_invalid(policy, ": slack (", settings.slack, ") must be non-negative");
  if (settings.budget < settings.sinks + settings.window) {
    throw_invalid(policy, ": budget (", settings.budget, ") must be at least sinks + window (", settings.sinks,
                  " + ", settings.window, ")");
  }
}

inline bool over_budget(const CommonSettings& settings, std::int64_t size, Trigger trigger) {
  return trigger == Trigger::prefill ? size > settings.budget : size > settings.budget + settings.slack;
}

// Checks that a cache built for a policy has the state channels it needs.
template <class Scalar>
void require_state_channels(std::string_view policy, const KVCache<Scalar>& cache, int channels) {
  if (cache.state_channels() < channels) {
    throw_invalid(policy, ": the cache has ", cache.state_channels(), " state channels, the policy needs ",
                  channels, "; create the cache with state_channels = policy.state_channels()");
  }
}

// Checks attention rows [n_heads, rows, size()] against the cache: shape,
// GQA divisibility, finite values. `min_rows` 0 accepts an empty view.
template <class Scalar>
void require_attention(std::string_view policy, const KVCache<Scalar>& cache, const Observation& observation,
                       std::int64_t min_rows) {
  const Tensor3View& rows = observation.attention;
  if (rows.empty()) {
    if (min_rows > 0) {
      throw_invalid(policy, ": the observation has no attention rows; pass the probabilities of this pass's "
                    "queries, [n_heads, rows, size()]");
    }
    return;
  }
  if (rows.d0 != observation.n_heads || observation.n_heads <= 0 || observation.n_heads % cache.n_kv_heads() != 0) {
    throw_invalid(policy, ": attention has ", rows.d0, " heads and the observation n_heads is ",
                  observation.n_heads, "; both must be the same positive multiple of n_kv_heads (",
                  cache.n_kv_heads(), ")");
  }
  if (rows.d2 != cache.size()) {
    throw_invalid(policy, ": attention rows have ", rows.d2, " columns, the cache holds ", cache.size(),
                  " slots; pass rows over every cached slot, after the append");
  }
  if (rows.d1 < min_rows) {
    throw_invalid(policy, ": attention has ", rows.d1, " rows, at least ", min_rows, " needed");
  }
  // The message is built only on failure, so a decode step does not allocate.
  if (!all_finite(rows.data, rows.numel())) require_finite(rows.data, rows.numel(), std::string(policy) + ": attention");
}

}  // namespace detail

// Decode-time eviction, called after the attention of the newly appended
// token(s): observe, then compact when size() > budget + slack. Returns true
// when the cache was compacted.
template <EvictionPolicy P>
bool observe_and_evict(P& policy, KVCache<typename P::scalar_type>& cache, const Observation& observation,
                       KeepPlan& plan) {
  policy.observe(cache, observation);
  if (!policy.should_evict(cache, Trigger::decode)) return false;
  policy.select(cache, observation, plan);
  cache.keep(plan);
  return true;
}

// Prefill compression, called after the prompt's attention: observe, then cut
// to the budget when size() > budget. Returns true when the cache was cut.
template <EvictionPolicy P>
bool compress_prefill(P& policy, KVCache<typename P::scalar_type>& cache, const Observation& observation,
                      KeepPlan& plan) {
  policy.observe(cache, observation);
  if (!policy.should_evict(cache, Trigger::prefill)) return false;
  policy.select(cache, observation, plan);
  cache.keep(plan);
  return true;
}

// Returns the plan by value, for callers that do not reuse a plan.
template <EvictionPolicy P>
KeepPlan select(P& policy, const KVCache<typename P::scalar_type>& cache, const Observation& observation) {
  KeepPlan plan;
  policy.select(cache, observation, plan);
  return plan;
}

}  // namespace kvevict
