// The fused MoE layer on CUDA: routing, grouping, gather, the two grouped
// products (the decode/prefill kernels of this backend), SiLU·mul, and a
// deterministic weighted sum. Everything is queued on the caller's stream,
// sized from host-known shapes only, and writes only into the workspace and
// `out`: no host synchronisation, no allocation, graph-capturable.
#include <algorithm>
#include <atomic>
#include <climits>
#include <type_traits>
#include <utility>

#include "core/backend.h"
#include "core/env.h"
#include "core/fused_moe_workspace.h"
#include "core/routing.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace qmoe::cuda {
namespace {

constexpr int kGroupThreads = 1024;

// One thread a token (E <= 512, k <= 32: a few thousand instructions).
template <class Act>
__global__ void route_kernel(FusedMoeParams p, int32_t* ids, float* weights) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.num_tokens) return;
  const int E = int(p.num_experts);
  const auto logit = [&](int e) {
    return p.logits_f32 ? static_cast<const float*>(p.router_logits)[t * E + e]
                        : Act::to_float(static_cast<const uint16_t*>(p.router_logits)[t * E + e]);
  };
  route_token(logit, p.routing, E, int(p.top_k), ids + t * p.top_k, weights + t * p.top_k);
}

// One warp a token, for routing without expert groups (Qwen, Mixtral,
// DeepSeek-V2-Lite): lane l holds experts l, l+32, ...; softmax through warp
// reductions; each of the k picks is a warp arg-max (ties to the lower
// index). A single thread doing this serially took tens of microseconds for
// E = 128, k = 8 at batch 1 — longer than the expert products.
// kRoutePerLane experts a lane (E <= 32 * kRoutePerLane): the loops run over
// the slots that exist, not over the 16 that E = 512 would need (a decode
// step waits for this warp; H100, batch 1: the route+group kernel took
// 5.7-7.0 us with 16 slots, 3.3-4.3 us this way).
template <class Act, int kRoutePerLane>
__device__ void route_token_warp_n(const FusedMoeParams& p, int64_t t, int32_t* ids, float* weights) {
  const int lane = threadIdx.x % 32;
  const int E = int(p.num_experts), k = int(p.top_k);
  const RoutingParams& r = p.routing;
  float score[kRoutePerLane], choice[kRoutePerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kRoutePerLane; ++i) {
    const int e = lane + 32 * i;
    float x = -INFINITY;
    if (e < E)
      x = p.logits_f32 ? static_cast<const float*>(p.router_logits)[t * E + e]
                       : Act::to_float(static_cast<const uint16_t*>(p.router_logits)[t * E + e]);
    score[i] = x;
    mx = fmaxf(mx, x);
  }
  if (r.scoring == Scoring::softmax) {
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i) {
      score[i] = lane + 32 * i < E ? expf(score[i] - mx) : 0.0f;
      sum += score[i];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.0f / sum;
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i) score[i] *= inv;
  } else {
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i) score[i] = 1.0f / (1.0f + expf(-score[i]));
  }
#pragma unroll
  for (int i = 0; i < kRoutePerLane; ++i) {
    const int e = lane + 32 * i;
    choice[i] = e < E ? score[i] + (r.correction_bias ? r.correction_bias[e] : 0.0f) : -INFINITY;
  }
  // Each pick: every lane's best (ties to the lower index), then the warp's
  // best through two reductions on an order-preserving integer key (largest
  // value, then lowest index among equals), its weight from the lane that holds it.
  float total = 0.0f, my_w = 0.0f;  // lane j keeps pick j
  int my_id = 0;
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY, best_w = 0.0f;
    int best_e = INT_MAX;
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < E && (choice[i] > best || best_e == INT_MAX)) { best = choice[i]; best_e = e; best_w = score[i]; }
    }
    const uint32_t bits = __float_as_uint(best + 0.0f);  // -0 counts as +0, as in a comparison
    const uint32_t key = best_e == INT_MAX || best != best ? 0u : (bits & 0x80000000u ? ~bits : bits | 0x80000000u);
    const uint32_t top = __reduce_max_sync(0xffffffffu, key);
    const int win = int(__reduce_min_sync(0xffffffffu, key == top ? uint32_t(best_e) : 0xffffffffu));
    const float w = __shfl_sync(0xffffffffu, best_w, win & 31);
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i)
      if (lane + 32 * i == win) choice[i] = -INFINITY;
    if (lane == j) {
      my_w = w;
      my_id = win;
    }
    total += w;
  }
  const float norm = (r.renormalize && total > 0.0f) ? r.scaling_factor / total : r.scaling_factor;
  if (lane < k) {
    ids[t * k + lane] = my_id;
    weights[t * k + lane] = my_w * norm;
  }
}

