// Temporal smoothing: mean and EMA weights against the step-by-step
// recurrence and the closed form, and the aggregation of attention rows.
#include <catch2/catch.hpp>

#include "kvevict/kernels/temporal.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using namespace kvevict;
using kvevict::test::Random;

namespace {

// EMA by its recurrence, oldest row first, in double: acc = rows[0], then
// acc = alpha * rows[i] + (1 - alpha) * acc.
std::vector<double> ema_recurrence(const RowMatrixXf& rows, double alpha, std::int64_t columns) {
  std::vector<double> acc(static_cast<std::size_t>(columns));
  for (std::int64_t t = 0; t < columns; ++t) acc[static_cast<std::size_t>(t)] = rows(0, t);
  for (Eigen::Index i = 1; i < rows.rows(); ++i) {
    for (std::int64_t t = 0; t < columns; ++t) {
      acc[static_cast<std::size_t>(t)] = alpha * rows(i, t) + (1.0 - alpha) * acc[static_cast<std::size_t>(t)];
    }
  }
  return acc;
}

// Closed-form EMA weights in double: query 0 weighs (1-alpha)^(w-1), query
// i >= 1 weighs alpha (1-alpha)^(w-1-i).
std::vector<double> ema_closed_form(std::int64_t w, double alpha) {
  std::vector<double> weights(static_cast<std::size_t>(w));
  weights[0] = std::pow(1.0 - alpha, static_cast<double>(w - 1));
  for (std::int64_t i = 1; i < w; ++i) {
    weights[static_cast<std::size_t>(i)] = alpha * std::pow(1.0 - alpha, static_cast<double>(w - 1 - i));
  }
  return weights;
}

}  // namespace

TEST_CASE("EMA weights of the hand example", "[temporal]") {
  // w = 3, alpha = 0.3: the oldest query keeps (0.7)^2 = 0.49, the middle
  // one 0.3 * 0.7 = 0.21, the newest 0.3. The kernel rounds double weights
  // to float once: within u = 2^-24 relative.
  std::vector<float> weights(3);
  kernels::temporal_weights(kernels::TemporalMode::ema, 0.3f, weights);
  const std::vector<double> expected = {0.49, 0.21, 0.30};
  for (std::size_t i = 0; i < 3; ++i) {
    CAPTURE(i);
    // alpha itself is 0.3f, off from 0.3 by up to u relative, which moves
    // each weight by at most 2u relative, so 4u covers both roundings.
    CHECK(std::abs(weights[i] - expected[i]) <= 4.0 * test::float_unit_roundoff * expected[i]);
  }

  // The recurrence on the unit rows e_0, e_1, e_2 gives the same weights.
  const RowMatrixXf unit = RowMatrixXf::Identity(3, 3);
  std::vector<float> out(3);
  std::vector<float> scratch;
  kernels::temporal_ema(unit, 3, 0.3f, out, scratch);
  for (std::size_t i = 0; i < 3; ++i) {
    CAPTURE(i);
    CHECK(std::abs(out[i] - expected[i]) <= 4.0 * test::float_unit_roundoff * expected[i]);
  }
}

TEST_CASE("EMA weights match closed form and recurrence", "[temporal]") {
  // Float weights come from double pow rounded once: within u relative of
  // the closed form evaluated with the same float alpha (plus the double
  // rounding of pow, below 1e-14). The recurrence on
  // unit rows (row i = e_i) gives query i's weight in column i.
  for (const std::int64_t w : {1, 2, 3, 7, 32, 37}) {
    for (const float alpha : {0.3f, 0.5f, 0.2f, 1.0f, 0.05f}) {
      CAPTURE(w, alpha);
      std::vector<float> weights(static_cast<std::size_t>(w));
      kernels::temporal_weights(kernels::TemporalMode::ema, alpha, weights);
      const std::vector<double> closed = ema_closed_form(w, alpha);
      const std::vector<double> recurrence = ema_recurrence(RowMatrixXf::Identity(w, w), alpha, w);
      double total = 0.0;
      for (std::int64_t i = 0; i < w; ++i) {
        CAPTURE(i);
        const auto index = static_cast<std::size_t>(i);
        CHECK(std::abs(weights[index] - closed[index]) <= (test::float_unit_roundoff + 1e-14) * closed[index]);
        CHECK(std::abs(closed[index] - recurrence[index]) <= 1e-12);
        total += weights[index];
      }
      // The weights sum to 1 (each rounded by u) and the newest weighs alpha.
      CHECK(std::abs(total - 1.0) <= static_cast<double>(w) * test::float_unit_roundoff);
      if (w > 1) CHECK(weights.back() == alpha);
    }
  }
}

