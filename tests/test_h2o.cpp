// H2O: hand-worked examples with dyadic numbers (exact in float), a long
// random decode run against a brute-force recomputation of the sums, and
// validation that leaves the cache unchanged.
#include <catch2/catch.hpp>

#include "policy_test_support.hpp"

#include <kvevict/policies/h2o.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace {

using kvevict::H2O;
using kvevict::H2OAggregation;
using kvevict::H2OConfig;
using kvevict::KeepPlan;
using kvevict::KVCache;
using kvevict::PositionMode;
using kvevict_test::Tensor3;

using Positions = std::vector<std::int64_t>;
using Floats = std::vector<float>;

template <class Scalar = float>
KVCache<Scalar> make_cache(int n_kv_heads, int channels, PositionMode mode = PositionMode::original) {
  return KVCache<Scalar>({.n_kv_heads = n_kv_heads, .head_dim = 4, .positions = mode, .state_channels = channels,
                          .capacity = 16});
}

// The causal prompt attention of the hand-worked examples, one head:
//   row 0: 1
//   row 1: .5   .5
//   row 2: .5   .25  .25
//   row 3: .5   .125 .125 .25
//   row 4: .25  .25  .125 .125 .25
//   row 5: .25  .125 .25  .125 .125 .125
// Column sums: acc = (3.0, 1.25, 0.75, 0.5, 0.375, 0.125).
Tensor3 prompt_rows() {
  Tensor3 rows(1, 6, 6);
  rows.set_row(0, 0, {1});
  rows.set_row(0, 1, {.5f, .5f});
  rows.set_row(0, 2, {.5f, .25f, .25f});
  rows.set_row(0, 3, {.5f, .125f, .125f, .25f});
  rows.set_row(0, 4, {.25f, .25f, .125f, .125f, .25f});
  rows.set_row(0, 5, {.25f, .125f, .25f, .125f, .125f, .125f});
  return rows;
}

// Runs the hand-worked prompt through prefill compression with budget 4 (heavy
// 2, recent 2 by default).
template <class Scalar>
void run_prompt(H2O<Scalar>& policy, KVCache<Scalar>& cache, KeepPlan& plan) {
  std::mt19937 rng(1);
  kvevict_test::append_random(cache, 6, 0, rng);
  const Tensor3 rows = prompt_rows();
  REQUIRE(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan));
}

}  // namespace

TEMPLATE_TEST_CASE("H2O prefill keeps heavy and recent", "[h2o]", float, Eigen::half, Eigen::bfloat16) {
  const auto mode = GENERATE(PositionMode::original, PositionMode::cache_relative);
  H2O<TestType> policy({.budget = 4});
  REQUIRE(policy.heavy() == 2);
  REQUIRE(policy.recent() == 2);
  KVCache<TestType> cache = make_cache<TestType>(1, policy.state_channels(), mode);
  std::mt19937 rng(1);
  kvevict_test::append_random(cache, 6, 0, rng);
  const Tensor3 rows = prompt_rows();
  const auto observation = kvevict_test::attention_observation(rows);

  policy.observe(cache, observation);
  CHECK(kvevict_test::state_of(cache, 0, 0) == Floats{3.0f, 1.25f, 0.75f, 0.5f, 0.375f, 0.125f});

  // Recent = slots {4, 5}; candidates 0..3 score (3.0, 1.25, 0.75, 0.5), so
  // the two heavy hitters are slots 0 and 1.
  REQUIRE(policy.should_evict(cache, kvevict::Trigger::prefill));
  KeepPlan plan;
  policy.select(cache, observation, plan);
  CHECK(kvevict_test::head_of(plan, 0) == Positions{0, 1, 4, 5});
  cache.keep(plan);
  CHECK(kvevict_test::positions_of(cache, 0) == Positions{0, 1, 4, 5});
  // The kept tokens keep their sums.
  CHECK(kvevict_test::state_of(cache, 0, 0) == Floats{3.0f, 1.25f, 0.375f, 0.125f});
}

