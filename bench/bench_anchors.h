// Anchors for qmoe-bench, measured in the same run as the rows they judge,
// and the timing loops for the CPU and the CUDA backends.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qmoe/qmoe.h"

namespace qmoe::bench {

struct Anchors {
  std::string device_name;
  double bandwidth_gbps = 0;  // CPU: all-threads read; CUDA: device copy, read + written
  std::string bandwidth_what;
  double peak_gflops = 0;     // CPU: the prefill instruction's register-loop peak; CUDA: dense bf16 cuBLAS 8192^3
  std::string peak_what;

  // Floor of a row: the larger of its bytes over the bandwidth and its
  // operations over the peak.
  double floor_ms(double bytes, double flops) const;
  std::string describe() const;
};

Anchors measure_cpu_anchors(ActType act);  // bench/cpu_anchors.h measures them
Anchors measure_cuda_anchors();
int cuda_device_count();

struct Timing {
  Status status;
  double ms = 0;  // median
  int runs = 0;
};

// Times the call on the CPU: median of repeated runs (at least 3, up to 20,
// within a few seconds a row). p.out receives the last run's output.
Timing time_cpu(const MoeGemmParams& p, Phase phase, bool quick);
// Copies the problem to the GPU (rotating several copies so that the L2
// cannot hold them), times CUDA-graph replays with events, and copies the
// output back into `out`.
Timing time_cuda(const MoeGemmParams& p, Phase phase, std::vector<uint16_t>& out, bool quick);

}  // namespace qmoe::bench
