// CUDA backend: device checks and the choice of kernel for a phase.
#include "core/backend.h"
#include "core/env.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qmoe {

bool built_with_cuda() { return true; }

namespace cuda {
Status check_operands(const MoeGemmParams& p, int device) {
  const struct {
    const void* ptr;
    const char* name;
  } args[] = {{p.activations, "activations"}, {p.weights, "weights"},
              {p.scales, "scales"},           {p.zeros, "zeros"},
              {p.tokens_per_expert, "num_tokens_per_expert"}, {p.out, "out"}};
  for (const auto& a : args)
    if (Status s = check_pointer(a.ptr, a.name, device); !s.ok()) return s;
  return Status::success();
}

bool early_launch_supported(int device) {
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0;
    const bool off = env_is("QMOE_PDL", "0");
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      major = 0;
    }
    cached[device] = !off && major >= 9 ? 2 : 1;
  }
  return cached[device] == 2;
}

Status run(const MoeGemmParams& p, Phase phase, const Device& device) {
  if (Status s = check_device(device.index); !s.ok()) return s;
  if (Status s = check_operands(p, device.index); !s.ok()) return s;
  if (p.total_tokens == 0) return Status::success();

  DeviceScope scope(device.index);
  auto stream = static_cast<cudaStream_t>(device.stream);
  Status s;
  // The decode kernel launches early (sm_90, common.cuh) and waits for the
  // previous kernel before it reads anything: its launch and block start
  // overlap the previous kernel's tail (a qmoe kernel's, from its early
  // allow_next_grid(); any other kernel's, as its blocks exit).
  const DecodeFusion early{nullptr, false, early_launch_supported(device.index), false};
  bool fast;
  if (phase == Phase::decode) {
    fast = launch_decode(p, stream, &s, early);
  } else if (prefill_prefers_decode(p) && launch_decode(p, stream, &s, early)) {
    note_prefill_took_decode();
    fast = true;
  } else {
    fast = launch_prefill(p, stream, &s) || launch_decode(p, stream, &s, early);
  }
  if (!fast) s = launch_generic(p, stream);
  return s;
}

}  // namespace cuda
}  // namespace qmoe
