// libFuzzer target for the llama2.c checkpoint parser in
// examples/llama2c/checkpoint.hpp. The input is a whole checkpoint file.
//
// FileFormatError is the parser's only documented failure. Any other
// exception, a sanitizer report, an allocation over -malloc_limit_mb, or a
// parsed checkpoint whose tensor shapes or bytes disagree with its config and
// input is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "examples/llama2c/checkpoint.hpp"

namespace {

bool has_shape(const llama2c::RowMatrixXf& matrix, int rows, int cols) {
  return matrix.rows() == rows && matrix.cols() == cols;
}

// Checks every tensor of a parsed checkpoint against its config.
bool shapes_match_config(const llama2c::Checkpoint& checkpoint) {
  const llama2c::ModelConfig& config = checkpoint.config;
  const int dim = config.dim;
  const int kv_dim = config.kv_dim();
  const int hidden = config.hidden_dim;
  const int vocab = config.vocab_size;
  if (dim <= 0 || hidden <= 0 || vocab <= 0 || config.n_layers <= 0 || config.seq_len <= 0) return false;
  if (config.n_heads <= 0 || config.n_kv_heads <= 0 || config.head_dim() * config.n_heads != dim) return false;
  if (config.head_dim() % 2 != 0 || config.kv_group_size() * config.n_kv_heads != config.n_heads) return false;
  if (checkpoint.layers.size() != static_cast<std::size_t>(config.n_layers)) return false;
  if (!has_shape(checkpoint.token_embedding, vocab, dim) || checkpoint.rms_final.size() != dim) return false;
  if (!has_shape(checkpoint.classifier(), vocab, dim)) return false;
  if (config.shared_classifier != (checkpoint.separate_classifier.size() == 0)) return false;
  for (const llama2c::LayerWeights& layer : checkpoint.layers) {
    if (layer.rms_att.size() != dim || layer.rms_ffn.size() != dim) return false;
    if (!has_shape(layer.wq, dim, dim) || !has_shape(layer.wo, dim, dim)) return false;
    if (!has_shape(layer.wk, kv_dim, dim) || !has_shape(layer.wv, kv_dim, dim)) return false;
    if (!has_shape(layer.w1, hidden, dim) || !has_shape(layer.w3, hidden, dim)) return false;
    if (!has_shape(layer.w2, dim, hidden)) return false;
  }
  return true;
}

// Checks that the first tensor and the last one read come from the right
// bytes: the token embedding follows the header, and wcls, when present,
// ends the file.
bool edge_tensors_match_bytes(const llama2c::Checkpoint& checkpoint, std::span<const std::byte> bytes) {
  const std::size_t header_bytes = llama2c::detail::checkpoint_header_bytes;
  const std::size_t embedding_bytes = static_cast<std::size_t>(checkpoint.token_embedding.size()) * sizeof(float);
  if (std::memcmp(checkpoint.token_embedding.data(), bytes.data() + header_bytes, embedding_bytes) != 0) {
    return false;
  }
  if (checkpoint.config.shared_classifier) return true;
  return std::memcmp(checkpoint.separate_classifier.data(), bytes.data() + bytes.size() - embedding_bytes,
                     embedding_bytes) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = std::as_bytes(std::span<const std::uint8_t>(data, size));
  llama2c::Checkpoint checkpoint;
  try {
    checkpoint = llama2c::parse_checkpoint(bytes, "fuzz-input");
  } catch (const llama2c::FileFormatError&) {
    return 0;
  }
  // The size check guarantees that the whole input was consumed, so the
  // expected size must equal the input size.
  if (llama2c::expected_checkpoint_bytes(checkpoint.config, "fuzz-input") != size) std::abort();
  if (!shapes_match_config(checkpoint)) std::abort();
  if (!edge_tensors_match_bytes(checkpoint, bytes)) std::abort();
  return 0;
}
