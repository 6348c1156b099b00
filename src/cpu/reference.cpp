// The oracle: one weight at a time through the encoding trait, float32
// accumulation in k order, no blocking, no threads. Every faster path is
// tested against this (and this against a float64 product in the tests).
#include <vector>

#include "core/backend.h"
#include "cpu/expert_view.h"

namespace qmoe::cpu {

Status run_reference(const MoeGemmParams& p) {
  std::vector<int64_t> offsets(p.num_experts + 1);
  expert_offsets(p, offsets.data());
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    using Act = decltype(act);
    using Enc = decltype(enc);
    const WeightView<Act, Enc> w(p);
    const auto* a = static_cast<const uint16_t*>(p.activations);
    auto* out = static_cast<uint16_t*>(p.out);
    std::vector<float> wrow(p.k);
    for (int64_t e = 0; e < p.num_experts; ++e) {
      for (int64_t r = 0; r < p.n; ++r) {
        if (offsets[e] == offsets[e + 1]) break;
        w.dequant_row(e, r, 0, p.k, wrow.data());
        const float cs = w.column_scale(e, r);
        for (int64_t t = offsets[e]; t < offsets[e + 1]; ++t) {
          float acc = 0.0f;
          for (int64_t k = 0; k < p.k; ++k) acc += Act::to_float(a[t * p.k + k]) * wrow[k];
          out[t * p.n + r] = Act::from_float(acc * cs);
        }
      }
    }
  });
  return Status::success();
}

}  // namespace qmoe::cpu
