// Reads and writes NumPy .npy files that contain little-endian float32 ('<f4')
// or int64 ('<i8') arrays in C order.
//
// Format reference: the docstring of numpy/lib/format.py. A file starts with
// the magic string "\x93NUMPY", a major and a minor version byte, and the
// little-endian header length (uint16 in version 1.0, uint32 in 2.0 and 3.0).
// The ASCII header that follows is a Python dict literal, and the raw array
// data comes last.
//
// Reading is strict. Every error throws NpyError, whose message starts with the
// file path and names the problem and, where there is one, the fix. The reader
// checks the header length and the shape against the size of the file before it
// allocates the header or the array, so a corrupt or hostile header cannot
// trigger a large allocation.
// Bytes after the array data are an error, not ignored as np.load does, because
// they mean that the shape is wrong or that several arrays were appended to one
// file.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace kvevict::tools {

static_assert(std::endian::native == std::endian::little,
              "npy.hpp copies array bytes unchanged, so it needs a little-endian host");
static_assert(std::numeric_limits<float>::is_iec559 && sizeof(float) == 4,
              "npy.hpp needs float to be IEEE 754 binary32");

// Error for a .npy file that cannot be read or written. what() is
// "<source>: <problem>", where source is the file path, or the name passed to
// parse_npy for an in-memory buffer.
class NpyError : public std::runtime_error {
 public:
  NpyError(const std::string& source, const std::string& problem)
      : std::runtime_error(source + ": " + problem), source_(source) {}

  const std::string& source() const noexcept { return source_; }

 private:
  std::string source_;
};

// Element types that this reader and writer support.
template <typename T>
concept NpyElement = std::same_as<T, float> || std::same_as<T, std::int64_t>;

// Array read from or written to a .npy file. An empty shape is a 0-d array with
// one element, and a shape with a zero dimension has no elements.
template <NpyElement T>
struct NpyArray {
  std::vector<std::int64_t> shape;
  std::vector<T> data;  // C order: the last index varies fastest
};

// Maximum rank, equal to NPY_MAXDIMS in the NumPy 2.x C headers (1.x allows 32).
inline constexpr std::size_t kNpyMaxRank = 64;

namespace detail {

template <NpyElement T>
struct NpyTraits;

template <>
struct NpyTraits<float> {
  static constexpr std::string_view descr = "<f4";
  static constexpr std::string_view big_endian_descr = ">f4";
  static constexpr std::string_view name = "float32";
};

template <>
struct NpyTraits<std::int64_t> {
  static constexpr std::string_view descr = "<i8";
  static constexpr std::string_view big_endian_descr = ">i8";
  static constexpr std::string_view name = "int64";
};

inline constexpr std::string_view kMagic = "\x93NUMPY";
inline constexpr std::size_t kMaxPreambleSize = 12;  // magic, version, uint32 length
inline constexpr std::size_t kArrayAlignment = 64;   // NumPy's ARRAY_ALIGN
// NumPy's GROWTH_AXIS_MAX_DIGITS: NumPy releases that define it pad the header
// so that the first dimension can grow to 21 digits without moving the data.
inline constexpr std::size_t kGrowthAxisMaxDigits = 21;
inline constexpr std::size_t kMaxQuotedChars = 120;

[[noreturn]] inline void fail(const std::string& source, const std::string& problem) {
  throw NpyError(source, problem);
}

// Formats a shape as Python writes a tuple: "()", "(5,)", "(2, 3)".
inline std::string format_shape(std::span<const std::int64_t> shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) {
      text += ", ";
    }
    text += std::to_string(shape[i]);
  }
  if (shape.size() == 1) {
    text += ',';
  }
  text += ')';
  return text;
}

// Quotes bytes from a file for an error message. Bytes outside printable ASCII
// become \xNN, and long text is cut to kMaxQuotedChars.
inline std::string quote_for_message(std::string_view text) {
  static constexpr char kHexDigits[] = "0123456789abcdef";
  std::string quoted = "\"";
  const std::size_t shown_count = std::min(text.size(), kMaxQuotedChars);
  for (std::size_t i = 0; i < shown_count; ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte == '"' || byte == '\\') {
      quoted += '\\';
      quoted += static_cast<char>(byte);
    } else if (byte >= 0x20 && byte < 0x7f) {
      quoted += static_cast<char>(byte);
    } else if (byte == '\n') {
      quoted += "\\n";
    } else {
      quoted += "\\x";
      quoted += kHexDigits[byte >> 4];
      quoted += kHexDigits[byte & 0xf];
    }
  }
  quoted += '"';
  if (shown_count < text.size()) {
    quoted += " (" + std::to_string(text.size() - shown_count) + " more bytes)";
  }
  return quoted;
}

