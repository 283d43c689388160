// Tests of the LaCache policy: the hand-worked ladder examples, a
// re-statement of the reference algorithm as an oracle, the size band, layer
// coverage and lockstep, validation, and bulk calls that do not fit.
#include <catch2/catch.hpp>

#include "allocation_counter.hpp"
#include "kvevict/kvevict.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using kvevict::CacheConfig;
using kvevict::KeepPlan;
using kvevict::KVCache;
using kvevict::LaCache;
using kvevict::LaCacheConfig;
using kvevict::Observation;
using kvevict::PositionMode;
using Positions = std::vector<std::int64_t>;

constexpr int kv_heads = 2;
constexpr int head_dim = 4;

KVCache<float> make_cache(std::int64_t reserve) {
  return KVCache<float>(CacheConfig{.n_kv_heads = kv_heads,
                                    .head_dim = head_dim,
                                    .positions = PositionMode::cache_relative,
                                    .state_channels = 0,
                                    .capacity = reserve});
}

// Appends tokens at positions first .. first+count-1; the key and value rows
// encode the position and head, so moved rows can be recognised.
void append_tokens(KVCache<float>& cache, std::int64_t first, std::int64_t count, kvevict::RowMatrixXf& keys,
                   Positions& positions) {
  keys.resize(kv_heads * count, head_dim);
  positions.resize(static_cast<std::size_t>(count));
  for (std::int64_t c = 0; c < count; ++c) {
    positions[static_cast<std::size_t>(c)] = first + c;
    for (int j = 0; j < kv_heads; ++j) {
      for (int k = 0; k < head_dim; ++k) {
        keys(j * count + c, k) = static_cast<float>(first + c) + 0.25f * static_cast<float>(j) + 0.0625f * k;
      }
    }
  }
  cache.append(keys, keys, positions);
}

Positions positions_of(const KVCache<float>& cache, int head) {
  const auto span = cache.positions(head);
  return {span.begin(), span.end()};
}

// Keys, values and positions of every head, to show a throwing call changed nothing.
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
    const auto p = cache.positions(j);
    s.positions.insert(s.positions.end(), p.begin(), p.end());
  }
  return s;
}

// A model: one cache and one policy per layer, driven together.
struct Model {
  std::vector<KVCache<float>> caches;
  std::vector<LaCache<float>> policies;
  KeepPlan plan;
  kvevict::RowMatrixXf keys;
  Positions new_positions;
  std::int64_t next_position = 0;

  Model(LaCacheConfig config, std::int64_t reserve) {
    for (int l = 0; l < config.n_layers; ++l) {
      config.layer = l;
      caches.push_back(make_cache(reserve));
      policies.emplace_back(config);
    }
  }

  int layers() const { return static_cast<int>(caches.size()); }

  // Appends `count` tokens to every layer, then runs one driver per layer.
  void step(std::int64_t count, bool prefill) {
    for (auto& cache : caches) append_tokens(cache, next_position, count, keys, new_positions);
    next_position += count;
    const Observation observation{.n_heads = kv_heads, .attention = {}, .queries = {}, .appended = count,
                                  .prefill = prefill};
    for (int l = 0; l < layers(); ++l) {
      if (prefill) {
        kvevict::compress_prefill(policies[static_cast<std::size_t>(l)], caches[static_cast<std::size_t>(l)],
                                  observation, plan);
      } else {
        kvevict::observe_and_evict(policies[static_cast<std::size_t>(l)], caches[static_cast<std::size_t>(l)],
                                   observation, plan);
      }
    }
  }
};

Positions range(std::int64_t begin, std::int64_t end) {
  Positions out;
  for (std::int64_t p = begin; p < end; ++p) out.push_back(p);
  return out;
}

