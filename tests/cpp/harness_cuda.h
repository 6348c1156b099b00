// Device copies of a test Problem, for the CUDA tests. Tests that include
// this skip (GTEST_SKIP) where no CUDA device is present.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>

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
  // New inputs of the same sizes into the same buffers (graph replays), output poisoned.
  void load(const Problem& next) {
    act.upload(next.act);
    weights.upload(next.weights);
    scales.upload(next.scales);
    zeros.upload(next.zeros);
    counts.upload(next.counts);
    poison();
  }
};

// A CUDA graph captured on a stream of its own from one call of
// `launch(stream)` (which returns a Status), replayed by replay().
struct CapturedGraph {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CapturedGraph() { cudaStreamCreate(&stream); }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  ~CapturedGraph() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
  template <class Launch>
  Status capture(const Launch& launch) {
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess)
      return Status::runtime("cudaStreamBeginCapture failed");
    const Status st = launch(stream);
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    if (!st.ok()) return st;
    if (end != cudaSuccess) return Status::runtime(std::string("capture: ") + cudaGetErrorString(end));
    if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) return Status::runtime("cudaGraphInstantiate failed");
    return Status::success();
  }
  cudaError_t replay() {
    const cudaError_t e = cudaGraphLaunch(exec, stream);
    return e != cudaSuccess ? e : cudaStreamSynchronize(stream);
  }
};

}  // namespace qmoe::test
