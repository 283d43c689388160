// Tests of the llama2.c engine in examples/llama2c: file loaders and their
// errors, the tokenizer, the text protocol, the forward pass against a
// float64 reference, allocation-free decoding, and (with real model files)
// the known-good outputs of the stories260K model.
//
// Tests tagged [assets] read the model files from the folder named by the
// KVEVICT_ASSETS environment variable (models/stories260K.bin,
// models/tok512.bin, data/tinystories_val.txt). Without it they print a
// warning and pass.

// Eigen's own heap use (which bypasses operator new) is made checkable: a
// forbidden allocation then throws, because Release builds drop asserts.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)                                                      \
  do {                                                                               \
    if (!(condition)) throw std::logic_error("Eigen assertion failed: " #condition); \
  } while (false)

#include "examples/llama2c/checkpoint.hpp"
#include "examples/llama2c/model.hpp"
#include "examples/llama2c/perplexity.hpp"
#include "examples/llama2c/recent_window.hpp"
#include "examples/llama2c/text.hpp"
#include "examples/llama2c/tokenizer.hpp"

#include "kvevict/policies/policy.hpp"
#include "kvevict/policies/streaming_llm.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <vector>

// Counts operator new calls while `counting_allocations` is set, so a test
// can prove that a decode step does not allocate.
namespace {
std::atomic<bool> counting_allocations{false};
std::atomic<long> allocation_count{0};
}  // namespace

// noinline keeps GCC 12 from pairing an inlined std::free with operator new
// and reporting -Wmismatched-new-delete.
[[gnu::noinline]] void* operator new(std::size_t size) {
  if (counting_allocations.load(std::memory_order_relaxed)) allocation_count.fetch_add(1);
  if (void* memory = std::malloc(size == 0 ? 1 : size)) return memory;
  throw std::bad_alloc();
}
// Catch2 allocates with the nothrow form and frees with plain delete, so it
// must come from the same malloc, or AddressSanitizer reports a mismatch.
[[gnu::noinline]] void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
[[gnu::noinline]] void operator delete(void* memory) noexcept { std::free(memory); }
[[gnu::noinline]] void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }

namespace {

namespace fs = std::filesystem;
using llama2c::FileFormatError;
using llama2c::Tokenizer;
using Catch::Contains;

// ---------------------------------------------------------------------------
// Files written by the tests.

// A fresh directory under the system temporary directory, removed at scope exit.
class TemporaryDirectory {
 public:
  TemporaryDirectory() {
    static int counter = 0;
    std::random_device seed;
    path_ = fs::temp_directory_path() /
            ("kvevict_llama2c_test_" + std::to_string(seed()) + "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TemporaryDirectory() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TemporaryDirectory(const TemporaryDirectory&) = delete;
  TemporaryDirectory& operator=(const TemporaryDirectory&) = delete;

  fs::path file(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

template <class T>
void append_raw(std::string& bytes, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  bytes.append(raw, sizeof(T));
}

struct Header {
  std::int32_t dim = 16;
  std::int32_t hidden_dim = 24;
  std::int32_t n_layers = 2;
  std::int32_t n_heads = 4;
  std::int32_t n_kv_heads = 2;
  std::int32_t vocab_size = 32;  // negative: separate classifier
  std::int32_t seq_len = 64;
};

// Float count of a well-formed checkpoint, written out independently of
// the loader's own formula.
std::size_t checkpoint_float_count(const Header& h) {
  const std::size_t vocab = static_cast<std::size_t>(std::abs(h.vocab_size));
  const std::size_t dim = static_cast<std::size_t>(h.dim);
  const std::size_t head_dim = dim / static_cast<std::size_t>(h.n_heads);
  const std::size_t kv_dim = head_dim * static_cast<std::size_t>(h.n_kv_heads);
  const std::size_t layers = static_cast<std::size_t>(h.n_layers);
  const std::size_t hidden = static_cast<std::size_t>(h.hidden_dim);
  std::size_t count = vocab * dim;                                   // token_embedding
  count += layers * (dim + dim * dim + 2 * kv_dim * dim + dim * dim);  // rms_att, wq, wk, wv, wo
  count += layers * (dim + 3 * hidden * dim);                         // rms_ffn, w1, w2, w3
  count += dim;                                                       // rms_final
  count += static_cast<std::size_t>(h.seq_len) * head_dim;            // freq_cis_real + imag
  if (h.vocab_size < 0) count += vocab * dim;                         // wcls
  return count;
}

// Serialises a checkpoint whose i-th float is value(i).
std::string checkpoint_bytes(const Header& h, std::size_t float_count, const std::function<float(std::size_t)>& value) {
  std::string bytes;
  for (const std::int32_t field : {h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len}) {
    append_raw(bytes, field);
  }
  for (std::size_t i = 0; i < float_count; ++i) append_raw(bytes, value(i));
  return bytes;
}

std::string index_checkpoint(const Header& h) {
  return checkpoint_bytes(h, checkpoint_float_count(h), [](std::size_t i) { return static_cast<float>(i); });
}

std::string random_checkpoint(const Header& h, unsigned seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  return checkpoint_bytes(h, checkpoint_float_count(h), [&](std::size_t) { return uniform(generator); });
}

using Vocabulary = std::vector<std::pair<std::string, float>>;

// The first 259 tokens of every llama2.c tokenizer: <unk>, BOS, EOS and the
// 256 byte-fallback pieces.
Vocabulary base_vocabulary() {
  Vocabulary vocabulary = {{"<unk>", 0.0f}, {"\n<s>\n", 0.0f}, {"\n</s>\n", 0.0f}};
  static constexpr char hex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    vocabulary.push_back({std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">", 0.0f});
  }
  return vocabulary;
}

std::string tokenizer_bytes(std::int32_t max_token_length, const Vocabulary& vocabulary) {
  std::string bytes;
  append_raw(bytes, max_token_length);
  for (const auto& [piece, score] : vocabulary) {
    append_raw(bytes, score);
    append_raw(bytes, static_cast<std::int32_t>(piece.size()));
    bytes += piece;
  }
  return bytes;
}

// A small vocabulary with merges chosen to exercise ties and scores.
Vocabulary merge_vocabulary() {
  Vocabulary vocabulary = base_vocabulary();
  const Vocabulary extra = {{" ", -100.0f}, {"a", -1.0f},  {"b", -2.0f},    {"aa", 5.0f},
                            {"ab", 6.0f},   {"aaaa", 7.0f}, {" a", 1.0f},   {"\xC3\xA9", -3.0f},
                            {"bb", -2e10f}, {" ab", 4.0f},  {"ba", 5.0f}};
  vocabulary.insert(vocabulary.end(), extra.begin(), extra.end());
  return vocabulary;
}

Tokenizer load_vocabulary(const TemporaryDirectory& directory, const Vocabulary& vocabulary) {
  const fs::path path = directory.file("tokenizer.bin");
  write_bytes(path, tokenizer_bytes(8, vocabulary));
  return Tokenizer::load(path, static_cast<int>(vocabulary.size()));
}

// llama2.c's encode loop, ported literally (quadratic), as the oracle for
// the tokenizer's priority-queue merging.
std::vector<int> reference_encode(const Tokenizer& tokenizer, std::string_view text, bool bos) {
  std::vector<int> tokens;
  if (bos) tokens.push_back(Tokenizer::bos_id);
  if (!text.empty()) tokens.push_back(tokenizer.find(" "));
  std::string buffer;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if ((c & 0xC0) != 0x80) buffer.clear();
    buffer += static_cast<char>(c);
    const bool next_is_continuation =
        i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
    if (next_is_continuation && buffer.size() < 4) continue;
    const int id = tokenizer.find(buffer);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (const char byte : buffer) tokens.push_back(static_cast<unsigned char>(byte) + 3);
    }
    buffer.clear();
  }
  while (true) {
    float best_score = -1e10f;
    int best_id = -1;
    int best_index = -1;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const std::string merged = std::string(tokenizer.piece(tokens[i])) + std::string(tokenizer.piece(tokens[i + 1]));
      const int id = tokenizer.find(merged);
      if (id != -1 && tokenizer.score(id) > best_score) {
        best_score = tokenizer.score(id);
        best_id = id;
        best_index = static_cast<int>(i);
      }
    }
    if (best_index == -1) break;
    tokens[static_cast<std::size_t>(best_index)] = best_id;
    tokens.erase(tokens.begin() + best_index + 1);
  }
  return tokens;
}

std::vector<int> ids_of(const Tokenizer& tokenizer, std::initializer_list<std::string_view> pieces) {
  std::vector<int> ids;
  for (const std::string_view piece : pieces) {
    const int id = tokenizer.find(piece);
    REQUIRE(id >= 0);
    ids.push_back(id);
  }
  return ids;
}

// ---------------------------------------------------------------------------
// Float64 reference of the forward pass with an explicit visible-token rule.

struct ReferenceOptions {
  std::int64_t budget = 0;  // 0: every token stays visible
  std::int64_t sink_count = 0;
  bool cache_relative = false;
};

class ReferenceModel {
 public:
  ReferenceModel(const llama2c::Checkpoint& checkpoint, ReferenceOptions options)
      : weights_(checkpoint), options_(options), keys_(checkpoint.layers.size()), values_(checkpoint.layers.size()) {}

