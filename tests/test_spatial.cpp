// Spatial smoothing: avg, max and shifted average pooling against brute
// force, the hand-worked adaptive example (drift 4, K 5, shift 2), both
// shift roundings at their edge cases, and the drift against a full sort in
// exact integer arithmetic.
#include <catch2/catch.hpp>

#include "kvevict/kernels/select.hpp"
#include "kvevict/kernels/spatial.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

using namespace kvevict;
using kvevict::test::Random;

namespace {

// Symmetric average with zero padding and divisor k, in double.
std::vector<double> brute_avg_pool(const std::vector<float>& s, std::int64_t k) {
  const auto p = static_cast<std::int64_t>(s.size());
  std::vector<double> out(s.size());
  for (std::int64_t t = 0; t < p; ++t) {
    double sum = 0.0;
    for (std::int64_t u = t - k / 2; u <= t + k / 2; ++u) {
      if (u >= 0 && u < p) sum += s[static_cast<std::size_t>(u)];
    }
    out[static_cast<std::size_t>(t)] = sum / static_cast<double>(k);
  }
  return out;
}

// Symmetric max over the window intersected with [0, P).
std::vector<float> brute_max_pool(const std::vector<float>& s, std::int64_t k) {
  const auto p = static_cast<std::int64_t>(s.size());
  std::vector<float> out(s.size());
  for (std::int64_t t = 0; t < p; ++t) {
    float best = s[static_cast<std::size_t>(t)];
    for (std::int64_t u = std::max<std::int64_t>(0, t - k / 2); u <= std::min(p - 1, t + k / 2); ++u) {
      best = std::max(best, s[static_cast<std::size_t>(u)]);
    }
    out[static_cast<std::size_t>(t)] = best;
  }
  return out;
}

// Average of width k centred at t + shift, edge values repeated.
std::vector<double> brute_shifted_avg_pool(const std::vector<float>& s, std::int64_t k, std::int64_t shift) {
  const auto p = static_cast<std::int64_t>(s.size());
  std::vector<double> out(s.size());
  for (std::int64_t t = 0; t < p; ++t) {
    double sum = 0.0;
    for (std::int64_t u = t - k / 2 + shift; u <= t + k / 2 + shift; ++u) {
      sum += s[static_cast<std::size_t>(std::clamp<std::int64_t>(u, 0, p - 1))];
    }
    out[static_cast<std::size_t>(t)] = sum / static_cast<double>(k);
  }
  return out;
}

// Bound for the pooled averages: the kernels keep a running sum in double
// over 2 (P + k) additions and subtractions, each off by at most 2^-53 times
// a partial sum of at most k max|s|, then divide by k and round to float
// once (u = 2^-24 relative).
double pool_tolerance(double expected, std::int64_t p, std::int64_t k, double max_abs) {
  return test::float_unit_roundoff * std::abs(expected) + 2.0 * static_cast<double>(p + k) * 0x1p-53 * max_abs;
}

double max_abs(const std::vector<float>& s) {
  double largest = 0.0;
  for (const float x : s) largest = std::max(largest, static_cast<double>(std::abs(x)));
  return largest;
}

void require_close(const std::vector<float>& actual, const std::vector<double>& expected, double tolerance) {
  REQUIRE(actual.size() == expected.size());
  for (std::size_t t = 0; t < actual.size(); ++t) {
    CAPTURE(t);
    CHECK(std::abs(actual[t] - expected[t]) <= tolerance);
  }
}

}  // namespace

