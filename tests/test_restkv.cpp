// ReST-KV: scores against a brute-force removal oracle in double, the
// expanded Gram form against the naive W_o V form, hand-worked examples,
// numerical extremes, the properties the method promises, decode-time
// re-scoring and the strong exception guarantee.
#include <catch2/catch.hpp>

#include "kvevict/kvevict.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

using kvevict::KeepPlan;
using kvevict::KVCache;
using kvevict::Observation;
using kvevict::RestKV;
using kvevict::RestKVConfig;
using kvevict::RestKVGqa;
using kvevict::RestKVMetric;
using kvevict::RestKVOutputScope;
using kvevict::RestKVPooling;
using kvevict::RowMatrixXf;
using kvevict::test::RowMatrixXd;

namespace {

// Window queries [n_heads, w, head_dim] that back an Observation.
struct Queries {
  int n_heads = 0;
  int window = 0;
  int head_dim = 0;
  std::vector<float> data;

  Queries(int heads, int w, int d)
      : n_heads(heads), window(w), head_dim(d), data(static_cast<std::size_t>(heads * w * d), 0.0f) {}

  float& at(int q, int i, int k) { return data[static_cast<std::size_t>((q * window + i) * head_dim + k)]; }
  float at(int q, int i, int k) const { return data[static_cast<std::size_t>((q * window + i) * head_dim + k)]; }
  kvevict::Tensor3View view() const { return {data.data(), n_heads, window, head_dim}; }

  Observation observation(std::int64_t appended, bool prefill = true) const {
    Observation observation;
    observation.n_heads = n_heads;
    observation.queries = view();
    observation.appended = appended;
    observation.prefill = prefill;
    return observation;
  }
};

// A cache of one layer holding `keys` and `values` ([n_kv_heads * n, d],
// head-major) at positions 0..n-1.
template <class Scalar>
KVCache<Scalar> make_cache(int n_kv_heads, int head_dim, int channels, const RowMatrixXf& keys,
                           const RowMatrixXf& values) {
  const std::int64_t n = keys.rows() / n_kv_heads;
  KVCache<Scalar> cache({.n_kv_heads = n_kv_heads, .head_dim = head_dim, .state_channels = channels, .capacity = n});
  std::vector<std::int64_t> positions(static_cast<std::size_t>(n));
  std::iota(positions.begin(), positions.end(), std::int64_t{0});
  cache.append(keys, values, positions);
  return cache;
}

template <class Scalar>
std::vector<std::int64_t> cache_positions(const KVCache<Scalar>& cache, int j) {
  const auto positions = cache.positions(j);
  return {positions.begin(), positions.end()};
}

// An observation without window queries or attention rows.
Observation empty_observation(int n_heads, std::int64_t appended) {
  Observation observation;
  observation.n_heads = n_heads;
  observation.appended = appended;
  return observation;
}

std::vector<std::int64_t> plan_row(const KeepPlan& plan, int row) {
  const auto slots = plan.head(row);
  return {slots.begin(), slots.end()};
}

// Random shape and data for oracle tests.
struct RandomLayer {
  int n_heads = 4;
  int n_kv_heads = 2;
  int head_dim = 6;
  int model_dim = 10;
  std::int64_t n = 23;
  int window = 5;
  RowMatrixXf keys;    // [n_kv_heads * n, d]
  RowMatrixXf values;  // [n_kv_heads * n, d]
  RowMatrixXf w_o;     // [D, n_heads * d]
  Queries queries{n_heads, window, head_dim};

  explicit RandomLayer(std::uint64_t seed) {
    kvevict::test::Random random(seed);
    keys = random.matrix(n_kv_heads * n, head_dim, -1.5, 1.5);
    values = random.matrix(n_kv_heads * n, head_dim);
    w_o = random.matrix(model_dim, n_heads * head_dim);
    for (auto& x : queries.data) x = static_cast<float>(random.uniform(-1.5, 1.5));
  }

  RestKVConfig config(std::int64_t budget) const {
    return {.budget = budget, .window = window, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim};
  }
};

// Window attention of query head q in double, from the cache's stored keys
// (positions 0..n-1, original mode): [w, n].
template <class Scalar>
RowMatrixXd oracle_attention(const KVCache<Scalar>& cache, const Queries& queries, int q, double scale) {
  const int g = queries.n_heads / cache.n_kv_heads();
  const int j = q / g;
  const int w = queries.window;
  RowMatrixXd query_rows(w, queries.head_dim);
  for (int i = 0; i < w; ++i) {
    for (int k = 0; k < queries.head_dim; ++k) query_rows(i, k) = queries.at(q, i, k);
  }
  const RowMatrixXd keys = kvevict::test::to_double(cache.keys(j));
  const auto key_positions = cache.positions(j);
  const std::vector<std::int64_t> query_positions(key_positions.end() - w, key_positions.end());
  return kvevict::test::brute_window_attention(query_rows, keys, key_positions, query_positions, scale);
}

// Aggregates the rows of `a` [w, n] over the window queries by running the
// EMA recursion (acc = a[0]; acc = alpha a[i] + (1 - alpha) acc) or the mean.
std::vector<double> oracle_aggregate(const RowMatrixXd& a, bool use_ema, double alpha) {
  std::vector<double> out(static_cast<std::size_t>(a.cols()));
  for (Eigen::Index t = 0; t < a.cols(); ++t) {
    double acc = a(0, t);
    for (Eigen::Index i = 1; i < a.rows(); ++i) acc = use_ema ? alpha * a(i, t) + (1.0 - alpha) * acc : acc + a(i, t);
    out[static_cast<std::size_t>(t)] = use_ema ? acc : acc / static_cast<double>(a.rows());
  }
  return out;
}

// ||W (o - o')|| where o' is the output after removing slot t from `weights`
// [n] and renormalising the others, both outputs computed from scratch.
double removal_change(std::span<const double> weights, const RowMatrixXd& values, const RowMatrixXd& w_head,
                      Eigen::Index t) {
  Eigen::VectorXd full = Eigen::VectorXd::Zero(values.cols());
  Eigen::VectorXd without = Eigen::VectorXd::Zero(values.cols());
  double rest = 0.0;
  for (Eigen::Index u = 0; u < values.rows(); ++u) {
    const double a = weights[static_cast<std::size_t>(u)];
    full += a * values.row(u).transpose();
    if (u == t) continue;
    without += a * values.row(u).transpose();
    rest += a;
  }
  without /= rest;
  return (w_head * (full - without)).norm();
}

// Computes the brute-force scores of query head q by removal. After mode
// treats the aggregated row over all slots as one query (output_scope full).
// Before mode removes the token from each window query and aggregates the
// changes.
template <class Scalar>
std::vector<double> oracle_removal_scores(const KVCache<Scalar>& cache, const Queries& queries,
                                          const RowMatrixXf& w_o, const RestKVConfig& config, int q) {
  const int g = config.n_heads / config.n_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(config.head_dim));
  const RowMatrixXd a = oracle_attention(cache, queries, q, scale);
  const RowMatrixXd values = kvevict::test::to_double(cache.values(q / g));
  const RowMatrixXd w_head = kvevict::test::to_double(w_o.middleCols(q * config.head_dim, config.head_dim));
  const std::int64_t past = cache.size() - config.window;
  std::vector<double> scores(static_cast<std::size_t>(past));
  if (config.metric_mode == RestKVMetric::after) {
    const std::vector<double> aggregated = oracle_aggregate(a, config.use_ema, config.alpha);
    for (std::int64_t t = 0; t < past; ++t) scores[static_cast<std::size_t>(t)] = removal_change(aggregated, values, w_head, t);
    return scores;
  }
  RowMatrixXd changes(a.rows(), past);
  for (Eigen::Index i = 0; i < a.rows(); ++i) {
    const std::vector<double> row(a.row(i).data(), a.row(i).data() + a.cols());
    for (std::int64_t t = 0; t < past; ++t) changes(i, t) = removal_change(row, values, w_head, t);
  }
  return oracle_aggregate(changes, config.use_ema, config.alpha);
}

