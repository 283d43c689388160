// KVCache: appends, keep (bit-exact compaction of keys, values, positions
// and state), memory arithmetic, reserve without reallocation, rejection of
// bad input with the cache left byte-identical, and half / bfloat16 storage.
#include <catch2/catch.hpp>

#include "kvevict/kernels/window_attention.hpp"
#include "kvevict/kv_cache.hpp"
#include "test_helpers.hpp"

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

using namespace kvevict;
using kvevict::test::CacheSnapshot;
using kvevict::test::Random;

namespace {

// Fills every state channel of every head with distinct values, so a test
// can tell whether state moved with its token.
template <class Scalar>
void fill_state(KVCache<Scalar>& cache, Random& random) {
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    for (int channel = 0; channel < cache.state_channels(); ++channel) {
      for (float& x : cache.state(j, channel)) x = static_cast<float>(random.uniform(-5.0, 5.0));
    }
  }
}

template <class T>
bool same_bytes(const T* a, const T* b, std::size_t count) {
  return std::memcmp(a, b, count * sizeof(T)) == 0;
}

}  // namespace

TEST_CASE("KVCache appends one and many tokens", "[kv_cache]") {
  const int heads = 3;
  const int d = 5;
  Random random(31);
  KVCache<float> cache({.n_kv_heads = heads, .head_dim = d, .state_channels = 2});
  REQUIRE(cache.empty());
  REQUIRE(cache.next_position() == 0);

  // 1 token, then 7, then 1, then 0, then 29: sizes that do not align.
  const std::vector<std::int64_t> chunks = {1, 7, 1, 0, 29};
  std::vector<RowMatrixXf> all_keys(heads, RowMatrixXf(0, d));
  std::vector<RowMatrixXf> all_values(heads, RowMatrixXf(0, d));
  std::vector<std::int64_t> all_positions;
  std::int64_t next = 0;
  for (const std::int64_t count : chunks) {
    CAPTURE(count);
    const RowMatrixXf keys = random.matrix(heads * count, d);
    const RowMatrixXf values = random.matrix(heads * count, d);
    const std::vector<std::int64_t> positions = random.increasing_positions(count, next, 3);
    cache.append(keys, values, positions);
    for (int j = 0; j < heads; ++j) {
      const auto old_rows = all_keys[static_cast<std::size_t>(j)].rows();
      all_keys[static_cast<std::size_t>(j)].conservativeResize(old_rows + count, d);
      all_values[static_cast<std::size_t>(j)].conservativeResize(old_rows + count, d);
      all_keys[static_cast<std::size_t>(j)].bottomRows(count) = keys.middleRows(j * count, count);
      all_values[static_cast<std::size_t>(j)].bottomRows(count) = values.middleRows(j * count, count);
    }
    all_positions.insert(all_positions.end(), positions.begin(), positions.end());
    if (count > 0) next = positions.back() + 1;
    REQUIRE(cache.next_position() == next);
  }

  const auto total = static_cast<std::int64_t>(all_positions.size());
  REQUIRE(cache.size() == total);
  for (int j = 0; j < heads; ++j) {
    CAPTURE(j);
    // Float storage copies the input exactly.
    CHECK(cache.keys(j) == all_keys[static_cast<std::size_t>(j)]);
    CHECK(cache.values(j) == all_values[static_cast<std::size_t>(j)]);
    CHECK(std::vector<std::int64_t>(cache.positions(j).begin(), cache.positions(j).end()) == all_positions);
    for (int channel = 0; channel < 2; ++channel) {
      for (const float x : cache.state(j, channel)) CHECK(x == 0.0f);
    }
  }
}

