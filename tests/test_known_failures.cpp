// Regression tests for faults that other KV-cache eviction implementations
// shipped (rotating and sink caches, H2O and SnapKV ports, context
// shifting). Each test names the fault it rules out and shows, in kvevict's
// own types, that the whole class of fault cannot happen here. Where the
// original scenario assumes a rule kvevict fixes differently, the comment
// states kvevict's rule and the result it gives.
#include <catch2/catch.hpp>

#include "policy_fixtures.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

using namespace kvevict;
using namespace kvevict::testing;

namespace {

// Unrotated key of token `position` on KV head j of layer `layer`: distinct
// for every token, head and layer, so a moved row is recognised.
std::vector<float> raw_key(std::int64_t position, int j, int d, int layer = 0) {
  std::vector<float> key(static_cast<std::size_t>(d));
  for (int k = 0; k < d; ++k) {
    key[static_cast<std::size_t>(k)] =
        std::sin(0.37f * static_cast<float>(position) + 1.3f * static_cast<float>(j) + 0.71f * static_cast<float>(k) +
                 2.9f * static_cast<float>(layer)) +
        0.01f * static_cast<float>(position);
  }
  return key;
}

// Appends tokens first .. first + count - 1 with raw_key keys (rotated at
// their positions in original mode) and values 10 * position + j.
void append_tokens(KVCache<float>& cache, std::int64_t first, std::int64_t count, int layer = 0) {
  const int d = cache.head_dim();
  const int heads = cache.n_kv_heads();
  const RotaryEmbedding rope(d, RopeConfig{});
  RowMatrixXf keys(heads * count, d);
  RowMatrixXf values(heads * count, d);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
  for (std::int64_t c = 0; c < count; ++c) {
    const std::int64_t position = first + c;
    positions[static_cast<std::size_t>(c)] = position;
    for (int j = 0; j < heads; ++j) {
      std::vector<float> key = raw_key(position, j, d, layer);
      if (cache.position_mode() == PositionMode::original) rope.rotate(key, static_cast<double>(position));
      for (int k = 0; k < d; ++k) {
        keys(j * count + c, k) = key[static_cast<std::size_t>(k)];
        values(j * count + c, k) = static_cast<float>(10 * position + j);
      }
    }
  }
  cache.append(keys, values, positions);
}

KVCache<float> make_cache(PositionMode mode, int n_kv_heads = 2, int head_dim = 6, int state_channels = 0) {
  return KVCache<float>(CacheConfig{
      .n_kv_heads = n_kv_heads, .head_dim = head_dim, .positions = mode, .state_channels = state_channels});
}

std::vector<std::int64_t> positions_of(const KVCache<float>& cache, int j = 0) {
  const auto p = cache.positions(j);
  return {p.begin(), p.end()};
}

std::vector<std::int64_t> range(std::int64_t begin, std::int64_t end) {
  std::vector<std::int64_t> out(static_cast<std::size_t>(end - begin));
  std::iota(out.begin(), out.end(), begin);
  return out;
}

std::vector<std::int64_t> concat(std::vector<std::int64_t> a, const std::vector<std::int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Largest absolute difference between rotated_keys(j) and each kept token's
// raw key rotated at its slot index (cache_relative mode).
float slot_rotation_error(const KVCache<float>& cache, int j, int layer = 0) {
  const int d = cache.head_dim();
  const RotaryEmbedding rope(d, RopeConfig{});
  RowMatrixXf rotated(cache.size(), d);
  cache.rotated_keys(j, rotated);
  float worst = 0.0f;
  for (std::int64_t s = 0; s < cache.size(); ++s) {
    std::vector<float> expected = raw_key(cache.positions(j)[static_cast<std::size_t>(s)], j, d, layer);
    rope.rotate(expected, static_cast<double>(s));
    for (int k = 0; k < d; ++k) {
      worst = std::max(worst, std::abs(rotated(s, k) - expected[static_cast<std::size_t>(k)]));
    }
  }
  return worst;
}

std::string error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  return "";
}

template <class Adapter>
using FloatPolicy = typename Adapter::template policy_type<float>;

// A policy and a simulated layer for the adapter-driven rows.
template <class Adapter>
struct Layer {
  PolicySetup setup;
  FloatPolicy<Adapter> policy;
  Engine<float> engine;
  KeepPlan plan;

  Layer(const PolicySetup& s, const EngineOptions& options)
      : setup(s), policy(Adapter::template make<float>(s)), engine(s.shape, policy.needs(), policy.state_channels(), options) {}

  KVCache<float>& cache() { return engine.cache(); }
  bool prefill(std::int64_t count) {
    engine.append(count);
    return compress_prefill(policy, cache(), engine.observation(true), plan);
  }
  bool decode(std::int64_t count) {
    engine.append(count);
    return observe_and_evict(policy, cache(), engine.observation(false), plan);
  }
};

}  // namespace

TEST_CASE("C01 a zero budget is rejected instead of emptying the cache", "[known_failures]") {
  // The fault: kept = floor(k (1 - ratio)) with no floor of 1 empties a 1-2
  // token cache and the next decode attends to nothing. kvevict budgets are
  // token counts and must be at least 1; the ratio 0.6 on 2 tokens gives
  // floor(2 * 0.4) = 0, which every policy's constructor rejects by name.
  const std::int64_t budget_from_ratio = static_cast<std::int64_t>(std::floor(2 * (1.0 - 0.6)));
  REQUIRE(budget_from_ratio == 0);
  PolicySetup zero;
  zero.shape = {4, 2, 6};
  zero.budget = budget_from_ratio;
  zero.window = 1;
  zero.plain_scores = true;

  // A cache of 2 tokens stays as it was: nothing was constructed to touch it.
  Engine<float> engine(zero.shape, ObservationNeeds{}, 0, EngineOptions{});
  engine.append(2);
  const CacheSnapshot before = snapshot(engine.cache());

  for_each_adapter([&]<class Adapter>() {
    if (!Adapter::evicts) return;
    INFO("policy " << Adapter::name);
    const std::string message = error_message([&] { Adapter::template make<float>(zero); });
    const bool names_budget =
        message.find("budget (0)") != std::string::npos || message.find("capacity (0)") != std::string::npos;
    CHECK(names_budget);
  });
  CHECK(snapshot(engine.cache()) == before);

  // The smallest legal budget, 1, keeps one slot per head of a 2-token
  // prompt, and attention over it stays finite.
  PolicySetup one = zero;
  one.budget = 1;
  const auto keep_one = [&]<class Adapter>() {
    INFO("policy " << Adapter::name);
    Layer<Adapter> layer(one, EngineOptions{});
    CHECK(layer.prefill(2));
    CHECK(layer.cache().size() == 1);
    const double gap = layer.engine.dense_attention_gap();
    CHECK(std::isfinite(gap));
    CHECK(gap < 1e-9);
  };
  keep_one.operator()<StreamingLLMAdapter>();
  keep_one.operator()<H2OAdapter>();
  keep_one.operator()<TOVAAdapter>();
  keep_one.operator()<SnapKVAdapter>();
  keep_one.operator()<RestKVAdapter>();
}

