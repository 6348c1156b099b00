// The prefill fast path's rules: which shapes take the tensor-core grouped
// GEMM of prefill_mma.cuh. Everything else returns false (launching nothing)
// and falls back to the decode or generic kernel, which handle any shape.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/kernels.h"

namespace qmoe::cuda {
namespace prefill {
bool launch_f16(const MoeGemmParams& p, cudaStream_t stream, Status* status);
bool launch_bf16(const MoeGemmParams& p, cudaStream_t stream, Status* status);

// Switches that restore earlier behaviour (see prefill_mma.cuh).
namespace {
std::atomic<int> g_scales{-1}, g_tiles{-1};
int env_choice(const char* name, const char* a, int va, const char* b, int vb) {
  const char* v = std::getenv(name);
  if (v && a && std::strcmp(v, a) == 0) return va;
  if (v && b && std::strcmp(v, b) == 0) return vb;
  return 0;
}
}  // namespace
int scale_path_override() {
  static const int env = env_choice("QMOE_PREFILL_SCALES", "ldg", 1, nullptr, 0);
  const int o = g_scales.load(std::memory_order_relaxed);
  return o >= 0 ? o : env;
}
int tile_override() {
  static const int env = env_choice("QMOE_PREFILL_TILES", "256", 1, "128", 2);
  const int o = g_tiles.load(std::memory_order_relaxed);
  return o >= 0 ? o : env;
}
void set_overrides(int scales, int tiles) {
  g_scales.store(scales, std::memory_order_relaxed);
  g_tiles.store(tiles, std::memory_order_relaxed);
}
}  // namespace prefill

namespace {
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
}  // namespace

// Rules of the fast path:
//   - ARK layout [E, N, K_packed] (the [E, K, N] moe_gemm layout: not yet);
//   - K a multiple of 32 (64 for int2), so every 16-byte chunk of a packed
//     row is whole and k tiles end on 32-element boundaries;
//   - group_size a multiple of 32 (one group per 32-wide k chunk);
//   - activations and weights 16-byte aligned;
//   - at most 1024 experts (their prefix sums live in shared memory), and
//     T, N, K and the number of work items fit in int32.
// N, T and the per-expert counts are free (tails are clamped and masked).
bool launch_prefill(const MoeGemmParams& p, cudaStream_t stream, Status* status) {
  if (p.layout != WeightLayout::ENK) return false;
  if (p.num_experts < 1 || p.num_experts > 1024) return false;
  if (p.total_tokens < 1 || p.total_tokens > INT32_MAX || p.n > INT32_MAX || p.k > INT32_MAX) return false;
  const int64_t k_align = p.weight_type == WeightType::int2 ? 64 : 32;
  if (p.k % k_align != 0) return false;
  if (p.weight_type != WeightType::native16 && p.group_size % 32 != 0) return false;
  if (!aligned16(p.activations) || !aligned16(p.weights)) return false;
  const int64_t items = (p.n + 127) / 128 * ((p.total_tokens + 63) / 64 + p.num_experts);
  if (items > INT32_MAX) return false;
  return p.act_type == ActType::f16 ? prefill::launch_f16(p, stream, status)
                                    : prefill::launch_bf16(p, stream, status);
}

}  // namespace qmoe::cuda
