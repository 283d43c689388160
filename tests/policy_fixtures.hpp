// Test fixtures shared by the conformance and regression tests. A small
// simulated engine appends random tokens and computes the observations a
// policy requests. A byte snapshot captures a cache. One adapter per policy
// configuration builds the policy from generic settings and states what it
// protects.
//
// The engine computes attention itself (double accumulation, causal mask by
// stored position), independently of the library's kernels, so the rows a
// policy reads are proper softmax rows of random queries over the cached keys.
#pragma once

#include "kvevict/kvevict.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace kvevict::testing {

// Head layout of one attention layer.
struct Shape {
  int n_heads = 1;
  int n_kv_heads = 1;
  int head_dim = 4;
};

// Generic policy settings that each adapter maps onto its own configuration.
// A policy ignores the fields it has no parameter for.
struct PolicySetup {
  Shape shape{};
  std::int64_t budget = 8;
  std::int64_t sinks = 0;      // leading tokens always kept
  std::int64_t window = 0;     // recent or observation window
  std::int64_t slack = 0;      // decode-time eviction fires once size() > budget + slack
  int layer = 0;               // layer index, for policies that differ by layer
  int n_layers = 4;
  bool plain_scores = false;   // turn off spatial pooling, so equal votes stay equal
  float score_scale = 1.0f;    // positive factor on every score, where a parameter sets it
  bool identical_heads = false;  // per-head parameters (W_o blocks) equal for every KV head's group
  std::uint64_t seed = 7;      // seed of random construction parameters (W_o)
};

// Options of the simulated engine.
struct EngineOptions {
  PositionMode mode = PositionMode::original;
  bool identical_kv_heads = false;  // every KV head gets the same keys, values and group queries
  bool zero_queries = false;        // every query is 0, so attention is uniform over visible keys
  bool equal_values = false;        // every value row is all ones
  std::uint64_t seed = 1;
  std::int64_t capacity = 0;        // slots reserved at construction
};

// A simulated engine for one layer: appends random tokens to a cache, keeps
// the last queries, computes attention rows of each pass, and records the
// full history of keys and values for dense-attention oracles.
template <class Scalar>
class Engine {
 public:
  Engine(const Shape& shape, const ObservationNeeds& needs, int state_channels, const EngineOptions& options)
      : shape_(shape),
        needs_(needs),
        options_(options),
        cache_(CacheConfig{.n_kv_heads = shape.n_kv_heads,
                           .head_dim = shape.head_dim,
                           .positions = options.mode,
                           .state_channels = state_channels,
                           .capacity = options.capacity,
                           .rope = {}}),
        rng_(options.seed),
        history_keys_(static_cast<std::size_t>(shape.n_kv_heads)),
        history_values_(static_cast<std::size_t>(shape.n_kv_heads)) {
    if (shape.head_dim % 2 == 0) rope_ = RotaryEmbedding(shape.head_dim, RopeConfig{});
    if (needs.window_queries > 0) {
      window_ = QueryWindow(shape.n_heads, static_cast<int>(needs.window_queries), shape.head_dim);
    }
  }

  KVCache<Scalar>& cache() { return cache_; }
  const KVCache<Scalar>& cache() const { return cache_; }
  const Shape& shape() const { return shape_; }
  int groups() const { return shape_.n_heads / shape_.n_kv_heads; }
  // Tokens appended by the last pass.
  std::int64_t pass_count() const { return pass_count_; }

  // Appends `count` random tokens as one pass and computes the attention rows
  // of their queries over every cached slot, the new ones included.
  void append(std::int64_t count) {
    const int d = shape_.head_dim;
    const int heads = shape_.n_heads;
    const int kv_heads = shape_.n_kv_heads;
    const std::int64_t before = cache_.size();
    const std::int64_t first_position = cache_.next_position();

    RowMatrixXf keys(static_cast<std::int64_t>(kv_heads) * count, d);
    RowMatrixXf values(static_cast<std::int64_t>(kv_heads) * count, d);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
    // Queries as attention uses them, [heads, count, d], and as the query
    // window stores them, [count, heads * d].
    std::vector<float> attention_queries(static_cast<std::size_t>(heads * count * d));
    std::vector<float> window_queries(static_cast<std::size_t>(heads * count * d));

    for (std::int64_t c = 0; c < count; ++c) {
      const std::int64_t position = first_position + c;
      positions[static_cast<std::size_t>(c)] = position;
      std::vector<float> shared_key = random_vector(d);
      std::vector<float> shared_value = value_vector(d);
      for (int j = 0; j < kv_heads; ++j) {
        std::vector<float> key = options_.identical_kv_heads ? shared_key : random_vector(d);
        std::vector<float> value = options_.identical_kv_heads ? shared_value : value_vector(d);
        if (options_.mode == PositionMode::original) rope_.rotate(key, static_cast<double>(position));
        const std::int64_t row = static_cast<std::int64_t>(j) * count + c;
        for (int k = 0; k < d; ++k) {
          keys(row, k) = key[static_cast<std::size_t>(k)];
          values(row, k) = value[static_cast<std::size_t>(k)];
        }
      }
      std::vector<std::vector<float>> group_queries;
      for (int r = 0; r < groups(); ++r) group_queries.push_back(query_vector(d));
      for (int q = 0; q < heads; ++q) {
        std::vector<float> query = options_.identical_kv_heads ? group_queries[static_cast<std::size_t>(q % groups())]
                                                               : query_vector(d);
        std::vector<float> stored = query;
        std::vector<float> attended = query;
        if (options_.mode == PositionMode::original) {
          rope_.rotate(stored, static_cast<double>(position));
          rope_.rotate(attended, static_cast<double>(position));
        } else {
          rope_.rotate(attended, static_cast<double>(before + c));
        }
        std::copy(attended.begin(), attended.end(),
                  attention_queries.begin() + static_cast<std::ptrdiff_t>((q * count + c) * d));
        std::copy(stored.begin(), stored.end(),
                  window_queries.begin() + static_cast<std::ptrdiff_t>((c * heads + q) * d));
      }
    }

    cache_.append(keys, values, positions);
    record_history(keys, values, positions);
    for (std::int64_t c = 0; c < count; ++c) {
      if (window_.window() > 0) {
        window_.push(std::span<const float>(window_queries.data() + c * heads * d, static_cast<std::size_t>(heads * d)));
      }
    }
    if (needs_.decode_attention || needs_.prefill_attention_rows != 0) {
      compute_rows(attention_queries, count, first_position);
    }
    pass_count_ = count;
    appended_since_observation_ += count;
  }