TEST_CASE("C02 an empty protected window protects nothing", "[known_failures]") {
  // The fault: a window of floor(30 * 0.02) = 0 written as a negative slice
  // meant "the last 0" = every token, so nothing useful was evicted. In
  // kvevict a recent range of 0 protects no slot: 30 tokens, budget 5, the
  // oldest scored highest, keep {0..4}.
  const std::int64_t n = 30;
  const auto window = static_cast<std::int64_t>(std::floor(30 * 0.02));
  REQUIRE(window == 0);
  std::vector<float> scores(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t) scores[static_cast<std::size_t>(t)] = static_cast<float>(n - t);
  std::vector<std::int64_t> kept(5);
  kernels::SelectScratch scratch;
  kernels::select_keep(scores, n, 0, window, 5, kept, scratch);
  CHECK(kept == range(0, 5));

  // TOVA has no recent window: with the newest query attending most to the
  // oldest tokens it keeps {0..4}.
  TOVA<float> tova({.budget = 5});
  KVCache<float> cache = make_cache(PositionMode::original, 1, 4);
  append_tokens(cache, 0, n);
  std::vector<float> row(static_cast<std::size_t>(n));
  double total = 0.0;
  for (std::int64_t t = 0; t < n; ++t) total += std::exp(-0.5 * static_cast<double>(t));
  for (std::int64_t t = 0; t < n; ++t) {
    row[static_cast<std::size_t>(t)] = static_cast<float>(std::exp(-0.5 * static_cast<double>(t)) / total);
  }
  Observation observation;
  observation.n_heads = 1;
  observation.attention = {row.data(), 1, 1, n};
  observation.appended = n;
  observation.prefill = true;
  KeepPlan plan;
  REQUIRE(compress_prefill(tova, cache, observation, plan));
  CHECK(positions_of(cache) == range(0, 5));

  // Policies whose recent window must protect the newest token reject a
  // window of 0 by name instead of reading it as "all".
  CHECK_THAT(error_message([] { H2O<float>({.budget = 5, .recent = 0}); }), Catch::Contains("recent (0)"));
  CHECK_THAT(error_message([] { SnapKV<float>({.budget = 5, .window = 0}); }), Catch::Contains("window (0)"));
  CHECK_THAT(error_message([] { SinkCLIP<float>({.budget = 5, .sinks = 0, .recent = 0}); }),
             Catch::Contains("recent (0)"));
}

TEST_CASE("C04 repeated compressions report the true size", "[known_failures]") {
  // The fault: a two-stage press multiplied removal fractions as if they
  // were keep fractions and reported the wrong compression. kvevict has no
  // multi-stage press; an engine that compresses twice reads the true size
  // from the cache. 16 tokens, each stage removing 50% (budgets 8, then 4):
  // 4 kept, removal 1 - 4/16 = 0.75, and the bytes in use shrink to a
  // quarter.
  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 8;
  Layer<H2OAdapter> layer(setup, EngineOptions{});
  layer.engine.append(16);
  const std::size_t full_bytes = layer.cache().memory_bytes();
  REQUIRE(compress_prefill(layer.policy, layer.cache(), layer.engine.observation(true), layer.plan));
  REQUIRE(layer.cache().size() == 8);

  // Second stage: H2O ranks by its accumulated state, so it selects without
  // a new observation.
  H2O<float> second({.budget = 4});
  const KeepPlan plan = kvevict::select(second, layer.cache(), Observation{});
  layer.cache().keep(plan);
  CHECK(layer.cache().size() == 4);
  const double removal = 1.0 - static_cast<double>(layer.cache().size()) / 16.0;
  CHECK(removal == 0.75);
  CHECK(layer.cache().memory_bytes() * 4 == full_bytes);
  for (int j = 0; j < layer.cache().n_kv_heads(); ++j) CHECK(layer.cache().positions(j).size() == 4);
}

TEST_CASE("C05 streaming keeps sinks and shifts positions", "[known_failures]") {
  // The fault: sinks kept but keys left at their text positions while the
  // next query took its position from the shrunken cache length.
  // StreamingLLM with sinks 4 and a recent range of 4 (budget 8), 12 tokens:
  //   cache_relative: keys rotated as slots 0..7, the next query as 8;
  //   original: positions 0-3 and 8-11 stay, the next query is at 12.
  for (const PositionMode mode : {PositionMode::original, PositionMode::cache_relative}) {
    INFO("mode " << to_string(mode));
    StreamingLLM<float> policy({.budget = 8, .sinks = 4});
    KVCache<float> cache = make_cache(mode);
    KeepPlan plan;
    for (std::int64_t p = 0; p < 12; ++p) {
      append_tokens(cache, p, 1);
      observe_and_evict(policy, cache, Observation{}, plan);
    }
    const auto expected = concat(range(0, 4), range(8, 12));
    for (int j = 0; j < 2; ++j) CHECK(positions_of(cache, j) == expected);
    CHECK(cache.size() == 8);
    CHECK(cache.next_position() == 12);

    if (mode == PositionMode::cache_relative) {
      for (int j = 0; j < 2; ++j) CHECK(slot_rotation_error(cache, j) < 1e-6f);
      // The next query is rotated at slot size() = 8.
      const RotaryEmbedding rope(6, RopeConfig{});
      std::vector<float> query = raw_key(500, 0, 6);
      std::vector<float> expected_query = query;
      rope.rotate(expected_query, 8.0);
      cache.rotate_at_slot(query, cache.size());
      for (int k = 0; k < 6; ++k) CHECK(query[static_cast<std::size_t>(k)] == Approx(expected_query[static_cast<std::size_t>(k)]));
    } else {
      // Attention positions are the token positions, and the next token's
      // position comes from next_position(), not from size().
      for (std::int64_t s = 0; s < cache.size(); ++s) {
        CHECK(cache.attention_position(0, s) == expected[static_cast<std::size_t>(s)]);
      }
      CHECK(cache.next_position() != cache.size());
    }
  }
}

