// Tests of the llama2.c parsers in examples/llama2c on malformed input: the
// in-memory entry points parse_checkpoint and Tokenizer::parse, headers and
// lengths that disagree with the bytes present, truncations, and text that
// is not UTF-8, and the inputs that fuzz/fuzz_tokenizer.cpp found.
// Well-formed files, the merge rules and the basic error cases are in
// test_llama2c.cpp.

// Eigen's heap use (which bypasses operator new) is made checkable: a
// forbidden allocation then throws, because Release builds drop asserts.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)                                                      \
  do {                                                                               \
    if (!(condition)) throw std::logic_error("Eigen assertion failed: " #condition); \
  } while (false)

#include "examples/llama2c/checkpoint.hpp"
#include "examples/llama2c/text.hpp"
#include "examples/llama2c/tokenizer.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <new>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

// While `limit_allocations` is set, operator new rejects requests above
// `allocation_limit` bytes, so a parser that sizes a buffer from an
// unchecked header fails with std::bad_alloc instead of a format error.
namespace {
std::atomic<bool> limit_allocations{false};
constexpr std::size_t allocation_limit = std::size_t{1} << 20;
}  // namespace

// noinline keeps GCC 12 from pairing an inlined std::free with operator new
// and reporting -Wmismatched-new-delete.
[[gnu::noinline]] void* operator new(std::size_t size) {
  if (limit_allocations.load(std::memory_order_relaxed) && size > allocation_limit) throw std::bad_alloc();
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
using Catch::Contains;
using llama2c::FileFormatError;
using llama2c::Tokenizer;

constexpr std::int32_t int32_max = std::numeric_limits<std::int32_t>::max();
constexpr std::int32_t int32_min = std::numeric_limits<std::int32_t>::min();

// Forbids Eigen heap allocation and operator new requests over 1 MiB while
// alive. Use it around parses that must fail before allocating tensors.
class NoLargeAllocations {
 public:
  NoLargeAllocations() {
    limit_allocations = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~NoLargeAllocations() {
    Eigen::internal::set_is_malloc_allowed(true);
    limit_allocations = false;
  }
  NoLargeAllocations(const NoLargeAllocations&) = delete;
  NoLargeAllocations& operator=(const NoLargeAllocations&) = delete;
};

std::span<const std::byte> bytes_of(const std::string& bytes) {
  return std::as_bytes(std::span<const char>(bytes.data(), bytes.size()));
}

template <class T>
void append_raw(std::string& bytes, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  bytes.append(raw, sizeof(T));
}

// A fresh file path under the system temporary directory, removed at scope exit.
class TemporaryFile {
 public:
  explicit TemporaryFile(const std::string& name) {
    static int counter = 0;
    std::random_device seed;
    directory_ = fs::temp_directory_path() /
                 ("kvevict_llama2c_parsers_" + std::to_string(seed()) + "_" + std::to_string(counter++));
    fs::create_directories(directory_);
    path_ = directory_ / name;
  }
  ~TemporaryFile() {
    std::error_code ignored;
    fs::remove_all(directory_, ignored);
  }
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;

  const fs::path& path() const { return path_; }

  void write(const std::string& bytes) const {
    std::ofstream out(path_, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(out.good());
  }

 private:
  fs::path directory_;
  fs::path path_;
};

// ---------------------------------------------------------------------------
// Checkpoint files.

struct Header {
  std::int32_t dim = 4;
  std::int32_t hidden_dim = 8;
  std::int32_t n_layers = 1;
  std::int32_t n_heads = 2;
  std::int32_t n_kv_heads = 1;
  std::int32_t vocab_size = 8;  // negative: separate classifier
  std::int32_t seq_len = 4;
};

// Float count of a well-formed checkpoint with this header, in 64 bits so
// that absurd headers give their true size.
std::uint64_t float_count(const Header& h) {
  const std::uint64_t vocab = h.vocab_size < 0 ? -static_cast<std::int64_t>(h.vocab_size) : h.vocab_size;
  const std::uint64_t dim = static_cast<std::uint64_t>(h.dim);
  const std::uint64_t head_dim = dim / static_cast<std::uint64_t>(h.n_heads);
  const std::uint64_t kv_dim = head_dim * static_cast<std::uint64_t>(h.n_kv_heads);
  const std::uint64_t hidden = static_cast<std::uint64_t>(h.hidden_dim);
  const std::uint64_t per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim;
  std::uint64_t count = vocab * dim + static_cast<std::uint64_t>(h.n_layers) * per_layer + dim;
  count += static_cast<std::uint64_t>(h.seq_len) * head_dim;  // freq_cis_real and freq_cis_imag
  if (h.vocab_size < 0) count += vocab * dim;                  // wcls
  return count;
}

std::uint64_t checkpoint_size(const Header& h) { return 7 * sizeof(std::int32_t) + float_count(h) * sizeof(float); }

std::string header_bytes(const Header& h) {
  std::string bytes;
  for (const std::int32_t field : {h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len}) {
    append_raw(bytes, field);
  }
  return bytes;
}

// Serialises a checkpoint with `floats` weights, the i-th being i / 4.
std::string checkpoint_bytes(const Header& h, std::uint64_t floats) {
  std::string bytes = header_bytes(h);
  for (std::uint64_t i = 0; i < floats; ++i) append_raw(bytes, static_cast<float>(i) / 4);
  return bytes;
}

std::string checkpoint_bytes(const Header& h) { return checkpoint_bytes(h, float_count(h)); }

void require_same_tensors(const llama2c::Checkpoint& a, const llama2c::Checkpoint& b) {
  REQUIRE(a.layers.size() == b.layers.size());
  CHECK(a.token_embedding == b.token_embedding);
  CHECK(a.rms_final == b.rms_final);
  CHECK(a.separate_classifier == b.separate_classifier);
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    CHECK(a.layers[l].rms_att == b.layers[l].rms_att);
    CHECK(a.layers[l].wq == b.layers[l].wq);
    CHECK(a.layers[l].wk == b.layers[l].wk);
    CHECK(a.layers[l].wv == b.layers[l].wv);
    CHECK(a.layers[l].wo == b.layers[l].wo);
    CHECK(a.layers[l].rms_ffn == b.layers[l].rms_ffn);
    CHECK(a.layers[l].w1 == b.layers[l].w1);
    CHECK(a.layers[l].w2 == b.layers[l].w2);
    CHECK(a.layers[l].w3 == b.layers[l].w3);
  }
}

// ---------------------------------------------------------------------------
// Tokenizer files.

struct Entry {
  float score = 0.0f;
  std::int32_t length = 0;  // may disagree with piece.size() on purpose
  std::string piece;
};

Entry entry(std::string piece, float score = 0.0f) {
  const auto length = static_cast<std::int32_t>(piece.size());
  return {score, length, std::move(piece)};
}

// <unk>, BOS, EOS, the 256 byte-fallback pieces, then " ", "a", "b", "ab".
std::vector<Entry> small_vocabulary() {
  std::vector<Entry> entries = {entry("<unk>"), entry("\n<s>\n"), entry("\n</s>\n")};
  static constexpr char hex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) entries.push_back(entry(std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">"));
  const std::pair<const char*, float> merges[] = {{" ", -10.0f}, {"a", -1.0f}, {"b", -2.0f}, {"ab", 3.0f}};
  for (const auto& [piece, score] : merges) entries.push_back(entry(piece, score));
  return entries;
}

std::string tokenizer_bytes(std::int32_t max_token_length, const std::vector<Entry>& entries) {
  std::string bytes;
  append_raw(bytes, max_token_length);
  for (const Entry& e : entries) {
    append_raw(bytes, e.score);
    append_raw(bytes, e.length);
    bytes += e.piece;
  }
  return bytes;
}

// Byte offset of entry `id`'s length field in tokenizer_bytes' output.
std::size_t length_offset(const std::vector<Entry>& entries, std::size_t id) {
  std::size_t offset = sizeof(std::int32_t);
  for (std::size_t i = 0; i < id; ++i) offset += 8 + entries[i].piece.size();
  return offset + sizeof(float);
}

}  // namespace

// ===========================================================================
// Checkpoint parser.

TEST_CASE("checkpoint parse matches load", "[llama2c][parsers][checkpoint]") {
  for (const std::int32_t vocab_size : {8, -8}) {
    INFO("vocab_size " << vocab_size);
    Header header;
    header.vocab_size = vocab_size;
    const std::string bytes = checkpoint_bytes(header);
    TemporaryFile file("model.bin");
    file.write(bytes);

    const llama2c::Checkpoint loaded = llama2c::load_checkpoint(file.path());
    const llama2c::Checkpoint parsed = llama2c::parse_checkpoint(bytes_of(bytes), "model in memory");
    CHECK(parsed.config.dim == loaded.config.dim);
    CHECK(parsed.config.vocab_size == 8);
    CHECK(parsed.config.shared_classifier == (vocab_size > 0));
    require_same_tensors(parsed, loaded);
    if (vocab_size < 0) {
      // wcls is the last tensor, so its last float is the last of the buffer.
      CHECK(parsed.classifier()(7, 3) == static_cast<float>(float_count(header) - 1) / 4);
    } else {
      CHECK(&parsed.classifier() == &parsed.token_embedding);
    }
  }
}

TEST_CASE("checkpoint parses smallest model", "[llama2c][parsers][checkpoint]") {
  // head_dim 2 is the smallest even head size, and every other field is 1.
  const Header header{.dim = 2, .hidden_dim = 1, .n_layers = 1, .n_heads = 1, .n_kv_heads = 1, .vocab_size = -1,
                      .seq_len = 1};
  const std::string bytes = checkpoint_bytes(header);
  REQUIRE(bytes.size() == checkpoint_size(header));
  const llama2c::Checkpoint checkpoint = llama2c::parse_checkpoint(bytes_of(bytes), "smallest");
  CHECK(checkpoint.config.head_dim() == 2);
  CHECK(checkpoint.layers[0].w2.cols() == 1);
  CHECK(checkpoint.classifier().rows() == 1);
  CHECK(checkpoint.classifier()(0, 1) == static_cast<float>(float_count(header) - 1) / 4);
}

TEST_CASE("checkpoint rejects one byte short or long", "[llama2c][parsers][checkpoint][errors]") {
  const Header header;
  const std::string bytes = checkpoint_bytes(header);
  const std::string required = "requires " + std::to_string(bytes.size()) + " bytes";

  const std::string short_bytes = bytes.substr(0, bytes.size() - 1);
  REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(short_bytes), "short.bin"), FileFormatError);
  REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(short_bytes), "short.bin"),
                      Contains("checkpoint 'short.bin' has " + std::to_string(bytes.size() - 1) + " bytes") &&
                          Contains(required) && Contains("the file is truncated"));

  const std::string long_bytes = bytes + '\0';
  REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(long_bytes), "long.bin"), FileFormatError);
  REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(long_bytes), "long.bin"),
                      Contains("checkpoint 'long.bin' has " + std::to_string(bytes.size() + 1) + " bytes") &&
                          Contains(required) && Contains("the file has extra data"));
}

