// Conformance of every policy to the properties all policies share, in both
// calling patterns (prefill compression and decode-time eviction), both
// position modes and float and half storage, on random inputs with awkward
// sizes. Each policy enters through one adapter in policy_fixtures.hpp.
//
//   P1  |keep_j| = min(n, budget) (LaCache: a band below its capacity)
//   P2  keep_j strictly increasing within [0, n)
//   P3  protected slots (sinks, windows, emergent sinks) kept
//   P4  repeated runs bitwise identical
//   P5  on equal scores the later position is kept
//   P6  n <= budget keeps 0..n-1
//   P7  invalid configuration or input throws, cache and state unchanged
//   P8  per-slot state moves with its token
//   P9  layer-level policies, and head-level ones on identical heads, keep
//       one list for every KV head
//   P10 a positive factor on every score keeps the same set
#include <catch2/catch.hpp>

#include "policy_fixtures.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace kvevict;
using namespace kvevict::testing;

namespace {

// Awkward head layouts, prompt lengths and budgets.
struct Case {
  Shape shape;
  std::int64_t tokens;  // n: tokens seen when the properties are checked
  std::int64_t budget;
  std::int64_t sinks;
  std::int64_t window;
  std::int64_t slack;
};

const std::vector<Case>& cases() {
  static const std::vector<Case> list = {
      {{6, 2, 6}, 37, 13, 3, 5, 0},
      {{5, 5, 10}, 94, 29, 2, 6, 7},
      {{12, 4, 10}, 151, 23, 4, 4, 3},
  };
  return list;
}

PolicySetup setup_for(const Case& c) {
  PolicySetup setup;
  setup.shape = c.shape;
  setup.budget = c.budget;
  setup.sinks = c.sinks;
  setup.window = c.window;
  setup.slack = c.slack;
  setup.layer = 1;
  setup.n_layers = 4;
  return setup;
}

constexpr PositionMode kModes[] = {PositionMode::original, PositionMode::cache_relative};

// Runs f.template operator()<Scalar>() for float and Eigen::half storage.
template <class F>
void for_each_scalar(F&& f) {
  f.template operator()<float>();
  f.template operator()<Eigen::half>();
}

// How the tokens reach the cache.
enum class Pattern {
  prefill,         // one prompt of n tokens, cut once by compress_prefill
  decode,          // a prompt within budget, then single-token decode steps
  decode_chunked,  // a prompt within budget, then appends of 3 tokens
};

constexpr Pattern kPatterns[] = {Pattern::prefill, Pattern::decode, Pattern::decode_chunked};

const char* to_string(Pattern pattern) {
  switch (pattern) {
    case Pattern::prefill: return "prefill";
    case Pattern::decode: return "decode";
    case Pattern::decode_chunked: return "decode_chunked";
  }
  return "?";
}

template <class Adapter, class Scalar>
using PolicyOf = typename Adapter::template policy_type<Scalar>;

// Property violations found while a scenario runs. Long runs check every
// round, so the failures are collected and asserted once per scenario. The
// report names the property, the round and the head.
class Violations {
 public:
  void check(bool ok, const char* property, std::int64_t round, int head = -1) {
    if (ok) return;
    ++count_;
    if (list_.size() >= 20) return;
    std::string entry = std::string(property) + " at round " + std::to_string(round);
    if (head >= 0) entry += ", head " + std::to_string(head);
    list_.push_back(std::move(entry));
  }
  // The first 20 violations and the total, empty when there were none.
  std::vector<std::string> report() const {
    std::vector<std::string> out = list_;
    if (count_ > 0) out.push_back(std::to_string(count_) + " violations in total");
    return out;
  }

 private:
  std::vector<std::string> list_;
  std::int64_t count_ = 0;
};

// One policy on one simulated layer.
template <class Adapter, class Scalar>
struct Scenario {
  PolicySetup setup;
  PolicyOf<Adapter, Scalar> policy;
  Engine<Scalar> engine;
  KeepPlan plan;
  std::vector<KeepPlan> plans;  // every plan applied, in order
  std::int64_t evictions = 0;
  std::int64_t rounds = 0;
  Violations violations;

  Scenario(const PolicySetup& s, const EngineOptions& options)
      : setup(s),
        policy(Adapter::template make<Scalar>(s)),
        engine(s.shape, policy.needs(), policy.state_channels(), options) {}

