// Output-reconstruction scores: every evaluation form (direct Gram, cached
// expanded Gram, naive W_o V, unprojected) against a double brute force, the
// exact-removal identity for every token, the hand example, and finite
// scores when one token has almost all the attention.
#include <catch2/catch.hpp>

#include "kvevict/kernels/reconstruction.hpp"
#include "test_helpers.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using namespace kvevict;
using kvevict::test::Random;
using kvevict::test::RowMatrixXd;

namespace {

constexpr double u = test::float_unit_roundoff;

double odds_ratio_double(double a) { return a / std::max(1.0 - a, static_cast<double>(kernels::eps_odds)); }

// Returns ||W (o - v)|| in double, W being [D x d].
double projected_distance(const RowMatrixXd& w, const std::vector<double>& o, const std::vector<double>& v) {
  double squared = 0.0;
  for (Eigen::Index r = 0; r < w.rows(); ++r) {
    double component = 0.0;
    for (Eigen::Index k = 0; k < w.cols(); ++k) {
      component += w(r, k) * (o[static_cast<std::size_t>(k)] - v[static_cast<std::size_t>(k)]);
    }
    squared += component * component;
  }
  return std::sqrt(squared);
}

// || |W| x || for a non-negative x: the magnitude that scales the rounding
// error of W x and of x^T W^T W x.
double absolute_projection_norm(const RowMatrixXd& w, const std::vector<double>& x) {
  double squared = 0.0;
  for (Eigen::Index r = 0; r < w.rows(); ++r) {
    double component = 0.0;
    for (Eigen::Index k = 0; k < w.cols(); ++k) component += std::abs(w(r, k)) * x[static_cast<std::size_t>(k)];
    squared += component * component;
  }
  return std::sqrt(squared);
}

std::vector<double> row_of(const RowMatrixXd& m, Eigen::Index r) {
  std::vector<double> out(static_cast<std::size_t>(m.cols()));
  for (Eigen::Index k = 0; k < m.cols(); ++k) out[static_cast<std::size_t>(k)] = m(r, k);
  return out;
}

std::vector<double> absolute(std::vector<double> x) {
  for (double& value : x) value = std::abs(value);
  return x;
}

// Tolerance of one score r * base^exponent: the float base is within
// `base_delta` of the exact one (bounded per form below), the odds ratio,
// the product and the root or power add at most 8u relative.
double score_tolerance(double odds, double base, double base_delta, double exponent, double score) {
  return odds * test::power_difference_bound(base, base_delta, exponent) * (1.0 + 8.0 * u) + 8.0 * u * score;
}

// Inputs of one scoring problem for query head q of a layer.
struct Problem {
  std::int64_t n;
  std::int64_t p;  // scored slots, p <= n
  int d;
  int model_width;
  RowMatrixXf w_o;          // [D, n_heads * d]
  RowMatrixXf values;       // [n, d]
  std::vector<float> weights;  // [p]
  Eigen::VectorXf o;        // [d]
};

Problem make_problem(Random& random, std::int64_t n, std::int64_t p, int d, int model_width, int n_heads) {
  Problem problem{n, p, d, model_width, random.matrix(model_width, n_heads * d),
                  random.matrix(n, d, -2.0, 2.0), {}, Eigen::VectorXf(d)};
  const std::vector<float> row = random.attention_row(n, 3.0);
  problem.weights.assign(row.begin(), row.begin() + p);
  kernels::weighted_output(row, problem.values, problem.o);
  return problem;
}

}  // namespace

TEST_CASE("odds_ratio floors the denominator", "[reconstruction]") {
  CHECK(kernels::odds_ratio(0.5f) == 1.0f);
  CHECK(kernels::odds_ratio(0.0f) == 0.0f);
  CHECK(kernels::odds_ratio(0.25f) == Approx(1.0 / 3.0).epsilon(4 * u));
  // 1 - a below eps_odds = 1e-6: the denominator is eps_odds.
  CHECK(kernels::odds_ratio(1.0f) == 1.0f / kernels::eps_odds);
  const float almost = 1.0f - 1e-7f;
  CHECK(kernels::odds_ratio(almost) == almost / kernels::eps_odds);
  CHECK(std::isfinite(kernels::odds_ratio(1.0f)));
}

