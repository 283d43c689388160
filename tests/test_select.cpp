// select_keep: deterministic top-k with protected sinks, recent window and
// extra flags, against a brute force by full sort.
#include <catch2/catch.hpp>

#include "kvevict/kernels/select.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

using namespace kvevict;
using kvevict::test::Random;

namespace {

std::vector<std::int64_t> run_select(std::span<const float> scores, std::int64_t n, std::int64_t sinks,
                                     std::int64_t recent, std::int64_t keep_count,
                                     std::span<const std::uint8_t> extra = {}) {
  std::vector<std::int64_t> out(static_cast<std::size_t>(keep_count), -1);
  kernels::SelectScratch scratch;
  kernels::select_keep(scores, n, sinks, recent, keep_count, out, scratch, extra);
  return out;
}

}  // namespace

TEST_CASE("select_keep ties keep the later slot", "[select]") {
  // Equal scores everywhere: the latest slots win.
  const std::vector<float> flat(6, 1.0f);
  CHECK(run_select(flat, 6, 0, 0, 3) == std::vector<std::int64_t>{3, 4, 5});
  // Slots 1, 3 and 5 tie for the best score, so keeping two takes 3 and 5.
  const std::vector<float> scores = {0.5f, 2.0f, 1.0f, 2.0f, 0.25f, 2.0f, 1.0f};
  CHECK(run_select(scores, 7, 0, 0, 2) == std::vector<std::int64_t>{3, 5});
  // Keeping four adds the better of the tied slots 2 and 6: slot 6.
  CHECK(run_select(scores, 7, 0, 0, 4) == std::vector<std::int64_t>{1, 3, 5, 6});
}

TEST_CASE("select_keep protects sinks, recent and flags", "[select]") {
  // Protected slots are kept even with the lowest scores. The scores of
  // protected slots are never read, so NaN there changes nothing.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> scores = {nan, 9.0f, 8.0f, 0.0f, 7.0f, 6.0f, 0.5f, nan, nan};
  const std::vector<std::uint8_t> extra = {0, 0, 0, 1, 0, 0, 0, 0, 0};
  // Sinks {0}, recent {7, 8} and extra {3}, plus two scored slots: 1 and 2.
  CHECK(run_select(scores, 9, 1, 2, 6, extra) == std::vector<std::int64_t>{0, 1, 2, 3, 7, 8});
  // Only protected slots.
  CHECK(run_select(scores, 9, 1, 2, 4, extra) == std::vector<std::int64_t>{0, 3, 7, 8});
  // Everything.
  CHECK(run_select(scores, 9, 1, 2, 9, extra) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8});
  // Sinks and recent overlapping, or longer than the row, protect every slot
  // once.
  const std::vector<float> three = {1.0f, 2.0f, 3.0f};
  CHECK(run_select(three, 3, 2, 2, 3) == std::vector<std::int64_t>{0, 1, 2});
  CHECK(run_select(three, 3, 5, 0, 3) == std::vector<std::int64_t>{0, 1, 2});
}

TEST_CASE("select_keep with nothing to keep", "[select]") {
  const std::vector<float> scores = {1.0f, 2.0f};
  CHECK(run_select(scores, 2, 0, 0, 0).empty());
  CHECK(run_select({}, 0, 0, 0, 0).empty());
  CHECK(run_select({}, 0, 4, 3, 0).empty());
}

TEST_CASE("select_keep matches brute force", "[select]") {
  // Random scores from a few levels (many ties), random protected ranges
  // and flags, every feasible keep_count: the result must be the protected
  // slots plus the best others by the full-sort ranking, sorted.
  Random random(91);
  for (const std::int64_t n : {1, 7, 37, 101}) {
    for (int trial = 0; trial < 12; ++trial) {
      const std::vector<float> scores = trial % 2 == 0 ? random.quantized(n, 4) : random.vector(n, 0.0, 1.0);
      const std::int64_t sinks = random.integer(0, std::min<std::int64_t>(n, 5));
      const std::int64_t recent = random.integer(0, std::min<std::int64_t>(n, 6));
      std::vector<std::uint8_t> extra;
      if (trial % 3 != 0) {
        extra.resize(static_cast<std::size_t>(n));
        for (auto& flag : extra) flag = random.coin(0.1) ? 1 : 0;
      }

      std::vector<std::int64_t> protected_slots;
      std::vector<std::int64_t> candidates;
      for (std::int64_t t = 0; t < n; ++t) {
        const bool is_protected =
            t < sinks || t >= n - recent || (!extra.empty() && extra[static_cast<std::size_t>(t)] != 0);
        (is_protected ? protected_slots : candidates).push_back(t);
      }
      const auto protected_count = static_cast<std::int64_t>(protected_slots.size());

      for (std::int64_t keep_count = protected_count; keep_count <= n; ++keep_count) {
        CAPTURE(n, trial, sinks, recent, keep_count);
        const std::vector<std::int64_t> actual = run_select(scores, n, sinks, recent, keep_count, extra);
        std::vector<std::int64_t> expected = test::brute_force_top_k(scores, candidates, keep_count - protected_count);
        expected.insert(expected.end(), protected_slots.begin(), protected_slots.end());
        std::sort(expected.begin(), expected.end());
        CHECK(actual == expected);
      }
    }
  }
}

TEST_CASE("select_keep is invariant to positive scaling", "[select]") {
  // Multiplying every score by a positive power of two keeps the ranking
  // and the ties exactly, so the kept set cannot change.
  Random random(92);
  const std::int64_t n = 37;
  std::vector<float> scores = random.quantized(n, 5);
  const std::vector<std::int64_t> before = run_select(scores, n, 2, 3, 17);
  for (float& score : scores) score *= 8.0f;
  CHECK(run_select(scores, n, 2, 3, 17) == before);
}

TEST_CASE("select_keep rejects bad arguments", "[select]") {
  const std::vector<float> scores(7, 1.0f);
  kernels::SelectScratch scratch;
  std::vector<std::int64_t> out(3);

  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 7, 0, 0, 8, std::span<std::int64_t>{}, scratch),
                      Catch::Contains("keep_count (8) must be in [0, n = 7]"));
  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 7, 0, 0, -1, std::span<std::int64_t>{}, scratch),
                      Catch::Contains("keep_count (-1)"));
  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 8, 0, 0, 3, out, scratch),
                      Catch::Contains("scores has 7 entries, expected n = 8"));
  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 7, 0, 0, 2, out, scratch),
                      Catch::Contains("out has 3 entries, expected keep_count = 2"));
  const std::vector<std::uint8_t> short_flags(6, 0);
  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 7, 0, 0, 3, out, scratch, short_flags),
                      Catch::Contains("extra_protected has 6 flags, expected n = 7"));
  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 7, -1, 0, 3, out, scratch),
                      Catch::Contains("sinks (-1) and recent (0) must be non-negative"));
  // keep_count below the protected count: 2 sinks, 1 recent and 1 flag.
  std::vector<std::uint8_t> flags(7, 0);
  flags[3] = 1;
  REQUIRE_THROWS_WITH(kernels::select_keep(scores, 7, 2, 1, 3, out, scratch, flags),
                      Catch::Contains("4 protected slots (sinks 2, recent 1, extra 1) exceed keep_count 3"));
}
