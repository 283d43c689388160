// Loader for llama2.c checkpoints in the legacy float32 format that
// llama2.c's run.c reads (export.py --version 0):
//
//   int32 header: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//                 vocab_size, seq_len
//   float32 weights, in this order:
//     token_embedding [vocab, dim]
//     rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
//     wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim],
//     w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim],
//     rms_final [dim],
//     freq_cis_real, freq_cis_imag [seq_len * head_dim / 2 each, unused],
//     wcls [vocab, dim], present only when the header's vocab_size is
//     negative. With a positive vocab_size the classifier is the token
//     embedding.
//
// The loader checks every header field and requires the file size to match
// the header exactly, so a truncated file or a mismatched export fails here
// and not later with garbage weights.
#pragma once

#include <Eigen/Core>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace llama2c {

static_assert(std::endian::native == std::endian::little,
              "llama2.c files are little-endian and this reader copies their bytes directly");
static_assert(sizeof(float) == 4 && std::numeric_limits<float>::is_iec559,
              "llama2.c files store IEEE 754 float32");

using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A model, tokenizer or text file that is missing, unreadable or malformed.
class FileFormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ModelConfig {
  int dim = 0;
  int hidden_dim = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;  // always positive here, because the file's sign becomes shared_classifier
  int seq_len = 0;     // trained context length
  bool shared_classifier = true;

  int head_dim() const { return dim / n_heads; }
  int kv_dim() const { return head_dim() * n_kv_heads; }
  // Query heads that read the same KV head (grouped-query attention).
  int kv_group_size() const { return n_heads / n_kv_heads; }
};

struct LayerWeights {
  Eigen::VectorXf rms_att;  // [dim]
  RowMatrixXf wq;           // [dim, dim]
  RowMatrixXf wk;           // [kv_dim, dim]
  RowMatrixXf wv;           // [kv_dim, dim]
  RowMatrixXf wo;           // [dim, dim]
  Eigen::VectorXf rms_ffn;  // [dim]
  RowMatrixXf w1;           // [hidden, dim]
  RowMatrixXf w2;           // [dim, hidden]
  RowMatrixXf w3;           // [hidden, dim]
};

struct Checkpoint {
  ModelConfig config;
  RowMatrixXf token_embedding;  // [vocab, dim]
  std::vector<LayerWeights> layers;
  Eigen::VectorXf rms_final;    // [dim]
  RowMatrixXf separate_classifier;  // [vocab, dim], empty when shared

  // Classifier weights [vocab, dim] that map the final hidden state to logits.
  const RowMatrixXf& classifier() const {
    return config.shared_classifier ? token_embedding : separate_classifier;
  }
};

namespace detail {

inline constexpr std::uint64_t checkpoint_header_bytes = 7 * sizeof(std::int32_t);

// Quotes a file path or buffer name for error messages.
inline std::string quoted(std::string_view source) { return "'" + std::string(source) + "'"; }
inline std::string quoted(const std::filesystem::path& path) { return quoted(std::string_view(path.string())); }

// Lists the header fields for error messages, with vocab_size negative
// when the file has a separate classifier, as the file stores it.
inline std::string describe_header(const ModelConfig& config) {
  std::ostringstream text;
  text << "dim " << config.dim << ", hidden_dim " << config.hidden_dim << ", n_layers " << config.n_layers
       << ", n_heads " << config.n_heads << ", n_kv_heads " << config.n_kv_heads << ", vocab_size "
       << (config.shared_classifier ? "" : "-") << config.vocab_size << ", seq_len " << config.seq_len;
  return text.str();
}

[[noreturn]] inline void throw_size_overflow(const ModelConfig& config, std::string_view source) {
  throw FileFormatError("checkpoint " + quoted(source) + ": the header (" + describe_header(config) +
                        ") describes more than 2^64 bytes of weights; the file is not a llama2.c checkpoint");
}

// Multiplies sizes read from a header, reporting overflow as a format error
// because no real checkpoint comes close to 2^64 bytes.
inline std::uint64_t checked_multiply(std::uint64_t a, std::uint64_t b, const ModelConfig& config,
                                      std::string_view source) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) throw_size_overflow(config, source);
  return a * b;
}

