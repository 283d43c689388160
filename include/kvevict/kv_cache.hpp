// KVCache: the keys, values, token positions and per-slot policy state of one
// attention layer, stored per KV head.
//
//   KV head j:  keys   [slots x head_dim]   (row-major, Scalar storage)
//               values [slots x head_dim]
//               positions [slots]           original token position, increasing
//               state  [channels x slots]   float arrays a policy owns
//
// Every head stores the same number of slots, but after per-head eviction the
// heads may store different tokens. Slots are always in increasing position
// order. `keep(plan)` is the only operation that removes tokens; it moves
// keys, values, positions and every state channel with the same indices.
//
// Capacity: `reserve(n)` allocates storage for n slots per head up front;
// appends within the reserved capacity and every `keep` never allocate, so a
// decode loop that reserves `budget + slack + 1` slots runs allocation-free.
//
// Exception safety: every member that throws leaves the cache unchanged
// (strong guarantee). Arguments are checked before anything is written.
#pragma once

#include "kvevict/common.hpp"
#include "kvevict/rope.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace kvevict {

struct CacheConfig {
  int n_kv_heads = 0;
  int head_dim = 0;
  PositionMode positions = PositionMode::original;
  int state_channels = 0;       // per-slot float arrays owned by the policy
  std::int64_t capacity = 0;    // slots per head reserved at construction
  RopeConfig rope{};            // rotation applied by rotated_keys() in cache_relative mode
};

template <class Scalar = float>
class KVCache {
  static_assert(is_storage_scalar_v<Scalar>,
                "KVCache stores float, Eigen::half or Eigen::bfloat16");

 public:
  using scalar_type = Scalar;
  using HeadMatrix = Eigen::Map<RowMatrix<Scalar>>;
  using ConstHeadMatrix = Eigen::Map<const RowMatrix<Scalar>>;

  explicit KVCache(const CacheConfig& config) : config_(config) {
    if (config.n_kv_heads <= 0) {
      detail::throw_invalid("KVCache: n_kv_heads (", config.n_kv_heads, ") must be at least 1");
    }
    if (config.head_dim <= 0) {
      detail::throw_invalid("KVCache: head_dim (", config.head_dim, ") must be at least 1");
    }
    if (config.state_channels < 0) {
      detail::throw_invalid("KVCache: state_channels (", config.state_channels,
                            ") must be non-negative");
    }
    if (config.capacity < 0) {
      detail::throw_invalid("KVCache: capacity (", config.capacity, ") must be non-negative");
    }
    if (config.positions == PositionMode::cache_relative) {
      rope_ = RotaryEmbedding(config.head_dim, config.rope);
    }
    reserve(config.capacity);
  }

  int n_kv_heads() const { return config_.n_kv_heads; }
  int head_dim() const { return config_.head_dim; }
  int state_channels() const { return config_.state_channels; }
  PositionMode position_mode() const { return config_.positions; }
  const CacheConfig& config() const { return config_; }
  const RotaryEmbedding& rope() const { return rope_; }

  // Slots per KV head currently stored.
  std::int64_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // Slots per KV head that fit without reallocation.
  std::int64_t capacity() const { return capacity_; }
  // Smallest position the next append may use: one past the newest position
  // ever appended (positions never repeat, even after that token is evicted).
  std::int64_t next_position() const { return next_position_; }

  // Bytes of keys, values, positions and state in use for size() slots.
  std::size_t memory_bytes() const { return bytes_for(size_); }
  // Bytes of keys, values, positions and state allocated for capacity()
  // slots. The cos and sin tables of cache_relative mode (capacity() *
  // head_dim floats) are not counted.
  std::size_t reserved_bytes() const { return bytes_for(capacity_); }

  // Allocates storage for at least `slots` slots per head. Never shrinks.
  void reserve(std::int64_t slots) {
    if (slots < 0) {
      detail::throw_invalid("KVCache::reserve: slots (", slots, ") must be non-negative");
    }
    if (slots <= capacity_) return;
    grow_to(slots);
  }

