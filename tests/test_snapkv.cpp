// SnapKV tests. The hand-worked examples run through the real policy. A
// brute-force oracle in double checks random GQA data in both position
// modes. Further cases: the equivalence with TOVA for a one-query window,
// decode-time re-scoring with a QueryWindow, and validation that leaves the
// cache unchanged.
#include <catch2/catch.hpp>

#include "policy_test_support.hpp"

#include <kvevict/policies/snapkv.hpp>
#include <kvevict/policies/tova.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using kvevict::KeepPlan;
using kvevict::KVCache;
using kvevict::PositionMode;
using kvevict::SnapKV;
using kvevict::SnapKVAggregation;
using kvevict::SnapKVConfig;
using kvevict::SnapKVPooling;
using kvevict::RowMatrixXf;
using kvevict_test::Tensor3;

using Positions = std::vector<std::int64_t>;

const float l3 = std::log(3.0f);

// Appends `keys` [count x d] (and `values`) at positions 0..count-1, the same
// on every KV head.
template <class Scalar>
void append_shared(KVCache<Scalar>& cache, const RowMatrixXf& keys, const RowMatrixXf& values) {
  const std::int64_t count = keys.rows();
  const int heads = cache.n_kv_heads();
  RowMatrixXf all_keys(heads * count, keys.cols());
  RowMatrixXf all_values(heads * count, values.cols());
  for (int j = 0; j < heads; ++j) {
    all_keys.middleRows(j * count, count) = keys;
    all_values.middleRows(j * count, count) = values;
  }
  std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
  for (std::int64_t t = 0; t < count; ++t) positions[static_cast<std::size_t>(t)] = t;
  cache.append(all_keys, all_values, positions);
}

// The common data of the hand-worked examples: n = 8, d = 2, keys and values
//   slot t :   0      1      2      3      4      5      6      7
//   K[t]   :  (0,0)  (1,0)  (0,1)  (0,0)  (1,0)  (0,0)  (0,0)  (0,0)
//   V[t]   :  (1,0)  (1,0)  (0,1)  (0,0)  (3,0)  (0,0)  (0,0)  (0,0)
// in original mode (the keys are used as stored), on `n_kv_heads` identical
// KV heads.
template <class Scalar = float>
KVCache<Scalar> make_example_cache(int n_kv_heads = 1) {
  KVCache<Scalar> cache({.n_kv_heads = n_kv_heads, .head_dim = 2, .capacity = 8});
  RowMatrixXf keys(8, 2);
  keys << 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0;
  RowMatrixXf values(8, 2);
  values << 1, 0, 1, 0, 0, 1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0;
  append_shared(cache, keys, values);
  return cache;
}

// Window queries of the examples: Q[0] = (ln 3, 0) for slot 6 and
// Q[1] = (0, ln 3) for slot 7, on each of `n_heads` query heads.
Tensor3 example_queries(int n_heads = 1) {
  Tensor3 queries(n_heads, 2, 2);
  for (int q = 0; q < n_heads; ++q) {
    queries.set_row(q, 0, {l3, 0.0f});
    queries.set_row(q, 1, {0.0f, l3});
  }
  return queries;
}

// Runs prefill compression and returns the kept positions of every KV head.
template <class Scalar>
std::vector<Positions> compress(const SnapKVConfig& config, KVCache<Scalar>& cache, const Tensor3& queries) {
  SnapKV<Scalar> policy(config);
  KeepPlan plan;
  REQUIRE(kvevict::compress_prefill(policy, cache, kvevict_test::query_observation(queries), plan));
  std::vector<Positions> kept;
  for (int j = 0; j < cache.n_kv_heads(); ++j) kept.push_back(kvevict_test::positions_of(cache, j));
  return kept;
}

// Window attention of the examples (scale 1): logits are ln 3 or 0, so the
// weights are 3 or 1 over their sum:
//   A[0] = (1, 3, 1, 1, 3, 1, 1, 0) / 11   (slot 6 sees slots 0..6)
//   A[1] = (1, 1, 3, 1, 1, 1, 1, 1) / 10   (slot 7 sees slots 0..7)
// Votes on the past slots 0..5, A[0] + A[1]: (21, 41, 43, 21, 41, 21) / 110.

}  // namespace