// Returns ": <reason>" for the current errno, or "" when errno is 0.
inline std::string describe_errno() {
  const int code = errno;
  if (code == 0) {
    return "";
  }
  return ": " + std::generic_category().message(code);
}

inline std::string_view as_chars(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// Returns the number of elements in an array of the given shape, whose
// dimensions must not be negative. Returns nullopt when the product of the
// nonzero dimensions times item_size overflows int64. NumPy makes the same check
// when it creates an array, so a zero dimension does not hide an absurd shape.
inline std::optional<std::uint64_t> count_elements(std::span<const std::int64_t> shape, std::size_t item_size) {
  const std::uint64_t max_elements =
      static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / item_size;
  std::uint64_t product = 1;
  bool has_zero_dimension = false;
  for (const std::int64_t dimension : shape) {
    if (dimension == 0) {
      has_zero_dimension = true;
      continue;
    }
    const auto size = static_cast<std::uint64_t>(dimension);
    if (product > max_elements / size) {
      return std::nullopt;
    }
    product *= size;
  }
  return has_zero_dimension ? 0 : product;
}

// ---------------------------------------------------------------------------
// Reading

// Location of the header, taken from the fixed-size preamble.
struct NpyPreamble {
  unsigned major_version = 0;
  std::size_t header_offset = 0;  // bytes before the header: 10 in 1.0, 12 in 2.0 and 3.0
  std::uint64_t header_length = 0;
};

[[noreturn]] inline void fail_bad_magic(std::string_view first_bytes, const std::string& source) {
  if (first_bytes.starts_with("PK")) {
    fail(source,
         "not a .npy file: it starts with \"PK\", as a .npz (zip) archive does. "
         "Extract one array with np.load(path)[name] and save it with np.save");
  }
  fail(source, "not a .npy file: expected the magic string \"\\x93NUMPY\", found " +
                   quote_for_message(first_bytes.substr(0, kMagic.size())));
}

// Parses the magic string, version and header length. first_bytes contains the
// first min(total_size, kMaxPreambleSize) bytes of the file.
inline NpyPreamble parse_preamble(std::span<const std::byte> first_bytes, std::uint64_t total_size,
                                  const std::string& source) {
  const std::string_view text = as_chars(first_bytes);
  if (total_size == 0) {
    fail(source, "the file is empty, not a .npy file");
  }

  // Compare the magic on the bytes present first, so that a short file of some
  // other kind reports the wrong magic rather than truncation.
  const std::size_t magic_bytes = std::min(text.size(), kMagic.size());
  if (text.substr(0, magic_bytes) != kMagic.substr(0, magic_bytes)) {
    fail_bad_magic(text, source);
  }
  if (text.size() < kMagic.size() + 2) {
    fail(source, "the file is truncated: it has " + std::to_string(total_size) +
                     " bytes, fewer than the 8 bytes of the magic string and version");
  }

  NpyPreamble preamble;
  preamble.major_version = static_cast<unsigned char>(text[6]);
  const auto minor_version = static_cast<unsigned>(static_cast<unsigned char>(text[7]));
  if (preamble.major_version < 1 || preamble.major_version > 3 || minor_version != 0) {
    fail(source, "unsupported .npy format version " + std::to_string(preamble.major_version) + "." +
                     std::to_string(minor_version) + "; this reader supports 1.0, 2.0 and 3.0");
  }

  const std::size_t length_field_size = preamble.major_version == 1 ? 2 : 4;
  preamble.header_offset = kMagic.size() + 2 + length_field_size;
  if (text.size() < preamble.header_offset) {
    fail(source, "the file is truncated inside the header length field (" +
                     std::to_string(total_size) + " bytes in the file)");
  }
  for (std::size_t i = 0; i < length_field_size; ++i) {
    const auto byte = static_cast<std::uint64_t>(static_cast<unsigned char>(text[8 + i]));
    preamble.header_length |= byte << (8 * i);
  }

  const std::uint64_t bytes_after_preamble = total_size - preamble.header_offset;
  if (preamble.header_length > bytes_after_preamble) {
    fail(source, "the header length " + std::to_string(preamble.header_length) +
                     " runs past the end of the file, which has " +
                     std::to_string(bytes_after_preamble) + " bytes after the " +
                     std::to_string(preamble.header_offset) + "-byte preamble");
  }
  return preamble;
}

// Header fields of a .npy file.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<std::int64_t> shape;
};

