// How fused_moe's workspace is carved, shared by the CPU and CUDA layers.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "qmoe/fused_moe.h"

namespace qmoe {

// Tokens one block of the CUDA layer's routing kernel routes (a warp each)
// and then counts by expert (block_counts has a row a block): 32 from 1024
// tokens (fewer rows for the grouping to sum), 8 below (blocks of 256
// threads: a 1024-thread block waits for a whole free SM, which the shared
// expert's products, forked before routing there, may hold). At most 128
// rows up to 4096 tokens.
inline size_t route_block_tokens(size_t T) { return T >= 1024 ? 32 : 8; }

struct FusedWorkspace {
  int32_t* topk_ids;     // [T*k]
  float* topk_weights;   // [T*k]
  int32_t* counts;       // [E] token copies per expert
  int32_t* all_tokens;   // [1] = T: the "counts" of the shared expert (device side on CUDA)
  int32_t* slot_of;      // [T*k] pair (t*k + j) -> row of the expert-sorted copies
  int32_t* token_of;     // [T*k] row of the expert-sorted copies -> its token t (CUDA)
  uint16_t* x_sorted;    // [T*k, H] token copies sorted by expert
  uint16_t* gate_up;     // [T*k, 2I]
  uint16_t* act;         // [T*k, I] SiLU(gate)·up
  uint16_t* expert_out;  // [T*k, H]
  uint16_t* shared_gate_up;  // [T, 2Is]
  uint16_t* shared_act;      // [T, Is]
  uint16_t* shared_out;      // [T, H]
  int32_t* block_counts;     // [blocks, E] copies of each expert in each block of pairs (CUDA grouping)
  float* shared_scale;       // [T] the shared expert's gate, sigmoid(x·g) (CUDA)

  // Lays the buffers out from `base` (nullptr: only counts the bytes).
  static size_t carve(const FusedMoeParams& p, void* base, FusedWorkspace* ws) {
    const size_t T = size_t(p.num_tokens), K = size_t(p.top_k), H = size_t(p.hidden);
    const size_t I = size_t(p.intermediate), E = size_t(p.num_experts), Is = size_t(p.shared_intermediate);
    size_t off = 0;
    auto take = [&](size_t bytes) {
      void* ptr = base ? static_cast<char*>(base) + off : nullptr;
      off += (bytes + 255) / 256 * 256;
      return ptr;
    };
    FusedWorkspace w{};
    w.topk_ids = static_cast<int32_t*>(take(T * K * 4));
    w.topk_weights = static_cast<float*>(take(T * K * 4));
    w.counts = static_cast<int32_t*>(take(E * 4));
    w.all_tokens = static_cast<int32_t*>(take(4));
    w.slot_of = static_cast<int32_t*>(take(T * K * 4));
    w.token_of = static_cast<int32_t*>(take(T * K * 4));
    w.x_sorted = static_cast<uint16_t*>(take(T * K * H * 2));
    w.gate_up = static_cast<uint16_t*>(take(T * K * 2 * I * 2));
    w.act = static_cast<uint16_t*>(take(T * K * I * 2));
    w.expert_out = static_cast<uint16_t*>(take(T * K * H * 2));
    w.shared_gate_up = static_cast<uint16_t*>(take(T * 2 * Is * 2));
    w.shared_act = static_cast<uint16_t*>(take(T * Is * 2));
    w.shared_out = static_cast<uint16_t*>(take(Is ? T * H * 2 : 0));
    // Blocks of 512 pairs (the caller's top-k) or of route_block_tokens(T) tokens (routing).
    const size_t rbt = route_block_tokens(T);
    const size_t count_blocks = std::max((T * K + 511) / 512, (T + rbt - 1) / rbt);
    w.block_counts = static_cast<int32_t*>(take(count_blocks * E * 4));
    w.shared_scale = static_cast<float*>(take(Is ? T * 4 : 0));
    if (ws) *ws = w;
    return off;
  }
};

// The grouped product of one stage: `x` [rows, k_dim] sorted by expert with
// `counts`, weights `w` of shape [experts, n, k_dim], into `y` [rows, n].
inline MoeGemmParams stage_params(ActType at, const ExpertWeights& w, int64_t experts, int64_t n,
                                  int64_t k_dim, int64_t rows, const void* x,
                                  const int32_t* counts, void* y) {
  MoeGemmParams q;
  q.act_type = at;
  q.weight_type = w.weight_type;
  q.asym = w.asym;
  q.num_experts = experts;
  q.n = n;
  q.k = k_dim;
  q.total_tokens = rows;
  q.group_size = w.group_size;
  q.activations = x;
  q.weights = w.weights;
  q.scales = w.scales;
  q.zeros = w.zeros;
  q.tokens_per_expert = counts;
  q.out = y;
  return q;
}

}  // namespace qmoe