// f(std::integral_constant<int, S>) with S the expert slots a lane of the warp
// routing takes for E experts (E <= 32 S): the one choice of the device
// routine below and of the routing kernel's instantiation on the host.
static_assert(kMaxRoutedExperts <= 16 * 32, "route_token_warp: at most 16 experts a lane");
template <class F>
__host__ __device__ __forceinline__ void visit_route_slots(int64_t E, F&& f) {
  if (E <= 32) f(std::integral_constant<int, 1>{});
  else if (E <= 64) f(std::integral_constant<int, 2>{});
  else if (E <= 128) f(std::integral_constant<int, 4>{});
  else if (E <= 256) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

template <class Act>
__device__ void route_token_warp(const FusedMoeParams& p, int64_t t, int32_t* ids, float* weights) {
  visit_route_slots(p.num_experts,
                    [&](auto slots) { route_token_warp_n<Act, decltype(slots)::value>(p, t, ids, weights); });
}

template <class Act>
__global__ void route_warp_kernel(FusedMoeParams p, int32_t* ids, float* weights) {
  const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (t < p.num_tokens) route_token_warp<Act>(p, t, ids, weights);
}

// The grouping's rule for pair i's expert `id`: ids outside [0, E) go to
// expert 0 with weight 0, so they are never out of bounds; the id is written
// to ids_out (which may be the ids' own array: each pair by its own thread).
__device__ __forceinline__ int32_t settle_pair(int32_t id, int64_t i, float* weights, int32_t* ids_out, int E) {
  if (id < 0 || id >= E) {
    id = 0;
    weights[i] = 0.0f;
  }
  ids_out[i] = id;
  return id;
}

// Pair i's settled expert, -1 past the pairs.
__device__ __forceinline__ int32_t take_pair(const int32_t* ids_in, float* weights, int32_t* ids_out, int64_t i,
                                             int64_t pairs, int E) {
  return i < pairs ? settle_pair(ids_in[i], i, weights, ids_out, E) : -1;
}

// Counts token copies per expert and gives each copy its row in the
// expert-sorted order, stable (copies of an expert keep their (t, j) order),
// so the layer is deterministic. One block (up to 32 warps); warp w owns the
// contiguous pairs [w * per, (w + 1) * per), walked 32 at a time in order.
// Pass 1: __match_any_sync groups equal ids of a step and the lowest lane of
// each group adds the group's size to hist[w][id] (a row per warp: no
// atomics). Then thread e turns column e into the row where warp w's first
// copy of e goes (offset of e from a block scan of the totals, plus copies
// of e in warps before w). Pass 2 walks the same pairs again: a copy goes to
// hist[w][id] + its rank in the step, and the group's leader advances
// hist[w][id]. Ids outside [0, E) are sent to expert 0 with weight 0 (never
// out of bounds). E <= kMaxRoutedExperts (512) <= the block's threads.
static_assert(kMaxRoutedExperts <= 512, "group_pairs: one thread an expert in a block of 512");
struct GroupArgs {
  const int32_t* ids_in;
  float* weights;
  int64_t pairs;
  int E;
  int64_t T, k;
  int32_t *ids_out, *counts, *slot_of, *token_of;
};

__device__ void group_pairs(const GroupArgs& a) {
  // No __restrict__ / read-only loads on ids and weights: the ids are sorted
  // in place, and route_group_kernel wrote both earlier in the same kernel.
  const int32_t* ids_in = a.ids_in;
  float* weights = a.weights;
  int32_t* ids_out = a.ids_out;
  const int64_t pairs = a.pairs;
  const int E = a.E;
  extern __shared__ int32_t smem[];
  int32_t* hist = smem;            // [32][E]
  int32_t* warp_sums = smem + 32 * E;  // [32] block-scan scratch
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, warps = int(blockDim.x / 32);
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t per = (pairs + warps - 1) / warps;
  const int64_t begin = min(pairs, warp * per), end = min(pairs, begin + per);

  for (int i = tid; i < warps * E; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  // Ids are loaded kBatch steps at a time, so that the loads' latency is
  // paid once per batch and not once per step.
  constexpr int kBatch = 4;
  for (int64_t b0 = begin; b0 < end; b0 += 32 * kBatch) {  // pass 1: per-warp counts
    int32_t ids[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = b0 + 32 * u + lane;
      ids[u] = i < end ? ids_in[i] : -1;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = b0 + 32 * u + lane;
      const int32_t id = i < end ? settle_pair(ids[u], i, weights, ids_out, E) : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, id);
      if (id >= 0 && (peers & lanes_below) == 0) hist[warp * E + id] += __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();
  // Column e: totals, exclusive scan over experts, then per-warp starts.
  int32_t total = 0;
  if (tid < E)
    for (int w = 0; w < warps; ++w) total += hist[w * E + tid];
  int32_t incl = total;
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int32_t v = lane < warps ? warp_sums[lane] : 0;
    int32_t x = v;
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    warp_sums[lane] = x - v;  // exclusive: rows before this warp's experts
  }
  __syncthreads();
  if (tid < E) {
    a.counts[tid] = total;
    int32_t row = warp_sums[warp] + incl - total;
    for (int w = 0; w < warps; ++w) {
      const int32_t c = hist[w * E + tid];
      hist[w * E + tid] = row;
      row += c;
    }
  }
  __syncthreads();
  for (int64_t b0 = begin; b0 < end; b0 += 32 * kBatch) {  // pass 2: rows
    int32_t ids[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = b0 + 32 * u + lane;
      ids[u] = i < end ? ids_out[i] : -1;  // this thread's own writes of pass 1
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = b0 + 32 * u + lane;
      const int32_t id = ids[u];
      const unsigned peers = __match_any_sync(0xffffffffu, id);
      if (id >= 0) {
        const int32_t slot = hist[warp * E + id] + __popc(peers & lanes_below);
        a.slot_of[i] = slot;
        a.token_of[slot] = int32_t(i / a.k);
      }
      __syncwarp();
      if (id >= 0 && (peers & lanes_below) == 0) hist[warp * E + id] += __popc(peers);
      __syncwarp();
    }
  }
}

__global__ void __launch_bounds__(kGroupThreads) group_kernel(GroupArgs a) { group_pairs(a); }

// Grouping over many blocks (more tokens than one block routes and groups):
// the same result as group_pairs (stable: copies of an expert keep their
// (t, j) order; ids outside [0, E) go to expert 0 with weight 0), one pair a
// thread, so the work spreads over the SMs instead of walking 32-pair steps
// in one block. Block b takes the `chunk` pairs [b chunk, (b + 1) chunk):
//  1. count_chunk: each pair's rank among the block's copies of its expert
//     (per-warp counts through __match_any_sync, then a prefix over the
//     warps) goes to slot_of, the block's count of each expert to
//     block_counts[b][e]. Its own kernel (group_count_kernel, chunks of 512)
//     for the caller's top-k; with routing it ends the routing kernel
//     (route_count_kernel: one kernel less in the chain).
//  2. group_place_kernel: block b sums block_counts over the blocks before
//     it (per expert) and over all blocks (the counts, scanned into the
//     experts' first rows): slot = first row of the expert + copies in
//     earlier blocks + rank in the block; token_of[slot] = pair / k.
constexpr int kGroupChunk = 512;  // pairs a block of group_count_kernel, one a thread; group_place_kernel's threads

struct GroupBlocksArgs {
  const int32_t* ids_in;
  float* weights;
  int64_t pairs, k;
  int E;
  int chunk;  // pairs a block (<= the counting block's threads)
  int32_t *ids_out, *counts, *slot_of, *token_of, *block_counts;
};

// Step 1 for block b; hist: shared [ceil(chunk / 32)][E].
__device__ void count_chunk(const GroupBlocksArgs& a, int32_t* hist) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, E = a.E;
  const int rows = (a.chunk + 31) / 32;  // the warps that hold pairs
  for (int x = tid; x < rows * E; x += blockDim.x) hist[x] = 0;
  const int64_t i = int64_t(blockIdx.x) * a.chunk + tid;
  const int32_t id = tid < a.chunk ? take_pair(a.ids_in, a.weights, a.ids_out, i, a.pairs, E) : -1;
  const unsigned peers = warp < rows ? __match_any_sync(0xffffffffu, id) : 0u;  // whole warps
  const unsigned below = (1u << lane) - 1u;
  __syncthreads();  // hist is zero
  if (id >= 0 && (peers & below) == 0) hist[warp * E + id] = __popc(peers);  // the warp's row: one writer an id
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) {  // exclusive prefix over the warps; the block's count
    int32_t run = 0;
    for (int w = 0; w < rows; ++w) {
      const int32_t c = hist[w * E + e];
      hist[w * E + e] = run;
      run += c;
    }
    a.block_counts[int64_t(blockIdx.x) * E + e] = run;
  }
  __syncthreads();
  if (id >= 0) a.slot_of[i] = hist[warp * E + id] + __popc(peers & below);
}

