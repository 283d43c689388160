// LaCache: a ladder-shaped, score-free cache. Each layer keeps a different
// regular subset of the older tokens, staggered from layer to layer, so the
// layers together cover more of the past than any one of them. When the cache
// overflows, the oldest tokens that are still dense are thinned. Once the
// whole cache has been thinned, thinning starts again right after the leading
// tokens, so the oldest tokens become the sparsest.
//
// Paper: Shi et al., "LaCache: Ladder-Shaped KV Caching for Efficient
// Long-Context Modeling of Large Language Models", ICML 2025, arXiv
// 2507.14204. Reference: github.com/GATECH-EIC/LaCache, ppl/lacache/kv_cache.py
// (commit 0f27c33), which is what this header follows.
//
//   [ leading | thinned ...  (cursor) | dense ...                 newest ]
//     0 .. s-1  s .. cursor-1           cursor .. n-1
//
// One call of layer l with n > C, r = n - C tokens to shed:
//   - chunks of Pb consecutive dense tokens right after the cursor are thinned
//     to Pa tokens each: layer l keeps the Pa consecutive tokens starting at
//     offset l mod (R + 1) of every chunk, R = Pb - Pa, so J = ceil(r / R)
//     chunks shed at least r tokens and the cursor moves by J * Pa;
//   - when fewer than L slots would remain between the cursor and C
//     (the end of a sweep), the rest of the sweep is thinned and a second pass
//     thins again from the leading tokens on (a start-over). A call that must
//     shed more than a sweep can folds T sweeps into one pass with chunks of
//     Pb2 = Pb + (T - 1)(Pb - 1) tokens, keeping Pa tokens at stride T.
// A token in a thinned chunk is kept by the layers whose offset covers it;
// with n_layers >= R + 1 every token of a chunk is kept by some layer.
//
// Parameters (tokens per KV head unless stated):
//   capacity  C, required: size after compaction, see the band below
//   sinks     s, default 4: leading tokens always kept
//   span      S, layers, default ceil(n_layers / 2); 1 <= S
//   overlap   O, layers, default 0; 0 <= O < S
//   layer     l, the layer this object serves, in [0, n_layers)
//   n_layers  L, layers of the model, required
// S and O only set the chunk shape: Pb = 1 + ceil((L - S) / (S - O)) tokens
// per chunk and Pa = min(ceil(S / (S - O)), Pb) kept per layer. Validation
// requires R = Pb - Pa >= 1 (otherwise a chunk sheds nothing) and
// C - s - L >= Pa (otherwise a sweep sheds nothing).
//
// Size: at the first compaction C grows once by floor(R / 2), as in the
// reference, so the average size stays near the requested capacity. After
// every compaction C - R' < size() <= C (R' = R for a normal step or a
// start-over of one sweep, Pb2 - Pa after a folded one): the size is not
// exactly C, and eviction fires whenever size() > C (both triggers).
//
// Layers and state: one policy object per layer. The cursor and the adjusted
// capacity are model-level state that the reference advances once per model
// step. Here every layer's object advances its own copy. Every layer stores
// the same number of tokens, so all objects compute the same cursor and
// capacity, and the state still advances once per model step as long as the
// engine compacts every layer at every step (the drivers do). All KV heads of
// a layer keep the same list; layers keep the same count.
//
// Positions: the method assumes the cache_relative position mode (keys stored
// before RoPE and rotated by slot index), as in the reference. The policy
// itself works in both modes.
//
// Observation: none (no attention rows, no queries). State: none in the cache.
// Cost: O(n) index work per compaction and layer; the compaction moves the
// tail after the thinned region.
// Allocation: the plan and one scratch list of slots (used by start-overs)
// reach their largest size after the first start-over; later calls do not
// allocate.
//
// Differences from the reference:
//   - Configurations that can shed nothing are rejected at construction; the
//     reference divides by zero.
//   - A call whose ladder would reach the newest slots throws
//     std::length_error naming the number of tokens to shed and the largest
//     number that fits; the reference silently drops the newest tokens.
//   - In a folded start-over (T >= 2) with Pa >= 2, the reference's layer
//     offset l mod (Pb2 - Pa + 1) lets a layer's ladder reach past its chunk,
//     and in the last chunk it keeps a token of the dense tail twice (layers
//     7, 15, 23, 31 for C = 875, s = 128, S = 9, O = 3, L = 32 and a
//     3500-token prompt). kvevict uses the offset l mod (T * R + 1), which
//     keeps every ladder inside its chunk and equals the reference offset
//     whenever T = 1 or Pa = 1 (every default configuration).
#pragma once

