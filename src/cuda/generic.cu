// The general CUDA path: correct for every shape the contract allows, used
// where a fast path's alignment rules are not met. One warp computes one
// output row n of one expert for up to kTok tokens at a time, so each weight
// is decoded once per kTok tokens; lanes stride over K and reduce with
// shuffles.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qmoe::cuda {
namespace {

constexpr int kWarps = 8;  // rows per block
constexpr int kTok = 8;    // tokens decoded per pass over a row

template <class Act, class Enc>
__global__ void __launch_bounds__(kWarps * 32)
generic_kernel(MoeGemmParams p) {
  const int e = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t T = p.total_tokens, N = p.n, K = p.k;
  const auto* counts = p.tokens_per_expert;
  auto* out = static_cast<uint16_t*>(p.out);

  // Rows no expert covers (counts summing to less than T) are written as 0.
  if (e == 0) {
    const int64_t covered = covered_rows(counts, int(p.num_experts), T);
    for (int64_t i = covered * N + (int64_t(blockIdx.x) * blockDim.x + threadIdx.x); i < T * N;
         i += int64_t(gridDim.x) * blockDim.x)
      out[i] = 0;
  }

  int64_t t0, t1;
  expert_range(counts, e, T, t0, t1);
  const int64_t n = int64_t(blockIdx.x) * kWarps + warp;
  if (t0 >= t1 || n >= N) return;

  const bool kn = p.layout == WeightLayout::EKN;
  const int64_t rb = row_bytes<Enc>(K);
  const auto* w = static_cast<const uint8_t*>(p.weights);
  const uint8_t* row = kn ? w + int64_t(e) * K * N * 2 : w + (int64_t(e) * N + n) * rb;
  const auto* scales = static_cast<const uint16_t*>(p.scales);
  const auto* zeros = static_cast<const uint16_t*>(p.zeros);
  const int64_t gs = Enc::kScaled ? p.group_size : K;
  const int64_t groups = K / gs;
  const auto* act = static_cast<const uint16_t*>(p.activations);

  for (int64_t tb = t0; tb < t1; tb += kTok) {
    const int nt = int(min(int64_t(kTok), t1 - tb));
    float acc[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) acc[j] = 0.0f;
    for (int64_t k = lane; k < K; k += 32) {
      float v = Enc::value(Enc::code(row, kn ? k * N + n : k));
      if constexpr (Enc::kScaled) {
        const int64_t g = (int64_t(e) * N + n) * groups + k / gs;
        if constexpr (Enc::kAsym) v -= Act::to_float(zeros[g]);
        v *= Act::to_float(scales[g]);
      }
#pragma unroll
      for (int j = 0; j < kTok; ++j)
        if (j < nt) acc[j] += Act::to_float(act[(tb + j) * K + k]) * v;
    }
    const float cs = (kn && scales) ? Act::to_float(scales[int64_t(e) * N + n]) : 1.0f;
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      float s = acc[j];
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0 && j < nt) out[(tb + j) * N + n] = Act::from_float(s * cs);
    }
  }
}

}  // namespace

Status launch_generic(const MoeGemmParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned((p.n + kWarps - 1) / kWarps), unsigned(p.num_experts));
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    generic_kernel<decltype(act), decltype(enc)><<<grid, kWarps * 32, 0, stream>>>(p);
  });
  return launch_status("generic MoE kernel launch");
}

}  // namespace qmoe::cuda