__global__ void __launch_bounds__(kGroupChunk) group_count_kernel(GroupBlocksArgs a) {
  extern __shared__ int32_t hist[];
  wait_prior_grid();  // the caller's ids
  allow_next_grid();
  count_chunk(a, hist);
}

// Routing and step 1 in one kernel: warp w of block b routes token b W + w
// (W = the block's warps, route_block_tokens: 8 or 32) into the ids and
// weights (chunk = W k pairs, at most 32 W: the block's threads), then the
// block counts them. Launched normally (the first kernel of the layer); the
// place kernel may start early: it waits for this grid's end before it reads.
constexpr int kRouteCountMaxThreads = 1024;
// One instantiation per expert slots a lane (its own register budget: 1024
// threads leave 64 registers a thread).
template <class Act, int kRoutePerLane>
__global__ void __launch_bounds__(kRouteCountMaxThreads) route_count_kernel(FusedMoeParams p, GroupBlocksArgs a) {
  extern __shared__ int32_t hist[];
  allow_next_grid();
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t < p.num_tokens) route_token_warp_n<Act, kRoutePerLane>(p, t, a.ids_out, a.weights);
  __syncthreads();  // the block's ids and weights (global) are visible to it
  count_chunk(a, hist);
}

__global__ void __launch_bounds__(kGroupChunk) group_place_kernel(GroupBlocksArgs a) {
  // first row of expert e [E], copies in earlier blocks [E], scan scratch
  // [32], the slices' sums [2][kGroupChunk]
  extern __shared__ int32_t sm[];
  int32_t* first = sm;
  int32_t* before = sm + a.E;
  int32_t* scratch = sm + 2 * a.E;
  int32_t* part_total = scratch + 32;
  int32_t* part_before = part_total + kGroupChunk;
  const int tid = threadIdx.x, E = a.E, b = int(blockIdx.x), nb = int(gridDim.x);
  wait_prior_grid();  // block_counts, ranks and ids of the counting kernel
  allow_next_grid();
  // The block's first pair's expert and rank first: their loads overlap the
  // counts' sum (a chunk of up to 1024 pairs takes a second round below).
  const int64_t i0 = int64_t(b) * a.chunk + tid;
  const bool live = tid < a.chunk && i0 < a.pairs;
  const int32_t id = live ? a.ids_out[i0] : 0;
  const int32_t rank = live ? a.slot_of[i0] : 0;
  // The block counts summed by all threads: thread (s, e) = tid (s * E + e)
  // takes slice s of the blocks for expert e (loads coalesced along e, a
  // few independent loads a thread, not one thread walking every block).
  const int slices = max(1, kGroupChunk / E);  // E <= kMaxRoutedExperts <= kGroupChunk
  const int e = tid % E, s = tid / E;
  const int per = (nb + slices - 1) / slices;
  int32_t tot = 0, bef = 0;
  if (s < slices)
    for (int bb = s * per; bb < min(nb, (s + 1) * per); ++bb) {
      const int32_t c = a.block_counts[int64_t(bb) * E + e];
      bef += bb < b ? c : 0;
      tot += c;
    }
  part_total[tid] = tot;
  part_before[tid] = bef;
  __syncthreads();
  int32_t total = 0;  // thread e
  bef = 0;
  if (tid < E)
    for (int j = 0; j < slices; ++j) {
      total += part_total[j * E + tid];
      bef += part_before[j * E + tid];
    }
  const int32_t start = block_exclusive_scan<int32_t>(tid < E ? total : 0, scratch);
  if (tid < E) {
    first[tid] = start;
    before[tid] = bef;
    if (b == 0) a.counts[tid] = total;
  }
  __syncthreads();
  // Pair i of expert e_i with rank r in its block: its row, and the row's token.
  const auto place = [&](int64_t i, int32_t e_i, int32_t r) {
    const int32_t slot = first[e_i] + before[e_i] + r;
    a.slot_of[i] = slot;
    a.token_of[slot] = int32_t(i / a.k);
  };
  if (live) place(i0, id, rank);
  for (int j = tid + kGroupChunk; j < a.chunk; j += kGroupChunk) {
    const int64_t i = int64_t(b) * a.chunk + j;
    if (i >= a.pairs) break;
    place(i, a.ids_out[i], a.slot_of[i]);
  }
}

