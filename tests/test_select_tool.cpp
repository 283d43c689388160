// Tests for the kvevict-select program: each test writes .npy inputs to a
// temporary folder, runs the program as a separate process and checks its
// exit status, output and messages. Kept positions are compared with the
// library called directly on the same tensors, through an observation built
// here from double-precision attention.
#include <catch2/catch.hpp>

#include "kvevict/registry.hpp"
#include "test_helpers.hpp"
#include "tools/npy.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include <sys/wait.h>

#ifndef KVEVICT_SELECT_TOOL

// The program is built only with KVEVICT_BUILD_TOOLS; this skip is reported
// so that a test run without it does not look like a pass of the real tests.
TEST_CASE("select tool not built", "[select_tool][skipped]") {
  WARN("kvevict-select was not built (KVEVICT_BUILD_TOOLS is OFF); skipping the select tool tests");
}

#else

namespace {

namespace fs = std::filesystem;
using kvevict::KeepPlan;
using kvevict::PolicyOptions;
using kvevict::RowMatrixXf;

// Folder under the system temporary folder, removed with its contents.
class TemporaryDirectory {
 public:
  TemporaryDirectory() {
    std::random_device random;
    do {
      path_ = fs::temp_directory_path() / ("kvevict-test-select-" + std::to_string(random()));
    } while (!fs::create_directory(path_));
  }
  ~TemporaryDirectory() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TemporaryDirectory(const TemporaryDirectory&) = delete;
  TemporaryDirectory& operator=(const TemporaryDirectory&) = delete;

  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// One attention layer's tensors in the layout of the tool's input files.
struct Layer {
  int heads = 4;
  int kv_heads = 2;
  int head_dim = 8;
  std::int64_t n = 48;
  int hidden = 12;
  std::vector<float> queries;  // [heads, n, head_dim]
  std::vector<float> keys;     // [kv_heads, n, head_dim]
  std::vector<float> values;   // [kv_heads, n, head_dim]
  RowMatrixXf w_o;             // [hidden, heads * head_dim]
};

Layer random_layer(std::uint64_t seed, int heads = 4, int kv_heads = 2, std::int64_t n = 48) {
  kvevict::test::Random random(seed);
  Layer layer;
  layer.heads = heads;
  layer.kv_heads = kv_heads;
  layer.n = n;
  const std::int64_t d = layer.head_dim;
  // Queries larger than keys make the attention peaked, so that scores differ
  // clearly and the kept sets do not hinge on rounding.
  layer.queries = random.vector(heads * n * d, -2.0, 2.0);
  layer.keys = random.vector(kv_heads * n * d);
  layer.values = random.vector(kv_heads * n * d);
  layer.w_o = random.matrix(layer.hidden, heads * d);
  return layer;
}

// Keys and values repeated to every query head of their group: the layer as
// the reference code's repeat_kv produces it.
Layer repeat_kv(const Layer& layer) {
  Layer repeated = layer;
  const std::int64_t block = layer.n * layer.head_dim;
  const int group = layer.heads / layer.kv_heads;
  repeated.kv_heads = layer.heads;
  repeated.keys.clear();
  repeated.values.clear();
  for (int h = 0; h < layer.heads; ++h) {
    const auto first = static_cast<std::ptrdiff_t>((h / group) * block);
    repeated.keys.insert(repeated.keys.end(), layer.keys.begin() + first, layer.keys.begin() + first + block);
    repeated.values.insert(repeated.values.end(), layer.values.begin() + first,
                           layer.values.begin() + first + block);
  }
  return repeated;
}

void write_layer(const fs::path& dir, const Layer& layer, bool with_w_o = true) {
  using kvevict::tools::write_npy;
  const std::int64_t d = layer.head_dim;
  write_npy(dir / "q.npy", {layer.heads, layer.n, d}, std::span<const float>(layer.queries));
  write_npy(dir / "k.npy", {layer.kv_heads, layer.n, d}, std::span<const float>(layer.keys));
  write_npy(dir / "v.npy", {layer.kv_heads, layer.n, d}, std::span<const float>(layer.values));
  if (with_w_o) {
    write_npy(dir / "wo.npy", {layer.w_o.rows(), layer.w_o.cols()},
              std::span<const float>(layer.w_o.data(), static_cast<std::size_t>(layer.w_o.size())));
  }
}

// Writes a .npy file with a header of our choosing, for inputs the writer
// does not produce (other dtypes, byte orders, Fortran order).
void write_raw_npy(const fs::path& path, const std::string& descr, bool fortran_order,
                   const std::vector<std::int64_t>& shape, const std::string& payload) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': " + (fortran_order ? "True" : "False") +
                     ", 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) dict += ", ";
    dict += std::to_string(shape[i]);
  }
  if (shape.size() == 1) dict += ',';
  dict += "), }";
  const std::size_t unpadded = 10 + dict.size() + 1;
  dict.append(64 - unpadded % 64, ' ');
  dict += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += '\x01';
  bytes += '\x00';
  bytes += static_cast<char>(dict.size() & 0xff);
  bytes += static_cast<char>(dict.size() >> 8);
  bytes += dict;
  bytes += payload;
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(stream.good());
}