TEMPLATE_TEST_CASE("SnapKV votes without pooling", "[snapkv]", float, Eigen::half, Eigen::bfloat16) {
  // Budget 5 keeps 3 past slots: 43 (slot 2) and both 41s (slots 1 and 4),
  // plus the window {6, 7}.
  // Budget 4 keeps 2 past slots: 43 (slot 2), then slots 1 and 4 tie at 41
  // and the later one wins: {2, 4, 6, 7}.
  const auto [budget, expected] = GENERATE(table<std::int64_t, Positions>({
      {5, {1, 2, 4, 6, 7}},
      {4, {2, 4, 6, 7}},
  }));
  KVCache<TestType> cache = make_example_cache<TestType>();
  const SnapKVConfig config{.budget = budget, .window = 2, .pooling = SnapKVPooling::none, .scale = 1.0f};
  CHECK(compress(config, cache, example_queries()) == std::vector<Positions>{expected});
}

TEST_CASE("SnapKV average pooling", "[snapkv]") {
  // Average pooling, kernel 3, zero padding, divisor 3 (units of 1/110):
  //   (0 + 21 + 41) / 3 = 62/3,  (21 + 41 + 43) / 3 = 35,  (41 + 43 + 21) / 3 = 35,
  //   (43 + 21 + 41) / 3 = 35,   (21 + 41 + 21) / 3 = 83/3, (41 + 21 + 0) / 3 = 62/3.
  // Budget 5 keeps the three 35s (slots 1, 2, 3) and the window.
  KVCache<float> cache = make_example_cache();
  const SnapKVConfig config{.budget = 5, .window = 2, .kernel_size = 3, .pooling = SnapKVPooling::avg,
                            .scale = 1.0f};
  CHECK(compress(config, cache, example_queries()) == std::vector<Positions>{{1, 2, 3, 6, 7}});
}

TEST_CASE("SnapKV max pooling", "[snapkv]") {
  // Max pooling, kernel 3, outside ignored: (41, 43, 43, 43, 41, 41) / 110.
  // Budget 5 keeps the three 43s (slots 1, 2, 3) and the window.
  KVCache<float> cache = make_example_cache();
  const SnapKVConfig config{.budget = 5, .window = 2, .kernel_size = 3, .pooling = SnapKVPooling::max,
                            .scale = 1.0f};
  CHECK(compress(config, cache, example_queries()) == std::vector<Positions>{{1, 2, 3, 6, 7}});
}

namespace {

// Five slots with one-hot keys e_0..e_4 (d = 5, scale 1), so a query's
// logits are its own coordinates; w = 1 (the query of slot 4), no pooling.
// Each query head's coordinates are the logs of the weights it should give,
// with -30 standing for "almost 0" (exp(-30) is about 1e-13).
KVCache<float> make_one_hot_cache(int n_kv_heads) {
  KVCache<float> cache({.n_kv_heads = n_kv_heads, .head_dim = 5});
  const RowMatrixXf keys = RowMatrixXf::Identity(5, 5);
  append_shared(cache, keys, keys);
  return cache;
}

std::vector<float> log_weights(const std::vector<float>& weights) {
  std::vector<float> logits;
  for (const float weight : weights) logits.push_back(weight > 0.0f ? std::log(weight) : -30.0f);
  return logits;
}

}  // namespace

