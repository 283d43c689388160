// Decode-time cost of each policy next to one decode attention step over the
// same cache, and the heap allocations per step after warm-up.
//
// Every benchmark runs an engine loop at budget 1024 (window or recent 32):
// per step it appends one token (random keys and values), runs the decode
// attention of the new query for all 32 query heads in Eigen (logits,
// softmax, weighted values), then calls the policy as an engine would:
// QueryWindow::push for the window scorers, then observe_and_evict (observe,
// and select plus KVCache::keep once size() > budget + slack).
//
// Reported per step (thread CPU time, because the machine is shared):
//   policy_us     the policy's part: push, observe, select and keep,
//                 amortised over the compactions; also the benchmark time
//   attention_us  the decode attention step
//   overhead_pct  100 * policy_us / attention_us
//   allocs_per_step, compactions_per_step   counted in the policy's part
// The append is the engine's and is not counted for any policy.
//
// Decode-time policies (H2O, TOVA, StreamingLLM, SinkCLIP) run with slack 0
// (evict one token per step) and slack 128; LaCache sheds its own step size.
// SnapKV and ReST-KV re-score with the last 32 queries every slack + 1
// steps, slack 32, 128 (their default) and 512. Measured steps are whole
// compaction cycles, after a warm-up that reaches the steady state (for
// LaCache, past its first start-over).
#include "allocation_counter.hpp"
#include "bench_support.hpp"

#include "kvevict/policies/h2o.hpp"
#include "kvevict/policies/lacache.hpp"
#include "kvevict/policies/restkv.hpp"
#include "kvevict/policies/sinkclip.hpp"
#include "kvevict/policies/snapkv.hpp"
#include "kvevict/policies/streaming_llm.hpp"
#include "kvevict/policies/tova.hpp"

#include <benchmark/benchmark.h>

#include <time.h>

#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using namespace kvevict_bench;
using kvevict::KeepPlan;
using kvevict::Observation;
using kvevict::RowMatrixXf;

const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

// CPU time of the calling thread in seconds.
double thread_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

// One decode attention step of every query head over the whole cache:
// P = softmax(scale * q K^T) per head, output = P V. All buffers are sized
// for the cache capacity up front. For half storage the keys and values of
// each KV head are converted to float first (Eigen has no fast half GEMM),
// which a half attention kernel pays in some form too.
template <class Scalar>
class DecodeAttention {
 public:
  explicit DecodeAttention(std::int64_t capacity)
      : probabilities_(static_cast<std::size_t>(n_heads) * static_cast<std::size_t>(capacity)),
        output_(n_heads, head_dim) {
    if constexpr (!std::is_same_v<Scalar, float>) {
      keys_.resize(capacity, head_dim);
      values_.resize(capacity, head_dim);
    }
  }

  // Attention rows [n_heads, 1, size()] of the last run.
  kvevict::Tensor3View rows(std::int64_t n) const { return {probabilities_.data(), n_heads, 1, n}; }

  // query: [n_heads * head_dim].
  void run(const kvevict::KVCache<Scalar>& cache, const float* query) {
    const std::int64_t n = cache.size();
    Eigen::Map<RowMatrixXf> probabilities(probabilities_.data(), n_heads, n);
    for (int j = 0; j < n_kv_heads; ++j) {
      const Eigen::Map<const RowMatrixXf> queries(query + static_cast<std::ptrdiff_t>(j) * group_size * head_dim,
                                                  group_size, head_dim);
      auto rows = probabilities.middleRows(j * group_size, group_size);
      if constexpr (std::is_same_v<Scalar, float>) {
        attend(queries, cache.keys(j), cache.values(j), rows, j);
      } else {
        auto keys = keys_.topRows(n);
        auto values = values_.topRows(n);
        keys = cache.keys(j).template cast<float>();
        values = cache.values(j).template cast<float>();
        attend(queries, keys, values, rows, j);
      }
    }
    benchmark::DoNotOptimize(output_.data());
  }

