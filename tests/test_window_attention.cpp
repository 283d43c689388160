// Window attention against a double-precision brute force: causal mask by
// position, the triangle inside the window, stability with huge logits,
// exact zeros for masked keys, and the GQA head map of
// group_window_attention in both position modes. Also the QueryWindow ring
// buffer that stores the window queries between decode steps.
#include <catch2/catch.hpp>

#include "kvevict/kernels/window_attention.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using namespace kvevict;
using kvevict::test::Random;
using kvevict::test::RowMatrixXd;

namespace {

// Checks `actual` [rows x n] against the brute force of the same inputs:
// every visible entry within the derived bound, every masked entry exactly
// 0, every row summing to 1.
void require_matches_brute_force(const RowMatrixXf& actual, const RowMatrixXd& queries, const RowMatrixXd& keys,
                                 const std::vector<std::int64_t>& key_positions,
                                 const std::vector<std::int64_t>& query_positions, double scale, double terms) {
  const RowMatrixXd expected =
      test::brute_window_attention(queries, keys, key_positions, query_positions, scale);
  const auto w = static_cast<Eigen::Index>(query_positions.size());
  REQUIRE(actual.rows() == expected.rows());
  REQUIRE(actual.cols() == expected.cols());
  for (Eigen::Index r = 0; r < actual.rows(); ++r) {
    const double tolerance = test::window_attention_tolerance(
        terms, keys.rows(), test::logit_magnitude(queries.row(r), keys, scale));
    double row_sum = 0.0;
    for (Eigen::Index t = 0; t < actual.cols(); ++t) {
      CAPTURE(r, t, tolerance);
      const bool masked = key_positions[static_cast<std::size_t>(t)] > query_positions[static_cast<std::size_t>(r % w)];
      if (masked) {
        CHECK(actual(r, t) == 0.0f);
      } else {
        CHECK(std::abs(static_cast<double>(actual(r, t)) - expected(r, t)) <= tolerance);
      }
      row_sum += actual(r, t);
    }
    CAPTURE(r);
    CHECK(std::abs(row_sum - 1.0) <= static_cast<double>(actual.cols() + 2) * test::float_unit_roundoff);
  }
}

}  // namespace

TEST_CASE("window_attention matches brute force", "[window_attention]") {
  // Sizes that are not powers of two. g stacks g query heads per KV head.
  struct Case {
    std::int64_t n;
    std::int64_t d;
    std::int64_t w;
    std::int64_t g;
  };
  const std::vector<Case> cases = {{1, 3, 1, 1}, {7, 5, 3, 1}, {7, 3, 7, 3}, {37, 12, 5, 2},
                                   {101, 5, 4, 3}, {101, 12, 1, 1}, {37, 3, 37, 1}};
  Random random(11);
  for (const Case& c : cases) {
    CAPTURE(c.n, c.d, c.w, c.g);
    const RowMatrixXf keys = random.matrix(c.n, c.d, -2.0, 2.0);
    const RowMatrixXf queries = random.matrix(c.g * c.w, c.d, -2.0, 2.0);
    // Positions with gaps, as after evictions in original mode. The queries
    // belong to the last w keys.
    const std::vector<std::int64_t> key_positions = random.increasing_positions(c.n, 3, 4);
    const std::vector<std::int64_t> query_positions(key_positions.end() - c.w, key_positions.end());
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));

    RowMatrixXf out(c.g * c.w, c.n);
    kernels::window_attention(queries, keys, key_positions, query_positions, scale, out);
    require_matches_brute_force(out, test::to_double(queries), test::to_double(keys), key_positions,
                                query_positions, scale, static_cast<double>(c.d + 1));
  }
}

TEST_CASE("window_attention causal triangle inside window", "[window_attention]") {
  // Window query i belongs to slot n - w + i: it sees slots 0 .. n - w + i,
  // every later slot is exactly 0.
  Random random(12);
  const std::int64_t n = 37;
  const std::int64_t d = 5;
  const std::int64_t w = 6;
  const RowMatrixXf keys = random.matrix(n, d);
  const RowMatrixXf queries = random.matrix(w, d);
  const std::vector<std::int64_t> key_positions = random.increasing_positions(n, 0, 3);
  const std::vector<std::int64_t> query_positions(key_positions.end() - w, key_positions.end());
  RowMatrixXf out(w, n);
  kernels::window_attention(queries, keys, key_positions, query_positions, 1.0f, out);

  for (std::int64_t i = 0; i < w; ++i) {
    for (std::int64_t t = 0; t < n; ++t) {
      CAPTURE(i, t);
      if (t <= n - w + i) {
        CHECK(out(i, t) > 0.0f);
      } else {
        CHECK(out(i, t) == 0.0f);
      }
    }
  }
}