TEST_CASE("gram_matrices match brute force", "[reconstruction]") {
  // G_q(k, l) = sum_r W(r, q d + k) W(r, q d + l): a D-term sum in float,
  // within gamma_D * sum_r |W(r, .k)| |W(r, .l)| (Higham, 3.1).
  Random random(81);
  for (const auto& [n_heads, d, model_width] : std::vector<std::tuple<int, int, int>>{{5, 3, 7}, {6, 5, 13}, {4, 12, 37}}) {
    CAPTURE(n_heads, d, model_width);
    const RowMatrixXf w_o = random.matrix(model_width, n_heads * d);
    const std::vector<Eigen::MatrixXf> grams = kernels::gram_matrices(w_o, n_heads, d);
    REQUIRE(grams.size() == static_cast<std::size_t>(n_heads));
    const double gamma = model_width * u / (1.0 - model_width * u);
    for (int q = 0; q < n_heads; ++q) {
      for (int k = 0; k < d; ++k) {
        for (int l = 0; l < d; ++l) {
          double exact = 0.0;
          double magnitude = 0.0;
          for (int r = 0; r < model_width; ++r) {
            exact += static_cast<double>(w_o(r, q * d + k)) * w_o(r, q * d + l);
            magnitude += std::abs(static_cast<double>(w_o(r, q * d + k)) * w_o(r, q * d + l));
          }
          CAPTURE(q, k, l);
          CHECK(std::abs(grams[static_cast<std::size_t>(q)](k, l) - exact) <= gamma * magnitude);
        }
      }
    }
  }
}

TEST_CASE("gram_matrices read a block of a wider matrix", "[reconstruction]") {
  // W_o passed as the left columns of a wider row-major matrix: the view
  // has an outer stride, and the finiteness check must read the block's
  // own entries, not the padding columns.
  Random random(82);
  const int n_heads = 2;
  const int d = 3;
  const int model_width = 5;
  RowMatrixXf wide = random.matrix(model_width, n_heads * d + 4);
  const RowMatrixXf block = wide.leftCols(n_heads * d);

  for (int r = 0; r < model_width; ++r) wide(r, n_heads * d + 1) = std::numeric_limits<float>::quiet_NaN();
  const std::vector<Eigen::MatrixXf> from_view = kernels::gram_matrices(wide.leftCols(n_heads * d), n_heads, d);
  const std::vector<Eigen::MatrixXf> from_copy = kernels::gram_matrices(block, n_heads, d);
  CHECK(from_view == from_copy);

  wide(model_width - 1, n_heads * d - 1) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(kernels::gram_matrices(wide.leftCols(n_heads * d), n_heads, d),
                      Catch::Contains("W_o") && Catch::Contains("inf"));
}

TEMPLATE_TEST_CASE("weighted_output and quadratic_forms match brute force", "[reconstruction]", float, Eigen::half) {
  // weighted_output: an m-term sum, within gamma_m * sum_t a_t |v_t| per
  // component. quadratic_forms: v^T G v through (v G) v, two d-term sums,
  // within gamma_2d * |v|^T |G| |v|.
  Random random(83);
  for (const std::int64_t n : {1, 7, 37, 101}) {
    for (const int d : {3, 5, 12}) {
      CAPTURE(n, d);
      const RowMatrix<TestType> values = random.matrix(n, d, -2.0, 2.0).template cast<TestType>();
      const RowMatrixXd exact_values = test::to_double(values);
      const std::vector<float> weights = random.attention_row(n, 3.0);
      const std::int64_t m = std::max<std::int64_t>(1, n - 2);
      Eigen::VectorXf o(d);
      kernels::weighted_output(std::span<const float>(weights.data(), static_cast<std::size_t>(m)), values, o);
      const double gamma_m = static_cast<double>(m) * u / (1.0 - static_cast<double>(m) * u);
      for (int k = 0; k < d; ++k) {
        double exact = 0.0;
        double magnitude = 0.0;
        for (std::int64_t t = 0; t < m; ++t) {
          exact += weights[static_cast<std::size_t>(t)] * exact_values(t, k);
          magnitude += std::abs(weights[static_cast<std::size_t>(t)] * exact_values(t, k));
        }
        CAPTURE(k);
        CHECK(std::abs(o(k) - exact) <= gamma_m * magnitude);
      }

      const RowMatrixXf w = random.matrix(7, d);
      const Eigen::MatrixXf gram = w.transpose() * w;
      std::vector<float> forms(static_cast<std::size_t>(n));
      kernels::quadratic_forms(values, gram, forms);
      const double gamma_2d = 2.0 * d * u / (1.0 - 2.0 * d * u);
      for (std::int64_t t = 0; t < n; ++t) {
        double exact = 0.0;
        double magnitude = 0.0;
        for (int k = 0; k < d; ++k) {
          for (int l = 0; l < d; ++l) {
            exact += exact_values(t, k) * gram(k, l) * exact_values(t, l);
            magnitude += std::abs(exact_values(t, k) * gram(k, l) * exact_values(t, l));
          }
        }
        CAPTURE(t);
        CHECK(std::abs(forms[static_cast<std::size_t>(t)] - exact) <= gamma_2d * magnitude);
      }
    }
  }
}

