// kvevict-eval: compares eviction policies on a real llama2.c model and real
// text (perplexity, speed, memory, attention-output error), or on a seeded
// synthetic workload when no model is given. Run `kvevict-eval --help`.
#include "examples/llama2c/eval_report.hpp"
#include "examples/llama2c/model.hpp"
#include "examples/llama2c/stream_eval.hpp"
#include "examples/llama2c/synthetic.hpp"
#include "examples/llama2c/text.hpp"
#include "examples/llama2c/tokenizer.hpp"

#include <chrono>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <iostream>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

constexpr const char* usage = R"(usage:
  kvevict-eval ppl      [--model F --tokenizer F --text F | --assets DIR] [options]
  kvevict-eval generate [--model F --tokenizer F | --assets DIR] [--steps N] [--policy NAME --budget B]
  kvevict-eval synthetic [options]

ppl streams the text through the model token by token (decode-time eviction)
for every selected policy and budget, and reports perplexity overall and per
segment, tokens per second, the share of time spent in eviction, KV-cache
bytes, peak resident memory and the attention-output error against a full
cache over the last --error-span tokens. Without a model (no --model and no
--assets or KVEVICT_ASSETS) ppl runs the synthetic workload instead.

Files:
  --assets DIR          folder holding models/stories260K.bin, models/tok512.bin and
                        data/tinystories_val.txt (default: $KVEVICT_ASSETS)
  --model F             llama2.c float32 checkpoint
  --tokenizer F         llama2.c tokenizer of the same vocabulary
  --text F              UTF-8 text, stories separated by blank lines
Policies and budgets:
  --policies LIST       'all' or comma-separated names: full, streaming_llm, h2o, tova,
                        snapkv, lacache, restkv, sinkclip (default all)
  --budgets LIST        comma-separated tokens per KV head kept after eviction (default 64)
  --positions MODE      cache_relative (default: keys rotated at their slot) or original
  --sinks S             leading tokens kept, for policies with sinks (default: the policy's)
  --window W            recent or observation window in tokens (default: the policy's, but at
                        most budget/4 for snapkv, restkv and sinkclip so every budget is valid)
  --slack S             decode-time eviction fires once the cache exceeds budget + S
Stream:
  --tokens N            token ids read per run, up to 500000; the text restarts from its
                        beginning when it ends (default 8192; synthetic 4096)
  --segment-tokens T    also report perplexity per segment of T predictions (default 4096)
  --full-max-tokens N   the full cache (quadratic cost) runs at most N tokens (default 16384)
  --error-every K       sample the attention-output error every K tokens, 0 to skip (default 64)
  --error-span S        the full reference cache holds the last S tokens (default 512)
  --seed S              synthetic workload seed (default 1)
Output:
  --csv F               write one CSV row per run and segment
  --plot F              draw perplexity against tokens per run (.svg or .png, needs gnuplot)
generate:
  --steps N             tokens to generate greedily from BOS (default 200)
  --policy NAME         eviction policy during generation (default full)
  --budget B            its budget (default 64)
)";

struct Arguments {
  std::string command;
  std::map<std::string, std::string> values;

  bool has(const std::string& key) const { return values.count(key) != 0; }
  std::string text(const std::string& key, const std::string& fallback) const {
    const auto found = values.find(key);
    return found == values.end() ? fallback : found->second;
  }
  std::int64_t integer(const std::string& key, std::int64_t fallback, std::int64_t min, std::int64_t max) const {
    if (!has(key)) return fallback;
    return eval::parse_integer("--" + key, values.at(key), min, max);
  }
};

const std::vector<std::string> known_options = {
    "assets", "model", "tokenizer", "text", "policies", "budgets", "positions", "sinks", "window", "slack",
    "tokens", "segment-tokens", "full-max-tokens", "error-every", "error-span", "seed", "csv", "plot",
    "steps", "policy", "budget"};

