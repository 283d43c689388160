// SinkCLIP: keeps attention sinks, a recent window, and the tokens with the
// best decayed, clipped share of the attention that queries pay to non-sink
// tokens. It is kvevict's own policy: no publication defines it, and every
// default below is a reasoned choice, not a measured one.
//
//   [ sinks | scored ... emergent sink ... scored | recent ... recent ]
//     0 .. sinks-1      best by S / Z, sinks kept     size-recent .. size-1
//
// Three parts, per KV head:
//   (a) Sinks: the first `sinks` slots, plus at most `max_emergent_sinks`
//       emergent sinks: later slots whose mean attention share sigma exceeds
//       `sink_threshold`. An emergent sink stays while sigma exceeds
//       `sink_keep_threshold` (hysteresis). sigma is the mean share over the
//       observation rows at prefill and an EMA with rate `sink_rate` at decode.
//   (b) Score: each query's row has its sink mass m removed and is
//       renormalised by 1 - m, so every query has the same voice over content
//       tokens. Each share is clipped at kappa, so one outlier query cannot
//       make a token permanent. A query head with 1 - m < min_vote_mass does
//       not vote.
//       The group's query heads are combined by mean (or max) over the heads
//       that vote. Per pass: S = decay * S + share and Z = decay * Z + 1 for
//       every slot the query sees, so S / Z is a decayed mean clipped share.
//       A demoted emergent sink restarts at S = kappa * Z.
//   (c) Recent: the last `recent` slots are always kept.
// Eviction keeps sinks, emergent sinks, the recent window, and the best of
// the rest by S / Z (by S when normalize_exposure is false); ties keep the
// later slot.
//
// Parameters (tokens per KV head unless stated; symbol of the definition in
// brackets):
//   budget               [B] required: tokens kept after an eviction;
//                        budget >= sinks + recent + 1, so at least one scored
//                        slot remains
//   sinks                [n_sink] default 4, >= 0: leading tokens always kept
//   sink_threshold       [theta] default 0.1, in (0, 1): mean attention share
//                        that promotes an emergent sink
//   sink_keep_threshold  [theta_keep] default sink_threshold / 2, in
//                        [0, sink_threshold]: share an emergent sink must keep
//   max_emergent_sinks   [max_extra] default 4, >= 0; the policy also keeps at
//                        most budget - sinks - recent - 1 of them
//   observation_window   [w_obs] queries, default 32, >= 1: prefill rows used
//   sink_rate            [alpha_sigma] default 2 / (observation_window + 1),
//                        in (0, 1]: decode-time EMA rate of sigma
//   recent               [w_r] default 32, >= 1: protected recent window
//   clip                 [c_clip] default 8, > 0: the clip level kappa is
//                        clip / B_s (clip_mode budget), clip / n_c (context)
//                        or clip itself (fixed); B_s = budget - sinks -
//                        emergent sinks - recent is the scored budget and n_c
//                        the number of non-sink slots the query sees
//   clip_mode            default budget
//   decay                [lambda] default 0.995, in (0, 1]: per-pass decay of
//                        S and Z (half-life about 138 passes)
//   normalize_exposure   default true: rank by S / Z, not S
//   min_vote_mass        [nu] default 0.01, in [0, 1): a query head whose
//                        non-sink mass 1 - m is below it (or is 0) does not vote
//   gqa_aggregation      default mean: how a group's query heads combine,
//                        for sigma and for the votes
//   slack                default 0: decode-time eviction fires once
//                        size() > budget + slack; prefill cuts at > budget
// With clip >= 1 in fixed mode, min_vote_mass 0, no sinks, no emergent sinks,
// decay 1 and normalize_exposure false, S equals H2O's accumulated attention
// and the kept sets equal H2O's with the same recent window.
//
// Observation: attention rows [n_heads, r, size()]; row i belongs to the
// query of slot size() - r + i and sees slots 0 .. size() - r + i (entries
// beyond are ignored).
//   - prefill (observation.prefill true): the rows of the last prompt
//     queries; the last observation_window of them are used (all when fewer
//     are given). sigma is recomputed from them, the sink set is chosen
//     without hysteresis, then every row votes, oldest first.
//   - decode (observation.prefill false): one row per appended token; each row
//     is one step: sigma EMA, sink update with hysteresis, vote.
// State: 4 cache channels per KV head and slot (score S, exposure Z, sink
// share sigma, emergent-sink flag), moved with every keep; new slots start
// at 0.
// Cost: observe O(n_heads * r * size()); select O(n_kv_heads * size())
// average (std::nth_element) plus the sort of the kept slots.
// Allocation: scratch buffers live in the policy object and grow to the
// largest size() seen; once warm, decode steps do not allocate.
#pragma once

