// Tuning knobs of the tensor-core decode kernel (src/cuda/decode.cu), for
// tests and benchmarks. Zero means "the launcher decides". The initial values
// come from the environment: QMOE_DECODE_CB (8 or 16: bytes of a weight row
// each lane loads at once), QMOE_DECODE_WK (1, 2, 4 or 8: warps of a block
// that split K) and QMOE_DECODE_PIPE (1: weights loaded into registers group
// by group, the default for quantized weights; 2: the same with the next
// group's loads in flight during the compute, the default for 16-bit
// weights). A choice the shape does not allow is ignored (CB) or clamped
// (WK). Not thread-safe
// against concurrent launches; not part of the API.
#pragma once

namespace qmoe::cuda {

struct DecodeTuning {
  int chunk_bytes = 0;  // 0, 8 or 16
  int k_warps = 0;      // 0, 1, 2, 4 or 8
  int pipeline = 0;     // 0 (default), 1 registers, 2 registers with prefetch
};

void set_decode_tuning(const DecodeTuning& t);
DecodeTuning decode_tuning();

}  // namespace qmoe::cuda