TEST_CASE("checkpoint rejects missing wcls", "[llama2c][parsers][checkpoint][errors]") {
  Header header;
  const std::string shared_bytes = checkpoint_bytes(header);
  header.vocab_size = -8;
  std::string bytes = shared_bytes;
  std::memcpy(bytes.data() + 5 * sizeof(std::int32_t), &header.vocab_size, sizeof(header.vocab_size));
  REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(bytes), "flag.bin"), FileFormatError);
  REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "flag.bin"),
                      Contains("checkpoint 'flag.bin'") && Contains("vocab_size -8") &&
                          Contains("requires " + std::to_string(checkpoint_size(header)) + " bytes"));
}

TEST_CASE("checkpoint rejects absurd headers without allocating", "[llama2c][parsers][checkpoint][errors]") {
  struct Case {
    const char* name;
    Header header;
    std::string expected;
  };
  const Header base;
  auto with = [&](auto change) {
    Header h = base;
    change(h);
    return h;
  };
  const std::vector<Case> cases = {
      {"dim 2^30", with([](Header& h) { h.dim = 1 << 30; }), "dim 1073741824"},
      {"vocab_size near 2^31", with([](Header& h) { h.vocab_size = int32_max; }), "vocab_size 2147483647"},
      {"separate classifier near 2^31", with([](Header& h) { h.vocab_size = -int32_max; }), "vocab_size -2147483647"},
      {"n_layers near 2^31", with([](Header& h) { h.n_layers = int32_max; }), "n_layers 2147483647"},
      {"seq_len near 2^31", with([](Header& h) { h.seq_len = int32_max; }), "seq_len 2147483647"},
      {"hidden_dim near 2^31", with([](Header& h) { h.hidden_dim = int32_max; }), "hidden_dim 2147483647"},
  };
  for (const Case& test : cases) {
    SECTION(test.name) {
      // A header with no weights after it: the size check must fail first.
      const std::string bytes = header_bytes(test.header);
      NoLargeAllocations guard;
      REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(bytes), "absurd.bin"), FileFormatError);
      REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "absurd.bin"),
                          Contains("checkpoint 'absurd.bin' has 28 bytes") && Contains(test.expected) &&
                              Contains("requires " + std::to_string(checkpoint_size(test.header)) + " bytes"));
    }
  }
}

