// The fused MoE layer on the CPU, stage by stage over the workspace, with the
// grouped products of the CPU backend.
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/fused_moe_workspace.h"
#include "core/routing.h"
#include "cpu/thread_pool.h"

namespace qmoe::cpu {
namespace {

template <class Act>
Status route_with(const FusedMoeParams& p, int32_t* ids, float* weights) {
  const int E = int(p.num_experts), k = int(p.top_k);
  parallel_for((p.num_tokens + 63) / 64, [&](int64_t blk) {
    for (int64_t t = blk * 64; t < std::min(p.num_tokens, (blk + 1) * 64); ++t) {
      const auto logit = [&](int e) {
        return p.logits_f32 ? static_cast<const float*>(p.router_logits)[t * E + e]
                            : Act::to_float(static_cast<const uint16_t*>(p.router_logits)[t * E + e]);
      };
      route_token(logit, p.routing, E, k, ids + t * k, weights + t * k);
    }
  });
  return Status::success();
}

// SiLU(gate)·up of rows [rows, 2*inter] into [rows, inter].
template <class Act>
void swiglu(const uint16_t* gu, int64_t rows, int64_t inter, uint16_t* out) {
  parallel_for((rows + 15) / 16, [&](int64_t blk) {
    for (int64_t r = blk * 16; r < std::min(rows, (blk + 1) * 16); ++r)
      for (int64_t i = 0; i < inter; ++i)
        out[r * inter + i] = Act::from_float(silu(Act::to_float(gu[r * 2 * inter + i])) *
                                             Act::to_float(gu[r * 2 * inter + inter + i]));
  });
}

template <class Act>
Status fused(const FusedMoeParams& p, const FusedWorkspace& ws) {
  const int64_t T = p.num_tokens, K = p.top_k, H = p.hidden, I = p.intermediate, E = p.num_experts;
  const int64_t pairs = T * K;
  const int32_t* ids = p.topk_ids;
  const float* weights = p.topk_weights;
  if (!ids) {
    route_with<Act>(p, ws.topk_ids, ws.topk_weights);
    ids = ws.topk_ids;
    weights = ws.topk_weights;
  }
  // Grouping: counts, then a stable placement (pairs in token order within an expert).
  std::vector<int64_t> next(size_t(E), 0);
  for (int64_t e = 0; e < E; ++e) ws.counts[e] = 0;
  for (int64_t i = 0; i < pairs; ++i) {
    if (ids[i] < 0 || ids[i] >= E)
      return Status::invalid("topk_ids: entry " + std::to_string(i) + " is " + std::to_string(ids[i]) +
                             ", not an expert in [0, " + std::to_string(E) + ")");
    ws.counts[ids[i]]++;
  }
  for (int64_t e = 1; e < E; ++e) next[size_t(e)] = next[size_t(e - 1)] + ws.counts[e - 1];
  for (int64_t i = 0; i < pairs; ++i) ws.slot_of[i] = int32_t(next[size_t(ids[i])]++);
  const auto* x = static_cast<const uint16_t*>(p.hidden_states);
  parallel_for((pairs + 63) / 64, [&](int64_t blk) {
    for (int64_t i = blk * 64; i < std::min(pairs, (blk + 1) * 64); ++i)
      std::copy(x + (i / K) * H, x + (i / K + 1) * H, ws.x_sorted + int64_t(ws.slot_of[i]) * H);
  });

  const ActType at = p.act_type;
  const auto phase_of = [](const MoeGemmParams& q) { return choose_phase(q); };
  MoeGemmParams q = stage_params(at, p.gate_up, E, 2 * I, H, pairs, ws.x_sorted, ws.counts, ws.gate_up);
  if (Status s = run(q, phase_of(q)); !s.ok()) return s;
  swiglu<Act>(ws.gate_up, pairs, I, ws.act);
  q = stage_params(at, p.down, E, H, I, pairs, ws.act, ws.counts, ws.expert_out);
  if (Status s = run(q, phase_of(q)); !s.ok()) return s;

  std::vector<float> shared_scale;
  const int64_t Is = p.shared_intermediate;
  ws.all_tokens[0] = int32_t(T);
  const int32_t* all_tokens = ws.all_tokens;
  if (Is > 0) {
    q = stage_params(at, p.shared_gate_up, 1, 2 * Is, H, T, x, all_tokens, ws.shared_gate_up);
    if (Status s = run(q, phase_of(q)); !s.ok()) return s;
    swiglu<Act>(ws.shared_gate_up, T, Is, ws.shared_act);
    q = stage_params(at, p.shared_down, 1, H, Is, T, ws.shared_act, all_tokens, ws.shared_out);
    if (Status s = run(q, phase_of(q)); !s.ok()) return s;
    shared_scale.assign(size_t(T), 1.0f);
    if (p.shared_gate) {
      const auto* g = static_cast<const uint16_t*>(p.shared_gate);
      for (int64_t t = 0; t < T; ++t) {
        float dot = 0.0f;
        for (int64_t h = 0; h < H; ++h) dot += Act::to_float(x[t * H + h]) * Act::to_float(g[h]);
        shared_scale[size_t(t)] = 1.0f / (1.0f + std::exp(-dot));
      }
    }
  }

  // Weighted sum in routing order: deterministic, no atomics.
  auto* out = static_cast<uint16_t*>(p.out);
  parallel_for((T + 7) / 8, [&](int64_t blk) {
    for (int64_t t = blk * 8; t < std::min(T, (blk + 1) * 8); ++t)
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.0f;
        for (int64_t j = 0; j < K; ++j)
          acc += weights[t * K + j] * Act::to_float(ws.expert_out[int64_t(ws.slot_of[t * K + j]) * H + h]);
        if (Is > 0) acc += shared_scale[size_t(t)] * Act::to_float(ws.shared_out[t * H + h]);
        out[t * H + h] = Act::from_float(acc);
      }
  });
  return Status::success();
}

}  // namespace

Status route(const FusedMoeParams& p, int32_t* topk_ids, float* topk_weights) {
  Status s;
  visit_act(p.act_type, [&](auto act) { s = route_with<decltype(act)>(p, topk_ids, topk_weights); });
  return s;
}

Status fused_moe(const FusedMoeParams& p) {
  std::unique_ptr<char[]> owned;
  void* base = p.workspace;
  if (!base) {
    owned.reset(new char[fused_moe_workspace_size(p) + 256]);
    base = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(owned.get()) + 255) / 256 * 256);
  }
  FusedWorkspace ws;
  FusedWorkspace::carve(p, base, &ws);
  Status s;
  visit_act(p.act_type, [&](auto act) { s = fused<decltype(act)>(p, ws); });
  return s;
}

}  // namespace qmoe::cpu