  // Logits after reading `token` at position t = number of earlier calls.
  Eigen::VectorXd step(int token) {
    const llama2c::ModelConfig& config = weights_.config;
    const int head_dim = config.head_dim();
    const auto t = static_cast<std::int64_t>(keys_[0].size());
    const std::vector<std::int64_t> visible = visible_tokens(t);
    Eigen::VectorXd x = weights_.token_embedding.row(token).transpose().cast<double>();

    for (std::size_t l = 0; l < weights_.layers.size(); ++l) {
      const llama2c::LayerWeights& layer = weights_.layers[l];
      const Eigen::VectorXd xb = rms_norm(x, layer.rms_att);
      Eigen::VectorXd q = layer.wq.cast<double>() * xb;
      keys_[l].push_back(layer.wk.cast<double>() * xb);
      values_[l].push_back(layer.wv.cast<double>() * xb);

      Eigen::VectorXd attention_out = Eigen::VectorXd::Zero(config.dim);
      for (int h = 0; h < config.n_heads; ++h) {
        const int kv_head = h / config.kv_group_size();
        const auto query_position = static_cast<double>(options_.cache_relative ? visible.size() - 1 : t);
        const Eigen::VectorXd qh = rotate(q.segment(h * head_dim, head_dim), query_position);
        std::vector<double> scores;
        for (std::size_t rank = 0; rank < visible.size(); ++rank) {
          const std::int64_t u = visible[rank];
          const auto key_position = static_cast<double>(options_.cache_relative ? rank : u);
          const Eigen::VectorXd key =
              rotate(keys_[l][static_cast<std::size_t>(u)].segment(kv_head * head_dim, head_dim), key_position);
          scores.push_back(qh.dot(key) / std::sqrt(static_cast<double>(head_dim)));
        }
        const double max_score = *std::max_element(scores.begin(), scores.end());
        double total = 0.0;
        for (double& score : scores) total += (score = std::exp(score - max_score));
        for (std::size_t rank = 0; rank < visible.size(); ++rank) {
          attention_out.segment(h * head_dim, head_dim) +=
              scores[rank] / total *
              values_[l][static_cast<std::size_t>(visible[rank])].segment(kv_head * head_dim, head_dim);
        }
      }
      x += layer.wo.cast<double>() * attention_out;
      const Eigen::VectorXd xf = rms_norm(x, layer.rms_ffn);
      const Eigen::VectorXd gate = layer.w1.cast<double>() * xf;
      const Eigen::VectorXd up = layer.w3.cast<double>() * xf;
      const Eigen::VectorXd hidden = (gate.array() / (1.0 + (-gate.array()).exp()) * up.array()).matrix();
      x += layer.w2.cast<double>() * hidden;
    }
    return weights_.classifier().cast<double>() * rms_norm(x, weights_.rms_final);
  }

 private:
  std::vector<std::int64_t> visible_tokens(std::int64_t t) const {
    std::vector<std::int64_t> visible;
    for (std::int64_t u = 0; u <= t; ++u) {
      const bool sink = u < options_.sink_count;
      const bool recent = options_.budget == 0 || u > t - (options_.budget - options_.sink_count);
      if (sink || recent) visible.push_back(u);
    }
    return visible;
  }

