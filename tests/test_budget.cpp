// Per-layer budgets: the pyramid schedule under both rounding rules, checked
// against hand-worked schedules and against its defining properties, plus
// uniform budgets and the validation of budget lists.
#include <catch2/catch.hpp>

#include "kvevict/budget.hpp"
#include "test_helpers.hpp"

#include <cmath>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

using kvevict::PyramidConfig;
using kvevict::PyramidRounding;

namespace {

// Scored shares (budget minus protected tokens) of every layer.
std::vector<std::int64_t> scored_shares(const PyramidConfig& config, std::int64_t n_tokens) {
  std::vector<std::int64_t> shares = kvevict::pyramid_budgets(config, n_tokens);
  for (auto& share : shares) share -= config.protected_tokens;
  return shares;
}

std::int64_t total(const std::vector<std::int64_t>& values) {
  return std::accumulate(values.begin(), values.end(), std::int64_t{0});
}

// k_l = max_p - l * step for l = 0..count-1.
std::vector<std::int64_t> arithmetic(std::int64_t first, std::int64_t step, int count) {
  std::vector<std::int64_t> out;
  for (int l = 0; l < count; ++l) out.push_back(first - l * step);
  return out;
}

}  // namespace

TEST_CASE("pyramid reference rounding, worked schedules", "[budget]") {
  PyramidConfig config{.budget = 128, .protected_tokens = 32, .n_layers = 32, .beta = 20.0,
                       .rounding = PyramidRounding::reference};

  SECTION("n = 1000: no clamp") {
    // P = 96, min_p = floor(96 / 20) = 4, max_p = 192 - 4 = 188 < 968,
    // step = floor(184 / 31) = 5: shares 188, 183, ..., 33, total 3536.
    const auto range = kvevict::pyramid_range(config, 1000);
    CHECK(range.min_scored == 4);
    CHECK(range.max_scored == 188);
    const auto shares = scored_shares(config, 1000);
    CHECK(shares == arithmetic(188, 5, 32));
    CHECK(total(shares) == 3536);
    CHECK(kvevict::pyramid_budget(config, 0, 1000) == 188 + 32);
  }

  SECTION("n = 200: max_p clamped to the candidates") {
    // max_p = 188 >= 200 - 32 = 168, so max_p = 168 and min_p = 192 - 168 =
    // 24; step = floor(144 / 31) = 4: shares 168 .. 44, total 3392.
    const auto range = kvevict::pyramid_range(config, 200);
    CHECK(range.min_scored == 24);
    CHECK(range.max_scored == 168);
    const auto shares = scored_shares(config, 200);
    CHECK(shares == arithmetic(168, 4, 32));
    CHECK(total(shares) == 3392);
  }

  SECTION("B = 64, w = 32, L = 4, n = 100") {
    // P = 32, min_p = 1, max_p = 63 < 68, step = floor(62 / 3) = 20:
    // (63, 43, 23, 3), total 132 where uniform budgets keep 128.
    config = {.budget = 64, .protected_tokens = 32, .n_layers = 4, .beta = 20.0,
              .rounding = PyramidRounding::reference};
    const auto shares = scored_shares(config, 100);
    CHECK(shares == std::vector<std::int64_t>{63, 43, 23, 3});
    CHECK(total(shares) == 132);
    CHECK(kvevict::pyramid_budgets(config, 100) == std::vector<std::int64_t>{95, 75, 55, 35});
  }
}

TEST_CASE("pyramid conserving rounding, worked schedules", "[budget]") {
  PyramidConfig config{.budget = 64, .protected_tokens = 32, .n_layers = 4, .beta = 20.0,
                       .rounding = PyramidRounding::conserving};

  SECTION("B = 64, w = 32, L = 4, n = 100") {
    // Real shares 63 - l * 62 / 3 = 63, 42.33, 21.67, 1; floors sum to 127,
    // the remainder 4 * 32 - 127 = 1 goes to layer 2 (fraction 2/3).
    const auto shares = scored_shares(config, 100);
    CHECK(shares == std::vector<std::int64_t>{63, 42, 22, 1});
    CHECK(total(shares) == 128);
  }

  SECTION("B = 128, w = 32, L = 32: totals stay at L * P") {
    config = {.budget = 128, .protected_tokens = 32, .n_layers = 32, .beta = 20.0,
              .rounding = PyramidRounding::conserving};
    for (const std::int64_t n : {1000, 200}) {
      const auto shares = scored_shares(config, n);
      CHECK(total(shares) == 32 * 96);
    }
    // Layer 0 keeps max_p and layer 31 keeps min_p, both integers.
    CHECK(scored_shares(config, 1000).front() == 188);
    CHECK(scored_shares(config, 1000).back() == 4);
    CHECK(scored_shares(config, 200).front() == 168);
    CHECK(scored_shares(config, 200).back() == 24);
  }
}