Arguments parse_arguments(int argc, char** argv) {
  Arguments arguments;
  if (argc < 2) throw eval::UsageError("missing command (ppl, generate or synthetic)");
  arguments.command = argv[1];
  if (arguments.command == "--help" || arguments.command == "-h") return arguments;
  if (arguments.command != "ppl" && arguments.command != "generate" && arguments.command != "synthetic") {
    throw eval::UsageError("unknown command '" + arguments.command + "'; use ppl, generate or synthetic");
  }
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      arguments.command = "--help";
      return arguments;
    }
    if (flag.rfind("--", 0) != 0) throw eval::UsageError("unexpected argument '" + flag + "'");
    const std::string key = flag.substr(2);
    if (std::find(known_options.begin(), known_options.end(), key) == known_options.end()) {
      throw eval::UsageError("unknown option '" + flag + "'");
    }
    if (i + 1 >= argc) throw eval::UsageError("option '" + flag + "' needs a value");
    arguments.values[key] = argv[++i];
  }
  return arguments;
}

struct ModelFiles {
  std::filesystem::path model;
  std::filesystem::path tokenizer;
  std::filesystem::path text;
};

// Resolves file paths from --model/--tokenizer/--text, --assets or
// $KVEVICT_ASSETS. Returns false when no model is configured at all.
bool resolve_files(const Arguments& arguments, bool need_text, ModelFiles& files) {
  std::string assets = arguments.text("assets", "");
  if (assets.empty()) {
    if (const char* env = std::getenv("KVEVICT_ASSETS")) assets = env;
  }
  if (!assets.empty()) {
    files.model = std::filesystem::path(assets) / "models" / "stories260K.bin";
    files.tokenizer = std::filesystem::path(assets) / "models" / "tok512.bin";
    files.text = std::filesystem::path(assets) / "data" / "tinystories_val.txt";
  }
  if (arguments.has("model")) files.model = arguments.text("model", "");
  if (arguments.has("tokenizer")) files.tokenizer = arguments.text("tokenizer", "");
  if (arguments.has("text")) files.text = arguments.text("text", "");
  if (files.model.empty() && files.tokenizer.empty()) return false;
  if (files.model.empty()) throw eval::UsageError("--model is missing (or pass --assets DIR)");
  if (files.tokenizer.empty()) throw eval::UsageError("--tokenizer is missing (or pass --assets DIR)");
  if (need_text && files.text.empty()) throw eval::UsageError("--text is missing (or pass --assets DIR)");
  return true;
}

kvevict::PolicyOptions policy_options(const Arguments& arguments, const std::string& name, std::int64_t budget) {
  kvevict::PolicyOptions options;
  options.name = name;
  options.budget = budget;
  options.sinks = arguments.integer("sinks", -1, 0, 1 << 30);
  options.slack = arguments.integer("slack", -1, 0, 1 << 30);
  options.window = arguments.integer("window", -1, 1, 1 << 30);
  const bool scorer = name == "snapkv" || name == "restkv" || name == "sinkclip";
  if (!arguments.has("window") && scorer) options.window = std::min<std::int64_t>(32, std::max<std::int64_t>(2, budget / 4));
  return options;
}

// Progress on stderr: a bar when stderr is a terminal, one line per run otherwise.
class Progress {
 public:
  Progress() : terminal_(isatty(STDERR_FILENO) != 0) {}

  void start(const std::string& label, std::int64_t total) {
    label_ = label;
    total_ = total;
    start_ = std::chrono::steady_clock::now();
  }
  void update(std::int64_t done) {
    if (!terminal_) return;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = seconds > 0.0 ? static_cast<double>(done) / seconds : 0.0;
    const double eta = rate > 0.0 ? static_cast<double>(total_ - done) / rate : 0.0;
    const int width = 30;
    const int filled = static_cast<int>(width * done / std::max<std::int64_t>(total_, 1));
    std::fprintf(stderr, "\r%-22s [%s%s] %lld/%lld tokens %.0f tok/s ETA %.0f s ", label_.c_str(),
                 std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(), static_cast<long long>(done),
                 static_cast<long long>(total_), rate, eta);
  }
  void finish(const std::string& summary) {
    if (terminal_) std::fprintf(stderr, "\r%s\n", std::string(100, ' ').c_str());
    std::fprintf(stderr, "%s\n", summary.c_str());
  }

