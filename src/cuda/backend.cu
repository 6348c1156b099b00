// CUDA backend: device checks and the choice of kernel for a phase.
#include <string>

#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qmoe {

bool built_with_cuda() { return true; }

namespace cuda {
namespace {

// A pointer the given device can read: device or managed memory of that
// device (host memory would fault inside the kernel). No synchronisation.
Status check_pointer(const void* ptr, const char* name, int device) {
  if (!ptr) return Status::success();
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of this query
    return Status::invalid(std::string(name) + ": not a CUDA pointer");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return Status::invalid(std::string(name) + ": must be CUDA device memory");
  if (attr.type == cudaMemoryTypeDevice && attr.device != device)
    return Status::invalid(std::string(name) + ": on CUDA device " + std::to_string(attr.device) +
                           ", expected device " + std::to_string(device));
  return Status::success();
}

}  // namespace

Status run(const MoeGemmParams& p, Phase phase, const Device& device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status::unsupported("device: no CUDA device is available");
  }
  if (device.index >= count)
    return Status::invalid("device: CUDA device " + std::to_string(device.index) + " does not exist");
  const struct {
    const void* ptr;
    const char* name;
  } args[] = {{p.activations, "activations"}, {p.weights, "weights"},
              {p.scales, "scales"},           {p.zeros, "zeros"},
              {p.tokens_per_expert, "num_tokens_per_expert"}, {p.out, "out"}};
  for (const auto& a : args)
    if (Status s = check_pointer(a.ptr, a.name, device.index); !s.ok()) return s;
  if (p.total_tokens == 0) return Status::success();

  int previous = 0;
  cudaGetDevice(&previous);
  if (previous != device.index) cudaSetDevice(device.index);
  auto stream = static_cast<cudaStream_t>(device.stream);
  Status s;
  const bool fast = phase == Phase::decode ? launch_decode(p, stream, &s)
                                           : (launch_prefill(p, stream, &s) ||
                                              launch_decode(p, stream, &s));
  if (!fast) s = launch_generic(p, stream);
  if (previous != device.index) cudaSetDevice(previous);
  return s;
}

}  // namespace cuda
}  // namespace qmoe
