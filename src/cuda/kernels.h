// The CUDA kernels' launchers. Each takes validated parameters and a stream,
// launches without host synchronisation, and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include "qmoe/qmoe.h"

namespace qmoe::cuda {

// Any shape the contract allows (any N, group size, K); one warp per output
// row; each weight is read once per 8 tokens of an expert.
Status launch_generic(const MoeGemmParams& p, cudaStream_t stream);

// Fast paths. Each returns false (launching nothing) when p is outside the
// shapes it handles, so the caller falls back to launch_generic; otherwise it
// launches and stores the launch status in *status.
//
// The decode kernel also serves the fused layer (src/cuda/fused_moe.cu) with
// two options: activation row r read from row act_rows[r] (the gather of token
// copies, fused), and swiglu: p.n = 2I rows, gate rows first, and p.out is
// [T, I] = SiLU(gate) * up (the activation, fused into the epilogue).
//
// In a chain of kernels (the layer), `early` launches the kernel before the
// previous one ends (common.cuh); `counts_early` says the counts were written
// before that previous kernel, so the prologue may read them and load the
// first weights before waiting for it.
struct DecodeFusion {
  const int32_t* act_rows = nullptr;
  bool swiglu = false;
  bool early = false;
  bool counts_early = false;
};
bool launch_decode(const MoeGemmParams& p, cudaStream_t stream, Status* status, const DecodeFusion& fusion = {});

// The device checks of a grouped product's operands (the run() entry does them).
Status check_operands(const MoeGemmParams& p, int device);
// glu = I > 0 (the fused layer; p.n = 2I, gate rows first): p.out is [T, I] =
// SiLU(gate) * up, on the sm_90 wgmma kernel only (false elsewhere).
bool launch_prefill(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu = 0);
// Whether a prefill call (moe_gemm_prefill, or moe choosing prefill) of
// these sizes is faster on the decode kernel (few tokens an expert); then
// the caller launches that and records it (note_prefill_took_decode).
bool prefill_prefers_decode(const MoeGemmParams& p);
void note_prefill_took_decode();

}  // namespace qmoe::cuda