inline std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, const ModelConfig& config,
                                 std::string_view source) {
  if (b > std::numeric_limits<std::uint64_t>::max() - a) throw_size_overflow(config, source);
  return a + b;
}

// Returns the size of a regular file, or throws naming the path.
inline std::uint64_t file_size_or_throw(const std::filesystem::path& path, const char* kind) {
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (error || !std::filesystem::exists(status)) {
    throw FileFormatError(std::string(kind) + " file not found: " + quoted(path) + "; check the path");
  }
  if (!std::filesystem::is_regular_file(status)) {
    throw FileFormatError(std::string(kind) + " path " + quoted(path) + " is not a regular file");
  }
  const auto size = std::filesystem::file_size(path, error);
  if (error) {
    throw FileFormatError("cannot read the size of " + std::string(kind) + " file " + quoted(path) + ": " +
                          error.message());
  }
  return size;
}

inline std::ifstream open_binary_or_throw(const std::filesystem::path& path, const char* kind) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw FileFormatError("cannot open " + std::string(kind) + " file " + quoted(path) +
                          " for reading; check its permissions");
  }
  return in;
}

// Byte readers for the checkpoint and tokenizer parsers. A file and a memory
// buffer go through the same parser and its checks, and only these readers
// differ. The parsers check every size against the total before reading, so
// a failed read means the file changed while it was loaded.
class MemoryReader {
 public:
  explicit MemoryReader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  // Copies the next `count` bytes to `out`, or returns false and copies
  // nothing when fewer remain.
  bool read(void* out, std::uint64_t count) {
    if (count > bytes_.size() - offset_) return false;
    if (count > 0) std::memcpy(out, bytes_.data() + offset_, static_cast<std::size_t>(count));
    offset_ += static_cast<std::size_t>(count);
    return true;
  }

  bool skip(std::uint64_t count) {
    if (count > bytes_.size() - offset_) return false;
    offset_ += static_cast<std::size_t>(count);
    return true;
  }

 private:
  std::span<const std::byte> bytes_;
  std::size_t offset_ = 0;
};

class StreamReader {
 public:
  explicit StreamReader(std::istream& in) : in_(in) {}

  bool read(void* out, std::uint64_t count) {
    in_.read(static_cast<char*>(out), static_cast<std::streamsize>(count));
    return static_cast<bool>(in_);
  }

  bool skip(std::uint64_t count) {
    in_.seekg(static_cast<std::streamoff>(count), std::ios::cur);
    return static_cast<bool>(in_);
  }

 private:
  std::istream& in_;
};

template <class Reader>
void read_floats(Reader& reader, float* out, std::uint64_t count, std::string_view source, const char* tensor) {
  if (!reader.read(out, count * sizeof(float))) {
    throw FileFormatError("checkpoint " + quoted(source) + ": read failed in tensor " + tensor +
                          " although the file size matched the header; was the file changed while loading?");
  }
}

template <class Reader>
void read_matrix(Reader& reader, RowMatrixXf& out, int rows, int cols, std::string_view source,
                 const char* tensor) {
  out.resize(rows, cols);
  read_floats(reader, out.data(), static_cast<std::uint64_t>(out.size()), source, tensor);
}

template <class Reader>
void read_vector(Reader& reader, Eigen::VectorXf& out, int size, std::string_view source, const char* tensor) {
  out.resize(size);
  read_floats(reader, out.data(), static_cast<std::uint64_t>(size), source, tensor);
}

inline void require_positive_field(const char* field, std::int32_t value, std::string_view source) {
  if (value <= 0) {
    throw FileFormatError("checkpoint " + quoted(source) + ": header field " + field + " is " +
                          std::to_string(value) +
                          " but must be positive; the file is not a llama2.c checkpoint in the legacy "
                          "float32 format (export.py --version 0)");
  }
}

}  // namespace detail