  // Appends `count` tokens to every KV head.
  //   keys, values: [n_kv_heads * count, head_dim], head-major (rows
  //     j*count .. j*count+count-1 belong to KV head j). In original mode keys
  //     are rotated at their positions; in cache_relative mode unrotated.
  //   positions: [count] original token positions, strictly increasing and
  //     at least next_position().
  // Throws std::invalid_argument on a shape mismatch, non-finite values or
  // positions out of order; the cache is then unchanged. New slots start with
  // state 0 in every channel.
  void append(const Eigen::Ref<const RowMatrixXf>& keys, const Eigen::Ref<const RowMatrixXf>& values,
              std::span<const std::int64_t> positions) {
    const auto count = static_cast<std::int64_t>(positions.size());
    check_append(keys, values, positions);
    if (count == 0) return;
    if (size_ + count > capacity_) {
      grow_to(std::max<std::int64_t>(size_ + count, capacity_ + capacity_ / 2));
    }

    const int d = config_.head_dim;
    for (int j = 0; j < config_.n_kv_heads; ++j) {
      for (std::int64_t c = 0; c < count; ++c) {
        const std::int64_t row = static_cast<std::int64_t>(j) * count + c;
        const std::int64_t slot = size_ + c;
        Scalar* key_out = key_row(j, slot);
        Scalar* value_out = value_row(j, slot);
        for (int k = 0; k < d; ++k) {
          key_out[k] = static_cast<Scalar>(keys(row, k));
          value_out[k] = static_cast<Scalar>(values(row, k));
        }
        positions_[head_offset(j) + static_cast<std::size_t>(slot)] = positions[static_cast<std::size_t>(c)];
        for (int ch = 0; ch < config_.state_channels; ++ch) {
          state_[state_offset(j, ch) + static_cast<std::size_t>(slot)] = 0.0f;
        }
      }
    }
    size_ += count;
    next_position_ = positions.back() + 1;
  }

  // Compacts every KV head to the slots of `plan`, in order. Throws
  // std::invalid_argument when the plan has the wrong head count, keeps more
  // slots than are stored, or a head's list is not strictly increasing
  // within [0, size()); the cache is then unchanged. Never allocates.
  void keep(const KeepPlan& plan) {
    check_plan(plan);
    const int d = config_.head_dim;
    for (int j = 0; j < config_.n_kv_heads; ++j) {
      const auto slots = plan.head(j);
      for (std::int64_t i = 0; i < plan.count(); ++i) {
        const std::int64_t from = slots[static_cast<std::size_t>(i)];
        if (from == i) continue;  // kept slots are increasing, so from >= i
        std::copy_n(key_row(j, from), d, key_row(j, i));
        std::copy_n(value_row(j, from), d, value_row(j, i));
        positions_[head_offset(j) + static_cast<std::size_t>(i)] =
            positions_[head_offset(j) + static_cast<std::size_t>(from)];
        for (int ch = 0; ch < config_.state_channels; ++ch) {
          float* channel = state_.data() + state_offset(j, ch);
          channel[i] = channel[from];
        }
      }
    }
    size_ = plan.count();
  }

  // Removes every token; capacity and next_position() are kept.
  void clear() { size_ = 0; }

  // Keys and values of KV head j: [size() x head_dim].
  ConstHeadMatrix keys(int j) const { return {key_row(j, 0), size_, config_.head_dim}; }
  ConstHeadMatrix values(int j) const { return {value_row(j, 0), size_, config_.head_dim}; }

  // Original token positions of KV head j's slots: [size()].
  std::span<const std::int64_t> positions(int j) const {
    check_head(j);
    return {positions_.data() + head_offset(j), static_cast<std::size_t>(size_)};
  }

  // Position at which attention rotates slot s of head j: the slot index in
  // cache_relative mode, the token position in original mode.
  std::int64_t attention_position(int j, std::int64_t s) const {
    return config_.positions == PositionMode::cache_relative
               ? s
               : positions_[head_offset(j) + static_cast<std::size_t>(s)];
  }

  // Per-slot state channel `channel` of KV head j: [size()].
  std::span<float> state(int j, int channel) {
    check_channel(j, channel);
    return {state_.data() + state_offset(j, channel), static_cast<std::size_t>(size_)};
  }
  std::span<const float> state(int j, int channel) const {
    check_channel(j, channel);
    return {state_.data() + state_offset(j, channel), static_cast<std::size_t>(size_)};
  }

  // Writes the keys of head j as attention reads them into `out`
  // [size() x head_dim] float: converted from storage, and in cache_relative
  // mode rotated as position = slot index. Uses tables precomputed for the
  // reserved capacity, so it does not allocate.
  void rotated_keys(int j, Eigen::Ref<RowMatrixXf> out) const {
    check_head(j);
    if (out.rows() != size_ || out.cols() != config_.head_dim) {
      detail::throw_invalid("KVCache::rotated_keys: out is [", out.rows(), " x ", out.cols(),
                            "], expected [", size_, " x ", config_.head_dim, "]");
    }
    out = keys(j).template cast<float>();
    if (config_.positions != PositionMode::cache_relative) return;
    const std::size_t half = static_cast<std::size_t>(config_.head_dim / 2);
    for (std::int64_t s = 0; s < size_; ++s) {
      rope_.rotate(std::span<float>(out.row(s).data(), static_cast<std::size_t>(config_.head_dim)),
                   std::span<const float>(cos_table_.data() + static_cast<std::size_t>(s) * half, half),
                   std::span<const float>(sin_table_.data() + static_cast<std::size_t>(s) * half, half));
    }
  }