Positions concat(Positions a, const Positions& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The reference algorithm re-stated on lists of positions, one list per
// layer, following the pseudo-code of the method with the reference's layer
// offset l mod (P - Pa + 1). `sweeps` reports T so callers can skip the
// folded case where kvevict's offset differs.
struct LadderOracle {
  std::int64_t capacity, sinks, layers, pb, pa, cursor;
  bool adjusted = false;
  std::int64_t sweeps = 1;

  static Positions ladder(std::int64_t start, std::int64_t chunk, std::int64_t chunks, std::int64_t stride,
                          std::int64_t offset, std::int64_t pa) {
    Positions out;
    for (std::int64_t j = 0; j < chunks; ++j) {
      for (std::int64_t k = 0; k < pa; ++k) out.push_back(start + offset + chunk * j + stride * k);
    }
    return out;
  }

  static std::int64_t up(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

  // Returns false (and changes nothing) when a pass would reach the newest slot.
  bool step(std::vector<Positions>& per_layer) {
    const auto n = static_cast<std::int64_t>(per_layer[0].size());
    sweeps = 1;
    if (n <= capacity) return true;

    const std::int64_t c_adj = adjusted ? capacity : capacity + (pb - pa) / 2;
    const std::int64_t r = n - c_adj;
    if (r <= 0) {
      capacity = c_adj;
      adjusted = true;
      return true;
    }

    const std::int64_t shed = pb - pa;
    const std::int64_t room = c_adj - cursor - layers;
    const std::int64_t cap = (room / pa) * shed;
    std::vector<Positions> out(per_layer.size());
    std::int64_t next_cursor = 0;
    if (r <= cap) {
      const std::int64_t j = up(r, shed);
      if (cursor + pb * j >= n) return false;
      for (std::size_t l = 0; l < per_layer.size(); ++l) {
        const auto& in = per_layer[l];
        Positions idx = concat(concat(range(0, cursor), ladder(cursor, pb, j, 1, static_cast<std::int64_t>(l) % (pb - pa + 1), pa)),
                               range(cursor + pb * j, n));
        for (auto i : idx) out[l].push_back(in[static_cast<std::size_t>(i)]);
      }
      next_cursor = cursor + j * pa;
    } else {
      const std::int64_t j1 = room / pa;
      const std::int64_t cap1 = ((c_adj - sinks - layers) / pa) * shed;
      const std::int64_t r2 = r - cap;
      const std::int64_t t = up(r2, cap1);
      const std::int64_t pb2 = pb + (t - 1) * (pb - 1);
      const std::int64_t j2 = up(r2, pb2 - pa);
      sweeps = t;
      for (std::size_t l = 0; l < per_layer.size(); ++l) {
        const auto& in = per_layer[l];
        const auto layer = static_cast<std::int64_t>(l);
        Positions first = concat(concat(range(0, cursor), ladder(cursor, pb, j1, 1, layer % (pb - pa + 1), pa)),
                                 range(cursor + pb * j1, n));
        const auto first_size = static_cast<std::int64_t>(first.size());
        if (cursor + pb * j1 >= n || sinks + pb2 * j2 >= first_size) return false;
        Positions idx = concat(concat(range(0, sinks), ladder(sinks, pb2, j2, t, layer % (pb2 - pa + 1), pa)),
                               range(sinks + pb2 * j2, first_size));
        for (auto i : idx) out[l].push_back(in[static_cast<std::size_t>(first[static_cast<std::size_t>(i)])]);
      }
      next_cursor = sinks + j2 * pa;
    }

    per_layer = out;
    capacity = c_adj;
    adjusted = true;
    cursor = next_cursor;
    return true;
  }
};

std::string message_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "(no exception)";
}

}  // namespace

TEST_CASE("LaCache derives the chunk shape", "[lacache]") {
  SECTION("worked example: L 4, span 2, overlap 0") {
    const LaCache<float> policy({.capacity = 12, .sinks = 2, .span = 2, .overlap = 0, .layer = 0, .n_layers = 4});
    CHECK(policy.chunk_size() == 2);
    CHECK(policy.kept_per_chunk() == 1);
    CHECK(policy.shed_per_chunk() == 1);
  }
  SECTION("overlap 1 keeps two of three") {
    const LaCache<float> policy({.capacity = 12, .sinks = 2, .span = 2, .overlap = 1, .layer = 0, .n_layers = 4});
    CHECK(policy.chunk_size() == 3);
    CHECK(policy.kept_per_chunk() == 2);
    CHECK(policy.shed_per_chunk() == 1);
  }
  SECTION("default span for 32 layers is 16") {
    const LaCache<float> policy({.capacity = 256, .layer = 3, .n_layers = 32});
    CHECK(*policy.config().span == 16);
    CHECK(policy.config().sinks == 4);
    CHECK(policy.state_channels() == 0);
    CHECK_FALSE(policy.needs().decode_attention);
    CHECK(policy.needs().prefill_attention_rows == 0);
    CHECK(policy.needs().window_queries == 0);
    CHECK(policy.chunk_size() == 2);
    CHECK(policy.kept_per_chunk() == 1);
  }
  SECTION("five layers: default span 3 halves every chunk") {
    const LaCache<float> policy({.capacity = 64, .layer = 4, .n_layers = 5});
    CHECK(*policy.config().span == 3);
    CHECK(policy.chunk_size() == 2);
    CHECK(policy.kept_per_chunk() == 1);
  }
  SECTION("README setting: span 9, overlap 3, 32 layers") {
    const LaCache<float> policy({.capacity = 875, .sinks = 128, .span = 9, .overlap = 3, .layer = 0, .n_layers = 32});
    CHECK(policy.chunk_size() == 5);
    CHECK(policy.kept_per_chunk() == 2);
    CHECK(policy.shed_per_chunk() == 3);
  }
}

