// Round-to-nearest quantizers that produce the layouts of DESIGN.md §2 from
// float weights, and their exact dequantizers. CPU memory only.
//
// sym:  scale = absmax / qmax (127, 7, 1), q = clamp(round(w / scale), qmin, qmax)
// asym: min = min(group min, 0), max = max(group max, 0) (the range holds 0, as
//       AutoRound's RTN; a group of one sign stays representable),
//       scale = (max - min) / (2^bits - 1), zero = clamp(round(-min / scale), 0, 2^bits - 1),
//       q = clamp(round(w / scale) + zero, 0, 2^bits - 1)
// fp8:  scale = absmax / fp8_max (448 e4m3, 57344 e5m2), f = saturating RNE cast of w / scale
// Scales and zeros are stored in the activation dtype; quantization divides by
// the stored (rounded) scale, so dequantize(quantize(w)) is what kernels see.
#pragma once

#include "qmoe/qmoe.h"

namespace qmoe {

struct QuantSpec {
  WeightType weight_type = WeightType::int4;
  bool asym = false;
  ActType act_type = ActType::bf16;  // dtype of scales, zeros and native16 weights
  int64_t group_size = 128;
};

// w: float32 [E, N, K]. Writes qweights [E, N, K_packed] (bytes; 2 bytes an
// element for native16), scales [E, N, K/gs] and zeros [E, N, K/gs] (asym).
// scales/zeros may be null where the encoding has none.
Status quantize(const QuantSpec& spec, int64_t E, int64_t N, int64_t K, const float* w,
                void* qweights, void* scales, void* zeros);

// Inverse: float32 [E, N, K] of exactly the values every kernel multiplies by.
Status dequantize(const QuantSpec& spec, int64_t E, int64_t N, int64_t K, const void* qweights,
                  const void* scales, const void* zeros, float* w);

}  // namespace qmoe
