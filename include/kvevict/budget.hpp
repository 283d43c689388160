// Per-layer budgets: the same budget for every layer (uniform), or the
// PyramidKV schedule that ReST-KV uses, where shallow layers keep more tokens
// than deep ones.
//
// Every budget here counts all tokens a KV head keeps after an eviction,
// protected ones (sinks, recent or observation window) included. A schedule
// distributes only the scored share `budget - protected_tokens`; every layer
// keeps its protected tokens on top of its share. A schedule or a list of
// budgets that would leave a layer less than its protected tokens throws
// std::invalid_argument instead of shrinking the protected ranges.
//
// Pyramid schedule (PyramidKV, arXiv 2406.02069; ReST-KV reference
// an-yongqi/rest-kv, RestKVCluster.update_kv). With P = budget -
// protected_tokens (the average scored share), L layers and n cached tokens:
//
//   min_p = floor(P / beta),  max_p = 2P - min_p
//   if max_p >= n - protected_tokens:  max_p = n - protected_tokens,  min_p = 2P - max_p
//   layer l keeps protected_tokens + k_l, with k_l falling from max_p (layer 0)
//   toward min_p (layer L-1)
//
// Two rules give k_l:
//  - reference: step = floor((max_p - min_p) / (L - 1)), k_l = max_p - l * step.
//    Rounding the step down makes the layers keep more than L * P scored
//    tokens in total (B = 128, window 32, L = 32, beta 20, n = 1000: 3536
//    instead of 3072). With L = 1 the step is 0 and the layer keeps max_p.
//  - conserving (default): k_l = floor(max_p - l * (max_p - min_p) / (L - 1)),
//    then the remainder L * P - sum k_l goes one token each to the layers with
//    the largest fractional parts (ties to the lower layer index), so the
//    layers keep exactly L * P scored tokens. With L = 1 the layer keeps P.
// The arithmetic is exact (integers only).
//
// When n <= budget nothing needs evicting, so every layer's budget is n.
#pragma once