// Recursive-descent parser for the header dict. It accepts the subset of Python
// literal syntax that .npy writers produce:
// - the keys 'descr', 'fortran_order' and 'shape', once each and in any order,
// - strings in single or double quotes without escapes, and True or False,
// - tuples of decimal integers with an optional trailing comma, and the 'L'
//   suffix of Python 2 writers,
// - an optional trailing comma in the dict, and whitespace between tokens.
// Anything else is an error. That includes some text that Python accepts, such
// as comments, escapes, and hexadecimal or underscores in integers.
class NpyHeaderParser {
 public:
  NpyHeaderParser(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  NpyHeader parse() {
    NpyHeader header;
    bool has_descr = false;
    bool has_fortran_order = false;
    bool has_shape = false;

    skip_whitespace();
    expect('{', "expected '{' to open the header dict");
    while (true) {
      skip_whitespace();
      if (consume('}')) {
        break;
      }

      const std::string_view key = parse_string("expected a quoted key or '}'");
      skip_whitespace();
      expect(':', "expected ':' after the key '" + std::string(key) + "'");
      skip_whitespace();
      if (key == "descr") {
        reject_duplicate(has_descr, key);
        header.descr = parse_descr();
      } else if (key == "fortran_order") {
        reject_duplicate(has_fortran_order, key);
        header.fortran_order = parse_bool(key);
      } else if (key == "shape") {
        reject_duplicate(has_shape, key);
        header.shape = parse_shape();
      } else {
        fail_at("unexpected key " + quote_for_message(key) +
                "; the header must have exactly the keys 'descr', 'fortran_order' and 'shape'");
      }

      skip_whitespace();
      if (consume(',')) {
        continue;
      }
      expect('}', "expected ',' or '}' after the value of '" + std::string(key) + "'");
      break;
    }

    skip_whitespace();
    if (position_ != text_.size()) {
      fail_at("unexpected text after the closing '}'");
    }
    if (!has_descr || !has_fortran_order || !has_shape) {
      std::string missing = "shape";
      if (!has_descr) {
        missing = "descr";
      } else if (!has_fortran_order) {
        missing = "fortran_order";
      }
      fail_at("missing key '" + missing + "'");
    }
    return header;
  }

 private:
  [[noreturn]] void fail_at(const std::string& problem) const {
    // Quote the header without its padding, which would fill the message.
    std::string_view unpadded = text_;
    while (!unpadded.empty() && (unpadded.back() == ' ' || unpadded.back() == '\n')) {
      unpadded.remove_suffix(1);
    }
    fail(source_, "invalid header: " + problem + " (at byte " + std::to_string(position_) + " of the header " +
                      quote_for_message(unpadded) + ")");
  }

  bool at_end() const { return position_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[position_]; }

  bool consume(char expected) {
    if (!at_end() && text_[position_] == expected) {
      ++position_;
      return true;
    }
    return false;
  }

  void expect(char expected, const std::string& problem) {
    if (!consume(expected)) {
      fail_at(problem);
    }
  }

  void skip_whitespace() {
    while (!at_end()) {
      const char c = text_[position_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\f') {
        break;
      }
      ++position_;
    }
  }

  static bool is_identifier_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  }

  void reject_duplicate(bool& seen, std::string_view key) {
    if (seen) {
      fail_at("duplicate key '" + std::string(key) + "'");
    }
    seen = true;
  }