  static Eigen::VectorXd rms_norm(const Eigen::VectorXd& x, const Eigen::VectorXf& weight) {
    const double inverse_rms = 1.0 / std::sqrt(x.squaredNorm() / static_cast<double>(x.size()) + 1e-5);
    return (weight.cast<double>().array() * x.array() * inverse_rms).matrix();
  }

  static Eigen::VectorXd rotate(Eigen::VectorXd v, double position) {
    const auto head_dim = static_cast<double>(v.size());
    for (Eigen::Index k = 0; k < v.size() / 2; ++k) {
      const double angle = position * std::pow(10000.0, -2.0 * static_cast<double>(k) / head_dim);
      const double a = v(2 * k);
      const double b = v(2 * k + 1);
      v(2 * k) = a * std::cos(angle) - b * std::sin(angle);
      v(2 * k + 1) = a * std::sin(angle) + b * std::cos(angle);
    }
    return v;
  }

  const llama2c::Checkpoint& weights_;
  ReferenceOptions options_;
  std::vector<std::vector<Eigen::VectorXd>> keys_;  // [layer][token], unrotated
  std::vector<std::vector<Eigen::VectorXd>> values_;
};

llama2c::Checkpoint load_random_checkpoint(const TemporaryDirectory& directory, const Header& header, unsigned seed) {
  const fs::path path = directory.file("random.bin");
  write_bytes(path, random_checkpoint(header, seed));
  return llama2c::load_checkpoint(path);
}

// Runs `steps` tokens through the model and the reference and returns the
// largest absolute logit difference.
double max_logit_difference(const llama2c::Checkpoint& checkpoint, ReferenceOptions options, int steps) {
  llama2c::Model model(checkpoint);
  ReferenceModel reference(checkpoint, options);
  const auto mode = options.cache_relative ? kvevict::PositionMode::cache_relative : kvevict::PositionMode::original;
  auto caches = llama2c::make_layer_caches(model.config(), mode, 0);
  std::optional<llama2c::RecentWindow> window;
  if (options.budget > 0) window.emplace(options.budget, options.sink_count);

  double worst = 0.0;
  for (int t = 0; t < steps; ++t) {
    const int token = (t * 7 + 3) % model.config().vocab_size;
    if (window) window->make_room(std::span(caches));
    const auto logits = model.forward(token, t, std::span(caches));
    const Eigen::VectorXd expected = reference.step(token);
    for (Eigen::Index i = 0; i < expected.size(); ++i) {
      worst = std::max(worst, std::abs(static_cast<double>(logits[static_cast<std::size_t>(i)]) - expected(i)));
    }
  }
  return worst;
}

// ---------------------------------------------------------------------------
// Real model files.

struct Assets {
  fs::path checkpoint;
  fs::path tokenizer;
  fs::path text;
};

// Returns the asset paths, or nothing after a warning when KVEVICT_ASSETS is
// unset. A set variable with missing files fails the test.
std::optional<Assets> find_assets(const std::string& test) {
  const char* root = std::getenv("KVEVICT_ASSETS");
  if (root == nullptr || *root == '\0') {
    WARN("KVEVICT_ASSETS is not set; skipping " << test
                                                << " (set it to the folder holding models/ and data/)");
    return std::nullopt;
  }
  Assets assets{fs::path(root) / "models/stories260K.bin", fs::path(root) / "models/tok512.bin",
                fs::path(root) / "data/tinystories_val.txt"};
  for (const fs::path& path : {assets.checkpoint, assets.tokenizer, assets.text}) {
    INFO("KVEVICT_ASSETS is set but " << path << " is missing");
    REQUIRE(fs::exists(path));
  }
  return assets;
}

struct LoadedAssets {
  llama2c::Model model;
  Tokenizer tokenizer;
  std::vector<int> ids;
};

LoadedAssets load_assets(const Assets& assets) {
  llama2c::Model model(llama2c::load_checkpoint(assets.checkpoint));
  Tokenizer tokenizer = Tokenizer::load(assets.tokenizer, model.config().vocab_size);
  std::vector<int> ids = llama2c::load_token_ids(assets.text, tokenizer);
  return {std::move(model), std::move(tokenizer), std::move(ids)};
}

// Perplexity of the first `n` ids with a recent window of `budget` tokens
// (0: no limit), `sinks` of them attention sinks, in position mode `mode`.
double perplexity_of_prefix(LoadedAssets& loaded, std::size_t n, std::int64_t budget, std::int64_t sinks,
                            kvevict::PositionMode mode) {
  REQUIRE(loaded.ids.size() >= n);
  const std::int64_t reserved = budget > 0 ? budget : static_cast<std::int64_t>(n);
  auto caches = llama2c::make_layer_caches(loaded.model.config(), mode, reserved);
  loaded.model.reserve_context(reserved);
  const std::span<const int> ids(loaded.ids.data(), n);
  if (budget == 0) {
    auto no_eviction = [](std::int64_t, std::span<kvevict::KVCache<float>>) {};
    return llama2c::evaluate_perplexity(loaded.model, ids, std::span(caches), no_eviction).perplexity();
  }
  llama2c::RecentWindow window(budget, sinks);
  auto evict = [&](std::int64_t, std::span<kvevict::KVCache<float>> layer_caches) { window.make_room(layer_caches); };
  return llama2c::evaluate_perplexity(loaded.model, ids, std::span(caches), evict).perplexity();
}

}  // namespace

// ===========================================================================
// Checkpoint loader.

