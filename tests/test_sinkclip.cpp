// Tests of the SinkCLIP policy. They check the hand-worked examples (kept
// sets and every state value), the reduction to H2O, the clip, and emergent
// sinks with hysteresis and their cap. They also check that state moves with
// keep, that validation keeps the strong guarantee, and invariants after
// every step of long random runs.
#include <catch2/catch.hpp>

#include "allocation_counter.hpp"
#include "kvevict/kvevict.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using kvevict::CacheConfig;
using kvevict::H2O;
using kvevict::KeepPlan;
using kvevict::KVCache;
using kvevict::Observation;
using kvevict::PositionMode;
using kvevict::SinkCLIP;
using kvevict::SinkCLIPConfig;
using Positions = std::vector<std::int64_t>;
using Policy = SinkCLIP<float>;
using Approx = Catch::Detail::Approx;

constexpr int head_dim = 2;

KVCache<float> make_cache(int kv_heads, std::int64_t reserve, int channels = 4) {
  return KVCache<float>(CacheConfig{.n_kv_heads = kv_heads,
                                    .head_dim = head_dim,
                                    .positions = PositionMode::original,
                                    .state_channels = channels,
                                    .capacity = reserve});
}

// Appends `count` tokens after the newest position; key and value rows encode
// the position, so moved rows can be recognised.
void append_tokens(KVCache<float>& cache, std::int64_t count) {
  const int heads = cache.n_kv_heads();
  kvevict::RowMatrixXf keys(heads * count, head_dim);
  Positions positions(static_cast<std::size_t>(count));
  for (std::int64_t c = 0; c < count; ++c) {
    positions[static_cast<std::size_t>(c)] = cache.next_position() + c;
    for (int j = 0; j < heads; ++j) {
      keys(j * count + c, 0) = static_cast<float>(cache.next_position() + c);
      keys(j * count + c, 1) = static_cast<float>(j);
    }
  }
  cache.append(keys, keys, positions);
}

Positions positions_of(const KVCache<float>& cache, int head) {
  const auto span = cache.positions(head);
  return {span.begin(), span.end()};
}

std::vector<float> channel_of(const KVCache<float>& cache, int head, int channel) {
  const auto span = cache.state(head, channel);
  return {span.begin(), span.end()};
}

// Attention rows [n_heads, rows, columns] that back an Observation.
struct Rows {
  int n_heads = 0;
  std::int64_t rows = 0;
  std::int64_t columns = 0;
  std::vector<float> data;

  Rows(int heads, std::int64_t r, std::int64_t c)
      : n_heads(heads), rows(r), columns(c), data(static_cast<std::size_t>(heads * r * c), 0.0f) {}

  float& at(int q, std::int64_t i, std::int64_t t) {
    return data[static_cast<std::size_t>((q * rows + i) * columns + t)];
  }
  void set_row(int q, std::int64_t i, const std::vector<float>& values) {
    for (std::size_t t = 0; t < values.size(); ++t) at(q, i, static_cast<std::int64_t>(t)) = values[t];
  }
  Observation observation(bool prefill) const {
    return {.n_heads = n_heads,
            .attention = {data.data(), n_heads, rows, columns},
            .queries = {},
            .appended = rows,
            .prefill = prefill};
  }
};

// Keys, values, positions and every state channel of every head.
struct Snapshot {
  std::int64_t size = 0;
  std::vector<float> data;
  Positions positions;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const KVCache<float>& cache) {
  Snapshot s;
  s.size = cache.size();
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    const auto keys = cache.keys(j);
    const auto values = cache.values(j);
    s.data.insert(s.data.end(), keys.data(), keys.data() + keys.size());
    s.data.insert(s.data.end(), values.data(), values.data() + values.size());
    for (int ch = 0; ch < cache.state_channels(); ++ch) {
      const auto state = cache.state(j, ch);
      s.data.insert(s.data.end(), state.begin(), state.end());
    }
    const auto p = cache.positions(j);
    s.positions.insert(s.positions.end(), p.begin(), p.end());
  }
  return s;
}

std::string message_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "(no exception)";
}

void check_values(const std::vector<float>& actual, const std::vector<double>& expected, const char* what) {
  REQUIRE(actual.size() == expected.size());
  for (std::size_t t = 0; t < expected.size(); ++t) {
    INFO(what << " at slot " << t);
    CHECK(actual[t] == Approx(expected[t]).margin(1e-6));
  }
}

// The worked prefill example: one head, ten tokens, observation rows of the
// queries in slots 8 and 9.
SinkCLIPConfig example_config() {
  return {.budget = 6,
          .sinks = 1,
          .sink_threshold = 0.3f,
          .sink_keep_threshold = 0.15f,
          .max_emergent_sinks = 1,
          .observation_window = 2,
          .recent = 2,
          .clip = 0.5f,
          .decay = 0.5f,
          .min_vote_mass = 0.01f};
}

Rows example_rows() {
  Rows rows(1, 2, 10);
  rows.set_row(0, 0, {0.5f, 0.0625f, 0.0625f, 0.25f, 0.03125f, 0.0625f, 0.0f, 0.0f, 0.03125f, 0.0f});
  rows.set_row(0, 1, {0.25f, 0.0f, 0.0625f, 0.375f, 0.0f, 0.0625f, 0.25f, 0.0f, 0.0f, 0.0f});
  return rows;
}

// A softmax row over the `visible` first columns with the given logits.
void softmax_row(Rows& rows, int q, std::int64_t i, std::int64_t visible, const std::vector<double>& logits) {
  const double top = *std::max_element(logits.begin(), logits.begin() + visible);
  double total = 0.0;
  for (std::int64_t t = 0; t < visible; ++t) total += std::exp(logits[static_cast<std::size_t>(t)] - top);
  for (std::int64_t t = 0; t < rows.columns; ++t) {
    rows.at(q, i, t) =
        t < visible ? static_cast<float>(std::exp(logits[static_cast<std::size_t>(t)] - top) / total) : 0.0f;
  }
}

}  // namespace