TEST_CASE("C07 a prompt longer than the budget is cut and re-rotated", "[known_failures]") {
  // The fault: the first update was assumed shorter than the window, so a
  // long prompt crashed or kept unrotated keys. StreamingLLM, sinks 1,
  // budget 4, one 10-token prefill: positions {0, 7, 8, 9}, rotations as
  // slots {0, 1, 2, 3}, next position 10 (the next key takes slot 4).
  StreamingLLM<float> policy({.budget = 4, .sinks = 1});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  append_tokens(cache, 0, 10);
  KeepPlan plan;
  REQUIRE(compress_prefill(policy, cache, Observation{}, plan));
  for (int j = 0; j < 2; ++j) {
    CHECK(positions_of(cache, j) == std::vector<std::int64_t>{0, 7, 8, 9});
    CHECK(slot_rotation_error(cache, j) < 1e-6f);
  }
  CHECK(cache.next_position() == 10);
  append_tokens(cache, 10, 1);
  CHECK(cache.attention_position(0, 4) == 4);
  CHECK(slot_rotation_error(cache, 0) < 1e-6f);

  // Every other policy cuts a prompt of ten times its budget in one call.
  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 12;
  setup.sinks = 1;
  setup.window = 3;
  for_each_adapter([&]<class Adapter>() {
    if (!Adapter::evicts || Adapter::prefill_chunk(setup) > 0) return;
    INFO("policy " << Adapter::name);
    Layer<Adapter> layer(setup, EngineOptions{.mode = PositionMode::cache_relative});
    CHECK(layer.prefill(120));
    CHECK(layer.cache().size() == 12);
  });
}

TEST_CASE("C08 successive shifts add up", "[known_failures]") {
  // The fault: two shifts before the next compute rotated a key by the
  // second shift only. kvevict stores keys unrotated in cache_relative mode
  // and rotates them at their current slot, so shifts cannot be lost: keep
  // twice (3 slots before it removed, then 2) and the key of position 11 is
  // rotated as slot 6. A keep that removes nothing changes no rotation.
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  append_tokens(cache, 0, 12);
  KeepPlan first(2, 9);
  for (int j = 0; j < 2; ++j) {
    const std::vector<std::int64_t> slots = {0, 1, 2, 3, 7, 8, 9, 10, 11};  // drops slots 4, 5, 6
    std::copy(slots.begin(), slots.end(), first.head(j).begin());
  }
  cache.keep(first);
  CHECK(cache.positions(0)[8] == 11);
  KeepPlan second(2, 7);
  for (int j = 0; j < 2; ++j) {
    const std::vector<std::int64_t> slots = {0, 1, 4, 5, 6, 7, 8};  // drops slots 2, 3
    std::copy(slots.begin(), slots.end(), second.head(j).begin());
  }
  cache.keep(second);
  CHECK(cache.positions(0)[6] == 11);

  const RotaryEmbedding rope(6, RopeConfig{});
  RowMatrixXf rotated(cache.size(), 6);
  cache.rotated_keys(0, rotated);
  std::vector<float> at_slot_6 = raw_key(11, 0, 6);
  rope.rotate(at_slot_6, 6.0);
  for (int k = 0; k < 6; ++k) CHECK(rotated(6, k) == at_slot_6[static_cast<std::size_t>(k)]);

  KeepPlan identity(2, cache.size());
  identity.fill_identity();
  cache.keep(identity);
  for (int j = 0; j < 2; ++j) CHECK(slot_rotation_error(cache, j) < 1e-6f);

  // Engines that store rotated keys move them with RotaryEmbedding::rotate by
  // the difference; the two moves compose: 11 -> 8 -> 6 equals rotating at 6.
  std::vector<float> moved = raw_key(11, 0, 6);
  rope.rotate(moved, 11.0);
  rope.rotate(moved, -3.0);
  rope.rotate(moved, -2.0);
  for (int k = 0; k < 6; ++k) CHECK(moved[static_cast<std::size_t>(k)] == Approx(at_slot_6[static_cast<std::size_t>(k)]).margin(1e-5));
}

TEST_CASE("C09 every layer and head is rotated to its slot", "[known_failures]") {
  // The fault: after a refactor the shift reached only the first stream.
  // Two layers of three KV heads each, StreamingLLM evicts the middle: every
  // (layer, head) has its keys rotated as its slot indices.
  std::vector<KVCache<float>> layers;
  for (int l = 0; l < 2; ++l) {
    layers.push_back(make_cache(PositionMode::cache_relative, 3));
    append_tokens(layers.back(), 0, 9, l);
  }
  StreamingLLM<float> policy({.budget = 6, .sinks = 2});
  KeepPlan plan;
  for (int l = 0; l < 2; ++l) {
    REQUIRE(compress_prefill(policy, layers[static_cast<std::size_t>(l)], Observation{}, plan));
    for (int j = 0; j < 3; ++j) {
      INFO("layer " << l << ", head " << j);
      CHECK(positions_of(layers[static_cast<std::size_t>(l)], j) == std::vector<std::int64_t>{0, 1, 5, 6, 7, 8});
      CHECK(slot_rotation_error(layers[static_cast<std::size_t>(l)], j, l) < 1e-6f);
    }
  }
}

TEST_CASE("C10 chunked appends cut back to exactly the budget", "[known_failures]") {
  // The fault: the trim size assumed one token per call, so multi-token
  // appends left more than max_size entries. StreamingLLM, sinks 2, budget 8,
  // chunks of 3: after each eviction exactly 8, {0, 1} and the last 6.
  StreamingLLM<float> policy({.budget = 8, .sinks = 2});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  KeepPlan plan;
  std::int64_t seen = 0;
  for (int call = 0; call < 10; ++call) {
    append_tokens(cache, seen, 3);
    seen += 3;
    if (observe_and_evict(policy, cache, Observation{}, plan)) {
      CHECK(cache.size() == 8);
      CHECK(positions_of(cache) == concat({0, 1}, range(seen - 6, seen)));
    }
  }

  // Every exact-budget policy returns to its budget after each chunked cut.
  PolicySetup setup;
  setup.shape = {6, 2, 6};
  setup.budget = 8;
  setup.sinks = 2;
  setup.window = 2;
  for_each_adapter([&]<class Adapter>() {
    if (!Adapter::evicts || !Adapter::exact_budget) return;
    INFO("policy " << Adapter::name);
    Layer<Adapter> layer(setup, EngineOptions{});
    layer.prefill(3);
    for (int call = 0; call < 12; ++call) {
      if (layer.decode(3)) CHECK(layer.cache().size() == 8);
      CHECK(layer.cache().size() <= 8);
    }
  });
}

