// StreamingLLM: the hand-worked examples, the independence of the kept set
// from how the tokens were chunked, and the cache_relative rotation of the
// kept keys (slots 0..budget-1, the next query at slot budget).
#include <catch2/catch.hpp>

#include "kvevict/policies/streaming_llm.hpp"
#include "kvevict/rope.hpp"

#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

using namespace kvevict;

namespace {

constexpr int kHeads = 2;
constexpr int kDim = 6;

// Unrotated key of token `position` on KV head j: distinct for every token
// and head, so a moved row is recognised.
std::vector<float> raw_key(std::int64_t position, int j) {
  std::vector<float> key(kDim);
  for (int k = 0; k < kDim; ++k) {
    key[static_cast<std::size_t>(k)] = std::sin(0.37f * static_cast<float>(position) + 1.3f * static_cast<float>(j) +
                                                0.71f * static_cast<float>(k)) +
                                       0.01f * static_cast<float>(position);
  }
  return key;
}

// Appends tokens first .. first + count - 1. In original mode the keys are
// stored rotated at their positions, in cache_relative mode unrotated.
void append_tokens(KVCache<float>& cache, std::int64_t first, std::int64_t count) {
  const RotaryEmbedding rope(kDim, RopeConfig{});
  RowMatrixXf keys(kHeads * count, kDim);
  RowMatrixXf values(kHeads * count, kDim);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
  for (std::int64_t c = 0; c < count; ++c) {
    const std::int64_t position = first + c;
    positions[static_cast<std::size_t>(c)] = position;
    for (int j = 0; j < kHeads; ++j) {
      std::vector<float> key = raw_key(position, j);
      if (cache.position_mode() == PositionMode::original) rope.rotate(key, static_cast<double>(position));
      for (int k = 0; k < kDim; ++k) {
        keys(j * count + c, k) = key[static_cast<std::size_t>(k)];
        values(j * count + c, k) = static_cast<float>(position * 10 + j);
      }
    }
  }
  cache.append(keys, values, positions);
}

KVCache<float> make_cache(PositionMode mode) {
  return KVCache<float>(CacheConfig{.n_kv_heads = kHeads, .head_dim = kDim, .positions = mode});
}

std::vector<std::int64_t> positions_of(const KVCache<float>& cache, int j) {
  const auto p = cache.positions(j);
  return {p.begin(), p.end()};
}

// Sinks plus the last budget - sinks of `seen` tokens.
std::vector<std::int64_t> expected_positions(std::int64_t sinks, std::int64_t budget, std::int64_t seen) {
  std::vector<std::int64_t> out;
  if (seen <= budget) {
    out.resize(static_cast<std::size_t>(seen));
    std::iota(out.begin(), out.end(), 0);
    return out;
  }
  for (std::int64_t p = 0; p < sinks; ++p) out.push_back(p);
  for (std::int64_t p = seen - (budget - sinks); p < seen; ++p) out.push_back(p);
  return out;
}

// Largest absolute difference between rotated_keys(j) and each kept token's
// unrotated key rotated at its slot index.
float slot_rotation_error(const KVCache<float>& cache, int j) {
  const RotaryEmbedding rope(kDim, RopeConfig{});
  RowMatrixXf rotated(cache.size(), kDim);
  cache.rotated_keys(j, rotated);
  const auto positions = cache.positions(j);
  float worst = 0.0f;
  for (std::int64_t s = 0; s < cache.size(); ++s) {
    std::vector<float> expected = raw_key(positions[static_cast<std::size_t>(s)], j);
    rope.rotate(expected, static_cast<double>(s));
    for (int k = 0; k < kDim; ++k) {
      worst = std::max(worst, std::abs(rotated(s, k) - expected[static_cast<std::size_t>(k)]));
    }
  }
  return worst;
}

// Feeds `seen` tokens in the given chunk sizes: the first chunk as a prompt
// (compress_prefill), the rest as decode steps (observe_and_evict).
void feed(StreamingLLM<float>& policy, KVCache<float>& cache, const std::vector<std::int64_t>& chunks) {
  KeepPlan plan;
  std::int64_t next = 0;
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    append_tokens(cache, next, chunks[i]);
    next += chunks[i];
    if (i == 0) {
      compress_prefill(policy, cache, Observation{}, plan);
    } else {
      observe_and_evict(policy, cache, Observation{}, plan);
    }
  }
}

}  // namespace

