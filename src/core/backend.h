// Internal interface between the API layer (src/core) and the backends.
// The API layer validates everything the host can see; backends may assume
// valid parameters.
#pragma once

#include "qmoe/fused_moe.h"
#include "qmoe/qmoe.h"

namespace qmoe {

namespace cpu {
// Host-side checks of the token counts (the CPU backend can read them).
Status check_counts(const MoeGemmParams& p);
// The exact, simple kernel (the oracle).
Status run_reference(const MoeGemmParams& p);
// The fastest CPU kernel for this machine and phase.
Status run(const MoeGemmParams& p, Phase phase);
// The fused MoE layer and its routing (parameters already checked).
Status fused_moe(const FusedMoeParams& p);
Status route(const FusedMoeParams& p, int32_t* topk_ids, float* topk_weights);
}  // namespace cpu

namespace cuda {
// Launches the grouped product on `device.stream`; returns without waiting.
Status run(const MoeGemmParams& p, Phase phase, const Device& device);
Status fused_moe(const FusedMoeParams& p, const Device& device);
Status route(const FusedMoeParams& p, int32_t* topk_ids, float* topk_weights, const Device& device);
}  // namespace cuda

}  // namespace qmoe
