// A seeded synthetic attention workload for comparing policies without a
// model: one attention layer whose keys and queries carry the structures
// eviction policies are built around.
//
//   - attention sinks: the first 4 tokens have large keys along a direction
//     every query leans toward;
//   - locality: each query leans toward the keys of the last few tokens;
//   - heavy hitters: 2% of tokens have keys along a second shared direction;
//   - needles: every `needle_every` tokens one token gets a key along a fresh
//     random direction, and a query `needle_delay` tokens later looks for
//     exactly that direction.
//
// Keys are used as given (no RoPE; the cache runs in original mode), so the
// structure is not scrambled by rotation. Reported per policy: the error of
// the W_o-projected attention output against a full cache, relative to the
// root-mean-square projected value of one token, and
// needle recall (the share of needle queries whose needle is still cached in
// the KV head the query reads).
#pragma once

#include "kvevict/kvevict.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace llama2c {

struct SyntheticSettings {
  kvevict::PolicyOptions policy;  // name, budget, sinks, window, slack
  std::int64_t tokens = 4096;
  std::uint32_t seed = 1;
  int n_heads = 8;
  int n_kv_heads = 4;
  int head_dim = 16;
  std::int64_t needle_every = 97;
  std::int64_t needle_delay = 400;
  std::int64_t error_every = 8;   // attention error sampled every this many tokens
};

struct SyntheticResult {
  std::string policy;
  std::int64_t budget = 0;
  std::int64_t tokens = 0;
  double attention_error = 0.0;  // mean projected output error / RMS projected value norm
  double needle_recall = 0.0;    // share of needle lookups that found their needle cached
  std::int64_t needles = 0;
  double seconds = 0.0;
  double eviction_seconds = 0.0;
};

