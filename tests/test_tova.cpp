// TOVA: hand-worked examples, the newest-token setting both ways, sinks,
// a random decode run against a sorting oracle, and validation that leaves
// the cache unchanged.
#include <catch2/catch.hpp>

#include "policy_test_support.hpp"

#include <kvevict/policies/tova.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace {

using kvevict::KeepPlan;
using kvevict::KVCache;
using kvevict::PositionMode;
using kvevict::TOVA;
using kvevict::TOVAConfig;
using kvevict::TOVAGranularity;
using kvevict_test::Tensor3;

using Positions = std::vector<std::int64_t>;

template <class Scalar = float>
KVCache<Scalar> make_cache(int n_kv_heads, std::int64_t tokens, PositionMode mode = PositionMode::original) {
  KVCache<Scalar> cache({.n_kv_heads = n_kv_heads, .head_dim = 4, .positions = mode, .capacity = 16});
  std::mt19937 rng(static_cast<unsigned>(tokens));
  kvevict_test::append_random(cache, tokens, 0, rng);
  return cache;
}

// The rows of the two hand-worked examples: P[0] = (.5, .125, .125, .125, .125),
// P[1] = (.25, .25, .0625, .1875, .25).
Tensor3 example_rows() {
  Tensor3 rows(2, 1, 5);
  rows.set_row(0, 0, {.5f, .125f, .125f, .125f, .125f});
  rows.set_row(1, 0, {.25f, .25f, .0625f, .1875f, .25f});
  return rows;
}

// Evicts with one decode row per head and returns the kept positions per
// KV head.
template <class Scalar>
std::vector<Positions> evict_once(TOVA<Scalar>& policy, KVCache<Scalar>& cache, const Tensor3& rows) {
  KeepPlan plan;
  REQUIRE(kvevict::observe_and_evict(policy, cache, kvevict_test::attention_observation(rows), plan));
  std::vector<Positions> kept;
  for (int j = 0; j < cache.n_kv_heads(); ++j) kept.push_back(kvevict_test::positions_of(cache, j));
  return kept;
}

}  // namespace

TEMPLATE_TEST_CASE("TOVA drops least attended token", "[tova]", float, Eigen::half, Eigen::bfloat16) {
  // Two query heads on one KV head, so layer and head modes coincide.
  // Mean row (.375, .1875, .09375, .15625, .1875): slot 2 is the lowest and
  // leaves; budget 4 keeps {0, 1, 3, 4}.
  const auto granularity = GENERATE(TOVAGranularity::layer, TOVAGranularity::head);
  const auto mode = GENERATE(PositionMode::original, PositionMode::cache_relative);
  TOVA<TestType> policy({.budget = 4, .granularity = granularity});
  KVCache<TestType> cache = make_cache<TestType>(1, 5, mode);
  CHECK(evict_once(policy, cache, example_rows()) == std::vector<Positions>{{0, 1, 3, 4}});
}

TEST_CASE("TOVA head and layer granularity", "[tova]") {
  // Two KV heads, one query head each (g = 1), the rows above.
  // Head mode: head 0 reads (.5, .125, .125, .125, .125). Slots 1..4 tie at
  // .125 and the earliest (slot 1) leaves: {0, 2, 3, 4}. Head 1 drops slot 2
  // (.0625): {0, 1, 3, 4}.
  // Layer mode: the mean over both heads is the mean of the one-KV-head
  // example, so both heads keep {0, 1, 3, 4}.
  SECTION("head") {
    TOVA<float> policy({.budget = 4, .granularity = TOVAGranularity::head});
    KVCache<float> cache = make_cache(2, 5);
    CHECK(evict_once(policy, cache, example_rows()) == std::vector<Positions>{{0, 2, 3, 4}, {0, 1, 3, 4}});
  }
  SECTION("layer") {
    TOVA<float> policy({.budget = 4});
    KVCache<float> cache = make_cache(2, 5);
    CHECK(evict_once(policy, cache, example_rows()) == std::vector<Positions>{{0, 1, 3, 4}, {0, 1, 3, 4}});
  }
}

TEST_CASE("TOVA protect_newest and the newest token", "[tova]") {
  // The newest token (slot 3) receives the least attention: (.4, .3, .2, .1).
  // Budget 3 without protection keeps {0, 1, 2}, dropping the newest; with
  // protection it keeps slot 3 and the two best others, {0, 1, 3}.
  Tensor3 row(1, 1, 4);
  row.set_row(0, 0, {.4f, .3f, .2f, .1f});
  SECTION("unprotected") {
    TOVA<float> policy({.budget = 3});
    KVCache<float> cache = make_cache(1, 4);
    CHECK(evict_once(policy, cache, row) == std::vector<Positions>{{0, 1, 2}});
  }
  SECTION("protected") {
    TOVA<float> policy({.budget = 3, .protect_newest = true});
    KVCache<float> cache = make_cache(1, 4);
    CHECK(evict_once(policy, cache, row) == std::vector<Positions>{{0, 1, 3}});
  }
}

