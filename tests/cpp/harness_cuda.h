// Device copies of a test Problem, for the CUDA tests. Tests that include
// this skip (GTEST_SKIP) where no CUDA device is present.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>

#include "harness.h"

namespace qmoe::test {

inline bool cuda_available() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}

#define QMOE_SKIP_WITHOUT_CUDA() \
  if (!::qmoe::test::cuda_available()) GTEST_SKIP() << "no CUDA device on this machine"

#define QMOE_CUDA_OK(expr)                                                         \
  do {                                                                             \
    const cudaError_t qmoe_err = (expr);                                           \
    ASSERT_EQ(qmoe_err, cudaSuccess) << #expr << ": " << cudaGetErrorString(qmoe_err); \
  } while (0)

template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t count = 0;
  DeviceArray() = default;
  explicit DeviceArray(const std::vector<T>& host) : count(host.size()) {
    if (count == 0) return;
    if (cudaMalloc(&ptr, count * sizeof(T)) != cudaSuccess) throw std::runtime_error("cudaMalloc");
    cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr); }
  std::vector<T> download() const {
    std::vector<T> host(count);
    if (count) cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost);
    return host;
  }
  void upload(const std::vector<T>& host) {
    if (count) cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice);
  }
};

// The problem's buffers on the current device; `params` points at them.
struct DeviceProblem {
  DeviceArray<uint16_t> act, scales, zeros, out;
  DeviceArray<uint8_t> weights;
  DeviceArray<int32_t> counts;
  MoeGemmParams params;

  explicit DeviceProblem(const Problem& pr)
      : act(pr.act), scales(pr.scales), zeros(pr.zeros), out(pr.out), weights(pr.weights),
        counts(pr.counts), params(pr.params) {
    params.activations = act.ptr;
    params.weights = weights.ptr;
    params.scales = scales.ptr;
    params.zeros = zeros.ptr;
    params.tokens_per_expert = counts.ptr;
    params.out = out.ptr;
  }
  void poison() {
    if (out.count) cudaMemset(out.ptr, 0xff, out.count * sizeof(uint16_t));  // 0xffff: NaN
  }
};

}  // namespace qmoe::test