std::string read_text(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
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

struct ToolRun {
  int status = -1;  // exit status, or -1 when the program did not exit normally
  std::string out;
  std::string err;
};

// Runs kvevict-select with `arguments`, capturing standard output and error
// in files under `scratch`.
ToolRun run_tool(const fs::path& scratch, const std::vector<std::string>& arguments) {
  std::string command = shell_quote(KVEVICT_SELECT_TOOL);
  for (const std::string& argument : arguments) {
    command += ' ';
    command += shell_quote(argument);
  }
  const fs::path out_path = scratch / "stdout.txt";
  const fs::path err_path = scratch / "stderr.txt";
  command += " >";
  command += shell_quote(out_path.string());
  command += " 2>";
  command += shell_quote(err_path.string());
  const int raw = std::system(command.c_str());
  ToolRun result;
  result.status = raw != -1 && WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  result.out = read_text(out_path);
  result.err = read_text(err_path);
  return result;
}

// Causal softmax rows of the last `rows` queries of every head, computed in
// double and rounded to float: [heads, rows, n].
std::vector<float> attention_rows(const Layer& layer, std::int64_t rows) {
  const std::int64_t n = layer.n;
  const std::int64_t d = layer.head_dim;
  const int group = layer.heads / layer.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<float> out(static_cast<std::size_t>(layer.heads * rows * n), 0.0f);
  for (int h = 0; h < layer.heads; ++h) {
    const int j = h / group;
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int64_t position = n - rows + i;
      std::vector<double> logits(static_cast<std::size_t>(position + 1));
      double max_logit = -INFINITY;
      for (std::int64_t t = 0; t <= position; ++t) {
        double dot = 0.0;
        for (std::int64_t k = 0; k < d; ++k) {
          dot += static_cast<double>(layer.queries[static_cast<std::size_t>((h * n + position) * d + k)]) *
                 static_cast<double>(layer.keys[static_cast<std::size_t>((j * n + t) * d + k)]);
        }
        logits[static_cast<std::size_t>(t)] = scale * dot;
        max_logit = std::max(max_logit, scale * dot);
      }
      double total = 0.0;
      for (double& logit : logits) {
        logit = std::exp(logit - max_logit);
        total += logit;
      }
      for (std::int64_t t = 0; t <= position; ++t) {
        out[static_cast<std::size_t>((h * rows + i) * n + t)] =
            static_cast<float>(logits[static_cast<std::size_t>(t)] / total);
      }
    }
  }
  return out;
}

// Options of one policy with a budget and a window, the rest at defaults.
PolicyOptions windowed_options(const std::string& name, std::int64_t budget, std::int64_t window) {
  PolicyOptions options;
  options.name = name;
  options.budget = budget;
  options.window = window;
  return options;
}

