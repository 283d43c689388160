// The fast paths added for speed keep the results of the plain code: the
// softmax of window_attention outside the range of Eigen's vectorised exp,
// and the vectorised finiteness test in front of require_finite.
#include <catch2/catch.hpp>

#include "kvevict/common.hpp"
#include "kvevict/kernels/window_attention.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

using namespace kvevict;

TEST_CASE("window_attention far logits underflow like std::exp", "[window_attention]") {
  // Logits 0, -50, -100 and -200 below the maximum: Eigen's exp clamps its
  // argument near -88.7, so the last two would both come out near 3e-39.
  // std::exp gives a denormal for -100 and 0 for -200.
  const std::vector<float> offsets = {0.0f, -50.0f, -100.0f, -200.0f};
  const auto n = static_cast<std::int64_t>(offsets.size());
  RowMatrixXf keys(n, 1);
  for (std::int64_t t = 0; t < n; ++t) keys(t, 0) = offsets[static_cast<std::size_t>(t)];
  RowMatrixXf query(1, 1);
  query(0, 0) = 1.0f;
  const std::vector<std::int64_t> positions = {0, 1, 2, 3};
  const std::vector<std::int64_t> query_position = {3};
  RowMatrixXf out(1, n);

  kernels::window_attention(query, keys, positions, query_position, 1.0f, out);

  const float total = 1.0f + std::exp(-50.0f) + std::exp(-100.0f) + std::exp(-200.0f);
  CHECK(out(0, 0) == 1.0f / total);
  CHECK(out(0, 1) == std::exp(-50.0f) / total);
  CHECK(out(0, 2) == std::exp(-100.0f) / total);
  CHECK(out(0, 2) > 0.0f);
  CHECK(out(0, 2) < std::numeric_limits<float>::min());
  CHECK(out(0, 3) == 0.0f);
}

TEST_CASE("window_attention near logits use the vector path", "[window_attention]") {
  // All logits within 87 of the maximum: the vectorised softmax, compared
  // with the std::exp formula within a few float ulps.
  const std::int64_t n = 37;  // not a multiple of any vector width
  RowMatrixXf keys(n, 1);
  for (std::int64_t t = 0; t < n; ++t) keys(t, 0) = -2.3f * static_cast<float>(t);
  RowMatrixXf query(1, 1);
  query(0, 0) = 1.0f;
  std::vector<std::int64_t> positions(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t) positions[static_cast<std::size_t>(t)] = t;
  const std::vector<std::int64_t> query_position = {n - 1};
  RowMatrixXf out(1, n);

  kernels::window_attention(query, keys, positions, query_position, 1.0f, out);

  // The reference uses the float logits themselves (the key values), so it
  // measures only the exp and the normalisation.
  double total = 0.0;
  for (std::int64_t t = 0; t < n; ++t) total += std::exp(static_cast<double>(keys(t, 0)));
  for (std::int64_t t = 0; t < n; ++t) {
    CAPTURE(t);
    const double expected = std::exp(static_cast<double>(keys(t, 0))) / total;
    CHECK(std::abs(static_cast<double>(out(0, t)) - expected) <= 1e-6 * expected);
  }
}

TEST_CASE("all_finite finds every non-finite value", "[common]") {
  // Lengths around the vector widths, the bad value at every index.
  for (const std::int64_t count : {1, 7, 16, 17, 33, 100}) {
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()}) {
      for (std::int64_t at = 0; at < count; ++at) {
        std::vector<float> values(static_cast<std::size_t>(count), 3.0e38f);
        values[static_cast<std::size_t>(at)] = bad;
        CAPTURE(count, bad, at);
        CHECK_FALSE(detail::all_finite(values.data(), count));
        CHECK_THROWS_WITH(detail::require_finite(values.data(), count, "values"),
                          Catch::Contains("at flat index " + std::to_string(at)));
      }
    }
    const std::vector<float> finite(static_cast<std::size_t>(count), -3.0e38f);
    CHECK(detail::all_finite(finite.data(), count));
    CHECK_NOTHROW(detail::require_finite(finite.data(), count, "values"));
  }
  CHECK(detail::all_finite(nullptr, 0));
}