TEST_CASE("KVCache new slots start with zero state", "[kv_cache]") {
  // State written for evicted tokens must not leak into slots reused later.
  Random random(32);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 3, .state_channels = 1, .capacity = 10});
  cache.append(random.matrix(2 * 7, 3), random.matrix(2 * 7, 3), random.increasing_positions(7, 0, 2));
  fill_state(cache, random);
  KeepPlan plan(2, 2);
  plan.fill_identity();
  cache.keep(plan);
  cache.append(random.matrix(2 * 5, 3), random.matrix(2 * 5, 3), random.increasing_positions(5, 100, 2));
  for (int j = 0; j < 2; ++j) {
    const auto state = cache.state(j, 0);
    for (std::size_t s = 2; s < state.size(); ++s) {
      CAPTURE(j, s);
      CHECK(state[s] == 0.0f);
    }
  }
}

TEMPLATE_TEST_CASE("KVCache keep preserves kept rows bit for bit", "[kv_cache]", float, Eigen::half, Eigen::bfloat16) {
  const int heads = 4;
  const int d = 5;
  const int channels = 3;
  const std::int64_t n = 37;
  Random random(33);
  KVCache<TestType> cache({.n_kv_heads = heads, .head_dim = d, .state_channels = channels});
  cache.append(random.matrix(heads * n, d, -3.0, 3.0), random.matrix(heads * n, d, -3.0, 3.0),
               random.increasing_positions(n, 5, 4));
  fill_state(cache, random);
  const KVCache<TestType> before = cache;

  // Every head keeps a different random subset of 13 slots, in order.
  const std::int64_t kept = 13;
  KeepPlan plan(heads, kept);
  for (int j = 0; j < heads; ++j) {
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    for (std::int64_t s = 0; s < n; ++s) slots[static_cast<std::size_t>(s)] = s;
    for (std::int64_t i = n - 1; i > 0; --i) {
      std::swap(slots[static_cast<std::size_t>(i)], slots[static_cast<std::size_t>(random.integer(0, i))]);
    }
    slots.resize(static_cast<std::size_t>(kept));
    std::sort(slots.begin(), slots.end());
    std::copy(slots.begin(), slots.end(), plan.head(j).begin());
  }
  // The heads really keep different slots.
  REQUIRE_FALSE(std::equal(plan.head(0).begin(), plan.head(0).end(), plan.head(1).begin()));

  cache.keep(plan);
  REQUIRE(cache.size() == kept);
  REQUIRE(cache.next_position() == before.next_position());
  for (int j = 0; j < heads; ++j) {
    for (std::int64_t i = 0; i < kept; ++i) {
      const std::int64_t from = plan.head(j)[static_cast<std::size_t>(i)];
      CAPTURE(j, i, from);
      CHECK(same_bytes(cache.keys(j).row(i).data(), before.keys(j).row(from).data(), d));
      CHECK(same_bytes(cache.values(j).row(i).data(), before.values(j).row(from).data(), d));
      CHECK(cache.positions(j)[static_cast<std::size_t>(i)] == before.positions(j)[static_cast<std::size_t>(from)]);
      for (int channel = 0; channel < channels; ++channel) {
        CHECK(same_bytes(&cache.state(j, channel)[static_cast<std::size_t>(i)],
                         &before.state(j, channel)[static_cast<std::size_t>(from)], 1));
      }
    }
  }

  SECTION("a second keep composes with the first") {
    KeepPlan second(heads, 4);
    for (int j = 0; j < heads; ++j) {
      const std::vector<std::int64_t> slots = {0, 5, 6, 12};
      std::copy(slots.begin(), slots.end(), second.head(j).begin());
    }
    const KVCache<TestType> middle = cache;
    cache.keep(second);
    for (int j = 0; j < heads; ++j) {
      for (std::int64_t i = 0; i < 4; ++i) {
        const std::int64_t from = second.head(j)[static_cast<std::size_t>(i)];
        const std::int64_t original = plan.head(j)[static_cast<std::size_t>(from)];
        CAPTURE(j, i);
        CHECK(same_bytes(cache.keys(j).row(i).data(), before.keys(j).row(original).data(), d));
        CHECK(cache.positions(j)[static_cast<std::size_t>(i)] ==
              middle.positions(j)[static_cast<std::size_t>(from)]);
      }
    }
  }
}