TEST_CASE("LaCache worked example, prefill and decode", "[lacache]") {
  Model model({.capacity = 12, .sinks = 2, .span = 2, .overlap = 0, .layer = 0, .n_layers = 4}, 32);

  // Prefill of 16: r = 4 sheds four chunks of two after the cursor at 2.
  model.step(16, true);
  const Positions even = {0, 1, 2, 4, 6, 8, 10, 11, 12, 13, 14, 15};
  const Positions odd = {0, 1, 3, 5, 7, 9, 10, 11, 12, 13, 14, 15};
  for (int l = 0; l < 4; ++l) {
    INFO("layer " << l);
    CHECK(positions_of(model.caches[static_cast<std::size_t>(l)], 0) == (l % 2 == 0 ? even : odd));
    CHECK(positions_of(model.caches[static_cast<std::size_t>(l)], 1) == (l % 2 == 0 ? even : odd));
    CHECK(model.policies[static_cast<std::size_t>(l)].cursor() == 6);
  }

  struct Row {
    std::int64_t cursor;
    Positions even;
    Positions odd;
  };
  const std::vector<Row> table = {
      {7, {0, 1, 2, 4, 6, 8, 10, 12, 13, 14, 15, 16}, {0, 1, 3, 5, 7, 9, 11, 12, 13, 14, 15, 16}},
      {8, {0, 1, 2, 4, 6, 8, 10, 12, 14, 15, 16, 17}, {0, 1, 3, 5, 7, 9, 11, 13, 14, 15, 16, 17}},
      // The sweep is full (room 12 - 8 - 4 = 0): the chunk right after the
      // leading tokens is thinned again and the cursor restarts at 3.
      {3, {0, 1, 2, 6, 8, 10, 12, 14, 15, 16, 17, 18}, {0, 1, 5, 7, 9, 11, 13, 14, 15, 16, 17, 18}},
      {4, {0, 1, 2, 6, 10, 12, 14, 15, 16, 17, 18, 19}, {0, 1, 5, 9, 11, 13, 14, 15, 16, 17, 18, 19}},
  };
  for (std::size_t step = 0; step < table.size(); ++step) {
    model.step(1, false);
    for (int l = 0; l < 4; ++l) {
      INFO("decode step " << step << ", layer " << l);
      const auto& cache = model.caches[static_cast<std::size_t>(l)];
      CHECK(positions_of(cache, 0) == (l % 2 == 0 ? table[step].even : table[step].odd));
      CHECK(positions_of(cache, 1) == positions_of(cache, 0));
      CHECK(model.policies[static_cast<std::size_t>(l)].cursor() == table[step].cursor);
    }
  }
}

TEST_CASE("LaCache overlap example keeps two of three", "[lacache]") {
  Model model({.capacity = 12, .sinks = 2, .span = 2, .overlap = 1, .layer = 0, .n_layers = 4}, 32);
  model.step(14, true);
  CHECK(positions_of(model.caches[0], 0) == Positions{0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 13});
  CHECK(positions_of(model.caches[1], 0) == Positions{0, 1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13});
  // Offsets repeat every R + 1 = 2 layers.
  CHECK(positions_of(model.caches[2], 0) == positions_of(model.caches[0], 0));
  CHECK(positions_of(model.caches[3], 0) == positions_of(model.caches[1], 0));
  CHECK(model.policies[0].cursor() == 6);
}