  KVCache<Scalar>& cache() { return engine.cache(); }
};

// Checks P1, P2, P3 (given the protected flags) and, for layer-level
// policies, P9 on one plan over n slots.
template <class Adapter>
void check_plan(const std::pair<std::int64_t, std::int64_t>& count_range, const KeepPlan& plan, std::int64_t n,
                int n_kv_heads, const std::vector<std::vector<char>>& protected_flags, Violations& violations,
                std::int64_t round) {
  const auto [low, high] = count_range;
  violations.check(plan.n_kv_heads() == n_kv_heads, "plan head count", round);
  violations.check(plan.count() >= low && plan.count() <= high, "P1 kept count", round);
  for (int j = 0; j < plan.n_kv_heads(); ++j) {
    const auto slots = plan.head(j);
    bool increasing = true;
    bool in_range = true;
    for (std::size_t i = 0; i < slots.size(); ++i) {
      if (slots[i] < 0 || slots[i] >= n) in_range = false;
      if (i > 0 && slots[i] <= slots[i - 1]) increasing = false;
    }
    violations.check(increasing, "P2 strictly increasing", round, j);
    violations.check(in_range, "P2 within [0, n)", round, j);
    const auto& flags = protected_flags[static_cast<std::size_t>(j)];
    bool all_protected_kept = true;
    for (std::int64_t s = 0; s < n; ++s) {
      if (flags[static_cast<std::size_t>(s)] != 0 && !std::binary_search(slots.begin(), slots.end(), s)) {
        all_protected_kept = false;
      }
    }
    violations.check(all_protected_kept, "P3 protected slot dropped", round, j);
    if (Adapter::layer_level) {
      const auto first = plan.head(0);
      violations.check(std::equal(slots.begin(), slots.end(), first.begin(), first.end()),
                       "P9 layer-level heads differ", round, j);
    }
  }
}

// Per head and slot: position, key and value bytes and every state value,
// recorded before a cut so P8 can compare after it.
template <class Scalar>
class SlotRecord {
 public:
  explicit SlotRecord(const KVCache<Scalar>& cache) : width_(slot_bytes(cache)), current_(width_) {
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      const auto p = cache.positions(j);
      positions_.emplace_back(p.begin(), p.end());
      std::vector<unsigned char> head(static_cast<std::size_t>(cache.size()) * width_);
      for (std::int64_t s = 0; s < cache.size(); ++s) write_slot(cache, j, s, head.data() + static_cast<std::size_t>(s) * width_);
      bytes_.push_back(std::move(head));
    }
  }

  // Number of kept slots whose position, key, value or state differs from
  // the record of the same token.
  std::int64_t mismatches(const KVCache<Scalar>& cache) {
    std::int64_t bad = 0;
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      const auto& before = positions_[static_cast<std::size_t>(j)];
      const auto now = cache.positions(j);
      for (std::int64_t s = 0; s < cache.size(); ++s) {
        const std::int64_t position = now[static_cast<std::size_t>(s)];
        const auto found = std::lower_bound(before.begin(), before.end(), position);
        if (found == before.end() || *found != position) {
          ++bad;
          continue;
        }
        const auto index = static_cast<std::size_t>(found - before.begin());
        write_slot(cache, j, s, current_.data());
        if (std::memcmp(current_.data(), bytes_[static_cast<std::size_t>(j)].data() + index * width_, width_) != 0) {
          ++bad;
        }
      }
    }
    return bad;
  }

 private:
  static std::size_t slot_bytes(const KVCache<Scalar>& cache) {
    return 2 * static_cast<std::size_t>(cache.head_dim()) * sizeof(Scalar) +
           static_cast<std::size_t>(cache.state_channels()) * sizeof(float);
  }

  static void write_slot(const KVCache<Scalar>& cache, int j, std::int64_t s, unsigned char* out) {
    const std::size_t row = static_cast<std::size_t>(cache.head_dim()) * sizeof(Scalar);
    std::memcpy(out, cache.keys(j).row(s).data(), row);
    std::memcpy(out + row, cache.values(j).row(s).data(), row);
    for (int channel = 0; channel < cache.state_channels(); ++channel) {
      const float value = cache.state(j, channel)[static_cast<std::size_t>(s)];
      std::memcpy(out + 2 * row + static_cast<std::size_t>(channel) * sizeof(float), &value, sizeof(float));
    }
  }

  std::size_t width_;
  std::vector<unsigned char> current_;
  std::vector<std::vector<std::int64_t>> positions_;
  std::vector<std::vector<unsigned char>> bytes_;  // per head: [slots x width]
};