 private:
  template <class Keys, class Values, class Rows>
  void attend(const Eigen::Map<const RowMatrixXf>& queries, const Keys& keys, const Values& values, Rows& rows,
              int j) {
    // One matrix-vector product per query head: with 4 queries per KV head,
    // Eigen's GEMM spends more time packing the keys than multiplying.
    for (Eigen::Index r = 0; r < rows.rows(); ++r) {
      rows.row(r).transpose().noalias() = softmax_scale * (keys * queries.row(r).transpose());
      auto row = rows.row(r).array();
      row = (row - row.maxCoeff()).exp();
      row /= row.sum();
      output_.row(j * group_size + r).transpose().noalias() = values.transpose() * rows.row(r).transpose();
    }
  }

  std::vector<float> probabilities_;  // [n_heads, capacity], used as [n_heads, size()]
  RowMatrixXf output_;                // [n_heads, head_dim]
  RowMatrixXf keys_;                  // [capacity, head_dim] float copies (half storage only)
  RowMatrixXf values_;
};

// Random tokens the loop cycles through: keys and values [n_kv_heads,
// head_dim] and queries [n_heads * head_dim] per token.
struct TokenPool {
  static constexpr int size = 64;
  std::vector<RowMatrixXf> keys;
  std::vector<RowMatrixXf> values;
  std::vector<std::vector<float>> queries;

  TokenPool() {
    for (int i = 0; i < size; ++i) {
      RowMatrixXf key(n_kv_heads, head_dim);
      RowMatrixXf value(n_kv_heads, head_dim);
      fill_centred(key.data(), key.size(), 1000 + static_cast<std::uint64_t>(i));
      fill_centred(value.data(), value.size(), 2000 + static_cast<std::uint64_t>(i));
      std::vector<float> query(static_cast<std::size_t>(n_heads) * head_dim);
      fill_centred(query.data(), static_cast<std::int64_t>(query.size()), 3000 + static_cast<std::uint64_t>(i));
      keys.push_back(std::move(key));
      values.push_back(std::move(value));
      queries.push_back(std::move(query));
    }
  }
};

const TokenPool& token_pool() {
  static const TokenPool pool;
  return pool;
}

// Rules for passing window queries to a policy.
enum class QueryUse {
  none,         // the policy reads no queries
  on_eviction,  // only in steps that compact (SnapKV validates them when present)
  over_budget,  // in every step with size() > budget (ReST-KV's observe requires them then)
};

// The engine loop of one policy: cache, policy, attention buffers, the
// query ring buffer, and the step counter.
template <class Scalar, class Policy>
struct DecodeLoop {
  Policy policy;
  std::unique_ptr<kvevict::KVCache<Scalar>> cache;
  DecodeAttention<Scalar> attention;
  kvevict::QueryWindow recent_queries;
  KeepPlan plan;
  QueryUse query_use;
  std::int64_t step = 0;
  std::vector<std::int64_t> position{0};

  // Totals of the policy's part, for one measured run.
  double policy_seconds = 0.0;
  double attention_seconds = 0.0;
  std::uint64_t allocations = 0;
  std::int64_t compactions = 0;

  DecodeLoop(Policy p, std::int64_t capacity, QueryUse use)
      : policy(std::move(p)),
        cache(make_cache<Scalar>(budget, policy.state_channels(), capacity - budget)),
        attention(capacity),
        recent_queries(n_heads, static_cast<int>(kvevict_bench::window), head_dim),
        query_use(use) {
    const auto& pool = token_pool();
    for (std::int64_t i = 0; i < kvevict_bench::window; ++i) {
      recent_queries.push(pool.queries[static_cast<std::size_t>(i)]);
    }
    if (query_use != QueryUse::none) {
      // The window scorers see the prompt once (ReST-KV caches v^T G v of
      // every slot); the attention-row policies start with zero state.
      Observation first;
      first.n_heads = n_heads;
      first.appended = cache->size();
      first.queries = recent_queries.view();
      policy.observe(*cache, first);
    }
  }

