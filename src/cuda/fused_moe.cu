// The fused MoE layer on CUDA: routing, grouping, gather, the two grouped
// products (the decode/prefill kernels of this backend), SiLU·mul, and a
// deterministic weighted sum. Everything is queued on the caller's stream,
// sized from host-known shapes only, and writes only into the workspace and
// `out`: no host synchronisation, no allocation, graph-capturable.
#include <climits>
#include <utility>

#include "core/backend.h"
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
constexpr int kRoutePerLane = (kMaxRoutedExperts + 31) / 32;

template <class Act>
__device__ void route_token_warp(const FusedMoeParams& p, int64_t t, int32_t* ids, float* weights) {
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
  float total = 0.0f, my_w = 0.0f;  // lane j keeps pick j
  int my_id = 0;
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int best_e = INT_MAX;
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < E && (choice[i] > best || best_e == INT_MAX)) { best = choice[i]; best_e = e; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) { best = ob; best_e = oe; }
    }
    float w = 0.0f;
#pragma unroll
    for (int i = 0; i < kRoutePerLane; ++i)
      if (lane + 32 * i == best_e) { w = score[i]; choice[i] = -INFINITY; }
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);  // one lane held it
    if (lane == j) {
      my_w = w;
      my_id = best_e;
    }
    total += w;
  }
  const float norm = (r.renormalize && total > 0.0f) ? r.scaling_factor / total : r.scaling_factor;
  if (lane < k) {
    ids[t * k + lane] = my_id;
    weights[t * k + lane] = my_w * norm;
  }
}

template <class Act>
__global__ void route_warp_kernel(FusedMoeParams p, int32_t* ids, float* weights) {
  const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (t < p.num_tokens) route_token_warp<Act>(p, t, ids, weights);
}

// Counts token copies per expert and gives each copy its row in the
// expert-sorted order, stable (copies of an expert keep their (t, j) order),
// so the layer is deterministic. One block; pairs are taken in chunks of
// 1024; inside a chunk a warp ranks equal ids with __match_any_sync, and
// per-warp counts in shared memory order the warps. Ids outside [0, E) are
// sent to expert 0 and get weight 0 (never out of bounds).
struct GroupArgs {
  const int32_t* ids_in;
  float* weights;
  int64_t pairs;
  int E;
  int64_t T, k;
  int32_t *ids_out, *counts, *slot_of, *token_of, *all_tokens;
};

__device__ void group_pairs(const GroupArgs& a) {
  // No __restrict__ / read-only loads on ids and weights: the ids are sorted
  // in place, and route_group_kernel wrote both earlier in the same kernel.
  const int32_t* ids_in = a.ids_in;
  float* weights = a.weights;
  const int64_t pairs = a.pairs, T = a.T, k = a.k;
  const int E = a.E;
  int32_t* ids_out = a.ids_out;
  int32_t* __restrict__ counts = a.counts;
  int32_t* __restrict__ slot_of = a.slot_of;
  int32_t* __restrict__ token_of = a.token_of;
  int32_t* __restrict__ all_tokens = a.all_tokens;
  extern __shared__ int32_t smem[];
  int32_t* warp_counts = smem;                // [32][E]
  int32_t* running = smem + 32 * E;           // [E] next free row of each expert
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < E; e += blockDim.x) running[e] = 0;
  if (tid == 0) all_tokens[0] = int32_t(T);
  __syncthreads();
  // Totals first, so that `running` can start at each expert's offset.
  for (int64_t i = tid; i < pairs; i += blockDim.x) {
    int32_t id = ids_in[i];
    if (id < 0 || id >= E) {
      id = 0;
      weights[i] = 0.0f;
    }
    ids_out[i] = id;
    atomicAdd(&running[id], 1);
  }
  __syncthreads();
  if (tid == 0) {
    int32_t off = 0;
    for (int e = 0; e < E; ++e) {
      const int32_t c = running[e];
      counts[e] = c;
      running[e] = off;
      off += c;
    }
  }
  __syncthreads();
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    for (int i = tid; i < 32 * E; i += blockDim.x) warp_counts[i] = 0;
    __syncthreads();
    const int64_t i = base + tid;
    const bool live = i < pairs;
    const int32_t id = live ? ids_out[i] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, id);
    const int rank = __popc(peers & ((1u << lane) - 1));
    if (live && rank == 0) warp_counts[warp * E + id] = __popc(peers);
    __syncthreads();
    if (live) {
      int32_t slot = running[id] + rank;
      for (int w = 0; w < warp; ++w) slot += warp_counts[w * E + id];
      slot_of[i] = slot;
      token_of[slot] = int32_t(i / k);
    }
    __syncthreads();
    for (int e = tid; e < E; e += blockDim.x) {
      int32_t add = 0;
      for (int w = 0; w < 32; ++w) add += warp_counts[w * E + e];
      running[e] += add;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kGroupThreads) group_kernel(GroupArgs a) { group_pairs(a); }