TEST_CASE("C11 prompt and decode fills end at the same size", "[known_failures]") {
  // The fault: the full cache held max_size or max_size - 1 tokens depending
  // on whether the prompt or generation filled it. StreamingLLM, sinks 2,
  // budget 8, 20 tokens as 1 x 20, 20 x 1 or 13 + 7 x 1: {0, 1, 14..19}.
  const std::vector<std::vector<std::int64_t>> fills = {
      {20}, std::vector<std::int64_t>(20, 1), {13, 1, 1, 1, 1, 1, 1, 1}};
  for (std::size_t f = 0; f < fills.size(); ++f) {
    INFO("fill " << f);
    StreamingLLM<float> policy({.budget = 8, .sinks = 2});
    KVCache<float> cache = make_cache(PositionMode::cache_relative);
    KeepPlan plan;
    std::int64_t seen = 0;
    for (std::size_t i = 0; i < fills[f].size(); ++i) {
      append_tokens(cache, seen, fills[f][i]);
      seen += fills[f][i];
      if (i == 0) {
        compress_prefill(policy, cache, Observation{}, plan);
      } else {
        observe_and_evict(policy, cache, Observation{}, plan);
      }
    }
    CHECK(positions_of(cache) == concat({0, 1}, range(14, 20)));
  }

  // Every exact-budget policy ends at exactly its budget on all three fills.
  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 8;
  setup.sinks = 2;
  setup.window = 2;
  for_each_adapter([&]<class Adapter>() {
    if (!Adapter::evicts || !Adapter::exact_budget) return;
    INFO("policy " << Adapter::name);
    for (const auto& fill : fills) {
      Layer<Adapter> layer(setup, EngineOptions{});
      layer.prefill(fill[0]);
      for (std::size_t i = 1; i < fill.size(); ++i) layer.decode(fill[i]);
      CHECK(layer.cache().size() == 8);
    }
  });
}

TEST_CASE("C12 mixed prompt and token appends keep the newest range", "[known_failures]") {
  // The fault: a rotating cache reused across chat turns assumed one prompt
  // then single tokens, and cut a wrapped ring by write index, dropping
  // older in-window tokens. kvevict keeps slots in position order and cuts
  // by rule: appends of 5, 1, 1, 1, 7, 1, 1, 1, 1 keep the sinks {0, 1} and
  // the newest 6, in position order, after every call.
  StreamingLLM<float> policy({.budget = 8, .sinks = 2});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  KeepPlan plan;
  std::int64_t seen = 0;
  for (const std::int64_t count : {5, 1, 1, 1, 7, 1, 1, 1, 1}) {
    append_tokens(cache, seen, count);
    seen += count;
    observe_and_evict(policy, cache, Observation{}, plan);
    INFO("after " << seen << " tokens");
    const auto expected = seen <= 8 ? range(0, seen) : concat({0, 1}, range(seen - 6, seen));
    for (int j = 0; j < 2; ++j) {
      CHECK(positions_of(cache, j) == expected);
      CHECK(slot_rotation_error(cache, j) < 1e-6f);
    }
  }
}

TEST_CASE("C13 a copied cache keeps its size and sinks", "[known_failures]") {
  // The fault: extracting a cache for a batch round-trip reset its sink
  // count, and merging a wrapped cache sliced by write pointer or tokens
  // seen. A KVCache and its policy are values: the copy of a cache that saw
  // 50 tokens and stores 12 (sinks 4) stores the same 12 slots byte for byte,
  // its policy still has 4 sinks, and its next eviction keeps {0..3}.
  StreamingLLM<float> policy({.budget = 12, .sinks = 4});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  KeepPlan plan;
  for (std::int64_t p = 0; p < 50; ++p) {
    append_tokens(cache, p, 1);
    observe_and_evict(policy, cache, Observation{}, plan);
  }
  REQUIRE(cache.size() == 12);

  KVCache<float> copy = cache;
  StreamingLLM<float> copy_policy = policy;
  CHECK(copy.size() == 12);
  CHECK(copy.next_position() == 50);
  CHECK(snapshot(copy) == snapshot(cache));
  CHECK(copy.memory_bytes() == cache.memory_bytes());
  CHECK(copy_policy.config().sinks == 4);

  const CacheSnapshot original = snapshot(cache);
  append_tokens(copy, 50, 1);
  REQUIRE(observe_and_evict(copy_policy, copy, Observation{}, plan));
  CHECK(positions_of(copy) == concat(range(0, 4), range(43, 51)));
  CHECK(slot_rotation_error(copy, 0) < 1e-6f);
  CHECK(snapshot(cache) == original);  // the source is untouched
}

TEST_CASE("C16 new keys take their token position, not the row count", "[known_failures]") {
  // The fault: one counter served as both RoPE position and row count, so
  // after an eviction new tokens were rotated at the wrong position.
  // StreamingLLM, budget 4, 10 single appends: the new keys have positions
  // 0..9, the next position is 10, and after every step the newest key sits
  // in a slot <= 3 and is rotated there (cache_relative). Before the cut of
  // its own step it briefly sits in slot 4 = budget + slack.
  StreamingLLM<float> policy({.budget = 4, .sinks = 1});
  for (const PositionMode mode : {PositionMode::original, PositionMode::cache_relative}) {
    INFO("mode " << to_string(mode));
    KVCache<float> cache = make_cache(mode);
    KeepPlan plan;
    for (std::int64_t p = 0; p < 10; ++p) {
      append_tokens(cache, p, 1);
      CHECK(cache.positions(0).back() == p);
      observe_and_evict(policy, cache, Observation{}, plan);
      const std::int64_t newest_slot = cache.size() - 1;
      CHECK(newest_slot <= 3);
      CHECK(cache.positions(0)[static_cast<std::size_t>(newest_slot)] == p);
      CHECK(cache.attention_position(0, newest_slot) == (mode == PositionMode::original ? p : newest_slot));
      if (mode == PositionMode::cache_relative) CHECK(slot_rotation_error(cache, 0) < 1e-6f);
    }
    CHECK(cache.next_position() == 10);
  }
}