#include "kvevict/policies/policy.hpp"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

namespace kvevict {

struct LaCacheConfig {
  std::int64_t capacity = 0;          // C
  std::int64_t sinks = 4;             // s
  std::optional<std::int64_t> span{}; // S; unset selects ceil(n_layers / 2)
  std::int64_t overlap = 0;           // O
  int layer = 0;                      // l
  int n_layers = 0;                   // L
};

namespace detail {

// Rounds a / b up for b > 0 and any sign of a.
inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

}  // namespace detail

template <class Scalar = float>
class LaCache {
 public:
  using scalar_type = Scalar;

  explicit LaCache(const LaCacheConfig& config) : config_(config) {
    validate_and_derive();
    capacity_ = config_.capacity;
    cursor_ = config_.sinks;
  }

  const LaCacheConfig& config() const { return config_; }
  std::string_view name() const { return "lacache"; }
  int state_channels() const { return 0; }
  ObservationNeeds needs() const { return {}; }

  // Pb: tokens per ladder chunk before thinning.
  std::int64_t chunk_size() const { return chunk_size_; }
  // Pa: tokens each layer keeps of a chunk.
  std::int64_t kept_per_chunk() const { return kept_per_chunk_; }
  // R = Pb - Pa: tokens a chunk sheds in every layer.
  std::int64_t shed_per_chunk() const { return chunk_size_ - kept_per_chunk_; }
  // Current capacity C: the configured one until the first compaction, then
  // that plus floor(R / 2).
  std::int64_t capacity() const { return capacity_; }
  bool capacity_adjusted() const { return adjusted_; }
  // First slot that has not been thinned in the current sweep.
  std::int64_t cursor() const { return cursor_; }

  bool should_evict(const KVCache<Scalar>& cache, Trigger) const { return cache.size() > capacity_; }

  void observe(KVCache<Scalar>&, const Observation&) {}

  // Writes this layer's ladder into `plan` (the same list for every KV head)
  // and advances the cursor. Throws std::length_error, with the cursor and
  // capacity unchanged, when a pass would thin the newest slot.
  void select(const KVCache<Scalar>& cache, const Observation&, KeepPlan& plan) {
    const std::int64_t n = cache.size();
    if (n <= capacity_) {
      plan.reset(cache.n_kv_heads(), n);
      plan.fill_identity();
      return;
    }

    const std::int64_t capacity = adjusted_ ? capacity_ : capacity_ + shed_per_chunk() / 2;
    const std::int64_t shed = n - capacity;
    if (shed <= 0) {
      // Only the one-time adjustment leads here, when n fits in the grown capacity.
      capacity_ = capacity;
      adjusted_ = true;
      plan.reset(cache.n_kv_heads(), n);
      plan.fill_identity();
      return;
    }

    const Step step = plan_step(shed, capacity, cursor_);
    if (!step.fits) throw_too_many(shed, capacity);

    if (step.start_over) first_.resize(static_cast<std::size_t>(step.first_size));
    plan.reset(cache.n_kv_heads(), step.kept);
    write_plan(step, n, plan);

    capacity_ = capacity;
    adjusted_ = true;
    cursor_ = step.next_cursor;
  }