PolicyOptions layer_options(const Layer& layer, PolicyOptions options) {
  options.n_heads = layer.heads;
  options.n_kv_heads = layer.kv_heads;
  options.head_dim = layer.head_dim;
  options.w_o = options.name == "restkv" ? &layer.w_o : nullptr;
  return options;
}

// The library's prefill compression of `layer`, called directly: observe,
// then select when the policy is over budget, else keep every slot. With
// `per_query_head` (restkv only) the plan has one row per query head.
KeepPlan library_plan(const Layer& layer, const PolicyOptions& base, bool per_query_head = false) {
  const PolicyOptions options = layer_options(layer, base);
  auto policy = kvevict::make_policy<float>(options);
  kvevict::KVCache<float> cache({.n_kv_heads = layer.kv_heads,
                                 .head_dim = layer.head_dim,
                                 .positions = kvevict::PositionMode::original,
                                 .state_channels = policy.state_channels(),
                                 .capacity = layer.n});
  std::vector<std::int64_t> positions(static_cast<std::size_t>(layer.n));
  for (std::int64_t t = 0; t < layer.n; ++t) positions[static_cast<std::size_t>(t)] = t;
  const std::int64_t kv_rows = layer.kv_heads * layer.n;
  cache.append(Eigen::Map<const RowMatrixXf>(layer.keys.data(), kv_rows, layer.head_dim),
               Eigen::Map<const RowMatrixXf>(layer.values.data(), kv_rows, layer.head_dim), positions);

  const kvevict::ObservationNeeds needs = policy.needs();
  const std::int64_t d = layer.head_dim;
  const std::int64_t w = std::min(needs.window_queries, layer.n);
  std::vector<float> window(static_cast<std::size_t>(layer.heads * w * d));
  for (int h = 0; h < layer.heads; ++h) {
    for (std::int64_t i = 0; i < w * d; ++i) {
      window[static_cast<std::size_t>(h * w * d + i)] =
          layer.queries[static_cast<std::size_t>((h * layer.n + layer.n - w) * d + i)];
    }
  }
  const std::int64_t rows =
      needs.prefill_attention_rows < 0 ? layer.n : std::min(needs.prefill_attention_rows, layer.n);
  const std::vector<float> attention = attention_rows(layer, rows);

  kvevict::Observation observation;
  observation.n_heads = layer.heads;
  if (w > 0) observation.queries = {window.data(), layer.heads, w, d};
  if (rows > 0) observation.attention = {attention.data(), layer.heads, rows, layer.n};
  observation.appended = layer.n;
  observation.prefill = true;

  KeepPlan plan;
  if (per_query_head) {
    auto& restkv = std::get<kvevict::RestKV<float>>(policy.variant());
    restkv.observe(cache, observation);
    restkv.select_query_heads(cache, observation, plan);
    return plan;
  }
  policy.observe(cache, observation);
  if (policy.should_evict(cache, kvevict::Trigger::prefill)) {
    policy.select(cache, observation, plan);
  } else {
    plan.reset(cache.n_kv_heads(), cache.size());
    plan.fill_identity();
  }
  return plan;
}

std::string plan_text(const KeepPlan& plan) {
  std::string text;
  for (int row = 0; row < plan.n_kv_heads(); ++row) {
    const auto kept = plan.head(row);
    for (std::size_t i = 0; i < kept.size(); ++i) {
      if (i > 0) text += ' ';
      text += std::to_string(kept[i]);
    }
    text += '\n';
  }
  return text;
}

std::vector<std::int64_t> plan_values(const KeepPlan& plan) {
  std::vector<std::int64_t> values;
  for (int row = 0; row < plan.n_kv_heads(); ++row) {
    const auto kept = plan.head(row);
    values.insert(values.end(), kept.begin(), kept.end());
  }
  return values;
}

// A setting of one policy that evicts on the default test layer (n = 48).
struct PolicyCase {
  PolicyOptions options;
  std::vector<std::string> arguments;  // the same settings on the command line
};