TEST_CASE("C19 query head h reads KV head h / groups", "[known_failures]") {
  // The fault: a wrong divisor or tile order in the head map left KV heads
  // unused, crashed at 28/4 and crossed group boundaries at 48/2. Window
  // attention of KV head j must be that of query heads j*g .. j*g+g-1
  // against KV head j's keys, for every layout; 30 query heads over 4 KV
  // heads are rejected.
  struct Layout {
    int heads;
    int kv_heads;
  };
  const int d = 4;
  const std::int64_t n = 5;
  const std::int64_t w = 2;
  for (const Layout layout : {Layout{28, 4}, Layout{48, 2}, Layout{32, 8}, Layout{12, 12}, Layout{8, 1}}) {
    INFO("layout " << layout.heads << " / " << layout.kv_heads);
    const int g = layout.heads / layout.kv_heads;
    KVCache<float> cache = make_cache(PositionMode::original, layout.kv_heads, d);
    append_tokens(cache, 0, n);
    std::vector<float> queries(static_cast<std::size_t>(layout.heads * w * d));
    for (std::size_t i = 0; i < queries.size(); ++i) queries[i] = std::sin(0.61f * static_cast<float>(i));
    const Tensor3View view{queries.data(), layout.heads, w, d};

    RowMatrixXf out;
    kernels::WindowAttentionWorkspace workspace;
    double worst = 0.0;
    for (int j = 0; j < layout.kv_heads; ++j) {
      kernels::group_window_attention(cache, j, view, 0.5f, out, workspace);
      REQUIRE(out.rows() == g * w);
      for (int member = 0; member < g; ++member) {
        const int q = j * g + member;
        for (std::int64_t i = 0; i < w; ++i) {
          // Brute force: query i of head q (position n - w + i) over head j.
          const std::int64_t visible = n - w + i + 1;
          std::vector<double> logits(static_cast<std::size_t>(visible));
          double top = -std::numeric_limits<double>::infinity();
          for (std::int64_t t = 0; t < visible; ++t) {
            double dot = 0.0;
            for (int k = 0; k < d; ++k) dot += static_cast<double>(view.row(q, i)[static_cast<std::size_t>(k)]) * cache.keys(j)(t, k);
            logits[static_cast<std::size_t>(t)] = 0.5 * dot;
            top = std::max(top, logits[static_cast<std::size_t>(t)]);
          }
          double total = 0.0;
          for (double& x : logits) total += (x = std::exp(x - top));
          for (std::int64_t t = 0; t < n; ++t) {
            const double expected = t < visible ? logits[static_cast<std::size_t>(t)] / total : 0.0;
            worst = std::max(worst, std::abs(out(member * w + i, t) - expected));
          }
        }
      }
    }
    CHECK(worst < 1e-6);
  }

  // 30 query heads cannot be split over 4 KV heads: kernel, policies and
  // configurations reject the layout by name.
  KVCache<float> cache = make_cache(PositionMode::original, 4, d);
  append_tokens(cache, 0, n);
  std::vector<float> queries(static_cast<std::size_t>(30 * w * d), 0.1f);
  RowMatrixXf out;
  kernels::WindowAttentionWorkspace workspace;
  CHECK_THAT(error_message([&] {
               kernels::group_window_attention(cache, 0, Tensor3View{queries.data(), 30, w, d}, 0.5f, out, workspace);
             }),
             Catch::Contains("n_heads (30)"));
  std::vector<float> rows(static_cast<std::size_t>(30 * n), 1.0f / static_cast<float>(n));
  Observation observation;
  observation.n_heads = 30;
  observation.attention = {rows.data(), 30, 1, n};
  KVCache<float> h2o_cache = make_cache(PositionMode::original, 4, d, 1);
  append_tokens(h2o_cache, 0, n);
  H2O<float> h2o({.budget = 3});
  CHECK_THAT(error_message([&] { h2o.observe(h2o_cache, observation); }), Catch::Contains("n_kv_heads (4)"));
  RestKVConfig config;
  config.budget = 4;
  config.window = 2;
  config.n_heads = 30;
  config.n_kv_heads = 4;
  config.head_dim = d;
  config.use_wo = false;
  CHECK_THAT(error_message([&] { RestKV<float> restkv(config); }), Catch::Contains("n_heads (30)"));

  // H2O aggregates each group onto its own KV head. With 8 query heads over
  // 2 KV heads and rows that differ per query head, acc of KV head j is the
  // mean of the column sums of query heads 4j .. 4j+3.
  KVCache<float> gqa = make_cache(PositionMode::original, 2, d, 1);
  append_tokens(gqa, 0, 3);
  std::vector<float> gqa_rows(8 * 3);
  for (int q = 0; q < 8; ++q) {
    const float a = 0.05f * static_cast<float>(q + 1);
    gqa_rows[static_cast<std::size_t>(q * 3)] = a;
    gqa_rows[static_cast<std::size_t>(q * 3 + 1)] = 0.5f - a;
    gqa_rows[static_cast<std::size_t>(q * 3 + 2)] = 0.5f;
  }
  Observation gqa_observation;
  gqa_observation.n_heads = 8;
  gqa_observation.attention = {gqa_rows.data(), 8, 1, 3};
  gqa_observation.appended = 1;
  H2O<float> grouped({.budget = 3});
  grouped.observe(gqa, gqa_observation);
  for (int j = 0; j < 2; ++j) {
    float expected = 0.0f;
    for (int q = 4 * j; q < 4 * j + 4; ++q) expected += gqa_rows[static_cast<std::size_t>(q * 3)];
    CHECK(gqa.state(j, H2O<float>::acc_channel)[0] == Approx(expected / 4.0f));
  }
}