TEST_CASE("LaCache matches the reference algorithm", "[lacache]") {
  std::mt19937 rng(20250714);
  int configurations = 0;
  int start_overs = 0;
  int folded = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int layers = std::uniform_int_distribution<int>(2, 10)(rng);
    const std::int64_t span = std::uniform_int_distribution<std::int64_t>(1, layers - 1)(rng);
    const std::int64_t overlap = std::uniform_int_distribution<std::int64_t>(0, span - 1)(rng);
    const std::int64_t sinks = std::uniform_int_distribution<std::int64_t>(0, 5)(rng);
    const std::int64_t step_layers = span - overlap;
    const std::int64_t pb = 1 + LadderOracle::up(std::max<std::int64_t>(layers - span, 0), step_layers);
    const std::int64_t pa = std::min(LadderOracle::up(span, step_layers), pb);
    if (pb - pa < 1) continue;
    const std::int64_t capacity =
        sinks + layers + pa + std::uniform_int_distribution<std::int64_t>(0, 24)(rng);
    ++configurations;

    const LaCacheConfig config{.capacity = capacity, .sinks = sinks, .span = span, .overlap = overlap,
                               .layer = 0, .n_layers = layers};
    Model model(config, 4 * capacity);
    LadderOracle oracle{capacity, sinks, layers, pb, pa, sinks};
    std::vector<Positions> expected(static_cast<std::size_t>(layers));

    for (int call = 0; call < 60; ++call) {
      const std::int64_t count =
          call == 0 ? std::uniform_int_distribution<std::int64_t>(1, 3 * capacity)(rng)
                    : std::uniform_int_distribution<std::int64_t>(1, call % 7 == 0 ? capacity : 3)(rng);
      for (auto& list : expected) {
        for (std::int64_t p = 0; p < count; ++p) list.push_back(model.next_position + p);
      }
      const std::int64_t cursor_before = oracle.cursor;
      const bool fits = oracle.step(expected);
      if (!fits) {
        // The oracle refused; kvevict must throw and leave every layer as it was.
        for (auto& list : expected) list.resize(list.size() - static_cast<std::size_t>(count));
        for (auto& cache : model.caches) append_tokens(cache, model.next_position, count, model.keys, model.new_positions);
        model.next_position += count;
        const Snapshot before = snapshot(model.caches[0]);
        CHECK_THROWS_AS(kvevict::observe_and_evict(model.policies[0], model.caches[0], Observation{}, model.plan),
                        std::length_error);
        CHECK(snapshot(model.caches[0]) == before);
        CHECK(model.policies[0].cursor() == cursor_before);
        break;
      }
      if (oracle.sweeps > 1) ++folded;
      if (oracle.cursor < cursor_before) ++start_overs;
      model.step(count, call == 0);
      // kvevict's folded offset differs from the reference only when T >= 2 and Pa >= 2.
      if (oracle.sweeps > 1 && pa > 1) {
        for (int l = 0; l < layers; ++l) expected[static_cast<std::size_t>(l)] = positions_of(model.caches[static_cast<std::size_t>(l)], 0);
        continue;
      }
      for (int l = 0; l < layers; ++l) {
        INFO("layers " << layers << " span " << span << " overlap " << overlap << " sinks " << sinks
                       << " capacity " << capacity << " call " << call << " layer " << l);
        REQUIRE(positions_of(model.caches[static_cast<std::size_t>(l)], 0) == expected[static_cast<std::size_t>(l)]);
        REQUIRE(model.policies[static_cast<std::size_t>(l)].cursor() == oracle.cursor);
        REQUIRE(model.policies[static_cast<std::size_t>(l)].capacity() == oracle.capacity);
      }
    }
  }
  // The random configurations must reach every branch.
  CHECK(configurations > 100);
  CHECK(start_overs > 100);
  CHECK(folded > 10);
}

