// Llama forward pass for llama2.c checkpoints, one token per call, float32.
//
// Per layer: RMSNorm (eps 1e-5), q/k/v projections, RoPE on adjacent pairs
// (2k, 2k+1) with theta_k = 10000^(-2k/head_dim), grouped-query attention
// (query head h reads KV head h / (n_heads / n_kv_heads)) with softmax scale
// 1/sqrt(head_dim), output projection and residual, then a SwiGLU FFN
// w2(silu(w1 x) * w3 x) and residual. A final RMSNorm and the classifier
// give the logits.
//
// Attention reads one kvevict::KVCache per layer. The model only appends
// the new token and reads the cache. Eviction is the caller's job between
// forward calls: RecentWindow::make_room before a call, or a kvevict policy
// (observe_and_evict) after it, which can read attention() and queries().
// The position mode of each cache decides how RoPE is applied:
//   - original: q and k are rotated at the token position before the key
//     is stored;
//   - cache_relative: the key is stored unrotated, and at attention time
//     every key is rotated at its slot index and the query at the slot of
//     its own key (size() - 1).
#pragma once

#include "checkpoint.hpp"

#include "kvevict/kv_cache.hpp"
#include "kvevict/rope.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace llama2c {

// RoPE as llama2.c applies it.
inline kvevict::RopeConfig llama2c_rope_config() {
  return {.base = 10000.0, .frequency_scale = 1.0, .pairing = kvevict::RopePairing::adjacent};
}

// Returns the cache settings that fit `config`, with `capacity` slots per
// head reserved up front.
inline kvevict::CacheConfig make_cache_config(const ModelConfig& config, kvevict::PositionMode positions,
                                              std::int64_t capacity, int state_channels = 0) {
  kvevict::CacheConfig cache_config;
  cache_config.n_kv_heads = config.n_kv_heads;
  cache_config.head_dim = config.head_dim();
  cache_config.positions = positions;
  cache_config.state_channels = state_channels;
  cache_config.capacity = capacity;
  cache_config.rope = llama2c_rope_config();
  return cache_config;
}

// Returns one empty cache per layer of `config`.
template <class Scalar = float>
std::vector<kvevict::KVCache<Scalar>> make_layer_caches(const ModelConfig& config, kvevict::PositionMode positions,
                                                        std::int64_t capacity, int state_channels = 0) {
  std::vector<kvevict::KVCache<Scalar>> caches;
  caches.reserve(static_cast<std::size_t>(config.n_layers));
  for (int l = 0; l < config.n_layers; ++l) {
    caches.emplace_back(make_cache_config(config, positions, capacity, state_channels));
  }
  return caches;
}

class Model {
 public:
  explicit Model(Checkpoint checkpoint)
      : checkpoint_(std::move(checkpoint)), rope_(checkpoint_.config.head_dim(), llama2c_rope_config()) {
    const ModelConfig& config = checkpoint_.config;
    x_.setZero(config.dim);
    normed_.setZero(config.dim);
    attention_out_.setZero(config.dim);
    q_.setZero(config.dim);
    k_.setZero(config.kv_dim());
    v_.setZero(config.kv_dim());
    gate_.setZero(config.hidden_dim);
    up_.setZero(config.hidden_dim);
    logits_.setZero(config.vocab_size);
    queries_.setZero(config.n_layers, config.dim);
    attention_sizes_.assign(static_cast<std::size_t>(config.n_layers), 0);
    attention_.resize(static_cast<std::size_t>(config.n_layers));
    reserve_context(1);
  }

  const ModelConfig& config() const { return checkpoint_.config; }
  const Checkpoint& checkpoint() const { return checkpoint_; }

