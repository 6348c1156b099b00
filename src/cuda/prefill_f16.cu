// Prefill kernels for float16 activations (one translation unit per
// activation type, so the two compile in parallel).
#include "cuda/prefill_mma.cuh"

namespace qmoe::cuda::prefill {
bool launch_f16(const MoeGemmParams& p, cudaStream_t stream, Status* status) {
  return launch_for_act<ActF16>(p, stream, status);
}
}  // namespace qmoe::cuda::prefill
