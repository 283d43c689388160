// Bad command lines and input files for kvevict-eval. Its parsing helpers are
// called directly, and they throw eval::UsageError. The program itself runs
// as a separate process, and the tests check its exit status (2 for a usage
// error, 1 for a file or setting that fails later) and its message. The
// process tests write a small llama2.c checkpoint and tokenizer of their own,
// so they need no model assets.
#include <catch2/catch.hpp>

#include "examples/llama2c/eval_report.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <sys/wait.h>

using Catch::Contains;

namespace {

// Requires `call` to throw eval::UsageError with a message containing `fragment`.
template <class Call>
void require_usage_error(Call&& call, const std::string& fragment) {
  REQUIRE_THROWS_AS(call(), eval::UsageError);
  REQUIRE_THROWS_WITH(call(), Contains(fragment));
}

}  // namespace

TEST_CASE("eval integer options rejected", "[errors][eval_cli]") {
  const auto parse = [](std::string text) { return [text] { (void)eval::parse_integer("--tokens", text, 2, 500000); }; };
  require_usage_error(parse("abc"), "--tokens 'abc' is invalid; pass an integer from 2 to 500000");
  require_usage_error(parse("12abc"), "--tokens '12abc' is invalid");
  require_usage_error(parse(""), "--tokens '' is invalid");
  require_usage_error(parse("1"), "--tokens '1' is invalid; pass an integer from 2 to 500000");
  require_usage_error(parse("500001"), "--tokens '500001' is invalid");
  require_usage_error(parse("-7"), "--tokens '-7' is invalid");
  require_usage_error(parse("99999999999999999999"), "--tokens '99999999999999999999' is invalid");
  CHECK(eval::parse_integer("--tokens", "500000", 2, 500000) == 500000);
}

TEST_CASE("eval policy and budget lists rejected", "[errors][eval_cli]") {
  require_usage_error([] { (void)eval::parse_policies("h2o,lru"); },
                      "unknown policy 'lru' in --policies; known policies: full, streaming_llm, h2o, tova, snapkv, "
                      "lacache, restkv, sinkclip (or all)");
  require_usage_error([] { (void)eval::parse_policies(","); },
                      "--policies is empty; pass 'all' or a comma-separated list");
  require_usage_error([] { (void)eval::parse_budgets("32,0"); },
                      "--budgets '0' is invalid; pass an integer from 1 to 1073741824");
  require_usage_error([] { (void)eval::parse_budgets("32,x"); }, "--budgets 'x' is invalid");
  require_usage_error([] { (void)eval::parse_budgets(""); },
                      "--budgets is empty; pass comma-separated token counts such as 32,64");
}

#ifndef KVEVICT_EVAL_PROGRAM

// The program is built only with KVEVICT_BUILD_EXAMPLES; this skip is
// reported so that a run without it does not look like a pass.
TEST_CASE("eval program not built", "[eval_cli][skipped]") {
  WARN("kvevict-eval was not built (KVEVICT_BUILD_EXAMPLES is OFF); skipping its command-line tests");
}

#else