#include "kvevict/kernels/select.hpp"
#include "kvevict/policies/policy.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace kvevict {

struct SinkCLIPConfig {
  // Rule for the clip level kappa (see the header comment).
  enum class ClipMode { budget, context, fixed };
  // Combination of a group's query heads onto their KV head.
  enum class GroupAggregation { mean, max };

  std::int64_t budget = 0;
  std::int64_t sinks = 4;
  float sink_threshold = 0.1f;
  std::optional<float> sink_keep_threshold{};  // unset: sink_threshold / 2
  std::int64_t max_emergent_sinks = 4;
  std::int64_t observation_window = 32;
  std::optional<float> sink_rate{};  // unset: 2 / (observation_window + 1)
  std::int64_t recent = 32;
  float clip = 8.0f;
  ClipMode clip_mode = ClipMode::budget;
  float decay = 0.995f;
  bool normalize_exposure = true;
  float min_vote_mass = 0.01f;
  GroupAggregation gqa_aggregation = GroupAggregation::mean;
  std::int64_t slack = 0;
};

template <class Scalar = float>
class SinkCLIP {
 public:
  using scalar_type = Scalar;
  using ClipMode = SinkCLIPConfig::ClipMode;
  using GroupAggregation = SinkCLIPConfig::GroupAggregation;

  // State channel indices in the cache.
  static constexpr int score_channel = 0;       // S
  static constexpr int exposure_channel = 1;    // Z
  static constexpr int sink_share_channel = 2;  // sigma
  static constexpr int emergent_channel = 3;    // 1 for an emergent sink, else 0

  explicit SinkCLIP(const SinkCLIPConfig& config) : config_(config) {
    if (!config_.sink_keep_threshold) config_.sink_keep_threshold = config_.sink_threshold / 2.0f;
    if (!config_.sink_rate && config_.observation_window >= 1) {
      config_.sink_rate = 2.0f / static_cast<float>(config_.observation_window + 1);
    }
    validate_config();
  }

  // The configuration with every default resolved.
  const SinkCLIPConfig& config() const { return config_; }
  // Emergent sinks a KV head may hold: min(max_emergent_sinks, budget - sinks - recent - 1).
  std::int64_t emergent_cap() const {
    return std::min(config_.max_emergent_sinks, config_.budget - config_.sinks - config_.recent - 1);
  }

  std::string_view name() const { return "sinkclip"; }
  int state_channels() const { return 4; }
  ObservationNeeds needs() const {
    return {.decode_attention = true, .prefill_attention_rows = config_.observation_window, .window_queries = 0};
  }

  bool should_evict(const KVCache<Scalar>& cache, Trigger trigger) const {
    return detail::over_budget(settings(), cache.size(), trigger);
  }