TEST_CASE("TOVA sinks are kept whatever their attention", "[tova]") {
  // Row (.05, .3, .3, .35), budget 3. Without sinks the top three are
  // {1, 2, 3}. With one sink, slot 0 stays and the two best of {1, 2, 3}
  // are slot 3 (.35) and, of the tie at .3, the later slot 2: {0, 2, 3}.
  Tensor3 row(1, 1, 4);
  row.set_row(0, 0, {.05f, .3f, .3f, .35f});
  SECTION("no sinks") {
    TOVA<float> policy({.budget = 3});
    KVCache<float> cache = make_cache(1, 4);
    CHECK(evict_once(policy, cache, row) == std::vector<Positions>{{1, 2, 3}});
  }
  SECTION("one sink") {
    TOVA<float> policy({.budget = 3, .sinks = 1});
    KVCache<float> cache = make_cache(1, 4);
    CHECK(evict_once(policy, cache, row) == std::vector<Positions>{{0, 2, 3}});
  }
}

TEST_CASE("TOVA prefill uses the last prompt row", "[tova]") {
  // Five prompt rows; only the last, (.1, .4, .05, .25, .2), decides.
  // Budget 3 keeps slots {1, 3, 4}, although the earlier rows favour slot 0.
  Tensor3 rows(1, 5, 5);
  rows.set_row(0, 0, {1});
  rows.set_row(0, 1, {.9f, .1f});
  rows.set_row(0, 2, {.8f, .1f, .1f});
  rows.set_row(0, 3, {.7f, .1f, .1f, .1f});
  rows.set_row(0, 4, {.1f, .4f, .05f, .25f, .2f});
  TOVA<float> policy({.budget = 3});
  KVCache<float> cache = make_cache(1, 5);
  KeepPlan plan;
  REQUIRE(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan));
  CHECK(kvevict_test::positions_of(cache, 0) == Positions{1, 3, 4});
}

TEST_CASE("TOVA scaling the rows keeps the same set", "[tova]") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  Tensor3 rows(6, 1, 17);
  for (float& x : rows.data) x = uniform(rng);
  Tensor3 scaled = rows;
  for (float& x : scaled.data) x *= 8.0f;
  const auto granularity = GENERATE(TOVAGranularity::layer, TOVAGranularity::head);
  TOVA<float> policy({.budget = 7, .granularity = granularity});
  const KVCache<float> cache = make_cache(3, 17);
  KeepPlan plan;
  KeepPlan scaled_plan;
  policy.select(cache, kvevict_test::attention_observation(rows), plan);
  policy.select(cache, kvevict_test::attention_observation(scaled), scaled_plan);
  CHECK(plan == scaled_plan);
}