  // Returns the observation of the last pass with exactly what `needs`
  // requests. Attention rows: at prefill the last k rows or all of them, at
  // decode every row of the pass when decode_attention is set. Queries: the
  // query window.
  Observation observation(bool prefill) {
    Observation result;
    result.n_heads = shape_.n_heads;
    result.prefill = prefill;
    result.appended = appended_since_observation_;
    appended_since_observation_ = 0;

    std::int64_t rows = 0;
    if (prefill) {
      rows = needs_.prefill_attention_rows < 0 ? pass_count_ : std::min(needs_.prefill_attention_rows, pass_count_);
    } else if (needs_.decode_attention) {
      rows = pass_count_;
    }
    if (rows > 0) {
      const std::int64_t n = cache_.size();
      observed_rows_.resize(static_cast<std::size_t>(shape_.n_heads * rows * n));
      for (int q = 0; q < shape_.n_heads; ++q) {
        const float* from = pass_rows_.data() + (q * pass_count_ + pass_count_ - rows) * n;
        std::copy_n(from, rows * n, observed_rows_.data() + q * rows * n);
      }
      result.attention = Tensor3View{observed_rows_.data(), shape_.n_heads, rows, n};
    }
    if (needs_.window_queries > 0) result.queries = window_.view();
    return result;
  }

  // Largest absolute difference between the attention output of a fresh
  // random query over the compacted cache and dense attention over the whole
  // history masked to the positions each KV head kept. Original mode only:
  // both sides rotate at stored token positions.
  double dense_attention_gap() {
    const int d = shape_.head_dim;
    const std::int64_t query_position = cache_.next_position();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    double gap = 0.0;
    for (int q = 0; q < shape_.n_heads; ++q) {
      const int j = q / groups();
      std::vector<float> query = random_vector(d);
      rope_.rotate(query, static_cast<double>(query_position));

      const auto kept = cache_.positions(j);
      const RowMatrixXf keys = cache_.keys(j).template cast<float>();
      const RowMatrixXf values = cache_.values(j).template cast<float>();
      std::vector<const float*> compact_keys;
      std::vector<const float*> compact_values;
      for (std::int64_t s = 0; s < cache_.size(); ++s) {
        compact_keys.push_back(keys.row(s).data());
        compact_values.push_back(values.row(s).data());
      }

      std::vector<const float*> dense_keys;
      std::vector<const float*> dense_values;
      const auto& head_keys = history_keys_[static_cast<std::size_t>(j)];
      const auto& head_values = history_values_[static_cast<std::size_t>(j)];
      for (std::size_t t = 0; t < history_positions_.size(); ++t) {
        const std::int64_t position = history_positions_[t];
        if (position > query_position) continue;
        if (!std::binary_search(kept.begin(), kept.end(), position)) continue;
        dense_keys.push_back(head_keys.data() + t * static_cast<std::size_t>(d));
        dense_values.push_back(head_values.data() + t * static_cast<std::size_t>(d));
      }
      if (dense_keys.size() != compact_keys.size()) return std::numeric_limits<double>::infinity();

      const std::vector<double> compact = attend(query, compact_keys, compact_values, scale);
      const std::vector<double> dense = attend(query, dense_keys, dense_values, scale);
      for (int k = 0; k < d; ++k) {
        gap = std::max(gap, std::abs(compact[static_cast<std::size_t>(k)] - dense[static_cast<std::size_t>(k)]));
      }
    }
    return gap;
  }

  // Positions of every token appended, oldest first.
  const std::vector<std::int64_t>& history_positions() const { return history_positions_; }

