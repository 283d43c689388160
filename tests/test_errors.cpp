// Bad input to the public API and to kvevict-select's command line: every
// case checks the exception type and that the message names the argument and
// its value. Operations on a cache or a policy also leave the cache
// byte-identical (keys, values, positions, every state channel), and a valid
// round afterwards gives what an untouched copy of the policy gives, so the
// policy's own state is unchanged too. docs/errors.md lists every case with
// the test that checks it.
#include <catch2/catch.hpp>

#include "policy_test_support.hpp"
#include "test_helpers.hpp"
#include "tools/select_arguments.hpp"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace kvevict;
using Catch::Contains;
using Catch::StartsWith;
using kvevict::test::CacheSnapshot;
using kvevict::test::Random;
using kvevict_test::Tensor3;

namespace {

using StringMatcher = Catch::Matchers::Impl::MatcherBase<std::string>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInfinity = std::numeric_limits<float>::infinity();

// Every policy test uses one layer of 4 query heads on 2 KV heads, head_dim 4,
// budget 8 and window 4.
constexpr int kHeads = 4;
constexpr int kKvHeads = 2;
constexpr int kHeadDim = 4;
constexpr std::int64_t kBudget = 8;
constexpr std::int64_t kWindow = 4;

// Requires `call` to throw Exception with a message matching `message`.
template <class Exception, class Call>
void require_rejected(Call&& call, const StringMatcher& message) {
  REQUIRE_THROWS_AS(call(), Exception);
  REQUIRE_THROWS_WITH(call(), message);
}

// As require_rejected, and `cache` is byte-identical afterwards.
template <class Exception, class Scalar, class Call>
void require_rejected_unchanged(const KVCache<Scalar>& cache, Call&& call, const StringMatcher& message) {
  const CacheSnapshot before = CacheSnapshot::take(cache);
  require_rejected<Exception>(call, message);
  CHECK(CacheSnapshot::take(cache) == before);
}

// A rejected constructor: its name, the construction, and the text that
// names the field, its value and the rule.
struct ConfigCase {
  std::string name;
  std::function<void()> construct;
  std::string fragment;
};

// Requires every case to throw std::invalid_argument whose message starts
// with `prefix` (the class that rejects it) and contains the case's fragment.
void require_configs_rejected(const std::string& prefix, const std::vector<ConfigCase>& cases) {
  for (const ConfigCase& config : cases) {
    SECTION(config.name) {
      require_rejected<std::invalid_argument>(config.construct, StartsWith(prefix) && Contains(config.fragment));
    }
  }
}

KVCache<float> make_cache(int state_channels, int n_kv_heads = kKvHeads, int head_dim = kHeadDim) {
  return KVCache<float>({.n_kv_heads = n_kv_heads, .head_dim = head_dim, .state_channels = state_channels});
}

// Appends `count` random tokens after the newest position.
void append_tokens(KVCache<float>& cache, std::int64_t count, Random& random) {
  std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
  for (std::int64_t c = 0; c < count; ++c) positions[static_cast<std::size_t>(c)] = cache.next_position() + c;
  cache.append(random.matrix(cache.n_kv_heads() * count, cache.head_dim()),
               random.matrix(cache.n_kv_heads() * count, cache.head_dim()), positions);
}

// Attention rows of the last `rows` queries over n slots, [heads, rows, n]:
// query i belongs to slot n - rows + i and attends uniformly to the slots up
// to its own.
Tensor3 causal_rows(int heads, std::int64_t rows, std::int64_t n) {
  Tensor3 result(heads, rows, n);
  for (int h = 0; h < heads; ++h) {
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int64_t visible = n - rows + i + 1;
      for (std::int64_t t = 0; t < visible; ++t) result.at(h, i, t) = 1.0f / static_cast<float>(visible);
    }
  }
  return result;
}

Tensor3 random_queries(int heads, std::int64_t w, int d, Random& random) {
  Tensor3 result(heads, w, d);
  for (float& x : result.data) x = static_cast<float>(random.uniform(-1.0, 1.0));
  return result;
}

Observation observation_of(const Tensor3& rows, const Tensor3& queries, std::int64_t appended, bool prefill) {
  Observation observation;
  observation.n_heads = kHeads;
  observation.attention = rows.view();
  observation.queries = queries.view();
  observation.appended = appended;
  observation.prefill = prefill;
  return observation;
}

// One policy on a cache of 10 tokens. The first 6 were a prompt within the
// budget that the policy observed. The last 4 are appended and not observed
// yet, so the next valid round cuts to the budget of 8. `rows` and `queries`
// are that round's valid observation.
template <class Policy>
struct Scenario {
  Policy policy;
  KVCache<float> cache;
  Tensor3 rows;
  Tensor3 queries;

  explicit Scenario(Policy p) : policy(std::move(p)), cache(make_cache(policy.state_channels())) {
    Random random(5);
    append_tokens(cache, 6, random);
    const Tensor3 prompt_rows = causal_rows(kHeads, 6, 6);
    const Tensor3 prompt_queries = random_queries(kHeads, kWindow, kHeadDim, random);
    KeepPlan plan;
    REQUIRE_FALSE(compress_prefill(policy, cache, observation_of(prompt_rows, prompt_queries, 6, true), plan));
    append_tokens(cache, 4, random);
    rows = causal_rows(kHeads, 4, 10);
    queries = random_queries(kHeads, kWindow, kHeadDim, random);
  }

  Observation good(bool prefill) const { return observation_of(rows, queries, 4, prefill); }
};

// Requires `bad(policy, cache)` to throw Exception with a matching message and
// to leave the cache byte-identical. Then runs a valid prefill round on the
// scenario and on a copy taken before the bad call. Both must cut, apply the
// same plan and end with identical caches, which shows that the bad call did
// not change the policy's own state either.
template <class Exception, class Policy, class Bad>
void require_rejected_by_policy(Scenario<Policy>& scenario, Bad&& bad, const StringMatcher& message) {
  Policy twin = scenario.policy;
  KVCache<float> twin_cache = scenario.cache;
  require_rejected_unchanged<Exception>(scenario.cache, [&] { bad(scenario.policy, scenario.cache); }, message);

  const Observation good = scenario.good(true);
  KeepPlan plan;
  KeepPlan twin_plan;
  const bool cut = compress_prefill(scenario.policy, scenario.cache, good, plan);
  const bool twin_cut = compress_prefill(twin, twin_cache, good, twin_plan);
  CHECK(cut);
  CHECK(cut == twin_cut);
  CHECK(plan == twin_plan);
  CHECK(CacheSnapshot::take(scenario.cache) == CacheSnapshot::take(twin_cache));
}

// Calls that deliver an observation, for policies rejecting it in observe
// (both drivers reach observe first).
template <class Policy>
auto prefill_with(Observation observation) {
  return [observation](Policy& policy, KVCache<float>& cache) {
    KeepPlan plan;
    compress_prefill(policy, cache, observation, plan);
  };
}
template <class Policy>
auto decode_with(Observation observation) {
  return [observation](Policy& policy, KVCache<float>& cache) {
    KeepPlan plan;
    observe_and_evict(policy, cache, observation, plan);
  };
}

RowMatrixXf random_w_o(Random& random) { return random.matrix(6, kHeads * kHeadDim); }

RestKVConfig restkv_config(bool use_wo) {
  RestKVConfig config;
  config.budget = kBudget;
  config.window = kWindow;
  config.n_heads = kHeads;
  config.n_kv_heads = kKvHeads;
  config.head_dim = kHeadDim;
  config.use_wo = use_wo;
  return config;
}

}  // namespace

// ===========================================================================
// KVCache

