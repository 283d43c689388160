// Policies by name: one options struct for command lines and engines that
// choose the policy at run time, and AnyPolicy, a value type that holds any
// of them and itself satisfies EvictionPolicy.
//
// Shared settings are fields of PolicyOptions; policy-specific ones are
// string parameters (KEY=VALUE on command lines), parsed and range-checked
// by the policy's own constructor. An unknown parameter is an error that
// lists the parameters the policy accepts.
#pragma once

#include "kvevict/policies/full.hpp"
#include "kvevict/policies/h2o.hpp"
#include "kvevict/policies/lacache.hpp"
#include "kvevict/policies/policy.hpp"
#include "kvevict/policies/restkv.hpp"
#include "kvevict/policies/sinkclip.hpp"
#include "kvevict/policies/snapkv.hpp"
#include "kvevict/policies/streaming_llm.hpp"
#include "kvevict/policies/tova.hpp"

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <variant>

namespace kvevict {

// Run-time settings of a policy. A numeric field left at -1 takes the
// policy's own default.
struct PolicyOptions {
  std::string name;             // one of policy_names
  std::int64_t budget = 0;      // tokens per KV head kept after an eviction (LaCache: its capacity)
  std::int64_t sinks = -1;      // leading tokens always kept (streaming_llm, tova, lacache, sinkclip)
  std::int64_t window = -1;     // observation window (snapkv, restkv) or recent window (h2o, sinkclip)
  std::int64_t slack = -1;      // decode-time eviction fires once size() > budget + slack
  int layer = 0;                // layer index of this policy object
  int n_layers = 1;             // layers of the model
  int n_heads = 0;              // query heads of the layer
  int n_kv_heads = 0;           // KV heads of the layer
  int head_dim = 0;
  const RowMatrixXf* w_o = nullptr;  // output projection [D, n_heads * head_dim], required by restkv
  std::map<std::string, std::string> parameters{};  // policy-specific KEY=VALUE settings
};

inline constexpr std::array<std::string_view, 8> policy_names = {
    "full", "streaming_llm", "h2o", "tova", "snapkv", "lacache", "restkv", "sinkclip"};

namespace detail {

// Reads the policy-specific parameters of one policy, rejecting unknown keys
// and malformed values with messages naming the policy, key and value.
class ParameterReader {
 public:
  ParameterReader(std::string_view policy, const std::map<std::string, std::string>& parameters)
      : policy_(policy), parameters_(parameters) {}

  bool has(const std::string& key) {
    known_.insert(key);
    return parameters_.count(key) != 0;
  }

  std::int64_t integer(const std::string& key, std::int64_t fallback) {
    if (!has(key)) return fallback;
    const std::string& text = parameters_.at(key);
    std::size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != text.size()) fail(key, text, "an integer");
    return value;
  }

  double real(const std::string& key, double fallback) {
    if (!has(key)) return fallback;
    const std::string& text = parameters_.at(key);
    std::size_t used = 0;
    double value = 0.0;
    try {
      value = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != text.size()) fail(key, text, "a number");
    return value;
  }

  bool boolean(const std::string& key, bool fallback) {
    if (!has(key)) return fallback;
    const std::string& text = parameters_.at(key);
    if (text == "true" || text == "1") return true;
    if (text == "false" || text == "0") return false;
    fail(key, text, "true or false");
  }

  // Returns choices[i] for the value equal to names[i].
  template <class Enum, std::size_t N>
  Enum choice(const std::string& key, Enum fallback, const std::array<std::string_view, N>& names,
              const std::array<Enum, N>& choices) {
    if (!has(key)) return fallback;
    const std::string& text = parameters_.at(key);
    std::string allowed;
    for (std::size_t i = 0; i < N; ++i) {
      if (names[i] == text) return choices[i];
      allowed += (i ? ", " : "") + std::string(names[i]);
    }
    fail(key, text, "one of " + allowed);
  }