  // Preallocates the attention buffers for caches of up to `slots` slots.
  // forward() grows them when a cache contains more (1.5 times at a time), so a
  // decode loop allocates nothing once its caches and this have been
  // reserved for their largest size.
  void reserve_context(std::int64_t slots) {
    if (slots <= attention_capacity_) return;
    const ModelConfig& config = checkpoint_.config;
    for (auto& probabilities : attention_) {
      probabilities.resize(static_cast<std::size_t>(config.n_heads) * static_cast<std::size_t>(slots));
    }
    keys_scratch_.resize(slots, config.head_dim());
    values_scratch_.resize(slots, config.head_dim());
    attention_capacity_ = slots;
  }

  // Runs one token through the model and returns its logits [vocab_size],
  // valid until the next call. Appends the token's keys and values, at
  // `position`, to each layer's cache and attends over everything the cache
  // then contains. Throws std::invalid_argument when the token is out of range,
  // the caches do not fit the model, or the position does not increase.
  template <class Scalar>
  std::span<const float> forward(int token, std::int64_t position, std::span<kvevict::KVCache<Scalar>> caches) {
    check_inputs(token, position, caches);
    const ModelConfig& config = checkpoint_.config;
    x_ = checkpoint_.token_embedding.row(token).transpose();

    for (int l = 0; l < config.n_layers; ++l) {
      const LayerWeights& layer = checkpoint_.layers[static_cast<std::size_t>(l)];
      kvevict::KVCache<Scalar>& cache = caches[static_cast<std::size_t>(l)];

      rms_norm(x_, layer.rms_att, normed_);
      q_.noalias() = layer.wq * normed_;
      k_.noalias() = layer.wk * normed_;
      v_.noalias() = layer.wv * normed_;
      if (cache.position_mode() == kvevict::PositionMode::original) {
        rotate_heads(q_, config.n_heads, position);
        rotate_heads(k_, config.n_kv_heads, position);
      }
      queries_.row(l) = q_.transpose();
      cache.append(Eigen::Map<const RowMatrixXf>(k_.data(), config.n_kv_heads, config.head_dim()),
                   Eigen::Map<const RowMatrixXf>(v_.data(), config.n_kv_heads, config.head_dim()),
                   std::span<const std::int64_t>(&position, 1));
      attend(l, cache);
      x_.noalias() += layer.wo * attention_out_;

      rms_norm(x_, layer.rms_ffn, normed_);
      gate_.noalias() = layer.w1 * normed_;
      up_.noalias() = layer.w3 * normed_;
      // SiLU(gate) * up, with SiLU(x) = x * sigmoid(x).
      gate_.array() = gate_.array() / (1.0f + (-gate_.array()).exp()) * up_.array();
      x_.noalias() += layer.w2 * gate_;
    }

    rms_norm(x_, checkpoint_.rms_final, normed_);
    logits_.noalias() = checkpoint_.classifier() * normed_;
    return {logits_.data(), static_cast<std::size_t>(logits_.size())};
  }

  // Attention probabilities of the last forward call in layer `layer`:
  // [n_heads x slots], one row per query head over the slots its cache held
  // then. Each row sums to 1. Valid until the next forward call.
  Eigen::Map<const RowMatrixXf> attention(int layer) const {
    check_layer(layer);
    const auto slots = attention_sizes_[static_cast<std::size_t>(layer)];
    return {attention_[static_cast<std::size_t>(layer)].data(), checkpoint_.config.n_heads, slots};
  }

  // Queries of the last forward call in layer `layer`: [n_heads x head_dim],
  // rotated as the cache stores keys (at the token position in original
  // mode, unrotated in cache_relative mode).
  Eigen::Map<const RowMatrixXf> queries(int layer) const {
    check_layer(layer);
    return {queries_.row(layer).data(), checkpoint_.config.n_heads, checkpoint_.config.head_dim()};
  }

 private:
  void check_layer(int layer) const {
    if (layer < 0 || layer >= checkpoint_.config.n_layers) {
      throw std::out_of_range("Model: layer " + std::to_string(layer) + " is outside [0, " +
                              std::to_string(checkpoint_.config.n_layers) + ")");
    }
  }