  void reset_totals() {
    policy_seconds = 0.0;
    attention_seconds = 0.0;
    allocations = 0;
    compactions = 0;
  }

  // One decode step; returns the policy's thread CPU seconds.
  double run_step() {
    const auto& pool = token_pool();
    const auto token = static_cast<std::size_t>(step % TokenPool::size);
    position[0] = cache->next_position();
    cache->append(pool.keys[token], pool.values[token], position);
    const float* query = pool.queries[token].data();

    const double attention_start = thread_seconds();
    attention.run(*cache, query);
    const double attention_end = thread_seconds();

    const std::uint64_t allocations_before = allocation_count();
    const double policy_start = thread_seconds();
    Observation observation;
    observation.n_heads = n_heads;
    observation.attention = attention.rows(cache->size());
    observation.appended = 1;
    if (query_use != QueryUse::none) {
      recent_queries.push(std::span<const float>(query, static_cast<std::size_t>(n_heads) * head_dim));
      const bool pass_queries = query_use == QueryUse::over_budget
                                    ? cache->size() > budget
                                    : policy.should_evict(*cache, kvevict::Trigger::decode);
      if (pass_queries) observation.queries = recent_queries.view();
    }
    const bool compacted = kvevict::observe_and_evict(policy, *cache, observation, plan);
    const double policy_end = thread_seconds();
    allocations += allocation_count() - allocations_before;

    ++step;
    compactions += compacted ? 1 : 0;
    attention_seconds += attention_end - attention_start;
    policy_seconds += policy_end - policy_start;
    return policy_end - policy_start;
  }
};

struct LoopShape {
  std::int64_t slack = 0;     // capacity is budget + slack + 1
  std::int64_t warmup = 0;    // steps before measuring (first repetition only)
  std::int64_t measured = 0;  // steps per repetition, whole compaction cycles
};

LoopShape loop_shape(std::int64_t slack, std::int64_t minimum_warmup = 0) {
  const std::int64_t cycle = slack + 1;
  const std::int64_t cycles = std::max<std::int64_t>(2, (512 + cycle - 1) / cycle);
  return {.slack = slack, .warmup = std::max(3 * cycle + 64, minimum_warmup), .measured = cycles * cycle};
}

template <class Scalar, class Policy>
void run_decode(benchmark::State& state, const std::string& key, std::function<Policy()> make_policy,
                LoopShape shape, QueryUse use) {
  using Loop = DecodeLoop<Scalar, Policy>;
  bool fresh = false;
  auto& loop = fixture_slot().get<Loop>(key, [&] {
    fresh = true;
    return std::make_unique<Loop>(make_policy(), budget + shape.slack + 64, use);
  });
  if (fresh) {
    for (std::int64_t i = 0; i < shape.warmup; ++i) loop.run_step();
  }
  loop.reset_totals();
  for (auto _ : state) state.SetIterationTime(loop.run_step());

  const auto steps = static_cast<double>(state.iterations());
  state.counters["policy_us"] = 1e6 * loop.policy_seconds / steps;
  state.counters["attention_us"] = 1e6 * loop.attention_seconds / steps;
  state.counters["overhead_pct"] = 100.0 * loop.policy_seconds / loop.attention_seconds;
  state.counters["allocs_per_step"] = static_cast<double>(loop.allocations) / steps;
  state.counters["compactions_per_step"] = static_cast<double>(loop.compactions) / steps;
  state.counters["cache_size"] = static_cast<double>(loop.cache->size());
  set_processed(state, 1, 0.0);
}

// W_o [model_width, n_heads * head_dim] for ReST-KV.
const RowMatrixXf& output_projection() {
  static const RowMatrixXf w_o = [] {
    RowMatrixXf matrix(model_width, n_heads * head_dim);
    fill_centred(matrix.data(), matrix.size(), 23);
    matrix /= std::sqrt(static_cast<float>(model_width));
    return matrix;
  }();
  return w_o;
}