TEST_CASE("pyramid conserving rule properties", "[budget]") {
  // For random schedules, the shares sum to L * P and each is the floor or the
  // ceiling of its real value. A layer rounded up never has a smaller
  // fractional part than one rounded down. Shares never increase with the
  // layer and stay in [min_p, max_p].
  kvevict::test::Random random(20240611);
  for (int trial = 0; trial < 400; ++trial) {
    const auto protected_tokens = random.integer(0, 40);
    const auto budget = protected_tokens + random.integer(0, 300);
    if (budget < 1) continue;
    const auto n_layers = static_cast<int>(random.integer(2, 48));
    const double beta = random.coin(0.5) ? static_cast<double>(random.integer(1, 30)) : random.uniform(1.0, 25.0);
    const auto n_tokens = budget + random.integer(1, 800);
    const PyramidConfig config{.budget = budget, .protected_tokens = protected_tokens, .n_layers = n_layers,
                               .beta = beta, .rounding = PyramidRounding::conserving};
    CAPTURE(budget, protected_tokens, n_layers, beta, n_tokens);

    const auto range = kvevict::pyramid_range(config, n_tokens);
    const auto shares = scored_shares(config, n_tokens);
    const std::int64_t share = budget - protected_tokens;
    CHECK(total(shares) == static_cast<std::int64_t>(n_layers) * share);

    double smallest_up = 2.0;
    double largest_down = -1.0;
    for (int l = 0; l < n_layers; ++l) {
      const double real = static_cast<double>(range.max_scored) -
                          l * static_cast<double>(range.max_scored - range.min_scored) / (n_layers - 1);
      const auto k = static_cast<double>(shares[static_cast<std::size_t>(l)]);
      CHECK(k >= std::floor(real - 1e-9));
      CHECK(k <= std::ceil(real + 1e-9));
      const double fraction = real - std::floor(real + 1e-9);
      if (k > real + 1e-9) smallest_up = std::min(smallest_up, fraction);
      if (k < real - 1e-9) largest_down = std::max(largest_down, fraction);
      CHECK(shares[static_cast<std::size_t>(l)] >= range.min_scored);
      CHECK(shares[static_cast<std::size_t>(l)] <= range.max_scored);
      if (l > 0) CHECK(shares[static_cast<std::size_t>(l)] <= shares[static_cast<std::size_t>(l - 1)]);
    }
    CHECK(smallest_up >= largest_down - 1e-9);
  }
}

TEST_CASE("pyramid reference rule is an arithmetic sequence", "[budget]") {
  kvevict::test::Random random(77);
  for (int trial = 0; trial < 200; ++trial) {
    const auto protected_tokens = random.integer(0, 40);
    const auto budget = protected_tokens + random.integer(1, 300);
    const auto n_layers = static_cast<int>(random.integer(2, 48));
    const auto n_tokens = budget + random.integer(1, 800);
    const PyramidConfig config{.budget = budget, .protected_tokens = protected_tokens, .n_layers = n_layers,
                               .beta = 20.0, .rounding = PyramidRounding::reference};
    CAPTURE(budget, protected_tokens, n_layers, n_tokens);
    const auto range = kvevict::pyramid_range(config, n_tokens);
    const std::int64_t step = (range.max_scored - range.min_scored) / (n_layers - 1);
    const auto shares = scored_shares(config, n_tokens);
    CHECK(shares == arithmetic(range.max_scored, step, n_layers));
    // Rounding the step down never keeps fewer than L * P in total.
    CHECK(total(shares) >= static_cast<std::int64_t>(n_layers) * (budget - protected_tokens));
  }
}