TEST_CASE("window_attention masks by position gaps", "[window_attention]") {
  // Zero queries give equal logits, so each row is uniform over the keys
  // whose position is at most the query's: query position 4 sees positions
  // {0, 3, 4}, query position 12 sees {0, 3, 4, 9, 10}. Position 12 is not a
  // key position, which the mask must handle too.
  const std::vector<std::int64_t> key_positions = {0, 3, 4, 9, 10, 15};
  const std::vector<std::int64_t> query_positions = {4, 12};
  const RowMatrixXf keys = Random(13).matrix(6, 3);
  const RowMatrixXf queries = RowMatrixXf::Zero(2, 3);
  RowMatrixXf out(2, 6);
  kernels::window_attention(queries, keys, key_positions, query_positions, 1.0f, out);

  const std::vector<std::vector<double>> expected = {{1.0 / 3, 1.0 / 3, 1.0 / 3, 0, 0, 0},
                                                     {0.2, 0.2, 0.2, 0.2, 0.2, 0}};
  for (int r = 0; r < 2; ++r) {
    for (int t = 0; t < 6; ++t) {
      CAPTURE(r, t);
      CHECK(std::abs(out(r, t) - expected[static_cast<std::size_t>(r)][static_cast<std::size_t>(t)]) <= 1e-7);
    }
  }
  CHECK(out(0, 3) == 0.0f);
  CHECK(out(1, 5) == 0.0f);
}

TEST_CASE("window_attention stable with huge logits", "[window_attention]") {
  // Logits z_t = sign * 1e4 + a_t come from scale 1, the query
  // (sign * 1e4, 1) and keys (1, a_t), with a_t multiples of 1/4 below 8.
  // Every logit is exact in float, so the kernel must return softmax(a_t)
  // within the rounding of exp, the sum and the division: (n + 2) u
  // relative, doubled. Without max subtraction exp(1e4) overflows and
  // exp(-1e4) underflows, and both give NaN.
  const std::vector<double> offsets = {0.0, 1.5, -2.25, 3.0, 0.25, 7.75, -4.0};
  const auto n = static_cast<std::int64_t>(offsets.size());
  const std::vector<double> expected = Random::softmax(offsets);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t) positions[static_cast<std::size_t>(t)] = t;
  const std::vector<std::int64_t> query_positions = {n - 1};

  for (const float sign : {1.0f, -1.0f}) {
    CAPTURE(sign);
    RowMatrixXf keys(n, 2);
    for (std::int64_t t = 0; t < n; ++t) {
      keys(t, 0) = 1.0f;
      keys(t, 1) = static_cast<float>(offsets[static_cast<std::size_t>(t)]);
    }
    RowMatrixXf query(1, 2);
    query << sign * 1e4f, 1.0f;
    RowMatrixXf out(1, n);
    kernels::window_attention(query, keys, positions, query_positions, 1.0f, out);
    for (std::int64_t t = 0; t < n; ++t) {
      CAPTURE(t);
      REQUIRE(std::isfinite(out(0, t)));
      const double reference = expected[static_cast<std::size_t>(t)];
      CHECK(std::abs(out(0, t) - reference) <= 2.0 * static_cast<double>(n + 2) * test::float_unit_roundoff * reference);
    }
  }
}

