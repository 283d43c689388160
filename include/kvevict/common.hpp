// Shared vocabulary of kvevict: matrix aliases, position modes, error
// helpers and the keep plan that every policy returns.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvevict {

// Row-major float matrix: every [rows x cols] block in kvevict is row-major.
using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rotation convention of cached keys under rotary position embedding (RoPE).
//  - original: keys are stored rotated at their token position.
//  - cache_relative: keys are stored before rotation and rotated at
//    attention time as the position equal to their slot index, so every
//    position stays below the cache size (StreamingLLM's way to run past the
//    trained context).
enum class PositionMode { original, cache_relative };

inline std::string_view to_string(PositionMode mode) {
  return mode == PositionMode::original ? "original" : "cache_relative";
}

// Storage types a cache accepts. Kernels always accumulate in float.
template <class Scalar>
inline constexpr bool is_storage_scalar_v =
    std::is_same_v<Scalar, float> || std::is_same_v<Scalar, Eigen::half> ||
    std::is_same_v<Scalar, Eigen::bfloat16>;

namespace detail {

// Builds a message from streamable parts, so error text can name values.
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

template <class... Parts>
[[noreturn]] void throw_invalid(Parts&&... parts) {
  throw std::invalid_argument(concat(std::forward<Parts>(parts)...));
}

// True when none of the `count` values is NaN or infinity. Vectorised:
// decode steps check every attention row and the window queries, and a
// scalar loop with an early exit costs as much as the policy's own work.
// x * 0 is 0 for finite x and NaN for NaN or infinity, so the sum is 0
// exactly when every value is finite.
inline bool all_finite(const float* data, std::int64_t count) {
  return count <= 0 || (Eigen::Map<const Eigen::ArrayXf>(data, count) * 0.0f).sum() == 0.0f;
}

// Throws std::invalid_argument naming `what` and the first offending index
// when `data` contains NaN or infinity.
inline void require_finite(const float* data, std::int64_t count, std::string_view what) {
  if (all_finite(data, count)) return;
  for (std::int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(data[i])) {
      throw_invalid(what, " contains a non-finite value (", data[i], ") at flat index ", i,
                    "; pass finite values (check the model for overflow or uninitialised memory)");
    }
  }
}

}  // namespace detail

// A policy's decision: for every KV head, the slots to keep, strictly
// increasing. Every head keeps the same number of slots (`count`), so the
// compacted cache stays rectangular even when heads keep different tokens.
//
// `reset` reuses the existing allocation, so a plan held across decode steps
// does not allocate once it has reached its largest size.
class KeepPlan {
 public:
  KeepPlan() = default;
  KeepPlan(int n_kv_heads, std::int64_t count) { reset(n_kv_heads, count); }

  void reset(int n_kv_heads, std::int64_t count) {
    if (n_kv_heads < 0 || count < 0) {
      detail::throw_invalid("KeepPlan: n_kv_heads (", n_kv_heads, ") and count (", count,
                            ") must be non-negative");
    }
    n_kv_heads_ = n_kv_heads;
    count_ = count;
    slots_.resize(static_cast<std::size_t>(n_kv_heads) * static_cast<std::size_t>(count));
  }

  int n_kv_heads() const { return n_kv_heads_; }
  std::int64_t count() const { return count_; }

  std::span<std::int64_t> head(int j) {
    return {slots_.data() + static_cast<std::size_t>(j) * static_cast<std::size_t>(count_),
            static_cast<std::size_t>(count_)};
  }
  std::span<const std::int64_t> head(int j) const {
    return {slots_.data() + static_cast<std::size_t>(j) * static_cast<std::size_t>(count_),
            static_cast<std::size_t>(count_)};
  }

  // Fills every head with 0..count-1, the plan that keeps a cache unchanged.
  void fill_identity() {
    for (int j = 0; j < n_kv_heads_; ++j) {
      auto row = head(j);
      for (std::int64_t s = 0; s < count_; ++s) row[static_cast<std::size_t>(s)] = s;
    }
  }

  friend bool operator==(const KeepPlan&, const KeepPlan&) = default;

 private:
  int n_kv_heads_ = 0;
  std::int64_t count_ = 0;
  std::vector<std::int64_t> slots_;
};

}  // namespace kvevict
