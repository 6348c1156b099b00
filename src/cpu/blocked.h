#pragma once
#include "qmoe/qmoe.h"

namespace qmoe::cpu {
// Portable blocked kernel (no SIMD intrinsics): correct for every encoding.
Status run_blocked(const MoeGemmParams& p);
}  // namespace qmoe::cpu
