// Tokenizer in llama2.c's binary format, with llama2.c's encode and decode.
//
// File layout (little-endian):
//   int32 max_token_length
//   vocab_size times: float32 merge score, int32 byte length, the bytes
// The file does not store the vocabulary size, so it comes from the model's header.
#pragma once

#include "checkpoint.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <queue>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace llama2c {

// Location of the first invalid UTF-8 sequence in a text (RFC 3629: no
// overlong forms, no surrogates, nothing above U+10FFFF).
struct Utf8Error {
  std::size_t offset = 0;  // byte offset where the invalid sequence starts
  std::size_t length = 0;  // bytes from `offset` up to and including the first bad one
  bool truncated = false;  // the text ends inside a multi-byte sequence
};

// Returns the byte length of the UTF-8 sequence that starts at text[i], or
// 0 when it is invalid, which it then describes in `error`.
inline std::size_t utf8_sequence_length(std::string_view text, std::size_t i, Utf8Error& error) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  std::size_t length = 0;
  unsigned char second_min = 0x80;
  unsigned char second_max = 0xBF;
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) second_min = 0xA0;  // overlong
    if (lead == 0xED) second_max = 0x9F;  // UTF-16 surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) second_min = 0x90;  // overlong
    if (lead == 0xF4) second_max = 0x8F;  // above U+10FFFF
  } else {
    error = {i, 1, false};
    return 0;
  }
  for (std::size_t k = 1; k < length; ++k) {
    if (i + k >= text.size()) {
      error = {i, k, true};
      return 0;
    }
    const unsigned char min = k == 1 ? second_min : 0x80;
    const unsigned char max = k == 1 ? second_max : 0xBF;
    if (byte(i + k) < min || byte(i + k) > max) {
      error = {i, k + 1, false};
      return 0;
    }
  }
  return length;
}

// Returns the first UTF-8 error in `text`, or nothing when it is valid.
inline std::optional<Utf8Error> find_utf8_error(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size()) {
    Utf8Error error;
    const std::size_t length = utf8_sequence_length(text, i, error);
    if (length == 0) return error;
    i += length;
  }
  return std::nullopt;
}

// Describes a UTF-8 error for messages: the offset and the bytes found there.
inline std::string describe_utf8_error(std::string_view text, const Utf8Error& error) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string bytes;
  for (std::size_t k = 0; k < error.length; ++k) {
    const auto byte = static_cast<unsigned char>(text[error.offset + k]);
    bytes += k == 0 ? "0x" : " 0x";
    bytes += hex[byte >> 4];
    bytes += hex[byte & 0xF];
  }
  if (error.truncated) {
    return "the UTF-8 sequence at byte offset " + std::to_string(error.offset) + " (" + bytes +
           ") is cut off by the end of the text";
  }
  return "invalid UTF-8 sequence at byte offset " + std::to_string(error.offset) + " (" + bytes + ")";
}

class Tokenizer {
 public:
  static constexpr int bos_id = 1;
  static constexpr int eos_id = 2;
  // Byte-fallback tokens: byte b is token b + 3, whose piece is "<0xBB>".
  static constexpr int byte_token_offset = 3;

  // Parses a tokenizer file of `vocab_size` tokens held in `bytes`, with the
  // same checks and messages as load. `source` names the buffer in error
  // messages. Throws std::invalid_argument when vocab_size is below 259, and
  // FileFormatError naming `source` and the token when a length is negative,
  // exceeds max_token_length or runs past the end, when bytes follow the last
  // token, or when the byte-fallback tokens or the " " token are missing.
  static Tokenizer parse(std::span<const std::byte> bytes, int vocab_size, std::string_view source) {
    detail::MemoryReader reader(bytes);
    return read(reader, bytes.size(), vocab_size, source);
  }

