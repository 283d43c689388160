// Kernel micro-benchmarks and the two cost floors, at cache sizes 1k..512k.
//
// Floors (measured in the same run, so ratios do not depend on the machine):
//   BM_Floor_Gemm   one GEMM of the 32 window queries of every query head
//                   against all n keys, in Eigen, float keys: the least work
//                   any scorer that computes window attention does.
//   BM_Floor_Read   one read of every key and value of the cache.
// Kernels on a whole layer (all 32 query heads or all 8 KV heads):
//   window attention, temporal mean and EMA, avg, max and adaptive pooling,
//   top-k selection (select_keep), KVCache::keep compaction.
// Reconstruction scores are measured for one query head (naive W_o V form,
// direct Gram form, cached expanded Gram form), model width 4096.
// Kernels that read only attention rows or scores are storage-independent
// and run once (float); the others run for float and Eigen::half storage.
#include "allocation_counter.hpp"
#include "bench_support.hpp"

#include "kvevict/kernels/reconstruction.hpp"
#include "kvevict/kernels/select.hpp"
#include "kvevict/kernels/spatial.hpp"
#include "kvevict/kernels/temporal.hpp"
#include "kvevict/kernels/window_attention.hpp"

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using namespace kvevict_bench;
using kvevict::RowMatrixXf;

const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

// Inputs of every kernel benchmark of one size and storage type.
template <class Scalar>
struct KernelData {
  std::int64_t n = 0;
  std::unique_ptr<kvevict::KVCache<Scalar>> cache;
  std::vector<float> queries;        // [n_heads, window, head_dim]
  std::vector<RowMatrixXf> groups;   // per KV head: its group's queries [g * window, head_dim]
  RowMatrixXf rows;                  // [g * window, n] window attention of KV head 0's group
  std::vector<float> scores;         // [n] random scores
  std::vector<float> aggregated;     // [P] EMA of query head 0's rows, P = n - window
  Eigen::VectorXf output;            // [head_dim] attention output of query head 0
  RowMatrixXf w_o_head;              // [model_width, head_dim] W_o^0
  Eigen::MatrixXf gram;              // [head_dim, head_dim] W_o^0^T W_o^0
  std::vector<float> cached;         // [P] v_t^T G v_t of KV head 0
};

template <class Scalar>
std::unique_ptr<KernelData<Scalar>> make_kernel_data(std::int64_t n) {
  auto data = std::make_unique<KernelData<Scalar>>();
  data->n = n;
  data->cache = make_cache<Scalar>(n, 0);
  data->queries = make_window_queries(7);
  for (int j = 0; j < n_kv_heads; ++j) {
    RowMatrixXf group(group_size * window, head_dim);
    std::copy_n(data->queries.data() + static_cast<std::size_t>(j) * group.size(), group.size(), group.data());
    data->groups.push_back(std::move(group));
  }

  kvevict::kernels::WindowAttentionWorkspace workspace;
  kvevict::kernels::group_window_attention(*data->cache, 0, queries_view(data->queries), softmax_scale, data->rows,
                                           workspace);

  Random random(11);
  data->scores.resize(static_cast<std::size_t>(n));
  for (auto& score : data->scores) score = random.uniform();

  const std::int64_t past = n - window;
  std::vector<float> weights(static_cast<std::size_t>(window));
  data->aggregated.resize(static_cast<std::size_t>(past));
  kvevict::kernels::temporal_ema(data->rows.topRows(window), past, 0.3f, data->aggregated, weights);
  data->output.resize(head_dim);
  kvevict::kernels::weighted_output(std::span<const float>(data->aggregated), data->cache->values(0), data->output);

  data->w_o_head.resize(model_width, head_dim);
  fill_centred(data->w_o_head.data(), data->w_o_head.size(), 13);
  data->w_o_head /= std::sqrt(static_cast<float>(model_width));
  data->gram = data->w_o_head.transpose() * data->w_o_head;
  data->cached.resize(static_cast<std::size_t>(past));
  kvevict::kernels::quadratic_forms(data->cache->values(0).topRows(past), data->gram, data->cached);
  return data;
}

