// fused_moe / moe_route: argument checks, then the CPU or CUDA layer.
#include "qmoe/fused_moe.h"

#include <string>

#include "core/backend.h"
#include "core/fused_moe_workspace.h"
#include "core/routing.h"

namespace qmoe {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

// The rules of one stage's weights are those of a grouped product.
Status check_stage(const char* name, ActType at, const ExpertWeights& w, int64_t experts, int64_t n,
                   int64_t k_dim) {
  static const int32_t placeholder = 0;  // stands for buffers that fused_moe provides
  const MoeGemmParams q = stage_params(at, w, experts, n, k_dim, 1, &placeholder, &placeholder,
                                       const_cast<int32_t*>(&placeholder));
  Status s = validate(q, Device{});
  if (!s.ok()) s.message = std::string(name) + ": " + s.message;
  return s;
}

Status check(const FusedMoeParams& p, const Device& device, bool routing_only) {
  if (p.act_type != ActType::f16 && p.act_type != ActType::bf16)
    return Status::invalid("act_type: must be f16 or bf16");
  if (p.num_tokens < 0) return Status::invalid("num_tokens must be >= 0, got " + str(p.num_tokens));
  if (p.hidden < 1) return Status::invalid("hidden must be >= 1, got " + str(p.hidden));
  if (p.intermediate < 1 && !routing_only)
    return Status::invalid("intermediate must be >= 1, got " + str(p.intermediate));
  if (p.num_experts < 1 || p.num_experts > kMaxRoutedExperts)
    return Status::invalid("num_experts must be in [1, " + str(kMaxRoutedExperts) + "], got " + str(p.num_experts));
  if (p.top_k < 1 || p.top_k > p.num_experts || p.top_k > kMaxTopK)
    return Status::invalid("top_k must be in [1, min(num_experts, " + str(kMaxTopK) + ")], got " + str(p.top_k));

  const bool precomputed = p.topk_ids || p.topk_weights;
  if (precomputed && p.router_logits)
    return Status::invalid("router_logits: give router_logits or topk_ids/topk_weights, not both");
  if (precomputed && !(p.topk_ids && p.topk_weights))
    return Status::invalid("topk_ids and topk_weights go together");
  if (!precomputed && !p.router_logits && p.num_tokens > 0)
    return Status::invalid("router_logits: required (or topk_ids and topk_weights)");
  if (routing_only && precomputed) return Status::invalid("moe_route: needs router_logits");
  const RoutingParams& r = p.routing;
  if (r.scoring != Scoring::softmax && r.scoring != Scoring::sigmoid)
    return Status::invalid("routing.scoring: softmax or sigmoid");
  if (r.num_groups < 1 || r.num_groups > 64 || p.num_experts % r.num_groups != 0)
    return Status::invalid("routing.num_groups must be in [1, 64] and divide num_experts, got " + str(r.num_groups));
  if (r.topk_groups < 1 || r.topk_groups > r.num_groups)
    return Status::invalid("routing.topk_groups must be in [1, num_groups], got " + str(r.topk_groups));
  if (p.top_k > r.topk_groups * (p.num_experts / r.num_groups))
    return Status::invalid("top_k exceeds the experts of the routing.topk_groups kept groups");
  if (p.num_tokens > 0 && !p.hidden_states && !routing_only) return Status::invalid("hidden_states: null pointer");
  if (p.num_tokens > 0 && !p.out && !routing_only) return Status::invalid("out: null pointer");

  if (!routing_only) {
    if (Status s = check_stage("gate_up", p.act_type, p.gate_up, p.num_experts, 2 * p.intermediate, p.hidden); !s.ok()) return s;
    if (Status s = check_stage("down", p.act_type, p.down, p.num_experts, p.hidden, p.intermediate); !s.ok()) return s;
    if (p.shared_intermediate < 0) return Status::invalid("shared_intermediate must be >= 0");
    if (p.shared_intermediate > 0) {
      if (Status s = check_stage("shared_gate_up", p.act_type, p.shared_gate_up, 1, 2 * p.shared_intermediate, p.hidden); !s.ok()) return s;
      if (Status s = check_stage("shared_down", p.act_type, p.shared_down, 1, p.hidden, p.shared_intermediate); !s.ok()) return s;
    } else if (p.shared_gate) {
      return Status::invalid("shared_gate: given without shared experts (shared_intermediate = 0)");
    }
  }
  if (device.type == DeviceType::cuda) {
    if (!built_with_cuda()) return Status::unsupported("device: qmoe was built without CUDA (configure with QMOE_CUDA=ON)");
    if (!routing_only && p.num_tokens > 0 &&
        (!p.workspace || p.workspace_bytes < fused_moe_workspace_size(p)))
      return Status::invalid("workspace: CUDA needs fused_moe_workspace_size() = " +
                             std::to_string(fused_moe_workspace_size(p)) + " bytes of device memory");
  } else if (device.type != DeviceType::cpu) {
    return Status::invalid("device: unknown device type");
  } else if (p.workspace && p.workspace_bytes < fused_moe_workspace_size(p)) {
    return Status::invalid("workspace: smaller than fused_moe_workspace_size()");
  }
  return Status::success();
}

}  // namespace

size_t fused_moe_workspace_size(const FusedMoeParams& p) { return FusedWorkspace::carve(p, nullptr, nullptr); }

Status fused_moe(const FusedMoeParams& p, const Device& device) {
  if (Status s = check(p, device, false); !s.ok()) return s;
  if (p.num_tokens == 0) return Status::success();
  return device.type == DeviceType::cuda ? cuda::fused_moe(p, device) : cpu::fused_moe(p);
}

Status moe_route(const FusedMoeParams& p, int32_t* topk_ids, float* topk_weights, const Device& device) {
  if (Status s = check(p, device, true); !s.ok()) return s;
  if (!topk_ids || !topk_weights) return Status::invalid("topk_ids/topk_weights: null output pointer");
  if (p.num_tokens == 0) return Status::success();
  return device.type == DeviceType::cuda ? cuda::route(p, topk_ids, topk_weights, device)
                                         : cpu::route(p, topk_ids, topk_weights);
}

}  // namespace qmoe