std::vector<PolicyCase> evicting_cases() {
  std::vector<PolicyCase> cases;
  for (const std::string_view name_view : kvevict::policy_names) {
    const std::string name(name_view);
    PolicyCase policy_case;
    policy_case.options.name = name;
    policy_case.options.budget = 16;
    policy_case.arguments = {"--policy", name, "--budget", "16"};
    if (name == "snapkv" || name == "restkv" || name == "sinkclip" || name == "h2o") {
      policy_case.options.window = 4;
      policy_case.arguments.insert(policy_case.arguments.end(), {"--window", "4"});
    }
    if (name == "sinkclip") {
      policy_case.options.sinks = 2;
      policy_case.options.parameters = {{"w_obs", "8"}};
      policy_case.arguments.insert(policy_case.arguments.end(), {"--sinks", "2", "--param", "w_obs=8"});
    }
    if (name == "tova") {
      policy_case.options.parameters = {{"granularity", "head"}};
      policy_case.arguments.insert(policy_case.arguments.end(), {"--param", "granularity=head"});
    }
    if (name == "lacache") {
      // A ladder needs the model's layer count; capacity 24 of 48 tokens.
      policy_case.options.budget = 24;
      policy_case.options.layer = 3;
      policy_case.options.n_layers = 8;
      policy_case.arguments = {"--policy", name, "--budget", "24", "--layer", "3", "--n-layers", "8"};
    }
    cases.push_back(policy_case);
  }
  return cases;
}

}  // namespace

TEST_CASE("select tool matches library for every policy", "[select_tool]") {
  TemporaryDirectory dir;
  const Layer layer = random_layer(11);
  write_layer(dir.path(), layer);

  for (const PolicyCase& policy_case : evicting_cases()) {
    const std::string& name = policy_case.options.name;
    INFO("policy " << name);
    const KeepPlan expected = library_plan(layer, policy_case.options);
    REQUIRE(expected.n_kv_heads() == layer.kv_heads);
    if (name != "full") CHECK(expected.count() < layer.n);

    std::vector<std::string> arguments = {"--in", dir.path().string()};
    arguments.insert(arguments.end(), policy_case.arguments.begin(), policy_case.arguments.end());
    const fs::path npy_path = dir.path() / (name + ".npy");
    const fs::path txt_path = dir.path() / (name + ".txt");
    std::vector<std::string> to_files = arguments;
    to_files.insert(to_files.end(), {"--out", npy_path.string(), "--txt", txt_path.string()});
    const ToolRun run = run_tool(dir.path(), to_files);
    INFO("stderr: " << run.err);
    REQUIRE(run.status == 0);
    CHECK(run.out.empty());

    const auto kept = kvevict::tools::read_npy<std::int64_t>(npy_path, 2);
    CHECK(kept.shape == std::vector<std::int64_t>{expected.n_kv_heads(), expected.count()});
    CHECK(kept.data == plan_values(expected));
    CHECK(read_text(txt_path) == plan_text(expected));

    const ToolRun to_stdout = run_tool(dir.path(), arguments);
    REQUIRE(to_stdout.status == 0);
    CHECK(to_stdout.out == plan_text(expected));
  }
}

TEST_CASE("select tool keeps everything within budget", "[select_tool]") {
  TemporaryDirectory dir;
  const Layer layer = random_layer(12);
  write_layer(dir.path(), layer);
  const std::string budget = std::to_string(layer.n);

  KeepPlan identity(layer.kv_heads, layer.n);
  identity.fill_identity();
  for (const PolicyCase& policy_case : evicting_cases()) {
    INFO("policy " << policy_case.options.name);
    std::vector<std::string> arguments = {"--in", dir.path().string()};
    arguments.insert(arguments.end(), policy_case.arguments.begin(), policy_case.arguments.end());
    const auto budget_option = std::find(arguments.begin(), arguments.end(), "--budget");
    REQUIRE(budget_option + 1 < arguments.end());
    *(budget_option + 1) = budget;
    const ToolRun run = run_tool(dir.path(), arguments);
    INFO("stderr: " << run.err);
    REQUIRE(run.status == 0);
    CHECK(run.out == plan_text(identity));
  }
}