TEST_CASE("KVCache configuration rejected", "[errors][kv_cache]") {
  require_configs_rejected(
      "", {
              {"no KV heads", [] { (void)KVCache<float>({.n_kv_heads = 0, .head_dim = 4}); },
               "KVCache: n_kv_heads (0) must be at least 1"},
              {"negative head_dim", [] { (void)KVCache<float>({.n_kv_heads = 2, .head_dim = -2}); },
               "KVCache: head_dim (-2) must be at least 1"},
              {"negative state channels",
               [] { (void)KVCache<float>({.n_kv_heads = 2, .head_dim = 4, .state_channels = -1}); },
               "KVCache: state_channels (-1) must be non-negative"},
              {"negative capacity", [] { (void)KVCache<float>({.n_kv_heads = 2, .head_dim = 4, .capacity = -4}); },
               "KVCache: capacity (-4) must be non-negative"},
              {"odd head_dim with rotation",
               [] {
                 (void)KVCache<float>({.n_kv_heads = 2, .head_dim = 5, .positions = PositionMode::cache_relative});
               },
               "RotaryEmbedding: head_dim (5) must be positive and even"},
              {"RoPE base (theta) of 1",
               [] {
                 (void)KVCache<float>(
                     {.n_kv_heads = 2, .head_dim = 4, .positions = PositionMode::cache_relative, .rope = {.base = 1.0}});
               },
               "RotaryEmbedding: base (1) must be finite and > 1"},
              {"RoPE frequency scale 0",
               [] {
                 (void)KVCache<float>({.n_kv_heads = 2,
                                       .head_dim = 4,
                                       .positions = PositionMode::cache_relative,
                                       .rope = {.frequency_scale = 0.0}});
               },
               "RotaryEmbedding: frequency_scale (0) must be finite and > 0"},
          });
}

TEST_CASE("KVCache append rejected unchanged", "[errors][kv_cache]") {
  Random random(11);
  KVCache<float> cache = make_cache(2);
  append_tokens(cache, 5, random);
  for (int j = 0; j < kKvHeads; ++j) {
    for (int channel = 0; channel < 2; ++channel) {
      for (float& x : cache.state(j, channel)) x = static_cast<float>(random.uniform(0.0, 1.0));
    }
  }
  const RowMatrixXf keys = random.matrix(kKvHeads * 2, kHeadDim);
  const RowMatrixXf values = random.matrix(kKvHeads * 2, kHeadDim);
  const std::vector<std::int64_t> positions = {7, 9};
  const auto append = [&](const RowMatrixXf& k, const RowMatrixXf& v, std::vector<std::int64_t> p) {
    return [&cache, k, v, p] { cache.append(k, v, p); };
  };

  SECTION("keys with too few rows") {
    require_rejected_unchanged<std::invalid_argument>(
        cache, append(random.matrix(3, kHeadDim), values, positions),
        Contains("KVCache::append: keys are [3 x 4], expected [n_kv_heads * count x head_dim] = [4 x 4] for 2 "
                 "positions"));
  }
  SECTION("keys with the wrong head_dim") {
    require_rejected_unchanged<std::invalid_argument>(cache, append(random.matrix(4, 5), values, positions),
                                                      Contains("keys are [4 x 5]"));
  }
  SECTION("values with the wrong shape") {
    require_rejected_unchanged<std::invalid_argument>(cache, append(keys, random.matrix(4, 3), positions),
                                                      Contains("values are [4 x 3], expected [4 x 4]"));
  }
  SECTION("keys and values for another token count") {
    require_rejected_unchanged<std::invalid_argument>(cache, append(keys, values, {7, 8, 9}),
                                                      Contains("keys are [4 x 4], expected") &&
                                                          Contains("[6 x 4] for 3 positions"));
  }
  SECTION("NaN in keys") {
    RowMatrixXf bad = keys;
    bad(3, 1) = kNaN;
    require_rejected_unchanged<std::invalid_argument>(cache, append(bad, values, positions),
                                                      Contains("keys(3, 1) is nan; keys must be finite"));
  }
  SECTION("infinity in keys") {
    RowMatrixXf bad = keys;
    bad(0, 0) = kInfinity;
    require_rejected_unchanged<std::invalid_argument>(cache, append(bad, values, positions),
                                                      Contains("keys(0, 0) is inf"));
  }
  SECTION("infinity in values") {
    RowMatrixXf bad = values;
    bad(2, 3) = -kInfinity;
    require_rejected_unchanged<std::invalid_argument>(cache, append(keys, bad, positions),
                                                      Contains("values(2, 3) is -inf; values must be finite"));
  }
  SECTION("NaN in values") {
    RowMatrixXf bad = values;
    bad(1, 2) = kNaN;
    require_rejected_unchanged<std::invalid_argument>(cache, append(keys, bad, positions),
                                                      Contains("values(1, 2) is nan"));
  }
  SECTION("position not after the newest") {
    require_rejected_unchanged<std::invalid_argument>(
        cache, append(keys, values, {4, 9}),
        Contains("position 4 at index 0 must be greater than 4; positions are strictly increasing"));
  }
  SECTION("positions decreasing inside the chunk") {
    require_rejected_unchanged<std::invalid_argument>(cache, append(keys, values, {9, 7}),
                                                      Contains("position 7 at index 1 must be greater than 9"));
  }
  SECTION("repeated position inside the chunk") {
    require_rejected_unchanged<std::invalid_argument>(cache, append(keys, values, {8, 8}),
                                                      Contains("position 8 at index 1 must be greater than 8"));
  }
}

TEST_CASE("KVCache keep plans rejected unchanged", "[errors][kv_cache]") {
  Random random(12);
  KVCache<float> cache = make_cache(1);
  append_tokens(cache, 7, random);
  for (int j = 0; j < kKvHeads; ++j) {
    for (float& x : cache.state(j, 0)) x = static_cast<float>(random.uniform(0.0, 1.0));
  }
  const auto keep = [&cache](KeepPlan plan) { return [&cache, plan] { cache.keep(plan); }; };
  KeepPlan plan(kKvHeads, 3);
  plan.fill_identity();

  SECTION("unsorted") {
    plan.head(1)[0] = 4;
    require_rejected_unchanged<std::invalid_argument>(
        cache, keep(plan),
        Contains("KVCache::keep: head 1 entry 1 is slot 1 after slot 4") &&
            Contains("kept slots must be strictly increasing (sorted, no duplicates)"));
  }
  SECTION("duplicated") {
    plan.head(0)[2] = 1;
    require_rejected_unchanged<std::invalid_argument>(cache, keep(plan),
                                                      Contains("head 0 entry 2 is slot 1 after slot 1"));
  }
  SECTION("past the end") {
    plan.head(1)[2] = 7;
    require_rejected_unchanged<std::invalid_argument>(cache, keep(plan),
                                                      Contains("head 1 entry 2 is slot 7, outside [0, 7)"));
  }
  SECTION("negative slot") {
    plan.head(0)[0] = -1;
    require_rejected_unchanged<std::invalid_argument>(cache, keep(plan),
                                                      Contains("head 0 entry 0 is slot -1, outside [0, 7)"));
  }
  SECTION("more slots than stored") {
    KeepPlan long_plan(kKvHeads, 8);
    long_plan.fill_identity();
    require_rejected_unchanged<std::invalid_argument>(
        cache, keep(long_plan), Contains("KVCache::keep: plan keeps 8 slots per head, the cache holds 7"));
  }
  SECTION("too many KV heads") {
    KeepPlan wide(kKvHeads + 1, 3);
    wide.fill_identity();
    require_rejected_unchanged<std::invalid_argument>(cache, keep(wide),
                                                      Contains("KVCache::keep: plan has 3 KV heads, the cache has 2"));
  }
  SECTION("too few KV heads") {
    KeepPlan narrow(1, 3);
    narrow.fill_identity();
    require_rejected_unchanged<std::invalid_argument>(cache, keep(narrow),
                                                      Contains("plan has 1 KV heads, the cache has 2"));
  }
  SECTION("default plan") {
    require_rejected_unchanged<std::invalid_argument>(cache, keep(KeepPlan{}),
                                                      Contains("plan has 0 KV heads, the cache has 2"));
  }
}