TEST_CASE("SinkCLIP resolves its defaults", "[sinkclip]") {
  const Policy policy({.budget = 128});
  const SinkCLIPConfig& c = policy.config();
  CHECK(c.sinks == 4);
  CHECK(c.sink_threshold == 0.1f);
  CHECK(*c.sink_keep_threshold == 0.05f);
  CHECK(c.max_emergent_sinks == 4);
  CHECK(c.observation_window == 32);
  CHECK(*c.sink_rate == Approx(2.0 / 33.0));
  CHECK(c.recent == 32);
  CHECK(c.clip == 8.0f);
  CHECK(c.clip_mode == SinkCLIPConfig::ClipMode::budget);
  CHECK(c.decay == 0.995f);
  CHECK(c.normalize_exposure);
  CHECK(c.min_vote_mass == 0.01f);
  CHECK(c.gqa_aggregation == SinkCLIPConfig::GroupAggregation::mean);
  CHECK(policy.state_channels() == 4);
  CHECK(policy.needs().decode_attention);
  CHECK(policy.needs().prefill_attention_rows == 32);
  CHECK(policy.needs().window_queries == 0);
  // The cap keeps one scored slot: budget 40 - 4 sinks - 32 recent - 1 = 3.
  CHECK(Policy({.budget = 40}).emergent_cap() == 3);
  CHECK(policy.emergent_cap() == 4);
}

TEST_CASE("SinkCLIP prefill worked example", "[sinkclip]") {
  Policy policy(example_config());
  auto cache = make_cache(1, 16);
  append_tokens(cache, 10);
  const Rows rows = example_rows();

  policy.observe(cache, rows.observation(true));
  // sigma: mean of the two rows. Slot 3 (0.3125 > 0.3) becomes the emergent sink.
  check_values(channel_of(cache, 0, Policy::sink_share_channel),
               {0.375, 0.03125, 0.0625, 0.3125, 0.015625, 0.0625, 0.125, 0, 0.015625, 0}, "sigma");
  check_values(channel_of(cache, 0, Policy::emergent_channel), {0, 0, 0, 1, 0, 0, 0, 0, 0, 0}, "flag");
  // Sinks {0, 3}; B_s = 6 - 1 - 1 - 2 = 2 so kappa = 0.5 / 2 = 0.25. Sinks
  // never receive a vote, so their S stays 0.
  check_values(channel_of(cache, 0, Policy::score_channel),
               {0, 0.125, 0.291667, 0, 0.0625, 0.291667, 0.25, 0, 0.0625, 0}, "S");
  check_values(channel_of(cache, 0, Policy::exposure_channel), {1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1},
               "Z");

  KeepPlan plan;
  policy.select(cache, Observation{}, plan);
  cache.keep(plan);
  CHECK(positions_of(cache, 0) == Positions{0, 2, 3, 5, 8, 9});
  // The state moved with the kept tokens.
  check_values(channel_of(cache, 0, Policy::score_channel), {0, 0.291667, 0, 0.291667, 0.0625, 0}, "kept S");
  check_values(channel_of(cache, 0, Policy::emergent_channel), {0, 0, 1, 0, 0, 0}, "kept flag");
}

TEST_CASE("SinkCLIP unclipped example keeps the spike", "[sinkclip]") {
  // Fixed clip 1 never clips a share: slot 6 scores 2/3 from the second query
  // alone, and slots 2 and 5 tie at 0.291667 so the later one (5) wins.
  SinkCLIPConfig config = example_config();
  config.clip_mode = SinkCLIPConfig::ClipMode::fixed;
  config.clip = 1.0f;
  Policy policy(config);
  auto cache = make_cache(1, 16);
  append_tokens(cache, 10);
  KeepPlan plan;
  CHECK(kvevict::compress_prefill(policy, cache, example_rows().observation(true), plan));
  CHECK(positions_of(cache, 0) == Positions{0, 3, 5, 6, 8, 9});
  check_values(channel_of(cache, 0, Policy::score_channel), {0, 0, 0.291667, 2.0 / 3.0, 0.0625, 0}, "S");
}

TEST_CASE("SinkCLIP decode worked example", "[sinkclip]") {
  Policy policy(example_config());
  auto cache = make_cache(1, 16);
  append_tokens(cache, 10);
  KeepPlan plan;
  REQUIRE(kvevict::compress_prefill(policy, cache, example_rows().observation(true), plan));
  REQUIRE(positions_of(cache, 0) == Positions{0, 2, 3, 5, 8, 9});

  // New token in slot 6 (position 10); its row over positions (0, 2, 3, 5, 8, 9, 10).
  append_tokens(cache, 1);
  Rows row(1, 1, 7);
  row.set_row(0, 0, {0.5f, 0.0625f, 0.125f, 0.125f, 0.0625f, 0.0625f, 0.0625f});
  policy.observe(cache, row.observation(false));

  // sigma = (1/3) sigma + (2/3) row: position 3 falls to 0.1875, below the
  // promotion threshold 0.3 but above the keep threshold 0.15, so it stays.
  check_values(channel_of(cache, 0, Policy::sink_share_channel),
               {0.375 / 3 + 1.0 / 3, 0.0625, 0.1875, 0.0625 / 3 + 0.25 / 3, 0.015625 / 3 + 0.125 / 3, 0.125 / 3,
                0.125 / 3},
               "sigma");
  check_values(channel_of(cache, 0, Policy::emergent_channel), {0, 0, 1, 0, 0, 0, 0}, "flag");
  // Sink mass 0.625, kappa 0.25: shares 1/6, 0.25, 1/6, 1/6, 1/6 after decay 0.5.
  check_values(channel_of(cache, 0, Policy::score_channel), {0, 0.3125, 0, 0.395833, 0.197917, 1.0 / 6, 1.0 / 6},
               "S");
  check_values(channel_of(cache, 0, Policy::exposure_channel), {1.75, 1.75, 1.75, 1.75, 1.75, 1.5, 1}, "Z");

  // Candidates 2, 5, 8 by S / Z = 0.178571, 0.226190, 0.113095: position 8 leaves.
  REQUIRE(policy.should_evict(cache, kvevict::Trigger::decode));
  policy.select(cache, Observation{}, plan);
  cache.keep(plan);
  CHECK(positions_of(cache, 0) == Positions{0, 2, 3, 5, 9, 10});
}

