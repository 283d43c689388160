// Streams a token sequence through the llama2.c engine with one kvevict
// policy object per layer, the decode-time setting: each token is appended,
// attended, and then every layer's policy observes that step and evicts.
//
// Measured per run: perplexity overall and per segment, tokens per second,
// the share of time spent in observe + select + keep, KV-cache bytes (peak
// and at the end), resident memory, and the attention-output error of each
// layer against a full cache over the same recent span.
#pragma once

#include "model.hpp"
#include "perplexity.hpp"
#include "tokenizer.hpp"

#include "kvevict/kvevict.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

namespace llama2c {

// Resident set size of this process now, in bytes (Linux /proc), or 0 when
// it cannot be read.
inline std::int64_t current_rss_bytes() {
  std::FILE* file = std::fopen("/proc/self/statm", "r");
  if (file == nullptr) return 0;
  long pages_total = 0;
  long pages_resident = 0;
  const int read = std::fscanf(file, "%ld %ld", &pages_total, &pages_resident);
  std::fclose(file);
  if (read != 2) return 0;
  return static_cast<std::int64_t>(pages_resident) * static_cast<std::int64_t>(sysconf(_SC_PAGESIZE));
}

// Peak resident set size of this process so far, in bytes.
inline std::int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::int64_t>(usage.ru_maxrss) * 1024;
}

struct StreamSettings {
  kvevict::PolicyOptions policy;          // name, budget, sinks, window, slack (layer fields are set per layer)
  kvevict::PositionMode positions = kvevict::PositionMode::cache_relative;
  std::int64_t tokens = 0;                // ids read by the model (predictions = tokens - 1)
  std::int64_t segment_tokens = 4096;     // perplexity is also reported per segment of this many predictions
  std::int64_t error_every = 64;          // attention-output error sampled every this many tokens (0: off)
  std::int64_t error_span = 512;          // the full reference cache holds the last this many tokens
  std::int64_t warmup_tokens = 1024;      // resident memory is compared after this many tokens
};

struct SegmentResult {
  std::int64_t end_token = 0;  // tokens read when the segment closed
  double perplexity = 0.0;
};

struct StreamResult {
  std::string policy;
  std::int64_t budget = 0;
  std::int64_t tokens = 0;
  double perplexity = 0.0;
  std::vector<SegmentResult> segments;
  double seconds = 0.0;
  double eviction_seconds = 0.0;
  std::int64_t evictions = 0;           // compactions summed over layers
  std::int64_t kv_bytes_peak = 0;       // all layers, in use, largest at any point of the step
  std::int64_t kv_bytes_end = 0;
  std::int64_t kv_bytes_after_warmup = 0;
  std::int64_t kv_bytes_peak_warmup = 0;       // peak during the warm-up tokens
  std::int64_t kv_bytes_peak_after_warmup = 0; // peak after them; bounded means <= the warm-up peak
  std::int64_t rss_after_warmup = 0;    // resident memory after warm-up, bytes
  std::int64_t rss_end = 0;
  std::int64_t rss_peak = 0;            // process peak so far, bytes
  double attention_error = 0.0;         // mean relative error of the W_o-projected attention output
  std::vector<double> attention_error_per_layer;
  std::int64_t error_samples = 0;

  double tokens_per_second() const { return seconds > 0.0 ? static_cast<double>(tokens) / seconds : 0.0; }
  double eviction_share() const { return seconds > 0.0 ? eviction_seconds / seconds : 0.0; }
};