TEST_CASE("checkpoint rejects overflowing sizes", "[llama2c][parsers][checkpoint][errors]") {
  // Each header's byte count exceeds 2^64 at a different step of the sum.
  const std::vector<std::pair<Header, std::string>> cases = {
      {Header{.dim = 1 << 30, .hidden_dim = int32_max, .n_layers = 1, .n_heads = 2, .n_kv_heads = 2,
              .vocab_size = 8, .seq_len = 4},
       "hidden_dim 2147483647"},  // 3 * hidden * dim
      {Header{.dim = 1 << 30, .hidden_dim = 8, .n_layers = int32_max, .n_heads = 2, .n_kv_heads = 2,
              .vocab_size = 8, .seq_len = 4},
       "n_layers 2147483647"},  // n_layers * per-layer floats
      {Header{.dim = 1 << 30, .hidden_dim = 8, .n_layers = 1, .n_heads = 2, .n_kv_heads = 2,
              .vocab_size = -int32_max, .seq_len = 4},
       "vocab_size -2147483647"},  // embedding plus wcls, times 4 bytes
  };
  for (const auto& [header, field] : cases) {
    INFO(field);
    const std::string bytes = header_bytes(header);
    NoLargeAllocations guard;
    REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(bytes), "overflow.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "overflow.bin"),
                        Contains("checkpoint 'overflow.bin': the header (dim 1073741824") && Contains(field) &&
                            Contains("more than 2^64 bytes"));
  }
}