TEST_CASE("SinkCLIP reduces to H2O", "[sinkclip]") {
  // kappa = 1 (fixed), every head votes, no sinks, no decay, rank by S: S is
  // H2O's accumulated attention and the kept sets are H2O's. Rows are
  // multiples of 1/64, so every sum is exact in float in both policies.
  const std::int64_t heavy = 7;
  const std::int64_t recent = 5;
  const int kv_heads = 2;
  const int n_heads = 4;
  Policy sinkclip({.budget = heavy + recent,
                   .sinks = 0,
                   .max_emergent_sinks = 0,
                   .observation_window = 1000,
                   .recent = recent,
                   .clip = 1.0f,
                   .clip_mode = SinkCLIPConfig::ClipMode::fixed,
                   .decay = 1.0f,
                   .normalize_exposure = false,
                   .min_vote_mass = 0.0f});
  H2O<float> h2o({.heavy = heavy, .recent = recent});
  auto sinkclip_cache = make_cache(kv_heads, 64, 4);
  auto h2o_cache = make_cache(kv_heads, 64, 1);
  std::mt19937 rng(42);
  KeepPlan plan;

  // Each row spreads 64 units of 1/64 over the visible slots, favouring a few.
  const auto fill = [&](Rows& rows, std::int64_t i, std::int64_t visible) {
    for (int q = 0; q < rows.n_heads; ++q) {
      for (std::int64_t t = 0; t < rows.columns; ++t) rows.at(q, i, t) = 0.0f;
      for (int unit = 0; unit < 64; ++unit) {
        const std::int64_t t = std::uniform_int_distribution<std::int64_t>(0, visible - 1)(rng) %
                               (unit % 3 == 0 ? std::min<std::int64_t>(visible, 6) : visible);
        rows.at(q, i, t) += 1.0f / 64.0f;
      }
    }
  };

  // Prefill of 20 tokens with all causal rows.
  append_tokens(sinkclip_cache, 20);
  append_tokens(h2o_cache, 20);
  Rows prompt(n_heads, 20, 20);
  for (std::int64_t i = 0; i < 20; ++i) fill(prompt, i, i + 1);
  CHECK(kvevict::compress_prefill(sinkclip, sinkclip_cache, prompt.observation(true), plan));
  CHECK(kvevict::compress_prefill(h2o, h2o_cache, prompt.observation(true), plan));

  for (int step = 0; step <= 300; ++step) {
    for (int j = 0; j < kv_heads; ++j) {
      INFO("step " << step << " head " << j);
      REQUIRE(positions_of(sinkclip_cache, j) == positions_of(h2o_cache, j));
      REQUIRE(channel_of(sinkclip_cache, j, Policy::score_channel) ==
              channel_of(h2o_cache, j, H2O<float>::acc_channel));
    }
    // Decode steps of one token, and every tenth step a chunk of three.
    const std::int64_t count = step % 10 == 9 ? 3 : 1;
    append_tokens(sinkclip_cache, count);
    append_tokens(h2o_cache, count);
    const std::int64_t n = sinkclip_cache.size();
    Rows rows(n_heads, count, n);
    for (std::int64_t i = 0; i < count; ++i) fill(rows, i, n - count + i + 1);
    kvevict::observe_and_evict(sinkclip, sinkclip_cache, rows.observation(false), plan);
    kvevict::observe_and_evict(h2o, h2o_cache, rows.observation(false), plan);
  }
}

TEST_CASE("SinkCLIP clip stops a single outlier query", "[sinkclip]") {
  // Budget 24 with 4 sinks and 4 recent: B_s = 16 and kappa = 8 / 16 = 0.5.
  // The prompt row treats every token alike. Then X (position 10) receives
  // all the non-sink mass of one query (share 1), and Y (position 12) share
  // 2 / B_s from each of the next five queries. Both are seen by every query,
  // so their Z are equal and S decides. Clipped, X gains 0.5 * 0.995^5 = 0.488
  // and Y 0.125 * (1 + ... + 0.995^4) = 0.619; unclipped, X gains 0.975.
  const std::int64_t x = 10;
  const std::int64_t y = 12;
  const auto run = [&](SinkCLIPConfig::ClipMode mode, float clip, int steps) {
    Policy policy({.budget = 24, .sinks = 4, .max_emergent_sinks = 0, .observation_window = 1, .recent = 4,
                   .clip = clip, .clip_mode = mode});
    auto cache = make_cache(1, 32);
    append_tokens(cache, 24);
    KeepPlan plan;
    Rows prompt(1, 1, 24);
    prompt.data.assign(prompt.data.size(), 1.0f / 24.0f);
    kvevict::compress_prefill(policy, cache, prompt.observation(true), plan);
    for (int step = 0; step < steps; ++step) {
      append_tokens(cache, 1);
      const std::int64_t n = cache.size();
      const Positions kept = positions_of(cache, 0);
      Rows row(1, 1, n);
      for (std::int64_t t = 0; t < 4; ++t) row.at(0, 0, t) = 0.125f;  // sink mass 0.5
      const auto slot_x = std::find(kept.begin(), kept.end(), x) - kept.begin();
      const auto slot_y = std::find(kept.begin(), kept.end(), y) - kept.begin();
      if (step == 0) {
        row.at(0, 0, slot_x) = 0.5f;
      } else {
        const bool y_turn = step <= 5;
        float rest = 0.5f;
        if (y_turn) {
          row.at(0, 0, slot_y) = 0.0625f;
          rest -= 0.0625f;
        }
        // The rest goes evenly to the other non-sink tokens except X and Y.
        const std::int64_t others = n - 4 - (slot_x < n ? 1 : 0) - (slot_y < n ? 1 : 0);
        for (std::int64_t t = 4; t < n; ++t) {
          if (t != slot_x && t != slot_y) row.at(0, 0, t) = rest / static_cast<float>(others);
        }
      }
      kvevict::observe_and_evict(policy, cache, row.observation(false), plan);
    }
    return cache;
  };

  SECTION("clipped: the moderate token outranks the spike") {
    const auto cache = run(SinkCLIPConfig::ClipMode::budget, 8.0f, 6);
    const Positions kept = positions_of(cache, 0);
    const auto slot_x = std::find(kept.begin(), kept.end(), x) - kept.begin();
    const auto slot_y = std::find(kept.begin(), kept.end(), y) - kept.begin();
    REQUIRE(slot_x < static_cast<std::ptrdiff_t>(kept.size()));
    REQUIRE(slot_y < static_cast<std::ptrdiff_t>(kept.size()));
    const auto s = channel_of(cache, 0, Policy::score_channel);
    const auto z = channel_of(cache, 0, Policy::exposure_channel);
    CHECK(z[static_cast<std::size_t>(slot_y)] == z[static_cast<std::size_t>(slot_x)]);
    CHECK(s[static_cast<std::size_t>(slot_y)] - s[static_cast<std::size_t>(slot_x)] ==
          Approx(0.125 * (1 - std::pow(0.995, 5)) / 0.005 - 0.5 * std::pow(0.995, 5)).margin(1e-5));
  }
  SECTION("unclipped: the spike outranks the moderate token") {
    const auto cache = run(SinkCLIPConfig::ClipMode::fixed, 1.0f, 6);
    const Positions kept = positions_of(cache, 0);
    const auto slot_x = std::find(kept.begin(), kept.end(), x) - kept.begin();
    const auto slot_y = std::find(kept.begin(), kept.end(), y) - kept.begin();
    REQUIRE(slot_x < static_cast<std::ptrdiff_t>(kept.size()));
    REQUIRE(slot_y < static_cast<std::ptrdiff_t>(kept.size()));
    const auto s = channel_of(cache, 0, Policy::score_channel);
    CHECK(s[static_cast<std::size_t>(slot_x)] - s[static_cast<std::size_t>(slot_y)] ==
          Approx(std::pow(0.995, 5) - 0.125 * (1 - std::pow(0.995, 5)) / 0.005).margin(1e-5));
  }
  SECTION("the spiked token leaves once nothing attends to it") {
    const auto cache = run(SinkCLIPConfig::ClipMode::budget, 8.0f, 300);
    const Positions kept = positions_of(cache, 0);
    CHECK(std::find(kept.begin(), kept.end(), x) == kept.end());
  }
}

