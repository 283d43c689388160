// RoPE: both pairings against a hand-written double reference, composition
// of rotations (the re-rotation identity), and the cache's cache_relative
// rotation at slot indices, inside and beyond its precomputed tables.
#include <catch2/catch.hpp>

#include "kvevict/kv_cache.hpp"
#include "kvevict/rope.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

using namespace kvevict;
using kvevict::test::Random;

namespace {

// Error bound of float rotations: cos and sin are rounded (u each), then
// two products (u each) and their sum (u), so each output coordinate of a
// pair (x0, x1) is within 4u (|x0| + |x1|) <= 4 sqrt(2) u ||(x0, x1)|| of
// the exact rotation. Rotations preserve pair norms and a pair norm is at
// most ||x||, so `rotations` successive rotations stay within
// rotations * 6u * ||x|| per coordinate (first order).
double rotation_tolerance(std::span<const float> x, int rotations) {
  double squared = 0.0;
  for (const float v : x) squared += static_cast<double>(v) * v;
  return 6.0 * rotations * test::float_unit_roundoff * std::sqrt(squared);
}

void require_close(std::span<const float> actual, const std::vector<double>& expected, double tolerance) {
  REQUIRE(actual.size() == expected.size());
  for (std::size_t k = 0; k < actual.size(); ++k) {
    CAPTURE(k, tolerance);
    CHECK(std::abs(static_cast<double>(actual[k]) - expected[k]) <= tolerance);
  }
}

}  // namespace

TEST_CASE("RoPE pairings match hand-written reference", "[rope]") {
  Random random(51);
  const std::vector<RopeConfig> configs = {
      {.base = 10000.0, .frequency_scale = 1.0, .pairing = RopePairing::adjacent},
      {.base = 10000.0, .frequency_scale = 1.0, .pairing = RopePairing::half_split},
      {.base = 500000.0, .frequency_scale = 0.25, .pairing = RopePairing::adjacent},
      {.base = 7.5, .frequency_scale = 3.0, .pairing = RopePairing::half_split}};
  for (const RopeConfig& config : configs) {
    for (const int d : {2, 6, 10, 12}) {
      const RotaryEmbedding rope(d, config);
      for (const double position : {0.0, 1.0, 7.0, 37.0, 101.0, 4097.0, 1000003.0, -13.0}) {
        CAPTURE(config.base, config.frequency_scale, static_cast<int>(config.pairing), d, position);
        const std::vector<float> x = random.vector(d, -3.0, 3.0);
        std::vector<float> rotated = x;
        rope.rotate(rotated, position);
        require_close(rotated, test::rope_reference(x, position, config), rotation_tolerance(x, 1));
      }
    }
  }
}

TEST_CASE("RoPE pairings differ as documented", "[rope]") {
  // d = 4, position 1, base 10000: theta_0 = 1 and theta_1 = 1/100.
  // Adjacent pairs are (0,1) and (2,3), half_split pairs (0,2) and (1,3).
  // x = e_0 rotates within pair 0 in both pairings, by angle 1: adjacent
  // moves it into coordinate 1, half_split into coordinate 2.
  const std::vector<float> e0 = {1.0f, 0.0f, 0.0f, 0.0f};
  std::vector<float> adjacent = e0;
  std::vector<float> half_split = e0;
  RotaryEmbedding(4, {.pairing = RopePairing::adjacent}).rotate(adjacent, 1.0);
  RotaryEmbedding(4, {.pairing = RopePairing::half_split}).rotate(half_split, 1.0);
  const double tolerance = 4.0 * test::float_unit_roundoff;
  require_close(adjacent, {std::cos(1.0), std::sin(1.0), 0.0, 0.0}, tolerance);
  require_close(half_split, {std::cos(1.0), 0.0, std::sin(1.0), 0.0}, tolerance);

  // e_1 is the second element of pair 0 for adjacent pairing (angle 1) but
  // the first element of pair 1 for half_split (angle 1/100).
  const std::vector<float> e1 = {0.0f, 1.0f, 0.0f, 0.0f};
  adjacent = e1;
  half_split = e1;
  RotaryEmbedding(4, {.pairing = RopePairing::adjacent}).rotate(adjacent, 1.0);
  RotaryEmbedding(4, {.pairing = RopePairing::half_split}).rotate(half_split, 1.0);
  require_close(adjacent, {-std::sin(1.0), std::cos(1.0), 0.0, 0.0}, tolerance);
  require_close(half_split, {0.0, std::cos(0.01), 0.0, std::sin(0.01)}, tolerance);
}