  // Loads `path` holding `vocab_size` tokens. Throws as parse does, naming the
  // file, and FileFormatError when the file is missing or unreadable.
  static Tokenizer load(const std::filesystem::path& path, int vocab_size) {
    const std::string source = path.string();
    require_vocab_size(vocab_size, source);  // before the file checks, so it wins over a missing file
    const std::uint64_t file_bytes = detail::file_size_or_throw(path, "tokenizer");
    std::ifstream in = detail::open_binary_or_throw(path, "tokenizer");
    detail::StreamReader reader(in);
    return read(reader, file_bytes, vocab_size, source);
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int max_token_length() const { return max_token_length_; }
  std::string_view piece(int id) const { return pieces_.at(static_cast<std::size_t>(id)); }
  float score(int id) const { return scores_.at(static_cast<std::size_t>(id)); }

  // Returns the id whose piece is exactly `piece`, or -1.
  int find(std::string_view piece) const {
    const auto it = ids_.find(piece);
    return it == ids_.end() ? -1 : it->second;
  }

  // Appends the encoding of `text` to `out` exactly as llama2.c's encode
  // with eos = false: an optional BOS, the " " token when the text is not
  // empty (SentencePiece's dummy prefix), one token per UTF-8 code point or
  // its byte-fallback tokens, then repeated merging of the adjacent pair
  // whose merged piece has the highest score (the leftmost pair on ties).
  // Throws std::invalid_argument naming the byte offset when `text` is not
  // valid UTF-8.
  void encode(std::string_view text, bool bos, std::vector<int>& out) const {
    if (const auto error = find_utf8_error(text)) {
      throw std::invalid_argument("cannot encode text: " + describe_utf8_error(text, *error) +
                                  "; pass UTF-8 text");
    }
    std::vector<int> tokens;
    tokens.reserve(text.size() + 2);
    if (bos) tokens.push_back(bos_id);
    if (!text.empty()) tokens.push_back(space_id_);

    std::size_t i = 0;
    while (i < text.size()) {
      Utf8Error unused;
      const std::size_t length = utf8_sequence_length(text, i, unused);
      const int id = find(text.substr(i, length));
      if (id >= 0) {
        tokens.push_back(id);
      } else {
        for (std::size_t k = 0; k < length; ++k) {
          tokens.push_back(static_cast<unsigned char>(text[i + k]) + byte_token_offset);
        }
      }
      i += length;
    }
    merge_pairs(tokens);
    out.insert(out.end(), tokens.begin(), tokens.end());
  }

  std::vector<int> encode(std::string_view text, bool bos) const {
    std::vector<int> out;
    encode(text, bos, out);
    return out;
  }

  // Returns the text of `token` following `previous`, as llama2.c's decode:
  // the leading space of a piece right after BOS is dropped, and a
  // byte-fallback piece "<0xBB>" becomes the single byte 0xBB.
  std::string_view decode(int previous, int token) const {
    const auto id = static_cast<std::size_t>(token);
    if (token < 0 || id >= pieces_.size()) {
      throw std::out_of_range("Tokenizer::decode: token id " + std::to_string(token) + " is outside [0, " +
                              std::to_string(pieces_.size()) + ")");
    }
    if (byte_values_[id] >= 0) {
      return {&byte_characters_[static_cast<std::size_t>(byte_values_[id])], 1};
    }
    std::string_view piece = pieces_[id];
    if (previous == bos_id && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    return piece;
  }

 private:
  // Hash that lets the piece index be searched with a std::string_view.
  struct PieceHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view piece) const { return std::hash<std::string_view>{}(piece); }
  };

  Tokenizer() {
    for (std::size_t b = 0; b < byte_characters_.size(); ++b) byte_characters_[b] = static_cast<char>(b);
  }

  static void require_vocab_size(int vocab_size, std::string_view source) {
    if (vocab_size < byte_token_offset + 256) {
      throw std::invalid_argument("tokenizer " + detail::quoted(source) + ": vocab_size " +
                                  std::to_string(vocab_size) + " is below " +
                                  std::to_string(byte_token_offset + 256) +
                                  ", the 3 special and 256 byte-fallback tokens llama2.c tokenizers start with; "
                                  "pass the model's vocab_size");
    }
  }