TEST_CASE("pyramid single layer and small caches", "[budget]") {
  PyramidConfig config{.budget = 40, .protected_tokens = 8, .n_layers = 1, .beta = 4.0,
                       .rounding = PyramidRounding::conserving};
  // P = 32, min_p = 8, max_p = 56. One layer: conserving keeps P, the
  // reference rule (step 0) keeps max_p.
  CHECK(kvevict::pyramid_budget(config, 0, 500) == 8 + 32);
  config.rounding = PyramidRounding::reference;
  CHECK(kvevict::pyramid_budget(config, 0, 500) == 8 + 56);

  // A cache within the budget keeps every token on every layer.
  config.n_layers = 3;
  for (const auto rounding : {PyramidRounding::conserving, PyramidRounding::reference}) {
    config.rounding = rounding;
    CHECK(kvevict::pyramid_budgets(config, 40) == std::vector<std::int64_t>{40, 40, 40});
    CHECK(kvevict::pyramid_budgets(config, 9) == std::vector<std::int64_t>{9, 9, 9});
    CHECK(kvevict::pyramid_budgets(config, 0) == std::vector<std::int64_t>{0, 0, 0});
  }
}

TEST_CASE("pyramid budget equal to the protected tokens", "[budget]") {
  // P = 0: every layer keeps exactly its protected tokens.
  for (const auto rounding : {PyramidRounding::conserving, PyramidRounding::reference}) {
    const PyramidConfig config{.budget = 16, .protected_tokens = 16, .n_layers = 5, .beta = 20.0,
                               .rounding = rounding};
    CHECK(kvevict::pyramid_budgets(config, 100) == std::vector<std::int64_t>(5, 16));
  }
}

TEST_CASE("pyramid rejects invalid schedules", "[budget]") {
  const PyramidConfig valid{.budget = 64, .protected_tokens = 32, .n_layers = 4, .beta = 20.0};
  auto config = valid;

  config.budget = 31;
  CHECK_THROWS_WITH(kvevict::pyramid_budgets(config, 100), Catch::Contains("budget (31)") &&
                                                               Catch::Contains("protected tokens (32)"));
  config = valid;
  config.budget = 0;
  config.protected_tokens = 0;
  CHECK_THROWS_WITH(kvevict::pyramid_budgets(config, 100), Catch::Contains("budget (0)"));
  config = valid;
  config.protected_tokens = -1;
  CHECK_THROWS_WITH(kvevict::pyramid_budgets(config, 100), Catch::Contains("protected_tokens (-1)"));
  config = valid;
  config.n_layers = 0;
  CHECK_THROWS_WITH(kvevict::pyramid_budgets(config, 100), Catch::Contains("n_layers (0)"));
  config = valid;
  config.beta = 0.5;
  CHECK_THROWS_WITH(kvevict::pyramid_budgets(config, 100), Catch::Contains("beta (0.5)"));
  config.beta = std::nan("");
  CHECK_THROWS_WITH(kvevict::pyramid_budgets(config, 100), Catch::Contains("beta"));

  CHECK_THROWS_WITH(kvevict::pyramid_budget(valid, 4, 100), Catch::Contains("layer (4)"));
  CHECK_THROWS_WITH(kvevict::pyramid_budget(valid, -1, 100), Catch::Contains("layer (-1)"));
  CHECK_THROWS_WITH(kvevict::pyramid_budget(valid, 0, -5), Catch::Contains("n_tokens (-5)"));
  CHECK_THROWS_WITH(kvevict::pyramid_range(valid, 64), Catch::Contains("n_tokens (64)"));
}

TEST_CASE("uniform budgets and budget list validation", "[budget]") {
  CHECK(kvevict::uniform_budgets(12, 3) == std::vector<std::int64_t>{12, 12, 12});
  CHECK_THROWS_WITH(kvevict::uniform_budgets(0, 3), Catch::Contains("budget (0)"));
  CHECK_THROWS_WITH(kvevict::uniform_budgets(4, 0), Catch::Contains("n_layers (0)"));

  // A list of [12, 10, 6, 4] fits protected ranges of 4 tokens. With 8
  // protected tokens, layer 2 would have to shrink its protected range.
  const std::vector<std::int64_t> budgets{12, 10, 6, 4};
  CHECK_NOTHROW(kvevict::validate_layer_budgets(budgets, 4));
  CHECK_THROWS_WITH(kvevict::validate_layer_budgets(budgets, 8),
                    Catch::Contains("layer 2") && Catch::Contains("budget 6"));
  const std::vector<std::int64_t> with_zero{3, 0};
  CHECK_THROWS_WITH(kvevict::validate_layer_budgets(with_zero, 0), Catch::Contains("layer 1"));
  CHECK_THROWS_WITH(kvevict::validate_layer_budgets(budgets, -1), Catch::Contains("protected_tokens (-1)"));
}
