// Determinism of every policy: the same inputs give bitwise the same kept
// sets on every run and with any thread count. Prefill compression in one
// call and in chunks agrees where the method allows it (StreamingLLM, H2O
// without an eviction in between, Full). A long stream through the real
// llama2.c model keeps KV-cache bytes and resident memory bounded.
#include <catch2/catch.hpp>

#include "examples/llama2c/stream_eval.hpp"
#include "examples/llama2c/text.hpp"
#include "policy_fixtures.hpp"
#include "test_helpers.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#ifdef KVEVICT_OPENMP
#include <omp.h>
#endif

using namespace kvevict;
using namespace kvevict::testing;

namespace {

// Everything one run decides: every plan applied (with the round that applied
// it), the kept positions after each round and the final cache bytes.
struct Trace {
  std::vector<std::int64_t> cut_rounds;
  std::vector<KeepPlan> plans;
  std::vector<std::vector<std::vector<std::int64_t>>> kept;
  CacheSnapshot final_cache;

  friend bool operator==(const Trace&, const Trace&) = default;
};

// Shapes that exercise uneven sizes: 3 query heads on 1 KV head with an odd
// head_dim (original positions, because RoPE needs an even head_dim), and
// 8 query heads on 2 KV heads in cache_relative mode.
struct RunCase {
  const char* name;
  Shape shape;
  PositionMode mode;
  std::int64_t prompt;
  std::int64_t decode_steps;
};

const RunCase kRunCases[] = {
    {"3 heads on 1 KV head, head_dim 7", {3, 1, 7}, PositionMode::original, 13, 27},
    {"8 heads on 2 KV heads, head_dim 16", {8, 2, 16}, PositionMode::cache_relative, 21, 30},
};

PolicySetup setup_for(const RunCase& run_case) {
  PolicySetup setup;
  setup.shape = run_case.shape;
  setup.budget = 9;
  setup.sinks = 2;
  setup.window = 5;
  setup.slack = 2;
  setup.layer = 1;
  setup.n_layers = 4;
  return setup;
}

// Runs a prompt (in the adapter's prefill chunks) and then single-token
// decode steps from a fixed seed, recording every decision.
template <class Adapter>
Trace run_once(const RunCase& run_case) {
  const PolicySetup setup = setup_for(run_case);
  EngineOptions options;
  options.mode = run_case.mode;
  options.seed = 23;
  auto policy = Adapter::template make<float>(setup);
  Engine<float> engine(setup.shape, policy.needs(), policy.state_channels(), options);
  KeepPlan plan;
  Trace trace;
  std::int64_t round = 0;
  const auto record = [&](bool cut) {
    if (cut) {
      trace.cut_rounds.push_back(round);
      trace.plans.push_back(plan);
    }
    trace.kept.push_back(kept_positions(engine.cache()));
    ++round;
  };

  const std::int64_t chunk = Adapter::prefill_chunk(setup);
  for (std::int64_t seen = 0; seen < run_case.prompt;) {
    const std::int64_t count = chunk > 0 ? std::min(chunk, run_case.prompt - seen) : run_case.prompt;
    engine.append(count);
    record(compress_prefill(policy, engine.cache(), engine.observation(true), plan));
    seen += count;
  }
  for (std::int64_t step = 0; step < run_case.decode_steps; ++step) {
    engine.append(1);
    record(observe_and_evict(policy, engine.cache(), engine.observation(false), plan));
  }
  trace.final_cache = snapshot(engine.cache());
  return trace;
}

// Sets the thread count of OpenMP and of Eigen's matrix products.
void set_threads([[maybe_unused]] int threads) {
#ifdef KVEVICT_OPENMP
  omp_set_num_threads(threads);
  Eigen::setNbThreads(threads);
#endif
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("100 runs keep bitwise identical sets", "[determinism]", AllAdapters) {
  INFO("policy " << TestType::name);
  for (const RunCase& run_case : kRunCases) {
    INFO("case " << run_case.name);
    const Trace first = run_once<TestType>(run_case);
    // A run that never cuts would compare nothing but identity plans.
    if (TestType::evicts) REQUIRE_FALSE(first.plans.empty());
    for (int run = 1; run < 100; ++run) {
      INFO("run " << run + 1);
      REQUIRE(run_once<TestType>(run_case) == first);
    }
  }
}

// NOTE: the library has no OpenMP regions of its own yet, and Eigen splits
// only large matrix products across threads, so with these small shapes the
// runs at different thread counts mostly take the same path.
TEMPLATE_LIST_TEST_CASE("thread counts keep bitwise identical sets", "[determinism][threads]", AllAdapters) {
#ifndef KVEVICT_OPENMP
  WARN("threading is off in this build (configure with -DKVEVICT_OPENMP=ON to compare thread counts); "
       "the single-threaded result is checked against itself only");
#endif
  INFO("policy " << TestType::name);
  for (const RunCase& run_case : kRunCases) {
    INFO("case " << run_case.name);
    set_threads(1);
    const Trace single = run_once<TestType>(run_case);
    for (const int threads : {2, 4, 7}) {
      INFO("threads " << threads);
      set_threads(threads);
      for (int run = 0; run < 10; ++run) REQUIRE(run_once<TestType>(run_case) == single);
    }
    set_threads(1);
  }
}

// ---------------------------------------------------------------------------
// Prefill in one call and in chunks.
//
// Where chunked compression is a different method, and so is not compared:
//  - TOVA ranks by the attention row of the newest query. Cutting after a
//    chunk uses that chunk's last query, so it can evict tokens that a later
//    query of the prompt attends to most.
//  - SnapKV and ReST-KV score with the last `window` queries of the whole
//    prompt (the scores need the final window); compressing after each chunk
//    with that chunk's last queries scores different tokens with different
//    votes.
//  - SinkCLIP's prefill chooses its sinks from the last observation_window
//    rows and decays its scores once per row, so the chunk boundaries change
//    both the sink set and the decayed sums.
//  - LaCache's ladder depends on how many tokens one call sheds: a bulk call
//    folds several sweeps into one pass, while chunks thin sweep by sweep, so
//    the positions kept differ by design.

namespace {

constexpr int kKvHeads = 2;
constexpr int kHeads = 4;
constexpr int kHeadDim = 4;
constexpr std::int64_t kPromptTokens = 20;

// Keys and values of the 20 prompt tokens, [kKvHeads * 20, d] head-major, the
// same for every way of splitting the prompt.
struct Prompt {
  RowMatrixXf keys;
  RowMatrixXf values;

  Prompt() {
    test::Random random(41);
    keys = random.matrix(kKvHeads * kPromptTokens, kHeadDim);
    values = random.matrix(kKvHeads * kPromptTokens, kHeadDim);
  }

  // Appends prompt tokens [first, first + count) to `cache`.
  void append(KVCache<float>& cache, std::int64_t first, std::int64_t count) const {
    RowMatrixXf chunk_keys(kKvHeads * count, kHeadDim);
    RowMatrixXf chunk_values(kKvHeads * count, kHeadDim);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
    for (int j = 0; j < kKvHeads; ++j) {
      for (std::int64_t c = 0; c < count; ++c) {
        chunk_keys.row(j * count + c) = keys.row(j * kPromptTokens + first + c);
        chunk_values.row(j * count + c) = values.row(j * kPromptTokens + first + c);
      }
    }
    for (std::int64_t c = 0; c < count; ++c) positions[static_cast<std::size_t>(c)] = first + c;
    cache.append(chunk_keys, chunk_values, positions);
  }
};

KVCache<float> prompt_cache(int state_channels) {
  return KVCache<float>({.n_kv_heads = kKvHeads, .head_dim = kHeadDim, .state_channels = state_channels});
}

// Drives the prompt in chunks of the given sizes: the first chunk through
// compress_prefill, the later ones through observe_and_evict, as an engine
// that prefills and then appends does. Returns the cache.
template <class Policy, class Observe>
KVCache<float> run_chunks(Policy& policy, const std::vector<std::int64_t>& chunks, Observe&& observation_for) {
  const Prompt prompt;
  KVCache<float> cache = prompt_cache(policy.state_channels());
  KeepPlan plan;
  std::int64_t first = 0;
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    prompt.append(cache, first, chunks[i]);
    const Observation observation = observation_for(first, chunks[i], cache.size());
    if (i == 0) {
      compress_prefill(policy, cache, observation, plan);
    } else {
      observe_and_evict(policy, cache, observation, plan);
    }
    first += chunks[i];
  }
  return cache;
}

const std::vector<std::vector<std::int64_t>> kSplits = {
    {20}, {13, 7}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {5, 5, 5, 5}};

std::string describe(const std::vector<std::int64_t>& chunks) {
  std::string text;
  for (const std::int64_t c : chunks) text += (text.empty() ? "" : " + ") + std::to_string(c);
  return text;
}

// Prompt attention rows with dyadic probabilities: query q of the prompt
// pays k / 256 to each token t <= q, with positive integers k summing to 256.
// Sums of up to 20 such values are exact in float, so one pass and several
// passes accumulate bitwise the same totals.
class DyadicAttention {
 public:
  DyadicAttention() : rows_(static_cast<std::size_t>(kHeads * kPromptTokens * kPromptTokens), 0.0f) {
    test::Random random(43);
    for (int h = 0; h < kHeads; ++h) {
      for (std::int64_t q = 0; q < kPromptTokens; ++q) {
        std::vector<int> parts(static_cast<std::size_t>(q + 1), 1);
        for (std::int64_t left = 256 - (q + 1); left > 0; --left) ++parts[static_cast<std::size_t>(random.integer(0, q))];
        for (std::int64_t t = 0; t <= q; ++t) at(h, q, t) = static_cast<float>(parts[static_cast<std::size_t>(t)]) / 256.0f;
      }
    }
  }

  // The rows of prompt queries [first, first + count) over the first `n`
  // tokens, [kHeads, count, n].
  Observation observation(std::int64_t first, std::int64_t count, std::int64_t n) {
    view_.assign(static_cast<std::size_t>(kHeads * count * n), 0.0f);
    for (int h = 0; h < kHeads; ++h) {
      for (std::int64_t i = 0; i < count; ++i) {
        for (std::int64_t t = 0; t < n; ++t) {
          view_[static_cast<std::size_t>((h * count + i) * n + t)] = at(h, first + i, t);
        }
      }
    }
    Observation result;
    result.n_heads = kHeads;
    result.attention = {view_.data(), kHeads, count, n};
    result.appended = count;
    result.prefill = true;
    return result;
  }

 private:
  float& at(int h, std::int64_t q, std::int64_t t) {
    return rows_[static_cast<std::size_t>((h * kPromptTokens + q) * kPromptTokens + t)];
  }

  std::vector<float> rows_;  // [kHeads, 20, 20], zero above the diagonal
  std::vector<float> view_;
};

}  // namespace

TEST_CASE("StreamingLLM prefill in chunks agrees", "[determinism][chunks]") {
  // A prompt of 20 tokens in one call, as 20 single tokens and as 13 + 7
  // keeps the sinks and the last budget - sinks tokens every time, so a cache
  // filled by a prompt holds as many tokens as one filled by generation.
  for (const auto& [budget, sinks] : {std::pair<std::int64_t, std::int64_t>{8, 2}, {12, 4}}) {
    INFO("budget " << budget << ", sinks " << sinks);
    std::vector<std::int64_t> expected;
    for (std::int64_t p = 0; p < sinks; ++p) expected.push_back(p);
    for (std::int64_t p = kPromptTokens - (budget - sinks); p < kPromptTokens; ++p) expected.push_back(p);

    std::optional<CacheSnapshot> reference;
    for (const auto& chunks : kSplits) {
      INFO("chunks " << describe(chunks));
      StreamingLLM<float> policy({.budget = budget, .sinks = sinks});
      const KVCache<float> cache =
          run_chunks(policy, chunks, [](std::int64_t, std::int64_t, std::int64_t) { return Observation{}; });
      for (int j = 0; j < kKvHeads; ++j) CHECK(kept_positions(cache)[static_cast<std::size_t>(j)] == expected);
      if (!reference) reference = snapshot(cache);
      CHECK(snapshot(cache) == *reference);
    }
  }
}

TEST_CASE("H2O prefill in chunks agrees", "[determinism][chunks]") {
  // The same attention rows in one pass or in several passes add up to the
  // same acc, bitwise (dyadic probabilities make every sum exact), so the
  // final cut keeps the same set when no eviction happens before the last
  // chunk: every split's earlier chunks add up to at most 16 tokens, which
  // fit in the budget of 16.
  const std::vector<std::vector<std::int64_t>> splits = {{20}, {13, 7}, {5, 5, 5, 5}, {16, 4}, {1, 1, 1, 13, 4}};
  for (const bool normalize : {false, true}) {
    INFO("normalize_by_count " << normalize);
    std::optional<CacheSnapshot> reference;
    std::vector<std::int64_t> reference_positions;
    for (const auto& chunks : splits) {
      INFO("chunks " << describe(chunks));
      DyadicAttention attention;
      H2O<float> policy({.budget = 16, .normalize_by_count = normalize});
      const KVCache<float> cache = run_chunks(policy, chunks, [&](std::int64_t first, std::int64_t count,
                                                                  std::int64_t n) {
        return attention.observation(first, count, n);
      });
      REQUIRE(cache.size() == 16);
      if (!reference) {
        reference = snapshot(cache);
        reference_positions = kept_positions(cache)[0];
      }
      CHECK(kept_positions(cache)[0] == reference_positions);
      CHECK(snapshot(cache) == *reference);  // positions, keys, values and acc (and cnt) of every head
    }
  }
}

TEST_CASE("Full prefill in chunks agrees", "[determinism][chunks]") {
  std::optional<CacheSnapshot> reference;
  for (const auto& chunks : kSplits) {
    INFO("chunks " << describe(chunks));
    Full<float> policy;
    const KVCache<float> cache =
        run_chunks(policy, chunks, [](std::int64_t, std::int64_t, std::int64_t) { return Observation{}; });
    REQUIRE(cache.size() == kPromptTokens);
    if (!reference) reference = snapshot(cache);
    CHECK(snapshot(cache) == *reference);
  }
}

// ---------------------------------------------------------------------------
// A long stream through the real model.

TEST_CASE("long stream keeps memory bounded", "[determinism][assets]") {
  // 30,000 tokens of real text through stories260K (trained context 512)
  // with bounded policies at budget 64: after the warm-up, KV-cache bytes
  // never exceed their warm-up peak and resident memory grows by at most 10%.
  const char* root = std::getenv("KVEVICT_ASSETS");
  if (root == nullptr || *root == '\0') {
    WARN("KVEVICT_ASSETS is not set; skipping the long stream through the real model "
         "(set it to the folder holding models/ and data/)");
    return;
  }
  namespace fs = std::filesystem;
  const fs::path checkpoint_path = fs::path(root) / "models/stories260K.bin";
  const fs::path tokenizer_path = fs::path(root) / "models/tok512.bin";
  const fs::path text_path = fs::path(root) / "data/tinystories_val.txt";
  for (const fs::path& path : {checkpoint_path, tokenizer_path, text_path}) {
    INFO("KVEVICT_ASSETS is set but " << path << " is missing");
    REQUIRE(fs::exists(path));
  }

  llama2c::Model model(llama2c::load_checkpoint(checkpoint_path));
  const auto tokenizer = llama2c::Tokenizer::load(tokenizer_path, model.config().vocab_size);
  const std::vector<int> text_ids = llama2c::load_token_ids(text_path, tokenizer);
  REQUIRE(text_ids.size() >= 2);
  constexpr std::int64_t tokens = 30000;
  std::vector<int> ids;
  while (static_cast<std::int64_t>(ids.size()) < tokens) {
    const auto take = std::min(text_ids.size(), static_cast<std::size_t>(tokens) - ids.size());
    ids.insert(ids.end(), text_ids.begin(), text_ids.begin() + static_cast<std::ptrdiff_t>(take));
  }

  for (const char* name : {"streaming_llm", "h2o"}) {
    INFO("policy " << name);
    llama2c::StreamSettings settings;
    settings.policy.name = name;
    settings.policy.budget = 64;
    settings.tokens = tokens;
    settings.error_every = 0;  // the attention-error reference cache is not under test
    const llama2c::StreamResult result = llama2c::run_stream(model, ids, settings, {});

    REQUIRE(result.tokens == tokens);
    CHECK(std::isfinite(result.perplexity));
    CHECK(result.kv_bytes_peak_warmup > 0);
    CHECK(result.kv_bytes_peak_after_warmup <= result.kv_bytes_peak_warmup);
    CHECK(result.kv_bytes_end <= result.kv_bytes_peak_warmup);
    REQUIRE(result.rss_after_warmup > 0);
    INFO("resident memory after warm-up " << result.rss_after_warmup << " bytes, at the end " << result.rss_end);
    CHECK(static_cast<double>(result.rss_end) <= 1.10 * static_cast<double>(result.rss_after_warmup));
  }
}