  // Parses a tokenizer file of `file_bytes` bytes from `reader`. Every size
  // read from the file is checked against the bytes left before anything is
  // allocated for it, so a corrupt length fails without a huge allocation.
  template <class Reader>
  static Tokenizer read(Reader& reader, std::uint64_t file_bytes, int vocab_size, std::string_view source) {
    const std::string where = "tokenizer " + detail::quoted(source) + ": ";
    require_vocab_size(vocab_size, source);

    Tokenizer tokenizer;
    std::uint64_t offset = 0;
    auto require_available = [&](std::uint64_t bytes, const std::string& what) {
      if (bytes > file_bytes - offset) {
        throw FileFormatError(where + what + " needs " + std::to_string(bytes) + " bytes at offset " +
                              std::to_string(offset) + " but the file ends at " + std::to_string(file_bytes) +
                              "; the file is truncated or holds fewer than the model's " +
                              std::to_string(vocab_size) + " tokens");
      }
    };
    auto read_exact = [&](void* out, std::uint64_t bytes, const std::string& what) {
      require_available(bytes, what);
      if (!reader.read(out, bytes)) throw FileFormatError(where + "read failed at offset " + std::to_string(offset));
      offset += bytes;
    };

    std::int32_t max_token_length = 0;
    read_exact(&max_token_length, sizeof(max_token_length), "the max_token_length header");
    if (max_token_length <= 0) {
      throw FileFormatError(where + "max_token_length is " + std::to_string(max_token_length) +
                            " but must be positive; the file is not a llama2.c tokenizer");
    }
    tokenizer.max_token_length_ = max_token_length;

    // Each token takes at least a score and a length, so a vocab_size that
    // the file cannot hold fails here, before the token tables are allocated.
    const auto count = static_cast<std::size_t>(vocab_size);
    const std::uint64_t min_token_bytes = sizeof(float) + sizeof(std::int32_t);
    if (count > (file_bytes - offset) / min_token_bytes) {
      throw FileFormatError(where + "the file has " + std::to_string(file_bytes) + " bytes, too few for " +
                            std::to_string(vocab_size) + " tokens of at least " + std::to_string(min_token_bytes) +
                            " bytes each after the 4-byte header; the file is truncated or contains fewer than "
                            "the model's " + std::to_string(vocab_size) + " tokens");
    }
    tokenizer.pieces_.resize(count);
    tokenizer.scores_.resize(count);
    for (std::size_t id = 0; id < count; ++id) {
      const std::string token = "token " + std::to_string(id);
      std::int32_t length = 0;
      read_exact(&tokenizer.scores_[id], sizeof(float), token + " score");
      read_exact(&length, sizeof(length), token + " length");
      if (length < 0 || length > max_token_length) {
        throw FileFormatError(where + token + " has length " + std::to_string(length) + " at offset " +
                              std::to_string(offset - sizeof(length)) + ", outside [0, max_token_length " +
                              std::to_string(max_token_length) + "]; the file is corrupt");
      }
      require_available(static_cast<std::uint64_t>(length), token + " bytes");
      tokenizer.pieces_[id].resize(static_cast<std::size_t>(length));
      read_exact(tokenizer.pieces_[id].data(), static_cast<std::uint64_t>(length), token + " bytes");
    }
    if (offset != file_bytes) {
      throw FileFormatError(where + std::to_string(file_bytes - offset) + " bytes follow the last of " +
                            std::to_string(vocab_size) +
                            " tokens; the tokenizer does not match the model's vocab_size");
    }
    tokenizer.index_pieces(where);
    return tokenizer;
  }

  // Returns the byte of a piece spelled exactly "<0xBB>" (hex digits in
  // either case, as llama2.c's sscanf accepts), or -1.
  static int parse_byte_piece(std::string_view piece) {
    if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
    auto digit = [](char c) {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      return -1;
    };
    const int high = digit(piece[3]);
    const int low = digit(piece[4]);
    return high < 0 || low < 0 ? -1 : high * 16 + low;
  }

  // Returns a piece for an error message: bytes outside printable ASCII
  // become \xBB escapes, and pieces over 64 bytes are cut short with "...".
  static std::string printable_piece(std::string_view piece) {
    static constexpr char hex[] = "0123456789ABCDEF";
    static constexpr std::size_t max_shown = 64;
    std::string text;
    for (std::size_t i = 0; i < piece.size() && i < max_shown; ++i) {
      const auto byte = static_cast<unsigned char>(piece[i]);
      if (byte >= 0x20 && byte < 0x7F) {
        text += piece[i];
      } else {
        text += "\\x";
        text += hex[byte >> 4];
        text += hex[byte & 0xF];
      }
    }
    if (piece.size() > max_shown) text += "...";
    return text;
  }