double relative_error(double value, double reference) {
  return std::abs(value - reference) / std::max(std::abs(reference), std::numeric_limits<double>::min());
}

// The worked example shared by the hand-checked cases: n = 8, w = 2, d = 2,
// scale 1, one head. Logits are ln 3 or 0, so window attention is
// A[0] = (1, 3, 1, 1, 3, 1, 1, 0) / 11 and A[1] = (1, 1, 3, 1, 1, 1, 1, 1) / 10.
struct WorkedExample {
  RowMatrixXf keys{8, 2};
  RowMatrixXf values{8, 2};
  Queries queries{1, 2, 2};

  WorkedExample() {
    keys << 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0;
    values << 1, 0, 1, 0, 0, 1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0;
    const float ln3 = std::log(3.0f);
    queries.at(0, 0, 0) = ln3;  // the token in slot 6
    queries.at(0, 1, 1) = ln3;  // the token in slot 7
  }

  // EMA with alpha 0.5 over two queries is the mean of the two rows.
  static RestKVConfig config(std::int64_t budget) {
    return {.budget = budget,
            .window = 2,
            .n_heads = 1,
            .n_kv_heads = 1,
            .head_dim = 2,
            .use_ema = true,
            .alpha = 0.5f,
            .use_wo = false,
            .pooling = RestKVPooling::none,
            .softmax_scale = 1.0f};
  }

  static RowMatrixXf diagonal_w_o() {
    RowMatrixXf w_o(2, 2);
    w_o << 2, 0, 0, 1;  // G = diag(4, 1)
    return w_o;
  }

  // Runs compress_prefill and returns the kept positions (= slots here).
  std::vector<std::int64_t> kept(const RestKVConfig& config) const {
    auto policy = config.use_wo ? RestKV<float>(config, diagonal_w_o()) : RestKV<float>(config);
    auto cache = make_cache<float>(1, 2, policy.state_channels(), keys, values);
    KeepPlan plan;
    kvevict::compress_prefill(policy, cache, queries.observation(8), plan);
    return cache_positions(cache, 0);
  }

  std::vector<float> scores(const RestKVConfig& config, bool smoothed) const {
    auto policy = config.use_wo ? RestKV<float>(config, diagonal_w_o()) : RestKV<float>(config);
    auto cache = make_cache<float>(1, 2, policy.state_channels(), keys, values);
    policy.observe(cache, queries.observation(8));
    RowMatrixXf out;
    if (smoothed) {
      policy.smoothed_scores(cache, queries.observation(0), out);
    } else {
      policy.raw_scores(cache, queries.observation(0), out);
    }
    return {out.data(), out.data() + out.size()};
  }
};

