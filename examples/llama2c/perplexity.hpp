// Perplexity of a token stream under the model: the model reads ids
// 0..N-1 and is scored on its N-1 predictions of ids 1..N-1, BOS targets
// included. Perplexity = exp(sum of negative log-likelihoods / (N - 1)).
#pragma once

#include "model.hpp"

#include "kvevict/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

namespace llama2c {

// Returns -log softmax(logits)[target], computed in double with the maximum
// subtracted so that large logits cannot overflow.
inline double negative_log_likelihood(std::span<const float> logits, int target) {
  if (target < 0 || static_cast<std::size_t>(target) >= logits.size()) {
    throw std::invalid_argument("negative_log_likelihood: target id " + std::to_string(target) +
                                " is outside [0, " + std::to_string(logits.size()) + ")");
  }
  double max_logit = logits[0];
  for (const float logit : logits) max_logit = std::max(max_logit, static_cast<double>(logit));
  double sum = 0.0;
  for (const float logit : logits) sum += std::exp(static_cast<double>(logit) - max_logit);
  return max_logit + std::log(sum) - static_cast<double>(logits[static_cast<std::size_t>(target)]);
}

struct PerplexityResult {
  double nll_sum = 0.0;         // natural-log negative log-likelihood, summed
  std::int64_t predictions = 0;

  double mean_nll() const { return nll_sum / static_cast<double>(predictions); }
  double perplexity() const { return std::exp(mean_nll()); }
};

// Scores `ids` with the model, reading token i at position i. Before each
// forward call `before_step(position, caches)` runs, which is where a
// caller evicts (for example RecentWindow::make_room). The last id is only
// a target, so it is never run through the model. Throws
// std::invalid_argument for fewer than two ids or a non-empty cache.
template <class Scalar, class BeforeStep>
PerplexityResult evaluate_perplexity(Model& model, std::span<const int> ids,
                                     std::span<kvevict::KVCache<Scalar>> caches, BeforeStep&& before_step) {
  if (ids.size() < 2) {
    throw std::invalid_argument("evaluate_perplexity: got " + std::to_string(ids.size()) +
                                " ids; perplexity needs at least 2 (one prediction)");
  }
  for (std::size_t l = 0; l < caches.size(); ++l) {
    if (!caches[l].empty()) {
      throw std::invalid_argument("evaluate_perplexity: the cache of layer " + std::to_string(l) +
                                  " is not empty (" + std::to_string(caches[l].size()) +
                                  " tokens); pass new caches from make_layer_caches");
    }
  }
  PerplexityResult result;
  for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
    const auto position = static_cast<std::int64_t>(i);
    before_step(position, caches);
    const std::span<const float> logits = model.forward(ids[i], position, caches);
    result.nll_sum += negative_log_likelihood(logits, ids[i + 1]);
    ++result.predictions;
  }
  return result;
}

}  // namespace llama2c