  std::string_view parse_string(const std::string& problem_if_missing) {
    const char quote = peek();
    if (quote != '\'' && quote != '"') {
      fail_at(problem_if_missing);
    }
    ++position_;
    const std::size_t start = position_;
    while (!at_end() && text_[position_] != quote) {
      const auto c = static_cast<unsigned char>(text_[position_]);
      if (c == '\\') {
        fail_at("escape sequences in strings are not supported");
      }
      if (c < 0x20 || c >= 0x7f) {
        fail_at("control or non-ASCII byte in a string");
      }
      ++position_;
    }
    if (at_end()) {
      fail_at("unterminated string");
    }
    const std::string_view value = text_.substr(start, position_ - start);
    ++position_;
    return value;
  }

  std::string parse_descr() {
    if (peek() == '[') {
      fail(source_,
           "unsupported dtype: the 'descr' is a list, which means a structured array; "
           "save a plain float32 or int64 array instead");
    }
    return std::string(parse_string("expected a quoted string for 'descr'"));
  }

  bool parse_bool(std::string_view key) {
    const std::string_view rest = text_.substr(position_);
    bool value = false;
    std::size_t length = 0;
    if (rest.starts_with("True")) {
      value = true;
      length = 4;
    } else if (rest.starts_with("False")) {
      length = 5;
    }
    if (length == 0 || (length < rest.size() && is_identifier_char(rest[length]))) {
      fail_at("expected True or False for '" + std::string(key) + "'");
    }
    position_ += length;
    return value;
  }

  std::vector<std::int64_t> parse_shape() {
    if (peek() == '[') {
      fail_at("'shape' must be a tuple such as (2, 3), not a list");
    }
    expect('(', "expected a tuple such as (2, 3) for 'shape'");

    std::vector<std::int64_t> shape;
    skip_whitespace();
    if (consume(')')) {
      return shape;
    }
    while (true) {
      skip_whitespace();
      shape.push_back(parse_dimension());
      if (shape.size() > kNpyMaxRank) {
        fail_at("'shape' has more than " + std::to_string(kNpyMaxRank) + " dimensions");
      }

      skip_whitespace();
      if (consume(',')) {
        skip_whitespace();
        if (consume(')')) {
          break;
        }
        continue;
      }
      if (consume(')')) {
        if (shape.size() == 1) {
          fail_at("'shape' is a bare integer in parentheses, not a tuple; a 1-D shape is written (" +
                  std::to_string(shape[0]) + ",)");
        }
        break;
      }
      fail_at("expected ',' or ')' in 'shape'");
    }
    return shape;
  }

  // Parses one dimension: a decimal integer that fits in int64 and is not negative.
  std::int64_t parse_dimension() {
    const std::size_t start = position_;
    const bool negative = consume('-');
    const std::size_t digits_start = position_;
    while (!at_end() && text_[position_] >= '0' && text_[position_] <= '9') {
      ++position_;
    }
    const std::string_view digits = text_.substr(digits_start, position_ - digits_start);
    if (digits.empty()) {
      fail_at("expected an integer dimension in 'shape'");
    }
    // Python 3 rejects leading zeros in a nonzero decimal literal, so "05" is invalid.
    if (digits.size() > 1 && digits[0] == '0' && digits.find_first_not_of('0') != std::string_view::npos) {
      fail_at("leading zeros in the dimension " + quote_for_message(digits));
    }
    consume('L');
    if (!at_end() && (is_identifier_char(peek()) || peek() == '.')) {
      fail_at("expected an integer dimension in 'shape'");
    }

    const std::string_view literal = text_.substr(start, position_ - start);
    constexpr auto kInt64Max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    std::uint64_t value = 0;
    for (const char digit : digits) {
      const auto digit_value = static_cast<std::uint64_t>(digit - '0');
      if (value > (kInt64Max - digit_value) / 10) {
        position_ = start;
        fail_at("the dimension " + quote_for_message(literal) + " in 'shape' does not fit in int64");
      }
      value = value * 10 + digit_value;
    }
    if (negative && value != 0) {
      position_ = start;
      fail_at("negative dimension " + quote_for_message(literal) + " in 'shape'");
    }
    return static_cast<std::int64_t>(value);
  }

  std::string_view text_;
  const std::string& source_;
  std::size_t position_ = 0;
};

inline NpyHeader parse_header(std::string_view text, const std::string& source) {
  return NpyHeaderParser(text, source).parse();
}

