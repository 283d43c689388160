// Command line of kvevict-select: the parsed options and the help text.
#pragma once

#include <charconv>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace kvevict::tools {

// A command line the tool cannot run: unknown or repeated option, missing or
// malformed value. The tool exits with status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Granularity of the selection when several query heads share a KV head.
//   kv_head:    one selection per KV head, the policy's own GQA aggregation.
//   query_head: one selection per query head, as if keys and values were
//               repeated to every query head of their group (the ReST-KV and
//               SnapKV reference code's behaviour).
enum class GqaMode { kv_head, query_head };

struct SelectArguments {
  bool help = false;
  std::filesystem::path input_dir;
  std::string policy;
  std::optional<std::int64_t> budget;  // tokens per KV head (per query head in query_head mode)
  std::int64_t window = -1;            // -1: the policy's default
  std::int64_t sinks = -1;             // -1: the policy's default
  GqaMode gqa = GqaMode::kv_head;
  std::map<std::string, std::string> params;  // --param KEY=VALUE
  int layer = 0;     // layer index (lacache, restkv pyramid budgets)
  int n_layers = 1;  // layers of the model (lacache, restkv pyramid budgets)
  std::optional<std::filesystem::path> out_npy;
  std::optional<std::filesystem::path> out_txt;
  int timing_runs = 0;  // 0: no timing
};

inline std::string select_help_text() {
  return R"(Usage: kvevict-select --in DIR --policy NAME --budget B [options]

Runs one kvevict eviction policy on the tensors of one attention layer, stored
as NumPy .npy files, and writes the kept token positions.

Input files in DIR (NumPy format, little-endian float32, C order):
  q.npy    [heads, n, head_dim]     queries of every position, after RoPE
  k.npy    [kv_heads, n, head_dim]  keys, after RoPE
  v.npy    [kv_heads, n, head_dim]  values
  wo.npy   [hidden, heads * head_dim]  output projection W_o in PyTorch
           nn.Linear layout (column h * head_dim + j multiplies component j of
           head h); required by restkv, ignored by the other policies
Query head h reads KV head h / (heads / kv_heads). The tool appends positions
0 .. n-1 to a cache in original position mode, gives the policy what it
observes (the last `window` queries, causal softmax attention rows with scale
1/sqrt(head_dim)), and compresses the prefill once: with n <= B every position
is kept.

Options:
  --in DIR           folder with the input files (required)
  --policy NAME      full, streaming_llm, h2o, tova, snapkv, lacache, restkv or
                     sinkclip (required)
  --budget B         tokens kept per KV head (per query head with --gqa
                     query_head), protected ones (sinks, window) included;
                     for lacache its capacity (required except for full)
  --window W         tokens: the observation window of snapkv and restkv, the
                     recent window of h2o and sinkclip (default: the
                     policy's default; the other policies ignore it)
  --sinks S          tokens: leading tokens always kept by streaming_llm,
                     tova, lacache and sinkclip (default: the policy's
                     default; the other policies ignore it)
  --gqa MODE         kv_head (default): one selection per KV head;
                     query_head: one selection per query head over repeated
                     keys and values, as the reference code does (restkv and
                     snapkv only)
  --param KEY=VALUE  a policy-specific parameter, repeatable; an unknown key
                     is rejected with the list of keys the policy accepts
  --layer L          layer index of the tensors, in [0, N) (default 0); read
                     by lacache and by restkv's pyramid budgets
  --n-layers N       layers of the model (default 1); lacache needs the real
                     count, because its ladder spans the layers
  --out FILE.npy     write the kept positions as int64 [rows, K]
  --txt FILE.txt     write the kept positions as text: one row per line,
                     positions separated by one space
  --timing R         run the selection R times (R >= 1) and print the median
                     time as the line "selection_ms <milliseconds>", after the
                     kept positions when they go to standard output. Each run
                     starts from a fresh copy of the filled cache and a fresh
                     policy and times observe, select and the cache
                     compaction. Reading the files and computing the attention
                     rows (an engine's attention pass produces them) are not
                     timed
  --help             print this text and exit

Output: one row per KV head (per query head with --gqa query_head), each the
kept positions in increasing order; every row has the same length K. Without
--out and --txt the text form goes to standard output.

Exit status: 0 on success, 1 for an unreadable or invalid input file or a
failed selection, 2 for a usage error (bad option, unknown policy, settings
the policy rejects).
)";
}

namespace detail {

inline std::int64_t parse_integer(std::string_view option, std::string_view text) {
  std::int64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end) {
    throw UsageError("option " + std::string(option) + ": '" + std::string(text) +
                     "' is not an integer in the range of int64");
  }
  return value;
}

inline std::int64_t parse_non_negative(std::string_view option, std::string_view text) {
  const std::int64_t value = parse_integer(option, text);
  if (value < 0) {
    throw UsageError("option " + std::string(option) + ": " + std::to_string(value) + " must be non-negative");
  }
  return value;
}

}  // namespace detail