TEST_CASE("KVCache accessors rejected unchanged", "[errors][kv_cache]") {
  Random random(13);
  KVCache<float> cache({.n_kv_heads = kKvHeads,
                        .head_dim = kHeadDim,
                        .positions = PositionMode::cache_relative,
                        .state_channels = 1});
  append_tokens(cache, 5, random);

  SECTION("head index") {
    require_rejected_unchanged<std::invalid_argument>(cache, [&] { (void)cache.positions(2); },
                                                      Contains("KVCache: KV head index (2) must be in [0, 2)"));
    require_rejected_unchanged<std::invalid_argument>(cache, [&] { (void)cache.keys(-1); },
                                                      Contains("KV head index (-1) must be in [0, 2)"));
    require_rejected_unchanged<std::invalid_argument>(cache, [&] { (void)cache.values(5); },
                                                      Contains("KV head index (5)"));
  }
  SECTION("state channel") {
    require_rejected_unchanged<std::invalid_argument>(
        cache, [&] { (void)cache.state(0, 1); },
        Contains("KVCache: state channel (1) must be in [0, 1); create the cache with the policy's state_channels()"));
  }
  SECTION("rotated keys into the wrong shape") {
    RowMatrixXf out(4, kHeadDim);
    require_rejected_unchanged<std::invalid_argument>(
        cache, [&] { cache.rotated_keys(0, out); },
        Contains("KVCache::rotated_keys: out is [4 x 4], expected [5 x 4]"));
  }
  SECTION("rotation of a vector of the wrong size") {
    std::vector<float> vector(3, 1.0f);
    require_rejected_unchanged<std::invalid_argument>(
        cache, [&] { cache.rotate_at_slot(vector, 2); },
        Contains("KVCache::rotate_at_slot: vector has 3 entries, expected head_dim 4"));
  }
  SECTION("negative reserve") {
    require_rejected_unchanged<std::invalid_argument>(cache, [&] { cache.reserve(-1); },
                                                      Contains("KVCache::reserve: slots (-1) must be non-negative"));
  }
}

TEST_CASE("empty cache calls", "[errors][kv_cache][empty]") {
  // An empty cache is valid input: nothing is over budget, select returns an
  // empty plan and keep of it changes nothing. Observing before any append
  // is a caller error for the policies that need attention rows (rows over
  // zero slots are empty).
  Random random(14);
  const RowMatrixXf w_o = random_w_o(random);
  for (const std::string_view name : policy_names) {
    INFO("policy " << name);
    PolicyOptions options{.name = std::string(name),
                          .budget = 12,
                          .window = kWindow,
                          .n_layers = 4,
                          .n_heads = kHeads,
                          .n_kv_heads = kKvHeads,
                          .head_dim = kHeadDim,
                          .w_o = &w_o};
    AnyPolicy<float> policy = make_policy<float>(options);
    KVCache<float> cache = make_cache(policy.state_channels());
    Observation observation;
    observation.n_heads = kHeads;

    CHECK_FALSE(policy.should_evict(cache, Trigger::prefill));
    CHECK_FALSE(policy.should_evict(cache, Trigger::decode));
    KeepPlan plan;
    REQUIRE_NOTHROW(policy.select(cache, observation, plan));
    CHECK(plan.n_kv_heads() == kKvHeads);
    CHECK(plan.count() == 0);
    REQUIRE_NOTHROW(cache.keep(plan));
    CHECK(cache.empty());

    const bool needs_rows = policy.needs().decode_attention;
    if (needs_rows) {
      require_rejected_unchanged<std::invalid_argument>(
          cache, [&] { policy.observe(cache, observation); },
          Contains("the observation has no attention rows; pass the probabilities of this pass's queries"));
    } else {
      CHECK_NOTHROW(policy.observe(cache, observation));
    }
  }
  KVCache<float> cache = make_cache(0);
  KeepPlan one(kKvHeads, 1);
  one.fill_identity();
  require_rejected_unchanged<std::invalid_argument>(cache, [&] { cache.keep(one); },
                                                    Contains("plan keeps 1 slots per head, the cache holds 0"));

  // An append of zero tokens is valid and changes nothing.
  const CacheSnapshot before = CacheSnapshot::take(cache);
  REQUIRE_NOTHROW(cache.append(RowMatrixXf(0, kHeadDim), RowMatrixXf(0, kHeadDim), std::vector<std::int64_t>{}));
  CHECK(CacheSnapshot::take(cache) == before);
}

TEST_CASE("KeepPlan and QueryWindow rejected unchanged", "[errors][query_window]") {
  SECTION("negative plan sizes") {
    KeepPlan plan(2, 3);
    plan.fill_identity();
    const KeepPlan before = plan;
    require_rejected<std::invalid_argument>([&] { plan.reset(-1, 3); },
                                            Contains("KeepPlan: n_kv_heads (-1) and count (3) must be non-negative"));
    require_rejected<std::invalid_argument>([&] { plan.reset(2, -4); }, Contains("count (-4)"));
    CHECK(plan == before);
  }
  SECTION("window sizes") {
    require_rejected<std::invalid_argument>(
        [] { (void)QueryWindow(0, 4, 5); },
        Contains("QueryWindow: n_heads (0), window (4) and head_dim (5) must be at least 1"));
    require_rejected<std::invalid_argument>([] { (void)QueryWindow(3, 0, 5); }, Contains("window (0)"));
    require_rejected<std::invalid_argument>([] { (void)QueryWindow(3, 4, -1); }, Contains("head_dim (-1)"));
  }
  SECTION("pushed queries") {
    Random random(15);
    QueryWindow window(3, 4, 5);
    for (int i = 0; i < 2; ++i) window.push(random.vector(15));
    const Tensor3View view = window.view();
    const std::vector<float> before(view.data, view.data + view.numel());

    std::vector<float> short_query = random.vector(14);
    require_rejected<std::invalid_argument>(
        [&] { window.push(short_query); },
        Contains("QueryWindow::push: query has 14 values, expected n_heads * head_dim = 15"));
    std::vector<float> bad = random.vector(15);
    bad[7] = kNaN;
    require_rejected<std::invalid_argument>(
        [&] { window.push(bad); }, Contains("QueryWindow::push: query contains a non-finite value (nan) at flat index 7"));
    bad[7] = -kInfinity;
    require_rejected<std::invalid_argument>([&] { window.push(bad); }, Contains("(-inf) at flat index 7"));

    CHECK(window.size() == 2);
    const Tensor3View after = window.view();
    CHECK(std::vector<float>(after.data, after.data + after.numel()) == before);
  }
}

// ===========================================================================
// Policy configurations

TEST_CASE("StreamingLLM configuration rejected", "[errors][streaming_llm]") {
  using Config = StreamingLLMConfig;
  require_configs_rejected(
      "StreamingLLM: ",
      {
          {"budget 0", [] { (void)StreamingLLM<float>(Config{.budget = 0}); }, "budget (0) must be at least 1"},
          {"negative budget", [] { (void)StreamingLLM<float>(Config{.budget = -5}); }, "budget (-5) must be at least 1"},
          {"negative sinks", [] { (void)StreamingLLM<float>(Config{.budget = 8, .sinks = -1}); },
           "sinks (-1) must be non-negative"},
          {"negative slack", [] { (void)StreamingLLM<float>(Config{.budget = 8, .slack = -1}); },
           "slack (-1) must be non-negative"},
          {"budget below sinks", [] { (void)StreamingLLM<float>(Config{.budget = 3, .sinks = 4}); },
           "budget (3) must be at least sinks + window (4 + 0)"},
          {"budget equal to sinks", [] { (void)StreamingLLM<float>(Config{.budget = 4, .sinks = 4}); },
           "budget (4) must be at least sinks + 1 (4 + 1), so the newest token is kept"},
      });
}

TEST_CASE("H2O configuration rejected", "[errors][h2o]") {
  using Config = H2OConfig;
  require_configs_rejected(
      "H2O: ", {
                   {"budget 0", [] { (void)H2O<float>(Config{.budget = 0}); }, "budget (0) must be at least 1"},
                   {"negative budget", [] { (void)H2O<float>(Config{.budget = -3}); }, "budget (-3) must be at least 1"},
                   {"negative heavy", [] { (void)H2O<float>(Config{.budget = 4, .heavy = -1}); },
                    "heavy (-1) must be non-negative"},
                   {"recent 0", [] { (void)H2O<float>(Config{.budget = 4, .recent = 0}); },
                    "recent (0) must be at least 1"},
                   {"heavy filling the budget", [] { (void)H2O<float>(Config{.budget = 4, .heavy = 4}); },
                    "heavy (4) must be below budget (4)"},
                   {"recent above the budget", [] { (void)H2O<float>(Config{.budget = 4, .recent = 5}); },
                    "recent (5) must be at most budget (4)"},
                   {"split disagreeing with the budget",
                    [] { (void)H2O<float>(Config{.budget = 5, .heavy = 2, .recent = 2}); },
                    "budget (5) must equal heavy + recent (2 + 2)"},
                   {"negative slack", [] { (void)H2O<float>(Config{.budget = 4, .slack = -1}); },
                    "slack (-1) must be non-negative"},
               });
}