TEST_CASE("SinkCLIP emergent sink hysteresis", "[sinkclip]") {
  // X (position 6) gets raw share 0.5, then 0.07 (between the keep threshold
  // 0.05 and the promotion threshold 0.1), then 0.
  const SinkCLIPConfig config{.budget = 40, .sinks = 1, .max_emergent_sinks = 2, .observation_window = 8,
                              .recent = 4};
  Policy policy(config);
  const float rate = 2.0f / 9.0f;
  REQUIRE(*policy.config().sink_rate == Approx(rate));
  auto cache = make_cache(1, 64);
  append_tokens(cache, 16);
  KeepPlan plan;
  Rows prompt(1, 8, 16);
  for (std::int64_t i = 0; i < 8; ++i) {
    for (std::int64_t t = 0; t <= 8 + i; ++t) prompt.at(0, i, t) = 1.0f / static_cast<float>(9 + i);
  }
  kvevict::compress_prefill(policy, cache, prompt.observation(true), plan);
  const std::int64_t x = 6;  // no eviction happens below the budget, so slot == position
  REQUIRE(channel_of(cache, 0, Policy::emergent_channel)[x] == 0.0f);

  const auto step = [&](float share) {
    append_tokens(cache, 1);
    const std::int64_t n = cache.size();
    Rows row(1, 1, n);
    row.at(0, 0, 0) = 0.3f;
    row.at(0, 0, x) = share;
    for (std::int64_t t = 1; t < n; ++t) {
      if (t != x) row.at(0, 0, t) = (0.7f - share) / static_cast<float>(n - 2);
    }
    kvevict::observe_and_evict(policy, cache, row.observation(false), plan);
    REQUIRE(cache.size() < 40);  // no eviction, so slot x still stores position x
  };

  // Promotion: sigma = 0.5 * rate + (1 - rate) * sigma_prefill > 0.1 after one step.
  step(0.5f);
  CHECK(channel_of(cache, 0, Policy::sink_share_channel)[x] > 0.1f);
  CHECK(channel_of(cache, 0, Policy::emergent_channel)[x] == 1.0f);

  // Kept while sigma stays above 0.05; a sink receives no votes, so S only decays.
  for (int k = 0; k < 20; ++k) {
    const float score_before = channel_of(cache, 0, Policy::score_channel)[x];
    step(0.07f);
    INFO("keep step " << k);
    CHECK(channel_of(cache, 0, Policy::sink_share_channel)[x] > 0.05f);
    CHECK(channel_of(cache, 0, Policy::emergent_channel)[x] == 1.0f);
    CHECK(channel_of(cache, 0, Policy::score_channel)[x] == Approx(0.995f * score_before).margin(1e-7));
  }

  // Demotion: with share 0, sigma falls by (1 - rate) per step. The step it
  // falls to 0.05 or below, X restarts at S = kappa * Z, kappa = 8 / (40 - 1 - 4),
  // then decays with everything else and receives no vote (share 0).
  int demoted_at = -1;
  for (int k = 0; k < 10 && demoted_at < 0; ++k) {
    const float exposure_before = channel_of(cache, 0, Policy::exposure_channel)[x];
    const float sigma_expected = (1.0f - rate) * channel_of(cache, 0, Policy::sink_share_channel)[x];
    step(0.0f);
    CHECK(channel_of(cache, 0, Policy::sink_share_channel)[x] == Approx(sigma_expected).margin(1e-7));
    if (sigma_expected > 0.05f) {
      CHECK(channel_of(cache, 0, Policy::emergent_channel)[x] == 1.0f);
      continue;
    }
    demoted_at = k;
    CHECK(channel_of(cache, 0, Policy::emergent_channel)[x] == 0.0f);
    const float kappa = 8.0f / 35.0f;
    CHECK(channel_of(cache, 0, Policy::score_channel)[x] == Approx(0.995f * kappa * exposure_before).epsilon(1e-6));
    CHECK(channel_of(cache, 0, Policy::exposure_channel)[x] == Approx(0.995f * exposure_before + 1.0f).epsilon(1e-6));
  }
  // 0.07-level sigma needs two steps at (7/9) per step to fall below 0.05.
  CHECK(demoted_at == 1);
}

