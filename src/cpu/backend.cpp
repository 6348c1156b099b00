// CPU backend: count checks and the choice of kernel.
#include <string>

#include "core/backend.h"
#include "cpu/blocked.h"

namespace qmoe::cpu {

Status check_counts(const MoeGemmParams& p) {
  int64_t sum = 0;
  for (int64_t e = 0; e < p.num_experts; ++e) {
    const int32_t c = p.tokens_per_expert[e];
    if (c < 0)
      return Status::invalid("num_tokens_per_expert[" + std::to_string(e) +
                             "] is negative (" + std::to_string(c) + ")");
    sum += c;
  }
  if (sum != p.total_tokens)
    return Status::invalid("sum of num_tokens_per_expert (" + std::to_string(sum) +
                           ") != total_tokens (" + std::to_string(p.total_tokens) + ")");
  return Status::success();
}

Status run(const MoeGemmParams& p, Phase /*phase*/) { return run_blocked(p); }

}  // namespace qmoe::cpu