// Grouping over many blocks (the default; H100: 5-11 us at 4096 tokens
// against 10-68 us for one block); QMOE_GROUP_BLOCKS=0 or the tests' override
// selects the one-block kernel.
std::atomic<int> g_group_blocks{-1};
bool group_blocks_enabled() {
  const int o = g_group_blocks.load(std::memory_order_relaxed);
  if (o >= 0) return o != 0;
  static const bool env = !env_is("QMOE_GROUP_BLOCKS", "0");
  return env;
}

// group_pairs for at most 32 pairs (a decode step of a few tokens), by one
// warp: the same result without the block's [32][E] table and its barriers.
// A copy's row is the number of copies with a lower expert id, or the same id
// and a lower pair index (stable).
__device__ void group_pairs_warp(const GroupArgs& a) {
  const int lane = threadIdx.x & 31, E = a.E;
  const int32_t id = take_pair(a.ids_in, a.weights, a.ids_out, lane, a.pairs, E);
  for (int e = lane; e < E; e += 32) a.counts[e] = 0;
  __syncwarp();  // the zeros before the counts below (same addresses, other lanes)
  const unsigned peers = __match_any_sync(0xffffffffu, id);
  if (id >= 0 && (peers & ((1u << lane) - 1u)) == 0) a.counts[id] = __popc(peers);
  int32_t slot = 0;
#pragma unroll
  for (int l = 0; l < 32; ++l) {
    const int32_t o = __shfl_sync(0xffffffffu, id, l);
    slot += o >= 0 && (o < id || (o == id && l < lane));
  }
  if (id >= 0) {
    a.slot_of[lane] = slot;
    a.token_of[slot] = int32_t(lane / a.k);
  }
}

// Routing and grouping in one block for a few tokens (one launch less in a
// decode step): warp w routes tokens w, w + 32, ...; then the block groups.
constexpr int64_t kRouteGroupMaxTokens = 64;

// 512 threads: routing takes registers that 1024 threads would not have.
constexpr int kRouteGroupThreads = 512;

template <class Act>
__global__ void __launch_bounds__(kRouteGroupThreads) route_group_kernel(FusedMoeParams p, GroupArgs a) {
  wait_prior_grid();  // the router logits come from the kernel before
  allow_next_grid();
  for (int64_t t = threadIdx.x / 32; t < p.num_tokens; t += kRouteGroupThreads / 32)
    route_token_warp<Act>(p, t, const_cast<int32_t*>(a.ids_in), a.weights);
  __syncthreads();  // the block's global writes are visible to it after the barrier
  if (a.pairs <= 32) {
    if (threadIdx.x < 32) group_pairs_warp(a);
  } else {
    group_pairs(a);
  }
}

// x_sorted[slot_of[i]] = x[i / k], 16 bytes at a time where H allows.
__global__ void gather_kernel(const uint16_t* __restrict__ x, const int32_t* __restrict__ slot_of,
                              int64_t pairs, int64_t k, int64_t H, uint16_t* __restrict__ x_sorted) {
  const int64_t i = blockIdx.x;
  if (i >= pairs) return;
  const uint16_t* src = x + (i / k) * H;
  uint16_t* dst = x_sorted + int64_t(slot_of[i]) * H;
  if (H % 8 == 0) {
    for (int64_t h = threadIdx.x; h < H / 8; h += blockDim.x)
      reinterpret_cast<uint4*>(dst)[h] = reinterpret_cast<const uint4*>(src)[h];
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[h] = src[h];
  }
}

