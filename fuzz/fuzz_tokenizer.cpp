// libFuzzer target for the llama2.c tokenizer parser in
// examples/llama2c/tokenizer.hpp and, through a parsed tokenizer, its BPE
// merging, byte fallback, decoding and the text protocol of text.hpp.
//
// Input layout (fuzz/make_llama2c_seeds.py writes seeds in it):
//   int32 vocab_size (little-endian), the count the file is parsed for
//   uint8 n, then n bytes of text to encode (fewer if the input ends)
//   the rest: a tokenizer file
//
// Documented failures: FileFormatError for a malformed file, and
// std::invalid_argument for a vocab_size below 259 or text that is not UTF-8.
// Any other exception, a sanitizer report, an allocation over
// -malloc_limit_mb, or an encoding that differs from llama2.c's quadratic
// merge loop is a finding.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "examples/llama2c/text.hpp"
#include "examples/llama2c/tokenizer.hpp"

namespace {

using llama2c::Tokenizer;

// ASCII, 2-, 3- and 4-byte code points, a control character and a space run.
constexpr std::string_view fixed_text = "Once upon a time, caf\xC3\xA9 \xE2\x82\xAC\xF0\x9F\x98\x80 ab  aa\tend";

// The encoding of llama2.c's encode (run.c, eos off) for valid UTF-8: one
// token per code point or its bytes as byte-fallback tokens, then merging
// the pair with the highest score, the leftmost on ties, until none scores
// above -1e10. Quadratic, so only short texts go through it.
std::vector<int> reference_encode(const Tokenizer& tokenizer, std::string_view text, bool bos) {
  std::vector<int> tokens;
  if (bos) tokens.push_back(Tokenizer::bos_id);
  if (!text.empty()) tokens.push_back(tokenizer.find(" "));
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = start + 1;
    while (end < text.size() && end - start < 4 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
    const std::string_view code_point = text.substr(start, end - start);
    const int id = tokenizer.find(code_point);
    if (id >= 0) {
      tokens.push_back(id);
    } else {
      for (const char byte : code_point) tokens.push_back(static_cast<unsigned char>(byte) + Tokenizer::byte_token_offset);
    }
    start = end;
  }

  while (true) {
    float best_score = -1e10f;
    int best_id = -1;
    std::size_t best_index = tokens.size();
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const std::string merged = std::string(tokenizer.piece(tokens[i])) + std::string(tokenizer.piece(tokens[i + 1]));
      const int id = tokenizer.find(merged);
      if (id >= 0 && tokenizer.score(id) > best_score) {
        best_score = tokenizer.score(id);
        best_id = id;
        best_index = i;
      }
    }
    if (best_id < 0) break;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_index) + 1);
  }
  return tokens;
}

// Encodes valid UTF-8 `text`, compares with the reference and decodes every
// token. Decoding throws std::out_of_range for an id outside the vocabulary,
// which is a finding here.
void encode_and_decode(const Tokenizer& tokenizer, std::string_view text) {
  for (const bool bos : {false, true}) {
    const std::vector<int> ids = tokenizer.encode(text, bos);
    if (ids != reference_encode(tokenizer, text, bos)) std::abort();
    int previous = bos ? Tokenizer::bos_id : Tokenizer::eos_id;
    std::size_t decoded_bytes = 0;
    for (const int id : ids) {
      decoded_bytes += tokenizer.decode(previous, id).size();
      previous = id;
    }
    if (decoded_bytes > ids.size() * static_cast<std::size_t>(tokenizer.max_token_length())) std::abort();
  }
}

// Encodes fuzzer-chosen text, which may be invalid UTF-8, with encode and
// the block protocol of text.hpp. Both must reject exactly the texts that
// find_utf8_error rejects.
void encode_fuzzed_text(const Tokenizer& tokenizer, std::string_view text) {
  const bool valid = !llama2c::find_utf8_error(text).has_value();
  if (!valid) {
    bool rejected = false;
    try {
      tokenizer.encode(text, false);
    } catch (const std::invalid_argument&) {
      rejected = true;
    }
    if (!rejected) std::abort();
    rejected = false;
    try {
      llama2c::encode_blocks(text, tokenizer);
    } catch (const std::invalid_argument&) {
      rejected = true;
    }
    if (!rejected) std::abort();
    return;
  }

  encode_and_decode(tokenizer, text);
  std::vector<int> expected;
  for (const std::string_view block : llama2c::split_blocks(text)) tokenizer.encode(block, true, expected);
  if (llama2c::encode_blocks(text, tokenizer) != expected) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 5) return 0;
  std::int32_t vocab_size = 0;
  std::memcpy(&vocab_size, data, sizeof(vocab_size));
  const std::size_t text_size = std::min<std::size_t>(data[4], size - 5);
  const std::string_view text(reinterpret_cast<const char*>(data + 5), text_size);
  const auto file = std::as_bytes(std::span<const std::uint8_t>(data + 5 + text_size, size - 5 - text_size));

  std::optional<Tokenizer> tokenizer;
  try {
    tokenizer.emplace(Tokenizer::parse(file, vocab_size, "fuzz-input"));
  } catch (const llama2c::FileFormatError&) {
    return 0;
  } catch (const std::invalid_argument&) {
    // Documented only for a vocab_size below the 259 special and byte-fallback tokens.
    if (vocab_size >= Tokenizer::byte_token_offset + 256) std::abort();
    return 0;
  }

  if (tokenizer->vocab_size() != vocab_size || tokenizer->max_token_length() <= 0) std::abort();
  encode_and_decode(*tokenizer, fixed_text);
  encode_fuzzed_text(*tokenizer, text);
  return 0;
}