TEST_CASE("SinkCLIP caps emergent sinks", "[sinkclip]") {
  // Five tokens hold large shares; only the allowed number become sinks,
  // chosen by sigma, and among equal sigma the later tokens.
  const auto flagged_after = [](const SinkCLIPConfig& config, const std::vector<float>& shares) {
    Policy policy(config);
    auto cache = make_cache(1, 64);
    append_tokens(cache, 20);
    Rows prompt(1, 1, 20);
    prompt.at(0, 0, 0) = 0.1f;
    for (std::size_t k = 0; k < shares.size(); ++k) prompt.at(0, 0, static_cast<std::int64_t>(2 + 2 * k)) = shares[k];
    float rest = 0.9f;
    for (const float share : shares) rest -= share;
    prompt.at(0, 0, 19) = rest;
    policy.observe(cache, prompt.observation(true));
    Positions flagged;
    const auto flags = channel_of(cache, 0, Policy::emergent_channel);
    for (std::size_t t = 0; t < flags.size(); ++t) {
      if (flags[t] != 0.0f) flagged.push_back(static_cast<std::int64_t>(t));
    }
    return flagged;
  };
  const std::vector<float> distinct = {0.15f, 0.16f, 0.14f, 0.155f, 0.145f};  // slots 2, 4, 6, 8, 10
  const std::vector<float> equal = {0.15f, 0.15f, 0.15f, 0.15f, 0.15f};

  SECTION("max_emergent_sinks") {
    const SinkCLIPConfig config{.budget = 40, .sinks = 1, .max_emergent_sinks = 2, .recent = 4};
    CHECK(flagged_after(config, distinct) == Positions{4, 8});
    CHECK(flagged_after(config, equal) == Positions{8, 10});
  }
  SECTION("budget leaves one scored slot") {
    // budget 9 - 1 sink - 4 recent - 1 = 3 emergent sinks at most.
    const SinkCLIPConfig config{.budget = 9, .sinks = 1, .max_emergent_sinks = 10, .recent = 4};
    CHECK(Policy(config).emergent_cap() == 3);
    CHECK(flagged_after(config, distinct) == Positions{2, 4, 8});
  }
  SECTION("no emergent sinks") {
    const SinkCLIPConfig config{.budget = 40, .sinks = 1, .max_emergent_sinks = 0, .recent = 4};
    CHECK(flagged_after(config, distinct).empty());
  }
}

TEST_CASE("SinkCLIP votes per query head", "[sinkclip]") {
  // Two query heads on one KV head; one sink; four visible tokens; clip fixed 1.
  const auto scores_after = [](SinkCLIPConfig config, float first_head_sink_mass) {
    config.budget = 40;
    config.sinks = 1;
    config.max_emergent_sinks = 0;
    config.recent = 1;
    config.decay = 1.0f;
    Policy policy(config);
    auto cache = make_cache(1, 8);
    append_tokens(cache, 4);
    Rows prompt(2, 1, 4);
    const float rest = 1.0f - first_head_sink_mass;
    prompt.set_row(0, 0, {first_head_sink_mass, rest / 4, rest / 4, rest / 2});
    prompt.set_row(1, 0, {0.5f, 0.25f, 0.125f, 0.125f});
    policy.observe(cache, prompt.observation(true));
    return channel_of(cache, 0, Policy::score_channel);
  };
  const SinkCLIPConfig fixed{.clip = 1.0f, .clip_mode = SinkCLIPConfig::ClipMode::fixed};

  // Renormalised shares: head 0 (0.25, 0.25, 0.5), head 1 (0.5, 0.25, 0.25).
  SECTION("a head with almost all mass on the sinks does not vote") {
    // Head 0 leaves 0.005 < 0.01 for content: only head 1 votes.
    check_values(scores_after(fixed, 0.995f), {0, 0.5, 0.25, 0.25}, "S");
  }
  SECTION("a head with no content mass never divides by zero") {
    SinkCLIPConfig config = fixed;
    config.min_vote_mass = 0.0f;
    check_values(scores_after(config, 1.0f), {0, 0.5, 0.25, 0.25}, "S");
  }
  SECTION("voting heads are averaged") {
    // Head 0 leaves 0.02 >= 0.01 for content, so it votes.
    check_values(scores_after(fixed, 0.98f), {0, 0.375, 0.25, 0.375}, "S");
    SinkCLIPConfig config = fixed;
    config.min_vote_mass = 0.0f;
    check_values(scores_after(config, 0.0f), {0, 0.375, 0.25, 0.375}, "S");
  }
  SECTION("context clip mode divides by the visible content") {
    SinkCLIPConfig config{.clip = 1.0f, .clip_mode = SinkCLIPConfig::ClipMode::context};
    // Three content slots are visible: kappa = 1/3 clips each head's 0.5.
    check_values(scores_after(config, 0.5f), {0, (0.25 + 1.0 / 3.0) / 2, 0.25, (1.0 / 3.0 + 0.25) / 2}, "S");
  }
}

TEST_CASE("SinkCLIP group aggregation differs between mean and max", "[sinkclip]") {
  const auto run = [](SinkCLIPConfig::GroupAggregation aggregation) {
    Policy policy({.budget = 40, .sinks = 1, .max_emergent_sinks = 0, .recent = 1, .clip = 1.0f,
                   .clip_mode = SinkCLIPConfig::ClipMode::fixed, .decay = 1.0f, .gqa_aggregation = aggregation});
    auto cache = make_cache(1, 8);
    append_tokens(cache, 4);
    Rows prompt(2, 1, 4);
    prompt.set_row(0, 0, {0.5f, 0.5f, 0.0f, 0.0f});
    prompt.set_row(1, 0, {0.5f, 0.0f, 0.25f, 0.25f});
    policy.observe(cache, prompt.observation(true));
    return std::make_pair(channel_of(cache, 0, Policy::score_channel),
                          channel_of(cache, 0, Policy::sink_share_channel));
  };
  const auto [mean_score, mean_sigma] = run(SinkCLIPConfig::GroupAggregation::mean);
  check_values(mean_score, {0, 0.5, 0.25, 0.25}, "mean S");
  check_values(mean_sigma, {0.5, 0.25, 0.125, 0.125}, "mean sigma");
  const auto [max_score, max_sigma] = run(SinkCLIPConfig::GroupAggregation::max);
  check_values(max_score, {0, 1.0, 0.5, 0.5}, "max S");
  check_values(max_sigma, {0.5, 0.5, 0.25, 0.25}, "max sigma");
}

TEST_CASE("SinkCLIP ties keep the later token", "[sinkclip]") {
  // Uniform rows give every candidate the same S / Z; the later ones stay.
  Policy policy({.budget = 8, .sinks = 2, .max_emergent_sinks = 0, .observation_window = 4, .recent = 2});
  auto cache = make_cache(2, 16);
  append_tokens(cache, 12);
  Rows prompt(2, 1, 12);
  for (int q = 0; q < 2; ++q) {
    for (std::int64_t t = 0; t < 12; ++t) prompt.at(q, 0, t) = 1.0f / 12.0f;
  }
  KeepPlan plan;
  CHECK(kvevict::compress_prefill(policy, cache, prompt.observation(true), plan));
  CHECK(positions_of(cache, 0) == Positions{0, 1, 6, 7, 8, 9, 10, 11});
  // Identical heads keep identical lists.
  CHECK(positions_of(cache, 1) == positions_of(cache, 0));
}