TEST_CASE("EMA start value is not discounted", "[temporal]") {
  // With alpha < 0.5 the oldest query outweighs the second oldest:
  // w = 32, alpha = 0.3 gives 0.7^31 = 1.5777538e-5 against 0.3 * 0.7^30 =
  // 6.7618021e-6. The float 0.3f is 4e-8 relative above 0.3, which moves
  // 0.7^31 by about 31 * 1.7e-8 = 5.3e-7 relative, so the check allows 1e-6
  // relative.
  std::vector<float> weights(32);
  kernels::temporal_weights(kernels::TemporalMode::ema, 0.3f, weights);
  CHECK(weights[0] > weights[1]);
  CHECK(std::abs(weights[0] - 1.577753820348455e-5) <= 1e-6 * 1.577753820348455e-5);
  CHECK(std::abs(weights[1] - 6.761802087207664e-6) <= 1e-6 * 6.761802087207664e-6);
}

TEST_CASE("mean weights are one over w", "[temporal]") {
  for (const std::int64_t w : {1, 5, 37}) {
    CAPTURE(w);
    std::vector<float> weights(static_cast<std::size_t>(w));
    kernels::temporal_weights(kernels::TemporalMode::mean, 0.0f, weights);  // alpha unused by mean
    for (const float weight : weights) CHECK(weight == 1.0f / static_cast<float>(w));
  }
}

TEST_CASE("temporal aggregation matches brute force", "[temporal]") {
  // out[t] = sum_i weight_i * rows(i, t) in float: the weights are within u
  // of exact and the w-term sum adds at most gamma_w (Higham, 3.1), so
  // |out - exact| <= (w + 2) u * sum_i weight_i |rows(i, t)|.
  Random random(61);
  for (const std::int64_t w : {1, 3, 7, 32}) {
    for (const std::int64_t n : {1, 7, 37, 101}) {
      CAPTURE(w, n);
      RowMatrixXf rows(w, n);
      for (std::int64_t i = 0; i < w; ++i) {
        const std::vector<float> row = random.attention_row(n, 4.0);
        for (std::int64_t t = 0; t < n; ++t) rows(i, t) = row[static_cast<std::size_t>(t)];
      }
      const std::int64_t columns = std::max<std::int64_t>(n - w, 1);
      const float alpha = 0.3f;
      const std::vector<double> expected_ema = ema_recurrence(rows, alpha, columns);

      std::vector<float> out(static_cast<std::size_t>(n), -1.0f);
      std::vector<float> weights;
      kernels::temporal_ema(rows, columns, alpha, out, weights);
      const std::vector<double> closed = ema_closed_form(w, alpha);
      for (std::int64_t t = 0; t < columns; ++t) {
        double magnitude = 0.0;
        for (std::int64_t i = 0; i < w; ++i) magnitude += closed[static_cast<std::size_t>(i)] * std::abs(rows(i, t));
        CAPTURE(t);
        CHECK(std::abs(out[static_cast<std::size_t>(t)] - expected_ema[static_cast<std::size_t>(t)]) <=
              static_cast<double>(w + 2) * test::float_unit_roundoff * magnitude);
      }
      // Columns past `columns` are not written.
      for (std::int64_t t = columns; t < n; ++t) CHECK(out[static_cast<std::size_t>(t)] == -1.0f);

      kernels::temporal_mean(rows, columns, out, weights);
      for (std::int64_t t = 0; t < columns; ++t) {
        double mean = 0.0;
        double magnitude = 0.0;
        for (std::int64_t i = 0; i < w; ++i) {
          mean += rows(i, t);
          magnitude += std::abs(rows(i, t));
        }
        mean /= static_cast<double>(w);
        magnitude /= static_cast<double>(w);
        CAPTURE(t);
        CHECK(std::abs(out[static_cast<std::size_t>(t)] - mean) <=
              static_cast<double>(w + 2) * test::float_unit_roundoff * magnitude);
      }
    }
  }
}

TEST_CASE("temporal kernels reject bad arguments", "[temporal]") {
  std::vector<float> weights(3);
  SECTION("alpha outside (0, 1]") {
    for (const float alpha : {0.0f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
      CAPTURE(alpha);
      REQUIRE_THROWS_WITH(kernels::temporal_weights(kernels::TemporalMode::ema, alpha, weights),
                          Catch::Contains("alpha (") && Catch::Contains(") must be in (0, 1]"));
    }
  }
  SECTION("empty window") {
    std::vector<float> none;
    REQUIRE_THROWS_WITH(kernels::temporal_weights(kernels::TemporalMode::mean, 0.5f, none),
                        Catch::Contains("window (0) must be at least 1"));
  }
  SECTION("aggregation shapes") {
    const RowMatrixXf rows = RowMatrixXf::Ones(3, 5);
    std::vector<float> out(5);
    const std::vector<float> two(2, 0.5f);
    REQUIRE_THROWS_WITH(kernels::temporal_aggregate(rows, two, 5, out), Catch::Contains("2 weights for 3 rows"));
    REQUIRE_THROWS_WITH(kernels::temporal_aggregate(rows, weights, 6, out),
                        Catch::Contains("columns (6) must be in [0, 5]"));
    std::vector<float> short_out(3);
    REQUIRE_THROWS_WITH(kernels::temporal_aggregate(rows, weights, 4, short_out),
                        Catch::Contains("fit out (3)"));
  }
}