  // Throws when a parameter was given that the policy never asked for.
  void finish() const {
    for (const auto& [key, value] : parameters_) {
      if (known_.count(key) != 0) continue;
      std::string allowed;
      for (const auto& name : known_) allowed += (allowed.empty() ? "" : ", ") + name;
      throw_invalid(policy_, ": unknown parameter '", key, "' (value '", value, "'); ",
                    allowed.empty() ? std::string("this policy takes no parameters")
                                    : "known parameters: " + allowed);
    }
  }

 private:
  [[noreturn]] void fail(const std::string& key, const std::string& text, const std::string& expected) const {
    throw_invalid(policy_, ": parameter ", key, "='", text, "' is invalid; expected ", expected);
  }

  std::string_view policy_;
  const std::map<std::string, std::string>& parameters_;
  std::set<std::string> known_;
};

inline std::int64_t or_default(std::int64_t value, std::int64_t fallback) { return value >= 0 ? value : fallback; }

// A parameter key that sets a configuration field of another name.
struct KeyAlias {
  std::string_view key;
  std::string_view field;
};

// Returns make(). When the policy's constructor rejects a field that a key
// of another name sets, rethrows its message with the key appended, because
// the message names the field and the caller passed the key.
template <class Make, std::size_t N>
auto construct_naming_keys(Make&& make, const std::array<KeyAlias, N>& aliases) {
  try {
    return make();
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const KeyAlias& alias : aliases) {
      if (message.find(std::string(alias.field) + " (") != std::string::npos) {
        throw_invalid(message, "; parameter ", alias.key, " sets ", alias.field);
      }
    }
    throw;
  }
}

}  // namespace detail

template <class Scalar = float>
class AnyPolicy {
 public:
  using scalar_type = Scalar;
  using Variant = std::variant<Full<Scalar>, StreamingLLM<Scalar>, H2O<Scalar>, TOVA<Scalar>, SnapKV<Scalar>,
                               LaCache<Scalar>, RestKV<Scalar>, SinkCLIP<Scalar>>;

  template <class Policy>
  explicit AnyPolicy(Policy policy) : policy_(std::move(policy)) {}

  std::string_view name() const {
    return std::visit([](const auto& p) { return p.name(); }, policy_);
  }
  int state_channels() const {
    return std::visit([](const auto& p) { return p.state_channels(); }, policy_);
  }
  ObservationNeeds needs() const {
    return std::visit([](const auto& p) { return p.needs(); }, policy_);
  }
  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    return std::visit([&](const auto& p) { return p.should_evict(cache, trigger); }, policy_);
  }
  void observe(KVCache<Scalar>& cache, const Observation& observation) {
    std::visit([&](auto& p) { p.observe(cache, observation); }, policy_);
  }
  void select(const KVCache<Scalar>& cache, const Observation& observation, KeepPlan& plan) {
    std::visit([&](auto& p) { p.select(cache, observation, plan); }, policy_);
  }
  Variant& variant() { return policy_; }
  const Variant& variant() const { return policy_; }

 private:
  Variant policy_;
};