 private:
  // Uniform in [-1, 1), mapped from the engine's bits so that a seed gives
  // the same inputs with every standard library.
  std::vector<float> random_vector(int d) {
    std::vector<float> out(static_cast<std::size_t>(d));
    for (float& x : out) x = static_cast<float>(static_cast<double>(rng_() >> 11) * 0x1p-52 - 1.0);
    return out;
  }
  std::vector<float> value_vector(int d) {
    if (options_.equal_values) return std::vector<float>(static_cast<std::size_t>(d), 1.0f);
    return random_vector(d);
  }
  std::vector<float> query_vector(int d) {
    if (options_.zero_queries) return std::vector<float>(static_cast<std::size_t>(d), 0.0f);
    return random_vector(d);
  }

  // Stores the appended keys and values as the cache stores them (rounded
  // through Scalar), so dense oracles use the same numbers.
  void record_history(const RowMatrixXf& keys, const RowMatrixXf& values, const std::vector<std::int64_t>& positions) {
    const auto count = static_cast<std::int64_t>(positions.size());
    for (int j = 0; j < shape_.n_kv_heads; ++j) {
      for (std::int64_t c = 0; c < count; ++c) {
        const std::int64_t row = static_cast<std::int64_t>(j) * count + c;
        for (int k = 0; k < shape_.head_dim; ++k) {
          history_keys_[static_cast<std::size_t>(j)].push_back(static_cast<float>(static_cast<Scalar>(keys(row, k))));
          history_values_[static_cast<std::size_t>(j)].push_back(
              static_cast<float>(static_cast<Scalar>(values(row, k))));
        }
      }
    }
    history_positions_.insert(history_positions_.end(), positions.begin(), positions.end());
  }

  // Returns the keys of KV head j as attention uses them: stored rotated in
  // original mode, rotated at the slot index in cache_relative mode.
  RowMatrixXf attention_keys(int j) const {
    RowMatrixXf keys = cache_.keys(j).template cast<float>();
    if (options_.mode == PositionMode::cache_relative) {
      for (std::int64_t s = 0; s < keys.rows(); ++s) {
        rope_.rotate(std::span<float>(keys.row(s).data(), static_cast<std::size_t>(keys.cols())), static_cast<double>(s));
      }
    }
    return keys;
  }

  void compute_rows(const std::vector<float>& queries, std::int64_t count, std::int64_t first_position) {
    const int d = shape_.head_dim;
    const std::int64_t n = cache_.size();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    pass_rows_.assign(static_cast<std::size_t>(shape_.n_heads * count * n), 0.0f);
    std::vector<double> logits(static_cast<std::size_t>(n));
    for (int j = 0; j < shape_.n_kv_heads; ++j) {
      const RowMatrixXf keys = attention_keys(j);
      const auto positions = cache_.positions(j);
      for (int r = 0; r < groups(); ++r) {
        const int q = j * groups() + r;
        for (std::int64_t c = 0; c < count; ++c) {
          const float* query = queries.data() + (q * count + c) * d;
          const std::int64_t query_position = first_position + c;
          double max_logit = -std::numeric_limits<double>::infinity();
          for (std::int64_t t = 0; t < n; ++t) {
            if (positions[static_cast<std::size_t>(t)] > query_position) break;
            double dot = 0.0;
            for (int k = 0; k < d; ++k) dot += static_cast<double>(query[k]) * static_cast<double>(keys(t, k));
            logits[static_cast<std::size_t>(t)] = scale * dot;
            max_logit = std::max(max_logit, logits[static_cast<std::size_t>(t)]);
          }
          double total = 0.0;
          std::int64_t visible = 0;
          for (; visible < n && positions[static_cast<std::size_t>(visible)] <= query_position; ++visible) {
            logits[static_cast<std::size_t>(visible)] = std::exp(logits[static_cast<std::size_t>(visible)] - max_logit);
            total += logits[static_cast<std::size_t>(visible)];
          }
          float* row = pass_rows_.data() + (q * count + c) * n;
          for (std::int64_t t = 0; t < visible; ++t) {
            row[t] = static_cast<float>(logits[static_cast<std::size_t>(t)] / total);
          }
        }
      }
    }
  }

  static std::vector<double> attend(const std::vector<float>& query, const std::vector<const float*>& keys,
                                    const std::vector<const float*>& values, double scale) {
    const std::size_t d = query.size();
    std::vector<double> weights(keys.size());
    double max_logit = -std::numeric_limits<double>::infinity();
    for (std::size_t t = 0; t < keys.size(); ++t) {
      double dot = 0.0;
      for (std::size_t k = 0; k < d; ++k) dot += static_cast<double>(query[k]) * static_cast<double>(keys[t][k]);
      weights[t] = scale * dot;
      max_logit = std::max(max_logit, weights[t]);
    }
    double total = 0.0;
    for (double& w : weights) {
      w = std::exp(w - max_logit);
      total += w;
    }
    std::vector<double> out(d, 0.0);
    for (std::size_t t = 0; t < keys.size(); ++t) {
      for (std::size_t k = 0; k < d; ++k) out[k] += weights[t] / total * static_cast<double>(values[t][k]);
    }
    return out;
  }

