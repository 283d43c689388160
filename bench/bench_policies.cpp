// Selection cost of every policy at cache sizes 1k..512k: one select() call
// that cuts an n-token cache to the budget (1024 tokens per KV head), as at
// the end of a prompt. The per-step observe() of the policies that read the
// newest query's attention row (H2O, TOVA, SinkCLIP) is measured at the same
// sizes, and ReST-KV's observe(), which computes the cached quadratic forms
// v^T G v of every slot (done once per token, when it is appended).
//
// Every policy runs with its defaults, budget 1024, window or recent 32,
// on float and Eigen::half caches in original position mode. The floors
// these numbers are compared with come from bench_kernels.
#include "allocation_counter.hpp"
#include "bench_support.hpp"

#include "kvevict/policies/full.hpp"
#include "kvevict/policies/h2o.hpp"
#include "kvevict/policies/lacache.hpp"
#include "kvevict/policies/restkv.hpp"
#include "kvevict/policies/sinkclip.hpp"
#include "kvevict/policies/snapkv.hpp"
#include "kvevict/policies/streaming_llm.hpp"
#include "kvevict/policies/tova.hpp"

#include <benchmark/benchmark.h>

#include <cmath>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

namespace {

using namespace kvevict_bench;
using kvevict::KeepPlan;
using kvevict::Observation;
using kvevict::RowMatrixXf;

// State channels of the shared cache: the most any policy here uses
// (ReST-KV: g = 4 quadratic forms; SinkCLIP: S, Z, sigma, flag).
constexpr int shared_channels = 4;

// W_o [model_width, n_heads * head_dim], entries of variance 1 / model_width.
const RowMatrixXf& output_projection() {
  static const RowMatrixXf w_o = [] {
    RowMatrixXf matrix(model_width, n_heads * head_dim);
    fill_centred(matrix.data(), matrix.size(), 23);
    matrix /= std::sqrt(static_cast<float>(model_width));
    return matrix;
  }();
  return w_o;
}

kvevict::RestKVConfig restkv_config() {
  return {.budget = budget, .window = window, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim};
}

// Inputs of every policy benchmark of one size and storage type.
template <class Scalar>
struct PolicyData {
  std::int64_t n = 0;
  std::unique_ptr<kvevict::KVCache<Scalar>> cache;
  std::vector<float> queries;     // [n_heads, window, head_dim]
  std::vector<float> decode_row;  // [n_heads, 1, n] attention of the newest query
  std::optional<kvevict::RestKV<Scalar>> restkv;
  bool restkv_observed = false;  // restkv has cached the quadratic forms of this cache
};

template <class Scalar>
std::unique_ptr<PolicyData<Scalar>> make_policy_data(std::int64_t n) {
  auto data = std::make_unique<PolicyData<Scalar>>();
  data->n = n;
  data->cache = make_cache<Scalar>(n, shared_channels);
  data->queries = make_window_queries(7);
  RowMatrixXf rows(n_heads, n);
  fill_probability_rows(rows, 29);
  data->decode_row.assign(rows.data(), rows.data() + rows.size());
  data->restkv.emplace(restkv_config(), output_projection());
  return data;
}

template <class Scalar>
PolicyData<Scalar>& policy_data(std::int64_t n) {
  return fixture_slot().get<PolicyData<Scalar>>(fixture_key<Scalar>("policies", n),
                                                [n] { return make_policy_data<Scalar>(n); });
}

template <class Scalar>
double fixture_bytes(std::int64_t n) {
  const double state = n_kv_heads * shared_channels * static_cast<double>(n) * sizeof(float);
  const double row = n_heads * static_cast<double>(n) * sizeof(float);
  return cache_bytes<Scalar>(n) + state + row;
}

// An observation with neither attention rows nor queries.
Observation empty_observation() {
  Observation observation;
  observation.n_heads = n_heads;
  return observation;
}

Observation window_observation(const std::vector<float>& queries, std::int64_t appended) {
  Observation observation = empty_observation();
  observation.queries = queries_view(queries);
  observation.appended = appended;
  return observation;
}

Observation decode_observation(const std::vector<float>& row, std::int64_t n) {
  Observation observation = empty_observation();
  observation.attention = {row.data(), n_heads, 1, n};
  observation.appended = 1;
  return observation;
}

// Fills state channel `channel` of every KV head with uniform values in
// [low, low + span).
template <class Scalar>
void fill_state(kvevict::KVCache<Scalar>& cache, int channel, float low, float span, std::uint64_t seed) {
  Random random(seed);
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    for (float& value : cache.state(j, channel)) value = low + span * random.uniform();
  }
}