TEST_CASE("StreamingLLM E-SL1 keeps sinks and the recent range", "[streaming_llm]") {
  // n = 10, sinks 2, budget 5: keep {0, 1, 7, 8, 9}.
  for (const PositionMode mode : {PositionMode::original, PositionMode::cache_relative}) {
    INFO("mode " << to_string(mode));
    StreamingLLM<float> policy({.budget = 5, .sinks = 2});
    KVCache<float> cache = make_cache(mode);
    append_tokens(cache, 0, 10);
    KeepPlan plan;
    REQUIRE(compress_prefill(policy, cache, Observation{}, plan));

    for (int j = 0; j < kHeads; ++j) {
      const auto slots = plan.head(j);
      CHECK(std::vector<std::int64_t>(slots.begin(), slots.end()) == std::vector<std::int64_t>{0, 1, 7, 8, 9});
      CHECK(positions_of(cache, j) == std::vector<std::int64_t>{0, 1, 7, 8, 9});
    }
    // Original mode: the next query uses its own token position, 10.
    CHECK(cache.next_position() == 10);
    if (mode == PositionMode::cache_relative) {
      // Kept keys are rotated as slots 0..4, the next query as slot 5.
      for (int j = 0; j < kHeads; ++j) CHECK(slot_rotation_error(cache, j) < 1e-6f);
      CHECK(cache.size() == 5);
      CHECK(cache.attention_position(0, 4) == 4);
    } else {
      // Kept keys keep their rotation at 0, 1, 7, 8, 9: stored bytes equal the
      // keys rotated at the original positions.
      const RotaryEmbedding rope(kDim, RopeConfig{});
      for (int j = 0; j < kHeads; ++j) {
        for (std::int64_t s = 0; s < cache.size(); ++s) {
          const std::int64_t position = cache.positions(j)[static_cast<std::size_t>(s)];
          std::vector<float> expected = raw_key(position, j);
          rope.rotate(expected, static_cast<double>(position));
          for (int k = 0; k < kDim; ++k) CHECK(cache.keys(j)(s, k) == expected[static_cast<std::size_t>(k)]);
          CHECK(cache.attention_position(j, s) == position);
        }
      }
    }
  }
}

TEST_CASE("StreamingLLM E-SL2 chunked appends return to the budget", "[streaming_llm]") {
  // sinks 2, budget 8, appends of 3 tokens from empty: the third call brings
  // the size to 9 > 8 and keeps {0, 1} and the last 6; every later call ends
  // at exactly 8.
  StreamingLLM<float> policy({.budget = 8, .sinks = 2});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  KeepPlan plan;
  std::int64_t seen = 0;
  for (int call = 0; call < 8; ++call) {
    append_tokens(cache, seen, 3);
    seen += 3;
    const bool cut = observe_and_evict(policy, cache, Observation{}, plan);
    INFO("call " << call << ", tokens seen " << seen);
    CHECK(cut == (seen > 8));
    CHECK(positions_of(cache, 0) == expected_positions(2, 8, seen));
    CHECK(positions_of(cache, 1) == expected_positions(2, 8, seen));
    if (seen > 8) CHECK(cache.size() == 8);
  }
  CHECK(positions_of(cache, 0) == std::vector<std::int64_t>{0, 1, 18, 19, 20, 21, 22, 23});
}

TEST_CASE("StreamingLLM keeps the same set whatever the chunking", "[streaming_llm]") {
  // One 20-token prompt, twenty single tokens, or 13 + 7 single tokens all
  // keep the sinks and the last budget - sinks tokens: {0, 1, 14..19} for
  // sinks 2, budget 8, in both position modes and for other settings too.
  const std::vector<std::vector<std::int64_t>> chunkings = {
      {20},
      std::vector<std::int64_t>(20, 1),
      {13, 1, 1, 1, 1, 1, 1, 1},
  };
  struct Setting {
    std::int64_t sinks;
    std::int64_t budget;
  };
  for (const Setting setting : {Setting{2, 8}, Setting{0, 5}, Setting{4, 5}, Setting{3, 19}}) {
    for (const PositionMode mode : {PositionMode::original, PositionMode::cache_relative}) {
      for (std::size_t c = 0; c < chunkings.size(); ++c) {
        INFO("sinks " << setting.sinks << ", budget " << setting.budget << ", mode " << to_string(mode)
                      << ", chunking " << c);
        StreamingLLM<float> policy({.budget = setting.budget, .sinks = setting.sinks});
        KVCache<float> cache = make_cache(mode);
        feed(policy, cache, chunkings[c]);
        const auto expected = expected_positions(setting.sinks, setting.budget, 20);
        for (int j = 0; j < kHeads; ++j) CHECK(positions_of(cache, j) == expected);
        CHECK(cache.next_position() == 20);
      }
    }
  }
  StreamingLLM<float> policy({.budget = 8, .sinks = 2});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  feed(policy, cache, chunkings[2]);
  CHECK(positions_of(cache, 0) == std::vector<std::int64_t>{0, 1, 14, 15, 16, 17, 18, 19});
}