TEST_CASE("SinkCLIP keeps everything within the budget", "[sinkclip]") {
  Policy policy({.budget = 12, .sinks = 2, .observation_window = 4, .recent = 4});
  auto cache = make_cache(1, 16);
  append_tokens(cache, 10);
  Rows prompt(1, 4, 10);
  for (std::int64_t i = 0; i < 4; ++i) {
    for (std::int64_t t = 0; t <= 6 + i; ++t) prompt.at(0, i, t) = 1.0f / static_cast<float>(7 + i);
  }
  KeepPlan plan;
  CHECK_FALSE(kvevict::compress_prefill(policy, cache, prompt.observation(true), plan));
  policy.select(cache, Observation{}, plan);
  CHECK(plan.count() == 10);
  CHECK(plan.head(0)[9] == 9);
  // The statistics were still updated: every slot was seen by the last row.
  for (const float z : channel_of(cache, 0, Policy::exposure_channel)) CHECK(z > 0.0f);
}

TEST_CASE("SinkCLIP prefill uses the last observation_window rows", "[sinkclip]") {
  // Passing all prompt rows equals passing only the last two.
  const auto sigma_after = [](std::int64_t rows_passed) {
    Policy policy({.budget = 40, .sinks = 1, .observation_window = 2, .recent = 2});
    auto cache = make_cache(1, 16);
    append_tokens(cache, 6);
    Rows prompt(1, rows_passed, 6);
    for (std::int64_t i = 0; i < rows_passed; ++i) {
      const std::int64_t slot = 6 - rows_passed + i;
      for (std::int64_t t = 0; t <= slot; ++t) prompt.at(0, i, t) = (t == 0 ? 0.5f : 0.5f / static_cast<float>(slot));
      if (slot == 0) prompt.at(0, i, 0) = 1.0f;
    }
    policy.observe(cache, prompt.observation(true));
    return std::make_pair(channel_of(cache, 0, Policy::sink_share_channel),
                          channel_of(cache, 0, Policy::exposure_channel));
  };
  const auto [sigma_all, exposure_all] = sigma_after(6);
  const auto [sigma_two, exposure_two] = sigma_after(2);
  CHECK(sigma_all == sigma_two);
  CHECK(exposure_all == exposure_two);
  check_values(sigma_two, {0.5, 0.1125, 0.1125, 0.1125, 0.1125, 0.05}, "sigma");
}

TEST_CASE("SinkCLIP state moves with its token", "[sinkclip]") {
  Policy policy({.budget = 16, .sinks = 2, .max_emergent_sinks = 2, .observation_window = 8, .recent = 4});
  auto cache = make_cache(2, 32);
  std::mt19937 rng(3);
  std::normal_distribution<double> noise(0.0, 1.5);
  KeepPlan plan;
  append_tokens(cache, 20);
  for (int step = 0; step < 200; ++step) {
    const std::int64_t n = cache.size();
    const bool prefill = step == 0;
    const std::int64_t r = prefill ? 8 : 1;
    Rows rows(4, r, n);
    for (int q = 0; q < 4; ++q) {
      for (std::int64_t i = 0; i < r; ++i) {
        std::vector<double> logits(static_cast<std::size_t>(n));
        for (auto& logit : logits) logit = noise(rng);
        logits[0] += 3.0;
        softmax_row(rows, q, i, n - r + i + 1, logits);
      }
    }
    policy.observe(cache, rows.observation(prefill));
    // State by position before the keep.
    std::vector<std::map<std::int64_t, std::vector<float>>> before(2);
    for (int j = 0; j < 2; ++j) {
      const Positions p = positions_of(cache, j);
      for (std::size_t s = 0; s < p.size(); ++s) {
        for (int ch = 0; ch < 4; ++ch) before[static_cast<std::size_t>(j)][p[s]].push_back(channel_of(cache, j, ch)[s]);
      }
    }
    if (policy.should_evict(cache, prefill ? kvevict::Trigger::prefill : kvevict::Trigger::decode)) {
      policy.select(cache, Observation{}, plan);
      cache.keep(plan);
    }
    for (int j = 0; j < 2; ++j) {
      const Positions p = positions_of(cache, j);
      for (std::size_t s = 0; s < p.size(); ++s) {
        for (int ch = 0; ch < 4; ++ch) {
          INFO("step " << step << " head " << j << " position " << p[s] << " channel " << ch);
          REQUIRE(channel_of(cache, j, ch)[s] == before[static_cast<std::size_t>(j)][p[s]][static_cast<std::size_t>(ch)]);
        }
      }
    }
    append_tokens(cache, 1);
  }
}