// Eight 16-bit values in a 16-byte vector.
template <class Act>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = Act::to_float(uint16_t(w[i] & 0xffffu));
    f[2 * i + 1] = Act::to_float(uint16_t(w[i] >> 16));
  }
}
template <class Act>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = uint32_t(Act::from_float(f[2 * i])) | uint32_t(Act::from_float(f[2 * i + 1])) << 16;
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// out[r, i] = SiLU(gu[r, i]) * gu[r, inter + i]; 16-byte vectors where
// `inter` allows (blockIdx.y strides the row).
template <class Act>
__global__ void swiglu_kernel(const uint16_t* __restrict__ gu, int64_t rows, int64_t inter,
                              uint16_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  if (r >= rows) return;
  const int64_t start = int64_t(blockIdx.y) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.y) * blockDim.x;
  if (inter % 8 == 0) {
    const auto* g = reinterpret_cast<const uint4*>(gu + r * 2 * inter);
    const auto* u = reinterpret_cast<const uint4*>(gu + r * 2 * inter + inter);
    auto* o = reinterpret_cast<uint4*>(out + r * inter);
    for (int64_t i = start; i < inter / 8; i += stride) {
      float a[8], b[8];
      unpack8<Act>(g[i], a);
      unpack8<Act>(u[i], b);
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = silu(a[j]) * b[j];
      o[i] = pack8<Act>(a);
    }
    return;
  }
  for (int64_t i = start; i < inter; i += stride)
    out[r * inter + i] = Act::from_float(silu(Act::to_float(gu[r * 2 * inter + i])) *
                                         Act::to_float(gu[r * 2 * inter + inter + i]));
}

// The shared expert's "counts" (one expert with all T tokens) and, with a
// gate, scale[t] = sigmoid(x_t · g): one warp a token (a block a token kept
// 4096 blocks beside the routing and grouping of a 4096-token layer), its
// lanes' sums reduced in a fixed order. On the side stream, so that the
// shared expert need not wait for routing; the weighted sum reads the scales
// after joining it.
constexpr int kPrologueThreads = 256;

template <class Act>
__global__ void shared_prologue_kernel(FusedMoeParams p, int32_t* count, float* scale) {
  const int64_t t = (int64_t(blockIdx.x) * kPrologueThreads + threadIdx.x) / 32, H = p.hidden;
  const int lane = threadIdx.x % 32;
  if (t == 0 && lane == 0) *count = int32_t(p.num_tokens);
  allow_next_grid();
  if (!p.shared_gate || t >= p.num_tokens) return;
  const auto* x = static_cast<const uint16_t*>(p.hidden_states) + t * H;
  const auto* g = static_cast<const uint16_t*>(p.shared_gate);
  float dot = 0.0f;
  int64_t h0 = 0;  // 16-byte vectors where both rows allow
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0) {
    h0 = H / 8 * 8;
    for (int64_t v = lane; v < H / 8; v += 32) {
      float xf[8], gf[8];
      unpack8<Act>(reinterpret_cast<const uint4*>(x)[v], xf);
      unpack8<Act>(__ldg(reinterpret_cast<const uint4*>(g) + v), gf);
#pragma unroll
      for (int i = 0; i < 8; ++i) dot += xf[i] * gf[i];
    }
  }
  for (int64_t h = h0 + lane; h < H; h += 32) dot += Act::to_float(x[h]) * Act::to_float(g[h]);
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane == 0) scale[t] = 1.0f / (1.0f + expf(-dot));
}

// out[t] = sum_j w[t, j] * y[slot_of[t, j]] in j order (+ shared expert,
// scaled by sigmoid(x·g) when a gate is given). One block a token; 16-byte
// vectors where H and `out` allow (the same arithmetic in the same order).
// No __restrict__ (read-only loads): y comes from the previous kernel of an
// early launch, and must be read after wait_prior_grid (decode.cu's load_act).
template <class Act>
__global__ void combine_kernel(FusedMoeParams p, const float* weights, const int32_t* slot_of, const uint16_t* y,
                               const uint16_t* shared_out, const float* gate_scale) {
  const int64_t t = blockIdx.x;
  const int64_t H = p.hidden, K = p.top_k;
  // Before wait_prior_grid (early launch): only what routing (kernels
  // before the previous one) wrote: rows and weights, through L2 (an
  // earlier call's lines may still be in this SM's L1; see decode.cu's
  // find_active_expert).
  __shared__ int32_t rows[32];  // top_k <= 32
  __shared__ float wts[32];
  if (threadIdx.x < K) {
    rows[threadIdx.x] = __ldcg(slot_of + t * K + threadIdx.x);
    wts[threadIdx.x] = __ldcg(weights + t * K + threadIdx.x);
  }
  __syncthreads();
  wait_prior_grid();  // the experts' outputs
  allow_next_grid();
  const bool shared = p.shared_intermediate > 0;
  const float shared_scale = shared && gate_scale ? gate_scale[t] : 1.0f;  // joined with the side stream
  auto* out = static_cast<uint16_t*>(p.out) + t * H;
  if (H % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    for (int64_t h = threadIdx.x; h < H / 8; h += blockDim.x) {
      float acc[8] = {}, v[8];
      for (int64_t j = 0; j < K; ++j) {
        unpack8<Act>(reinterpret_cast<const uint4*>(y + int64_t(rows[j]) * H)[h], v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += wts[j] * v[i];
      }
      if (shared) {
        unpack8<Act>(reinterpret_cast<const uint4*>(shared_out + t * H)[h], v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += shared_scale * v[i];
      }
      reinterpret_cast<uint4*>(out)[h] = pack8<Act>(acc);
    }
    return;
  }
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < K; ++j) acc += wts[j] * Act::to_float(y[int64_t(rows[j]) * H + h]);
    if (shared) acc += shared_scale * Act::to_float(shared_out[t * H + h]);
    out[h] = Act::from_float(acc);
  }
}