TEST_CASE("select tool query_head mode", "[select_tool]") {
  TemporaryDirectory dir;
  const Layer layer = random_layer(13);
  write_layer(dir.path(), layer);
  const fs::path out = dir.path() / "kept.npy";

  SECTION("restkv keeps one row per query head") {
    const PolicyOptions options = windowed_options("restkv", 16, 4);
    const ToolRun run = run_tool(dir.path(), {"--in", dir.path().string(), "--policy", "restkv", "--budget", "16",
                                              "--window", "4", "--gqa", "query_head", "--out", out.string()});
    INFO("stderr: " << run.err);
    REQUIRE(run.status == 0);
    const auto kept = kvevict::tools::read_npy<std::int64_t>(out, 2);
    CHECK(kept.shape == std::vector<std::int64_t>{layer.heads, 16});
    const KeepPlan expected = library_plan(layer, options, true);
    CHECK(kept.data == plan_values(expected));
    // Selecting per query head equals selecting per KV head after repeating
    // every KV head to its query heads (groups of one).
    CHECK(kept.data == plan_values(library_plan(repeat_kv(layer), options)));
    // Query heads 0 and 1 share KV head 0 but keep different positions, so
    // the rows are not one per-KV-head selection copied to its group.
    CHECK(std::vector<std::int64_t>(expected.head(0).begin(), expected.head(0).end()) !=
          std::vector<std::int64_t>(expected.head(1).begin(), expected.head(1).end()));
  }

  SECTION("snapkv selects over repeated keys and values") {
    const PolicyOptions options = windowed_options("snapkv", 16, 4);
    const ToolRun run = run_tool(dir.path(), {"--in", dir.path().string(), "--policy", "snapkv", "--budget", "16",
                                              "--window", "4", "--gqa", "query_head", "--out", out.string()});
    INFO("stderr: " << run.err);
    REQUIRE(run.status == 0);
    const auto kept = kvevict::tools::read_npy<std::int64_t>(out, 2);
    CHECK(kept.shape == std::vector<std::int64_t>{layer.heads, 16});
    CHECK(kept.data == plan_values(library_plan(repeat_kv(layer), options)));
  }

  SECTION("within budget every query head keeps everything") {
    const ToolRun run = run_tool(dir.path(), {"--in", dir.path().string(), "--policy", "restkv", "--budget", "48",
                                              "--window", "4", "--gqa", "query_head", "--out", out.string()});
    REQUIRE(run.status == 0);
    const auto kept = kvevict::tools::read_npy<std::int64_t>(out, 2);
    KeepPlan identity(layer.heads, layer.n);
    identity.fill_identity();
    CHECK(kept.shape == std::vector<std::int64_t>{layer.heads, layer.n});
    CHECK(kept.data == plan_values(identity));
  }

  SECTION("other policies reject it") {
    const ToolRun run = run_tool(dir.path(), {"--in", dir.path().string(), "--policy", "h2o", "--budget", "16",
                                              "--gqa", "query_head"});
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Catch::Contains("query_head") && Catch::Contains("h2o"));
  }
}

TEST_CASE("select tool timing line", "[select_tool]") {
  TemporaryDirectory dir;
  const Layer layer = random_layer(14);
  write_layer(dir.path(), layer);
  const fs::path txt = dir.path() / "kept.txt";
  const ToolRun run = run_tool(dir.path(), {"--in", dir.path().string(), "--policy", "snapkv", "--budget", "16",
                                            "--window", "4", "--timing", "5", "--txt", txt.string()});
  INFO("stderr: " << run.err);
  REQUIRE(run.status == 0);
  CHECK(read_text(txt) == plan_text(library_plan(layer, windowed_options("snapkv", 16, 4))));

  // The only output line: "selection_ms <number>".
  std::istringstream lines(run.out);
  std::string label;
  double milliseconds = -1.0;
  std::string rest;
  lines >> label >> milliseconds;
  CHECK(label == "selection_ms");
  CHECK(!lines.fail());
  CHECK(milliseconds >= 0.0);
  CHECK(std::isfinite(milliseconds));
  lines >> rest;
  CHECK(rest.empty());
  CHECK(run.out.back() == '\n');
}

