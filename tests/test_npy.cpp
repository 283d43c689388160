// Tests for tools/npy.hpp. There is no NumPy on the build machines, so the
// tests write the .npy bytes themselves, following numpy/lib/format.py.
#include <catch2/catch.hpp>

#include "tools/npy.hpp"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
using kvevict::tools::encode_npy;
using kvevict::tools::NpyArray;
using kvevict::tools::NpyError;
using kvevict::tools::parse_npy;
using kvevict::tools::read_npy;
using kvevict::tools::write_npy;

// Directory under the system temporary directory, removed with its contents.
class TemporaryDirectory {
 public:
  TemporaryDirectory() {
    std::random_device random;
    do {
      path_ = fs::temp_directory_path() / ("kvevict-test-npy-" + std::to_string(random()));
    } while (!fs::create_directory(path_));
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

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(stream.good());
}

std::string read_file(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

std::span<const std::byte> as_bytes(const std::string& text) {
  return std::as_bytes(std::span<const char>(text));
}

std::string to_string(const std::vector<std::byte>& bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

template <typename T>
std::string data_bytes(const std::vector<T>& values) {
  return {reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T)};
}

std::string float_data(std::size_t count) {
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    values[i] = static_cast<float>(i) + 0.5f;
  }
  return data_bytes(values);
}

// Preamble of the given version with the header length field set to header_length.
std::string preamble(unsigned major, unsigned minor, std::uint32_t header_length) {
  std::string bytes = "\x93NUMPY";
  bytes += static_cast<char>(major);
  bytes += static_cast<char>(minor);
  const int length_field_size = major == 1 ? 2 : 4;
  for (int i = 0; i < length_field_size; ++i) {
    bytes += static_cast<char>((header_length >> (8 * i)) & 0xff);
  }
  return bytes;
}

// A .npy file with the header text exactly as given, without padding.
std::string raw_npy(const std::string& header, const std::string& data, unsigned major = 1) {
  return preamble(major, 0, static_cast<std::uint32_t>(header.size())) + header + data;
}

// A .npy file whose header is dict padded with spaces and a newline so that the
// data starts at a multiple of 64 bytes.
std::string npy(const std::string& dict, const std::string& data, unsigned major = 1) {
  const std::size_t preamble_size = major == 1 ? 10 : 12;
  std::string header = dict;
  while ((preamble_size + header.size() + 1) % 64 != 0) {
    header += ' ';
  }
  header += '\n';
  return raw_npy(header, data, major);
}

std::string dict_with(const std::string& descr, const std::string& fortran_order, const std::string& shape) {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran_order + ", 'shape': " + shape + ", }";
}

template <typename T>
bool same_bits(const std::vector<T>& left, const std::vector<T>& right) {
  return left.size() == right.size() &&
         (left.empty() || std::memcmp(left.data(), right.data(), left.size() * sizeof(T)) == 0);
}

std::vector<float> sample_floats(std::size_t count) {
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    values[i] = static_cast<float>(i) * 0.75f - 3.25f;
  }
  // Special values must survive bit for bit.
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), -0.0f, std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min()};
  for (std::size_t i = 0; i < count && i < std::size(specials); ++i) {
    values[i] = specials[i];
  }
  return values;
}

// A file that the reader must reject, and the text its message must contain.
struct BadFile {
  std::string name;
  std::string bytes;
  std::string problem;
};

// Checks that reading the file and parsing its bytes both throw NpyError with a
// message that names the source and contains the problem.
void require_rejected(const TemporaryDirectory& directory, const BadFile& bad_file) {
  INFO("case: " << bad_file.name);
  const fs::path path = directory.file(bad_file.name + ".npy");
  write_file(path, bad_file.bytes);

  REQUIRE_THROWS_AS(read_npy(path), NpyError);
  REQUIRE_THROWS_WITH(read_npy(path), Catch::Contains(path.string()) && Catch::Contains(bad_file.problem));

  const std::span<const std::byte> bytes = as_bytes(bad_file.bytes);
  REQUIRE_THROWS_AS(parse_npy(bytes, "buffer-" + bad_file.name), NpyError);
  REQUIRE_THROWS_WITH(parse_npy(bytes, "buffer-" + bad_file.name),
                      Catch::StartsWith("buffer-" + bad_file.name + ": ") && Catch::Contains(bad_file.problem));
}