template <class Scalar>
KernelData<Scalar>& kernel_data(std::int64_t n) {
  return fixture_slot().get<KernelData<Scalar>>(fixture_key<Scalar>("kernels", n),
                                                [n] { return make_kernel_data<Scalar>(n); });
}

// Rough bytes a kernel fixture holds beyond the cache, for the memory check.
template <class Scalar>
double fixture_bytes(std::int64_t n) {
  return cache_bytes<Scalar>(n) + 2.0 * group_size * window * static_cast<double>(n) * sizeof(float) +
         static_cast<double>(n) * head_dim * sizeof(float);
}

// Runs `body` once per iteration and reports tokens, bytes and allocations.
// With `warm_up`, one untimed call first grows scratch storage to its final
// size, so the allocation count is that of a warm call.
template <class Body>
void run_timed(benchmark::State& state, std::int64_t tokens, double bytes, Body&& body, bool warm_up = true) {
  if (warm_up) body();
  const std::uint64_t before = allocation_count();
  for (auto _ : state) body();
  set_allocations(state, allocation_count() - before);
  set_processed(state, tokens, bytes);
}

// --- floors ---------------------------------------------------------------

void floor_gemm(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<float>(n))) return;
  auto& data = kernel_data<float>(n);
  RowMatrixXf logits(group_size * window, n);
  run_timed(state, n, cache_bytes<float>(n) / 2, [&] {
    for (int j = 0; j < n_kv_heads; ++j) {
      logits.noalias() = data.groups[static_cast<std::size_t>(j)] * data.cache->keys(j).transpose();
      benchmark::DoNotOptimize(logits.data());
      benchmark::ClobberMemory();
    }
  });
  const double flops = 2.0 * n_heads * window * static_cast<double>(n) * head_dim;
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// Sums `count` stored values as storage words (a float as itself, a half by
// its 16-bit pattern), so the loop costs a read and no conversion.
template <class Scalar>
float read_words(const Scalar* data, std::int64_t count) {
  if constexpr (std::is_same_v<Scalar, float>) {
    return Eigen::Map<const Eigen::ArrayXf>(data, count).sum();
  } else {
    std::uint32_t sum = 0;
    for (std::int64_t i = 0; i < count; ++i) sum += data[i].x;
    return static_cast<float>(sum);
  }
}

template <class Scalar>
void floor_read(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<Scalar>(n))) return;
  auto& data = kernel_data<Scalar>(n);
  run_timed(state, n, cache_bytes<Scalar>(n), [&] {
    float total = 0.0f;
    for (int j = 0; j < n_kv_heads; ++j) {
      total += read_words(data.cache->keys(j).data(), n * head_dim);
      total += read_words(data.cache->values(j).data(), n * head_dim);
    }
    benchmark::DoNotOptimize(total);
  });
}

// --- window attention -----------------------------------------------------

template <class Scalar>
void window_attention_layer(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<Scalar>(n) + static_cast<double>(n) * head_dim * 4)) return;
  auto& data = kernel_data<Scalar>(n);
  RowMatrixXf attention;
  kvevict::kernels::WindowAttentionWorkspace workspace;
  run_timed(state, n, cache_bytes<Scalar>(n) / 2, [&] {
    for (int j = 0; j < n_kv_heads; ++j) {
      kvevict::kernels::group_window_attention(*data.cache, j, queries_view(data.queries), softmax_scale, attention,
                                               workspace);
      benchmark::DoNotOptimize(attention.data());
      benchmark::ClobberMemory();
    }
  });
}

// --- temporal aggregation -------------------------------------------------

void temporal(benchmark::State& state, kvevict::kernels::TemporalMode mode) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<float>(n))) return;
  auto& data = kernel_data<float>(n);
  const std::int64_t past = n - window;
  std::vector<float> out(static_cast<std::size_t>(past));
  std::vector<float> weights;
  const double bytes = static_cast<double>(n_heads) * window * static_cast<double>(n) * sizeof(float);
  run_timed(state, n, bytes, [&] {
    for (int q = 0; q < n_heads; ++q) {
      const auto rows = data.rows.middleRows((q % group_size) * window, window);
      if (mode == kvevict::kernels::TemporalMode::mean) {
        kvevict::kernels::temporal_mean(rows, past, out, weights);
      } else {
        kvevict::kernels::temporal_ema(rows, past, 0.3f, out, weights);
      }
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
  });
}

