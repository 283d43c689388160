// The integration pattern in one file: a decode loop over one attention layer
// that appends each token's key and value to a kvevict::KVCache, attends over
// the cache, hands the policy what it observes, and evicts.
//
//   minimal_engine [policy] [budget] [steps]
//   minimal_engine h2o 24 200
//
// The "model" is synthetic and seeded: random queries, keys and values, with
// token 0 given a large key so it acts as an attention sink. Real engines
// replace make_token() with their projections.
#include <kvevict/kvevict.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int n_heads = 4;
constexpr int n_kv_heads = 2;
constexpr int head_dim = 8;
constexpr int groups = n_heads / n_kv_heads;

struct Token {
  kvevict::RowMatrixXf query = kvevict::RowMatrixXf(n_heads, head_dim);
  kvevict::RowMatrixXf key = kvevict::RowMatrixXf(n_kv_heads, head_dim);
  kvevict::RowMatrixXf value = kvevict::RowMatrixXf(n_kv_heads, head_dim);
};

// Fills the projections of token t, unrotated.
void make_token(std::mt19937& rng, std::int64_t t, Token& token) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : token.query.reshaped()) x = normal(rng);
  for (float& x : token.key.reshaped()) x = normal(rng) * (t == 0 ? 4.0f : 1.0f);
  for (float& x : token.value.reshaped()) x = normal(rng);
}

}  // namespace

int main(int argc, char** argv) try {
  const std::string policy_name = argc > 1 ? argv[1] : "streaming_llm";
  const std::int64_t budget = argc > 2 ? std::stoll(argv[2]) : 24;
  const std::int64_t steps = argc > 3 ? std::stoll(argv[3]) : 200;

  // One policy object per layer: this loop is layer 0 of a 4-layer model
  // (LaCache staggers its ladder by layer). ReST-KV also reads the layer's
  // output projection W_o [model width, n_heads * head_dim].
  const kvevict::RowMatrixXf w_o = kvevict::RowMatrixXf::Random(n_heads * head_dim, n_heads * head_dim);
  kvevict::PolicyOptions options{.name = policy_name, .budget = budget, .window = 8, .slack = -1,
                                 .layer = 0, .n_layers = 4, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .head_dim = head_dim, .w_o = &w_o};
  auto policy = kvevict::make_policy<float>(options);
  const kvevict::ObservationNeeds needs = policy.needs();

  // StreamingLLM-style policies run with positions inside the cache; scorers
  // keep keys rotated at their token positions.
  const auto mode = (policy_name == "streaming_llm" || policy_name == "lacache")
                        ? kvevict::PositionMode::cache_relative
                        : kvevict::PositionMode::original;
  kvevict::KVCache<float> cache({.n_kv_heads = n_kv_heads, .head_dim = head_dim, .positions = mode,
                                 .state_channels = policy.state_channels(), .capacity = budget + 256});
  const kvevict::RotaryEmbedding rope(head_dim, {});

  // Per-step buffers, allocated once.
  const std::int64_t window = std::max<std::int64_t>(needs.window_queries, 1);
  kvevict::QueryWindow recent_queries(n_heads, static_cast<int>(window), head_dim);
  std::vector<float> attention;
  kvevict::RowMatrixXf keys;
  kvevict::KeepPlan plan;
  Token token;
  std::mt19937 rng(7);
  std::int64_t evictions = 0;

  for (std::int64_t t = 0; t < steps; ++t) {
    make_token(rng, t, token);

    // 1. Append: in original mode keys are stored rotated at their position.
    if (mode == kvevict::PositionMode::original) {
      for (int j = 0; j < n_kv_heads; ++j) rope.rotate({token.key.row(j).data(), head_dim}, static_cast<double>(t));
    }
    const std::int64_t position = t;
    cache.append(token.key, token.value, {&position, 1});
    const std::int64_t n = cache.size();

    // Queries are kept in the cache's convention: rotated at their position in
    // original mode, unrotated in cache_relative mode.
    if (mode == kvevict::PositionMode::original) {
      for (int q = 0; q < n_heads; ++q) rope.rotate({token.query.row(q).data(), head_dim}, static_cast<double>(t));
    }
    recent_queries.push({token.query.data(), static_cast<std::size_t>(token.query.size())});

    // 2. Attention of the new query over every cached slot, one row per head.
    attention.assign(static_cast<std::size_t>(n_heads * n), 0.0f);
    for (int q = 0; q < n_heads; ++q) {
      const int j = q / groups;
      keys.resize(n, head_dim);
      cache.rotated_keys(j, keys);
      Eigen::VectorXf query = token.query.row(q).transpose();
      cache.rotate_at_slot({query.data(), head_dim}, n - 1);
      Eigen::Map<Eigen::VectorXf> row(attention.data() + q * n, n);
      row = keys * query / std::sqrt(static_cast<float>(head_dim));
      row = (row.array() - row.maxCoeff()).exp();
      row /= row.sum();
      // The layer output would be row^T * values(j); this example only evicts.
    }

    // 3-4. Observe, then evict once the size rule fires.
    kvevict::Observation observation;
    observation.n_heads = n_heads;
    observation.attention = {attention.data(), n_heads, 1, n};
    observation.appended = 1;
    if (needs.window_queries > 0 && recent_queries.size() == window && n >= window) {
      observation.queries = recent_queries.view();
    }
    if (kvevict::observe_and_evict(policy, cache, observation, plan)) ++evictions;
  }

  std::cout << "policy " << policy.name() << ", budget " << budget << ", " << steps << " steps, "
            << evictions << " evictions, " << cache.size() << " slots per head, " << cache.memory_bytes()
            << " bytes\n";
  for (int j = 0; j < n_kv_heads; ++j) {
    std::cout << "KV head " << j << " keeps positions:";
    for (const std::int64_t p : cache.positions(j)) std::cout << ' ' << p;
    std::cout << '\n';
  }
  return 0;
} catch (const std::exception& error) {
  std::cerr << "minimal_engine: " << error.what() << '\n';
  return 1;
}