void require_all_rejected(const std::vector<BadFile>& bad_files) {
  const TemporaryDirectory directory;
  for (const BadFile& bad_file : bad_files) {
    require_rejected(directory, bad_file);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Round trips

TEST_CASE("npy float32 round trip rank 1 to 4", "[npy]") {
  const TemporaryDirectory directory;
  const std::vector<std::vector<std::int64_t>> shapes = {{7}, {2, 3}, {2, 3, 4}, {2, 1, 3, 2}};
  for (const auto& shape : shapes) {
    std::size_t count = 1;
    for (const std::int64_t dimension : shape) {
      count *= static_cast<std::size_t>(dimension);
    }
    const std::vector<float> values = sample_floats(count);
    const fs::path path = directory.file("rank" + std::to_string(shape.size()) + ".npy");
    INFO("shape rank " << shape.size());

    write_npy(path, shape, values);
    const NpyArray<float> array = read_npy(path);
    CHECK(array.shape == shape);
    CHECK(same_bits(array.data, values));

    const NpyArray<float> ranked = read_npy(path, shape.size());
    CHECK(ranked.shape == shape);
    CHECK(same_bits(ranked.data, values));

    // The in-memory encoder and parser agree with the file functions.
    const std::vector<std::byte> encoded = encode_npy(shape, values);
    CHECK(to_string(encoded) == read_file(path));
    const NpyArray<float> parsed = parse_npy(encoded);
    CHECK(parsed.shape == shape);
    CHECK(same_bits(parsed.data, values));
    const std::uintmax_t header_size = fs::file_size(path) - count * sizeof(float);
    CHECK(header_size % 64 == 0);
  }
}

TEST_CASE("npy int64 round trip", "[npy]") {
  const TemporaryDirectory directory;
  const std::vector<std::int64_t> values = {std::numeric_limits<std::int64_t>::min(), -1, 0, 1,
                                            std::numeric_limits<std::int64_t>::max(), 42};
  const std::vector<std::int64_t> shape = {3, 2};
  const fs::path path = directory.file("int64.npy");

  write_npy(path, shape, values);
  const NpyArray<std::int64_t> array = read_npy<std::int64_t>(path);
  CHECK(array.shape == shape);
  CHECK(array.data == values);
  CHECK(read_file(path).find("'descr': '<i8'") != std::string::npos);

  write_npy(path, array);
  CHECK(read_npy<std::int64_t>(path).data == values);
}

TEST_CASE("npy round trip of empty arrays", "[npy]") {
  const TemporaryDirectory directory;
  const std::vector<std::vector<std::int64_t>> shapes = {{0}, {3, 0, 2}, {0, 5}};
  for (const auto& shape : shapes) {
    const fs::path path = directory.file("empty.npy");
    write_npy(path, shape, std::vector<float>{});
    const NpyArray<float> array = read_npy(path);
    CHECK(array.shape == shape);
    CHECK(array.data.empty());
    CHECK(fs::file_size(path) == 128);
  }
}

TEST_CASE("npy round trip of 0-d array", "[npy]") {
  const TemporaryDirectory directory;
  const fs::path path = directory.file("scalar.npy");
  write_npy(path, {}, std::vector<float>{2.5f});

  const std::string bytes = read_file(path);
  CHECK(bytes.find("'shape': (), }") != std::string::npos);
  const NpyArray<float> array = read_npy(path);
  CHECK(array.shape.empty());
  REQUIRE(array.data.size() == 1);
  CHECK(array.data[0] == 2.5f);

  const NpyArray<std::int64_t> integer = parse_npy<std::int64_t>(encode_npy({}, std::vector<std::int64_t>{-7}));
  CHECK(integer.shape.empty());
  CHECK(integer.data == std::vector<std::int64_t>{-7});
}

// ---------------------------------------------------------------------------
// Header bytes

TEST_CASE("npy header bytes match NumPy for shape (2, 3)", "[npy]") {
  // By numpy/lib/format.py, np.save(path, np.arange(6, dtype='<f4').reshape(2, 3))
  // writes a 10-byte preamble with header length 118, a 59-byte dict, 58 spaces
  // and a newline.
  std::string expected("\x93NUMPY\x01\x00\x76\x00", 10);
  expected += "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  expected += std::string(58, ' ');
  expected += '\n';
  REQUIRE(expected.size() == 128);

  const std::vector<float> values = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f};
  const std::string bytes = to_string(encode_npy({2, 3}, values));
  REQUIRE(bytes.size() == 128 + 24);
  CHECK(bytes.substr(0, 128) == expected);
  CHECK(bytes.substr(128) == data_bytes(values));
  // 1.0f is 0x3f800000, stored little-endian.
  CHECK(bytes.substr(132, 4) == std::string("\x00\x00\x80\x3f", 4));

  const TemporaryDirectory directory;
  const fs::path path = directory.file("known.npy");
  write_npy(path, {2, 3}, values);
  CHECK(read_file(path) == bytes);
}

TEST_CASE("npy header bytes for 0-d and 1-d int64", "[npy]") {
  std::string scalar_header("\x93NUMPY\x01\x00\x76\x00", 10);
  scalar_header += "{'descr': '<f4', 'fortran_order': False, 'shape': (), }";
  scalar_header += std::string(62, ' ') + "\n";
  CHECK(to_string(encode_npy({}, std::vector<float>{1.0f})).substr(0, 128) == scalar_header);

  std::string vector_header("\x93NUMPY\x01\x00\x76\x00", 10);
  vector_header += "{'descr': '<i8', 'fortran_order': False, 'shape': (5,), }";
  vector_header += std::string(60, ' ') + "\n";
  const std::vector<std::int64_t> values = {1, 2, 3, 4, 5};
  CHECK(to_string(encode_npy({5}, values)).substr(0, 128) == vector_header);
}

TEST_CASE("npy header has NumPy growth-axis padding", "[npy]") {
  // NumPy adds 21 - len(str(shape[0])) spaces after the dict, then pads to a
  // multiple of 64 with 1 to 64 spaces. Without the growth-axis spaces this
  // header would fit in 128 bytes.
  const std::vector<std::int64_t> shape = {0, 100, 100, 100, 100, 100, 100, 100, 100, 100};
  const std::string bytes = to_string(encode_npy(shape, std::vector<float>{}));
  REQUIRE(bytes.size() == 192);
  CHECK(bytes.substr(8, 2) == std::string("\xb6\x00", 2));  // 182 = 192 - 10
  const std::string dict =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 100, 100, 100, 100, 100, 100, 100, 100, 100), }";
  CHECK(bytes.substr(10, dict.size()) == dict);
  CHECK(bytes.substr(10 + dict.size()) == std::string(20 + 60, ' ') + "\n");

  // Here preamble, dict, growth spaces and newline fill exactly 128 bytes, and
  // NumPy still adds 64 spaces of padding rather than none.
  const std::vector<std::int64_t> exact_shape = {0, 100, 100, 100, 100, 100, 10, 10, 10, 10};
  const std::string exact = to_string(encode_npy(exact_shape, std::vector<float>{}));
  REQUIRE(exact.size() == 192);
  CHECK(exact.substr(exact.size() - 65) == std::string(64, ' ') + "\n");
  CHECK(parse_npy(std::as_bytes(std::span<const char>(exact))).shape == exact_shape);
}