TEST_CASE("TOVA configuration rejected", "[errors][tova]") {
  using Config = TOVAConfig;
  require_configs_rejected(
      "TOVA: ", {
                    {"budget 0", [] { (void)TOVA<float>(Config{.budget = 0}); }, "budget (0) must be at least 1"},
                    {"negative sinks", [] { (void)TOVA<float>(Config{.budget = 4, .sinks = -1}); },
                     "sinks (-1) must be non-negative"},
                    {"budget below sinks", [] { (void)TOVA<float>(Config{.budget = 3, .sinks = 4}); },
                     "budget (3) must be at least sinks + window (4 + 0)"},
                    {"no room for the newest token",
                     [] { (void)TOVA<float>(Config{.budget = 4, .sinks = 4, .protect_newest = true}); },
                     "budget (4) must be at least sinks + 1 (4 + 1) when protect_newest is set"},
                    {"negative slack", [] { (void)TOVA<float>(Config{.budget = 4, .slack = -2}); },
                     "slack (-2) must be non-negative"},
                });
}

TEST_CASE("SnapKV configuration rejected", "[errors][snapkv]") {
  using Config = SnapKVConfig;
  require_configs_rejected(
      "SnapKV: ",
      {
          {"window 0", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 0}); }, "window (0) must be at least 1"},
          {"negative window", [] { (void)SnapKV<float>(Config{.budget = 8, .window = -3}); }, "window (-3)"},
          {"budget 0", [] { (void)SnapKV<float>(Config{.budget = 0, .window = 2}); }, "budget (0) must be at least 1"},
          {"budget below the window", [] { (void)SnapKV<float>(Config{.budget = 4, .window = 8}); },
           "budget (4) must be at least window (8), because the window is always kept"},
          {"even kernel", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .kernel_size = 4}); },
           "kernel_size (4) must be odd and at least 1"},
          {"kernel 0", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .kernel_size = 0}); },
           "kernel_size (0) must be odd"},
          {"negative kernel", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .kernel_size = -3}); },
           "kernel_size (-3)"},
          {"scale 0", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .scale = 0.0f}); },
           "scale (0) must be finite and > 0"},
          {"negative scale", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .scale = -1.0f}); },
           "scale (-1) must be finite"},
          {"NaN scale", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .scale = kNaN}); },
           "scale (nan) must be finite"},
          {"infinite scale", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .scale = kInfinity}); },
           "scale (inf) must be finite"},
          {"expand aggregation",
           [] {
             (void)SnapKV<float>(Config{.budget = 8, .window = 2, .gqa_aggregation = SnapKVAggregation::expand});
           },
           "gqa_aggregation expand (one kept set per query head) is not implemented"},
          {"negative slack", [] { (void)SnapKV<float>(Config{.budget = 8, .window = 2, .slack = -1}); },
           "slack (-1) must be non-negative"},
      });
}

TEST_CASE("LaCache configuration rejected", "[errors][lacache]") {
  using Config = LaCacheConfig;
  require_configs_rejected(
      "LaCache: ",
      {
          {"no layers", [] { (void)LaCache<float>(Config{.capacity = 64, .n_layers = 0}); },
           "n_layers (0) must be at least 1"},
          {"negative layer", [] { (void)LaCache<float>(Config{.capacity = 64, .layer = -1, .n_layers = 4}); },
           "layer (-1) must be in [0, n_layers) = [0, 4)"},
          {"layer past the last", [] { (void)LaCache<float>(Config{.capacity = 64, .layer = 4, .n_layers = 4}); },
           "layer (4) must be in [0, n_layers) = [0, 4)"},
          {"capacity 0", [] { (void)LaCache<float>(Config{.capacity = 0, .n_layers = 4}); },
           "capacity (0) must be at least 1"},
          {"negative sinks", [] { (void)LaCache<float>(Config{.capacity = 64, .sinks = -1, .n_layers = 4}); },
           "sinks (-1) must be non-negative"},
          {"span 0", [] { (void)LaCache<float>(Config{.capacity = 64, .span = 0, .n_layers = 4}); },
           "span (0) must be at least 1"},
          {"overlap equal to span",
           [] { (void)LaCache<float>(Config{.capacity = 64, .span = 2, .overlap = 2, .n_layers = 4}); },
           "overlap (2) must be in [0, span) = [0, 2)"},
          {"negative overlap", [] { (void)LaCache<float>(Config{.capacity = 64, .overlap = -1, .n_layers = 4}); },
           "overlap (-1) must be in [0, span)"},
          {"span of every layer", [] { (void)LaCache<float>(Config{.capacity = 64, .span = 4, .n_layers = 4}); },
           "span 4 and overlap 0 with n_layers 4 give chunks of Pb = 1 tokens of which every layer keeps Pa = 1, "
           "so nothing can be shed"},
          {"capacity too small for a sweep", [] { (void)LaCache<float>(Config{.capacity = 8, .n_layers = 4}); },
           "capacity (8) must be at least sinks + n_layers + Pa (4 + 4 + 1)"},
      });
}

TEST_CASE("SinkCLIP configuration rejected", "[errors][sinkclip]") {
  using Config = SinkCLIPConfig;
  const auto make = [](auto change) {
    return [change] {
      Config config{.budget = 48};
      change(config);
      (void)SinkCLIP<float>(config);
    };
  };
  require_configs_rejected(
      "SinkCLIP: ",
      {
          {"budget 0", make([](Config& c) { c.budget = 0; }), "budget (0) must be at least 1"},
          {"negative sinks", make([](Config& c) { c.sinks = -1; }), "sinks (-1) must be non-negative"},
          {"recent 0", make([](Config& c) { c.recent = 0; }), "recent (0) must be at least 1"},
          {"budget below sinks + recent", make([](Config& c) { c.budget = 30; }),
           "budget (30) must be at least sinks + window (4 + 32)"},
          {"budget equal to sinks + recent", make([](Config& c) { c.budget = 36; }),
           "budget (36) must be at least sinks + recent + 1 (4 + 32 + 1), so one scored slot remains"},
          {"theta 0", make([](Config& c) { c.sink_threshold = 0.0f; }), "sink_threshold (0) must be in (0, 1)"},
          {"theta 1", make([](Config& c) { c.sink_threshold = 1.0f; }), "sink_threshold (1) must be in (0, 1)"},
          {"NaN theta", make([](Config& c) { c.sink_threshold = kNaN; }), "sink_threshold (nan)"},
          {"keep threshold above theta", make([](Config& c) { c.sink_keep_threshold = 0.2f; }),
           "sink_keep_threshold (0.2) must be in [0, sink_threshold] = [0, 0.1]"},
          {"negative keep threshold", make([](Config& c) { c.sink_keep_threshold = -0.1f; }),
           "sink_keep_threshold (-0.1)"},
          {"negative emergent sinks", make([](Config& c) { c.max_emergent_sinks = -1; }),
           "max_emergent_sinks (-1) must be non-negative"},
          {"observation window 0", make([](Config& c) { c.observation_window = 0; }),
           "observation_window (0) must be at least 1"},
          {"sink rate 0", make([](Config& c) { c.sink_rate = 0.0f; }), "sink_rate (0) must be in (0, 1]"},
          {"sink rate above 1", make([](Config& c) { c.sink_rate = 1.5f; }), "sink_rate (1.5) must be in (0, 1]"},
          {"clip 0", make([](Config& c) { c.clip = 0.0f; }), "clip (0) must be finite and greater than 0"},
          {"infinite clip", make([](Config& c) { c.clip = kInfinity; }), "clip (inf) must be finite"},
          {"NaN clip", make([](Config& c) { c.clip = kNaN; }), "clip (nan)"},
          {"decay 0", make([](Config& c) { c.decay = 0.0f; }), "decay (0) must be in (0, 1]"},
          {"decay above 1", make([](Config& c) { c.decay = 1.5f; }), "decay (1.5) must be in (0, 1]"},
          {"NaN decay", make([](Config& c) { c.decay = kNaN; }), "decay (nan)"},
          {"vote mass 1", make([](Config& c) { c.min_vote_mass = 1.0f; }), "min_vote_mass (1) must be in [0, 1)"},
          {"negative vote mass", make([](Config& c) { c.min_vote_mass = -0.5f; }), "min_vote_mass (-0.5)"},
          {"negative slack", make([](Config& c) { c.slack = -1; }), "slack (-1) must be non-negative"},
      });
}