void check_values(const std::vector<float>& actual, const std::vector<double>& expected, double margin) {
  REQUIRE(actual.size() == expected.size());
  for (std::size_t t = 0; t < expected.size(); ++t) {
    CAPTURE(t);
    CHECK(actual[t] == Approx(expected[t]).margin(margin));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Scores against brute-force removal

TEST_CASE("restkv scores equal exact removal", "[restkv]") {
  const RandomLayer layer(101);
  for (const auto metric : {RestKVMetric::after, RestKVMetric::before}) {
    for (const bool use_ema : {true, false}) {
      RestKVConfig config = layer.config(12);
      config.metric_mode = metric;
      config.use_ema = use_ema;
      config.output_scope = RestKVOutputScope::full;
      config.pooling = RestKVPooling::none;
      CAPTURE(kvevict::to_string(metric), use_ema);

      RestKV<float> policy(config, layer.w_o);
      auto cache = make_cache<float>(layer.n_kv_heads, layer.head_dim, policy.state_channels(), layer.keys,
                                     layer.values);
      policy.observe(cache, layer.queries.observation(layer.n));
      RowMatrixXf raw;
      policy.raw_scores(cache, layer.queries.observation(0), raw);
      REQUIRE(raw.rows() == layer.n_heads);
      REQUIRE(raw.cols() == layer.n - layer.window);

      for (int q = 0; q < layer.n_heads; ++q) {
        const std::vector<double> expected = oracle_removal_scores(cache, layer.queries, layer.w_o, config, q);
        for (std::int64_t t = 0; t < raw.cols(); ++t) {
          CAPTURE(q, t, raw(q, t), expected[static_cast<std::size_t>(t)]);
          CHECK(relative_error(raw(q, t), expected[static_cast<std::size_t>(t)]) < 1e-5);
        }
      }
    }
  }
}

TEST_CASE("restkv Gram form matches naive form", "[restkv]") {
  // After mode, past_only output, tau 1.7. Query head 0's slot 3 gets the
  // value v = sum_{u != 3, u < P} abar_u v_u / (1 - abar_3), which makes it
  // equal to the past output o: the expanded form then cancels and needs the
  // absolute tolerance below.
  RandomLayer layer(202);
  RestKVConfig config = layer.config(12);
  config.tau = 1.7f;
  config.pooling = RestKVPooling::none;
  const std::int64_t past = layer.n - layer.window;
  const double scale = 1.0 / std::sqrt(static_cast<double>(layer.head_dim));
  {
    const auto probe = make_cache<float>(layer.n_kv_heads, layer.head_dim, 0, layer.keys, layer.values);
    const auto aggregated = oracle_aggregate(oracle_attention(probe, layer.queries, 0, scale), true, config.alpha);
    Eigen::VectorXd rest = Eigen::VectorXd::Zero(layer.head_dim);
    for (std::int64_t u = 0; u < past; ++u) {
      if (u != 3) rest += aggregated[static_cast<std::size_t>(u)] * layer.values.row(u).cast<double>().transpose();
    }
    layer.values.row(3) = (rest / (1.0 - aggregated[3])).cast<float>().transpose();
  }

  RestKV<float> policy(config, layer.w_o);
  auto cache = make_cache<float>(layer.n_kv_heads, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
  policy.observe(cache, layer.queries.observation(layer.n));
  RowMatrixXf raw;
  policy.raw_scores(cache, layer.queries.observation(0), raw);

  const int g = layer.n_heads / layer.n_kv_heads;
  const double u = kvevict::test::float_unit_roundoff;
  const double gamma = 4.0 * (layer.head_dim + 2) * u;
  for (int q = 0; q < layer.n_heads; ++q) {
    const RowMatrixXd a = oracle_attention(cache, layer.queries, q, scale);
    const auto aggregated = oracle_aggregate(a, true, config.alpha);
    const RowMatrixXd values = kvevict::test::to_double(cache.values(q / g));
    const RowMatrixXd w_head = kvevict::test::to_double(layer.w_o.middleCols(q * layer.head_dim, layer.head_dim));
    Eigen::VectorXd o = Eigen::VectorXd::Zero(layer.head_dim);
    for (std::int64_t t = 0; t < past; ++t) o += aggregated[static_cast<std::size_t>(t)] * values.row(t).transpose();
    const Eigen::VectorXd projected_o = w_head * o;
    for (std::int64_t t = 0; t < past; ++t) {
      const double a_t = aggregated[static_cast<std::size_t>(t)];
      const double odds = a_t / (1.0 - a_t);
      const Eigen::VectorXd projected_v = w_head * values.row(t).transpose();
      const double distance = (projected_o - projected_v).norm();
      const double expected = odds * std::pow(distance, config.tau);
      // The expanded e^2 = o'Go - 2 (Go)'v + v'Gv has rounding error at most
      // gamma * (o'Go + 2 |(Go)'v| + v'Gv) <= 2 gamma (o'Go + v'Gv) (G is
      // positive semidefinite), and |sqrt(x) - sqrt(y)| <= sqrt(|x - y|).
      const double c = projected_v.squaredNorm();
      const double distance_error = std::sqrt(2.0 * gamma * (projected_o.squaredNorm() + c));
      const double tolerance =
          1e-5 * expected + odds * kvevict::test::power_difference_bound(distance, distance_error, config.tau);
      CAPTURE(q, t, raw(q, t), expected, tolerance);
      CHECK(std::abs(raw(q, t) - expected) <= tolerance);
      if (q == 0 && t == 3) CHECK(distance < 1e-4 * std::sqrt(c));  // the cancelling case is exercised
    }
  }
}

TEST_CASE("restkv cached quadratic forms per query head", "[restkv]") {
  // Channel i of KV head j contains v^T G_q v for query head q = j * g + i.
  const RandomLayer layer(303);
  RestKV<float> policy(layer.config(12), layer.w_o);
  REQUIRE(policy.state_channels() == 2);
  auto cache = make_cache<float>(layer.n_kv_heads, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
  policy.observe(cache, layer.queries.observation(layer.n));
  for (int j = 0; j < layer.n_kv_heads; ++j) {
    for (int i = 0; i < 2; ++i) {
      const int q = j * 2 + i;
      const RowMatrixXd w_head = kvevict::test::to_double(layer.w_o.middleCols(q * layer.head_dim, layer.head_dim));
      const RowMatrixXd values = kvevict::test::to_double(cache.values(j));
      for (std::int64_t t = 0; t < cache.size(); ++t) {
        const double expected = (w_head * values.row(t).transpose()).squaredNorm();
        CAPTURE(j, i, t);
        CHECK(relative_error(cache.state(j, i)[static_cast<std::size_t>(t)], expected) < 1e-5);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Hand-worked examples

TEST_CASE("restkv worked example in value space", "[restkv]") {
  // abar over slots 0..5 = (21, 41, 43, 21, 41, 21) / 220, o = (185, 43) / 220,
  // odds r = (21/199, 41/179, 43/177, 21/199, 41/179, 21/199), distances
  // ||o - v_t|| = 0.252016, 0.252016, 1.163796, 0.863325, 2.167920, 0.863325.
  const WorkedExample example;
  check_values(example.scores(WorkedExample::config(4), false),
               {0.026595, 0.057724, 0.282730, 0.091105, 0.496563, 0.091105}, 2e-6);
  // Two past slots: 4 and 2 score highest.
  CHECK(example.kept(WorkedExample::config(4)) == std::vector<std::int64_t>{2, 4, 6, 7});
  // Three past slots: 3 and 5 tie at 0.091105 and the later slot wins.
  CHECK(example.kept(WorkedExample::config(5)) == std::vector<std::int64_t>{2, 4, 5, 6, 7});
}

TEST_CASE("restkv worked example with W_o", "[restkv]") {
  // W_o = diag(2, 1), so e_t = ||diag(2, 1) (o - v_t)||.
  const WorkedExample example;
  RestKVConfig config = WorkedExample::config(5);
  config.use_wo = true;
  check_values(example.scores(config, false), {0.039406, 0.085532, 0.452922, 0.178673, 0.990093, 0.178673}, 2e-6);
  CHECK(example.kept(config) == std::vector<std::int64_t>{2, 4, 5, 6, 7});

  SECTION("tau 2 squares the distance, same kept set") {
    config.tau = 2.0f;
    check_values(example.scores(config, false), {0.014715, 0.031939, 0.844405, 0.302518, 4.279781, 0.302518}, 2e-6);
    CHECK(example.kept(config) == std::vector<std::int64_t>{2, 4, 5, 6, 7});
  }

  SECTION("avg pooling k = 3 moves the kept set") {
    // Zero-padded, divisor 3: sm[0] = (0 + 0.039406 + 0.085532) / 3, ...
    config.pooling = RestKVPooling::avg;
    config.kernel_size = 3;
    check_values(example.scores(config, true), {0.041646, 0.192620, 0.239042, 0.540563, 0.449146, 0.389589}, 2e-6);
    CHECK(example.kept(config) == std::vector<std::int64_t>{3, 4, 5, 6, 7});
  }
}

TEST_CASE("restkv worked example before mode", "[restkv]") {
  // Per query with its own output o_i over all visible slots, W_o = diag(2, 1):
  // query 0: 0.037483, 0.140560, 0.253243, 0.236538, 1.364062, 0.236538;
  // query 1: 0.116003, 0.116003, 0.523138, 0.116003, 0.556555, 0.116003;
  // EMA alpha 0.5 of two queries = their mean.
  const WorkedExample example;
  RestKVConfig config = WorkedExample::config(5);
  config.use_wo = true;
  config.metric_mode = RestKVMetric::before;
  check_values(example.scores(config, false), {0.076743, 0.128282, 0.388191, 0.176271, 0.960309, 0.176271}, 2e-6);
  CHECK(example.kept(config) == std::vector<std::int64_t>{2, 4, 5, 6, 7});
}

TEST_CASE("restkv EMA weights worked example", "[restkv]") {
  // w = 3, alpha 0.3: query 0 weighs 0.7^2 = 0.49, query 1 0.3 * 0.7 = 0.21,
  // query 2 0.3. Rows e_0, e_1, e_2 aggregate to exactly these weights.
  RestKVConfig config{.budget = 8, .window = 3, .n_heads = 1, .n_kv_heads = 1, .head_dim = 1, .alpha = 0.3f};
  std::vector<float> weights(3);
  kvevict::restkv_temporal_weights(config, weights);
  CHECK(weights[0] == Approx(0.49).margin(1e-7));
  CHECK(weights[1] == Approx(0.21).margin(1e-7));
  CHECK(weights[2] == Approx(0.30).margin(1e-7));

  const RowMatrixXf rows = RowMatrixXf::Identity(3, 3);
  std::vector<float> aggregated(3);
  kvevict::kernels::temporal_aggregate(rows, weights, 3, aggregated);
  CHECK(aggregated == weights);

  config.use_ema = false;
  kvevict::restkv_temporal_weights(config, weights);
  CHECK(weights == std::vector<float>(3, 1.0f / 3.0f));
}

namespace {

// Window attention of the adaptive-pooling example: n = 10, w = 4, queries in
// slots 6..9 see slots 0..6+i. Each row puts `first` on slot a and `second`
// on slot b and spreads the rest evenly over its other visible slots.
RowMatrixXf drift_rows(const std::vector<std::array<int, 2>>& top_slots) {
  const std::array<float, 4> first{0.4f, 0.4f, 0.5f, 0.5f};
  const std::array<float, 4> second{0.3f, 0.3f, 0.3f, 0.3f};
  RowMatrixXf rows = RowMatrixXf::Zero(4, 10);
  for (int i = 0; i < 4; ++i) {
    const int visible = 7 + i;
    const float rest = (1.0f - first[static_cast<std::size_t>(i)] - second[static_cast<std::size_t>(i)]) /
                       static_cast<float>(visible - 2);
    for (int t = 0; t < visible; ++t) rows(i, t) = rest;
    rows(i, top_slots[static_cast<std::size_t>(i)][0]) = first[static_cast<std::size_t>(i)];
    rows(i, top_slots[static_cast<std::size_t>(i)][1]) = second[static_cast<std::size_t>(i)];
  }
  return rows;
}

// Kept slots when the policy's selection runs on past scores `smoothed` [6]
// with the window 6..9 protected and budget 6.
std::vector<std::int64_t> keep_two_past(const std::vector<float>& smoothed) {
  std::vector<float> scores(smoothed);
  scores.resize(10, 0.0f);
  std::vector<std::int64_t> kept(6);
  kvevict::kernels::SelectScratch scratch;
  kvevict::kernels::select_keep(scores, 10, 0, 4, 6, kept, scratch);
  return kept;
}

}  // namespace

TEST_CASE("restkv adaptive pooling worked example", "[restkv]") {
  // B = 6, so m = min(6 - 4, 10) = 2. Top-2 sets {4,5}, {4,5}, {0,1}, {0,1}:
  // D = 4.5 - 0.5 = 4; with drift_scale 2 and k_min 3: K = max(3, 2*2+1) = 5,
  // shift 2. sm[t] = (1/5) sum_{u=t}^{t+4} s[min(u, 5)] for s = (0,0,6,0,0,1).
  RestKVConfig config{.budget = 6, .window = 4, .n_heads = 1, .n_kv_heads = 1, .head_dim = 1,
                      .pooling = RestKVPooling::adaptive, .kernel_size = 3, .drift_scale = 2.0};
  const std::vector<float> scores{0, 0, 6, 0, 0, 1};
  std::vector<float> smoothed(6);
  std::vector<std::int64_t> scratch;

  for (const auto rounding : {kvevict::kernels::ShiftRounding::trunc, kvevict::kernels::ShiftRounding::reference}) {
    config.shift_rounding = rounding;  // D > 0: both rules give floor(4 / 2) = 2
    const auto kernel = kvevict::restkv_smooth(config, drift_rows({{{4, 5}}, {{5, 4}}, {{0, 1}}, {{1, 0}}}), scores,
                                               smoothed, scratch);
    CHECK(kernel.drift == Approx(4.0));
    CHECK(kernel.size == 5);
    CHECK(kernel.shift == 2);
    check_values(smoothed, {1.2, 1.4, 1.6, 0.6, 0.8, 1.0}, 1e-6);
    CHECK(keep_two_past(smoothed) == std::vector<std::int64_t>{1, 2, 6, 7, 8, 9});
  }

  SECTION("symmetric avg k = 5 keeps other slots") {
    config.pooling = RestKVPooling::avg;
    config.kernel_size = 5;
    kvevict::restkv_smooth(config, drift_rows({{{4, 5}}, {{5, 4}}, {{0, 1}}, {{1, 0}}}), scores, smoothed, scratch);
    check_values(smoothed, {1.2, 1.2, 1.2, 1.4, 1.4, 0.2}, 1e-6);
    CHECK(keep_two_past(smoothed) == std::vector<std::int64_t>{3, 4, 6, 7, 8, 9});
  }

  SECTION("zero drift under both shift roundings") {
    // Every query's top-2 set is {4, 5}: D = 0, K = max(3, 1) = 3.
    const RowMatrixXf rows = drift_rows({{{4, 5}}, {{4, 5}}, {{4, 5}}, {{4, 5}}});
    config.shift_rounding = kvevict::kernels::ShiftRounding::trunc;
    auto kernel = kvevict::restkv_smooth(config, rows, scores, smoothed, scratch);
    CHECK(kernel.size == 3);
    CHECK(kernel.shift == 0);
    check_values(smoothed, {0.0, 2.0, 2.0, 2.0, 1.0 / 3.0, 2.0 / 3.0}, 1e-6);
    // Three-way tie at 2 among slots 1, 2, 3: the later slots win.
    CHECK(keep_two_past(smoothed) == std::vector<std::int64_t>{2, 3, 6, 7, 8, 9});

    // The reference rounding gives floor(0) + 1 = 1 at D = 0.
    config.shift_rounding = kvevict::kernels::ShiftRounding::reference;
    kernel = kvevict::restkv_smooth(config, rows, scores, smoothed, scratch);
    CHECK(kernel.shift == 1);
    check_values(smoothed, {2.0, 2.0, 2.0, 1.0 / 3.0, 2.0 / 3.0, 1.0}, 1e-6);
    CHECK(keep_two_past(smoothed) == std::vector<std::int64_t>{1, 2, 6, 7, 8, 9});
  }
}

// ---------------------------------------------------------------------------
// Pyramid budgets in the policy

TEST_CASE("restkv pyramid layer budgets", "[restkv]") {
  // B = 64, w = 32, L = 4, n = 100: conserving shares (63, 42, 22, 1),
  // reference shares (63, 43, 23, 3), each plus the 32 window slots.
  kvevict::test::Random random(404);
  const RowMatrixXf keys = random.matrix(100, 4);
  const RowMatrixXf values = random.matrix(100, 4);
  Queries queries(2, 32, 4);
  for (auto& x : queries.data) x = static_cast<float>(random.uniform(-1.0, 1.0));
  const RowMatrixXf w_o = random.matrix(5, 8);

  const std::vector<std::pair<kvevict::PyramidRounding, std::vector<std::int64_t>>> cases{
      {kvevict::PyramidRounding::conserving, {95, 74, 54, 33}},
      {kvevict::PyramidRounding::reference, {95, 75, 55, 35}}};
  for (const auto& [rounding, expected] : cases) {
    for (int layer = 0; layer < 4; ++layer) {
      RestKVConfig config{.budget = 64, .window = 32, .n_heads = 2, .n_kv_heads = 1, .head_dim = 4,
                          .use_pyramid = true, .pyramid_rounding = rounding, .layer = layer, .n_layers = 4};
      RestKV<float> policy(config, w_o);
      auto cache = make_cache<float>(1, 4, policy.state_channels(), keys, values);
      CAPTURE(kvevict::to_string(rounding), layer);
      CHECK(policy.layer_budget(100) == expected[static_cast<std::size_t>(layer)]);
      KeepPlan plan;
      CHECK(kvevict::compress_prefill(policy, cache, queries.observation(100), plan));
      CHECK(cache.size() == expected[static_cast<std::size_t>(layer)]);
      // The window survives on every layer.
      CHECK(cache.positions(0).back() == 99);
      CHECK(cache.positions(0)[static_cast<std::size_t>(cache.size() - 32)] == 68);
    }
  }
}

TEST_CASE("restkv pyramid guard uses the layer budget", "[restkv]") {
  // B = 12, w = 4, L = 4, n = 13: P = 8, min_p = 0, max_p = 16 >= 9 is
  // clamped to 9 with min_p = 7. Conserving shares: real 9, 8.33, 7.67, 7,
  // floors sum to 31, the remaining token goes to layer 2: (9, 8, 8, 7).
  // Layer 0 may keep all 13 tokens, so it must not compact.
  kvevict::test::Random random(505);
  const RowMatrixXf keys = random.matrix(13, 2);
  const RowMatrixXf values = random.matrix(13, 2);
  Queries queries(1, 4, 2);
  for (auto& x : queries.data) x = static_cast<float>(random.uniform(-1.0, 1.0));
  const std::vector<std::int64_t> expected{13, 12, 12, 11};
  for (int layer = 0; layer < 4; ++layer) {
    RestKVConfig config{.budget = 12, .window = 4, .n_heads = 1, .n_kv_heads = 1, .head_dim = 2, .use_wo = false,
                        .use_pyramid = true, .layer = layer, .n_layers = 4};
    RestKV<float> policy(config);
    auto cache = make_cache<float>(1, 2, 0, keys, values);
    KeepPlan plan;
    CAPTURE(layer);
    CHECK(kvevict::compress_prefill(policy, cache, queries.observation(13), plan) == (layer != 0));
    CHECK(cache.size() == expected[static_cast<std::size_t>(layer)]);
  }
}

// ---------------------------------------------------------------------------
// Numerical extremes

TEMPLATE_TEST_CASE("restkv dominant token stays finite and kept", "[restkv]", float, Eigen::half,
                   Eigen::bfloat16) {
  // Slot 3's key gives both window queries a logit of `gap` over near-zero
  // logits elsewhere. With gap 12 its weight is about 1 - 6e-5, which rounds
  // to 1 in half precision, where the reference's odds ratio divides by 0.
  // kvevict keeps float weights and must rank the slot first. With gap 200
  // the weight is exactly 1 in float and the scores must still be finite.
  for (const float gap : {12.0f, 200.0f}) {
    kvevict::test::Random random(606);
    RowMatrixXf keys = random.matrix(12, 4, -0.05, 0.05);
    keys.row(3) << gap, 0, 0, 0;
    const RowMatrixXf values = random.matrix(12, 4);
    Queries queries(1, 2, 4);
    queries.at(0, 0, 0) = 1.0f;
    queries.at(0, 1, 0) = 1.0f;
    const RowMatrixXf w_o = random.matrix(6, 4);

    for (const auto metric : {RestKVMetric::after, RestKVMetric::before}) {
      RestKVConfig config{.budget = 4, .window = 2, .n_heads = 1, .n_kv_heads = 1, .head_dim = 4,
                          .metric_mode = metric, .pooling = RestKVPooling::none, .softmax_scale = 1.0f};
      CAPTURE(gap, kvevict::to_string(metric));
      RestKV<TestType> policy(config, w_o);
      auto cache = make_cache<TestType>(1, 4, policy.state_channels(), keys, values);
      policy.observe(cache, queries.observation(12));
      RowMatrixXf raw;
      policy.raw_scores(cache, queries.observation(0), raw);
      for (Eigen::Index t = 0; t < raw.cols(); ++t) {
        CAPTURE(t);
        CHECK(std::isfinite(raw(0, t)));
        CHECK(raw(0, t) >= 0.0f);
      }
      if (gap == 12.0f) {
        KeepPlan plan;
        policy.select(cache, queries.observation(0), plan);
        const auto kept = plan_row(plan, 0);
        CHECK(std::find(kept.begin(), kept.end(), 3) != kept.end());
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Properties

TEST_CASE("restkv identity W_o equals value space", "[restkv]") {
  // W_o = [I I] (D = d): every W_o^q is the identity, so with tau 1 the scores
  // and the kept sets equal those of use_wo false.
  RandomLayer layer(707);
  layer.n_heads = 2;
  layer.n_kv_heads = 1;
  layer.model_dim = layer.head_dim;
  layer.keys.conservativeResize(layer.n, Eigen::NoChange);
  layer.values.conservativeResize(layer.n, Eigen::NoChange);
  layer.w_o.resize(layer.head_dim, 2 * layer.head_dim);
  layer.w_o << RowMatrixXf::Identity(layer.head_dim, layer.head_dim), RowMatrixXf::Identity(layer.head_dim, layer.head_dim);
  layer.queries = Queries(2, layer.window, layer.head_dim);
  kvevict::test::Random random(708);
  for (auto& x : layer.queries.data) x = static_cast<float>(random.uniform(-1.5, 1.5));

  for (const auto metric : {RestKVMetric::after, RestKVMetric::before}) {
    RestKVConfig with_wo = layer.config(12);
    with_wo.metric_mode = metric;
    RestKVConfig without = with_wo;
    without.use_wo = false;
    CAPTURE(kvevict::to_string(metric));

    RestKV<float> projected(with_wo, layer.w_o);
    RestKV<float> plain(without);
    auto cache_projected = make_cache<float>(1, layer.head_dim, projected.state_channels(), layer.keys, layer.values);
    auto cache_plain = make_cache<float>(1, layer.head_dim, 0, layer.keys, layer.values);
    projected.observe(cache_projected, layer.queries.observation(layer.n));
    plain.observe(cache_plain, layer.queries.observation(layer.n));

    RowMatrixXf scores_projected;
    RowMatrixXf scores_plain;
    projected.raw_scores(cache_projected, layer.queries.observation(0), scores_projected);
    plain.raw_scores(cache_plain, layer.queries.observation(0), scores_plain);
    for (Eigen::Index q = 0; q < 2; ++q) {
      for (Eigen::Index t = 0; t < scores_plain.cols(); ++t) {
        CAPTURE(q, t);
        CHECK(scores_projected(q, t) == Approx(scores_plain(q, t)).epsilon(1e-5).margin(1e-6));
      }
    }
    KeepPlan plan_projected;
    KeepPlan plan_plain;
    projected.select(cache_projected, layer.queries.observation(0), plan_projected);
    plain.select(cache_plain, layer.queries.observation(0), plan_plain);
    CHECK(plan_projected == plan_plain);
  }
}

TEST_CASE("restkv scaling W_o scales scores by c^tau", "[restkv]") {
  const RandomLayer layer(808);
  const float c = 2.5f;
  struct Case {
    RestKVMetric metric;
    float tau;
    bool use_norm;
    double exponent;  // scores scale by c^exponent
  };
  const std::vector<Case> cases{{RestKVMetric::after, 1.0f, false, 1.0},
                                {RestKVMetric::after, 1.7f, false, 1.7},
                                {RestKVMetric::before, 1.0f, false, 1.0},
                                {RestKVMetric::before, 1.0f, true, 0.0}};
  for (const auto& test_case : cases) {
    RestKVConfig config = layer.config(12);
    config.metric_mode = test_case.metric;
    config.tau = test_case.tau;
    config.use_norm = test_case.use_norm;
    CAPTURE(kvevict::to_string(test_case.metric), test_case.tau, test_case.use_norm);

    RestKV<float> base(config, layer.w_o);
    RestKV<float> scaled(config, layer.w_o * c);
    auto cache_base = make_cache<float>(2, layer.head_dim, base.state_channels(), layer.keys, layer.values);
    auto cache_scaled = make_cache<float>(2, layer.head_dim, scaled.state_channels(), layer.keys, layer.values);
    base.observe(cache_base, layer.queries.observation(layer.n));
    scaled.observe(cache_scaled, layer.queries.observation(layer.n));

    RowMatrixXf scores_base;
    RowMatrixXf scores_scaled;
    base.smoothed_scores(cache_base, layer.queries.observation(0), scores_base);
    scaled.smoothed_scores(cache_scaled, layer.queries.observation(0), scores_scaled);
    const double factor = std::pow(static_cast<double>(c), test_case.exponent);
    for (Eigen::Index q = 0; q < scores_base.rows(); ++q) {
      for (Eigen::Index t = 0; t < scores_base.cols(); ++t) {
        CAPTURE(q, t);
        CHECK(scores_scaled(q, t) == Approx(factor * scores_base(q, t)).epsilon(1e-5));
      }
    }
    KeepPlan plan_base;
    KeepPlan plan_scaled;
    base.select(cache_base, layer.queries.observation(0), plan_base);
    scaled.select(cache_scaled, layer.queries.observation(0), plan_scaled);
    CHECK(plan_base == plan_scaled);
  }
}

TEST_CASE("restkv small drift gives symmetric average", "[restkv]") {
  // With |D| < drift_scale and trunc rounding, K = kernel_size and the shift is
  // 0: sm[t] = (1/k) sum_{u=t-k/2}^{t+k/2} s[clamp(u, 0, P-1)].
  const RandomLayer layer(909);
  RestKVConfig config = layer.config(12);
  config.drift_scale = 1e9;
  config.kernel_size = 5;
  RestKV<float> policy(config, layer.w_o);
  auto cache = make_cache<float>(2, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
  policy.observe(cache, layer.queries.observation(layer.n));
  RowMatrixXf raw;
  RowMatrixXf smoothed;
  policy.raw_scores(cache, layer.queries.observation(0), raw);
  policy.smoothed_scores(cache, layer.queries.observation(0), smoothed);
  const Eigen::Index past = raw.cols();
  for (Eigen::Index q = 0; q < raw.rows(); ++q) {
    for (Eigen::Index t = 0; t < past; ++t) {
      double sum = 0.0;
      for (Eigen::Index u = t - 2; u <= t + 2; ++u) sum += raw(q, std::clamp<Eigen::Index>(u, 0, past - 1));
      CAPTURE(q, t);
      CHECK(smoothed(q, t) == Approx(sum / 5.0).epsilon(1e-6));
    }
  }
}

TEST_CASE("restkv mean equals EMA with weights 1/w", "[restkv]") {
  // Two window queries: EMA with alpha 0.5 gives weights (0.5, 0.5), exactly
  // the mean's, so the scores agree bit for bit. (Mean mode for any w is
  // checked against the oracle with weights 1/w in the exact-removal test.)
  RandomLayer layer(1001);
  layer.window = 2;
  layer.queries = Queries(layer.n_heads, 2, layer.head_dim);
  kvevict::test::Random random(1002);
  for (auto& x : layer.queries.data) x = static_cast<float>(random.uniform(-1.5, 1.5));
  for (const auto metric : {RestKVMetric::after, RestKVMetric::before}) {
    RestKVConfig ema = layer.config(12);
    ema.metric_mode = metric;
    ema.alpha = 0.5f;
    RestKVConfig mean = ema;
    mean.use_ema = false;
    RestKV<float> ema_policy(ema, layer.w_o);
    RestKV<float> mean_policy(mean, layer.w_o);
    auto cache = make_cache<float>(2, layer.head_dim, ema_policy.state_channels(), layer.keys, layer.values);
    ema_policy.observe(cache, layer.queries.observation(layer.n));
    mean_policy.observe(cache, layer.queries.observation(layer.n));
    RowMatrixXf scores_ema;
    RowMatrixXf scores_mean;
    ema_policy.smoothed_scores(cache, layer.queries.observation(0), scores_ema);
    mean_policy.smoothed_scores(cache, layer.queries.observation(0), scores_mean);
    CHECK(scores_ema == scores_mean);
  }
}

TEST_CASE("restkv GQA aggregation per KV head", "[restkv]") {
  // kv_head averages the group's pooled rows and max takes their maximum.
  // Each KV head keeps the best budget - w past slots of that row and the
  // window.
  const RandomLayer layer(1101);
  for (const auto gqa : {RestKVGqa::kv_head, RestKVGqa::max}) {
    RestKVConfig config = layer.config(12);
    config.gqa = gqa;
    CAPTURE(kvevict::to_string(gqa));
    RestKV<float> policy(config, layer.w_o);
    auto cache = make_cache<float>(2, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
    policy.observe(cache, layer.queries.observation(layer.n));
    RowMatrixXf smoothed;
    policy.smoothed_scores(cache, layer.queries.observation(0), smoothed);
    KeepPlan plan;
    policy.select(cache, layer.queries.observation(0), plan);
    REQUIRE(plan.count() == 12);

    const std::int64_t past = layer.n - layer.window;
    for (int j = 0; j < 2; ++j) {
      std::vector<float> group(static_cast<std::size_t>(past));
      for (std::int64_t t = 0; t < past; ++t) {
        const float a = smoothed(2 * j, t);
        const float b = smoothed(2 * j + 1, t);
        group[static_cast<std::size_t>(t)] = gqa == RestKVGqa::max ? std::max(a, b) : (a + b) / 2.0f;
      }
      std::vector<std::int64_t> candidates(static_cast<std::size_t>(past));
      std::iota(candidates.begin(), candidates.end(), std::int64_t{0});
      std::vector<std::int64_t> expected = kvevict::test::brute_force_top_k(group, candidates, 12 - layer.window);
      for (std::int64_t t = past; t < layer.n; ++t) expected.push_back(t);
      CAPTURE(j);
      CHECK(plan_row(plan, j) == expected);
    }
  }
}

TEST_CASE("restkv per-query-head selection", "[restkv]") {
  // select_query_heads returns one list per query head from its own row, the
  // reference's layout; KVCache::keep rejects it on a cache of fewer heads.
  const RandomLayer layer(1201);
  RestKV<float> policy(layer.config(12), layer.w_o);
  auto cache = make_cache<float>(2, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
  policy.observe(cache, layer.queries.observation(layer.n));
  RowMatrixXf smoothed;
  policy.smoothed_scores(cache, layer.queries.observation(0), smoothed);
  KeepPlan plan;
  policy.select_query_heads(cache, layer.queries.observation(0), plan);
  REQUIRE(plan.n_kv_heads() == layer.n_heads);
  REQUIRE(plan.count() == 12);
  const std::int64_t past = layer.n - layer.window;
  for (int q = 0; q < layer.n_heads; ++q) {
    const std::vector<float> row(smoothed.row(q).data(), smoothed.row(q).data() + past);
    std::vector<std::int64_t> candidates(static_cast<std::size_t>(past));
    std::iota(candidates.begin(), candidates.end(), std::int64_t{0});
    std::vector<std::int64_t> expected = kvevict::test::brute_force_top_k(row, candidates, 12 - layer.window);
    for (std::int64_t t = past; t < layer.n; ++t) expected.push_back(t);
    CAPTURE(q);
    CHECK(plan_row(plan, q) == expected);
  }
  CHECK_THROWS_AS(cache.keep(plan), std::invalid_argument);
}

TEST_CASE("restkv identical heads keep identical lists", "[restkv]") {
  // Both KV heads get the same keys and values, both groups the same queries
  // and the same W_o blocks, so the scores and the kept lists are the same on
  // both KV heads. Identical K, V and Q alone are not enough, because each
  // query head has its own W_o^q.
  RandomLayer layer(1251);
  layer.keys.bottomRows(layer.n) = layer.keys.topRows(layer.n);
  layer.values.bottomRows(layer.n) = layer.values.topRows(layer.n);
  layer.w_o.rightCols(2 * layer.head_dim) = layer.w_o.leftCols(2 * layer.head_dim);
  for (int i = 0; i < 2; ++i) {
    for (int r = 0; r < layer.window; ++r) {
      for (int k = 0; k < layer.head_dim; ++k) layer.queries.at(2 + i, r, k) = layer.queries.at(i, r, k);
    }
  }
  for (const auto metric : {RestKVMetric::after, RestKVMetric::before}) {
    RestKVConfig config = layer.config(12);
    config.metric_mode = metric;
    RestKV<float> policy(config, layer.w_o);
    auto cache = make_cache<float>(2, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
    policy.observe(cache, layer.queries.observation(layer.n));
    KeepPlan plan;
    policy.select(cache, layer.queries.observation(0), plan);
    CAPTURE(kvevict::to_string(metric));
    CHECK(plan_row(plan, 0) == plan_row(plan, 1));
  }
}

TEST_CASE("restkv selection basics", "[restkv]") {
  const RandomLayer layer(1301);
  RestKV<float> policy(layer.config(12), layer.w_o);
  auto cache = make_cache<float>(2, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
  policy.observe(cache, layer.queries.observation(layer.n));

  SECTION("kept lists are sorted, sized to the budget and hold the window") {
    KeepPlan plan;
    policy.select(cache, layer.queries.observation(0), plan);
    for (int j = 0; j < 2; ++j) {
      const auto kept = plan_row(plan, j);
      REQUIRE(kept.size() == 12);
      CHECK(std::adjacent_find(kept.begin(), kept.end(), std::greater_equal<>()) == kept.end());
      CHECK(kept.front() >= 0);
      for (std::int64_t t = layer.n - layer.window; t < layer.n; ++t) {
        CHECK(std::find(kept.begin(), kept.end(), t) != kept.end());
      }
    }
    KeepPlan again;
    policy.select(cache, layer.queries.observation(0), again);
    CHECK(plan == again);
  }

  SECTION("a cache within the budget keeps every slot") {
    RestKV<float> roomy(layer.config(23), layer.w_o);
    KeepPlan plan;
    roomy.select(cache, empty_observation(layer.n_heads, 0), plan);
    REQUIRE(plan.count() == 23);
    for (int j = 0; j < 2; ++j) CHECK(plan_row(plan, j) == cache_positions(cache, j));
    CHECK_FALSE(roomy.should_evict(cache, kvevict::Trigger::prefill));
  }

  SECTION("a budget equal to the window keeps only the window") {
    RestKV<float> tight(layer.config(layer.window), layer.w_o);
    tight.observe(cache, layer.queries.observation(layer.n));
    KeepPlan plan;
    tight.select(cache, layer.queries.observation(0), plan);
    for (int j = 0; j < 2; ++j) CHECK(plan_row(plan, j) == std::vector<std::int64_t>{18, 19, 20, 21, 22});
  }

  SECTION("cached quadratic forms move with their tokens") {
    std::vector<std::vector<float>> before;
    for (int j = 0; j < 2; ++j) {
      for (int i = 0; i < 2; ++i) before.emplace_back(cache.state(j, i).begin(), cache.state(j, i).end());
    }
    KeepPlan plan;
    policy.select(cache, layer.queries.observation(0), plan);
    cache.keep(plan);
    for (int j = 0; j < 2; ++j) {
      const auto kept = plan_row(plan, j);
      for (int i = 0; i < 2; ++i) {
        for (std::size_t s = 0; s < kept.size(); ++s) {
          CHECK(cache.state(j, i)[s] == before[static_cast<std::size_t>(j * 2 + i)][static_cast<std::size_t>(kept[s])]);
        }
      }
    }
  }
}

TEST_CASE("restkv observe covers earlier appends", "[restkv]") {
  // A prompt appended in two chunks with one observe that reports only the
  // second chunk: the first observe computes every slot. Later, slots are
  // found by position even when `appended` understates them.
  const RandomLayer layer(1401);
  RestKV<float> policy(layer.config(12), layer.w_o);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = layer.head_dim, .state_channels = policy.state_channels()});
  const auto append_range = [&](std::int64_t first, std::int64_t count) {
    RowMatrixXf keys(2 * count, layer.head_dim);
    RowMatrixXf values(2 * count, layer.head_dim);
    for (int j = 0; j < 2; ++j) {
      keys.middleRows(j * count, count) = layer.keys.middleRows(j * layer.n + first, count);
      values.middleRows(j * count, count) = layer.values.middleRows(j * layer.n + first, count);
    }
    std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
    std::iota(positions.begin(), positions.end(), first);
    cache.append(keys, values, positions);
  };
  const auto expect_all_forms = [&] {
    const auto& grams = policy.gram_matrices();
    for (int j = 0; j < 2; ++j) {
      for (int i = 0; i < 2; ++i) {
        for (std::int64_t t = 0; t < cache.size(); ++t) {
          const Eigen::VectorXf v = cache.values(j).row(t).transpose();
          const float expected = v.dot(grams[static_cast<std::size_t>(j * 2 + i)] * v);
          CAPTURE(j, i, t);
          CHECK(cache.state(j, i)[static_cast<std::size_t>(t)] == Approx(expected).epsilon(1e-5));
        }
      }
    }
  };

  append_range(0, 10);
  append_range(10, 5);
  Observation observation = layer.queries.observation(5);
  policy.observe(cache, observation);
  expect_all_forms();

  append_range(15, 8);
  observation.appended = 0;
  policy.observe(cache, observation);
  expect_all_forms();

  // After a reset the next observe recomputes every slot.
  for (int j = 0; j < 2; ++j) {
    for (int i = 0; i < 2; ++i) std::fill(cache.state(j, i).begin(), cache.state(j, i).end(), 0.0f);
  }
  policy.reset();
  policy.observe(cache, observation);
  expect_all_forms();
}

// ---------------------------------------------------------------------------
// Decode-time re-scoring

TEST_CASE("restkv decode-time compaction schedule", "[restkv]") {
  // B = 8, slack = 4: compaction fires when size() > 12 and cuts to 8, so a
  // cache growing one token per step is compacted after appends 13, 18, 23,
  // 28, 33 and 38, never once per token.
  for (const auto mode : {kvevict::PositionMode::original, kvevict::PositionMode::cache_relative}) {
    CAPTURE(kvevict::to_string(mode));
    const int n_heads = 2;
    const int head_dim = 4;
    const int window = 2;
    kvevict::test::Random random(1501);
    const RowMatrixXf w_o = random.matrix(5, n_heads * head_dim);
    RestKV<float> policy({.budget = 8, .window = window, .n_heads = n_heads, .n_kv_heads = 1, .head_dim = head_dim,
                          .slack = 4},
                         w_o);
    KVCache<float> cache({.n_kv_heads = 1, .head_dim = head_dim, .positions = mode,
                          .state_channels = policy.state_channels(), .capacity = 13});
    kvevict::QueryWindow recent_queries(n_heads, window, head_dim);
    KeepPlan plan;
    std::vector<int> compactions;
    for (int step = 1; step <= 40; ++step) {
      const RowMatrixXf key = random.matrix(1, head_dim);
      const RowMatrixXf value = random.matrix(1, head_dim);
      const std::vector<std::int64_t> position{step - 1};
      cache.append(key, value, position);
      const std::vector<float> query = random.vector(n_heads * head_dim);
      recent_queries.push(query);

      Observation observation;
      observation.n_heads = n_heads;
      observation.queries = recent_queries.view();
      observation.appended = 1;
      if (kvevict::observe_and_evict(policy, cache, observation, plan)) {
        compactions.push_back(step);
        CHECK(cache.size() == 8);
        // The window (the two newest tokens) survives.
        CHECK(cache.positions(0)[6] == step - 2);
        CHECK(cache.positions(0)[7] == step - 1);
      }
    }
    CHECK(compactions == std::vector<int>{13, 18, 23, 28, 33, 38});
    CHECK(cache.size() == 10);
  }
}

TEST_CASE("restkv default slack is four windows", "[restkv]") {
  RestKV<float> policy({.budget = 64, .window = 32, .n_heads = 1, .n_kv_heads = 1, .head_dim = 4, .use_wo = false});
  CHECK(policy.slack() == 128);
  CHECK(policy.softmax_scale() == Approx(0.5f));
  CHECK(policy.needs().window_queries == 32);
  CHECK(policy.state_channels() == 0);
}

// ---------------------------------------------------------------------------
// Invalid configurations and observations

TEST_CASE("restkv rejects invalid configurations", "[restkv]") {
  const RestKVConfig valid{.budget = 16, .window = 4, .n_heads = 4, .n_kv_heads = 2, .head_dim = 3};
  const RowMatrixXf w_o = RowMatrixXf::Ones(5, 12);
  REQUIRE_NOTHROW(RestKV<float>(valid, w_o));

  const std::vector<std::pair<std::function<void(RestKVConfig&)>, std::string>> cases{
      {[](RestKVConfig& c) { c.budget = 3; }, "budget (3) must be at least window (4)"},
      {[](RestKVConfig& c) { c.window = 0; }, "window (0)"},
      {[](RestKVConfig& c) { c.window = 1; }, "window (1) must be at least 2 for adaptive pooling"},
      {[](RestKVConfig& c) { c.kernel_size = 4; }, "kernel_size (4) must be odd"},
      {[](RestKVConfig& c) { c.kernel_size = 0; }, "kernel_size (0)"},
      {[](RestKVConfig& c) { c.alpha = 0.0f; }, "alpha (0)"},
      {[](RestKVConfig& c) { c.alpha = 1.5f; }, "alpha (1.5)"},
      {[](RestKVConfig& c) { c.tau = 0.0f; }, "tau (0)"},
      {[](RestKVConfig& c) {
         c.tau = 2.0f;
         c.metric_mode = RestKVMetric::before;
       },
       "tau (2) is read only in after mode"},
      {[](RestKVConfig& c) { c.use_norm = true; }, "use_norm is read only in before mode"},
      {[](RestKVConfig& c) { c.drift_scale = 0.0; }, "drift_scale (0)"},
      {[](RestKVConfig& c) { c.beta = 0.5; }, "beta (0.5)"},
      {[](RestKVConfig& c) { c.slack = -1; }, "slack (-1)"},
      {[](RestKVConfig& c) { c.softmax_scale = -1.0f; }, "softmax_scale (-1)"},
      {[](RestKVConfig& c) { c.n_heads = 5; }, "n_heads (5) must be a multiple of n_kv_heads (2)"},
      {[](RestKVConfig& c) { c.n_kv_heads = 0; }, "n_kv_heads (0)"},
      {[](RestKVConfig& c) { c.head_dim = 0; }, "head_dim (0)"},
      {[](RestKVConfig& c) {
         c.use_pyramid = true;
         c.n_layers = 4;
         c.layer = 4;
       },
       "layer (4) must be in [0, n_layers = 4)"},
  };
  for (const auto& [mutate, message] : cases) {
    RestKVConfig config = valid;
    mutate(config);
    CAPTURE(message);
    const RowMatrixXf matching = RowMatrixXf::Ones(5, config.n_heads * std::max(config.head_dim, 1));
    CHECK_THROWS_WITH(RestKV<float>(config, matching), Catch::Contains(message));
  }

  SECTION("W_o") {
    CHECK_THROWS_WITH(RestKV<float>(valid), Catch::Contains("use_wo is true but no W_o was given"));
    CHECK_THROWS_WITH(RestKV<float>(valid, RowMatrixXf::Ones(5, 11)), Catch::Contains("W_o is [5 x 11]"));
    CHECK_THROWS_WITH(RestKV<float>(valid, RowMatrixXf::Ones(0, 12)), Catch::Contains("W_o is [0 x 12]"));
    RowMatrixXf bad = w_o;
    bad(2, 7) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(RestKV<float>(valid, bad), Catch::Contains("W_o(") && Catch::Contains("must be finite"));
  }
}

TEST_CASE("restkv bad observations change nothing", "[restkv]") {
  const RandomLayer layer(1601);
  RestKV<float> policy(layer.config(12), layer.w_o);
  auto cache = make_cache<float>(2, layer.head_dim, policy.state_channels(), layer.keys, layer.values);
  const auto snapshot = kvevict::test::CacheSnapshot::take(cache);

  Queries short_window(layer.n_heads, layer.window - 1, layer.head_dim);
  Queries wide(layer.n_heads, layer.window, layer.head_dim + 1);
  Queries few_heads(layer.n_heads - 1, layer.window, layer.head_dim);
  Queries with_nan = layer.queries;
  with_nan.at(1, 2, 3) = std::numeric_limits<float>::quiet_NaN();

  std::vector<std::pair<Observation, std::string>> cases;
  cases.emplace_back(empty_observation(layer.n_heads, layer.n), "no window queries");
  cases.emplace_back(short_window.observation(layer.n), "window queries are [4, 4, 6]");
  cases.emplace_back(wide.observation(layer.n), "window queries are [4, 5, 7]");
  auto heads_mismatch = few_heads.observation(layer.n);
  heads_mismatch.n_heads = layer.n_heads;
  cases.emplace_back(heads_mismatch, "window queries are [3, 5, 6]");
  cases.emplace_back(with_nan.observation(layer.n), "window queries contains a non-finite value");
  auto wrong_heads = layer.queries.observation(layer.n);
  wrong_heads.n_heads = 3;
  cases.emplace_back(wrong_heads, "Observation::n_heads (3)");
  cases.emplace_back(layer.queries.observation(layer.n + 1), "Observation::appended (24)");
  cases.emplace_back(layer.queries.observation(-1), "Observation::appended (-1)");

  for (const auto& [observation, message] : cases) {
    CAPTURE(message);
    CHECK_THROWS_WITH(policy.observe(cache, observation), Catch::Contains(message));
    CHECK(kvevict::test::CacheSnapshot::take(cache) == snapshot);
    KeepPlan plan;
    CHECK_THROWS_WITH(kvevict::compress_prefill(policy, cache, observation, plan), Catch::Contains(message));
    CHECK(kvevict::test::CacheSnapshot::take(cache) == snapshot);
  }

  SECTION("select before observe") {
    // The failed observes above recorded nothing, so the cached forms are
    // still missing.
    KeepPlan plan;
    CHECK_THROWS_WITH(policy.select(cache, layer.queries.observation(0), plan), Catch::Contains("call observe"));
    CHECK(kvevict::test::CacheSnapshot::take(cache) == snapshot);
  }

  SECTION("select after an append that observe has not seen") {
    policy.observe(cache, layer.queries.observation(layer.n));
    const RowMatrixXf token = RowMatrixXf::Ones(2, layer.head_dim);
    const std::vector<std::int64_t> position{layer.n};
    cache.append(token, token, position);
    const auto appended = kvevict::test::CacheSnapshot::take(cache);
    KeepPlan plan;
    CHECK_THROWS_WITH(policy.select(cache, layer.queries.observation(0), plan), Catch::Contains("call observe"));
    CHECK(kvevict::test::CacheSnapshot::take(cache) == appended);
  }

  SECTION("a cache of another shape") {
    KVCache<float> other({.n_kv_heads = 1, .head_dim = layer.head_dim, .state_channels = 2});
    CHECK_THROWS_WITH(policy.observe(other, layer.queries.observation(0)), Catch::Contains("n_kv_heads 1"));
    auto no_state = make_cache<float>(2, layer.head_dim, 1, layer.keys, layer.values);
    const auto before = kvevict::test::CacheSnapshot::take(no_state);
    CHECK_THROWS_WITH(policy.observe(no_state, layer.queries.observation(layer.n)),
                      Catch::Contains("the policy needs 2"));
    CHECK(kvevict::test::CacheSnapshot::take(no_state) == before);
  }
}