// --- spatial pooling ------------------------------------------------------

enum class Pooling { avg, max, adaptive };

void pooling(benchmark::State& state, Pooling kind) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<float>(n))) return;
  auto& data = kernel_data<float>(n);
  const std::int64_t past = n - window;
  const std::span<const float> raw(data.scores.data(), static_cast<std::size_t>(past));
  std::vector<float> out(static_cast<std::size_t>(past));
  std::vector<std::int64_t> scratch;
  const double row_bytes = static_cast<double>(past) * sizeof(float);
  const double bytes = kind == Pooling::adaptive ? n_heads * (row_bytes + window * static_cast<double>(n) * 4)
                                                 : n_heads * row_bytes;
  run_timed(state, n, bytes, [&] {
    for (int q = 0; q < n_heads; ++q) {
      switch (kind) {
        case Pooling::avg:
          kvevict::kernels::avg_pool(raw, 5, out);
          break;
        case Pooling::max:
          kvevict::kernels::max_pool(raw, 5, out, scratch);
          break;
        case Pooling::adaptive: {
          const auto rows = data.rows.middleRows((q % group_size) * window, window);
          const auto kernel = kvevict::kernels::adaptive_kernel(rows, std::min(budget - window, n), 5, 2000.0,
                                                                kvevict::kernels::ShiftRounding::trunc, scratch);
          kvevict::kernels::shifted_avg_pool(raw, kernel.size, kernel.shift, out);
          break;
        }
      }
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
  });
}

// --- reconstruction scores (one query head) ---------------------------------

enum class Reconstruction { naive, direct, gram };

template <class Scalar>
void reconstruction(benchmark::State& state, Reconstruction form) {
  const std::int64_t n = state.range(0);
  const std::int64_t past = n - window;
  // The naive form materialises W_o^q v_t for every token: [P, D] floats.
  const double temporary = form == Reconstruction::naive ? static_cast<double>(past) * model_width * 4
                                                         : static_cast<double>(past) * head_dim * 4;
  if (!require_memory(state, fixture_bytes<Scalar>(n) + temporary)) return;
  auto& data = kernel_data<Scalar>(n);
  std::vector<float> out(static_cast<std::size_t>(past));
  const auto values = data.cache->values(0);
  const std::span<const float> weights(data.aggregated);
  // No warm-up call: these kernels keep no scratch, and the naive form at
  // 512k takes many seconds per call.
  run_timed(state, n, static_cast<double>(past) * head_dim * sizeof(Scalar), [&] {
    switch (form) {
      case Reconstruction::naive:
        kvevict::kernels::reconstruction_scores_naive(weights, values, data.output, data.w_o_head, 1.0f, out);
        break;
      case Reconstruction::direct:
        kvevict::kernels::reconstruction_scores(weights, values, data.output, &data.gram, {}, 1.0f, out);
        break;
      case Reconstruction::gram:
        kvevict::kernels::reconstruction_scores(weights, values, data.output, &data.gram, data.cached, 1.0f, out);
        break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }, false);
}

// --- selection and compaction -----------------------------------------------

void select_top_k(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<float>(n))) return;
  auto& data = kernel_data<float>(n);
  const std::int64_t keep = std::min(budget, n);
  std::vector<std::int64_t> out(static_cast<std::size_t>(keep));
  kvevict::kernels::SelectScratch scratch;
  run_timed(state, n, n_kv_heads * static_cast<double>(n) * sizeof(float), [&] {
    for (int j = 0; j < n_kv_heads; ++j) {
      kvevict::kernels::select_keep(data.scores, n, 0, window, keep, out, scratch);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
  });
}

