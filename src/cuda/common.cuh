// Helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/encoding.h"

namespace qmoe::cuda {

// Token range [begin, end) of expert e, from the device-side counts, clamped
// to [0, T] so that counts inconsistent with T can never index out of bounds
// (negative counts count as 0). Every thread computes it; E is small, the
// counts sit in L1/L2 after the first block, and no host round trip or extra
// kernel is needed.
__device__ __forceinline__ void expert_range(const int32_t* __restrict__ counts, int e,
                                             int64_t T, int64_t& begin, int64_t& end) {
  int64_t off = 0;
  for (int i = 0; i < e; ++i) off += max(counts[i], 0);
  begin = min(off, T);
  end = min(off + max(counts[e], 0), T);
}

// Sum of all counts (clamped like expert_range), for zero-filling rows that no
// expert covers when the counts sum to less than T.
__device__ __forceinline__ int64_t covered_rows(const int32_t* __restrict__ counts, int E, int64_t T) {
  int64_t off = 0;
  for (int i = 0; i < E; ++i) off += max(counts[i], 0);
  return min(off, T);
}

// A pointer the given device can read: device or managed memory of that
// device (host memory would fault inside a kernel). Null passes. No sync.
inline Status check_pointer(const void* ptr, const char* name, int device) {
  if (!ptr) return Status::success();
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();  // this query's error must not linger for the next launch check
    return Status::invalid(std::string(name) + ": not a CUDA pointer");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return Status::invalid(std::string(name) + ": must be CUDA device memory");
  if (attr.type == cudaMemoryTypeDevice && attr.device != device)
    return Status::invalid(std::string(name) + ": on CUDA device " + std::to_string(attr.device) +
                           ", expected device " + std::to_string(device));
  return Status::success();
}

// Makes `device` current for the scope, restoring the previous one after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
    device_ = device;
  }
  ~DeviceScope() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0, device_ = 0;
};

// The device exists.
inline Status check_device(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status::unsupported("device: no CUDA device is available");
  }
  if (device >= count)
    return Status::invalid("device: CUDA device " + std::to_string(device) + " does not exist");
  return Status::success();
}

inline Status launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::success();
  return Status::runtime(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace qmoe::cuda
