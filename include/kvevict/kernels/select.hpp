// Deterministic top-k selection with protected ranges.
//
// Ranking: higher score first; on equal scores the later slot (the larger
// position, because slots are in position order) ranks first. The result is
// sorted by slot. Protected slots (the first `sinks`, the last `recent`, and
// any slot flagged in `extra_protected`) are always kept and never ranked.
#pragma once

#include "kvevict/common.hpp"

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace kvevict::kernels {

// Reusable scratch of select_keep, so per-step selection does not allocate.
struct SelectScratch {
  std::vector<std::int64_t> candidates;
  std::vector<std::uint8_t> chosen;
};

// True when slot a ranks before slot b.
inline bool ranks_before(std::span<const float> scores, std::int64_t a, std::int64_t b) {
  const float sa = scores[static_cast<std::size_t>(a)];
  const float sb = scores[static_cast<std::size_t>(b)];
  return sa > sb || (sa == sb && a > b);
}

// Writes into `out` [keep_count] the kept slots of [0, n), increasing:
// every protected slot, then the best-ranked others by `scores` [n] until
// keep_count slots are chosen. Scores of protected slots are not read.
//   extra_protected: empty, or [n] flags (non-zero = protected)
// Throws std::invalid_argument when keep_count is outside [0, n] or smaller
// than the number of protected slots. O(n) average (std::nth_element).
inline void select_keep(std::span<const float> scores, std::int64_t n, std::int64_t sinks, std::int64_t recent,
                        std::int64_t keep_count, std::span<std::int64_t> out, SelectScratch& scratch,
                        std::span<const std::uint8_t> extra_protected = {}) {
  if (keep_count < 0 || keep_count > n) {
    detail::throw_invalid("select_keep: keep_count (", keep_count, ") must be in [0, n = ", n, "]");
  }
  if (static_cast<std::int64_t>(scores.size()) < n) {
    detail::throw_invalid("select_keep: scores has ", scores.size(), " entries, expected n = ", n);
  }
  if (static_cast<std::int64_t>(out.size()) != keep_count) {
    detail::throw_invalid("select_keep: out has ", out.size(), " entries, expected keep_count = ", keep_count);
  }
  if (!extra_protected.empty() && static_cast<std::int64_t>(extra_protected.size()) != n) {
    detail::throw_invalid("select_keep: extra_protected has ", extra_protected.size(), " flags, expected n = ", n);
  }
  if (sinks < 0 || recent < 0) {
    detail::throw_invalid("select_keep: sinks (", sinks, ") and recent (", recent, ") must be non-negative");
  }

  const std::int64_t sink_end = std::min(sinks, n);
  const std::int64_t recent_begin = std::max(sink_end, n - recent);
  scratch.chosen.assign(static_cast<std::size_t>(n), 0);
  scratch.candidates.clear();
  std::int64_t protected_count = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    const bool is_protected = t < sink_end || t >= recent_begin ||
                              (!extra_protected.empty() && extra_protected[static_cast<std::size_t>(t)] != 0);
    if (is_protected) {
      scratch.chosen[static_cast<std::size_t>(t)] = 1;
      ++protected_count;
    } else {
      scratch.candidates.push_back(t);
    }
  }
  if (protected_count > keep_count) {
    detail::throw_invalid("select_keep: ", protected_count, " protected slots (sinks ", sink_end, ", recent ",
                          n - recent_begin, ", extra ", protected_count - sink_end - (n - recent_begin),
                          ") exceed keep_count ", keep_count, "; raise the budget or shrink the protected ranges");
  }

  const std::int64_t scored = keep_count - protected_count;
  auto& candidates = scratch.candidates;
  const auto before = [&](std::int64_t a, std::int64_t b) { return ranks_before(scores, a, b); };
  if (scored > 0 && scored < static_cast<std::int64_t>(candidates.size())) {
    std::nth_element(candidates.begin(), candidates.begin() + (scored - 1), candidates.end(), before);
  }
  for (std::int64_t i = 0; i < scored; ++i) {
    scratch.chosen[static_cast<std::size_t>(candidates[static_cast<std::size_t>(i)])] = 1;
  }

  std::int64_t written = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    if (scratch.chosen[static_cast<std::size_t>(t)] != 0) out[static_cast<std::size_t>(written++)] = t;
  }
}

}  // namespace kvevict::kernels