template <NpyElement T>
std::string describe_descr_mismatch(const std::string& descr) {
  using Traits = NpyTraits<T>;
  std::string problem = "unsupported dtype " + quote_for_message(descr) + "; expected \"" +
                        std::string(Traits::descr) + "\" (little-endian " + std::string(Traits::name) + ")";
  if (descr == Traits::big_endian_descr) {
    problem += ". The file is big-endian";
  }
  return problem + ". Convert before saving: np.save(path, a.astype('" + std::string(Traits::descr) + "'))";
}

// Checks the header against the element type T, the expected rank and the
// data_bytes that follow the header, and returns the number of elements.
template <NpyElement T>
std::size_t check_header(const NpyHeader& header, std::uint64_t data_bytes,
                         std::optional<std::size_t> expected_rank, const std::string& source) {
  if (header.descr != NpyTraits<T>::descr) {
    fail(source, describe_descr_mismatch<T>(header.descr));
  }
  if (header.fortran_order) {
    fail(source,
         "the array is stored in Fortran order (fortran_order: True), but this reader needs C order. "
         "Save with np.save(path, np.ascontiguousarray(a))");
  }

  const std::string shape_text = format_shape(header.shape);
  if (expected_rank.has_value() && header.shape.size() != *expected_rank) {
    fail(source, "expected an array of rank " + std::to_string(*expected_rank) + ", but the shape is " +
                     shape_text + " (rank " + std::to_string(header.shape.size()) + ")");
  }

  const std::optional<std::uint64_t> element_count = count_elements(header.shape, sizeof(T));
  if (!element_count.has_value()) {
    fail(source, "the shape " + shape_text + " is too large: its size in bytes overflows int64");
  }

  const std::uint64_t expected_bytes = *element_count * sizeof(T);
  const std::string requirement = "the shape " + shape_text + " of " + std::string(NpyTraits<T>::name) +
                                  " needs " + std::to_string(expected_bytes) + " bytes of data, and " +
                                  std::to_string(data_bytes) + " bytes follow the header";
  if (expected_bytes > data_bytes) {
    fail(source, "the data is truncated: " + requirement);
  }
  if (expected_bytes < data_bytes) {
    fail(source, "unexpected " + std::to_string(data_bytes - expected_bytes) +
                     " bytes after the array data: " + requirement +
                     ". The shape may be wrong, or several arrays were appended to one file "
                     "(use np.savez for several arrays)");
  }
  // Fits in size_t because the file or buffer of data_bytes does.
  return static_cast<std::size_t>(*element_count);
}

template <NpyElement T>
NpyArray<T> parse_npy_bytes(std::span<const std::byte> bytes, const std::string& source,
                            std::optional<std::size_t> expected_rank) {
  const NpyPreamble preamble =
      parse_preamble(bytes.first(std::min(bytes.size(), kMaxPreambleSize)), bytes.size(), source);
  // parse_preamble checked that the header ends inside the buffer.
  const auto header_length = static_cast<std::size_t>(preamble.header_length);
  const NpyHeader header = parse_header(as_chars(bytes.subspan(preamble.header_offset, header_length)), source);

  const std::size_t data_offset = preamble.header_offset + header_length;
  const std::size_t element_count = check_header<T>(header, bytes.size() - data_offset, expected_rank, source);

  NpyArray<T> array;
  array.shape = header.shape;
  array.data.resize(element_count);
  if (element_count > 0) {
    std::memcpy(array.data.data(), bytes.data() + data_offset, element_count * sizeof(T));
  }
  return array;
}

inline void read_exactly(std::ifstream& stream, void* destination, std::size_t size, const std::string& source) {
  stream.read(static_cast<char*>(destination), static_cast<std::streamsize>(size));
  if (static_cast<std::size_t>(stream.gcount()) != size) {
    fail(source, "failed to read " + std::to_string(size) +
                     " bytes; the file may have been truncated while it was read");
  }
}