TEST_CASE("npy data starts at a multiple of 64", "[npy]") {
  for (std::size_t rank = 0; rank <= kvevict::tools::kNpyMaxRank; ++rank) {
    std::vector<std::int64_t> shape(rank, 1);
    if (rank > 0) {
      shape[0] = std::numeric_limits<std::int64_t>::max() / 8;
      shape.back() = 0;
    }
    INFO("rank " << rank);
    const std::string bytes = to_string(encode_npy(shape, std::vector<float>(rank == 0 ? 1 : 0)));
    const std::size_t header_length =
        static_cast<unsigned char>(bytes[8]) + 256u * static_cast<unsigned char>(bytes[9]);
    const std::size_t data_offset = 10 + header_length;
    CHECK(data_offset % 64 == 0);
    CHECK(bytes[data_offset - 1] == '\n');
    CHECK(parse_npy(std::as_bytes(std::span<const char>(bytes))).shape == shape);
  }
}

// ---------------------------------------------------------------------------
// Header variants that other writers produce

TEST_CASE("npy reader accepts valid header variants", "[npy]") {
  const std::string data = float_data(6);
  const std::vector<std::int64_t> shape = {2, 3};
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"keys in another order", npy("{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}", data)},
      {"double quotes", npy("{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}", data)},
      {"no trailing comma", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", data)},
      {"no padding and no newline", raw_npy("{'descr':'<f4','fortran_order':False,'shape':(2,3)}", data)},
      {"spaces, tabs and newlines",
       raw_npy("  {\n\t'descr' : '<f4' ,\n 'fortran_order' :False,'shape':( 2 , 3 , ) , }\n\n", data)},
      {"Python 2 long suffix", npy(dict_with("<f4", "False", "(2L, 3L)"), data)},
      {"16-byte alignment of old NumPy",
       raw_npy(dict_with("<f4", "False", "(2, 3)") + std::string(10, ' ') + "\n", data)},
      {"format 2.0", npy(dict_with("<f4", "False", "(2, 3)"), data, 2)},
      {"format 3.0", npy(dict_with("<f4", "False", "(2, 3)"), data, 3)},
  };
  for (const auto& [name, bytes] : cases) {
    INFO("case: " << name);
    const NpyArray<float> array = parse_npy(as_bytes(bytes), name);
    CHECK(array.shape == shape);
    CHECK(data_bytes(array.data) == data);
  }
}