TEST_CASE("checkpoint loads tensors in file order", "[llama2c][checkpoint]") {
  TemporaryDirectory directory;
  Header header;
  const fs::path path = directory.file("model.bin");
  write_bytes(path, index_checkpoint(header));
  const llama2c::Checkpoint checkpoint = llama2c::load_checkpoint(path);
  const llama2c::ModelConfig& config = checkpoint.config;

  CHECK(config.dim == 16);
  CHECK(config.hidden_dim == 24);
  CHECK(config.n_layers == 2);
  CHECK(config.n_heads == 4);
  CHECK(config.n_kv_heads == 2);
  CHECK(config.vocab_size == 32);
  CHECK(config.seq_len == 64);
  CHECK(config.shared_classifier);
  CHECK(config.head_dim() == 4);
  CHECK(config.kv_dim() == 8);

  // Each float's value is its index in the file, so offsets prove the order.
  const float dim = 16, hidden = 24, kv_dim = 8, vocab = 32;
  float offset = 0;
  CHECK(checkpoint.token_embedding(0, 0) == offset);
  CHECK(checkpoint.token_embedding(1, 0) == dim);  // row-major
  offset += vocab * dim;
  CHECK(checkpoint.layers[0].rms_att(0) == offset);
  CHECK(checkpoint.layers[1].rms_att(0) == offset + dim);
  offset += 2 * dim;
  CHECK(checkpoint.layers[0].wq(0, 1) == offset + 1);
  CHECK(checkpoint.layers[1].wq(0, 0) == offset + dim * dim);
  offset += 2 * dim * dim;
  CHECK(checkpoint.layers[0].wk(1, 0) == offset + dim);
  offset += 2 * kv_dim * dim;
  CHECK(checkpoint.layers[0].wv(0, 0) == offset);
  offset += 2 * kv_dim * dim;
  CHECK(checkpoint.layers[0].wo(0, 0) == offset);
  offset += 2 * dim * dim;
  CHECK(checkpoint.layers[0].rms_ffn(0) == offset);
  offset += 2 * dim;
  CHECK(checkpoint.layers[0].w1(0, 0) == offset);
  CHECK(checkpoint.layers[0].w1.rows() == 24);
  offset += 2 * hidden * dim;
  CHECK(checkpoint.layers[0].w2(0, 1) == offset + 1);
  CHECK(checkpoint.layers[0].w2.cols() == 24);
  offset += 2 * dim * hidden;
  CHECK(checkpoint.layers[1].w3(0, 0) == offset + hidden * dim);
  offset += 2 * hidden * dim;
  CHECK(checkpoint.rms_final(0) == offset);
  CHECK(&checkpoint.classifier() == &checkpoint.token_embedding);
}

TEST_CASE("checkpoint reads separate classifier", "[llama2c][checkpoint]") {
  TemporaryDirectory directory;
  Header header;
  header.vocab_size = -32;
  const fs::path path = directory.file("model.bin");
  write_bytes(path, index_checkpoint(header));
  const llama2c::Checkpoint checkpoint = llama2c::load_checkpoint(path);

  CHECK(checkpoint.config.vocab_size == 32);
  CHECK_FALSE(checkpoint.config.shared_classifier);
  REQUIRE(checkpoint.classifier().rows() == 32);
  REQUIRE(checkpoint.classifier().cols() == 16);
  // wcls is the last tensor, right after the skipped RoPE tables.
  const auto first_classifier_float = static_cast<float>(checkpoint_float_count(header) - 32 * 16);
  CHECK(checkpoint.classifier()(0, 0) == first_classifier_float);
}

TEST_CASE("checkpoint rejects truncated file", "[llama2c][checkpoint][errors]") {
  TemporaryDirectory directory;
  Header header;
  std::string bytes = index_checkpoint(header);
  const std::size_t full_size = bytes.size();
  bytes.resize(full_size - 10);
  const fs::path path = directory.file("truncated.bin");
  write_bytes(path, bytes);

  REQUIRE_THROWS_AS(llama2c::load_checkpoint(path), FileFormatError);
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains(path.string()));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("has " + std::to_string(full_size - 10) + " bytes"));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("requires " + std::to_string(full_size) + " bytes"));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("truncated"));
}

TEST_CASE("checkpoint rejects header that disagrees with size", "[llama2c][checkpoint][errors]") {
  TemporaryDirectory directory;
  Header written;
  written.n_layers = 3;
  std::string bytes = index_checkpoint(written);
  // The header claims 2 layers, but the weights are those of 3.
  const std::int32_t two_layers = 2;
  std::memcpy(bytes.data() + 2 * sizeof(std::int32_t), &two_layers, sizeof(two_layers));
  const fs::path path = directory.file("mismatch.bin");
  write_bytes(path, bytes);

  Header claimed;
  const std::size_t claimed_size = 7 * sizeof(std::int32_t) + checkpoint_float_count(claimed) * sizeof(float);
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("has " + std::to_string(bytes.size()) + " bytes"));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("requires " + std::to_string(claimed_size)));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("n_layers 2"));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("extra data"));
}

TEST_CASE("checkpoint rejects invalid header fields", "[llama2c][checkpoint][errors]") {
  struct Case {
    const char* name;
    std::function<void(Header&)> corrupt;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"zero dim", [](Header& h) { h.dim = 0; }, "dim is 0 but must be positive"},
      {"negative hidden_dim", [](Header& h) { h.hidden_dim = -24; }, "hidden_dim is -24 but must be positive"},
      {"zero n_layers", [](Header& h) { h.n_layers = 0; }, "n_layers is 0"},
      {"negative n_heads", [](Header& h) { h.n_heads = -4; }, "n_heads is -4"},
      {"zero n_kv_heads", [](Header& h) { h.n_kv_heads = 0; }, "n_kv_heads is 0"},
      {"zero vocab_size", [](Header& h) { h.vocab_size = 0; }, "vocab_size is 0 but must be nonzero"},
      {"negative seq_len", [](Header& h) { h.seq_len = -1; }, "seq_len is -1"},
      {"dim not divisible by n_heads", [](Header& h) { h.n_heads = 3; }, "dim 16 is not divisible by n_heads 3"},
      {"n_heads not divisible by n_kv_heads", [](Header& h) { h.n_kv_heads = 3; },
       "n_heads 4 is not divisible by n_kv_heads 3"},
      {"odd head_dim", [](Header& h) { h.dim = 12; h.n_heads = 4; }, "head_dim (dim / n_heads) is 3"},
  };
  TemporaryDirectory directory;
  for (const Case& test : cases) {
    SECTION(test.name) {
      Header header;
      test.corrupt(header);
      const fs::path path = directory.file("bad_header.bin");
      // Only the header matters: validation runs before the size check.
      write_bytes(path, checkpoint_bytes(header, 100, [](std::size_t) { return 0.0f; }));
      REQUIRE_THROWS_AS(llama2c::load_checkpoint(path), FileFormatError);
      REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains(test.expected));
      REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains(path.string()));
    }
  }
}