  template <class Scalar>
  void check_inputs(int token, std::int64_t position, std::span<kvevict::KVCache<Scalar>> caches) const {
    const ModelConfig& config = checkpoint_.config;
    if (token < 0 || token >= config.vocab_size) {
      throw std::invalid_argument("Model::forward: token id " + std::to_string(token) + " is outside [0, " +
                                  std::to_string(config.vocab_size) + ")");
    }
    if (position < 0) {
      throw std::invalid_argument("Model::forward: position " + std::to_string(position) +
                                  " is negative; positions count tokens from 0");
    }
    if (caches.size() != static_cast<std::size_t>(config.n_layers)) {
      throw std::invalid_argument("Model::forward: got " + std::to_string(caches.size()) +
                                  " caches but the model has " + std::to_string(config.n_layers) +
                                  " layers; pass one cache per layer (make_layer_caches)");
    }
    const kvevict::RopeConfig expected_rope = llama2c_rope_config();
    for (std::size_t l = 0; l < caches.size(); ++l) {
      const auto& cache = caches[l];
      if (cache.n_kv_heads() != config.n_kv_heads || cache.head_dim() != config.head_dim()) {
        throw std::invalid_argument("Model::forward: cache of layer " + std::to_string(l) + " has " +
                                    std::to_string(cache.n_kv_heads()) + " KV heads of dimension " +
                                    std::to_string(cache.head_dim()) + ", the model needs " +
                                    std::to_string(config.n_kv_heads) + " of dimension " +
                                    std::to_string(config.head_dim()) + "; build it with make_cache_config");
      }
      const kvevict::RopeConfig& rope = cache.config().rope;
      const bool rope_matches = rope.base == expected_rope.base &&
                                rope.frequency_scale == expected_rope.frequency_scale &&
                                rope.pairing == expected_rope.pairing;
      if (cache.position_mode() == kvevict::PositionMode::cache_relative && !rope_matches) {
        throw std::invalid_argument("Model::forward: cache of layer " + std::to_string(l) +
                                    " rotates keys with a RoPE setting other than llama2.c's (base 10000, "
                                    "adjacent pairs); build it with make_cache_config");
      }
    }
  }

  // out = weight * x / sqrt(mean(x^2) + 1e-5), as llama2.c's rmsnorm.
  static void rms_norm(const Eigen::VectorXf& x, const Eigen::VectorXf& weight, Eigen::VectorXf& out) {
    const float mean_square = x.squaredNorm() / static_cast<float>(x.size());
    const float inverse_rms = 1.0f / std::sqrt(mean_square + 1e-5f);
    out = weight.cwiseProduct(x) * inverse_rms;
  }

  void rotate_heads(Eigen::VectorXf& heads, int n_heads, std::int64_t position) const {
    const auto head_dim = static_cast<std::size_t>(checkpoint_.config.head_dim());
    for (int h = 0; h < n_heads; ++h) {
      rope_.rotate(std::span<float>(heads.data() + static_cast<std::size_t>(h) * head_dim, head_dim),
                   static_cast<double>(position));
    }
  }

