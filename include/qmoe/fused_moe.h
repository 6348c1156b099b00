// The whole MoE layer in one call: routing (top-k) -> grouping of token copies
// by expert -> gate/up grouped product -> SiLU(gate)·up -> down grouped product
// -> weighted sum over the k experts of each token (+ shared experts).
//
// Deterministic: the weighted sum adds each token's k expert outputs in
// routing order, with no floating-point atomics, so the result is bitwise the
// same run to run. CUDA calls are asynchronous on the given stream, never
// synchronise with the host, allocate nothing (the caller provides the
// workspace) and can be captured in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

#include "qmoe/qmoe.h"

namespace qmoe {

// Weights of one grouped product in the ARK layout [E, N, K_packed].
struct ExpertWeights {
  WeightType weight_type = WeightType::int4;
  bool asym = false;
  int64_t group_size = 128;
  const void* weights = nullptr;
  const void* scales = nullptr;  // [E, N, K / group_size], activation dtype
  const void* zeros = nullptr;   // asym only
};

enum class Scoring : int32_t { softmax = 0, sigmoid = 1 };
// How a group of experts is scored for group-limited routing: the largest
// score (DeepSeek-V2) or the sum of the two largest (DeepSeek-V3).
enum class GroupScore : int32_t { max = 0, top2_sum = 1 };

struct RoutingParams {
  Scoring scoring = Scoring::softmax;
  bool renormalize = false;                // divide the k weights by their sum
  const float* correction_bias = nullptr;  // [E] float32: added to scores for the choice only
  int64_t num_groups = 1;                  // experts split into groups ...
  int64_t topk_groups = 1;                 // ... of which this many are kept
  GroupScore group_score = GroupScore::max;
  float scaling_factor = 1.0f;             // applied to the final weights
};

struct FusedMoeParams {
  ActType act_type = ActType::bf16;
  int64_t num_tokens = 0;    // T
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I (per routed expert)
  int64_t num_experts = 0;   // E
  int64_t top_k = 1;

  const void* hidden_states = nullptr;  // [T, H] activation dtype

  // Routing: either router logits [T, E] (float32, or the activation dtype
  // when logits_f32 is false) with `routing`, or precomputed top-k.
  const void* router_logits = nullptr;
  bool logits_f32 = true;
  RoutingParams routing;
  const int32_t* topk_ids = nullptr;    // [T, top_k], each in [0, E)
  const float* topk_weights = nullptr;  // [T, top_k]

  ExpertWeights gate_up;  // [E, 2I, H]: gate rows first, then up rows
  ExpertWeights down;     // [E, H, I]

  // Optional shared expert(s) applied to every token (several shared experts
  // are one expert of their summed width): gate_up [1, 2*Is, H], down [1, H, Is].
  int64_t shared_intermediate = 0;  // Is; 0: none
  ExpertWeights shared_gate_up, shared_down;
  const void* shared_gate = nullptr;  // [H] activation dtype: scale by sigmoid(x·g) (Qwen2-MoE)

  void* out = nullptr;  // [T, H] activation dtype

  // Scratch of at least fused_moe_workspace_size() bytes on the call's
  // device, 256-byte aligned. Required on CUDA; on the CPU null means
  // "allocate internally".
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

size_t fused_moe_workspace_size(const FusedMoeParams& p);
Status fused_moe(const FusedMoeParams& p, const Device& device = {});

// Routing alone: writes topk_ids [T, k] and topk_weights [T, k] from the
// logits, exactly as fused_moe routes. Ties go to the lower expert index.
Status moe_route(const FusedMoeParams& p, int32_t* topk_ids, float* topk_weights,
                 const Device& device = {});

}  // namespace qmoe