 private:
  bool terminal_;
  std::string label_;
  std::int64_t total_ = 0;
  std::chrono::steady_clock::time_point start_;
};

int run_synthetic_command(const Arguments& arguments) {
  const auto policies = eval::parse_policies(arguments.text("policies", "all"));
  const auto budgets = eval::parse_budgets(arguments.text("budgets", "64"));
  const std::int64_t tokens = arguments.integer("tokens", 4096, 2, 500000);
  const auto seed = static_cast<std::uint32_t>(arguments.integer("seed", 1, 0, 1LL << 31));
  std::vector<llama2c::SyntheticResult> results;
  std::cout << "Synthetic workload (no model configured): " << tokens << " tokens, seed " << seed
            << ", 8 query heads, 4 KV heads, head_dim 16.\n\n";
  for (const std::int64_t budget : budgets) {
    for (const std::string& name : policies) {
      if (name == "full" && budget != budgets.front()) continue;
      llama2c::SyntheticSettings settings;
      settings.policy = policy_options(arguments, name, budget);
      settings.tokens = tokens;
      settings.seed = seed;
      results.push_back(llama2c::run_synthetic(settings));
      const auto& r = results.back();
      std::fprintf(stderr, "finished %s budget %lld: attention error %.4f, needle recall %.3f\n", r.policy.c_str(),
                   static_cast<long long>(r.budget), r.attention_error, r.needle_recall);
    }
  }
  eval::print_synthetic_table(std::cout, results);
  if (arguments.has("csv")) eval::write_synthetic_csv(arguments.text("csv", ""), results);
  return 0;
}

int run_ppl_command(const Arguments& arguments) {
  ModelFiles files;
  if (!resolve_files(arguments, true, files)) {
    std::cout << "No model configured (--model/--tokenizer/--text, --assets or KVEVICT_ASSETS); "
                 "running the synthetic workload.\n";
    return run_synthetic_command(arguments);
  }
  const auto policies = eval::parse_policies(arguments.text("policies", "all"));
  const auto budgets = eval::parse_budgets(arguments.text("budgets", "64"));
  const std::int64_t tokens = arguments.integer("tokens", 8192, 2, 500000);
  const std::string positions = arguments.text("positions", "cache_relative");
  if (positions != "cache_relative" && positions != "original") {
    throw eval::UsageError("--positions '" + positions + "' is invalid; use cache_relative or original");
  }
  const std::int64_t full_max = arguments.integer("full-max-tokens", 16384, 2, 500000);

  llama2c::Model model(llama2c::load_checkpoint(files.model));
  const auto tokenizer = llama2c::Tokenizer::load(files.tokenizer, model.config().vocab_size);
  const std::vector<int> text_ids = llama2c::load_token_ids(files.text, tokenizer);
  if (text_ids.size() < 2) {
    throw eval::UsageError("text file '" + files.text.string() + "' gives " + std::to_string(text_ids.size()) +
                           " token ids; it needs at least 2 (is it empty?)");
  }
  std::vector<int> ids;
  ids.reserve(static_cast<std::size_t>(tokens));
  std::int64_t passes = 0;
  while (static_cast<std::int64_t>(ids.size()) < tokens) {
    const std::size_t take = std::min(text_ids.size(), static_cast<std::size_t>(tokens) - ids.size());
    ids.insert(ids.end(), text_ids.begin(), text_ids.begin() + static_cast<std::ptrdiff_t>(take));
    ++passes;
  }

  std::cout << "Model " << files.model.string() << ": dim " << model.config().dim << ", " << model.config().n_layers
            << " layers, " << model.config().n_heads << " query heads, " << model.config().n_kv_heads
            << " KV heads, trained context " << model.config().seq_len << ".\n";
  std::cout << "Text " << files.text.string() << ": " << text_ids.size() << " token ids; each run reads " << tokens
            << " ids";
  if (passes > 1) {
    std::cout << " (the text ends after " << text_ids.size() << " ids, so the stream restarts from its beginning; "
              << passes << " passes)";
  }
  std::cout << ". Positions: " << positions << ".\n\n";

  Progress progress;
  std::vector<llama2c::StreamResult> results;
  std::vector<std::string> notes;
  for (const std::int64_t budget : budgets) {
    for (const std::string& name : policies) {
      if (name == "full" && budget != budgets.front()) continue;
      llama2c::StreamSettings settings;
      settings.policy = policy_options(arguments, name, budget);
      settings.positions = positions == "original" ? kvevict::PositionMode::original
                                                   : kvevict::PositionMode::cache_relative;
      settings.tokens = tokens;
      if (name == "full" && tokens > full_max) {
        settings.tokens = full_max;
        notes.push_back("full cache stopped at " + std::to_string(full_max) + " tokens (--full-max-tokens; its cost "
                        "grows quadratically)");
      }
      settings.segment_tokens = arguments.integer("segment-tokens", 4096, 1, 500000);
      settings.error_every = arguments.integer("error-every", 64, 0, 1 << 30);
      settings.error_span = arguments.integer("error-span", 512, 1, 1 << 20);
      const std::string label = name + (name == "full" ? "" : " B=" + std::to_string(budget));
      progress.start(label, settings.tokens);
      results.push_back(llama2c::run_stream(model, ids, settings, [&](std::int64_t done) { progress.update(done); }));
      progress.finish("finished " + eval::summary_line(results.back()));
    }
  }

  eval::print_stream_table(std::cout, results);
  for (const auto& note : notes) std::cout << "\nNote: " << note << ".";
  std::cout << '\n';
  const bool memory_ok = eval::print_memory_check(std::cout, results);
  if (arguments.has("csv")) eval::write_stream_csv(arguments.text("csv", ""), results);
  if (arguments.has("plot")) eval::plot_stream(arguments.text("plot", ""), results, std::cout);
  return memory_ok ? 0 : 3;
}