// ---------------------------------------------------------------------------
// Rejected files

TEST_CASE("npy rejects unsupported dtypes", "[npy]") {
  require_all_rejected({
      {"float64", npy(dict_with("<f8", "False", "(2,)"), std::string(16, '\0')), "unsupported dtype \"<f8\""},
      {"float16", npy(dict_with("<f2", "False", "(2,)"), std::string(4, '\0')), "unsupported dtype \"<f2\""},
      {"int32", npy(dict_with("<i4", "False", "(2,)"), std::string(8, '\0')), "unsupported dtype \"<i4\""},
      {"uint8", npy(dict_with("|u1", "False", "(2,)"), std::string(2, '\0')), "unsupported dtype \"|u1\""},
      {"int64 as float32", npy(dict_with("<i8", "False", "(2,)"), std::string(16, '\0')), "unsupported dtype \"<i8\""},
      {"no byte order", npy(dict_with("f4", "False", "(2,)"), std::string(8, '\0')), "unsupported dtype \"f4\""},
      {"fix hint", npy(dict_with("<f8", "False", "(2,)"), std::string(16, '\0')), "np.save(path, a.astype('<f4'))"},
      {"big-endian", npy(dict_with(">f4", "False", "(2,)"), std::string(8, '\0')), "The file is big-endian"},
      {"structured", npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", std::string(8, '\0')),
       "structured array"},
  });
}

TEST_CASE("npy int64 reader rejects float32", "[npy]") {
  const std::string bytes = npy(dict_with("<f4", "False", "(2,)"), float_data(2));
  REQUIRE_THROWS_WITH(parse_npy<std::int64_t>(as_bytes(bytes), "weights.npy"),
                      Catch::StartsWith("weights.npy: ") && Catch::Contains("unsupported dtype \"<f4\"") &&
                          Catch::Contains("expected \"<i8\"") && Catch::Contains("a.astype('<i8')"));
}

TEST_CASE("npy rejects Fortran order", "[npy]") {
  require_all_rejected({
      {"fortran", npy(dict_with("<f4", "True", "(2, 3)"), float_data(6)), "stored in Fortran order"},
      {"fortran fix", npy(dict_with("<f4", "True", "(2, 3)"), float_data(6)), "np.ascontiguousarray(a)"},
  });
}

TEST_CASE("npy rejects bad magic and preamble", "[npy]") {
  const std::string valid = npy(dict_with("<f4", "False", "(2,)"), float_data(2));
  std::string wrong_magic = valid;
  wrong_magic[5] = 'Z';
  std::string wrong_first_byte = valid;
  wrong_first_byte[0] = 'N';

  require_all_rejected({
      {"empty", "", "the file is empty"},
      {"wrong magic", wrong_magic, "expected the magic string"},
      {"wrong first byte", wrong_first_byte, "expected the magic string"},
      {"text file", "hello, this is not an array\n", "not a .npy file"},
      {"npz archive", std::string("PK\x03\x04\x14\x00\x00\x00", 8) + "data", ".npz (zip) archive"},
      {"short magic", std::string("\x93NUM", 4), "the file is truncated"},
      {"no version", std::string("\x93NUMPY\x01", 7), "the file is truncated"},
      {"short length field", std::string("\x93NUMPY\x01\x00\x10", 9), "truncated inside the header length field"},
      {"short length field 2.0", std::string("\x93NUMPY\x02\x00\x10\x00\x00", 11),
       "truncated inside the header length field"},
  });
}