TEST_CASE("StreamingLLM cache_relative rotates kept keys by slot", "[streaming_llm]") {
  // After every cut the kept keys, as rotated_keys returns them for
  // attention, are rotated as slots 0..budget-1. The next token's key takes
  // slot budget, and its query is rotated as position budget.
  const std::int64_t budget = 7;
  StreamingLLM<float> policy({.budget = budget, .sinks = 3});
  KVCache<float> cache = make_cache(PositionMode::cache_relative);
  const RotaryEmbedding rope(kDim, RopeConfig{});
  KeepPlan plan;
  for (std::int64_t position = 0; position < 40; ++position) {
    append_tokens(cache, position, 1);
    observe_and_evict(policy, cache, Observation{}, plan);
    INFO("after token " << position);
    for (int j = 0; j < kHeads; ++j) CHECK(slot_rotation_error(cache, j) < 1e-6f);
    CHECK(cache.size() == std::min<std::int64_t>(position + 1, budget));
  }

  // The next query: rotated as slot size() == budget, not as its token
  // position 40.
  std::vector<float> query = raw_key(1000, 0);
  std::vector<float> expected = query;
  rope.rotate(expected, static_cast<double>(budget));
  cache.rotate_at_slot(query, cache.size());
  for (int k = 0; k < kDim; ++k) CHECK(query[static_cast<std::size_t>(k)] == Approx(expected[static_cast<std::size_t>(k)]));

  // Its key lands in slot budget and is rotated there.
  append_tokens(cache, 40, 1);
  CHECK(cache.attention_position(0, budget) == budget);
  for (int j = 0; j < kHeads; ++j) CHECK(slot_rotation_error(cache, j) < 1e-6f);
}

TEST_CASE("StreamingLLM moves values and positions with keys", "[streaming_llm]") {
  // A kept slot's value still belongs to its token: the value of token p on
  // head j is 10 p + j.
  StreamingLLM<float> policy({.budget = 6, .sinks = 2});
  KVCache<float> cache = make_cache(PositionMode::original);
  KeepPlan plan;
  for (std::int64_t position = 0; position < 25; ++position) {
    append_tokens(cache, position, 1);
    observe_and_evict(policy, cache, Observation{}, plan);
  }
  for (int j = 0; j < kHeads; ++j) {
    for (std::int64_t s = 0; s < cache.size(); ++s) {
      const std::int64_t position = cache.positions(j)[static_cast<std::size_t>(s)];
      CHECK(cache.values(j)(s, 0) == static_cast<float>(position * 10 + j));
    }
  }
}

TEST_CASE("StreamingLLM rejects budgets without room for the newest token", "[streaming_llm]") {
  const auto message_of = [](const StreamingLLMConfig& config) {
    try {
      StreamingLLM<float> policy(config);
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  const std::string at_sinks = message_of({.budget = 4, .sinks = 4});
  CHECK_THAT(at_sinks, Catch::Contains("budget (4)") && Catch::Contains("sinks + 1"));
  CHECK_THAT(message_of({.budget = 0, .sinks = 0}), Catch::Contains("budget (0)"));
  CHECK_THAT(message_of({.budget = 5, .sinks = -1}), Catch::Contains("sinks (-1)"));
  CHECK_THAT(message_of({.budget = 5, .sinks = 1, .slack = -2}), Catch::Contains("slack (-2)"));
  CHECK_NOTHROW(StreamingLLM<float>({.budget = 5, .sinks = 4}));
  CHECK_NOTHROW(StreamingLLM<float>({.budget = 1, .sinks = 0}));
}

TEST_CASE("StreamingLLM needs no observation and no state", "[streaming_llm]") {
  StreamingLLM<float> policy({.budget = 6});
  const ObservationNeeds needs = policy.needs();
  CHECK_FALSE(needs.decode_attention);
  CHECK(needs.prefill_attention_rows == 0);
  CHECK(needs.window_queries == 0);
  CHECK(policy.state_channels() == 0);
  CHECK(policy.name() == "streaming_llm");
  CHECK(policy.config().sinks == 4);
}