TEST_CASE("ReST-KV configuration rejected", "[errors][restkv]") {
  const auto make = [](auto change) {
    return [change] {
      RestKVConfig config = restkv_config(false);
      change(config);
      (void)RestKV<float>(config);
    };
  };
  require_configs_rejected(
      "ReST-KV: ",
      {
          {"no query heads", make([](RestKVConfig& c) { c.n_heads = 0; }), "n_heads (0) must be at least 1"},
          {"no KV heads", make([](RestKVConfig& c) { c.n_kv_heads = 0; }), "n_kv_heads (0) must be at least 1"},
          {"heads that do not divide",
           make([](RestKVConfig& c) {
             c.n_heads = 6;
             c.n_kv_heads = 4;
           }),
           "n_heads (6) must be a multiple of n_kv_heads (4)"},
          {"head_dim 0", make([](RestKVConfig& c) { c.head_dim = 0; }), "head_dim (0) must be at least 1"},
          {"window 0", make([](RestKVConfig& c) { c.window = 0; }), "window (0) must be at least 1"},
          {"budget below the window", make([](RestKVConfig& c) { c.budget = 3; }),
           "budget (3) must be at least window (4); the window is always kept"},
          {"budget 0", make([](RestKVConfig& c) { c.budget = 0; }), "budget (0) must be at least window (4)"},
          {"adaptive pooling with window 1", make([](RestKVConfig& c) { c.window = 1; }),
           "window (1) must be at least 2 for adaptive pooling"},
          {"even kernel", make([](RestKVConfig& c) { c.kernel_size = 4; }), "kernel_size (4) must be odd and at least 1"},
          {"alpha 0", make([](RestKVConfig& c) { c.alpha = 0.0f; }), "alpha (0) must be in (0, 1]"},
          {"alpha above 1", make([](RestKVConfig& c) { c.alpha = 1.5f; }), "alpha (1.5) must be in (0, 1]"},
          {"NaN alpha", make([](RestKVConfig& c) { c.alpha = kNaN; }), "alpha (nan)"},
          {"tau 0", make([](RestKVConfig& c) { c.tau = 0.0f; }), "tau (0) must be finite and > 0"},
          {"NaN tau", make([](RestKVConfig& c) { c.tau = kNaN; }), "tau (nan)"},
          {"tau that is not read", make([](RestKVConfig& c) { c.tau = 2.0f; }),
           "tau (2) is read only in after mode with use_wo; leave it at 1"},
          {"use_norm in after mode", make([](RestKVConfig& c) { c.use_norm = true; }),
           "use_norm is read only in before mode"},
          {"drift scale 0", make([](RestKVConfig& c) { c.drift_scale = 0.0; }),
           "drift_scale (0) must be finite and > 0"},
          {"infinite drift scale",
           make([](RestKVConfig& c) { c.drift_scale = std::numeric_limits<double>::infinity(); }),
           "drift_scale (inf)"},
          {"beta below 1", make([](RestKVConfig& c) { c.beta = 0.5; }), "beta (0.5) must be finite and at least 1"},
          {"infinite beta", make([](RestKVConfig& c) { c.beta = std::numeric_limits<double>::infinity(); }),
           "beta (inf)"},
          {"negative slack", make([](RestKVConfig& c) { c.slack = -1; }), "slack (-1) must be non-negative"},
          {"softmax scale 0", make([](RestKVConfig& c) { c.softmax_scale = 0.0f; }),
           "softmax_scale (0) must be finite and > 0"},
          {"NaN softmax scale", make([](RestKVConfig& c) { c.softmax_scale = kNaN; }), "softmax_scale (nan)"},
          {"pyramid layer past the last",
           make([](RestKVConfig& c) {
             c.use_pyramid = true;
             c.layer = 4;
             c.n_layers = 4;
           }),
           "layer (4) must be in [0, n_layers = 4) with use_pyramid"},
          {"pyramid without layers",
           make([](RestKVConfig& c) {
             c.use_pyramid = true;
             c.n_layers = 0;
           }),
           "n_layers (0) must be at least 1 with use_pyramid"},
          {"use_wo without W_o", make([](RestKVConfig& c) { c.use_wo = true; }),
           "use_wo is true but no W_o was given; pass W_o [D, n_heads * head_dim]"},
      });
}

TEST_CASE("ReST-KV W_o rejected", "[errors][restkv]") {
  Random random(16);
  const RestKVConfig config = restkv_config(true);
  const RowMatrixXf good = random_w_o(random);
  SECTION("wrong width") {
    require_rejected<std::invalid_argument>(
        [&] { (void)RestKV<float>(config, random.matrix(5, 11)); },
        Contains("ReST-KV: W_o is [5 x 11], expected [D x n_heads * head_dim] with D >= 1 and n_heads * head_dim = "
                 "4 * 4"));
  }
  SECTION("no rows") {
    require_rejected<std::invalid_argument>([&] { (void)RestKV<float>(config, RowMatrixXf(0, 16)); },
                                            Contains("W_o is [0 x 16]"));
  }
  SECTION("NaN") {
    RowMatrixXf bad = good;
    bad(2, 5) = kNaN;
    require_rejected<std::invalid_argument>([&] { (void)RestKV<float>(config, bad); },
                                            StartsWith("ReST-KV: W_o") && Contains("(2, 5)") && Contains("nan") &&
                                                Contains("finite"));
  }
  SECTION("infinity, even when W_o is not read") {
    RowMatrixXf bad = good;
    bad(0, 0) = -kInfinity;
    require_rejected<std::invalid_argument>([&] { (void)RestKV<float>(restkv_config(false), bad); },
                                            StartsWith("ReST-KV: W_o") && Contains("-inf") && Contains("finite"));
  }
  SECTION("Gram kernel") {
    RowMatrixXf bad = good;
    bad(1, 3) = kInfinity;
    require_rejected<std::invalid_argument>([&] { (void)kernels::gram_matrices(bad, kHeads, kHeadDim); },
                                            Contains("gram_matrices: W_o(1, 3) is inf; W_o must be finite"));
    require_rejected<std::invalid_argument>([&] { (void)kernels::gram_matrices(good, 3, kHeadDim); },
                                            Contains("gram_matrices: W_o has 16 columns, expected n_heads * head_dim"));
  }
}

// ===========================================================================
// Observations

// Bad attention rows for the policies that read them. The valid rows are
// [4 heads, 4 rows, 10 slots].
template <class Policy>
void check_attention_rejected(Scenario<Policy>& scenario, const std::string& prefix, bool limits_rows) {
  Tensor3 rows = scenario.rows;
  Observation observation = scenario.good(true);

  SECTION("NaN in attention") {
    rows.at(3, 3, 9) = kNaN;
    observation.attention = rows.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        StartsWith(prefix) && Contains("attention contains a non-finite value (nan) at flat index 159"));
  }
  SECTION("infinity in attention, decode step") {
    rows.at(0, 1, 2) = kInfinity;
    observation.attention = rows.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, decode_with<Policy>(observation),
        StartsWith(prefix) && Contains("attention contains a non-finite value (inf) at flat index 12"));
  }
  SECTION("rows over the wrong number of slots") {
    const Tensor3 short_rows = causal_rows(kHeads, 4, 9);
    observation.attention = short_rows.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        StartsWith(prefix) && Contains("attention rows have 9 columns, the cache holds 10 slots"));
  }
  SECTION("query heads that do not divide") {
    const Tensor3 odd = causal_rows(3, 4, 10);
    observation.attention = odd.view();
    observation.n_heads = 3;
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        StartsWith(prefix) && Contains("attention has 3 heads and the observation n_heads is 3; both must be the "
                                       "same positive multiple of n_kv_heads (2)"));
  }
  SECTION("head count disagreeing with the rows") {
    observation.n_heads = 2;
    require_rejected_by_policy<std::invalid_argument>(
        scenario, decode_with<Policy>(observation),
        StartsWith(prefix) && Contains("attention has 4 heads and the observation n_heads is 2"));
  }
  SECTION("no rows") {
    observation.attention = {};
    require_rejected_by_policy<std::invalid_argument>(
        scenario, decode_with<Policy>(observation),
        StartsWith(prefix) && Contains("the observation has no attention rows"));
  }
  if (limits_rows) {
    SECTION("more rows than cached slots") {
      const Tensor3 tall = causal_rows(kHeads, 11, 10);
      observation.attention = tall.view();
      require_rejected_by_policy<std::invalid_argument>(
          scenario, prefill_with<Policy>(observation),
          StartsWith(prefix) && Contains("attention has 11 rows for 10 cached slots"));
    }
  }
}