TEST_CASE("npy rejects unsupported versions", "[npy]") {
  const std::string dict = dict_with("<f4", "False", "(2,)");
  std::string version_4 = npy(dict, float_data(2), 2);
  version_4[6] = '\x04';
  std::string version_1_1 = npy(dict, float_data(2));
  version_1_1[7] = '\x01';
  std::string version_0 = npy(dict, float_data(2));
  version_0[6] = '\x00';

  require_all_rejected({
      {"version 4.0", version_4, "unsupported .npy format version 4.0"},
      {"version 1.1", version_1_1, "unsupported .npy format version 1.1"},
      {"version 0.0", version_0, "unsupported .npy format version 0.0"},
  });
}

TEST_CASE("npy rejects header length past end", "[npy]") {
  const std::string dict = dict_with("<f4", "False", "(2,)");
  require_all_rejected({
      {"length 1.0", preamble(1, 0, 1000) + dict, "the header length 1000 runs past the end of the file"},
      {"length 2.0", preamble(2, 0, 0xffffffffu) + dict, "the header length 4294967295 runs past the end"},
      {"length one past", preamble(1, 0, static_cast<std::uint32_t>(dict.size() + 1)) + dict,
       "runs past the end of the file, which has 57 bytes after the 10-byte preamble"},
  });
}

TEST_CASE("npy rejects malformed header dict", "[npy]") {
  const std::string data = float_data(6);
  require_all_rejected({
      {"empty header", raw_npy("", data), "expected '{' to open the header dict"},
      {"blank header", raw_npy("      \n", data), "expected '{' to open the header dict"},
      {"no braces", npy("'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", data), "expected '{'"},
      {"empty dict", npy("{}", data), "missing key 'descr'"},
      {"missing shape", npy("{'descr': '<f4', 'fortran_order': False}", data), "missing key 'shape'"},
      {"missing fortran_order", npy("{'descr': '<f4', 'shape': (2, 3)}", data), "missing key 'fortran_order'"},
      {"unknown key", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}", data),
       "unexpected key \"extra\""},
      {"duplicate key", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'shape': (6,)}", data),
       "duplicate key 'shape'"},
      {"unquoted key", npy("{descr: '<f4', 'fortran_order': False, 'shape': (2, 3)}", data),
       "expected a quoted key or '}'"},
      {"missing colon", npy("{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3)}", data),
       "expected ':' after the key 'descr'"},
      {"missing comma", npy("{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}", data),
       "expected ',' or '}' after the value of 'descr'"},
      {"unclosed dict", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", data),
       "expected ',' or '}' after the value of 'shape'"},
      {"double comma", npy("{'descr': '<f4',, 'fortran_order': False, 'shape': (2, 3)}", data),
       "expected a quoted key or '}'"},
      {"text after dict", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x", data),
       "unexpected text after the closing '}'"},
      {"two dicts", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}{}", data),
       "unexpected text after the closing '}'"},
      {"lowercase bool", npy(dict_with("<f4", "false", "(2, 3)"), data), "expected True or False for 'fortran_order'"},
      {"integer bool", npy(dict_with("<f4", "0", "(2, 3)"), data), "expected True or False"},
      {"bool prefix", npy(dict_with("<f4", "Falsey", "(2, 3)"), data), "expected True or False"},
      {"unquoted descr", npy("{'descr': f4, 'fortran_order': False, 'shape': (2, 3)}", data),
       "expected a quoted string for 'descr'"},
      {"unterminated string", npy("{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}", data),
       "expected ',' or '}' after the value of 'descr' (at byte 17 of the header"},
      {"string to end", raw_npy("{'descr': '<f4", data), "unterminated string"},
      {"escape in string", npy("{'descr': '<f\\x34', 'fortran_order': False, 'shape': (2, 3)}", data),
       "escape sequences in strings are not supported"},
      {"control byte in string", npy("{'descr': '<f4\x01', 'fortran_order': False, 'shape': (2, 3)}", data),
       "control or non-ASCII byte in a string"},
      {"NUL byte", npy(std::string("{\0'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", 59), data),
       "expected a quoted key or '}'"},
      {"non-ASCII byte", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}\xc2\xa0", data),
       "unexpected text after the closing '}'"},
      {"comment", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} # note", data),
       "unexpected text after the closing '}'"},
      {"bare integer shape", npy(dict_with("<f4", "False", "(6)"), data), "a 1-D shape is written (6,)"},
      {"list shape", npy(dict_with("<f4", "False", "[2, 3]"), data),
       "'shape' must be a tuple such as (2, 3), not a list"},
      {"integer shape", npy(dict_with("<f4", "False", "6"), data), "expected a tuple such as (2, 3) for 'shape'"},
      {"missing comma in shape", npy(dict_with("<f4", "False", "(2 3)"), data), "expected ',' or ')' in 'shape'"},
      {"unclosed shape", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3", data),
       "expected ',' or ')' in 'shape'"},
      {"comma only shape", npy(dict_with("<f4", "False", "(,)"), data), "expected an integer dimension in 'shape'"},
      {"double comma shape", npy(dict_with("<f4", "False", "(2,, 3)"), data), "expected an integer dimension"},
      {"float dimension", npy(dict_with("<f4", "False", "(2.0, 3)"), data), "expected an integer dimension"},
      {"exponent dimension", npy(dict_with("<f4", "False", "(2e0, 3)"), data), "expected an integer dimension"},
      {"hex dimension", npy(dict_with("<f4", "False", "(0x2, 3)"), data), "expected an integer dimension"},
      {"underscore dimension", npy(dict_with("<f4", "False", "(2_0, 3)"), data), "expected an integer dimension"},
      {"plus sign", npy(dict_with("<f4", "False", "(+2, 3)"), data), "expected an integer dimension"},
      {"leading zero", npy(dict_with("<f4", "False", "(02, 3)"), data), "leading zeros in the dimension \"02\""},
      {"nested tuple", npy(dict_with("<f4", "False", "((2, 3),)"), data), "expected an integer dimension"},
  });
}