  // Updates sigma, the emergent sinks, S and Z from this pass's rows.
  // Throws std::invalid_argument, before writing anything, when the cache
  // lacks the state channels or the rows are missing, misshapen, more than
  // size() or non-finite.
  void observe(KVCache<Scalar>& cache, const Observation& observation) {
    detail::require_state_channels("SinkCLIP", cache, state_channels());
    detail::require_attention("SinkCLIP", cache, observation, 1);
    if (observation.attention.d1 > cache.size()) {
      detail::throw_invalid("SinkCLIP: attention has ", observation.attention.d1, " rows for ", cache.size(),
                            " cached slots; row i belongs to the query of slot size() - rows + i, so pass at "
                            "most size() rows");
    }
    // Sized before any state changes, so an allocation failure leaves the cache unchanged.
    const auto n = static_cast<std::size_t>(cache.size());
    share_.resize(n);
    head_share_.resize(n);
    contribution_.resize(n);
    chosen_.resize(n);
    candidates_.reserve(n);

    const int groups = observation.n_heads / cache.n_kv_heads();
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      if (observation.prefill) {
        observe_prefill(cache, observation.attention, j, groups);
      } else {
        observe_decode(cache, observation.attention, j, groups);
      }
    }
  }

  // Keeps, per KV head, the sinks, the emergent sinks, the last `recent`
  // slots and the best remaining slots by S / Z (or S); all slots when
  // size() <= budget. Reads only the state; the observation is unused.
  void select(const KVCache<Scalar>& cache, const Observation&, KeepPlan& plan) {
    detail::require_state_channels("SinkCLIP", cache, state_channels());
    const std::int64_t n = cache.size();
    const std::int64_t keep = std::min(n, config_.budget);
    ranking_.resize(static_cast<std::size_t>(n));
    protected_.resize(static_cast<std::size_t>(n));
    plan.reset(cache.n_kv_heads(), keep);
    if (n <= config_.budget) {
      plan.fill_identity();
      return;
    }
    for (int j = 0; j < cache.n_kv_heads(); ++j) {
      const auto score = cache.state(j, score_channel);
      const auto exposure = cache.state(j, exposure_channel);
      const auto flag = cache.state(j, emergent_channel);
      for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) {
        if (config_.normalize_exposure) {
          ranking_[t] = exposure[t] > 0.0f ? score[t] / exposure[t] : 0.0f;
        } else {
          ranking_[t] = score[t];
        }
        protected_[t] = flag[t] != 0.0f ? 1 : 0;
      }
      kernels::select_keep(ranking_, n, config_.sinks, config_.recent, keep, plan.head(j), select_scratch_,
                           protected_);
    }
  }

 private:
  CommonSettings settings() const {
    return {.budget = config_.budget, .sinks = config_.sinks, .window = config_.recent, .slack = config_.slack};
  }

  void validate_config() const {
    const SinkCLIPConfig& c = config_;
    detail::validate_common("SinkCLIP", settings());

    if (c.recent < 1) {
      detail::throw_invalid("SinkCLIP: recent (", c.recent,
                            ") must be at least 1, so a token is never evicted in the step it arrives");
    }
    if (c.budget < c.sinks + c.recent + 1) {
      detail::throw_invalid("SinkCLIP: budget (", c.budget, ") must be at least sinks + recent + 1 (", c.sinks,
                            " + ", c.recent, " + 1), so one scored slot remains");
    }

    if (!(c.sink_threshold > 0.0f && c.sink_threshold < 1.0f)) {
      detail::throw_invalid("SinkCLIP: sink_threshold (", c.sink_threshold, ") must be in (0, 1)");
    }
    const float keep_threshold = *c.sink_keep_threshold;
    if (!(keep_threshold >= 0.0f && keep_threshold <= c.sink_threshold)) {
      detail::throw_invalid("SinkCLIP: sink_keep_threshold (", keep_threshold, ") must be in [0, sink_threshold] = [0, ",
                            c.sink_threshold, "]");
    }
    if (c.max_emergent_sinks < 0) {
      detail::throw_invalid("SinkCLIP: max_emergent_sinks (", c.max_emergent_sinks, ") must be non-negative");
    }

    if (c.observation_window < 1) {
      detail::throw_invalid("SinkCLIP: observation_window (", c.observation_window, ") must be at least 1");
    }
    const float rate = *c.sink_rate;
    if (!(rate > 0.0f && rate <= 1.0f)) {
      detail::throw_invalid("SinkCLIP: sink_rate (", rate, ") must be in (0, 1]");
    }

    if (!(c.clip > 0.0f) || !std::isfinite(c.clip)) {
      detail::throw_invalid("SinkCLIP: clip (", c.clip, ") must be finite and greater than 0");
    }
    if (!(c.decay > 0.0f && c.decay <= 1.0f)) {
      detail::throw_invalid("SinkCLIP: decay (", c.decay, ") must be in (0, 1]");
    }
    if (!(c.min_vote_mass >= 0.0f && c.min_vote_mass < 1.0f)) {
      detail::throw_invalid("SinkCLIP: min_vote_mass (", c.min_vote_mass, ") must be in [0, 1)");
    }
  }

  // Prefill: sigma from the last observation_window rows, sinks without
  // hysteresis, then one vote per row, oldest first.
  void observe_prefill(KVCache<Scalar>& cache, const Tensor3View& rows, int j, int groups) {
    const std::int64_t n = cache.size();
    const std::int64_t used = std::min(rows.d1, config_.observation_window);
    const std::int64_t first_row = rows.d1 - used;
    const std::int64_t first_slot = n - used;  // slot of the first used row's query

    std::fill(share_.begin(), share_.end(), 0.0f);
    for (int member = 0; member < groups; ++member) {
      const std::int64_t q = static_cast<std::int64_t>(j) * groups + member;
      std::fill(head_share_.begin(), head_share_.end(), 0.0f);
      for (std::int64_t i = 0; i < used; ++i) {
        const auto row = rows.row(q, first_row + i);
        const std::int64_t visible = first_slot + i + 1;
        for (std::int64_t t = 0; t < visible; ++t) head_share_[static_cast<std::size_t>(t)] += row[static_cast<std::size_t>(t)];
      }
      combine_heads(member, groups, 1.0f / static_cast<float>(used));
    }
    std::copy(share_.begin(), share_.end(), cache.state(j, sink_share_channel).begin());

    const std::int64_t emergent = update_sinks(cache, j, false);
    for (std::int64_t i = 0; i < used; ++i) vote(cache, rows, j, groups, first_row + i, first_slot + i + 1, emergent);
  }

  // Decode: each row is one step (sigma EMA, sink update with hysteresis, vote).
  void observe_decode(KVCache<Scalar>& cache, const Tensor3View& rows, int j, int groups) {
    const std::int64_t n = cache.size();
    const float rate = *config_.sink_rate;
    const auto sigma = cache.state(j, sink_share_channel);
    for (std::int64_t i = 0; i < rows.d1; ++i) {
      const std::int64_t visible = n - rows.d1 + i + 1;
      std::fill(share_.begin(), share_.end(), 0.0f);
      for (int member = 0; member < groups; ++member) {
        const auto row = rows.row(static_cast<std::int64_t>(j) * groups + member, i);
        for (std::int64_t t = 0; t < visible; ++t) head_share_[static_cast<std::size_t>(t)] = row[static_cast<std::size_t>(t)];
        for (std::int64_t t = visible; t < n; ++t) head_share_[static_cast<std::size_t>(t)] = 0.0f;
        combine_heads(member, groups, 1.0f);
      }
      for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) {
        sigma[t] = (1.0f - rate) * sigma[t] + rate * share_[t];
      }
      const std::int64_t emergent = update_sinks(cache, j, true);
      vote(cache, rows, j, groups, i, visible, emergent);
    }
  }

  // Folds head_share_ * scale of group member `member` into share_ (mean or max).
  void combine_heads(int member, int groups, float scale) {
    const bool use_max = config_.gqa_aggregation == GroupAggregation::max;
    for (std::size_t t = 0; t < share_.size(); ++t) {
      const float value = head_share_[t] * scale;
      if (use_max) {
        share_[t] = member == 0 ? value : std::max(share_[t], value);
      } else {
        share_[t] += value;
        if (member == groups - 1) share_[t] /= static_cast<float>(groups);
      }
    }
  }

  // Chooses the emergent sinks of head j from sigma and returns their count.
  // Candidates are slots outside the leading sinks and the recent window with
  // sigma above the promotion threshold, or, with hysteresis, current emergent
  // sinks above the keep threshold. At most emergent_cap() stay, ranked by
  // sigma (ties: the later slot). A demoted sink restarts at S = kappa * Z.
  std::int64_t update_sinks(KVCache<Scalar>& cache, int j, bool hysteresis) {
    const std::int64_t n = cache.size();
    const auto sigma = cache.state(j, sink_share_channel);
    const auto flag = cache.state(j, emergent_channel);
    const std::int64_t begin = std::min(config_.sinks, n);
    const std::int64_t end = n - config_.recent;

    candidates_.clear();
    for (std::int64_t t = begin; t < end; ++t) {
      const auto s = static_cast<std::size_t>(t);
      const float threshold =
          hysteresis && flag[s] != 0.0f ? *config_.sink_keep_threshold : config_.sink_threshold;
      if (sigma[s] > threshold) candidates_.push_back(t);
    }
    const auto cap = static_cast<std::size_t>(emergent_cap());
    if (candidates_.size() > cap) {
      const auto before = [&](std::int64_t a, std::int64_t b) {
        return kernels::ranks_before(std::span<const float>(sigma.data(), sigma.size()), a, b);
      };
      std::nth_element(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(cap),
                       candidates_.end(), before);
      candidates_.resize(cap);
    }

    std::fill(chosen_.begin(), chosen_.end(), std::uint8_t{0});
    for (const std::int64_t t : candidates_) chosen_[static_cast<std::size_t>(t)] = 1;
    const auto emergent = static_cast<std::int64_t>(candidates_.size());

    const auto score = cache.state(j, score_channel);
    const auto exposure = cache.state(j, exposure_channel);
    // A demoted sink had no votes while it was a sink; it restarts at the clip
    // level that a query seeing every slot would use.
    const float kappa = clip_level(emergent, n - begin - emergent);
    for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) {
      if (flag[t] != 0.0f && chosen_[t] == 0) score[t] = kappa * exposure[t];
      flag[t] = chosen_[t] != 0 ? 1.0f : 0.0f;
    }
    return emergent;
  }

  // kappa for a query that sees `content` non-sink slots.
  float clip_level(std::int64_t emergent, std::int64_t content) const {
    switch (config_.clip_mode) {
      case ClipMode::budget:
        return config_.clip /
               static_cast<float>(config_.budget - config_.sinks - emergent - config_.recent);
      case ClipMode::context:
        return content > 0 ? config_.clip / static_cast<float>(content) : config_.clip;
      case ClipMode::fixed:
        break;
    }
    return config_.clip;
  }

  // One query row's vote for head j: per voting query head, the clipped
  // share of the non-sink mass; combined over the voting heads; then decay
  // S and Z of every slot and add to the `visible` slots the row sees.
  void vote(KVCache<Scalar>& cache, const Tensor3View& rows, int j, int groups, std::int64_t row_index,
            std::int64_t visible, std::int64_t emergent) {
    const std::int64_t n = cache.size();
    const auto flag = cache.state(j, emergent_channel);
    const auto is_sink = [&](std::int64_t t) {
      return t < config_.sinks || flag[static_cast<std::size_t>(t)] != 0.0f;
    };
    std::int64_t content = 0;
    for (std::int64_t t = 0; t < visible; ++t) content += is_sink(t) ? 0 : 1;
    const float kappa = clip_level(emergent, content);
    const bool use_max = config_.gqa_aggregation == GroupAggregation::max;

    std::fill(contribution_.begin(), contribution_.begin() + visible, 0.0f);
    int voters = 0;
    for (int member = 0; member < groups; ++member) {
      const auto row = rows.row(static_cast<std::int64_t>(j) * groups + member, row_index);
      double sink_mass = 0.0;
      for (std::int64_t t = 0; t < visible; ++t) {
        if (is_sink(t)) sink_mass += row[static_cast<std::size_t>(t)];
      }
      const double rest = 1.0 - sink_mass;
      if (rest <= 0.0 || rest < static_cast<double>(config_.min_vote_mass)) continue;
      ++voters;
      for (std::int64_t t = 0; t < visible; ++t) {
        if (is_sink(t)) continue;
        const auto s = static_cast<std::size_t>(t);
        const float clipped = std::min(static_cast<float>(row[s] / rest), kappa);
        contribution_[s] = use_max ? std::max(contribution_[s], clipped) : contribution_[s] + clipped;
      }
    }
    if (!use_max && voters > 1) {
      for (std::int64_t t = 0; t < visible; ++t) contribution_[static_cast<std::size_t>(t)] /= static_cast<float>(voters);
    }

    const auto score = cache.state(j, score_channel);
    const auto exposure = cache.state(j, exposure_channel);
    if (config_.decay != 1.0f) {
      for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) {
        score[t] *= config_.decay;
        exposure[t] *= config_.decay;
      }
    }
    for (std::size_t t = 0; t < static_cast<std::size_t>(visible); ++t) {
      exposure[t] += 1.0f;
      score[t] += contribution_[t];
    }
  }

  SinkCLIPConfig config_;
  std::vector<float> share_;            // [size()] sigma input, combined over the group
  std::vector<float> head_share_;       // [size()] one query head's share
  std::vector<float> contribution_;     // [size()] one row's combined vote
  std::vector<std::uint8_t> chosen_;    // [size()] emergent sinks after an update
  std::vector<std::int64_t> candidates_;
  std::vector<float> ranking_;          // [size()] S / Z or S
  std::vector<std::uint8_t> protected_;  // [size()] emergent-sink flags for select_keep
  kernels::SelectScratch select_scratch_;
};

static_assert(EvictionPolicy<SinkCLIP<float>>);
static_assert(EvictionPolicy<SinkCLIP<Eigen::half>>);

}  // namespace kvevict