TEST_CASE("checkpoint rejects missing and headerless files", "[llama2c][checkpoint][errors]") {
  TemporaryDirectory directory;
  const fs::path missing = directory.file("missing.bin");
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(missing), Contains("not found") && Contains(missing.string()));

  const fs::path short_file = directory.file("short.bin");
  write_bytes(short_file, std::string(12, '\0'));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(short_file),
                      Contains("has 12 bytes, fewer than the 28-byte header") && Contains(short_file.string()));

  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(directory.file("")), Contains("not a regular file"));
}

TEST_CASE("checkpoint rejects sizes that overflow", "[llama2c][checkpoint][errors]") {
  TemporaryDirectory directory;
  Header header;
  header.dim = 1 << 30;
  header.n_heads = 2;
  header.n_kv_heads = 2;
  header.hidden_dim = 1 << 30;
  header.n_layers = 1 << 30;
  const fs::path path = directory.file("huge.bin");
  write_bytes(path, checkpoint_bytes(header, 4, [](std::size_t) { return 0.0f; }));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(path), Contains("more than 2^64 bytes"));
}

// ===========================================================================
// Tokenizer.

TEST_CASE("tokenizer loads pieces and scores", "[llama2c][tokenizer]") {
  TemporaryDirectory directory;
  const Vocabulary vocabulary = merge_vocabulary();
  const Tokenizer tokenizer = load_vocabulary(directory, vocabulary);

  CHECK(tokenizer.vocab_size() == static_cast<int>(vocabulary.size()));
  CHECK(tokenizer.max_token_length() == 8);
  CHECK(tokenizer.piece(1) == "\n<s>\n");
  CHECK(tokenizer.piece(3 + 0x41) == "<0x41>");
  CHECK(tokenizer.find("ab") == 263);
  CHECK(tokenizer.score(263) == 6.0f);
  CHECK(tokenizer.find("missing") == -1);
}

TEST_CASE("tokenizer merges like llama2.c", "[llama2c][tokenizer]") {
  TemporaryDirectory directory;
  const Tokenizer tokenizer = load_vocabulary(directory, merge_vocabulary());

  SECTION("empty text has no leading space") {
    CHECK(tokenizer.encode("", false).empty());
    CHECK(tokenizer.encode("", true) == std::vector<int>{Tokenizer::bos_id});
  }
  SECTION("leftmost pair wins a tie") {
    // (a, a) scores 5 at positions 1 and 2; llama2.c merges position 1.
    CHECK(tokenizer.encode("aaa", false) == ids_of(tokenizer, {" ", "aa", "a"}));
  }
  SECTION("higher score wins over an earlier pair") {
    // " a" (1) < "ab" (6): the pair (a, b) merges first, then " ab" (4).
    CHECK(tokenizer.encode("ab", false) == ids_of(tokenizer, {" ab"}));
  }
  SECTION("merges chain") {
    // aa (5) twice, then the two "aa" tokens merge into "aaaa" (7).
    CHECK(tokenizer.encode("aaaa", false) == ids_of(tokenizer, {" ", "aaaa"}));
    CHECK(tokenizer.encode("baaaa", false) == reference_encode(tokenizer, "baaaa", false));
  }
  SECTION("merges scoring at most -1e10 never happen") {
    CHECK(tokenizer.encode("bb", false) == ids_of(tokenizer, {" ", "b", "b"}));
  }
  SECTION("code points without a token fall back to bytes") {
    // U+00FC is "\xC3\xBC": tokens 0xC3 + 3 and 0xBC + 3.
    CHECK(tokenizer.encode("\xC3\xBC", false) == std::vector<int>{tokenizer.find(" "), 0xC3 + 3, 0xBC + 3});
    CHECK(tokenizer.encode("\xC3\xA9", false) == ids_of(tokenizer, {" ", "\xC3\xA9"}));
  }
  SECTION("BOS starts the sequence") {
    CHECK(tokenizer.encode("b", true) == std::vector<int>{Tokenizer::bos_id, tokenizer.find(" "), tokenizer.find("b")});
  }
  SECTION("random texts match the quadratic reference") {
    std::mt19937 generator(7);
    const std::vector<std::string> symbols = {"a", "b", " ", "\xC3\xA9", "\xC3\xBC", "\xE2\x82\xAC", "a"};
    std::uniform_int_distribution<std::size_t> pick(0, symbols.size() - 1);
    std::uniform_int_distribution<int> length(0, 40);
    for (int trial = 0; trial < 500; ++trial) {
      std::string text;
      for (int i = length(generator); i > 0; --i) text += symbols[pick(generator)];
      INFO("text: '" << text << "'");
      CHECK(tokenizer.encode(text, trial % 2 == 0) == reference_encode(tokenizer, text, trial % 2 == 0));
    }
  }
}

TEST_CASE("tokenizer decodes like llama2.c", "[llama2c][tokenizer]") {
  TemporaryDirectory directory;
  const Tokenizer tokenizer = load_vocabulary(directory, merge_vocabulary());
  const int space_a = tokenizer.find(" a");

  CHECK(tokenizer.decode(Tokenizer::bos_id, space_a) == "a");  // leading space dropped after BOS
  CHECK(tokenizer.decode(space_a, space_a) == " a");
  CHECK(tokenizer.decode(space_a, 0x0A + 3) == "\n");          // "<0x0A>" is the byte 0x0A
  CHECK(tokenizer.decode(space_a, 0x00 + 3) == std::string_view("\0", 1));
  REQUIRE_THROWS_WITH(tokenizer.decode(space_a, tokenizer.vocab_size()), Contains("token id"));
}