// Checks the seven header fields and returns the config they describe.
// `source` only names the file or buffer in error messages.
inline ModelConfig validate_checkpoint_header(const std::int32_t (&header)[7], std::string_view source) {
  const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) {
    if (i == 5) {
      // A negative vocab_size is llama2.c's flag for a separate classifier.
      if (header[i] == 0 || header[i] == std::numeric_limits<std::int32_t>::min()) {
        throw FileFormatError("checkpoint " + detail::quoted(source) + ": header field vocab_size is " +
                              std::to_string(header[i]) +
                              " but must be nonzero (negative means a separate classifier follows); "
                              "the file is not a llama2.c checkpoint");
      }
      continue;
    }
    detail::require_positive_field(names[i], header[i], source);
  }

  ModelConfig config;
  config.dim = header[0];
  config.hidden_dim = header[1];
  config.n_layers = header[2];
  config.n_heads = header[3];
  config.n_kv_heads = header[4];
  config.vocab_size = header[5] < 0 ? -header[5] : header[5];
  config.shared_classifier = header[5] > 0;
  config.seq_len = header[6];

  const auto where = "checkpoint " + detail::quoted(source) + ": ";
  if (config.dim % config.n_heads != 0) {
    throw FileFormatError(where + "dim " + std::to_string(config.dim) + " is not divisible by n_heads " +
                          std::to_string(config.n_heads) + "; the header is corrupt or not from llama2.c");
  }
  if (config.n_heads % config.n_kv_heads != 0) {
    throw FileFormatError(where + "n_heads " + std::to_string(config.n_heads) +
                          " is not divisible by n_kv_heads " + std::to_string(config.n_kv_heads) +
                          "; the header is corrupt or not from llama2.c");
  }
  if (config.head_dim() % 2 != 0) {
    throw FileFormatError(where + "head_dim (dim / n_heads) is " + std::to_string(config.head_dim()) +
                          " but must be even, because RoPE rotates pairs of coordinates");
  }
  return config;
}

// Returns the exact size in bytes of a checkpoint file with this config.
inline std::uint64_t expected_checkpoint_bytes(const ModelConfig& config, std::string_view source) {
  const std::uint64_t dim = static_cast<std::uint64_t>(config.dim);
  const std::uint64_t hidden = static_cast<std::uint64_t>(config.hidden_dim);
  const std::uint64_t layers = static_cast<std::uint64_t>(config.n_layers);
  const std::uint64_t vocab = static_cast<std::uint64_t>(config.vocab_size);
  const std::uint64_t kv_dim = static_cast<std::uint64_t>(config.kv_dim());
  const std::uint64_t head_dim = static_cast<std::uint64_t>(config.head_dim());
  const std::uint64_t seq_len = static_cast<std::uint64_t>(config.seq_len);

  auto multiply = [&](std::uint64_t a, std::uint64_t b) { return detail::checked_multiply(a, b, config, source); };
  auto add = [&](std::uint64_t a, std::uint64_t b) { return detail::checked_add(a, b, config, source); };

  const std::uint64_t embedding = multiply(vocab, dim);
  std::uint64_t per_layer = multiply(2, dim);                       // rms_att, rms_ffn
  per_layer = add(per_layer, multiply(2, multiply(dim, dim)));     // wq, wo
  per_layer = add(per_layer, multiply(2, multiply(kv_dim, dim)));  // wk, wv
  per_layer = add(per_layer, multiply(3, multiply(hidden, dim)));  // w1, w2, w3
  const std::uint64_t freq_cis = multiply(seq_len, head_dim);  // real and imag, head_dim / 2 each

  std::uint64_t floats = add(embedding, multiply(layers, per_layer));
  floats = add(floats, dim);  // rms_final
  floats = add(floats, freq_cis);
  if (!config.shared_classifier) floats = add(floats, embedding);
  return add(detail::checkpoint_header_bytes, multiply(floats, sizeof(float)));
}

