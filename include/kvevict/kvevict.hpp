// Umbrella header: the cache, the kernels and every policy.
#pragma once

#include "kvevict/common.hpp"
#include "kvevict/rope.hpp"
#include "kvevict/kv_cache.hpp"
#include "kvevict/observation.hpp"
#include "kvevict/kernels/window_attention.hpp"
#include "kvevict/kernels/temporal.hpp"
#include "kvevict/kernels/spatial.hpp"
#include "kvevict/kernels/reconstruction.hpp"
#include "kvevict/kernels/select.hpp"
#include "kvevict/policies/policy.hpp"
#include "kvevict/policies/full.hpp"
#include "kvevict/policies/streaming_llm.hpp"