TEST_CASE("tokenizer rejects text that is not UTF-8", "[llama2c][tokenizer][errors]") {
  TemporaryDirectory directory;
  const Tokenizer tokenizer = load_vocabulary(directory, merge_vocabulary());

  REQUIRE_THROWS_AS(tokenizer.encode("ab\xFF" "cd", false), std::invalid_argument);
  REQUIRE_THROWS_WITH(tokenizer.encode("ab\xFF" "cd", false), Contains("at byte offset 2 (0xFF)"));
  REQUIRE_THROWS_WITH(tokenizer.encode("a\xC3(", false), Contains("at byte offset 1 (0xC3 0x28)"));      // bad continuation
  REQUIRE_THROWS_WITH(tokenizer.encode("\xC0\x80", false), Contains("at byte offset 0 (0xC0)"));         // overlong NUL
  REQUIRE_THROWS_WITH(tokenizer.encode("\xED\xA0\x80", false), Contains("at byte offset 0 (0xED 0xA0)")); // surrogate
  REQUIRE_THROWS_WITH(tokenizer.encode("\xF4\x90\x80\x80", false), Contains("offset 0 (0xF4 0x90)"));   // above U+10FFFF
  REQUIRE_THROWS_WITH(tokenizer.encode("ab\xE2\x82", false),
                      Contains("sequence at byte offset 2 (0xE2 0x82) is cut off by the end of the text"));
}

TEST_CASE("tokenizer rejects malformed files", "[llama2c][tokenizer][errors]") {
  TemporaryDirectory directory;
  const Vocabulary vocabulary = merge_vocabulary();
  const int vocab_size = static_cast<int>(vocabulary.size());
  const fs::path path = directory.file("bad_tokenizer.bin");

  SECTION("negative length") {
    std::string bytes = tokenizer_bytes(8, vocabulary);
    // Token 0 starts at offset 4: score, then its int32 length at offset 8.
    const std::int32_t negative = -5;
    std::memcpy(bytes.data() + 8, &negative, sizeof(negative));
    write_bytes(path, bytes);
    REQUIRE_THROWS_AS(Tokenizer::load(path, vocab_size), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size),
                        Contains("token 0 has length -5") && Contains(path.string()));
  }
  SECTION("length above max_token_length") {
    Vocabulary long_piece = vocabulary;
    long_piece.back().first = "abcdefghijk";
    write_bytes(path, tokenizer_bytes(8, long_piece));
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size),
                        Contains("token " + std::to_string(vocab_size - 1) + " has length 11") &&
                            Contains("max_token_length 8"));
  }
  SECTION("length past the end of the file") {
    std::string bytes = tokenizer_bytes(8, vocabulary);
    bytes.resize(bytes.size() - 1);
    write_bytes(path, bytes);
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size),
                        Contains("token " + std::to_string(vocab_size - 1) + " bytes") &&
                            Contains("the file ends at " + std::to_string(bytes.size())));
  }
  SECTION("fewer tokens than the model's vocabulary") {
    write_bytes(path, tokenizer_bytes(8, vocabulary));
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size + 1), Contains("fewer than the model's"));
  }
  SECTION("bytes after the last token") {
    write_bytes(path, tokenizer_bytes(8, vocabulary) + "xyz");
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size), Contains("3 bytes follow the last of"));
  }
  SECTION("non-positive max_token_length") {
    write_bytes(path, tokenizer_bytes(0, vocabulary));
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size), Contains("max_token_length is 0"));
  }
  SECTION("byte-fallback token missing") {
    Vocabulary wrong = vocabulary;
    wrong[3 + 0x41].first = "A";
    write_bytes(path, tokenizer_bytes(8, wrong));
    REQUIRE_THROWS_WITH(Tokenizer::load(path, vocab_size), Contains("token 68 is 'A'"));
  }
  SECTION("space token missing") {
    Vocabulary no_space = base_vocabulary();
    no_space.push_back({"a", 0.0f});
    write_bytes(path, tokenizer_bytes(8, no_space));
    REQUIRE_THROWS_WITH(Tokenizer::load(path, static_cast<int>(no_space.size())), Contains("single space"));
  }
  SECTION("vocabulary too small for byte fallback") {
    write_bytes(path, tokenizer_bytes(8, vocabulary));
    REQUIRE_THROWS_AS(Tokenizer::load(path, 100), std::invalid_argument);
    REQUIRE_THROWS_WITH(Tokenizer::load(path, 100), Contains("vocab_size 100"));
  }
  SECTION("missing file") {
    REQUIRE_THROWS_WITH(Tokenizer::load(directory.file("none.bin"), vocab_size), Contains("not found"));
  }
}

// ===========================================================================
// Text protocol.

TEST_CASE("text splits at blank lines", "[llama2c][text]") {
  using Blocks = std::vector<std::string_view>;
  CHECK(llama2c::split_blocks("") == Blocks{});
  CHECK(llama2c::split_blocks(" \n\t\n") == Blocks{});
  CHECK(llama2c::split_blocks("one") == Blocks{"one"});
  CHECK(llama2c::split_blocks("  a\nb \n \t\n\n c\n") == Blocks{"a\nb", "c"});
  CHECK(llama2c::split_blocks("a\r\n\r\nb\r\n") == Blocks{"a", "b"});  // "\r" alone is blank
  CHECK(llama2c::split_blocks("\n\nfirst\nsecond\n\n\n\nthird") == Blocks{"first\nsecond", "third"});
}

TEST_CASE("text encodes each block after BOS", "[llama2c][text]") {
  TemporaryDirectory directory;
  const Tokenizer tokenizer = load_vocabulary(directory, merge_vocabulary());
  std::vector<int> expected = tokenizer.encode("ab", true);
  const std::vector<int> second = tokenizer.encode("b  a", true);
  expected.insert(expected.end(), second.begin(), second.end());
  CHECK(llama2c::encode_blocks(" ab \n\n  \nb  a\n", tokenizer) == expected);
}

TEST_CASE("text file rejects invalid UTF-8", "[llama2c][text][errors]") {
  TemporaryDirectory directory;
  const Tokenizer tokenizer = load_vocabulary(directory, merge_vocabulary());
  const fs::path path = directory.file("latin1.txt");
  write_bytes(path, "caf\xE9 au lait\n");
  REQUIRE_THROWS_AS(llama2c::load_token_ids(path, tokenizer), FileFormatError);
  REQUIRE_THROWS_WITH(llama2c::load_token_ids(path, tokenizer),
                      Contains(path.string()) && Contains("at byte offset 3 (0xE9 0x20)"));
  REQUIRE_THROWS_WITH(llama2c::load_token_ids(directory.file("none.txt"), tokenizer), Contains("not found"));
}

// ===========================================================================
// Forward pass.