TEST_CASE("SnapKV group aggregation", "[snapkv]") {
  // Two query heads in one group, 4 past slots, budget 3 (2 past kept).
  // Head a gives (4, 0, 1, 0) to the past and 1 to itself, head b
  // (0, 3, 1, 0) and 2 to itself; both rows sum to 6, so the votes are
  // (4, 0, 1, 0)/6 and (0, 3, 1, 0)/6.
  //   mean (2, 1.5, 1, 0)/6 keeps {0, 1};  max (4, 3, 1, 0)/6 keeps {0, 1}.
  // With the window slot 4 the kept set is {0, 1, 4}.
  Tensor3 queries(2, 1, 5);
  queries.set_row(0, 0, log_weights({4, 0, 1, 0, 1}));
  queries.set_row(1, 0, log_weights({0, 3, 1, 0, 2}));
  const auto aggregation = GENERATE(SnapKVAggregation::mean, SnapKVAggregation::max);
  const SnapKVConfig config{.budget = 3, .window = 1, .pooling = SnapKVPooling::none,
                            .gqa_aggregation = aggregation, .scale = 1.0f};

  SECTION("one KV head") {
    KVCache<float> cache = make_one_hot_cache(1);
    CHECK(compress(config, cache, queries) == std::vector<Positions>{{0, 1, 4}});
  }
  SECTION("expand, as one KV head per query head") {
    // The reference's per-query-head sets: the KV head repeated once per query
    // head (g = 1). Head a keeps {0, 2}, head b keeps {1, 2}, each with slot 4.
    KVCache<float> cache = make_one_hot_cache(2);
    CHECK(compress(config, cache, queries) == std::vector<Positions>{{0, 2, 4}, {1, 2, 4}});
  }
}

TEST_CASE("SnapKV mean and max aggregation differ", "[snapkv]") {
  // Head a gives (3, 2, 0, 0) to the past and 1 to itself, head b
  // (0, 2, 0, 2.5) and 1.5 to itself; both rows sum to 6.
  //   mean (1.5, 2, 0, 1.25)/6 keeps {0, 1};  max (3, 2, 0, 2.5)/6 keeps {0, 3}.
  Tensor3 queries(2, 1, 5);
  queries.set_row(0, 0, log_weights({3, 2, 0, 0, 1}));
  queries.set_row(1, 0, log_weights({0, 2, 0, 2.5f, 1.5f}));
  const auto [aggregation, expected] = GENERATE(table<SnapKVAggregation, Positions>({
      {SnapKVAggregation::mean, {0, 1, 4}},
      {SnapKVAggregation::max, {0, 3, 4}},
  }));
  KVCache<float> cache = make_one_hot_cache(1);
  const SnapKVConfig config{.budget = 3, .window = 1, .pooling = SnapKVPooling::none,
                            .gqa_aggregation = aggregation, .scale = 1.0f};
  CHECK(compress(config, cache, queries) == std::vector<Positions>{expected});
}

TEST_CASE("SnapKV uniform attention", "[snapkv]") {
  // Zero queries give uniform rows: slot 6's query gives 1/7 to slots 0..6,
  // slot 7's gives 1/8 to slots 0..7, so every past vote is 1/7 + 1/8 =
  // 15/56. Average pooling with kernel 3 damps the two ends to (2/3) * 15/56
  // and leaves slots 1..4 tied at 15/56; budget 5 keeps the three latest of
  // them: {2, 3, 4} and the window {6, 7}.
  KVCache<float> cache = make_example_cache();
  const Tensor3 queries(1, 2, 2);
  const SnapKVConfig config{.budget = 5, .window = 2, .kernel_size = 3, .pooling = SnapKVPooling::avg,
                            .scale = 1.0f};
  CHECK(compress(config, cache, queries) == std::vector<Positions>{{2, 3, 4, 6, 7}});
}

TEST_CASE("SnapKV identical heads keep identical sets", "[snapkv]") {
  // The example data on two identical KV heads, one query head each.
  KVCache<float> cache = make_example_cache(2);
  const SnapKVConfig config{.budget = 5, .window = 2, .pooling = SnapKVPooling::none, .scale = 1.0f};
  CHECK(compress(config, cache, example_queries(2)) == std::vector<Positions>{{1, 2, 4, 6, 7}, {1, 2, 4, 6, 7}});
}

