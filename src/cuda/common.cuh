// Helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

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

// Exclusive scan over the threads of the block (warp shuffles + shared
// memory; `scratch` holds one V a warp). Called by every thread.
template <class V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  V x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  V base = 0;
  for (int w = 0; w < warp && w < nwarps; ++w) base += scratch[w];
  __syncthreads();
  return base + x - v;
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

// Programmatic dependent launch (Hopper): a kernel launched with
// `launch_kernel(..., early = true)` may start while the kernel before it on
// the stream still runs, and does its independent prologue (finding its
// expert, loading weights) meanwhile. It must call wait_prior_grid() before
// it reads anything the previous kernel writes (and before it writes
// anything). allow_next_grid() lets the next early-launched kernel start; it
// is called only after the kernel's own wait, so at most two kernels of a
// chain overlap and a kernel's prologue never runs beside the kernel two
// before it. Both are no-ops below sm_90 and for kernels launched normally.
__device__ __forceinline__ void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches `kernel`, early (programmatic dependent launch) when asked.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool early,
                   Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if (early) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Whether early launches pay on this device: sm_90 or newer, unless
// QMOE_PDL=0. Cached per device.
bool early_launch_supported(int device);

inline Status launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::success();
  return Status::runtime(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace qmoe::cuda