TEMPLATE_TEST_CASE("reconstruction_scores forms match brute force", "[reconstruction]", float, Eigen::half) {
  // Brute force in double: score_t = odds(a_t) * ||W (o - v_t)||^tau from the
  // same float (or half) inputs and the double W. Error bounds of the float
  // base, per form, with M_t = || |W| |o - v_t| ||^2 and
  // S_t = (|| |W| |o| || + || |W| |v_t| ||)^2 (both >= the exact e_t^2):
  //  - direct, e^2 = (v - o)^T G (v - o): G's D-term sums (gamma_D), v - o
  //    (u per coordinate, 2u in e^2), then two d-term sums: (D + 2d + 6) u M_t;
  //  - cached expanded, e^2 = o^T G o - 2 (G o)^T v + v^T G v: the same sums
  //    spread over three terms whose magnitudes add up to S_t, which can be
  //    much larger than e_t^2 (cancellation): (D + 2d + 6) u S_t;
  //  - naive, e = ||W v - W o||: each projected coordinate is a d-term sum
  //    (gamma_d of |W| (|v| + |o|)), the norm adds (D/2 + 2) u relative;
  //  - unprojected, e^2 = ||v - o||^2: (d + 4) u e_t^2.
  // Each bound is doubled for second-order terms.
  Random random(84);
  const int n_heads = 3;
  for (const std::int64_t n : {1, 7, 37, 101}) {
    for (const int d : {3, 5, 12}) {
      for (const int model_width : {d, 13}) {
        for (const float tau : {1.0f, 0.5f, 2.0f}) {
          const std::int64_t p = n > 3 ? n - 3 : n;  // score the past, not the window
          Problem problem = make_problem(random, n, p, d, model_width, n_heads);
          const RowMatrix<TestType> values = problem.values.template cast<TestType>();
          const RowMatrixXd exact_values = test::to_double(values);
          const std::vector<Eigen::MatrixXf> grams = kernels::gram_matrices(problem.w_o, n_heads, d);
          const int q = static_cast<int>(n % n_heads);
          const RowMatrixXf w_head = problem.w_o.middleCols(q * d, d);
          const RowMatrixXd exact_w = test::to_double(w_head);
          const Eigen::MatrixXf& gram = grams[static_cast<std::size_t>(q)];

          std::vector<float> cached(static_cast<std::size_t>(n));
          kernels::quadratic_forms(values, gram, cached);
          std::vector<float> direct(static_cast<std::size_t>(p));
          std::vector<float> expanded(static_cast<std::size_t>(p));
          std::vector<float> naive(static_cast<std::size_t>(p));
          std::vector<float> unprojected(static_cast<std::size_t>(p));
          kernels::reconstruction_scores(problem.weights, values, problem.o, &gram, {}, tau, direct);
          kernels::reconstruction_scores(problem.weights, values, problem.o, &gram, cached, tau, expanded);
          kernels::reconstruction_scores_naive(problem.weights, values, problem.o, w_head, tau, naive);
          kernels::reconstruction_scores(problem.weights, values, problem.o, nullptr, {}, 1.0f, unprojected);

          const std::vector<double> o(problem.o.data(), problem.o.data() + d);
          const double o_projection = absolute_projection_norm(exact_w, absolute(o));
          for (std::int64_t t = 0; t < p; ++t) {
            CAPTURE(n, d, model_width, tau, q, t);
            const std::vector<double> v = row_of(exact_values, t);
            std::vector<double> difference(static_cast<std::size_t>(d));
            std::vector<double> sum_of_magnitudes(static_cast<std::size_t>(d));
            double unprojected_squared = 0.0;
            for (int k = 0; k < d; ++k) {
              const auto index = static_cast<std::size_t>(k);
              difference[index] = std::abs(o[index] - v[index]);
              sum_of_magnitudes[index] = std::abs(o[index]) + std::abs(v[index]);
              unprojected_squared += difference[index] * difference[index];
            }
            const double odds = odds_ratio_double(problem.weights[static_cast<std::size_t>(t)]);
            const double e = projected_distance(exact_w, o, v);
            const double e_squared = e * e;
            const double m_t = std::pow(absolute_projection_norm(exact_w, difference), 2.0);
            const double s_t = std::pow(o_projection + absolute_projection_norm(exact_w, absolute(v)), 2.0);
            const double score = odds * std::pow(e, static_cast<double>(tau));
            const double half_tau = 0.5 * static_cast<double>(tau);
            const double width_terms = static_cast<double>(model_width + 2 * d + 6);
            const auto index = static_cast<std::size_t>(t);

            CHECK(std::abs(direct[index] - score) <=
                  score_tolerance(odds, e_squared, 2.0 * width_terms * u * m_t, half_tau, score));
            CHECK(std::abs(expanded[index] - score) <=
                  score_tolerance(odds, e_squared, 2.0 * width_terms * u * s_t, half_tau, score));
            const double naive_delta =
                2.0 * ((d + 1) * u * absolute_projection_norm(exact_w, sum_of_magnitudes) +
                       (0.5 * model_width + 2.0) * u * e);
            CHECK(std::abs(naive[index] - score) <= score_tolerance(odds, e, naive_delta, tau, score));
            const double plain = odds * std::sqrt(unprojected_squared);
            CHECK(std::abs(unprojected[index] - plain) <=
                  score_tolerance(odds, unprojected_squared, 2.0 * (d + 4) * u * unprojected_squared, 0.5, plain));
          }
        }
      }
    }
  }
}