TEST_CASE("SnapKV budget equal to the window keeps only the window", "[snapkv]") {
  KVCache<float> cache = make_example_cache();
  const SnapKVConfig config{.budget = 2, .window = 2, .scale = 1.0f};
  CHECK(compress(config, cache, example_queries()) == std::vector<Positions>{{6, 7}});
}

namespace {

// Rotates `x` by RoPE at `position` with adjacent pairs and base 10000, in
// double (the default RopeConfig).
void rotate(std::vector<double>& x, double position) {
  const auto d = static_cast<double>(x.size());
  for (std::size_t k = 0; 2 * k < x.size(); ++k) {
    const double angle = position * std::pow(10000.0, -2.0 * static_cast<double>(k) / d);
    const double a = x[2 * k];
    const double b = x[2 * k + 1];
    x[2 * k] = a * std::cos(angle) - b * std::sin(angle);
    x[2 * k + 1] = a * std::sin(angle) + b * std::cos(angle);
  }
}

// SnapKV computed from its definition in double: window attention with the
// position mask, votes, pooling, group aggregation, and a full sort by
// (score, slot).
std::vector<Positions> brute_force_snapkv(const KVCache<float>& cache, const Tensor3& queries,
                                          const SnapKVConfig& config, double scale) {
  const std::int64_t n = cache.size();
  const std::int64_t w = config.window;
  const std::int64_t past = n - w;
  const int d = cache.head_dim();
  const int groups = static_cast<int>(queries.d0) / cache.n_kv_heads();
  const bool relative = cache.position_mode() == PositionMode::cache_relative;
  std::vector<Positions> kept;
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    std::vector<std::vector<double>> keys(static_cast<std::size_t>(n));
    std::vector<std::int64_t> key_positions(static_cast<std::size_t>(n));
    for (std::int64_t t = 0; t < n; ++t) {
      auto& key = keys[static_cast<std::size_t>(t)];
      for (int k = 0; k < d; ++k) key.push_back(cache.keys(j)(t, k));
      if (relative) rotate(key, static_cast<double>(t));
      key_positions[static_cast<std::size_t>(t)] = relative ? t : cache.positions(j)[static_cast<std::size_t>(t)];
    }

    std::vector<double> score(static_cast<std::size_t>(past), 0.0);
    for (int member = 0; member < groups; ++member) {
      std::vector<double> vote(static_cast<std::size_t>(past), 0.0);
      for (std::int64_t i = 0; i < w; ++i) {
        const std::int64_t slot = n - w + i;
        std::vector<double> query;
        for (int k = 0; k < d; ++k) query.push_back(queries.at(j * groups + member, queries.d1 - w + i, k));
        if (relative) rotate(query, static_cast<double>(slot));
        const std::int64_t query_position = key_positions[static_cast<std::size_t>(slot)];
        std::vector<double> logits;
        for (std::int64_t t = 0; t < n && key_positions[static_cast<std::size_t>(t)] <= query_position; ++t) {
          double dot = 0.0;
          for (int k = 0; k < d; ++k) dot += query[static_cast<std::size_t>(k)] * keys[static_cast<std::size_t>(t)][static_cast<std::size_t>(k)];
          logits.push_back(scale * dot);
        }
        const double top = *std::ranges::max_element(logits);
        double total = 0.0;
        for (const double z : logits) total += std::exp(z - top);
        for (std::int64_t t = 0; t < past; ++t) vote[static_cast<std::size_t>(t)] += std::exp(logits[static_cast<std::size_t>(t)] - top) / total;
      }

      std::vector<double> pooled = vote;
      const std::int64_t half = config.kernel_size / 2;
      for (std::int64_t t = 0; t < past && config.pooling != SnapKVPooling::none; ++t) {
        double sum = 0.0;
        double top = -1.0;
        for (std::int64_t u = std::max<std::int64_t>(0, t - half); u <= std::min(past - 1, t + half); ++u) {
          sum += vote[static_cast<std::size_t>(u)];
          top = std::max(top, vote[static_cast<std::size_t>(u)]);
        }
        pooled[static_cast<std::size_t>(t)] =
            config.pooling == SnapKVPooling::avg ? sum / static_cast<double>(config.kernel_size) : top;
      }
      for (std::int64_t t = 0; t < past; ++t) {
        auto& s = score[static_cast<std::size_t>(t)];
        const double p = pooled[static_cast<std::size_t>(t)];
        s = config.gqa_aggregation == SnapKVAggregation::max ? (member == 0 ? p : std::max(s, p)) : s + p / groups;
      }
    }

    Positions ranked;
    for (std::int64_t t = 0; t < past; ++t) ranked.push_back(t);
    std::ranges::sort(ranked, [&](std::int64_t a, std::int64_t b) {
      const double sa = score[static_cast<std::size_t>(a)];
      const double sb = score[static_cast<std::size_t>(b)];
      return sa > sb || (sa == sb && a > b);
    });
    ranked.resize(static_cast<std::size_t>(config.budget - w));
    for (std::int64_t t = past; t < n; ++t) ranked.push_back(t);
    std::ranges::sort(ranked);
    kept.push_back(ranked);
  }
  return kept;
}

}  // namespace