TEST_CASE("KVCache keep with identity plan", "[kv_cache]") {
  Random random(34);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 3, .state_channels = 1});
  cache.append(random.matrix(2 * 7, 3), random.matrix(2 * 7, 3), random.increasing_positions(7, 0, 5));
  fill_state(cache, random);
  const CacheSnapshot before = CacheSnapshot::take(cache);

  KeepPlan plan(2, 7);
  plan.fill_identity();
  cache.keep(plan);
  CHECK(CacheSnapshot::take(cache) == before);

  SECTION("an empty plan empties the cache") {
    cache.keep(KeepPlan(2, 0));
    CHECK(cache.empty());
    CHECK(cache.next_position() == before.next_position);
  }
}

TEST_CASE("KVCache memory arithmetic", "[kv_cache]") {
  // Per slot and KV head: keys and values (2 * head_dim * sizeof(Scalar)),
  // one int64 position, one float per state channel. With 3 heads,
  // head_dim 5 and 2 channels: float 2*5*4 + 8 + 2*4 = 56 bytes, half and
  // bfloat16 2*5*2 + 8 + 2*4 = 36 bytes, times 3 heads.
  const CacheConfig config{.n_kv_heads = 3, .head_dim = 5, .state_channels = 2, .capacity = 11};
  Random random(35);
  KVCache<float> full(config);
  KVCache<Eigen::half> half(config);
  KVCache<Eigen::bfloat16> brain(config);
  CHECK(full.memory_bytes() == 0);
  CHECK(full.reserved_bytes() == 56u * 3u * 11u);
  CHECK(half.reserved_bytes() == 36u * 3u * 11u);
  CHECK(brain.reserved_bytes() == 36u * 3u * 11u);

  const RowMatrixXf keys = random.matrix(3 * 7, 5);
  const RowMatrixXf values = random.matrix(3 * 7, 5);
  const std::vector<std::int64_t> positions = random.increasing_positions(7, 0, 2);
  full.append(keys, values, positions);
  half.append(keys, values, positions);
  brain.append(keys, values, positions);
  CHECK(full.memory_bytes() == 56u * 3u * 7u);
  CHECK(half.memory_bytes() == 36u * 3u * 7u);
  CHECK(brain.memory_bytes() == 36u * 3u * 7u);

  KeepPlan plan(3, 4);
  plan.fill_identity();
  full.keep(plan);
  CHECK(full.memory_bytes() == 56u * 3u * 4u);
  CHECK(full.reserved_bytes() == 56u * 3u * 11u);

  SECTION("cache_relative tables are not counted") {
    // head_dim 6, no state: 2*6*4 + 8 = 56 bytes per slot and head.
    const KVCache<float> rotating(
        {.n_kv_heads = 2, .head_dim = 6, .positions = PositionMode::cache_relative, .capacity = 9});
    CHECK(rotating.reserved_bytes() == 56u * 2u * 9u);
  }
  SECTION("growth past the capacity") {
    full.append(random.matrix(3 * 20, 5), random.matrix(3 * 20, 5), random.increasing_positions(20, 100, 2));
    CHECK(full.capacity() >= 24);
    CHECK(full.memory_bytes() == 56u * 3u * 24u);
    CHECK(full.reserved_bytes() == 56u * 3u * static_cast<std::size_t>(full.capacity()));
  }
}

TEST_CASE("KVCache reserve avoids reallocation", "[kv_cache]") {
  Random random(36);
  KVCache<float> cache({.n_kv_heads = 2, .head_dim = 3, .state_channels = 1});
  cache.reserve(40);
  REQUIRE(cache.capacity() == 40);
  cache.append(random.matrix(2, 3), random.matrix(2, 3), std::vector<std::int64_t>{0});
  const float* keys = cache.keys(0).data();
  const float* values = cache.values(1).data();
  const std::int64_t* positions = cache.positions(1).data();
  const float* state = cache.state(1, 0).data();

  std::int64_t next = 1;
  for (const std::int64_t count : {1, 7, 13, 18}) {  // 1 + 39 = 40 slots: exactly the capacity
    CAPTURE(count);
    cache.append(random.matrix(2 * count, 3), random.matrix(2 * count, 3), random.increasing_positions(count, next, 1));
    next += count;
    CHECK(cache.keys(0).data() == keys);
    CHECK(cache.values(1).data() == values);
    CHECK(cache.positions(1).data() == positions);
    CHECK(cache.state(1, 0).data() == state);
  }
  REQUIRE(cache.size() == 40);

  KeepPlan plan(2, 9);
  plan.fill_identity();
  cache.keep(plan);
  CHECK(cache.keys(0).data() == keys);
  CHECK(cache.capacity() == 40);

  // reserve never shrinks.
  cache.reserve(5);
  CHECK(cache.capacity() == 40);
}

