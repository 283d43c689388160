// Shared setup of the kvevict micro-benchmarks: the layer shape, the cache
// sizes, deterministic random data, caches filled to a given size, and the
// memory check that decides whether a size can run on this machine.
//
// Shape of every benchmark (a Llama-3-8B-like layer): 32 query heads, 8 KV
// heads (group size 4), head_dim 128, observation window 32, budget 1024,
// model width 4096. Cache sizes are powers of two: 1024, 4096, 16384, 65536,
// 131072 and 524288 tokens per KV head ("1k" to "512k").
#pragma once

#include "kvevict/kv_cache.hpp"
#include "kvevict/observation.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kvevict_bench {

inline constexpr int n_heads = 32;
inline constexpr int n_kv_heads = 8;
inline constexpr int group_size = n_heads / n_kv_heads;
inline constexpr int head_dim = 128;
inline constexpr std::int64_t window = 32;
inline constexpr std::int64_t budget = 1024;
inline constexpr int model_width = 4096;  // rows of W_o (hidden size D)

inline const std::vector<std::int64_t>& cache_sizes() {
  static const std::vector<std::int64_t> sizes = {1024, 4096, 16384, 65536, 131072, 524288};
  return sizes;
}

inline constexpr double gib = 1024.0 * 1024.0 * 1024.0;

template <class Scalar>
constexpr std::string_view scalar_name() {
  if constexpr (std::is_same_v<Scalar, float>) {
    return "float";
  } else {
    return "half";
  }
}

// "BM_<Subject>_<Step><scalar>", the name Google Benchmark gives a template
// instantiation, so the report can group storage types.
template <class Scalar>
std::string benchmark_name(std::string_view subject_step) {
  return std::string(subject_step) + "<" + std::string(scalar_name<Scalar>()) + ">";
}

// SplitMix64: fast, deterministic, and the same on every platform, so every
// run scores the same data.
class Random {
 public:
  explicit Random(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  // Uniform in [0, 1).
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }

  // Uniform in [-sqrt(3), sqrt(3)): mean 0 and variance 1, like normalised
  // activations. One draw per value, because filling a 512k-token cache
  // takes a billion of them.
  float centred() { return (2.0f * uniform() - 1.0f) * 1.7320508f; }

 private:
  std::uint64_t state_;
};

inline void fill_centred(float* data, std::int64_t count, std::uint64_t seed) {
  Random random(seed);
  for (std::int64_t i = 0; i < count; ++i) data[i] = random.centred();
}

// Random attention rows [rows, n]: positive, each row summing to 1.
inline void fill_probability_rows(kvevict::RowMatrixXf& rows, std::uint64_t seed) {
  Random random(seed);
  for (Eigen::Index r = 0; r < rows.rows(); ++r) {
    double total = 0.0;
    for (Eigen::Index t = 0; t < rows.cols(); ++t) {
      const float value = std::exp(2.0f * random.centred());
      rows(r, t) = value;
      total += value;
    }
    rows.row(r) /= static_cast<float>(total);
  }
}

// Bytes the system can still give this process (MemAvailable), or 0 when
// /proc/meminfo cannot be read.
inline double available_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  double kib = 0.0;
  std::string unit;
  while (meminfo >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024.0;
  }
  return 0.0;
}

// Skips the benchmark, with the reason in the output, when `needed` bytes
// beyond what is already allocated would leave less than 1 GiB available.
// Returns true when the benchmark may run.
inline bool require_memory(benchmark::State& state, double needed) {
  const double available = available_bytes();
  if (available <= 0.0 || needed + gib <= available) return true;
  std::ostringstream message;
  message.precision(3);
  message << "skipped: needs " << needed / gib << " GiB, " << available / gib
          << " GiB available (does not fit in memory)";
  state.SkipWithError(message.str().c_str());
  return false;
}

// Bytes of keys and values of a cache of n tokens.
template <class Scalar>
double cache_bytes(std::int64_t n) {
  return 2.0 * n_kv_heads * static_cast<double>(n) * head_dim * sizeof(Scalar);
}