TEST_CASE("window_attention rejects bad shapes", "[window_attention]") {
  const RowMatrixXf keys = Random(14).matrix(5, 3);
  const RowMatrixXf queries = Random(15).matrix(4, 3);
  const std::vector<std::int64_t> key_positions = {0, 1, 2, 5, 6};
  const std::vector<std::int64_t> query_positions = {5, 6};
  RowMatrixXf out(4, 5);

  SECTION("head_dim mismatch") {
    const RowMatrixXf wide = Random(16).matrix(4, 4);
    REQUIRE_THROWS_WITH(kernels::window_attention(wide, keys, key_positions, query_positions, 1.0f, out),
                        Catch::Contains("queries have head_dim 4, keys have 3"));
  }
  SECTION("key_positions size") {
    const std::vector<std::int64_t> short_positions = {0, 1, 2};
    REQUIRE_THROWS_WITH(kernels::window_attention(queries, keys, short_positions, query_positions, 1.0f, out),
                        Catch::Contains("key_positions has 3 entries") && Catch::Contains("(5)"));
  }
  SECTION("rows not a multiple of the window") {
    const std::vector<std::int64_t> three = {4, 5, 6};
    REQUIRE_THROWS_WITH(kernels::window_attention(queries, keys, key_positions, three, 1.0f, out),
                        Catch::Contains("4 query rows are not a multiple of the 3"));
  }
  SECTION("empty window") {
    REQUIRE_THROWS_AS(kernels::window_attention(queries, keys, key_positions, {}, 1.0f, out),
                      std::invalid_argument);
  }
  SECTION("out shape") {
    RowMatrixXf small(4, 4);
    REQUIRE_THROWS_WITH(kernels::window_attention(queries, keys, key_positions, query_positions, 1.0f, small),
                        Catch::Contains("out is [4 x 4], expected [4 x 5]"));
  }
  SECTION("query that sees no key") {
    const std::vector<std::int64_t> late_keys = {7, 8, 9, 10, 11};
    REQUIRE_THROWS_WITH(kernels::window_attention(queries, keys, late_keys, query_positions, 1.0f, out),
                        Catch::Contains("at position 5 sees no key") && Catch::Contains("first key position 7"));
  }
}

namespace {

// Builds a cache of n tokens with random keys and values and gapped
// positions. With `per_head_plans`, each KV head then drops a different set
// of slots, so the heads keep different positions.
template <class Scalar>
KVCache<Scalar> make_cache(Random& random, int n_kv_heads, int d, std::int64_t n, PositionMode mode,
                           bool per_head_plans) {
  KVCache<Scalar> cache({.n_kv_heads = n_kv_heads, .head_dim = d, .positions = mode});
  const std::int64_t appended = per_head_plans ? n + 3 : n;
  const RowMatrixXf keys = random.matrix(n_kv_heads * appended, d, -2.0, 2.0);
  const RowMatrixXf values = random.matrix(n_kv_heads * appended, d);
  const std::vector<std::int64_t> positions = random.increasing_positions(appended, 2, 3);
  cache.append(keys, values, positions);
  if (per_head_plans) {
    KeepPlan plan(n_kv_heads, n);
    for (int j = 0; j < n_kv_heads; ++j) {
      // Head j drops slots j, j + 1 and j + 2 (mod appended), keeping order.
      auto row = plan.head(j);
      std::size_t i = 0;
      for (std::int64_t s = 0; s < appended; ++s) {
        const std::int64_t offset = (s - j + appended) % appended;
        if (offset < 3) continue;
        row[i++] = s;
      }
    }
    cache.keep(plan);
  }
  return cache;
}

}  // namespace

TEST_CASE("group_window_attention matches brute force", "[window_attention][gqa]") {
  // (query heads, KV heads): grouped, one head per group, and four per group.
  struct Case {
    int n_heads;
    int n_kv_heads;
    int d;
    std::int64_t n;
    std::int64_t w;
  };
  const std::vector<Case> cases = {{6, 2, 5, 37, 4}, {5, 5, 3, 7, 2}, {12, 4, 12, 101, 3}, {6, 2, 12, 1, 1}};
  Random random(21);
  for (const Case& c : cases) {
    for (const PositionMode mode : {PositionMode::original, PositionMode::cache_relative}) {
      // RoPE rotates pairs, so cache_relative needs an even head_dim.
      if (mode == PositionMode::cache_relative && c.d % 2 != 0) continue;
      CAPTURE(c.n_heads, c.n_kv_heads, c.d, c.n, c.w, to_string(mode));
      const KVCache<float> cache = make_cache<float>(random, c.n_kv_heads, c.d, c.n, mode, c.n > 3);
      const std::vector<float> query_data = random.vector(c.n_heads * c.w * c.d, -2.0, 2.0);
      const Tensor3View queries{query_data.data(), c.n_heads, c.w, c.d};
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
      const int g = c.n_heads / c.n_kv_heads;

      kernels::WindowAttentionWorkspace workspace;
      RowMatrixXf out;
      for (int j = 0; j < c.n_kv_heads; ++j) {
        CAPTURE(j);
        kernels::group_window_attention(cache, j, queries, scale, out, workspace);
        REQUIRE(out.rows() == g * c.w);
        REQUIRE(out.cols() == c.n);

        // The brute force: KV head j serves query heads j*g .. j*g + g - 1.
        // In original mode keys and queries are used as stored and masked
        // by token position. In cache_relative mode key t is rotated at slot
        // t, window query i at slot n - w + i, and the mask uses slots.
        RowMatrixXd keys = test::to_double(cache.keys(j));
        RowMatrixXd group_queries(g * c.w, c.d);
        std::vector<std::int64_t> key_positions(cache.positions(j).begin(), cache.positions(j).end());
        if (mode == PositionMode::cache_relative) {
          for (std::int64_t t = 0; t < c.n; ++t) {
            key_positions[static_cast<std::size_t>(t)] = t;
            const std::vector<float> stored(cache.keys(j).row(t).data(), cache.keys(j).row(t).data() + c.d);
            const std::vector<double> rotated = test::rope_reference(stored, static_cast<double>(t), RopeConfig{});
            for (int k = 0; k < c.d; ++k) keys(t, k) = rotated[static_cast<std::size_t>(k)];
          }
        }
        const std::vector<std::int64_t> query_positions(key_positions.end() - c.w, key_positions.end());
        for (int h = 0; h < g; ++h) {
          for (std::int64_t i = 0; i < c.w; ++i) {
            const auto source = queries.row(j * g + h, i);
            std::vector<double> row(source.begin(), source.end());
            if (mode == PositionMode::cache_relative) {
              row = test::rope_reference(source, static_cast<double>(c.n - c.w + i), RopeConfig{});
            }
            for (int k = 0; k < c.d; ++k) group_queries(h * c.w + i, k) = row[static_cast<std::size_t>(k)];
          }
        }
        // Rotation in float moves each coordinate of a rotated operand by at
        // most 4u times its pair's magnitude (rounded cos and sin, two
        // products, one sum). That adds at most 8 sqrt(2) u |q| |k| < 12 u
        // |q| |k| to a logit, and |q| |k| >= sum_k |q_k k_k|, the magnitude
        // the tolerance uses, so 12 more terms cover it.
        const double terms = static_cast<double>(c.d + 1) + (mode == PositionMode::cache_relative ? 12.0 : 0.0);
        require_matches_brute_force(out, group_queries, keys, key_positions, query_positions, scale, terms);
      }
    }
  }
}