// Routing and grouping in one block for a few tokens (one launch less in a
// decode step): warp w routes tokens w, w + 32, ...; then the block groups.
constexpr int64_t kRouteGroupMaxTokens = 64;

template <class Act>
__global__ void __launch_bounds__(kGroupThreads) route_group_kernel(FusedMoeParams p, GroupArgs a) {
  for (int64_t t = threadIdx.x / 32; t < p.num_tokens; t += kGroupThreads / 32)
    route_token_warp<Act>(p, t, const_cast<int32_t*>(a.ids_in), a.weights);
  __syncthreads();  // the block's global writes are visible to it after the barrier
  group_pairs(a);
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

template <class Act>
__global__ void swiglu_kernel(const uint16_t* __restrict__ gu, int64_t rows, int64_t inter,
                              uint16_t* __restrict__ out) {
  const int64_t r = blockIdx.x;
  if (r >= rows) return;
  for (int64_t i = threadIdx.x; i < inter; i += blockDim.x)
    out[r * inter + i] = Act::from_float(silu(Act::to_float(gu[r * 2 * inter + i])) *
                                         Act::to_float(gu[r * 2 * inter + inter + i]));
}

// out[t] = sum_j w[t, j] * y[slot_of[t, j]] in j order (+ shared expert,
// scaled by sigmoid(x·g) when a gate is given). One block a token.
template <class Act>
__global__ void combine_kernel(FusedMoeParams p, const float* __restrict__ weights,
                               const int32_t* __restrict__ slot_of, const uint16_t* __restrict__ y,
                               const uint16_t* __restrict__ shared_out) {
  const int64_t t = blockIdx.x;
  const int64_t H = p.hidden, K = p.top_k;
  __shared__ float shared_scale;
  if (threadIdx.x == 0) shared_scale = 1.0f;
  if (p.shared_intermediate > 0 && p.shared_gate) {
    const auto* x = static_cast<const uint16_t*>(p.hidden_states) + t * H;
    const auto* g = static_cast<const uint16_t*>(p.shared_gate);
    __shared__ float partial[32];
    float dot = 0.0f;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dot += Act::to_float(x[h]) * Act::to_float(g[h]);
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.0f;
      for (int w = 0; w < int(blockDim.x / 32); ++w) s += partial[w];  // fixed order
      shared_scale = 1.0f / (1.0f + expf(-s));
    }
  }
  __syncthreads();
  auto* out = static_cast<uint16_t*>(p.out) + t * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < K; ++j)
      acc += weights[t * K + j] * Act::to_float(y[int64_t(slot_of[t * K + j]) * H + h]);
    if (p.shared_intermediate > 0) acc += shared_scale * Act::to_float(shared_out[t * H + h]);
    out[h] = Act::from_float(acc);
  }
}