// Appends n tokens of random keys and values (positions 0..n-1) to `cache`,
// in chunks, so the float staging buffers stay small.
template <class Scalar>
void append_random_tokens(kvevict::KVCache<Scalar>& cache, std::int64_t n, std::uint64_t seed) {
  constexpr std::int64_t chunk = 2048;
  kvevict::RowMatrixXf keys(n_kv_heads * chunk, head_dim);
  kvevict::RowMatrixXf values(n_kv_heads * chunk, head_dim);
  std::vector<std::int64_t> positions;
  Random random(seed);
  for (std::int64_t first = 0; first < n; first += chunk) {
    const std::int64_t count = std::min(chunk, n - first);
    keys.resize(n_kv_heads * count, head_dim);
    values.resize(n_kv_heads * count, head_dim);
    for (Eigen::Index i = 0; i < keys.size(); ++i) keys.data()[i] = random.centred();
    for (Eigen::Index i = 0; i < values.size(); ++i) values.data()[i] = random.centred();
    positions.resize(static_cast<std::size_t>(count));
    const std::int64_t start = cache.next_position();
    for (std::int64_t c = 0; c < count; ++c) positions[static_cast<std::size_t>(c)] = start + c;
    cache.append(keys, values, positions);
  }
}

// A cache of n random tokens in `original` position mode, with `channels`
// state channels and room for `extra` more tokens without reallocation.
template <class Scalar>
std::unique_ptr<kvevict::KVCache<Scalar>> make_cache(std::int64_t n, int channels, std::int64_t extra = 0,
                                                     std::uint64_t seed = 1) {
  auto cache = std::make_unique<kvevict::KVCache<Scalar>>(kvevict::CacheConfig{
      .n_kv_heads = n_kv_heads,
      .head_dim = head_dim,
      .positions = kvevict::PositionMode::original,
      .state_channels = channels,
      .capacity = n + extra,
  });
  append_random_tokens(*cache, n, seed);
  return cache;
}

// Window queries [n_heads, window, head_dim] of unit variance, so logits
// scaled by 1/sqrt(head_dim) have a standard deviation near 1.
inline std::vector<float> make_window_queries(std::uint64_t seed) {
  std::vector<float> queries(static_cast<std::size_t>(n_heads) * window * head_dim);
  fill_centred(queries.data(), static_cast<std::int64_t>(queries.size()), seed);
  return queries;
}

inline kvevict::Tensor3View queries_view(const std::vector<float>& queries) {
  return {queries.data(), n_heads, window, head_dim};
}

// Sets the throughput counters: tokens (cache slots) and bytes per iteration.
inline void set_processed(benchmark::State& state, std::int64_t tokens, double bytes) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * tokens);
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * bytes));
}

// Heap allocations per iteration, a counter next to the timings.
inline void set_allocations(benchmark::State& state, std::uint64_t allocations) {
  state.counters["allocs_per_iter"] =
      benchmark::Counter(static_cast<double>(allocations), benchmark::Counter::kAvgIterations);
}

// The one fixture alive at a time. Benchmarks are registered with the cache
// size outermost, so each fixture is built once, used by every benchmark of
// its size and storage type, and freed before the next one is built (the
// 512k-token float cache alone contains 4 GiB of keys and values).
class FixtureSlot {
 public:
  template <class T, class Make>
  T& get(const std::string& key, Make&& make) {
    if (key != key_) {
      current_.reset();  // free the old fixture before building the new one
      key_.clear();
      current_ = std::shared_ptr<void>(make());
      key_ = key;
    }
    return *static_cast<T*>(current_.get());
  }

 private:
  std::shared_ptr<void> current_;
  std::string key_;
};

inline FixtureSlot& fixture_slot() {
  static FixtureSlot slot;
  return slot;
}

template <class Scalar>
std::string fixture_key(std::string_view kind, std::int64_t n) {
  return std::string(kind) + "/" + std::string(scalar_name<Scalar>()) + "/" + std::to_string(n);
}

}  // namespace kvevict_bench