TEST_CASE("checkpoint rejects negative header fields", "[llama2c][parsers][checkpoint][errors]") {
  const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int field = 0; field < 7; ++field) {
    for (const std::int32_t value : {-1, int32_min}) {
      if (field == 5 && value == -1) continue;  // vocab_size -1: one token and a separate classifier
      INFO(names[field] << " = " << value);
      std::string bytes = checkpoint_bytes(Header{});
      std::memcpy(bytes.data() + field * sizeof(std::int32_t), &value, sizeof(value));
      const std::string expected = std::string("checkpoint 'fields.bin': header field ") + names[field] + " is " +
                                   std::to_string(value) + " but must be " +
                                   (field == 5 ? "nonzero" : "positive");
      NoLargeAllocations guard;
      REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(bytes), "fields.bin"), FileFormatError);
      REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "fields.bin"), Contains(expected));
    }
  }
}

TEST_CASE("checkpoint rejects impossible head layouts", "[llama2c][parsers][checkpoint][errors]") {
  SECTION("more KV heads than query heads") {
    const std::string bytes = header_bytes({.dim = 8, .n_heads = 2, .n_kv_heads = 4});
    REQUIRE_THROWS_AS(llama2c::parse_checkpoint(bytes_of(bytes), "heads.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "heads.bin"),
                        Contains("checkpoint 'heads.bin': n_heads 2 is not divisible by n_kv_heads 4"));
  }
  SECTION("more query heads than dim") {
    const std::string bytes = header_bytes({.dim = 4, .n_heads = 8, .n_kv_heads = 8});
    REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "heads.bin"),
                        Contains("checkpoint 'heads.bin': dim 4 is not divisible by n_heads 8"));
  }
  SECTION("head_dim of 1") {
    const std::string bytes = header_bytes({.dim = 4, .n_heads = 4, .n_kv_heads = 4});
    REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "heads.bin"),
                        Contains("checkpoint 'heads.bin': head_dim (dim / n_heads) is 1 but must be even"));
  }
  SECTION("odd head_dim above 1") {
    const std::string bytes = header_bytes({.dim = 10, .n_heads = 2, .n_kv_heads = 1});
    REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(bytes), "heads.bin"),
                        Contains("head_dim (dim / n_heads) is 5"));
  }
}

