// The prefill fast path's rules: which shapes take the tensor-core grouped
// GEMMs -- the Hopper wgmma kernel of prefill_wgmma.cuh on sm_90 devices
// (where the sm_90a code is built in), else the mma.sync kernel of
// prefill_mma.cuh. Everything else returns false (launching nothing) and
// falls back to the decode or generic kernel, which handle any shape.
#include <atomic>
#include <cstdint>

#include "core/env.h"
#include "cuda/kernels.h"

namespace qmoe::cuda {
namespace prefill {
bool launch_f16(const MoeGemmParams& p, cudaStream_t stream, Status* status);
bool launch_bf16(const MoeGemmParams& p, cudaStream_t stream, Status* status);
bool launch_wgmma_f16(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu);
bool launch_wgmma_bf16(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu);

// Switches that restore earlier behaviour (see prefill_mma.cuh).
namespace {
std::atomic<int> g_scales{-1}, g_tiles{-1}, g_wgmma{-1};
std::atomic<int> g_last_path{0};
}  // namespace
int scale_path_override() {
  static const int env = env_is("QMOE_PREFILL_SCALES", "ldg") ? 1 : 0;
  const int o = g_scales.load(std::memory_order_relaxed);
  return o >= 0 ? o : env;
}
int tile_override() {
  static const int env = env_is("QMOE_PREFILL_TILES", "256") ? 1 : env_is("QMOE_PREFILL_TILES", "128") ? 2 : 0;
  const int o = g_tiles.load(std::memory_order_relaxed);
  return o >= 0 ? o : env;
}
void set_overrides(int scales, int tiles) {
  g_scales.store(scales, std::memory_order_relaxed);
  g_tiles.store(tiles, std::memory_order_relaxed);
}
// The Hopper wgmma kernel where the device and shape allow it (default; the
// tests of both kernels passed on an H100, 2026-11-27), or never:
// QMOE_PREFILL_WGMMA=0 (A/B runs in one build). set_wgmma_override (tests)
// takes precedence: 0 off, 1 on, -1 the environment's choice.
constexpr bool kWgmmaDefault = true;
bool wgmma_enabled() {
  static const int env = env_switch("QMOE_PREFILL_WGMMA");
  const int o = g_wgmma.load(std::memory_order_relaxed);
  if (o >= 0) return o != 0;
  return env < 0 ? kWgmmaDefault : env == 1;
}
void set_wgmma_override(int on) { g_wgmma.store(on, std::memory_order_relaxed); }
// The wgmma kernel's item set for quantized weights (prefill_wgmma.cuh,
// item_set): 0 token widths 32 / 96 / 128, 1 wide items, 2
// widths 64 / 96 / 128; -1 the automatic (or environment's) choice (tests
// force each).
namespace {
std::atomic<int> g_item_set{-1};
}  // namespace
int item_set_override() { return g_item_set.load(std::memory_order_relaxed); }
void set_item_set_override(int set) { g_item_set.store(set, std::memory_order_relaxed); }
// The wgmma kernel's split tail (prefill_schedule.h, unit_of_round): -1 the
// automatic (or environment's) choice, 0 never, 1 wherever it applies; a cap
// on its CTAs (0 none), so that the tests' small shapes run several rounds
// and a split last one; and whether the last launch ran in CTA pairs (the
// split tail possible), so the tests check that forcing it took effect.
namespace {
std::atomic<int> g_split{-1}, g_grid{0};
std::atomic<bool> g_pairs{false};
}  // namespace
int split_override() { return g_split.load(std::memory_order_relaxed); }
void set_split_override(int on) { g_split.store(on, std::memory_order_relaxed); }
int grid_override() { return g_grid.load(std::memory_order_relaxed); }
void set_grid_override(int ctas) { g_grid.store(ctas, std::memory_order_relaxed); }
void note_pair_launch(bool pairs) { g_pairs.store(pairs, std::memory_order_relaxed); }
bool last_pair_launch() { return g_pairs.load(std::memory_order_relaxed); }
// The kernel the last prefill call launched: 1 mma.sync, 2 wgmma, 3 the
// decode kernel (prefill_prefers_decode) (tests check that the path they
// force is the one that ran; prefill_bench.py names it).
int last_path() { return g_last_path.load(std::memory_order_relaxed); }

bool launch_wgmma(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu) {
  return p.act_type == ActType::f16 ? launch_wgmma_f16(p, stream, status, glu)
                                    : launch_wgmma_bf16(p, stream, status, glu);
}
}  // namespace prefill

namespace {
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
}  // namespace

// Quantized weights with at most 16 tokens an expert on average: the decode
// kernel (passes of up to 24 tokens, each reading the expert's weights once)
// took 13-45% less time than the wgmma kernel there (decode / prefill
// crossover tables of docs/PERFORMANCE.md, H100 and H200), the rule the fused
// layer's layer_phase follows too; 16-bit weights were faster on the prefill
// kernels at every count. Never where a test or benchmark forces a prefill
// kernel (set_wgmma_override); QMOE_PREFILL_DECODE_TOKENS=N sets the average
// (0: never).
bool prefill_prefers_decode(const MoeGemmParams& p) {
  if (prefill::g_wgmma.load(std::memory_order_relaxed) >= 0) return false;
  static const int64_t tokens = env_int("QMOE_PREFILL_DECODE_TOKENS", 16);
  if (p.weight_type == WeightType::native16 || p.layout != WeightLayout::ENK) return false;
  return p.total_tokens <= tokens * p.num_experts;
}
void note_prefill_took_decode() { prefill::g_last_path.store(3, std::memory_order_relaxed); }

// Rules of the fast path:
//   - ARK layout [E, N, K_packed]; or 16-bit weights in moe_gemm's [E, K, N]
//     layout with N % 8 == 0 (the wgmma kernel's kEKN variant on sm_90a,
//     else the mma.sync kernel's KN variant);
//   - K a multiple of 32 (64 for int2), so every 16-byte chunk of a packed
//     row is whole and k tiles end on 32-element boundaries;
//   - group_size a multiple of 32 (one group per 32-wide k chunk), and
//     (K / 32) * (group_size / 32) < 2^32;
//   - activations and weights 16-byte aligned;
//   - at most 1024 experts (their prefix sums live in shared memory), and
//     T, N, K and the number of work items fit in int32.
// N, T and the per-expert counts are free (tails are clamped and masked).
// Within these rules the wgmma kernel, where enabled, is tried first (it declines devices
// other than sm_90, builds without sm_90a code, and E * N >= 2^31).
bool launch_prefill(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu) {
  const bool ekn = p.layout == WeightLayout::EKN;
  if (p.layout != WeightLayout::ENK && !(ekn && p.weight_type == WeightType::native16)) return false;
  if (p.num_experts < 1 || p.num_experts > 1024) return false;
  if (p.total_tokens < 1 || p.total_tokens > INT32_MAX || p.n > INT32_MAX || p.k > INT32_MAX) return false;
  const int64_t k_align = p.weight_type == WeightType::int2 ? 64 : 32;
  if (p.k % k_align != 0) return false;
  if (p.weight_type != WeightType::native16 && p.group_size % 32 != 0) return false;
  // (the kernels find a k chunk's group by a multiply: chunk_group, prefill_mma.cuh)
  if (p.weight_type != WeightType::native16 && uint64_t(p.k / 32) * uint64_t(p.group_size / 32) >= (uint64_t(1) << 32))
    return false;
  if (!aligned16(p.activations) || !aligned16(p.weights)) return false;
  const int64_t items = (p.n + 127) / 128 * ((p.total_tokens + 63) / 64 + p.num_experts);
  if (items > INT32_MAX) return false;
  if (prefill::wgmma_enabled() && prefill::launch_wgmma(p, stream, status, glu)) {
    prefill::g_last_path.store(2, std::memory_order_relaxed);
    return true;
  }
  if (glu) return false;  // the mma.sync kernel has no SiLU·mul epilogue
  const bool launched = p.act_type == ActType::f16 ? prefill::launch_f16(p, stream, status)
                                                   : prefill::launch_bf16(p, stream, status);
  if (launched) prefill::g_last_path.store(1, std::memory_order_relaxed);
  return launched;
}

}  // namespace qmoe::cuda