  Shape shape_;
  ObservationNeeds needs_;
  EngineOptions options_;
  KVCache<Scalar> cache_;
  RotaryEmbedding rope_;
  QueryWindow window_;
  std::mt19937_64 rng_;
  std::int64_t pass_count_ = 0;
  std::int64_t appended_since_observation_ = 0;
  std::vector<float> pass_rows_;      // [n_heads, pass_count, size()]
  std::vector<float> observed_rows_;  // the rows handed to the policy
  std::vector<std::int64_t> history_positions_;
  std::vector<std::vector<float>> history_keys_;    // per KV head, [tokens x d], as stored
  std::vector<std::vector<float>> history_values_;
};

// Every byte a cache stores for its slots: keys, values, positions and
// every state channel of every KV head, plus size and next position.
struct CacheSnapshot {
  std::int64_t size = 0;
  std::int64_t next_position = 0;
  std::vector<unsigned char> bytes;
  friend bool operator==(const CacheSnapshot&, const CacheSnapshot&) = default;
};

// Appends `count` bytes at `data` to `out`; a null pointer is fine when count is 0.
inline void append_bytes(std::vector<unsigned char>& out, const void* data, std::size_t count) {
  if (count == 0) return;
  const auto* begin = static_cast<const unsigned char*>(data);
  out.insert(out.end(), begin, begin + count);
}

template <class Scalar>
CacheSnapshot snapshot(const KVCache<Scalar>& cache) {
  CacheSnapshot result;
  result.size = cache.size();
  result.next_position = cache.next_position();
  const auto values_per_head = static_cast<std::size_t>(cache.size() * cache.head_dim());
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    append_bytes(result.bytes, cache.keys(j).data(), values_per_head * sizeof(Scalar));
    append_bytes(result.bytes, cache.values(j).data(), values_per_head * sizeof(Scalar));
    const auto positions = cache.positions(j);
    append_bytes(result.bytes, positions.data(), positions.size_bytes());
    for (int channel = 0; channel < cache.state_channels(); ++channel) {
      const auto state = cache.state(j, channel);
      append_bytes(result.bytes, state.data(), state.size_bytes());
    }
  }
  return result;
}

// The positions each KV head stores, for comparing kept token sets.
template <class Scalar>
std::vector<std::vector<std::int64_t>> kept_positions(const KVCache<Scalar>& cache) {
  std::vector<std::vector<std::int64_t>> result;
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    const auto positions = cache.positions(j);
    result.emplace_back(positions.begin(), positions.end());
  }
  return result;
}

// Marks the leading `sinks` and trailing `recent` of n slots.
inline void mark_ranges(std::int64_t n, std::int64_t sinks, std::int64_t recent, std::vector<char>& flags) {
  flags.assign(static_cast<std::size_t>(n), 0);
  for (std::int64_t s = 0; s < std::min(sinks, n); ++s) flags[static_cast<std::size_t>(s)] = 1;
  for (std::int64_t s = std::max<std::int64_t>(0, n - recent); s < n; ++s) flags[static_cast<std::size_t>(s)] = 1;
}

// How a conformance test can multiply a policy's scores by a constant.
enum class ScoreScaling {
  none,          // the policy exposes no score (the reason is stated by the adapter)
  state,         // scores are per-slot state channels that select() reads
  construction,  // a construction parameter scales every score (setup.score_scale)
};

// Defaults shared by the adapters; an adapter hides what differs.
//   policy_type, make    the policy class template and its construction from a setup
//   name                 a label for messages
//   layer_level          every KV head keeps the same list, whatever the heads contain
//   count_range          inclusive bounds of |keep| when n slots are cut, given
//                        the policy's state before the cut
//   size_bound           the largest size() after a decode round
//   prefill_chunk        prompt tokens per prefill round (0: the whole prompt)
//   leading / trailing   protected slots at the start and end of n slots
//   keeps_newest         a cut never drops the newest slot
//   mark_protected       every protected slot of head j (emergent sinks included)
//   equalize_scores      overwrites exposed per-slot scores with one value
//   scale_scores         multiplies exposed per-slot scores by c
//   invalid_setups       settings the constructor must reject
struct AdapterDefaults {
  static constexpr bool layer_level = false;
  static constexpr bool evicts = true;
  static constexpr bool exact_budget = true;     // |keep| == min(n, budget) after every cut
  static constexpr bool has_scores = true;        // ties and score scaling apply
  static constexpr ScoreScaling scaling = ScoreScaling::none;
  static constexpr std::string_view no_scaling_reason = "";

  template <class Policy>
  static std::pair<std::int64_t, std::int64_t> count_range(const PolicySetup& setup, const Policy&, std::int64_t n) {
    const std::int64_t count = std::min(n, setup.budget);
    return {count, count};
  }
  template <class Policy>
  static std::int64_t size_bound(const PolicySetup& setup, const Policy&) {
    return setup.budget + setup.slack;
  }
  // Prompt tokens appended per prefill round; 0 appends the whole prompt at once.
  static std::int64_t prefill_chunk(const PolicySetup&) { return 0; }
  static std::int64_t leading(const PolicySetup&) { return 0; }
  static std::int64_t trailing(const PolicySetup&) { return 0; }
  // True when a cut never drops the newest slot (a recent window of at least one).
  static bool keeps_newest(const PolicySetup&) { return false; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup&, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_ranges(cache.size(), 0, 0, flags);
  }
  template <class Scalar>
  static bool equalize_scores(KVCache<Scalar>&) {
    return false;
  }
  template <class Scalar>
  static bool scale_scores(KVCache<Scalar>&, float) {
    return false;
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup&) { return {}; }
};