TEST_CASE("checkpoint rejects every truncation", "[llama2c][parsers][checkpoint][errors]") {
  for (const std::int32_t vocab_size : {8, -8}) {
    Header header;
    header.vocab_size = vocab_size;
    const std::string bytes = checkpoint_bytes(header);
    for (std::size_t size = 0; size < bytes.size(); ++size) {
      INFO("vocab_size " << vocab_size << ", first " << size << " bytes");
      const std::string prefix = bytes.substr(0, size);
      const std::string expected = size < 28 ? "has " + std::to_string(size) + " bytes, fewer than the 28-byte header"
                                             : "has " + std::to_string(size) + " bytes but its header";
      REQUIRE_THROWS_WITH(llama2c::parse_checkpoint(bytes_of(prefix), "prefix.bin"),
                          Contains("checkpoint 'prefix.bin' " + expected));
    }
  }
}

TEST_CASE("checkpoint file errors name the path", "[llama2c][parsers][checkpoint][errors]") {
  TemporaryFile file("absurd header.bin");
  file.write(header_bytes({.dim = 1 << 30}));
  REQUIRE_THROWS_WITH(llama2c::load_checkpoint(file.path()),
                      Contains("checkpoint '" + file.path().string() + "' has 28 bytes") &&
                          Contains("dim 1073741824"));
}

// ===========================================================================
// Tokenizer parser.

TEST_CASE("tokenizer parse matches load", "[llama2c][parsers][tokenizer]") {
  const std::vector<Entry> entries = small_vocabulary();
  const std::string bytes = tokenizer_bytes(6, entries);
  const int vocab_size = static_cast<int>(entries.size());
  TemporaryFile file("tokenizer.bin");
  file.write(bytes);

  const Tokenizer loaded = Tokenizer::load(file.path(), vocab_size);
  const Tokenizer parsed = Tokenizer::parse(bytes_of(bytes), vocab_size, "tokenizer in memory");
  REQUIRE(parsed.vocab_size() == vocab_size);
  CHECK(parsed.max_token_length() == 6);
  for (int id = 0; id < vocab_size; ++id) {
    CHECK(parsed.piece(id) == loaded.piece(id));
    CHECK(parsed.score(id) == loaded.score(id));
  }
  CHECK(parsed.encode("abba \xC3\xA9", true) == loaded.encode("abba \xC3\xA9", true));
  CHECK(parsed.encode("ab", false) == std::vector<int>{parsed.find(" "), parsed.find("ab")});
}