TEST_CASE("select tool rejects bad input files", "[select_tool]") {
  TemporaryDirectory dir;
  const Layer layer = random_layer(15);
  const fs::path in = dir.path() / "in";
  const std::vector<std::string> arguments = {"--in", in.string(), "--policy", "streaming_llm", "--budget", "16"};
  const std::string q_payload(reinterpret_cast<const char*>(layer.queries.data()),
                              layer.queries.size() * sizeof(float));
  const std::vector<std::int64_t> q_shape = {layer.heads, layer.n, layer.head_dim};

  struct BadCase {
    std::string what;
    std::string file;     // the file the message must name
    std::string problem;  // a phrase of the message
  };
  const auto check_rejected = [&](const BadCase& bad, const std::vector<std::string>& run_arguments) {
    INFO("case: " << bad.what);
    const ToolRun run = run_tool(dir.path(), run_arguments);
    INFO("stderr: " << run.err);
    CHECK(run.status == 1);
    CHECK(run.out.empty());
    CHECK_THAT(run.err, Catch::Contains((in / bad.file).string()));
    CHECK_THAT(run.err, Catch::Contains(bad.problem, Catch::CaseSensitive::No));
  };
  const auto fresh_inputs = [&](const Layer& source, bool with_w_o = true) {
    fs::remove_all(in);
    fs::create_directory(in);
    write_layer(in, source, with_w_o);
  };

  SECTION("float64 queries") {
    fresh_inputs(layer);
    std::string doubles;
    for (const float x : layer.queries) {
      const double value = x;
      doubles.append(reinterpret_cast<const char*>(&value), sizeof value);
    }
    write_raw_npy(in / "q.npy", "<f8", false, q_shape, doubles);
    check_rejected({"dtype <f8", "q.npy", "<f8"}, arguments);
  }
  SECTION("big-endian queries") {
    fresh_inputs(layer);
    write_raw_npy(in / "q.npy", ">f4", false, q_shape, q_payload);
    check_rejected({"big-endian", "q.npy", "big-endian"}, arguments);
  }
  SECTION("Fortran-order queries") {
    fresh_inputs(layer);
    write_raw_npy(in / "q.npy", "<f4", true, q_shape, q_payload);
    check_rejected({"Fortran order", "q.npy", "Fortran order"}, arguments);
  }
  SECTION("keys of rank 2") {
    fresh_inputs(layer);
    kvevict::tools::write_npy(in / "k.npy", {layer.kv_heads * layer.n, layer.head_dim},
                              std::span<const float>(layer.keys));
    check_rejected({"rank 2", "k.npy", "rank 3"}, arguments);
  }
  SECTION("truncated values") {
    fresh_inputs(layer);
    const std::string bytes = read_text(in / "v.npy");
    std::ofstream(in / "v.npy", std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 12);
    check_rejected({"truncated data", "v.npy", "truncated"}, arguments);
  }
  SECTION("keys with another token count") {
    Layer shorter = layer;
    shorter.keys.resize(static_cast<std::size_t>(layer.kv_heads * (layer.n - 1) * layer.head_dim));
    fresh_inputs(layer);
    kvevict::tools::write_npy(in / "k.npy", {layer.kv_heads, layer.n - 1, layer.head_dim},
                              std::span<const float>(shorter.keys));
    check_rejected({"n differs", "k.npy", "(2, 47, 8)"}, arguments);
    check_rejected({"n differs, both shapes", "k.npy", "(4, 48, 8)"}, arguments);
  }
  SECTION("heads not divisible by kv_heads") {
    const Layer odd = random_layer(16, 3, 2);
    fresh_inputs(odd);
    check_rejected({"3 heads over 2 KV heads", "k.npy", "does not divide"}, arguments);
    check_rejected({"3 heads over 2 KV heads, the query file", "q.npy", "(3, 48, 8)"}, arguments);
  }
  SECTION("restkv without wo.npy") {
    fresh_inputs(layer, false);
    check_rejected({"missing W_o", "wo.npy", "not found"},
                   {"--in", in.string(), "--policy", "restkv", "--budget", "16", "--window", "4"});
    // Without W_o in the score, the file is not needed.
    const ToolRun run = run_tool(dir.path(), {"--in", in.string(), "--policy", "restkv", "--budget", "16", "--window",
                                              "4", "--param", "use_wo=false"});
    CHECK(run.status == 0);
  }
  SECTION("wo.npy with the wrong width") {
    fresh_inputs(layer);
    const std::vector<float> narrow(static_cast<std::size_t>(layer.hidden * 7), 0.5f);
    kvevict::tools::write_npy(in / "wo.npy", {layer.hidden, 7}, std::span<const float>(narrow));
    check_rejected({"W_o width", "wo.npy", "(12, 7)"},
                   {"--in", in.string(), "--policy", "restkv", "--budget", "16", "--window", "4"});
  }
  SECTION("non-finite key") {
    Layer broken = layer;
    broken.keys[8 * 3 + 1] = NAN;  // KV head 0, token 3, component 1
    fresh_inputs(broken);
    check_rejected({"NaN key", "k.npy", "[0, 3, 1]"}, arguments);
  }
  SECTION("missing folder") {
    check_rejected({"no such folder", "q.npy", "not found"}, arguments);
  }
}

