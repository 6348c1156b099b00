// Entry points of the SIMD levels (one file per level in this folder, each
// compiled with its own instruction-set flags). Each returns false, without
// touching `out`, for a call its kernels do not take (then the portable
// blocked kernel runs it); see can_run() in driver.h for the rule.
#pragma once

#include "qmoe/qmoe.h"

namespace qmoe::cpu::simd {

bool run_avx2(const MoeGemmParams& p, Phase phase);
bool run_avx512(const MoeGemmParams& p, Phase phase);

// Whether the avx512 level computes with vdpbf16ps (true: decode of every
// encoding but fp16 weights, prefill of bf16 activations) or with fp32 FMA:
// a one-time probe picks the faster on this CPU (AMD Zen 4/5: the dot
// product; Intel Sapphire Rapids: FMA); QMOE_CPU_DOT=bf16|fma forces it
// (=i16: the integer codes' decode on vpdpwssd, which CPUs where it issues
// much faster than vdpbf16ps take for int8 at one token). Only meaningful
// where the avx512 level is supported.
bool avx512_uses_bf16_dot();

// Whether the avx512 level's prefill runs on the AMX tile unit (TDPBF16PS;
// fp16 activations from 24 tokens an expert): the CPU has AMX-BF16, the OS
// grants the tile state (asked once, here) and QMOE_CPU_AMX is not 0.
bool avx512_uses_amx();

// Experts with at most this many tokens take the decode (weight-streaming)
// kernel, the others the prefill (panel) kernel, whatever the phase asked.
constexpr int kDecodeMaxTokens = 8;

}  // namespace qmoe::cpu::simd
