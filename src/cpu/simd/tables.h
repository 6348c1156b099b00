// Code values of the weight encodings, evaluated through the encoding traits
// in a file compiled without SIMD flags. The SIMD levels build their decode
// tables (and check their bit tricks) from these, so an encoding's meaning
// stays in src/core/encoding.h only.
#pragma once

#include <cstdint>

#include "qmoe/qmoe.h"

namespace qmoe::cpu::simd {

// values[c] = Enc::value(c) for every code c < 2^bits (at most 256; for
// 16-bit weights nothing is written). Returns the number of codes.
int code_values(ActType act, WeightType w, bool asym, float* values);

}  // namespace qmoe::cpu::simd

namespace qmoe::cpu::simd {
// Monotonic clock in nanoseconds (for the SIMD levels' one-time probes).
int64_t now_ns();
}  // namespace qmoe::cpu::simd