// Parses argv[1 ..]. Options take their value as the next argument or after
// '=' (--budget 64 or --budget=64). Throws UsageError.
inline SelectArguments parse_select_arguments(int argc, const char* const* argv) {
  SelectArguments arguments;
  std::vector<std::string> seen;

  for (int i = 1; i < argc; ++i) {
    std::string option = argv[i];
    std::optional<std::string> value;
    if (const auto equals = option.find('='); option.starts_with("--") && equals != std::string::npos) {
      value = option.substr(equals + 1);
      option.resize(equals);
    }

    if (option == "--help" || option == "-h") {
      arguments.help = true;
      continue;
    }

    static constexpr std::string_view known[] = {"--in",  "--policy", "--budget", "--window", "--sinks", "--gqa",
                                                 "--param", "--out",  "--txt",    "--timing", "--layer",
                                                 "--n-layers"};
    bool is_known = false;
    for (const std::string_view name : known) is_known = is_known || option == name;
    if (!is_known) {
      throw UsageError("unknown option '" + option + "'");
    }
    if (option != "--param") {
      for (const std::string& previous : seen) {
        if (previous == option) throw UsageError("option " + option + " is given more than once");
      }
      seen.push_back(option);
    }
    if (!value) {
      if (i + 1 >= argc) throw UsageError("option " + option + " needs a value");
      value = argv[++i];
    }

    if (option == "--in") {
      arguments.input_dir = *value;
    } else if (option == "--policy") {
      arguments.policy = *value;
    } else if (option == "--budget") {
      arguments.budget = detail::parse_integer(option, *value);
    } else if (option == "--window") {
      arguments.window = detail::parse_non_negative(option, *value);
    } else if (option == "--sinks") {
      arguments.sinks = detail::parse_non_negative(option, *value);
    } else if (option == "--gqa") {
      if (*value == "kv_head") {
        arguments.gqa = GqaMode::kv_head;
      } else if (*value == "query_head") {
        arguments.gqa = GqaMode::query_head;
      } else {
        throw UsageError("option --gqa: '" + *value + "' is not a mode; use kv_head or query_head");
      }
    } else if (option == "--param") {
      const auto equals = value->find('=');
      if (equals == std::string::npos || equals == 0) {
        throw UsageError("option --param: '" + *value + "' is not of the form KEY=VALUE");
      }
      const std::string key = value->substr(0, equals);
      if (!arguments.params.emplace(key, value->substr(equals + 1)).second) {
        throw UsageError("option --param: the key '" + key + "' is given more than once");
      }
    } else if (option == "--out") {
      arguments.out_npy = *value;
    } else if (option == "--txt") {
      arguments.out_txt = *value;
    } else if (option == "--layer" || option == "--n-layers") {
      const std::int64_t number = detail::parse_non_negative(option, *value);
      if (number > std::numeric_limits<int>::max()) {
        throw UsageError("option " + option + ": " + *value + " is too large");
      }
      (option == "--layer" ? arguments.layer : arguments.n_layers) = static_cast<int>(number);
    } else if (option == "--timing") {
      const std::int64_t runs = detail::parse_integer(option, *value);
      if (runs < 1 || runs > std::numeric_limits<int>::max()) {
        throw UsageError("option --timing: " + *value + " runs; pass a count of at least 1");
      }
      arguments.timing_runs = static_cast<int>(runs);
    }
  }

  if (arguments.help) return arguments;
  if (arguments.input_dir.empty()) throw UsageError("missing --in DIR, the folder with q.npy, k.npy and v.npy");
  if (arguments.policy.empty()) throw UsageError("missing --policy NAME");
  if (!arguments.budget && arguments.policy != "full") {
    throw UsageError("missing --budget B, the tokens each KV head keeps");
  }
  return arguments;
}

}  // namespace kvevict::tools