// Compacts an n-token cache to 1024 slots per KV head chosen by top-k on
// random scores (different per head), then refills it to n tokens outside
// the timed region. keep() moves only the kept rows, so its cost is
// O(budget * head_dim) plus the cache misses of reading rows spread over n.
template <class Scalar>
void cache_keep(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  if (!require_memory(state, fixture_bytes<Scalar>(n))) return;
  auto& data = kernel_data<Scalar>(n);
  auto& cache = *data.cache;
  const std::int64_t keep = std::min(budget, n);
  kvevict::KeepPlan plan(n_kv_heads, keep);
  kvevict::kernels::SelectScratch scratch;
  std::vector<float> scores(static_cast<std::size_t>(n));
  for (int j = 0; j < n_kv_heads; ++j) {
    Random random(100 + static_cast<std::uint64_t>(j));
    for (auto& score : scores) score = random.uniform();
    kvevict::kernels::select_keep(scores, n, 4, window, keep, plan.head(j), scratch);
  }
  std::uint64_t allocations = 0;
  for (auto _ : state) {
    const std::uint64_t before = allocation_count();
    cache.keep(plan);
    allocations += allocation_count() - before;
    benchmark::ClobberMemory();
    state.PauseTiming();
    append_random_tokens(cache, n - cache.size(), 17);
    state.ResumeTiming();
  }
  set_allocations(state, allocations);
  const double moved = 2.0 * n_kv_heads * static_cast<double>(keep) * head_dim * sizeof(Scalar);
  set_processed(state, keep, moved);
}

// --- registration -----------------------------------------------------------

benchmark::internal::Benchmark* configure(benchmark::internal::Benchmark* b, std::int64_t n) {
  return b->Arg(n)->ArgNames({"n"})->Unit(benchmark::kMillisecond);
}

template <class Fn>
void add(const std::string& name, std::int64_t n, Fn&& fn) {
  configure(benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn)), n);
}

template <class Scalar>
void register_storage_kernels(std::int64_t n) {
  using kvevict_bench::benchmark_name;
  if constexpr (std::is_same_v<Scalar, float>) add("BM_Floor_Gemm<float>", n, floor_gemm);
  add(benchmark_name<Scalar>("BM_Floor_Read"), n, floor_read<Scalar>);
  add(benchmark_name<Scalar>("BM_WindowAttention_Layer"), n, window_attention_layer<Scalar>);
  if constexpr (std::is_same_v<Scalar, float>) {
    add("BM_Temporal_Mean", n, [](benchmark::State& s) { temporal(s, kvevict::kernels::TemporalMode::mean); });
    add("BM_Temporal_EMA", n, [](benchmark::State& s) { temporal(s, kvevict::kernels::TemporalMode::ema); });
    add("BM_Pool_Avg", n, [](benchmark::State& s) { pooling(s, Pooling::avg); });
    add("BM_Pool_Max", n, [](benchmark::State& s) { pooling(s, Pooling::max); });
    add("BM_Pool_Adaptive", n, [](benchmark::State& s) { pooling(s, Pooling::adaptive); });
    add("BM_Select_TopK", n, select_top_k);
  }
  // The naive form takes seconds per call from 128k on (O(n d D) for one
  // head), so those sizes run one repetition.
  auto* naive = benchmark::RegisterBenchmark(benchmark_name<Scalar>("BM_Reconstruction_Naive").c_str(),
                                             [](benchmark::State& s) { reconstruction<Scalar>(s, Reconstruction::naive); });
  configure(naive, n);
  if (n >= 131072) naive->Repetitions(1);
  add(benchmark_name<Scalar>("BM_Reconstruction_Direct"), n,
      [](benchmark::State& s) { reconstruction<Scalar>(s, Reconstruction::direct); });
  add(benchmark_name<Scalar>("BM_Reconstruction_Gram"), n,
      [](benchmark::State& s) { reconstruction<Scalar>(s, Reconstruction::gram); });
  // keep() changes the fixture's data, so it runs last for its fixture;
  // refilling is slow at large n, hence the fixed iteration counts.
  benchmark::RegisterBenchmark(benchmark_name<Scalar>("BM_KVCache_Keep").c_str(), cache_keep<Scalar>)
      ->Arg(n)
      ->ArgNames({"n"})
      ->Unit(benchmark::kMillisecond)
      ->Iterations(std::max<std::int64_t>(2, (std::int64_t{1} << 20) / n));
}

}  // namespace

int main(int argc, char** argv) {
  for (const std::int64_t n : cache_sizes()) {
    register_storage_kernels<float>(n);
    register_storage_kernels<Eigen::half>(n);
  }
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