int run_generate_command(const Arguments& arguments) {
  ModelFiles files;
  if (!resolve_files(arguments, false, files)) {
    throw eval::UsageError("generate needs a model: pass --model and --tokenizer, or --assets DIR");
  }
  const std::int64_t steps = arguments.integer("steps", 200, 1, 500000);
  const std::string name = arguments.text("policy", "full");
  const std::int64_t budget = arguments.integer("budget", 64, 1, 1 << 30);
  llama2c::Model model(llama2c::load_checkpoint(files.model));
  const auto tokenizer = llama2c::Tokenizer::load(files.tokenizer, model.config().vocab_size);
  const std::string positions = arguments.text("positions", "cache_relative");
  if (positions != "cache_relative" && positions != "original") {
    throw eval::UsageError("--positions '" + positions + "' is invalid; use cache_relative or original");
  }
  const auto mode = positions == "original" ? kvevict::PositionMode::original : kvevict::PositionMode::cache_relative;
  const auto start = std::chrono::steady_clock::now();
  std::int64_t generated = 0;
  const std::string text =
      llama2c::generate_greedy(model, tokenizer, policy_options(arguments, name, budget), mode, steps, &generated);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << text << '\n';
  std::fprintf(stderr, "generated %lld tokens in %.3f s (%.0f tokens/s), policy %s\n", static_cast<long long>(generated),
               seconds, seconds > 0 ? static_cast<double>(generated) / seconds : 0.0, name.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Arguments arguments = parse_arguments(argc, argv);
    if (arguments.command == "--help") {
      std::cout << usage;
      return 0;
    }
    if (arguments.command == "synthetic") return run_synthetic_command(arguments);
    if (arguments.command == "generate") return run_generate_command(arguments);
    return run_ppl_command(arguments);
  } catch (const eval::UsageError& error) {
    std::cerr << "kvevict-eval: " << error.what() << "\nRun 'kvevict-eval --help' for the options.\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "kvevict-eval: " << error.what() << '\n';
    return 1;
  }
}