TEST_CASE("pooling matches brute force", "[spatial]") {
  Random random(71);
  std::vector<std::int64_t> scratch;
  for (const std::int64_t p : {1, 2, 7, 37, 101}) {
    // Kernel sizes from 1 up to wider than the row.
    for (const std::int64_t k : std::vector<std::int64_t>{1, 3, 5, 7, 21, 2 * p + 3}) {
      CAPTURE(p, k);
      const std::vector<float> s = random.vector(p, -1.0, 1.0);
      const double largest = max_abs(s);
      std::vector<float> out(s.size());

      kernels::avg_pool(s, k, out);
      const std::vector<double> avg = brute_avg_pool(s, k);
      for (std::size_t t = 0; t < s.size(); ++t) {
        CAPTURE(t);
        CHECK(std::abs(out[t] - avg[t]) <= pool_tolerance(avg[t], p, k, largest));
      }

      kernels::max_pool(s, k, out, scratch);
      CHECK(out == brute_max_pool(s, k));

      for (std::int64_t shift = -(k / 2); shift <= k / 2; ++shift) {
        CAPTURE(shift);
        kernels::shifted_avg_pool(s, k, shift, out);
        const std::vector<double> shifted = brute_shifted_avg_pool(s, k, shift);
        for (std::size_t t = 0; t < s.size(); ++t) {
          CAPTURE(t);
          CHECK(std::abs(out[t] - shifted[t]) <= pool_tolerance(shifted[t], p, k, largest));
        }
      }
    }
  }
}

TEST_CASE("max_pool ignores positions outside the row", "[spatial]") {
  // All scores negative: zero padding would make every edge maximum 0.
  const std::vector<float> s = {-5.0f, -3.0f, -4.0f, -4.0f, -1.0f, -2.0f, -6.0f};
  std::vector<float> out(s.size());
  std::vector<std::int64_t> scratch;
  kernels::max_pool(s, 3, out, scratch);
  CHECK(out == std::vector<float>{-3.0f, -3.0f, -3.0f, -1.0f, -1.0f, -1.0f, -2.0f});
  kernels::max_pool(s, 5, out, scratch);
  CHECK(out == std::vector<float>{-3.0f, -3.0f, -1.0f, -1.0f, -1.0f, -1.0f, -1.0f});
}

TEST_CASE("pooling hand examples", "[spatial]") {
  // Past scores s = (0, 0, 6, 0, 0, 1). Expected values are exact
  // fractions, and the float results are within u of them.
  const std::vector<float> s = {0.0f, 0.0f, 6.0f, 0.0f, 0.0f, 1.0f};
  std::vector<float> out(s.size());
  const double tolerance = 2.0 * test::float_unit_roundoff * 2.0;  // u times the largest value, doubled

  SECTION("K = 5, shift 2: sm[t] = (1/5) sum_{u=t}^{t+4} s[min(u, 5)]") {
    kernels::shifted_avg_pool(s, 5, 2, out);
    require_close(out, {1.2, 1.4, 1.6, 0.6, 0.8, 1.0}, tolerance);
  }
  SECTION("K = 3, shift 0, replicate padding") {
    kernels::shifted_avg_pool(s, 3, 0, out);
    require_close(out, {0.0, 2.0, 2.0, 2.0, 1.0 / 3.0, 2.0 / 3.0}, tolerance);
  }
  SECTION("K = 3, shift +1") {
    kernels::shifted_avg_pool(s, 3, 1, out);
    require_close(out, {2.0, 2.0, 2.0, 1.0 / 3.0, 2.0 / 3.0, 1.0}, tolerance);
  }
  SECTION("symmetric avg k = 5, zero padding with divisor 5") {
    kernels::avg_pool(s, 5, out);
    require_close(out, {1.2, 1.2, 1.2, 1.4, 1.4, 0.2}, tolerance);
  }
  SECTION("symmetric avg k = 3 on six-digit scores") {
    // The scores of a hand-worked ReST-KV example and their pooled values,
    // both rounded to 6 digits (5e-7 each), so the check allows 1.5e-6.
    const std::vector<float> scores = {0.039406f, 0.085532f, 0.452922f, 0.178673f, 0.990093f, 0.178673f};
    kernels::avg_pool(scores, 3, out);
    require_close(out, {0.041646, 0.192620, 0.239042, 0.540563, 0.449146, 0.389589}, 1.5e-6);
  }
}