TEST_CASE("LaCache layers stay in lockstep", "[lacache]") {
  Model model({.capacity = 48, .sinks = 4, .span = 3, .overlap = 1, .layer = 0, .n_layers = 8}, 128);
  model.step(70, true);
  std::mt19937 rng(7);
  for (int step = 0; step < 2000; ++step) {
    model.step(std::uniform_int_distribution<std::int64_t>(1, 4)(rng), false);
    const auto& first = model.policies[0];
    for (int l = 1; l < model.layers(); ++l) {
      const auto& policy = model.policies[static_cast<std::size_t>(l)];
      REQUIRE(policy.cursor() == first.cursor());
      REQUIRE(policy.capacity() == first.capacity());
      REQUIRE(model.caches[static_cast<std::size_t>(l)].size() == model.caches[0].size());
    }
  }
}

TEST_CASE("LaCache size stays in its band during decoding", "[lacache]") {
  // (L, span, overlap): R = 3 with Pa = 1, and R = 2 with Pa = 2.
  const std::vector<std::array<std::int64_t, 3>> shapes = {{8, 2, 0}, {8, 3, 1}};
  for (const auto& [layers, span, overlap] : shapes) {
    const LaCacheConfig config{.capacity = 40, .sinks = 4, .span = span, .overlap = overlap, .layer = 0,
                               .n_layers = static_cast<int>(layers)};
    Model model(config, 64);
    const std::int64_t shed = model.policies[0].shed_per_chunk();
    INFO("layers " << layers << " span " << span << " overlap " << overlap << " R " << shed);
    model.step(8, true);
    int compactions = 0;
    int start_overs = 0;
    for (int step = 0; step < 10000; ++step) {
      const std::int64_t cursor_before = model.policies[0].cursor();
      const std::int64_t size_before = model.caches[0].size();
      model.step(1, false);
      const std::int64_t capacity = model.policies[0].capacity();
      if (model.caches[0].size() <= size_before) ++compactions;
      if (model.policies[0].cursor() < cursor_before) ++start_overs;
      for (const auto& cache : model.caches) {
        const Positions kept = positions_of(cache, 0);
        REQUIRE(cache.size() <= capacity);
        if (compactions > 0) REQUIRE(cache.size() > capacity - shed);
        for (std::int64_t s = 0; s < 4; ++s) REQUIRE(kept[static_cast<std::size_t>(s)] == s);
        REQUIRE(kept.back() == model.next_position - 1);
        REQUIRE(positions_of(cache, 1) == kept);
      }
    }
    CHECK(model.policies[0].capacity() == 40 + shed / 2);
    // Once the cache first exceeds C (after 33 appends), one compaction per R appends.
    CHECK(compactions >= (10000 - 40) / static_cast<int>(shed));
    CHECK(start_overs > 100);
  }
}

TEST_CASE("LaCache layers cover every thinned token", "[lacache]") {
  int checked = 0;
  for (int layers = 2; layers <= 16; ++layers) {
    for (std::int64_t span = 1; span < layers; ++span) {
      for (std::int64_t overlap = 0; overlap < span; ++overlap) {
        const std::int64_t step_layers = span - overlap;
        const std::int64_t pb = 1 + LadderOracle::up(layers - span, step_layers);
        const std::int64_t pa = std::min(LadderOracle::up(span, step_layers), pb);
        if (pb - pa < 1) continue;
        const std::int64_t sinks = 3;
        const std::int64_t capacity = sinks + layers + 4 * pb;
        Model model({.capacity = capacity, .sinks = sinks, .span = span, .overlap = overlap, .layer = 0,
                     .n_layers = layers},
                    4 * capacity);
        // Shed as much as the first sweep can in one normal step.
        const std::int64_t adjusted = capacity + (pb - pa) / 2;
        const std::int64_t shed = ((adjusted - sinks - layers) / pa) * (pb - pa);
        model.step(adjusted + shed, true);
        const std::int64_t chunks = LadderOracle::up(shed, pb - pa);
        INFO("layers " << layers << " span " << span << " overlap " << overlap);
        REQUIRE(model.policies[0].cursor() == sinks + chunks * pa);

        std::set<std::int64_t> covered;
        for (const auto& cache : model.caches) {
          for (auto p : positions_of(cache, 0)) covered.insert(p);
        }
        // This is the first compaction, so every layer thinned the same
        // tokens; their union must contain every position.
        for (std::int64_t p = 0; p < model.next_position; ++p) REQUIRE(covered.count(p) == 1);
        ++checked;
      }
    }
  }
  CHECK(checked > 100);
}

