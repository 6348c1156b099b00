// Helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

inline Status launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::success();
  return Status::runtime(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace qmoe::cuda