namespace {

// Builds the attention rows of the hand example, n = 10 and w = 4, where
// query i attends to slots 0 .. 6 + i. Each row puts `first` on slot a, `second` on slot b and
// spreads the rest evenly over its other visible slots.
RowMatrixXf hand_rows(const std::vector<std::pair<std::int64_t, std::int64_t>>& top_two) {
  const std::int64_t n = 10;
  RowMatrixXf rows = RowMatrixXf::Zero(4, n);
  const std::vector<std::pair<float, float>> weights = {{0.4f, 0.3f}, {0.4f, 0.3f}, {0.5f, 0.3f}, {0.5f, 0.3f}};
  for (std::int64_t i = 0; i < 4; ++i) {
    const std::int64_t visible = 7 + i;
    const auto [a, b] = top_two[static_cast<std::size_t>(i)];
    const auto [first, second] = weights[static_cast<std::size_t>(i)];
    const float rest = (1.0f - first - second) / static_cast<float>(visible - 2);
    for (std::int64_t t = 0; t < visible; ++t) rows(i, t) = rest;
    rows(i, a) = first;
    rows(i, b) = second;
  }
  return rows;
}

}  // namespace

TEST_CASE("adaptive_kernel hand example", "[spatial]") {
  // Top-2 sets {4,5}, {4,5}, {0,1}, {0,1}: centroids 4.5, 4.5, 0.5, 0.5, so
  // D = 4.5 - 0.5 = 4. With m = 2, S_a = 2, k_min = 3:
  // K = max(3, 2 * floor(4 / 2) + 1) = 5 and shift = 4 / 2 = 2, for both
  // roundings because D > 0 and D / S_a is an integer.
  const RowMatrixXf rows = hand_rows({{4, 5}, {5, 4}, {0, 1}, {1, 0}});
  std::vector<std::int64_t> scratch;
  for (const auto rounding : {kernels::ShiftRounding::trunc, kernels::ShiftRounding::reference}) {
    CAPTURE(static_cast<int>(rounding));
    const kernels::AdaptiveKernel kernel = kernels::adaptive_kernel(rows, 2, 3, 2.0, rounding, scratch);
    CHECK(kernel.drift == 4.0);
    CHECK(kernel.size == 5);
    CHECK(kernel.shift == 2);
  }

  // Smoothing the past scores with that kernel and keeping 2 past slots
  // keeps {1, 2}. The symmetric average of width 5 would keep {3, 4}.
  const std::vector<float> s = {0.0f, 0.0f, 6.0f, 0.0f, 0.0f, 1.0f};
  std::vector<float> smoothed(s.size());
  kernels::shifted_avg_pool(s, 5, 2, smoothed);
  std::vector<std::int64_t> kept(2);
  kernels::SelectScratch select_scratch;
  kernels::select_keep(smoothed, 6, 0, 0, 2, kept, select_scratch);
  CHECK(kept == std::vector<std::int64_t>{1, 2});
  kernels::avg_pool(s, 5, smoothed);
  kernels::select_keep(smoothed, 6, 0, 0, 2, kept, select_scratch);
  CHECK(kept == std::vector<std::int64_t>{3, 4});
}

