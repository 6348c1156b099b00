// Placeholder until the tensor-core prefill kernel lands: no shape is handled
// here, so prefill calls take the decode or generic kernel.
#include "cuda/kernels.h"

namespace qmoe::cuda {
bool launch_prefill(const MoeGemmParams&, cudaStream_t, Status*) { return false; }
}  // namespace qmoe::cuda