TEST_CASE("SnapKV matches a brute-force oracle", "[snapkv]") {
  // 6 query heads on 2 KV heads, head_dim 6, 29 tokens at positions with
  // gaps, window 4, budget 13; every pooling and aggregation, both modes.
  const auto mode = GENERATE(PositionMode::original, PositionMode::cache_relative);
  const auto pooling = GENERATE(SnapKVPooling::avg, SnapKVPooling::max, SnapKVPooling::none);
  const auto aggregation = GENERATE(SnapKVAggregation::mean, SnapKVAggregation::max);
  const std::int64_t kernel_size = GENERATE(1, 5, 7);
  const int seed = GENERATE(1, 2, 3);
  const int mode_id = static_cast<int>(mode);
  const int pooling_id = static_cast<int>(pooling);
  const int aggregation_id = static_cast<int>(aggregation);
  CAPTURE(mode_id, pooling_id, aggregation_id, kernel_size, seed);

  std::mt19937 rng(static_cast<unsigned>(seed));
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 6, .positions = mode});
  std::uniform_int_distribution<std::int64_t> gap(1, 3);
  std::int64_t position = 0;
  for (int t = 0; t < 29; ++t) {
    kvevict_test::append_random(cache, 1, position, rng);
    position += gap(rng);
  }
  Tensor3 queries(6, 4, 6);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  for (float& x : queries.data) x = normal(rng);

  const SnapKVConfig config{.budget = 13, .window = 4, .kernel_size = kernel_size, .pooling = pooling,
                            .gqa_aggregation = aggregation};
  SnapKV<float> policy(config);
  KeepPlan plan;
  policy.select(cache, kvevict_test::query_observation(queries), plan);
  const auto expected = brute_force_snapkv(cache, queries, config, 1.0 / std::sqrt(6.0));
  for (int j = 0; j < 2; ++j) CHECK(kvevict_test::head_of(plan, j) == expected[static_cast<std::size_t>(j)]);
}