TEST_CASE("reconstruction score equals exact removal", "[reconstruction]") {
  // For one attention row a, removing token i and renormalising the others
  // changes the output by exactly a_i / (1 - a_i) * (v_i - o). The brute force
  // removes every token in double, recomputes o' from the remaining weights
  // and projects o - o' by W_o^q. The kernel's score with tau = 1 and the
  // full row must agree to 1e-5 relative.
  Random random(85);
  const int n_heads = 3;
  for (const std::int64_t n : {2, 7, 37, 101}) {
    for (const int d : {3, 5, 12}) {
      for (const int model_width : {7, 13}) {
        Problem problem = make_problem(random, n, n, d, model_width, n_heads);
        const std::vector<Eigen::MatrixXf> grams = kernels::gram_matrices(problem.w_o, n_heads, d);
        // The float weights sum to 1 within 2^-24. Dividing the double copy
        // by their sum makes the exact identity hold in the brute force.
        std::vector<double> a(problem.weights.begin(), problem.weights.end());
        double total = 0.0;
        for (const double x : a) total += x;
        for (double& x : a) x /= total;
        const RowMatrixXd exact_values = test::to_double(problem.values);

        std::vector<double> o(static_cast<std::size_t>(d), 0.0);
        for (std::int64_t t = 0; t < n; ++t) {
          for (int k = 0; k < d; ++k) o[static_cast<std::size_t>(k)] += a[static_cast<std::size_t>(t)] * exact_values(t, k);
        }

        for (int q = 0; q < n_heads; ++q) {
          std::vector<float> scores(static_cast<std::size_t>(n));
          kernels::reconstruction_scores(problem.weights, problem.values, problem.o,
                                         &grams[static_cast<std::size_t>(q)], {}, 1.0f, scores);
          const RowMatrixXd exact_w = test::to_double(problem.w_o.middleCols(q * d, d));
          for (std::int64_t i = 0; i < n; ++i) {
            double remaining = 0.0;
            std::vector<double> without(static_cast<std::size_t>(d), 0.0);
            for (std::int64_t t = 0; t < n; ++t) {
              if (t == i) continue;
              remaining += a[static_cast<std::size_t>(t)];
              for (int k = 0; k < d; ++k) {
                without[static_cast<std::size_t>(k)] += a[static_cast<std::size_t>(t)] * exact_values(t, k);
              }
            }
            for (double& x : without) x /= remaining;
            const double change = projected_distance(exact_w, o, without);
            CAPTURE(n, d, model_width, q, i, change);
            CHECK(std::abs(scores[static_cast<std::size_t>(i)] - change) <= 1e-5 * change);
          }
        }
      }
    }
  }
}