TEST_CASE("KVCache rejects bad input unchanged", "[kv_cache]") {
  const int heads = 2;
  const int d = 3;
  Random random(37);
  KVCache<float> cache({.n_kv_heads = heads, .head_dim = d, .state_channels = 2});
  cache.append(random.matrix(heads * 7, d), random.matrix(heads * 7, d), std::vector<std::int64_t>{0, 2, 3, 5, 8, 9, 11});
  fill_state(cache, random);
  const CacheSnapshot before = CacheSnapshot::take(cache);

  const RowMatrixXf keys = random.matrix(heads * 2, d);
  const RowMatrixXf values = random.matrix(heads * 2, d);
  const std::vector<std::int64_t> positions = {12, 15};

  SECTION("keys with too few rows") {
    REQUIRE_THROWS_WITH(cache.append(random.matrix(3, d), values, positions),
                        Catch::Contains("keys are [3 x 3]") && Catch::Contains("[4 x 3]"));
  }
  SECTION("keys with the wrong head_dim") {
    REQUIRE_THROWS_WITH(cache.append(random.matrix(4, d + 1), values, positions),
                        Catch::Contains("keys are [4 x 4]"));
  }
  SECTION("values with the wrong shape") {
    REQUIRE_THROWS_WITH(cache.append(keys, random.matrix(4, d - 1), positions),
                        Catch::Contains("values are [4 x 2], expected [4 x 3]"));
  }
  SECTION("NaN in keys") {
    RowMatrixXf bad = keys;
    bad(3, 1) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(cache.append(bad, values, positions),
                        Catch::Contains("keys(3, 1) is nan") && Catch::Contains("finite"));
  }
  SECTION("infinity in values") {
    RowMatrixXf bad = values;
    bad(0, 2) = -std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(cache.append(keys, bad, positions), Catch::Contains("values(0, 2) is -inf"));
  }
  SECTION("position equal to the newest") {
    REQUIRE_THROWS_WITH(cache.append(keys, values, std::vector<std::int64_t>{11, 15}),
                        Catch::Contains("position 11 at index 0 must be greater than 11"));
  }
  SECTION("positions decreasing inside a chunk") {
    REQUIRE_THROWS_WITH(cache.append(keys, values, std::vector<std::int64_t>{20, 14}),
                        Catch::Contains("position 14 at index 1 must be greater than 20"));
  }
  SECTION("repeated position inside a chunk") {
    REQUIRE_THROWS_WITH(cache.append(keys, values, std::vector<std::int64_t>{20, 20}),
                        Catch::Contains("position 20 at index 1 must be greater than 20"));
  }
  SECTION("plan with a duplicate slot") {
    KeepPlan plan(heads, 3);
    plan.fill_identity();
    plan.head(1)[2] = 1;
    REQUIRE_THROWS_WITH(cache.keep(plan), Catch::Contains("head 1 entry 2 is slot 1 after slot 1") &&
                                              Catch::Contains("strictly increasing"));
  }
  SECTION("unsorted plan") {
    KeepPlan plan(heads, 3);
    plan.fill_identity();
    plan.head(0)[0] = 4;
    REQUIRE_THROWS_WITH(cache.keep(plan), Catch::Contains("head 0 entry 1 is slot 1 after slot 4"));
  }
  SECTION("slot past the end") {
    KeepPlan plan(heads, 3);
    plan.fill_identity();
    plan.head(1)[2] = 7;
    REQUIRE_THROWS_WITH(cache.keep(plan), Catch::Contains("head 1 entry 2 is slot 7, outside [0, 7)"));
  }
  SECTION("negative slot") {
    KeepPlan plan(heads, 3);
    plan.fill_identity();
    plan.head(0)[0] = -1;
    REQUIRE_THROWS_WITH(cache.keep(plan), Catch::Contains("head 0 entry 0 is slot -1, outside [0, 7)"));
  }
  SECTION("plan for the wrong head count") {
    KeepPlan plan(heads + 1, 3);
    plan.fill_identity();
    REQUIRE_THROWS_WITH(cache.keep(plan), Catch::Contains("plan has 3 KV heads, the cache has 2"));
  }
  SECTION("plan with too many slots") {
    KeepPlan plan(heads, 8);
    plan.fill_identity();
    REQUIRE_THROWS_WITH(cache.keep(plan), Catch::Contains("plan keeps 8 slots per head, the cache holds 7"));
  }
  SECTION("bad head and channel indices") {
    REQUIRE_THROWS_WITH(cache.positions(2), Catch::Contains("KV head index (2) must be in [0, 2)"));
    REQUIRE_THROWS_WITH(cache.keys(-1), Catch::Contains("KV head index (-1)"));
    REQUIRE_THROWS_WITH(cache.state(0, 2), Catch::Contains("state channel (2) must be in [0, 2)"));
  }
  CHECK(CacheSnapshot::take(cache) == before);
}

