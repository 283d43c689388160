// Argument parsing and output of kvevict-eval: the Markdown table, the CSV
// file, the gnuplot plot and the memory check.
#pragma once

#include "stream_eval.hpp"
#include "synthetic.hpp"

#include "kvevict/registry.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace eval {

// A command-line mistake: reported with the usage hint and exit status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline std::int64_t parse_integer(const std::string& name, const std::string& text, std::int64_t min,
                                  std::int64_t max) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || value < min || value > max) {
    throw UsageError(name + " '" + text + "' is invalid; pass an integer from " + std::to_string(min) + " to " +
                     std::to_string(max));
  }
  return value;
}

inline std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

// Parses 'all' or a comma-separated list of policy names.
inline std::vector<std::string> parse_policies(const std::string& text) {
  std::vector<std::string> names;
  if (text == "all") {
    for (const auto name : kvevict::policy_names) names.emplace_back(name);
    return names;
  }
  for (const std::string& name : split_list(text)) {
    if (std::find(kvevict::policy_names.begin(), kvevict::policy_names.end(), name) == kvevict::policy_names.end()) {
      std::string known;
      for (const auto known_name : kvevict::policy_names) known += (known.empty() ? "" : ", ") + std::string(known_name);
      throw UsageError("unknown policy '" + name + "' in --policies; known policies: " + known + " (or all)");
    }
    names.push_back(name);
  }
  if (names.empty()) throw UsageError("--policies is empty; pass 'all' or a comma-separated list");
  return names;
}

inline std::vector<std::int64_t> parse_budgets(const std::string& text) {
  std::vector<std::int64_t> budgets;
  for (const std::string& item : split_list(text)) budgets.push_back(parse_integer("--budgets", item, 1, 1 << 30));
  if (budgets.empty()) throw UsageError("--budgets is empty; pass comma-separated token counts such as 32,64");
  return budgets;
}

inline std::string format(const char* pattern, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, pattern, value);
  return buffer;
}

inline std::string mib(std::int64_t bytes) { return format("%.1f", static_cast<double>(bytes) / (1024.0 * 1024.0)); }

inline std::string budget_label(std::int64_t budget) { return budget == 0 ? "-" : std::to_string(budget); }

inline std::string summary_line(const llama2c::StreamResult& r) {
  return r.policy + " budget " + budget_label(r.budget) + ": " + std::to_string(r.tokens) + " tokens, perplexity " +
         format("%.4f", r.perplexity) + ", " + format("%.0f", r.tokens_per_second()) + " tokens/s, eviction " +
         format("%.1f%%", 100.0 * r.eviction_share());
}

inline void print_stream_table(std::ostream& out, const std::vector<llama2c::StreamResult>& results) {
  out << "| policy | budget | tokens | perplexity | first segment | last segment | tokens/s | eviction time | "
         "KV bytes peak | KV bytes end | attention error | peak RSS (MiB) |\n"
      << "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& r : results) {
    out << "| " << r.policy << " | " << budget_label(r.budget) << " | " << r.tokens << " | "
        << format("%.4f", r.perplexity) << " | " << format("%.4f", r.segments.front().perplexity) << " | "
        << format("%.4f", r.segments.back().perplexity) << " | " << format("%.0f", r.tokens_per_second()) << " | "
        << format("%.1f%%", 100.0 * r.eviction_share()) << " | " << r.kv_bytes_peak << " | " << r.kv_bytes_end
        << " | " << (r.error_samples > 0 ? format("%.4f", r.attention_error) : std::string("-")) << " | "
        << mib(r.rss_peak) << " |\n";
  }
}

// Prints, per run past its warm-up, whether KV bytes stayed bounded and how
// much resident memory grew. Returns false when a run breaks either limit:
// KV bytes at the end above the peak seen during warm-up, or resident memory
// more than 10% above its value after warm-up.
inline bool print_memory_check(std::ostream& out, const std::vector<llama2c::StreamResult>& results) {
  bool ok = true;
  bool header = false;
  for (const auto& r : results) {
    if (r.rss_after_warmup == 0 || r.policy == "full") continue;
    if (!header) {
      out << "\nMemory after warm-up (KV bytes must not grow; resident memory within 10%):\n";
      header = true;
    }
    const double growth =
        static_cast<double>(r.rss_end - r.rss_after_warmup) / static_cast<double>(r.rss_after_warmup);
    const bool kv_ok = r.kv_bytes_peak_after_warmup <= r.kv_bytes_peak_warmup;
    const bool rss_ok = growth <= 0.10;
    ok = ok && kv_ok && rss_ok;
    out << "- " << r.policy << " budget " << r.budget << ": KV bytes " << r.kv_bytes_after_warmup << " after warm-up, "
        << r.kv_bytes_end << " at the end (peak " << r.kv_bytes_peak_warmup << " during warm-up, "
        << r.kv_bytes_peak_after_warmup << " after, "
        << (kv_ok ? "bounded" : "GREW") << "); resident memory " << mib(r.rss_after_warmup) << " MiB -> "
        << mib(r.rss_end) << " MiB (" << format("%+.1f%%", 100.0 * growth) << ", " << (rss_ok ? "ok" : "OVER 10%")
        << ")\n";
  }
  return ok;
}