unsigned blocks(int64_t n, int per) { return unsigned((n + per - 1) / per); }

}  // namespace

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

  // 1-2. Routing (or the caller's top-k, copied so grouping may sanitise
  // it) and grouping; one kernel for both where a block can route the tokens.
  GroupArgs ga{ws.topk_ids, ws.topk_weights, pairs, int(E), T, K, ws.topk_ids, ws.counts,
               ws.slot_of, ws.token_of, ws.all_tokens};
  const size_t smem = size_t(33 * E) * 4;
  const bool one_kernel = !p.topk_ids && p.routing.num_groups <= 1 && T <= kRouteGroupMaxTokens;
  if (one_kernel) {
    visit_act(p.act_type, [&](auto act) {
      const auto kernel = route_group_kernel<decltype(act)>;
      if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      kernel<<<1, kGroupThreads, smem, stream>>>(p, ga);
    });
    if (Status s = launch_status("routing and grouping kernel"); !s.ok()) return s;
  } else {
    if (p.topk_ids) {
      cudaMemcpyAsync(ws.topk_weights, p.topk_weights, size_t(pairs) * 4, cudaMemcpyDeviceToDevice, stream);
      ga.ids_in = p.topk_ids;
    } else if (Status s = route(p, ws.topk_ids, ws.topk_weights, device); !s.ok()) {
      return s;
    }
    if (smem > 48 * 1024) cudaFuncSetAttribute(group_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    group_kernel<<<1, kGroupThreads, smem, stream>>>(ga);
    if (Status s = launch_status("grouping kernel"); !s.ok()) return s;
  }

  Status status;
  visit_act(p.act_type, [&](auto act) {
    using Act = decltype(act);
    const auto product = [&](const MoeGemmParams& q) { return run(q, choose_phase(q), device); };
    // gate/up product and SiLU(gate)·up into `act_out` [rows, inter]. Where the
    // decode kernel takes the product, SiLU·mul is its epilogue and (rows_of)
    // it reads the token copies through their token index; otherwise the copies
    // are gathered (`gather`), the product written to `gate_up`, and a second
    // kernel applies SiLU·mul.
    const auto gate_up_swiglu = [&](MoeGemmParams q, const int32_t* rows_of, const auto& gather, void* gate_up,
                                    int64_t inter, uint16_t* act_out) -> Status {
      if (choose_phase(q) == Phase::decode) {
        MoeGemmParams f = q;
        f.out = act_out;
        if (Status s = check_operands(f, device.index); !s.ok()) return s;
        Status s;
        if (launch_decode(f, stream, &s, DecodeFusion{rows_of, true})) return s;
      }
      if (Status s = gather(q); !s.ok()) return s;
      q.out = gate_up;
      if (Status s = product(q); !s.ok()) return s;
      swiglu_kernel<Act><<<unsigned(q.total_tokens), 256, 0, stream>>>(static_cast<const uint16_t*>(gate_up),
                                                                       q.total_tokens, inter, act_out);
      return launch_status("swiglu kernel");
    };
    // Routed experts: the token copies, sorted by expert.
    MoeGemmParams q = stage_params(p.act_type, p.gate_up, E, 2 * I, H, pairs, p.hidden_states, ws.counts, ws.gate_up);
    const auto gather_copies = [&](MoeGemmParams& g) {
      gather_kernel<<<unsigned(pairs), 128, 0, stream>>>(static_cast<const uint16_t*>(p.hidden_states), ws.slot_of,
                                                         pairs, K, H, ws.x_sorted);
      g.activations = ws.x_sorted;
      return launch_status("gather kernel");
    };
    if (!(status = gate_up_swiglu(q, ws.token_of, gather_copies, ws.gate_up, I, ws.act)).ok()) return;
    q = stage_params(p.act_type, p.down, E, H, I, pairs, ws.act, ws.counts, ws.expert_out);
    if (!(status = product(q)).ok()) return;
    // Shared experts over every token (no gather: the tokens are in order).
    const int64_t Is = p.shared_intermediate;
    if (Is > 0) {
      q = stage_params(p.act_type, p.shared_gate_up, 1, 2 * Is, H, T, p.hidden_states, ws.all_tokens, ws.shared_gate_up);
      const auto no_gather = [](MoeGemmParams&) { return Status::success(); };
      if (!(status = gate_up_swiglu(q, nullptr, no_gather, ws.shared_gate_up, Is, ws.shared_act)).ok()) return;
      q = stage_params(p.act_type, p.shared_down, 1, H, Is, T, ws.shared_act, ws.all_tokens, ws.shared_out);
      if (!(status = product(q)).ok()) return;
    }
    // 7. Weighted sum.
    combine_kernel<Act><<<unsigned(T), 256, 0, stream>>>(p, ws.topk_weights, ws.slot_of, ws.expert_out, ws.shared_out);
    status = launch_status("combine kernel");
  });
  return status;
}

}  // namespace qmoe::cuda