// Builds the policy `options.name` names. Throws std::invalid_argument for an
// unknown name (listing the known ones), an unknown or malformed parameter,
// or settings the policy rejects.
template <class Scalar = float>
AnyPolicy<Scalar> make_policy(const PolicyOptions& options) {
  using detail::or_default;
  const std::string& name = options.name;
  detail::ParameterReader read(name, options.parameters);

  if (name == "full") {
    read.finish();
    return AnyPolicy<Scalar>(Full<Scalar>{});
  }
  if (name == "streaming_llm") {
    read.finish();
    return AnyPolicy<Scalar>(StreamingLLM<Scalar>({.budget = options.budget,
                                                   .sinks = or_default(options.sinks, 4),
                                                   .slack = or_default(options.slack, 0)}));
  }
  if (name == "h2o") {
    H2OConfig config{.budget = options.budget, .slack = or_default(options.slack, 0)};
    if (read.has("heavy")) config.heavy = read.integer("heavy", 0);
    if (options.window >= 0) config.recent = options.window;
    if (read.has("recent")) config.recent = read.integer("recent", 0);
    config.gqa_aggregation = read.choice("gqa", H2OAggregation::mean, std::array<std::string_view, 3>{"mean", "sum", "max"},
                                         std::array{H2OAggregation::mean, H2OAggregation::sum, H2OAggregation::max});
    config.normalize_by_count = read.boolean("normalize_by_count", false);
    read.finish();
    return AnyPolicy<Scalar>(H2O<Scalar>(config));
  }
  if (name == "tova") {
    TOVAConfig config{.budget = options.budget, .sinks = or_default(options.sinks, 0),
                      .slack = or_default(options.slack, 0)};
    config.granularity = read.choice("granularity", TOVAGranularity::layer, std::array<std::string_view, 2>{"layer", "head"},
                                     std::array{TOVAGranularity::layer, TOVAGranularity::head});
    config.protect_newest = read.boolean("protect_newest", false);
    read.finish();
    return AnyPolicy<Scalar>(TOVA<Scalar>(config));
  }
  if (name == "snapkv") {
    SnapKVConfig config{.budget = options.budget, .window = or_default(options.window, 32)};
    if (options.slack >= 0) config.slack = options.slack;
    config.kernel_size = read.integer("kernel_size", 5);
    config.pooling = read.choice("pooling", SnapKVPooling::avg, std::array<std::string_view, 3>{"avg", "max", "none"},
                                 std::array{SnapKVPooling::avg, SnapKVPooling::max, SnapKVPooling::none});
    config.gqa_aggregation = read.choice("gqa", SnapKVAggregation::mean,
                                         std::array<std::string_view, 3>{"mean", "max", "expand"},
                                         std::array{SnapKVAggregation::mean, SnapKVAggregation::max, SnapKVAggregation::expand});
    if (read.has("scale")) config.scale = static_cast<float>(read.real("scale", 0.0));
    read.finish();
    return AnyPolicy<Scalar>(SnapKV<Scalar>(config));
  }
  if (name == "lacache") {
    LaCacheConfig config{.capacity = options.budget, .sinks = or_default(options.sinks, 4),
                         .layer = options.layer, .n_layers = options.n_layers};
    if (read.has("span")) config.span = read.integer("span", 0);
    config.overlap = read.integer("overlap", 0);
    read.finish();
    return AnyPolicy<Scalar>(LaCache<Scalar>(config));
  }
  if (name == "restkv") {
    RestKVConfig config{.budget = options.budget, .window = or_default(options.window, 32),
                        .n_heads = options.n_heads, .n_kv_heads = options.n_kv_heads, .head_dim = options.head_dim};
    config.layer = options.layer;
    config.n_layers = options.n_layers;
    if (options.slack >= 0) config.slack = options.slack;
    config.use_ema = read.boolean("use_ema", true);
    config.alpha = static_cast<float>(read.real("alpha", 0.3));
    config.metric_mode = read.choice("metric_mode", RestKVMetric::after, std::array<std::string_view, 2>{"after", "before"},
                                     std::array{RestKVMetric::after, RestKVMetric::before});
    config.use_wo = read.boolean("use_wo", true);
    config.tau = static_cast<float>(read.real("tau", 1.0));
    config.use_norm = read.boolean("use_norm", false);
    config.pooling = read.choice("pooling", RestKVPooling::adaptive,
                                 std::array<std::string_view, 4>{"none", "avg", "max", "adaptive"},
                                 std::array{RestKVPooling::none, RestKVPooling::avg, RestKVPooling::max, RestKVPooling::adaptive});
    config.kernel_size = read.integer("kernel_size", 5);
    config.drift_scale = read.real("scale", 2000.0);
    config.shift_rounding = read.choice("shift_rounding", kernels::ShiftRounding::trunc,
                                        std::array<std::string_view, 2>{"trunc", "reference"},
                                        std::array{kernels::ShiftRounding::trunc, kernels::ShiftRounding::reference});
    config.output_scope = read.choice("output_scope", RestKVOutputScope::past_only,
                                      std::array<std::string_view, 2>{"past_only", "full"},
                                      std::array{RestKVOutputScope::past_only, RestKVOutputScope::full});
    config.gqa = read.choice("gqa", RestKVGqa::kv_head, std::array<std::string_view, 2>{"kv_head", "max"},
                             std::array{RestKVGqa::kv_head, RestKVGqa::max});
    config.use_pyramid = read.boolean("use_pyramid", false);
    config.beta = read.real("beta", 20.0);
    config.pyramid_rounding = read.choice("pyramid_rounding", PyramidRounding::conserving,
                                          std::array<std::string_view, 2>{"conserving", "reference"},
                                          std::array{PyramidRounding::conserving, PyramidRounding::reference});
    if (read.has("softmax_scale")) config.softmax_scale = static_cast<float>(read.real("softmax_scale", 0.0));
    read.finish();
    if (config.use_wo && options.w_o == nullptr) {
      detail::throw_invalid("restkv: use_wo is on but no W_o was given; pass the layer's output projection "
                            "[D, n_heads * head_dim] in PolicyOptions::w_o, or set use_wo=false");
    }
    const std::array<detail::KeyAlias, 1> aliases = {{{"scale", "drift_scale"}}};
    return detail::construct_naming_keys(
        [&] {
          if (options.w_o != nullptr) return AnyPolicy<Scalar>(RestKV<Scalar>(config, *options.w_o));
          return AnyPolicy<Scalar>(RestKV<Scalar>(config));
        },
        aliases);
  }
  if (name == "sinkclip") {
    using Config = SinkCLIPConfig;
    Config config{.budget = options.budget, .sinks = or_default(options.sinks, 4)};
    config.recent = or_default(options.window, 32);
    config.slack = or_default(options.slack, 0);
    config.sink_threshold = static_cast<float>(read.real("theta", 0.1));
    if (read.has("theta_keep")) config.sink_keep_threshold = static_cast<float>(read.real("theta_keep", 0.0));
    config.max_emergent_sinks = read.integer("max_extra", 4);
    config.observation_window = read.integer("w_obs", 32);
    if (read.has("alpha_sigma")) config.sink_rate = static_cast<float>(read.real("alpha_sigma", 0.0));
    config.clip = static_cast<float>(read.real("c_clip", 8.0));
    config.clip_mode = read.choice("clip_mode", Config::ClipMode::budget,
                                   std::array<std::string_view, 3>{"budget", "context", "fixed"},
                                   std::array{Config::ClipMode::budget, Config::ClipMode::context, Config::ClipMode::fixed});
    config.decay = static_cast<float>(read.real("lambda", 0.995));
    config.normalize_exposure = read.boolean("normalize_exposure", true);
    config.min_vote_mass = static_cast<float>(read.real("nu", 0.01));
    config.gqa_aggregation = read.choice("gqa", Config::GroupAggregation::mean, std::array<std::string_view, 2>{"mean", "max"},
                                         std::array{Config::GroupAggregation::mean, Config::GroupAggregation::max});
    read.finish();
    const std::array<detail::KeyAlias, 8> aliases = {{{"theta", "sink_threshold"},
                                                      {"theta_keep", "sink_keep_threshold"},
                                                      {"max_extra", "max_emergent_sinks"},
                                                      {"w_obs", "observation_window"},
                                                      {"alpha_sigma", "sink_rate"},
                                                      {"c_clip", "clip"},
                                                      {"lambda", "decay"},
                                                      {"nu", "min_vote_mass"}}};
    return detail::construct_naming_keys([&] { return AnyPolicy<Scalar>(SinkCLIP<Scalar>(config)); }, aliases);
  }

  std::string known;
  for (auto known_name : policy_names) known += (known.empty() ? "" : ", ") + std::string(known_name);
  detail::throw_invalid("unknown policy name '", name, "'; known policies: ", known);
}

static_assert(EvictionPolicy<AnyPolicy<float>>);

}  // namespace kvevict