TEST_CASE("H2O prefill through compress_prefill", "[h2o]") {
  H2O<float> policy({.budget = 4});
  KVCache<float> cache = make_cache(1, policy.state_channels());
  KeepPlan plan;
  run_prompt(policy, cache, plan);
  CHECK(kvevict_test::positions_of(cache, 0) == Positions{0, 1, 4, 5});
  CHECK(kvevict_test::state_of(cache, 0, 0) == Floats{3.0f, 1.25f, 0.375f, 0.125f});
}

TEST_CASE("H2O decode evicts lightest candidate", "[h2o]") {
  H2O<float> policy({.budget = 4});
  KVCache<float> cache = make_cache(1, policy.state_channels());
  KeepPlan plan;
  run_prompt(policy, cache, plan);

  // The token at position 6 attends over positions (0, 1, 4, 5, 6) with
  // (.25, .125, .125, .25, .25): acc = (3.25, 1.375, 0.5, 0.375, 0.25).
  // Recent = positions {5, 6}; candidates {0, 1, 4} score (3.25, 1.375, 0.5),
  // so position 4 leaves: positions {0, 1, 5, 6}.
  std::mt19937 rng(2);
  kvevict_test::append_random(cache, 1, 6, rng);
  Tensor3 row(1, 1, 5);
  row.set_row(0, 0, {.25f, .125f, .125f, .25f, .25f});
  REQUIRE(kvevict::observe_and_evict(policy, cache, kvevict_test::attention_observation(row), plan));
  CHECK(kvevict_test::positions_of(cache, 0) == Positions{0, 1, 5, 6});
  CHECK(kvevict_test::state_of(cache, 0, 0) == Floats{3.25f, 1.375f, 0.375f, 0.25f});
}

TEST_CASE("H2O tie keeps later token", "[h2o]") {
  H2O<float> policy({.budget = 4});
  KVCache<float> cache = make_cache(1, policy.state_channels());
  KeepPlan plan;
  run_prompt(policy, cache, plan);

  // The token at position 6 attends with (.0625, 0, .875, .0625, 0):
  // acc = (3.0625, 1.25, 1.25, 0.1875, 0). Candidates are positions {0, 1, 4};
  // positions 1 and 4 tie at 1.25 for the second heavy slot and the later
  // one wins: positions {0, 4, 5, 6}.
  std::mt19937 rng(3);
  kvevict_test::append_random(cache, 1, 6, rng);
  Tensor3 row(1, 1, 5);
  row.set_row(0, 0, {.0625f, 0.0f, .875f, .0625f, 0.0f});
  REQUIRE(kvevict::observe_and_evict(policy, cache, kvevict_test::attention_observation(row), plan));
  CHECK(kvevict_test::positions_of(cache, 0) == Positions{0, 4, 5, 6});
  CHECK(kvevict_test::state_of(cache, 0, 0) == Floats{3.0625f, 1.25f, 0.1875f, 0.0f});
}

TEST_CASE("H2O sums all rows, not only the last ones", "[h2o]") {
  // Six prompt tokens, budget 3 split as heavy 1 and recent 2: candidates are
  // slots 0..3. Column sums over all rows: (1.75, 2.25, 0.5, 1.125, ...), so
  // slot 1 is the heavy hitter. The last two rows alone would favour slot 3
  // (0.875 against 0.25), which is what a window scorer reused under the name
  // H2O would keep.
  Tensor3 rows(1, 6, 6);
  rows.set_row(0, 0, {1});
  rows.set_row(0, 1, {.25f, .75f});
  rows.set_row(0, 2, {.125f, .75f, .125f});
  rows.set_row(0, 3, {.125f, .5f, .125f, .25f});
  rows.set_row(0, 4, {.125f, .125f, .125f, .5f, .125f});
  rows.set_row(0, 5, {.125f, .125f, .125f, .375f, .125f, .125f});

  H2O<float> policy({.budget = 3, .heavy = 1});
  KVCache<float> cache = make_cache(1, policy.state_channels());
  std::mt19937 rng(4);
  kvevict_test::append_random(cache, 6, 0, rng);
  KeepPlan plan;
  REQUIRE(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan));
  CHECK(kvevict_test::positions_of(cache, 0) == Positions{1, 4, 5});
}