template <NpyElement T>
NpyArray<T> read_npy_file(const std::filesystem::path& path, std::optional<std::size_t> expected_rank) {
  const std::string source = path.string();
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (status.type() == std::filesystem::file_type::not_found) {
    fail(source, "file not found");
  }
  if (error) {
    fail(source, "cannot access the file: " + error.message());
  }
  if (!std::filesystem::is_regular_file(status)) {
    fail(source, "not a regular file");
  }
  const std::uint64_t total_size = std::filesystem::file_size(path, error);
  if (error) {
    fail(source, "cannot determine the file size: " + error.message());
  }

  errno = 0;
  std::ifstream stream(path, std::ios::binary);
  if (!stream) {
    fail(source, "cannot open the file for reading" + describe_errno());
  }

  std::array<std::byte, kMaxPreambleSize> first_bytes{};
  const auto first_count = static_cast<std::size_t>(std::min<std::uint64_t>(total_size, kMaxPreambleSize));
  read_exactly(stream, first_bytes.data(), first_count, source);
  const NpyPreamble preamble =
      parse_preamble(std::span<const std::byte>(first_bytes.data(), first_count), total_size, source);

  // parse_preamble checked the header length against the file size, so this
  // allocation is bounded by the file.
  std::string header_text(static_cast<std::size_t>(preamble.header_length), '\0');
  stream.seekg(static_cast<std::streamoff>(preamble.header_offset));
  read_exactly(stream, header_text.data(), header_text.size(), source);
  const NpyHeader header = parse_header(header_text, source);

  const std::uint64_t data_bytes = total_size - preamble.header_offset - preamble.header_length;
  const std::size_t element_count = check_header<T>(header, data_bytes, expected_rank, source);

  NpyArray<T> array;
  array.shape = header.shape;
  array.data.resize(element_count);
  if (element_count > 0) {
    read_exactly(stream, array.data.data(), element_count * sizeof(T), source);
  }
  return array;
}

// ---------------------------------------------------------------------------
// Writing

// Checks that shape describes element_count elements and can be read back.
inline void check_shape_for_writing(std::span<const std::int64_t> shape, std::size_t element_count,
                                    std::size_t item_size, const std::string& source) {
  const std::string shape_text = format_shape(shape);
  if (shape.size() > kNpyMaxRank) {
    fail(source, "cannot write the shape " + shape_text + ": it has more than " + std::to_string(kNpyMaxRank) +
                     " dimensions");
  }

  for (const std::int64_t dimension : shape) {
    if (dimension < 0) {
      fail(source, "cannot write the shape " + shape_text + ": negative dimension " + std::to_string(dimension));
    }
  }
  const std::optional<std::uint64_t> shape_count = count_elements(shape, item_size);
  if (!shape_count.has_value()) {
    fail(source, "cannot write the shape " + shape_text + ": its size in bytes overflows int64");
  }
  if (*shape_count != element_count) {
    fail(source, "cannot write the shape " + shape_text + ", which has " + std::to_string(*shape_count) +
                     " elements, with " + std::to_string(element_count) + " elements of data");
  }
}

// Builds the preamble and header as np.save writes them for a C-order array in
// format 1.0. The dict has its keys in sorted order and is followed by the
// growth-axis spaces. Space padding and a final newline make the data start at
// a multiple of 64 bytes. NumPy releases from before GROWTH_AXIS_MAX_DIGITS omit
// the growth-axis spaces, so for some shapes their header is 64 bytes shorter.
inline std::string make_header(std::string_view descr, std::span<const std::int64_t> shape) {
  std::string dict = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " +
                     format_shape(shape) + ", }";
  if (!shape.empty()) {
    dict.append(kGrowthAxisMaxDigits - std::to_string(shape[0]).size(), ' ');
  }

  // Like NumPy, pad with 1 to 64 spaces, never 0.
  const std::size_t preamble_size = kMagic.size() + 2 + 2;
  const std::size_t unpadded_size = preamble_size + dict.size() + 1;
  const std::size_t padding = kArrayAlignment - unpadded_size % kArrayAlignment;
  const std::size_t header_length = dict.size() + padding + 1;
  // kNpyMaxRank bounds the dict to about 1.5 KB, so the length fits in uint16.
  static_assert(kNpyMaxRank * 24 + 128 < 65536);

  std::string header(kMagic);
  header += '\x01';
  header += '\x00';
  header += static_cast<char>(header_length & 0xff);
  header += static_cast<char>((header_length >> 8) & 0xff);
  header += dict;
  header.append(padding, ' ');
  header += '\n';
  return header;
}