TEST_CASE("group_window_attention reads KV head q / g", "[window_attention][gqa]") {
  // KV head j has one distinctive key: slot 2 + j is 8 * e_0, every other
  // key is 0. All queries are e_0, so a query head that reads KV head j puts
  // almost all its attention (e^8 against 1 per other key) on slot 2 + j.
  // The shapes include the head maps other implementations got wrong.
  const std::vector<std::pair<int, int>> shapes = {{6, 2}, {5, 5}, {12, 4}, {28, 4}, {48, 2}, {32, 8}, {12, 12}, {8, 1}};
  const int d = 3;
  const std::int64_t w = 2;
  for (const auto& [n_heads, n_kv_heads] : shapes) {
    CAPTURE(n_heads, n_kv_heads);
    const std::int64_t n = n_kv_heads + 4;  // slot 2 + j stays outside the window
    KVCache<float> cache({.n_kv_heads = n_kv_heads, .head_dim = d});
    RowMatrixXf keys = RowMatrixXf::Zero(n_kv_heads * n, d);
    for (int j = 0; j < n_kv_heads; ++j) keys(j * n + 2 + j, 0) = 8.0f;
    std::vector<std::int64_t> positions(static_cast<std::size_t>(n));
    for (std::int64_t t = 0; t < n; ++t) positions[static_cast<std::size_t>(t)] = t;
    cache.append(keys, RowMatrixXf::Zero(n_kv_heads * n, d), positions);

    std::vector<float> query_data(static_cast<std::size_t>(n_heads * w * d), 0.0f);
    for (std::size_t r = 0; r < static_cast<std::size_t>(n_heads * w); ++r) query_data[r * d] = 1.0f;
    const Tensor3View queries{query_data.data(), n_heads, w, d};

    const int g = n_heads / n_kv_heads;
    kernels::WindowAttentionWorkspace workspace;
    RowMatrixXf out;
    for (int j = 0; j < n_kv_heads; ++j) {
      kernels::group_window_attention(cache, j, queries, 1.0f, out, workspace);
      for (Eigen::Index r = 0; r < out.rows(); ++r) {
        Eigen::Index best = 0;
        out.row(r).maxCoeff(&best);
        CAPTURE(j, r, g);
        CHECK(best == 2 + j);
        CHECK(out(r, 2 + j) > 0.99f);
      }
    }
  }

  SECTION("n_heads not a multiple of n_kv_heads") {
    KVCache<float> cache({.n_kv_heads = 4, .head_dim = 3});
    cache.append(RowMatrixXf::Zero(4 * 3, 3), RowMatrixXf::Zero(4 * 3, 3), std::vector<std::int64_t>{0, 1, 2});
    const std::vector<float> query_data(30 * 2 * 3, 0.0f);
    const Tensor3View queries{query_data.data(), 30, 2, 3};
    kernels::WindowAttentionWorkspace workspace;
    RowMatrixXf out;
    REQUIRE_THROWS_WITH(kernels::group_window_attention(cache, 0, queries, 1.0f, out, workspace),
                        Catch::Contains("n_heads (30) must be a positive multiple of n_kv_heads (4)"));
  }
}