// A second stream and two events per device and host thread, made on first
// use and kept for the process: the shared expert runs beside the routed
// experts (fork and join through events, which a CUDA graph capture records
// as two parallel branches). Where they cannot be made, the shared expert
// runs after the routed experts on the caller's stream.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  bool tried = false;
};

SideStream* side_stream(int device) {
  thread_local SideStream side[64];
  if (device < 0 || device >= 64) return nullptr;
  SideStream& s = side[device];
  if (!s.tried) {
    s.tried = true;
    if (cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming) != cudaSuccess ||
        cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      s.stream = nullptr;
    }
  }
  return s.stream ? &s : nullptr;
}

// The layer's decode/prefill choice, from the crossover measured on H200
// (bench/gpu_bench.py --phase crossover, docs/PERFORMANCE.md): with quantized
// weights the decode kernel takes less time than the wgmma prefill up to 16
// tokens per expert on every row measured (int4 at 16: 8-66% less), and more
// from 32 on most, so decode up to 16 copies per expert on average; 16-bit
// weights keep moe()'s default of 4 (there prefill was faster from 8).
// QMOE_LAYER_DECODE_TOKENS (tokens per expert, for measuring the crossover)
// overrides both.
Phase layer_phase(const MoeGemmParams& q) {
  static const int forced = env_int("QMOE_LAYER_DECODE_TOKENS");
  if (forced > 0) return choose_phase(q, forced);
  return choose_phase(q, q.weight_type == WeightType::native16 ? 4 : 16);
}

// SiLU·mul in the wgmma prefill kernel's epilogue (QMOE_PREFILL_GLU=0: a
// separate kernel after the product, for comparison).
bool prefill_swiglu_epilogue() {
  static const bool on = !env_is("QMOE_PREFILL_GLU", "0");
  return on;
}

// Tokens from which the shared expert forks after grouping (fused_moe below);
// QMOE_SHARED_FORK=early forks it first always, for comparison.
constexpr int64_t kSharedForkLateTokens = 1024;
bool shared_fork_late() {
  static const bool late = !env_is("QMOE_SHARED_FORK", "early");
  return late;
}

unsigned blocks(int64_t n, int per) { return unsigned((n + per - 1) / per); }

// Routing and counting in one kernel (route_count_kernel); QMOE_ROUTE_COUNT=0:
// a kernel each, for comparison.
bool route_count_enabled() {
  static const bool on = !env_is("QMOE_ROUTE_COUNT", "0");
  return on;
}

}  // namespace

// Test hook: 1 grouping over many blocks, 0 one block, -1 the environment's choice.
void set_group_blocks_override(int on) { g_group_blocks.store(on, std::memory_order_relaxed); }

Status route(const FusedMoeParams& p, int32_t* topk_ids, float* topk_weights, const Device& device) {
  if (Status s = check_device(device.index); !s.ok()) return s;
  for (auto [ptr, name] : {std::pair<const void*, const char*>{p.router_logits, "router_logits"},
                           {p.routing.correction_bias, "routing.correction_bias"},
                           {topk_ids, "topk_ids"}, {topk_weights, "topk_weights"}})
    if (Status s = check_pointer(ptr, name, device.index); !s.ok()) return s;
  DeviceScope scope(device.index);
  auto stream = static_cast<cudaStream_t>(device.stream);
  visit_act(p.act_type, [&](auto act) {
    if (p.routing.num_groups <= 1)
      route_warp_kernel<decltype(act)><<<blocks(p.num_tokens * 32, 256), 256, 0, stream>>>(p, topk_ids, topk_weights);
    else  // group-limited routing: one thread a token (the shared serial routine)
      route_kernel<decltype(act)><<<blocks(p.num_tokens, 128), 128, 0, stream>>>(p, topk_ids, topk_weights);
  });
  return launch_status("routing kernel");
}