inline SyntheticResult run_synthetic(const SyntheticSettings& settings) {
  using clock = std::chrono::steady_clock;
  const int h = settings.n_heads;
  const int h_kv = settings.n_kv_heads;
  const int d = settings.head_dim;
  const int groups = h / h_kv;
  const int width = h * d;
  std::mt19937 rng(settings.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random_unit = [&] {
    Eigen::VectorXf v(d);
    for (float& x : v) x = normal(rng);
    return Eigen::VectorXf(v.normalized());
  };

  const Eigen::VectorXf sink_direction = random_unit();
  const Eigen::VectorXf heavy_direction = random_unit();
  const kvevict::RowMatrixXf w_o = kvevict::RowMatrixXf::NullaryExpr(width, width, [&] { return normal(rng) / std::sqrt(static_cast<float>(width)); });

  kvevict::PolicyOptions options = settings.policy;
  options.n_heads = h;
  options.n_kv_heads = h_kv;
  options.head_dim = d;
  options.w_o = &w_o;
  // The workload is layer 0 of a 4-layer model (LaCache staggers its ladder
  // by layer and needs at least two layers).
  options.layer = 0;
  options.n_layers = 4;
  auto policy = kvevict::make_policy<float>(options);
  const auto needs = policy.needs();
  kvevict::KVCache<float> cache({.n_kv_heads = h_kv, .head_dim = d, .state_channels = policy.state_channels(),
                                 .capacity = 4 * settings.policy.budget + 1024});
  kvevict::KVCache<float> full({.n_kv_heads = h_kv, .head_dim = d, .capacity = settings.tokens});
  kvevict::QueryWindow window(h, static_cast<int>(std::max<std::int64_t>(needs.window_queries, 1)), d);

  // Needles planted so far: position -> direction, looked up needle_delay later.
  std::vector<std::pair<std::int64_t, Eigen::VectorXf>> needles;
  kvevict::RowMatrixXf keys(h_kv, d);
  kvevict::RowMatrixXf values(h_kv, d);
  kvevict::RowMatrixXf queries(h, d);
  std::vector<float> attention;
  kvevict::KeepPlan plan;
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<Eigen::VectorXf> recent_keys;

  SyntheticResult result;
  result.policy = std::string(policy.name());
  result.budget = result.policy == "full" ? 0 : settings.policy.budget;
  result.tokens = settings.tokens;
  double error_sum = 0.0;
  std::int64_t error_samples = 0;
  std::int64_t lookups = 0;
  std::int64_t found = 0;
  const auto start = clock::now();
  double eviction_seconds = 0.0;

  for (std::int64_t t = 0; t < settings.tokens; ++t) {
    // Key of this token, shared by every KV head up to noise.
    Eigen::VectorXf base = random_unit() * 0.5f;
    if (t < 4) base += 3.0f * sink_direction;
    if (uniform(rng) < 0.02f) base += 2.0f * heavy_direction;
    const bool plant = t > 4 && t % settings.needle_every == 0;
    if (plant) {
      const Eigen::VectorXf direction = random_unit();
      base = 3.0f * direction;
      needles.emplace_back(t, direction);
    }
    // Values follow their keys plus noise, so attention outputs carry the
    // same structure (sinks, heavy hitters, needles) and do not average out
    // to nearly zero, which would make relative errors meaningless.
    for (int j = 0; j < h_kv; ++j) {
      keys.row(j) = (base + 0.1f * random_unit()).transpose();
      values.row(j) = (base + 0.5f * random_unit()).transpose();
    }
    recent_keys.push_back(base);
    if (recent_keys.size() > 4) recent_keys.erase(recent_keys.begin());

    // Query: sink + heavy-hitter lean + locality, or a needle lookup.
    std::int64_t needle_position = -1;
    Eigen::VectorXf query_base = 1.5f * sink_direction + 1.0f * heavy_direction;
    for (const auto& key : recent_keys) query_base += 0.5f * key;
    for (const auto& [position, direction] : needles) {
      if (position + settings.needle_delay == t) {
        query_base = 4.0f * direction + 0.5f * sink_direction;
        needle_position = position;
      }
    }
    for (int q = 0; q < h; ++q) queries.row(q) = (query_base + 0.3f * random_unit()).transpose();

    const std::int64_t position = t;
    cache.append(keys, values, {&position, 1});
    full.append(keys, values, {&position, 1});
    window.push({queries.data(), static_cast<std::size_t>(queries.size())});

    // Attention rows of this step over the evicted cache.
    const std::int64_t n = cache.size();
    attention.assign(static_cast<std::size_t>(h) * static_cast<std::size_t>(n), 0.0f);
    Eigen::VectorXf evicted_output(width);
    for (int q = 0; q < h; ++q) {
      const int j = q / groups;
      Eigen::Map<Eigen::VectorXf> row(attention.data() + static_cast<std::ptrdiff_t>(q) * n, n);
      row.noalias() = cache.keys(j) * queries.row(q).transpose() * scale;
      row = (row.array() - row.maxCoeff()).exp();
      row /= row.sum();
      evicted_output.segment(static_cast<Eigen::Index>(q) * d, d).noalias() = cache.values(j).transpose() * row;
    }

    if (needle_position >= 0) {
      for (int q = 0; q < h; ++q) {
        const auto kept = cache.positions(q / groups);
        ++lookups;
        if (std::binary_search(kept.begin(), kept.end(), needle_position)) ++found;
      }
    }
    if (t >= settings.policy.budget && t % settings.error_every == 0) {
      Eigen::VectorXf full_output(width);
      for (int q = 0; q < h; ++q) {
        const int j = q / groups;
        Eigen::VectorXf row = full.keys(j) * queries.row(q).transpose() * scale;
        row = (row.array() - row.maxCoeff()).exp();
        row /= row.sum();
        full_output.segment(static_cast<Eigen::Index>(q) * d, d).noalias() = full.values(j).transpose() * row;
      }
      error_sum += (w_o * (evicted_output - full_output)).norm();
      ++error_samples;
    }

    const auto evict_start = clock::now();
    kvevict::Observation observation;
    observation.n_heads = h;
    observation.attention = {attention.data(), h, 1, n};
    observation.appended = 1;
    if (needs.window_queries > 0 && window.size() == window.window() && n >= window.window()) {
      observation.queries = window.view();
    }
    kvevict::observe_and_evict(policy, cache, observation, plan);
    eviction_seconds += std::chrono::duration<double>(clock::now() - evict_start).count();
  }

  result.seconds = std::chrono::duration<double>(clock::now() - start).count();
  result.eviction_seconds = eviction_seconds;
  // Full attention over thousands of tokens with unrelated values averages
  // them toward zero, so the error is measured against the root-mean-square
  // norm of one token's projected values, sum over heads of
  // mean_t ||W_o^q v_t||^2, rather than against the full output's norm.
  const auto grams = kvevict::kernels::gram_matrices(w_o, h, d);
  double mean_square = 0.0;
  for (int q = 0; q < h; ++q) {
    const kvevict::RowMatrixXf v = full.values(q / groups);
    mean_square += (v * grams[static_cast<std::size_t>(q)]).cwiseProduct(v).sum() / static_cast<double>(v.rows());
  }
  const double typical_norm = std::sqrt(mean_square);
  result.attention_error =
      error_samples > 0 && typical_norm > 0.0 ? error_sum / static_cast<double>(error_samples) / typical_norm : 0.0;
  result.needles = lookups / h;
  result.needle_recall = lookups > 0 ? static_cast<double>(found) / static_cast<double>(lookups) : 0.0;
  return result;
}

}  // namespace llama2c