TEST_CASE("select tool usage errors", "[select_tool]") {
  TemporaryDirectory dir;
  write_layer(dir.path(), random_layer(17));
  const std::string in = dir.path().string();

  SECTION("unknown policy lists the known ones") {
    const ToolRun run = run_tool(dir.path(), {"--in", in, "--policy", "lru", "--budget", "16"});
    CHECK(run.status == 2);
    for (const std::string_view name : kvevict::policy_names) CHECK_THAT(run.err, Catch::Contains(std::string(name)));
  }
  SECTION("budget the policy rejects") {
    const ToolRun run = run_tool(dir.path(), {"--in", in, "--policy", "streaming_llm", "--budget", "3"});
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Catch::Contains("StreamingLLM: budget (3) must be at least sinks"));
  }
  SECTION("budget below the window") {
    const ToolRun run = run_tool(dir.path(), {"--in", in, "--policy", "snapkv", "--budget", "8", "--window", "16"});
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Catch::Contains("budget (8)") && Catch::Contains("window (16)"));
  }
  SECTION("unknown parameter") {
    const ToolRun run =
        run_tool(dir.path(), {"--in", in, "--policy", "snapkv", "--budget", "16", "--param", "kernel=3"});
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Catch::Contains("kernel") && Catch::Contains("kernel_size"));
  }
  SECTION("missing budget") {
    const ToolRun run = run_tool(dir.path(), {"--in", in, "--policy", "h2o"});
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Catch::Contains("--budget"));
  }
  SECTION("malformed number") {
    const ToolRun run = run_tool(dir.path(), {"--in", in, "--policy", "h2o", "--budget", "16x"});
    CHECK(run.status == 2);
    CHECK_THAT(run.err, Catch::Contains("16x"));
  }
  SECTION("help lists every option") {
    const ToolRun run = run_tool(dir.path(), {"--help"});
    CHECK(run.status == 0);
    for (const char* option : {"--in", "--policy", "--budget", "--window", "--sinks", "--gqa", "--param", "--out",
                               "--txt", "--timing", "--layer", "--n-layers"}) {
      CHECK_THAT(run.out, Catch::Contains(option));
    }
  }
}

#endif