TEST_CASE("SinkCLIP invariants over 10000 decode steps", "[sinkclip]") {
  const SinkCLIPConfig config{.budget = 24, .sinks = 2, .max_emergent_sinks = 3, .observation_window = 8,
                              .recent = 4};
  Policy policy(config);
  const int kv_heads = 2;
  const int n_heads = 4;
  auto cache = make_cache(kv_heads, 32);
  std::mt19937 rng(11);
  std::normal_distribution<double> noise(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  KeepPlan plan;
  // Positions that attract attention for a while, per KV head.
  std::vector<std::int64_t> favourite(kv_heads, 5);

  append_tokens(cache, 16);
  {
    Rows prompt(n_heads, 8, 16);
    for (int q = 0; q < n_heads; ++q) {
      for (std::int64_t i = 0; i < 8; ++i) {
        std::vector<double> logits(16);
        for (auto& logit : logits) logit = noise(rng);
        logits[0] += 2.0;
        softmax_row(prompt, q, i, 8 + i + 1, logits);
      }
    }
    kvevict::compress_prefill(policy, cache, prompt.observation(true), plan);
  }

  // kappa is largest when the most emergent sinks shrink the scored budget.
  const float kappa_max = 8.0f / static_cast<float>(24 - 2 - 3 - 4);
  int promotions = 0;
  int demotions = 0;
  int outliers = 0;
  for (int step = 0; step < 10000; ++step) {
    std::vector<std::vector<float>> flags_before(kv_heads);
    std::vector<Positions> positions_before(kv_heads);
    for (int j = 0; j < kv_heads; ++j) {
      flags_before[static_cast<std::size_t>(j)] = channel_of(cache, j, Policy::emergent_channel);
      positions_before[static_cast<std::size_t>(j)] = positions_of(cache, j);
    }
    append_tokens(cache, 1);
    const std::int64_t n = cache.size();
    const std::int64_t newest = cache.next_position() - 1;
    Rows row(n_heads, 1, n);
    if (step % 500 == 0) {
      for (auto& f : favourite) f = newest - 1;
    }
    for (int q = 0; q < n_heads; ++q) {
      const int j = q / 2;
      std::vector<double> logits(static_cast<std::size_t>(n));
      for (auto& logit : logits) logit = noise(rng);
      logits[0] += 2.5;
      const Positions kept = positions_of(cache, j);
      const auto fav = std::find(kept.begin(), kept.end(), favourite[static_cast<std::size_t>(j)]) - kept.begin();
      if (fav < n && (step % 500) < 250) logits[static_cast<std::size_t>(fav)] += 4.0;
      if (uniform(rng) < 0.01) {
        // A single outlier query: almost all of its mass on one random token.
        logits[static_cast<std::size_t>(std::uniform_int_distribution<std::int64_t>(0, n - 1)(rng))] += 12.0;
        ++outliers;
      }
      softmax_row(row, q, 0, n, logits);
    }
    kvevict::observe_and_evict(policy, cache, row.observation(false), plan);

    REQUIRE(cache.size() == std::min<std::int64_t>(n, 24));
    for (int j = 0; j < kv_heads; ++j) {
      INFO("step " << step << " head " << j);
      const Positions kept = positions_of(cache, j);
      const auto size = static_cast<std::int64_t>(kept.size());
      REQUIRE(kept[0] == 0);
      REQUIRE(kept[1] == 1);
      for (std::int64_t k = 0; k < 4; ++k) REQUIRE(kept[static_cast<std::size_t>(size - 1 - k)] == newest - k);
      const auto score = channel_of(cache, j, Policy::score_channel);
      const auto exposure = channel_of(cache, j, Policy::exposure_channel);
      const auto sigma = channel_of(cache, j, Policy::sink_share_channel);
      const auto flags = channel_of(cache, j, Policy::emergent_channel);
      std::int64_t emergent = 0;
      for (std::int64_t t = 0; t < size; ++t) {
        const auto s = static_cast<std::size_t>(t);
        REQUIRE(std::isfinite(score[s]));
        REQUIRE(score[s] >= 0.0f);
        REQUIRE(exposure[s] >= 1.0f);
        REQUIRE(score[s] <= kappa_max * exposure[s] * (1.0f + 1e-5f));
        REQUIRE(sigma[s] >= 0.0f);
        REQUIRE(sigma[s] <= 1.0f + 1e-6f);
        if (flags[s] != 0.0f) {
          ++emergent;
          REQUIRE(t >= 2);
          REQUIRE(t < size - 4);
          REQUIRE(sigma[s] > 0.05f);
        }
      }
      REQUIRE(emergent <= 3);
      // Every emergent sink that stayed a sink is still in the cache.
      const auto& before = flags_before[static_cast<std::size_t>(j)];
      const auto& old_positions = positions_before[static_cast<std::size_t>(j)];
      for (std::size_t s = 0; s < before.size(); ++s) {
        const auto now = std::find(kept.begin(), kept.end(), old_positions[s]) - kept.begin();
        const bool flagged_now = now < size && flags[static_cast<std::size_t>(now)] != 0.0f;
        if (before[s] != 0.0f && !flagged_now) ++demotions;
        if (before[s] == 0.0f && flagged_now) ++promotions;
        if (before[s] != 0.0f && flagged_now) REQUIRE(now < size);
      }
    }
  }
  CHECK(promotions > 10);
  CHECK(demotions > 10);
  CHECK(outliers > 50);
}

TEST_CASE("SinkCLIP rejects invalid configurations", "[sinkclip]") {
  const auto message = [](const SinkCLIPConfig& config) { return message_of([&] { Policy policy(config); }); };
  CHECK_THAT(message({.budget = 0}), Catch::Contains("budget (0) must be at least 1"));
  CHECK_THAT(message({.budget = 36}), Catch::Contains("budget (36) must be at least sinks + recent + 1 (4 + 32 + 1)"));
  CHECK_NOTHROW(Policy({.budget = 37}));
  CHECK_THAT(message({.budget = 64, .sinks = -1}), Catch::Contains("sinks (-1) must be non-negative"));
  CHECK_THAT(message({.budget = 64, .recent = 0}), Catch::Contains("recent (0) must be at least 1"));
  CHECK_THAT(message({.budget = 64, .sink_threshold = 0.0f}), Catch::Contains("sink_threshold (0) must be in (0, 1)"));
  CHECK_THAT(message({.budget = 64, .sink_threshold = 1.0f}), Catch::Contains("sink_threshold (1) must be in (0, 1)"));
  CHECK_THAT(message({.budget = 64, .sink_threshold = std::numeric_limits<float>::quiet_NaN()}),
             Catch::Contains("sink_threshold (nan)"));
  CHECK_THAT(message({.budget = 64, .sink_keep_threshold = 0.2f}),
             Catch::Contains("sink_keep_threshold (0.2) must be in [0, sink_threshold] = [0, 0.1]"));
  CHECK_THAT(message({.budget = 64, .sink_keep_threshold = -0.01f}), Catch::Contains("sink_keep_threshold (-0.01)"));
  CHECK_THAT(message({.budget = 64, .max_emergent_sinks = -1}),
             Catch::Contains("max_emergent_sinks (-1) must be non-negative"));
  CHECK_THAT(message({.budget = 64, .observation_window = 0}),
             Catch::Contains("observation_window (0) must be at least 1"));
  CHECK_THAT(message({.budget = 64, .sink_rate = 0.0f}), Catch::Contains("sink_rate (0) must be in (0, 1]"));
  CHECK_THAT(message({.budget = 64, .sink_rate = 1.5f}), Catch::Contains("sink_rate (1.5) must be in (0, 1]"));
  CHECK_THAT(message({.budget = 64, .clip = 0.0f}), Catch::Contains("clip (0) must be finite and greater than 0"));
  CHECK_THAT(message({.budget = 64, .clip = std::numeric_limits<float>::infinity()}), Catch::Contains("clip (inf)"));
  CHECK_THAT(message({.budget = 64, .decay = 0.0f}), Catch::Contains("decay (0) must be in (0, 1]"));
  CHECK_THAT(message({.budget = 64, .decay = 1.01f}), Catch::Contains("decay (1.01) must be in (0, 1]"));
  CHECK_THAT(message({.budget = 64, .min_vote_mass = 1.0f}), Catch::Contains("min_vote_mass (1) must be in [0, 1)"));
  CHECK_THAT(message({.budget = 64, .min_vote_mass = -0.5f}), Catch::Contains("min_vote_mass (-0.5)"));
  CHECK_THAT(message({.budget = 64, .slack = -1}), Catch::Contains("slack (-1) must be non-negative"));
}

TEST_CASE("SinkCLIP rejects bad observations and changes nothing", "[sinkclip]") {
  Policy policy({.budget = 8, .sinks = 1, .observation_window = 2, .recent = 2});
  auto cache = make_cache(2, 16);
  append_tokens(cache, 10);
  Rows good(4, 2, 10);
  for (int q = 0; q < 4; ++q) {
    for (std::int64_t i = 0; i < 2; ++i) {
      for (std::int64_t t = 0; t <= 8 + i; ++t) good.at(q, i, t) = 1.0f / static_cast<float>(9 + i);
    }
  }
  KeepPlan plan;
  REQUIRE(kvevict::compress_prefill(policy, cache, good.observation(true), plan));
  append_tokens(cache, 1);
  const Snapshot before = snapshot(cache);
  const auto rejects = [&](const Observation& observation, const char* expected) {
    INFO(expected);
    const std::string text = message_of([&] { kvevict::observe_and_evict(policy, cache, observation, plan); });
    CHECK_THAT(text, Catch::Contains(expected));
    CHECK(snapshot(cache) == before);
  };

  Rows row(4, 1, 9);
  row.data.assign(row.data.size(), 1.0f / 9.0f);
  Rows wide(4, 1, 10);
  wide.data.assign(wide.data.size(), 0.1f);
  Observation empty;
  empty.n_heads = 4;
  rejects(empty, "no attention rows");
  rejects(wide.observation(false), "10 columns, the cache holds 9 slots");
  Observation odd_heads = row.observation(false);
  odd_heads.n_heads = 3;
  odd_heads.attention.d0 = 3;
  rejects(odd_heads, "multiple of n_kv_heads (2)");
  Rows with_nan = row;
  with_nan.at(3, 0, 8) = std::numeric_limits<float>::quiet_NaN();
  rejects(with_nan.observation(false), "non-finite value");
  // Row i belongs to the query of slot size() - rows + i, so rows <= size().
  Rows excess(4, 10, 9);
  excess.data.assign(excess.data.size(), 0.1f);
  rejects(excess.observation(false), "10 rows for 9 cached slots");

  auto bare = make_cache(2, 16, 2);
  append_tokens(bare, 9);
  const Snapshot bare_before = snapshot(bare);
  CHECK_THAT(message_of([&] { policy.observe(bare, row.observation(false)); }), Catch::Contains("state channels"));
  CHECK_THAT(message_of([&] { policy.select(bare, Observation{}, plan); }), Catch::Contains("state channels"));
  CHECK(snapshot(bare) == bare_before);
}

TEST_CASE("SinkCLIP decode steps do not allocate once warm", "[sinkclip]") {
  Policy policy({.budget = 24, .sinks = 2, .max_emergent_sinks = 2, .observation_window = 8, .recent = 4});
  auto cache = make_cache(2, 32);
  append_tokens(cache, 16);
  std::vector<float> data(static_cast<std::size_t>(4 * 25), 0.0f);
  kvevict::RowMatrixXf keys = kvevict::RowMatrixXf::Zero(2, head_dim);
  std::vector<std::int64_t> position(1);
  KeepPlan plan;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);

  const auto step = [&] {
    position[0] = cache.next_position();
    cache.append(keys, keys, position);
    const std::int64_t n = cache.size();
    for (int q = 0; q < 4; ++q) {
      float total = 0.0f;
      for (std::int64_t t = 0; t < n; ++t) {
        float& p = data[static_cast<std::size_t>(q * n + t)];
        p = t == 0 ? 4.0f : uniform(rng);
        if (uniform(rng) < 0.02f) p += 10.0f;
        total += p;
      }
      for (std::int64_t t = 0; t < n; ++t) data[static_cast<std::size_t>(q * n + t)] /= total;
    }
    const Observation observation{.n_heads = 4, .attention = {data.data(), 4, 1, n}, .queries = {},
                                  .appended = 1, .prefill = false};
    kvevict::observe_and_evict(policy, cache, observation, plan);
  };
  for (int k = 0; k < 200; ++k) step();
  const long before = kvevict::test::allocation_count.load();
  for (int k = 0; k < 500; ++k) step();
  CHECK(kvevict::test::allocation_count.load() - before == 0);
}