template <class Scalar, class Policy>
void add(const std::string& subject, std::int64_t slack, std::function<Policy()> make_policy, LoopShape shape,
         QueryUse use) {
  const std::string name = benchmark_name<Scalar>("BM_" + subject + "_Decode");
  const std::string key = name + "/slack:" + std::to_string(slack);
  benchmark::RegisterBenchmark(
      name.c_str(),
      [key, make_policy, shape, use](benchmark::State& state) {
        run_decode<Scalar, Policy>(state, key, make_policy, shape, use);
      })
      ->Args({budget, slack})
      ->ArgNames({"budget", "slack"})
      ->Iterations(shape.measured)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

template <class Scalar>
void register_decode() {
  for (const std::int64_t slack : {std::int64_t{0}, std::int64_t{128}}) {
    const LoopShape shape = loop_shape(slack);
    add<Scalar, kvevict::H2O<Scalar>>(
        "H2O", slack, [slack] { return kvevict::H2O<Scalar>({.budget = budget, .slack = slack}); }, shape,
        QueryUse::none);
    add<Scalar, kvevict::TOVA<Scalar>>(
        "TOVA", slack, [slack] { return kvevict::TOVA<Scalar>({.budget = budget, .slack = slack}); }, shape,
        QueryUse::none);
    add<Scalar, kvevict::StreamingLLM<Scalar>>(
        "StreamingLLM", slack,
        [slack] { return kvevict::StreamingLLM<Scalar>({.budget = budget, .slack = slack}); }, shape,
        QueryUse::none);
    add<Scalar, kvevict::SinkCLIP<Scalar>>(
        "SinkCLIP", slack, [slack] { return kvevict::SinkCLIP<Scalar>({.budget = budget, .slack = slack}); },
        shape, QueryUse::none);
  }
  // LaCache (32 layers, layer 0, default span 16) sheds R = 1 token per
  // step; its first start-over comes after about capacity - sinks - layers
  // steps, so the warm-up runs past it.
  add<Scalar, kvevict::LaCache<Scalar>>(
      "LaCache", 0, [] { return kvevict::LaCache<Scalar>({.capacity = budget, .layer = 0, .n_layers = 32}); },
      loop_shape(0, 1200), QueryUse::none);

  for (const std::int64_t slack : {std::int64_t{32}, std::int64_t{128}, std::int64_t{512}}) {
    const LoopShape shape = loop_shape(slack);
    add<Scalar, kvevict::SnapKV<Scalar>>(
        "SnapKV", slack,
        [slack] { return kvevict::SnapKV<Scalar>({.budget = budget, .window = window, .slack = slack}); }, shape,
        QueryUse::on_eviction);
    add<Scalar, kvevict::RestKV<Scalar>>(
        "RestKV", slack,
        [slack] {
          kvevict::RestKVConfig config{.budget = budget,
                                       .window = window,
                                       .n_heads = n_heads,
                                       .n_kv_heads = n_kv_heads,
                                       .head_dim = head_dim};
          config.slack = slack;
          return kvevict::RestKV<Scalar>(config, output_projection());
        },
        shape, QueryUse::over_budget);
  }
}

// The decode attention step alone, at size budget + 1 (the size every
// slack-0 step attends over).
template <class Scalar>
void attention_step(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  auto cache = make_cache<Scalar>(n, 0);
  DecodeAttention<Scalar> attention(n);
  const float* query = token_pool().queries[0].data();
  attention.run(*cache, query);
  for (auto _ : state) {
    attention.run(*cache, query);
    benchmark::ClobberMemory();
  }
  set_processed(state, n, cache_bytes<Scalar>(n));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("BM_DecodeAttention_Step<float>", attention_step<float>)
      ->Arg(budget + 1)
      ->ArgNames({"n"})
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("BM_DecodeAttention_Step<half>", attention_step<Eigen::half>)
      ->Arg(budget + 1)
      ->ArgNames({"n"})
      ->Unit(benchmark::kMicrosecond);
  register_decode<float>();
  register_decode<Eigen::half>();
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
