// kvevict-select: runs one eviction policy on one attention layer's tensors,
// stored as NumPy .npy files, and writes the kept token positions.
//
//   kvevict-select --in DIR --policy NAME --budget B [--out kept.npy] [--txt kept.txt]
//
// `kvevict-select --help` lists every option; select_arguments.hpp has the
// text. Exit status: 0 on success, 1 for a bad input file or a failed
// selection, 2 for a usage error.
#include "npy.hpp"
#include "select_arguments.hpp"
#include "select_inputs.hpp"
#include "select_run.hpp"

#include <kvevict/registry.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <new>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using namespace kvevict;
using namespace kvevict::tools;

constexpr int exit_input_error = 1;
constexpr int exit_usage_error = 2;

int report(int status, const std::string& message) {
  std::cerr << "kvevict-select: error: " << message << "\n";
  if (status == exit_usage_error) std::cerr << "Run 'kvevict-select --help' for the options.\n";
  return status;
}

// Checks the policy name and the GQA mode before any file is read.
void check_policy_choice(const SelectArguments& arguments) {
  bool known = false;
  std::string names;
  for (const std::string_view name : policy_names) {
    known = known || name == arguments.policy;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  if (!known) throw UsageError("unknown policy '" + arguments.policy + "'; known policies: " + names);
  if (arguments.gqa == GqaMode::query_head && arguments.policy != "restkv" && arguments.policy != "snapkv") {
    throw UsageError("--gqa query_head (one selection per query head) is supported by restkv and snapkv only; " +
                     arguments.policy + " keeps one selection per KV head, so use --gqa kv_head");
  }
}

// True when the policy will read W_o: restkv, unless --param use_wo turns it
// off (a malformed use_wo value is left to the policy to reject).
bool reads_w_o(const SelectArguments& arguments) {
  if (arguments.policy != "restkv") return false;
  const auto use_wo = arguments.params.find("use_wo");
  return use_wo == arguments.params.end() || use_wo->second == "true" || use_wo->second == "1";
}

PolicyOptions policy_options(const SelectArguments& arguments, const SelectInputs& inputs) {
  PolicyOptions options;
  options.name = arguments.policy;
  options.budget = arguments.budget.value_or(0);
  options.sinks = arguments.sinks;
  options.window = arguments.window;
  options.layer = arguments.layer;
  options.n_layers = arguments.n_layers;
  options.n_heads = inputs.n_heads;
  options.n_kv_heads = inputs.n_kv_heads;
  options.head_dim = inputs.head_dim;
  options.w_o = inputs.w_o ? &*inputs.w_o : nullptr;
  options.parameters = arguments.params;
  return options;
}

std::vector<std::int64_t> flatten(const KeepPlan& plan) {
  std::vector<std::int64_t> slots;
  slots.reserve(static_cast<std::size_t>(plan.n_kv_heads() * plan.count()));
  for (int row = 0; row < plan.n_kv_heads(); ++row) {
    const auto kept = plan.head(row);
    slots.insert(slots.end(), kept.begin(), kept.end());
  }
  return slots;
}

void write_text(std::ostream& out, const KeepPlan& plan) {
  for (int row = 0; row < plan.n_kv_heads(); ++row) {
    const auto kept = plan.head(row);
    for (std::size_t i = 0; i < kept.size(); ++i) {
      if (i > 0) out << ' ';
      out << kept[i];
    }
    out << '\n';
  }
}

void write_text_file(const fs::path& path, const KeepPlan& plan) {
  std::ofstream stream(path, std::ios::trunc);
  if (!stream) throw InputError(path.string() + ": cannot open the file for writing");
  write_text(stream, plan);
  stream.close();
  if (!stream) throw InputError(path.string() + ": failed to write the file");
}

// Runs the selection `runs` times, each on a fresh policy and a fresh copy of
// the filled cache, and returns the plan of the first run. With `times_ms`,
// records the duration of each run's observe, select and keep. Throws
// std::runtime_error when two runs keep different positions.
KeepPlan run_selection(const PolicyOptions& options, const KVCache<float>& filled, const Observation& observation,
                       bool per_query_head, int runs, std::vector<double>* times_ms) {
  KeepPlan first;
  for (int run = 0; run < runs; ++run) {
    AnyPolicy<float> policy = make_policy<float>(options);
    KVCache<float> cache = filled;
    KeepPlan plan;
    const auto start = std::chrono::steady_clock::now();
    compress_once(policy, cache, observation, per_query_head, plan);
    const auto stop = std::chrono::steady_clock::now();
    if (times_ms) times_ms->push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    if (run == 0) {
      first = std::move(plan);
    } else if (!(plan == first)) {
      throw std::runtime_error("run " + std::to_string(run + 1) + " kept different positions than run 1; the " +
                               options.name + " selection is not deterministic");
    }
  }
  return first;
}

int run(const SelectArguments& arguments) {
  SelectInputs inputs = load_select_inputs(arguments.input_dir, arguments.policy == "restkv");
  if (reads_w_o(arguments) && !inputs.w_o) {
    return report(exit_input_error, inputs.w_o_path.string() +
                                        ": file not found; restkv reads the output projection W_o "
                                        "[hidden, heads * head_dim] (or pass --param use_wo=false)");
  }
  const bool per_query_head = arguments.gqa == GqaMode::query_head && arguments.policy == "restkv";
  if (arguments.gqa == GqaMode::query_head && arguments.policy == "snapkv") {
    // SnapKV has no per-query-head selection of its own: with every KV head
    // repeated, each query head is its own group (g = 1).
    repeat_kv_heads(inputs);
  }

  const PolicyOptions options = policy_options(arguments, inputs);
  ObservationNeeds needs;
  int state_channels = 0;
  try {
    const AnyPolicy<float> policy = make_policy<float>(options);
    needs = policy.needs();
    state_channels = policy.state_channels();
  } catch (const std::invalid_argument& error) {
    return report(exit_usage_error, error.what());
  }

  const KVCache<float> filled = fill_cache(inputs, state_channels);
  const PrefillObservation observation(inputs, needs);

  std::vector<double> times_ms;
  KeepPlan plan;
  try {
    plan = run_selection(options, filled, observation.view(), per_query_head, std::max(arguments.timing_runs, 1),
                         arguments.timing_runs > 0 ? &times_ms : nullptr);
  } catch (const std::exception& error) {
    return report(exit_input_error, std::string("selection failed: ") + error.what());
  }

  if (arguments.out_npy) {
    write_npy(*arguments.out_npy, {plan.n_kv_heads(), plan.count()}, std::span<const std::int64_t>(flatten(plan)));
  }
  if (arguments.out_txt) write_text_file(*arguments.out_txt, plan);
  if (!arguments.out_npy && !arguments.out_txt) write_text(std::cout, plan);
  if (arguments.timing_runs > 0) {
    std::cout << "selection_ms " << std::fixed << std::setprecision(6) << median(times_ms) << '\n';
  }
  std::cout.flush();
  return std::cout ? 0 : report(exit_input_error, "failed to write to standard output");
}

}  // namespace

int main(int argc, char** argv) {
  SelectArguments arguments;
  try {
    arguments = parse_select_arguments(argc, argv);
    if (arguments.help) {
      std::cout << select_help_text();
      return 0;
    }
    check_policy_choice(arguments);
  } catch (const UsageError& error) {
    return report(exit_usage_error, error.what());
  }

  try {
    return run(arguments);
  } catch (const NpyError& error) {
    return report(exit_input_error, error.what());
  } catch (const InputError& error) {
    return report(exit_input_error, error.what());
  } catch (const std::bad_alloc&) {
    return report(exit_input_error, "out of memory; the inputs are too large for this machine (H2O's attention "
                                    "rows alone take heads * n * n floats)");
  } catch (const std::exception& error) {
    return report(exit_input_error, error.what());
  }
}