TEST_CASE("H2O observations rejected unchanged", "[errors][h2o]") {
  Scenario scenario(H2O<float>({.budget = kBudget, .normalize_by_count = true}));
  check_attention_rejected(scenario, "H2O: ", true);

  SECTION("cache without the count channel") {
    Random random(17);
    KVCache<float> small = make_cache(1);
    append_tokens(small, 10, random);
    const Observation good = scenario.good(true);
    require_rejected_unchanged<std::invalid_argument>(
        small, [&] { prefill_with<H2O<float>>(good)(scenario.policy, small); },
        Contains("H2O: the cache has 1 state channels, the policy needs 2; create the cache with state_channels = "
                 "policy.state_channels()"));
    KeepPlan plan;
    require_rejected_unchanged<std::invalid_argument>(small, [&] { scenario.policy.select(small, good, plan); },
                                                      Contains("H2O: the cache has 1 state channels"));
  }
}

TEST_CASE("TOVA observations rejected unchanged", "[errors][tova]") {
  // TOVA reads only the newest row, so more rows than slots are accepted.
  Scenario scenario(TOVA<float>({.budget = kBudget, .granularity = TOVAGranularity::head}));
  check_attention_rejected(scenario, "TOVA: ", false);

  SECTION("select without rows") {
    KeepPlan plan;
    require_rejected_unchanged<std::invalid_argument>(
        scenario.cache, [&] { scenario.policy.select(scenario.cache, Observation{}, plan); },
        Contains("TOVA: the observation has no attention rows"));
  }
  SECTION("more rows than cached slots accepted") {
    // The newest of 11 rows is the same uniform row over 10 slots as the
    // newest of the 4 valid rows, so both cuts keep the same slots.
    const Tensor3 tall = causal_rows(kHeads, 11, 10);
    Observation tall_observation = scenario.good(true);
    tall_observation.attention = tall.view();
    TOVA<float> twin = scenario.policy;
    KVCache<float> twin_cache = scenario.cache;
    KeepPlan plan;
    KeepPlan twin_plan;
    REQUIRE(compress_prefill(scenario.policy, scenario.cache, tall_observation, plan));
    REQUIRE(compress_prefill(twin, twin_cache, scenario.good(true), twin_plan));
    CHECK(plan == twin_plan);
  }
}

TEST_CASE("SinkCLIP observations rejected unchanged", "[errors][sinkclip]") {
  Scenario scenario(SinkCLIP<float>({.budget = kBudget, .sinks = 1, .observation_window = 4, .recent = 2}));
  check_attention_rejected(scenario, "SinkCLIP: ", true);

  SECTION("cache without state channels") {
    Random random(18);
    KVCache<float> small = make_cache(3);
    append_tokens(small, 10, random);
    const Observation good = scenario.good(false);
    require_rejected_unchanged<std::invalid_argument>(
        small, [&] { decode_with<SinkCLIP<float>>(good)(scenario.policy, small); },
        Contains("SinkCLIP: the cache has 3 state channels, the policy needs 4"));
    KeepPlan plan;
    require_rejected_unchanged<std::invalid_argument>(small, [&] { scenario.policy.select(small, good, plan); },
                                                      Contains("SinkCLIP: the cache has 3 state channels"));
  }
}

TEST_CASE("SnapKV observations rejected unchanged", "[errors][snapkv]") {
  using Policy = SnapKV<float>;
  Scenario scenario(Policy({.budget = kBudget, .window = kWindow}));
  Tensor3 queries = scenario.queries;
  Observation observation = scenario.good(true);
  Random random(19);

  SECTION("NaN in queries") {
    queries.at(1, 2, 3) = kNaN;
    observation.queries = queries.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("SnapKV: queries contains a non-finite value (nan) at flat index 27"));
  }
  SECTION("infinity in queries, decode step") {
    queries.at(0, 0, 0) = -kInfinity;
    observation.queries = queries.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, decode_with<Policy>(observation),
        Contains("SnapKV: queries contains a non-finite value (-inf) at flat index 0"));
  }
  SECTION("queries of another head_dim") {
    const Tensor3 wide = random_queries(kHeads, kWindow, 3, random);
    observation.queries = wide.view();
    require_rejected_by_policy<std::invalid_argument>(scenario, prefill_with<Policy>(observation),
                                                      Contains("SnapKV: queries have head_dim 3, the cache has 4"));
  }
  SECTION("query heads that do not divide") {
    const Tensor3 odd = random_queries(3, kWindow, kHeadDim, random);
    observation.queries = odd.view();
    observation.n_heads = 3;
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("SnapKV: queries have 3 heads and the observation n_heads is 3; both must be the same positive "
                 "multiple of n_kv_heads (2)"));
  }
  SECTION("more queries than cached slots") {
    const Tensor3 many = random_queries(kHeads, 11, kHeadDim, random);
    observation.queries = many.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("SnapKV: the observation carries 11 queries for 10 cached slots"));
  }
  SECTION("fewer queries than the window") {
    const Tensor3 few = random_queries(kHeads, kWindow - 1, kHeadDim, random);
    observation.queries = few.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("SnapKV: the observation carries 3 window queries, window (4) needed"));
  }
  SECTION("no queries") {
    observation.queries = {};
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("SnapKV: the observation carries 0 window queries, window (4) needed; pass the queries of the "
                 "last 4 cached tokens"));
  }
}

TEST_CASE("ReST-KV observations rejected unchanged", "[errors][restkv]") {
  using Policy = RestKV<float>;
  Random random(20);
  Scenario scenario(Policy(restkv_config(true), random_w_o(random)));
  Tensor3 queries = scenario.queries;
  Observation observation = scenario.good(true);

  SECTION("no queries over budget") {
    observation.queries = {};
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("ReST-KV: the observation has no window queries; pass the last window (4) queries"));
  }
  SECTION("queries of the wrong shape") {
    const Tensor3 few = random_queries(kHeads, kWindow - 1, kHeadDim, random);
    observation.queries = few.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("ReST-KV: window queries are [4, 3, 4], expected [n_heads, window, head_dim] = [4, 4, 4]"));
  }
  SECTION("NaN in queries") {
    queries.at(3, 3, 3) = kNaN;
    observation.queries = queries.view();
    require_rejected_by_policy<std::invalid_argument>(
        scenario, decode_with<Policy>(observation),
        Contains("ReST-KV: window queries contains a non-finite value (nan) at flat index 63"));
  }
  SECTION("observation for other heads") {
    observation.n_heads = 2;
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("ReST-KV: Observation::n_heads (2) must equal the policy's n_heads (4)"));
  }
  SECTION("negative appended count") {
    observation.appended = -1;
    require_rejected_by_policy<std::invalid_argument>(
        scenario, prefill_with<Policy>(observation),
        Contains("ReST-KV: Observation::appended (-1) must be in [0, size() = 10]"));
  }
  SECTION("appended count above the size") {
    observation.appended = 11;
    require_rejected_by_policy<std::invalid_argument>(scenario, prefill_with<Policy>(observation),
                                                      Contains("Observation::appended (11) must be in [0, size() = 10]"));
  }
  SECTION("select after an append without observe") {
    require_rejected_by_policy<std::invalid_argument>(
        scenario,
        [&](Policy& policy, KVCache<float>& cache) {
          KeepPlan plan;
          policy.select(cache, observation, plan);
        },
        Contains("ReST-KV: the cache has slots whose cached quadratic forms were not computed; call "
                 "observe(cache, observation) after every append and before select"));
  }
  SECTION("cache of another layout") {
    KVCache<float> other = make_cache(2, 1);
    append_tokens(other, 10, random);
    require_rejected_unchanged<std::invalid_argument>(
        other, [&] { prefill_with<Policy>(observation)(scenario.policy, other); },
        Contains("ReST-KV: the cache has n_kv_heads 1 and head_dim 4, the policy was configured with 2 and 4"));
  }
  SECTION("cache without state channels") {
    KVCache<float> other = make_cache(1);
    append_tokens(other, 10, random);
    require_rejected_unchanged<std::invalid_argument>(
        other, [&] { prefill_with<Policy>(observation)(scenario.policy, other); },
        Contains("ReST-KV: the cache has 1 state channels, the policy needs 2"));
  }
  SECTION("scores of a cache smaller than the window") {
    KVCache<float> small = make_cache(2);
    append_tokens(small, 3, random);
    Policy policy(restkv_config(true), random_w_o(random));
    policy.observe(small, observation_of(scenario.rows, Tensor3{}, 3, true));
    RowMatrixXf scores;
    require_rejected_unchanged<std::invalid_argument>(
        small, [&] { policy.raw_scores(small, observation, scores); },
        Contains("ReST-KV: the cache holds 3 slots, fewer than the window (4)"));
  }
}

