// Built when QMOE_CUDA is OFF: the CUDA backend answers that it is absent.
#include "core/backend.h"

namespace qmoe {
bool built_with_cuda() { return false; }
namespace cuda {
Status run(const MoeGemmParams&, Phase, const Device&) {
  return Status::unsupported("device: qmoe was built without CUDA (configure with QMOE_CUDA=ON)");
}
Status fused_moe(const FusedMoeParams&, const Device&) {
  return Status::unsupported("device: qmoe was built without CUDA (configure with QMOE_CUDA=ON)");
}
Status route(const FusedMoeParams&, int32_t*, float*, const Device&) {
  return Status::unsupported("device: qmoe was built without CUDA (configure with QMOE_CUDA=ON)");
}
}  // namespace cuda
}  // namespace qmoe