TEST_CASE("SnapKV with one query and no pooling equals TOVA head mode", "[snapkv][tova]") {
  // w = 1, no pooling, g = 1: the votes are the last query's attention row,
  // and the window is the newest slot, which TOVA protects with
  // protect_newest. The row TOVA reads is computed here in double.
  constexpr int heads = 3;
  constexpr int d = 8;
  constexpr std::int64_t n = 23;
  const int seed = GENERATE(1, 2, 3, 4);
  std::mt19937 rng(static_cast<unsigned>(seed));
  KVCache<float> cache({.n_kv_heads = heads, .head_dim = d});
  kvevict_test::append_random(cache, n, 0, rng);
  Tensor3 queries(heads, 1, d);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : queries.data) x = normal(rng);

  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Tensor3 row(heads, 1, n);
  for (int j = 0; j < heads; ++j) {
    std::vector<double> logits(static_cast<std::size_t>(n));
    for (std::int64_t t = 0; t < n; ++t) {
      double dot = 0.0;
      for (int k = 0; k < d; ++k) dot += static_cast<double>(queries.at(j, 0, k)) * cache.keys(j)(t, k);
      logits[static_cast<std::size_t>(t)] = scale * dot;
    }
    const double top = *std::ranges::max_element(logits);
    double total = 0.0;
    for (const double z : logits) total += std::exp(z - top);
    for (std::int64_t t = 0; t < n; ++t) {
      row.at(j, 0, t) = static_cast<float>(std::exp(logits[static_cast<std::size_t>(t)] - top) / total);
    }
  }

  for (std::int64_t budget = 1; budget <= n; ++budget) {
    CAPTURE(seed, budget);
    SnapKV<float> snapkv({.budget = budget, .window = 1, .pooling = SnapKVPooling::none});
    kvevict::TOVA<float> tova(
        {.budget = budget, .granularity = kvevict::TOVAGranularity::head, .protect_newest = true});
    KeepPlan snapkv_plan;
    KeepPlan tova_plan;
    snapkv.select(cache, kvevict_test::query_observation(queries), snapkv_plan);
    tova.select(cache, kvevict_test::attention_observation(row), tova_plan);
    CHECK(snapkv_plan == tova_plan);
  }
}

TEST_CASE("SnapKV uses the last window of a longer query block", "[snapkv]") {
  // Five queries given, window 2: the result equals passing the last two.
  std::mt19937 rng(21);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 4});
  kvevict_test::append_random(cache, 15, 0, rng);
  Tensor3 five(4, 5, 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : five.data) x = normal(rng);
  Tensor3 two(4, 2, 4);
  for (int q = 0; q < 4; ++q) {
    for (int i = 0; i < 2; ++i) {
      for (int k = 0; k < 4; ++k) two.at(q, i, k) = five.at(q, 3 + i, k);
    }
  }
  SnapKV<float> policy({.budget = 7, .window = 2});
  KeepPlan from_five;
  KeepPlan from_two;
  policy.select(cache, kvevict_test::query_observation(five), from_five);
  policy.select(cache, kvevict_test::query_observation(two), from_two);
  CHECK(from_five == from_two);
}

TEST_CASE("SnapKV decode-time re-scoring with a query window", "[snapkv]") {
  // Budget 8, window 2, slack 4, 40 single appends from empty: compaction
  // fires once the size exceeds 12, first at the 13th token, then every
  // slack + 1 = 5 tokens: after appends 13, 18, 23, 28, 33 and 38.
  const auto mode = GENERATE(PositionMode::original, PositionMode::cache_relative);
  constexpr int n_heads = 4;
  constexpr int n_kv_heads = 2;
  constexpr int d = 4;
  SnapKV<float> policy({.budget = 8, .window = 2, .slack = 4});
  KVCache<float> cache({.n_kv_heads = n_kv_heads, .head_dim = d, .positions = mode, .capacity = 13});
  kvevict::QueryWindow recent_queries(n_heads, 2, d);
  std::mt19937 rng(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> query(n_heads * d);
  KeepPlan plan;
  std::vector<std::int64_t> compacted_after;

  for (std::int64_t token = 1; token <= 40; ++token) {
    kvevict_test::append_random(cache, 1, token - 1, rng);
    for (float& x : query) x = normal(rng);
    recent_queries.push(query);
    kvevict::Observation observation;
    observation.n_heads = n_heads;
    observation.appended = 1;
    observation.queries = recent_queries.view();
    if (kvevict::observe_and_evict(policy, cache, observation, plan)) {
      compacted_after.push_back(token);
      REQUIRE(cache.size() == 8);
      for (int j = 0; j < n_kv_heads; ++j) {
        const auto positions = kvevict_test::positions_of(cache, j);
        REQUIRE(positions[6] == token - 2);
        REQUIRE(positions[7] == token - 1);
      }
    }
    REQUIRE(cache.size() <= 8 + 4);
  }
  CHECK(compacted_after == std::vector<std::int64_t>{13, 18, 23, 28, 33, 38});
}

TEST_CASE("SnapKV default slack is four windows", "[snapkv]") {
  CHECK(SnapKV<float>({.budget = 8, .window = 2}).slack() == 8);
  CHECK(SnapKV<float>({.budget = 256}).slack() == 128);
  CHECK(SnapKV<float>({.budget = 8, .window = 2, .slack = 0}).slack() == 0);
  const auto needs = SnapKV<float>({.budget = 64}).needs();
  CHECK(needs.window_queries == 32);
  CHECK_FALSE(needs.decode_attention);
}

TEST_CASE("SnapKV configuration validation", "[snapkv][validation]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 0}), Contains("budget (0) must be at least 1"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 4, .window = 8}), Contains("budget (4) must be at least window (8)"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 0}), Contains("window (0) must be at least 1"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 2, .kernel_size = 4}),
                    Contains("kernel_size (4) must be odd and at least 1"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 2, .kernel_size = 0}), Contains("kernel_size (0)"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 2, .gqa_aggregation = SnapKVAggregation::expand}),
                    Contains("expand (one kept set per query head) is not implemented"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 2, .scale = 0.0f}), Contains("scale (0)"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 2, .scale = NAN}), Contains("must be finite and > 0"));
  CHECK_THROWS_WITH(SnapKV<float>({.budget = 8, .window = 2, .slack = -1}), Contains("slack (-1) must be non-negative"));
}

