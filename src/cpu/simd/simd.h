// Entry points of the SIMD levels (one file per level in this folder, each
// compiled with its own instruction-set flags). Each returns false, without
// touching `out`, for a call its kernels do not take (then the portable
// blocked kernel runs it); see can_run() in driver.h for the rule.
#pragma once

#include "qmoe/qmoe.h"

namespace qmoe::cpu::simd {

bool run_avx2(const MoeGemmParams& p, Phase phase);
bool run_avx512(const MoeGemmParams& p, Phase phase);

// Experts with at most this many tokens take the decode (weight-streaming)
// kernel, the others the prefill (panel) kernel, whatever the phase asked.
constexpr int kDecodeMaxTokens = 8;

}  // namespace qmoe::cpu::simd