TEST_CASE("KVCache rejects bad configurations", "[kv_cache]") {
  REQUIRE_THROWS_WITH(KVCache<float>({.n_kv_heads = 0, .head_dim = 3}), Catch::Contains("n_kv_heads (0)"));
  REQUIRE_THROWS_WITH(KVCache<float>({.n_kv_heads = 1, .head_dim = -2}), Catch::Contains("head_dim (-2)"));
  REQUIRE_THROWS_WITH(KVCache<float>({.n_kv_heads = 1, .head_dim = 3, .state_channels = -1}),
                      Catch::Contains("state_channels (-1)"));
  REQUIRE_THROWS_WITH(KVCache<float>({.n_kv_heads = 1, .head_dim = 3, .capacity = -4}),
                      Catch::Contains("capacity (-4)"));
  // cache_relative rotates keys with RoPE, which needs an even head_dim.
  REQUIRE_THROWS_WITH(KVCache<float>({.n_kv_heads = 1, .head_dim = 5, .positions = PositionMode::cache_relative}),
                      Catch::Contains("head_dim (5) must be positive and even"));
}

TEST_CASE("KVCache clear keeps next position", "[kv_cache]") {
  Random random(38);
  KVCache<float> cache({.n_kv_heads = 1, .head_dim = 3});
  cache.append(random.matrix(3, 3), random.matrix(3, 3), std::vector<std::int64_t>{0, 1, 4});
  const std::int64_t capacity = cache.capacity();
  cache.clear();
  CHECK(cache.empty());
  CHECK(cache.capacity() == capacity);
  CHECK(cache.next_position() == 5);
  CHECK_THROWS_WITH(cache.append(random.matrix(1, 3), random.matrix(1, 3), std::vector<std::int64_t>{4}),
                    Catch::Contains("position 4 at index 0 must be greater than 4"));
}