TEST_CASE("TOVA random decode run", "[tova]") {
  // 6 query heads on 3 KV heads, budget 11, random rows each step. The kept
  // set must equal a full-sort oracle on the mean row. The newest token must
  // survive when protected, and layer mode must keep one set for all heads.
  const auto granularity = GENERATE(TOVAGranularity::layer, TOVAGranularity::head);
  const bool protect_newest = GENERATE(false, true);
  const std::int64_t slack = GENERATE(0, 3);
  constexpr int n_heads = 6;
  constexpr int n_kv_heads = 3;
  constexpr int groups = n_heads / n_kv_heads;
  constexpr std::int64_t budget = 11;
  constexpr std::int64_t sinks = 2;
  TOVA<float> policy({.budget = budget, .granularity = granularity, .sinks = sinks,
                      .protect_newest = protect_newest, .slack = slack});
  KVCache<float> cache({.n_kv_heads = n_kv_heads, .head_dim = 5});
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  KeepPlan plan;
  std::int64_t newest_dropped = 0;

  for (std::int64_t step = 0; step < 2000; ++step) {
    kvevict_test::append_random(cache, 1, step, rng);
    const std::int64_t n = cache.size();
    Tensor3 row(n_heads, 1, n);
    for (int q = 0; q < n_heads; ++q) {
      float total = 0.0f;
      for (std::int64_t t = 0; t < n; ++t) total += row.at(q, 0, t) = uniform(rng);
      for (std::int64_t t = 0; t < n; ++t) row.at(q, 0, t) /= total;
    }

    // Oracle scores per KV head: the mean over the query heads the
    // granularity names (all of them, or the head's group).
    std::vector<Positions> expected(n_kv_heads);
    for (int j = 0; j < n_kv_heads; ++j) {
      const int first = granularity == TOVAGranularity::layer ? 0 : j * groups;
      const int count = granularity == TOVAGranularity::layer ? n_heads : groups;
      std::vector<float> scores(static_cast<std::size_t>(n), 0.0f);
      for (int q = first; q < first + count; ++q) {
        for (std::int64_t t = 0; t < n; ++t) scores[static_cast<std::size_t>(t)] += row.at(q, 0, t);
      }
      for (float& score : scores) score /= static_cast<float>(count);
      const std::int64_t protected_tail = protect_newest ? 1 : 0;
      Positions ranked;
      for (std::int64_t t = sinks; t < n - protected_tail; ++t) ranked.push_back(t);
      std::ranges::sort(ranked, [&](std::int64_t a, std::int64_t b) {
        const float sa = scores[static_cast<std::size_t>(a)];
        const float sb = scores[static_cast<std::size_t>(b)];
        return sa > sb || (sa == sb && a > b);
      });
      ranked.resize(static_cast<std::size_t>(std::max<std::int64_t>(0, budget - sinks - protected_tail)));
      for (std::int64_t t = 0; t < sinks; ++t) ranked.push_back(t);
      if (protect_newest) ranked.push_back(n - 1);
      std::ranges::sort(ranked);
      expected[static_cast<std::size_t>(j)] = ranked;
    }

    const auto observation = kvevict_test::attention_observation(row);
    policy.observe(cache, observation);
    if (!policy.should_evict(cache, kvevict::Trigger::decode)) continue;
    REQUIRE(n == budget + slack + 1);
    policy.select(cache, observation, plan);
    for (int j = 0; j < n_kv_heads; ++j) {
      // The oracle computes the mean in the policy's float order, so the sets
      // match exactly, ties included.
      REQUIRE(kvevict_test::head_of(plan, j) == expected[static_cast<std::size_t>(j)]);
    }
    cache.keep(plan);
    REQUIRE(cache.size() == budget);
    for (int j = 0; j < n_kv_heads; ++j) {
      const auto positions = kvevict_test::positions_of(cache, j);
      REQUIRE(std::ranges::adjacent_find(positions, std::greater_equal<>()) == positions.end());
      REQUIRE(positions[0] == 0);
      REQUIRE(positions[1] == 1);
      if (granularity == TOVAGranularity::layer) REQUIRE(positions == kvevict_test::positions_of(cache, 0));
    }
    if (kvevict_test::positions_of(cache, 0).back() != step) ++newest_dropped;
  }
  if (protect_newest) {
    CHECK(newest_dropped == 0);
  } else {
    // With random rows the newest token is sometimes the least attended.
    CHECK(newest_dropped > 0);
  }
}

TEST_CASE("TOVA configuration validation", "[tova][validation]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(TOVA<float>({.budget = 0}), Contains("budget (0) must be at least 1"));
  CHECK_THROWS_WITH(TOVA<float>({.budget = 3, .sinks = 4}), Contains("budget (3) must be at least sinks"));
  CHECK_THROWS_WITH(TOVA<float>({.budget = 4, .sinks = 4, .protect_newest = true}),
                    Contains("budget (4) must be at least sinks + 1 (4 + 1)"));
  CHECK_THROWS_WITH(TOVA<float>({.budget = 4, .sinks = -1}), Contains("sinks (-1) must be non-negative"));
  CHECK_THROWS_WITH(TOVA<float>({.budget = 4, .slack = -2}), Contains("slack (-2) must be non-negative"));
  CHECK_NOTHROW(TOVA<float>({.budget = 4, .sinks = 4}));
  CHECK_NOTHROW(TOVA<float>({.budget = 1, .protect_newest = true}));
}

TEST_CASE("TOVA bad observations leave the cache unchanged", "[tova][validation]") {
  using Catch::Matchers::Contains;
  TOVA<float> policy({.budget = 4});
  KVCache<float> cache = make_cache(2, 6);
  const auto before = kvevict_test::cache_bytes(cache);
  KeepPlan plan;

  SECTION("heads not divisible by KV heads") {
    Tensor3 rows(3, 1, 6);
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("multiple of n_kv_heads (2)"));
  }
  SECTION("rows over the wrong number of slots") {
    Tensor3 rows(2, 1, 7);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("7 columns, the cache holds 6"));
  }
  SECTION("no rows") {
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, kvevict::Observation{}, plan),
                      Contains("no attention rows"));
  }
  SECTION("infinite value, even when no eviction follows") {
    TOVA<float> roomy({.budget = 10});
    Tensor3 rows(2, 1, 6);
    rows.at(1, 0, 2) = INFINITY;
    CHECK_THROWS_WITH(kvevict::observe_and_evict(roomy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("non-finite"));
  }
  CHECK(kvevict_test::cache_bytes(cache) == before);
}