  // Softmax attention of every query head over layer `layer`'s cache, into
  // attention_out_ [dim]. Records the probabilities for attention().
  template <class Scalar>
  void attend(int layer, const kvevict::KVCache<Scalar>& cache) {
    const ModelConfig& config = checkpoint_.config;
    const std::int64_t slots = cache.size();
    if (slots > attention_capacity_) {
      reserve_context(std::max<std::int64_t>(slots, attention_capacity_ + attention_capacity_ / 2));
    }
    attention_sizes_[static_cast<std::size_t>(layer)] = slots;
    const int head_dim = config.head_dim();
    const int group = config.kv_group_size();
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const bool cache_relative = cache.position_mode() == kvevict::PositionMode::cache_relative;
    float* probabilities = attention_[static_cast<std::size_t>(layer)].data();

    if (cache_relative) {
      // The query sits at the slot of its own key, the newest one.
      for (int h = 0; h < config.n_heads; ++h) {
        cache.rotate_at_slot(std::span<float>(q_.data() + static_cast<std::ptrdiff_t>(h) * head_dim,
                                              static_cast<std::size_t>(head_dim)),
                             slots - 1);
      }
    }

    for (int j = 0; j < config.n_kv_heads; ++j) {
      // Float keys in original mode are used in place. Otherwise the cache
      // writes converted (and, in cache_relative mode, rotated) keys.
      const bool keys_in_place = std::is_same_v<Scalar, float> && !cache_relative;
      if (!keys_in_place) cache.rotated_keys(j, keys_scratch_.topRows(slots));
      const Eigen::Ref<const RowMatrixXf> keys =
          keys_in_place ? float_view(cache.keys(j)) : Eigen::Ref<const RowMatrixXf>(keys_scratch_.topRows(slots));
      if constexpr (!std::is_same_v<Scalar, float>) {
        values_scratch_.topRows(slots) = cache.values(j).template cast<float>();
      }
      const Eigen::Ref<const RowMatrixXf> values = float_values(cache, j, slots);

      for (int g = 0; g < group; ++g) {
        const int h = j * group + g;
        Eigen::Map<Eigen::VectorXf> scores(probabilities + static_cast<std::ptrdiff_t>(h) * slots, slots);
        scores.noalias() = keys * q_.segment(static_cast<Eigen::Index>(h) * head_dim, head_dim);
        scores *= scale;
        const float max_score = scores.maxCoeff();
        scores = (scores.array() - max_score).exp();
        scores /= scores.sum();
        attention_out_.segment(static_cast<Eigen::Index>(h) * head_dim, head_dim).noalias() =
            values.transpose() * scores;
      }
    }
  }

  // Views float cache storage as float rows. For other storage types it is
  // never called, but it must still compile: it then views the key scratch.
  template <class Matrix>
  Eigen::Ref<const RowMatrixXf> float_view(const Matrix& matrix) const {
    if constexpr (std::is_same_v<typename Matrix::Scalar, float>) {
      return Eigen::Ref<const RowMatrixXf>(matrix);
    } else {
      return Eigen::Ref<const RowMatrixXf>(keys_scratch_.topRows(matrix.rows()));
    }
  }

  template <class Scalar>
  Eigen::Ref<const RowMatrixXf> float_values(const kvevict::KVCache<Scalar>& cache, int j,
                                             std::int64_t slots) const {
    if constexpr (std::is_same_v<Scalar, float>) {
      return Eigen::Ref<const RowMatrixXf>(cache.values(j));
    } else {
      return Eigen::Ref<const RowMatrixXf>(values_scratch_.topRows(slots));
    }
  }

  Checkpoint checkpoint_;
  kvevict::RotaryEmbedding rope_;

  // Work buffers, sized once so that forward() does not allocate.
  Eigen::VectorXf x_;              // residual stream [dim]
  Eigen::VectorXf normed_;         // RMSNorm output [dim]
  Eigen::VectorXf attention_out_;  // attention output before wo [dim]
  Eigen::VectorXf q_;              // [dim]
  Eigen::VectorXf k_;              // [kv_dim]
  Eigen::VectorXf v_;              // [kv_dim]
  Eigen::VectorXf gate_;           // w1 x, then silu(w1 x) * w3 x [hidden]
  Eigen::VectorXf up_;             // w3 x [hidden]
  Eigen::VectorXf logits_;         // [vocab]
  RowMatrixXf queries_;            // [n_layers, dim], see queries()

  // Buffers that follow the largest cache seen (see reserve_context).
  std::int64_t attention_capacity_ = 0;
  std::vector<std::vector<float>> attention_;  // per layer [n_heads x slots], see attention()
  std::vector<std::int64_t> attention_sizes_;  // per layer: slots at the last forward call
  RowMatrixXf keys_scratch_;                   // [capacity, head_dim] converted or rotated keys
  RowMatrixXf values_scratch_;                 // [capacity, head_dim] values converted to float
};

}  // namespace llama2c