Status fused_moe(const FusedMoeParams& p, const Device& device) {
  if (Status s = check_device(device.index); !s.ok()) return s;
  for (auto [ptr, name] : {std::pair<const void*, const char*>{p.hidden_states, "hidden_states"},
                           {p.router_logits, "router_logits"},
                           {p.routing.correction_bias, "routing.correction_bias"},
                           {p.topk_ids, "topk_ids"}, {p.topk_weights, "topk_weights"},
                           {p.shared_gate, "shared_gate"}, {p.out, "out"}, {p.workspace, "workspace"}})
    if (Status s = check_pointer(ptr, name, device.index); !s.ok()) return s;
  DeviceScope scope(device.index);
  auto stream = static_cast<cudaStream_t>(device.stream);
  FusedWorkspace ws;
  FusedWorkspace::carve(p, p.workspace, &ws);
  const int64_t T = p.num_tokens, K = p.top_k, H = p.hidden, I = p.intermediate, E = p.num_experts;
  const int64_t pairs = T * K;

  // Early launches (common.cuh) on Hopper: each kernel of the chain starts
  // while the one before ends and does what does not depend on it meanwhile.
  const bool early = early_launch_supported(device.index);

  // 0. The shared expert (no routing needed) forks off to the side stream
  // and runs beside the routed experts; for a few tokens it forks first,
  // beside routing and grouping as well. From kSharedForkLateTokens tokens
  // it forks after grouping: its product is then a persistent prefill kernel
  // that holds every SM it gets, and routing and grouping, which all routed
  // experts wait for, queued behind it (H200, int4, 4096 tokens: Qwen1.5
  // layer 1.35 -> 1.30 ms, DeepSeek 1.37 -> 1.32 ms, their grouping 6.0 ->
  // 5.2 us and 7.9 -> 5.6 us; at 512 tokens the two orders are within 1.5%,
  // at 64 the early fork is 15-23% faster). QMOE_SHARED_FORK=early: always first.
  const int64_t Is = p.shared_intermediate;
  SideStream* side = Is > 0 ? side_stream(device.index) : nullptr;
  Device shared_device = device;
  const auto fork_shared = [&]() -> Status {
    if (side && (cudaEventRecord(side->fork, stream) != cudaSuccess ||
                 cudaStreamWaitEvent(side->stream, side->fork, 0) != cudaSuccess)) {
      cudaGetLastError();
      side = nullptr;
    }
    shared_device.stream = side ? side->stream : device.stream;
    visit_act(p.act_type, [&](auto act) {
      shared_prologue_kernel<decltype(act)><<<p.shared_gate ? blocks(T * 32, kPrologueThreads) : 1u,
                                              kPrologueThreads, 0, static_cast<cudaStream_t>(shared_device.stream)>>>(
          p, ws.all_tokens, ws.shared_scale);
    });
    return launch_status("shared expert prologue kernel");
  };
  const bool fork_late = Is > 0 && T >= kSharedForkLateTokens && shared_fork_late();
  if (Is > 0 && !fork_late)
    if (Status s = fork_shared(); !s.ok()) return s;

  // 1-2. Routing (or the caller's top-k, copied so grouping may sanitise
  // it) and grouping; one kernel for both where a block can route the tokens.
  GroupArgs ga{ws.topk_ids, ws.topk_weights, pairs, int(E), T, K, ws.topk_ids, ws.counts,
               ws.slot_of, ws.token_of};
  const size_t smem = size_t(32 * E + 32) * 4;
  const bool one_kernel = !p.topk_ids && p.routing.num_groups <= 1 && T <= kRouteGroupMaxTokens;
  if (one_kernel) {
    visit_act(p.act_type, [&](auto act) {
      const auto kernel = route_group_kernel<decltype(act)>;
      if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      launch_kernel(kernel, dim3(1), dim3(kRouteGroupThreads), smem, stream, early, p, ga);
    });
    if (Status s = launch_status("routing and grouping kernel"); !s.ok()) return s;
  } else {
    // Routing with the grouping's counting step in its kernel where the
    // routing is one warp a token and grouping spans many blocks.
    const bool route_count = !p.topk_ids && p.routing.num_groups <= 1 && group_blocks_enabled() &&
                             route_count_enabled();
    if (p.topk_ids) {
      cudaMemcpyAsync(ws.topk_weights, p.topk_weights, size_t(pairs) * 4, cudaMemcpyDeviceToDevice, stream);
      ga.ids_in = p.topk_ids;
    } else if (!route_count) {
      if (Status s = route(p, ws.topk_ids, ws.topk_weights, device); !s.ok()) return s;
    }
    if (group_blocks_enabled()) {
      GroupBlocksArgs gb{ga.ids_in, ws.topk_weights, pairs, K, int(E), kGroupChunk, ws.topk_ids, ws.counts,
                         ws.slot_of, ws.token_of, ws.block_counts};
      unsigned nb;
      if (route_count) {
        const int tokens = int(route_block_tokens(size_t(T)));
        gb.chunk = int(tokens * K);  // <= 32 tokens (K <= kMaxTopK = 32)
        nb = blocks(T, tokens);
        const size_t count_smem = size_t(gb.chunk + 31) / 32 * size_t(E) * 4;  // a row a warp of pairs: <= 64 KB
        visit_act(p.act_type, [&](auto act) {
          visit_route_slots(E, [&](auto slots) {
            const auto kernel = route_count_kernel<decltype(act), decltype(slots)::value>;
            if (count_smem > 48 * 1024)
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(count_smem));
            launch_kernel(kernel, dim3(nb), dim3(32 * tokens), count_smem, stream, false, p, gb);
          });
        });
      } else {
        nb = blocks(pairs, kGroupChunk);
        const size_t count_smem = size_t(kGroupChunk / 32) * size_t(E) * 4;  // <= 32 KB (E <= 512)
        launch_kernel(group_count_kernel, dim3(nb), dim3(kGroupChunk), count_smem, stream, early, gb);
      }
      launch_kernel(group_place_kernel, dim3(nb), dim3(kGroupChunk), size_t(2 * E + 32 + 2 * kGroupChunk) * 4,
                    stream, early, gb);
      if (Status s = launch_status("grouping kernels"); !s.ok()) return s;
    } else {
      if (smem > 48 * 1024) cudaFuncSetAttribute(group_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      group_kernel<<<1, kGroupThreads, smem, stream>>>(ga);
      if (Status s = launch_status("grouping kernel"); !s.ok()) return s;
    }
  }
  if (fork_late)
    if (Status s = fork_shared(); !s.ok()) return s;

  Status status;
  visit_act(p.act_type, [&](auto act) {
    using Act = decltype(act);
    // One grouped product; on the decode kernel, launched early where it may
    // be (`counts_early`: its counts come from a kernel before the previous one).
    const auto product = [&](const MoeGemmParams& q, const Device& dev, bool counts_early) -> Status {
      const Phase phase = layer_phase(q);
      if (phase == Phase::decode) {
        if (Status s = check_operands(q, dev.index); !s.ok()) return s;
        Status s;
        if (launch_decode(q, static_cast<cudaStream_t>(dev.stream), &s, DecodeFusion{nullptr, false, early, counts_early}))
          return s;
      }
      return run(q, phase, dev);
    };
    // gate/up product and SiLU(gate)·up into `act_out` [rows, inter]. Where the
    // decode kernel takes the product, SiLU·mul is its epilogue and (rows_of)
    // it reads the token copies through their token index; otherwise the copies
    // are gathered (`gather`) and the prefill kernel takes them, with SiLU·mul
    // as its epilogue on sm_90 (wgmma); elsewhere the product is written to
    // `gate_up` and a second kernel applies SiLU·mul.
    const auto gate_up_swiglu = [&](MoeGemmParams q, const int32_t* rows_of, const auto& gather, void* gate_up,
                                    int64_t inter, uint16_t* act_out, const Device& dev) -> Status {
      const auto st = static_cast<cudaStream_t>(dev.stream);
      if (layer_phase(q) == Phase::decode) {
        MoeGemmParams f = q;
        f.out = act_out;
        if (Status s = check_operands(f, dev.index); !s.ok()) return s;
        Status s;
        if (launch_decode(f, st, &s, DecodeFusion{rows_of, true, early, false})) return s;
      }
      if (Status s = gather(q); !s.ok()) return s;
      if (prefill_swiglu_epilogue()) {  // the prefill kernel with SiLU·mul as its epilogue (sm_90)
        MoeGemmParams f = q;
        f.out = act_out;
        if (Status s = check_operands(f, dev.index); !s.ok()) return s;
        Status s;
        if (launch_prefill(f, st, &s, inter)) return s;
      }
      q.out = gate_up;
      if (Status s = run(q, layer_phase(q), dev); !s.ok()) return s;
      const dim3 grid(unsigned(q.total_tokens), unsigned(std::min<int64_t>(8, (inter / 8 + 255) / 256)));
      swiglu_kernel<Act><<<grid, 256, 0, st>>>(static_cast<const uint16_t*>(gate_up), q.total_tokens, inter,
                                               act_out);
      return launch_status("swiglu kernel");
    };
    // Shared experts over every token (no gather: the tokens are in order).
    if (Is > 0) {
      MoeGemmParams q = stage_params(p.act_type, p.shared_gate_up, 1, 2 * Is, H, T, p.hidden_states, ws.all_tokens,
                                     ws.shared_gate_up);
      const auto no_gather = [](MoeGemmParams&) { return Status::success(); };
      if (!(status = gate_up_swiglu(q, nullptr, no_gather, ws.shared_gate_up, Is, ws.shared_act, shared_device)).ok())
        return;
      q = stage_params(p.act_type, p.shared_down, 1, H, Is, T, ws.shared_act, ws.all_tokens, ws.shared_out);
      if (!(status = product(q, shared_device, true)).ok()) return;
    }
    // Routed experts: the token copies, sorted by expert.
    MoeGemmParams q = stage_params(p.act_type, p.gate_up, E, 2 * I, H, pairs, p.hidden_states, ws.counts, ws.gate_up);
    const auto gather_copies = [&](MoeGemmParams& g) {
      gather_kernel<<<unsigned(pairs), 128, 0, stream>>>(static_cast<const uint16_t*>(p.hidden_states), ws.slot_of,
                                                         pairs, K, H, ws.x_sorted);
      g.activations = ws.x_sorted;
      return launch_status("gather kernel");
    };
    if (!(status = gate_up_swiglu(q, ws.token_of, gather_copies, ws.gate_up, I, ws.act, device)).ok()) return;
    q = stage_params(p.act_type, p.down, E, H, I, pairs, ws.act, ws.counts, ws.expert_out);
    if (!(status = product(q, device, true)).ok()) return;
    // Join the shared expert's branch, then the weighted sum.
    if (side && (cudaEventRecord(side->join, side->stream) != cudaSuccess ||
                 cudaStreamWaitEvent(stream, side->join, 0) != cudaSuccess)) {
      status = launch_status("joining the shared expert's stream");
      if (status.ok()) status = Status::runtime("joining the shared expert's stream failed");
      return;
    }
    const float* gate_scale = Is > 0 && p.shared_gate ? ws.shared_scale : nullptr;
    launch_kernel(combine_kernel<Act>, dim3(unsigned(T)), dim3(256), 0, stream, early, p,
                  static_cast<const float*>(ws.topk_weights), static_cast<const int32_t*>(ws.slot_of),
                  static_cast<const uint16_t*>(ws.expert_out), static_cast<const uint16_t*>(ws.shared_out),
                  gate_scale);
    status = launch_status("combine kernel");
  });
  return status;
}

}  // namespace qmoe::cuda