TEST_CASE("C20 each layer compresses by its own budget", "[known_failures]") {
  // The fault: whether to compress was decided from the global budget while
  // each layer had its own. Per-layer budgets [12, 10, 6, 4] and a 9-token
  // prompt: layers 0 and 1 keep all 9, layers 2 and 3 keep 6 and 4. Each
  // layer has its own policy object constructed with its layer budget.
  const std::vector<std::int64_t> budgets = {12, 10, 6, 4};
  validate_layer_budgets(budgets, 2);
  const std::vector<std::int64_t> expected = {9, 9, 6, 4};
  for (std::size_t l = 0; l < budgets.size(); ++l) {
    INFO("layer " << l);
    PolicySetup setup;
    setup.shape = {4, 2, 6};
    setup.budget = budgets[l];
    setup.window = 2;
    setup.layer = static_cast<int>(l);
    Layer<SnapKVAdapter> snapkv(setup, EngineOptions{.seed = 5});
    CHECK(snapkv.prefill(9) == (budgets[l] < 9));
    CHECK(snapkv.cache().size() == expected[l]);
    Layer<H2OAdapter> h2o(setup, EngineOptions{.seed = 5});
    h2o.prefill(9);
    CHECK(h2o.cache().size() == expected[l]);
  }
  // A budget list that leaves a layer less than its protected window is
  // rejected rather than shrinking the window.
  const std::vector<std::int64_t> too_small = {12, 10, 6, 1};
  CHECK_THAT(error_message([&] { validate_layer_budgets(too_small, 2); }), Catch::Contains("layer 3"));

  // ReST-KV's pyramid schedule: budget 6, window 2, 4 layers and a 9-token
  // prompt give layer budgets 2 + (7, 5, 3, 1) = [9, 7, 5, 3]. Layer 0's
  // budget covers the prompt, so it is not cut; each layer cuts to its own.
  RestKVConfig config;
  config.budget = 6;
  config.window = 2;
  config.n_heads = 4;
  config.n_kv_heads = 2;
  config.head_dim = 6;
  config.use_pyramid = true;
  config.n_layers = 4;
  const PyramidConfig pyramid{.budget = 6, .protected_tokens = 2, .n_layers = 4};
  CHECK(pyramid_budgets(pyramid, 9) == std::vector<std::int64_t>{9, 7, 5, 3});
  for (int l = 0; l < 4; ++l) {
    INFO("pyramid layer " << l);
    config.layer = l;
    PolicySetup setup;
    setup.shape = {4, 2, 6};
    setup.budget = 6;
    setup.window = 2;
    RestKV<float> policy(config, RestKVAdapter::output_projection(setup));
    Engine<float> engine(setup.shape, policy.needs(), policy.state_channels(), EngineOptions{.seed = 9});
    engine.append(9);
    KeepPlan plan;
    CHECK(compress_prefill(policy, engine.cache(), engine.observation(true), plan) == (l > 0));
    CHECK(engine.cache().size() == pyramid_budget(pyramid, l, 9));
  }
}

TEST_CASE("C21 protected ranges larger than the budget are rejected", "[known_failures]") {
  // The fault: no stated rule for budget < protected tokens or a sequence
  // shorter than the sinks; outputs collapsed, compression was skipped or a
  // counter was raised to the sink count.
  //   sinks 4 + window 8 > budget 10: a named error.
  CHECK_THAT(error_message([] { detail::validate_common("policy", {.budget = 10, .sinks = 4, .window = 8}); }),
             Catch::Contains("budget (10)") && Catch::Contains("sinks + window (4 + 8)"));
  CHECK_THAT(error_message([] { SinkCLIP<float>({.budget = 10, .sinks = 4, .recent = 8}); }),
             Catch::Contains("budget (10)"));
  CHECK_THAT(error_message([] { TOVA<float>({.budget = 10, .sinks = 11}); }), Catch::Contains("budget (10)"));
  CHECK_THAT(error_message([] { StreamingLLM<float>({.budget = 4, .sinks = 4}); }), Catch::Contains("budget (4)"));

  //   3 tokens < 4 sinks: a no-op, the cache unchanged and select keeps all.
  StreamingLLM<float> streaming({.budget = 8, .sinks = 4});
  KVCache<float> short_cache = make_cache(PositionMode::cache_relative);
  append_tokens(short_cache, 0, 3);
  const CacheSnapshot before = snapshot(short_cache);
  KeepPlan plan;
  CHECK_FALSE(compress_prefill(streaming, short_cache, Observation{}, plan));
  CHECK(snapshot(short_cache) == before);
  plan = kvevict::select(streaming, short_cache, Observation{});
  CHECK(std::vector<std::int64_t>(plan.head(0).begin(), plan.head(0).end()) == range(0, 3));

  //   5 tokens seen < 10 sinks: size, next position and the kept count stay
  //   5; SinkCLIP with 10 sinks observes 5 tokens without touching the
  //   sink range.
  StreamingLLM<float> many_sinks({.budget = 12, .sinks = 10});
  KVCache<float> five = make_cache(PositionMode::cache_relative);
  append_tokens(five, 0, 5);
  CHECK_FALSE(observe_and_evict(many_sinks, five, Observation{}, plan));
  CHECK(five.size() == 5);
  CHECK(five.next_position() == 5);
  plan = kvevict::select(many_sinks, five, Observation{});
  CHECK(plan.count() == 5);

  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 14;
  setup.sinks = 10;
  setup.window = 2;
  Layer<SinkCLIPAdapter> sinkclip(setup, EngineOptions{});
  CHECK_FALSE(sinkclip.prefill(5));
  CHECK(sinkclip.cache().size() == 5);
  CHECK(sinkclip.cache().next_position() == 5);
  for (int j = 0; j < 2; ++j) {
    for (const float flag : sinkclip.cache().state(j, SinkCLIP<float>::emergent_channel)) CHECK(flag == 0.0f);
  }
}