TEST_CASE("adaptive_kernel shift rounding edge cases", "[spatial]") {
  std::vector<std::int64_t> scratch;
  const auto trunc = kernels::ShiftRounding::trunc;
  const auto reference = kernels::ShiftRounding::reference;

  SECTION("drift 0") {
    // Both halves pick {4, 5}: D = 0, K = k_min = 3. trunc gives shift 0,
    // the reference rounding floor(0) + 1 = 1. Smoothing s with each keeps
    // {2, 3} (a three-way tie at 2, the later slots win) and {1, 2}.
    const RowMatrixXf rows = hand_rows({{4, 5}, {5, 4}, {4, 5}, {5, 4}});
    const kernels::AdaptiveKernel truncated = kernels::adaptive_kernel(rows, 2, 3, 2.0, trunc, scratch);
    const kernels::AdaptiveKernel referenced = kernels::adaptive_kernel(rows, 2, 3, 2.0, reference, scratch);
    CHECK(truncated.drift == 0.0);
    CHECK(truncated.size == 3);
    CHECK(truncated.shift == 0);
    CHECK(referenced.size == 3);
    CHECK(referenced.shift == 1);

    const std::vector<float> s = {0.0f, 0.0f, 6.0f, 0.0f, 0.0f, 1.0f};
    std::vector<float> smoothed(s.size());
    std::vector<std::int64_t> kept(2);
    kernels::SelectScratch select_scratch;
    kernels::shifted_avg_pool(s, truncated.size, truncated.shift, smoothed);
    kernels::select_keep(smoothed, 6, 0, 0, 2, kept, select_scratch);
    CHECK(kept == std::vector<std::int64_t>{2, 3});
    kernels::shifted_avg_pool(s, referenced.size, referenced.shift, smoothed);
    kernels::select_keep(smoothed, 6, 0, 0, 2, kept, select_scratch);
    CHECK(kept == std::vector<std::int64_t>{1, 2});

    // With k_min = 1 the kernel has width 1, so the reference shift of +1
    // is clamped to 0 rather than cropping.
    const kernels::AdaptiveKernel narrow = kernels::adaptive_kernel(rows, 2, 1, 2.0, reference, scratch);
    CHECK(narrow.size == 1);
    CHECK(narrow.shift == 0);
  }

  SECTION("drift -m * scale") {
    // Halves swapped: D = 0.5 - 4.5 = -4, D / S_a = -2 exactly. trunc gives
    // -2, the reference rounding floor(-2) + 1 = -1. K = 5 for both.
    const RowMatrixXf rows = hand_rows({{0, 1}, {1, 0}, {4, 5}, {5, 4}});
    const kernels::AdaptiveKernel truncated = kernels::adaptive_kernel(rows, 2, 3, 2.0, trunc, scratch);
    const kernels::AdaptiveKernel referenced = kernels::adaptive_kernel(rows, 2, 3, 2.0, reference, scratch);
    CHECK(truncated.drift == -4.0);
    CHECK(truncated.size == 5);
    CHECK(truncated.shift == -2);
    CHECK(referenced.size == 5);
    CHECK(referenced.shift == -1);
  }

  SECTION("negative non-integer ratio: both roundings agree") {
    // D = -4 with S_a = 2.5: ratio -1.6, trunc -1, floor(-1.6) + 1 = -1;
    // K = max(3, 2 * 1 + 1) = 3.
    const RowMatrixXf rows = hand_rows({{0, 1}, {1, 0}, {4, 5}, {5, 4}});
    for (const auto rounding : {trunc, reference}) {
      const kernels::AdaptiveKernel kernel = kernels::adaptive_kernel(rows, 2, 3, 2.5, rounding, scratch);
      CAPTURE(static_cast<int>(rounding));
      CHECK(kernel.size == 3);
      CHECK(kernel.shift == -1);
    }
  }

  SECTION("positive non-integer ratio: both round down") {
    // D = 4 with S_a = 1.5: ratio 2.67, shift 2, K = 2 * 2 + 1 = 5.
    const RowMatrixXf rows = hand_rows({{4, 5}, {5, 4}, {0, 1}, {1, 0}});
    for (const auto rounding : {trunc, reference}) {
      const kernels::AdaptiveKernel kernel = kernels::adaptive_kernel(rows, 2, 3, 1.5, rounding, scratch);
      CAPTURE(static_cast<int>(rounding));
      CHECK(kernel.size == 5);
      CHECK(kernel.shift == 2);
    }
  }
}

namespace {

// Exact floor of a / b for integers, b > 0.
std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// The expected adaptive kernel from the definition, in exact integer
// arithmetic: top-m sets by full sort (higher weight first, the later slot
// first on ties), centroid sums as integers, then
// D / S_a = (A h2 - B h1) q / (m h1 h2 p) for S_a = p / q, where A and B are
// the halves' sums of top-m slot indices and h1, h2 their row counts.
struct ExactKernel {
  std::int64_t size;
  std::int64_t shift;
  double drift;
};

ExactKernel exact_adaptive_kernel(const RowMatrixXf& rows, std::int64_t m, std::int64_t k_min, std::int64_t p,
                                  std::int64_t q, kernels::ShiftRounding rounding) {
  const std::int64_t w = rows.rows();
  const std::int64_t n = rows.cols();
  m = std::clamp<std::int64_t>(m, 0, n);
  const std::int64_t h1 = w / 2;
  const std::int64_t h2 = w - h1;
  std::int64_t first = 0;
  std::int64_t second = 0;
  for (std::int64_t i = 0; i < w; ++i) {
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      if (rows(i, a) != rows(i, b)) return rows(i, a) > rows(i, b);
      return a > b;
    });
    const std::int64_t sum = std::accumulate(order.begin(), order.begin() + m, std::int64_t{0});
    (i < h1 ? first : second) += sum;
  }
  // ratio = numerator / denominator exactly. m = 0 gives centroids 0 and
  // drift 0.
  const std::int64_t numerator = (first * h2 - second * h1) * q;
  const std::int64_t denominator = std::max<std::int64_t>(m, 1) * h1 * h2 * p;
  const std::int64_t magnitude_floor = floor_div(std::abs(numerator), denominator);
  ExactKernel kernel{};
  kernel.drift = static_cast<double>(first * h2 - second * h1) / static_cast<double>(std::max<std::int64_t>(m, 1) * h1 * h2);
  kernel.size = std::max(k_min, 2 * magnitude_floor + 1);
  if (rounding == kernels::ShiftRounding::trunc) {
    kernel.shift = numerator >= 0 ? magnitude_floor : -magnitude_floor;
  } else {
    kernel.shift = floor_div(numerator, denominator) + (numerator > 0 ? 0 : 1);
  }
  kernel.shift = std::clamp(kernel.shift, -(kernel.size / 2), kernel.size / 2);
  return kernel;
}

}  // namespace