// Marks the adapter's leading and trailing ranges; for adapters whose
// protected slots are exactly those two ranges.
template <class Adapter, class Scalar>
void mark_range_protection(const PolicySetup& setup, const KVCache<Scalar>& cache, std::vector<char>& flags) {
  mark_ranges(cache.size(), Adapter::leading(setup), Adapter::trailing(setup), flags);
}

struct FullAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = Full<Scalar>;
  static constexpr std::string_view name = "full";
  static constexpr bool layer_level = true;
  static constexpr bool evicts = false;
  static constexpr bool has_scores = false;
  static constexpr std::string_view no_scaling_reason = "keeps every token; there is no score";

  template <class Scalar>
  static Full<Scalar> make(const PolicySetup&) {
    return {};
  }
  template <class Policy>
  static std::pair<std::int64_t, std::int64_t> count_range(const PolicySetup&, const Policy&, std::int64_t n) {
    return {n, n};
  }
};

struct StreamingLLMAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = StreamingLLM<Scalar>;
  static constexpr std::string_view name = "streaming_llm";
  static constexpr bool layer_level = true;
  static constexpr bool has_scores = false;
  static constexpr std::string_view no_scaling_reason = "keeps two fixed ranges; there is no score";

  template <class Scalar>
  static StreamingLLM<Scalar> make(const PolicySetup& setup) {
    return StreamingLLM<Scalar>({.budget = setup.budget, .sinks = setup.sinks, .slack = setup.slack});
  }
  static std::int64_t leading(const PolicySetup& setup) { return setup.sinks; }
  static std::int64_t trailing(const PolicySetup& setup) { return setup.budget - setup.sinks; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<StreamingLLMAdapter>(setup, cache, flags);
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result;
    PolicySetup setup = valid;
    setup.budget = 0;
    result.push_back(setup);
    setup = valid;
    setup.budget = valid.sinks;  // no room for the newest token
    result.push_back(setup);
    setup = valid;
    setup.sinks = -1;
    result.push_back(setup);
    setup = valid;
    setup.slack = -1;
    result.push_back(setup);
    return result;
  }
};

// Multiplies state channel `channel` of every KV head by `factor`, or sets
// it to `value` when factor is 0.
template <class Scalar>
void rewrite_channel(KVCache<Scalar>& cache, int channel, float factor, float value) {
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    for (float& x : cache.state(j, channel)) x = factor != 0.0f ? x * factor : value;
  }
}

struct H2OAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = H2O<Scalar>;
  static constexpr std::string_view name = "h2o";
  static constexpr ScoreScaling scaling = ScoreScaling::state;

  template <class Scalar>
  static H2O<Scalar> make(const PolicySetup& setup) {
    return H2O<Scalar>({.budget = setup.budget, .slack = setup.slack});
  }
  // Default split: heavy = floor(budget / 2), recent = the rest.
  static std::int64_t trailing(const PolicySetup& setup) { return setup.budget - setup.budget / 2; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<H2OAdapter>(setup, cache, flags);
  }
  template <class Scalar>
  static bool equalize_scores(KVCache<Scalar>& cache) {
    rewrite_channel(cache, H2O<Scalar>::acc_channel, 0.0f, 1.0f);
    return true;
  }
  template <class Scalar>
  static bool scale_scores(KVCache<Scalar>& cache, float factor) {
    rewrite_channel(cache, H2O<Scalar>::acc_channel, factor, 0.0f);
    return true;
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(2, valid);
    result[0].budget = 0;
    result[1].slack = -1;
    return result;
  }
};

// TOVA with its defaults: layer granularity, the newest token not protected.
struct TOVAAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = TOVA<Scalar>;
  static constexpr std::string_view name = "tova";
  static constexpr bool layer_level = true;
  static constexpr std::string_view no_scaling_reason =
      "scores are the newest query's attention probabilities: a factor on a probability row is no longer one, "
      "and a factor on the logits changes the softmax rather than scaling the scores";

  template <class Scalar>
  static TOVA<Scalar> make(const PolicySetup& setup) {
    return TOVA<Scalar>({.budget = setup.budget, .sinks = setup.sinks, .slack = setup.slack});
  }
  static std::int64_t leading(const PolicySetup& setup) { return setup.sinks; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<TOVAAdapter>(setup, cache, flags);
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(4, valid);
    result[0].budget = 0;
    result[1].budget = valid.sinks - 1;
    result[2].sinks = -1;
    result[3].slack = -1;
    return result;
  }
};

// TOVA deciding per KV head and protecting the newest token (the kvpress
// port's choice), so head-level properties are covered too.
struct TOVAHeadAdapter : TOVAAdapter {
  static constexpr std::string_view name = "tova (head, protect_newest)";
  static constexpr bool layer_level = false;

