// Sliding-window eviction for the llama2.c engine: a cache keeps its first
// `sink_count` tokens and its most recent ones, at most `budget` in all.
//
// With sink_count = 0 this is plain windowed attention over the last
// `budget` tokens. With sinks and a cache in cache_relative mode it is the
// StreamingLLM layout (attention sinks plus a recent window, keys rotated at
// their slot index); kvevict::StreamingLLM with budget - 1 keeps the same
// tokens when it runs after each forward call. Eviction runs between forward calls: make_room leaves
// budget - 1 tokens, so the next token's own key brings the cache back to
// `budget` while attention runs.
#pragma once

#include "kvevict/common.hpp"
#include "kvevict/kv_cache.hpp"

#include <algorithm>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

namespace llama2c {

class RecentWindow {
 public:
  // Throws std::invalid_argument unless budget >= 1 and
  // 0 <= sink_count < budget (the newest token always needs a slot).
  RecentWindow(std::int64_t budget, std::int64_t sink_count = 0) : budget_(budget), sink_count_(sink_count) {
    if (budget < 1) {
      throw std::invalid_argument("RecentWindow: budget " + std::to_string(budget) +
                                  " must be at least 1 token");
    }
    if (sink_count < 0 || sink_count >= budget) {
      throw std::invalid_argument("RecentWindow: sink_count " + std::to_string(sink_count) +
                                  " must be in [0, budget " + std::to_string(budget) +
                                  "), because the newest token needs a slot");
    }
  }

  std::int64_t budget() const { return budget_; }
  std::int64_t sink_count() const { return sink_count_; }

  // Evicts tokens so that `cache` contains at most budget - 1, keeping the
  // sinks and the newest tokens. Does not allocate once the plan has been
  // built for the cache's head count.
  template <class Scalar>
  void make_room(kvevict::KVCache<Scalar>& cache) {
    const std::int64_t size = cache.size();
    const std::int64_t keep = budget_ - 1;
    if (size <= keep) return;
    plan_.reset(cache.n_kv_heads(), keep);
    const std::int64_t sinks = std::min(sink_count_, keep);
    const std::int64_t recent_begin = size - (keep - sinks);
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      std::span<std::int64_t> slots = plan_.head(j);
      std::size_t i = 0;
      for (std::int64_t s = 0; s < sinks; ++s) slots[i++] = s;
      for (std::int64_t s = recent_begin; s < size; ++s) slots[i++] = s;
    }
    cache.keep(plan_);
  }

  template <class Scalar>
  void make_room(std::span<kvevict::KVCache<Scalar>> caches) {
    for (auto& cache : caches) make_room(cache);
  }

 private:
  std::int64_t budget_;
  std::int64_t sink_count_;
  kvevict::KeepPlan plan_;
};

}  // namespace llama2c