  void index_pieces(const std::string& where) {
    ids_.reserve(pieces_.size());
    byte_values_.assign(pieces_.size(), -1);
    for (std::size_t id = 0; id < pieces_.size(); ++id) {
      ids_.emplace(pieces_[id], static_cast<int>(id));  // the first of duplicate pieces wins
      byte_values_[id] = parse_byte_piece(pieces_[id]);
    }
    for (int b = 0; b < 256; ++b) {
      const auto id = static_cast<std::size_t>(b + byte_token_offset);
      if (byte_values_[id] != b) {
        throw FileFormatError(where + "token " + std::to_string(id) + " is '" + printable_piece(pieces_[id]) +
                              "' but byte fallback needs the piece of byte " + std::to_string(b) +
                              " there; the file is not a llama2.c (SentencePiece) tokenizer");
      }
    }
    space_id_ = find(" ");
    if (space_id_ < 0) {
      throw FileFormatError(where + "no token is the single space \" \" that encoding prepends to text; "
                            "the file is not a llama2.c (SentencePiece) tokenizer");
    }
  }

  // Merges adjacent tokens in place with the same result as llama2.c's
  // quadratic loop, in O(n log n): a priority queue ordered by (score
  // descending, left position ascending) replaces its scan. Tokens sit
  // in a linked list whose node indices keep the original order, so "left
  // position" compares like llama2.c's index. Entries made stale by a merge
  // are recognised and skipped when popped.
  void merge_pairs(std::vector<int>& tokens) const {
    if (tokens.size() < 2) return;
    struct Node {
      int token;
      int previous;
      int next;
    };
    struct Candidate {
      float score;
      int left;
      int right;
      int left_token;
      int right_token;
      int merged;
    };
    struct LowerPriority {
      bool operator()(const Candidate& a, const Candidate& b) const {
        if (a.score != b.score) return a.score < b.score;
        return a.left > b.left;
      }
    };

    const int n = static_cast<int>(tokens.size());
    std::vector<Node> nodes(tokens.size());
    for (int i = 0; i < n; ++i) nodes[static_cast<std::size_t>(i)] = {tokens[static_cast<std::size_t>(i)], i - 1, i + 1};
    nodes.back().next = -1;

    std::priority_queue<Candidate, std::vector<Candidate>, LowerPriority> queue;
    std::string merged_piece;
    // llama2.c starts its search at a best score of -1e10 and takes only
    // strictly higher scores, so merges scoring -1e10 or less (or NaN) never happen.
    const float score_floor = -1e10f;
    auto consider = [&](int left, int right) {
      if (left < 0 || right < 0) return;
      const int left_token = nodes[static_cast<std::size_t>(left)].token;
      const int right_token = nodes[static_cast<std::size_t>(right)].token;
      merged_piece.assign(pieces_[static_cast<std::size_t>(left_token)]);
      merged_piece.append(pieces_[static_cast<std::size_t>(right_token)]);
      const int merged = find(merged_piece);
      if (merged < 0) return;
      const float score = scores_[static_cast<std::size_t>(merged)];
      if (!(score > score_floor)) return;
      queue.push({score, left, right, left_token, right_token, merged});
    };
    for (int i = 0; i + 1 < n; ++i) consider(i, i + 1);

    while (!queue.empty()) {
      const Candidate best = queue.top();
      queue.pop();
      Node& left = nodes[static_cast<std::size_t>(best.left)];
      Node& right = nodes[static_cast<std::size_t>(best.right)];
      // A node's token only changes by merging with its right neighbour,
      // which makes its piece longer, so equal tokens mean an unchanged pair.
      const bool stale = left.token != best.left_token || left.next != best.right ||
                         right.token != best.right_token;
      if (stale) continue;
      left.token = best.merged;
      left.next = right.next;
      if (right.next >= 0) nodes[static_cast<std::size_t>(right.next)].previous = best.left;
      right.token = -1;
      consider(left.previous, best.left);
      consider(best.left, left.next);
    }

    tokens.clear();
    for (int i = 0; i >= 0; i = nodes[static_cast<std::size_t>(i)].next) {
      tokens.push_back(nodes[static_cast<std::size_t>(i)].token);
    }
  }

  int max_token_length_ = 0;
  int space_id_ = -1;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int> byte_values_;  // per token: the byte of a "<0xBB>" piece, else -1
  std::unordered_map<std::string, int, PieceHash, std::equal_to<>> ids_;
  std::array<char, 256> byte_characters_{};
};

}  // namespace llama2c