TEST_CASE("SnapKV bad observations leave the cache unchanged", "[snapkv][validation]") {
  using Catch::Matchers::Contains;
  SnapKV<float> policy({.budget = 6, .window = 2});
  std::mt19937 rng(41);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 4});
  kvevict_test::append_random(cache, 9, 0, rng);
  const auto before = kvevict_test::cache_bytes(cache);
  KeepPlan plan;

  SECTION("heads not divisible by KV heads") {
    const Tensor3 queries(3, 2, 4);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::query_observation(queries), plan),
                      Contains("multiple of n_kv_heads (2)"));
  }
  SECTION("observation n_heads differs from the queries") {
    const Tensor3 queries(4, 2, 4);
    auto observation = kvevict_test::query_observation(queries);
    observation.n_heads = 2;
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, observation, plan), Contains("queries have 4 heads"));
  }
  SECTION("wrong head_dim") {
    const Tensor3 queries(4, 2, 3);
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, kvevict_test::query_observation(queries), plan),
                      Contains("head_dim 3, the cache has 4"));
  }
  SECTION("non-finite query, even when no eviction follows") {
    Tensor3 queries(4, 2, 4);
    queries.at(2, 1, 3) = NAN;
    CHECK_THROWS_WITH(kvevict::observe_and_evict(policy, cache, kvevict_test::query_observation(queries), plan),
                      Contains("non-finite"));
  }
  SECTION("more queries than cached slots") {
    const Tensor3 queries(4, 10, 4);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::query_observation(queries), plan),
                      Contains("10 queries for 9 cached slots"));
  }
  SECTION("fewer queries than the window") {
    const Tensor3 queries(4, 1, 4);
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict_test::query_observation(queries), plan),
                      Contains("carries 1 window queries, window (2) needed"));
  }
  SECTION("no queries") {
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, kvevict::Observation{}, plan),
                      Contains("carries 0 window queries"));
  }
  CHECK(kvevict_test::cache_bytes(cache) == before);
}

TEST_CASE("SnapKV within budget keeps everything without queries", "[snapkv]") {
  SnapKV<float> policy({.budget = 12, .window = 4});
  std::mt19937 rng(51);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 4});
  kvevict_test::append_random(cache, 9, 0, rng);
  KeepPlan plan;
  CHECK_FALSE(kvevict::compress_prefill(policy, cache, kvevict::Observation{}, plan));
  policy.select(cache, kvevict::Observation{}, plan);
  for (int j = 0; j < 2; ++j) CHECK(kvevict_test::head_of(plan, j) == Positions{0, 1, 2, 3, 4, 5, 6, 7, 8});
}