TEST_CASE("tokenizer rejects bad token lengths", "[llama2c][parsers][tokenizer][errors]") {
  std::vector<Entry> entries = small_vocabulary();
  const int vocab_size = static_cast<int>(entries.size());
  const std::size_t last = entries.size() - 1;

  SECTION("negative") {
    entries[0].length = -1;
    const std::string bytes = tokenizer_bytes(8, entries);
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"),
                        Contains("tokenizer 'lengths.bin': token 0 has length -1 at offset 8, "
                                 "outside [0, max_token_length 8]"));
  }
  SECTION("most negative") {
    entries[5].length = int32_min;
    const std::string bytes = tokenizer_bytes(8, entries);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"),
                        Contains("token 5 has length -2147483648 at offset " +
                                 std::to_string(length_offset(entries, 5))));
  }
  SECTION("one over max_token_length") {
    entries[last] = entry("abcdefghi");
    const std::string bytes = tokenizer_bytes(8, entries);
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"),
                        Contains("tokenizer 'lengths.bin': token " + std::to_string(last) + " has length 9") &&
                            Contains("max_token_length 8"));
  }
  SECTION("equal to max_token_length") {
    entries[last] = entry("abcdefgh");
    const std::string bytes = tokenizer_bytes(8, entries);
    CHECK(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin").piece(static_cast<int>(last)) == "abcdefgh");
  }
  SECTION("past the end") {
    entries[last].length = 6;  // the piece "ab" has 2 bytes, and nothing follows it
    const std::string bytes = tokenizer_bytes(8, entries);
    const std::size_t piece_offset = length_offset(entries, last) + 4;
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), vocab_size, "lengths.bin"),
                        Contains("tokenizer 'lengths.bin': token " + std::to_string(last) + " bytes needs 6 bytes at offset " +
                                 std::to_string(piece_offset) + " but the file ends at " + std::to_string(bytes.size())));
  }
}

TEST_CASE("tokenizer rejects sizes beyond the bytes", "[llama2c][parsers][tokenizer][errors]") {
  SECTION("fuzzer input: token length near 2^29") {
    // fuzz_tokenizer found this: max_token_length 1633886305 allowed a
    // length of 543318369, which the parser allocated before checking it
    // against the bytes left. The found input was 3845 bytes, and only its
    // first 12 matter because parsing stops at token 0.
    std::string bytes("a caf\xC3\xA9 aab ", 12);
    bytes.resize(3845, '\0');
    NoLargeAllocations guard;
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), 279, "fuzz.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), 279, "fuzz.bin"),
                        Contains("tokenizer 'fuzz.bin': token 0 bytes needs 543318369 bytes at offset 12 "
                                 "but the file ends at 3845"));
  }
  SECTION("fuzzer input: vocab_size 17751063 for a 4-byte file") {
    // fuzz_tokenizer found this: the parser sized its token tables from
    // vocab_size (568 MB of strings) before reading a single token.
    const std::string bytes("\x10\x61\x00\x00", 4);
    NoLargeAllocations guard;
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), 17751063, "fuzz.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), 17751063, "fuzz.bin"),
                        Contains("tokenizer 'fuzz.bin': the file has 4 bytes, too few for 17751063 tokens"));
  }
  SECTION("largest vocab_size for a whole tokenizer file") {
    const std::string bytes = tokenizer_bytes(8, small_vocabulary());
    NoLargeAllocations guard;
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), int32_max, "big.bin"),
                        Contains("tokenizer 'big.bin': the file has " + std::to_string(bytes.size()) +
                                 " bytes, too few for 2147483647 tokens") &&
                            Contains("fewer than the model's 2147483647 tokens"));
  }
  SECTION("largest length that max_token_length allows") {
    std::vector<Entry> entries = small_vocabulary();
    entries.back().length = int32_max;
    const std::string bytes = tokenizer_bytes(int32_max, entries);
    TemporaryFile file("long piece.bin");
    file.write(bytes);
    NoLargeAllocations guard;
    REQUIRE_THROWS_WITH(Tokenizer::load(file.path(), static_cast<int>(entries.size())),
                        Contains("tokenizer '" + file.path().string() + "'") &&
                            Contains("bytes needs 2147483647 bytes"));
  }
}