namespace {

namespace fs = std::filesystem;

// Folder under the system temporary folder, removed with its contents.
class TemporaryDirectory {
 public:
  TemporaryDirectory() {
    std::random_device random;
    do {
      path_ = fs::temp_directory_path() / ("kvevict-test-eval-" + std::to_string(random()));
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

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <class T>
void append_value(std::string& bytes, T value) {
  bytes.append(reinterpret_cast<const char*>(&value), sizeof value);
}

// A llama2.c checkpoint of one layer (dim 8, hidden_dim 8, 2 heads, 2 KV
// heads, vocabulary 260, seq_len 8) with every weight 0: loadable, never run.
std::string tiny_checkpoint() {
  const std::int32_t header[7] = {8, 8, 1, 2, 2, 260, 8};
  const std::size_t embedding = 260 * 8;
  const std::size_t layer = 2 * 8 + 2 * 8 * 8 + 2 * 8 * 8 + 3 * 8 * 8;  // norms, wq wo, wk wv, w1 w2 w3
  const std::size_t rope_tables = 8 * 4;                                 // seq_len * head_dim
  const std::size_t floats = embedding + layer + 8 + rope_tables;        // the classifier is shared
  std::string bytes(sizeof header + floats * sizeof(float), '\0');
  std::memcpy(bytes.data(), header, sizeof header);
  return bytes;
}

// A llama2.c tokenizer of 260 tokens: the 3 special tokens, the 256
// byte-fallback tokens and " ".
std::string tiny_tokenizer() {
  std::string bytes;
  append_value<std::int32_t>(bytes, 6);
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  static constexpr char hex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) pieces.push_back(std::string("<0x") + hex[b >> 4] + hex[b & 0xF] + ">");
  pieces.emplace_back(" ");
  for (const std::string& piece : pieces) {
    append_value<float>(bytes, 0.0f);
    append_value<std::int32_t>(bytes, static_cast<std::int32_t>(piece.size()));
    bytes += piece;
  }
  return bytes;
}

std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (const char c : text) {
    if (c == '\'') {
      quoted += "'\\''";
    } else {
      quoted += c;
    }
  }
  return quoted + "'";
}

struct ProgramRun {
  int status = -1;  // exit status, or -1 when the program did not exit normally
  std::string out;
  std::string err;
};

// Runs kvevict-eval with `arguments` and without KVEVICT_ASSETS (so no real
// model is picked up), capturing its output in files under `scratch`.
ProgramRun run_eval(const TemporaryDirectory& scratch, const std::vector<std::string>& arguments) {
  std::string command = "env -u KVEVICT_ASSETS " + shell_quote(KVEVICT_EVAL_PROGRAM);
  for (const std::string& argument : arguments) command += ' ' + shell_quote(argument);
  const fs::path out_path = scratch.file("stdout.txt");
  const fs::path err_path = scratch.file("stderr.txt");
  command += " >" + shell_quote(out_path.string()) + " 2>" + shell_quote(err_path.string());
  const int raw = std::system(command.c_str());
  ProgramRun run;
  run.status = raw != -1 && WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  run.out = read_text(out_path);
  run.err = read_text(err_path);
  return run;
}

struct CliCase {
  std::string name;
  std::vector<std::string> arguments;
  int status;
  std::string fragment;  // a phrase of standard error
};

void require_cli_cases(const TemporaryDirectory& scratch, const std::vector<CliCase>& cases) {
  for (const CliCase& c : cases) {
    SECTION(c.name) {
      const ProgramRun run = run_eval(scratch, c.arguments);
      INFO("stderr: " << run.err);
      REQUIRE(run.status == c.status);
      REQUIRE_THAT(run.err, Contains("kvevict-eval: " + c.fragment));
      if (c.status == 2) REQUIRE_THAT(run.err, Contains("Run 'kvevict-eval --help' for the options."));
    }
  }
}

}  // namespace

TEST_CASE("eval command line rejected", "[errors][eval_cli]") {
  const TemporaryDirectory scratch;
  require_cli_cases(
      scratch,
      {
          {"no command", {}, 2, "missing command (ppl, generate or synthetic)"},
          {"unknown command", {"train"}, 2, "unknown command 'train'; use ppl, generate or synthetic"},
          {"unknown option", {"synthetic", "--budgetz", "4"}, 2, "unknown option '--budgetz'"},
          {"argument that is not an option", {"synthetic", "extra"}, 2, "unexpected argument 'extra'"},
          {"option without its value", {"synthetic", "--tokens"}, 2, "option '--tokens' needs a value"},
          {"token count that is not a number", {"synthetic", "--tokens", "abc"}, 2,
           "--tokens 'abc' is invalid; pass an integer from 2 to 500000"},
          {"token count out of range", {"synthetic", "--tokens", "1"}, 2, "--tokens '1' is invalid"},
          {"negative seed", {"synthetic", "--seed", "-1"}, 2, "--seed '-1' is invalid; pass an integer from 0"},
          {"budget 0", {"synthetic", "--budgets", "0"}, 2, "--budgets '0' is invalid"},
          {"empty budget list", {"synthetic", "--budgets", ","}, 2, "--budgets is empty"},
          {"unknown policy", {"synthetic", "--policies", "lru"}, 2, "unknown policy 'lru' in --policies"},
          {"window 0", {"synthetic", "--policies", "h2o", "--window", "0"}, 2,
           "--window '0' is invalid; pass an integer from 1 to 1073741824"},
          {"negative slack", {"synthetic", "--policies", "h2o", "--slack", "-3"}, 2, "--slack '-3' is invalid"},
          {"generate without a model", {"generate"}, 2,
           "generate needs a model: pass --model and --tokenizer, or --assets DIR"},
          {"settings the policy rejects", {"synthetic", "--policies", "streaming_llm", "--budgets", "2"}, 1,
           "StreamingLLM: budget (2) must be at least sinks + window (4 + 0)"},
      });
}

TEST_CASE("eval input files rejected", "[errors][eval_cli]") {
  const TemporaryDirectory scratch;
  const fs::path model = scratch.file("model.bin");
  const fs::path tokenizer = scratch.file("tokenizer.bin");
  const fs::path empty = scratch.file("empty.txt");
  const fs::path blank = scratch.file("blank.txt");
  const fs::path latin1 = scratch.file("latin1.txt");
  const fs::path story = scratch.file("story.txt");
  write_bytes(model, tiny_checkpoint());
  write_bytes(tokenizer, tiny_tokenizer());
  write_bytes(empty, "");
  write_bytes(blank, " \n\t\n\n");
  write_bytes(latin1, "caf\xE9\n");
  write_bytes(story, "Once upon a time.\n");
  const auto ppl = [&](const fs::path& text, std::vector<std::string> extra = {}) {
    std::vector<std::string> arguments = {"ppl", "--model", model.string(), "--tokenizer", tokenizer.string(),
                                          "--text", text.string(), "--policies", "streaming_llm"};
    arguments.insert(arguments.end(), extra.begin(), extra.end());
    return arguments;
  };

  require_cli_cases(
      scratch,
      {
          {"empty text file", ppl(empty), 2,
           "text file '" + empty.string() + "' gives 0 token ids; it needs at least 2 (is it empty?)"},
          {"blank text file", ppl(blank), 2, "text file '" + blank.string() + "' gives 0 token ids"},
          {"text that is not UTF-8", ppl(latin1), 1,
           "text file '" + latin1.string() + "' is not valid UTF-8: invalid UTF-8 sequence at byte offset 3"},
          {"missing text file", ppl(scratch.file("none.txt")), 1,
           "text file not found: '" + scratch.file("none.txt").string() + "'"},
          {"unknown position mode", ppl(story, {"--positions", "sideways"}), 2,
           "--positions 'sideways' is invalid; use cache_relative or original"},
          {"unknown position mode when generating",
           {"generate", "--model", model.string(), "--tokenizer", tokenizer.string(), "--positions", "sideways"}, 2,
           "--positions 'sideways' is invalid"},
          {"unknown policy when generating",
           {"generate", "--model", model.string(), "--tokenizer", tokenizer.string(), "--policy", "lru"}, 1,
           "unknown policy name 'lru'; known policies: full, streaming_llm"},
          {"model without tokenizer", {"ppl", "--model", model.string(), "--text", story.string()}, 2,
           "--tokenizer is missing (or pass --assets DIR)"},
          {"missing checkpoint", ppl(story, {"--model", scratch.file("none.bin").string()}), 1,
           "checkpoint file not found: '" + scratch.file("none.bin").string() + "'"},
          {"empty tokenizer file", ppl(story, {"--tokenizer", empty.string()}), 1,
           "tokenizer '" + empty.string() + "': the max_token_length header needs 4 bytes at offset 0"},
          {"tokenizer passed as the checkpoint", ppl(story, {"--model", tokenizer.string()}), 1,
           "checkpoint '" + tokenizer.string() + "'"},
      });
}

#endif