namespace detail {

// Attention output of one query head over a cache, in float: softmax of the
// query against the keys as attention sees them, times the values.
template <class Scalar>
void head_output(const kvevict::KVCache<Scalar>& cache, int j, std::span<const float> query, float scale,
                 RowMatrixXf& keys, Eigen::VectorXf& scores, Eigen::Ref<Eigen::VectorXf> out) {
  const std::int64_t n = cache.size();
  keys.resize(n, cache.head_dim());
  cache.rotated_keys(j, keys);
  Eigen::VectorXf q = Eigen::Map<const Eigen::VectorXf>(query.data(), cache.head_dim());
  cache.rotate_at_slot({q.data(), static_cast<std::size_t>(q.size())}, n - 1);
  scores.resize(n);
  scores.noalias() = keys * q * scale;
  scores = (scores.array() - scores.maxCoeff()).exp();
  scores /= scores.sum();
  out.noalias() = cache.values(j).template cast<float>().transpose() * scores;
}

}  // namespace detail

// One kvevict policy object per layer, fed what each needs after every
// forward call: the new query's attention row, and the last w queries for
// scorers that re-score during decoding.
class LayerPolicies {
 public:
  LayerPolicies(const Model& model, const kvevict::PolicyOptions& base) {
    const ModelConfig& config = model.config();
    for (int l = 0; l < config.n_layers; ++l) {
      kvevict::PolicyOptions options = base;
      options.layer = l;
      options.n_layers = config.n_layers;
      options.n_heads = config.n_heads;
      options.n_kv_heads = config.n_kv_heads;
      options.head_dim = config.head_dim();
      options.w_o = &model.checkpoint().layers[static_cast<std::size_t>(l)].wo;
      policies_.push_back(kvevict::make_policy<float>(options));
    }
    needs_ = policies_.front().needs();
    if (needs_.window_queries > 0) {
      for (int l = 0; l < config.n_layers; ++l) {
        windows_.emplace_back(config.n_heads, static_cast<int>(needs_.window_queries), config.head_dim());
      }
    }
  }

  std::string_view name() const { return policies_.front().name(); }
  int state_channels() const { return policies_.front().state_channels(); }

  // Observes the last forward call in every layer and evicts where the
  // policy's size rule fires. Returns the number of layers compacted.
  std::int64_t observe_and_evict(const Model& model, std::span<kvevict::KVCache<float>> caches) {
    const ModelConfig& config = model.config();
    std::int64_t compacted = 0;
    for (int l = 0; l < config.n_layers; ++l) {
      auto& cache = caches[static_cast<std::size_t>(l)];
      const auto rows = model.attention(l);
      kvevict::Observation observation;
      observation.n_heads = config.n_heads;
      observation.attention = {rows.data(), config.n_heads, 1, rows.cols()};
      observation.appended = 1;
      if (!windows_.empty()) {
        auto& window = windows_[static_cast<std::size_t>(l)];
        const auto queries = model.queries(l);
        window.push({queries.data(), static_cast<std::size_t>(queries.size())});
        if (window.size() == window.window() && cache.size() >= window.window()) observation.queries = window.view();
      }
      if (kvevict::observe_and_evict(policies_[static_cast<std::size_t>(l)], cache, observation, plan_)) {
        ++compacted;
      }
    }
    return compacted;
  }

 private:
  std::vector<kvevict::AnyPolicy<float>> policies_;
  std::vector<kvevict::QueryWindow> windows_;
  kvevict::ObservationNeeds needs_;
  kvevict::KeepPlan plan_;
};

// Generates up to `steps` tokens greedily from BOS with `policy` managing
// every layer's cache, and returns the decoded text. Stops early when the
// model emits BOS (the start of a new story), as llama2.c does. Stores the
// number of forward calls in `generated` when given.
inline std::string generate_greedy(Model& model, const Tokenizer& tokenizer, const kvevict::PolicyOptions& policy,
                                   kvevict::PositionMode positions, std::int64_t steps,
                                   std::int64_t* generated = nullptr) {
  LayerPolicies policies(model, policy);
  const std::int64_t capacity = policies.name() == "full" ? steps + 1 : 4 * policy.budget + 1024;
  auto caches = make_layer_caches<float>(model.config(), positions, capacity, policies.state_channels());
  std::string text;
  int token = Tokenizer::bos_id;
  for (std::int64_t position = 0; position < steps; ++position) {
    const std::span<const float> logits = model.forward(token, position, std::span(caches));
    const int next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    policies.observe_and_evict(model, std::span(caches));
    if (next == Tokenizer::bos_id) break;
    text += tokenizer.decode(token, next);
    token = next;
    if (generated != nullptr) *generated = position + 1;
  }
  return text;
}