TEST_CASE("npy rejects invalid dimensions", "[npy]") {
  std::string rank_65 = "(";
  for (int i = 0; i < 65; ++i) {
    rank_65 += "1, ";
  }
  rank_65 += ")";

  require_all_rejected({
      {"negative", npy(dict_with("<f4", "False", "(-1, 3)"), float_data(3)), "negative dimension \"-1\" in 'shape'"},
      {"negative last", npy(dict_with("<f4", "False", "(2, -3)"), float_data(6)), "negative dimension \"-3\""},
      {"too many digits", npy(dict_with("<f4", "False", "(99999999999999999999,)"), float_data(1)),
       "the dimension \"99999999999999999999\" in 'shape' does not fit in int64"},
      {"just past int64", npy(dict_with("<f4", "False", "(9223372036854775808,)"), float_data(1)),
       "does not fit in int64"},
      {"huge negative", npy(dict_with("<f4", "False", "(-9223372036854775809,)"), float_data(1)),
       "does not fit in int64"},
      {"rank 65", npy(dict_with("<f4", "False", rank_65), float_data(1)), "'shape' has more than 64 dimensions"},
      {"product overflow", npy(dict_with("<f4", "False", "(4294967296, 4294967296)"), float_data(1)),
       "the shape (4294967296, 4294967296) is too large: its size in bytes overflows int64"},
      {"byte size overflow", npy(dict_with("<f4", "False", "(4611686018427387904,)"), float_data(1)),
       "its size in bytes overflows int64"},
      {"int64 max", npy(dict_with("<f4", "False", "(9223372036854775807,)"), float_data(1)), "overflows int64"},
      {"overflow beside zero", npy(dict_with("<f4", "False", "(4294967296, 0, 4294967296)"), ""), "overflows int64"},
      {"shape beyond file", npy(dict_with("<f4", "False", "(1000000, 1000000)"), float_data(2)),
       "the data is truncated: the shape (1000000, 1000000) of float32 needs 4000000000000 bytes of data, "
       "and 8 bytes follow the header"},
      {"largest valid shape", npy(dict_with("<f4", "False", "(2305843009213693951,)"), float_data(1)),
       "the data is truncated"},
  });
}

