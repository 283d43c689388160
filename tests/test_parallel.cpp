// Results do not depend on the thread count. With -DKVEVICT_OPENMP=ON Eigen
// splits its matrix products (the window attention logits, the ReST-KV
// quadratic forms) across OpenMP threads; every attention row and kept set
// must come out bit-identical with one thread and with two. Without OpenMP
// both runs use one thread and the test checks that a run repeats exactly.
#include <catch2/catch.hpp>

#include "kvevict/kernels/window_attention.hpp"
#include "kvevict/policies/restkv.hpp"
#include "kvevict/policies/snapkv.hpp"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

using namespace kvevict;

namespace {

constexpr int n_heads = 8;
constexpr int n_kv_heads = 2;
constexpr int head_dim = 64;
constexpr std::int64_t window = 16;
constexpr std::int64_t budget = 256;
constexpr std::int64_t tokens = 3000;

std::vector<float> random_values(std::size_t count, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  std::vector<float> values(count);
  for (auto& value : values) value = static_cast<float>(static_cast<double>(engine() >> 11) * 0x1p-53 * 2.0 - 1.0);
  return values;
}

KVCache<float> make_cache(int channels) {
  KVCache<float> cache(CacheConfig{.n_kv_heads = n_kv_heads,
                                   .head_dim = head_dim,
                                   .positions = PositionMode::original,
                                   .state_channels = channels,
                                   .capacity = tokens,
                                   .rope = {}});
  const auto keys = random_values(static_cast<std::size_t>(n_kv_heads * tokens * head_dim), 1);
  const auto values = random_values(static_cast<std::size_t>(n_kv_heads * tokens * head_dim), 2);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) positions[static_cast<std::size_t>(t)] = 2 * t;  // gaps, as after eviction
  cache.append(Eigen::Map<const RowMatrixXf>(keys.data(), n_kv_heads * tokens, head_dim),
               Eigen::Map<const RowMatrixXf>(values.data(), n_kv_heads * tokens, head_dim), positions);
  return cache;
}

// Runs `body` with Eigen limited to `threads` threads, then restores the
// previous setting.
template <class Body>
auto with_threads(int threads, Body&& body) {
  const int previous = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  auto result = body();
  Eigen::setNbThreads(previous);
  return result;
}

}  // namespace

TEST_CASE("window attention independent of thread count", "[parallel]") {
  const KVCache<float> cache = make_cache(0);
  const auto queries = random_values(static_cast<std::size_t>(n_heads * window * head_dim), 3);
  const Tensor3View view{queries.data(), n_heads, window, head_dim};
  const auto attend = [&] {
    std::vector<RowMatrixXf> rows(n_kv_heads);
    kernels::WindowAttentionWorkspace workspace;
    for (int j = 0; j < n_kv_heads; ++j) {
      kernels::group_window_attention(cache, j, view, 0.125f, rows[static_cast<std::size_t>(j)], workspace);
    }
    return rows;
  };
  const auto single = with_threads(1, attend);
  const auto two = with_threads(2, attend);
  for (int j = 0; j < n_kv_heads; ++j) {
    CAPTURE(j);
    CHECK(single[static_cast<std::size_t>(j)] == two[static_cast<std::size_t>(j)]);
  }
}

TEST_CASE("SnapKV and ReST-KV selections independent of thread count", "[parallel]") {
  const auto queries = random_values(static_cast<std::size_t>(n_heads * window * head_dim), 4);
  Observation observation;
  observation.n_heads = n_heads;
  observation.queries = {queries.data(), n_heads, window, head_dim};
  observation.appended = tokens;

  SECTION("SnapKV") {
    const KVCache<float> cache = make_cache(0);
    const auto run = [&] {
      SnapKV<float> policy({.budget = budget, .window = window});
      KeepPlan plan;
      policy.select(cache, observation, plan);
      return plan;
    };
    const KeepPlan single = with_threads(1, run);
    const KeepPlan two = with_threads(2, run);
    REQUIRE(single.count() == budget);
    CHECK(single == two);
  }

  SECTION("ReST-KV") {
    const RowMatrixXf w_o = Eigen::Map<const RowMatrixXf>(
        random_values(static_cast<std::size_t>(128 * n_heads * head_dim), 5).data(), 128, n_heads * head_dim);
    const RestKVConfig config{
        .budget = budget, .window = window, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim};
    const auto run = [&] {
      KVCache<float> cache = make_cache(n_heads / n_kv_heads);
      RestKV<float> policy(config, w_o);
      policy.observe(cache, observation);  // the quadratic forms, one matrix product per query head
      KeepPlan plan;
      policy.select(cache, observation, plan);
      return plan;
    };
    const KeepPlan single = with_threads(1, run);
    const KeepPlan two = with_threads(2, run);
    REQUIRE(single.count() == budget);
    CHECK(single == two);
  }
}