TEST_CASE("tokenizer rejects bad headers and vocab sizes", "[llama2c][parsers][tokenizer][errors]") {
  const std::vector<Entry> entries = small_vocabulary();
  const int vocab_size = static_cast<int>(entries.size());
  for (const std::size_t size : {std::size_t{0}, std::size_t{3}}) {
    const std::string bytes(size, '\x08');
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), vocab_size, "header.bin"),
                        Contains("tokenizer 'header.bin': the max_token_length header needs 4 bytes at offset 0 "
                                 "but the file ends at " + std::to_string(size)));
  }
  for (const std::int32_t max_token_length : {-1, int32_min}) {
    const std::string bytes = tokenizer_bytes(max_token_length, entries);
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), vocab_size, "header.bin"), FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), vocab_size, "header.bin"),
                        Contains("tokenizer 'header.bin': max_token_length is " + std::to_string(max_token_length)));
  }
  const std::string bytes = tokenizer_bytes(8, entries);
  for (const int too_small : {258, 0, -1, int32_min}) {
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(bytes), too_small, "header.bin"), std::invalid_argument);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), too_small, "header.bin"),
                        Contains("tokenizer 'header.bin': vocab_size " + std::to_string(too_small) + " is below 259"));
  }
}

TEST_CASE("tokenizer rejects every truncation", "[llama2c][parsers][tokenizer][errors]") {
  const std::vector<Entry> entries = small_vocabulary();
  const std::string bytes = tokenizer_bytes(8, entries);
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    INFO("first " << size << " bytes");
    const std::string prefix = bytes.substr(0, size);
    REQUIRE_THROWS_AS(Tokenizer::parse(bytes_of(prefix), static_cast<int>(entries.size()), "prefix.bin"),
                      FileFormatError);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(prefix), static_cast<int>(entries.size()), "prefix.bin"),
                        Contains("tokenizer 'prefix.bin': ") &&
                            (Contains("the file ends at " + std::to_string(size)) ||
                             Contains("the file has " + std::to_string(size) + " bytes, too few")));
  }
}

TEST_CASE("tokenizer escapes bad pieces in messages", "[llama2c][parsers][tokenizer][errors]") {
  std::vector<Entry> entries = small_vocabulary();
  SECTION("control and high bytes") {
    entries[3] = entry(std::string("<\x01\xFF\0", 4));
    const std::string bytes = tokenizer_bytes(8, entries);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), static_cast<int>(entries.size()), "pieces.bin"),
                        Contains("tokenizer 'pieces.bin': token 3 is '<\\x01\\xFF\\x00' but byte fallback needs "
                                 "the piece of byte 0"));
  }
  SECTION("long piece") {
    entries[4] = entry(std::string(100, 'x'));
    const std::string bytes = tokenizer_bytes(100, entries);
    REQUIRE_THROWS_WITH(Tokenizer::parse(bytes_of(bytes), static_cast<int>(entries.size()), "pieces.bin"),
                        Contains("token 4 is '" + std::string(64, 'x') + "...' but"));
  }
}

