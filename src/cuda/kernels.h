// The CUDA kernels' launchers. Each takes validated parameters and a stream,
// launches without host synchronisation, and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include "qmoe/qmoe.h"

namespace qmoe::cuda {

// Any shape the contract allows (any N, group size, K); one warp per output
// row; each weight is read once per 8 tokens of an expert.
Status launch_generic(const MoeGemmParams& p, cudaStream_t stream);

// Fast paths. Each returns false (launching nothing) when p is outside the
// shapes it handles, so the caller falls back to launch_generic; otherwise it
// launches and stores the launch status in *status.
bool launch_decode(const MoeGemmParams& p, cudaStream_t stream, Status* status);
bool launch_prefill(const MoeGemmParams& p, cudaStream_t stream, Status* status);

}  // namespace qmoe::cuda