  // Rotates a query (or key) vector [head_dim] in place as position `slot`
  // in cache_relative mode. It does nothing in original mode, because there
  // the engine rotates queries at their token positions.
  void rotate_at_slot(std::span<float> vector, std::int64_t slot) const {
    if (config_.positions != PositionMode::cache_relative) return;
    if (static_cast<int>(vector.size()) != config_.head_dim) {
      detail::throw_invalid("KVCache::rotate_at_slot: vector has ", vector.size(),
                            " entries, expected head_dim ", config_.head_dim);
    }
    const std::size_t half = static_cast<std::size_t>(config_.head_dim / 2);
    if (slot >= 0 && slot < capacity_) {
      rope_.rotate(vector, std::span<const float>(cos_table_.data() + static_cast<std::size_t>(slot) * half, half),
                   std::span<const float>(sin_table_.data() + static_cast<std::size_t>(slot) * half, half));
    } else {
      rope_.rotate(vector, static_cast<double>(slot));
    }
  }

 private:
  std::size_t bytes_for(std::int64_t slots) const {
    const std::size_t per_slot = 2 * static_cast<std::size_t>(config_.head_dim) * sizeof(Scalar) +
                                 sizeof(std::int64_t) +
                                 static_cast<std::size_t>(config_.state_channels) * sizeof(float);
    return per_slot * static_cast<std::size_t>(slots) * static_cast<std::size_t>(config_.n_kv_heads);
  }

  std::size_t head_offset(int j) const {
    return static_cast<std::size_t>(j) * static_cast<std::size_t>(capacity_);
  }
  std::size_t state_offset(int j, int channel) const {
    return (static_cast<std::size_t>(j) * static_cast<std::size_t>(config_.state_channels) +
            static_cast<std::size_t>(channel)) *
           static_cast<std::size_t>(capacity_);
  }
  Scalar* key_row(int j, std::int64_t s) {
    return keys_.data() + (head_offset(j) + static_cast<std::size_t>(s)) * static_cast<std::size_t>(config_.head_dim);
  }
  const Scalar* key_row(int j, std::int64_t s) const {
    check_head(j);
    return keys_.data() + (head_offset(j) + static_cast<std::size_t>(s)) * static_cast<std::size_t>(config_.head_dim);
  }
  Scalar* value_row(int j, std::int64_t s) {
    return values_.data() + (head_offset(j) + static_cast<std::size_t>(s)) * static_cast<std::size_t>(config_.head_dim);
  }
  const Scalar* value_row(int j, std::int64_t s) const {
    check_head(j);
    return values_.data() + (head_offset(j) + static_cast<std::size_t>(s)) * static_cast<std::size_t>(config_.head_dim);
  }

  void check_head(int j) const {
    if (j < 0 || j >= config_.n_kv_heads) {
      detail::throw_invalid("KVCache: KV head index (", j, ") must be in [0, ", config_.n_kv_heads, ")");
    }
  }
  void check_channel(int j, int channel) const {
    check_head(j);
    if (channel < 0 || channel >= config_.state_channels) {
      detail::throw_invalid("KVCache: state channel (", channel, ") must be in [0, ",
                            config_.state_channels,
                            "); create the cache with the policy's state_channels()");
    }
  }