TEST_CASE("H2O normalize_by_count ranks by mean attention", "[h2o]") {
  // The hand-worked prompt with heavy 3, recent 1: candidates are slots 0..4.
  // Raw acc (3.0, 1.25, 0.75, 0.5, 0.375) keeps {0, 1, 2}.
  // Rows that see slot t: cnt = (6, 5, 4, 3, 2, 1), so acc / cnt =
  // (0.5, 0.25, 0.1875, 0.1667, 0.1875, 0.125); slots 2 and 4 tie at 0.1875
  // for the third place and the later one wins: {0, 1, 4}.
  const bool normalize = GENERATE(false, true);
  H2O<float> policy({.budget = 4, .heavy = 3, .normalize_by_count = normalize});
  REQUIRE(policy.state_channels() == (normalize ? 2 : 1));
  KVCache<float> cache = make_cache(1, policy.state_channels());
  std::mt19937 rng(5);
  kvevict_test::append_random(cache, 6, 0, rng);
  const Tensor3 rows = prompt_rows();
  KeepPlan plan;
  REQUIRE(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan));
  if (normalize) {
    CHECK(kvevict_test::positions_of(cache, 0) == Positions{0, 1, 4, 5});
    CHECK(kvevict_test::state_of(cache, 0, H2O<float>::count_channel) == Floats{6, 5, 2, 1});
  } else {
    CHECK(kvevict_test::positions_of(cache, 0) == Positions{0, 1, 2, 5});
  }
}

TEST_CASE("H2O group aggregation mean, sum and max", "[h2o]") {
  // Two query heads share one KV head; one decode row each over 4 slots.
  // Head 0: (.5, .25, .125, .125); head 1: (.125, .5, .25, .125).
  // mean: (.3125, .375, .1875, .125); sum: (.625, .75, .375, .25);
  // max: (.5, .5, .25, .125).
  Tensor3 row(2, 1, 4);
  row.set_row(0, 0, {.5f, .25f, .125f, .125f});
  row.set_row(1, 0, {.125f, .5f, .25f, .125f});
  const auto [aggregation, expected] = GENERATE(table<H2OAggregation, Floats>({
      {H2OAggregation::mean, {.3125f, .375f, .1875f, .125f}},
      {H2OAggregation::sum, {.625f, .75f, .375f, .25f}},
      {H2OAggregation::max, {.5f, .5f, .25f, .125f}},
  }));
  H2O<float> policy({.budget = 8, .gqa_aggregation = aggregation});
  KVCache<float> cache = make_cache(1, policy.state_channels());
  std::mt19937 rng(6);
  kvevict_test::append_random(cache, 4, 0, rng);
  policy.observe(cache, kvevict_test::attention_observation(row));
  CHECK(kvevict_test::state_of(cache, 0, 0) == expected);
}

TEST_CASE("H2O equal sums keep the most recent candidates", "[h2o]") {
  // 10 slots with equal acc, budget 6 = heavy 3 + recent 3: the three latest
  // candidates (slots 4, 5, 6) win every tie, so the last 6 slots stay.
  H2O<float> policy({.budget = 6});
  KVCache<float> cache = make_cache(2, policy.state_channels());
  std::mt19937 rng(7);
  kvevict_test::append_random(cache, 10, 0, rng);
  for (int j = 0; j < 2; ++j) std::ranges::fill(cache.state(j, 0), 0.5f);
  KeepPlan plan;
  policy.select(cache, {}, plan);
  for (int j = 0; j < 2; ++j) CHECK(kvevict_test::head_of(plan, j) == Positions{4, 5, 6, 7, 8, 9});
}

TEST_CASE("H2O scaling all rows keeps the same set", "[h2o]") {
  // Multiplying every score by a positive constant changes no ranking.
  std::mt19937 rng(8);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  Tensor3 rows(4, 3, 11);
  for (float& x : rows.data) x = uniform(rng);
  Tensor3 scaled = rows;
  for (float& x : scaled.data) x *= 4.0f;

  KeepPlan plan;
  KeepPlan scaled_plan;
  H2O<float> policy({.budget = 5});
  KVCache<float> cache = make_cache(2, policy.state_channels());
  kvevict_test::append_random(cache, 11, 0, rng);
  KVCache<float> scaled_cache = cache;
  policy.observe(cache, kvevict_test::attention_observation(rows));
  policy.select(cache, {}, plan);
  policy.observe(scaled_cache, kvevict_test::attention_observation(scaled));
  policy.select(scaled_cache, {}, scaled_plan);
  CHECK(plan == scaled_plan);
}