 private:
  // The shape of one call, computed without side effects.
  struct Step {
    bool start_over = false;
    std::int64_t chunks = 0;         // J, or J1 in the first pass of a start-over
    std::int64_t sweeps = 1;         // T: sweeps folded into the second pass
    std::int64_t folded_chunk = 0;   // Pb2
    std::int64_t folded_chunks = 0;  // J2
    std::int64_t first_size = 0;     // slots left after the first pass
    std::int64_t kept = 0;           // slots left after the call
    std::int64_t next_cursor = 0;
    bool fits = true;                // every ladder ends before the newest slot
  };

  void validate_and_derive() {
    const LaCacheConfig& c = config_;
    if (c.n_layers < 1) detail::throw_invalid("LaCache: n_layers (", c.n_layers, ") must be at least 1");
    if (c.layer < 0 || c.layer >= c.n_layers) {
      detail::throw_invalid("LaCache: layer (", c.layer, ") must be in [0, n_layers) = [0, ", c.n_layers, ")");
    }
    if (!config_.span) config_.span = (static_cast<std::int64_t>(c.n_layers) + 1) / 2;
    const std::int64_t layers = c.n_layers;
    const std::int64_t span = *config_.span;
    if (c.capacity < 1) detail::throw_invalid("LaCache: capacity (", c.capacity, ") must be at least 1");
    if (c.sinks < 0) detail::throw_invalid("LaCache: sinks (", c.sinks, ") must be non-negative");
    if (span < 1) detail::throw_invalid("LaCache: span (", span, ") must be at least 1");
    if (c.overlap < 0 || c.overlap >= span) {
      detail::throw_invalid("LaCache: overlap (", c.overlap, ") must be in [0, span) = [0, ", span, ")");
    }

    const std::int64_t step = span - c.overlap;
    chunk_size_ = 1 + detail::ceil_div(layers - span, step);
    kept_per_chunk_ = std::min(detail::ceil_div(span, step), chunk_size_);
    if (chunk_size_ - kept_per_chunk_ < 1) {
      detail::throw_invalid("LaCache: span ", span, " and overlap ", c.overlap, " with n_layers ", layers,
                            " give chunks of Pb = ", chunk_size_, " tokens of which every layer keeps Pa = ",
                            kept_per_chunk_, ", so nothing can be shed; choose span < n_layers with "
                            "1 + ceil((n_layers - span) / (span - overlap)) > ceil(span / (span - overlap)), "
                            "for example span = ceil(n_layers / 2) and overlap 0 (needs n_layers >= 2)");
    }
    if (c.capacity - c.sinks - layers < kept_per_chunk_) {
      detail::throw_invalid("LaCache: capacity (", c.capacity, ") must be at least sinks + n_layers + Pa (",
                            c.sinks, " + ", layers, " + ", kept_per_chunk_,
                            "), otherwise a sweep of the ladder sheds nothing");
    }
  }

  // Follows the reference: a normal step when the rest of the sweep can shed
  // `shed` tokens, otherwise a start-over with T folded sweeps.
  Step plan_step(std::int64_t shed, std::int64_t capacity, std::int64_t cursor) const {
    const std::int64_t sinks = config_.sinks;
    const std::int64_t layers = config_.n_layers;
    const std::int64_t pb = chunk_size_;
    const std::int64_t pa = kept_per_chunk_;
    const std::int64_t r = pb - pa;
    const std::int64_t n = capacity + shed;
    const std::int64_t room = capacity - cursor - layers;  // F, never negative (cursor <= C - L)
    const std::int64_t sweep_rest = (room / pa) * r;       // what the rest of this sweep can shed

    Step step;
    if (shed <= sweep_rest) {
      step.chunks = detail::ceil_div(shed, r);
      step.kept = n - r * step.chunks;
      step.next_cursor = cursor + pa * step.chunks;
      step.fits = cursor + pb * step.chunks < n;
      return step;
    }

    step.start_over = true;
    step.chunks = room / pa;
    step.first_size = n - r * step.chunks;
    const std::int64_t full_sweep = ((capacity - sinks - layers) / pa) * r;  // >= r by validation
    const std::int64_t rest = shed - sweep_rest;
    step.sweeps = detail::ceil_div(rest, full_sweep);
    step.folded_chunk = pb + (step.sweeps - 1) * (pb - 1);
    step.folded_chunks = detail::ceil_div(rest, step.folded_chunk - pa);
    step.kept = step.first_size - (step.folded_chunk - pa) * step.folded_chunks;
    step.next_cursor = sinks + pa * step.folded_chunks;
    step.fits = cursor + pb * step.chunks < n && sinks + step.folded_chunk * step.folded_chunks < step.first_size;
    return step;
  }