// ===========================================================================
// LaCache calls that cannot fit

TEST_CASE("LaCache bulk call rejected unchanged", "[errors][lacache]") {
  // 200 tokens at once with capacity 40 and a 24-layer ladder of 9-token
  // chunks: the folded ladder would reach the newest tokens.
  LaCache<float> policy({.capacity = 40, .sinks = 4, .span = 9, .overlap = 7, .layer = 5, .n_layers = 24});
  KVCache<float> cache = make_cache(0);
  Random random(21);
  append_tokens(cache, 200, random);
  KeepPlan plan;
  require_rejected_unchanged<std::length_error>(
      cache, [&] { compress_prefill(policy, cache, Observation{}, plan); },
      StartsWith("LaCache: this call must shed r = 158 tokens (size 200, capacity 42, cursor 4)") &&
          Contains("the largest r that fits is 156. Append at most 156 tokens beyond the capacity before each "
                   "compaction"));
  CHECK(policy.cursor() == 4);
  CHECK(policy.capacity() == 40);
  CHECK_FALSE(policy.capacity_adjusted());
}

// ===========================================================================
// Policies by name

TEST_CASE("policy names and parameters rejected", "[errors][registry]") {
  Random random(22);
  const RowMatrixXf w_o = random_w_o(random);
  const auto make = [&w_o](std::string name, std::map<std::string, std::string> parameters = {},
                           std::int64_t budget = 12, int layer = 0, bool with_w_o = true) {
    return [=, &w_o] {
      PolicyOptions options{.name = name,
                            .budget = budget,
                            .window = kWindow,
                            .layer = layer,
                            .n_layers = 4,
                            .n_heads = kHeads,
                            .n_kv_heads = kKvHeads,
                            .head_dim = kHeadDim,
                            .w_o = with_w_o ? &w_o : nullptr,
                            .parameters = parameters};
      (void)make_policy<float>(options);
    };
  };
  require_configs_rejected(
      "",
      {
          {"unknown name", make("lru"),
           "unknown policy name 'lru'; known policies: full, streaming_llm, h2o, tova, snapkv, lacache, restkv, "
           "sinkclip"},
          {"empty name", make(""), "unknown policy name ''"},
          {"name in the wrong case", make("H2O"), "unknown policy name 'H2O'"},
          {"unknown parameter", make("snapkv", {{"kernel", "3"}}),
           "snapkv: unknown parameter 'kernel' (value '3'); known parameters: gqa, kernel_size, pooling, scale"},
          {"parameter for a policy without any", make("full", {{"budget", "4"}}),
           "full: unknown parameter 'budget' (value '4'); this policy takes no parameters"},
          {"parameter for streaming_llm", make("streaming_llm", {{"sinks", "2"}}),
           "streaming_llm: unknown parameter 'sinks' (value '2'); this policy takes no parameters"},
          {"integer that is not a number", make("snapkv", {{"kernel_size", "abc"}}),
           "snapkv: parameter kernel_size='abc' is invalid; expected an integer"},
          {"integer with a fraction", make("snapkv", {{"kernel_size", "3.5"}}),
           "parameter kernel_size='3.5' is invalid; expected an integer"},
          {"integer out of range", make("snapkv", {{"kernel_size", "99999999999999999999"}}),
           "parameter kernel_size='99999999999999999999' is invalid; expected an integer"},
          {"empty integer", make("h2o", {{"heavy", ""}}), "h2o: parameter heavy='' is invalid; expected an integer"},
          {"number that is not a number", make("sinkclip", {{"theta", "high"}}),
           "sinkclip: parameter theta='high' is invalid; expected a number"},
          {"boolean that is not a boolean", make("restkv", {{"use_ema", "yes"}}),
           "restkv: parameter use_ema='yes' is invalid; expected true or false"},
          {"choice that is not offered", make("snapkv", {{"pooling", "mean"}}),
           "snapkv: parameter pooling='mean' is invalid; expected one of avg, max, none"},
          {"restkv without W_o", make("restkv", {}, 12, 0, false),
           "restkv: use_wo is on but no W_o was given; pass the layer's output projection"},
          {"even kernel by parameter", make("snapkv", {{"kernel_size", "4"}}),
           "SnapKV: kernel_size (4) must be odd and at least 1"},
          {"theta out of range by parameter", make("sinkclip", {{"theta", "1.5"}}),
           "SinkCLIP: sink_threshold (1.5) must be in (0, 1)"},
          {"lambda out of range by parameter", make("sinkclip", {{"lambda", "0"}}), "decay (0) must be in (0, 1]"},
          {"alpha out of range by parameter", make("restkv", {{"alpha", "0"}}), "ReST-KV: alpha (0) must be in (0, 1]"},
          {"tau out of range by parameter", make("restkv", {{"tau", "-1"}}), "ReST-KV: tau (-1) must be finite"},
          {"beta out of range by parameter", make("restkv", {{"beta", "0.5"}}), "ReST-KV: beta (0.5)"},
          {"scale out of range by parameter", make("restkv", {{"scale", "0"}}), "ReST-KV: drift_scale (0)"},
          {"negative budget", make("h2o", {}, -1), "H2O: budget (-1) must be at least 1"},
          {"layer past the last", make("lacache", {}, 12, 5), "LaCache: layer (5) must be in [0, n_layers) = [0, 4)"},
      });
}