TEST_CASE("reconstruction hand example", "[reconstruction]") {
  // a = (0.5, 0.25, 0.25), v = ((1, 0), (0, 1), (0, 0)): o = (0.5, 0.25).
  // Removing token 0 gives o' = (0, 0.5) and o - o' = (0.5, -0.25). The
  // score is odds 1 times ||v_0 - o|| = ||(0.5, -0.25)|| = sqrt(0.3125).
  // Tokens 1 and 2: odds 1/3 times ||(-0.5, 0.75)|| and ||(-0.5, -0.25)||.
  const std::vector<float> weights = {0.5f, 0.25f, 0.25f};
  RowMatrixXf values(3, 2);
  values << 1, 0, 0, 1, 0, 0;
  Eigen::VectorXf o(2);
  kernels::weighted_output(weights, values, o);
  CHECK(o(0) == 0.5f);
  CHECK(o(1) == 0.25f);

  const std::vector<double> expected = {std::sqrt(0.3125), std::sqrt(0.8125) / 3.0, std::sqrt(0.3125) / 3.0};
  const Eigen::MatrixXf identity = Eigen::MatrixXf::Identity(2, 2);
  std::vector<float> cached(3);
  kernels::quadratic_forms(values, identity, cached);
  std::vector<float> scores(3);
  for (const bool use_gram : {false, true}) {
    for (const bool use_cache : {false, true}) {
      if (use_cache && !use_gram) continue;
      CAPTURE(use_gram, use_cache);
      kernels::reconstruction_scores(weights, values, o, use_gram ? &identity : nullptr,
                                     use_cache ? std::span<const float>(cached) : std::span<const float>{}, 1.0f,
                                     scores);
      for (std::size_t t = 0; t < 3; ++t) {
        CAPTURE(t);
        CHECK(std::abs(scores[t] - expected[t]) <= 8.0 * u * expected[t]);
      }
    }
  }
}

TEST_CASE("reconstruction with identity W_o equals unprojected", "[reconstruction]") {
  // W_o^q = I (D = d) makes G = I, so the projected distance is the plain
  // one. Scaling W_o by c scales every tau = 1 score by c.
  Random random(86);
  const int d = 5;
  const std::int64_t n = 37;
  Problem problem = make_problem(random, n, n, d, d, 1);
  const Eigen::MatrixXf identity = Eigen::MatrixXf::Identity(d, d);
  const Eigen::MatrixXf scaled = 9.0f * identity;  // W_o = 3 I
  std::vector<float> plain(static_cast<std::size_t>(n));
  std::vector<float> projected(static_cast<std::size_t>(n));
  std::vector<float> tripled(static_cast<std::size_t>(n));
  kernels::reconstruction_scores(problem.weights, problem.values, problem.o, nullptr, {}, 1.0f, plain);
  kernels::reconstruction_scores(problem.weights, problem.values, problem.o, &identity, {}, 1.0f, projected);
  kernels::reconstruction_scores(problem.weights, problem.values, problem.o, &scaled, {}, 1.0f, tripled);
  for (std::size_t t = 0; t < plain.size(); ++t) {
    CAPTURE(t);
    // Both evaluate a d-term sum of squares of the same differences.
    CHECK(std::abs(projected[t] - plain[t]) <= 2.0 * (d + 4) * u * plain[t]);
    CHECK(std::abs(tripled[t] - 3.0 * plain[t]) <= 2.0 * (d + 4) * u * 3.0 * plain[t]);
  }
}