  template <class Scalar>
  static TOVA<Scalar> make(const PolicySetup& setup) {
    return TOVA<Scalar>({.budget = setup.budget,
                         .granularity = TOVAGranularity::head,
                         .sinks = setup.sinks,
                         .protect_newest = true,
                         .slack = setup.slack});
  }
  static std::int64_t trailing(const PolicySetup&) { return 1; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<TOVAHeadAdapter>(setup, cache, flags);
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    auto result = TOVAAdapter::invalid_setups(valid);
    PolicySetup no_room = valid;
    no_room.budget = valid.sinks;  // no slot left for the newest token
    result.push_back(no_room);
    return result;
  }
};

struct SnapKVAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = SnapKV<Scalar>;
  static constexpr std::string_view name = "snapkv";
  static constexpr std::string_view no_scaling_reason =
      "scores are pooled sums of window attention probabilities; no parameter or state multiplies them";

  template <class Scalar>
  static SnapKV<Scalar> make(const PolicySetup& setup) {
    return SnapKV<Scalar>({.budget = setup.budget,
                           .window = setup.window,
                           .pooling = setup.plain_scores ? SnapKVPooling::none : SnapKVPooling::avg,
                           .slack = setup.slack});
  }
  static std::int64_t trailing(const PolicySetup& setup) { return setup.window; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<SnapKVAdapter>(setup, cache, flags);
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(4, valid);
    result[0].budget = 0;
    result[1].window = 0;
    result[2].budget = valid.window - 1;
    result[3].slack = -1;
    return result;
  }
};

// ReST-KV with the reference scripts' defaults and a random W_o of 7 rows
// (uniform in [-1, 1));
// setup.score_scale multiplies W_o, which multiplies every score by
// score_scale^tau.
struct RestKVAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = RestKV<Scalar>;
  static constexpr std::string_view name = "restkv";
  static constexpr ScoreScaling scaling = ScoreScaling::construction;

  static RowMatrixXf output_projection(const PolicySetup& setup) {
    std::mt19937_64 rng(setup.seed);
    const auto uniform = [&rng] { return static_cast<float>(static_cast<double>(rng() >> 11) * 0x1p-52 - 1.0); };
    const int d = setup.shape.head_dim;
    const int groups = setup.shape.n_heads / std::max(setup.shape.n_kv_heads, 1);
    RowMatrixXf w_o(7, setup.shape.n_heads * d);
    for (Eigen::Index r = 0; r < w_o.rows(); ++r) {
      for (Eigen::Index c = 0; c < w_o.cols(); ++c) w_o(r, c) = uniform();
    }
    if (setup.identical_heads) {
      // Query head q uses the block of head q mod g, so every group has the same W_o.
      for (int q = groups; q < setup.shape.n_heads; ++q) {
        w_o.middleCols(q * d, d) = w_o.middleCols((q % groups) * d, d).eval();
      }
    }
    return w_o * setup.score_scale;
  }

  template <class Scalar>
  static RestKV<Scalar> make(const PolicySetup& setup) {
    RestKVConfig config;
    config.budget = setup.budget;
    config.window = setup.window;
    config.n_heads = setup.shape.n_heads;
    config.n_kv_heads = setup.shape.n_kv_heads;
    config.head_dim = setup.shape.head_dim;
    config.pooling = setup.plain_scores ? RestKVPooling::none : RestKVPooling::adaptive;
    config.slack = setup.slack;
    return RestKV<Scalar>(config, output_projection(setup));
  }
  static std::int64_t trailing(const PolicySetup& setup) { return setup.window; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<RestKVAdapter>(setup, cache, flags);
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(5, valid);
    result[0].budget = 0;
    result[1].window = 0;
    result[2].budget = valid.window - 1;
    result[3].slack = -1;
    result[4].shape.n_heads = valid.shape.n_kv_heads * 2 + 1;  // not a multiple of n_kv_heads
    return result;
  }
};