#include "kvevict/common.hpp"

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace kvevict {

enum class PyramidRounding { conserving, reference };

inline std::string_view to_string(PyramidRounding rounding) {
  return rounding == PyramidRounding::conserving ? "conserving" : "reference";
}

// Inputs of the pyramid schedule. Units: tokens per KV head.
struct PyramidConfig {
  std::int64_t budget = 0;            // B: average budget per layer, protected tokens included
  std::int64_t protected_tokens = 0;  // tokens every layer keeps outside the schedule (ReST-KV: the window)
  int n_layers = 0;                   // L
  double beta = 20.0;                 // the smallest scored share is floor((B - protected_tokens) / beta)
  PyramidRounding rounding = PyramidRounding::conserving;
};

// The scored-share range of a schedule: layer 0 keeps max_scored, layer L-1
// about min_scored (exactly, with the conserving rule and L >= 2).
struct PyramidRange {
  std::int64_t min_scored = 0;  // min_p
  std::int64_t max_scored = 0;  // max_p
};

namespace detail {

inline void validate_budget_against_protected(std::string_view who, std::int64_t budget,
                                              std::int64_t protected_tokens) {
  if (protected_tokens < 0) {
    throw_invalid(who, ": protected_tokens (", protected_tokens, ") must be non-negative");
  }
  if (budget < 1) throw_invalid(who, ": budget (", budget, ") must be at least 1");
  if (budget < protected_tokens) {
    throw_invalid(who, ": budget (", budget, ") must be at least the protected tokens (", protected_tokens,
                  "); a layer cannot keep less than its protected range");
  }
}

}  // namespace detail

// Throws std::invalid_argument unless `config` describes a valid schedule:
// budget >= max(1, protected_tokens), protected_tokens >= 0, n_layers >= 1,
// beta finite and >= 1.
inline void validate_pyramid(const PyramidConfig& config) {
  detail::validate_budget_against_protected("pyramid budgets", config.budget, config.protected_tokens);
  if (config.n_layers < 1) {
    detail::throw_invalid("pyramid budgets: n_layers (", config.n_layers, ") must be at least 1");
  }
  if (!(config.beta >= 1.0) || !std::isfinite(config.beta)) {
    detail::throw_invalid("pyramid budgets: beta (", config.beta, ") must be finite and at least 1");
  }
}

// Returns min_p and max_p of the schedule for a cache of `n_tokens` tokens,
// after the clamp to the n_tokens - protected_tokens scored candidates.
// Requires n_tokens > budget (below that nothing is evicted); throws otherwise.
inline PyramidRange pyramid_range(const PyramidConfig& config, std::int64_t n_tokens) {
  validate_pyramid(config);
  if (n_tokens <= config.budget) {
    detail::throw_invalid("pyramid_range: n_tokens (", n_tokens, ") must exceed the budget (", config.budget,
                          "); a cache within the budget keeps every token");
  }
  const std::int64_t share = config.budget - config.protected_tokens;
  const std::int64_t candidates = n_tokens - config.protected_tokens;
  PyramidRange range;
  range.min_scored = static_cast<std::int64_t>(std::floor(static_cast<double>(share) / config.beta));
  range.max_scored = 2 * share - range.min_scored;
  if (range.max_scored >= candidates) {
    // candidates > share, so min_scored = 2 * share - candidates stays in [0, share).
    range.max_scored = candidates;
    range.min_scored = 2 * share - candidates;
  }
  return range;
}

// Returns the budget of layer `layer` (protected tokens included) for a cache
// of `n_tokens` tokens: n_tokens when n_tokens <= budget, the schedule
// otherwise. Cost O(n_layers) for the conserving rule, O(1) for the
// reference rule; never allocates.
inline std::int64_t pyramid_budget(const PyramidConfig& config, int layer, std::int64_t n_tokens) {
  validate_pyramid(config);
  if (layer < 0 || layer >= config.n_layers) {
    detail::throw_invalid("pyramid_budget: layer (", layer, ") must be in [0, n_layers = ", config.n_layers, ")");
  }
  if (n_tokens < 0) detail::throw_invalid("pyramid_budget: n_tokens (", n_tokens, ") must be non-negative");
  if (n_tokens <= config.budget) return n_tokens;

  const PyramidRange range = pyramid_range(config, n_tokens);
  const std::int64_t spread = range.max_scored - range.min_scored;  // >= 0
  const std::int64_t intervals = static_cast<std::int64_t>(config.n_layers) - 1;
  std::int64_t scored = 0;
  if (config.rounding == PyramidRounding::reference) {
    const std::int64_t step = intervals == 0 ? 0 : spread / intervals;
    scored = range.max_scored - layer * step;
  } else if (intervals == 0) {
    scored = config.budget - config.protected_tokens;
  } else {
    // Real share of layer i: max_p - i * spread / intervals. Its floor is
    // max_p - ceil(i * spread / intervals) and its fractional part is
    // fraction(i) / intervals, both in integers.
    const auto fraction = [&](std::int64_t i) { return (intervals - (i * spread) % intervals) % intervals; };
    const auto floor_share = [&](std::int64_t i) {
      return range.max_scored - (i * spread + intervals - 1) / intervals;
    };
    // The real shares sum to L * P exactly, so the remainder equals the sum
    // of the fractional parts and is smaller than the number of layers.
    std::int64_t remainder = 0;
    for (std::int64_t i = 0; i <= intervals; ++i) remainder += fraction(i);
    remainder /= intervals;
    const std::int64_t own = fraction(layer);
    std::int64_t rank = 0;  // layers that receive a remainder token before this one
    for (std::int64_t i = 0; i <= intervals; ++i) {
      const std::int64_t other = fraction(i);
      if (other > own || (other == own && i < layer)) ++rank;
    }
    scored = floor_share(layer) + (own > 0 && rank < remainder ? 1 : 0);
  }
  return config.protected_tokens + scored;
}

// Returns every layer's budget (pyramid_budget for layers 0..n_layers-1).
inline std::vector<std::int64_t> pyramid_budgets(const PyramidConfig& config, std::int64_t n_tokens) {
  validate_pyramid(config);
  std::vector<std::int64_t> budgets(static_cast<std::size_t>(config.n_layers));
  for (int layer = 0; layer < config.n_layers; ++layer) {
    budgets[static_cast<std::size_t>(layer)] = pyramid_budget(config, layer, n_tokens);
  }
  return budgets;
}

// Returns n_layers copies of `budget`; throws when budget < 1 or n_layers < 1.
inline std::vector<std::int64_t> uniform_budgets(std::int64_t budget, int n_layers) {
  if (budget < 1) detail::throw_invalid("uniform_budgets: budget (", budget, ") must be at least 1");
  if (n_layers < 1) detail::throw_invalid("uniform_budgets: n_layers (", n_layers, ") must be at least 1");
  return std::vector<std::int64_t>(static_cast<std::size_t>(n_layers), budget);
}

// Throws std::invalid_argument naming the layer when a per-layer budget from
// any source is below 1 or below `protected_tokens`.
inline void validate_layer_budgets(std::span<const std::int64_t> budgets, std::int64_t protected_tokens) {
  if (protected_tokens < 0) {
    detail::throw_invalid("layer budgets: protected_tokens (", protected_tokens, ") must be non-negative");
  }
  for (std::size_t layer = 0; layer < budgets.size(); ++layer) {
    const std::int64_t budget = budgets[layer];
    if (budget < 1 || budget < protected_tokens) {
      detail::throw_invalid("layer budgets: layer ", layer, " has budget ", budget,
                            ", which must be at least 1 and at least the protected tokens (", protected_tokens,
                            "); raise the budget or shrink the protected ranges");
    }
  }
}

}  // namespace kvevict