TEST_CASE("registry names the parameter key in range errors", "[errors][registry]") {
  // SinkCLIP's parameter keys are the symbols of its definition and ReST-KV's
  // `scale` sets drift_scale, so a range error names the key that was passed.
  const auto message_of = [](const std::string& name, const std::string& key, const std::string& value) {
    Random random(23);
    const RowMatrixXf w_o = random_w_o(random);
    PolicyOptions options{.name = name,
                          .budget = 48,
                          .window = kWindow,
                          .n_layers = 4,
                          .n_heads = kHeads,
                          .n_kv_heads = kKvHeads,
                          .head_dim = kHeadDim,
                          .w_o = &w_o,
                          .parameters = {{key, value}}};
    try {
      (void)make_policy<float>(options);
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string("no exception");
  };
  CHECK_THAT(message_of("sinkclip", "lambda", "0"), Contains("decay (0)") && Contains("lambda sets decay"));
  CHECK_THAT(message_of("sinkclip", "nu", "2"), Contains("min_vote_mass (2)") && Contains("nu sets min_vote_mass"));
  CHECK_THAT(message_of("sinkclip", "alpha_sigma", "0"),
             Contains("sink_rate (0)") && Contains("alpha_sigma sets sink_rate"));
  CHECK_THAT(message_of("restkv", "scale", "0"), Contains("drift_scale (0)") && Contains("scale sets drift_scale"));
}

// ===========================================================================
// Kernels

TEST_CASE("kernel arguments rejected", "[errors][kernels]") {
  Random random(24);
  const std::vector<float> scores = random.vector(10);
  std::vector<float> pooled(10);
  std::vector<std::int64_t> index_scratch;
  kernels::SelectScratch select_scratch;

  SECTION("protected slots above the kept count") {
    std::vector<std::int64_t> out(5);
    require_rejected<std::invalid_argument>(
        [&] { kernels::select_keep(scores, 10, 3, 4, 5, out, select_scratch); },
        Contains("select_keep: 7 protected slots (sinks 3, recent 4, extra 0) exceed keep_count 5; raise the budget "
                 "or shrink the protected ranges"));
  }
  SECTION("kept count above the slots") {
    std::vector<std::int64_t> out(11);
    require_rejected<std::invalid_argument>([&] { kernels::select_keep(scores, 10, 0, 0, 11, out, select_scratch); },
                                            Contains("select_keep: keep_count (11) must be in [0, n = 10]"));
  }
  SECTION("even pooling kernels") {
    require_rejected<std::invalid_argument>([&] { kernels::avg_pool(scores, 4, pooled); },
                                            Contains("avg_pool: kernel size (4) must be odd and at least 1"));
    require_rejected<std::invalid_argument>([&] { kernels::max_pool(scores, 2, pooled, index_scratch); },
                                            Contains("max_pool: kernel size (2) must be odd"));
    require_rejected<std::invalid_argument>([&] { kernels::shifted_avg_pool(scores, 6, 0, pooled); },
                                            Contains("shifted_avg_pool: kernel size (6) must be odd"));
    const RowMatrixXf rows = causal_rows(1, 4, 10).view().block(0);
    require_rejected<std::invalid_argument>(
        [&] { (void)kernels::adaptive_kernel(rows, 4, 4, 2.0, kernels::ShiftRounding::trunc, index_scratch); },
        Contains("adaptive_kernel: minimum kernel size (4) must be odd and at least 1"));
  }
  SECTION("adaptive pooling ranges") {
    const RowMatrixXf rows = causal_rows(1, 4, 10).view().block(0);
    require_rejected<std::invalid_argument>(
        [&] { (void)kernels::adaptive_kernel(rows.topRows(1), 4, 3, 2.0, kernels::ShiftRounding::trunc, index_scratch); },
        Contains("adaptive_kernel: window (1) must be at least 2"));
    require_rejected<std::invalid_argument>(
        [&] { (void)kernels::adaptive_kernel(rows, 4, 3, 0.0, kernels::ShiftRounding::trunc, index_scratch); },
        Contains("adaptive_kernel: scale (0) must be finite and > 0"));
    require_rejected<std::invalid_argument>([&] { kernels::shifted_avg_pool(scores, 5, 3, pooled); },
                                            Contains("shifted_avg_pool: shift (3) must be in [-2, 2]"));
  }
  SECTION("temporal weights") {
    std::vector<float> weights(4);
    require_rejected<std::invalid_argument>(
        [&] { kernels::temporal_weights(kernels::TemporalMode::ema, 0.0f, weights); },
        Contains("temporal_weights: alpha (0) must be in (0, 1]"));
    require_rejected<std::invalid_argument>(
        [&] { kernels::temporal_weights(kernels::TemporalMode::ema, kNaN, weights); }, Contains("alpha (nan)"));
    std::vector<float> none;
    require_rejected<std::invalid_argument>(
        [&] { kernels::temporal_weights(kernels::TemporalMode::mean, 0.5f, none); },
        Contains("temporal_weights: window (0) must be at least 1"));
  }
  SECTION("window larger than the cache") {
    KVCache<float> cache = make_cache(0);
    append_tokens(cache, 10, random);
    const Tensor3 queries = random_queries(kHeads, 11, kHeadDim, random);
    RowMatrixXf out;
    kernels::WindowAttentionWorkspace workspace;
    require_rejected_unchanged<std::invalid_argument>(
        cache, [&] { kernels::group_window_attention(cache, 0, queries.view(), 1.0f, out, workspace); },
        Contains("group_window_attention: window (11) must be in [1, size() = 10]"));
    const Tensor3 odd = random_queries(3, 4, kHeadDim, random);
    require_rejected_unchanged<std::invalid_argument>(
        cache, [&] { kernels::group_window_attention(cache, 0, odd.view(), 1.0f, out, workspace); },
        Contains("group_window_attention: n_heads (3) must be a positive multiple of n_kv_heads (2)"));
  }
  SECTION("pyramid budgets") {
    require_rejected<std::invalid_argument>(
        [] { (void)pyramid_budgets({.budget = 3, .protected_tokens = 4, .n_layers = 4}, 100); },
        Contains("pyramid budgets: budget (3) must be at least the protected tokens (4)"));
    require_rejected<std::invalid_argument>(
        [] { (void)pyramid_budgets({.budget = 32, .protected_tokens = 4, .n_layers = 4, .beta = 0.5}, 100); },
        Contains("pyramid budgets: beta (0.5) must be finite and at least 1"));
    require_rejected<std::invalid_argument>(
        [] { (void)pyramid_budget({.budget = 32, .protected_tokens = 4, .n_layers = 4}, 4, 100); },
        Contains("pyramid_budget: layer (4) must be in [0, n_layers = 4)"));
    require_rejected<std::invalid_argument>([] { (void)uniform_budgets(0, 3); },
                                            Contains("uniform_budgets: budget (0) must be at least 1"));
  }
}

// ===========================================================================
// kvevict-select command line (UsageError; the program exits with status 2)

namespace {

tools::SelectArguments parse_select(std::vector<std::string> arguments) {
  std::vector<const char*> argv = {"kvevict-select"};
  for (const std::string& argument : arguments) argv.push_back(argument.c_str());
  return tools::parse_select_arguments(static_cast<int>(argv.size()), argv.data());
}

std::vector<std::string> with_base(std::vector<std::string> extra) {
  std::vector<std::string> arguments = {"--in", "inputs", "--policy", "h2o"};
  arguments.insert(arguments.end(), extra.begin(), extra.end());
  return arguments;
}

}  // namespace

TEST_CASE("select command line rejected", "[errors][select_tool]") {
  struct Case {
    std::string name;
    std::vector<std::string> arguments;
    std::string fragment;
  };
  const std::vector<Case> cases = {
      {"unknown option", with_base({"--budget", "16", "--budgte", "4"}), "unknown option '--budgte'"},
      {"single-dash option", with_base({"--budget", "16", "-b", "4"}), "unknown option '-b'"},
      {"budget that is not a number", with_base({"--budget", "16x"}),
       "option --budget: '16x' is not an integer in the range of int64"},
      {"budget beyond int64", with_base({"--budget", "99999999999999999999"}),
       "option --budget: '99999999999999999999' is not an integer in the range of int64"},
      {"empty budget", with_base({"--budget="}), "option --budget: '' is not an integer"},
      {"negative window", with_base({"--budget", "16", "--window", "-1"}),
       "option --window: -1 must be non-negative"},
      {"negative sinks", with_base({"--budget", "16", "--sinks", "-4"}), "option --sinks: -4 must be non-negative"},
      {"layer beyond int", with_base({"--budget", "16", "--layer", "3000000000"}),
       "option --layer: 3000000000 is too large"},
      {"negative layer count", with_base({"--budget", "16", "--n-layers", "-2"}),
       "option --n-layers: -2 must be non-negative"},
      {"zero timing runs", with_base({"--budget", "16", "--timing", "0"}),
       "option --timing: 0 runs; pass a count of at least 1"},
      {"timing that is not a number", with_base({"--budget", "16", "--timing", "many"}),
       "option --timing: 'many' is not an integer"},
      {"unknown GQA mode", with_base({"--budget", "16", "--gqa", "both"}),
       "option --gqa: 'both' is not a mode; use kv_head or query_head"},
      {"parameter without a value", with_base({"--budget", "16", "--param", "kernel"}),
       "option --param: 'kernel' is not of the form KEY=VALUE"},
      {"parameter without a key", with_base({"--budget", "16", "--param", "=3"}),
       "option --param: '=3' is not of the form KEY=VALUE"},
      {"parameter given twice", with_base({"--budget", "16", "--param", "heavy=2", "--param", "heavy=3"}),
       "option --param: the key 'heavy' is given more than once"},
      {"option given twice", with_base({"--budget", "16", "--budget", "8"}),
       "option --budget is given more than once"},
      {"option without its value", with_base({"--budget", "16", "--timing"}), "option --timing needs a value"},
      {"missing input folder", {"--policy", "h2o", "--budget", "16"},
       "missing --in DIR, the folder with q.npy, k.npy and v.npy"},
      {"missing policy", {"--in", "inputs", "--budget", "16"}, "missing --policy NAME"},
      {"missing budget", with_base({}), "missing --budget B, the tokens each KV head keeps"},
  };
  for (const Case& c : cases) {
    SECTION(c.name) {
      require_rejected<tools::UsageError>([&] { (void)parse_select(c.arguments); }, Contains(c.fragment));
    }
  }
}
