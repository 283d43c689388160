// Full: keeps every token. The no-eviction baseline that every other policy
// is measured against; its cost grows with the sequence.
//
// Observation: none. State: none. Never evicts, so should_evict is always
// false; select returns the identity plan when called directly.
#pragma once

#include "kvevict/policies/policy.hpp"

namespace kvevict {

template <class Scalar = float>
class Full {
 public:
  using scalar_type = Scalar;

  std::string_view name() const { return "full"; }
  int state_channels() const { return 0; }
  ObservationNeeds needs() const { return {}; }
  bool should_evict(const KVCache<Scalar>&, Trigger) const { return false; }
  void observe(KVCache<Scalar>&, const Observation&) {}
  void select(const KVCache<Scalar>& cache, const Observation&, KeepPlan& plan) {
    plan.reset(cache.n_kv_heads(), cache.size());
    plan.fill_identity();
  }
};

static_assert(EvictionPolicy<Full<float>>);
static_assert(EvictionPolicy<Full<Eigen::half>>);

}  // namespace kvevict
