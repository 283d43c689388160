// Text protocol for perplexity runs: a file of blocks separated by blank
// lines becomes one stream of token ids.
//
//   1. Split the text at blank lines. A line of only ASCII whitespace is
//      blank, and a run of blank lines counts as one separator.
//   2. Strip each block of leading and trailing ASCII whitespace.
//   3. Encode each block as BOS followed by the tokenizer's encoding (with
//      its leading " " token), and concatenate the blocks in file order.
#pragma once

#include "checkpoint.hpp"
#include "tokenizer.hpp"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

namespace llama2c {

inline bool is_ascii_whitespace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

inline std::string_view strip_ascii_whitespace(std::string_view text) {
  while (!text.empty() && is_ascii_whitespace(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_ascii_whitespace(text.back())) text.remove_suffix(1);
  return text;
}

// Returns the stripped, non-empty blocks of `text` (views into it).
inline std::vector<std::string_view> split_blocks(std::string_view text) {
  std::vector<std::string_view> blocks;
  std::size_t block_begin = std::string_view::npos;  // start of the current block, if one is open
  std::size_t block_end = 0;                          // end of its last non-blank line
  std::size_t line_begin = 0;
  while (line_begin <= text.size()) {
    std::size_t line_end = text.find('\n', line_begin);
    if (line_end == std::string_view::npos) line_end = text.size();
    const std::string_view line = text.substr(line_begin, line_end - line_begin);
    if (strip_ascii_whitespace(line).empty()) {
      if (block_begin != std::string_view::npos) {
        blocks.push_back(strip_ascii_whitespace(text.substr(block_begin, block_end - block_begin)));
        block_begin = std::string_view::npos;
      }
    } else {
      if (block_begin == std::string_view::npos) block_begin = line_begin;
      block_end = line_end;
    }
    line_begin = line_end + 1;
  }
  if (block_begin != std::string_view::npos) {
    blocks.push_back(strip_ascii_whitespace(text.substr(block_begin, block_end - block_begin)));
  }
  return blocks;
}

// Encodes `text` by the protocol above. Throws std::invalid_argument naming
// the byte offset when the text is not valid UTF-8.
inline std::vector<int> encode_blocks(std::string_view text, const Tokenizer& tokenizer) {
  if (const auto error = find_utf8_error(text)) {
    throw std::invalid_argument("cannot encode text: " + describe_utf8_error(text, *error) + "; pass UTF-8 text");
  }
  std::vector<int> ids;
  for (const std::string_view block : split_blocks(text)) tokenizer.encode(block, /*bos=*/true, ids);
  return ids;
}

// Reads a whole file into a string. Throws FileFormatError naming the path.
inline std::string read_text_file(const std::filesystem::path& path) {
  detail::file_size_or_throw(path, "text");
  std::ifstream in = detail::open_binary_or_throw(path, "text");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad()) throw FileFormatError("failed to read text file " + detail::quoted(path));
  return text;
}

// Reads `path` and encodes it by the protocol above. Throws FileFormatError
// naming the file and the byte offset when the file is not valid UTF-8.
inline std::vector<int> load_token_ids(const std::filesystem::path& path, const Tokenizer& tokenizer) {
  const std::string text = read_text_file(path);
  if (const auto error = find_utf8_error(text)) {
    throw FileFormatError("text file " + detail::quoted(path) + " is not valid UTF-8: " +
                          describe_utf8_error(text, *error) + "; convert it to UTF-8");
  }
  return encode_blocks(text, tokenizer);
}

}  // namespace llama2c