TEST_CASE("adaptive_kernel matches exact brute force", "[spatial]") {
  // Rows of small integers, so ties are frequent and the later slot must
  // win them. Odd windows split into halves of w/2 and w - w/2 rows. Scales
  // are exact binary fractions p / q, so the brute force can use integers.
  Random random(72);
  std::vector<std::int64_t> scratch;
  const std::vector<std::pair<std::int64_t, std::int64_t>> scales = {{1, 2}, {1, 1}, {2, 1}, {3, 1}, {3, 2}, {5, 4}};
  for (const std::int64_t n : {1, 7, 37, 101}) {
    for (const std::int64_t w : {2, 3, 5, 8}) {
      for (const std::int64_t m : {0, 1, 3, 6, 37, 200}) {
        for (const auto& [p, q] : scales) {
          for (const auto rounding : {kernels::ShiftRounding::trunc, kernels::ShiftRounding::reference}) {
            for (const std::int64_t k_min : {1, 3, 7}) {
              RowMatrixXf rows(w, n);
              for (std::int64_t i = 0; i < w; ++i) {
                const std::vector<float> row = random.quantized(n, 4);
                for (std::int64_t t = 0; t < n; ++t) rows(i, t) = row[static_cast<std::size_t>(t)];
              }
              const double scale = static_cast<double>(p) / static_cast<double>(q);
              CAPTURE(n, w, m, scale, static_cast<int>(rounding), k_min);
              const kernels::AdaptiveKernel kernel = kernels::adaptive_kernel(rows, m, k_min, scale, rounding, scratch);
              const ExactKernel expected = exact_adaptive_kernel(rows, m, k_min, p, q, rounding);
              CAPTURE(expected.drift, kernel.drift);
              CHECK(std::abs(kernel.drift - expected.drift) <= 1e-12 * (1.0 + std::abs(expected.drift)));
              CHECK(kernel.size == expected.size);
              CHECK(kernel.shift == expected.shift);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("adaptive_kernel on long rows", "[spatial]") {
  // Rows of several thousand slots with m small next to n, where the top-m
  // search may rank only the candidates above a bound taken from a strided
  // sample of the row. Three kinds of row: continuous values, four levels
  // (ties everywhere), and rows whose large values sit only at multiples of
  // 4, so a sample over those slots overestimates how many entries reach
  // its bound and the search must fall back to the whole row.
  Random random(73);
  std::vector<std::int64_t> scratch;
  for (const std::int64_t n : {4099, 5003}) {
    for (const std::int64_t w : {2, 5}) {
      for (const std::int64_t m : {1, 7, 100, 600}) {
        for (int kind = 0; kind < 3; ++kind) {
          RowMatrixXf rows(w, n);
          for (std::int64_t i = 0; i < w; ++i) {
            for (std::int64_t t = 0; t < n; ++t) {
              if (kind == 0) {
                rows(i, t) = static_cast<float>(random.uniform(0.0, 1.0));
              } else if (kind == 1) {
                rows(i, t) = static_cast<float>(random.integer(0, 3));
              } else {
                rows(i, t) = t % 4 == 0 ? static_cast<float>(random.uniform(0.5, 1.0)) : 0.0f;
              }
            }
          }
          CAPTURE(n, w, m, kind);
          for (const auto rounding : {kernels::ShiftRounding::trunc, kernels::ShiftRounding::reference}) {
            const kernels::AdaptiveKernel kernel = kernels::adaptive_kernel(rows, m, 3, 2.0, rounding, scratch);
            const ExactKernel expected = exact_adaptive_kernel(rows, m, 3, 2, 1, rounding);
            CHECK(std::abs(kernel.drift - expected.drift) <= 1e-12 * (1.0 + std::abs(expected.drift)));
            CHECK(kernel.size == expected.size);
            CHECK(kernel.shift == expected.shift);
          }
        }
      }
    }
  }
}

TEST_CASE("top_m_centroid ranks later slots first on ties", "[spatial]") {
  // Equal weights everywhere: the m largest are the last m slots.
  const std::vector<float> flat(7, 0.25f);
  std::vector<std::int64_t> scratch;
  CHECK(kernels::top_m_centroid(flat, 2, scratch) == 5.5);
  CHECK(kernels::top_m_centroid(flat, 7, scratch) == 3.0);
  CHECK(kernels::top_m_centroid(flat, 0, scratch) == 0.0);
  // m larger than the row takes every slot.
  CHECK(kernels::top_m_centroid(flat, 9, scratch) == 3.0);
}

TEST_CASE("spatial kernels reject bad arguments", "[spatial]") {
  const std::vector<float> s(7, 1.0f);
  std::vector<float> out(7);
  std::vector<std::int64_t> scratch;

  for (const std::int64_t k : {0, -3, 4}) {
    CAPTURE(k);
    REQUIRE_THROWS_WITH(kernels::avg_pool(s, k, out), Catch::Contains("kernel size (" + std::to_string(k) + ") must be odd"));
    REQUIRE_THROWS_WITH(kernels::max_pool(s, k, out, scratch), Catch::Contains("max_pool: kernel size"));
    REQUIRE_THROWS_WITH(kernels::shifted_avg_pool(s, k, 0, out), Catch::Contains("shifted_avg_pool: kernel size"));
  }
  std::vector<float> short_out(6);
  REQUIRE_THROWS_WITH(kernels::avg_pool(s, 3, short_out), Catch::Contains("out has 6 entries, expected 7"));
  std::vector<float> same = s;
  REQUIRE_THROWS_WITH(kernels::avg_pool(same, 3, same), Catch::Contains("in and out must not alias"));
  REQUIRE_THROWS_WITH(kernels::shifted_avg_pool(s, 5, 3, out), Catch::Contains("shift (3) must be in [-2, 2]"));
  REQUIRE_THROWS_WITH(kernels::shifted_avg_pool(s, 5, -3, out), Catch::Contains("shift (-3) must be in [-2, 2]"));

  const RowMatrixXf one_row = RowMatrixXf::Ones(1, 7);
  const RowMatrixXf rows = RowMatrixXf::Ones(4, 7);
  const auto trunc = kernels::ShiftRounding::trunc;
  REQUIRE_THROWS_WITH(kernels::adaptive_kernel(one_row, 2, 3, 2.0, trunc, scratch),
                      Catch::Contains("window (1) must be at least 2"));
  REQUIRE_THROWS_WITH(kernels::adaptive_kernel(rows, 2, 4, 2.0, trunc, scratch),
                      Catch::Contains("minimum kernel size (4) must be odd"));
  REQUIRE_THROWS_WITH(kernels::adaptive_kernel(rows, 2, 3, 0.0, trunc, scratch),
                      Catch::Contains("scale (0) must be finite and > 0"));
  REQUIRE_THROWS_WITH(kernels::adaptive_kernel(rows, 2, 3, std::nan(""), trunc, scratch),
                      Catch::Contains("scale (nan)"));
}

TEST_CASE("pooling an empty row", "[spatial]") {
  const std::vector<float> empty;
  std::vector<float> out;
  std::vector<std::int64_t> scratch;
  kernels::avg_pool(empty, 3, out);
  kernels::max_pool(empty, 3, out, scratch);
  kernels::shifted_avg_pool(empty, 3, 1, out);
  CHECK(out.empty());
}
