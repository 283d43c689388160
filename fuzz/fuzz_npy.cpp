// libFuzzer target for the in-memory .npy parser in tools/npy.hpp.
//
// NpyError is the parser's only expected failure. Any other exception, a
// sanitizer report or a failed round trip is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "tools/npy.hpp"

namespace {

// Parses the input as T. Whatever parses must also survive encode_npy and a
// second parse unchanged, which checks the writer against the reader.
template <kvevict::tools::NpyElement T>
void parse_and_round_trip(std::span<const std::byte> bytes) {
  kvevict::tools::NpyArray<T> array;
  try {
    array = kvevict::tools::parse_npy<T>(bytes, "fuzz-input");
  } catch (const kvevict::tools::NpyError&) {
    return;
  }

  const std::vector<std::byte> encoded = kvevict::tools::encode_npy(array.shape, std::span<const T>(array.data));
  const kvevict::tools::NpyArray<T> reparsed = kvevict::tools::parse_npy<T>(encoded, "fuzz-reencoded");
  if (reparsed.shape != array.shape || reparsed.data.size() != array.data.size()) {
    std::abort();
  }
  // Compare bytes rather than values, so that NaN payloads count too.
  if (!array.data.empty() &&
      std::memcmp(array.data.data(), reparsed.data.data(), array.data.size() * sizeof(T)) != 0) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = std::as_bytes(std::span<const std::uint8_t>(data, size));
  parse_and_round_trip<float>(bytes);
  parse_and_round_trip<std::int64_t>(bytes);
  return 0;
}