// LaCache as layer `setup.layer` of `setup.n_layers`, capacity = budget, with
// the default span ceil(n_layers / 2) and overlap 0.
struct LaCacheAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = LaCache<Scalar>;
  static constexpr std::string_view name = "lacache";
  static constexpr bool layer_level = true;
  static constexpr bool exact_budget = false;
  static constexpr bool has_scores = false;
  static constexpr std::string_view no_scaling_reason = "keeps a fixed ladder of slots; there is no score";

  template <class Scalar>
  static LaCache<Scalar> make(const PolicySetup& setup) {
    return LaCache<Scalar>(
        {.capacity = setup.budget, .sinks = setup.sinks, .layer = setup.layer, .n_layers = setup.n_layers});
  }
  static std::int64_t leading(const PolicySetup& setup) { return setup.sinks; }
  static std::int64_t trailing(const PolicySetup&) { return 1; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  // A call can shed only what its folded ladder reaches, so prompts arrive in
  // chunks of the capacity and are compacted after each, as engines must do.
  static std::int64_t prefill_chunk(const PolicySetup& setup) { return setup.budget; }
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int,
                             std::vector<char>& flags) {
    mark_range_protection<LaCacheAdapter>(setup, cache, flags);
  }

  // The size band after a cut: C' - R' < |keep| <= C', with C' the capacity
  // after the one-time adjustment and R' the tokens one chunk sheds (R in a
  // normal step, Pb2 - Pa after a start-over folding T sweeps).
  template <class Scalar>
  static std::pair<std::int64_t, std::int64_t> count_range(const PolicySetup&, const LaCache<Scalar>& policy,
                                                           std::int64_t n) {
    const std::int64_t r_chunk = policy.shed_per_chunk();
    const std::int64_t pa = policy.kept_per_chunk();
    const std::int64_t pb = policy.chunk_size();
    const std::int64_t capacity = policy.capacity_adjusted() ? policy.capacity() : policy.capacity() + r_chunk / 2;
    if (n <= capacity) return {n, n};
    const std::int64_t shed = n - capacity;
    const std::int64_t sinks = policy.config().sinks;
    const std::int64_t layers = policy.config().n_layers;
    const std::int64_t sweep_rest = ((capacity - policy.cursor() - layers) / pa) * r_chunk;
    std::int64_t band = r_chunk;
    if (shed > sweep_rest) {
      const std::int64_t full_sweep = ((capacity - sinks - layers) / pa) * r_chunk;
      const std::int64_t sweeps = (shed - sweep_rest + full_sweep - 1) / full_sweep;
      band = pb + (sweeps - 1) * (pb - 1) - pa;
    }
    return {capacity - band + 1, capacity};
  }
  template <class Scalar>
  static std::int64_t size_bound(const PolicySetup&, const LaCache<Scalar>& policy) {
    return policy.capacity_adjusted() ? policy.capacity() : policy.capacity() + policy.shed_per_chunk() / 2;
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(6, valid);
    result[0].budget = 0;
    result[1].sinks = -1;
    result[2].layer = valid.n_layers;
    result[3].layer = -1;
    result[4].n_layers = 1;  // span 1 of 1 layer: chunks of one token shed nothing
    result[4].layer = 0;
    result[5].budget = valid.sinks + valid.n_layers;  // a sweep sheds nothing
    return result;
  }
};

// SinkCLIP with its defaults, except that the recent window and the
// observation window are both setup.window.
struct SinkCLIPAdapter : AdapterDefaults {
  template <class Scalar>
  using policy_type = SinkCLIP<Scalar>;
  static constexpr std::string_view name = "sinkclip";
  static constexpr ScoreScaling scaling = ScoreScaling::state;

  template <class Scalar>
  static SinkCLIP<Scalar> make(const PolicySetup& setup) {
    return SinkCLIP<Scalar>({.budget = setup.budget,
                             .sinks = setup.sinks,
                             .observation_window = setup.window,
                             .recent = setup.window,
                             .slack = setup.slack});
  }
  static std::int64_t leading(const PolicySetup& setup) { return setup.sinks; }
  static std::int64_t trailing(const PolicySetup& setup) { return setup.window; }
  static bool keeps_newest(const PolicySetup&) { return true; }
  // Sinks, the recent window and every slot flagged as an emergent sink.
  template <class Policy, class Scalar>
  static void mark_protected(const PolicySetup& setup, const Policy&, const KVCache<Scalar>& cache, int j,
                             std::vector<char>& flags) {
    mark_range_protection<SinkCLIPAdapter>(setup, cache, flags);
    const auto emergent = cache.state(j, SinkCLIP<Scalar>::emergent_channel);
    for (std::size_t s = 0; s < emergent.size(); ++s) {
      if (emergent[s] != 0.0f) flags[s] = 1;
    }
  }
  // S = Z = 1 on every slot, so S / Z (and S) tie everywhere.
  template <class Scalar>
  static bool equalize_scores(KVCache<Scalar>& cache) {
    rewrite_channel(cache, SinkCLIP<Scalar>::score_channel, 0.0f, 1.0f);
    rewrite_channel(cache, SinkCLIP<Scalar>::exposure_channel, 0.0f, 1.0f);
    return true;
  }
  // Multiplies S, and so S / Z, by the factor.
  template <class Scalar>
  static bool scale_scores(KVCache<Scalar>& cache, float factor) {
    rewrite_channel(cache, SinkCLIP<Scalar>::score_channel, factor, 0.0f);
    return true;
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(5, valid);
    result[0].budget = 0;
    result[1].budget = valid.sinks + valid.window;  // no scored slot left
    result[2].sinks = -1;
    result[3].window = 0;
    result[4].slack = -1;
    return result;
  }
};

// Variants that switch on the non-default options of each policy, so the
// properties are checked on those code paths too.

// H2O ranking by acc / cnt (kvpress's observed-attention variant).
struct H2ONormalizedAdapter : H2OAdapter {
  static constexpr std::string_view name = "h2o (normalize_by_count, max)";