namespace {

struct DecodeRun {
  H2OAggregation aggregation = H2OAggregation::mean;
  bool normalize = false;
  std::int64_t steps = 0;
  std::int64_t max_chunk = 1;
};

// Brute-force state of one KV head, indexed by token position.
struct TokenSums {
  std::vector<double> acc;
  std::vector<double> count;
};

}  // namespace

TEST_CASE("H2O long random decode run", "[h2o]") {
  // n_heads 9 on 3 KV heads (groups of 3), budget 13 = heavy 6 + recent 7,
  // slack 2. Every step appends 1 (or up to 3) tokens and attends with random
  // causal rows; tokens have a fixed random salience so some stay heavy.
  const DecodeRun run = GENERATE(DecodeRun{H2OAggregation::mean, false, 10000, 1},
                                 DecodeRun{H2OAggregation::sum, false, 2000, 1},
                                 DecodeRun{H2OAggregation::max, false, 2000, 1},
                                 DecodeRun{H2OAggregation::mean, true, 2000, 3});
  const int aggregation_id = static_cast<int>(run.aggregation);
  CAPTURE(aggregation_id, run.normalize, run.max_chunk);
  constexpr int n_heads = 9;
  constexpr int n_kv_heads = 3;
  constexpr int groups = n_heads / n_kv_heads;
  constexpr std::int64_t budget = 13;
  constexpr std::int64_t slack = 2;
  H2O<float> policy({.budget = budget, .gqa_aggregation = run.aggregation, .normalize_by_count = run.normalize,
                     .slack = slack});
  const std::int64_t recent = policy.recent();
  const std::int64_t heavy = policy.heavy();
  KVCache<float> cache({.n_kv_heads = n_kv_heads, .head_dim = 3, .state_channels = policy.state_channels()});

  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<std::int64_t> chunk_size(1, run.max_chunk);
  const std::int64_t max_tokens = run.steps * run.max_chunk;
  std::vector<float> salience(static_cast<std::size_t>(max_tokens));
  for (float& s : salience) s = 1.5f * normal(rng);
  std::vector<TokenSums> truth(n_kv_heads, {std::vector<double>(static_cast<std::size_t>(max_tokens), 0.0),
                                            std::vector<double>(static_cast<std::size_t>(max_tokens), 0.0)});
  std::vector<std::vector<float>> acc_before(n_kv_heads);
  KeepPlan plan;
  std::int64_t next_position = 0;
  std::int64_t evictions = 0;

  for (std::int64_t step = 0; step < run.steps; ++step) {
    const std::int64_t chunk = chunk_size(rng);
    kvevict_test::append_random(cache, chunk, next_position, rng);
    next_position += chunk;
    const std::int64_t n = cache.size();

    // Causal rows: row i is the query of slot n - chunk + i and sees slots
    // 0 .. n - chunk + i, with weights exp(salience + noise), normalised.
    Tensor3 rows(n_heads, chunk, n);
    for (int q = 0; q < n_heads; ++q) {
      const auto positions = cache.positions(q / groups);
      for (std::int64_t i = 0; i < chunk; ++i) {
        const std::int64_t visible = n - chunk + i + 1;
        float total = 0.0f;
        for (std::int64_t t = 0; t < visible; ++t) {
          const float weight =
              std::exp(salience[static_cast<std::size_t>(positions[static_cast<std::size_t>(t)])] + normal(rng));
          rows.at(q, i, t) = weight;
          total += weight;
        }
        for (std::int64_t t = 0; t < visible; ++t) rows.at(q, i, t) /= total;
      }
    }

    // Brute force: per KV head and token, sum each query head's rows of this
    // pass and aggregate the sums over the group. Count the rows that see
    // the token.
    for (int j = 0; j < n_kv_heads; ++j) {
      const auto positions = cache.positions(j);
      for (std::int64_t t = 0; t < n; ++t) {
        double aggregate = 0.0;
        for (int member = 0; member < groups; ++member) {
          double column = 0.0;
          for (std::int64_t i = 0; i < chunk; ++i) column += rows.at(j * groups + member, i, t);
          if (run.aggregation == H2OAggregation::max) {
            aggregate = member == 0 ? column : std::max(aggregate, column);
          } else {
            aggregate += column;
          }
        }
        if (run.aggregation == H2OAggregation::mean) aggregate /= groups;
        auto& sums = truth[static_cast<std::size_t>(j)];
        const auto position = static_cast<std::size_t>(positions[static_cast<std::size_t>(t)]);
        sums.acc[position] += aggregate;
        sums.count[position] += static_cast<double>(std::min(chunk, n - t));
      }
    }

    // The steps of observe_and_evict, with the ranking input recorded between
    // observe and select.
    const auto observation = kvevict_test::attention_observation(rows);
    policy.observe(cache, observation);
    for (int j = 0; j < n_kv_heads; ++j) {
      auto& scores = acc_before[static_cast<std::size_t>(j)];
      scores = kvevict_test::state_of(cache, j, 0);
      if (run.normalize) {
        const auto count = kvevict_test::state_of(cache, j, 1);
        for (std::size_t t = 0; t < scores.size(); ++t) scores[t] /= count[t];
      }
    }
    const bool evict = policy.should_evict(cache, kvevict::Trigger::decode);
    REQUIRE(evict == (n > budget + slack));
    if (evict) {
      policy.select(cache, observation, plan);
      // Oracle: rank the candidates [0, n - recent) by (score, slot) with a
      // full sort, take `heavy`, add the recent slots.
      for (int j = 0; j < n_kv_heads; ++j) {
        const auto& scores = acc_before[static_cast<std::size_t>(j)];
        std::vector<std::int64_t> candidates(static_cast<std::size_t>(n - recent));
        for (std::int64_t t = 0; t < n - recent; ++t) candidates[static_cast<std::size_t>(t)] = t;
        std::ranges::sort(candidates, [&](std::int64_t a, std::int64_t b) {
          const float sa = scores[static_cast<std::size_t>(a)];
          const float sb = scores[static_cast<std::size_t>(b)];
          return sa > sb || (sa == sb && a > b);
        });
        Positions expected(candidates.begin(), candidates.begin() + heavy);
        for (std::int64_t t = n - recent; t < n; ++t) expected.push_back(t);
        std::ranges::sort(expected);
        REQUIRE(kvevict_test::head_of(plan, j) == expected);
      }
      cache.keep(plan);
      ++evictions;
      REQUIRE(cache.size() == budget);
    }

    REQUIRE(cache.size() <= budget + slack);
    for (int j = 0; j < n_kv_heads; ++j) {
      const auto positions = kvevict_test::positions_of(cache, j);
      REQUIRE(std::ranges::adjacent_find(positions, std::greater_equal<>()) == positions.end());
      // The last `recent` tokens are the last `recent` slots, the newest last.
      const std::int64_t tail = std::min<std::int64_t>(recent, cache.size());
      for (std::int64_t k = 1; k <= tail; ++k) {
        REQUIRE(positions[static_cast<std::size_t>(cache.size() - k)] == next_position - k);
      }
      // Every kept token's sums equal the brute-force sums of the rows it saw.
      const auto acc = kvevict_test::state_of(cache, j, 0);
      const auto& sums = truth[static_cast<std::size_t>(j)];
      for (std::size_t s = 0; s < positions.size(); ++s) {
        const double expected = sums.acc[static_cast<std::size_t>(positions[s])];
        // A float sum of up to 10,000 positive terms has relative error below
        // 10,000 * 2^-24 = 6e-4.
        REQUIRE(std::abs(acc[s] - expected) <= 1e-3 * expected + 1e-6);
        if (run.normalize) {
          REQUIRE(cache.state(j, 1)[s] == static_cast<float>(sums.count[static_cast<std::size_t>(positions[s])]));
        }
      }
    }
  }
  // Single-token steps first compact at size budget + slack + 1 = 16, then
  // every slack + 1 = 3 steps.
  if (run.max_chunk == 1) {
    CHECK(evictions == (run.steps - (budget + slack + 1)) / (slack + 1) + 1);
  } else {
    CHECK(evictions > 0);
  }
}