TEST_CASE("tokenizer accepts lowercase byte pieces", "[llama2c][parsers][tokenizer]") {
  std::vector<Entry> entries = small_vocabulary();
  entries[3 + 0xAB] = entry("<0xab>");
  entries.push_back(entry("<0xAB>"));  // a second spelling is an ordinary piece
  const std::string bytes = tokenizer_bytes(8, entries);
  const Tokenizer tokenizer = Tokenizer::parse(bytes_of(bytes), static_cast<int>(entries.size()), "lowercase.bin");
  CHECK(tokenizer.decode(0, 3 + 0xAB) == "\xAB");
  CHECK(tokenizer.find("<0xAB>") == static_cast<int>(entries.size()) - 1);
}

// ===========================================================================
// Text that is not UTF-8.

TEST_CASE("text rejects invalid UTF-8 anywhere", "[llama2c][parsers][text][errors]") {
  const std::vector<Entry> entries = small_vocabulary();
  const std::string bytes = tokenizer_bytes(8, entries);
  const Tokenizer tokenizer = Tokenizer::parse(bytes_of(bytes), static_cast<int>(entries.size()), "text test");

  struct Case {
    const char* name;
    std::string text;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"lone continuation byte in a later block", "first block\n\nsecond \x80 block",
       "invalid UTF-8 sequence at byte offset 20 (0x80)"},
      {"overlong 3-byte form", "ok\n\n\xE0\x80\x80", "invalid UTF-8 sequence at byte offset 4 (0xE0 0x80)"},
      {"5-byte lead", "\xF8\x88\x80\x80\x80", "invalid UTF-8 sequence at byte offset 0 (0xF8)"},
      {"high surrogate", "a\xED\xBF\xBF", "invalid UTF-8 sequence at byte offset 1 (0xED 0xBF)"},
      {"bad third byte", "ab\xE2\x82(", "invalid UTF-8 sequence at byte offset 2 (0xE2 0x82 0x28)"},
      {"cut off at the end", "abc\xF0\x9F\x98",
       "the UTF-8 sequence at byte offset 3 (0xF0 0x9F 0x98) is cut off by the end of the text"},
      {"cut off before a blank line", "ab\xC3\n\nb", "invalid UTF-8 sequence at byte offset 2 (0xC3 0x0A)"},
  };
  for (const Case& test : cases) {
    SECTION(test.name) {
      REQUIRE_THROWS_AS(llama2c::encode_blocks(test.text, tokenizer), std::invalid_argument);
      REQUIRE_THROWS_WITH(llama2c::encode_blocks(test.text, tokenizer), Contains(test.expected));

      TemporaryFile file("story.txt");
      file.write(test.text);
      REQUIRE_THROWS_AS(llama2c::load_token_ids(file.path(), tokenizer), FileFormatError);
      REQUIRE_THROWS_WITH(llama2c::load_token_ids(file.path(), tokenizer),
                          Contains("text file '" + file.path().string() + "' is not valid UTF-8") &&
                              Contains(test.expected));
    }
  }
}

TEST_CASE("text accepts UTF-8 boundary code points", "[llama2c][parsers][text]") {
  const std::vector<Entry> entries = small_vocabulary();
  const std::string bytes = tokenizer_bytes(8, entries);
  const Tokenizer tokenizer = Tokenizer::parse(bytes_of(bytes), static_cast<int>(entries.size()), "text test");
  // U+0080, U+07FF, U+0800, U+D7FF, U+E000, U+FFFF, U+10000 and U+10FFFF:
  // the first and last code point of each length and around the surrogates.
  const std::string text =
      "\xC2\x80\xDF\xBF\xE0\xA0\x80\xED\x9F\xBF\xEE\x80\x80\xEF\xBF\xBF\xF0\x90\x80\x80\xF4\x8F\xBF\xBF";
  const std::vector<int> ids = llama2c::encode_blocks(text, tokenizer);
  // BOS, " ", then every byte as a byte-fallback token.
  REQUIRE(ids.size() == 2 + text.size());
  CHECK(ids[0] == Tokenizer::bos_id);
  for (std::size_t i = 0; i < text.size(); ++i) {
    CHECK(ids[2 + i] == static_cast<unsigned char>(text[i]) + Tokenizer::byte_token_offset);
  }
}