TEST_CASE("C22 eviction with slack fires every slack + 1 tokens", "[known_failures]") {
  // The fault: bookkeeping not trimmed with the cells made the length bounce
  // back, so a context shift fired on every token. kvevict's rule: decode
  // eviction fires once size() > budget + slack and cuts to the budget.
  // Budget 8, slack 4, 40 single appends: cuts after tokens 13, 18, 23, 28,
  // 33 and 38 (six), never one per token.
  const std::vector<std::int64_t> expected = {13, 18, 23, 28, 33, 38};
  StreamingLLM<float> policy({.budget = 8, .sinks = 2, .slack = 4});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  KeepPlan plan;
  std::vector<std::int64_t> cuts;
  for (std::int64_t p = 0; p < 40; ++p) {
    append_tokens(cache, p, 1);
    if (observe_and_evict(policy, cache, Observation{}, plan)) cuts.push_back(p + 1);
  }
  CHECK(cuts == expected);

  // The same for every policy with an exact budget. LaCache is left out: it
  // sheds R tokens per compaction by design (R = 1 for these layer counts)
  // and its size moves in the band (C - R, C].
  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 8;
  setup.sinks = 2;
  setup.window = 2;
  setup.slack = 4;
  for_each_adapter([&]<class Adapter>() {
    if (!Adapter::evicts || !Adapter::exact_budget) return;
    INFO("policy " << Adapter::name);
    Layer<Adapter> layer(setup, EngineOptions{});
    layer.prefill(2);
    std::vector<std::int64_t> policy_cuts;
    for (std::int64_t seen = 2; seen < 40; ++seen) {
      if (layer.decode(1)) policy_cuts.push_back(seen + 1);
    }
    CHECK(policy_cuts == expected);
  });
}

TEST_CASE("C23 repeated and concurrent runs are identical", "[known_failures]") {
  // The fault: under multithreading one head's accumulation spilled into the
  // next head's scores. kvevict runs one policy object per thread, because
  // objects own scratch buffers, and never writes into the observation. Odd
  // shapes: 3 query heads on 1 KV head, window 5, 13 tokens, head_dim 7. A
  // reference run, 50 more runs on one thread and 52 runs spread over 4
  // threads with their own objects give the same plans and caches. Canaries
  // around the observation stay untouched.
  PolicySetup setup;
  setup.shape = {3, 1, 7};
  setup.budget = 8;
  setup.sinks = 1;
  setup.window = 5;
  constexpr float canary = -12345.0f;

  const auto run_once = [&]<class Adapter>() {
    Layer<Adapter> layer(setup, EngineOptions{.seed = 23});
    layer.engine.append(13);
    const Observation observation = layer.engine.observation(true);
    // Copy the observation into buffers with canaries on both sides.
    std::vector<float> attention(static_cast<std::size_t>(observation.attention.numel() + 16), canary);
    std::vector<float> queries(static_cast<std::size_t>(observation.queries.numel() + 16), canary);
    Observation guarded = observation;
    if (!observation.attention.empty()) {
      std::copy_n(observation.attention.data, observation.attention.numel(), attention.begin() + 8);
      guarded.attention.data = attention.data() + 8;
    }
    if (!observation.queries.empty()) {
      std::copy_n(observation.queries.data, observation.queries.numel(), queries.begin() + 8);
      guarded.queries.data = queries.data() + 8;
    }
    const std::vector<float> attention_before = attention;
    const std::vector<float> queries_before = queries;
    compress_prefill(layer.policy, layer.cache(), guarded, layer.plan);
    const bool untouched = attention == attention_before && queries == queries_before;
    return std::make_tuple(layer.plan, snapshot(layer.cache()), untouched);
  };

  const auto check_policy = [&]<class Adapter>() {
    INFO("policy " << Adapter::name);
    const auto reference = run_once.template operator()<Adapter>();
    CHECK(std::get<2>(reference));
    std::atomic<int> mismatches{0};
    for (int run = 0; run < 50; ++run) {
      if (run_once.template operator()<Adapter>() != reference) ++mismatches;
    }
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        for (int run = 0; run < 13; ++run) {
          if (run_once.template operator()<Adapter>() != reference) ++mismatches;
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    CHECK(mismatches.load() == 0);
  };
  check_policy.operator()<SnapKVAdapter>();
  check_policy.operator()<H2OAdapter>();
  check_policy.operator()<SinkCLIPAdapter>();
  check_policy.operator()<RestKVAdapter>();
}

TEST_CASE("C24 the rolling range drops the oldest tokens", "[known_failures]") {
  // The fault: the eviction start was computed as sinks + rolled offset, so
  // the newest frames went. StreamingLLM, sinks 2, budget 6, eviction at 9
  // (slack 2), 15 single appends: the cuts keep {0, 1, 5..8}, {0, 1, 8..11}
  // and {0, 1, 11..14}.
  StreamingLLM<float> policy({.budget = 6, .sinks = 2, .slack = 2});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  KeepPlan plan;
  std::vector<std::vector<std::int64_t>> kept;
  for (std::int64_t p = 0; p < 15; ++p) {
    append_tokens(cache, p, 1);
    if (observe_and_evict(policy, cache, Observation{}, plan)) kept.push_back(positions_of(cache));
  }
  const std::vector<std::vector<std::int64_t>> expected = {
      concat({0, 1}, range(5, 9)), concat({0, 1}, range(8, 12)), concat({0, 1}, range(11, 15))};
  CHECK(kept == expected);
}

TEST_CASE("C25 sequences of a batch share nothing and store no padding", "[known_failures]") {
  // The fault: left-pad tokens of a batch were stored in the rotating cache
  // and scored like real tokens. kvevict has no batch axis: each sequence
  // has its own cache and policy, and an engine appends only real tokens.
  // Lengths 5 and 9 (padded to 9 in the engine's batch): the 5-token
  // sequence stores 5 slots at positions 0..4 and ends exactly as when run
  // alone. A padded 9-column attention row for it is rejected by name.
  PolicySetup setup;
  setup.shape = {4, 2, 6};
  setup.budget = 4;
  Layer<H2OAdapter> short_sequence(setup, EngineOptions{.seed = 31});
  Layer<H2OAdapter> long_sequence(setup, EngineOptions{.seed = 32});
  short_sequence.engine.append(5);
  long_sequence.engine.append(9);
  CHECK(short_sequence.cache().size() == 5);
  CHECK(positions_of(short_sequence.cache()) == range(0, 5));

  // The padded row: 9 columns over a 5-slot cache.
  std::vector<float> padded(static_cast<std::size_t>(4 * 9), 0.0f);
  for (int q = 0; q < 4; ++q) {
    for (int t = 4; t < 9; ++t) padded[static_cast<std::size_t>(q * 9 + t)] = 0.2f;
  }
  Observation padded_observation;
  padded_observation.n_heads = 4;
  padded_observation.attention = {padded.data(), 4, 1, 9};
  const CacheSnapshot before = snapshot(short_sequence.cache());
  CHECK_THAT(error_message([&] { short_sequence.policy.observe(short_sequence.cache(), padded_observation); }),
             Catch::Contains("9 columns") && Catch::Contains("5 slots"));
  CHECK(snapshot(short_sequence.cache()) == before);

  compress_prefill(short_sequence.policy, short_sequence.cache(), short_sequence.engine.observation(true),
                   short_sequence.plan);
  compress_prefill(long_sequence.policy, long_sequence.cache(), long_sequence.engine.observation(true),
                   long_sequence.plan);
  Layer<H2OAdapter> alone(setup, EngineOptions{.seed = 31});
  alone.prefill(5);
  CHECK(snapshot(short_sequence.cache()) == snapshot(alone.cache()));
  CHECK(short_sequence.plan == alone.plan);
}

TEST_CASE("C26 H2O and SnapKV are different scorers", "[known_failures]") {
  // The fault: "H2O" was SnapKV without pooling. kvevict's H2O sums every
  // query's attention; SnapKV sums the last `window` queries'. On this 6x6
  // causal attention the all-query sums rank token 1 first (2.125) and the
  // last-2 sums rank token 4 first (0.625):
  const std::vector<std::vector<float>> rows = {
      {1.0f},
      {0.125f, 0.875f},
      {0.25f, 0.5f, 0.25f},
      {0.25f, 0.5f, 0.125f, 0.125f},
      {0.125f, 0.125f, 0.1875f, 0.3125f, 0.25f},
      {0.125f, 0.125f, 0.125f, 0.125f, 0.375f, 0.125f},
  };
  const std::int64_t n = 6;
  // H2O, budget 3 (heavy 1, recent 2): the heavy hitter among slots 0..3 is
  // token 1, so it keeps {1, 4, 5}.
  std::vector<float> attention(static_cast<std::size_t>(n * n), 0.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::size_t t = 0; t < rows[static_cast<std::size_t>(i)].size(); ++t) {
      attention[static_cast<std::size_t>(i * n) + t] = rows[static_cast<std::size_t>(i)][t];
    }
  }
  KVCache<float> h2o_cache = make_cache(PositionMode::original, 1, 6, 1);
  append_tokens(h2o_cache, 0, n);
  Observation all_rows;
  all_rows.n_heads = 1;
  all_rows.attention = {attention.data(), 1, n, n};
  all_rows.appended = n;
  all_rows.prefill = true;
  H2O<float> h2o({.budget = 3});
  KeepPlan plan;
  REQUIRE(compress_prefill(h2o, h2o_cache, all_rows, plan));
  CHECK(positions_of(h2o_cache) == std::vector<std::int64_t>{1, 4, 5});

  // SnapKV, window 2, budget 3, no pooling: the window queries (tokens 4 and
  // 5) reproduce rows 4 and 5 (one-hot keys, query = sqrt(d) * log p), so
  // the past votes are 0.25, 0.25, 0.3125, 0.4375 and it keeps {3, 4, 5}.
  const int d = 6;
  KVCache<float> snap_cache = make_cache(PositionMode::original, 1, d);
  RowMatrixXf keys = RowMatrixXf::Identity(n, d);
  RowMatrixXf values = RowMatrixXf::Zero(n, d);
  const std::vector<std::int64_t> positions = range(0, n);
  snap_cache.append(keys, values, positions);
  std::vector<float> queries(static_cast<std::size_t>(2 * d), 0.0f);
  for (std::int64_t i = 0; i < 2; ++i) {
    const auto& row = rows[static_cast<std::size_t>(4 + i)];
    for (std::size_t t = 0; t < row.size(); ++t) {
      queries[static_cast<std::size_t>(i * d) + t] = std::sqrt(static_cast<float>(d)) * std::log(row[t]);
    }
  }
  Observation window;
  window.n_heads = 1;
  window.queries = {queries.data(), 1, 2, d};
  window.prefill = true;
  SnapKV<float> snapkv({.budget = 3, .window = 2, .pooling = SnapKVPooling::none});
  REQUIRE(compress_prefill(snapkv, snap_cache, window, plan));
  CHECK(positions_of(snap_cache) == std::vector<std::int64_t>{3, 4, 5});
}