TEST_CASE("RoPE rotations compose", "[rope]") {
  // Rotating by p1 and then by p2 equals rotating by p1 + p2, so a key
  // stored rotated at p_old moves to p_new by a rotation of p_new - p_old.
  // Three float rotations stay within rotation_tolerance(x, 3), which is
  // below 1e-5 for these inputs, and the check uses the smaller of the two.
  Random random(52);
  const std::vector<std::pair<double, double>> moves = {
      {7.0, 37.0}, {101.0, -94.0}, {0.0, 1.0}, {1000003.0, -999990.0}, {-5.0, 5.0}, {4096.0, 4097.0}};
  for (const RopePairing pairing : {RopePairing::adjacent, RopePairing::half_split}) {
    for (const int d : {6, 12}) {
      const RotaryEmbedding rope(d, {.pairing = pairing});
      for (const auto& [first, second] : moves) {
        CAPTURE(static_cast<int>(pairing), d, first, second);
        const std::vector<float> x = random.vector(d, -2.0, 2.0);
        std::vector<float> twice = x;
        rope.rotate(twice, first);
        rope.rotate(twice, second);
        std::vector<float> once = x;
        rope.rotate(once, first + second);
        const double tolerance = std::min(1e-5, rotation_tolerance(x, 3));
        for (int k = 0; k < d; ++k) {
          CAPTURE(k);
          CHECK(std::abs(twice[static_cast<std::size_t>(k)] - once[static_cast<std::size_t>(k)]) <= tolerance);
        }
      }
    }
  }

  SECTION("successive moves add up") {
    // A key rotated at position 11 moves twice, by -3 and then by -2. The
    // second move starts from the first move's result, ending at slot 6.
    const RotaryEmbedding rope(12, {});
    const std::vector<float> x = random.vector(12, -1.0, 1.0);
    std::vector<float> moved = x;
    rope.rotate(moved, 11.0);
    rope.rotate(moved, -3.0);
    rope.rotate(moved, -2.0);
    require_close(moved, test::rope_reference(x, 6.0, {}), rotation_tolerance(x, 3));
  }
}

TEST_CASE("RoPE rotate from tables equals direct rotation", "[rope]") {
  // fill_tables stores the float cos and sin that rotate(x, delta) computes
  // for integer positions.
  Random random(53);
  const RotaryEmbedding rope(10, {.pairing = RopePairing::half_split});
  std::vector<float> cos_table;
  std::vector<float> sin_table;
  rope.fill_tables(37, cos_table, sin_table);
  REQUIRE(cos_table.size() == 37u * 5u);
  for (const std::int64_t p : {0, 1, 5, 36}) {
    CAPTURE(p);
    const std::vector<float> x = random.vector(10);
    std::vector<float> from_table = x;
    rope.rotate(from_table, std::span<const float>(cos_table).subspan(static_cast<std::size_t>(p) * 5, 5),
                std::span<const float>(sin_table).subspan(static_cast<std::size_t>(p) * 5, 5));
    require_close(from_table, test::rope_reference(x, static_cast<double>(p), rope.config()),
                  rotation_tolerance(x, 1));
  }
}