// Runs `body` once untimed when `warm_up` is set (scratch reaches its final
// size), then per iteration; reports tokens, bytes and allocations per call.
template <class Body>
void run_timed(benchmark::State& state, std::int64_t tokens, double bytes, Body&& body, bool warm_up = true) {
  if (warm_up) body();
  const std::uint64_t before = allocation_count();
  for (auto _ : state) body();
  set_allocations(state, allocation_count() - before);
  set_processed(state, tokens, bytes);
}

// select() of a policy whose selection leaves the policy object unchanged.
template <class Scalar, class Policy>
void run_select(benchmark::State& state, Policy& policy, const Observation& observation, double bytes) {
  auto& data = policy_data<Scalar>(state.range(0));
  KeepPlan plan;
  run_timed(state, data.n, bytes, [&] {
    policy.select(*data.cache, observation, plan);
    benchmark::DoNotOptimize(plan.head(0).data());
    benchmark::ClobberMemory();
  });
}

template <class Scalar>
bool prepare(benchmark::State& state, double extra_bytes = 0.0) {
  return require_memory(state, fixture_bytes<Scalar>(state.range(0)) + extra_bytes);
}

// --- decode-row policies ----------------------------------------------------

template <class Scalar>
void h2o_select(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  fill_state(*data.cache, kvevict::H2O<Scalar>::acc_channel, 0.0f, 1.0f, 31);
  kvevict::H2O<Scalar> policy({.budget = budget});
  const double bytes = n_kv_heads * static_cast<double>(data.n) * sizeof(float);
  run_select<Scalar>(state, policy, decode_observation(data.decode_row, data.n), bytes);
}

template <class Scalar>
void h2o_observe(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  kvevict::H2O<Scalar> policy({.budget = budget});
  const Observation observation = decode_observation(data.decode_row, data.n);
  run_timed(state, data.n, static_cast<double>(data.decode_row.size()) * sizeof(float), [&] {
    policy.observe(*data.cache, observation);
    benchmark::ClobberMemory();
  });
}

template <class Scalar>
void tova_select(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  kvevict::TOVA<Scalar> policy({.budget = budget});
  run_select<Scalar>(state, policy, decode_observation(data.decode_row, data.n),
                     static_cast<double>(data.decode_row.size()) * sizeof(float));
}

template <class Scalar>
void tova_observe(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  kvevict::TOVA<Scalar> policy({.budget = budget});
  const Observation observation = decode_observation(data.decode_row, data.n);
  run_timed(state, data.n, static_cast<double>(data.decode_row.size()) * sizeof(float), [&] {
    policy.observe(*data.cache, observation);
    benchmark::ClobberMemory();
  });
}

// SinkCLIP state: S in [0, 1), Z in [1, 2), sigma below the sink
// thresholds, no emergent sinks.
template <class Scalar>
void fill_sinkclip_state(kvevict::KVCache<Scalar>& cache) {
  using Policy = kvevict::SinkCLIP<Scalar>;
  fill_state(cache, Policy::score_channel, 0.0f, 1.0f, 37);
  fill_state(cache, Policy::exposure_channel, 1.0f, 1.0f, 41);
  fill_state(cache, Policy::sink_share_channel, 0.0f, 0.01f, 43);
  fill_state(cache, Policy::emergent_channel, 0.0f, 0.0f, 47);
}

template <class Scalar>
void sinkclip_select(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  fill_sinkclip_state(*data.cache);
  kvevict::SinkCLIP<Scalar> policy({.budget = budget});
  const double bytes = 3.0 * n_kv_heads * static_cast<double>(data.n) * sizeof(float);
  run_select<Scalar>(state, policy, decode_observation(data.decode_row, data.n), bytes);
}

template <class Scalar>
void sinkclip_observe(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  fill_sinkclip_state(*data.cache);
  kvevict::SinkCLIP<Scalar> policy({.budget = budget});
  const Observation observation = decode_observation(data.decode_row, data.n);
  run_timed(state, data.n, static_cast<double>(data.decode_row.size()) * sizeof(float), [&] {
    policy.observe(*data.cache, observation);
    benchmark::ClobberMemory();
  });
}

// --- score-free policies ----------------------------------------------------

template <class Scalar>
void streaming_select(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  kvevict::StreamingLLM<Scalar> policy({.budget = budget});
  run_select<Scalar>(state, policy, empty_observation(), 0.0);
}

template <class Scalar>
void full_select(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  kvevict::Full<Scalar> policy;
  run_select<Scalar>(state, policy, empty_observation(), 0.0);
}