TEST_CASE("SinkCLIP ranking ignores a common scale of S", "[sinkclip]") {
  Policy policy({.budget = 10, .sinks = 1, .max_emergent_sinks = 1, .observation_window = 6, .recent = 2});
  auto cache = make_cache(2, 32);
  append_tokens(cache, 20);
  std::mt19937 rng(9);
  std::normal_distribution<double> noise(0.0, 1.5);
  Rows prompt(2, 6, 20);
  for (int q = 0; q < 2; ++q) {
    for (std::int64_t i = 0; i < 6; ++i) {
      std::vector<double> logits(20);
      for (auto& logit : logits) logit = noise(rng);
      softmax_row(prompt, q, i, 14 + i + 1, logits);
    }
  }
  policy.observe(cache, prompt.observation(true));
  KeepPlan plan;
  policy.select(cache, Observation{}, plan);
  for (int j = 0; j < 2; ++j) {
    for (float& s : cache.state(j, Policy::score_channel)) s *= 3.0f;
  }
  KeepPlan scaled;
  policy.select(cache, Observation{}, scaled);
  CHECK(scaled == plan);
}

TEST_CASE("SinkCLIP works on half-precision caches", "[sinkclip]") {
  KVCache<Eigen::half> cache(CacheConfig{.n_kv_heads = 1, .head_dim = 2, .positions = PositionMode::original,
                                         .state_channels = 4, .capacity = 16});
  SinkCLIP<Eigen::half> policy(example_config());
  kvevict::RowMatrixXf keys = kvevict::RowMatrixXf::Zero(10, 2);
  const Positions positions = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  cache.append(keys, keys, positions);
  KeepPlan plan;
  CHECK(kvevict::compress_prefill(policy, cache, example_rows().observation(true), plan));
  const auto kept = cache.positions(0);
  CHECK(Positions(kept.begin(), kept.end()) == Positions{0, 2, 3, 5, 8, 9});
}