template <NpyElement T>
std::vector<std::byte> encode_npy_bytes(const std::vector<std::int64_t>& shape, std::span<const T> data) {
  check_shape_for_writing(shape, data.size(), sizeof(T), "<memory>");
  const std::string header = make_header(NpyTraits<T>::descr, shape);
  std::vector<std::byte> bytes(header.size() + data.size_bytes());
  std::memcpy(bytes.data(), header.data(), header.size());
  if (!data.empty()) {
    std::memcpy(bytes.data() + header.size(), data.data(), data.size_bytes());
  }
  return bytes;
}

template <NpyElement T>
void write_npy_file(const std::filesystem::path& path, const std::vector<std::int64_t>& shape,
                    std::span<const T> data) {
  const std::string source = path.string();
  check_shape_for_writing(shape, data.size(), sizeof(T), source);
  const std::string header = make_header(NpyTraits<T>::descr, shape);

  errno = 0;
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  if (!stream) {
    fail(source, "cannot open the file for writing" + describe_errno());
  }
  stream.write(header.data(), static_cast<std::streamsize>(header.size()));
  stream.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size_bytes()));
  stream.close();
  if (!stream) {
    fail(source, "failed to write the file" + describe_errno());
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Public interface

// Parses a .npy file held in memory. source names the buffer in error messages.
// Throws NpyError on any invalid or unsupported input.
template <NpyElement T = float>
NpyArray<T> parse_npy(std::span<const std::byte> bytes, const std::string& source = "<memory>") {
  return detail::parse_npy_bytes<T>(bytes, source, std::nullopt);
}

// Parses like parse_npy and also requires the array to have expected_rank dimensions.
template <NpyElement T = float>
NpyArray<T> parse_npy(std::span<const std::byte> bytes, const std::string& source, std::size_t expected_rank) {
  return detail::parse_npy_bytes<T>(bytes, source, expected_rank);
}

// Reads a .npy file. Throws NpyError when the file cannot be read, is not a
// valid .npy file, or does not contain a C-order array of T.
template <NpyElement T = float>
NpyArray<T> read_npy(const std::filesystem::path& path) {
  return detail::read_npy_file<T>(path, std::nullopt);
}

// Reads like read_npy and also requires the array to have expected_rank
// dimensions, which it checks before reading the data.
template <NpyElement T = float>
NpyArray<T> read_npy(const std::filesystem::path& path, std::size_t expected_rank) {
  return detail::read_npy_file<T>(path, expected_rank);
}

// Encodes a float32 array as the bytes of a format 1.0 .npy file, as np.save
// writes it (see make_header for the NumPy versions). data is in C order.
// Throws NpyError when the shape does not match data.size(), has a negative
// dimension or has more than kNpyMaxRank dimensions.
inline std::vector<std::byte> encode_npy(const std::vector<std::int64_t>& shape, std::span<const float> data) {
  return detail::encode_npy_bytes<float>(shape, data);
}

// Encodes an int64 array like the float32 overload.
inline std::vector<std::byte> encode_npy(const std::vector<std::int64_t>& shape,
                                         std::span<const std::int64_t> data) {
  return detail::encode_npy_bytes<std::int64_t>(shape, data);
}

// Writes a float32 array to path as encode_npy encodes it, replacing any
// existing file. Throws NpyError on an invalid shape or a failed write.
// NOTE: a failed write can leave a partial file at path.
inline void write_npy(const std::filesystem::path& path, const std::vector<std::int64_t>& shape,
                      std::span<const float> data) {
  detail::write_npy_file<float>(path, shape, data);
}

// Writes an int64 array like the float32 overload.
inline void write_npy(const std::filesystem::path& path, const std::vector<std::int64_t>& shape,
                      std::span<const std::int64_t> data) {
  detail::write_npy_file<std::int64_t>(path, shape, data);
}

// Writes array.shape and array.data like the overloads above.
template <NpyElement T>
void write_npy(const std::filesystem::path& path, const NpyArray<T>& array) {
  detail::write_npy_file<T>(path, array.shape, std::span<const T>(array.data));
}

}  // namespace kvevict::tools