TEST_CASE("model matches float64 reference", "[llama2c][model]") {
  TemporaryDirectory directory;
  Header header;  // 4 query heads share 2 KV heads
  const llama2c::Checkpoint checkpoint = load_random_checkpoint(directory, header, 11);

  SECTION("full cache") { CHECK(max_logit_difference(checkpoint, {}, 40) < 1e-4); }
  SECTION("sliding window") { CHECK(max_logit_difference(checkpoint, {.budget = 9}, 40) < 1e-4); }
  SECTION("sinks with original positions") {
    CHECK(max_logit_difference(checkpoint, {.budget = 9, .sink_count = 3}, 40) < 1e-4);
  }
  SECTION("sinks with cache-relative positions") {
    CHECK(max_logit_difference(checkpoint, {.budget = 9, .sink_count = 3, .cache_relative = true}, 40) < 1e-4);
  }
  SECTION("separate classifier and one KV head") {
    Header other = header;
    other.vocab_size = -40;
    other.n_kv_heads = 1;
    const llama2c::Checkpoint separate = load_random_checkpoint(directory, other, 12);
    CHECK(max_logit_difference(separate, {}, 20) < 1e-4);
  }
}

TEST_CASE("model exposes attention and queries", "[llama2c][model]") {
  TemporaryDirectory directory;
  llama2c::Model model(load_random_checkpoint(directory, Header{}, 13));
  auto caches = llama2c::make_layer_caches(model.config(), kvevict::PositionMode::original, 0);
  for (int t = 0; t < 5; ++t) model.forward(t, t, std::span(caches));

  for (int l = 0; l < model.config().n_layers; ++l) {
    const auto attention = model.attention(l);
    REQUIRE(attention.rows() == model.config().n_heads);
    REQUIRE(attention.cols() == 5);
    for (Eigen::Index h = 0; h < attention.rows(); ++h) CHECK(attention.row(h).sum() == Approx(1.0f));
    CHECK(model.queries(l).rows() == model.config().n_heads);
    CHECK(model.queries(l).cols() == model.config().head_dim());
  }
  REQUIRE_THROWS_AS(model.attention(model.config().n_layers), std::out_of_range);
}

TEST_CASE("model rejects mismatched inputs", "[llama2c][model][errors]") {
  TemporaryDirectory directory;
  llama2c::Model model(load_random_checkpoint(directory, Header{}, 14));
  auto caches = llama2c::make_layer_caches(model.config(), kvevict::PositionMode::original, 0);

  REQUIRE_THROWS_WITH(model.forward(32, 0, std::span(caches)), Contains("token id 32 is outside [0, 32)"));
  REQUIRE_THROWS_WITH(model.forward(1, -1, std::span(caches)), Contains("position -1"));

  auto too_few = llama2c::make_layer_caches(model.config(), kvevict::PositionMode::original, 0);
  too_few.pop_back();
  REQUIRE_THROWS_WITH(model.forward(1, 0, std::span(too_few)), Contains("got 1 caches but the model has 2 layers"));

  llama2c::ModelConfig wider = model.config();
  wider.n_kv_heads = 4;
  auto wrong_heads = llama2c::make_layer_caches(wider, kvevict::PositionMode::original, 0);
  REQUIRE_THROWS_WITH(model.forward(1, 0, std::span(wrong_heads)), Contains("has 4 KV heads"));

  model.forward(1, 0, std::span(caches));
  REQUIRE_THROWS_WITH(model.forward(1, 0, std::span(caches)), Contains("position 0"));
}

TEST_CASE("model decodes half-precision caches", "[llama2c][model]") {
  TemporaryDirectory directory;
  llama2c::Model model(load_random_checkpoint(directory, Header{}, 15));
  auto float_caches = llama2c::make_layer_caches(model.config(), kvevict::PositionMode::original, 0);
  auto half_caches = llama2c::make_layer_caches<Eigen::half>(model.config(), kvevict::PositionMode::original, 0);
  for (int t = 0; t < 10; ++t) {
    const auto exact = model.forward(t, t, std::span(float_caches));
    const std::vector<float> expected(exact.begin(), exact.end());
    const auto rounded = model.forward(t, t, std::span(half_caches));
    for (std::size_t i = 0; i < expected.size(); ++i) CHECK(rounded[i] == Approx(expected[i]).margin(1e-2));
  }
}

TEST_CASE("decode step does not allocate", "[llama2c][model]") {
  TemporaryDirectory directory;
  llama2c::Model model(load_random_checkpoint(directory, Header{}, 16));
  const std::int64_t budget = 8;
  for (const auto mode : {kvevict::PositionMode::original, kvevict::PositionMode::cache_relative}) {
    auto caches = llama2c::make_layer_caches(model.config(), mode, budget);
    model.reserve_context(budget);
    llama2c::RecentWindow window(budget, 2);
    std::int64_t position = 0;
    auto step = [&] {
      window.make_room(std::span(caches));
      model.forward(static_cast<int>(position % 32), position, std::span(caches));
      ++position;
    };
    for (int i = 0; i < 2 * budget; ++i) step();  // fill the cache and build the eviction plan

    allocation_count = 0;
    counting_allocations = true;
    Eigen::internal::set_is_malloc_allowed(false);
    bool eigen_allocated = false;
    try {
      for (int i = 0; i < 20; ++i) step();
    } catch (const std::logic_error&) {
      eigen_allocated = true;
    }
    Eigen::internal::set_is_malloc_allowed(true);
    counting_allocations = false;
    INFO("position mode " << kvevict::to_string(mode));
    CHECK_FALSE(eigen_allocated);
    CHECK(allocation_count == 0);
  }
}

TEST_CASE("recent window keeps sinks and newest tokens", "[llama2c][eviction]") {
  REQUIRE_THROWS_WITH(llama2c::RecentWindow(0), Contains("budget 0"));
  REQUIRE_THROWS_WITH(llama2c::RecentWindow(4, 4), Contains("sink_count 4"));

  kvevict::CacheConfig config;
  config.n_kv_heads = 2;
  config.head_dim = 2;
  kvevict::KVCache<float> cache(config);
  llama2c::RecentWindow window(5, 2);
  for (std::int64_t position = 0; position < 9; ++position) {
    window.make_room(cache);
    const llama2c::RowMatrixXf rows = llama2c::RowMatrixXf::Constant(2, 2, static_cast<float>(position));
    cache.append(rows, rows, std::span<const std::int64_t>(&position, 1));
    CHECK(cache.size() == std::min<std::int64_t>(position + 1, 5));
  }
  for (int j = 0; j < 2; ++j) {
    const auto positions = cache.positions(j);
    CHECK(std::vector<std::int64_t>(positions.begin(), positions.end()) == std::vector<std::int64_t>{0, 1, 6, 7, 8});
    CHECK(cache.keys(j)(2, 0) == 6.0f);
  }
}