TEST_CASE("npy rejects truncated data and trailing bytes", "[npy]") {
  const std::string dict = dict_with("<f4", "False", "(2, 3)");
  const std::string data = float_data(6);
  require_all_rejected({
      {"truncated", npy(dict, data.substr(0, 20)),
       "the data is truncated: the shape (2, 3) of float32 needs 24 bytes of data, and 20 bytes follow the header"},
      {"no data", npy(dict, ""), "needs 24 bytes of data, and 0 bytes follow the header"},
      {"trailing bytes", npy(dict, data + "junk"), "unexpected 4 bytes after the array data"},
      {"trailing hint", npy(dict, data + "junk"), "use np.savez for several arrays"},
      {"two arrays", npy(dict, data) + npy(dict, data), "bytes after the array data"},
      {"data for empty array", npy(dict_with("<f4", "False", "(0,)"), float_data(1)),
       "unexpected 4 bytes after the array data"},
  });
}

TEST_CASE("npy expected rank mismatch", "[npy]") {
  const TemporaryDirectory directory;
  const fs::path path = directory.file("rank.npy");
  write_npy(path, {2, 3}, std::vector<float>(6, 1.0f));

  CHECK(read_npy(path, 2).shape == std::vector<std::int64_t>{2, 3});
  REQUIRE_THROWS_AS(read_npy(path, 3), NpyError);
  REQUIRE_THROWS_WITH(read_npy(path, 3),
                      Catch::Contains(path.string()) &&
                          Catch::Contains("expected an array of rank 3, but the shape is (2, 3) (rank 2)"));
  REQUIRE_THROWS_WITH(read_npy(path, 0), Catch::Contains("expected an array of rank 0"));

  const std::vector<std::byte> scalar = encode_npy({}, std::vector<float>{1.0f});
  CHECK(parse_npy(scalar, "scalar", 0).data.size() == 1);
  REQUIRE_THROWS_WITH(parse_npy(scalar, "scalar", 1),
                      Catch::StartsWith("scalar: ") && Catch::Contains("but the shape is () (rank 0)"));
}

TEST_CASE("npy read reports file system errors", "[npy]") {
  const TemporaryDirectory directory;
  const fs::path missing = directory.file("missing.npy");
  REQUIRE_THROWS_AS(read_npy(missing), NpyError);
  REQUIRE_THROWS_WITH(read_npy(missing), Catch::Contains(missing.string()) && Catch::Contains("file not found"));

  const fs::path folder = directory.file("folder.npy");
  fs::create_directory(folder);
  REQUIRE_THROWS_WITH(read_npy(folder), Catch::Contains(folder.string()) && Catch::Contains("not a regular file"));
}

TEST_CASE("npy writer rejects invalid arguments", "[npy]") {
  const TemporaryDirectory directory;
  const fs::path path = directory.file("out.npy");

  REQUIRE_THROWS_AS(write_npy(path, {2, 3}, std::vector<float>(5)), NpyError);
  REQUIRE_THROWS_WITH(write_npy(path, {2, 3}, std::vector<float>(5)),
                      Catch::Contains(path.string()) &&
                          Catch::Contains("cannot write the shape (2, 3), which has 6 elements, "
                                          "with 5 elements of data"));
  REQUIRE_THROWS_WITH(write_npy(path, {-2, -3}, std::vector<float>(6)), Catch::Contains("negative dimension -2"));
  REQUIRE_THROWS_WITH(write_npy(path, {4294967296, 4294967296, 0}, std::vector<float>{}),
                      Catch::Contains("its size in bytes overflows int64"));
  REQUIRE_THROWS_WITH(write_npy(path, std::vector<std::int64_t>(65, 1), std::vector<float>(1)),
                      Catch::Contains("more than 64 dimensions"));
  REQUIRE_THROWS_WITH(encode_npy({3}, std::vector<std::int64_t>{1, 2}),
                      Catch::StartsWith("<memory>: ") && Catch::Contains("which has 3 elements, with 2 elements"));
  CHECK_FALSE(fs::exists(path));

  const fs::path unwritable = directory.file("no-such-folder") / "out.npy";
  REQUIRE_THROWS_AS(write_npy(unwritable, {1}, std::vector<float>{1.0f}), NpyError);
  REQUIRE_THROWS_WITH(write_npy(unwritable, {1}, std::vector<float>{1.0f}),
                      Catch::Contains(unwritable.string()) && Catch::Contains("cannot open the file for writing") &&
                          Catch::Contains("No such file or directory"));
}