TEST_CASE("H2O budget and split validation", "[h2o][validation]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(H2O<float>({.budget = 0}), Contains("budget (0) must be at least 1"));
  CHECK_THROWS_WITH(H2O<float>({.budget = -3}), Contains("budget (-3)"));
  CHECK_THROWS_WITH(H2O<float>({.budget = 5, .heavy = 2, .recent = 2}),
                    Contains("budget (5) must equal heavy + recent (2 + 2)"));
  CHECK_THROWS_WITH(H2O<float>({.budget = 4, .recent = 0}), Contains("recent (0) must be at least 1"));
  CHECK_THROWS_WITH(H2O<float>({.budget = 4, .heavy = 4}), Contains("heavy (4) must be below budget (4)"));
  CHECK_THROWS_WITH(H2O<float>({.budget = 4, .recent = 5}), Contains("recent (5) must be at most budget (4)"));
  CHECK_THROWS_WITH(H2O<float>({.budget = 4, .heavy = -1}), Contains("heavy (-1) must be non-negative"));
  CHECK_THROWS_WITH(H2O<float>({.budget = 4, .slack = -1}), Contains("slack (-1) must be non-negative"));

  const H2O<float> split({.heavy = 3, .recent = 2});
  CHECK(split.budget() == 5);
  const H2O<float> odd({.budget = 13});
  CHECK(odd.heavy() == 6);
  CHECK(odd.recent() == 7);
  const H2O<float> one({.budget = 1});
  CHECK(one.heavy() == 0);
  CHECK(one.recent() == 1);
  const H2O<float> recent_only({.budget = 10, .recent = 8});
  CHECK(recent_only.heavy() == 2);
}

