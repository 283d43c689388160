// Input tensors of kvevict-select: reads q.npy, k.npy, v.npy and wo.npy from
// one folder and checks that their shapes fit together.
#pragma once

#include "npy.hpp"

#include <kvevict/common.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvevict::tools {

// An input file that is readable but unusable (inconsistent shapes,
// non-finite values). what() starts with the file path, like NpyError's.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One attention layer's tensors, as stored in the files.
struct SelectInputs {
  NpyArray<float> queries;  // [n_heads, n_tokens, head_dim]
  NpyArray<float> keys;     // [n_kv_heads, n_tokens, head_dim]
  NpyArray<float> values;   // [n_kv_heads, n_tokens, head_dim]
  std::optional<RowMatrixXf> w_o;  // [hidden, n_heads * head_dim], when wo.npy exists
  std::filesystem::path w_o_path;  // DIR/wo.npy, whether it exists or not
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  std::int64_t n_tokens = 0;
};

namespace detail {

inline std::string path_text(const std::filesystem::path& path) { return path.string(); }

[[noreturn]] inline void fail_input(const std::filesystem::path& path, const std::string& problem) {
  throw InputError(path_text(path) + ": " + problem);
}

// Formats a shape as NumPy prints it: (2, 3, 4).
inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  return kvevict::tools::detail::format_shape(shape);
}

inline int dimension_as_int(const std::filesystem::path& path, const std::vector<std::int64_t>& shape,
                            std::size_t axis, const char* name) {
  const std::int64_t value = shape[axis];
  if (value < 1 || value > std::numeric_limits<int>::max()) {
    fail_input(path, "the shape " + shape_text(shape) + " has " + name + " = " + std::to_string(value) +
                         "; it must be in [1, " + std::to_string(std::numeric_limits<int>::max()) + "]");
  }
  return static_cast<int>(value);
}

// Throws InputError naming the file and the [i, j, ...] index of the first
// NaN or infinity.
template <class Array>
void require_finite_file(const std::filesystem::path& path, const Array& array) {
  for (std::size_t flat = 0; flat < array.data.size(); ++flat) {
    if (std::isfinite(array.data[flat])) continue;
    std::string index;
    std::size_t rest = flat;
    std::vector<std::int64_t> coordinates(array.shape.size());
    for (std::size_t axis = array.shape.size(); axis-- > 0;) {
      const auto extent = static_cast<std::size_t>(array.shape[axis]);
      coordinates[axis] = static_cast<std::int64_t>(rest % extent);
      rest /= extent;
    }
    for (std::size_t axis = 0; axis < coordinates.size(); ++axis) {
      index += (axis == 0 ? "[" : ", ") + std::to_string(coordinates[axis]);
    }
    fail_input(path, "element " + index + "] is " + std::to_string(array.data[flat]) +
                         "; every input value must be finite");
  }
}

}  // namespace detail

// Reads DIR/q.npy, k.npy, v.npy and, with `read_w_o` and when it exists,
// wo.npy (only ReST-KV reads W_o, so a bad wo.npy does not stop the other
// policies). Throws NpyError for a file that is missing or not a
// little-endian float32 C-order array of the right rank, and InputError for
// shapes that do not fit together or non-finite values. Both messages start
// with the file path.
inline SelectInputs load_select_inputs(const std::filesystem::path& dir, bool read_w_o) {
  namespace fs = std::filesystem;
  using detail::shape_text;
  const fs::path q_path = dir / "q.npy";
  const fs::path k_path = dir / "k.npy";
  const fs::path v_path = dir / "v.npy";

  SelectInputs inputs;
  inputs.queries = read_npy<float>(q_path, 3);
  inputs.keys = read_npy<float>(k_path, 3);
  inputs.values = read_npy<float>(v_path, 3);
  const auto& q_shape = inputs.queries.shape;
  const auto& k_shape = inputs.keys.shape;
  const auto& v_shape = inputs.values.shape;

  inputs.n_heads = detail::dimension_as_int(q_path, q_shape, 0, "heads");
  inputs.n_tokens = q_shape[1];
  if (inputs.n_tokens < 1) {
    detail::fail_input(q_path, "the shape " + shape_text(q_shape) + " has no tokens (n = 0); pass at least one");
  }
  inputs.head_dim = detail::dimension_as_int(q_path, q_shape, 2, "head_dim");
  inputs.n_kv_heads = detail::dimension_as_int(k_path, k_shape, 0, "kv_heads");

  if (k_shape[1] != inputs.n_tokens || k_shape[2] != inputs.head_dim) {
    detail::fail_input(k_path, "the shape " + shape_text(k_shape) + " does not fit " + detail::path_text(q_path) +
                                   " " + shape_text(q_shape) +
                                   ": keys are [kv_heads, n, head_dim] with the same n and head_dim as the queries");
  }
  if (inputs.n_heads % inputs.n_kv_heads != 0) {
    detail::fail_input(k_path, "kv_heads = " + std::to_string(inputs.n_kv_heads) + " (shape " +
                                   shape_text(k_shape) + ") does not divide heads = " +
                                   std::to_string(inputs.n_heads) + " of " + detail::path_text(q_path) +
                                   " (shape " + shape_text(q_shape) +
                                   "); each KV head serves heads / kv_heads query heads");
  }
  if (v_shape != k_shape) {
    detail::fail_input(v_path, "the shape " + shape_text(v_shape) + " differs from " + detail::path_text(k_path) +
                                   " " + shape_text(k_shape) + "; values have the shape of the keys");
  }
  detail::require_finite_file(q_path, inputs.queries);
  detail::require_finite_file(k_path, inputs.keys);
  detail::require_finite_file(v_path, inputs.values);

  inputs.w_o_path = dir / "wo.npy";
  std::error_code error;
  // On an error from exists(), read_npy reports the reason.
  if (read_w_o && (fs::exists(inputs.w_o_path, error) || error)) {
    const NpyArray<float> w_o = read_npy<float>(inputs.w_o_path, 2);
    const std::int64_t columns = static_cast<std::int64_t>(inputs.n_heads) * inputs.head_dim;
    if (w_o.shape[0] < 1 || w_o.shape[1] != columns) {
      detail::fail_input(inputs.w_o_path,
                         "the shape " + shape_text(w_o.shape) + " does not fit " + detail::path_text(q_path) + " " +
                             shape_text(q_shape) + ": W_o is [hidden, heads * head_dim] = [hidden, " +
                             std::to_string(columns) + "] with hidden >= 1");
    }
    detail::require_finite_file(inputs.w_o_path, w_o);
    inputs.w_o = Eigen::Map<const RowMatrixXf>(w_o.data.data(), w_o.shape[0], w_o.shape[1]);
  }
  return inputs;
}

}  // namespace kvevict::tools