TEST_CASE("cache_relative rotated_keys rotate at slot index", "[rope][kv_cache]") {
  // Stored keys are unrotated, and rotated_keys rotates slot s at position
  // s, whatever the token positions are (here gapped, after an eviction).
  Random random(54);
  const int heads = 2;
  const int d = 6;
  for (const RopePairing pairing : {RopePairing::adjacent, RopePairing::half_split}) {
    CAPTURE(static_cast<int>(pairing));
    const RopeConfig rope{.base = 10000.0, .pairing = pairing};
    KVCache<float> cache(
        {.n_kv_heads = heads, .head_dim = d, .positions = PositionMode::cache_relative, .rope = rope});
    cache.append(random.matrix(heads * 37, d), random.matrix(heads * 37, d), random.increasing_positions(37, 3, 5));
    KeepPlan plan(heads, 13);
    for (int j = 0; j < heads; ++j) {
      for (std::int64_t i = 0; i < 13; ++i) plan.head(j)[static_cast<std::size_t>(i)] = 2 * i + j;
    }
    cache.keep(plan);

    RowMatrixXf rotated(cache.size(), d);
    for (int j = 0; j < heads; ++j) {
      cache.rotated_keys(j, rotated);
      for (std::int64_t s = 0; s < cache.size(); ++s) {
        CAPTURE(j, s);
        const std::span<const float> stored(cache.keys(j).row(s).data(), static_cast<std::size_t>(d));
        std::vector<float> direct(stored.begin(), stored.end());
        cache.rope().rotate(direct, static_cast<double>(s));
        const std::span<const float> row(rotated.row(s).data(), static_cast<std::size_t>(d));
        const double tolerance = rotation_tolerance(stored, 1);
        require_close(row, test::rope_reference(stored, static_cast<double>(s), rope), tolerance);
        require_close(row, std::vector<double>(direct.begin(), direct.end()), 2.0 * tolerance);
      }
    }
  }

  SECTION("original mode returns keys as stored") {
    KVCache<float> cache({.n_kv_heads = 1, .head_dim = 5});
    const RowMatrixXf keys = random.matrix(7, 5);
    cache.append(keys, keys, random.increasing_positions(7, 0, 3));
    RowMatrixXf out(7, 5);
    cache.rotated_keys(0, out);
    CHECK(out == keys);
  }

  SECTION("out with the wrong shape") {
    KVCache<float> cache({.n_kv_heads = 1, .head_dim = 6, .positions = PositionMode::cache_relative});
    cache.append(random.matrix(3, 6), random.matrix(3, 6), std::vector<std::int64_t>{0, 1, 2});
    RowMatrixXf out(2, 6);
    REQUIRE_THROWS_WITH(cache.rotated_keys(0, out), Catch::Contains("out is [2 x 6], expected [3 x 6]"));
  }
}

TEST_CASE("rotate_at_slot beyond the table agrees", "[rope][kv_cache]") {
  // A cache with capacity 8 rotates slot 20 from the angle directly, and a
  // cache with capacity 30 rotates it from its table. Both must agree with each
  // other and with the reference.
  Random random(55);
  const int d = 12;
  const RopeConfig rope{.base = 10000.0, .pairing = RopePairing::adjacent};
  const KVCache<float> small(
      {.n_kv_heads = 1, .head_dim = d, .positions = PositionMode::cache_relative, .capacity = 8, .rope = rope});
  const KVCache<float> large(
      {.n_kv_heads = 1, .head_dim = d, .positions = PositionMode::cache_relative, .capacity = 30, .rope = rope});
  for (const std::int64_t slot : {0, 5, 7, 8, 20, 29, 1000}) {
    CAPTURE(slot);
    const std::vector<float> x = random.vector(d, -2.0, 2.0);
    std::vector<float> from_small = x;
    std::vector<float> from_large = x;
    small.rotate_at_slot(from_small, slot);
    large.rotate_at_slot(from_large, slot);
    const double tolerance = rotation_tolerance(x, 1);
    require_close(from_small, test::rope_reference(x, static_cast<double>(slot), rope), tolerance);
    require_close(from_large, std::vector<double>(from_small.begin(), from_small.end()), 2.0 * tolerance);
  }

  SECTION("original mode leaves the vector unchanged") {
    const KVCache<float> original({.n_kv_heads = 1, .head_dim = d, .capacity = 8});
    const std::vector<float> x = random.vector(d);
    std::vector<float> y = x;
    original.rotate_at_slot(y, 5);
    CHECK(y == x);
  }

  SECTION("wrong vector size") {
    std::vector<float> y(static_cast<std::size_t>(d - 2), 1.0f);
    REQUIRE_THROWS_WITH(small.rotate_at_slot(y, 3), Catch::Contains("vector has 10 entries, expected head_dim 12"));
  }
}

TEST_CASE("RotaryEmbedding rejects bad configurations", "[rope]") {
  REQUIRE_THROWS_WITH(RotaryEmbedding(5, {}), Catch::Contains("head_dim (5) must be positive and even"));
  REQUIRE_THROWS_WITH(RotaryEmbedding(0, {}), Catch::Contains("head_dim (0)"));
  REQUIRE_THROWS_WITH(RotaryEmbedding(6, {.base = 1.0}), Catch::Contains("base (1) must be finite and > 1"));
  REQUIRE_THROWS_WITH(RotaryEmbedding(6, {.base = std::nan("")}), Catch::Contains("base (nan)"));
  REQUIRE_THROWS_WITH(RotaryEmbedding(6, {.frequency_scale = 0.0}),
                      Catch::Contains("frequency_scale (0) must be finite and > 0"));
  REQUIRE_THROWS_WITH(RotaryEmbedding(6, {.frequency_scale = INFINITY}), Catch::Contains("frequency_scale (inf)"));
}