TEMPLATE_TEST_CASE("KVCache reduced precision round trip", "[kv_cache]", Eigen::half, Eigen::bfloat16) {
  // Rounding to nearest moves a value by at most u |x| with u = 2^-11 for
  // half and 2^-8 for bfloat16, as long as |x| is in the storage type's
  // normal range. Values below half's smallest normal (2^-14) are rounded
  // to a multiple of 2^-24, so half adds an absolute 2^-25. bfloat16 shares
  // float's exponent range and needs no such term.
  const double u = test::unit_roundoff<TestType>();
  const double absolute = std::is_same_v<TestType, Eigen::half> ? 0x1p-25 : 0.0;
  Random random(39);
  const int heads = 2;
  const int d = 12;
  const std::int64_t n = 101;
  RowMatrixXf keys = random.matrix(heads * n, d, -40.0, 40.0);
  RowMatrixXf values = random.matrix(heads * n, d, -1e-3, 1e-3);
  keys(0, 0) = 1e-6f;  // subnormal in half
  KVCache<TestType> cache({.n_kv_heads = heads, .head_dim = d});
  cache.append(keys, values, random.increasing_positions(n, 0, 2));

  for (int j = 0; j < heads; ++j) {
    for (std::int64_t t = 0; t < n; ++t) {
      for (int k = 0; k < d; ++k) {
        const double key = keys(j * n + t, k);
        const double value = values(j * n + t, k);
        CAPTURE(j, t, k);
        CHECK(std::abs(static_cast<double>(static_cast<float>(cache.keys(j)(t, k))) - key) <=
              u * std::abs(key) + absolute);
        CHECK(std::abs(static_cast<double>(static_cast<float>(cache.values(j)(t, k))) - value) <=
              u * std::abs(value) + absolute);
      }
    }
  }
}

TEMPLATE_TEST_CASE("window attention over reduced precision cache", "[kv_cache][window_attention]", Eigen::half,
                   Eigen::bfloat16) {
  // Storage rounds every key coordinate by at most u |k| (inputs are in the
  // normal range), so each logit moves by at most
  //   delta_z = u * scale * sum_k |q_k k_k|.
  // A softmax moves by at most 2 delta_z * p in each probability (every
  // exp argument shifts by delta_z, the normaliser by at most delta_z), so
  // |p_storage - p_float| <= 2 delta_z (e^(2 delta_z) for the second-order
  // term), plus the float rounding of both evaluations
  // (window_attention_tolerance, applied twice).
  const double u = test::unit_roundoff<TestType>();
  Random random(40);
  const int n_heads = 12;
  const int n_kv_heads = 4;
  const int d = 12;
  const std::int64_t n = 37;
  const std::int64_t w = 5;
  const RowMatrixXf keys = random.matrix(n_kv_heads * n, d);
  const RowMatrixXf values = random.matrix(n_kv_heads * n, d);
  const std::vector<std::int64_t> positions = random.increasing_positions(n, 0, 3);
  KVCache<float> full({.n_kv_heads = n_kv_heads, .head_dim = d});
  KVCache<TestType> reduced({.n_kv_heads = n_kv_heads, .head_dim = d});
  full.append(keys, values, positions);
  reduced.append(keys, values, positions);

  const std::vector<float> query_data = random.vector(n_heads * w * d, -2.0, 2.0);
  const Tensor3View queries{query_data.data(), n_heads, w, d};
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int g = n_heads / n_kv_heads;

  kernels::WindowAttentionWorkspace workspace;
  RowMatrixXf expected;
  RowMatrixXf actual;
  for (int j = 0; j < n_kv_heads; ++j) {
    kernels::group_window_attention(full, j, queries, scale, expected, workspace);
    kernels::group_window_attention(reduced, j, queries, scale, actual, workspace);
    const test::RowMatrixXd key_rows = test::to_double(full.keys(j));
    for (Eigen::Index r = 0; r < actual.rows(); ++r) {
      const auto source = queries.row(j * g + r / w, r % w);
      test::RowMatrixXd query(1, d);
      for (int k = 0; k < d; ++k) query(0, k) = source[static_cast<std::size_t>(k)];
      const double magnitude = test::logit_magnitude(query, key_rows, scale);
      const double delta_z = u * magnitude;
      const double tolerance = 2.0 * delta_z * std::exp(2.0 * delta_z) +
                               2.0 * test::window_attention_tolerance(d + 1, n, magnitude);
      for (Eigen::Index t = 0; t < actual.cols(); ++t) {
        CAPTURE(j, r, t, tolerance);
        CHECK(std::abs(actual(r, t) - expected(r, t)) <= tolerance);
      }
    }
  }
}