TEST_CASE("LaCache folded start-overs keep lists valid", "[lacache]") {
  SECTION("5000-token prompt, capacity 256, span 16, 32 layers leaves 244") {
    Model model({.capacity = 256, .sinks = 4, .span = 16, .overlap = 0, .layer = 0, .n_layers = 32}, 5000);
    model.step(5000, true);
    for (const auto& cache : model.caches) {
      CHECK(cache.size() == 244);
      CHECK(positions_of(cache, 0).back() == 4999);
    }
  }
  SECTION("README setting: two folded sweeps, no duplicated slot") {
    // T = 2 and Pa = 2: the reference's offset would keep one tail token twice
    // in layers 7, 15, 23 and 31; KVCache::keep rejects any duplicate.
    Model model({.capacity = 875, .sinks = 128, .span = 9, .overlap = 3, .layer = 0, .n_layers = 32}, 3500);
    model.step(3500, true);
    for (const auto& cache : model.caches) {
      const Positions kept = positions_of(cache, 0);
      REQUIRE(cache.size() == 872);
      CHECK(std::adjacent_find(kept.begin(), kept.end(), [](auto a, auto b) { return a >= b; }) == kept.end());
      // The newest 300 tokens stay dense.
      CHECK(Positions(kept.end() - 300, kept.end()) == range(3200, 3500));
    }
    // The folded chunks of Pb2 = 9 tokens are covered by the 32 layers (T * R + 1 = 7 offsets).
    std::set<std::int64_t> covered;
    for (const auto& cache : model.caches) {
      for (auto p : positions_of(cache, 0)) covered.insert(p);
    }
    CHECK(static_cast<std::int64_t>(covered.size()) > 872);
  }
}

TEST_CASE("LaCache rejects invalid configurations", "[lacache]") {
  const auto message = [](const LaCacheConfig& config) {
    return message_of([&] { LaCache<float> policy(config); });
  };
  CHECK_THAT(message({.capacity = 64, .n_layers = 0}), Catch::Contains("n_layers (0) must be at least 1"));
  CHECK_THAT(message({.capacity = 64, .layer = 4, .n_layers = 4}),
             Catch::Contains("layer (4) must be in [0, n_layers) = [0, 4)"));
  CHECK_THAT(message({.capacity = 0, .n_layers = 4}), Catch::Contains("capacity (0) must be at least 1"));
  CHECK_THAT(message({.capacity = 64, .sinks = -1, .n_layers = 4}), Catch::Contains("sinks (-1)"));
  CHECK_THAT(message({.capacity = 64, .span = 0, .n_layers = 4}), Catch::Contains("span (0) must be at least 1"));
  CHECK_THAT(message({.capacity = 64, .span = 3, .overlap = 3, .n_layers = 8}),
             Catch::Contains("overlap (3) must be in [0, span) = [0, 3)"));
  // span >= L gives Pb = Pa = 1: the reference divides by zero here.
  CHECK_THAT(message({.capacity = 64, .span = 4, .n_layers = 4}), Catch::Contains("nothing can be shed"));
  CHECK_THAT(message({.capacity = 64, .span = 16, .n_layers = 5}), Catch::Contains("Pb = 1"));
  // A single layer has nothing to stagger.
  CHECK_THAT(message({.capacity = 64, .n_layers = 1}), Catch::Contains("nothing can be shed"));
  // C - s - L must be at least Pa.
  CHECK_THAT(message({.capacity = 8, .sinks = 4, .span = 2, .n_layers = 4}),
             Catch::Contains("capacity (8) must be at least sinks + n_layers + Pa (4 + 4 + 1)"));
  CHECK_NOTHROW(LaCache<float>({.capacity = 9, .sinks = 4, .span = 2, .n_layers = 4}));
}