// One observe/select/keep round with the checks of P1, P2, P3, P6, P8 and
// layer-level P9, in the order the drivers use. `select` runs even when the
// trigger does not fire, to check that n <= budget keeps everything.
template <class Adapter, class Scalar>
bool checked_round(Scenario<Adapter, Scalar>& scenario, Trigger trigger) {
  auto& cache = scenario.cache();
  const bool prefill = trigger == Trigger::prefill;
  const Observation observation = scenario.engine.observation(prefill);
  scenario.policy.observe(cache, observation);

  const std::int64_t n = cache.size();
  const PolicySetup& setup = scenario.setup;
  const std::int64_t round = scenario.rounds++;
  Violations& violations = scenario.violations;
  const bool fires = scenario.policy.should_evict(cache, trigger);
  if (Adapter::exact_budget && Adapter::evicts) {
    const std::int64_t limit = prefill ? setup.budget : setup.budget + setup.slack;
    violations.check(fires == (n > limit), "trigger rule", round);
  }
  if (!fires && n > setup.budget) return false;  // decode slack: nothing to check this round

  std::vector<std::vector<char>> flags(static_cast<std::size_t>(cache.n_kv_heads()));
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    Adapter::mark_protected(setup, scenario.policy, cache, j, flags[static_cast<std::size_t>(j)]);
  }
  SlotRecord<Scalar> record(cache);
  const auto count_range = Adapter::count_range(setup, scenario.policy, n);
  scenario.policy.select(cache, observation, scenario.plan);
  check_plan<Adapter>(count_range, scenario.plan, n, cache.n_kv_heads(), flags, violations, round);
  if (n <= setup.budget) {
    KeepPlan identity(cache.n_kv_heads(), n);
    identity.fill_identity();
    violations.check(scenario.plan == identity, "P6 within budget keeps all", round);
  }
  if (!fires) return false;

  cache.keep(scenario.plan);
  violations.check(record.mismatches(cache) == 0, "P8 state moves with its token", round);
  scenario.plans.push_back(scenario.plan);
  ++scenario.evictions;
  return true;
}

// Feeds `tokens` tokens to the scenario in the given pattern, checking every
// round. Decode patterns start with a prompt of half the budget (at least
// the window, so window scorers have their queries).
template <class Adapter, class Scalar>
void run_pattern(Scenario<Adapter, Scalar>& scenario, Pattern pattern, std::int64_t tokens) {
  auto& engine = scenario.engine;
  if (pattern == Pattern::prefill) {
    const std::int64_t chunk = Adapter::prefill_chunk(scenario.setup);
    for (std::int64_t seen = 0; seen < tokens;) {
      const std::int64_t count = chunk > 0 ? std::min(chunk, tokens - seen) : tokens;
      engine.append(count);
      checked_round(scenario, Trigger::prefill);
      seen += count;
    }
    return;
  }
  const std::int64_t prompt = std::min(tokens, std::max(scenario.setup.budget / 2, scenario.setup.window));
  engine.append(prompt);
  checked_round(scenario, Trigger::prefill);
  const std::int64_t chunk = pattern == Pattern::decode ? 1 : 3;
  std::int64_t seen = prompt;
  while (seen < tokens) {
    const std::int64_t count = std::min(chunk, tokens - seen);
    engine.append(count);
    checked_round(scenario, Trigger::decode);
    seen += count;
  }
}