TEST_CASE("negative log-likelihood is stable", "[llama2c][perplexity]") {
  const std::vector<float> logits = {1000.0f, 1000.0f, -1000.0f};
  CHECK(llama2c::negative_log_likelihood(logits, 0) == Approx(std::log(2.0)));
  CHECK(llama2c::negative_log_likelihood(logits, 2) == Approx(2000.0 + std::log(2.0)));
  REQUIRE_THROWS_WITH(llama2c::negative_log_likelihood(logits, 3), Contains("target id 3"));
}

// ===========================================================================
// Known-good outputs of stories260K (float64 reference implementation).

TEST_CASE("stories260K greedy decoding matches reference", "[llama2c][assets]") {
  const auto assets = find_assets("stories260K greedy decoding");
  if (!assets) return;
  llama2c::Model model(llama2c::load_checkpoint(assets->checkpoint));
  const Tokenizer tokenizer = Tokenizer::load(assets->tokenizer, model.config().vocab_size);

  auto caches = llama2c::make_layer_caches(model.config(), kvevict::PositionMode::original, 60);
  std::vector<int> generated;
  std::string text;
  int token = Tokenizer::bos_id;
  for (int position = 0; position < 60; ++position) {
    const auto logits = model.forward(token, position, std::span(caches));
    const int next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    text += tokenizer.decode(token, next);
    generated.push_back(next);
    token = next;
  }
  const std::vector<int> first_ids(generated.begin(), generated.begin() + 10);
  CHECK(first_ids == std::vector<int>{403, 407, 261, 378, 432, 383, 286, 261, 376, 298});
  CHECK(text ==
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
        "she saw a big, red ball. She wanted to play with it, but it was too high");
}

TEST_CASE("stories260K text protocol counts", "[llama2c][assets]") {
  const auto assets = find_assets("stories260K text protocol counts");
  if (!assets) return;
  const llama2c::Checkpoint checkpoint = llama2c::load_checkpoint(assets->checkpoint);
  const Tokenizer tokenizer = Tokenizer::load(assets->tokenizer, checkpoint.config.vocab_size);
  const std::vector<int> ids = llama2c::load_token_ids(assets->text, tokenizer);

  CHECK(ids.size() == 384954);
  CHECK(std::count(ids.begin(), ids.end(), Tokenizer::bos_id) == 4302);

  // The fast merge agrees with llama2.c's quadratic loop on real text.
  const std::string text = llama2c::read_text_file(assets->text);
  const auto blocks = llama2c::split_blocks(text);
  REQUIRE(blocks.size() == 4302);
  for (std::size_t b = 0; b < 300; ++b) {
    INFO("block " << b);
    CHECK(tokenizer.encode(blocks[b], true) == reference_encode(tokenizer, blocks[b], true));
  }
}

TEST_CASE("stories260K perplexity at 2000 tokens, window 512", "[llama2c][assets][perplexity]") {
  const auto assets = find_assets("stories260K perplexity at 2000 tokens");
  if (!assets) return;
  LoadedAssets loaded = load_assets(*assets);
  const double perplexity = perplexity_of_prefix(loaded, 2000, 512, 0, kvevict::PositionMode::original);
  CHECK(perplexity == Approx(3.7651).epsilon(1e-4));
}

TEST_CASE("stories260K perplexity at 4096 tokens", "[llama2c][assets][perplexity]") {
  const auto assets = find_assets("stories260K perplexity at 4096 tokens");
  if (!assets) return;
  LoadedAssets loaded = load_assets(*assets);

  SECTION("full cache past the trained context") {
    const double perplexity = perplexity_of_prefix(loaded, 4096, 0, 0, kvevict::PositionMode::original);
    CHECK(perplexity == Approx(32.3872).epsilon(1e-4));
  }
  SECTION("sliding window of 256") {
    const double perplexity = perplexity_of_prefix(loaded, 4096, 256, 0, kvevict::PositionMode::original);
    CHECK(perplexity == Approx(3.62727).epsilon(1e-4));
  }
  SECTION("4 sinks and 252 recent, cache-relative positions") {
    const double perplexity = perplexity_of_prefix(loaded, 4096, 256, 4, kvevict::PositionMode::cache_relative);
    CHECK(perplexity == Approx(3.62648).epsilon(1e-4));
  }
  SECTION("kvevict StreamingLLM policy, cache-relative positions") {
    // kvevict evicts after the new token's attention, so a budget of 255
    // makes attention see 4 sinks + 252 recent = 256 tokens, as above.
    const std::size_t n = 4096;
    const llama2c::ModelConfig& config = loaded.model.config();
    auto caches = llama2c::make_layer_caches(config, kvevict::PositionMode::cache_relative, 256);
    std::vector<kvevict::StreamingLLM<float>> policies(
        static_cast<std::size_t>(config.n_layers), kvevict::StreamingLLM<float>({.budget = 255, .sinks = 4}));
    kvevict::KeepPlan plan;
    kvevict::Observation no_observation;  // StreamingLLM reads no attention or queries
    no_observation.n_heads = config.n_heads;

    double nll_sum = 0.0;
    for (std::size_t i = 0; i + 1 < n; ++i) {
      const auto logits = loaded.model.forward(loaded.ids[i], static_cast<std::int64_t>(i), std::span(caches));
      nll_sum += llama2c::negative_log_likelihood(logits, loaded.ids[i + 1]);
      for (std::size_t l = 0; l < caches.size(); ++l) {
        kvevict::observe_and_evict(policies[l], caches[l], no_observation, plan);
      }
    }
    CHECK(caches[0].size() == 255);
    const double perplexity = std::exp(nll_sum / static_cast<double>(n - 1));
    CHECK(perplexity == Approx(3.62648).epsilon(1e-4));
  }
}