TEST_CASE("LaCache bulk call past the newest tokens throws", "[lacache]") {
  // 20000 tokens with C = 512, s = 4, S = 9, O = 7, L = 24 need T = 50 folded
  // sweeps, and the reference's ladder then drops the newest 159 prompt tokens.
  const LaCacheConfig config{.capacity = 512, .sinks = 4, .span = 9, .overlap = 7, .layer = 5, .n_layers = 24};
  LaCache<float> policy(config);
  REQUIRE(policy.shed_per_chunk() == 4);
  auto cache = make_cache(20000);
  kvevict::RowMatrixXf keys;
  Positions positions;
  append_tokens(cache, 0, 20000, keys, positions);
  KeepPlan plan;

  const Snapshot before = snapshot(cache);
  const std::string text = message_of([&] { kvevict::compress_prefill(policy, cache, Observation{}, plan); });
  CHECK_THROWS_AS(kvevict::compress_prefill(policy, cache, Observation{}, plan), std::length_error);
  CHECK(snapshot(cache) == before);
  CHECK(policy.cursor() == 4);
  CHECK(policy.capacity() == 512);
  CHECK_FALSE(policy.capacity_adjusted());
  CHECK_THAT(text, Catch::Contains("r = 19486"));
  CHECK_THAT(text, Catch::Contains("largest r that fits is "));

  // The largest r named fits, and the next one does not.
  const auto marker = text.find("fits is ") + 8;
  const std::int64_t largest = std::stoll(text.substr(marker));
  INFO("largest r " << largest);
  REQUIRE(largest > 0);
  REQUIRE(largest < 19486);
  const std::int64_t adjusted = 512 + 2;
  for (const std::int64_t shed : {largest, largest + 1}) {
    LaCache<float> fresh(config);
    auto small = make_cache(adjusted + shed);
    append_tokens(small, 0, adjusted + shed, keys, positions);
    if (shed == largest) {
      CHECK_NOTHROW(kvevict::compress_prefill(fresh, small, Observation{}, plan));
      CHECK(positions_of(small, 0).back() == adjusted + shed - 1);
    } else {
      CHECK_THROWS_AS(kvevict::compress_prefill(fresh, small, Observation{}, plan), std::length_error);
    }
  }
}

TEST_CASE("LaCache decode steps do not allocate once warm", "[lacache]") {
  Model model({.capacity = 40, .sinks = 4, .span = 3, .overlap = 1, .layer = 0, .n_layers = 8}, 64);
  // Single-token appends: the key matrix and position list keep their size.
  model.step(30, true);
  for (int step = 0; step < 500; ++step) model.step(1, false);
  const std::int64_t cursor_before = model.policies[0].cursor();
  const long before = kvevict::test::allocation_count.load();
  for (int step = 0; step < 500; ++step) model.step(1, false);
  const long allocations = kvevict::test::allocation_count.load() - before;
  CHECK(allocations == 0);
  // The measured steps include start-overs.
  CHECK(model.policies[0].cursor() != cursor_before);
}

TEST_CASE("LaCache works on half-precision caches", "[lacache]") {
  KVCache<Eigen::half> cache(CacheConfig{.n_kv_heads = 1, .head_dim = 2, .positions = PositionMode::cache_relative,
                                         .state_channels = 0, .capacity = 16});
  LaCache<Eigen::half> policy({.capacity = 12, .sinks = 2, .span = 2, .overlap = 0, .layer = 1, .n_layers = 4});
  kvevict::RowMatrixXf keys = kvevict::RowMatrixXf::Zero(16, 2);
  const Positions positions = range(0, 16);
  cache.append(keys, keys, positions);
  KeepPlan plan;
  CHECK(kvevict::compress_prefill(policy, cache, Observation{}, plan));
  const auto kept = cache.positions(0);
  CHECK(Positions(kept.begin(), kept.end()) == Positions{0, 1, 3, 5, 7, 9, 10, 11, 12, 13, 14, 15});
}

TEST_CASE("LaCache keeps everything within capacity", "[lacache]") {
  Model model({.capacity = 12, .sinks = 2, .span = 2, .overlap = 0, .layer = 0, .n_layers = 4}, 16);
  model.step(12, true);
  CHECK(positions_of(model.caches[0], 0) == range(0, 12));
  CHECK_FALSE(model.policies[0].capacity_adjusted());
  CHECK_FALSE(model.policies[0].should_evict(model.caches[0], kvevict::Trigger::decode));
  // select on a cache within capacity returns the identity plan.
  KeepPlan plan;
  model.policies[0].select(model.caches[0], Observation{}, plan);
  CHECK(plan.count() == 12);
  CHECK(plan.head(1)[11] == 11);
}