// Runs `ids` (already repeated to settings.tokens ids) through `model`.
// `progress(tokens_done)` is called every few hundred tokens.
inline StreamResult run_stream(Model& model, std::span<const int> ids, const StreamSettings& settings,
                               const std::function<void(std::int64_t)>& progress) {
  using clock = std::chrono::steady_clock;
  const ModelConfig& config = model.config();
  const std::int64_t tokens = std::min<std::int64_t>(settings.tokens, static_cast<std::int64_t>(ids.size()));
  if (tokens < 2) {
    throw std::invalid_argument("run_stream: " + std::to_string(tokens) +
                                " tokens; perplexity needs at least 2");
  }

  LayerPolicies policies(model, settings.policy);
  const bool is_full = policies.name() == "full";
  const std::int64_t capacity = is_full ? tokens : 4 * settings.policy.budget + 1024;
  auto caches = make_layer_caches<float>(config, settings.positions, capacity, policies.state_channels());
  model.reserve_context(std::min(capacity, tokens));

  // The reference for the attention-output error: a full cache over the last
  // error_span tokens, fed the same keys and values as the evicted cache.
  const bool measure_error = settings.error_every > 0;
  std::vector<kvevict::KVCache<float>> reference;
  std::vector<kvevict::StreamingLLM<float>> reference_window;
  if (measure_error) {
    reference = make_layer_caches<float>(config, settings.positions, settings.error_span + 2);
    for (int l = 0; l < config.n_layers; ++l) {
      reference_window.emplace_back(kvevict::StreamingLLMConfig{.budget = settings.error_span, .sinks = 0, .slack = 0});
    }
  }

  StreamResult result;
  result.policy = std::string(policies.name());
  result.budget = is_full ? 0 : settings.policy.budget;
  result.tokens = tokens;
  result.attention_error_per_layer.assign(static_cast<std::size_t>(config.n_layers), 0.0);

  kvevict::KeepPlan reference_plan;
  RowMatrixXf keys_scratch;
  Eigen::VectorXf scores_scratch;
  Eigen::VectorXf evicted_output(config.dim);
  Eigen::VectorXf full_output(config.dim);
  RowMatrixXf new_keys(config.n_kv_heads, config.head_dim());
  RowMatrixXf new_values(config.n_kv_heads, config.head_dim());
  const float scale = 1.0f / std::sqrt(static_cast<float>(config.head_dim()));
  std::vector<double> layer_error_sum(static_cast<std::size_t>(config.n_layers), 0.0);

  double nll_sum = 0.0;
  double segment_nll = 0.0;
  std::int64_t segment_count = 0;
  const auto start = clock::now();
  double eviction_seconds = 0.0;
  double measurement_seconds = 0.0;

  for (std::int64_t i = 0; i + 1 < tokens; ++i) {
    const std::span<const float> logits = model.forward(ids[static_cast<std::size_t>(i)], i, std::span(caches));
    const double nll = negative_log_likelihood(logits, ids[static_cast<std::size_t>(i + 1)]);
    nll_sum += nll;
    segment_nll += nll;
    ++segment_count;

    std::int64_t bytes = 0;
    for (const auto& cache : caches) bytes += static_cast<std::int64_t>(cache.memory_bytes());
    result.kv_bytes_peak = std::max(result.kv_bytes_peak, bytes);
    if (i + 2 <= settings.warmup_tokens) {
      result.kv_bytes_peak_warmup = std::max(result.kv_bytes_peak_warmup, bytes);
    } else {
      result.kv_bytes_peak_after_warmup = std::max(result.kv_bytes_peak_after_warmup, bytes);
    }

    // Attention-output error, on the caches this step attended over. Its time
    // is excluded from the speed figures.
    const auto error_start = clock::now();
    if (measure_error) {
      for (int l = 0; l < config.n_layers; ++l) {
        auto& cache = caches[static_cast<std::size_t>(l)];
        auto& full = reference[static_cast<std::size_t>(l)];
        const std::int64_t last = cache.size() - 1;
        for (int j = 0; j < config.n_kv_heads; ++j) {
          new_keys.row(j) = cache.keys(j).row(last);
          new_values.row(j) = cache.values(j).row(last);
        }
        full.append(new_keys, new_values, std::span<const std::int64_t>(&i, 1));
        const bool sample = i >= settings.policy.budget && (i % settings.error_every) == 0;
        if (sample) {
          const auto queries = model.queries(l);
          for (int h = 0; h < config.n_heads; ++h) {
            const int j = h / config.kv_group_size();
            const std::span<const float> query(queries.row(h).data(), static_cast<std::size_t>(config.head_dim()));
            detail::head_output(cache, j, query, scale, keys_scratch, scores_scratch,
                                evicted_output.segment(static_cast<Eigen::Index>(h) * config.head_dim(), config.head_dim()));
            detail::head_output(full, j, query, scale, keys_scratch, scores_scratch,
                                full_output.segment(static_cast<Eigen::Index>(h) * config.head_dim(), config.head_dim()));
          }
          const auto& wo = model.checkpoint().layers[static_cast<std::size_t>(l)].wo;
          const double denominator = (wo * full_output).norm();
          const double error = (wo * (evicted_output - full_output)).norm();
          layer_error_sum[static_cast<std::size_t>(l)] += denominator > 0.0 ? error / denominator : 0.0;
        }
        if (sample && l == config.n_layers - 1) ++result.error_samples;
        kvevict::observe_and_evict(reference_window[static_cast<std::size_t>(l)], full, kvevict::Observation{},
                                   reference_plan);
      }
    }

    const auto evict_start = clock::now();
    measurement_seconds += std::chrono::duration<double>(evict_start - error_start).count();

    result.evictions += policies.observe_and_evict(model, std::span(caches));
    eviction_seconds += std::chrono::duration<double>(clock::now() - evict_start).count();

    const std::int64_t done = i + 2;
    if (segment_count == settings.segment_tokens || done == tokens) {
      result.segments.push_back({done, std::exp(segment_nll / static_cast<double>(segment_count))});
      segment_nll = 0.0;
      segment_count = 0;
    }
    if (done == std::min(settings.warmup_tokens, tokens)) {
      result.rss_after_warmup = current_rss_bytes();
      std::int64_t warm_bytes = 0;
      for (const auto& cache : caches) warm_bytes += static_cast<std::int64_t>(cache.memory_bytes());
      result.kv_bytes_after_warmup = warm_bytes;
    }
    if (progress && (done % 256 == 0 || done == tokens)) progress(done);
  }

  result.seconds = std::chrono::duration<double>(clock::now() - start).count() - measurement_seconds;
  result.eviction_seconds = eviction_seconds;
  result.perplexity = std::exp(nll_sum / static_cast<double>(tokens - 1));
  for (const auto& cache : caches) result.kv_bytes_end += static_cast<std::int64_t>(cache.memory_bytes());
  result.rss_end = current_rss_bytes();
  result.rss_peak = peak_rss_bytes();
  if (result.error_samples > 0) {
    double total = 0.0;
    for (int l = 0; l < config.n_layers; ++l) {
      const double mean = layer_error_sum[static_cast<std::size_t>(l)] / static_cast<double>(result.error_samples);
      result.attention_error_per_layer[static_cast<std::size_t>(l)] = mean;
      total += mean;
    }
    result.attention_error = total / config.n_layers;
  }
  return result;
}

}  // namespace llama2c
