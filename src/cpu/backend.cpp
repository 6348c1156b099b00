// CPU backend: count checks and the choice of kernel.
//
// `run` picks the instruction-set level (src/cpu/isa.h: best of this CPU, or
// QMOE_CPU_ISA) and runs that level's kernels (src/cpu/simd/). A level that
// does not take a call (EKN layout, a group size that is not a whole number
// of its decode units) hands it down: avx512 -> avx2 -> the portable blocked
// kernel, which takes everything.
#include <string>

#include "core/backend.h"
#include "cpu/blocked.h"
#include "cpu/isa.h"
#include "cpu/simd/simd.h"

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

Status run(const MoeGemmParams& p, Phase phase) {
  const Isa isa = selected_isa();
  if (isa == Isa::avx512 && simd::run_avx512(p, phase)) {
    note_isa_used(Isa::avx512);
    return Status::success();
  }
  if (isa >= Isa::avx2 && simd::run_avx2(p, phase)) {
    note_isa_used(Isa::avx2);
    return Status::success();
  }
  note_isa_used(Isa::portable);
  return run_blocked(p);
}

}  // namespace qmoe::cpu