namespace detail {

// Parses a checkpoint of `actual_bytes` bytes from `reader`. Nothing is
// allocated before the header has been checked against `actual_bytes`, so
// a header that claims huge tensors fails without allocating them.
template <class Reader>
Checkpoint read_checkpoint(Reader& reader, std::uint64_t actual_bytes, std::string_view source) {
  if (actual_bytes < checkpoint_header_bytes) {
    throw FileFormatError("checkpoint " + quoted(source) + " has " + std::to_string(actual_bytes) +
                          " bytes, fewer than the " + std::to_string(checkpoint_header_bytes) +
                          "-byte header; the file is truncated or empty");
  }
  std::int32_t header[7];
  if (!reader.read(header, sizeof(header))) {
    throw FileFormatError("checkpoint " + quoted(source) + ": failed to read the header");
  }

  Checkpoint checkpoint;
  checkpoint.config = validate_checkpoint_header(header, source);
  const ModelConfig& config = checkpoint.config;
  const std::uint64_t expected_bytes = expected_checkpoint_bytes(config, source);
  if (expected_bytes != actual_bytes) {
    std::ostringstream message;
    message << "checkpoint " << quoted(source) << " has " << actual_bytes << " bytes but its header ("
            << describe_header(config) << ") requires " << expected_bytes << " bytes; "
            << (actual_bytes < expected_bytes ? "the file is truncated" : "the file has extra data")
            << ". Re-export it with llama2.c's export.py --version 0 (legacy float32 format)";
    throw FileFormatError(message.str());
  }

  const int dim = config.dim;
  const int kv_dim = config.kv_dim();
  const int hidden = config.hidden_dim;
  const int layers = config.n_layers;
  read_matrix(reader, checkpoint.token_embedding, config.vocab_size, dim, source, "token_embedding");

  // The file stores each tensor for all layers before the next tensor.
  checkpoint.layers.resize(static_cast<std::size_t>(layers));
  auto for_each_layer = [&](auto&& read_one) {
    for (auto& layer : checkpoint.layers) read_one(layer);
  };
  for_each_layer([&](LayerWeights& l) { read_vector(reader, l.rms_att, dim, source, "rms_att"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.wq, dim, dim, source, "wq"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.wk, kv_dim, dim, source, "wk"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.wv, kv_dim, dim, source, "wv"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.wo, dim, dim, source, "wo"); });
  for_each_layer([&](LayerWeights& l) { read_vector(reader, l.rms_ffn, dim, source, "rms_ffn"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.w1, hidden, dim, source, "w1"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.w2, dim, hidden, source, "w2"); });
  for_each_layer([&](LayerWeights& l) { read_matrix(reader, l.w3, hidden, dim, source, "w3"); });
  read_vector(reader, checkpoint.rms_final, dim, source, "rms_final");

  // Skip the precomputed RoPE tables: the model computes its own angles.
  const std::uint64_t freq_cis_bytes = static_cast<std::uint64_t>(config.seq_len) *
                                       static_cast<std::uint64_t>(config.head_dim()) * sizeof(float);
  if (!reader.skip(freq_cis_bytes)) {
    throw FileFormatError("checkpoint " + quoted(source) +
                          ": read failed near the end of the file although its size matched the header");
  }
  if (!config.shared_classifier) {
    read_matrix(reader, checkpoint.separate_classifier, config.vocab_size, dim, source, "wcls");
  }
  return checkpoint;
}

}  // namespace detail

// Parses a checkpoint from a buffer holding a whole file, with the same
// checks and messages as load_checkpoint. `source` names the buffer in error
// messages. Throws FileFormatError naming `source` and the offending field
// or size when the bytes are malformed.
inline Checkpoint parse_checkpoint(std::span<const std::byte> bytes, std::string_view source) {
  detail::MemoryReader reader(bytes);
  return detail::read_checkpoint(reader, bytes.size(), source);
}

// Loads a llama2.c checkpoint. Throws FileFormatError naming the file and the
// offending field or size when the file is missing, unreadable or malformed.
inline Checkpoint load_checkpoint(const std::filesystem::path& path) {
  const std::uint64_t actual_bytes = detail::file_size_or_throw(path, "checkpoint");
  std::ifstream in = detail::open_binary_or_throw(path, "checkpoint");
  detail::StreamReader reader(in);
  return detail::read_checkpoint(reader, actual_bytes, path.string());
}

}  // namespace llama2c