// LaCache changes its cursor in select(), so every call starts from a copy
// of a fresh policy (capacity 1024, 32 layers, layer 0). A cut from n to
// about 1024 in one call needs several folded sweeps; sizes whose ladder
// would reach the newest tokens throw std::length_error and are skipped.
template <class Scalar>
void lacache_select(benchmark::State& state) {
  if (!prepare<Scalar>(state)) return;
  auto& data = policy_data<Scalar>(state.range(0));
  const kvevict::LaCache<Scalar> fresh({.capacity = budget, .layer = 0, .n_layers = 32});
  KeepPlan plan;
  const Observation observation = empty_observation();
  try {
    kvevict::LaCache<Scalar> probe = fresh;
    probe.select(*data.cache, observation, plan);
  } catch (const std::length_error& error) {
    const std::string message = std::string("skipped: LaCache cannot cut this size in one call: ") + error.what();
    state.SkipWithError(message.c_str());
    return;
  }
  run_timed(state, data.n, 0.0, [&] {
    kvevict::LaCache<Scalar> policy = fresh;
    policy.select(*data.cache, observation, plan);
    benchmark::DoNotOptimize(plan.head(0).data());
    benchmark::ClobberMemory();
  });
}

// --- window scorers ---------------------------------------------------------

template <class Scalar>
void snapkv_select(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!prepare<Scalar>(state, group_size * window * static_cast<double>(n) * 4 + static_cast<double>(n) * head_dim * 4)) {
    return;
  }
  auto& data = policy_data<Scalar>(n);
  kvevict::SnapKV<Scalar> policy({.budget = budget, .window = window});
  run_select<Scalar>(state, policy, window_observation(data.queries, 0), cache_bytes<Scalar>(n) / 2);
}

// observe() after reset(): the quadratic forms of all n slots, O(n g d^2)
// per KV head. The policy is left observed for restkv_select.
template <class Scalar>
void restkv_observe(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!prepare<Scalar>(state, 2.0 * static_cast<double>(n) * head_dim * 4)) return;
  auto& data = policy_data<Scalar>(n);
  const Observation observation = window_observation(data.queries, n);
  // No warm-up call: every call starts from reset() and recomputes all n
  // quadratic forms, which takes seconds at 512k.
  run_timed(state, n, cache_bytes<Scalar>(n) / 2, [&] {
    data.restkv->reset();
    data.restkv->observe(*data.cache, observation);
    benchmark::ClobberMemory();
  }, false);
  data.restkv_observed = true;
}

template <class Scalar>
void restkv_select(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!prepare<Scalar>(state, group_size * window * static_cast<double>(n) * 4 + 3.0 * static_cast<double>(n) * head_dim * 4)) {
    return;
  }
  auto& data = policy_data<Scalar>(n);
  const Observation observation = window_observation(data.queries, n);
  if (!data.restkv_observed) {  // restkv_observe was filtered out
    data.restkv->reset();
    data.restkv->observe(*data.cache, observation);
    data.restkv_observed = true;
  }
  run_select<Scalar>(state, *data.restkv, observation, cache_bytes<Scalar>(n));
}

// --- registration -----------------------------------------------------------

template <class Fn>
benchmark::internal::Benchmark* add(const std::string& name, std::int64_t n, Fn&& fn) {
  return benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn))
      ->Arg(n)
      ->ArgNames({"n"})
      ->Unit(benchmark::kMillisecond);
}

template <class Scalar>
void register_policies(std::int64_t n) {
  add(benchmark_name<Scalar>("BM_H2O_Select"), n, h2o_select<Scalar>);
  add(benchmark_name<Scalar>("BM_H2O_Observe"), n, h2o_observe<Scalar>);
  add(benchmark_name<Scalar>("BM_TOVA_Select"), n, tova_select<Scalar>);
  add(benchmark_name<Scalar>("BM_TOVA_Observe"), n, tova_observe<Scalar>);
  add(benchmark_name<Scalar>("BM_SinkCLIP_Select"), n, sinkclip_select<Scalar>);
  add(benchmark_name<Scalar>("BM_SinkCLIP_Observe"), n, sinkclip_observe<Scalar>);
  add(benchmark_name<Scalar>("BM_StreamingLLM_Select"), n, streaming_select<Scalar>);
  add(benchmark_name<Scalar>("BM_Full_Select"), n, full_select<Scalar>);
  add(benchmark_name<Scalar>("BM_LaCache_Select"), n, lacache_select<Scalar>);
  add(benchmark_name<Scalar>("BM_SnapKV_Select"), n, snapkv_select<Scalar>);
  // Seconds per call from 128k on: one repetition there.
  auto* observe = add(benchmark_name<Scalar>("BM_RestKV_Observe"), n, restkv_observe<Scalar>);
  if (n >= 131072) observe->Repetitions(1);
  add(benchmark_name<Scalar>("BM_RestKV_Select"), n, restkv_select<Scalar>);
}

}  // namespace

int main(int argc, char** argv) {
  for (const std::int64_t n : cache_sizes()) {
    register_policies<float>(n);
    register_policies<Eigen::half>(n);
  }
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
