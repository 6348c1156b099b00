// Internal interface between the API layer (src/core) and the backends.
// The API layer validates everything the host can see; backends may assume
// valid parameters.
#pragma once

#include "qmoe/qmoe.h"

namespace qmoe {

namespace cpu {
// Host-side checks of the token counts (the CPU backend can read them).
Status check_counts(const MoeGemmParams& p);
// The exact, simple kernel (the oracle).
Status run_reference(const MoeGemmParams& p);
// The fastest CPU kernel for this machine and phase.
Status run(const MoeGemmParams& p, Phase phase);
}  // namespace cpu

namespace cuda {
// Launches the grouped product on `device.stream`; returns without waiting.
Status run(const MoeGemmParams& p, Phase phase, const Device& device);
}  // namespace cuda

}  // namespace qmoe