  template <class Scalar>
  static H2O<Scalar> make(const PolicySetup& setup) {
    return H2O<Scalar>({.budget = setup.budget,
                        .gqa_aggregation = H2OAggregation::max,
                        .normalize_by_count = true,
                        .slack = setup.slack});
  }
  // acc = cnt = 1 on every slot, so acc / cnt ties everywhere.
  template <class Scalar>
  static bool equalize_scores(KVCache<Scalar>& cache) {
    rewrite_channel(cache, H2O<Scalar>::acc_channel, 0.0f, 1.0f);
    rewrite_channel(cache, H2O<Scalar>::count_channel, 0.0f, 1.0f);
    return true;
  }
};

struct SnapKVMaxAdapter : SnapKVAdapter {
  static constexpr std::string_view name = "snapkv (max pooling 3, max gqa)";

  template <class Scalar>
  static SnapKV<Scalar> make(const PolicySetup& setup) {
    return SnapKV<Scalar>({.budget = setup.budget,
                           .window = setup.window,
                           .kernel_size = 3,
                           .pooling = setup.plain_scores ? SnapKVPooling::none : SnapKVPooling::max,
                           .gqa_aggregation = SnapKVAggregation::max,
                           .slack = setup.slack});
  }
};

// ReST-KV scoring each window query before aggregating, with average
// pooling and the group maximum.
struct RestKVBeforeAdapter : RestKVAdapter {
  static constexpr std::string_view name = "restkv (before, avg 3, max gqa)";

  template <class Scalar>
  static RestKV<Scalar> make(const PolicySetup& setup) {
    RestKVConfig config;
    config.budget = setup.budget;
    config.window = setup.window;
    config.n_heads = setup.shape.n_heads;
    config.n_kv_heads = setup.shape.n_kv_heads;
    config.head_dim = setup.shape.head_dim;
    config.metric_mode = RestKVMetric::before;
    config.pooling = setup.plain_scores ? RestKVPooling::none : RestKVPooling::avg;
    config.kernel_size = 3;
    config.gqa = RestKVGqa::max;
    config.slack = setup.slack;
    return RestKV<Scalar>(config, output_projection(setup));
  }
};

// ReST-KV in after mode over all slots, with mean temporal weights and
// tau 2 (every score is then a factor score_scale^2).
struct RestKVFullScopeAdapter : RestKVAdapter {
  static constexpr std::string_view name = "restkv (full scope, mean, tau 2)";

  template <class Scalar>
  static RestKV<Scalar> make(const PolicySetup& setup) {
    RestKVConfig config;
    config.budget = setup.budget;
    config.window = setup.window;
    config.n_heads = setup.shape.n_heads;
    config.n_kv_heads = setup.shape.n_kv_heads;
    config.head_dim = setup.shape.head_dim;
    config.use_ema = false;
    config.tau = 2.0f;
    config.output_scope = RestKVOutputScope::full;
    config.pooling = setup.plain_scores ? RestKVPooling::none : RestKVPooling::adaptive;
    config.slack = setup.slack;
    return RestKV<Scalar>(config, output_projection(setup));
  }
};

// LaCache as layer 3 of 6 with span 2: chunks of 3 tokens keep 1 (R = 2),
// so the capacity grows once by floor(R / 2) = 1.
struct LaCacheWideAdapter : LaCacheAdapter {
  static constexpr std::string_view name = "lacache (layer 3 of 6, span 2)";

  template <class Scalar>
  static LaCache<Scalar> make(const PolicySetup& setup) {
    return LaCache<Scalar>({.capacity = setup.budget, .sinks = setup.sinks, .span = 2, .layer = 3, .n_layers = 6});
  }
  static std::vector<PolicySetup> invalid_setups(const PolicySetup& valid) {
    std::vector<PolicySetup> result(2, valid);
    result[0].budget = 0;
    result[1].sinks = -1;
    return result;
  }
};

// SinkCLIP ranking by S with the context clip and the group maximum.
struct SinkCLIPContextAdapter : SinkCLIPAdapter {
  static constexpr std::string_view name = "sinkclip (context clip, max gqa, by S)";

  template <class Scalar>
  static SinkCLIP<Scalar> make(const PolicySetup& setup) {
    return SinkCLIP<Scalar>({.budget = setup.budget,
                             .sinks = setup.sinks,
                             .observation_window = setup.window,
                             .recent = setup.window,
                             .clip_mode = SinkCLIPConfig::ClipMode::context,
                             .normalize_exposure = false,
                             .gqa_aggregation = SinkCLIPConfig::GroupAggregation::max,
                             .slack = setup.slack});
  }
};

// Every adapter the conformance suite runs.
using AllAdapters =
    std::tuple<FullAdapter, StreamingLLMAdapter, H2OAdapter, TOVAAdapter, SnapKVAdapter, RestKVAdapter, LaCacheAdapter,
               SinkCLIPAdapter, H2ONormalizedAdapter, TOVAHeadAdapter, SnapKVMaxAdapter, RestKVBeforeAdapter,
               RestKVFullScopeAdapter, LaCacheWideAdapter, SinkCLIPContextAdapter>;

// Calls f.template operator()<Adapter>() for every adapter of AllAdapters.
template <class F>
void for_each_adapter(F&& f) {
  std::apply([&](auto... adapters) { (f.template operator()<decltype(adapters)>(), ...); }, AllAdapters{});
}

}  // namespace kvevict::testing