TEST_CASE("C27 TOVA keeps one set per layer and protects the newest on request", "[known_failures]") {
  // The difference found in review: a port averaged the last query's
  // attention over all heads, broadcast it to every KV head and always kept
  // the newest token. kvevict's TOVA in layer mode (its default) keeps the
  // same indices on every KV head. Keeping the newest token is an option: by
  // default (protect_newest false) TOVA drops the newest token when it gets
  // the least attention, and with protect_newest true it always keeps it.
  const std::int64_t n = 6;
  KVCache<float> cache = make_cache(PositionMode::original, 2, 4);
  append_tokens(cache, 0, n);
  // Four query heads over two KV heads; the newest slot gets the least mean
  // attention, and the heads disagree on the rest.
  const std::vector<std::vector<float>> rows = {
      {0.3f, 0.1f, 0.2f, 0.15f, 0.2f, 0.05f},
      {0.1f, 0.3f, 0.15f, 0.2f, 0.2f, 0.05f},
      {0.2f, 0.2f, 0.1f, 0.3f, 0.15f, 0.05f},
      {0.15f, 0.2f, 0.3f, 0.1f, 0.2f, 0.05f},
  };
  std::vector<float> attention;
  for (const auto& row : rows) attention.insert(attention.end(), row.begin(), row.end());
  Observation observation;
  observation.n_heads = 4;
  observation.attention = {attention.data(), 4, 1, n};
  observation.appended = 1;

  TOVA<float> layer_mode({.budget = 4});
  KeepPlan plan = kvevict::select(layer_mode, cache, observation);
  for (int j = 0; j < 2; ++j) {
    const auto head = plan.head(j);
    CHECK(std::equal(head.begin(), head.end(), plan.head(0).begin(), plan.head(0).end()));
    CHECK_FALSE(std::binary_search(head.begin(), head.end(), n - 1));
  }
  TOVA<float> protecting({.budget = 4, .protect_newest = true});
  plan = kvevict::select(protecting, cache, observation);
  for (int j = 0; j < 2; ++j) {
    const auto head = plan.head(j);
    CHECK(std::binary_search(head.begin(), head.end(), n - 1));
    CHECK(std::equal(head.begin(), head.end(), plan.head(0).begin(), plan.head(0).end()));
  }
}
