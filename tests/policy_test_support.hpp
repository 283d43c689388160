// Helpers for policy tests: dense [d0, d1, d2] tensors that back an
// Observation, random token appends, byte snapshots of a cache (to check the
// strong exception guarantee) and plain-vector views of kept slots.
#pragma once

#include <kvevict/kvevict.hpp>

#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <vector>

namespace kvevict_test {

// A dense row-major float tensor [d0, d1, d2] that owns its data.
struct Tensor3 {
  std::int64_t d0 = 0;
  std::int64_t d1 = 0;
  std::int64_t d2 = 0;
  std::vector<float> data;

  Tensor3() = default;
  Tensor3(std::int64_t a, std::int64_t b, std::int64_t c)
      : d0(a), d1(b), d2(c), data(static_cast<std::size_t>(a * b * c), 0.0f) {}

  float& at(std::int64_t i, std::int64_t r, std::int64_t c) {
    return data[static_cast<std::size_t>((i * d1 + r) * d2 + c)];
  }
  float at(std::int64_t i, std::int64_t r, std::int64_t c) const {
    return data[static_cast<std::size_t>((i * d1 + r) * d2 + c)];
  }
  // Writes `values` into row r of block i, starting at column 0.
  void set_row(std::int64_t i, std::int64_t r, const std::vector<float>& values) {
    for (std::size_t c = 0; c < values.size(); ++c) at(i, r, static_cast<std::int64_t>(c)) = values[c];
  }
  kvevict::Tensor3View view() const { return {data.data(), d0, d1, d2}; }
};

// An observation of attention rows only.
inline kvevict::Observation attention_observation(const Tensor3& rows) {
  kvevict::Observation observation;
  observation.n_heads = static_cast<int>(rows.d0);
  observation.attention = rows.view();
  observation.appended = rows.d1;
  return observation;
}

// An observation of window queries only.
inline kvevict::Observation query_observation(const Tensor3& queries) {
  kvevict::Observation observation;
  observation.n_heads = static_cast<int>(queries.d0);
  observation.queries = queries.view();
  observation.prefill = true;
  return observation;
}

// Appends `count` tokens at positions first_position .. first_position +
// count - 1 with normal random keys and values on every KV head.
template <class Scalar>
void append_random(kvevict::KVCache<Scalar>& cache, std::int64_t count, std::int64_t first_position,
                   std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::int64_t rows = static_cast<std::int64_t>(cache.n_kv_heads()) * count;
  kvevict::RowMatrixXf keys(rows, cache.head_dim());
  kvevict::RowMatrixXf values(rows, cache.head_dim());
  for (float& x : keys.reshaped()) x = normal(rng);
  for (float& x : values.reshaped()) x = normal(rng);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(count));
  for (std::int64_t c = 0; c < count; ++c) positions[static_cast<std::size_t>(c)] = first_position + c;
  cache.append(keys, values, positions);
}

// Every byte of a cache's observable contents: size, next position, and per
// KV head the keys, values, positions and state channels in use.
template <class Scalar>
std::vector<unsigned char> cache_bytes(const kvevict::KVCache<Scalar>& cache) {
  std::vector<unsigned char> bytes;
  const auto add = [&bytes](const void* data, std::size_t count) {
    const auto* first = static_cast<const unsigned char*>(data);
    bytes.insert(bytes.end(), first, first + count);
  };
  const std::int64_t size = cache.size();
  const std::int64_t next = cache.next_position();
  add(&size, sizeof size);
  add(&next, sizeof next);
  const auto slots = static_cast<std::size_t>(size);
  const auto d = static_cast<std::size_t>(cache.head_dim());
  for (int j = 0; j < cache.n_kv_heads(); ++j) {
    add(cache.keys(j).data(), slots * d * sizeof(Scalar));
    add(cache.values(j).data(), slots * d * sizeof(Scalar));
    add(cache.positions(j).data(), slots * sizeof(std::int64_t));
    for (int channel = 0; channel < cache.state_channels(); ++channel) {
      add(cache.state(j, channel).data(), slots * sizeof(float));
    }
  }
  return bytes;
}

template <class Scalar>
std::vector<std::int64_t> positions_of(const kvevict::KVCache<Scalar>& cache, int j) {
  const auto positions = cache.positions(j);
  return {positions.begin(), positions.end()};
}

template <class Scalar>
std::vector<float> state_of(const kvevict::KVCache<Scalar>& cache, int j, int channel) {
  const auto state = cache.state(j, channel);
  return {state.begin(), state.end()};
}

inline std::vector<std::int64_t> head_of(const kvevict::KeepPlan& plan, int j) {
  const auto slots = plan.head(j);
  return {slots.begin(), slots.end()};
}

}  // namespace kvevict_test