TEST_CASE("group_window_attention rejects bad windows", "[window_attention][gqa]") {
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 5});
  cache.append(RowMatrixXf::Zero(2 * 3, 5), RowMatrixXf::Zero(2 * 3, 5), std::vector<std::int64_t>{0, 1, 2});
  kernels::WindowAttentionWorkspace workspace;
  RowMatrixXf out;

  const std::vector<float> long_window(2 * 4 * 5, 0.0f);
  REQUIRE_THROWS_WITH(
      kernels::group_window_attention(cache, 0, Tensor3View{long_window.data(), 2, 4, 5}, 1.0f, out, workspace),
      Catch::Contains("window (4) must be in [1, size() = 3]"));

  const std::vector<float> wrong_dim(2 * 2 * 4, 0.0f);
  REQUIRE_THROWS_WITH(
      kernels::group_window_attention(cache, 0, Tensor3View{wrong_dim.data(), 2, 2, 4}, 1.0f, out, workspace),
      Catch::Contains("queries have head_dim 4, the cache has 5"));
}

TEST_CASE("QueryWindow views oldest first across wrap-around", "[query_window]") {
  // 3 heads, window 4, head_dim 5. Query number k carries the value
  // 100 * k + 10 * h + c in component c of head h, so every entry names its
  // query, head and component.
  const int n_heads = 3;
  const int window = 4;
  const int d = 5;
  QueryWindow queries(n_heads, window, d);
  const auto make_query = [&](int k) {
    std::vector<float> query(static_cast<std::size_t>(n_heads * d));
    for (int h = 0; h < n_heads; ++h) {
      for (int c = 0; c < d; ++c) query[static_cast<std::size_t>(h * d + c)] = static_cast<float>(100 * k + 10 * h + c);
    }
    return query;
  };

  REQUIRE(queries.size() == 0);
  CHECK(queries.view().d1 == 0);
  // Push 11 queries, so the ring wraps twice. After each push the view must
  // contain the last min(k + 1, window) queries, oldest first.
  for (int k = 0; k < 11; ++k) {
    queries.push(make_query(k));
    const int expected_size = std::min(k + 1, window);
    REQUIRE(queries.size() == expected_size);
    const Tensor3View view = queries.view();
    REQUIRE(view.d0 == n_heads);
    REQUIRE(view.d1 == expected_size);
    REQUIRE(view.d2 == d);
    for (int h = 0; h < n_heads; ++h) {
      for (int i = 0; i < expected_size; ++i) {
        const int query_number = k - expected_size + 1 + i;
        for (int c = 0; c < d; ++c) {
          CAPTURE(k, h, i, c);
          CHECK(view.row(h, i)[static_cast<std::size_t>(c)] == static_cast<float>(100 * query_number + 10 * h + c));
        }
      }
    }
  }

  SECTION("clear empties the window") {
    queries.clear();
    CHECK(queries.size() == 0);
    queries.push(make_query(50));
    const Tensor3View view = queries.view();
    REQUIRE(view.d1 == 1);
    CHECK(view.row(2, 0)[4] == 5024.0f);
  }
}

TEST_CASE("QueryWindow rejects bad sizes", "[query_window]") {
  REQUIRE_THROWS_WITH(QueryWindow(0, 4, 5), Catch::Contains("n_heads (0)"));
  REQUIRE_THROWS_WITH(QueryWindow(3, 0, 5), Catch::Contains("window (0)"));
  REQUIRE_THROWS_WITH(QueryWindow(3, 4, -1), Catch::Contains("head_dim (-1)"));

  QueryWindow queries(3, 4, 5);
  const std::vector<float> short_query(14, 0.0f);
  REQUIRE_THROWS_WITH(queries.push(short_query), Catch::Contains("query has 14 values, expected n_heads * head_dim = 15"));
  std::vector<float> bad(15, 0.0f);
  bad[7] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(queries.push(bad), Catch::Contains("non-finite value (nan) at flat index 7"));
  CHECK(queries.size() == 0);
}
