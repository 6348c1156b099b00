// Hopper (sm_90a) prefill kernels for bfloat16 activations; see prefill_wgmma.cuh.
// (One translation unit per activation type, so they compile in parallel.)
#include "cuda/prefill_wgmma.cuh"

namespace qmoe::cuda::prefill {
bool launch_wgmma_bf16(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu) {
  return hopper::launch_for_act<ActBF16>(p, stream, status, glu);
}
}  // namespace qmoe::cuda::prefill