TEST_CASE("H2O bad observations leave the cache unchanged", "[h2o][validation]") {
  using Catch::Matchers::Contains;
  H2O<float> policy({.budget = 4, .normalize_by_count = true});
  KVCache<float> cache = make_cache(2, policy.state_channels());
  std::mt19937 rng(9);
  kvevict_test::append_random(cache, 6, 0, rng);
  KeepPlan plan;
  Tensor3 good(4, 1, 6);
  std::ranges::fill(good.data, 1.0f / 6.0f);
  policy.observe(cache, kvevict_test::attention_observation(good));
  const auto before = kvevict_test::cache_bytes(cache);

  SECTION("heads not divisible by KV heads") {
    Tensor3 rows(3, 1, 6);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("multiple of n_kv_heads (2)"));
  }
  SECTION("observation n_heads differs from the rows") {
    auto observation = kvevict_test::attention_observation(good);
    observation.n_heads = 2;
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, observation, plan), Contains("4 heads"));
  }
  SECTION("rows over the wrong number of slots") {
    Tensor3 rows(4, 1, 5);
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("5 columns, the cache holds 6"));
  }
  SECTION("more rows than cached slots") {
    Tensor3 rows(4, 7, 6);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("7 rows for 6 cached slots"));
  }
  SECTION("no rows") {
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, kvevict::Observation{}, plan),
                      Contains("no attention rows"));
  }
  SECTION("non-finite value") {
    Tensor3 rows = good;
    rows.at(3, 0, 5) = std::nanf("");
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::attention_observation(rows), plan),
                      Contains("non-finite"));
  }
  SECTION("cache without the count channel") {
    KVCache<float> small = make_cache(2, 1);
    kvevict_test::append_random(small, 6, 0, rng);
    const auto small_before = kvevict_test::cache_bytes(small);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, small, kvevict_test::attention_observation(good), plan),
                      Contains("the policy needs 2"));
    CHECK(kvevict_test::cache_bytes(small) == small_before);
  }
  CHECK(kvevict_test::cache_bytes(cache) == before);
}