  [[noreturn]] void throw_too_many(std::int64_t shed, std::int64_t capacity) const {
    // The shape is not monotone in r, so search down for the largest r that fits.
    std::int64_t largest = shed - 1;
    while (largest > 0 && !plan_step(largest, capacity, cursor_).fits) --largest;
    throw std::length_error(detail::concat(
        "LaCache: this call must shed r = ", shed, " tokens (size ", capacity + shed, ", capacity ", capacity,
        ", cursor ", cursor_, "), and the folded ladder would reach the newest tokens; the largest r that fits is ",
        largest, ". Append at most ", largest, " tokens beyond the capacity before each compaction "
        "(prefill long prompts in chunks and compact after each)"));
  }

  // Writes the slots of `chunks` chunks of `chunk` tokens starting at `start`:
  // in every chunk, kept_per_chunk() slots at `stride` starting at `offset`.
  template <class Out>
  std::size_t write_ladder(Out& out, std::size_t i, std::int64_t start, std::int64_t chunk, std::int64_t chunks,
                           std::int64_t stride, std::int64_t offset) const {
    for (std::int64_t j = 0; j < chunks; ++j) {
      for (std::int64_t k = 0; k < kept_per_chunk_; ++k) out[i++] = start + offset + chunk * j + stride * k;
    }
    return i;
  }

  template <class Out>
  static std::size_t write_range(Out& out, std::size_t i, std::int64_t begin, std::int64_t end) {
    for (std::int64_t s = begin; s < end; ++s) out[i++] = s;
    return i;
  }

  void write_plan(const Step& step, std::int64_t n, KeepPlan& plan) {
    const std::int64_t layer = config_.layer;
    const std::int64_t r = shed_per_chunk();
    const std::int64_t pb = chunk_size_;
    auto head = plan.head(0);

    if (!step.start_over) {
      std::size_t i = write_range(head, 0, 0, cursor_);
      i = write_ladder(head, i, cursor_, pb, step.chunks, 1, layer % (r + 1));
      write_range(head, i, cursor_ + pb * step.chunks, n);
    } else {
      std::size_t i = write_range(first_, 0, 0, cursor_);
      i = write_ladder(first_, i, cursor_, pb, step.chunks, 1, layer % (r + 1));
      write_range(first_, i, cursor_ + pb * step.chunks, n);

      // Second pass: indices into `first_`, mapped through it.
      const std::int64_t sinks = config_.sinks;
      std::size_t k = write_range(head, 0, 0, sinks);
      k = write_ladder(head, k, sinks, step.folded_chunk, step.folded_chunks, step.sweeps,
                       layer % (step.sweeps * r + 1));
      write_range(head, k, sinks + step.folded_chunk * step.folded_chunks, step.first_size);
      for (auto& slot : head) slot = first_[static_cast<std::size_t>(slot)];
    }

    for (int j = 1; j < plan.n_kv_heads(); ++j) std::copy(head.begin(), head.end(), plan.head(j).begin());
  }

  LaCacheConfig config_;
  std::int64_t chunk_size_ = 0;
  std::int64_t kept_per_chunk_ = 0;
  std::int64_t capacity_ = 0;
  std::int64_t cursor_ = 0;
  bool adjusted_ = false;
  std::vector<std::int64_t> first_;  // slots kept by the first pass of a start-over
};

static_assert(EvictionPolicy<LaCache<float>>);
static_assert(EvictionPolicy<LaCache<Eigen::half>>);

}  // namespace kvevict
