// A program outside the kvevict tree, built against an installed package.
// It appends 12 tokens to a two-head cache, evicts with StreamingLLM (4 sinks,
// budget 8) and prints the positions each head kept: 0 1 2 3 8 9 10 11.
#include <kvevict/kvevict.hpp>

#include <cstdint>
#include <iostream>
#include <vector>

int main() {
  const int heads = 2;
  const int head_dim = 4;
  const std::int64_t tokens = 12;

  kvevict::KVCache<float> cache(
      {.n_kv_heads = heads, .head_dim = head_dim, .positions = kvevict::PositionMode::cache_relative});
  kvevict::RowMatrixXf keys(heads * tokens, head_dim);
  kvevict::RowMatrixXf values(heads * tokens, head_dim);
  for (Eigen::Index r = 0; r < keys.rows(); ++r) {
    for (Eigen::Index c = 0; c < head_dim; ++c) {
      keys(r, c) = static_cast<float>(r + c) / 16.0f;
      values(r, c) = static_cast<float>(r - c) / 16.0f;
    }
  }
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
  for (std::int64_t p = 0; p < tokens; ++p) positions[static_cast<std::size_t>(p)] = p;
  cache.append(keys, values, positions);

  kvevict::StreamingLLM<float> policy({.budget = 8, .sinks = 4});
  kvevict::KeepPlan plan;
  const bool evicted = kvevict::compress_prefill(policy, cache, kvevict::Observation{}, plan);
  if (!evicted) {
    std::cerr << "consumer: expected an eviction of 12 tokens to a budget of 8\n";
    return 1;
  }

  for (int j = 0; j < heads; ++j) {
    std::cout << "head " << j << " kept positions:";
    for (const std::int64_t position : cache.positions(j)) std::cout << ' ' << position;
    std::cout << '\n';
  }
  return 0;
}