TEMPLATE_TEST_CASE("reconstruction scores finite when a approaches 1", "[reconstruction]", float, Eigen::half) {
  // One token has all or almost all the attention: 1 - a is below
  // eps_odds, so the odds ratio is a / eps_odds (about 1e6) and the distance
  // ||W (v_0 - o)|| is about 0 (exactly 0 when a is exactly 1). Every form
  // must give finite, non-negative scores.
  Random random(87);
  const int d = 5;
  const std::int64_t n = 7;
  const RowMatrix<TestType> values = random.matrix(n, d, -2.0, 2.0).template cast<TestType>();
  const RowMatrixXf w_head = random.matrix(13, d);
  const Eigen::MatrixXf gram = w_head.transpose() * w_head;
  std::vector<float> cached(static_cast<std::size_t>(n));
  kernels::quadratic_forms(values, gram, cached);

  const float almost = 1.0f - 1e-7f;
  const float rest = (1.0f - almost) / static_cast<float>(n - 1);
  std::vector<std::vector<float>> rows = {std::vector<float>(static_cast<std::size_t>(n), 0.0f),
                                          std::vector<float>(static_cast<std::size_t>(n), rest)};
  rows[0][2] = 1.0f;
  rows[1][2] = almost;
  for (const std::vector<float>& weights : rows) {
    CAPTURE(weights[2]);
    Eigen::VectorXf o(d);
    kernels::weighted_output(weights, values, o);
    std::vector<std::vector<float>> outputs(5, std::vector<float>(static_cast<std::size_t>(n)));
    kernels::reconstruction_scores(weights, values, o, &gram, {}, 1.0f, outputs[0]);
    kernels::reconstruction_scores(weights, values, o, &gram, cached, 1.0f, outputs[1]);
    kernels::reconstruction_scores(weights, values, o, &gram, cached, 0.5f, outputs[2]);
    kernels::reconstruction_scores(weights, values, o, nullptr, {}, 1.0f, outputs[3]);
    kernels::reconstruction_scores_naive(weights, values, o, w_head, 1.0f, outputs[4]);
    for (std::size_t form = 0; form < outputs.size(); ++form) {
      for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) {
        CAPTURE(form, t);
        CHECK(std::isfinite(outputs[form][t]));
        CHECK(outputs[form][t] >= 0.0f);
      }
    }
    if (weights[2] == 1.0f) {
      // o equals v_2 exactly, so the direct and unprojected forms give 0.
      CHECK(outputs[0][2] == 0.0f);
      CHECK(outputs[3][2] == 0.0f);
    }
  }
}

TEST_CASE("reconstruction kernels reject bad arguments", "[reconstruction]") {
  Random random(88);
  const RowMatrixXf values = random.matrix(5, 3);
  const std::vector<float> weights(4, 0.25f);
  const Eigen::VectorXf o = Eigen::VectorXf::Zero(3);
  const Eigen::MatrixXf gram = Eigen::MatrixXf::Identity(3, 3);
  std::vector<float> out(4);

  REQUIRE_THROWS_WITH(kernels::reconstruction_scores(weights, values, o, &gram, {}, 0.0f, out),
                      Catch::Contains("tau (0) must be finite and > 0"));
  REQUIRE_THROWS_WITH(kernels::reconstruction_scores(weights, values, o, &gram, {}, std::nanf(""), out),
                      Catch::Contains("tau (nan)"));
  const Eigen::MatrixXf wrong_gram = Eigen::MatrixXf::Identity(4, 4);
  REQUIRE_THROWS_WITH(kernels::reconstruction_scores(weights, values, o, &wrong_gram, {}, 1.0f, out),
                      Catch::Contains("G is [4 x 4], expected [3 x 3]"));
  const std::vector<float> short_cache(3, 1.0f);
  REQUIRE_THROWS_WITH(kernels::reconstruction_scores(weights, values, o, &gram, short_cache, 1.0f, out),
                      Catch::Contains("cached quadratic forms have 3 entries, need 4"));
  std::vector<float> short_out(3);
  REQUIRE_THROWS_WITH(kernels::reconstruction_scores(weights, values, o, &gram, {}, 1.0f, short_out),
                      Catch::Contains("4 weights, 5 values, out 3"));
  const std::vector<float> too_many(6, 0.1f);
  std::vector<float> out6(6);
  REQUIRE_THROWS_WITH(kernels::reconstruction_scores(too_many, values, o, &gram, {}, 1.0f, out6),
                      Catch::Contains("6 weights, 5 values"));

  REQUIRE_THROWS_WITH(kernels::gram_matrices(random.matrix(7, 8), 3, 3),
                      Catch::Contains("W_o has 8 columns, expected n_heads * head_dim = 3 * 3"));
  RowMatrixXf bad = random.matrix(7, 9);
  bad(6, 8) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(kernels::gram_matrices(bad, 3, 3), Catch::Contains("W_o") && Catch::Contains("nan"));

  std::vector<float> forms(4);
  REQUIRE_THROWS_WITH(kernels::quadratic_forms(values, gram, forms), Catch::Contains("shapes do not match"));
  Eigen::VectorXf short_o(2);
  REQUIRE_THROWS_WITH(kernels::weighted_output(weights, values, short_o), Catch::Contains("o has 2 entries"));
}