  void check_append(const Eigen::Ref<const RowMatrixXf>& keys, const Eigen::Ref<const RowMatrixXf>& values,
                    std::span<const std::int64_t> positions) const {
    const auto count = static_cast<std::int64_t>(positions.size());
    const std::int64_t rows = static_cast<std::int64_t>(config_.n_kv_heads) * count;
    if (keys.rows() != rows || keys.cols() != config_.head_dim) {
      detail::throw_invalid("KVCache::append: keys are [", keys.rows(), " x ", keys.cols(),
                            "], expected [n_kv_heads * count x head_dim] = [", rows, " x ",
                            config_.head_dim, "] for ", count, " positions");
    }
    if (values.rows() != rows || values.cols() != config_.head_dim) {
      detail::throw_invalid("KVCache::append: values are [", values.rows(), " x ", values.cols(),
                            "], expected [", rows, " x ", config_.head_dim, "]");
    }
    std::int64_t previous = next_position_ - 1;
    for (std::size_t c = 0; c < positions.size(); ++c) {
      if (positions[c] <= previous) {
        detail::throw_invalid("KVCache::append: position ", positions[c], " at index ", c,
                              " must be greater than ", previous,
                              "; positions are strictly increasing across appends");
      }
      previous = positions[c];
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      for (int k = 0; k < config_.head_dim; ++k) {
        if (!std::isfinite(keys(r, k))) {
          detail::throw_invalid("KVCache::append: keys(", r, ", ", k, ") is ", keys(r, k),
                                "; keys must be finite");
        }
        if (!std::isfinite(values(r, k))) {
          detail::throw_invalid("KVCache::append: values(", r, ", ", k, ") is ", values(r, k),
                                "; values must be finite");
        }
      }
    }
  }

  void check_plan(const KeepPlan& plan) const {
    if (plan.n_kv_heads() != config_.n_kv_heads) {
      detail::throw_invalid("KVCache::keep: plan has ", plan.n_kv_heads(),
                            " KV heads, the cache has ", config_.n_kv_heads);
    }
    if (plan.count() > size_) {
      detail::throw_invalid("KVCache::keep: plan keeps ", plan.count(), " slots per head, the cache holds ",
                            size_);
    }
    for (int j = 0; j < config_.n_kv_heads; ++j) {
      const auto slots = plan.head(j);
      std::int64_t previous = -1;
      for (std::size_t i = 0; i < slots.size(); ++i) {
        const std::int64_t s = slots[i];
        if (s < 0 || s >= size_) {
          detail::throw_invalid("KVCache::keep: head ", j, " entry ", i, " is slot ", s,
                                ", outside [0, ", size_, ")");
        }
        if (s <= previous) {
          detail::throw_invalid("KVCache::keep: head ", j, " entry ", i, " is slot ", s,
                                " after slot ", previous,
                                "; kept slots must be strictly increasing (sorted, no duplicates)");
        }
        previous = s;
      }
    }
  }

  // Reallocates to `slots` per head, building the new storage first so a
  // failed allocation leaves the cache unchanged.
  void grow_to(std::int64_t slots) {
    const auto heads = static_cast<std::size_t>(config_.n_kv_heads);
    const auto d = static_cast<std::size_t>(config_.head_dim);
    const auto channels = static_cast<std::size_t>(config_.state_channels);
    const auto new_capacity = static_cast<std::size_t>(slots);
    const auto used = static_cast<std::size_t>(size_);
    const auto old_capacity = static_cast<std::size_t>(capacity_);

    std::vector<Scalar> keys(heads * new_capacity * d);
    std::vector<Scalar> values(heads * new_capacity * d);
    std::vector<std::int64_t> positions(heads * new_capacity);
    std::vector<float> state(heads * channels * new_capacity);
    std::vector<float> cos_table;
    std::vector<float> sin_table;
    if (config_.positions == PositionMode::cache_relative) {
      rope_.fill_tables(slots, cos_table, sin_table);
    }
    for (std::size_t j = 0; j < heads; ++j) {
      std::copy_n(keys_.data() + j * old_capacity * d, used * d, keys.data() + j * new_capacity * d);
      std::copy_n(values_.data() + j * old_capacity * d, used * d, values.data() + j * new_capacity * d);
      std::copy_n(positions_.data() + j * old_capacity, used, positions.data() + j * new_capacity);
      for (std::size_t ch = 0; ch < channels; ++ch) {
        std::copy_n(state_.data() + (j * channels + ch) * old_capacity, used,
                    state.data() + (j * channels + ch) * new_capacity);
      }
    }
    keys_.swap(keys);
    values_.swap(values);
    positions_.swap(positions);
    state_.swap(state);
    cos_table_.swap(cos_table);
    sin_table_.swap(sin_table);
    capacity_ = slots;
  }

  CacheConfig config_;
  RotaryEmbedding rope_;
  std::int64_t size_ = 0;
  std::int64_t capacity_ = 0;
  std::int64_t next_position_ = 0;
  std::vector<Scalar> keys_;
  std::vector<Scalar> values_;
  std::vector<std::int64_t> positions_;
  std::vector<float> state_;
  std::vector<float> cos_table_;  // [capacity x head_dim/2], cache_relative only
  std::vector<float> sin_table_;
};

}  // namespace kvevict