inline std::ofstream open_output(const std::string& path) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write '" + path + "'; check that its folder exists and is writable");
  return out;
}

inline void write_stream_csv(const std::string& path, const std::vector<llama2c::StreamResult>& results) {
  std::ofstream out = open_output(path);
  out << "policy,budget,tokens,segment_end,segment_perplexity,perplexity,tokens_per_second,eviction_share,"
         "evictions,kv_bytes_peak,kv_bytes_end,attention_error,rss_peak_bytes\n";
  for (const auto& r : results) {
    for (const auto& segment : r.segments) {
      out << r.policy << ',' << r.budget << ',' << r.tokens << ',' << segment.end_token << ','
          << format("%.6f", segment.perplexity) << ',' << format("%.6f", r.perplexity) << ','
          << format("%.1f", r.tokens_per_second()) << ',' << format("%.5f", r.eviction_share()) << ','
          << r.evictions << ',' << r.kv_bytes_peak << ',' << r.kv_bytes_end << ','
          << format("%.6f", r.attention_error) << ',' << r.rss_peak << '\n';
    }
  }
}

// Draws segment perplexity against tokens, one line per run, with gnuplot.
// Says so and returns when gnuplot is not installed.
inline void plot_stream(const std::string& path, const std::vector<llama2c::StreamResult>& results,
                        std::ostream& log) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    log << "\nNo plot: gnuplot is not installed (Debian package gnuplot-nox); the CSV has the same data.\n";
    return;
  }
  const std::string data_path = path + ".dat";
  const std::string script_path = path + ".gp";
  {
    std::ofstream data = open_output(data_path);
    for (const auto& r : results) {
      data << "# " << r.policy << ' ' << r.budget << '\n';
      for (const auto& segment : r.segments) data << segment.end_token << ' ' << segment.perplexity << '\n';
      data << "\n\n";
    }
  }
  const bool svg = std::filesystem::path(path).extension() == ".svg";
  {
    std::ofstream script = open_output(script_path);
    script << (svg ? "set terminal svg size 900,540 dynamic\n" : "set terminal png size 900,540\n");
    script << "set output '" << path << "'\n"
           << "set title 'Perplexity per segment, stories260K on TinyStories'\n"
           << "set xlabel 'tokens streamed'\nset ylabel 'segment perplexity'\nset logscale x\nset key outside right\n"
           << "set grid\nplot ";
    for (std::size_t i = 0; i < results.size(); ++i) {
      const auto& r = results[i];
      script << (i ? ", " : "") << "'" << data_path << "' index " << i << " with linespoints title '" << r.policy
             << (r.budget ? " B=" + std::to_string(r.budget) : std::string()) << "'";
    }
    script << '\n';
  }
  if (std::system(("gnuplot '" + script_path + "'").c_str()) != 0) {
    log << "\ngnuplot failed to draw " << path << "; the CSV has the same data.\n";
    return;
  }
  std::filesystem::remove(data_path);
  std::filesystem::remove(script_path);
  log << "\nPlot written to " << path << ".\n";
}

inline void print_synthetic_table(std::ostream& out, const std::vector<llama2c::SyntheticResult>& results) {
  out << "| policy | budget | tokens | attention error | needle recall | needles | microseconds per token | "
         "eviction time |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& r : results) {
    out << "| " << r.policy << " | " << budget_label(r.budget) << " | " << r.tokens << " | "
        << format("%.4f", r.attention_error) << " | " << format("%.3f", r.needle_recall) << " | " << r.needles
        << " | " << format("%.2f", 1e6 * r.seconds / static_cast<double>(r.tokens)) << " | "
        << format("%.1f%%", r.seconds > 0 ? 100.0 * r.eviction_seconds / r.seconds : 0.0) << " |\n";
  }
}

inline void write_synthetic_csv(const std::string& path, const std::vector<llama2c::SyntheticResult>& results) {
  std::ofstream out = open_output(path);
  out << "policy,budget,tokens,attention_error,needle_recall,needles,seconds,eviction_seconds\n";
  for (const auto& r : results) {
    out << r.policy << ',' << r.budget << ',' << r.tokens << ',' << format("%.6f", r.attention_error) << ','
        << format("%.4f", r.needle_recall) << ',' << r.needles << ',' << format("%.4f", r.seconds) << ','
        << format("%.4f", r.eviction_seconds) << '\n';
  }
}

}  // namespace eval