// Runs f(setup, options, mode, pattern) over every case, mode and pattern.
template <class F>
void for_each_configuration(F&& f) {
  std::uint64_t seed = 11;
  for (const Case& c : cases()) {
    for (const PositionMode mode : kModes) {
      for (const Pattern pattern : kPatterns) {
        EngineOptions options;
        options.mode = mode;
        options.seed = seed++;
        INFO("shape (" << c.shape.n_heads << ", " << c.shape.n_kv_heads << ", d " << c.shape.head_dim << "), n "
                       << c.tokens << ", budget " << c.budget << ", mode " << to_string(mode) << ", pattern "
                       << to_string(pattern));
        f(c, setup_for(c), options, pattern);
      }
    }
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("cuts keep valid plans and move state with tokens", "[conformance]", AllAdapters) {
  // P1, P2, P3, P6 (select within budget), P8 and layer-level P9, checked at
  // every round of every configuration.
  INFO("policy " << TestType::name);
  for_each_scalar([]<class Scalar>() {
    INFO("storage " << (std::is_same_v<Scalar, float> ? "float" : "half"));
    for_each_configuration([](const Case& c, const PolicySetup& setup, const EngineOptions& options, Pattern pattern) {
      Scenario<TestType, Scalar> scenario(setup, options);
      run_pattern(scenario, pattern, c.tokens);
      CHECK(scenario.violations.report() == std::vector<std::string>{});
      if (TestType::evicts) {
        CHECK(scenario.evictions > 0);
      } else {
        CHECK(scenario.cache().size() == c.tokens);
      }
    });
  });
}

TEMPLATE_LIST_TEST_CASE("decode cuts return to the budget exactly", "[conformance]", AllAdapters) {
  // After every decode-time cut an exact-budget policy stores exactly the
  // budget, whatever the chunk size, and between cuts at most budget + slack.
  INFO("policy " << TestType::name);
  if (!TestType::exact_budget || !TestType::evicts) {
    SUCCEED("the policy keeps no exact budget");
    return;
  }
  for_each_configuration([](const Case& c, const PolicySetup& setup, const EngineOptions& options, Pattern pattern) {
    if (pattern == Pattern::prefill) return;
    Scenario<TestType, float> scenario(setup, options);
    const std::int64_t chunk = pattern == Pattern::decode ? 1 : 3;
    scenario.engine.append(setup.budget);
    compress_prefill(scenario.policy, scenario.cache(), scenario.engine.observation(true), scenario.plan);
    for (std::int64_t seen = setup.budget; seen < c.tokens; seen += chunk) {
      scenario.engine.append(chunk);
      const bool cut = observe_and_evict(scenario.policy, scenario.cache(), scenario.engine.observation(false),
                                         scenario.plan);
      const std::int64_t size = scenario.cache().size();
      scenario.violations.check(cut ? size == setup.budget : size <= setup.budget + setup.slack, "size after round",
                                seen);
    }
    CHECK(scenario.violations.report() == std::vector<std::string>{});
  });
}

TEMPLATE_LIST_TEST_CASE("repeated runs give bitwise identical results", "[conformance]", AllAdapters) {
  // P4: two scenarios from the same seeds apply the same plans and end with
  // byte-identical caches. Half storage runs the smallest case only.
  INFO("policy " << TestType::name);
  for_each_scalar([]<class Scalar>() {
    for_each_configuration([](const Case& c, const PolicySetup& setup, const EngineOptions& options, Pattern pattern) {
      if (!std::is_same_v<Scalar, float> && c.tokens != cases()[0].tokens) return;
      Scenario<TestType, Scalar> first(setup, options);
      Scenario<TestType, Scalar> second(setup, options);
      run_pattern(first, pattern, c.tokens);
      run_pattern(second, pattern, c.tokens);
      CHECK(first.violations.report() == std::vector<std::string>{});
      CHECK(first.plans == second.plans);
      CHECK(snapshot(first.cache()) == snapshot(second.cache()));
    });
  });
}

TEMPLATE_LIST_TEST_CASE("equal scores keep the later position", "[conformance]", AllAdapters) {
  // P5. Zero queries make every attention row uniform over the keys visible
  // to its query, and equal values make every value difference equal, so the
  // attention-based scores of all candidates tie. Policies whose scores are
  // per-slot state have that state overwritten with one value before
  // selecting. On ties the latest candidates win, so the kept set is the
  // protected leading slots plus the last budget - leading slots.
  INFO("policy " << TestType::name);
  if (!TestType::has_scores) {
    SUCCEED("the policy scores nothing: " << TestType::no_scaling_reason);
    return;
  }
  for_each_configuration([](const Case& c, PolicySetup setup, EngineOptions options, Pattern pattern) {
    setup.plain_scores = true;
    options.zero_queries = true;
    options.equal_values = true;
    Scenario<TestType, float> scenario(setup, options);
    auto& engine = scenario.engine;
    auto& cache = scenario.cache();
    const bool prefill = pattern == Pattern::prefill;
    if (prefill) {
      engine.append(c.tokens);
    } else {
      engine.append(setup.budget);
      compress_prefill(scenario.policy, cache, engine.observation(true), scenario.plan);
      while (cache.size() + (pattern == Pattern::decode ? 1 : 3) <= setup.budget + setup.slack) {
        engine.append(pattern == Pattern::decode ? 1 : 3);
        observe_and_evict(scenario.policy, cache, engine.observation(false), scenario.plan);
      }
      engine.append(pattern == Pattern::decode ? 1 : 3);
    }
    const Observation observation = engine.observation(prefill);
    scenario.policy.observe(cache, observation);
    TestType::equalize_scores(cache);
    scenario.policy.select(cache, observation, scenario.plan);

    const std::int64_t n = cache.size();
    const std::int64_t leading = std::min(TestType::leading(setup), setup.budget);
    std::vector<std::int64_t> expected;
    for (std::int64_t s = 0; s < leading; ++s) expected.push_back(s);
    for (std::int64_t s = n - (setup.budget - leading); s < n; ++s) expected.push_back(s);
    for (int j = 0; j < scenario.plan.n_kv_heads(); ++j) {
      const auto slots = scenario.plan.head(j);
      CHECK(std::vector<std::int64_t>(slots.begin(), slots.end()) == expected);
    }
  });
}

TEMPLATE_LIST_TEST_CASE("within budget every slot stays", "[conformance]", AllAdapters) {
  // P6 in both patterns: a prompt of budget or fewer tokens is not cut, and
  // select returns 0..n-1.
  INFO("policy " << TestType::name);
  for_each_configuration([](const Case&, const PolicySetup& setup, const EngineOptions& options, Pattern pattern) {
    if (pattern == Pattern::decode_chunked) return;
    for (const std::int64_t n : {setup.budget - 3, setup.budget}) {
      Scenario<TestType, float> scenario(setup, options);
      auto& cache = scenario.cache();
      scenario.engine.append(n);
      const bool prefill = pattern == Pattern::prefill;
      const Observation observation = scenario.engine.observation(prefill);
      const auto before = kept_positions(cache);
      const bool cut = prefill ? compress_prefill(scenario.policy, cache, observation, scenario.plan)
                               : observe_and_evict(scenario.policy, cache, observation, scenario.plan);
      CHECK_FALSE(cut);
      CHECK(kept_positions(cache) == before);
      scenario.policy.select(cache, observation, scenario.plan);
      KeepPlan identity(cache.n_kv_heads(), n);
      identity.fill_identity();
      CHECK(scenario.plan == identity);
    }
  });
}

TEMPLATE_LIST_TEST_CASE("invalid configuration throws", "[conformance]", AllAdapters) {
  // P7 for configurations: every setting the adapter lists as invalid is
  // rejected by the constructor with std::invalid_argument.
  INFO("policy " << TestType::name);
  const PolicySetup valid = setup_for(cases()[0]);
  CHECK_NOTHROW(TestType::template make<float>(valid));
  const auto invalid = TestType::invalid_setups(valid);
  if (TestType::evicts) CHECK_FALSE(invalid.empty());
  for (const PolicySetup& setup : invalid) {
    INFO("budget " << setup.budget << ", sinks " << setup.sinks << ", window " << setup.window << ", slack "
                   << setup.slack << ", layer " << setup.layer << " of " << setup.n_layers);
    CHECK_THROWS_AS(TestType::template make<float>(setup), std::invalid_argument);
  }
}

namespace {

// A corrupted copy of an observation, with its own storage.
struct BadObservation {
  std::string what;
  std::vector<float> attention;
  std::vector<float> queries;
  Observation observation;
};

std::vector<BadObservation> corruptions(const Observation& good, int n_kv_heads) {
  std::vector<BadObservation> result;
  const auto copy = [](const Tensor3View& view) { return std::vector<float>(view.data, view.data + view.numel()); };

  if (!good.attention.empty()) {
    const Tensor3View& a = good.attention;
    BadObservation nan{"NaN in attention", copy(a), {}, good};
    nan.attention[static_cast<std::size_t>(a.numel() - a.d2)] = std::numeric_limits<float>::quiet_NaN();
    result.push_back(std::move(nan));

    BadObservation columns{"attention rows one column short", {}, {}, good};
    for (std::int64_t r = 0; r < a.d0 * a.d1; ++r) {
      columns.attention.insert(columns.attention.end(), a.data + r * a.d2, a.data + r * a.d2 + a.d2 - 1);
    }
    result.push_back(std::move(columns));

    // n_heads one above the real count: not a multiple of n_kv_heads.
    BadObservation heads{"attention heads not divisible by KV heads", copy(a), {}, good};
    heads.attention.insert(heads.attention.end(), a.data, a.data + a.d1 * a.d2);
    result.push_back(std::move(heads));
  }
  if (!good.queries.empty()) {
    const Tensor3View& q = good.queries;
    BadObservation nan{"NaN in queries", {}, copy(q), good};
    nan.queries[static_cast<std::size_t>(q.numel() - 1)] = std::numeric_limits<float>::quiet_NaN();
    result.push_back(std::move(nan));

    BadObservation width{"queries one coordinate short", {}, {}, good};
    for (std::int64_t r = 0; r < q.d0 * q.d1; ++r) {
      width.queries.insert(width.queries.end(), q.data + r * q.d2, q.data + r * q.d2 + q.d2 - 1);
    }
    result.push_back(std::move(width));

    BadObservation heads{"query heads not divisible by KV heads", {}, copy(q), good};
    heads.queries.insert(heads.queries.end(), q.data, q.data + q.d1 * q.d2);
    result.push_back(std::move(heads));
  }

  // Point the views at the corrupted storage.
  for (BadObservation& bad : result) {
    Observation& o = bad.observation;
    if (bad.what == "attention rows one column short") {
      o.attention = {bad.attention.data(), o.attention.d0, o.attention.d1, o.attention.d2 - 1};
    } else if (bad.what == "attention heads not divisible by KV heads") {
      o.n_heads += 1;
      o.attention = {bad.attention.data(), o.attention.d0 + 1, o.attention.d1, o.attention.d2};
      if (!o.queries.empty()) o.queries = {nullptr, 0, 0, 0};
    } else if (bad.what == "queries one coordinate short") {
      o.queries = {bad.queries.data(), o.queries.d0, o.queries.d1, o.queries.d2 - 1};
    } else if (bad.what == "query heads not divisible by KV heads") {
      o.n_heads += 1;
      o.queries = {bad.queries.data(), o.queries.d0 + 1, o.queries.d1, o.queries.d2};
      if (!o.attention.empty()) o.attention = {nullptr, 0, 0, 0};
    } else if (!bad.attention.empty()) {
      o.attention.data = bad.attention.data();
    } else {
      o.queries.data = bad.queries.data();
    }
    (void)n_kv_heads;
  }
  return result;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("invalid input throws and changes nothing", "[conformance]", AllAdapters) {
  // P7 for inputs: NaN in attention or queries, wrong shapes and head counts
  // that are not a multiple of the KV heads throw std::invalid_argument on a
  // round that would cut. The cache (keys, values, positions, every state
  // channel) is byte-identical afterwards, and the policy's own state is too:
  // a valid round then gives the same plan and cache as on a twin that never
  // saw the bad input.
  INFO("policy " << TestType::name);
  for_each_scalar([]<class Scalar>() {
    for_each_configuration([](const Case&, const PolicySetup& setup, const EngineOptions& options, Pattern pattern) {
      if (pattern == Pattern::decode_chunked) return;
      const bool prefill = pattern == Pattern::prefill;
      Scenario<TestType, Scalar> scenario(setup, options);
      auto& engine = scenario.engine;
      if (prefill) {
        engine.append(setup.budget + 9);
      } else {
        engine.append(setup.budget);
        compress_prefill(scenario.policy, scenario.cache(), engine.observation(true), scenario.plan);
        while (scenario.cache().size() < TestType::size_bound(setup, scenario.policy)) {
          engine.append(1);
          observe_and_evict(scenario.policy, scenario.cache(), engine.observation(false), scenario.plan);
        }
        engine.append(1);
      }

      Scenario<TestType, Scalar> twin = scenario;
      const Observation good = engine.observation(prefill);
      const Observation twin_good = twin.engine.observation(prefill);
      auto run = [prefill](auto& s, const Observation& o) {
        return prefill ? compress_prefill(s.policy, s.cache(), o, s.plan)
                       : observe_and_evict(s.policy, s.cache(), o, s.plan);
      };

      const auto bad_inputs = corruptions(good, setup.shape.n_kv_heads);
      if (bad_inputs.empty()) SUCCEED("the policy reads no observation");
      for (const BadObservation& bad : bad_inputs) {
        INFO("bad input: " << bad.what);
        const CacheSnapshot before = snapshot(scenario.cache());
        CHECK_THROWS_AS(run(scenario, bad.observation), std::invalid_argument);
        CHECK(snapshot(scenario.cache()) == before);
      }

      const bool cut = run(scenario, good);
      const bool twin_cut = run(twin, twin_good);
      CHECK(cut == twin_cut);
      CHECK(scenario.plan == twin.plan);
      CHECK(snapshot(scenario.cache()) == snapshot(twin.cache()));
    });
  });
}

TEMPLATE_LIST_TEST_CASE("identical heads keep identical lists", "[conformance]", AllAdapters) {
  // P9 for head-level policies: when every KV head stores the same keys and
  // values and every group the same queries, every head keeps the same list.
  INFO("policy " << TestType::name);
  for_each_configuration([](const Case& c, PolicySetup setup, EngineOptions options, Pattern pattern) {
    setup.identical_heads = true;
    options.identical_kv_heads = true;
    Scenario<TestType, float> scenario(setup, options);
    run_pattern(scenario, pattern, c.tokens);
    CHECK(scenario.violations.report() == std::vector<std::string>{});
    std::int64_t differing = 0;
    for (const KeepPlan& plan : scenario.plans) {
      for (int j = 1; j < plan.n_kv_heads(); ++j) {
        const auto first = plan.head(0);
        const auto other = plan.head(j);
        if (!std::equal(first.begin(), first.end(), other.begin(), other.end())) ++differing;
      }
    }
    CHECK(differing == 0);
  });
}

TEMPLATE_LIST_TEST_CASE("scaling every score keeps the kept set", "[conformance]", AllAdapters) {
  // P10. Attention probabilities cannot be scaled while staying
  // probabilities, so the factor is applied where the policy exposes scores:
  // per-slot state that select() ranks by, or a construction parameter that
  // multiplies every score.
  INFO("policy " << TestType::name);
  if (TestType::scaling == ScoreScaling::none) {
    SUCCEED("not applicable: " << TestType::no_scaling_reason);
    return;
  }
  for (const float factor : {0.25f, 3.0f}) {
    INFO("factor " << factor);
    for_each_configuration([factor](const Case& c, PolicySetup setup, const EngineOptions& options, Pattern pattern) {
      if (TestType::scaling == ScoreScaling::construction) {
        Scenario<TestType, float> plain(setup, options);
        setup.score_scale = factor;
        Scenario<TestType, float> scaled(setup, options);
        run_pattern(plain, pattern, c.tokens);
        run_pattern(scaled, pattern, c.tokens);
        CHECK_FALSE(plain.plans.empty());
        CHECK(plain.plans == scaled.plans);
        return;
      }

      // State scores: observe, then select on the cache as is and on a copy
      // whose score channels are multiplied by the factor.
      Scenario<TestType, float> scenario(setup, options);
      const bool prefill = pattern == Pattern::prefill;
      scenario.engine.append(prefill ? c.tokens : setup.budget);
      if (!prefill) {
        compress_prefill(scenario.policy, scenario.cache(), scenario.engine.observation(true), scenario.plan);
        for (std::int64_t seen = setup.budget; seen < c.tokens - 1; ++seen) {
          scenario.engine.append(1);
          observe_and_evict(scenario.policy, scenario.cache(), scenario.engine.observation(false), scenario.plan);
        }
        scenario.engine.append(1);
      }

      const Observation observation = scenario.engine.observation(prefill);
      scenario.policy.observe(scenario.cache(), observation);
      auto scaled_policy = scenario.policy;
      KVCache<float> scaled_cache = scenario.cache();
      REQUIRE(TestType::scale_scores(scaled_cache, factor));
      KeepPlan scaled_plan;
      scenario.policy.select(scenario.cache(), observation, scenario.plan);
      scaled_policy.select(scaled_cache, observation, scaled_plan);
      CHECK(scenario.plan.count() < scenario.cache().size());
      CHECK(scenario.plan == scaled_plan);
    });
  }
}

TEMPLATE_LIST_TEST_CASE("long decode runs keep every invariant", "[conformance]", AllAdapters) {
  // Single-token decode steps on random attention: 10,000 in original mode
  // and 2,500 in cache_relative mode, which runs the same policy code and
  // keeps the sanitizer run short. Every round passes the plan checks, and
  // the cache never exceeds budget + slack (LaCache: its capacity). Sinks and
  // the newest token stay. Once steady, the bytes in use after each cut and
  // the reserved bytes stay constant. In original mode, attention of a new
  // query over the compacted cache equals dense attention over the whole
  // history masked to the kept positions.
  INFO("policy " << TestType::name);
  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 12;
  setup.sinks = 2;
  setup.window = 3;
  setup.slack = 2;
  setup.layer = 2;
  setup.n_layers = 4;
  for (const PositionMode mode : kModes) {
    INFO("mode " << to_string(mode));
    EngineOptions options;
    options.mode = mode;
    options.seed = mode == PositionMode::original ? 101 : 202;
    Scenario<TestType, float> scenario(setup, options);
    auto& cache = scenario.cache();

    scenario.engine.append(setup.window);
    checked_round(scenario, Trigger::prefill);
    std::size_t steady_used = 0;
    std::size_t steady_reserved = 0;
    double worst_gap = 0.0;
    std::int64_t bad_size = 0;
    std::int64_t lost_sink = 0;
    std::int64_t lost_newest = 0;
    std::int64_t bytes_changed = 0;
    const int steps = mode == PositionMode::original ? 10000 : 2500;
    for (int step = 0; step < steps; ++step) {
      scenario.engine.append(1);
      const std::int64_t newest = cache.next_position() - 1;
      const bool cut = checked_round(scenario, Trigger::decode);
      if (TestType::evicts && cache.size() > TestType::size_bound(setup, scenario.policy)) ++bad_size;
      for (int j = 0; j < cache.n_kv_heads(); ++j) {
        const auto positions = cache.positions(j);
        for (std::int64_t s = 0; s < std::min<std::int64_t>(TestType::leading(setup), cache.size()); ++s) {
          if (positions[static_cast<std::size_t>(s)] != s) ++lost_sink;
        }
        if (TestType::keeps_newest(setup) && positions.back() != newest) ++lost_newest;
      }
      if (cut && TestType::exact_budget) {
        if (steady_used == 0) {
          steady_used = cache.memory_bytes();
          steady_reserved = cache.reserved_bytes();
        } else if (cache.memory_bytes() != steady_used || cache.reserved_bytes() != steady_reserved) {
          ++bytes_changed;
        }
      }
      if (mode == PositionMode::original && step % 499 == 0) {
        worst_gap = std::max(worst_gap, scenario.engine.dense_attention_gap());
      }
    }
    CHECK(scenario.violations.report() == std::vector<std::string>{});
    if (TestType::evicts) CHECK(scenario.evictions > 0);
    CHECK(bad_size == 0);
    CHECK(lost_sink == 0);
    CHECK(lost_newest == 0);
    CHECK(bytes_changed == 0);
    CHECK(worst_gap < 1e-9);
  }
}

TEMPLATE_LIST_TEST_CASE("kept cache attends like masked dense attention", "[conformance]", AllAdapters) {
  // After prefill or decode cuts in original mode, the attention output of a
  // new query over the compacted cache equals dense attention over the full
  // history, masked to the positions each KV head kept. Half storage compares against the history
  // rounded to half, so the two sides see the same numbers.
  INFO("policy " << TestType::name);
  for_each_scalar([]<class Scalar>() {
    for_each_configuration([](const Case& c, const PolicySetup& setup, const EngineOptions& options, Pattern pattern) {
      if (options.mode != PositionMode::original) return;
      Scenario<TestType, Scalar> scenario(setup, options);
      run_pattern(scenario, pattern, c.tokens);
      CHECK(scenario.violations.report() == std::vector<std::string>{});
      CHECK(scenario.engine.dense_attention_gap() < 1e-9);
    });
  });
}
